"""kernels/deform_conv.py: the reference against known values, then the Triton kernel against
the reference on the output and on every gradient (x, offset, mask, weight, bias); the same for
flow_guided_deform_conv2d (x, conv_offset, flows, weight, bias), whose offset glue is first
checked against BasicVSR++'s own code.

On a machine without a GPU, conftest.py sets TRITON_INTERPRET=1 and the kernel runs on CPU
tensors in Triton's interpreter, so shapes stay tiny.

Relative error: rel(a, b) = max|a - b| / max|b| over the whole tensor, where b is the oracle:
the reference run in float64 on the same (already rounded) inputs.
- fp32: rel <= 1e-5.
- bf16/fp16: rel(triton) <= 2 * rel(reference run in that dtype) + a floor of eps(dtype) / 8.
"""

import copy
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair
from triton.backends import backends as TRITON_BACKENDS

import kernels
import kernels.deform_conv as dc
from kernels import (
    common,
    deform_conv2d,
    deform_conv2d_reference,
    flow_guided_deform_conv2d,
    flow_guided_offsets,
    flow_warp,
)
from kernels.bench import smooth_flow

from helpers import CL, cuda, is_cl, rel


def out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def make_inputs(
    n,
    c_in,
    c_out,
    h,
    w,
    groups,
    kernel=(3, 3),
    stride=1,
    padding=1,
    dilation=1,
    offset_scale=2.0,
    seed=0,
):
    """Random DCN inputs (fp32, CPU) and the conv keyword arguments."""
    gen = torch.Generator().manual_seed(seed)
    kh, kw = kernel
    s, p, d = _pair(stride), _pair(padding), _pair(dilation)
    ho, wo = out_size(h, kh, s[0], p[0], d[0]), out_size(w, kw, s[1], p[1], d[1])
    K = kh * kw
    inputs = {
        "x": torch.randn(n, c_in, h, w, generator=gen),
        "offset": torch.randn(n, groups * 2 * K, ho, wo, generator=gen) * offset_scale,
        "mask": torch.rand(n, groups * K, ho, wo, generator=gen),
        "weight": torch.randn(c_out, c_in, kh, kw, generator=gen) / math.sqrt(c_in * K),
        "bias": torch.randn(c_out, generator=gen),
    }
    conv = {"stride": stride, "padding": padding, "dilation": dilation, "deform_groups": groups}
    return inputs, conv


def run(inputs, conv, backend, grad_out_seed=1, op=deform_conv2d):
    """Output and the gradients of (output * fixed random weights).sum() for every input."""
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}  # detach keeps strides
    out = op(**leaves, **conv, backend=backend)
    gen = torch.Generator().manual_seed(grad_out_seed)
    grad_out = torch.randn(out.shape, generator=gen).to(out)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out)
    return [out, *grads]


def oracle(inputs, conv, op=deform_conv2d):
    return run({k: v.detach().double() for k, v in inputs.items()}, conv, "torch", op=op)


def check_triton(inputs, conv, dtype=torch.float32, op=deform_conv2d, fp32_inputs=("offset",)):
    """Triton vs the float64 reference in `dtype` (fp32_inputs stay fp32); inputs must stay
    untouched."""
    low = {k: (v if k in fp32_inputs else v.to(dtype)) for k, v in inputs.items()}
    names = ("out", *low)
    before = {k: v.clone() for k, v in low.items()}
    truth = oracle(low, conv, op)
    got = run(low, conv, "triton", op=op)
    for k in low:
        torch.testing.assert_close(
            low[k], before[k], rtol=0, atol=0, equal_nan=True, msg=f"{k} was mutated"
        )
    for name, a, b in zip(names, got, truth):
        assert a.dtype == (torch.float32 if name in fp32_inputs else dtype), name
        assert torch.isfinite(a).all(), name
    if dtype == torch.float32:
        for name, a, b in zip(names, got, truth):
            assert rel(a, b) <= 1e-5, f"{name}: rel {rel(a, b):.2e}"
    else:
        ref = run(low, conv, "torch", op=op)
        floor = torch.finfo(dtype).eps / 8
        for name, a, r, b in zip(names, got, ref, truth):
            e, e_ref = rel(a, b), rel(r, b)
            assert e <= 2 * e_ref + floor, f"{name}: triton rel {e:.2e}, reference rel {e_ref:.2e}"


# ----------------------------------------------------------------------------------------
# The reference against known values.


@pytest.mark.parametrize(
    "stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (2, (1, 0), (2, 1))]
)
def test_reference_zero_offsets_unit_mask_is_conv2d(stride, padding, dilation):
    inputs, conv = make_inputs(2, 4, 3, 7, 9, 2, stride=stride, padding=padding, dilation=dilation)
    x, w, b = inputs["x"].double(), inputs["weight"].double(), inputs["bias"].double()
    offset = torch.zeros_like(inputs["offset"], dtype=torch.float64)
    mask = torch.ones_like(inputs["mask"], dtype=torch.float64)
    out = deform_conv2d_reference(x, offset, mask, w, b, **conv)
    torch.testing.assert_close(
        out, F.conv2d(x, w, b, stride, padding, dilation), rtol=1e-12, atol=1e-12
    )


