"""upscale.py: video and frame I/O, upscale() (scenes, chunks with context frames, tiles,
precision) and the command line, on CPU with tiny random-weight networks.

Bounds, from measurements with BasicVSR(8, 1) (random weights, CPU):
    8 frames of 32x32, chunk 3, to the whole-clip output: overlap 0: 52.4 dB, overlap 1: 59.1 dB,
        overlap 2: 65.8 dB (worst single frame 59.3 dB)
    4 frames of 64x96, tiles of 64 overlapping by 16 (32 after spreading), to the whole-frame
        output: 54.5 dB, max |difference| 4 grey levels
    bf16 autocast vs fp32, 3 frames of 32x32: 62.3 dB
"""

import itertools
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import basicvsr
import data
import files
import realbasicvsr
import synthetic
import upscale as ups
import video
import weights
from basicvsr import BasicVSR, BasicVSRPlusPlus
from upscale import plan_windows, tile_starts, upscale, upscale_window

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNK_PSNR = 58.0  # dB, chunk 3 with 2 context frames vs the whole clip (measured 65.8)
TILE_PSNR = 48.0  # dB, tiles vs whole frames (measured 54.5)
TILE_MAX_DIFF = 10  # grey levels, anywhere, including the blended band (measured 4)


def clip(seed, t, h, w=None):
    """t synthetic RGB uint8 frames of h x w (a crop of a square rendering)."""
    w = w or h
    return list(synthetic.synthetic_clip(seed, t, max(h, w))[0][:, :h, :w])


def psnr(a, b):
    mse = np.mean((np.stack(a).astype(np.float64) - np.stack(b).astype(np.float64)) ** 2)
    return 10 * math.log10(255**2 / mse) if mse else math.inf


def run(model, frames, **kw):
    kw = {"device": "cpu", "scene_threshold": 0, "tile": 0, **kw}
    return list(upscale(model, frames, **kw))


