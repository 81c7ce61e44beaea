"""Whole-model benchmark of the Triton kernels (needs a CUDA GPU), and issue 18's GPU report.

    python bench.py                          # the five model workloads of issue 8
    python bench.py --workloads bvsrpp-train # a subset
    TRITON_INTERPRET=1 python bench.py --dry-run          # CPU: the code path at tiny sizes
    python bench.py --report OUT_DIR --budget 420         # the GPU report, OUT_DIR/report.md and .json
    TRITON_INTERPRET=1 python bench.py --report OUT_DIR --dry-run   # its code path on the CPU

The ops alone, at BasicVSR++'s shapes: python -m kernels.bench.

Workloads (--workloads picks a subset, --frames / --frames-480p set the clip lengths, --reps the
timed runs, --quick a short clip and fewer runs):
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
that runs out of memory shows OOM. Inference also reports PSNR(bf16 output, fp32 output), the
mean over frames of metrics.psnr. Weights are random (timings do not depend on them, except
through where the samplers read: see realistic_init) unless --basicvsrpp-weights /
--realbasicvsr-weights name checkpoints.

--report OUT_DIR (issue 18) runs, within --budget seconds, three parts, each with a share of the
budget (REPORT_SHARES; what a part leaves goes to the next): the CUDA tests (pytest -k cuda, a
subprocess), the ops at BasicVSR++'s shapes in fp32 and bf16 (kernels.bench), and the workloads
REPORT_WORKLOADS on REPORT_PATHS. A part that runs out of its time is stopped and recorded as
skipped with the reason, what it finished is kept. It writes OUT_DIR/report.md and
OUT_DIR/report.json (atomically, after each part) with the GPU, the command and the targets met.
"""

import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.modules.utils import _pair

import basicvsr
import kernels  # the package object the networks call through (kernels.deform_conv2d, ...)
import metrics
import realbasicvsr
import train
import weights
from files import atomic_path
from kernels import bench as op_bench
from kernels import flow_guided_offsets
from kernels.bench import TORCHVISION, tv_deform_conv2d

ROOT = os.path.dirname(os.path.abspath(__file__))

# ========================================================================================
# Whole models: the networks of basicvsr.py and realbasicvsr.py and the training iteration of
# train.py, each run with three implementations of the two ops inside the same networks (see
# the module docstring), in fp32 and in bf16 (torch.autocast).

MODEL_PATHS = (
    "triton",
    "triton + host cache",
    "triton + compile",
    "triton + channels_last",
    "torch reference",
    "torchvision",
)
# Variants of the Triton path that only inference runs: BasicVSR++ with its features in pinned host
# memory (HostCache, cpu_cache_length = 0), the network after basicvsr.compile_network, and the
# network in channels-last memory format (NHWC convolutions; the clip stays as it is).
INFERENCE_ONLY_PATHS = ("triton + host cache", "triton + compile", "triton + channels_last")
MODEL_DTYPES = {"fp32": None, "bf16": torch.bfloat16}

# Random weights, scaled where the timing depends on them (see realistic_init). Calibrated on
# a 64x96 clip panning 2 px per frame: mean |flow| ~1 px, mean |offset residue| ~0.5 px.
SPYNET_FLOW_SCALE = 0.1
OFFSET_RESIDUE_STD = 0.1

# Issue 8's targets on an H100 (and issue 18's DCN one).
TARGET_FPS = 150  # BasicVSR++ 180x320 inference, bf16, Triton
TARGET_INFER_SPEEDUP = 3.0  # ... over the reference path
TARGET_TRAIN_SPEEDUP = 2.0  # BasicVSR++ training iteration over the reference path
TARGET_MEMORY_RATIO = 0.25  # peak memory of the 100-frame clip, Triton / reference
TARGET_DCN_SPEEDUP = 5.0  # issue 18: DCN forward+backward at BasicVSR++'s layer over torchvision


def model_workloads(frames, frames_480p):
    """name -> workload (plain dicts). "infer": net(lqs) under inference_mode on a (1, frames, 3, h, w)
    clip; "train": one train.Trainer.train_step of the recipe on a batch of 1 x frames LR frames of
    h x w (GT 4h x 4w). net / cfg: constructor or recipe overrides (the dry run's tiny networks)."""
    return {
        "bvsrpp-180x320": dict(
            kind="infer",
            arch="basicvsrpp",
            frames=frames,
            size=(180, 320),
            net={},
            title=f"BasicVSR++ inference, {frames} frames 180x320 -> 720x1280",
        ),
        "bvsrpp-480p": dict(
            kind="infer",
            arch="basicvsrpp",
            frames=frames_480p,
            size=(480, 854),
            net={},
            title=f"BasicVSR++ inference, {frames_480p} frames 480x854 -> 1920x3416",
        ),
        "realbasicvsr-480p": dict(
            kind="infer",
            arch="realbasicvsr",
            frames=frames_480p,
            size=(480, 854),
            net={},
            title=f"RealBasicVSR inference, {frames_480p} frames 480x854 -> 1920x3416",
        ),
        "bvsrpp-train": dict(
            kind="train",
            recipe="basicvsrpp",
            frames=30,
            size=(64, 64),
            mirrored=False,
            cfg={},
            title="BasicVSR++ training iteration, REDS recipe: 30 frames 64x64, batch 1, "
            "Charbonnier, Adam, SPyNet trained",
        ),
        "realbasicvsr-gan": dict(
            kind="train",
            recipe="realbasicvsr",
            frames=30,
            size=(64, 64),
            mirrored=True,
            cfg={},
            title="RealBasicVSR GAN-stage iteration: 15 frames mirrored to 30, 64x64, batch 1; "
            "G (pixel + cleaning + perceptual + GAN) then D, EMA",
        ),
    }


