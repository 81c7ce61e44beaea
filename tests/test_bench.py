"""kernels/bench.py (the ops), bench.py (the whole models) and report.py (the targets, --report)
on the CPU:
- the compulsory-bytes arithmetic, and one op entry at the dry run's tiny sizes whose Triton output
  matches the reference (rel <= 1e-5 in fp32: the kernel sums in another order);
- the benchmark-only torchvision patch runs the same network (a stand-in with torchvision's
  signature replaces torchvision, which CI does not have) and is undone after the block,
  rel <= 1e-5;
- the clip; bench.py's dry run of a tiny GAN-stage iteration through train.py's Trainer, and its
  PSNR of two clips (subprocesses); `bench.py --cpu` at a tiny size, every path within 1e-4 of
  the reference (the bf16 path within bf16's error, the DCN-floor path timed, without a
  difference); the target arithmetic;
- the plain-convolution patch: both deformable convolutions become the DCN at zero offsets;
- --report: report.md and report.json with their sections from stubbed measurements (the real
  dry run takes minutes in the interpreter), a part that runs out of its time is stopped and
  recorded as skipped, and a bad flag gives one `error:` line.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

import kernels
import report
from kernels import bench as op_bench

from helpers import rel, tiny_alignment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(*args, code=None):
    """python bench.py ARGS (or python -c CODE) in the repository, on the CPU (conftest.py's
    TRITON_INTERPRET=1 is inherited)."""
    command = ["-c", code] if code is not None else ["bench.py", *args]
    return subprocess.run(
        [sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


# ----------------------------------------------------------------------------------------
# kernels/bench.py


def test_compulsory_bytes_of_basicvsrpp_layer():
    # One 180x320 image moves 71.9 MB (all bf16) / 143.8 MB (all fp32) in the forward of
    # BasicVSR++'s DCN, counting x (128 channels), offset (288), mask (144) and out (64); the
    # 74k-element weight is left out.
    for dtype, mb in ((torch.bfloat16, 71.9), (torch.float32, 143.8)):
        x, offset, mask, out = (
            torch.empty(1, c, 180, 320, device="meta", dtype=dtype) for c in (128, 288, 144, 64)
        )
        fwd, fwd_bwd = op_bench.compulsory_bytes((x, offset, mask), out)
        assert abs(fwd / 1e6 - mb) < 0.05
        assert fwd_bwd == fwd + out.nbytes + 2 * (x.nbytes + offset.nbytes + mask.nbytes)


@pytest.mark.parametrize(
    "op", [pytest.param("dcn + offset glue", marks=pytest.mark.slow), "flow_warp"]
)
def test_op_entry_at_dry_run_size(op):
    # At the dry-run size the flow is one random vector for the whole 8x12 map (smooth_flow's
    # coarse grid is 1x1): about one draw in twenty moves every sample off the map, the output is
    # all zeros and the relative error 0/0. A fixed seed keeps the test off such a draw.
    torch.manual_seed(0)
    result = op_bench.bench_op(
        op, 1, "fp32", 1, torch.device("cpu"), op_bench.DRY_RUN_SIZE, warmup=0
    )
    assert result["rel_err"] <= 1e-5
    assert list(result["times"])[0] == "triton" and all(
        t[0] > 0 and t[1] > 0 for t in result["times"].values()
    )
    rows = op_bench.table_rows(result, 3.35e12)
    assert len(rows) == len(result["times"]) and all(
        r.count("|") == op_bench.HEADER.count("|") for r in rows
    )


def standin_torchvision_deform_conv2d(
    input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), mask=None
):
    """torchvision.ops.deform_conv2d's signature and layout (groups implied by offset), computed
    here by the reference."""
    groups = offset.shape[1] // (2 * weight.shape[2] * weight.shape[3])
    return kernels.deform_conv2d_reference(
        input, offset, mask, weight, bias, stride, padding, dilation, groups
    )


def test_torchvision_patch_runs_the_same_network(monkeypatch):
    standin_calls = []

    def standin(*args, **kwargs):
        standin_calls.append(1)
        return standin_torchvision_deform_conv2d(*args, **kwargs)

    monkeypatch.setattr(op_bench, "tv_deform_conv2d", standin)
    original = kernels.deform_conv2d, kernels.flow_guided_deform_conv2d, kernels.flow_warp
    step = tiny_alignment()
    with kernels.use_backend("torch"):
        reference = step()
    with op_bench.torchvision_ops():
        assert kernels.flow_warp is op_bench.grid_sample_flow_warp
        patched = step()
    with pytest.raises(ZeroDivisionError):
        with op_bench.torchvision_ops():
            1 / 0
    assert (kernels.deform_conv2d, kernels.flow_guided_deform_conv2d, kernels.flow_warp) == original
    assert len(standin_calls) > 0
    assert rel(patched, reference) <= 1e-5


def test_plain_conv_patch_is_the_dcn_at_zero_offsets():
    # Inside plain_conv_ops both deformable convolutions ignore their offsets and mask: they are
    # then the DCN at zero offsets and mask 1, i.e. the reference with those inputs (fp32 sums in
    # another order: 1e-5).
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 8, 9, 11, generator=gen)
    weight = torch.randn(4, 8, 3, 3, generator=gen)
    bias = torch.randn(4, generator=gen)
    G = 2
    still = kernels.deform_conv2d_reference(
        x, torch.zeros(1, 2 * G * 9, 9, 11), torch.ones(1, G * 9, 9, 11), weight, bias, 1, 1, 1, G
    )
    offset = torch.randn(1, 2 * G * 9, 9, 11, generator=gen) * 3
    mask = torch.rand(1, G * 9, 9, 11, generator=gen)
    conv_offset = torch.randn(1, 3 * G * 9, 9, 11, generator=gen)
    flows = torch.randn(1, 2, 9, 11, generator=gen) * 2
    conv = dict(stride=1, padding=1, dilation=1, deform_groups=G)
    original = kernels.deform_conv2d, kernels.flow_guided_deform_conv2d, kernels.flow_warp
    moved = kernels.deform_conv2d(x, offset, mask, weight, bias, **conv)
    assert rel(moved, still) > 0.1  # the offsets matter outside the block
    with op_bench.plain_conv_ops():
        assert kernels.flow_warp is original[2]  # the warp is left as it is
        plain = kernels.deform_conv2d(x, offset, mask, weight, bias, **conv)
        guided = kernels.flow_guided_deform_conv2d(
            x, conv_offset, flows, weight, bias, 10.0, **conv
        )
    with pytest.raises(ZeroDivisionError):
        with op_bench.plain_conv_ops():
            1 / 0
    assert (kernels.deform_conv2d, kernels.flow_guided_deform_conv2d, kernels.flow_warp) == original
    assert rel(plain, still) <= 1e-5 and rel(guided, still) <= 1e-5


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


def test_moving_clip_frames_are_shifted_copies():
    clip = op_bench.moving_clip(5, 20, 30)[0]
    assert clip.shape == (5, 3, 20, 30) and 0 <= clip.min() and clip.max() <= 1
    shifts = [integer_shift(a, b) for a, b in zip(clip[:-1], clip[1:])]
    assert None not in shifts and any(s != (0, 0) for s in shifts), shifts


# ----------------------------------------------------------------------------------------
# bench.py, in subprocesses.


@pytest.mark.slow
def test_gan_iteration_runs_train_py_trainer():
    # The bench drives train.py's own Trainer: a tiny GAN-stage iteration on the reference path
    # (generator, cleaning, perceptual, GAN and discriminator losses, EMA) catches a drifted
    # interface.
    proc = run_bench("--dry-run", "--workloads", "realbasicvsr-gan", "--dtype", "fp32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in proc.stdout.splitlines() if r.startswith("| [dry run] realbasicvsr-gan")]
    reference = [r for r in rows if "| fp32 | torch reference |" in r]
    assert len(reference) == 2, proc.stdout  # the workload's table, then the one of all
    seconds = float(reference[0].split("|")[4].split()[0])  # "12.34 ms/iter"
    assert seconds > 0 and "non-finite" not in proc.stdout


@pytest.mark.slow
def test_clip_psnr_is_the_mean_over_frames_of_metrics_psnr():
    code = """