def test_reference_integer_offsets_are_shifted_conv():
    # Group g moves every tap by the integer (dy, dx) = shifts[g]; a per-(group, tap) constant
    # mask scales the matching weights. Checks the (dy, dx) channel order and the g*K + k layout.
    n, c_in, c_out, h, w, G, K = 1, 4, 3, 6, 7, 2, 9
    inputs, conv = make_inputs(n, c_in, c_out, h, w, G)
    x, weight, bias = inputs["x"].double(), inputs["weight"].double(), inputs["bias"].double()
    shifts = [(1, -2), (0, 3)]
    scale = torch.rand(G, K, dtype=torch.float64) + 0.5
    offset = torch.zeros(n, G, K, 2, h, w, dtype=torch.float64)
    for g, (dy, dx) in enumerate(shifts):
        offset[:, g, :, 0], offset[:, g, :, 1] = dy, dx
    mask = scale.view(1, G * K, 1, 1).expand(n, G * K, h, w)
    out = deform_conv2d_reference(x, offset.view(n, -1, h, w), mask, weight, bias, **conv)

    # Per group: a plain conv over x padded wide enough, read at the window moved by (dy, dx).
    cg, P = c_in // G, 4
    expected = bias.view(1, c_out, 1, 1).expand(n, c_out, h, w).clone()
    for g, (dy, dx) in enumerate(shifts):
        w_g = weight[:, g * cg : (g + 1) * cg] * scale[g].view(1, 1, 3, 3)
        full = F.conv2d(F.pad(x[:, g * cg : (g + 1) * cg], (P, P, P, P)), w_g)
        expected += full[..., P - 1 + dy : P - 1 + dy + h, P - 1 + dx : P - 1 + dx + w]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_boundary_positions_known_values(backend):
    # 1x1 kernel, one channel, unit weight: out = m * bilinear(x, p + offset), h=3, w=4.
    dtype = torch.float64 if backend == "torch" else torch.float32
    x = torch.randn(1, 1, 3, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(
        dtype
    )
    m = 0.7
    offset = torch.zeros(1, 2, 3, 4, dtype=dtype)
    offset[0, 0, 0, 1] = -1.0  # y = -1: outside (mmcv), value and grads 0
    offset[0, 0, 0, 2] = -0.5  # y = -0.5: inside, half of row 0
    offset[0, 1, 1, 0] = -1.0  # x = -1: outside
    offset[0, 0, 2, 3] = 1.0  # y = 3 = h: outside
    mask = torch.full((1, 1, 3, 4), m, dtype=dtype)
    weight = torch.ones(1, 1, 1, 1, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (x, offset, mask, weight)]
    out = deform_conv2d(*leaves, backend=backend)
    g_x, g_off, g_mask, _ = torch.autograd.grad(out.sum(), leaves)
    v = x[0, 0].double()
    o, go, gm = out[0, 0].detach().double(), g_off[0].double(), g_mask[0, 0].double()

    def close(a, b):
        return abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b)))

    for i, j in ((0, 1), (1, 0), (2, 3)):
        assert o[i, j] == 0 and go[0, i, j] == 0 and go[1, i, j] == 0 and gm[i, j] == 0, (i, j)
    assert close(o[0, 2], m * 0.5 * v[0, 2])
    assert close(gm[0, 2], 0.5 * v[0, 2])
    assert close(go[0, 0, 2], m * v[0, 2])  # row -1 reads 0
    assert close(go[1, 0, 2], m * 0.5 * (v[0, 3] - v[0, 2]))
    # y = h - 1 exactly is inside; the row below reads 0.
    assert close(o[2, 0], m * v[2, 0]) and close(gm[2, 0], v[2, 0])
    assert close(go[0, 2, 0], -m * v[2, 0]) and close(go[1, 2, 0], m * (v[2, 1] - v[2, 0]))
    # Every other sample sits on its own pixel with weight 1; (0, 2) gives half of m to row 0.
    expected_gx = torch.full((3, 4), m, dtype=torch.float64)
    expected_gx[0, 1] = expected_gx[1, 0] = expected_gx[2, 3] = 0.0
    expected_gx[0, 2] = 0.5 * m
    torch.testing.assert_close(g_x[0, 0].double(), expected_gx, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 2, 2)])
def test_reference_gradcheck_float64(stride, padding, dilation):
    inputs, conv = make_inputs(
        1, 4, 2, 4, 5, 2, stride=stride, padding=padding, dilation=dilation, seed=5
    )
    # Fractional parts in [0.1, 0.9]: every position stays away from the floor() kinks and from -1.
    off = inputs["offset"]
    gen = torch.Generator().manual_seed(6)
    inputs["offset"] = (
        torch.randint(-2, 3, off.shape, generator=gen)
        + 0.1
        + 0.8 * torch.rand(off.shape, generator=gen)
    )
    leaves = [
        inputs[k].double().requires_grad_() for k in ("x", "offset", "mask", "weight", "bias")
    ]
    # fast_mode: one random projection of the Jacobians instead of all of them (17 s -> <1 s); a
    # wrong entry still shows, as the projection is random.
    assert torch.autograd.gradcheck(
        lambda *a: deform_conv2d_reference(*a, **conv), leaves, fast_mode=True
    )


# ----------------------------------------------------------------------------------------
# Triton against the reference.

SHAPES = {  # n, c_in, c_out, h, w, groups, kernel, stride, padding, dilation
    "batch2_g1_prime": (2, 8, 16, 13, 7, 1, (3, 3), 1, 1, 1),
    "g2_tiny_channels_stride2_dil2": (1, 6, 3, 11, 13, 2, (3, 3), 2, 2, 2),
    "g16": (1, 32, 16, 7, 5, 16, (3, 3), 1, 1, 1),
    "1x1_map": (2, 2, 2, 1, 1, 1, (3, 3), 1, 1, 1),
    "wide_group_multi_tile_2x3": (1, 48, 20, 19, 17, 1, (2, 3), 1, 1, 1),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_triton_fp32_shapes(name):
    n, c_in, c_out, h, w, G, kernel, s, p, d = SHAPES[name]
    check_triton(*make_inputs(n, c_in, c_out, h, w, G, kernel, s, p, d))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["g16", "g2_tiny_channels_stride2_dil2"])