WORKLOAD_NAMES = list(model_workloads(100, 30))

# --dry-run: every workload once, through the same functions, at these tiny sizes. BasicVSR++
# takes nothing below 64x64; two frames keep the interpreted DCN to four calls per run.
DRY_RUN = {
    "bvsrpp-180x320": dict(frames=2, size=(64, 64), net=dict(mid_channels=16, num_blocks=1)),
    "bvsrpp-480p": dict(frames=2, size=(64, 72), net=dict(mid_channels=16, num_blocks=1)),
    "realbasicvsr-480p": dict(
        frames=3,
        size=(16, 24),
        net=dict(mid_channels=16, num_propagation_blocks=1, num_cleaning_blocks=1),
    ),
    "bvsrpp-train": dict(frames=2, size=(64, 64), cfg=dict(mid_channels=16, num_blocks=1)),
    "realbasicvsr-gan": dict(
        frames=2,
        size=(8, 8),
        cfg=dict(mid_channels=16, num_blocks=1, num_cleaning_blocks=1, d_mid_channels=16),
    ),
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
    texture = (
        sum(
            F.interpolate(
                torch.rand(1, 3, hh // s + 3, ww // s + 3, generator=gen),
                size=(hh, ww),
                mode="bicubic",
                align_corners=False,
            )
            for s in (2, 8, 32)
        )
        / 3
    )
    clip = torch.stack([texture[0, :, y : y + h, x : x + w] for y, x in path.tolist()])
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


def build_network(arch, net_kwargs, weights_path=None):
    """BasicVSR++ or RealBasicVSR with a published checkpoint, or realistic random weights."""
    torch.manual_seed(0)
    net = (
        basicvsr.BasicVSRPlusPlus(**net_kwargs)
        if arch == "basicvsrpp"
        else realbasicvsr.RealBasicVSR(**net_kwargs)
    )
    return weights.load_weights(net, weights_path) if weights_path else realistic_init(net)


def build_trainer(recipe, cfg_overrides, amp, device):
    """train.Trainer for a train.RECIPES entry, as train.train() sets it up (random weights, random VGG
    for the perceptual loss), at the phase of most of the run: past SPyNet's initial freeze."""
    cfg = dict(train.RECIPES[recipe], **cfg_overrides)
    cfg["lr_period"] = cfg["max_iters"]  # train.resolve_config's default
    torch.manual_seed(0)
    g = realistic_init(train.build_generator(cfg)).to(device).train()
    ema = copy.deepcopy(g).requires_grad_(False) if cfg["ema_decay"] > 0 else None
    d = (
        realbasicvsr.UNetDiscriminatorSN(3, cfg["d_mid_channels"]).to(device).train()
        if cfg["gan_weight"] > 0
        else None
    )
    percep = realbasicvsr.PerceptualLoss().to(device) if cfg["perceptual_weight"] > 0 else None
    trainer = train.Trainer(cfg, g, ema, d, percep, device, False, amp)
    step = max(cfg["spynet_fix_iters"], 0)
    trainer.set_phase(step)
    trainer.set_lr(step)
    return trainer


# ----------------------------------------------------------------------------------------
# The three implementations of the ops.


def torchvision_deform_conv2d(
    x,
    offset,
    mask,
    weight,
    bias=None,
    stride=1,
    padding=0,
    dilation=1,
    deform_groups=1,
    backend=None,
):
    """kernels.deform_conv2d's signature on torchvision.ops.deform_conv2d (mmcv's layout; the deform
    groups follow from offset's channels). Under autocast torchvision casts to fp32 itself."""
    if not torch.is_autocast_enabled(x.device.type):  # it takes a single dtype
        offset, mask, weight = offset.to(x.dtype), mask.to(x.dtype), weight.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
    return tv_deform_conv2d(
        x, offset, weight, bias, _pair(stride), _pair(padding), _pair(dilation), mask=mask
    )


def torchvision_flow_guided_deform_conv2d(
    x,
    conv_offset,
    flows,
    weight,
    bias=None,
    max_residue_magnitude=10.0,
    stride=1,
    padding=0,
    dilation=1,
    deform_groups=1,
    backend=None,
):
    """kernels.flow_guided_deform_conv2d's signature: the PyTorch glue, then torchvision's DCN."""
    offset, mask = flow_guided_offsets(
        conv_offset, flows, max_residue_magnitude, deform_groups, weight.shape[2] * weight.shape[3]
    )
    return torchvision_deform_conv2d(
        x, offset, mask, weight, bias, stride, padding, dilation, deform_groups
    )


def grid_sample_flow_warp(x, flow, padding_mode="zeros", backend=None):
    """mmagic's flow_warp: plain F.grid_sample on the grid built from the flow, in fp32 positions."""
    n, _, h, w = x.shape
    grid_y, grid_x = torch.meshgrid(
        torch.arange(h, device=x.device, dtype=torch.float32),
        torch.arange(w, device=x.device, dtype=torch.float32),
        indexing="ij",
    )
    gx = 2.0 * (grid_x + flow[:, 0].float()) / max(w - 1, 1) - 1.0
    gy = 2.0 * (grid_y + flow[:, 1].float()) / max(h - 1, 1) - 1.0
    return F.grid_sample(
        x,
        torch.stack((gx, gy), dim=3),
        mode="bilinear",
        padding_mode=padding_mode,
        align_corners=True,
    )


@contextlib.contextmanager
def torchvision_ops():
    """BENCHMARK-ONLY PATCH, not a fallback of the library: while the block runs, the names the
    networks call, kernels.deform_conv2d, kernels.flow_guided_deform_conv2d (its PyTorch glue, then
    the DCN) and kernels.flow_warp, are torchvision's DCN and plain
    grid_sample, i.e. what users of mmagic-style code without mmcv run today. torchvision's DCN
    differs from mmcv's only in the gradient at exactly -1, which does not matter for timing."""
    if tv_deform_conv2d is None:
        raise RuntimeError("bench.py: the torchvision path needs torchvision")
    saved = kernels.deform_conv2d, kernels.flow_guided_deform_conv2d, kernels.flow_warp
    kernels.deform_conv2d, kernels.flow_guided_deform_conv2d, kernels.flow_warp = (
        torchvision_deform_conv2d,
        torchvision_flow_guided_deform_conv2d,
        grid_sample_flow_warp,
    )
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


def clip_psnr(a, b):
    """Mean over frames of metrics.psnr (the figure train.py's evaluation averages) of two clips
    (1, t, 3, H, W) in [0, 1], clamped and scaled to [0, 255] as saved images are."""
    return statistics.mean(
        metrics.psnr(255 * x.clamp(0, 1), 255 * y.clamp(0, 1)) for x, y in zip(a[0], b[0])
    )


def bench_inference(wl, paths, dtypes, reps, warmup, device, weights, notes, cells=None):
    """{(dtype, path): cell} of one inference workload, filled into `cells` as each cell finishes."""
    net = build_network(wl["arch"], wl["net"], weights).to(device).eval()
    lqs = moving_clip(wl["frames"], *wl["size"]).to(device)
    spynet = net.spynet if wl["arch"] == "basicvsrpp" else net.basicvsr.spynet
    if wl["frames"] > 1:
        with torch.inference_mode():
            flow = spynet(lqs[:, 1], lqs[:, 0])
        notes.append(
            f"{wl['name']}: SPyNet's mean |flow| between frames 0 and 1: {flow.abs().mean().item():.2f} px "
            f"(the clip pans about 2.2 px per frame)"
        )
        del flow

    if wl["arch"] != "basicvsrpp":  # only BasicVSR++ has the host cache
        paths = [p for p in paths if p != "triton + host cache"]
    compiled = basicvsr.compile_network(copy.deepcopy(net)) if "triton + compile" in paths else None
    nhwc = (
        copy.deepcopy(net).to(memory_format=torch.channels_last)
        if "triton + channels_last" in paths
        else None
    )

    def run(dtype, path):
        model = {"triton + compile": compiled, "triton + channels_last": nhwc}.get(path, net)

        def fn():
            if (
                wl["arch"] == "basicvsrpp"
            ):  # 100: mmagic's threshold, so a 100-frame clip stays on the GPU
                model.cpu_cache_length = 0 if path == "triton + host cache" else 100
            with (
                torch.inference_mode(),
                torch.autocast(device.type, dtype=dtype, enabled=dtype is not None),
            ):
                return model(lqs)

        return fn

    cells, fp32_out = {} if cells is None else cells, {}
    for path in paths:
        for name in dtypes:
            cell = run_cell(
                run(MODEL_DTYPES[name], path),
                reps,
                warmup,
                device,
                path,
                f"{wl['name']} {name} {path}",
            )
            if "out" in cell:
                out = cell.pop("out").float().cpu()  # the clip stays off the GPU between cells
                if not torch.isfinite(out).all():
                    notes.append(f"{wl['name']} {name} {path}: the output has inf/NaN")
                if name == "fp32":
                    fp32_out[path] = out
                elif path in fp32_out:
                    cell["psnr"] = clip_psnr(out, fp32_out[path])
                del out
            cells[(name, path)] = cell
    # A guard against timing a wrong network: the same weights and clip on every path.
    for path in paths[1:]:
        if "triton" in fp32_out and path in fp32_out:
            diff = (fp32_out["triton"] - fp32_out[path]).abs().max().item()
            notes.append(
                f"{wl['name']}: fp32 outputs, Triton vs {path}: max |diff| {diff:.1e}, "
                f"PSNR {clip_psnr(fp32_out['triton'], fp32_out[path]):.1f} dB"
            )
    return cells


def bench_training(wl, paths, dtypes, reps, warmup, device, notes, cells=None):
    """{(dtype, path): cell} of one training workload, filled into `cells` as each cell finishes."""
    batch = training_batch(wl["frames"], *wl["size"], wl["mirrored"])
    if device.type == "cuda":  # as train.py's loader delivers it
        batch = {k: v.pin_memory() for k, v in batch.items()}
    cells = {} if cells is None else cells
    for path in [p for p in paths if p not in INFERENCE_ONLY_PATHS]:
        for name in dtypes:
            trainer = build_trainer(
                wl["recipe"], wl["cfg"], "bf16" if name == "bf16" else "none", device
            )
            cell = run_cell(
                lambda: trainer.train_step(batch),
                reps,
                warmup,
                device,
                path,
                f"{wl['name']} {name} {path}",
            )
            if "out" in cell:
                losses, applied = cell.pop("out")
                if not applied or not all(math.isfinite(v) for v in losses.values()):
                    notes.append(
                        f"{wl['name']} {name} {path}: a non-finite loss, the update was skipped: {losses}"
                    )
            cells[(name, path)] = cell
            del trainer
            gc.collect()
    return cells


# ----------------------------------------------------------------------------------------
# Table and targets.

MODEL_HEADER = (
    "| workload | dtype | ops | time | frames/s | peak GPU memory | Triton speedup | "
    "Triton memory | PSNR(bf16, fp32) |"
)


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
                rows.append(
                    f"| {wl['title']} | {name} | {path} | "
                    + " | ".join([cell["status"]] * 6)
                    + " |"
                )
                continue
            s, peak = cell["seconds"], cell["peak"]
            per = s / wl["frames"] if wl["kind"] == "infer" else s
            cells_ = [
                f"{1e3 * per:.2f} {unit}",
                f"{wl['frames'] / s:.1f}",
                "n/a" if peak is None else f"{peak / 2**30:.2f} GiB",
            ]
            cells_.append(
                f"{s / tri['seconds']:.2f}x" if path != "triton" and "seconds" in tri else ""
            )
            cells_.append(
                f"{tri['peak'] / peak:.2f}x"
                if path != "triton" and tri.get("peak") and peak
                else ""
            )
            cells_.append(f"{cell['psnr']:.1f} dB" if "psnr" in cell else "")
            rows.append(f"| {wl['title']} | {name} | {path} | " + " | ".join(cells_) + " |")
    return rows


def _best_triton(cells, dtype, key):
    """(path, value) of the Triton variant with the lowest `key` ("seconds" or "peak") in `dtype`, or
    (None, None)."""
    found = [
        (c[key], path)
        for (d, path), c in cells.items()
        if d == dtype and path.startswith("triton") and c.get(key) is not None
    ]
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
    psnrs = [
        f"{k} {results[k][('bf16', 'triton')]['psnr']:.1f} dB"
        for k in results
        if "psnr" in results[k].get(("bf16", "triton"), {})
    ]
    clip = "" if frames in (None, 100) else f" (measured on {frames} frames; the target is for 100)"
    return [
        f"- BasicVSR++ 180x320 inference, bf16, Triton: >= {TARGET_FPS} frames/s: "
        f"{fmt(fps, '{:.1f} frames/s')}{verdict(None if fps is None else fps >= TARGET_FPS)}{named(fast_path)}{clip}",
        f"- the same, speedup over the reference path in bf16: >= {TARGET_INFER_SPEEDUP:g}x: {fmt(up)}"
        f"{verdict(None if up is None else up >= TARGET_INFER_SPEEDUP)} (over the reference in fp32: {fmt(up_fp32)})",
        f"- BasicVSR++ training iteration, speedup over the reference path: >= {TARGET_TRAIN_SPEEDUP:g}x: "
        + ", ".join(
            f"{d} {fmt(v)}{verdict(None if v is None else v >= TARGET_TRAIN_SPEEDUP)}{named(p)}"
            for d, (p, v) in tr.items()
        ),
        f"- peak memory of the 180x320 clip, Triton / reference: <= {TARGET_MEMORY_RATIO:g}: "
        + ", ".join(
            f"{d} {fmt(v)}{verdict(None if v is None else v <= TARGET_MEMORY_RATIO)}{named(p)}"
            for d, (p, v) in mem.items()
        )
        + f"; Triton bf16 / reference fp32 {fmt(mem_mixed)}{clip}",
        "- PSNR(bf16 output, fp32 output), Triton: "
        + (", ".join(psnrs) if psnrs else "not measured"),
    ]


def selected_workloads(names, frames=None, frames_480p=None, quick=False, dry_run=False):
    """The workloads `names`, in order, with the clip lengths (and, for a dry run, the tiny sizes) resolved."""
    workloads = model_workloads(
        frames or (20 if quick else 100), frames_480p or (10 if quick else 30)
    )
    selected = {}
    for key in names:
        wl = dict(workloads[key], name=key)
        if dry_run:
            wl.update(DRY_RUN[key])
            wl["title"] = f"[dry run] {key}, {wl['frames']} frames {wl['size'][0]}x{wl['size'][1]}"
        selected[key] = wl
    return selected


def run_workload(
    wl, paths, dtypes, device, weights, notes, reps=None, quick=False, dry_run=False, cells=None
):
    """The cells of one workload (filled into `cells` as they finish): one run without warm-up in a
    dry run, else --reps (default inference 3, training 10; --quick 2 and 3) after a warm-up."""
    cells = {} if cells is None else cells
    if wl["kind"] == "infer":
        reps, warmup = (1, 0) if dry_run else (reps or (2 if quick else 3), 1)
        bench_inference(
            wl, paths, dtypes, reps, warmup, device, weights.get(wl["arch"]), notes, cells
        )
    else:
        reps, warmup = (1, 0) if dry_run else (reps or (3 if quick else 10), 3)
        bench_training(wl, paths, dtypes, reps, warmup, device, notes, cells)
    notes += [c["note"] for c in cells.values() if "note" in c]
    return cells


def model_table(workloads, results, paths, dtypes):
    rows = [MODEL_HEADER, "|" + "---|" * (MODEL_HEADER.count("|") - 1)]
    for key, wl in workloads.items():
        rows += model_rows(wl, results.get(key, {}), paths, dtypes)
    return "\n".join(rows)


def random_weights_note(weights):
    return (
        "random weights: the networks' residual over the bilinear x4 skip is small, so PSNR(bf16, fp32) is "
        "optimistic; pass --basicvsrpp-weights / --realbasicvsr-weights for the figure of the published models"
        if not all(weights.values())
        else None
    )


def bench_models(args, device):
    workloads = selected_workloads(
        args.workloads, args.frames, args.frames_480p, args.quick, args.dry_run
    )
    paths = [p for p in MODEL_PATHS if p != "torchvision" or tv_deform_conv2d is not None]
    dtypes = list(args.dtype)
    weights = {"basicvsrpp": args.basicvsrpp_weights, "realbasicvsr": args.realbasicvsr_weights}
    notes = (
        [] if tv_deform_conv2d is not None else [f"torchvision {TORCHVISION}: no torchvision rows"]
    )
    notes += [n for n in [random_weights_note(weights)] if n]
    print(
        "time: median of --reps runs after a warm-up, wall clock between torch.cuda.synchronize() calls around "
        "a whole clip or iteration; frames/s counts LR frames (training: forward + backward + step)"
    )
    print(
        "peak GPU memory: torch.cuda.max_memory_allocated() after a reset; weights, clip and output included"
    )
    print(
        "Triton speedup = that row's time / Triton's time, Triton memory = Triton's peak / that row's peak "
        "(same workload and dtype)"
    )
    print(
        "weights: random (flows and offsets scaled to trained sizes: realistic_init) unless --basicvsrpp-weights / "
        "--realbasicvsr-weights; clips: a smooth texture panning ~2 px per frame"
    )
    results = {}
    for key, wl in workloads.items():
        results[key] = run_workload(
            wl, paths, dtypes, device, weights, notes, args.reps, args.quick, args.dry_run
        )
        # Each workload's rows as soon as they exist, so that a run cut short still shows them.
        print(model_table({key: wl}, results, paths, dtypes) + "\n", flush=True)
    print(
        "All workloads"
        + (
            " (DRY RUN: tiny networks on tiny clips; the numbers are not measurements)"
            if args.dry_run
            else ""
        )
        + ":"
    )
    print(model_table(workloads, results, paths, dtypes))
    print("\nNotes:\n" + "\n".join(f"- {n}" for n in notes))
    frames = workloads.get("bvsrpp-180x320", {}).get("frames")
    print(
        "\nTargets (issue 8, on an H100)"
        + (" (DRY RUN: meaningless)" if args.dry_run else "")
        + ":\n"
        + "\n".join(target_lines(results, frames))
    )


# ========================================================================================
# --report OUT_DIR: issue 18's GPU report in one command, within --budget seconds.

REPORT_SHARES = {
    "tests": 0.3,
    "ops": 0.2,
    "models": 0.5,
}  # of the budget; what a part leaves goes on
REPORT_WORKLOADS = ("bvsrpp-180x320", "bvsrpp-train", "realbasicvsr-480p")
# The host cache is the Triton variant the memory target needs; compile would spend the budget compiling.
REPORT_PATHS = ("triton", "triton + host cache", "torch reference", "torchvision")
REPORT_MARGIN = 5.0  # seconds kept for writing the files
REPORT_OP_REPS = 20
TESTS_COMMAND = ["-m", "pytest", "-x", "-q", "-k", "cuda", "tests"]


class OutOfTime(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds, what):
    """Raises OutOfTime in the block after `seconds` (SIGALRM, main thread only). Python code stops
    between bytecodes; a kernel launch or a synchronisation first returns."""
    if seconds <= 0:
        raise OutOfTime(f"{what}: no time left in the budget")

    def alarm(signum, frame):
        raise OutOfTime(f"{what}: its share of the budget ({seconds:.0f} s) ran out")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def report_tests(seconds, device):
    """The CUDA tests of every file, in a subprocess (its own session, killed whole at the timeout)."""
    part = dict(command="python " + " ".join(TESTS_COMMAND))
    if device.type != "cuda":
        return dict(
            part, status="skipped", reason="no CUDA device: every CUDA test would only be skipped"
        )
    if seconds <= 0:
        return dict(part, status="skipped", reason="no time left in the budget")
    proc = subprocess.Popen(
        [sys.executable, *TESTS_COMMAND],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return dict(
            part,
            status="skipped",
            tail=out[-3000:],
            reason=f"out of time: stopped when its share of the budget ({seconds:.0f} s) ran out",
        )
    lines = out.strip().splitlines()
    status = {0: "passed", 5: "no tests collected"}.get(proc.returncode, "failed")
    return dict(
        part,
        status=status,
        returncode=proc.returncode,
        summary=lines[-1] if lines else "",
        tail=out[-3000:],
    )


def report_ops(seconds, device, dry_run):
    """kernels.bench at batch 1, fp32 and bf16, every op; the entries finished in time."""
    size, reps, warmup = (
        (op_bench.DRY_RUN_SIZE, 1, 0) if dry_run else (op_bench.SIZE, REPORT_OP_REPS, 3)
    )
    part = dict(status="done", size=size, reps=reps, batch=1, results=[])
    try:
        with time_limit(seconds, "ops"):
            op_bench.bench_ops(
                [1],
                list(op_bench.DTYPES),
                op_bench.OPS,
                reps,
                device,
                size,
                warmup,
                part["results"],
            )
    except OutOfTime as e:
        part.update(status="partial" if part["results"] else "skipped", reason=str(e))
    done = {(r["op"], r["dtype"]) for r in part["results"]}
    part["skipped"] = [
        f"{op} {d}" for d in op_bench.DTYPES for op in op_bench.OPS if (op, d) not in done
    ]
    return part


def expected_paths(wl, paths):
    """The paths bench_inference / bench_training run for the workload."""
    if wl["kind"] == "train":
        return [p for p in paths if p not in INFERENCE_ONLY_PATHS]
    return [p for p in paths if p != "triton + host cache" or wl["arch"] == "basicvsrpp"]


def report_models(seconds, device, dry_run, weights):
    workloads = selected_workloads(REPORT_WORKLOADS, dry_run=dry_run)
    paths = [p for p in REPORT_PATHS if p != "torchvision" or tv_deform_conv2d is not None]
    notes = (
        [] if tv_deform_conv2d is not None else [f"torchvision {TORCHVISION}: no torchvision rows"]
    )
    notes += [n for n in [random_weights_note(weights)] if n]
    part = dict(status="done", workloads=workloads, paths=paths, results={}, notes=notes)
    try:
        with time_limit(seconds, "models"):
            for key, wl in workloads.items():
                part["results"][key] = {}
                run_workload(
                    wl,
                    paths,
                    list(MODEL_DTYPES),
                    device,
                    weights,
                    notes,
                    quick=True,
                    dry_run=dry_run,
                    cells=part["results"][key],
                )
    except OutOfTime as e:
        part.update(status="partial" if any(part["results"].values()) else "skipped", reason=str(e))
    for key, wl in workloads.items():  # what did not run, shown as such
        cells = part["results"].setdefault(key, {})
        for path in expected_paths(wl, paths):
            for name in MODEL_DTYPES:
                cells.setdefault((name, path), dict(status="skipped"))
    return part


def report_targets(ops, models, dry_run):
    """[dict(target, required, measured, met)] of issue 18; met None where not measured."""
    R = "torch reference"
    rows = []

    def add(target, required, value, ok, spec="{:.2f}x", path=None):
        measured = "not measured" if value is None else spec.format(value)
        if path not in (None, "triton"):
            measured += f" [{path}]"
        rows.append(
            dict(
                target=target,
                required=required,
                measured=measured,
                value=value,
                met=None if value is None or dry_run else bool(ok(value)),
            )
        )

    def ratio(x, y):
        return None if x is None or y is None else x / y

    results = models.get("results", {})
    c = results.get("bvsrpp-180x320", {})
    wl = models.get("workloads", {}).get("bvsrpp-180x320", dict(frames=100, size=(180, 320)))
    frames, (h, w) = wl["frames"], wl["size"]
    path, fast = _best_triton(c, "bf16", "seconds")
    add(
        f"BasicVSR++ {frames} frames {h}x{w} x4, bf16, Triton: frames/s",
        f">= {TARGET_FPS}",
        ratio(frames, fast),
        lambda v: v >= TARGET_FPS,
        "{:.1f} frames/s",
        path,
    )
    add(
        "the same, speedup over the reference ops (bf16)",
        f">= {TARGET_INFER_SPEEDUP:g}x",
        ratio(c.get(("bf16", R), {}).get("seconds"), fast),
        lambda v: v >= TARGET_INFER_SPEEDUP,
        path=path,
    )
    dcn = {r["dtype"]: r["times"] for r in ops.get("results", []) if r["op"] == "dcn"}
    for name in op_bench.DTYPES:
        times = dcn.get(name, {})
        tv, tri = times.get("torchvision"), times.get("triton")
        add(
            f"DCN forward+backward at BasicVSR++'s layer, {name}, batch 1: speedup over torchvision",
            f">= {TARGET_DCN_SPEEDUP:g}x",
            ratio(tv and tv[1], tri and tri[1]),
            lambda v: v >= TARGET_DCN_SPEEDUP,
        )
    for name in MODEL_DTYPES:
        t = results.get("bvsrpp-train", {})
        path, tri = _best_triton(t, name, "seconds")
        add(
            f"BasicVSR++ training iteration (REDS recipe), {name}: speedup over the reference ops",
            f">= {TARGET_TRAIN_SPEEDUP:g}x",
            ratio(t.get((name, R), {}).get("seconds"), tri),
            lambda v: v >= TARGET_TRAIN_SPEEDUP,
            path=path,
        )
    for name in MODEL_DTYPES:
        path, peak = _best_triton(c, name, "peak")
        add(
            f"BasicVSR++ {frames}-frame clip, {name}: peak GPU memory, Triton / reference ops",
            f"<= {TARGET_MEMORY_RATIO:g}",
            ratio(peak, c.get((name, R), {}).get("peak")),
            lambda v: v <= TARGET_MEMORY_RATIO,
            "{:.3f}",
            path,
        )
    return rows


def _finite(v):
    """JSON without NaN/Infinity: non-finite floats as strings."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def report_json(report):
    """The report with the model cells as a list (JSON has no tuple keys)."""
    parts = dict(report["parts"])
    if "models" in parts:
        m = parts["models"]
        cells = [
            dict(workload=k, dtype=d, path=p, **cell)
            for k, cs in m.get("results", {}).items()
            for (d, p), cell in cs.items()
        ]
        parts["models"] = dict(
            {k: v for k, v in m.items() if k not in ("results", "workloads")},
            cells=cells,
            workloads={k: wl["title"] for k, wl in m.get("workloads", {}).items()},
        )
    return json.dumps(_finite(dict(report, parts=parts)), indent=1)


def _verdict(met, dry_run=False):
    return "n/a (dry run)" if dry_run else {True: "yes", False: "**no**", None: "not measured"}[met]


def report_markdown(report):
    dry = report["dry_run"]
    parts = report["parts"]
    lines = [
        "# GPU report (issue 18)"
        + (": DRY RUN, tiny sizes on the CPU, not measurements" if dry else ""),
        "",
        f"- device: {report['device']}",
        f"- command: `{report['command']}`",
        f"- torch {report['torch']}, triton {report['triton']}, torchvision {report['torchvision']}",
        f"- started {report['started']}, budget {report['budget_s']:g} s, elapsed {report['elapsed_s']:.0f} s",
        "",
        "## Targets",
        "",
        "| target | required | measured | met |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {t['target']} | {t['required']} | {t['measured']} | {_verdict(t['met'], dry)} |"
        for t in report["targets"]
    ]
    lines += ["", "## CUDA tests", ""]
    tests = parts.get("tests")
    if tests:
        lines.append(
            f"`{tests['command']}`: {tests['status']}"
            + (f" ({tests['reason']})" if "reason" in tests else "")
            + (f": {tests['summary']}" if tests.get("summary") else "")
        )
        if tests.get("tail"):
            lines += ["", "```", tests["tail"].rstrip()[-1500:], "```"]
    lines += ["", "## Ops at BasicVSR++'s shapes (kernels.bench, batch 1)", ""]
    ops = parts.get("ops")
    if ops:
        lines.append(
            f"status: {ops['status']}"
            + (f" ({ops['reason']})" if "reason" in ops else "")
            + f"; sizes {ops['size']}; median of {ops['reps']} calls"
        )
        if ops["results"]:
            lines += [
                "",
                op_bench.table(ops["results"], 3.35e12),
                "",
                "% floor at 3.35 TB/s (H100 SXM); Triton speedup = that row's time / Triton's time",
            ]
        if ops["skipped"]:
            lines.append(f"skipped (out of time): {', '.join(ops['skipped'])}")
    lines += ["", "## Models", ""]
    models = parts.get("models")
    if models:
        lines.append(
            f"status: {models['status']}" + (f" ({models['reason']})" if "reason" in models else "")
        )
        lines += [
            "",
            model_table(
                models["workloads"], models["results"], models["paths"], list(MODEL_DTYPES)
            ),
            "",
            "time: median of 2 clips (inference) or 3 iterations (training) after warm-up, wall clock between "
            "synchronisations; peak GPU memory: torch.cuda.max_memory_allocated(); PSNR(bf16, fp32): mean over "
            "frames of metrics.psnr",
        ]
        lines += ["", "Notes:"] + [f"- {n}" for n in models["notes"]]
    return "\n".join(lines) + "\n"


def run_report(
    out_dir, budget, device, dry_run=False, weights=None, command="python bench.py --report"
):
    """Runs the parts within `budget` seconds and writes out_dir/report.md and report.json after each."""
    start = time.monotonic()
    deadline = start + budget - REPORT_MARGIN
    weights = weights or {"basicvsrpp": None, "realbasicvsr": None}
    report = dict(
        command=command,
        dry_run=dry_run,
        budget_s=budget,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)",
        torch=torch.__version__,
        triton=triton.__version__,
        torchvision=TORCHVISION,
        started=datetime.datetime.now().isoformat(timespec="seconds"),
        parts={},
    )
    left = sum(REPORT_SHARES.values())
    for name, share in REPORT_SHARES.items():
        seconds = (deadline - time.monotonic()) * share / left  # this share of what is left
        left -= share
        print(f"report: {name}, up to {max(seconds, 0):.0f} s", file=sys.stderr, flush=True)
        try:
            if name == "tests":
                part = report_tests(seconds, device)
            elif name == "ops":
                part = report_ops(seconds, device, dry_run)
            else:
                part = report_models(seconds, device, dry_run, weights)
        except Exception as e:  # a bug in one part still leaves the others' report
            part = dict(
                status="failed",
                reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
            )
            import traceback

            traceback.print_exc()
        report["parts"][name] = part
        report["targets"] = report_targets(
            report["parts"].get("ops", {}), report["parts"].get("models", {}), dry_run
        )
        report["elapsed_s"] = time.monotonic() - start
        for name, text in (
            ("report.json", report_json(report)),
            ("report.md", report_markdown(report)),
        ):
            with (
                atomic_path(os.path.join(out_dir, name)) as tmp,
                open(tmp, "w") as f,
            ):  # readers: old or new
                f.write(text)
    return report


# ========================================================================================
# Command line.


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python bench.py",
        description="Whole-model benchmark of the Triton "
        "kernels (BasicVSR++, RealBasicVSR, training iterations) vs the reference ops; "
        "--report: issue 18's GPU report. The ops alone: python -m kernels.bench.",
    )
    parser.error = lambda message: parser.exit(2, f"error: {message}\n")  # one line, no usage
    group = parser.add_argument_group("what to run")
    group.add_argument(
        "--models",
        action="store_true",
        help="the model workloads (the default; kept for old commands)",
    )
    group.add_argument("--dtype", nargs="+", choices=list(MODEL_DTYPES), default=list(MODEL_DTYPES))
    group.add_argument(
        "--workloads",
        nargs="+",
        choices=WORKLOAD_NAMES,
        default=WORKLOAD_NAMES,
        help="which workloads (default all)",
    )
    group.add_argument(
        "--frames", type=int, help="frames of the 180x320 clip (default 100; --quick 20)"
    )
    group.add_argument(
        "--frames-480p", type=int, help="frames of the 480x854 clip (default 30; --quick 10)"
    )
    group.add_argument(
        "--dry-run",
        action="store_true",
        help="every workload once at tiny sizes, on the CPU "
        "without a GPU (needs TRITON_INTERPRET=1 there); no real timings",
    )
    group = parser.add_argument_group("report (issue 18)")
    group.add_argument(
        "--report",
        metavar="OUT_DIR",
        help="the tests, the ops and the models within --budget; "
        "writes OUT_DIR/report.md and OUT_DIR/report.json",
    )
    group.add_argument("--budget", type=float, help="seconds the report may take (default 420)")
    group = parser.add_argument_group("measurement")
    group.add_argument(
        "--reps",
        type=int,
        help="timed runs per cell, the median is reported (default: inference 3, training 10)",
    )
    group.add_argument(
        "--quick", action="store_true", help="fewer runs and shorter clips, for a first look"
    )
    group = parser.add_argument_group("weights (default random)")
    group.add_argument(
        "--basicvsrpp-weights",
        help="a BasicVSR++ checkpoint, any layout weights.load_weights reads",
    )
    group.add_argument("--realbasicvsr-weights", help="a RealBasicVSR checkpoint")
    args = parser.parse_args(argv)
    for flag in ("reps", "frames", "frames_480p"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    for flag in ("basicvsrpp_weights", "realbasicvsr_weights"):
        if getattr(args, flag) is not None and not os.path.isfile(getattr(args, flag)):
            parser.error(f"--{flag.replace('_', '-')}: no such file: {getattr(args, flag)}")
    if args.budget is not None and args.report is None:
        parser.error("--budget goes with --report")
    if args.report is not None:
        if args.budget is None:
            args.budget = 420.0
        if not math.isfinite(args.budget) or args.budget <= 0:
            parser.error(f"--budget must be a positive number of seconds, got {args.budget:g}")
        if os.path.exists(args.report) and not os.path.isdir(args.report):
            parser.error(f"--report: {args.report} exists and is not a folder")
    try:
        device = op_bench.device_for(args.dry_run)
    except ValueError as e:
        parser.exit(1, f"error: {e}\n")
    if args.report is not None:
        try:
            os.makedirs(args.report, exist_ok=True)
        except OSError as e:
            parser.error(f"--report: cannot create {args.report}: {e.strerror}")
        if not os.access(args.report, os.W_OK):
            parser.error(f"--report: {args.report} is not writable")

    command = f"python bench.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip()
    torch.manual_seed(0)
    print(
        f"{'GPU: ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else 'device: CPU (dry run)'}; "
        f"torch {torch.__version__}; triton {triton.__version__}; torchvision {TORCHVISION}"
    )
    print(f"command: {command}")
    print(
        f"fp32 settings: torch.backends.cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
        f"matmul precision {torch.get_float32_matmul_precision()!r}, cudnn.benchmark={torch.backends.cudnn.benchmark}"
    )
    weights = {"basicvsrpp": args.basicvsrpp_weights, "realbasicvsr": args.realbasicvsr_weights}
    if args.report is not None:
        report = run_report(args.report, args.budget, device, args.dry_run, weights, command)
        print(
            f"wrote {os.path.join(args.report, 'report.md')} and report.json in {report['elapsed_s']:.0f} s:"
        )
        for t in report["targets"]:
            print(
                f"- {t['target']}: {t['measured']} (target {t['required']}): {_verdict(t['met'], args.dry_run)}"
            )
        return
    if args.dry_run:
        print(
            "DRY RUN: tiny networks on tiny clips, one run each; the numbers below are not measurements"
        )
    bench_models(args, device)


if __name__ == "__main__":
    main()