import torch, bench
a = torch.zeros(1, 2, 3, 4, 4)
b = a.clone()
b[0, 1] = 0.1
print(bench.clip_psnr(a + 0.1, a), bench.clip_psnr(b, a), bench.clip_psnr(a + 2, a + 1))
"""
    proc = run_bench(code=code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    off, mixed, clamped = [float(v) for v in proc.stdout.split()]
    # a frame 0.1 off everywhere: 20 dB; frame 0 identical (inf), frame 1 off by 0.1: the mean
    # over frames, as train.py's evaluation, is inf; both clips clamp to 1: inf.
    assert off == pytest.approx(20.0)
    assert mixed == float("inf")
    assert clamped == float("inf")


@pytest.mark.slow
def test_cpu_bench_paths_agree_with_the_reference():
    # python bench.py --cpu at a tiny size: every path's table row, with its output within 1e-4
    # of the reference path's (the tolerance the CPU targets are stated with; the CPU path's
    # sampling positions move by a few ulps, see tests/test_cpu_path.py).
    proc = run_bench(
        "--cpu",
        *("--frames", "2", "--sizes", "64x64", "--networks", "basicvsrpp", "--dcn-reps", "1"),
        *("--paths", "default", "channels-last", "bf16", "dcn-floor"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if parts and parts[0] in ("reference", "default", "channels-last", "bf16", "dcn-floor"):
            rows.setdefault(parts[0], []).append(parts)
    # the floor's output is not the network's: a time and no difference
    (floor_row,) = rows["dcn-floor"]
    assert float(floor_row[1]) > 0 and floor_row[-1] == "-", proc.stdout
    # bf16 differs as bf16 does (8 bits of mantissa: far above fp32's rounding, far below 1e-2
    # on these outputs), which also shows that autocast took effect
    (bf16_row,) = rows["bf16"]
    assert 1e-5 < float(bf16_row[-1]) < 1e-2, proc.stdout
    # the DCN alone (reference, default), then the network (all three)
    assert len(rows["reference"]) == len(rows["default"]) == 2, proc.stdout
    for path in ("default", "channels-last"):
        network_row = rows[path][-1]
        assert float(network_row[1]) > 0  # frames/s
        assert float(network_row[-1]) <= 1e-4, proc.stdout  # max|diff| from the reference
    assert float(rows["default"][0][-1]) <= 1e-4  # the DCN alone


# ----------------------------------------------------------------------------------------
# report.py: the targets.


def test_targets_arithmetic():
    T, R = "triton", "torch reference"
    results = {
        "bvsrpp-180x320": {
            ("bf16", T): dict(seconds=0.5, peak=1.0, psnr=48.0),
            ("bf16", R): dict(seconds=2.0, peak=5.0),
            ("fp32", T): dict(seconds=1.0, peak=3.0),
            ("fp32", R): dict(seconds=4.0, peak=6.0),
        },
        "bvsrpp-train": {
            ("fp32", T): dict(seconds=1.0, peak=1.0),
            ("fp32", R): dict(status="OOM"),
            ("bf16", T): dict(seconds=1.0, peak=1.0),
            ("bf16", R): dict(seconds=2.5, peak=1.0),
        },
    }
    lines = report.target_lines(results, frames=100)
    assert "200.0 frames/s -> met" in lines[0]
    assert "4.00x -> met" in lines[1] and "over the reference in fp32: 8.00x" in lines[1]
    assert "fp32 not measured" in lines[2] and "bf16 2.50x -> met" in lines[2]
    assert (
        "fp32 0.50x -> NOT met" in lines[3]
        and "bf16 0.20x -> met" in lines[3]
        and "fp32 0.17x" in lines[3]
    )
    assert "48.0 dB" in lines[4]
    # the best Triton variant counts, and is named
    results["bvsrpp-180x320"][("bf16", "triton + host cache")] = dict(seconds=0.8, peak=0.5)
    results["bvsrpp-180x320"][("bf16", "triton + compile")] = dict(seconds=0.4, peak=1.2)
    lines = report.target_lines(results, frames=100)
    assert "250.0 frames/s -> met [triton + compile]" in lines[0]
    assert "5.00x -> met" in lines[1]
    assert (
        "bf16 0.10x -> met [triton + host cache]" in lines[3]
        and "fp32 0.50x -> NOT met," in lines[3]
    )


# ----------------------------------------------------------------------------------------
# bench.py --report (report.py), with stubbed measurements.


def fake_op(op, batch, dtype_name, reps, device, size=None, warmup=5):
    times = {"triton": [1.0, 2.0], "torch reference": [4.0, 10.0]}
    if op == "dcn":
        # fp32: 6x, the target is met; bf16: torchvision does not run.
        times["torchvision"] = [3.0, 12.0] if dtype_name == "fp32" else None
    return dict(op=op, batch=batch, dtype=dtype_name, times=times, bytes=[1e6, 3e6], rel_err=1e-7)


def fake_workload(
    wl, paths, dtypes, device, weights, notes, reps=None, quick=False, dry_run=False, cells=None
):
    """Cells as bench.py's bench_inference / bench_training fill them. BasicVSR++ 100 frames:
    Triton bf16 at 0.5 s (200 frames/s, 4x the reference), the host cache at 1/5 of the
    reference's memory."""
    speed = {"triton": 1.0, "triton + host cache": 1.2, "torch reference": 4.0}
    peak = {"triton": 4.0, "triton + host cache": 1.0, "torch reference": 5.0}
    for path in report.workload_paths(wl, paths):
        for name in dtypes:
            seconds = speed[path] * (0.5 if name == "bf16" else 1.0)
            if wl["kind"] == "train" and path == "triton":
                seconds *= 3.0  # 1.33x: the training target is not met
            cells[(name, path)] = dict(
                seconds=seconds,
                peak=peak[path] * 2**30,
                **({"psnr": 50.0} if name == "bf16" else {}),
            )
    return cells


