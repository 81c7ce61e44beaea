"""Benchmark of the Triton kernels at BasicVSR++ shapes (needs a CUDA GPU).

    python -m kernels.bench [--batch 1 8] [--dtype fp32 bf16] [--reps 50] [--peak-tbps 3.35]

- DCN: x (n, 128, 180, 320), 16 deform groups, 3x3, stride 1, padding 1, 64 out channels;
  offset (n, 288, 180, 320) and mask (n, 144, 180, 320). Offsets look like BasicVSR++'s: a
  smooth flow plus a small residue.
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
"""
import argparse
import statistics
import sys

import torch
import torch.nn.functional as F

from . import deform_conv2d, flow_warp, flow_warp_reference

try:
    from torchvision.ops import deform_conv2d as tv_deform_conv2d
except ImportError:  # torchvision is optional: its column is skipped
    tv_deform_conv2d = None

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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


def main():
    parser = argparse.ArgumentParser(description="Benchmark of the Triton kernels at BasicVSR++ shapes (CUDA).")
    group = parser.add_argument_group("what to run")
    group.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    group.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    group.add_argument("--ops", nargs="+", choices=["dcn", "flow_warp"], default=["dcn", "flow_warp"])
    group = parser.add_argument_group("measurement")
    group.add_argument("--reps", type=int, default=50, help="timed calls per measurement (the median is reported)")
    group.add_argument("--peak-tbps", type=float, default=3.35, help="memory bandwidth of the floor, TB/s (H100 SXM: 3.35)")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("kernels.bench: needs a CUDA GPU, and none is available")
        sys.exit(1)
    device = torch.device("cuda")
    torch.manual_seed(0)
    print(f"GPU: {torch.cuda.get_device_name(device)}; torch {torch.__version__}; "
          f"command: python -m kernels.bench {' '.join(sys.argv[1:])}".rstrip())
    print(f"floor = compulsory bytes / {args.peak_tbps} TB/s; Triton speedup = that row's time / Triton's time")
    peak = args.peak_tbps * 1e12
    rows = [HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    for batch in args.batch:
        for dtype_name in args.dtype:
            if "dcn" in args.ops:
                rows += bench_dcn(batch, dtype_name, args.reps, peak, device)
            if "flow_warp" in args.ops:
                rows += bench_warp(batch, dtype_name, args.reps, peak, device)
            torch.cuda.empty_cache()
    print("\n".join(rows))


if __name__ == "__main__":
    main()
