"""kernels/__init__.py and kernels/common.py, on the CPU (Triton's interpreter from conftest.py):
- use_backend: backend=None follows it, an explicit backend= wins, it nests, and the default comes
  back after the block, also after an exception; whole models follow it;
- common.use_triton, common.autocast_inputs and common.memory_format (against torch's own rule).
Values of the two backends are compared with rel <= 1e-5 (fp32: the kernels sum in another
order than the references; their own tests bound the error the same way).
"""

import collections
import importlib

import pytest
import torch

import kernels
from kernels import common

from helpers import CL, rel, tiny_alignment

dc = importlib.import_module("kernels.deform_conv")
fw = importlib.import_module("kernels.flow_warp")  # kernels.flow_warp is the function


@pytest.fixture
def calls(monkeypatch):
    """Counts of the implementations that ran: 'dcn triton', 'dcn torch', 'warp triton',
    'warp torch'."""
    counts = collections.Counter()

    def count(module, name, key):
        fn = getattr(module, name)

        def counted(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    # The forward kernel's launch, in both DCN custom ops (vsr::flow_guided_deform_conv2d is the
    # one BasicVSR++ calls).
    count(dc, "_launch_forward", "dcn triton")
    count(dc, "deform_conv2d_reference", "dcn torch")
    count(dc, "deform_conv2d_cpu", "dcn cpu")
    count(fw, "_flow_warp_triton", "warp triton")
    count(fw, "flow_warp_reference", "warp torch")
    return counts


def both_ops(**backend):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 5, 6, generator=gen)
    out = kernels.deform_conv2d(
        x,
        torch.randn(1, 36, 5, 6, generator=gen),
        torch.rand(1, 18, 5, 6, generator=gen),
        torch.randn(3, 4, 3, 3, generator=gen),
        padding=1,
        deform_groups=2,
        **backend,
    )
    return out, kernels.flow_warp(x, 2 * torch.randn(1, 2, 5, 6, generator=gen), **backend)


def test_use_backend_sets_the_default_of_backend_none(calls):
    reference = both_ops()
    # CPU tensors, no block: the DCN's CPU path (kernels.cpu), the warp's reference (grid_sample)
    assert calls == {"dcn cpu": 1, "warp torch": 1}
    calls.clear()
    with kernels.use_backend("triton"):
        assert kernels.get_backend() == "triton"
        triton = both_ops()
        assert calls == {"dcn triton": 1, "warp triton": 1}
        calls.clear()
        both_ops(backend="torch")  # an explicit argument wins
        assert calls == {"dcn torch": 1, "warp torch": 1}
        calls.clear()
        with kernels.use_backend("torch"):
            both_ops()
            assert calls == {"dcn torch": 1, "warp torch": 1}
            both_ops(backend="triton")
            assert calls == {"dcn torch": 1, "warp torch": 1, "dcn triton": 1, "warp triton": 1}
        assert kernels.get_backend() == "triton"  # the outer block's default is back
    assert kernels.get_backend() is None
    for a, b in zip(triton, reference):  # the same values, by another implementation
        assert rel(a, b) <= 1e-5


def test_use_backend_restores_the_default_after_an_exception():
    with pytest.raises(ZeroDivisionError):
        with kernels.use_backend("torch"):
            1 / 0
    assert kernels.get_backend() is None
    with pytest.raises(ValueError, match="use_backend"):
        with kernels.use_backend("cuda"):
            pass
    assert kernels.get_backend() is None


def test_use_backend_switches_the_networks_modules(calls):
    step = tiny_alignment()
    outs = {}
    for backend in ("triton", "torch"):
        calls.clear()
        with kernels.use_backend(backend):
            outs[backend] = step()
        other = "torch" if backend == "triton" else "triton"
        assert calls[f"dcn {backend}"] == 1 and calls[f"warp {backend}"] > 1
        assert calls[f"dcn {other}"] == 0 and calls[f"warp {other}"] == 0
    assert rel(outs["triton"], outs["torch"]) <= 1e-5


# ----------------------------------------------------------------------------------------
# kernels/common.py


def test_use_triton(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.setattr(common, "INTERPRET", True)  # as under conftest.py without a GPU
    assert common.use_triton("op", None, x) is False  # CPU tensor, automatic: the reference
    assert common.use_triton("op", "torch", x) is False
    assert common.use_triton("op", "triton", x) is True
    with kernels.use_backend("triton"):
        assert common.use_triton("op", None, x) is True
        assert common.use_triton("op", "torch", x) is False
    with pytest.raises(ValueError, match="op: backend must be"):
        common.use_triton("op", "cuda", x)
    monkeypatch.setattr(common, "INTERPRET", False)
    with pytest.raises(
        RuntimeError, match="op: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1"
    ):
        common.use_triton("op", "triton", x)


def test_autocast_inputs():
    x, w, pos = (
        torch.randn(2),
        torch.randn(2, dtype=torch.float64),
        torch.randn(2, dtype=torch.bfloat16),
    )
    (x2, w2, none), (pos2,) = common.autocast_inputs(x, (x, w, None), (pos,))
    assert (x2.dtype, w2.dtype, none, pos2.dtype) == (
        torch.float32,
        torch.float32,
        None,
        torch.bfloat16,
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (x2, w2, none), (pos2, none2) = common.autocast_inputs(x, (x, w, None), (pos, None))
    assert (x2.dtype, w2.dtype, none, pos2.dtype, none2) == (
        torch.bfloat16,
        torch.bfloat16,
        None,
        torch.float32,
        None,
    )
    assert torch.equal(pos2, pos.float()) and torch.equal(x2, x.bfloat16())


def test_memory_format_is_torchs_rule():
    # torch's suggest_memory_format (its Python twin in _prims_common is the oracle), on the
    # ambiguous shapes: one channel, 1x1 maps, non-dense slices, stride-0 expands.
    from torch._prims_common import suggest_memory_format

    clip = torch.randn(2, 3, 4, 5, 6)  # (n, t, c, h, w) or (n, t, h, w, c)
    cases = [
        torch.randn(2, 3, 4, 5),
        torch.randn(2, 3, 4, 5).contiguous(memory_format=CL),
        torch.randn(2, 1, 4, 5),
        torch.empty(2, 1, 4, 5, memory_format=CL),
        torch.randn(2, 3, 1, 1),
        torch.empty(2, 3, 1, 1, memory_format=CL),
        torch.empty(1, 1, 1, 1, memory_format=CL),
        clip[:, 1],
        clip.permute(0, 1, 4, 2, 3)[:, 1],
        torch.randn(1, 3, 1, 1).expand(2, 3, 4, 5),
        torch.randn(2, 4, 5, 3).permute(0, 3, 1, 2)[:, :, 1:3],
        torch.randn(2, 3, 4, 5).transpose(2, 3),
    ]
    got = [common.memory_format(t) for t in cases]
    assert got == [suggest_memory_format(t) for t in cases]
    # channels-last: the plain one, one channel, 1x1 maps, a frame of an NHWC clip, an NHWC crop
    assert [i for i, f in enumerate(got) if f == CL] == [1, 3, 5, 8, 10]