@pytest.fixture
def stubbed(monkeypatch):
    monkeypatch.setattr(op_bench, "bench_op", fake_op)
    monkeypatch.setattr(report, "run_workload", fake_workload)  # on the real workloads' sizes


def test_report_files_and_targets(tmp_path, stubbed):
    result = report.run_report(
        str(tmp_path), 60, torch.device("cpu"), command="python bench.py --report x"
    )
    assert sorted(os.listdir(tmp_path)) == ["report.json", "report.md"]  # no temporary files left
    saved = json.loads((tmp_path / "report.json").read_text())
    assert (
        saved["command"] == "python bench.py --report x"
        and saved["device"]
        and saved["budget_s"] == 60
    )
    assert (
        saved["parts"]["tests"]["status"] == "skipped"
        and "no CUDA" in saved["parts"]["tests"]["reason"]
    )
    assert saved["parts"]["ops"]["status"] == "done" and len(saved["parts"]["ops"]["results"]) == 6
    cells = saved["parts"]["models"]["cells"]
    assert {c["workload"] for c in cells} == set(report.REPORT_WORKLOADS)
    assert not any(c.get("status") == "skipped" for c in cells)
    met = {t["target"].split(":")[0]: t["met"] for t in saved["targets"]}
    assert len(saved["targets"]) == 8 == len(result["targets"])
    values = [t["value"] for t in saved["targets"]]
    assert values[:3] == [pytest.approx(200.0), pytest.approx(4.0), pytest.approx(6.0)]
    assert [t["met"] for t in saved["targets"]] == [
        True,
        True,
        True,
        None,
        False,
        False,
        True,
        True,
    ], met
    md = (tmp_path / "report.md").read_text()
    for section in (
        "# GPU report",
        "## Targets",
        "## CUDA tests",
        "## Ops at BasicVSR++'s shapes",
        "## Models",
    ):
        assert section in md
    assert "python bench.py --report x" in md and "| 200.0 frames/s | yes |" in md
    assert "| dcn | 1 | fp32 | torchvision | 3.000 |" in md


