"""Video and frame-folder I/O for upscale.py: frames stream in (VideoReader) and out (VideoWriter:
H.264 with the input's audio, written under a temporary name and moved into place only when
complete; or PNG frames, each written atomically straight into the folder, so that an interrupted
run can be resumed).
"""

import contextlib
import functools
import os
import re
import shutil

import cv2
import numpy as np

from files import atomic_path, list_frames, read_image, write_image

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")
WRITTEN_VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".avi", ".m4v")  # the containers that take H.264


class VideoReader:
    """Frames of a video file (PyAV, decoded one at a time) or of a frame folder (sorted), as RGB
    uint8 (h, w, 3). Attributes: fps (frame folders: `fps` or 25), num_frames (None if the
    container does not say), width, height. Iterating again restarts from the first frame."""

    def __init__(self, path, fps=None):
        self.path = os.fspath(path)
        if os.path.isdir(self.path):
            self.frame_paths = list_frames(self.path)
            first = read_image(self.frame_paths[0])
            self.height, self.width = first.shape[:2]
            self.num_frames = len(self.frame_paths)
            self.fps = float(fps or 25.0)
            self.notes = _conversions(
                cv2.imread(self.frame_paths[0], cv2.IMREAD_UNCHANGED), self.path
            )
            return
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"video or frame folder not found: {self.path}")
        import av

        self.frame_paths = None
        try:
            with av.open(self.path) as container:
                if not container.streams.video:
                    raise ValueError(f"no video stream in: {self.path}")
                stream = container.streams.video[0]
                rate = stream.average_rate or stream.guessed_rate
                self.width, self.height = stream.codec_context.width, stream.codec_context.height
                self.notes = _conversions(stream.codec_context.format.name, self.path)
                self.num_frames = int(stream.frames) or None
        except (av.error.FFmpegError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read video ({e.__class__.__name__}): {self.path}") from None
        if fps is None and not rate:
            raise ValueError(f"video has no frame rate, pass fps: {self.path}")
        self.fps = float(fps or rate)

    def __len__(self):
        if self.num_frames is None:
            raise TypeError(f"frame count unknown for {self.path}")
        return self.num_frames

    def __iter__(self):
        if self.frame_paths is not None:
            for p in self.frame_paths:
                frame = read_image(p)
                if frame.shape[:2] != (self.height, self.width):
                    raise ValueError(
                        f"frame size {frame.shape[1]}x{frame.shape[0]} differs from "
                        f"{self.width}x{self.height} of the first frame: {p}"
                    )
                yield frame
            return
        import av

        try:
            with av.open(self.path) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for frame in container.decode(stream):
                    yield frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as e:
            raise ValueError(f"cannot decode video ({e.__class__.__name__}): {self.path}") from None


def _conversions(first, path):
    """The notes for frames that are not 8-bit RGB, from the first frame read as it is (a frame
    folder) or from the pixel format (a video): they are converted to it as they are read."""
    notes = []
    if isinstance(first, str):  # FFmpeg's pixel format, e.g. gray, rgba, yuv420p10le
        if first.startswith(("gray", "ya")):
            notes.append(f"{path}: grayscale frames ({first}), upscaled as RGB")
        if first.startswith(("yuva", "gbrap", "ya")) or any(
            c in first for c in ("rgba", "bgra", "argb", "abgr")
        ):
            notes.append(f"{path}: the frames' alpha channel ({first}) is dropped")
        if any(bits in first for bits in ("10", "12", "14", "16")):
            notes.append(f"{path}: {first} frames have more than 8 bits per channel: reduced to 8")
    elif first is not None:
        if first.ndim == 2 or first.shape[2] == 1:
            notes.append(f"{path}: grayscale frames, upscaled as RGB")
        elif first.shape[2] == 4:
            notes.append(f"{path}: the frames' alpha channel (RGBA) is dropped")
        if first.dtype != np.uint8:
            notes.append(
                f"{path}: {first.dtype} frames ({8 * first.itemsize}-bit) reduced to 8 bits per "
                "channel"
            )
    return notes


def read_video(path, fps=None):
    """A VideoReader over a video file or a frame folder; see VideoReader."""
    return VideoReader(path, fps)


class VideoWriter:
    """Write RGB uint8 frames to a video (by extension: .mp4/.mov/.mkv/...; H.264 via libx264,
    crf 18, yuv420p) or, for any other path, to a folder of {index:08d}.png frames.

    audio_from: a video file whose audio streams go into the output video (frame folders take
    none). A stream is copied packet for packet where the container can hold its codec, else
    re-encoded to AAC; .audio lists (codec, "copy" | "aac") per stream. The audio is cut at the
    end of the written video with packet granularity: packets starting at or after the end of the
    last frame are dropped, so it ends less than one packet (AAC at 44.1 kHz: 23 ms) after the
    video. Its timing is kept, so fps must be the source's frame rate (else the audio would drift).

    A video goes to a temporary sibling, renamed to `path` by close(); used as a context manager,
    an exception removes the temporary instead. A folder is made at the first frame and each frame
    is written atomically into it, so a failure or an interruption leaves its complete frames (and
    an empty folder is removed). An existing `path` is an error unless overwrite=True (replaced at
    the first frame) or, for a folder, resume=True: the frames it holds are kept untouched
    (.existing, their indices; write() skips them, keep() counts one) and the run completes it.
    Odd frame sizes are padded by one replicated row/column for yuv420p."""

    def __init__(
        self, path, fps, crf=18, overwrite=False, compression=3, audio_from=None, resume=False
    ):
        from fractions import Fraction

        self.path = os.fspath(path)
        ext = os.path.splitext(self.path)[1].lower()
        self.is_video = ext in WRITTEN_VIDEO_EXTS
        if resume and (self.is_video or overwrite):
            raise ValueError(f"resume=True needs a frame folder and no overwrite: {self.path}")
        self.existing = set()  # indices of the frames kept from an interrupted run (resume)
        if (
            os.path.exists(self.path)
            and not overwrite
            and not (resume and os.path.isdir(self.path))
        ):
            raise FileExistsError(
                "output exists (pass overwrite=True, or --overwrite on the command line, to "
                "replace it"
                f"{'' if self.is_video else '; --resume completes an interrupted frame folder'}): "
                f"{self.path}"
            )
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"output folder not found: {parent}")
        if not fps or fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}: {self.path}")
        if ext and not self.is_video and not os.path.isdir(self.path):
            raise ValueError(
                f"OUTPUT {self.path}: {ext} is not a video container this writes "
                f"({' '.join(WRITTEN_VIDEO_EXTS)}); for PNG frames name a folder without an "
                "extension"
            )
        self._out = atomic_path(self.path) if self.is_video else None
        self.tmp = self._out.tmp if self.is_video else None
        self._replace = overwrite and os.path.lexists(self.path)
        self._made = self._created = False  # the folder is ready for frames; this writer made it
        if resume and os.path.isdir(self.path):
            self._made = True  # the folder is this output's: the frames go straight in
            for name in os.listdir(self.path):
                if re.fullmatch(r"\d{8}\.png", name):
                    self.existing.add(int(name[:8]))
                elif re.fullmatch(
                    rf"\d{{8}}{re.escape(atomic_path.TAG)}[0-9a-f]{{8}}\.png", name
                ):  # a killed write
                    os.remove(os.path.join(self.path, name))
        self.fps = fps
        self.crf = crf
        self.compression = compression
        self.rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1001)
        self.size = None  # (h, w) of the first frame written
        self.count = 0  # frames written or kept
        self._container = None  # the output video, opened at the first frame
        self.audio = []  # (codec, "copy" or "aac") per audio stream of audio_from
        self._source = None  # audio_from, open while it has audio to copy
        if self.is_video and audio_from is not None:
            self._plan_audio(os.fspath(audio_from))

    def _plan_audio(self, source):
        """Open `source` and choose, per audio stream, a copy or (the container cannot hold the
        codec) AAC."""
        import av

        try:
            self._source = av.open(source)
        except (av.error.FFmpegError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read audio ({e.__class__.__name__}): {source}") from None
        try:
            streams = self._source.streams
            video = streams.video[0] if streams.video else None
            # output time 0 is the source's first video frame
            self._audio_start = (
                video.start_time * video.time_base if video and video.start_time else 0
            )
            rate = video and (video.average_rate or video.guessed_rate)
            if streams.audio and rate and abs(rate - self.rate) > 1e-3 * rate:
                raise ValueError(
                    f"fps {float(self.rate):g} differs from the {float(rate):g} fps of {source}, "
                    f"whose audio would drift (drop it: audio_from=None, --no-audio): {self.path}"
                )
            for stream in streams.audio:
                codec = (
                    stream.codec_context.codec.canonical_name
                )  # "mp3", not the decoder's "mp3float"
                if self._takes(lambda probe: probe.add_stream_from_template(stream)):
                    self.audio.append((codec, "copy"))
                elif self._takes(lambda probe: self._add_aac(probe, stream)):
                    self.audio.append((codec, "aac"))
                else:
                    ctx = stream.codec_context
                    raise ValueError(
                        f"the container takes neither the {codec} audio of {source} nor AAC at "
                        f"{ctx.sample_rate} Hz, {ctx.layout.name} (drop it: audio_from=None, "
                        f"--no-audio): {self.path}"
                    )
        except BaseException:
            self._source.close()
            raise
        if not self.audio:
            self._source.close()
            self._source = None

    def _takes(self, add_stream):
        """Whether the output's container format takes the stream that add_stream(container) adds:
        writes the header of an in-memory file of that format."""
        import io

        import av

        probe_file = io.BytesIO()
        probe_file.name = self.path  # the format comes from the extension
        with av.open(probe_file, "w") as probe:
            try:
                add_stream(probe)
                probe.start_encoding()
            except (ValueError, av.error.FFmpegError):
                return False
        return True

    @staticmethod
    def _add_aac(container, source_stream):
        """An AAC stream with the source's sample rate and channels."""
        import av

        ctx = source_stream.codec_context
        layout = ctx.layout
        if layout.name.endswith(
            " channels"
        ):  # channel order unknown: FFmpeg's default for that count
            layout = av.AudioLayout(f"{layout.nb_channels}c")
        return container.add_stream("aac", rate=ctx.sample_rate, layout=layout)

    def write(self, frame):
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(
                f"frames must be RGB uint8 (h, w, 3), got {frame.dtype} {frame.shape}: {self.path}"
            )
        if self.size is None:
            self.size = frame.shape[:2]
            if self.is_video:
                self._open_video()
            else:
                self._open_folder()
        elif frame.shape[:2] != self.size:
            raise ValueError(
                f"frame {self.count} is {frame.shape[1]}x{frame.shape[0]}, the video is "
                f"{self.size[1]}x{self.size[0]}: {self.path}"
            )
        if self.is_video:
            import av

            pad = ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0))
            vf = av.VideoFrame.from_ndarray(
                np.pad(frame, pad, mode="edge"), format="rgb24"
            ).reformat(format="yuv420p")
            vf.pts = self.count
            for packet in self._stream.encode(vf):
                self._container.mux(packet)
            if self.audio:  # interleaved: the audio up to the end of this frame
                self._mux_audio((self.count + 1) / self.rate)
        elif self.count not in self.existing:  # a kept frame stays untouched
            write_image(os.path.join(self.path, f"{self.count:08d}.png"), frame, self.compression)
        self.count += 1

    def keep(self):
        """Count the next frame as one kept from the interrupted run (resume=True)."""
        if self.count not in self.existing:
            raise ValueError(f"frame {self.count} is not in {self.path}: it cannot be kept")
        self.count += 1

    def _open_folder(self):
        """Make the folder (replacing the old output with overwrite=True), or, resuming, check that
        the kept frames have the size of this run's."""
        if self._made and self.existing:
            kept = read_image(os.path.join(self.path, f"{min(self.existing):08d}.png")).shape[:2]
            if kept != self.size:
                raise ValueError(
                    f"the frames in {self.path} are {kept[1]}x{kept[0]}, this run makes "
                    f"{self.size[1]}x{self.size[0]}: another input or network? --overwrite "
                    "starts again"
                )
        if self._made:
            return
        if self._replace:
            if os.path.isdir(self.path) and not os.path.islink(self.path):
                shutil.rmtree(self.path)
            else:
                os.remove(self.path)
        os.makedirs(self.path)
        self._made = self._created = True

    def _open_video(self):
        import av

        check_video_codec("libx264")
        self._container = av.open(self.tmp, "w")
        self._stream = self._container.add_stream("libx264", rate=self.rate)
        self._stream.height, self._stream.width = (
            self.size[0] + self.size[0] % 2,
            self.size[1] + self.size[1] % 2,
        )
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = {"crf": str(self.crf)}
        if self.audio:
            sources = list(self._source.streams.audio)
            self._audio_out = {}  # source stream index -> (output stream, mode)
            for src, (codec, mode) in zip(sources, self.audio):
                if mode == "copy":
                    out = self._container.add_stream_from_template(src)
                else:
                    out = self._add_aac(self._container, src)
                if src.language:
                    out.metadata["language"] = src.language
                self._audio_out[src.index] = out, mode
            self._packets = (p for p in self._source.demux(*sources) if p.dts is not None)
            self._packet = None  # the next source packet, read ahead
            self._audio_pts = {}  # output stream index -> pts of the next re-encoded sample

    def _mux_audio(self, end, flush=False):
        """Mux the source's audio packets that start before `end` seconds of output video; with
        flush, the AAC re-encoders' last packets too."""
        import av

        try:
            while True:
                if self._packet is None:
                    self._packet = next(self._packets, None)
                packet = self._packet
                if packet is None:
                    break
                # time of the packet on the output's clock, in seconds (a Fraction, exact)
                start = packet.pts if packet.pts is not None else packet.dts
                if start * packet.time_base - self._audio_start >= end:
                    break
                self._packet = None
                out, mode = self._audio_out[packet.stream.index]
                if mode == "copy":
                    shift = round(self._audio_start / packet.time_base)
                    if packet.pts is not None:
                        packet.pts -= shift
                    packet.dts -= shift
                    packet.stream = out
                    self._container.mux(packet)
                    continue
                for frame in packet.decode():
                    self._encode_audio(frame, out)
            if flush:
                for index, (out, mode) in self._audio_out.items():
                    if mode == "aac":
                        for frame in self._source.streams[index].decode(None):
                            self._encode_audio(frame, out)
                        self._container.mux(out.encode(None))
        except av.error.FFmpegError as e:
            raise ValueError(
                f"cannot write the audio of {self._source.name} ({e.__class__.__name__}: {e}): "
                f"{self.path}"
            ) from None

    def _encode_audio(self, frame, out):
        from fractions import Fraction

        # samples follow each other without gaps, from the first frame's time on the output clock
        if out.index not in self._audio_pts:
            self._audio_pts[out.index] = round((frame.time - self._audio_start) * frame.sample_rate)
        frame.pts = self._audio_pts[out.index]
        frame.time_base = Fraction(1, frame.sample_rate)
        self._audio_pts[out.index] += frame.samples
        self._container.mux(out.encode(frame))

    def close(self):
        """Finish the file and move it into place; on failure, drop it (a folder: keep its
        frames)."""
        if self.count == 0:
            self.abort()
            raise ValueError(f"no frames were written: {self.path}")
        try:
            if self.is_video:
                for packet in self._stream.encode():
                    self._container.mux(packet)
                if self.audio:
                    self._mux_audio(self.count / self.rate, flush=True)
                self._container.close()
                self._container = None
                self._close_source()
                if os.path.isdir(self.path) and not os.path.islink(self.path):
                    shutil.rmtree(self.path)  # only reached with overwrite=True
                self._out.commit()
        except BaseException:
            self.abort()
            raise

    def abort(self):
        """Drop the video written so far; a folder keeps its complete frames (for resume), and is
        removed if it holds none."""
        if self._container is not None:
            with contextlib.suppress(
                Exception
            ):  # the file is removed next, its end does not matter
                self._container.close()
            self._container = None
        self._close_source()
        if self.is_video:
            self._out.discard()
        elif self._created:
            with contextlib.suppress(OSError):  # only if empty: nothing that was written is lost
                os.rmdir(self.path)

    def _close_source(self):
        if self._source is not None:
            self._source.close()
            self._source = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


@functools.lru_cache(maxsize=None)
def check_video_codec(name):
    """Raise a clear error if this PyAV/FFmpeg build cannot encode with `name` (no silent
    fallback)."""
    import av

    try:
        av.codec.Codec(name, "w")
    except Exception as e:
        raise RuntimeError(
            f"video codec {name!r} is not available in this PyAV/FFmpeg build "
            f"(needed by the RealBasicVSR video-compression degradation): {e}"
        ) from None
    return name