@pytest.fixture(scope="module")
def bvsr():
    torch.manual_seed(0)
    return BasicVSR(8, 1).eval()


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory, bvsr):
    """Saved random weights: BasicVSR(8, 1), BasicVSR++(8, 1), RealBasicVSR(8, 1, 1)."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(1)
    paths = {
        "basicvsr": root / "basicvsr.safetensors",
        "basicvsrpp": root / "basicvsrpp.safetensors",
        "realbasicvsr": root / "realbasicvsr.safetensors",
    }
    weights.save_weights(bvsr, paths["basicvsr"])
    weights.save_weights(BasicVSRPlusPlus(8, 1), paths["basicvsrpp"])
    weights.save_weights(realbasicvsr.RealBasicVSR(8, 1, 1), paths["realbasicvsr"])
    return {k: str(v) for k, v in paths.items()}


def write_frames(folder, frames):
    os.makedirs(folder, exist_ok=True)
    for i, f in enumerate(frames):
        files.write_image(os.path.join(folder, f"{i:04d}.png"), f)
    return str(folder)


def write_video(path, frames, fps):
    with video.VideoWriter(path, fps) as w:
        for f in frames:
            w.write(f)
    return str(path)


# ----------------------------------------------------------------------------------------
# Planning: windows over the stream, tiles over the frame


def test_plan_windows_keep_every_frame_once_and_never_cross_a_cut():
    for n, chunk, overlap, cuts in itertools.product(
        [1, 2, 7, 13], [1, 3, 5], [0, 1, 2], [(), (4,), (1, 6, 7)]
    ):
        cuts = {c for c in cuts if c < n}
        scene = np.cumsum([i in cuts for i in range(n)])
        kept = []
        for window, a, b in plan_windows(iter(range(n)), chunk, overlap, lambda f: f in cuts):
            assert window == list(range(window[0], window[-1] + 1))
            assert len(set(scene[window])) == 1, (n, chunk, overlap, cuts, window)
            assert len(window) <= chunk + 2 * overlap
            # as much context as the scene offers, up to `overlap` before; a run of at least
            # chunk + overlap frames where the scene has them (the tail reaches back)
            start, end = np.flatnonzero(scene == scene[window[0]])[[0, -1]]
            assert a == min(overlap, window[a] - start) or len(window) >= chunk + overlap
            assert len(window) >= min(end - start + 1, chunk + overlap)
            kept += window[a:b]
        assert kept == list(range(n)), (n, chunk, overlap, cuts)


def test_tiles_cover_the_frame_and_blend_to_the_whole_frame_result():
    for size, tile, overlap in [
        (64, 64, 16),
        (65, 64, 16),
        (100, 64, 8),
        (300, 96, 16),
        (257, 64, 32),
    ]:
        starts = tile_starts(size, tile, overlap)
        assert starts[0] == 0 and starts[-1] == max(0, size - tile)
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))
    # a pixel-wise x4 "network": tiling must reproduce the whole-frame output exactly, so the
    # blend weights sum to one everywhere and every tile lands where it belongs
    frames = clip(0, 3, 70, 150)

    def nearest_x4(lqs):
        return lqs.repeat_interleave(4, -1).repeat_interleave(4, -2).square()

    nearest_x4.scale = 4  # what upscale_window reads (weights.scale_of)
    whole = upscale_window(nearest_x4, frames, 1, 3, torch.device("cpu"), None)
    tiled = upscale_window(
        nearest_x4, frames, 1, 3, torch.device("cpu"), None, tile=64, tile_overlap=8
    )
    assert whole.shape == (2, 280, 600, 3)
    assert torch.equal(tiled, whole)


# ----------------------------------------------------------------------------------------
# Chunks, tiles, scenes and precision against whole-clip processing


def test_chunked_output_is_close_to_the_whole_clip(bvsr):
    frames = clip(1, 8, 32)
    whole = run(bvsr, frames, chunk=8, overlap=0)
    no_context = run(bvsr, frames, chunk=3, overlap=0)
    with_context = run(bvsr, frames, chunk=3, overlap=2)
    assert len(with_context) == 8 and with_context[0].shape == (128, 128, 3)
    assert psnr(with_context, whole) > CHUNK_PSNR
    # no seam: the worst frame (next to a chunk boundary) is within 6 dB of the clip's average
    assert min(psnr([a], [b]) for a, b in zip(with_context, whole)) > CHUNK_PSNR - 6
    assert psnr(no_context, whole) < psnr(with_context, whole) - 5  # the context frames matter


def test_cpu_run_is_channels_last_and_equals_the_nchw_network():
    # On the CPU upscale() converts the network to channels-last; its frames equal the NCHW
    # network's own output, rounded to uint8, to one grey level (the convolutions sum in another
    # order, so a value at x.5 levels may round either way).
    torch.manual_seed(0)
    net = BasicVSR(8, 1).eval()
    frames = clip(2, 3, 32)
    with torch.no_grad():
        lqs = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)[None].float() / 255
        expected = net(lqs)[0].clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy()
    assert not next(net.parameters()).is_contiguous(memory_format=torch.channels_last)
    got = run(net, frames, chunk=3, overlap=0)
    assert next(net.parameters()).is_contiguous(memory_format=torch.channels_last)
    diff = np.abs(np.stack(got).astype(int) - expected.astype(int))
    assert diff.max() <= 1


def test_tiled_output_is_close_to_the_whole_frame(bvsr):
    frames = clip(2, 4, 64, 96)  # two tiles of 64 sharing 32 LR columns (both axes: the test above)
    whole = run(bvsr, frames, chunk=4)
    tiled = run(bvsr, frames, chunk=4, tile=64, tile_overlap=16)
    assert psnr(tiled, whole) > TILE_PSNR
    diff = np.abs(np.stack(tiled).astype(int) - np.stack(whole))
    assert diff.max() <= TILE_MAX_DIFF
    # no step at a tile edge: the band where tiles are blended is no worse than the rest
    band = diff[:, :, 4 * 32 : 4 * 64].mean()
    assert band < 2 * diff.mean() + 0.5


def test_scene_cut_restarts_the_recurrence(bvsr):
    scene_a = clip(3, 3, 32)
    scene_b = [255 - f for f in clip(8, 2, 32)]  # an unrelated shot, far from scene_a in grey level
    both = scene_a + scene_b
    alone = run(bvsr, scene_a, chunk=8, overlap=2) + run(bvsr, scene_b, chunk=8, overlap=2)
    cut = run(bvsr, both, chunk=8, overlap=2, scene_threshold=20)
    assert all(np.array_equal(x, y) for x, y in zip(cut, alone)) and len(cut) == 5
    leaked = run(bvsr, both, chunk=8, overlap=2, scene_threshold=0)  # the test can fail: without
    assert not np.array_equal(leaked[3], alone[3])  # the cut, features leak


def test_bf16_close_to_fp32_and_fp16_refused_on_cpu(bvsr):
    frames = clip(5, 3, 32)
    fp32 = run(bvsr, frames, chunk=3)
    assert psnr(run(bvsr, frames, chunk=3, precision="bf16"), fp32) > 50  # measured 62.3
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        run(bvsr, frames, precision="fp16")


def test_frames_are_read_as_needed(bvsr):
    consumed = []

    def source():
        for i, f in enumerate(itertools.cycle(clip(6, 4, 32))):
            consumed.append(i)
            yield f

    stream = upscale(bvsr, source(), device="cpu", chunk=2, overlap=1, tile=0, scene_threshold=0)
    next(stream)
    assert len(consumed) == 3  # chunk + overlap frames, not the (endless) video
    stream.close()
    consumed.clear()
    assert len(run(bvsr, source(), chunk=2, overlap=1, max_frames=3)) == 3 and len(consumed) == 3


def test_automatic_settings_fit_the_budget(monkeypatch):
    model = BasicVSRPlusPlus()  # the published size, C = 64
    cpu = torch.device("cpu")
    monkeypatch.setattr(ups, "cpu_budget", lambda: 1 << 40)
    assert ups.choose_settings(model, 180, 320, cpu, overlap=2)[:2] == (ups.MAX_CHUNK, None)
    monkeypatch.setattr(ups, "cpu_budget", lambda: 2 << 30)
    chunk, tile, estimate, budget = ups.choose_settings(model, 480, 854, cpu, overlap=2)
    assert tile is not None and ups.MIN_TILE <= tile < 854 and tile % 32 == 0
    assert chunk >= ups.MIN_CHUNK and estimate <= budget
    # a larger tile would not have fitted MIN_CHUNK frames
    bigger = ups.estimate_memory(
        model, ups.MIN_CHUNK + 4, min(480, tile + 32), tile + 32, device="cpu"
    )
    assert bigger > budget
    # given settings are kept; features dominate: 5 maps x 64 channels x 4 bytes per LR pixel
    assert ups.choose_settings(model, 480, 854, cpu, chunk=7, overlap=1, tile=128)[:2] == (7, 128)
    per_frame = ups.estimate_memory(model, 2, 100, 100) - ups.estimate_memory(model, 1, 100, 100)
    assert 5 * 64 * 4 * 100 * 100 < per_frame < 2 * 5 * 64 * 4 * 100 * 100


def test_whole_frames_with_a_short_chunk_rather_than_tiles(monkeypatch):
    """A small BasicVSR++ (16 channels, 2 blocks) on 640x360 frames on CPU: whole frames whenever
    one frame with its context frames fits the budget, with as many frames as fit, an integer;
    tiles only when one frame does not fit."""
    model = BasicVSRPlusPlus(16, 2)
    cpu = torch.device("cpu")
    chunk, tile, estimate, budget = ups.choose_settings(model, 360, 640, cpu)
    assert type(chunk) is int and chunk >= 1 and estimate <= budget  # the default budget
    one = ups.estimate_memory(model, 1 + 2 * 4, 360, 640, device="cpu")
    five = ups.estimate_memory(model, 5 + 2 * 4, 360, 640, device="cpu")
    monkeypatch.setattr(ups, "cpu_budget", lambda: int(five + (five - one) / 8))  # 5.5 frames
    assert ups.choose_settings(model, 360, 640, cpu)[:2] == (5, None)  # fewer than MIN_CHUNK
    monkeypatch.setattr(ups, "cpu_budget", lambda: int(one * 0.99))
    chunk, tile, estimate, budget = ups.choose_settings(model, 360, 640, cpu)
    assert type(chunk) is int and chunk >= ups.MIN_CHUNK and tile is not None and tile < 640


# ----------------------------------------------------------------------------------------
# Command lines


def test_cli_video_in_video_out(tmp_path, weight_files, bvsr, capsys):
    src = write_video(tmp_path / "in.mp4", clip(7, 6, 32), fps=24)
    out = tmp_path / "out.mp4"
    rc = ups.main(
        [src, str(out), "--weights", weight_files["basicvsr"], "--device", "cpu", "--chunk", "3"]
    )
    assert rc == 0 and "estimated peak" in capsys.readouterr().err
    reader = video.read_video(out)
    frames = list(reader)
    assert (len(frames), reader.width, reader.height, reader.fps) == (6, 128, 128, 24)
    expected = run(bvsr, src, chunk=3, scene_threshold=20, tile=None)
    assert (
        psnr(frames, expected) > 30
    )  # H.264 crf 18 with 4:2:0 chroma on tiny busy frames: measured 34.1
    assert sorted(os.listdir(tmp_path)) == ["in.mp4", "out.mp4"]


def test_cli_folder_in_folder_out_realbasicvsr(tmp_path, weight_files):
    frames = clip(8, 3, 64, 80)
    src = write_frames(tmp_path / "in", frames)
    rc = ups.main(
        [src, str(tmp_path / "out"), "--weights", weight_files["realbasicvsr"], "--device", "cpu"]
    )
    assert rc == 0
    names = sorted(os.listdir(tmp_path / "out"))
    assert len(names) == 3
    model = realbasicvsr.RealBasicVSR(8, 1, 1, is_sequential_cleaning=True)
    weights.load_weights(model, weight_files["realbasicvsr"])
    expected = list(upscale(model, frames, device="cpu"))
    got = [files.read_image(str(tmp_path / "out" / n)) for n in names]
    assert got[0].shape == (256, 320, 3)
    assert all(np.array_equal(g, e) for g, e in zip(got, expected))  # PNG is lossless


def test_cli_basicvsrpp_is_the_default(tmp_path, weight_files):
    frames = clip(9, 2, 64)
    src = write_frames(tmp_path / "in", frames)
    rc = ups.main(
        [
            src,
            str(tmp_path / "out"),
            "--weights",
            weight_files["basicvsrpp"],
            "--device",
            "cpu",
            "--scene-threshold",
            "0",
        ]
    )
    assert rc == 0
    model = weights.load_weights(BasicVSRPlusPlus(8, 1), weight_files["basicvsrpp"]).eval()
    with torch.no_grad():
        expected = model(data.frames_to_tensor(frames)[None])[0]
    expected = expected.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy()
    got = np.stack(
        [files.read_image(str(tmp_path / "out" / n)) for n in sorted(os.listdir(tmp_path / "out"))]
    )
    # The command line feeds the network a permuted (h, w, 3) -> (3, h, w) view, the reference a
    # contiguous tensor: the convolutions round differently, and a value at x.5 grey levels may land
    # on either side (measured: 3 of 393,216 values one level apart).
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_cli_channels_last_and_compile_give_the_same_frames(tmp_path, weight_files, monkeypatch):
    """--channels-last converts the network, --compile runs compile_network on it (counted here,
    not compiled: test_basicvsr covers the compiled values); the frames equal the plain run's (to
    1 level)."""
    frames = clip(9, 2, 64)
    src = write_frames(tmp_path / "in", frames)
    args = [
        src,
        "--weights",
        weight_files["basicvsrpp"],
        "--device",
        "cpu",
        "--scene-threshold",
        "0",
    ]
    compiled = []
    monkeypatch.setattr(
        ups,
        "compile_network",
        lambda model: compiled.append(
            next(model.parameters()).is_contiguous(memory_format=torch.channels_last) or model
        ),
    )
    assert ups.main(args[:1] + [str(tmp_path / "plain")] + args[1:]) == 0
    assert (
        ups.main(args[:1] + [str(tmp_path / "nhwc")] + args[1:] + ["--channels-last", "--compile"])
        == 0
    )
    assert compiled == [True]  # compiled after the conversion
    for name in sorted(os.listdir(tmp_path / "plain")):
        a = files.read_image(str(tmp_path / "plain" / name)).astype(int)
        b = files.read_image(str(tmp_path / "nhwc" / name)).astype(int)
        assert np.abs(a - b).max() <= 1, name  # conv sums in another order may flip a rounding


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """name -> (INPUT, extra args, words the one-line message must contain)."""
    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    (root / "text.mp4").write_text("not a video")
    frames = clip(10, 2, 40)
    write_frames(root / "mixed", [frames[0], frames[1][:32, :32]])
    write_frames(root / "small", [f[:32, :32] for f in frames])
    torch.save({"conv.weight": torch.zeros(3, 3, 3, 3)}, root / "other.pth")
    weights.save_weights(basicvsr.SPyNet(), root / "spynet.safetensors")
    (root / "truncated.pth").write_bytes(b"PK\x03\x04" + bytes(100))
    return {  # weights "basicvsr" / "basicvsrpp" are the fixture's, others files made here
        "missing": (root / "nope.mp4", "basicvsr", [], ["not found", "nope.mp4"]),
        "not_a_video": (root / "text.mp4", "basicvsr", [], ["cannot read video", "text.mp4"]),
        "empty_folder": (root / "empty", "basicvsr", [], ["no image frames", "empty"]),
        "mixed_sizes": (
            root / "mixed",
            "basicvsr",
            ["--chunk", "8"],
            ["32x32", "40x40", "0001.png"],
        ),
        "too_small": (
            root / "small",
            "basicvsrpp",
            [],
            ["32x32", "too small for BasicVSRPlusPlus", "64x64"],
        ),
        "too_small_rbv": (
            root / "small",
            "realbasicvsr",
            [],
            ["32x32", "too small for RealBasicVSR", "64x64"],
        ),
        "other_network": (
            root / "small",
            str(root / "other.pth"),
            [],
            ["other.pth", "fits no network", "conv"],
        ),
        "spynet": (
            root / "small",
            str(root / "spynet.safetensors"),
            [],
            ["spynet.safetensors", "SPyNet", "--spynet-weights"],
        ),
        "truncated": (
            root / "small",
            str(root / "truncated.pth"),
            [],
            ["truncated.pth", "is the file complete"],
        ),
        "gif_output": (
            root / "small",
            "basicvsr",
            [],
            ["out.gif", ".gif is not a video container", "folder"],
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "not_a_video",
        "empty_folder",
        "mixed_sizes",
        "too_small",
        "too_small_rbv",
        "other_network",
        "spynet",
        "truncated",
    ],
)
@pytest.mark.parametrize("output", ["out.mp4", "out_frames"])
def test_cli_bad_input_is_one_line_and_leaves_nothing(
    tmp_path, weight_files, bad_inputs, capsys, case, output
):
    src, which, extra, words = bad_inputs[case]
    rc = ups.main(
        [
            str(src),
            str(tmp_path / output),
            "--weights",
            weight_files.get(which, which),
            "--device",
            "cpu",
        ]
        + extra
    )
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc != 0 and "Traceback" not in err
    assert len(errors) == 1 and all(w in errors[0] for w in words), err
    assert os.listdir(tmp_path) == []


def test_cli_gif_output_is_refused(tmp_path, weight_files, bad_inputs, capsys):
    src, which, extra, words = bad_inputs["gif_output"]
    assert (
        ups.main(
            [
                str(src),
                str(tmp_path / "out.gif"),
                "--weights",
                weight_files[which],
                "--device",
                "cpu",
            ]
        )
        == 1
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and all(w in errors[0] for w in words)
    assert os.listdir(tmp_path) == []


def test_cli_existing_output_needs_overwrite(tmp_path, weight_files, capsys):
    src = write_frames(tmp_path / "in", clip(13, 2, 32))
    (tmp_path / "out.mp4").write_bytes(b"keep me")
    args = [
        src,
        str(tmp_path / "out.mp4"),
        "--weights",
        weight_files["basicvsr"],
        "--device",
        "cpu",
    ]
    assert ups.main(args) == 1
    assert "output exists" in capsys.readouterr().err
    assert (tmp_path / "out.mp4").read_bytes() == b"keep me"
    assert ups.main(args + ["--overwrite"]) == 0
    assert len(list(video.read_video(tmp_path / "out.mp4"))) == 2
    assert sorted(os.listdir(tmp_path)) == ["in", "out.mp4"]


@pytest.mark.parametrize("failure", ["nan", "exception"])
def test_failure_mid_run_leaves_nothing(tmp_path, weight_files, monkeypatch, capsys, failure):
    src = write_frames(tmp_path / "in", clip(14, 5, 32))
    forward = BasicVSR.forward
    calls = []

    def failing_forward(self, lqs):  # the second chunk goes wrong
        calls.append(lqs.shape[1])
        if len(calls) == 2:
            if failure == "exception":
                raise RuntimeError("boom")
            return forward(self, lqs) * float("nan")
        return forward(self, lqs)

    monkeypatch.setattr(BasicVSR, "forward", failing_forward)
    out = tmp_path / ("out.mp4" if failure == "nan" else "out_frames")
    args = [
        src,
        str(out),
        "--weights",
        weight_files["basicvsr"],
        "--device",
        "cpu",
        "--chunk",
        "2",
        "--overlap",
        "0",
    ]
    if failure == "nan":
        assert ups.main(args) == 1
        assert "inf/NaN" in capsys.readouterr().err
    else:
        with pytest.raises(RuntimeError, match="boom"):
            ups.main(args)
    assert len(calls) == 2
    if failure == "nan":
        assert sorted(os.listdir(tmp_path)) == ["in"]
    else:  # a frame folder keeps the first window's frames, for --resume (frame 0: the clip cuts
        # after it)
        assert sorted(os.listdir(tmp_path)) == ["in", "out_frames"]
        assert sorted(os.listdir(out)) == ["00000000.png"]


# ----------------------------------------------------------------------------------------
# Audio: the input's audio streams go into an output video, copied (or AAC where the container
# cannot hold the codec), cut at the end of the written video with packet granularity

AAC_SNR = 25.0  # dB, pcm_u8 sine re-encoded to AAC vs the source (measured 31.4)


def write_video_with_audio(path, frames, fps, codec, sample_rate, layout, seconds=None):
    """H.264 frames and a 440 Hz sine in `codec`, `seconds` long (default: as long as the video)."""
    import av

    seconds = len(frames) / fps if seconds is None else seconds
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    sine = np.repeat(0.3 * np.sin(2 * np.pi * 440 * t)[None], av.AudioLayout(layout).nb_channels, 0)
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=fps)
        video.height, video.width = frames[0].shape[:2]
        video.pix_fmt = "yuv420p"
        audio = out.add_stream(codec, rate=sample_rate, layout=layout)
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts = i
            out.mux(video.encode(vf))
        for s in range(0, len(t), 1024):  # the encoder converts and regroups the samples
            af = av.AudioFrame.from_ndarray(
                sine[:, s : s + 1024].astype(np.float32), format="fltp", layout=layout
            )
            af.sample_rate = sample_rate
            af.pts = s
            out.mux(audio.encode(af))
        out.mux(video.encode())
        out.mux(audio.encode())
    return str(path)


def audio_of(path):
    """The audio streams of a file:
    [{codec, rate, channels, packets: [(start s, end s, bytes)], samples}]."""
    import av

    with av.open(str(path)) as c:
        streams = {
            s.index: {
                "codec": s.codec_context.codec.canonical_name,
                "rate": s.codec_context.sample_rate,
                "channels": s.codec_context.channels,
                "packets": [],
            }
            for s in c.streams.audio
        }
        for p in (
            c.demux(*c.streams.audio) if streams else []
        ):  # (no streams: demux() reads them all)
            if p.dts is not None:
                start = p.pts * p.time_base
                streams[p.stream.index]["packets"].append(
                    (start, start + p.duration * p.time_base, bytes(p))
                )
    streams = list(streams.values())
    for i, s in enumerate(streams):
        with av.open(str(path)) as c:
            s["samples"] = np.concatenate(
                [f.to_ndarray() for f in c.decode(c.streams.audio[i])], axis=1
            )
    return streams


def upscale_cli(src, out, weight_files, *extra):
    return ups.main(
        [str(src), str(out), "--weights", weight_files["basicvsr"], "--device", "cpu", *extra]
    )


@pytest.mark.parametrize(
    "ext, encoder, codec, sample_rate, layout",
    [(".mp4", "aac", "aac", 48000, "stereo"), (".mkv", "libmp3lame", "mp3", 44100, "mono")],
)
def test_cli_copies_the_audio(
    tmp_path, weight_files, capsys, ext, encoder, codec, sample_rate, layout
):
    src = write_video_with_audio(
        tmp_path / f"in{ext}", clip(15, 6, 32), 24, encoder, sample_rate, layout
    )
    out = tmp_path / f"out{ext}"
    assert upscale_cli(src, out, weight_files) == 0
    err = capsys.readouterr().err
    assert f"{codec} audio copied" in err and "note:" not in err
    (a_in,), (a_out,) = audio_of(src), audio_of(out)
    assert (a_out["codec"], a_out["rate"], a_out["channels"]) == (
        codec,
        sample_rate,
        1 + (layout == "stereo"),
    )
    # remuxed: the same packets, bytes and times, so the same decoded samples
    assert [p[2] for p in a_out["packets"]] == [p[2] for p in a_in["packets"]] and len(
        a_in["packets"]
    ) > 5
    assert [p[0] for p in a_out["packets"]] == [p[0] for p in a_in["packets"]]
    assert np.array_equal(a_out["samples"], a_in["samples"])
    assert len(list(video.read_video(out))) == 6
    end = a_out["packets"][-1][1]
    longest = max(p[1] - p[0] for p in a_out["packets"])
    assert abs(end - 6 / 24) <= longest  # as long as the video, within a packet
    assert sorted(os.listdir(tmp_path)) == sorted([f"in{ext}", f"out{ext}"])


def test_cli_max_frames_cuts_the_audio_at_the_video_end(tmp_path, weight_files):
    src = write_video_with_audio(tmp_path / "in.mp4", clip(16, 6, 32), 24, "aac", 44100, "mono")
    assert upscale_cli(src, tmp_path / "out.mp4", weight_files, "--max-frames", "3") == 0
    (a_in,), (a_out,) = audio_of(src), audio_of(tmp_path / "out.mp4")
    kept = [p for p in a_in["packets"] if p[0] < 3 / 24]  # packets that start within the 3 frames
    assert 3 < len(kept) < len(a_in["packets"])
    assert [p[2] for p in a_out["packets"]] == [p[2] for p in kept]
    assert 3 / 24 <= a_out["packets"][-1][1] < 3 / 24 + 1024 / 44100


def test_cli_reencodes_audio_the_container_cannot_hold(tmp_path, weight_files, capsys):
    # pcm_u8 goes into Matroska but not into MP4
    src = write_video_with_audio(tmp_path / "in.mkv", clip(17, 6, 32), 24, "pcm_u8", 22050, "mono")
    assert upscale_cli(src, tmp_path / "out.mp4", weight_files) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "pcm_u8" in notes[0] and "AAC" in notes[0], err
    (a_in,), (a_out,) = audio_of(src), audio_of(tmp_path / "out.mp4")
    assert (a_in["codec"], a_out["codec"], a_out["rate"], a_out["channels"]) == (
        "pcm_u8",
        "aac",
        22050,
        1,
    )
    # lossy but in place: the same sine at the same time (the MP4 edit list drops the AAC priming)
    x = (a_in["samples"][0].astype(np.float64) - 128) / 128
    y = a_out["samples"][0, : len(x)].astype(np.float64)
    assert len(a_out["samples"][0]) - len(x) < 1024 and len(x) == 22050 // 4
    inner = slice(500, len(x) - 500)  # away from the encoder's edge effects
    snr = 10 * math.log10(np.mean(x[inner] ** 2) / np.mean((y[inner] - x[inner]) ** 2))
    assert snr > AAC_SNR, snr


def test_cli_no_audio(tmp_path, weight_files, capsys):
    with_audio = write_video_with_audio(
        tmp_path / "a.mp4", clip(18, 3, 32), 24, "aac", 44100, "mono"
    )
    silent = write_video(tmp_path / "b.mp4", clip(18, 3, 32), fps=24)
    folder = write_frames(tmp_path / "c", clip(18, 3, 32))
    for src, name, extra in [
        (with_audio, "a_out.mp4", ["--no-audio"]),
        (silent, "b_out.mp4", []),
        (folder, "c_out.mp4", []),
    ]:
        assert upscale_cli(src, tmp_path / name, weight_files, *extra) == 0
        assert audio_of(tmp_path / name) == [] and len(list(video.read_video(tmp_path / name))) == 3
    err = capsys.readouterr().err
    assert "audio copied" not in err and "AAC" not in err
    # another frame rate would make the audio drift: refused, unless it is dropped
    assert upscale_cli(with_audio, tmp_path / "d.mp4", weight_files, "--fps", "30") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: fps 30 differs from the 24 fps") and "--no-audio" in err
    assert (
        upscale_cli(with_audio, tmp_path / "d.mp4", weight_files, "--fps", "30", "--no-audio") == 0
    )
    assert video.read_video(tmp_path / "d.mp4").fps == 30


@pytest.mark.parametrize("when", ["write", "close"])
def test_cli_audio_failure_is_one_line_and_leaves_nothing(
    tmp_path, weight_files, monkeypatch, capsys, when
):
    import av

    src = write_video_with_audio(tmp_path / "in.mp4", clip(19, 4, 32), 24, "aac", 44100, "mono")
    if when == "write":  # the source's audio turns out broken after two packets
        open_video = video.VideoWriter._open_video

        def open_broken(self):
            open_video(self)
            packets = self._packets

            def broken():
                yield next(packets)
                yield next(packets)
                raise av.error.InvalidDataError(22, "Invalid data found when processing input")

            self._packets = broken()

        monkeypatch.setattr(video.VideoWriter, "_open_video", open_broken)
        words = ["cannot write the audio of", "in.mp4", "InvalidDataError"]
    else:  # the last audio, muxed while the file is finished, fails
        mux_audio = video.VideoWriter._mux_audio

        def mux_failing_at_the_end(self, end, flush=False):
            if flush:
                raise OSError(28, "No space left on device")
            return mux_audio(self, end)

        monkeypatch.setattr(video.VideoWriter, "_mux_audio", mux_failing_at_the_end)
        words = ["No space left on device"]
    assert upscale_cli(src, tmp_path / "out.mp4", weight_files) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and all(w in errors[0] for w in words) and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["in.mp4"]


# ----------------------------------------------------------------------------------------
# x1 restoration models and the self-ensemble


def to_uint8(x):
    return x.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy()


def test_x1_model_pads_runs_and_crops_back(tmp_path, capsys):
    """A BasicVSR++ with is_low_res_input=False (deblur, denoise, decompression), saved as mmagic
    publishes it: upscale.py finds it in the file alone and returns frames of the input's size,
    equal to the network run on edge-padded frames (256x256, the smallest it takes) cropped back."""
    torch.manual_seed(5)
    net = BasicVSRPlusPlus(8, 1, is_low_res_input=False).eval()
    torch.save(
        {"state_dict": {f"generator.{k}": v for k, v in net.state_dict().items()}},
        tmp_path / "x1.pth",
    )
    frames = clip(15, 3, 40, 52)
    src = write_frames(tmp_path / "in", frames)
    assert (
        ups.main(
            [src, str(tmp_path / "out"), "--weights", str(tmp_path / "x1.pth"), "--device", "cpu"]
        )
        == 0
    )
    assert "52x40 -> 52x40, BasicVSRPlusPlus" in capsys.readouterr().err
    got = np.stack(
        [files.read_image(str(tmp_path / "out" / n)) for n in sorted(os.listdir(tmp_path / "out"))]
    )
    padded = np.stack(
        [np.pad(f, ((0, 256 - 40), (0, 256 - 52), (0, 0)), mode="edge") for f in frames]
    )
    with torch.no_grad():
        expected = to_uint8(net(data.frames_to_tensor(padded)[None])[0])[:, :40, :52]
    # the same values reach the network by two routes (a padded tensor vs padded uint8 frames):
    # rounding at x.5 grey levels may differ by one level
    assert got.shape == (3, 40, 52, 3) and np.abs(got.astype(int) - expected).max() <= 1


@pytest.mark.slow
@pytest.mark.parametrize("ensemble", ["spatial", "temporal"])
def test_self_ensemble_is_the_mean_of_the_dihedral_passes(bvsr, ensemble):
    """--ensemble: the mean over the 8 rotations/reflections (written here with rot90, not with
    the flips and transposes upscale.py uses), and the time-reversed clip too with
    --temporal-ensemble."""
    frames = clip(16, 3, 32, 40)
    got = np.stack(run(bvsr, frames, ensemble=ensemble))
    lqs = data.frames_to_tensor(frames)[None]
    outs = []
    with torch.no_grad():
        for reflect in (False, True):
            for k in range(4):
                x = torch.rot90(lqs.flip(-1) if reflect else lqs, k, dims=(-2, -1))
                for reverse in (False, True) if ensemble == "temporal" else (False,):
                    y = bvsr(x.flip(1) if reverse else x)
                    y = torch.rot90(y.flip(1) if reverse else y, -k, dims=(-2, -1))
                    outs.append(y.flip(-1) if reflect else y)
    assert len(outs) == (16 if ensemble == "temporal" else 8)
    expected = to_uint8(torch.stack(outs).mean(0)[0])
    # the same 8 (16) outputs summed in another order: float rounding may move a value across x.5
    assert np.abs(got.astype(int) - expected).max() <= 1
    single = np.stack(run(bvsr, frames))
    assert np.abs(single.astype(int) - expected).max() > 1  # the ensemble is not the plain pass


def test_cli_ensemble_prints_its_cost(tmp_path, weight_files, capsys):
    src = write_frames(tmp_path / "in", clip(17, 2, 32))
    args = [src, str(tmp_path / "out"), "--weights", weight_files["basicvsr"], "--device", "cpu"]
    assert ups.main(args + ["--temporal-ensemble"]) == 1
    assert "error: --temporal-ensemble adds to --ensemble" in capsys.readouterr().err
    assert ups.main(args + ["--ensemble", "--temporal-ensemble"]) == 0
    assert "temporal self-ensemble: 16 passes, 16x the time" in capsys.readouterr().err


def test_out_of_memory_halves_the_window_then_the_tile(bvsr, monkeypatch, capsys):
    """A window that does not fit (simulated: more than 3 frames of over 32 px, or frames over
    32 px, raise torch.OutOfMemoryError as CUDA would) is run in halves, each with the window's
    context frames, then down to one frame in tiles of half the size; notes say so. The output
    stays within the chunked and tiled bounds of the whole-clip run."""
    frames = clip(19, 6, 48)
    whole = run(bvsr, frames)
    forward = ups._forward

    def forward_or_oom(model, lqs, dtype, desc):
        if lqs.shape[1] > 3 and lqs.shape[-1] > 32:
            raise torch.OutOfMemoryError("simulated")
        return forward(model, lqs, dtype, desc)

    monkeypatch.setattr(ups, "_forward", forward_or_oom)
    got = run(bvsr, frames, chunk=4, overlap=1)
    err = capsys.readouterr().err
    assert "note: out of memory on cpu for 4 frames: running 2 and 2" in err
    assert "tiles of 24 px" not in err  # halving the window was enough
    assert len(got) == 6 and psnr(got, whole) > TILE_PSNR
    monkeypatch.setattr(ups, "MIN_TILE", 16)
    monkeypatch.setattr(
        ups,
        "_forward",
        lambda model, lqs, dtype, desc: (
            forward(model, lqs, dtype, desc)
            if lqs.shape[-1] <= 32
            else (_ for _ in ()).throw(torch.OutOfMemoryError("simulated"))
        ),
    )
    got = run(bvsr, frames[:2], chunk=1, overlap=1)
    err = capsys.readouterr().err
    assert "for one frame and 1 context frames: running it with 0" in err
    assert "note: out of memory on cpu for one frame: tiles of 24 px" in err
    # then each frame ran alone in tiles of 24: the same computation as
    # --chunk 1 --overlap 0 --tile 24
    assert (
        psnr(got, run(bvsr, frames[:2], chunk=1, overlap=0, tile=24, tile_overlap=12)) == math.inf
    )


@pytest.mark.slow
def test_cpu_memory_estimate_within_25_percent_of_the_peak_rss():
    """The printed estimate on CPU against the measured peak RSS of a fresh process upscaling one
    window (RealBasicVSR(16, 2, 2), 10 frames of 90x160: 597 MB estimated, 682 MB measured here).
    The peak is the kernel's VmHWM of the new address space: ru_maxrss would carry over the forking
    pytest process's own peak through exec."""
    code = (
        "import sys, numpy as np, torch; sys.path.insert(0, %r); import realbasicvsr, upscale\n"
        "torch.manual_seed(0)\n"
        "m = realbasicvsr.RealBasicVSR(16, 2, 2, is_sequential_cleaning=True).eval()\n"
        "frames = [np.random.default_rng(i).integers(0, 256, (90, 160, 3), dtype=np.uint8)\n"
        "          for i in range(10)]\n"
        "est = upscale.estimate_memory(m, 10, 90, 160, 'fp32', 'cpu')\n"
        "list(upscale.upscale(m, frames, device='cpu', chunk=10, overlap=0, tile=0,\n"
        "                     scene_threshold=0))\n"
        "hwm = next(line for line in open('/proc/self/status') if line.startswith('VmHWM'))\n"
        "print(est / (int(hwm.split()[1]) * 1024))" % ROOT
    )
    run_ = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="2"),
    )
    assert run_.returncode == 0, run_.stderr[-2000:]
    assert 0.75 < float(run_.stdout.split()[-1]) < 1.25