@pytest.mark.slow
def test_report_part_out_of_time_is_skipped(tmp_path, stubbed, monkeypatch):
    def slow_workload(wl, paths, dtypes, device, weights, notes, cells=None, **kw):
        if wl["kind"] == "train":
            time.sleep(30)  # stopped by the alarm
        return fake_workload(wl, paths, dtypes, device, weights, notes, cells=cells)

    monkeypatch.setattr(report, "run_workload", slow_workload)
    monkeypatch.setattr(report, "REPORT_MARGIN", 0.0)
    start = time.monotonic()
    result = report.run_report(str(tmp_path), 1.5, torch.device("cpu"))
    assert time.monotonic() - start < 2.5
    models = result["parts"]["models"]
    assert models["status"] == "partial" and "ran out" in models["reason"]
    assert all("status" not in c for c in models["results"]["bvsrpp-180x320"].values())
    assert list(models["results"]) == list(report.REPORT_WORKLOADS)
    assert all(
        c == {"status": "skipped"}
        for k in ("bvsrpp-train", "realbasicvsr-480p")
        for c in models["results"][k].values()
    )
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["parts"]["models"]["status"] == "partial"
    assert "not measured" in [t["measured"] for t in saved["targets"]][5]  # the training speedup
    assert "| skipped | skipped |" in (tmp_path / "report.md").read_text()


def test_time_limit_stops_a_block():
    start = time.monotonic()
    with pytest.raises(report.OutOfTime, match="its share of the budget"):
        with report.time_limit(0.2, "part"):
            while True:
                pass
    assert time.monotonic() - start < 1.0
    with pytest.raises(report.OutOfTime, match="no time left"):
        with report.time_limit(0, "part"):
            pass


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--report", "OUT", "--budget", "-1"], "--budget"),
        (["--report", "FILE"], "--report"),
        (["--budget", "10"], "--budget"),
        (["--report", "OUT", "--budget", "soon"], "--budget"),
        (["--reps", "0"], "--reps"),
    ],
)
def test_bad_flag_is_one_error_line(argv, flag, tmp_path):
    (tmp_path / "FILE").write_text("")
    argv = [str(tmp_path / a) if a in ("OUT", "FILE") else a for a in argv]
    proc = run_bench(*argv)
    err = proc.stderr
    assert (
        proc.returncode != 0 and err.startswith("error: ") and err.count("\n") == 1 and flag in err
    ), err
    assert not (tmp_path / "OUT").exists()


@pytest.mark.slow
def test_bad_flag_from_the_command_line_has_no_traceback(tmp_path):
    proc = run_bench("--report", str(tmp_path), "--budget", "-1")
    assert (
        proc.returncode == 2
        and proc.stderr == "error: --budget must be a positive number of seconds, got -1\n"
    )
