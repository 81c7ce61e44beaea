"""kernels/cpu.py: the CPU path of the deformable convolution against deform_conv2d_reference
(the oracle), on the output and on every gradient (x, offset, mask, weight, bias), and the
dispatch that picks it for CPU tensors.

Tolerances. In float64 both paths do the same arithmetic up to rounding, so they agree to 1e-10
relative: that is the test that the CPU path computes the reference's function. In float32 the
CPU path's sampling positions go through grid_sample's normalised coordinates and back, which
moves a position by a few ulps of the pixel coordinate (~2e-6 px at these sizes). A sample moves
by at most that times the local slope of x (|x| <= ~4 here, so slope <= ~8), and the rounding of
the c_in*K-term sums adds ~1e-6 relative: 2e-5 relative (rel: max|a - b| / max|b|) bounds both,
for outputs and gradients, with margin. The offsets are random, so no sample lies exactly on an
integer position, where the two paths may take different one-sided offset gradients.
"""

import pytest
import torch
from torch.nn.modules.utils import _pair

import kernels
from kernels import common, cpu, deform_conv2d_reference

from helpers import CL, is_cl, rel

FP32_REL = 2e-5
FP64_REL = 1e-10


def make_inputs(
    n, c_in, c_out, h, w, groups, kernel=(3, 3), stride=1, padding=1, dilation=1, scale=2.0
):
    """x, offset, mask, weight, bias and the conv arguments (as pairs) of one case, fp64."""
    gen = torch.Generator().manual_seed(n * 1000 + c_in * 100 + h * 10 + w)
    kh, kw = kernel
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    K = kh * kw
    f64 = dict(generator=gen, dtype=torch.float64)
    x = torch.randn(n, c_in, h, w, **f64)
    offset = torch.randn(n, groups * 2 * K, ho, wo, **f64) * scale
    mask = torch.rand(n, groups * K, ho, wo, **f64) * 1.5 - 0.25  # not only in [0, 1]
    weight = torch.randn(c_out, c_in, kh, kw, **f64) / (c_in * K) ** 0.5
    bias = torch.randn(c_out, **f64)
    conv = (_pair(stride), _pair(padding), _pair(dilation), groups)
    return [x, offset, mask, weight, bias], conv


CASES = {
    "basicvsrpp-like": dict(n=1, c_in=32, c_out=16, h=12, w=20, groups=16),
    "odd sizes, batch 2": dict(n=2, c_in=6, c_out=5, h=7, w=13, groups=3),
    "one group, 1x3, no padding": dict(
        n=1, c_in=4, c_out=3, h=5, w=9, groups=1, kernel=(1, 3), padding=0
    ),
    "stride 2, dilation 2": dict(
        n=2, c_in=8, c_out=4, h=11, w=10, groups=2, stride=2, padding=2, dilation=2
    ),
    "offsets mostly outside": dict(n=1, c_in=4, c_out=2, h=6, w=6, groups=2, scale=8.0),
    "1-pixel map": dict(n=1, c_in=2, c_out=2, h=1, w=1, groups=1),
}


def run_both(inputs, conv, dtype, bias=True):
    """(reference, CPU path) outputs and their gradients, for one upstream gradient."""
    results = []
    for fn in (deform_conv2d_reference, cpu.deform_conv2d_cpu):
        leaves = [t.to(dtype).requires_grad_() for t in inputs]
        args = leaves if bias else [*leaves[:4], None]
        out = fn(*args, *conv)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad(out, leaves[: 5 if bias else 4], grad_out.to(dtype))
        results.append((out.detach(), grads))
    return results


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(case, dtype, monkeypatch):
    # Tiles of two output rows, so that every case crosses tile and batch boundaries.
    c = CASES[case]
    kh, kw = c.get("kernel", (3, 3))
    monkeypatch.setattr(cpu, "TILE_ELEMENTS", 2 * c["c_in"] * kh * kw * c["w"])
    inputs, conv = make_inputs(**c)
    (ref, ref_grads), (out, grads) = run_both(inputs, conv, dtype)
    tol = FP64_REL if dtype == torch.float64 else FP32_REL
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel(out, ref) <= tol
    for name, g, g_ref in zip(("x", "offset", "mask", "weight", "bias"), grads, ref_grads):
        assert rel(g, g_ref) <= tol, name


