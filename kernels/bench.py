"""Benchmarks of the Triton kernels (needs a CUDA GPU), op by op and inside the whole models.

    python -m kernels.bench                  # the ops at BasicVSR++ shapes (this table is the default)
    python -m kernels.bench --models         # the five model workloads of issue 8
    python -m kernels.bench --all            # both tables
    TRITON_INTERPRET=1 python -m kernels.bench --models --dry-run   # CPU: the code path at tiny sizes
                                                                    # (~3.5 min on 2 cores, mostly the interpreter)

Ops (--batch 1 8, --dtype fp32 bf16, --ops dcn flow_warp, --reps 50, --peak-tbps 3.35):
- DCN: x (n, 128, 180, 320), 16 deform groups, 3x3, stride 1, padding 1, 64 out channels;
  offset (n, 288, 180, 320) and mask (n, 144, 180, 320). Offsets look like BasicVSR++'s: a
  smooth flow plus a small residue.
- DCN + offset glue: the same layer as BasicVSR++ calls it, from the offset branch's raw output
  conv_offset (n, 432, 180, 320) (logits, in the features' dtype as under autocast) and two flows
  (n, 4, 180, 320): "triton" is flow_guided_deform_conv2d (glue fused into the kernel), "torch
  glue + triton dcn" is flow_guided_offsets (PyTorch, fp32) then the Triton deform_conv2d, and
  "torch reference" both in PyTorch. Run with --ops dcn.
- flow warp: x (n, 64, 180, 320), flow (n, 2, 180, 320), zero padding.
- dtype "bf16" means what autocast does: features, mask, weights and outputs in bf16, offsets
  and flows in fp32. fp32 dots are exact ("ieee") unless TF32 is allowed
  (torch.set_float32_matmul_precision("high")).
Time: the median over --reps calls of CUDA-event intervals around a single call, after a
warm-up; Python dispatch is included where the GPU would otherwise wait for it.
Memory floor: compulsory bytes / peak bandwidth (3.35 TB/s, H100 SXM HBM3), where the
compulsory bytes are every tensor the op must read or write, counted once:
  forward            inputs + output
  forward+backward   forward + (grad_out + inputs) read + (one gradient per input) written
"% floor" = floor time / measured time; GB/s = compulsory bytes / measured time.

Models (--models; --workloads picks a subset, --frames / --frames-480p set the clip lengths,
--reps the timed runs, --quick a short clip and fewer runs):
- bvsrpp-180x320     BasicVSR++ inference on a 100-frame 180x320 clip (a REDS clip), x4 to 720x1280;
- bvsrpp-480p        BasicVSR++ inference on 30 frames of 480x854, x4 to 1920x3416;
- realbasicvsr-480p  RealBasicVSR inference, the same clip;
- bvsrpp-train       one training iteration of train.py's REDS recipe ("basicvsrpp"): 30 frames of
                     64x64 (GT 256x256), batch 1, Charbonnier, Adam; forward + backward + step;
- realbasicvsr-gan   one iteration of train.py's GAN stage ("realbasicvsr"): 15 frames mirrored to 30,
                     64x64, batch 1; generator step (pixel + cleaning + perceptual (random VGG) +
                     GAN), discriminator step, EMA.
Each in fp32 and in bf16 (torch.autocast), and on three implementations of the two ops inside
the same networks:
  triton           kernels.use_backend("triton");
  torch reference  kernels.use_backend("torch"): the PyTorch references, mmagic's semantics;
  torchvision      torchvision.ops.deform_conv2d and plain grid_sample, patched in by this file
                   only (torchvision_ops), where torchvision is installed.
Inference also runs three variants of the Triton path (INFERENCE_ONLY_PATHS): "triton + host
cache" (BasicVSR++ only, features in pinned host memory), "triton + compile" (compile_network) and
"triton + channels_last" (the network in NHWC). The target lines take the best Triton row.
Time per frame (inference) or per iteration: the median over --reps runs, after a warm-up, of
the wall clock between torch.cuda.synchronize() calls around a whole clip or iteration. Peak
memory: torch.cuda.max_memory_allocated() over the cell's runs, reset before each cell. A cell
that runs out of memory shows OOM. Inference also reports PSNR(bf16 output, fp32 output).
Weights are random (timings do not depend on them, except through where the samplers read:
see realistic_init) unless --basicvsrpp-weights / --realbasicvsr-weights name checkpoints.
--workloads splits the --models run (its length on a GPU has not been measured yet).
"""
import argparse
import contextlib
import copy
import gc
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.modules.utils import _pair

import kernels  # the package object the networks call through (kernels.deform_conv2d, ...)

from . import deform_conv, deform_conv2d, flow_guided_deform_conv2d, flow_guided_offsets, flow_warp, flow_warp_reference

try:
    import torchvision
    from torchvision.ops import deform_conv2d as tv_deform_conv2d
    TORCHVISION = torchvision.__version__
except ImportError:  # torchvision is optional: its rows are skipped
    tv_deform_conv2d, TORCHVISION = None, "not installed"
except RuntimeError as e:  # e.g. a build for another torch: its ops do not register
    tv_deform_conv2d, TORCHVISION = None, f"unusable ({str(e).splitlines()[0][:100]})"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# ========================================================================================
# Ops (the default table).


# ----------------------------------------------------------------------------------------
# Compulsory bytes (pure arithmetic; see the module docstring).

def nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def compulsory_bytes(inputs, output):
    """(forward, forward+backward) bytes: the backward reads grad_out (output-sized) and every
    input again, and writes one gradient per input (input-sized)."""
    fwd = nbytes(*inputs) + nbytes(output)
    bwd = nbytes(output) + 2 * nbytes(*inputs)
    return fwd, fwd + bwd


# ----------------------------------------------------------------------------------------
# Inputs.

def smooth_flow(n, h, w, magnitude, device):
    """(n, 2, h, w) fp32, dx then dy: a coarse random field upsampled, like optical flow."""
    coarse = torch.randn(n, 2, max(1, h // 16), max(1, w // 16), device=device) * magnitude
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)


def dcn_inputs(n, dtype, device, h=180, w=320, c_in=128, c_out=64, groups=16):
    K = 9
    flow = smooth_flow(n, h, w, 4.0, device)
    # BasicVSR++: offset = flow.flip(1) repeated over groups and taps + a residue; mask = sigmoid.
    offset = flow.flip(1).repeat(1, groups * K, 1, 1) + torch.randn(n, groups * 2 * K, h, w, device=device)
    mask = torch.sigmoid(torch.randn(n, groups * K, h, w, device=device)).to(dtype)
    x = torch.randn(n, c_in, h, w, device=device).to(dtype)
    weight = (torch.randn(c_out, c_in, 3, 3, device=device) / (c_in * K) ** 0.5).to(dtype)
    bias = torch.randn(c_out, device=device).to(dtype)
    return x, offset, mask, weight, bias


def dcn_glue_inputs(n, dtype, device, h=180, w=320, c_in=128, c_out=64, groups=16):
    """x, conv_offset, flows, weight, bias of flow_guided_deform_conv2d: logits that give residues
    of ~1 px (max_residue_magnitude 10), two smooth flows."""
    K = 9
    flows = torch.cat([smooth_flow(n, h, w, 4.0, device) for _ in range(2)], 1)
    conv_offset = (0.1 * torch.randn(n, 3 * groups * K, h, w, device=device)).to(dtype)
    x = torch.randn(n, c_in, h, w, device=device).to(dtype)
    weight = (torch.randn(c_out, c_in, 3, 3, device=device) / (c_in * K) ** 0.5).to(dtype)
    bias = torch.randn(c_out, device=device).to(dtype)
    return x, conv_offset, flows, weight, bias


def warp_inputs(n, dtype, device, h=180, w=320, c=64):
    return torch.randn(n, c, h, w, device=device).to(dtype), smooth_flow(n, h, w, 4.0, device)


# ----------------------------------------------------------------------------------------
# Timing.

def median_ms(fn, reps, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def fwd_and_fwd_bwd(impl, op, inputs, reps):
    """(forward ms, forward+backward ms, output) of op(*inputs), gradients for every input;
    (None, None, None) where the implementation cannot run (torchvision has no bf16 kernel)."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    try:
        out = op(*leaves).detach()  # detached: the graph (GBs for the reference) is freed here
    except (RuntimeError, NotImplementedError) as e:
        print(f"  {impl} skipped: {str(e).splitlines()[0][:120]}")
        return None, None, None
    grad_out = torch.randn_like(out)

    def step():
        torch.autograd.grad(op(*leaves), leaves, grad_out)

    with torch.no_grad():
        t_fwd = median_ms(lambda: op(*leaves), reps)
    return t_fwd, median_ms(step, reps), out


# ----------------------------------------------------------------------------------------
# Table: one row per (op, batch, dtype, implementation).

HEADER = ("| op | batch | dtype | implementation | fwd ms | fwd GB/s | fwd % floor | fwd+bwd ms | "
          "fwd+bwd GB/s | fwd+bwd % floor | Triton speedup fwd | Triton speedup fwd+bwd |")


def table_rows(op, batch, dtype_name, results, bytes_, peak):
    """results: implementation -> (fwd ms, fwd+bwd ms, output), "triton" first."""
    triton_times = results["triton"][:2]
    rows = []
    for impl, (t_fwd, t_all, _) in results.items():
        cells = [op, str(batch), dtype_name, impl]
        for t, b in zip((t_fwd, t_all), bytes_):
            if t is None:
                cells += ["n/a", "", ""]
            else:
                floor_ms = b / peak * 1e3
                cells += [f"{t:.3f}", f"{b / t / 1e6:.0f}", f"{100 * floor_ms / t:.0f}%"]
        for t, t_triton in zip((t_fwd, t_all), triton_times):
            cells.append(f"{t / t_triton:.1f}x" if impl != "triton" and t is not None and t_triton is not None else "")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def check_against_reference(op, batch, dtype_name, results):
    # A cheap guard against timing a wrong kernel.
    got, ref = results["triton"][2], results["torch reference"][2]
    if got is not None and ref is not None:
        print(f"  {op} batch {batch} {dtype_name}: Triton vs reference forward, rel err {rel_err(got, ref):.1e}")


def bench_dcn(batch, dtype_name, reps, peak, device):
    x, offset, mask, weight, bias = inputs = dcn_inputs(batch, DTYPES[dtype_name], device)
    conv = dict(stride=1, padding=1, dilation=1, deform_groups=16)
    impls = {
        "triton": lambda *a: deform_conv2d(*a, **conv, backend="triton"),
        "torch reference": lambda *a: deform_conv2d(*a, **conv, backend="torch"),
    }
    if tv_deform_conv2d is not None:
        # Same layout as mmcv; torchvision wants the offsets in the features' dtype.
        impls["torchvision"] = lambda x, o, m, w, b: tv_deform_conv2d(x, o.to(x.dtype), w, b, 1, 1, 1, mask=m)
    results = {impl: fwd_and_fwd_bwd(impl, fn, inputs, reps) for impl, fn in impls.items()}
    check_against_reference("dcn", batch, dtype_name, results)
    out = x.new_empty(batch, weight.shape[0], x.shape[2], x.shape[3])  # stride 1, padding 1
    return table_rows("dcn", batch, dtype_name, results, compulsory_bytes(inputs, out), peak)


def bench_dcn_glue(batch, dtype_name, reps, peak, device):
    x, conv_offset, flows, weight, bias = inputs = dcn_glue_inputs(batch, DTYPES[dtype_name], device)
    conv = dict(max_residue_magnitude=10.0, stride=1, padding=1, dilation=1, deform_groups=16)
    dcn_conv = {k: v for k, v in conv.items() if k != "max_residue_magnitude"}

    def glue_then_dcn(x, conv_offset, flows, weight, bias):
        offset, mask = flow_guided_offsets(conv_offset, flows, conv["max_residue_magnitude"], 16, 9)
        return deform_conv2d(x, offset, mask, weight, bias, **dcn_conv, backend="triton")

    impls = {
        "triton": lambda *a: flow_guided_deform_conv2d(*a, **conv, backend="triton"),
        "torch glue + triton dcn": glue_then_dcn,
        "torch reference": lambda *a: flow_guided_deform_conv2d(*a, **conv, backend="torch"),
    }
    results = {impl: fwd_and_fwd_bwd(impl, fn, inputs, reps) for impl, fn in impls.items()}
    check_against_reference("dcn + offset glue", batch, dtype_name, results)
    out = x.new_empty(batch, weight.shape[0], x.shape[2], x.shape[3])  # stride 1, padding 1
    return table_rows("dcn + offset glue", batch, dtype_name, results, compulsory_bytes((x, conv_offset, flows), out), peak)


def bench_warp(batch, dtype_name, reps, peak, device):
    dtype = DTYPES[dtype_name]
    x, flow = warp_inputs(batch, dtype, device)
    _, _, h, w = x.shape
    # Plain grid_sample: the grid precomputed, in x's dtype (grid_sample takes a single dtype).
    gy, gx = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    grid = torch.stack((2 * (gx + flow[:, 0]) / (w - 1) - 1, 2 * (gy + flow[:, 1]) / (h - 1) - 1), 3).to(dtype)
    impls = {
        "triton": (lambda x, f: flow_warp(x, f, backend="triton"), (x, flow)),
        "torch reference": (flow_warp_reference, (x, flow)),
        "grid_sample": (lambda x, g: F.grid_sample(x, g, "bilinear", "zeros", align_corners=True), (x, grid)),
    }
    results = {impl: fwd_and_fwd_bwd(impl, fn, args, reps) for impl, (fn, args) in impls.items()}
    check_against_reference("flow_warp", batch, dtype_name, results)
    return table_rows("flow_warp", batch, dtype_name, results, compulsory_bytes((x, flow), x), peak)


# ========================================================================================
# Whole models (--models): the networks of basicvsr.py and realbasicvsr.py and the training
# iteration of train.py, each run with three implementations of the two ops inside the same
# networks (see the module docstring), in fp32 and in bf16 (torch.autocast).

MODEL_PATHS = ("triton", "triton + host cache", "triton + compile", "triton + channels_last", "torch reference",
               "torchvision")
# Variants of the Triton path that only inference runs: BasicVSR++ with its features in pinned host
# memory (HostCache, cpu_cache_length = 0), the network after basicvsr.compile_network, and the
# network in channels-last memory format (NHWC convolutions; the clip stays as it is).
INFERENCE_ONLY_PATHS = ("triton + host cache", "triton + compile", "triton + channels_last")
MODEL_DTYPES = {"fp32": None, "bf16": torch.bfloat16}

# Random weights, scaled where the timing depends on them (see realistic_init). Calibrated on
# a 64x96 clip panning 2 px per frame: mean |flow| ~1 px, mean |offset residue| ~0.5 px.
SPYNET_FLOW_SCALE = 0.1
OFFSET_RESIDUE_STD = 0.1

# Issue 8's targets on an H100.
TARGET_FPS = 150            # BasicVSR++ 180x320 inference, bf16, Triton
TARGET_INFER_SPEEDUP = 3.0  # ... over the reference path
TARGET_TRAIN_SPEEDUP = 2.0  # BasicVSR++ training iteration over the reference path
TARGET_MEMORY_RATIO = 0.25  # peak memory of the 100-frame clip, Triton / reference


def model_workloads(frames, frames_480p):
    """name -> workload (plain dicts). "infer": net(lqs) under inference_mode on a (1, frames, 3, h, w)
    clip; "train": one train.Trainer.train_step of the recipe on a batch of 1 x frames LR frames of
    h x w (GT 4h x 4w). net / cfg: constructor or recipe overrides (the dry run's tiny networks)."""
    return {
        "bvsrpp-180x320": dict(kind="infer", arch="basicvsrpp", frames=frames, size=(180, 320), net={},
                               title=f"BasicVSR++ inference, {frames} frames 180x320 -> 720x1280"),
        "bvsrpp-480p": dict(kind="infer", arch="basicvsrpp", frames=frames_480p, size=(480, 854), net={},
                            title=f"BasicVSR++ inference, {frames_480p} frames 480x854 -> 1920x3416"),
        "realbasicvsr-480p": dict(kind="infer", arch="realbasicvsr", frames=frames_480p, size=(480, 854), net={},
                                  title=f"RealBasicVSR inference, {frames_480p} frames 480x854 -> 1920x3416"),
        "bvsrpp-train": dict(kind="train", recipe="basicvsrpp", frames=30, size=(64, 64), mirrored=False, cfg={},
                             title="BasicVSR++ training iteration, REDS recipe: 30 frames 64x64, batch 1, "
                                   "Charbonnier, Adam, SPyNet trained"),
        "realbasicvsr-gan": dict(kind="train", recipe="realbasicvsr", frames=30, size=(64, 64), mirrored=True, cfg={},
                                 title="RealBasicVSR GAN-stage iteration: 15 frames mirrored to 30, 64x64, batch 1; "
                                       "G (pixel + cleaning + perceptual + GAN) then D, EMA"),
    }


WORKLOAD_NAMES = list(model_workloads(100, 30))

# --dry-run: every workload once, through the same functions, at these tiny sizes. BasicVSR++
# takes nothing below 64x64; two frames keep the interpreted DCN to four calls per run.
DRY_RUN = {
    "bvsrpp-180x320": dict(frames=2, size=(64, 64), net=dict(mid_channels=16, num_blocks=1)),
    "bvsrpp-480p": dict(frames=2, size=(64, 72), net=dict(mid_channels=16, num_blocks=1)),
    "realbasicvsr-480p": dict(frames=3, size=(16, 24),
                              net=dict(mid_channels=16, num_propagation_blocks=1, num_cleaning_blocks=1)),
    "bvsrpp-train": dict(frames=2, size=(64, 64), cfg=dict(mid_channels=16, num_blocks=1)),
    "realbasicvsr-gan": dict(frames=2, size=(8, 8),
                             cfg=dict(mid_channels=16, num_blocks=1, num_cleaning_blocks=1, d_mid_channels=16)),
}


# ----------------------------------------------------------------------------------------
# Inputs and weights.

def moving_clip(frames, h, w, seed=0):
    """(1, frames, 3, h, w) in [0, 1], CPU: a smooth random texture (three octaves of bicubically
    upsampled noise) seen through a window that pans about 1 px down and 2 px right per frame,
    with jitter. Consecutive frames are shifted copies, so the flows between them are not zero."""
    gen = torch.Generator().manual_seed(seed)
    path = (torch.randn(frames, 2, generator=gen) * 0.5 + torch.tensor([1.0, 2.0])).cumsum(0)
    path = (path - path.min(0).values).round().long()
    hh, ww = h + int(path[:, 0].max()), w + int(path[:, 1].max())
    texture = sum(F.interpolate(torch.rand(1, 3, hh // s + 3, ww // s + 3, generator=gen), size=(hh, ww),
                                mode="bicubic", align_corners=False) for s in (2, 8, 32)) / 3
    clip = torch.stack([texture[0, :, y:y + h, x:x + w] for y, x in path.tolist()])
    return clip[None].clamp(0, 1)


def training_batch(frames, h, w, mirrored):
    """A train.py batch: GT clips at 4h x 4w, LQ = area x4 down. mirrored: frames/2 frames then the
    same reversed, as RealBasicVSR's dataset does. gt_usm (the sharpened GT) is the GT itself here:
    the cost is the same."""
    gt = moving_clip(frames // 2 if mirrored else frames, 4 * h, 4 * w)
    if mirrored:
        gt = torch.cat([gt, gt.flip(1)], dim=1)
    lq = F.interpolate(gt.flatten(0, 1), scale_factor=0.25, mode="area").view(1, frames, 3, h, w)
    return {"lq": lq, "gt": gt, "gt_usm": gt}


@torch.no_grad()
def realistic_init(net):
    """Random weights, but flows and offsets of the size trained networks produce, since the
    sampling kernels' memory traffic depends on where they read:
    - SPyNet: each level's flow residual is scaled down (random SPyNet flows are tens of pixels);
    - deformable alignment: the last conv_offset layer, zero at init (offsets = flow, mask 0.5),
      gets small random weights, so offsets leave the flow by about a pixel and masks vary."""
    import basicvsr
    gen = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, basicvsr.SPyNetBasicModule):
            last = m.basic_module[-1].conv
            last.weight.mul_(SPYNET_FLOW_SCALE)
            last.bias.mul_(SPYNET_FLOW_SCALE)
        elif isinstance(m, basicvsr.SecondOrderDeformableAlignment):
            last = m.conv_offset[-1]
            last.weight.copy_(torch.randn(last.weight.shape, generator=gen) * OFFSET_RESIDUE_STD)
    return net


def build_network(arch, net_kwargs, weights=None):
    """BasicVSR++ or RealBasicVSR with a published checkpoint, or realistic random weights."""
    import basicvsr
    import realbasicvsr
    torch.manual_seed(0)
    net = basicvsr.BasicVSRPlusPlus(**net_kwargs) if arch == "basicvsrpp" else realbasicvsr.RealBasicVSR(**net_kwargs)
    return basicvsr.load_weights(net, weights) if weights else realistic_init(net)


def build_trainer(recipe, cfg_overrides, amp, device):
    """train.Trainer for a train.RECIPES entry, as train.train() sets it up (random weights, random VGG
    for the perceptual loss), at the phase of most of the run: past SPyNet's initial freeze."""
    import realbasicvsr
    import train
    cfg = dict(train.RECIPES[recipe], **cfg_overrides)
    cfg["lr_period"] = cfg["max_iters"]  # train.resolve_config's default
    torch.manual_seed(0)
    g = realistic_init(train.build_generator(cfg)).to(device).train()
    ema = copy.deepcopy(g).requires_grad_(False) if cfg["ema_decay"] > 0 else None
    d = realbasicvsr.UNetDiscriminatorSN(3, cfg["d_mid_channels"]).to(device).train() if cfg["gan_weight"] > 0 else None
    percep = realbasicvsr.PerceptualLoss("random").to(device) if cfg["perceptual_weight"] > 0 else None
    trainer = train.Trainer(cfg, g, ema, d, percep, device, False, amp)
    step = max(cfg["spynet_fix_iters"], 0)
    trainer.set_phase(step)
    trainer.set_lr(step)
    return trainer


# ----------------------------------------------------------------------------------------
# The three implementations of the ops.

def torchvision_deform_conv2d(x, offset, mask, weight, bias=None, stride=1, padding=0, dilation=1,
                              deform_groups=1, backend=None):
    """kernels.deform_conv2d's signature on torchvision.ops.deform_conv2d (mmcv's layout; the deform
    groups follow from offset's channels). Under autocast torchvision casts to fp32 itself."""
    if not torch.is_autocast_enabled(x.device.type):  # it takes a single dtype
        offset, mask, weight = offset.to(x.dtype), mask.to(x.dtype), weight.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
    return tv_deform_conv2d(x, offset, weight, bias, _pair(stride), _pair(padding), _pair(dilation), mask=mask)


def torchvision_flow_guided_deform_conv2d(x, conv_offset, flows, weight, bias=None, max_residue_magnitude=10.0,
                                          stride=1, padding=0, dilation=1, deform_groups=1, backend=None):
    """kernels.flow_guided_deform_conv2d's signature: the PyTorch glue, then torchvision's DCN."""
    offset, mask = flow_guided_offsets(conv_offset, flows, max_residue_magnitude, deform_groups,
                                       weight.shape[2] * weight.shape[3])
    return torchvision_deform_conv2d(x, offset, mask, weight, bias, stride, padding, dilation, deform_groups)


def grid_sample_flow_warp(x, flow, padding_mode="zeros", backend=None):
    """mmagic's flow_warp: plain F.grid_sample on the grid built from the flow, in fp32 positions."""
    n, _, h, w = x.shape
    grid_y, grid_x = torch.meshgrid(torch.arange(h, device=x.device, dtype=torch.float32),
                                    torch.arange(w, device=x.device, dtype=torch.float32), indexing="ij")
    gx = 2.0 * (grid_x + flow[:, 0].float()) / max(w - 1, 1) - 1.0
    gy = 2.0 * (grid_y + flow[:, 1].float()) / max(h - 1, 1) - 1.0
    return F.grid_sample(x, torch.stack((gx, gy), dim=3), mode="bilinear", padding_mode=padding_mode,
                         align_corners=True)


@contextlib.contextmanager
def torchvision_ops():
    """BENCHMARK-ONLY PATCH, not a fallback of the library: while the block runs, the names the
    networks call, kernels.deform_conv2d, kernels.flow_guided_deform_conv2d (its PyTorch glue, then
    the DCN) and kernels.flow_warp, are torchvision's DCN and plain
    grid_sample, i.e. what users of mmagic-style code without mmcv run today. torchvision's DCN
    differs from mmcv's only in the gradient at exactly -1, which does not matter for timing."""
    if tv_deform_conv2d is None:
        raise RuntimeError("kernels.bench: the torchvision path needs torchvision")
    saved = kernels.deform_conv2d, kernels.flow_guided_deform_conv2d, kernels.flow_warp
    kernels.deform_conv2d, kernels.flow_guided_deform_conv2d, kernels.flow_warp = (
        torchvision_deform_conv2d, torchvision_flow_guided_deform_conv2d, grid_sample_flow_warp)
    try:
        yield
    finally:
        kernels.deform_conv2d, kernels.flow_guided_deform_conv2d, kernels.flow_warp = saved


def ops_path(path):
    """Context in which the networks run on `path` (one of MODEL_PATHS)."""
    if path == "torchvision":
        return torchvision_ops()
    return kernels.use_backend("triton" if path.startswith("triton") else "torch")


# ----------------------------------------------------------------------------------------
# Measuring one cell: (workload, dtype, path).

def measure(fn, reps, warmup, device):
    """(median seconds, peak bytes or None, last result) of fn() over `reps` runs after `warmup`.
    Each run is timed by the wall clock between synchronisations, so it includes every launch and
    Python step. The peak counts from a reset before the warm-up, over all runs."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times, out = [], None
    for i in range(warmup + reps):
        out = None  # the previous run's output is not part of this run
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    return statistics.median(times), peak, out


def run_cell(fn, reps, warmup, device, path, label):
    """dict(seconds, peak, out) or dict(status="OOM" / "failed", note). Out-of-memory never ends
    the run; any other error does, except on the torchvision path (a baseline's gap, reported)."""
    print(f"  ... {label}", file=sys.stderr, flush=True)  # progress, off the table's stream
    cell = {}
    try:
        with ops_path(path):
            cell["seconds"], cell["peak"], cell["out"] = measure(fn, reps, warmup, device)
    except torch.OutOfMemoryError:
        cell = dict(status="OOM")
    except (RuntimeError, NotImplementedError) as e:
        if path != "torchvision":
            raise
        cell = dict(status="failed", note=f"{path}: {str(e).splitlines()[0][:160]}")
    gc.collect()  # the failed run's tensors are unreachable only now
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return cell


def psnr(a, b):
    """PSNR in dB of two clips (1, t, 3, H, W) clamped to [0, 1], the range of the saved images."""
    se = sum((a[:, i].clamp(0, 1) - b[:, i].clamp(0, 1)).double().square().sum().item() for i in range(a.shape[1]))
    mse = se / a.numel()
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse)


def bench_inference(wl, paths, dtypes, reps, warmup, device, weights, notes):
    net = build_network(wl["arch"], wl["net"], weights).to(device).eval()
    lqs = moving_clip(wl["frames"], *wl["size"]).to(device)
    spynet = net.spynet if wl["arch"] == "basicvsrpp" else net.basicvsr.spynet
    if wl["frames"] > 1:
        with torch.inference_mode():
            flow = spynet(lqs[:, 1], lqs[:, 0])
        notes.append(f"{wl['name']}: SPyNet's mean |flow| between frames 0 and 1: {flow.abs().mean().item():.2f} px "
                     f"(the clip pans about 2.2 px per frame)")
        del flow

    import basicvsr
    if wl["arch"] != "basicvsrpp":  # only BasicVSR++ has the host cache
        paths = [p for p in paths if p != "triton + host cache"]
    compiled = basicvsr.compile_network(copy.deepcopy(net)) if "triton + compile" in paths else None
    nhwc = copy.deepcopy(net).to(memory_format=torch.channels_last) if "triton + channels_last" in paths else None

    def run(dtype, path):
        model = {"triton + compile": compiled, "triton + channels_last": nhwc}.get(path, net)

        def fn():
            if wl["arch"] == "basicvsrpp":  # 100: mmagic's threshold, so a 100-frame clip stays on the GPU
                model.cpu_cache_length = 0 if path == "triton + host cache" else 100
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                return model(lqs)
        return fn

    cells, fp32_out = {}, {}
    for path in paths:
        for name in dtypes:
            cell = run_cell(run(MODEL_DTYPES[name], path), reps, warmup, device, path, f"{wl['name']} {name} {path}")
            if "out" in cell:
                out = cell.pop("out").float().cpu()  # the clip stays off the GPU between cells
                if not torch.isfinite(out).all():
                    notes.append(f"{wl['name']} {name} {path}: the output has inf/NaN")
                if name == "fp32":
                    fp32_out[path] = out
                elif path in fp32_out:
                    cell["psnr"] = psnr(out, fp32_out[path])
                del out
            cells[(name, path)] = cell
    # A guard against timing a wrong network: the same weights and clip on every path.
    for path in paths[1:]:
        if "triton" in fp32_out and path in fp32_out:
            diff = (fp32_out["triton"] - fp32_out[path]).abs().max().item()
            notes.append(f"{wl['name']}: fp32 outputs, Triton vs {path}: max |diff| {diff:.1e}, "
                         f"PSNR {psnr(fp32_out['triton'], fp32_out[path]):.1f} dB")
    return cells


def bench_training(wl, paths, dtypes, reps, warmup, device, notes):
    batch = training_batch(wl["frames"], *wl["size"], wl["mirrored"])
    if device.type == "cuda":  # as train.py's loader delivers it
        batch = {k: v.pin_memory() for k, v in batch.items()}
    cells = {}
    for path in [p for p in paths if p not in INFERENCE_ONLY_PATHS]:
        for name in dtypes:
            trainer = build_trainer(wl["recipe"], wl["cfg"], "bf16" if name == "bf16" else "none", device)
            cell = run_cell(lambda: trainer.train_step(batch), reps, warmup, device, path, f"{wl['name']} {name} {path}")
            if "out" in cell:
                losses, applied = cell.pop("out")
                if not applied or not all(math.isfinite(v) for v in losses.values()):
                    notes.append(f"{wl['name']} {name} {path}: a non-finite loss, the update was skipped: {losses}")
            cells[(name, path)] = cell
            del trainer
            gc.collect()
    return cells


# ----------------------------------------------------------------------------------------
# Table and targets.

MODEL_HEADER = ("| workload | dtype | ops | time | frames/s | peak GPU memory | Triton speedup | "
                "Triton memory | PSNR(bf16, fp32) |")


def model_rows(wl, cells, paths, dtypes):
    """One row per (dtype, path). Triton speedup = that row's time / Triton's time in the same dtype;
    Triton memory = Triton's peak / that row's peak."""
    rows = []
    unit = "ms/frame" if wl["kind"] == "infer" else "ms/iter"
    for name in dtypes:
        tri = cells.get((name, "triton"), {})
        for path in [p for p in paths if (name, p) in cells]:
            cell = cells[(name, path)]
            if "status" in cell:
                rows.append(f"| {wl['title']} | {name} | {path} | " + " | ".join([cell["status"]] * 6) + " |")
                continue
            s, peak = cell["seconds"], cell["peak"]
            per = s / wl["frames"] if wl["kind"] == "infer" else s
            cells_ = [f"{1e3 * per:.2f} {unit}", f"{wl['frames'] / s:.1f}",
                      "n/a" if peak is None else f"{peak / 2**30:.2f} GiB"]
            cells_.append(f"{s / tri['seconds']:.2f}x" if path != "triton" and "seconds" in tri else "")
            cells_.append(f"{tri['peak'] / peak:.2f}x" if path != "triton" and tri.get("peak") and peak else "")
            cells_.append(f"{cell['psnr']:.1f} dB" if "psnr" in cell else "")
            rows.append(f"| {wl['title']} | {name} | {path} | " + " | ".join(cells_) + " |")
    return rows


def _best_triton(cells, dtype, key):
    """(path, value) of the Triton variant with the lowest `key` ("seconds" or "peak") in `dtype`, or
    (None, None)."""
    found = [(c[key], path) for (d, path), c in cells.items() if d == dtype and path.startswith("triton")
             and c.get(key) is not None]
    return (min(found)[1], min(found)[0]) if found else (None, None)


def target_lines(results, frames):
    """Issue 8's targets next to what this run measured ('not measured' where a cell is missing). Each
    target takes the best Triton variant of the run (plain, host cache, compiled, channels-last) and names it."""
    def fmt(v, spec="{:.2f}x"):
        return "not measured" if v is None else spec.format(v)

    def verdict(ok):
        return "" if ok is None else (" -> met" if ok else " -> NOT met")

    def ratio(x, y):
        return None if x is None or y is None else x / y

    def named(path):
        return f" [{path}]" if path not in (None, "triton") else ""

    R = "torch reference"
    c = results.get("bvsrpp-180x320", {})
    fast_path, fast = _best_triton(c, "bf16", "seconds")
    fps = ratio(frames, fast)
    up = ratio(c.get(("bf16", R), {}).get("seconds"), fast)
    up_fp32 = ratio(c.get(("fp32", R), {}).get("seconds"), fast)
    tr = {}
    for d in MODEL_DTYPES:
        path, t = _best_triton(results.get("bvsrpp-train", {}), d, "seconds")
        tr[d] = (path, ratio(results.get("bvsrpp-train", {}).get((d, R), {}).get("seconds"), t))
    mem = {}
    for d in MODEL_DTYPES:
        path, peak = _best_triton(c, d, "peak")
        mem[d] = (path, ratio(peak, c.get((d, R), {}).get("peak")))
    mem_mixed = ratio(_best_triton(c, "bf16", "peak")[1], c.get(("fp32", R), {}).get("peak"))
    psnrs = [f"{k} {results[k][('bf16', 'triton')]['psnr']:.1f} dB" for k in results
             if "psnr" in results[k].get(("bf16", "triton"), {})]
    clip = "" if frames in (None, 100) else f" (measured on {frames} frames; the target is for 100)"
    return [
        f"- BasicVSR++ 180x320 inference, bf16, Triton: >= {TARGET_FPS} frames/s: "
        f"{fmt(fps, '{:.1f} frames/s')}{verdict(None if fps is None else fps >= TARGET_FPS)}{named(fast_path)}{clip}",
        f"- the same, speedup over the reference path in bf16: >= {TARGET_INFER_SPEEDUP:g}x: {fmt(up)}"
        f"{verdict(None if up is None else up >= TARGET_INFER_SPEEDUP)} (over the reference in fp32: {fmt(up_fp32)})",
        f"- BasicVSR++ training iteration, speedup over the reference path: >= {TARGET_TRAIN_SPEEDUP:g}x: "
        + ", ".join(f"{d} {fmt(v)}{verdict(None if v is None else v >= TARGET_TRAIN_SPEEDUP)}{named(p)}"
                    for d, (p, v) in tr.items()),
        f"- peak memory of the 180x320 clip, Triton / reference: <= {TARGET_MEMORY_RATIO:g}: "
        + ", ".join(f"{d} {fmt(v)}{verdict(None if v is None else v <= TARGET_MEMORY_RATIO)}{named(p)}"
                    for d, (p, v) in mem.items())
        + f"; Triton bf16 / reference fp32 {fmt(mem_mixed)}{clip}",
        "- PSNR(bf16 output, fp32 output), Triton: " + (", ".join(psnrs) if psnrs else "not measured"),
    ]


def selected_workloads(args):
    """The workloads of this run, in order, with the clip lengths (and, for --dry-run, the tiny sizes) resolved."""
    workloads = model_workloads(args.frames or (20 if args.quick else 100), args.frames_480p or (10 if args.quick else 30))
    selected = {}
    for key in args.workloads:
        wl = dict(workloads[key], name=key)
        if args.dry_run:
            wl.update(DRY_RUN[key])
            wl["title"] = f"[dry run] {key}, {wl['frames']} frames {wl['size'][0]}x{wl['size'][1]}"
        selected[key] = wl
    return selected


def bench_models(args, device):
    workloads = selected_workloads(args)
    paths = [p for p in MODEL_PATHS if p != "torchvision" or tv_deform_conv2d is not None]
    dtypes = list(args.dtype)
    weights = {"basicvsrpp": args.basicvsrpp_weights, "realbasicvsr": args.realbasicvsr_weights}
    notes = [] if tv_deform_conv2d is not None else [f"torchvision {TORCHVISION}: no torchvision rows"]
    if not all(weights.values()):
        notes.append("random weights: the networks' residual over the bilinear x4 skip is small, so "
                     "PSNR(bf16, fp32) is optimistic; pass --basicvsrpp-weights / --realbasicvsr-weights for "
                     "the figure of the published models")
    print("time: median of --reps runs after a warm-up, wall clock between torch.cuda.synchronize() calls around "
          "a whole clip or iteration; frames/s counts LR frames (training: forward + backward + step)")
    print("peak GPU memory: torch.cuda.max_memory_allocated() after a reset; weights, clip and output included")
    print("Triton speedup = that row's time / Triton's time, Triton memory = Triton's peak / that row's peak "
          "(same workload and dtype)")
    print("weights: random (flows and offsets scaled to trained sizes: realistic_init) unless --basicvsrpp-weights / "
          "--realbasicvsr-weights; clips: a smooth texture panning ~2 px per frame")
    header = [MODEL_HEADER, "|" + "---|" * (MODEL_HEADER.count("|") - 1)]
    results, rows = {}, []
    for key, wl in workloads.items():
        if wl["kind"] == "infer":
            reps, warmup = (1, 0) if args.dry_run else (args.reps or (2 if args.quick else 3), 1)
            cells = bench_inference(wl, paths, dtypes, reps, warmup, device, weights[wl["arch"]], notes)
        else:
            reps, warmup = (1, 0) if args.dry_run else (args.reps or (3 if args.quick else 10), 3)
            cells = bench_training(wl, paths, dtypes, reps, warmup, device, notes)
        results[key] = cells
        notes += [c["note"] for c in cells.values() if "note" in c]
        rows += model_rows(wl, cells, paths, dtypes)
        # Each workload's rows as soon as they exist, so that a run cut short still shows them.
        print("\n".join(header + model_rows(wl, cells, paths, dtypes)) + "\n", flush=True)
    print("All workloads" + (" (DRY RUN: tiny networks on tiny clips; the numbers are not measurements)"
                             if args.dry_run else "") + ":")
    print("\n".join(header + rows))
    print("\nNotes:\n" + "\n".join(f"- {n}" for n in notes))
    frames = workloads.get("bvsrpp-180x320", {}).get("frames")
    print("\nTargets (issue 8, on an H100)" + (" (DRY RUN: meaningless)" if args.dry_run else "") + ":\n"
          + "\n".join(target_lines(results, frames)))


# ========================================================================================
# Command line.

def bench_ops(args, device):
    print(f"floor = compulsory bytes / {args.peak_tbps} TB/s; Triton speedup = that row's time / Triton's time")
    peak = args.peak_tbps * 1e12
    reps = args.reps or (10 if args.quick else 50)
    rows = [HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    for batch in args.batch:
        for dtype_name in args.dtype:
            if "dcn" in args.ops:
                rows += bench_dcn(batch, dtype_name, reps, peak, device)
                rows += bench_dcn_glue(batch, dtype_name, reps, peak, device)
            if "flow_warp" in args.ops:
                rows += bench_warp(batch, dtype_name, reps, peak, device)
            torch.cuda.empty_cache()
    print("\n".join(rows))


def main():
    parser = argparse.ArgumentParser(description="Benchmarks of the Triton kernels: the ops at BasicVSR++ "
                                                 "shapes (default), the whole models (--models), or both (--all).")
    group = parser.add_argument_group("what to run")
    group.add_argument("--models", action="store_true", help="the model workloads instead of the ops")
    group.add_argument("--all", action="store_true", help="the ops, then the model workloads")
    group.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    group.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="ops: batch sizes")
    group.add_argument("--ops", nargs="+", choices=["dcn", "flow_warp"], default=["dcn", "flow_warp"])
    group.add_argument("--workloads", nargs="+", choices=WORKLOAD_NAMES, default=WORKLOAD_NAMES,
                       help="models: which workloads (default all)")
    group.add_argument("--frames", type=int, help="models: frames of the 180x320 clip (default 100; --quick 20)")
    group.add_argument("--frames-480p", type=int, help="models: frames of the 480x854 clip (default 30; --quick 10)")
    group.add_argument("--dry-run", action="store_true",
                       help="models: every workload once at tiny sizes, on the CPU without a GPU "
                            "(needs TRITON_INTERPRET=1 there); no real timings")
    group = parser.add_argument_group("measurement")
    group.add_argument("--reps", type=int, help="timed runs per cell, the median is reported "
                                                "(default: ops 50, inference 3, training 10)")
    group.add_argument("--quick", action="store_true", help="fewer runs and shorter clips, for a first look")
    group.add_argument("--peak-tbps", type=float, default=3.35, help="ops: memory bandwidth of the floor, TB/s (H100 SXM: 3.35)")
    group = parser.add_argument_group("weights (models; default random)")
    group.add_argument("--basicvsrpp-weights", help="a BasicVSR++ checkpoint, any layout basicvsr.load_weights reads")
    group.add_argument("--realbasicvsr-weights", help="a RealBasicVSR checkpoint")
    args = parser.parse_args()
    for flag in ("reps", "frames", "frames_480p"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"kernels.bench: --{flag.replace('_', '-')} must be >= 1")
    if args.dry_run and (args.all or not args.models):
        raise ValueError("kernels.bench: --dry-run goes with --models (the op table needs a GPU)")

    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif args.dry_run:
        device = torch.device("cpu")
        if not deform_conv._INTERPRET:
            raise RuntimeError("kernels.bench: a dry run without a GPU runs the Triton path in the interpreter: "
                               "TRITON_INTERPRET=1 python -m kernels.bench --models --dry-run")
    else:
        print("kernels.bench: needs a CUDA GPU, and none is available (try --models --dry-run)")
        sys.exit(1)
    torch.manual_seed(0)
    print(f"{'GPU: ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else 'device: CPU (dry run)'}; "
          f"torch {torch.__version__}; triton {triton.__version__}; torchvision {TORCHVISION}")
    print(f"command: python -m kernels.bench {' '.join(sys.argv[1:])}".rstrip())
    print(f"fp32 settings: torch.backends.cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
          f"matmul precision {torch.get_float32_matmul_precision()!r}, "
          f"cudnn.benchmark={torch.backends.cudnn.benchmark}")
    if args.dry_run:
        print("DRY RUN: tiny networks on tiny clips, one run each; the numbers below are not measurements")
    if not args.models or args.all:
        bench_ops(args, device)
    if args.models or args.all:
        bench_models(args, device)


if __name__ == "__main__":
    main()
