"""The Triton paths against the references on a CUDA GPU (skipped without one), and, on the CPU,
the switches the model benchmark relies on.

CPU (CI, Triton's interpreter from conftest.py):
- kernels.use_backend: backend=None follows it, an explicit backend= wins, it nests, and the
  default comes back after the block, also after an exception; whole models follow it.
- kernels.bench: its benchmark-only torchvision patch runs the network with torchvision's
  signature and grid_sample (a stand-in with torchvision's signature replaces torchvision, which
  CI does not have) and is undone after the block; a tiny GAN-stage iteration through
  train.py's Trainer; its inputs and target arithmetic.

CUDA, error measures of tests/test_deform_conv.py and tests/test_flow_warp.py:
- both ops, and the DCN with BasicVSR++'s offset glue fused in (flow_guided_deform_conv2d), at
  BasicVSR++'s shapes, output and every gradient, fp32 / bf16 / fp16;
- BasicVSR++, BasicVSR and RealBasicVSR, use_backend("triton") vs ("torch"), TF32 off:
  fp32 outputs: max |diff| <= 1e-4 x max |reference - bilinear x4 of the input| (what the
  network adds to its skip); BasicVSR++'s parameter gradients within rel 1e-3 (all gradients
  as one vector, max |diff| / max |reference|); bf16 (autocast) outputs: the RMS error against
  the fp32 reference at most 2x the reference path's own bf16 RMS error + 1e-3;
- BasicVSR++ converted to channels-last vs NCHW, both on Triton: outputs max |diff| <= 1e-4
  (fp32) / 2e-2 (bf16), eager and compiled; parameter gradients within rel 5e-3.
"""
import collections
import copy
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import basicvsr
import kernels
from kernels import bench
from test_deform_conv import check_fused, check_triton
from test_flow_warp import check_low_precision, rel, run

dc = importlib.import_module("kernels.deform_conv")
fw = importlib.import_module("kernels.flow_warp")  # kernels.flow_warp is the function
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def calls(monkeypatch):
    """Counts of the implementations that ran: 'dcn triton', 'dcn torch', 'warp triton', 'warp torch'."""
    counts = collections.Counter()

    def count(module, name, key):
        fn = getattr(module, name)

        def counted(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)

    count(dc, "_forward", "dcn triton")  # the body of the vsr::deform_conv2d custom op
    count(dc, "_forward_fused", "dcn triton")  # and of vsr::flow_guided_deform_conv2d, which BasicVSR++ calls
    count(dc, "deform_conv2d_reference", "dcn torch")
    count(fw, "_flow_warp_triton", "warp triton")
    count(fw, "flow_warp_reference", "warp torch")
    return counts


def both_ops(**backend):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 5, 6, generator=gen)
    out = kernels.deform_conv2d(x, torch.randn(1, 36, 5, 6, generator=gen), torch.rand(1, 18, 5, 6, generator=gen),
                                torch.randn(3, 4, 3, 3, generator=gen), padding=1, deform_groups=2, **backend)
    return out, kernels.flow_warp(x, 2 * torch.randn(1, 2, 5, 6, generator=gen), **backend)


# ----------------------------------------------------------------------------------------
# CPU: kernels.use_backend.

def test_use_backend_sets_the_default_of_backend_none(calls):
    reference = both_ops()
    assert calls == {"dcn torch": 1, "warp torch": 1}  # CPU tensors, no block: the reference
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


def tiny_alignment():
    """BasicVSR++'s op call sites in miniature, through basicvsr.py's own modules: SPyNet (warps
    inside), a feature warp, and the second-order deformable alignment (the DCN)."""
    torch.manual_seed(0)
    spynet = bench.realistic_init(basicvsr.SPyNet())
    align = bench.realistic_init(basicvsr.SecondOrderDeformableAlignment(32, 16, deform_groups=16))
    clip = bench.moving_clip(2, 32, 32)[0]
    feat = torch.randn(1, 16, 32, 32)

    @torch.no_grad()
    def step():
        flow = spynet(clip[1:], clip[:1])
        cond = kernels.flow_warp(feat, flow)
        return align(torch.cat([feat, feat], 1), torch.cat([cond, feat, cond], 1), flow, flow)
    return step


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
# CPU: kernels.bench.

