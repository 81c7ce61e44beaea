"""Whole-model benchmark of the Triton kernels (needs a CUDA GPU).

    python bench.py                                  # the five model workloads
    python bench.py --workloads bvsrpp-train         # a subset
    TRITON_INTERPRET=1 python bench.py --dry-run     # CPU: the code path at tiny sizes
    python bench.py --report OUT_DIR --budget 420    # the GPU report (report.py)
    python bench.py --cpu                            # the CPU benchmark (cpu_bench.py)

The ops alone, at BasicVSR++'s shapes: python -m kernels.bench.

Workloads (--workloads picks a subset, --frames / --frames-480p set the clip lengths, --reps the
timed runs, --quick a short clip and fewer runs):
- bvsrpp-180x320     BasicVSR++ inference on a 100-frame 180x320 clip (a REDS clip), x4 to
                     720x1280;
- bvsrpp-480p        BasicVSR++ inference on 30 frames of 480x854, x4 to 1920x3416;
- realbasicvsr-480p  RealBasicVSR inference, the same clip;
- bvsrpp-train       one training iteration of train.py's REDS recipe ("basicvsrpp"): 30 frames
                     of 64x64 (GT 256x256), batch 1, Charbonnier, Adam; forward + backward + step;
- realbasicvsr-gan   one iteration of train.py's GAN stage ("realbasicvsr"): 15 frames mirrored
                     to 30, 64x64, batch 1; generator step (pixel + cleaning + perceptual (random
                     VGG) + GAN), discriminator step, EMA.
Each in fp32 and in bf16 (torch.autocast), and on three implementations of the two ops inside
the same networks:
  triton           kernels.use_backend("triton");
  torch reference  kernels.use_backend("torch"): the PyTorch references, mmagic's semantics;
  torchvision      torchvision.ops.deform_conv2d and plain grid_sample, patched in for the
                   benchmark only (kernels.bench.torchvision_ops), where torchvision is installed.
Inference also runs three variants of the Triton path (INFERENCE_ONLY_PATHS): "triton + host
cache" (BasicVSR++ only, features in pinned host memory), "triton + compile" (compile_network) and
"triton + channels_last" (the network in NHWC). The targets (report.py) take the best Triton row.
Time per frame (inference) or per iteration: the median over --reps runs, after a warm-up, of
the wall clock between torch.cuda.synchronize() calls around a whole clip or iteration. Peak
memory: torch.cuda.max_memory_allocated() over the cell's runs, reset before each cell. A cell
that runs out of memory shows OOM. Inference also reports PSNR(bf16 output, fp32 output), the
mean over frames of metrics.psnr. Weights are random (timings do not depend on them, except
through where the samplers read: see realistic_init) unless --basicvsrpp-weights /
--realbasicvsr-weights name checkpoints.

--report OUT_DIR runs the CUDA tests, the ops and some of these workloads within --budget
seconds and writes OUT_DIR/report.md and OUT_DIR/report.json: see report.py.
"""

import argparse
import copy
import functools
import gc
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import basicvsr
import kernels
import metrics
import realbasicvsr
import train  # the training workloads run train.py's own Trainer
import weights
from kernels import bench as op_bench
from kernels.bench import TORCHVISION, moving_clip, torchvision_ops, tv_deform_conv2d

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
# memory (HostFrames, cpu_cache_length = 0), the network after basicvsr.compile_network, and the
# network in channels-last memory format (NHWC convolutions; the clip stays as it is).
INFERENCE_ONLY_PATHS = ("triton + host cache", "triton + compile", "triton + channels_last")
MODEL_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def model_workloads(frames, frames_480p):
    """name -> workload (plain dicts). "infer": net(lqs) under inference_mode on a
    (1, frames, 3, h, w) clip; "train": one train.Trainer.train_step of the recipe on a batch of
    1 x frames LR frames of h x w (GT 4h x 4w). net / cfg: constructor or recipe overrides (the dry
    run's tiny networks)."""
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
def build_network(arch, net_kwargs, weights_path=None):
    """BasicVSR++ or RealBasicVSR with a published checkpoint, or realistic random weights."""
    torch.manual_seed(0)
    net = (
        basicvsr.BasicVSRPlusPlus(**net_kwargs)
        if arch == "basicvsrpp"
        else realbasicvsr.RealBasicVSR(**net_kwargs)
    )
    return weights.load_weights(net, weights_path) if weights_path else weights.realistic_init(net)