def test_triton_low_precision(name, dtype):
    n, c_in, c_out, h, w, G, kernel, s, p, d = SHAPES[name]
    check_triton(*make_inputs(n, c_in, c_out, h, w, G, kernel, s, p, d), dtype=dtype)


def test_triton_integer_positions_including_minus_one():
    inputs, conv = make_inputs(1, 4, 16, 6, 5, 2)
    gen = torch.Generator().manual_seed(7)
    # Taps sit at p - 1 .. p + 1, so integers in [-3, 3] land exactly on -1, 0, h - 1 and h.
    inputs["offset"] = torch.randint(-3, 4, inputs["offset"].shape, generator=gen).float()
    check_triton(inputs, conv)


def test_triton_far_and_nonfinite_offsets():
    inputs, conv = make_inputs(1, 4, 16, 6, 5, 2)
    gen = torch.Generator().manual_seed(8)
    off = inputs["offset"].flatten()
    wild = torch.tensor([1e4, -1e4, 3e9, 1e30, -1e30, float("inf"), float("-inf"), float("nan")])
    pick = torch.randperm(off.numel(), generator=gen)[: off.numel() // 3]
    off[pick] = wild[torch.randint(0, len(wild), (len(pick),), generator=gen)]
    check_triton(inputs, conv)


def test_triton_noncontiguous_inputs():
    inputs, conv = make_inputs(2, 4, 16, 5, 6, 2)
    lqs = torch.stack([torch.zeros_like(inputs["x"]), inputs["x"], torch.ones_like(inputs["x"])], 1)
    inputs["x"] = lqs[:, 1]  # a frame slice, (n, c, h, w)
    inputs["offset"] = inputs["offset"].permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    inputs["mask"] = inputs["mask"].transpose(2, 3).contiguous().transpose(2, 3)
    inputs["weight"] = inputs["weight"].permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
    assert not any(inputs[k].is_contiguous() for k in ("x", "offset", "mask", "weight"))
    check_triton(inputs, conv)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_casts_all_but_offsets(backend):
    inputs, conv = make_inputs(1, 4, 16, 5, 4, 2)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = deform_conv2d(**leaves, **conv, backend=backend)
    explicit = {k: (v if k == "offset" else v.to(torch.bfloat16)) for k, v in inputs.items()}
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out, deform_conv2d(**explicit, **conv, backend=backend), rtol=0, atol=0
    )
    grads = torch.autograd.grad(out.float().sum(), list(leaves.values()))
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------------------
# The public function and the custom op.


def test_backend_none_on_cpu_is_the_cpu_path():
    # The CPU path samples through grid_sample's normalised coordinates, a few float32 ulps off
    # the reference's positions (tests/test_cpu_path.py states the bound); backend="torch" is
    # the reference itself.
    inputs, conv = make_inputs(1, 4, 3, 5, 4, 2)
    reference = deform_conv2d_reference(**inputs, **conv)
    assert rel(deform_conv2d(**inputs, **conv), reference) <= 2e-5
    torch.testing.assert_close(
        deform_conv2d(**inputs, **conv, backend="torch"), reference, rtol=0, atol=0
    )