def standin_torchvision_deform_conv2d(input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0),
                                      dilation=(1, 1), mask=None):
    """torchvision.ops.deform_conv2d's signature and layout (groups implied by offset), computed here
    by the reference."""
    groups = offset.shape[1] // (2 * weight.shape[2] * weight.shape[3])
    return kernels.deform_conv2d_reference(input, offset, mask, weight, bias, stride, padding, dilation, groups)


def test_bench_torchvision_patch_runs_the_same_network(monkeypatch):
    standin_calls = []

    def standin(*args, **kwargs):
        standin_calls.append(1)
        return standin_torchvision_deform_conv2d(*args, **kwargs)

    monkeypatch.setattr(bench, "tv_deform_conv2d", standin)
    original = kernels.deform_conv2d, kernels.flow_guided_deform_conv2d, kernels.flow_warp
    step = tiny_alignment()
    with kernels.use_backend("torch"):
        reference = step()
    with bench.ops_path("torchvision"):
        assert kernels.flow_warp is bench.grid_sample_flow_warp
        patched = step()
    with pytest.raises(ZeroDivisionError):
        with bench.ops_path("torchvision"):
            1 / 0
    assert (kernels.deform_conv2d, kernels.flow_guided_deform_conv2d, kernels.flow_warp) == original
    assert len(standin_calls) > 0
    assert rel(patched, reference) <= 1e-5


def test_bench_gan_iteration_runs_train_py_trainer():
    # The bench drives train.py's own Trainer: a tiny GAN-stage iteration on the reference path
    # (generator, cleaning, perceptual, GAN and discriminator losses, EMA) catches a drifted interface.
    wl = dict(bench.model_workloads(100, 30)["realbasicvsr-gan"], name="gan", **bench.DRY_RUN["realbasicvsr-gan"])
    notes = []
    cells = bench.bench_training(wl, ["torch reference"], ["fp32"], 1, 0, torch.device("cpu"), notes)
    assert cells[("fp32", "torch reference")]["seconds"] > 0 and notes == []


def integer_shift(a, b, max_shift=4):
    """(dy, dx) with b[:, r, c] == a[:, r + dy, c + dx] wherever both exist, or None."""
    _, h, w = a.shape
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            rows_a, rows_b = slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h + min(-dy, 0))
            cols_a, cols_b = slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w + min(-dx, 0))
            if torch.equal(b[:, rows_b, cols_b], a[:, rows_a, cols_a]):
                return dy, dx
    return None


def test_bench_moving_clip_frames_are_shifted_copies():
    clip = bench.moving_clip(5, 20, 30)[0]
    assert clip.shape == (5, 3, 20, 30) and 0 <= clip.min() and clip.max() <= 1
    shifts = [integer_shift(a, b) for a, b in zip(clip[:-1], clip[1:])]
    assert None not in shifts and any(s != (0, 0) for s in shifts), shifts


def test_bench_psnr_and_targets_arithmetic():
    a = torch.zeros(1, 2, 3, 4, 4)
    assert bench.psnr(a + 0.1, a) == pytest.approx(20.0)
    assert bench.psnr(a + 2, a + 1) == float("inf")  # both clamp to 1
    T, R = "triton", "torch reference"
    results = {
        "bvsrpp-180x320": {("bf16", T): dict(seconds=0.5, peak=1.0, psnr=48.0), ("bf16", R): dict(seconds=2.0, peak=5.0),
                           ("fp32", T): dict(seconds=1.0, peak=3.0), ("fp32", R): dict(seconds=4.0, peak=6.0)},
        "bvsrpp-train": {("fp32", T): dict(seconds=1.0, peak=1.0), ("fp32", R): dict(status="OOM"),
                         ("bf16", T): dict(seconds=1.0, peak=1.0), ("bf16", R): dict(seconds=2.5, peak=1.0)},
    }
    lines = bench.target_lines(results, frames=100)
    assert "200.0 frames/s -> met" in lines[0]
    assert "4.00x -> met" in lines[1] and "over the reference in fp32: 8.00x" in lines[1]
    assert "fp32 not measured" in lines[2] and "bf16 2.50x -> met" in lines[2]
    assert "fp32 0.50x -> NOT met" in lines[3] and "bf16 0.20x -> met" in lines[3] and "fp32 0.17x" in lines[3]
    assert "48.0 dB" in lines[4]
    # the best Triton variant counts, and is named
    results["bvsrpp-180x320"][("bf16", "triton + host cache")] = dict(seconds=0.8, peak=0.5)
    results["bvsrpp-180x320"][("bf16", "triton + compile")] = dict(seconds=0.4, peak=1.2)
    lines = bench.target_lines(results, frames=100)
    assert "250.0 frames/s -> met [triton + compile]" in lines[0]
    assert "5.00x -> met" in lines[1]
    assert "bf16 0.10x -> met [triton + host cache]" in lines[3] and "fp32 0.50x -> NOT met," in lines[3]