def build_trainer(recipe, cfg_overrides, amp, device):
    """train.Trainer for a train.RECIPES entry, as train.train() sets it up (random weights, random
    VGG for the perceptual loss), at the phase of most of the run: past SPyNet's initial freeze."""
    cfg = dict(train.RECIPES[recipe], **cfg_overrides)
    cfg["lr_period"] = cfg["max_iters"]  # train.resolve_config's default
    torch.manual_seed(0)
    g = weights.realistic_init(train.build_generator(cfg)).to(device).train()
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
# The three implementations of the ops, and the paths each workload runs.


def ops_path(path):
    """Context in which the networks run on `path` (one of MODEL_PATHS)."""
    if path == "torchvision":
        return torchvision_ops()
    return kernels.use_backend("triton" if path.startswith("triton") else "torch")


def runnable_paths(paths):
    """`paths` without "torchvision" where torchvision is missing."""
    return [p for p in paths if p != "torchvision" or tv_deform_conv2d is not None]


def workload_paths(wl, paths):
    """The paths of `paths` that the workload runs: training has no inference-only variant, and
    only BasicVSR++ has the host cache."""
    if wl["kind"] == "train":
        return [p for p in paths if p not in INFERENCE_ONLY_PATHS]
    return [p for p in paths if p != "triton + host cache" or wl["arch"] == "basicvsrpp"]


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
    times = []
    out = None
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
    """{(dtype, path): cell} of one inference workload, filled into `cells` as each cell
    finishes."""
    net = build_network(wl["arch"], wl["net"], weights).to(device).eval()
    lqs = moving_clip(wl["frames"], *wl["size"]).to(device)
    spynet = net.spynet if wl["arch"] == "basicvsrpp" else net.basicvsr.spynet
    if wl["frames"] > 1:
        with torch.inference_mode():
            flow = spynet(lqs[:, 1], lqs[:, 0])
        notes.append(
            f"{wl['name']}: SPyNet's mean |flow| between frames 0 and 1: "
            f"{flow.abs().mean().item():.2f} px (the clip pans about 2.2 px per frame)"
        )
        del flow

    paths = workload_paths(wl, paths)
    compiled = basicvsr.compile_network(copy.deepcopy(net)) if "triton + compile" in paths else None
    nhwc = (
        copy.deepcopy(net).to(memory_format=torch.channels_last)
        if "triton + channels_last" in paths
        else None
    )

    def run(dtype, path):
        model = {"triton + compile": compiled, "triton + channels_last": nhwc}.get(path, net)

        def fn():
            # 100: mmagic's threshold, so a 100-frame clip stays on the GPU.
            if wl["arch"] == "basicvsrpp":
                model.cpu_cache_length = 0 if path == "triton + host cache" else 100
            with (
                torch.inference_mode(),
                torch.autocast(device.type, dtype=dtype, enabled=dtype is not None),
            ):
                return model(lqs)

        return fn

    cells = {} if cells is None else cells
    fp32_out = {}
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
    for path in workload_paths(wl, paths):
        for name in dtypes:
            trainer = build_trainer(
                wl["recipe"], wl["cfg"], "bf16" if name == "bf16" else "none", device
            )
            cell = run_cell(
                functools.partial(trainer.train_step, batch),
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
                        f"{wl['name']} {name} {path}: a non-finite loss, "
                        f"the update was skipped: {losses}"
                    )
            cells[(name, path)] = cell
            del trainer
            gc.collect()
    return cells


# ----------------------------------------------------------------------------------------
# The table, and running the workloads.

MODEL_HEADER = (
    "| workload | dtype | ops | time | frames/s | peak GPU memory | Triton speedup | "
    "Triton memory | PSNR(bf16, fp32) |"
)