def test_without_bias_and_whole_frame_tile():
    inputs, conv = make_inputs(n=2, c_in=8, c_out=3, h=9, w=7, groups=4)
    (ref, ref_grads), (out, grads) = run_both(inputs, conv, torch.float32, bias=False)
    assert rel(out, ref) <= FP32_REL
    for g, g_ref in zip(grads, ref_grads):
        assert rel(g, g_ref) <= FP32_REL


def test_non_finite_and_far_offsets_read_zero():
    # NaN, +-inf and far positions contribute 0 and pass no gradient, as in the reference.
    inputs, conv = make_inputs(n=1, c_in=4, c_out=2, h=5, w=6, groups=2)
    offset = inputs[1]
    offset[0, 0, 1, 1] = float("nan")
    offset[0, 3, 2, 2] = float("inf")
    offset[0, 20, 0, 0] = -float("inf")
    offset[0, 5, 4, 5] = 1e9
    offset[0, 7, 3, 0] = -1.0 - 1e-9  # just outside (-1, h)
    inputs[2][0, 0, 1, 1] = float("nan")  # the mask of the NaN sample: masked off too
    (ref, ref_grads), (out, grads) = run_both(inputs, conv, torch.float32)
    assert torch.isfinite(out).all() and torch.isfinite(ref).all()
    assert rel(out, ref) <= FP32_REL
    for g, g_ref in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        assert rel(g, g_ref) <= FP32_REL
    assert grads[1][0, 0, 1, 1] == 0 and grads[2][0, 0, 1, 1] == 0


def test_channels_last_input_gives_channels_last_output():
    inputs, conv = make_inputs(n=2, c_in=8, c_out=6, h=6, w=9, groups=2)
    x, offset, mask, weight, bias = [t.float() for t in inputs]
    ref = deform_conv2d_reference(x, offset, mask, weight, bias, *conv)
    out = cpu.deform_conv2d_cpu(x.to(memory_format=CL), offset, mask, weight, bias, *conv)
    assert is_cl(out)
    assert rel(out, ref) <= FP32_REL
    # offset and mask are read in whatever strides they come
    offset_cl, mask_cl = offset.to(memory_format=CL), mask.to(memory_format=CL)
    out = cpu.deform_conv2d_cpu(x, offset_cl, mask_cl, weight, bias, *conv)
    assert rel(out, ref) <= FP32_REL
    assert not is_cl(cpu.deform_conv2d_cpu(x, offset, mask, weight, bias, *conv))


def test_known_value_zero_offsets_is_a_convolution():
    # With zero offsets and mask 1 the op is an ordinary convolution: an oracle of its own.
    inputs, conv = make_inputs(n=1, c_in=4, c_out=3, h=6, w=7, groups=2)
    x, _, mask, weight, bias = [t.float() for t in inputs]
    offset = torch.zeros(1, 2 * 2 * 9, 6, 7)
    out = cpu.deform_conv2d_cpu(x, offset, torch.ones_like(mask), weight, bias, *conv)
    conv2d = torch.nn.functional.conv2d(x, weight, bias, padding=1)
    assert rel(out, conv2d) <= FP32_REL


def test_bf16_runs_like_the_reference():
    # Samples and products in fp32, the GEMM in the input dtype: as the reference does.
    inputs, conv = make_inputs(n=1, c_in=8, c_out=4, h=6, w=8, groups=2)
    x, offset, mask, weight, bias = [t.to(torch.bfloat16) for t in inputs]
    ref = deform_conv2d_reference(x, offset.float(), mask, weight, bias, *conv)
    out = cpu.deform_conv2d_cpu(x, offset.float(), mask, weight, bias, *conv)
    assert out.dtype == torch.bfloat16
    assert rel(out.float(), ref.float()) <= 2**-7