# ----------------------------------------------------------------------------------------
# CUDA: the ops at BasicVSR++'s shapes.

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_dcn_at_basicvsrpp_layer(dtype):
    # 128 -> 64 channels, 16 deform groups, 3x3; offsets = a smooth flow + residues of up to 10 px.
    n, h, w = 2, 48, 80
    torch.manual_seed(0)
    flow = bench.smooth_flow(n, h, w, 4.0, "cpu")
    inputs = {
        "x": torch.randn(n, 128, h, w),
        "offset": flow.flip(1).repeat(1, 16 * 9, 1, 1) + 10 * torch.tanh(0.3 * torch.randn(n, 288, h, w)),
        "mask": torch.sigmoid(torch.randn(n, 144, h, w)),
        "weight": torch.randn(64, 128, 3, 3) / math.sqrt(128 * 9),
        "bias": torch.randn(64),
    }
    conv = dict(stride=1, padding=1, dilation=1, deform_groups=16)
    check_triton({k: v.cuda() for k, v in inputs.items()}, conv, dtype)


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cuda_flow_guided_dcn_at_basicvsrpp_layer(dtype):
    # The same layer on flow_guided_deform_conv2d: the offset branch's logits (conv_offset in
    # `dtype`, as under autocast) and two smooth flows, residues of up to 10 px.
    n, h, w = 2, 48, 80
    torch.manual_seed(0)
    inputs = {
        "x": torch.randn(n, 128, h, w),
        "conv_offset": 0.3 * torch.randn(n, 3 * 16 * 9, h, w),
        "flows": torch.cat([bench.smooth_flow(n, h, w, 4.0, "cpu") for _ in range(2)], 1),
        "weight": torch.randn(64, 128, 3, 3) / math.sqrt(128 * 9),
        "bias": torch.randn(64),
    }
    conv = dict(max_residue_magnitude=10.0, stride=1, padding=1, dilation=1, deform_groups=16)
    check_fused({k: v.cuda() for k, v in inputs.items()}, conv, dtype)


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("channels,mode", [(64, "zeros"), (3, "border")], ids=["propagation", "spynet"])
def test_cuda_flow_warp_at_basicvsrpp_shapes(dtype, channels, mode):
    torch.manual_seed(1)
    x = torch.randn(2, channels, 48, 80, device="cuda")
    flow = bench.smooth_flow(2, 48, 80, 4.0, "cuda")
    g = torch.randn_like(x)
    if dtype == torch.float32:
        got = run(kernels.flow_warp, x, flow, g, padding_mode=mode, backend="triton")
        want = run(kernels.flow_warp_reference, x, flow, g, padding_mode=mode)
        for name, a, b in zip(("out", "grad_x", "grad_flow"), got, want):
            assert rel(a, b) <= 1e-5, name
    else:
        check_low_precision(x, flow, g, dtype, mode, "triton")


# ----------------------------------------------------------------------------------------
# CUDA: whole models, Triton vs the reference path.

def build_model(arch):
    if arch == "basicvsr":
        torch.manual_seed(0)
        return bench.realistic_init(basicvsr.BasicVSR())
    return bench.build_network(arch, {})


@pytest.fixture
def no_tf32():
    # TF32 convolutions would round the two paths' slightly different features differently.
    saved = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    yield
    torch.backends.cudnn.allow_tf32 = saved[0]
    torch.set_float32_matmul_precision(saved[1])


def rms(a, b):
    return (a.double() - b.double()).square().mean().sqrt().item()


@cuda
@pytest.mark.parametrize("arch", ["basicvsrpp", "basicvsr", "realbasicvsr"])
def test_cuda_model_outputs_triton_vs_reference(arch, no_tf32):
    net = build_model(arch).cuda().eval()
    lqs = bench.moving_clip(5, 64, 96).cuda()
    outs = {}
    for backend in ("triton", "torch"):
        for dtype in (None, torch.bfloat16):
            with kernels.use_backend(backend), torch.inference_mode(), \
                    torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                outs[backend, dtype] = net(lqs).float()
    ref = outs["torch", None]
    assert torch.isfinite(outs["triton", torch.bfloat16]).all()
    # Relative to what the network adds to its bilinear x4 skip (~0.05 here, the output ~1).
    skip = F.interpolate(lqs.flatten(0, 1), scale_factor=4, mode="bilinear", align_corners=False).view_as(ref)
    err = (outs["triton", None] - ref).abs().max() / (ref - skip).abs().max()
    assert err <= 1e-4, err.item()
    err_triton, err_ref = rms(outs["triton", torch.bfloat16], ref), rms(outs["torch", torch.bfloat16], ref)
    assert err_triton <= 2 * err_ref + 1e-3, (err_triton, err_ref)


