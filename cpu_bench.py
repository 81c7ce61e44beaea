"""CPU benchmark of the whole networks: BasicVSR++ (c64, 7 blocks) and RealBasicVSR (default
arguments), fp32, random weights, on a clip of --frames frames at each --sizes, one thread per
core. Run as `python bench.py --cpu` (flags below) or `python cpu_bench.py`.

Paths, run interleaved (every path once per repetition, in turn) on the same clip:
  reference      kernels.use_backend("torch"): the PyTorch references of both ops
  default        kernels' default backend (on CPU tensors, the DCN's CPU path), NCHW
  channels-last  the default with the network in channels-last memory format (so are then its
                 feature maps): what upscale.py runs on the CPU
  onnxruntime    the network exported by export.export_onnx, run by export.OnnxNetwork
                 (the export time is printed)
  torchvision    torchvision.ops.deform_conv2d and plain grid_sample in place of kernels' ops
                 (kernels.bench.torchvision_ops), where torchvision imports
Two more, run only when named in --paths, and left out of the "fastest" line:
  bf16           channels-last under torch.autocast("cpu", bfloat16), i.e. `upscale.py
                 --precision bf16` (fast where the CPU multiplies bf16 natively: AMX,
                 AVX512-BF16); its max|diff| is bf16's, not within the fp32 paths' 1e-4
  dcn-floor      channels-last with each deformable convolution replaced by the plain
                 convolution with its weights (kernels.bench.plain_conv_ops): the fastest any
                 deformable-convolution implementation could make the network. Its output is
                 not the network's, so it has no max|diff|.
Per path: frames/s (the best of --reps timed runs, after a warm-up run on the whole clip), the
process's CPU seconds per frame (all threads; less sensitive than wall time to other work), the
peak resident set size of its warm-up run (Linux: VmHWM, reset before it), achieved GFLOP/s, and
the largest |difference| of its output from the reference path's.
FLOPs per frame are counted by torch.utils.flop_counter.FlopCounterMode (convolutions and
matrix products, the deformable convolutions' GEMMs included; bilinear sampling is not counted)
on the default path's warm-up run, and the ceiling is the measured GFLOP/s
of a 64->64 3x3 convolution at 180x320 on the same machine, in both memory formats.
First, the deformable convolution alone at BasicVSR++'s layer (--dcn-reps): reference, default
and torchvision, interleaved, with wall and CPU times.
The process keeps freed memory in its heap (upscale.keep_freed_memory, as upscale.py does on
CPU) for every path: unmapping and faulting in the GB-sized temporaries of the x4 head again for
each frame otherwise costs the PyTorch paths 10-25% of their time. The timed runs come after
every warm-up, so they find the heap (and onnxruntime its arena) already mapped, as the windows
after the first of a long video do.
Timings on a machine shared with other work are noisy: compare paths within one run.
"""

import argparse
import contextlib
import copy
import ctypes
import importlib.util
import os
import resource
import sys
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import kernels
from basicvsr import BasicVSRPlusPlus
from kernels.bench import (
    TORCHVISION,
    dcn_inputs,
    moving_clip,
    plain_conv_ops,
    torchvision_deform_conv2d,
    torchvision_ops,
)
from realbasicvsr import RealBasicVSR
from upscale import keep_freed_memory

NETWORKS = {
    "basicvsrpp": lambda: BasicVSRPlusPlus(64, 7),
    "realbasicvsr": lambda: RealBasicVSR(),
}
PATHS = ("reference", "default", "channels-last", "onnxruntime", "torchvision")
BF16 = "bf16"  # another precision: run only when named
FLOOR = "dcn-floor"  # another function: run only when named


def reset_peak_rss():
    """Starts a new peak-RSS interval; False where the kernel does not allow it. The heap's free
    memory, which keep_freed_memory keeps, is given back first, so that a path's peak is its own
    and not the largest of the paths before it."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib():
    """VmHWM since the last reset_peak_rss, else the process's peak (getrusage), in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def conv_ceiling_gflops(memory_format, reps=5):
    """GFLOP/s of a 64->64 3x3 convolution on (1, 64, 180, 320), fp32, in `memory_format`: the best
    of `reps`."""
    x = torch.randn(1, 64, 180, 320).contiguous(memory_format=memory_format)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(memory_format=memory_format)
    flops = 2 * 64 * 64 * 9 * 180 * 320
    with torch.no_grad():
        conv(x)
        best = min(timed(lambda: conv(x))[0] for _ in range(reps))
    return flops / best / 1e9