def model_rows(wl, cells, paths, dtypes):
    """One row per (dtype, path). Triton speedup = that row's time / Triton's time in the same
    dtype; Triton memory = Triton's peak / that row's peak."""
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


def selected_workloads(names, frames=None, frames_480p=None, quick=False, dry_run=False):
    """The workloads `names`, in order, with the clip lengths (and, for a dry run, the tiny sizes)
    resolved."""
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


def opening_notes(weights):
    """The notes a run starts with: torchvision missing, random weights."""
    notes = []
    if tv_deform_conv2d is None:
        notes.append(f"torchvision {TORCHVISION}: no torchvision rows")
    if not all(weights.values()):
        notes.append(
            "random weights: the networks' residual over the bilinear x4 skip is small, so "
            "PSNR(bf16, fp32) is optimistic; pass --basicvsrpp-weights / --realbasicvsr-weights "
            "for the figure of the published models"
        )
    return notes


def bench_models(args, device):
    """The selected workloads, each one's table as it finishes, then all of them and the notes.
    Returns (workloads, results)."""
    workloads = selected_workloads(
        args.workloads, args.frames, args.frames_480p, args.quick, args.dry_run
    )
    paths = runnable_paths(MODEL_PATHS)
    dtypes = list(args.dtype)
    weights = {"basicvsrpp": args.basicvsrpp_weights, "realbasicvsr": args.realbasicvsr_weights}
    notes = opening_notes(weights)
    print(
        "time: median of --reps runs after a warm-up, wall clock between "
        "torch.cuda.synchronize() calls around a whole clip or iteration; frames/s counts LR "
        "frames (training: forward + backward + step)"
    )
    print(
        "peak GPU memory: torch.cuda.max_memory_allocated() after a reset; weights, clip and "
        "output included"
    )
    print(
        "Triton speedup = that row's time / Triton's time, Triton memory = Triton's peak / that "
        "row's peak (same workload and dtype)"
    )
    print(
        "weights: random (flows and offsets scaled to trained sizes: realistic_init) unless "
        "--basicvsrpp-weights / --realbasicvsr-weights; clips: a smooth texture panning ~2 px "
        "per frame"
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
    return workloads, results


# ========================================================================================
# Command line.


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--cpu"]:  # the CPU benchmark has flags of its own
        import cpu_bench

        return cpu_bench.main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python bench.py",
        description="Whole-model benchmark of the Triton "
        "kernels (BasicVSR++, RealBasicVSR, training iterations) vs the reference ops; "
        "--report: the GPU report (report.py); --cpu [FLAGS]: the CPU benchmark (cpu_bench.py, "
        "python bench.py --cpu --help). The ops alone: python -m kernels.bench.",
    )
    parser.error = lambda message: parser.exit(2, f"error: {message}\n")  # one line, no usage
    group = parser.add_argument_group("what to run")
    group.add_argument(
        "--models",
        action="store_true",
        help="the model workloads (what runs without --report)",
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
    group = parser.add_argument_group("the GPU report")
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

    # report.py runs this file's workloads and imports it at its top, so it is imported here.
    import report

    command = f"python bench.py {' '.join(argv)}".rstrip()
    torch.manual_seed(0)
    print(op_bench.environment(device))
    print(f"command: {command}")
    print(
        f"fp32 settings: torch.backends.cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
        f"matmul precision {torch.get_float32_matmul_precision()!r}, "
        f"cudnn.benchmark={torch.backends.cudnn.benchmark}"
    )
    weights = {"basicvsrpp": args.basicvsrpp_weights, "realbasicvsr": args.realbasicvsr_weights}
    if args.report is not None:
        report.write_report(args.report, args.budget, device, args.dry_run, weights, command)
        return
    if args.dry_run:
        print(
            "DRY RUN: tiny networks on tiny clips, one run each; "
            "the numbers below are not measurements"
        )
    workloads, results = bench_models(args, device)
    frames = workloads.get("bvsrpp-180x320", {}).get("frames")
    print(
        "\nTargets (on an H100)"
        + (" (DRY RUN: meaningless)" if args.dry_run else "")
        + ":\n"
        + "\n".join(report.target_lines(results, frames))
    )


if __name__ == "__main__":
    main()