@cuda
def test_cuda_basicvsrpp_gradients_triton_vs_reference(no_tf32):
    net = build_model("basicvsrpp").cuda().train()
    lqs = bench.moving_clip(3, 64, 64).cuda()
    target = F.interpolate(lqs[0], scale_factor=4, mode="bicubic", align_corners=False)[None]
    grads = {}
    for backend in ("triton", "torch"):
        net.zero_grad(set_to_none=True)
        with kernels.use_backend(backend):
            torch.sqrt((net(lqs) - target) ** 2 + 1e-12).mean().backward()
        grads[backend] = {name: p.grad.flatten() for name, p in net.named_parameters() if p.grad is not None}
    assert grads["triton"].keys() == grads["torch"].keys()
    assert rel(torch.cat(list(grads["triton"].values())), torch.cat(list(grads["torch"].values()))) <= 1e-3


@cuda
def test_cuda_compiled_and_host_cache_basicvsrpp_equal_eager(no_tf32):
    """The two Triton variants of the model benchmark compute the same network: compile_network
    (inductor around the Triton custom ops) and the pinned-host feature cache with its copy stream."""
    net = build_model("basicvsrpp").cuda().eval()
    lqs = bench.moving_clip(6, 64, 96).cuda()
    compiled = basicvsr.compile_network(copy.deepcopy(net))
    for dtype in (None, torch.bfloat16):
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            eager = net(lqs).float()
            out_compiled = compiled(lqs).float()
            net.cpu_cache_length = 0
            out_cached = net(lqs).float()
            net.cpu_cache_length = 100
        assert out_cached.device.type == "cpu"
        tol = 1e-4 if dtype is None else 2e-2  # bf16: inductor fuses and rounds the glue differently
        assert (out_compiled - eager).abs().max().item() <= tol
        assert (out_cached - eager.cpu()).abs().max().item() <= 1e-6  # the same kernels in the same order


@cuda
def test_cuda_channels_last_basicvsrpp_equals_nchw(no_tf32):
    """The "triton + channels_last" variant (--channels-last) computes the same network: outputs in
    fp32 and bf16, compiled too, and the parameter gradients of a training step; its propagation
    features stay channels-last."""
    cl = torch.channels_last
    net = build_model("basicvsrpp").cuda().eval()
    nhwc = copy.deepcopy(net).to(memory_format=cl)
    compiled = basicvsr.compile_network(copy.deepcopy(nhwc))
    lqs = bench.moving_clip(6, 64, 96).cuda()
    layouts = []
    hook = nhwc.backbone["forward_2"].register_forward_hook(
        lambda m, i, o: layouts.append(o.is_contiguous(memory_format=cl) and not o.is_contiguous()))
    for dtype in (None, torch.bfloat16):
        with kernels.use_backend("triton"), torch.inference_mode(), \
                torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            ref, out, out_compiled = net(lqs).float(), nhwc(lqs).float(), compiled(lqs).float()
        tol = 1e-4 if dtype is None else 2e-2  # bf16: other convolution algorithms, rounded differently
        assert (out - ref).abs().max().item() <= tol
        assert (out_compiled - ref).abs().max().item() <= tol
    hook.remove()
    assert len(layouts) == 2 * 6 and all(layouts)

    target = F.interpolate(lqs[0, :3], scale_factor=4, mode="bicubic", align_corners=False)[None]
    grads = []
    for model in (net.train(), nhwc.train()):
        model.zero_grad(set_to_none=True)
        with kernels.use_backend("triton"):
            torch.sqrt((model(lqs[:, :3]) - target) ** 2 + 1e-12).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    # 5e-3: the two layouts' convolutions sum in different orders, and conv_last's bias gradient is
    # a sum over every output pixel of terms of both signs (on the CPU, fp32: rel 9e-4 from it alone).
    assert rel(grads[1], grads[0]) <= 5e-3
