"""The performance targets of the Triton kernels on an H100, and the GPU report that measures
them in one command:

    python bench.py --report OUT_DIR --budget 420                  # OUT_DIR/report.md and .json
    TRITON_INTERPRET=1 python bench.py --report OUT_DIR --dry-run  # its code path on the CPU

Within --budget seconds it runs three parts, each with a share of the budget (REPORT_SHARES; what
a part leaves goes to the next): the CUDA tests (pytest -k cuda, a subprocess), the ops at
BasicVSR++'s shapes in fp32 and bf16 (kernels.bench), and bench.py's workloads REPORT_WORKLOADS on
REPORT_PATHS. A part that runs out of its time is stopped and recorded as skipped with the reason,
what it finished is kept. OUT_DIR/report.md and OUT_DIR/report.json are written (atomically,
after each part) with the GPU, the command and the targets met.
"""

import contextlib
import datetime
import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback

import torch
import triton

# bench.py imports this file inside its main, for --report and the targets: no import cycle.
from bench import (
    MODEL_DTYPES,
    model_table,
    opening_notes,
    run_workload,
    runnable_paths,
    selected_workloads,
    workload_paths,
)
from files import atomic_path
from kernels import bench as op_bench

ROOT = os.path.dirname(os.path.abspath(__file__))

# ========================================================================================
# The targets, and the lines bench.py prints about them.

# The targets on an H100.
TARGET_FPS = 150  # BasicVSR++ 180x320 inference, bf16, Triton
TARGET_INFER_SPEEDUP = 3.0  # ... over the reference path
TARGET_TRAIN_SPEEDUP = 2.0  # BasicVSR++ training iteration over the reference path
TARGET_MEMORY_RATIO = 0.25  # peak memory of the 100-frame clip, Triton / reference
TARGET_DCN_SPEEDUP = 5.0  # DCN forward+backward at BasicVSR++'s layer over torchvision


def _best_triton(cells, dtype, key):
    """(path, value) of the Triton variant with the lowest `key` ("seconds" or "peak") in `dtype`,
    or (None, None)."""
    found = [
        (c[key], path)
        for (d, path), c in cells.items()
        if d == dtype and path.startswith("triton") and c.get(key) is not None
    ]
    return (min(found)[1], min(found)[0]) if found else (None, None)


def target_lines(results, frames):
    """The targets next to what bench.py's run measured ('not measured' where a cell is missing).
    Each target takes the best Triton variant of the run (plain, host cache, compiled,
    channels-last) and names it."""

    def fmt(v, spec="{:.2f}x"):
        return "not measured" if v is None else spec.format(v)

    def met(v, ok):
        return "" if v is None else (" -> met" if ok(v) else " -> NOT met")

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
        f"{fmt(fps, '{:.1f} frames/s')}{met(fps, lambda v: v >= TARGET_FPS)}"
        f"{named(fast_path)}{clip}",
        "- the same, speedup over the reference path in bf16: "
        f">= {TARGET_INFER_SPEEDUP:g}x: {fmt(up)}{met(up, lambda v: v >= TARGET_INFER_SPEEDUP)} "
        f"(over the reference in fp32: {fmt(up_fp32)})",
        "- BasicVSR++ training iteration, speedup over the reference path: "
        f">= {TARGET_TRAIN_SPEEDUP:g}x: "
        + ", ".join(
            f"{d} {fmt(v)}{met(v, lambda v: v >= TARGET_TRAIN_SPEEDUP)}{named(p)}"
            for d, (p, v) in tr.items()
        ),
        f"- peak memory of the 180x320 clip, Triton / reference: <= {TARGET_MEMORY_RATIO:g}: "
        + ", ".join(
            f"{d} {fmt(v)}{met(v, lambda v: v <= TARGET_MEMORY_RATIO)}{named(p)}"
            for d, (p, v) in mem.items()
        )
        + f"; Triton bf16 / reference fp32 {fmt(mem_mixed)}{clip}",
        "- PSNR(bf16 output, fp32 output), Triton: "
        + (", ".join(psnrs) if psnrs else "not measured"),
    ]


# ========================================================================================
# The GPU report: the CUDA tests, the ops and the models within --budget seconds.

# Shares of the budget; what a part leaves goes on.
REPORT_SHARES = {"tests": 0.3, "ops": 0.2, "models": 0.5}
REPORT_WORKLOADS = ("bvsrpp-180x320", "bvsrpp-train", "realbasicvsr-480p")
# The host cache is the Triton variant the memory target needs; compile would spend the budget
# compiling.
REPORT_PATHS = ("triton", "triton + host cache", "torch reference", "torchvision")
REPORT_MARGIN = 5.0  # seconds kept for writing the files
REPORT_OP_REPS = 20
TESTS_COMMAND = ["-m", "pytest", "-x", "-q", "-k", "cuda", "tests"]