def ops_run(fn):
    """The ATen ops fn() runs: the CPU path samples with grid_sampler_2d, the reference does not."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def test_dispatch_takes_the_cpu_path_by_default():
    inputs, conv = make_inputs(n=1, c_in=4, c_out=2, h=5, w=6, groups=2)
    x, offset, mask, weight, bias = [t.float() for t in inputs]
    assert common.use_cpu_path(None, x)
    assert not common.use_cpu_path("torch", x)
    with kernels.use_backend("torch"):
        assert not common.use_cpu_path(None, x)

    stride, padding, dilation, groups = conv
    kw = dict(stride=stride, padding=padding, dilation=dilation, deform_groups=groups)
    conv_offset = torch.randn(1, 3 * 2 * 9, 5, 6)
    flows = torch.randn(1, 2, 5, 6)
    for op, args in (
        (kernels.deform_conv2d, (x, offset, mask, weight, bias)),
        (kernels.flow_guided_deform_conv2d, (x, conv_offset, flows, weight, bias, 10.0)),
    ):
        default = op(*args, **kw)
        assert "aten::grid_sampler_2d" in ops_run(lambda: op(*args, **kw))
        forced = op(*args, backend="torch", **kw)
        assert "aten::grid_sampler_2d" not in ops_run(lambda: op(*args, backend="torch", **kw))
        with kernels.use_backend("torch"):
            assert "aten::grid_sampler_2d" not in ops_run(lambda: op(*args, **kw))
        assert rel(default, forced) <= FP32_REL


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
def test_flow_guided_matches_reference(dtype, layout, monkeypatch):
    # flow_guided_deform_conv2d's CPU path makes the offsets and mask a tile of rows at a time
    # (tiles of 2 rows here, so tiles and samples have boundaries); the reference makes them for
    # the whole map (flow_guided_offsets), then runs deform_conv2d_reference. Two flows, each for
    # half of the 4 groups, as in BasicVSR++; logits ~ N(0, 1.5), flows up to a few px.
    n, c_in, c_out, h, w, G = 2, 8, 6, 7, 11, 4
    monkeypatch.setattr(cpu, "TILE_ELEMENTS", 2 * c_in * 9 * w)
    gen = torch.Generator().manual_seed(5)
    f64 = dict(generator=gen, dtype=torch.float64)
    inputs = [
        torch.randn(n, c_in, h, w, **f64),  # x
        torch.randn(n, 27 * G, h, w, **f64) * 1.5,  # conv_offset
        torch.randn(n, 4, h, w, **f64) * 2,  # flows
        torch.randn(c_out, c_in, 3, 3, **f64) / (c_in * 9) ** 0.5,  # weight
        torch.randn(c_out, **f64),  # bias
    ]
    fmt = CL if layout == "channels-last" else torch.contiguous_format
    conv = dict(max_residue_magnitude=3.0, padding=1, deform_groups=G)
    results = []
    for backend in ("torch", None):
        leaves = [t.to(dtype).requires_grad_() for t in inputs]
        x, conv_offset = [t.contiguous(memory_format=fmt) for t in leaves[:2]]
        args = (x, conv_offset, *leaves[2:])
        out = kernels.flow_guided_deform_conv2d(*args, backend=backend, **conv)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        results.append((out.detach(), torch.autograd.grad(out, leaves, grad_out.to(dtype))))
    (ref, ref_grads), (got, grads) = results
    tol = FP64_REL if dtype == torch.float64 else FP32_REL
    assert got.dtype == dtype and is_cl(got) == (layout == "channels-last")
    assert rel(got, ref) <= tol
    for name, g, g_ref in zip(("x", "conv_offset", "flows", "weight", "bias"), grads, ref_grads):
        assert rel(g, g_ref) <= tol, name
