"""Upscale videos (x4, x2, or x1 restoration) with BasicVSR++, BasicVSR or RealBasicVSR: the
whole inference path.

    python upscale.py INPUT OUTPUT --weights FILE
    python upscale.py INPUT OUTPUT --onnx MODEL.onnx [--provider cpu|cuda|tensorrt]
    python upscale.py --convert SRC.pth DST.safetensors
    python upscale.py --export MODEL.onnx --weights FILE [--frames T]

INPUT is a video file or a folder of frames, OUTPUT a video file (H.264, with the input's audio)
or a folder of PNG frames. The frames stream through: read one at a time (video.VideoReader),
grouped into windows with context frames that never cross a scene cut (plan_windows), each window
run whole or in blended tiles (upscale_window), written as they come out (video.VideoWriter).
Memory depends on the window and tile sizes, never on the video's length.

From Python: `upscale(model, frames_or_path, ...)` yields RGB uint8 frames.
"""

import argparse
import contextlib
import ctypes
import datetime
import itertools
import math
import os
import signal
import sys
import threading

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from basicvsr import BasicVSR, BasicVSRPlusPlus, ResidualBlocksWithInputConv, compile_network
from export import ONNX_FRAMES, ONNX_OPSET, PROVIDERS, OnnxNetwork, export_onnx
from realbasicvsr import RealBasicVSR
from video import WRITTEN_VIDEO_EXTS, VideoWriter, read_video
from weights import convert, load_network, min_input_size, scale_of

# ----------------------------------------------------------------------------------------
# Upscaling videos. The LR stream is cut into scenes where the mean grey-level difference of
# two consecutive thumbnails jumps; each scene into chunks of `chunk` frames, each run with
# up to `overlap` neighbouring frames on either side that warm the recurrence and whose
# outputs are dropped; each frame, optionally, into overlapping tiles blended with linear
# ramps. Peak memory depends on chunk and tile size, never on the length of the video.

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MIN_TILE = 64  # smaller tiles starve SPyNet's coarsest level (and BasicVSR++ refuses them)
# automatic chunk lengths: with tiles at least RealBasicVSR's training length; at most where
# longer windows bring diminishing returns
MIN_CHUNK = 15
MAX_CHUNK = 60
CPU_BUDGET = 4 << 30  # bytes the automatic settings aim for on CPU, at least (cpu_budget)


def min_tile(model):
    """Smallest tile: MIN_TILE LR pixels; x1 models work at a quarter of the size: 4 x MIN_TILE."""
    return MIN_TILE * (4 if scale_of(model) == 1 else 1)


def _precision_dtype(precision, device):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(
            f"precision fp16 needs a CUDA device, got {device}; on CPU use bf16 or fp32"
        )
    if precision == "bf16" and device.type not in ("cuda", "cpu"):
        raise ValueError(f"precision bf16 runs on CUDA or CPU, got {device}")
    return PRECISIONS[precision]


# Peak memory of one run on a window of t frames of h x w LR pixels, an estimate. What the run adds:
#   A = t * h * w * (maps * C * b + 60)  +  h * w * K * b
# maps * C * b: the features each frame keeps until its reconstruction (BasicVSR++: the spatial
# map and four branches, maps = 5; BasicVSR: the backward branch, maps = 1), b bytes per value
# (4 for fp32; under autocast 2 on CUDA, and 3 on CPU, where the heap keeps what the run's fp32
# parts freed); 60: flows, input and output frames. K = 3300: what one step needs on top, mostly the
# 64-channel upsampling of one frame at x4 (the deformable convolution's CPU path, kernels.cpu,
# works a few output rows at a time and adds little).
# On CPU the figure is the process's peak RSS: its resident memory now (the interpreter, torch,
# the weights) + 1.25 A, the factor measured. Against the peak RSS (VmHWM) of a fresh process
# running upscale() on random frames, one window, chunk t, whole frames (2 threads; upscale()
# keeps freed memory in the heap, keep_freed_memory, and runs the network in channels-last):
#   network                 frames       precision  estimate  measured
#   RealBasicVSR(16, 2, 2)  10 x 90x160   fp32        597 MB    682 MB  (-12%)
#   RealBasicVSR(64, 20)    10 x 180x320  fp32       1536 MB   1837 MB  (-16%)
#   RealBasicVSR(64, 20)    10 x 180x320  bf16       1252 MB   1065 MB  (+18%)
#   BasicVSR++(64, 7)       10 x 64x64    fp32        497 MB    530 MB  (-6%)
#   BasicVSR++(64, 7)        6 x 128x128  fp32        796 MB    760 MB  (+5%)
#   BasicVSR++(64, 7)        6 x 128x128  bf16        689 MB    693 MB  (-1%)
#   BasicVSR++(64, 7)        2 x 180x320  fp32       1504 MB   1209 MB  (+24%)
#   BasicVSR++(32, 3)       20 x 96x160   fp32        865 MB    897 MB  (-4%)
#   BasicVSR++(16, 2)        6 x 180x320  fp32       1454 MB   1595 MB  (-9%)
#   BasicVSR++(16, 2)        2 x 360x640  fp32       4359 MB   5017 MB  (-13%)
#   BasicVSR++(16, 2)        8 x 360x640  fp32       5021 MB   5315 MB  (-6%)
#   BasicVSR(64, 30)        10 x 128x128  fp32        691 MB    774 MB  (-11%)
# The heap's reuse varies from run to run: four runs of the RealBasicVSR bf16 case measured
# 993 to 1159 MB (+8% to +26%).
# On CUDA it is A + the parameters, not measured yet: it assumes the Triton DCN needs no sampling
# buffers; the automatic settings keep 25% of the free GPU memory in reserve, and an out-of-memory
# error halves the window, then the tile (upscale_window). BasicVSR++'s host cache makes it an
# overestimate; x2 and x1 models are not calibrated.