def test_x2_weights_need_no_flag(tmp_path, capsys):
    """A x2 network's safetensors say scale 2; upscale.py makes frames of twice the size, equal to
    the network's own forward pass (within one grey level: see
    test_cli_basicvsrpp_is_the_default)."""
    torch.manual_seed(6)
    net = BasicVSR(8, 1, scale=2).eval()
    weights.save_weights(net, tmp_path / "x2.safetensors")
    frames = clip(18, 3, 32, 48)
    src = write_frames(tmp_path / "in", frames)
    assert (
        ups.main(
            [
                src,
                str(tmp_path / "out"),
                "--weights",
                str(tmp_path / "x2.safetensors"),
                "--device",
                "cpu",
                "--scene-threshold",
                "0",
            ]
        )
        == 0
    )
    assert "48x32 -> 96x64, BasicVSR" in capsys.readouterr().err
    got = np.stack(
        [files.read_image(str(tmp_path / "out" / n)) for n in sorted(os.listdir(tmp_path / "out"))]
    )
    with torch.no_grad():
        expected = to_uint8(net(data.frames_to_tensor(frames)[None])[0])
    assert got.shape == (3, 64, 96, 3) and np.abs(got.astype(int) - expected).max() <= 1


# ----------------------------------------------------------------------------------------
# Several processes (torchrun) and --resume. Two CPU processes, each with one thread, must give the
# one-process frames within one grey level: the reference here runs with the test's thread count,
# and convolutions summed in another order may round a value at x.5 grey levels either way.


