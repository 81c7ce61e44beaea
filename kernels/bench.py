"""Benchmark of the two ops at BasicVSR++'s shapes (needs a CUDA GPU); the whole models are timed by
the top-level bench.py.

    python -m kernels.bench                                   # fp32 and bf16, batch 1 and 8
    TRITON_INTERPRET=1 python -m kernels.bench --dry-run      # CPU: the code path at tiny sizes

Flags: --batch 1 8, --dtype fp32 bf16, --ops dcn flow_warp, --reps 50, --peak-tbps 3.35.
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

The whole-model benchmarks (bench.py, cpu_bench.py) take their inputs and two of their paths from
here: moving_clip; torchvision_ops, which puts torchvision's DCN and plain grid_sample where the
networks call kernels.deform_conv2d, kernels.flow_guided_deform_conv2d and kernels.flow_warp; and
plain_conv_ops, which puts a plain convolution where they call the two deformable ones.
"""

import argparse
import contextlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.modules.utils import _pair

from . import (
    common,
    deform_conv2d,
    flow_guided_deform_conv2d,
    flow_guided_offsets,
    flow_warp,
    flow_warp_reference,
)

try:
    import torchvision
    from torchvision.ops import deform_conv2d as tv_deform_conv2d

    TORCHVISION = torchvision.__version__
except ImportError:  # torchvision is optional: its rows are skipped
    tv_deform_conv2d, TORCHVISION = None, "not installed"
except RuntimeError as e:  # e.g. a build for another torch: its ops do not register
    tv_deform_conv2d, TORCHVISION = None, f"unusable ({str(e).splitlines()[0][:100]})"

PACKAGE = sys.modules[__package__]  # the package object the networks call through

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OPS = ("dcn", "dcn + offset glue", "flow_warp")
# BasicVSR++'s layer at REDS' 180x320 frames; the dry run's tiny twin keeps 16 deform groups.
SIZE = dict(h=180, w=320, c_in=128, c_out=64, groups=16, c_warp=64)
DRY_RUN_SIZE = dict(h=8, w=12, c_in=32, c_out=16, groups=16, c_warp=8)


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
    offset = flow.flip(1).repeat(1, groups * K, 1, 1) + torch.randn(
        n, groups * 2 * K, h, w, device=device
    )
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