def test_clear_errors(monkeypatch):
    inputs, conv = make_inputs(1, 4, 3, 5, 4, 2)
    with pytest.raises(ValueError, match="backend"):
        deform_conv2d(**inputs, **conv, backend="cuda")
    with pytest.raises(ValueError, match="offset must be"):
        deform_conv2d(
            inputs["x"], inputs["offset"][:, :-2], inputs["mask"], inputs["weight"], **conv
        )
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        deform_conv2d(**{k: v.double() for k, v in inputs.items()}, **conv, backend="triton")
    monkeypatch.setattr(common, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        deform_conv2d(**inputs, **conv, backend="triton")


class TinyAlign(nn.Module):
    """BasicVSR++'s flow-guided deformable alignment in miniature: warp the neighbour by a
    predicted flow, predict offset residues and a mask, add the flow to the offsets, DCN."""

    def __init__(self, backend, channels=4, groups=2):
        super().__init__()
        self.backend, self.groups = backend, groups
        self.conv_flow = nn.Conv2d(2 * channels, 2, 3, padding=1)
        self.conv_offset = nn.Conv2d(2 * channels + 2, groups * 27, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(16, channels, 3, 3) * 0.2)
        self.bias = nn.Parameter(torch.randn(16))

    def forward(self, feat, feat_n):
        flow = 2 * self.conv_flow(torch.cat((feat, feat_n), 1))  # (n, 2, h, w): dx, dy
        warped = flow_warp(feat_n, flow, backend=self.backend)
        o1, o2, mask = torch.chunk(self.conv_offset(torch.cat((warped, feat, flow), 1)), 3, dim=1)
        offset = 3 * torch.tanh(torch.cat((o1, o2), 1)) + flow.flip(1).repeat(1, o1.shape[1], 1, 1)
        return deform_conv2d(
            feat_n,
            offset,
            torch.sigmoid(mask),
            self.weight,
            self.bias,
            padding=1,
            deform_groups=self.groups,
            backend=self.backend,
        )


# Inductor around the custom ops (the GPU training path). The reference graph is traced with
# aot_eager: the same Dynamo + AOTAutograd capture (fullgraph, fake tensors, autograd), without
# the minute of C++ compiles that Inductor needs for it on a CPU.
@pytest.mark.slow
@pytest.mark.parametrize("backend,compiler", [("triton", "inductor"), ("torch", "aot_eager")])
def test_torch_compile_with_both_ops_matches_eager(backend, compiler):
    torch.manual_seed(0)
    model = TinyAlign(backend)
    feats = torch.randn(2, 1, 4, 6, 7).unbind(0)
    compiled = torch.compile(model, backend=compiler, fullgraph=True)  # a graph break fails

    def out_and_grads(fn):
        leaves = [f.clone().requires_grad_() for f in feats]
        out = fn(*leaves)
        return [out, *torch.autograd.grad(out.square().sum(), [*leaves, *model.parameters()])]

    for a, b in zip(out_and_grads(compiled), out_and_grads(model)):
        assert rel(a, b) <= 1e-5


# ----------------------------------------------------------------------------------------
# The interpreter does not compile the kernels. Triton's own compiler does, for an H100
# (sm_90), without a GPU: this catches what only a real compile sees (constexpr
# specialisation, layouts, tl.dot shapes) at the launcher's BasicVSR++ configuration.

AOT_SCRIPT = r"""
import itertools, os, re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kernels.deform_conv as dc

def compile_for_sm90(kernel, pointers, constexprs, num_warps):
    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:  # launches see 16-byte aligned tensors
            sig[name], attrs[(i,)] = "*" + pointers[name], [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name == "MAG" else "i32"
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": 1}
    )
    # Registers and stack frame (where spills go) of the cubin.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", path],
                               capture_output=True, text=True, check=True).stdout
    return re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()

# The fused backward is the plain backward kernel, with the fp32 mask the glue recomputes.
# Layouts: offset, mask, flows, out and grad_out NCHW, or channels-last for the fused variants
# (those of BasicVSR++). A launch specialises a stride of 1 to a constant (the W strides of NCHW,
# the C strides of channels-last); so does this.
VARIANTS = ("forward", "fused_forward", "backward", "fused_backward")
for (dt, prec), (layout, unit), variant in itertools.product(
        (("bf16", "tf32"), ("fp32", "ieee")), (("nchw", "W"), ("channels_last", "C")), VARIANTS):
    if layout == "channels_last" and not variant.startswith("fused"):
        continue
    backward, fused = variant.endswith("backward"), variant.startswith("fused")
    kernel = dc._dcn_bwd_kernel if backward else dc._dcn_fwd_kernel
    th, tw, _, _, warps = dc._tiles(180, 320, backward, ieee=prec == "ieee")
    gpb, cpb = dc._chunking(16, 8, 32, whole_groups=backward)
    consts = dict(
        CG=8, KH=3, KW=3, TILE_H=th, TILE_W=tw, GPB=gpb, CPB=cpb, BLOCK_CO=64, PREC=prec,
        INTERP_BF16=False,
    )
    if not backward:
        consts.update(HAS_BIAS=True, FUSED=fused)
    # Memory strides are named S<tensor>_<dim>: SO_C, SG_W, ...
    unit_strides = [name for name in kernel.arg_names if re.fullmatch("S[A-Z]_" + unit, name)]
    assert len(unit_strides) >= 3, kernel.arg_names
    consts.update({name: 1 for name in unit_strides})
    pointers = {name: dt for name in kernel.arg_names if name.endswith("_ptr")}
    # Offsets and flows fp32 (autocast); the fused forward reads conv_offset in the conv's dtype.
    pointers.update(off_ptr=dt if fused and not backward else "fp32", flow_ptr="fp32",
                    gx_ptr="fp32", goff_ptr="fp32", gw_ptr="fp32")
    if fused and backward:
        pointers.update(msk_ptr="fp32", gmsk_ptr="fp32")
    regs, stack = compile_for_sm90(kernel, pointers, consts, warps)
    print(f"usage {dt}_{layout} {variant} {regs} {stack}")
print("compiled")
"""


@pytest.mark.slow
@pytest.mark.skipif(
    "nvidia" not in TRITON_BACKENDS, reason="Triton built without its NVIDIA backend"
)
def test_kernels_compile_for_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", AOT_SCRIPT],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
    usage = {
        (dt, variant): (int(regs), int(stack))
        for dt, variant, regs, stack in (
            line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("usage")
        )
    }
    assert len(usage) == 12, proc.stdout
    for key, (regs, stack) in usage.items():
        assert regs <= 255 and stack == 0, (
            f"{key}: {regs} registers, {stack} bytes of stack (spills)"
        )


# ----------------------------------------------------------------------------------------
# CUDA: the same comparison at a BasicVSR++-like shape (skipped without a GPU).


@cuda
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize("groups,c_in", [(16, 128), (1, 24)])
def test_cuda_matches_reference(dtype, groups, c_in):
    inputs, conv = make_inputs(2, c_in, 64, 23, 37, groups, offset_scale=4.0)
    check_triton({k: v.cuda() for k, v in inputs.items()}, conv, dtype)


@cuda
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
def test_cuda_dcn_at_basicvsrpp_layer(dtype):
    # 128 -> 64 channels, 16 deform groups, 3x3; offsets = a smooth flow + residues of up to 10 px.
    n, h, w = 2, 48, 80
    torch.manual_seed(0)
    flow = smooth_flow(n, h, w, 4.0, "cpu")
    inputs = {
        "x": torch.randn(n, 128, h, w),
        "offset": flow.flip(1).repeat(1, 16 * 9, 1, 1)
        + 10 * torch.tanh(0.3 * torch.randn(n, 288, h, w)),
        "mask": torch.sigmoid(torch.randn(n, 144, h, w)),
        "weight": torch.randn(64, 128, 3, 3) / math.sqrt(128 * 9),
        "bias": torch.randn(64),
    }
    conv = dict(stride=1, padding=1, dilation=1, deform_groups=16)
    check_triton({k: v.cuda() for k, v in inputs.items()}, conv, dtype)


@cuda
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
def test_cuda_flow_guided_dcn_at_basicvsrpp_layer(dtype):
    # The same layer on flow_guided_deform_conv2d: the offset branch's logits (conv_offset in
    # `dtype`, as under autocast) and two smooth flows, residues of up to 10 px.
    n, h, w = 2, 48, 80
    torch.manual_seed(0)
    inputs = {
        "x": torch.randn(n, 128, h, w),
        "conv_offset": 0.3 * torch.randn(n, 3 * 16 * 9, h, w),
        "flows": torch.cat([smooth_flow(n, h, w, 4.0, "cpu") for _ in range(2)], 1),
        "weight": torch.randn(64, 128, 3, 3) / math.sqrt(128 * 9),
        "bias": torch.randn(64),
    }
    conv = dict(max_residue_magnitude=10.0, stride=1, padding=1, dilation=1, deform_groups=16)
    check_fused({k: v.cuda() for k, v in inputs.items()}, conv, dtype)


# ----------------------------------------------------------------------------------------
# flow_guided_deform_conv2d: BasicVSR++'s offset/mask glue fused into the kernel. The glue
# against BasicVSR++'s own code, then the Triton kernel against the float64 reference (the glue
# in PyTorch + deform_conv2d_reference) on the output and every gradient.


def basicvsrpp_glue(out, flows, max_residue_magnitude):
    """The oracle: SecondOrderDeformableAlignment's code (two flows, each for half of the
    groups), or its first-order form for one flow."""
    o1, o2, mask = torch.chunk(out, 3, dim=1)
    offset = max_residue_magnitude * torch.tanh(torch.cat((o1, o2), dim=1))
    if flows.shape[1] == 2:
        offset = offset + flows.flip(1).repeat(1, offset.size(1) // 2, 1, 1)
    else:
        flow_1, flow_2 = flows[:, :2], flows[:, 2:]
        offset_1, offset_2 = torch.chunk(offset, 2, dim=1)
        offset_1 = offset_1 + flow_1.flip(1).repeat(1, offset_1.size(1) // 2, 1, 1)
        offset_2 = offset_2 + flow_2.flip(1).repeat(1, offset_2.size(1) // 2, 1, 1)
        offset = torch.cat([offset_1, offset_2], dim=1)
    mask = torch.sigmoid(mask)
    return offset, mask


def make_fused_inputs(n, c_in, c_out, h, w, groups, flows, stride=1, padding=1, dilation=1, seed=0):
    """Random inputs of flow_guided_deform_conv2d (fp32, CPU), 3x3, and its keyword arguments.
    Logits ~ N(0, 1) spread the residues over +-3 px; flows up to a few px."""
    gen = torch.Generator().manual_seed(seed)
    ho, wo = out_size(h, 3, stride, padding, dilation), out_size(w, 3, stride, padding, dilation)
    inputs = {
        "x": torch.randn(n, c_in, h, w, generator=gen),
        "conv_offset": torch.randn(n, groups * 27, ho, wo, generator=gen),
        "flows": torch.randn(n, 2 * flows, ho, wo, generator=gen) * 2,
        "weight": torch.randn(c_out, c_in, 3, 3, generator=gen) / math.sqrt(c_in * 9),
        "bias": torch.randn(c_out, generator=gen),
    }
    conv = {
        "max_residue_magnitude": 3.0,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "deform_groups": groups,
    }
    return inputs, conv


def check_fused(inputs, conv, dtype=torch.float32):
    # conv_offset in `dtype`, as the offset branch's output under autocast; flows stay fp32.
    check_triton(inputs, conv, dtype, op=flow_guided_deform_conv2d, fp32_inputs=("flows",))


@pytest.mark.parametrize("groups,flows", [(16, 2), (4, 1), (4, 2)])
def test_flow_guided_reference_is_basicvsrpp_glue(groups, flows):
    inputs, conv = make_fused_inputs(2, 16, 3, 5, 6, groups, flows)
    mag = conv["max_residue_magnitude"]
    logits, flow = inputs["conv_offset"] * 4, inputs["flows"]
    offset, mask = flow_guided_offsets(logits, flow, mag, groups, 9)
    want_offset, want_mask = basicvsrpp_glue(logits, flow, mag)
    torch.testing.assert_close(offset, want_offset, rtol=0, atol=0)
    torch.testing.assert_close(mask, want_mask, rtol=0, atol=0)
    # bf16 logits (the conv output under autocast) are computed in fp32.
    offset, mask = flow_guided_offsets(logits.bfloat16(), flow, mag, groups, 9)
    assert offset.dtype == mask.dtype == torch.float32
    torch.testing.assert_close(
        offset, basicvsrpp_glue(logits.bfloat16().float(), flow, mag)[0], rtol=0, atol=0
    )
    # The public function's reference path is that glue + deform_conv2d_reference.
    d = {k: v.double() for k, v in inputs.items()}
    args = {k: conv[k] for k in ("stride", "padding", "dilation", "deform_groups")}
    got = flow_guided_deform_conv2d(**d, **conv, backend="torch")
    want = deform_conv2d_reference(
        d["x"], *basicvsrpp_glue(d["conv_offset"], d["flows"], mag), d["weight"], d["bias"], **args
    )
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_flow_guided_offsets_gradcheck_float64():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 2 * 27, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    flows = torch.randn(1, 4, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: flow_guided_offsets(a, b, 2.5, 2, 9), (logits, flows), fast_mode=True
    )


FUSED_SHAPES = {  # n, c_in, c_out, h, w, groups, flows, stride, padding, dilation
    "basicvsrpp_g16_f2": (2, 32, 16, 9, 11, 16, 2, 1, 1, 1),
    "g4_f1": (2, 16, 16, 9, 11, 4, 1, 1, 1, 1),
    "g4_f2_stride2_dil2": (1, 16, 8, 9, 11, 4, 2, 2, 2, 2),
}


@pytest.mark.parametrize("name", list(FUSED_SHAPES))
def test_flow_guided_triton_fp32(name):
    n, c_in, c_out, h, w, G, F_, s, p, d = FUSED_SHAPES[name]
    check_fused(*make_fused_inputs(n, c_in, c_out, h, w, G, F_, s, p, d))


@pytest.mark.parametrize(
    "dtype",
    [pytest.param(torch.bfloat16, marks=pytest.mark.slow), torch.float16],
    ids=["bf16", "fp16"],
)
def test_flow_guided_triton_low_precision(dtype):
    n, c_in, c_out, h, w, G, F_, s, p, d = FUSED_SHAPES["basicvsrpp_g16_f2"]
    check_fused(*make_fused_inputs(n, c_in, c_out, h, w, G, F_, s, p, d, seed=1), dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_flow_guided_saturated_and_nonfinite_logits(backend):
    # Offset logits +-50 and +-inf give tanh = +-1 exactly, mask logits +-inf give 1 and 0; a
    # NaN offset logit puts its tap outside (it contributes 0, even with a NaN mask logit).
    # Expected: the same call with +-inf -> +-50 and each NaN tap replaced by zero offset
    # logits and a mask logit of -inf (mask 0).
    G, K = 4, 9
    inputs, conv = make_fused_inputs(1, 8, 16, 6, 7, G, 2, seed=2)
    gen = torch.Generator().manual_seed(3)
    logits = inputs["conv_offset"].view(1, 3, G * K, 6, 7).clone()  # dy / dx / mask logits per tap
    choice = torch.randint(0, 8, logits.shape[1:], generator=gen)
    values = torch.tensor([50.0, -50.0, float("inf"), float("-inf")])
    for part in (0, 1):
        wild = choice[part] < 4
        logits[0, part][wild] = values[choice[part][wild]]
    nan_tap = torch.rand(logits.shape[2:], generator=gen) < 0.15
    logits[0, torch.randint(0, 2, (1,), generator=gen).item()][nan_tap] = float("nan")
    logits[0, 2][choice[2] == 5] = float("inf")
    logits[0, 2][choice[2] == 6] = float("-inf")
    logits[0, 2][nan_tap & (choice[2] == 7)] = float("nan")
    expected = logits.clone()
    expected[0, :2] = expected[0, :2].clamp(-50, 50)
    expected[0, :2][:, nan_tap] = 0.0
    expected[0, 2][nan_tap] = float("-inf")

    def to_layout(t):
        """Back to mmcv's layout: channel g*2K + 2k + (0: dy, 1: dx), then the mask logits."""
        offsets = t[0, :2].view(2, G * K, 6, 7).transpose(0, 1).reshape(1, -1, 6, 7)
        return torch.cat((offsets, t[0, 2].view(1, G * K, 6, 7)), 1)

    wild_inputs = dict(inputs, conv_offset=to_layout(logits))
    tame_inputs = dict(inputs, conv_offset=to_layout(expected))
    dtype = torch.float64 if backend == "torch" else torch.float32
    got = run(
        {k: v.to(dtype) for k, v in wild_inputs.items()},
        conv,
        backend,
        op=flow_guided_deform_conv2d,
    )
    want = oracle(tame_inputs, conv, op=flow_guided_deform_conv2d)
    names = ("out", *inputs)
    for name, a, b in zip(names, got, want):
        if name != "conv_offset":
            assert torch.isfinite(a).all(), name
            assert rel(a, b) <= 1e-5, f"{name}: rel {rel(a, b):.2e}"
    # tanh and sigmoid are flat where they saturate; a NaN logit has a NaN derivative (as in
    # autograd).
    grad = got[2]
    nan = torch.isnan(wild_inputs["conv_offset"])
    assert torch.equal(torch.isnan(grad), nan)
    saturated = wild_inputs["conv_offset"].abs() >= 50
    assert (grad[saturated] == 0).all()
    assert rel(grad[~nan], want[2][~nan]) <= 1e-5


def test_flow_guided_autocast_and_bf16_logits():
    inputs, conv = make_fused_inputs(1, 16, 16, 5, 6, 4, 2)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    leaves["conv_offset"] = (
        inputs["conv_offset"].bfloat16().requires_grad_()
    )  # the conv output under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = flow_guided_deform_conv2d(**leaves, **conv, backend="triton")
    explicit = {
        k: (v if k in ("conv_offset", "flows") else v.bfloat16()) for k, v in leaves.items()
    }
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out, flow_guided_deform_conv2d(**explicit, **conv, backend="triton"), rtol=0, atol=0
    )
    grads = torch.autograd.grad(out.float().sum(), list(leaves.values()))
    assert [g.dtype for g in grads] == [v.dtype for v in leaves.values()]
    assert all(torch.isfinite(g).all() for g in grads)


def test_flow_guided_clear_errors():
    inputs, conv = make_fused_inputs(1, 8, 3, 5, 6, 4, 2)
    co, fl, w = inputs["conv_offset"], inputs["flows"], inputs["weight"]

    def call(**kw):
        return flow_guided_deform_conv2d(**dict(inputs, **kw), **conv)

    with pytest.raises(
        ValueError, match="conv_offset must have 3 \\* deform_groups \\* taps = 108 channels"
    ):
        call(conv_offset=co[:, :-1])
    with pytest.raises(ValueError, match="conv_offset must be \\(1, 108, 5, 6\\)"):
        call(conv_offset=co[..., :-1])
    with pytest.raises(ValueError, match="flows must have 2 channels"):
        call(flows=fl[:, :3])
    with pytest.raises(ValueError, match="flows must have 2 channels"):  # 3 flows for 4 groups
        call(flows=torch.cat((fl, fl[:, :2]), 1))
    with pytest.raises(ValueError, match="flows must be \\(1, 4, 5, 6\\)"):
        call(flows=fl[:, :, 1:])
    with pytest.raises(ValueError, match="flow_guided_deform_conv2d: backend"):
        flow_guided_deform_conv2d(**inputs, **conv, backend="cuda")
    with pytest.raises(ValueError, match="flow_guided_offsets: conv_offset must have"):
        flow_guided_offsets(co, fl, 10.0, 2, 9)
    with pytest.raises(ValueError, match="flow_guided_deform_conv2d: weight expects"):
        call(weight=w[:, :4])


class TinySecondOrderAlign(nn.Module):
    """BasicVSR++'s second-order alignment in miniature, on the fused op: the offset branch's raw
    output and both flows go straight in."""

    def __init__(self, channels=4, groups=4):
        super().__init__()
        self.groups = groups
        self.conv_offset = nn.Conv2d(channels + 4, groups * 27, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(16, channels, 3, 3) * 0.2)
        self.bias = nn.Parameter(torch.randn(16))

    def forward(self, feat, flow_1, flow_2):
        out = self.conv_offset(torch.cat((feat, flow_1, flow_2), 1))
        return flow_guided_deform_conv2d(
            feat,
            out,
            torch.cat((flow_1, flow_2), 1),
            self.weight,
            self.bias,
            5.0,
            padding=1,
            deform_groups=self.groups,
            backend="triton",
        )


@pytest.mark.slow
def test_flow_guided_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = TinySecondOrderAlign()
    feat, flow_1, flow_2 = (
        torch.randn(1, 4, 6, 7),
        2 * torch.randn(1, 2, 6, 7),
        2 * torch.randn(1, 2, 6, 7),
    )
    compiled = torch.compile(
        model, backend="inductor", fullgraph=True
    )  # fullgraph: a graph break fails

    def out_and_grads(fn):
        leaves = [t.clone().requires_grad_() for t in (feat, flow_1, flow_2)]
        out = fn(*leaves)
        return [out, *torch.autograd.grad(out.square().sum(), [*leaves, *model.parameters()])]

    for a, b in zip(out_and_grads(compiled), out_and_grads(model)):
        assert rel(a, b) <= 1e-5


# ----------------------------------------------------------------------------------------
# Channels-last: both ops give the output in x's memory format (Triton and reference), the
# Triton backward each gradient in its input's; values are those of the NCHW float64 oracle.


@pytest.mark.parametrize("layout", ["all", "x_only", "offset_mask_only"])
def test_channels_last_matches_nchw_reference(layout):
    inputs, conv = make_inputs(2, 8, 16, 5, 6, 2)
    truth = oracle(inputs, conv)
    converted = {
        "all": ("x", "offset", "mask", "weight"),
        "x_only": ("x",),
        "offset_mask_only": ("offset", "mask"),
    }[layout]
    mixed = {
        k: (v.contiguous(memory_format=CL) if k in converted else v) for k, v in inputs.items()
    }
    for backend in ("triton", "torch"):
        got = run(mixed, conv, backend)
        for name, a, b in zip(("out", *inputs), got, truth):
            assert rel(a, b) <= 1e-5, f"{backend} {name}: rel {rel(a, b):.2e}"
        assert is_cl(got[0]) == ("x" in converted), backend
        if backend == "triton":
            assert [is_cl(g) for g in got[1:5]] == [
                k in converted for k in ("x", "offset", "mask", "weight")
            ]


@pytest.mark.parametrize("flows_cl", [True, False], ids=["cl_flows", "nchw_flows"])
def test_flow_guided_channels_last_conv_offset_from_a_conv(flows_cl):
    # conv_offset as BasicVSR++ makes it in a channels-last network: the output of a channels-last
    # conv.
    inputs, conv = make_fused_inputs(1, 16, 16, 6, 7, 4, 2)
    torch.manual_seed(1)
    offset_branch = nn.Conv2d(8, 4 * 27, 3, padding=1).to(memory_format=CL)
    with torch.no_grad():
        inputs["conv_offset"] = offset_branch(torch.randn(1, 8, 6, 7).contiguous(memory_format=CL))
    truth = oracle(
        {k: v.contiguous() for k, v in inputs.items()}, conv, op=flow_guided_deform_conv2d
    )
    inputs["x"] = inputs["x"].contiguous(memory_format=CL)
    if flows_cl:
        inputs["flows"] = inputs["flows"].contiguous(memory_format=CL)
    assert is_cl(inputs["conv_offset"])
    for backend in ("triton", "torch"):
        got = run(inputs, conv, backend, op=flow_guided_deform_conv2d)
        for name, a, b in zip(("out", *inputs), got, truth):
            assert rel(a, b) <= 1e-5, f"{backend} {name}: rel {rel(a, b):.2e}"
        assert is_cl(got[0]), backend
        if backend == "triton":
            assert [is_cl(g) for g in got[1:4]] == [True, True, flows_cl]


class TinyWarpAlign(TinySecondOrderAlign):
    """The two ops BasicVSR++ calls: a warp of the neighbour, then the fused alignment."""

    def forward(self, feat, feat_n, flow_1, flow_2):
        return super().forward(feat + flow_warp(feat_n, flow_1, backend="triton"), flow_1, flow_2)


@pytest.mark.slow
def test_torch_compile_channels_last_matches_eager():
    # Inductor's code indexes the ops' outputs and gradients with the strides of the fake impls:
    # with the module and its inputs channels-last, those must be the real channels-last ones
    # (test_fake_strides_match_real checks the fakes of all four ops directly).
    torch.manual_seed(0)
    model = TinyWarpAlign().to(memory_format=CL)
    inputs = [
        t.contiguous(memory_format=CL)
        for t in (
            torch.randn(1, 4, 6, 7),
            torch.randn(1, 4, 6, 7),
            2 * torch.randn(1, 2, 6, 7),
            2 * torch.randn(1, 2, 6, 7),
        )
    ]
    compiled = torch.compile(model, backend="inductor", fullgraph=True)

    def out_and_grads(fn):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = fn(*leaves)
        return [out, *torch.autograd.grad(out.square().sum(), [*leaves, *model.parameters()])]

    got, want = out_and_grads(compiled), out_and_grads(model)
    assert is_cl(got[0]) and is_cl(want[0])
    for a, b in zip(got, want):
        assert rel(a, b) <= 1e-5


def test_fake_strides_match_real():
    # Forward and backward ops of both DCNs, fake vs real, on clear and ambiguous layouts: one
    # channel (x, and the mask of a 1x1 kernel), 1x1 maps, channels-last x with NCHW offsets and
    # the reverse. A 1x1 kernel keeps the interpreter quick.
    from torch._subclasses.fake_tensor import FakeTensorMode

    cases = [
        ((1, 4, 4, 5), {"x", "offset", "mask", "weight"}),
        ((2, 4, 3, 4), {"x"}),
        ((1, 4, 3, 4), {"offset"}),
        ((2, 1, 3, 4), {"x", "offset", "mask"}),
        ((1, 4, 1, 1), {"x", "offset", "mask", "weight"}),
    ]
    conv_args = ([1, 1], [0, 0], [1, 1], 1)
    for (n, c, h, w), converted in cases:
        inputs, _ = make_inputs(n, c, 4, h, w, 1, kernel=(1, 1), padding=0)
        d = {
            k: (torch.empty(v.shape, memory_format=CL).copy_(v) if k in converted else v)
            for k, v in inputs.items()
        }
        logits = torch.empty(
            n, 3, h, w, memory_format=CL if "offset" in converted else torch.contiguous_format
        )
        logits.copy_(torch.randn(n, 3, h, w))
        flows = torch.randn(n, 2, h, w)
        grad_out = torch.randn(n, 4, h, w).contiguous(memory_format=CL)
        calls = [
            (
                torch.ops.vsr.deform_conv2d,
                (d["x"], d["offset"], d["mask"], d["weight"], d["bias"], *conv_args),
            ),
            (
                torch.ops.vsr.deform_conv2d_backward,
                (grad_out, d["x"], d["offset"], d["mask"], d["weight"], *conv_args),
            ),
            (
                torch.ops.vsr.flow_guided_deform_conv2d,
                (d["x"], logits, flows, d["weight"], d["bias"], 3.0, *conv_args),
            ),
            (
                torch.ops.vsr.flow_guided_deform_conv2d_backward,
                (grad_out, d["x"], logits, flows, d["weight"], 3.0, *conv_args),
            ),
        ]
        for op, args in calls:
            real = op(*args)
            with FakeTensorMode() as mode:
                fake = op(
                    *[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
                )
            for r, f in zip(*[(t,) if isinstance(t, torch.Tensor) else t for t in (real, fake)]):
                assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype), (
                    op,
                    (n, c, h, w),
                    converted,
                )


@pytest.mark.slow
def test_basicvsrpp_channels_last_matches_nchw(monkeypatch):
    # A tiny BasicVSR++ converted with .to(memory_format=torch.channels_last) on the reference path:
    # the NCHW network's output, and the propagation runs channels-last throughout. In float64:
    # in fp32 the two layouts' convolutions sum in different orders, ~1e-5 apart after the four
    # recurrent branches. Then one alignment step (the fused DCN) and one warp of the channels-last
    # network on Triton (fp32), on the inputs that step saw.
    import basicvsr

    torch.manual_seed(0)
    net = basicvsr.BasicVSRPlusPlus(mid_channels=8, num_blocks=1).double().eval()
    with torch.no_grad():
        for p in net.parameters():  # the zero-initialised last layer of the offset branch too
            p.add_(0.02 * torch.randn_like(p))
    net_cl = copy.deepcopy(net).to(memory_format=CL)
    base = torch.rand(1, 1, 3, 70, 74, generator=torch.Generator().manual_seed(2))
    # Moving 1-2 px a frame.
    lqs = torch.cat([base[..., i : i + 64, 2 * i : 2 * i + 64] for i in range(3)], 1).double()

    seen = {}
    layouts = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: layouts.append((is_cl(i[0]), is_cl(o))))
        for m in net_cl.backbone.values()
    ]
    for name, model in (("nchw", net), ("cl", net_cl)):
        step = model.deform_align["forward_2"]
        hooks.append(
            step.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, (i, o)))
        )
    with torch.no_grad(), kernels.use_backend("torch"):
        out, out_cl = net(lqs), net_cl(lqs)
    for h in hooks:
        h.remove()
    assert rel(out_cl, out) <= 1e-5
    assert len(layouts) == 4 * 3 and all(a and b for a, b in layouts), layouts

    (args, step_out), (args_cl, _) = seen["nchw"], seen["cl"]
    x, extra_feat, flow_1, flow_2 = [t.float() for t in args_cl]
    # The last step: both flows real.
    assert is_cl(x) and is_cl(extra_feat) and flow_2.abs().mean() > 0.5
    step = copy.deepcopy(net_cl.deform_align["forward_2"]).float()
    # One 64x64 tile: the interpreter pays per program (16 of them would take ~5 s).
    monkeypatch.setattr(
        dc, "_tiles", lambda ho, wo, backward, ieee=False: (64, 64, -(-ho // 64), -(-wo // 64), 4)
    )
    with torch.no_grad(), kernels.use_backend("triton"):
        step_cl = step(x, extra_feat, flow_1, flow_2)
        warped_cl = flow_warp(x, flow_2)
    assert is_cl(step_cl) and rel(step_cl, step_out) <= 1e-5
    assert is_cl(warped_cl) and rel(warped_cl, flow_warp(args[0], args[3], backend="torch")) <= 1e-5