class OutOfTime(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds, what):
    """Raises OutOfTime in the block after `seconds` (SIGALRM, main thread only). Python code stops
    between bytecodes; a kernel launch or a synchronisation first returns. Triton's interpreter
    (the dry run) wraps what a kernel raises, maybe more than once: the OutOfTime inside is
    raised as itself."""
    if seconds <= 0:
        raise OutOfTime(f"{what}: no time left in the budget")

    def alarm(signum, frame):
        raise OutOfTime(f"{what}: its share of the budget ({seconds:.0f} s) ran out")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except Exception as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, OutOfTime):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def report_tests(seconds, device):
    """The CUDA tests of every file, in a subprocess (its own session, killed whole at the
    timeout)."""
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


def report_models(seconds, device, dry_run, weights):
    """bench.py's REPORT_WORKLOADS on REPORT_PATHS, --quick; the cells that did not run are
    recorded as skipped."""
    workloads = selected_workloads(REPORT_WORKLOADS, dry_run=dry_run)
    paths = runnable_paths(REPORT_PATHS)
    notes = opening_notes(weights)
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
        for path in workload_paths(wl, paths):
            for name in MODEL_DTYPES:
                cells.setdefault((name, path), dict(status="skipped"))
    return part


def report_targets(ops, models, dry_run):
    """[dict(target, required, measured, met)] of the report; met None where not measured."""
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
            f"DCN forward+backward at BasicVSR++'s layer, {name}, batch 1: "
            "speedup over torchvision",
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


def verdict(met, dry_run=False):
    return "n/a (dry run)" if dry_run else {True: "yes", False: "**no**", None: "not measured"}[met]


def report_markdown(report):
    dry = report["dry_run"]
    parts = report["parts"]
    lines = [
        "# GPU report" + (": DRY RUN, tiny sizes on the CPU, not measurements" if dry else ""),
        "",
        f"- device: {report['device']}",
        f"- command: `{report['command']}`",
        f"- torch {report['torch']}, triton {report['triton']}, "
        f"torchvision {report['torchvision']}",
        f"- started {report['started']}, budget {report['budget_s']:g} s, "
        f"elapsed {report['elapsed_s']:.0f} s",
        "",
        "## Targets",
        "",
        "| target | required | measured | met |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {t['target']} | {t['required']} | {t['measured']} | {verdict(t['met'], dry)} |"
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
    if ops:  # a part that failed has only its status and reason
        lines.append(
            f"status: {ops['status']}"
            + (f" ({ops['reason']})" if "reason" in ops else "")
            + (f"; sizes {ops['size']}; median of {ops['reps']} calls" if "size" in ops else "")
        )
    if ops and "results" in ops:
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
    if models and "results" in models:
        lines += [
            "",
            model_table(
                models["workloads"], models["results"], models["paths"], list(MODEL_DTYPES)
            ),
            "",
            "time: median of 2 clips (inference) or 3 iterations (training) after warm-up, "
            "wall clock between synchronisations; peak GPU memory: "
            "torch.cuda.max_memory_allocated(); PSNR(bf16, fp32): mean over frames of "
            "metrics.psnr",
        ]
        lines += ["", "Notes:"] + [f"- {n}" for n in models["notes"]]
    return "\n".join(lines) + "\n"


def run_report(
    out_dir, budget, device, dry_run=False, weights=None, command="python bench.py --report"
):
    """Runs the parts within `budget` seconds and writes out_dir/report.md and report.json after
    each."""
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
        torchvision=op_bench.TORCHVISION,
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
            traceback.print_exc()
        report["parts"][name] = part
        report["targets"] = report_targets(
            report["parts"].get("ops", {}), report["parts"].get("models", {}), dry_run
        )
        report["elapsed_s"] = time.monotonic() - start
        for filename, text in (
            ("report.json", report_json(report)),
            ("report.md", report_markdown(report)),
        ):
            # Readers see the old file or the new one.
            with atomic_path(os.path.join(out_dir, filename)) as tmp, open(tmp, "w") as f:
                f.write(text)
    return report


def write_report(out_dir, budget, device, dry_run, weights, command):
    """bench.py --report: run_report, then where the files are and the targets, on stdout."""
    report = run_report(out_dir, budget, device, dry_run, weights, command)
    print(
        f"wrote {os.path.join(out_dir, 'report.md')} and report.json "
        f"in {report['elapsed_s']:.0f} s:"
    )
    for t in report["targets"]:
        print(
            f"- {t['target']}: {t['measured']} (target {t['required']}): "
            f"{verdict(t['met'], dry_run)}"
        )
