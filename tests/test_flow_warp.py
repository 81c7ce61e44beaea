"""flow_warp: the reference against known values and gradcheck, then the Triton kernel (under
TRITON_INTERPRET=1 on CPU) against the reference on the output and both gradients.

Error measure: rel(a, b) = max|a - b| / max|b|, b the reference (a norm-wise relative error).
fp32 must reach rel <= 1e-5. bf16/fp16 must stay within 2x the reference's own error against
fp32 (max|ref_lp - ref_fp32|), plus a floor of a quarter ulp of the largest value.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from kernels.bench import smooth_flow
from kernels.flow_warp import flow_warp, flow_warp_reference

from helpers import CL, cuda, is_cl, rel

triton_bk = dict(backend="triton")


def run(fn, x, flow, g, **kw):
    """(out, grad_x, grad_flow) of fn(x, flow) for the upstream gradient g."""
    x = x.detach().requires_grad_()
    flow = flow.detach().requires_grad_()
    out = fn(x, flow, **kw)
    gx, gf = torch.autograd.grad(out, (x, flow), g)
    return out, gx, gf


def random_case(n, c, h, w, scale=3.0, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen)
    flow = torch.randn(n, 2, h, w, generator=gen) * scale
    g = torch.randn(n, c, h, w, generator=gen)
    return x.to(device), flow.to(device), g.to(device)


def shifted(x, fx, fy, border):
    """x sampled at integer positions (i + fy, j + fx): zeros outside, or clamped to the border."""
    n, c, h, w = x.shape
    ii = torch.arange(h).view(1, h, 1) + fy
    jj = torch.arange(w).view(1, 1, w) + fx
    inside = (ii >= 0) & (ii < h) & (jj >= 0) & (jj < w)
    if border:
        inside = torch.ones_like(inside)
    idx = (ii.clamp(0, h - 1) * w + jj.clamp(0, w - 1)).view(n, 1, h * w).expand(n, c, h * w)
    return x.reshape(n, c, h * w).gather(2, idx).view(n, c, h, w) * inside[:, None]


# ----------------------------------------------------------------------------------------
# Reference: known values (those of open-mmlab/mmagic's
# tests/test_models/test_utils/test_flow_warp.py) and gradcheck.


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="flow_warp"):
        flow_warp(torch.rand(1, 3, 10, 10), torch.rand(1, 2, 4, 4))
    with pytest.raises(ValueError, match="flow_warp"):
        flow_warp(
            torch.rand(1, 3, 10, 10), torch.rand(1, 10, 10, 2)
        )  # mmagic's (n, h, w, 2) layout
    with pytest.raises(ValueError, match="padding_mode"):
        flow_warp(torch.rand(1, 3, 4, 4), torch.rand(1, 2, 4, 4), padding_mode="reflection")
    with pytest.raises(ValueError, match="backend"):
        flow_warp(torch.rand(1, 3, 4, 4), torch.rand(1, 2, 4, 4), backend="cuda")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_minus_one_flow_shifts_by_one(backend):
    x = torch.rand(1, 3, 10, 10)
    out = flow_warp(x, -torch.ones(1, 2, 10, 10), backend=backend)
    expected = torch.zeros_like(x)
    expected[:, :, 1:, 1:] = x[:, :, :-1, :-1]
    assert out.shape == (1, 3, 10, 10)
    assert (out - expected).abs().sum() < 1e-5


def test_zero_flow_is_identity():
    # Reference: h-1 and w-1 powers of two, so grid_sample's normalisation round trip is exact.
    for backend, (h, w) in (("torch", (9, 17)), ("triton", (7, 11))):
        x = torch.randn(2, 3, h, w)
        for mode in ("zeros", "border"):
            assert torch.equal(flow_warp(x, torch.zeros(2, 2, h, w), mode, backend=backend), x)


@pytest.mark.parametrize("mode", ["zeros", "border"])
def test_integer_flows_are_exact_shifts(mode):
    gen = torch.Generator().manual_seed(1)
    # Reference: h-1 and w-1 powers of two, so grid_sample's normalisation round trip is exact.
    for backend, (h, w) in (("torch", (9, 17)), ("triton", (7, 11))):
        x = torch.randn(2, 3, h, w, generator=gen)
        fx = torch.randint(-4, 5, (2, h, w), generator=gen)
        fy = torch.randint(-4, 5, (2, h, w), generator=gen)
        out = flow_warp(x, torch.stack((fx, fy), 1).float(), mode, backend=backend)
        torch.testing.assert_close(out, shifted(x, fx, fy, mode == "border"), rtol=0, atol=0)


def test_border_mode_known_values():
    x = torch.arange(12.0).view(1, 1, 3, 4)
    flow = torch.zeros(1, 2, 3, 4)
    flow[0, 0] = 10.0  # far right: every row reads its last column
    flow[0, 1, 1] = -0.5  # middle row, half a pixel up, inside
    flow[0, 1, 0] = -7.0  # top row, far above: clamped to row 0
    expected = torch.tensor([[3.0, 3, 3, 3], [5, 5, 5, 5], [11, 11, 11, 11]]).view(1, 1, 3, 4)
    for backend in ("torch", "triton"):
        torch.testing.assert_close(
            flow_warp(x, flow, "border", backend=backend), expected, rtol=0, atol=1e-6
        )


@pytest.mark.parametrize("mode", ["zeros", "border"])
def test_reference_gradcheck(mode):
    x, flow, _ = random_case(2, 2, 4, 5, scale=2.0, seed=2)
    x, flow = x.double().requires_grad_(), flow.double().requires_grad_()
    # fast_mode: a random projection of the Jacobians, not all of them; a wrong entry still shows.
    assert torch.autograd.gradcheck(
        lambda a, b: flow_warp_reference(a, b, mode), (x, flow), eps=1e-6, atol=1e-6, fast_mode=True
    )


# ----------------------------------------------------------------------------------------
# Triton kernel against the reference, fp32.


@pytest.mark.parametrize(
    "shape", [(2, 3, 11, 13), (1, 64, 7, 5), (3, 1, 5, 1), (1, 33, 1, 7), (1, 2, 1, 1)]
)
@pytest.mark.parametrize("mode", ["zeros", "border"])
def test_triton_matches_reference_fp32(shape, mode):
    x, flow, g = random_case(*shape, seed=sum(shape))
    flow[:, :, ::3] *= 3  # some samples well outside the image
    for a, b in zip(
        run(flow_warp, x, flow, g, padding_mode=mode, **triton_bk),
        run(flow_warp_reference, x, flow, g, padding_mode=mode),
    ):
        assert rel(a, b) <= 1e-5 or b.abs().max() == 0 and a.abs().max() == 0


@pytest.mark.parametrize("mode", ["zeros", "border"])
def test_triton_exact_boundaries(mode):
    # Positions on integers and half-integers, including -1, 0, w-1, w, and beyond. With h-1
    # and w-1 powers of two the reference's positions are exact, so the gradients at these
    # kinks follow the same (grid_sample) side: at -1 the row-0 corner still gives a gradient;
    # in border mode a position on or past the border gets none.
    h, w = 5, 9
    x, _, g = random_case(2, 3, h, w, seed=3)
    steps = torch.tensor([-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0])
    gen = torch.Generator().manual_seed(4)
    pos_x = torch.cat((steps, w - 1 + steps))[torch.randint(0, 14, (2, h, w), generator=gen)]
    pos_y = torch.cat((steps, h - 1 + steps))[torch.randint(0, 14, (2, h, w), generator=gen)]
    flow = torch.stack((pos_x - torch.arange(w), pos_y - torch.arange(h).view(h, 1)), 1)
    for a, b in zip(
        run(flow_warp, x, flow, g, padding_mode=mode, **triton_bk),
        run(flow_warp_reference, x, flow, g, padding_mode=mode),
    ):
        assert rel(a, b) <= 1e-6


@pytest.mark.parametrize("mode", ["zeros", "border"])
def test_triton_far_and_nonfinite_flows_stay_in_bounds(mode):
    # x is a view into a NaN-filled buffer: any read outside x would show up as a NaN.
    n, c, h, w = 2, 3, 6, 7
    buf = torch.full((n, c + 2, h + 4, w + 4), float("nan"))
    x = buf[:, 1:-1, 2:-2, 2:-2]
    x.copy_(torch.randn(n, c, h, w))
    _, flow, g = random_case(n, c, h, w, seed=5)
    bad = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 1e6, -1e6, 3e38])
    flow.view(-1)[::3] = bad[torch.arange(flow.numel())[::3] % len(bad)]
    tri = run(flow_warp, x, flow, g, padding_mode=mode, **triton_bk)
    ref = run(flow_warp_reference, x, flow, g, padding_mode=mode)
    for a, b in zip(tri, ref):
        assert torch.isfinite(a).all()
        assert rel(a, b) <= 1e-5
    # Far or non-finite components get no flow gradient.
    assert (tri[2][~(flow.abs() < 1e5)] == 0).all()


def test_triton_non_contiguous_inputs_unmutated():
    n, t, c, h, w = 2, 3, 4, 7, 9
    lqs = torch.randn(n, t, c, h, w)
    x = lqs[:, 1]  # the frame slice of a 5-d clip
    flow = (torch.randn(n, h, w, 2) * 2).permute(
        0, 3, 1, 2
    )  # (n, 2, h, w) view of a channels-last flow
    g = torch.randn(1, c, 1, w).expand(n, c, h, w)  # stride-0 upstream gradient
    assert not x.is_contiguous() and not flow.is_contiguous()
    x_before, flow_before = x.clone(), flow.clone()
    for mode in ("zeros", "border"):
        for a, b in zip(
            run(flow_warp, x, flow, g, padding_mode=mode, **triton_bk),
            run(
                flow_warp_reference,
                x.contiguous(),
                flow.contiguous(),
                g.contiguous(),
                padding_mode=mode,
            ),
        ):
            assert rel(a, b) <= 1e-5
    xl = x.contiguous(memory_format=torch.channels_last)
    assert rel(flow_warp(xl, flow, **triton_bk), flow_warp_reference(x, flow)) <= 1e-5
    assert torch.equal(x, x_before) and torch.equal(flow, flow_before)


# ----------------------------------------------------------------------------------------
# Memory formats: the output (both paths) and grad_x take x's; real and fake strides agree.


@pytest.mark.parametrize("mode", ["zeros", "border"])
def test_triton_channels_last_matches_nchw_reference(mode):
    # x channels-last with a channels-last or an NCHW flow, and an NCHW x with a channels-last flow:
    # values and both gradients as the NCHW reference, the output and grad_x in x's format.
    x, flow, g = random_case(2, 5, 6, 7, seed=12)
    ref = run(flow_warp_reference, x, flow, g, padding_mode=mode)
    for x_cl, flow_cl in ((True, True), (True, False), (False, True)):
        xi = x.contiguous(memory_format=CL) if x_cl else x
        fi = flow.contiguous(memory_format=CL) if flow_cl else flow
        for fn, kw in ((flow_warp, triton_bk), (flow_warp_reference, {})):
            out, gx, gf = run(fn, xi, fi, g.contiguous(memory_format=CL), padding_mode=mode, **kw)
            for a, b in zip((out, gx, gf), ref):
                assert rel(a, b) <= 1e-5
            assert is_cl(out) == x_cl, (fn.__name__, x_cl, flow_cl)
            if fn is flow_warp:
                assert is_cl(gx) == x_cl


def test_fake_strides_match_real():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, flow, g = random_case(2, 3, 4, 5, seed=13)
    for xi, fi in (
        (x.contiguous(memory_format=CL), flow),
        (x, flow.contiguous(memory_format=CL)),
        (torch.randn(2, 1, 4, 5).contiguous(memory_format=CL), flow),  # one channel
        (torch.randn(1, 3, 1, 1).contiguous(memory_format=CL), flow[:1, :, :1, :1]),
    ):
        args = (
            g[:, : xi.shape[1], : xi.shape[2], : xi.shape[3]].contiguous(memory_format=CL),
            xi,
            fi,
            "border",
        )
        real = [torch.ops.vsr.flow_warp(*args[1:]), *torch.ops.vsr.flow_warp_backward(*args)]
        with FakeTensorMode() as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake = [
                torch.ops.vsr.flow_warp(*fake_args[1:]),
                *torch.ops.vsr.flow_warp_backward(*fake_args),
            ]
        for r, f in zip(real, fake):
            assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype)


# ----------------------------------------------------------------------------------------
# Low precision and autocast.


def check_low_precision(x, flow, g, dtype, mode, backend):
    ref32 = run(flow_warp_reference, x, flow, g, padding_mode=mode)
    ref_lp = run(flow_warp_reference, x.to(dtype), flow, g.to(dtype), padding_mode=mode)
    tri_lp = run(flow_warp, x.to(dtype), flow, g.to(dtype), padding_mode=mode, backend=backend)
    assert (
        tri_lp[0].dtype == dtype and tri_lp[1].dtype == dtype and tri_lp[2].dtype == torch.float32
    )
    for name, t, r, r32 in zip(("out", "grad_x", "grad_flow"), tri_lp, ref_lp, ref32):
        err_ref = (r.float() - r32).abs().max().item()
        err_tri = (t.float() - r32).abs().max().item()
        floor = 0.25 * torch.finfo(dtype).eps * r32.abs().max().item()
        assert err_tri <= 2 * err_ref + floor, (name, err_tri, err_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision(dtype):
    x, flow, g = random_case(2, 5, 9, 11, seed=6)
    for mode in ("zeros", "border"):
        check_low_precision(x, flow, g, dtype, mode, "triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_features_low_flow_fp32(backend):
    x, flow, g = random_case(1, 4, 6, 7, seed=7)
    x, flow = x.requires_grad_(), flow.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = flow_warp(x, flow, backend=backend)
    assert out.dtype == torch.bfloat16
    out.backward(g.to(torch.bfloat16))
    assert x.grad.dtype == torch.float32 and flow.grad.dtype == torch.float32
    expected = run(flow_warp_reference, x.to(torch.bfloat16), flow, g.to(torch.bfloat16))
    torch.testing.assert_close(out, expected[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(x.grad, expected[1].float(), rtol=1e-2, atol=1e-2)
    assert rel(flow.grad, expected[2]) <= 1e-5


# ----------------------------------------------------------------------------------------
# torch.compile, dispatch.


class WarpModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, flow):
        return flow_warp(self.conv(x), flow, backend="triton").relu() + flow_warp(
            x.mean(1, keepdim=True), flow, "border", backend="triton"
        )


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch.manual_seed(8)
    module = WarpModule()
    x, flow, _ = random_case(1, 3, 6, 7, seed=8)
    eager = run(module, x, flow, torch.ones(1, 4, 6, 7))
    torch._dynamo.reset()
    # aot_eager: the same tracing (no graph break, fake impls, autograd) as inductor, without
    # inductor's cold C++ build (about a minute on a small CPU).
    compiled = run(
        torch.compile(module, fullgraph=True, backend="aot_eager"), x, flow, torch.ones(1, 4, 6, 7)
    )
    for a, b in zip(compiled, eager):
        assert rel(a, b) <= 1e-5


def test_backend_none_on_cpu_is_the_reference():
    x, flow, _ = random_case(1, 2, 5, 6, seed=9)
    assert torch.equal(flow_warp(x, flow), flow_warp_reference(x, flow))


@pytest.mark.slow
def test_triton_on_cpu_without_interpreter_raises():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch, kernels\n"
        "x = torch.rand(1, 1, 2, 2)\n"
        "try:\n kernels.flow_warp(x, torch.zeros(1, 2, 2, 2), backend='triton')\n"
        "except RuntimeError as e:\n print(e)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=60
    )
    assert "TRITON_INTERPRET=1" in res.stdout, res.stdout + res.stderr


# ----------------------------------------------------------------------------------------
# CUDA (skipped without a GPU).


@cuda
@pytest.mark.parametrize("mode", ["zeros", "border"])
def test_cuda_fp32(mode):
    x, flow, g = random_case(2, 64, 37, 53, scale=5.0, seed=10, device="cuda")
    for a, b in zip(
        run(flow_warp, x, flow, g, padding_mode=mode),
        run(flow_warp_reference, x, flow, g, padding_mode=mode),
    ):
        assert rel(a, b) <= 1e-5


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision(dtype):
    x, flow, g = random_case(2, 64, 37, 53, scale=5.0, seed=11, device="cuda")
    for mode in ("zeros", "border"):
        check_low_precision(x, flow, g, dtype, mode, None)


@cuda
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize(
    "channels,mode", [(64, "zeros"), (3, "border")], ids=["propagation", "spynet"]
)
def test_cuda_flow_warp_at_basicvsrpp_shapes(dtype, channels, mode):
    torch.manual_seed(1)
    x = torch.randn(2, channels, 48, 80, device="cuda")
    flow = smooth_flow(2, 48, 80, 4.0, "cuda")
    g = torch.randn_like(x)
    if dtype == torch.float32:
        got = run(flow_warp, x, flow, g, padding_mode=mode, backend="triton")
        want = run(flow_warp_reference, x, flow, g, padding_mode=mode)
        for name, a, b in zip(("out", "grad_x", "grad_flow"), got, want):
            assert rel(a, b) <= 1e-5, name
    else:
        check_low_precision(x, flow, g, dtype, mode, "triton")