def _resident_bytes():
    """This process's resident memory now (Linux /proc), else its peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def estimate_memory(model, t, h, w, precision="fp32", device="cuda"):
    """Estimated peak bytes of model(lqs) for lqs of shape (1, t, 3, h, w): on CPU the process's
    peak resident memory, on CUDA what the run allocates; see the note above."""
    net = next(
        m for m in model.modules() if isinstance(m, (BasicVSR, BasicVSRPlusPlus, OnnxNetwork))
    )
    maps = (
        5
        if isinstance(net, BasicVSRPlusPlus) or getattr(net, "network", "") == "BasicVSRPlusPlus"
        else 1
    )
    cpu = torch.device(device).type == "cpu"
    b = 4 if PRECISIONS[precision] is None else 3 if cpu else 2
    k = 3300
    if scale_of(model) == 1:  # features at a quarter of the size, input and output at full size
        run = t * h * w * (maps * net.mid_channels * b / 16 + 24) + h * w * k * b / 16
    else:  # K's upsampling scales with the output's area
        run = (
            t * h * w * (maps * net.mid_channels * b + 60)
            + h * w * k * b * scale_of(model) ** 2 / 16
        )
    if cpu:
        return _resident_bytes() + 1.25 * run
    return run + sum(p.numel() * p.element_size() for p in model.parameters())


def cpu_budget():
    """Bytes the automatic settings may use on CPU: half the memory the system has available
    (Linux /proc/meminfo), at least CPU_BUDGET."""
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration, ValueError):
        return CPU_BUDGET
    return max(CPU_BUDGET, available * 1024 // 2)


def choose_settings(model, h, w, device, precision="fp32", chunk=None, overlap=4, tile=None):
    """Fill in chunk and tile for h x w frames; chunk None and tile None mean automatic, tile 0
    whole frames. Automatic: whole frames whenever one frame (or the given chunk) with its
    2 x overlap context frames fits the memory budget, with the longest chunk up to MAX_CHUNK that
    fits; else the largest tile, a multiple of 32, with which MIN_CHUNK frames (or the given
    chunk) fit. Budget: 75% of the free GPU memory on CUDA, cpu_budget() elsewhere.
    Returns (chunk, tile or None, estimated peak bytes, budget bytes)."""
    if device.type == "cuda":
        budget = int(0.75 * torch.cuda.mem_get_info(device)[0])
    else:
        budget = cpu_budget()
    if tile is None:
        sizes = [None] + [
            s for s in range(max(h, w) // 32 * 32, min_tile(model) - 1, -32) if s < max(h, w)
        ]
    else:
        sizes = [None if tile == 0 or tile >= max(h, w) else tile]

    def cost(t, size):
        th, tw = (h, w) if size is None else (min(h, size), min(w, size))
        return estimate_memory(model, t, th, tw, precision, device)

    def longest_chunk(size):
        fixed = cost(0, size)
        per_frame = cost(1, size) - fixed  # the estimate is linear in the window length
        return min(MAX_CHUNK, int((budget - fixed) // per_frame) - 2 * overlap)

    for size in sizes:
        fit = longest_chunk(size)
        # whole frames with a short chunk rather than tiles, which cost time and blend seams
        if fit >= (chunk or (1 if size is None else MIN_CHUNK)):
            break
    # if nothing fits, the smallest tile and whatever chunk fits: the estimate may be pessimistic
    chunk = chunk or max(1, fit)
    return chunk, size, cost(chunk + 2 * overlap, size), budget


def _grey_thumbnail(frame):
    """RGB uint8 (h, w, 3) -> 32 x 32 mean grey levels (0-255), the scene-cut signature."""
    grey = torch.from_numpy(frame).float() @ torch.tensor([0.299, 0.587, 0.114])
    return F.adaptive_avg_pool2d(grey[None, None], (32, 32))[0, 0]


class SceneCuts:
    """Callable on consecutive frames: True when a frame starts a new scene, i.e. the mean absolute
    difference of its grey thumbnail to the previous frame's exceeds `threshold` grey levels.
    A threshold of None or 0 never cuts."""

    def __init__(self, threshold):
        self.threshold = threshold
        self.previous = None  # the previous frame's thumbnail

    def __call__(self, frame):
        if not self.threshold:
            return False
        thumb = _grey_thumbnail(frame)
        cut = (
            self.previous is not None
            and (thumb - self.previous).abs().mean().item() > self.threshold
        )
        self.previous = thumb
        return cut


def plan_windows(frames, chunk, overlap, is_cut):
    """Group a stream of frames into model runs, yielding (window, first, last): a list of frames
    and the range window[first:last] whose outputs are kept. Every frame is kept exactly once.

    Within a scene, chunk [a, a+chunk) runs on [a-overlap, a+chunk+overlap) as soon as that
    many frames have arrived. The last chunk of a scene, of any length, reaches back so that its
    run still sees chunk + overlap frames where the scene has them. Windows never cross a cut."""
    buf = []  # the scene's frames still needed
    base = 0  # the scene index of buf[0]
    done = 0  # the scene's frames emitted

    def tail():
        end = base + len(buf)
        if done < end:
            start = max(0, min(done, end - chunk) - overlap)
            yield buf[start - base :], done - start, end - start

    for frame in frames:
        if is_cut(frame):
            yield from tail()
            buf = []
            base = 0
            done = 0
        buf.append(frame)
        if base + len(buf) - done >= chunk + overlap:
            start = max(0, done - overlap)
            yield (
                buf[start - base : done + chunk + overlap - base],
                done - start,
                done + chunk - start,
            )
            done += chunk
            # the longest look-back is the last chunk's: chunk + overlap frames before the
            # scene's end
            drop = max(0, done + 1 - chunk - overlap) - base
            if drop > 0:
                del buf[:drop]
                base += drop
    yield from tail()


def tile_starts(size, tile, overlap):
    """Start offsets of tiles of length `tile` covering [0, size), overlapping by at least
    `overlap`, spread evenly with the first at 0 and the last flush with the edge."""
    if tile >= size:
        return [0]
    n = math.ceil((size - overlap) / (tile - overlap))
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def _ramp(starts, tile, i, scale):
    """Blend weights along one axis for tile i, in output pixels: a linear ramp across each overlap
    with a neighbour (the two ramps sum to 1 there), 1 elsewhere, never 0."""
    weight = torch.ones(tile * scale)
    if i > 0:
        ov = (starts[i - 1] + tile - starts[i]) * scale
        weight[:ov] = torch.minimum(weight[:ov], (torch.arange(ov) + 0.5) / ov)
    if i < len(starts) - 1:
        ov = (starts[i] + tile - starts[i + 1]) * scale
        weight[-ov:] = torch.minimum(weight[-ov:], (torch.arange(ov, 0, -1) - 0.5) / ov)
    return weight


def _forward(model, lqs, dtype, frames_desc):
    """model(lqs) under autocast, checked for inf/NaN. x1 models take frames padded (replicate) to a
    multiple of 4 and at least 256 (they work at a quarter of the size), cropped back after."""
    h, w = lqs.shape[-2:]
    pad_h = pad_w = 0
    if scale_of(model) == 1:
        pad_h, pad_w = max(256, -(-h // 4) * 4) - h, max(256, -(-w // 4) * 4) - w
        if pad_h or pad_w:
            lqs = F.pad(lqs.flatten(0, 1), (0, pad_w, 0, pad_h), mode="replicate").unflatten(
                0, lqs.shape[:2]
            )
    with torch.autocast(lqs.device.type, dtype=dtype, enabled=dtype is not None):
        out = model(lqs)
    if not torch.isfinite(out).all():
        raise FloatingPointError(
            f"upscale: the network produced inf/NaN for {frames_desc}"
            + ("; try precision bf16 or fp32" if dtype == torch.float16 else "")
        )
    return out.float()[..., : out.shape[-2] - pad_h, : out.shape[-1] - pad_w]


ENSEMBLES = {None: 1, "spatial": 8, "temporal": 16}


def _run(model, lqs, dtype, frames_desc, ensemble=None):
    """_forward, or the self-ensemble (mmagic's SpatialTemporalEnsemble): the mean over the 8
    flips and transposes of the frames ("spatial"), and also over the time-reversed clip
    ("temporal", 16 passes), each output mapped back."""
    if ensemble is None:
        return _forward(model, lqs, dtype, frames_desc)
    out = 0
    for k in range(8):
        x = lqs.flip(-1) if k & 1 else lqs
        x = x.flip(-2) if k & 2 else x
        x = x.transpose(-1, -2) if k & 4 else x
        for reverse in (False, True) if ensemble == "temporal" else (False,):
            y = _forward(model, x.flip(1) if reverse else x, dtype, frames_desc)
            y = y.flip(1) if reverse else y
            y = y.transpose(-1, -2) if k & 4 else y
            y = y.flip(-2) if k & 2 else y
            out = out + (y.flip(-1) if k & 1 else y)
    return out / ENSEMBLES[ensemble]


def upscale_window(
    model, window, first, last, device, dtype, tile=None, tile_overlap=16, ensemble=None
):
    """Run `model` on a list of RGB uint8 (h, w, 3) frames and return the outputs of
    window[first:last] as uint8 (last - first, s*h, s*w, 3) on the CPU (s = scale_of(model)),
    tiled if tile < h or w. Out of memory, it runs the kept frames in two halves (each with the
    window's context frames), one frame with half its context, then in tiles of half the size, with
    a note each time."""
    h, w = window[0].shape[:2]
    half = (min(tile, max(h, w)) if tile else max(h, w)) // 2  # the last resort's tile
    try:
        return _upscale_window(
            model, window, first, last, device, dtype, tile, tile_overlap, ensemble
        )
    except torch.OutOfMemoryError:
        if len(window) == 1 and half < min_tile(model):
            raise  # one frame, no context, and no smaller tile to try
    # retried once the failed run's tensors are freed
    if device.type == "cuda":
        torch.cuda.empty_cache()

    def retry(window, first, last, tile=tile, tile_overlap=tile_overlap):
        return upscale_window(
            model, window, first, last, device, dtype, tile, tile_overlap, ensemble
        )

    after = len(window) - last  # context frames after the kept ones
    if last - first > 1:
        mid = (first + last) // 2
        print(
            f"note: out of memory on {device} for {last - first} frames: running "
            f"{mid - first} and {last - mid}",
            file=sys.stderr,
        )
        return torch.cat(
            [
                retry(window[: mid + after], first, mid),
                retry(window[mid - first :], first, first + last - mid),
            ]
        )
    if len(window) > 1:  # one frame kept: half the context frames on each side
        before, after = first // 2, after // 2
        print(
            f"note: out of memory on {device} for one frame and {len(window) - 1} context "
            f"frames: running it with {before + after}",
            file=sys.stderr,
        )
        return retry(window[first - before : last + after], before, before + 1)
    print(f"note: out of memory on {device} for one frame: tiles of {half} px", file=sys.stderr)
    return retry(window, first, last, half, min(tile_overlap, half // 2))


@torch.inference_mode()
def _upscale_window(model, window, first, last, device, dtype, tile, tile_overlap, ensemble):
    lqs = torch.from_numpy(np.stack(window)).to(device).permute(0, 3, 1, 2).float().div_(255)[None]
    t, _, h, w = lqs.shape[1:]
    s = scale_of(model)
    desc = f"frames {first}..{last - 1} of a window of {t}"
    if tile is None or (tile >= h and tile >= w):
        out = _run(model, lqs, dtype, desc, ensemble)[0, first:last]
    else:
        ys, xs = tile_starts(h, tile, tile_overlap), tile_starts(w, tile, tile_overlap)
        th, tw = min(tile, h), min(tile, w)
        out = torch.zeros(last - first, 3, s * h, s * w)
        weight_sum = torch.zeros(s * h, s * w)
        for i, y in enumerate(ys):
            for j, x in enumerate(xs):
                patch = _run(
                    model,
                    lqs[..., y : y + th, x : x + tw],
                    dtype,
                    f"{desc}, tile at x={x}, y={y}",
                    ensemble,
                )
                weight = _ramp(ys, th, i, s)[:, None] * _ramp(xs, tw, j, s)[None, :]
                out[..., s * y : s * (y + th), s * x : s * (x + tw)] += (
                    patch[0, first:last].cpu() * weight
                )
                weight_sum[s * y : s * (y + th), s * x : s * (x + tw)] += weight
        out /= weight_sum
    return (
        out.clamp_(0, 1).mul_(255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu()
    )


def upscale(
    model,
    frames,
    *,
    device=None,
    precision="fp32",
    chunk=None,
    overlap=4,
    tile=None,
    tile_overlap=16,
    scene_threshold=20.0,
    max_frames=None,
    ensemble=None,
    progress=False,
    skip=None,
    distributed=False,
):
    """Upscale a video, streaming: yields RGB uint8 (s*h, s*w, 3) frames in order,
    s = scale_of(model).

    model: BasicVSRPlusPlus, BasicVSR or RealBasicVSR (moved to `device`, set to eval; on the
        CPU, also to channels-last memory format).
    frames: an iterable of RGB uint8 (h, w, 3) frames, or a path (video file or frame folder,
        read with read_video). Frames are read as the chunks need them.
    device: default CUDA if available, else CPU. precision: fp32, bf16 or fp16 (CUDA only),
        through torch.autocast; a non-finite output raises FloatingPointError.
    chunk, overlap: frames per run, and context frames on each side whose outputs are dropped.
        Measured on a random BasicVSR with strengthened propagation (chunk 4, 12 frames), the
        output is 42.5, 46.8, 50.7, 56.9 dB from the whole clip's for overlap 0, 1, 2, 4.
    tile, tile_overlap: LR tile size (>= min_tile(model)) and overlap in pixels; tiles are blended
        with ramps. chunk=None / tile=None pick settings from the frame size and the free memory
        (choose_settings); tile=0 forces whole frames.
    scene_threshold: mean grey-level difference (0-255) of 32x32 thumbnails that starts a new
        scene; no run crosses a cut. None or 0 disables.
    max_frames: stop after this many input frames. ensemble: None, "spatial" (8 passes) or
        "temporal" (16), see _run. progress: print the settings and show a bar.
    skip: indices of output frames that exist already (resuming): windows whose kept frames are
        all in it are not run (their frames are still read, for the scene cuts), and None is
        yielded for every index in it.
    distributed: run on the ranks of the initialised torch.distributed group (torchrun): every
        rank reads the frames and plans the same windows, runs every world-th one, and sends its
        outputs to rank 0, which alone yields frames (the other ranks yield none). A failure on one
        rank stops all (PeerFailed on the others).
    """
    if isinstance(frames, (str, os.PathLike)):
        frames = read_video(frames)
    source = getattr(frames, "path", "frames")  # for messages
    device = _parse_device(device)
    if device.type == "cpu":
        keep_freed_memory()
    dtype = _precision_dtype(precision, device)
    _check_arguments(model, chunk, overlap, tile, tile_overlap, max_frames, ensemble)
    total = getattr(frames, "num_frames", None)
    if total is not None and max_frames is not None:
        total = min(total, max_frames)
    stream = iter(frames) if max_frames is None else itertools.islice(frames, max_frames)
    first_frame, h, w = _first_frame(stream, model, source)
    model = model.to(device).eval()
    if device.type == "cpu":
        # oneDNN's convolutions are faster on NHWC maps: 4% (16-channel BasicVSR++) to 8%
        # (64 channels) a frame, measured with `python bench.py --cpu`
        model = model.to(memory_format=torch.channels_last)
    chunk, tile, estimate, budget = _settings(
        model, h, w, device, precision, chunk, overlap, tile, tile_overlap, distributed
    )
    if progress:
        settings = (chunk, overlap, tile, tile_overlap, estimate, budget)
        _print_settings(model, h, w, device, precision, settings, scene_threshold, ensemble)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
    frames = itertools.chain([first_frame], _checked(stream, (h, w), source))
    plan = plan_windows(frames, chunk, overlap, SceneCuts(scene_threshold))

    def run_window(window, first, last):
        return upscale_window(
            model, window, first, last, device, dtype, tile, tile_overlap, ensemble
        )

    passes = ENSEMBLES[ensemble]  # runs of the network per window
    if tile:
        passes *= len(tile_starts(h, tile, tile_overlap)) * len(tile_starts(w, tile, tile_overlap))
    size = (scale_of(model) * h, scale_of(model) * w)
    with _Progress(model, total, progress, passes) as bar:
        yield from _run_windows(plan, run_window, bar, skip or (), distributed, size)
    if progress and device.type == "cuda":
        print(
            f"upscale: peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB "
            f"(estimated {estimate / 2**30:.2f} GiB)",
            file=sys.stderr,
        )


# The parts of upscale(): its checks, settings and progress bar, then the rounds of windows.


def _parse_device(device):
    """`device` (a name or a torch.device) or, if None, CUDA where available, else the CPU."""
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"not a device: {device!r} (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: CUDA is not available")
    return device


def _check_arguments(model, chunk, overlap, tile, tile_overlap, max_frames, ensemble):
    for name, value, lo in [
        ("chunk", chunk, 1),
        ("overlap", overlap, 0),
        ("tile", tile, 0),
        ("tile_overlap", tile_overlap, 0),
        ("max_frames", max_frames, 1),
    ]:
        if value is not None and (not isinstance(value, int) or value < lo):
            raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    if tile and tile < min_tile(model):
        raise ValueError(
            f"tile must be at least {min_tile(model)} input pixels for {type(model).__name__}, "
            f"got {tile}"
        )
    if ensemble not in ENSEMBLES:
        raise ValueError(f"ensemble must be None, 'spatial' or 'temporal', got {ensemble!r}")


def _check_frame(frame, size, index, source):
    """The (h, w) of an RGB uint8 frame; size: the size it must have (None: any)."""
    if (
        not hasattr(frame, "dtype")
        or frame.dtype != np.uint8
        or frame.ndim != 3
        or frame.shape[2] != 3
    ):
        raise ValueError(
            f"{source}: frame {index} is not RGB uint8 (h, w, 3): "
            f"{getattr(frame, 'dtype', type(frame).__name__)} {getattr(frame, 'shape', '')}"
        )
    if size is not None and frame.shape[:2] != size:
        raise ValueError(
            f"{source}: frame {index} is {frame.shape[1]}x{frame.shape[0]}, the first frame "
            f"{size[1]}x{size[0]}; all frames must have the same size"
        )
    return frame.shape[:2]


def _first_frame(stream, model, source):
    """The stream's first frame, h and w: checked, and large enough for the network."""
    first = next(stream, None)
    if first is None:
        raise ValueError(f"{source}: no frames to upscale")
    h, w = _check_frame(first, None, 0, source)
    min_size = min_input_size(model)
    if h < min_size or w < min_size:
        raise ValueError(
            f"{source}: frames of {w}x{h} are too small for {type(model).__name__}, which needs "
            f"at least {min_size}x{min_size}"
        )
    return first, h, w


def _checked(stream, size, source):
    """The frames after the first, each checked to be RGB uint8 of the first frame's size."""
    for index, frame in enumerate(stream, 1):
        _check_frame(frame, size, index, source)
        yield frame


def _settings(model, h, w, device, precision, chunk, overlap, tile, tile_overlap, distributed):
    """choose_settings for upscale(): an ONNX model's windows fit its exported one (shorter ones
    are padded); under torchrun the smallest chunk and tile of the ranks, whose free memory
    differs while their window plan must not. Returns (chunk, tile, estimate, budget)."""
    if isinstance(model, OnnxNetwork):
        chunk = chunk or model.frames - 2 * overlap
        if chunk < 1 or chunk + 2 * overlap > model.frames or PRECISIONS[precision] is not None:
            raise ValueError(
                f"the ONNX model runs fp32 windows of {model.frames} frames: --chunk + 2 x "
                f"--overlap must be at most {model.frames}, got {chunk} + 2 x {overlap}, "
                f"precision {precision}"
            )
    chunk, tile, estimate, budget = choose_settings(
        model, h, w, device, precision, chunk, overlap, tile
    )
    if distributed:
        _agree_on_failure(None, True)  # every rank has its settings: exchange them
        chunk, tile = _agree_on_smallest(chunk, tile or max(h, w))
        tile = tile if tile < max(h, w) else None
    if tile and 2 * tile_overlap > tile:
        raise ValueError(f"tile_overlap must be at most half the tile ({tile}), got {tile_overlap}")
    return chunk, tile, estimate, budget


def _print_settings(model, h, w, device, precision, settings, scene_threshold, ensemble):
    """The settings line; settings: (chunk, overlap, tile, tile_overlap, estimate, budget)."""
    chunk, overlap, tile, tile_overlap, estimate, budget = settings
    s = scale_of(model)
    tiles = f"tiles of {tile} px, {tile_overlap} px overlap" if tile else "whole frames"
    cuts = f"at a grey-level change > {scene_threshold:g}" if scene_threshold else "off"
    passes = ENSEMBLES[ensemble]
    where = f"free on {device}" if device.type == "cuda" else "CPU budget"
    print(
        f"upscale: {w}x{h} -> {s * w}x{s * h}, {type(model).__name__} on {device} ({precision}); "
        f"chunk {chunk} + {overlap} context frames each side; {tiles}; scene cuts {cuts}; "
        + (f"{ensemble} self-ensemble: {passes} passes, {passes}x the time; " if ensemble else "")
        + f"estimated peak {estimate / 2**30:.2f} GiB (budget {budget / 2**30:.1f} GiB {where})",
        file=sys.stderr,
    )


# forward calls of ResidualBlocksWithInputConv per frame: four propagation branches and the
# reconstruction; two directions; the same and the sequential cleaning
STEPS_PER_FRAME = {BasicVSRPlusPlus: 5, BasicVSR: 2, RealBasicVSR: 3}


class _Progress:
    """upscale()'s bar, in frames. It moves while a window runs: each per-frame step of the
    network (a forward call of a ResidualBlocksWithInputConv) is worth a share of the window's
    kept frames. passes: runs of the network per window (tiles x self-ensemble)."""

    def __init__(self, model, total, enabled, passes):
        import tqdm

        self.bar = tqdm.tqdm(
            total=total, unit="frame", disable=not enabled, file=sys.stderr, dynamic_ncols=True
        )
        self.steps_per_frame = STEPS_PER_FRAME.get(type(model), 1) * passes
        self.share = 0.0  # of a frame, per step of the running window
        self.done = 0.0  # frames of the running window, by its steps so far
        self.shown = 0  # of them, on the bar
        self.hooks = [
            m.register_forward_hook(self._step)
            for m in model.modules()
            if enabled and isinstance(m, ResidualBlocksWithInputConv)
        ]

    def _step(self, *_):
        self.done += self.share
        if int(self.done) > self.shown:
            self.bar.update(int(self.done) - self.shown)
            self.shown = int(self.done)

    def run(self, run_window, window, first, last):
        """run_window(window, first, last), the bar moving through its last - first kept frames."""
        self.share = (last - first) / (self.steps_per_frame * len(window))
        self.done = 0.0
        self.shown = 0
        out = run_window(window, first, last)
        self.share = 0.0
        self.bar.update(last - first - self.shown)
        return out

    def update(self, frames):
        self.bar.update(frames)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        self.bar.close()


def _run_windows(plan, run_window, bar, skip, distributed, size):
    """Run the planned windows and yield their kept frames in order, (s*h, s*w) = size, None for
    the indices in `skip`. A round is the next `world` windows to run, the j-th run on rank
    j % world, all at once; windows whose kept frames all exist (skip) are planned, for the same
    windows as an uninterrupted run, but not run. At a round's end the ranks agree on whether one
    failed; then each rank > 0 sends its output to rank 0, which alone yields frames."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    index = 0  # the next output frame
    runs = 0  # windows run so far, by all ranks
    sending = None  # rank > 0: its send in flight, received by rank 0 while this rank runs on
    while True:
        windows = []  # per planned window: (its rank, None: skipped; its number of kept frames)
        out = None
        error = None
        try:
            while sum(owner is not None for owner, _ in windows) < world:
                window, a, b = next(plan, (None, 0, 0))
                if window is None:
                    break
                skipped = all(i in skip for i in range(index, index + b - a))
                owner = None if skipped else runs % world
                runs += not skipped
                windows.append((owner, b - a))
                index += b - a
                if owner == rank:
                    out = bar.run(run_window, window, a, b)
        except BaseException as e:  # Ctrl-C too: the other ranks must not wait for this one
            error = e
        _agree_on_failure(error, distributed)
        if not windows:
            break
        if rank == 0:
            start = index - sum(n for _, n in windows)
            yield from _gather(windows, out, start, skip, bar, size)
        elif out is not None:
            if sending is not None:
                sending.wait()
            sending = dist.isend(out, 0)
    if sending is not None:
        sending.wait()


def _gather(windows, out, start, skip, bar, size):
    """Rank 0: the frames of a round, from output frame `start` on: its own output `out`, the
    other ranks' received, None for a skipped window and for every index in `skip`."""
    for owner, n in windows:
        if owner is None:
            frames = [None] * n
        elif owner == 0:
            frames = out.numpy()
        else:
            frames = torch.empty((n, *size, 3), dtype=torch.uint8)
            dist.recv(frames, owner)
            frames = frames.numpy()
        if owner != 0:
            bar.update(n)
        for i, frame in enumerate(frames, start):
            yield None if i in skip else frame
        start += n


# ----------------------------------------------------------------------------------------
# Several processes (torchrun). The ranks exchange with two agreements, each one all_reduce:
# whether a rank failed, at the same points of every rank's run, and the smallest settings.


class PeerFailed(Exception):
    """Another rank of a torchrun run failed (and printed its error)."""

    def __init__(self, rank):
        super().__init__(f"rank {rank} of the run failed")
        self.rank = rank
        self.agreed = True


def _agree_on_failure(error, distributed):
    """Raise `error` (an exception or None) on every rank if any rank has one: the lowest failed
    rank raises its own error, the others PeerFailed. The ranks call it at the same points: after
    the setup (run_upscale), before exchanging the settings, at each round's end and on leaving;
    a rank that fails anywhere else calls it once on its way out (run_upscale). It is always the
    same collective, an all_reduce of one integer, so that such a rank meets the others wherever
    they wait."""
    if distributed:
        world = dist.get_world_size()
        lowest = torch.tensor([world if error is None else dist.get_rank()], dtype=torch.int64)
        dist.all_reduce(lowest, dist.ReduceOp.MIN)
        failed = int(lowest.item())  # the lowest failed rank; world: none failed
        if error is not None:
            error.agreed = True  # run_upscale must not agree on it again
        if failed < world and failed != dist.get_rank():
            raise PeerFailed(failed) from None
    if error is not None:
        raise error


def _agree_on_smallest(*values):
    """The smallest of each integer over the ranks. Called only right after _agree_on_failure, so
    that every rank is here."""
    values = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(values, dist.ReduceOp.MIN)
    return values.tolist()


# ----------------------------------------------------------------------------------------
# Command line. `python upscale.py INPUT OUTPUT --weights FILE` upscales with whatever network the
# file holds; `python upscale.py --convert SRC DST` converts a checkpoint to our safetensors.

UPSCALE_ERRORS = (ValueError, OSError, FloatingPointError)
# How long a rank waits for the others at a round's end or for a window's frames: the slowest
# window of a round must take less. A rank that dies is noticed at once; this only ends a hang.
DIST_TIMEOUT = datetime.timedelta(minutes=60)


class Interrupted(Exception):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that the output's
    temporary is removed on the way out."""


def build_parser():
    parser = argparse.ArgumentParser(
        description="Upscale a video with BasicVSR++, BasicVSR or RealBasicVSR (the network and "
        "its size are read from the weights file), or convert a checkpoint.",
        epilog="examples:\n"
        "  python upscale.py input.mp4 output.mp4 --weights "
        "basicvsr_plusplus_c64n7_8x1_600k_reds4_20210217-db622b2f.pth\n"
        "  python upscale.py frames/ out_frames/ --weights "
        "runs/basicvsrpp/iter_0000200_ema.safetensors --tile 256\n"
        "  python upscale.py input.mp4 output.mp4 --weights "
        "basicvsr_plusplus_deblur_dvd-ecd08b7f.pth --ensemble\n"
        "  python upscale.py --convert SRC.pth DST.safetensors [--prefix generator_ema]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.error = lambda message: parser.exit(2, f"error: {message}\n")  # one line
    parser.add_argument(
        "input",
        nargs="?",
        metavar="INPUT",
        help="video file (.mp4 .mov .mkv .avi ...) or a folder of frames",
    )
    parser.add_argument(
        "output",
        nargs="?",
        metavar="OUTPUT",
        help=f"video file ({' '.join(WRITTEN_VIDEO_EXTS)}: H.264 crf 18, the input's fps) or a "
        "folder (no extension) for PNG frames",
    )
    parser.add_argument(
        "--weights",
        metavar="FILE",
        help="mmagic/mmediting or BasicSR .pth, or safetensors from train.py / --convert",
    )
    net = parser.add_argument_group("network")
    net.add_argument(
        "--refine-thres",
        type=float,
        default=255,
        metavar="D",
        help="RealBasicVSR: clean again while the mean |residue| of a chunk is >= D/255, at most "
        "3 passes (default: 255, one pass)",
    )
    net.add_argument(
        "--ensemble",
        action="store_true",
        help="self-ensemble: the mean of the 8 flips/transposes of the frames (8x the time)",
    )
    net.add_argument(
        "--temporal-ensemble",
        action="store_true",
        help="with --ensemble: also the time-reversed clip (16x the time)",
    )
    run = parser.add_argument_group(
        "memory and speed (by default chunk and tile fit the free memory)"
    )
    run.add_argument(
        "--device", help="cuda, cuda:1, cpu, ... (default: cuda if available, else cpu)"
    )
    run.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        default="fp32",
        help="autocast dtype; fp16 needs CUDA; bf16 also on the CPU, where it is faster on CPUs "
        "that multiply bf16 natively (AMX, AVX512-BF16) (default: fp32)",
    )
    run.add_argument("--chunk", type=int, metavar="N", help="frames per run of the network")
    run.add_argument(
        "--overlap",
        type=int,
        default=4,
        metavar="K",
        help="context frames on each side of a chunk, run and then dropped (default: 4)",
    )
    run.add_argument(
        "--tile",
        type=int,
        metavar="T",
        help=f"tile size in input pixels, >= {MIN_TILE} (x1 models: >= {4 * MIN_TILE}); "
        "0: whole frames",
    )
    run.add_argument(
        "--tile-overlap",
        type=int,
        default=16,
        metavar="P",
        help="input pixels shared by neighbouring tiles, blended linearly (default: 16)",
    )
    run.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the per-frame modules (compile_network); the first window is slower, "
        "and on the CPU every window (measured: docs/kernels.md)",
    )
    run.add_argument(
        "--channels-last",
        action="store_true",
        help="run the network in channels-last (NHWC) memory format, native to cuDNN's bf16 "
        "convolutions (on CPU always: oneDNN's convolutions are faster in it)",
    )
    run.add_argument(
        "--host-cache",
        action="store_true",
        help="BasicVSR++ on a GPU: keep the per-frame features in pinned host memory, so a long "
        "--chunk fits a small GPU (copies overlap the compute)",
    )
    video = parser.add_argument_group("video")
    video.add_argument(
        "--max-frames", type=int, metavar="N", help="upscale only the first N frames"
    )
    video.add_argument(
        "--scene-threshold",
        type=float,
        default=20.0,
        metavar="D",
        help="mean grey-level change (0-255) between frames that restarts the recurrence; 0: off "
        "(default: 20)",
    )
    video.add_argument(
        "--fps", type=float, help="output frame rate (default: the input's; 25 for frame folders)"
    )
    video.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    video.add_argument(
        "--resume",
        action="store_true",
        help="complete the frame folder OUTPUT of an interrupted run (the same command): its "
        "frames are kept, the run restarts at the first missing one",
    )
    video.add_argument(
        "--no-audio",
        action="store_true",
        help="leave out the input's audio (default: copied, or AAC where OUTPUT's container cannot "
        "hold the codec; cut to the written video)",
    )
    onnx = parser.add_argument_group(
        "ONNX: export the network of --weights, or upscale with an exported one"
    )
    onnx.add_argument(
        "--export",
        metavar="MODEL.onnx",
        help="write the network of --weights as ONNX (opset >= 19)",
    )
    onnx.add_argument(
        "--frames",
        type=int,
        default=ONNX_FRAMES,
        metavar="T",
        help=f"with --export: the window length, fixed in the file (default: {ONNX_FRAMES})",
    )
    onnx.add_argument(
        "--opset", type=int, default=ONNX_OPSET, help=f"with --export (default: {ONNX_OPSET})"
    )
    onnx.add_argument(
        "--onnx", metavar="MODEL.onnx", help="upscale with an exported network (onnxruntime)"
    )
    onnx.add_argument(
        "--provider", choices=list(PROVIDERS), default="cpu", help="onnxruntime's (default: cpu)"
    )
    convert = parser.add_argument_group(
        "convert a checkpoint (mmagic/mmediting, BasicSR, plain .pth, safetensors) "
        "to our safetensors"
    )
    convert.add_argument(
        "--convert",
        nargs=2,
        metavar=("SRC", "DST"),
        help="checkpoint to read, safetensors to write",
    )
    convert.add_argument(
        "--prefix",
        default=None,
        help="part of the file to take, e.g. generator, generator_ema, discriminator, params "
        "(default: generator_ema, else generator; BasicSR: params_ema, else params)",
    )
    return parser


def keep_freed_memory():
    """On CPU, glibc maps every large tensor (the x4 head's are about a GB each at 360p) afresh
    and unmaps it when freed, so each frame faults its temporaries' pages in again: system time
    was 44% of user time on 8 frames of 640x360 (16-channel BasicVSR++). Serving them from the heap,
    and keeping what is freed there for the next frame, brought it to 5% and the frame from 9.3 s
    to 5.6 s, for a higher peak RSS (5.2 GB against 3.4 GB). upscale() does it for a CPU run: it is
    the process's allocator that changes, for the rest of the process. A no-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(-4, 0)  # M_MMAP_MAX: no chunk from mmap, all from the heap
    mallopt(-1, -1)  # M_TRIM_THRESHOLD: never give the heap's free top back to the system


def run_upscale(args):
    """The upscaling command: read args.input, load the network of args.weights, write args.output.
    A failure raises: a video OUTPUT, written under a temporary name and renamed at the end, is
    removed; a frame folder keeps its complete frames for --resume. Under torchrun (WORLD_SIZE > 1)
    every rank reads the input and runs its share of the windows; rank 0 alone writes and prints."""
    _check_command(args)
    distributed, rank, device = _start_ranks(args.device)
    with contextlib.ExitStack() as stack:
        writer = None
        try:  # before OUTPUT exists: a bad file leaves nothing
            model = (
                OnnxNetwork(args.onnx, args.provider)
                if args.onnx
                else load_network(args.weights, args.refine_thres)
            )
            reader = read_video(args.input, fps=args.fps)
            if rank == 0:
                for note in reader.notes:
                    print(f"note: {note}", file=sys.stderr)
                audio_from = None if args.no_audio or os.path.isdir(args.input) else args.input
                writer = args.writer = stack.enter_context(
                    VideoWriter(
                        args.output,
                        reader.fps,
                        overwrite=args.overwrite,
                        audio_from=audio_from,
                        resume=args.resume,
                    )
                )
        except BaseException as e:
            _agree_on_failure(e, distributed)  # raises: e here, PeerFailed on the other ranks
        _agree_on_failure(None, distributed)
        skip = writer.existing if writer is not None else None
        if distributed and args.resume:  # rank 0's view of OUTPUT: the same windows skipped
            box = [skip]
            dist.broadcast_object_list(box, src=0)
            skip = box[0]
        reencoded = (
            [codec for codec, mode in writer.audio if mode == "aac"] if writer is not None else []
        )
        if reencoded:
            print(
                f"note: {os.path.basename(args.output)} cannot hold the {', '.join(reencoded)} "
                "audio of the input as it is: re-encoding it to AAC",
                file=sys.stderr,
            )
        ensemble = ("temporal" if args.temporal_ensemble else "spatial") if args.ensemble else None
        try:
            if args.host_cache and isinstance(model, BasicVSRPlusPlus):
                model.cpu_cache_length = 0
            if args.channels_last:
                model = model.to(memory_format=torch.channels_last)
            if args.compile:
                compile_network(model)
            for frame in upscale(
                model,
                reader,
                device=device,
                precision=args.precision,
                chunk=args.chunk,
                overlap=args.overlap,
                tile=args.tile,
                tile_overlap=args.tile_overlap,
                scene_threshold=args.scene_threshold,
                max_frames=args.max_frames,
                ensemble=ensemble,
                progress=rank == 0,
                skip=skip,
                distributed=distributed,
            ):
                if frame is None:
                    writer.keep()
                else:
                    writer.write(frame)
        except BaseException as e:
            # not yet known to the other ranks: tell them, wherever they wait for an agreement
            if distributed and not getattr(e, "agreed", False):
                with contextlib.suppress(Exception):  # a rank already gone: e matters
                    _agree_on_failure(e, True)
            raise
    if writer is not None:
        audio = "".join(
            f", {codec} audio {'copied' if mode == 'copy' else 'as AAC'}"
            for codec, mode in writer.audio
        )
        size = f" of {writer.size[1]}x{writer.size[0]}" if writer.size else ""
        kept = f" ({len(writer.existing)} kept from the interrupted run)" if args.resume else ""
        print(
            f"{args.output}: {writer.count} frames{size}{kept} at {reader.fps:g} fps{audio}",
            file=sys.stderr,
        )


def _check_command(args):
    """Refuse, before anything is read, arguments of the upscaling command that contradict each
    other."""
    if not args.weights and not args.onnx:
        raise ValueError(
            "--weights FILE (or --onnx MODEL.onnx) is required (a .pth or .safetensors of "
            "BasicVSR++, BasicVSR or RealBasicVSR)"
        )
    if args.temporal_ensemble and not args.ensemble:
        raise ValueError("--temporal-ensemble adds to --ensemble: pass both")
    if os.path.abspath(args.input) == os.path.abspath(args.output):
        raise ValueError(f"OUTPUT is the INPUT: {args.output}")
    if args.resume and os.path.splitext(args.output)[1].lower() in WRITTEN_VIDEO_EXTS:
        raise ValueError(
            f"--resume: {args.output} is a video, which cannot be resumed: an H.264 stream cannot "
            "be appended to cleanly (the encoder's state ends with the process); to be able to "
            "resume, write a frame folder (OUTPUT without an extension) and encode it when complete"
        )
    if args.resume and args.overwrite:
        raise ValueError(
            "--resume keeps OUTPUT's frames, --overwrite replaces them: pass one of them"
        )


def _start_ranks(device):
    """Under torchrun (WORLD_SIZE > 1): join the process group. Returns (distributed, this rank,
    the device to run on)."""
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    rank = 0
    if distributed:
        # gloo carries everything, also on GPUs: the outputs are uint8 frames on the host already
        # (upscale_window), written by rank 0 from the host; NCCL would add two copies. Each rank
        # computes on its own GPU, LOCAL_RANK. A rank that dies closes its connections and the
        # others' pending operation fails at once; the timeout only ends a hung rank.
        dist.init_process_group("gloo", timeout=DIST_TIMEOUT)
        rank = dist.get_rank()
        local = int(os.environ.get("LOCAL_RANK", 0))
        if device in (None, "cuda") and torch.cuda.is_available():
            device = f"cuda:{local}"
            torch.cuda.set_device(local)
    return distributed, rank, device


def _left_behind(args):
    """What an unfinished upscale leaves, for its last line: a frame folder keeps its frames."""
    writer = getattr(args, "writer", None)
    if (
        writer is not None
        and not writer.is_video
        and os.path.isdir(writer.path)
        and (writer.count or writer.existing)
    ):
        return (
            f"{writer.path} keeps its complete frames: the same command with --resume finishes it"
        )
    return "the unfinished output was removed"


def main(argv=None):
    """The command line; returns the exit status. A user's mistake is one `error:` line and 1;
    Ctrl-C is 130, SIGTERM 143, each one line; a video OUTPUT is removed, a frame folder keeps its
    complete frames (--resume). Under torchrun the ranks other than 0 print only their own
    errors."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.convert and not args.export and not (args.input and args.output):
        parser.error(
            "pass INPUT OUTPUT --weights FILE to upscale, --convert SRC DST, or --export MODEL.onnx"
        )

    def terminate(signum, frame):
        raise Interrupted()

    previous = (
        signal.signal(signal.SIGTERM, terminate)
        if threading.current_thread() is threading.main_thread()
        else None
    )
    quiet = int(os.environ.get("WORLD_SIZE", 1)) > 1 and int(os.environ.get("RANK", 0)) > 0
    deferred = []  # a rank > 0's error line, said after rank 0's (whose progress bar would cut it)

    def say(line):
        if quiet and dist.is_initialized():
            deferred.append(line)
        else:
            print(line, file=sys.stderr)

    try:
        if args.convert:
            convert(*args.convert, args.prefix)
        elif args.export:
            if not args.weights:
                raise ValueError("--export needs --weights FILE, the network to export")
            export_onnx(
                load_network(args.weights, args.refine_thres), args.export, args.frames, args.opset
            )
            print(
                f"{args.weights} -> {args.export}: windows of {args.frames} frames, "
                f"opset {args.opset}"
            )
        else:
            run_upscale(args)
        return 0
    except torch.OutOfMemoryError:
        say("error: out of GPU memory; pass a smaller --chunk or --tile, or --precision bf16/fp16")
    except UPSCALE_ERRORS as e:
        left = _left_behind(args)
        say(
            "error: "
            + str(e).replace("\n", " ")
            + ("" if left.endswith("removed") else f"; {left}")
        )
    except PeerFailed as e:
        if not quiet:
            print(f"error: {e} (its error line follows); {_left_behind(args)}", file=sys.stderr)
    except dist.DistError as e:  # another rank vanished in the middle of an exchange
        say(
            "error: lost contact with another process of the run "
            f"({str(e).splitlines()[0][:200]}); {_left_behind(args)}"
        )
    except KeyboardInterrupt:
        if not quiet:
            print(f"interrupted (Ctrl-C): {_left_behind(args)}", file=sys.stderr)
        return 130
    except Interrupted:
        if not quiet:
            print(f"terminated (SIGTERM): {_left_behind(args)}", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if dist.is_available() and dist.is_initialized():
            # the ranks leave together, so that torchrun, seeing one exit with an error, does not
            # stop the others (SIGTERM) before they have said their last line: rank 0's, then theirs
            with contextlib.suppress(Exception):
                _agree_on_failure(None, True)
            for line in deferred:
                print(line, file=sys.stderr)
            with contextlib.suppress(Exception):
                _agree_on_failure(None, True)
            dist.destroy_process_group()
    return 1


if __name__ == "__main__":
    sys.exit(main())