def moving_clip(frames, h, w, seed=0):
    """(1, frames, 3, h, w) in [0, 1], CPU: a smooth random texture (three octaves of bicubically
    upsampled noise) seen through a window that pans about 1 px down and 2 px right per frame,
    with jitter. Consecutive frames are shifted copies, so the flows between them are not zero.
    The whole-model benchmark's clip (bench.py)."""
    gen = torch.Generator().manual_seed(seed)
    path = (torch.randn(frames, 2, generator=gen) * 0.5 + torch.tensor([1.0, 2.0])).cumsum(0)
    path = (path - path.min(0).values).round().long()
    hh = h + int(path[:, 0].max())
    ww = w + int(path[:, 1].max())
    octaves = [
        F.interpolate(
            torch.rand(1, 3, hh // s + 3, ww // s + 3, generator=gen),
            size=(hh, ww),
            mode="bicubic",
            align_corners=False,
        )
        for s in (2, 8, 32)
    ]
    texture = sum(octaves) / 3
    clip = torch.stack([texture[0, :, y : y + h, x : x + w] for y, x in path.tolist()])
    return clip[None].clamp(0, 1)


# ----------------------------------------------------------------------------------------
# Timing.


def median_ms(fn, reps, warmup=5):
    """Median ms of fn() over reps calls after warm-up: CUDA events on a GPU, the wall clock on
    the CPU (the dry run: not a measurement)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        return statistics.median(times)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def fwd_and_fwd_bwd(impl, op, inputs, reps, warmup=5):
    """(forward ms, forward+backward ms, output) of op(*inputs), gradients for every input;
    (None, None, None) where the implementation cannot run (torchvision has no bf16 kernel)."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    try:
        out = op(*leaves).detach()  # detached: the graph (GBs for the reference) is freed here
    except (RuntimeError, NotImplementedError) as e:
        print(f"  {impl} skipped: {str(e).splitlines()[0][:120]}", file=sys.stderr)
        return None, None, None
    grad_out = torch.randn_like(out)

    def step():
        torch.autograd.grad(op(*leaves), leaves, grad_out)

    with torch.no_grad():
        t_fwd = median_ms(lambda: op(*leaves), reps, warmup)
    return t_fwd, median_ms(step, reps, warmup), out


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# ----------------------------------------------------------------------------------------
# torchvision's ops in the networks' place: the third path of the whole-model benchmark.


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
    """kernels.deform_conv2d's signature on torchvision.ops.deform_conv2d (mmcv's layout; the
    deform groups follow from offset's channels). Under autocast torchvision casts to fp32
    itself."""
    if not torch.is_autocast_enabled(x.device.type):  # it takes a single dtype
        offset = offset.to(x.dtype)
        mask = mask.to(x.dtype)
        weight = weight.to(x.dtype)
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
    """mmagic's flow_warp: plain F.grid_sample on the grid built from the flow, in fp32
    positions."""
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
def _patched(**ops):
    """While the block runs, the package's names in `ops` are the given functions."""
    saved = {name: getattr(PACKAGE, name) for name in ops}
    for name, fn in ops.items():
        setattr(PACKAGE, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(PACKAGE, name, fn)


def torchvision_ops():
    """BENCHMARK-ONLY PATCH, not a fallback of the library: while the block runs, the names the
    networks call, kernels.deform_conv2d, kernels.flow_guided_deform_conv2d (its PyTorch glue,
    then the DCN) and kernels.flow_warp, are torchvision's DCN and plain grid_sample, i.e. what
    users of mmagic-style code without mmcv run today. torchvision's DCN differs from mmcv's only
    in the gradient at exactly -1, which does not matter for timing."""
    if tv_deform_conv2d is None:
        raise RuntimeError("the torchvision path needs torchvision")
    return _patched(
        deform_conv2d=torchvision_deform_conv2d,
        flow_guided_deform_conv2d=torchvision_flow_guided_deform_conv2d,
        flow_warp=grid_sample_flow_warp,
    )


def plain_conv_ops():
    """BENCHMARK-ONLY PATCH: while the block runs, both deformable convolutions are the plain
    convolution with their weights (F.conv2d: zero offsets, no mask, no sampling), i.e. their
    matrix product at convolution speed and nothing else. A network timed so runs as fast as any
    implementation of the deformable convolution could make it; its output is not the
    network's."""

    def conv(x, weight, bias, stride, padding, dilation):
        return F.conv2d(x, weight, bias, _pair(stride), _pair(padding), _pair(dilation))

    def plain_deform_conv2d(
        x, offset, mask, weight, bias=None, stride=1, padding=0, dilation=1, **_
    ):
        return conv(x, weight, bias, stride, padding, dilation)

    def plain_flow_guided_deform_conv2d(
        x,
        conv_offset,
        flows,
        weight,
        bias=None,
        max_residue_magnitude=10.0,
        stride=1,
        padding=0,
        dilation=1,
        **_,
    ):
        return conv(x, weight, bias, stride, padding, dilation)

    return _patched(
        deform_conv2d=plain_deform_conv2d,
        flow_guided_deform_conv2d=plain_flow_guided_deform_conv2d,
    )


# ----------------------------------------------------------------------------------------
# One op at one (batch, dtype): implementations -> times.


def _dcn_impls(op, size):
    """{implementation: fn} of "dcn" or "dcn + offset glue"."""
    conv = dict(stride=1, padding=1, dilation=1, deform_groups=size["groups"])
    if op == "dcn":
        impls = {
            "triton": lambda *a: deform_conv2d(*a, **conv, backend="triton"),
            "torch reference": lambda *a: deform_conv2d(*a, **conv, backend="torch"),
        }
        if tv_deform_conv2d is not None:
            # Same layout as mmcv; torchvision wants the offsets in the features' dtype.
            impls["torchvision"] = lambda x, o, m, w, b: tv_deform_conv2d(
                x, o.to(x.dtype), w, b, 1, 1, 1, mask=m
            )
        return impls
    mag = 10.0

    def glue_then_dcn(x, conv_offset, flows, weight, bias):
        offset, mask = flow_guided_offsets(conv_offset, flows, mag, size["groups"], 9)
        return deform_conv2d(x, offset, mask, weight, bias, **conv, backend="triton")

    return {
        "triton": lambda *a: flow_guided_deform_conv2d(*a, mag, **conv, backend="triton"),
        "torch glue + triton dcn": glue_then_dcn,
        "torch reference": lambda *a: flow_guided_deform_conv2d(*a, mag, **conv, backend="torch"),
    }


def bench_op(op, batch, dtype_name, reps, device, size=SIZE, warmup=5):
    """dict(op, batch, dtype, times={implementation: [fwd ms, fwd+bwd ms] or None}, bytes=[fwd,
    fwd+bwd], rel_err=Triton vs reference forward or None). "triton" comes first."""
    dtype = DTYPES[dtype_name]
    h, w = size["h"], size["w"]
    if op == "flow_warp":
        x, flow = inputs = warp_inputs(batch, dtype, device, h, w, size["c_warp"])
        # Plain grid_sample: the grid precomputed, in x's dtype (grid_sample takes a single dtype).
        gy, gx = torch.meshgrid(
            torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
        )
        grid = torch.stack(
            (2 * (gx + flow[:, 0]) / (w - 1) - 1, 2 * (gy + flow[:, 1]) / (h - 1) - 1), 3
        ).to(dtype)
        runs = {
            "triton": (lambda x, f: flow_warp(x, f, backend="triton"), inputs),
            "torch reference": (flow_warp_reference, inputs),
            "grid_sample": (
                lambda x, g: F.grid_sample(x, g, "bilinear", "zeros", align_corners=True),
                (x, grid),
            ),
        }
        out_like, moved = x, inputs
    else:
        make = dcn_inputs if op == "dcn" else dcn_glue_inputs
        inputs = make(batch, dtype, device, h, w, size["c_in"], size["c_out"], size["groups"])
        runs = {impl: (fn, inputs) for impl, fn in _dcn_impls(op, size).items()}
        x, weight = inputs[0], inputs[3]
        out_like = x.new_empty(batch, weight.shape[0], h, w)  # stride 1, padding 1
        moved = inputs if op == "dcn" else inputs[:3]  # the glue: x, conv_offset, flows
    results = {
        impl: fwd_and_fwd_bwd(impl, fn, args, reps, warmup) for impl, (fn, args) in runs.items()
    }
    got, ref = results["triton"][2], results["torch reference"][2]
    return dict(
        op=op,
        batch=batch,
        dtype=dtype_name,
        times={impl: None if r[0] is None else [r[0], r[1]] for impl, r in results.items()},
        bytes=list(compulsory_bytes(moved, out_like)),
        rel_err=None if got is None or ref is None else rel_err(got, ref),
    )


# ----------------------------------------------------------------------------------------
# Table: one row per (op, batch, dtype, implementation).

HEADER = (
    "| op | batch | dtype | implementation | fwd ms | fwd GB/s | fwd % floor | fwd+bwd ms | "
    "fwd+bwd GB/s | fwd+bwd % floor | Triton speedup fwd | Triton speedup fwd+bwd |"
)


def table_rows(result, peak):
    """Markdown rows of one bench_op result; peak: bytes/s of the floor."""
    triton_times = result["times"]["triton"] or [None, None]
    rows = []
    for impl, times in result["times"].items():
        cells = [result["op"], str(result["batch"]), result["dtype"], impl]
        times = times or [None, None]
        for t, b in zip(times, result["bytes"]):
            if t is None:
                cells += ["n/a", "", ""]
            else:
                floor_ms = b / peak * 1e3
                cells += [f"{t:.3f}", f"{b / t / 1e6:.0f}", f"{100 * floor_ms / t:.0f}%"]
        for t, t_triton in zip(times, triton_times):
            cells.append(
                f"{t / t_triton:.1f}x"
                if impl != "triton" and t is not None and t_triton is not None
                else ""
            )
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def table(results, peak):
    rows = [r for result in results for r in table_rows(result, peak)]
    return "\n".join([HEADER, "|" + "---|" * (HEADER.count("|") - 1)] + rows)


def bench_ops(batches, dtypes, ops, reps, device, size=SIZE, warmup=5, results=None):
    """bench_op over (batch, dtype, op), appended to `results` (a list) as each finishes, so that
    a caller that stops the run keeps the finished ones."""
    results = [] if results is None else results
    for batch in batches:
        for dtype_name in dtypes:
            for op in ops:
                print(f"  ... {op} batch {batch} {dtype_name}", file=sys.stderr, flush=True)
                results.append(bench_op(op, batch, dtype_name, reps, device, size, warmup))
                # A cheap guard against timing a wrong kernel.
                if results[-1]["rel_err"] is not None:
                    print(
                        f"  {op} batch {batch} {dtype_name}: Triton vs reference forward, rel err "
                        f"{results[-1]['rel_err']:.1e}",
                        file=sys.stderr,
                    )
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results


def device_for(dry_run):
    """The CUDA device; on a machine without one, the CPU for a dry run under TRITON_INTERPRET=1.
    Raises ValueError with the reason otherwise."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not dry_run:
        raise ValueError(
            "needs a CUDA GPU, and none is available (--dry-run runs the code path on the CPU)"
        )
    if not common.INTERPRET:
        raise ValueError(
            "a dry run without a GPU runs the Triton kernels in the interpreter: "
            "set TRITON_INTERPRET=1"
        )
    return torch.device("cpu")


def environment(device):
    """The device and the versions, one line, as the benchmarks print it first."""
    where = f"GPU: {torch.cuda.get_device_name(device)}" if device.type == "cuda" else None
    return (
        f"{where or 'device: CPU (dry run)'}; torch {torch.__version__}; "
        f"triton {triton.__version__}; torchvision {TORCHVISION}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m kernels.bench",
        description="The two ops at BasicVSR++ shapes: Triton vs the PyTorch reference "
        "and torchvision (the whole models: python bench.py).",
    )
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--ops",
        nargs="+",
        choices=["dcn", "flow_warp"],
        default=["dcn", "flow_warp"],
        help="dcn includes the DCN with BasicVSR++'s offset glue",
    )
    parser.add_argument(
        "--reps", type=int, default=50, help="timed calls per cell, the median is reported"
    )
    parser.add_argument(
        "--peak-tbps",
        type=float,
        default=3.35,
        help="memory bandwidth of the floor, TB/s (H100 SXM: 3.35)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny shapes, 1 call each, on the CPU without a GPU "
        "(needs TRITON_INTERPRET=1 there); no real timings",
    )
    parser.error = lambda message: parser.exit(2, f"error: {message}\n")  # one line, no usage
    args = parser.parse_args(argv)
    if args.reps < 1 or min(args.batch) < 1:
        parser.error("--reps and --batch must be >= 1")
    if args.peak_tbps <= 0:
        parser.error("--peak-tbps must be > 0")
    try:
        device = device_for(args.dry_run)
    except ValueError as e:
        parser.exit(1, f"error: {e}\n")
    torch.manual_seed(0)
    print(environment(device))
    command = " ".join(sys.argv[1:] if argv is None else argv)
    print(f"command: python -m kernels.bench {command}".rstrip())
    print(
        f"floor = compulsory bytes / {args.peak_tbps} TB/s; "
        "Triton speedup = that row's time / Triton's time"
    )
    ops = [op for op in OPS if op.split(" ")[0] in args.ops]
    size, reps, warmup = (DRY_RUN_SIZE, 1, 0) if args.dry_run else (SIZE, args.reps, 5)
    results = bench_ops(args.batch, args.dtype, ops, reps, device, size, warmup)
    if args.dry_run:
        print(f"DRY RUN: tiny shapes {size}; the numbers are not measurements")
    print(table(results, args.peak_tbps * 1e12))


if __name__ == "__main__":
    main()