def two_scenes():
    """9 frames of 32x32: 5 of one scene, then 4 of an inverted other one (a scene cut at 5)."""
    return clip(30, 5, 32) + [255 - f for f in clip(31, 4, 32)]


def torchrun(*args, script=None, timeout=120):
    """`python -m torch.distributed.run --nproc_per_node=2 upscale.py ARGS` (or `script`), one
    thread each."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        script or os.path.join(ROOT, "upscale.py"),
        *map(str, args),
    ]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


def frames_of(folder):
    return [files.read_image(str(folder / n)).astype(int) for n in sorted(os.listdir(folder))]


def assert_same_frames(got, expected):
    assert len(got) == len(expected)
    assert max(np.abs(g - e).max() for g, e in zip(got, expected)) <= 1


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, weight_files):
    """INPUT, the flags, and the frames of the one-process run (chunk 2, 1 context frame:
    5 windows)."""
    root = tmp_path_factory.mktemp("one_process")
    src = write_frames(root / "in", two_scenes())
    flags = [
        "--weights",
        weight_files["basicvsr"],
        "--device",
        "cpu",
        "--chunk",
        "2",
        "--overlap",
        "1",
        "--tile",
        "0",
    ]
    assert ups.main([src, str(root / "out")] + flags) == 0
    return src, flags, frames_of(root / "out")


@pytest.mark.slow
def test_two_processes_give_the_one_process_frames(tmp_path, one_process):
    src, flags, expected = one_process
    run_ = torchrun(src, tmp_path / "out", *flags)
    assert run_.returncode == 0, run_.stderr[-3000:]
    assert_same_frames(frames_of(tmp_path / "out"), expected)
    # rank 0 alone prints: the settings once, the summary once
    assert (
        run_.stderr.count("upscale: 32x32 -> 128x128") == 1
        and run_.stderr.count("out: 9 frames") == 1
    )


@pytest.mark.slow
def test_a_failing_rank_stops_all_and_the_folder_resumes(tmp_path, one_process):
    """Rank 1 fails in its second window (the second round of 5 windows, 2 per round): both stop,
    rank 0 prints one line, then rank 1 its error; the folder keeps the first round's 4 frames, and
    --resume with two processes completes it to the one-process frames, those 4 untouched."""
    src, flags, expected = one_process
    script = tmp_path / "failing.py"
    script.write_text(
        f"import os, sys\nsys.path.insert(0, {ROOT!r})\nimport upscale\n"
        "runs = []\n"
        "window = upscale.upscale_window\n"
        "def failing(*args, **kwargs):\n"
        "    runs.append(1)\n"
        "    if os.environ['RANK'] == '1' and len(runs) == 2:\n"
        "        raise ValueError('boom on rank 1')\n"
        "    return window(*args, **kwargs)\n"
        "upscale.upscale_window = failing\nsys.exit(upscale.main())\n"
    )
    out = tmp_path / "out"
    run_ = torchrun(src, out, *flags, script=script)
    errors = sorted(line for line in run_.stderr.splitlines() if line.startswith("error: "))
    # (torchrun's launcher prints its own traceback of the failed run; the ranks print none)
    assert run_.returncode != 0 and f'{ROOT}/upscale.py", line' not in run_.stderr, run_.stderr[
        -3000:
    ]
    assert errors == [
        "error: boom on rank 1",
        f"error: rank 1 of the run failed (its error line follows); {out} keeps "
        f"its complete frames: the same command with --resume finishes it",
    ]
    assert sorted(os.listdir(out)) == [f"{i:08d}.png" for i in range(4)]
    kept = {n: os.stat(out / n) for n in os.listdir(out)}
    run_ = torchrun(src, out, *flags, "--resume")
    assert run_.returncode == 0, run_.stderr[-3000:]
    assert "out: 9 frames of 128x128 (4 kept from the interrupted run)" in run_.stderr
    assert_same_frames(frames_of(out), expected)
    assert all(
        (os.stat(out / n).st_mtime_ns, os.stat(out / n).st_ino) == (s.st_mtime_ns, s.st_ino)
        for n, s in kept.items()
    )


def test_interrupted_folder_resumes_to_the_same_frames(tmp_path, one_process, monkeypatch, capsys):
    """Ctrl-C after 3 frames were written leaves them; --resume skips the first window (frames 0,
    1), reruns the second (frame 2 is kept, 3 written) and the rest: the uninterrupted run's
    frames."""
    src, flags, expected = one_process
    out, write = tmp_path / "out", video.VideoWriter.write

    def interrupted_write(self, frame):
        if self.count == 3:
            raise KeyboardInterrupt
        write(self, frame)

    monkeypatch.setattr(video.VideoWriter, "write", interrupted_write)
    assert ups.main([src, str(out)] + flags) == 130
    assert (
        f"{out} keeps its complete frames: the same command with --resume finishes it"
        in capsys.readouterr().err
    )
    assert sorted(os.listdir(out)) == [f"{i:08d}.png" for i in range(3)]
    kept = {n: os.stat(out / n) for n in os.listdir(out)}
    monkeypatch.setattr(video.VideoWriter, "write", write)
    assert ups.main([src, str(out)] + flags) == 1  # without --resume an existing OUTPUT is refused
    assert "--resume completes an interrupted frame folder" in capsys.readouterr().err
    runs, window = [], ups.upscale_window
    monkeypatch.setattr(
        ups, "upscale_window", lambda *a, **k: runs.append(a[3] - a[2]) or window(*a, **k)
    )
    assert ups.main([src, str(out)] + flags + ["--resume"]) == 0
    assert runs == [2, 1, 2, 2]  # the windows of frames 2-3, 4, 5-6, 7-8: the first was skipped
    assert_same_frames(frames_of(out), expected)
    assert all(
        (os.stat(out / n).st_mtime_ns, os.stat(out / n).st_ino) == (s.st_mtime_ns, s.st_ino)
        for n, s in kept.items()
    )


def test_resume_of_a_video_output_is_refused(tmp_path, one_process, capsys):
    src, flags, _ = one_process
    assert ups.main([src, str(tmp_path / "out.mp4")] + flags + ["--resume"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and all(
        w in errors[0] for w in ["--resume", "out.mp4", "H.264", "frame folder"]
    )
    assert os.listdir(tmp_path) == []
