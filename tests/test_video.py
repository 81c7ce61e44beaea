"""video.py: reading and writing videos and frame folders (the audio is tested through the command
line in test_upscale.py)."""

import os

import cv2
import numpy as np
import pytest

import files
import video


@pytest.mark.parametrize("name", ["clip.mp4", "clip.mkv", "frames"])
def test_video_roundtrip(tmp_path, name):
    rng = np.random.default_rng(4)
    frames = [
        cv2.GaussianBlur(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8), (0, 0), 2)
        for _ in range(9)
    ]
    path = str(tmp_path / name)
    with video.VideoWriter(path, fps=12.5) as w:
        for f in frames:
            w.write(f)
    assert os.listdir(tmp_path) == [name]  # the temporary was renamed
    r = video.read_video(path, fps=12.5 if name == "frames" else None)
    assert r.fps == 12.5 and (r.width, r.height) == (48, 32)
    if name != "clip.mkv":  # mkv does not store a frame count
        assert r.num_frames == 9
    out = list(r)
    assert len(out) == 9 and all(o.shape == (32, 48, 3) and o.dtype == np.uint8 for o in out)
    err = np.mean([np.abs(o.astype(float) - f).mean() for o, f in zip(out, frames)])
    assert err == 0 if name == "frames" else err < 3  # crf 18: close to the input
    assert video.read_video(str(tmp_path / "frames") if name == "frames" else path).fps == (
        25.0 if name == "frames" else 12.5
    )


def test_video_writer_odd_size_and_atomicity(tmp_path):
    path = str(tmp_path / "odd.mp4")
    with video.VideoWriter(path, 25) as w:
        for _ in range(3):
            w.write(np.full((33, 45, 3), 100, np.uint8))
    r = video.read_video(path)
    assert (r.height, r.width) == (34, 46) and len(list(r)) == 3
    with pytest.raises(FileExistsError, match="odd.mp4"):
        video.VideoWriter(path, 25)
    with pytest.raises(RuntimeError):
        with video.VideoWriter(str(tmp_path / "fail.mp4"), 25) as w:
            w.write(np.zeros((16, 16, 3), np.uint8))
            raise RuntimeError("interrupted")
    assert sorted(os.listdir(tmp_path)) == ["odd.mp4"]  # nothing half-written left behind
    with pytest.raises(
        ValueError, match="16x16"
    ):  # a frame folder keeps its complete frames (to resume)
        with video.VideoWriter(str(tmp_path / "fail"), 25) as w:
            w.write(np.zeros((16, 16, 3), np.uint8))
            w.write(np.zeros((8, 8, 3), np.uint8))
    assert os.listdir(tmp_path / "fail") == ["00000000.png"]
    with pytest.raises(RuntimeError):  # and leaves no empty folder
        with video.VideoWriter(str(tmp_path / "empty"), 25):
            raise RuntimeError("interrupted")
    assert sorted(os.listdir(tmp_path)) == ["fail", "odd.mp4"]


def test_video_writer_resumes_a_frame_folder(tmp_path):
    frames = [np.full((8, 8, 3), i, np.uint8) for i in range(4)]
    path = str(tmp_path / "frames")
    with pytest.raises(KeyboardInterrupt):
        with video.VideoWriter(path, 25) as w:
            w.write(frames[0])
            w.write(frames[1])
            raise KeyboardInterrupt
    open(
        os.path.join(path, "00000002.tmp-0123abcd.png"), "wb"
    ).close()  # a killed write's temporary
    with pytest.raises(FileExistsError, match="--resume"):
        video.VideoWriter(path, 25)
    kept = os.stat(os.path.join(path, "00000001.png"))
    with video.VideoWriter(path, 25, resume=True) as w:
        assert w.existing == {0, 1}
        w.keep()
        w.write(np.zeros((8, 8, 3), np.uint8))  # an existing frame stays untouched
        w.write(frames[2])
        w.write(frames[3])
    assert sorted(os.listdir(path)) == [f"{i:08d}.png" for i in range(4)]
    assert [o[0, 0, 0] for o in video.read_video(path)] == [0, 1, 2, 3]
    assert os.stat(os.path.join(path, "00000001.png")).st_mtime_ns == kept.st_mtime_ns
    with pytest.raises(ValueError, match="4x4"):  # frames of another size: another run
        with video.VideoWriter(path, 25, resume=True) as w:
            w.write(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="frame folder"):
        video.VideoWriter(str(tmp_path / "x.mp4"), 25, resume=True)


def test_read_video_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        video.read_video(str(tmp_path / "missing.mp4"))
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    with pytest.raises(ValueError, match="bad.mp4"):
        video.read_video(str(bad))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="empty"):
        video.read_video(str(tmp_path / "empty"))
    os.makedirs(tmp_path / "mixed")
    files.write_image(str(tmp_path / "mixed" / "0.png"), np.zeros((8, 8, 3), np.uint8))
    files.write_image(str(tmp_path / "mixed" / "1.png"), np.zeros((8, 10, 3), np.uint8))
    with pytest.raises(ValueError, match="1.png"):
        list(video.read_video(str(tmp_path / "mixed")))