def timed(fn):
    """(wall seconds, fn())."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_dcn(reps, torchvision):
    """Prints the deformable convolution alone at BasicVSR++'s layer (x (1, 128, 180, 320), 16
    deform groups, 3x3, 64 out channels): the best of `reps` interleaved calls per implementation,
    wall and process CPU seconds, and max |diff| from the reference."""
    torch.manual_seed(0)
    x, offset, mask, weight, bias = dcn_inputs(1, torch.float32, "cpu")
    conv = dict(stride=1, padding=1, dilation=1, deform_groups=16)
    impls = {
        "reference": lambda: kernels.deform_conv2d(x, offset, mask, weight, bias, **conv),
        "default": lambda: kernels.deform_conv2d(x, offset, mask, weight, bias, **conv),
    }
    if torchvision:
        impls["torchvision"] = lambda: torchvision_deform_conv2d(
            x, offset, mask, weight, bias, **conv
        )
    times = {name: [] for name in impls}
    outputs = {}
    with torch.no_grad():
        for _ in range(reps + 1):  # the first round warms up
            for name, fn in impls.items():
                cpu_start = time.process_time()
                with kernels.use_backend("torch" if name == "reference" else None):
                    seconds, outputs[name] = timed(fn)
                times[name].append((seconds, time.process_time() - cpu_start))
    print("deformable convolution at BasicVSR++'s layer, 1x128x180x320, 16 groups -> 64:")
    for name in impls:
        wall, cpu = min(times[name][1:])
        diff = (outputs[name] - outputs["reference"]).abs().max().item()
        print(f"  {name:<12} {wall * 1e3:8.0f} ms  CPU {cpu * 1e3:8.0f} ms  max|diff| {diff:.2e}")


def make_runner(path, net, onnx_file):
    """A function clip -> output for `path`."""
    if path == "onnxruntime":
        from export import OnnxNetwork

        ort = OnnxNetwork(onnx_file)
        return lambda clip: ort(clip)
    if path in ("channels-last", BF16, FLOOR):
        # channels-last weights make every convolution, and so every feature map, channels-last
        net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
        if path == "channels-last":
            return net_cl

        def variant(clip):
            if path == BF16:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return net_cl(clip)
            with plain_conv_ops():
                return net_cl(clip)

        return variant
    backend = "torch" if path == "reference" else None

    def run(clip):
        with kernels.use_backend(backend):
            if path == "torchvision":
                with torchvision_ops():
                    return net(clip)
            return net(clip)

    return run


def bench_network(name, size, frames, reps, paths, tmp):
    """Prints one table: each path's frames/s, peak RSS, GFLOP/s and max |diff| vs reference."""
    h, w = size
    torch.manual_seed(0)
    net = NETWORKS[name]().eval()
    clip = moving_clip(frames, h, w)
    onnx_file = None
    if "onnxruntime" in paths:
        from export import export_onnx

        onnx_file = os.path.join(tmp, f"{name}_{h}x{w}.onnx")
        seconds, _ = timed(lambda: export_onnx(net, onnx_file, frames=frames, size=(h, w)))
        print(f"  onnx export of {name} at {h}x{w}, {frames} frames: {seconds:.1f} s")
    runners = {p: make_runner(p, net, onnx_file) for p in paths}
    times = {p: [] for p in paths}
    cpu_times = {p: [] for p in paths}
    peaks = {}
    outputs = {}
    with torch.no_grad():
        # Warm-ups, untimed, each measuring the path's peak RSS; the default path's counts the
        # FLOPs (the GEMMs are the same on every path that runs them through ATen).
        counter = FlopCounterMode(display=False)
        for p in paths:
            reset_peak_rss()
            with counter if p == "default" else contextlib.nullcontext():
                runners[p](clip)
            peaks[p] = peak_rss_mib()
        flops = counter.get_total_flops()
        for _ in range(reps):
            for p in paths:
                cpu_start = time.process_time()
                seconds, out = timed(lambda: runners[p](clip))
                cpu_times[p].append(time.process_time() - cpu_start)
                times[p].append(seconds)
                outputs[p] = out.float()
    print(f"{name} at {h}x{w}, {frames} frames: {flops / frames / 1e9:.2f} GFLOP/frame")
    print(
        f"  {'path':<14} {'frames/s':>9} {'s/frame':>8} {'CPU s/frame':>12} {'GFLOP/s':>8} "
        f"{'peak RSS':>12}  max|diff|"
    )
    for p in paths:
        best = min(times[p])
        diff = (outputs[p] - outputs["reference"]).abs().max().item()
        print(
            f"  {p:<14} {frames / best:9.3f} {best / frames:8.2f} "
            f"{min(cpu_times[p]) / frames:12.2f} {flops / best / 1e9:8.1f} "
            f"{peaks[p]:8.0f} MiB  {'-' if p == FLOOR else f'{diff:.2e}'}"
        )
    fastest = min((p for p in paths if p in PATHS), key=lambda p: min(times[p]))
    print(f"  fastest: {fastest}, {min(times['reference']) / min(times[fastest]):.2f}x reference")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python bench.py --cpu",
        description="CPU frames/s and peak memory of BasicVSR++ and RealBasicVSR per path.",
    )
    parser.error = lambda message: parser.exit(2, f"error: {message}\n")  # one line, no usage
    parser.add_argument("--frames", type=int, default=10, help="frames per clip (default 10)")
    parser.add_argument(
        "--sizes", nargs="+", default=["180x320", "64x64"], help="HxW, default 180x320 64x64"
    )
    parser.add_argument(
        "--networks",
        nargs="*",
        choices=list(NETWORKS),
        default=list(NETWORKS),
        help="none: the DCN only",
    )
    parser.add_argument(
        "--paths",
        nargs="+",
        choices=(*PATHS, BF16, FLOOR),
        default=list(PATHS),
        help=f"reference and default always run; {BF16} and {FLOOR} only when named",
    )
    parser.add_argument("--reps", type=int, default=1, help="timed runs per path (default 1)")
    parser.add_argument(
        "--dcn-reps", type=int, default=3, help="timed calls of the DCN alone (0: skip; default 3)"
    )
    args = parser.parse_args(argv)
    try:
        sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes]
    except ValueError:
        parser.error(f"--sizes: expected HxW such as 180x320, got {' '.join(args.sizes)}")
    if any(len(s) != 2 or min(s) < 64 for s in sizes):
        parser.error("--sizes: each must be HxW with both at least 64 (SPyNet's minimum)")
    if args.frames < 2 or args.reps < 1 or args.dcn_reps < 0:
        parser.error("--frames must be >= 2, --reps >= 1 and --dcn-reps >= 0")
    paths = ["reference", "default"] + [p for p in args.paths if p not in ("reference", "default")]
    if "torchvision" in paths and not TORCHVISION[:1].isdigit():
        print(f"torchvision path skipped: torchvision {TORCHVISION}")
        paths.remove("torchvision")
    if "onnxruntime" in paths and importlib.util.find_spec("onnxruntime") is None:
        print("onnxruntime path skipped: onnxruntime is not installed")
        paths.remove("onnxruntime")

    keep_freed_memory()
    threads = os.cpu_count()
    torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, {threads} threads, torchvision {TORCHVISION}")
    if not reset_peak_rss():
        print("peak RSS: the process's peak so far (this kernel does not reset VmHWM)")
    print(
        "ceiling: 64->64 3x3 conv at 180x320: "
        f"{conv_ceiling_gflops(torch.contiguous_format):.1f} GFLOP/s NCHW, "
        f"{conv_ceiling_gflops(torch.channels_last):.1f} GFLOP/s channels-last"
    )
    if args.dcn_reps:
        bench_dcn(args.dcn_reps, "torchvision" in paths)
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            for name in args.networks:
                bench_network(name, size, args.frames, args.reps, paths, tmp)
                sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
