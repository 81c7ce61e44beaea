"""Data for BasicVSR++ and RealBasicVSR: datasets, degradations, test-set preparation (video I/O: video.py).

Every dataset item is a dict of float32 torch tensors in [0, 1], RGB, frames first:
    {"lq": (t, 3, h, w), "gt": (t, 3, s*h, s*w), "key": str}
    RealDegradationDataset adds "gt_usm" (the unsharp-masked GT the LQ is made from);
    LQFolder items have no "gt", REDSSub ones no "lq"; Vimeo90K "test" ones only the centre GT frame (1, 3, H, W).

Public names, in file order:
    read_image(path) -> RGB uint8 (h, w, 3)        atomic_path(path): tmp name, renamed when complete
    write_image(path, rgb, compression=3) (atomic)  frames_to_tensor(frames) -> (t, 3, h, w) float32
    matlab_imresize(img, scale)                      MATLAB imresize, bicubic, antialiased
    bicubic_downsample(img, scale=4), bd_downsample(img, sigma=1.6, scale=4)   BI / BD test-set degradations, uint8
    synthetic_clip(seed, num_frames, gt_size, ...)   one procedurally generated GT clip, uint8
    SyntheticClips(num_clips, num_frames, gt_size, scale=4, seed=0)   the built-in default data
    REDS(root, split, num_frames=30, gt_size=256, scale=4)            "train", "reds4", "redsval", "official_train"
    REDSSub(root, num_frames=15, gt_size=256)        GT-only sub-image clips (train_sharp_sub)
    Vimeo90K(root, split, degradation="BI", gt_size=256)              septuplets mirrored to 14 frames
    PairedFolders(root, lq_dir, gt_dir, scale=4)     Vid4 / UDM10 style test sets; LQFolder(root): LQ only
    (degradations) unsharp_mask, gaussian/generalized_gaussian/plateau/sinc_kernel, blur_kernel, random_blur,
        random_resize/noise/jpeg/video_compression, check_video_codec, quantize, BLUR_1 ... FINAL_SINC, degrade_sequence
    RealDegradationDataset(root=None, num_frames=15, gt_size=256, ...)   RealBasicVSR training data; prepare_test_set

Command line: `--bench-degradation` (RealBasicVSR samples/s, one worker), `--prepare bi|bd --src GT`.

Randomness: a training sample is a pure function of (seed, rank, epoch (set_epoch), index), whatever num_workers.
"""
import argparse
import functools
import io
import math
import os
import shutil
import sys
import time
import uuid

import cv2
import numpy as np
import torch

IMG_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# ---------------------------------------------------------------------------------------------
# Image I/O


def read_image(path):
    """RGB uint8 (h, w, 3). Grey images are expanded to three channels, 16-bit ones reduced to 8."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot decode image (corrupt or unsupported): {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


class atomic_path:
    """The one way this project writes a file or folder: to a temporary sibling, <root>.tmp-<8 hex digits><ext>
    (the extension kept: encoders choose by it; ext=False: none, a folder), fsynced and moved into place once
    complete: `with atomic_path(path) as tmp:` (deleted on an exception), or a.tmp, a.commit() / a.discard()."""

    TAG = ".tmp-"  # in every temporary's name: a killed run's leftovers are known by it

    def __init__(self, path, ext=True):
        self.path = os.fspath(path)
        root, suffix = os.path.splitext(self.path)
        self.tmp = f"{root}{self.TAG}{uuid.uuid4().hex[:8]}{suffix if ext else ''}"

    def commit(self):
        if os.path.isfile(self.tmp):
            with open(self.tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(self.tmp, self.path)

    def discard(self):
        if os.path.isdir(self.tmp):
            shutil.rmtree(self.tmp, ignore_errors=True)
        elif os.path.exists(self.tmp):
            os.remove(self.tmp)

    def __enter__(self):
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.commit()
        finally:
            self.discard()  # a no-op once committed


def write_image(path, rgb, compression=3):
    """Write an RGB uint8 image atomically (PNG compression level 0-9 for .png)."""
    ext = os.path.splitext(path)[1].lower()
    params = [cv2.IMWRITE_PNG_COMPRESSION, int(compression)] if ext == ".png" else []
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(rgb[..., ::-1] if rgb.ndim == 3 else rgb), params)
    if not ok:
        raise ValueError(f"cannot encode image as {ext}: {path}")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(buf.tobytes())


def frames_to_tensor(frames):
    """List / array of (h, w, 3) frames, uint8 or float in [0, 1] -> (t, 3, h, w) float32 tensor."""
    arr = np.stack(frames) if isinstance(frames, (list, tuple)) else frames
    t = torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))
    return t.float().div_(255.0) if arr.dtype == np.uint8 else t.float()


# ---------------------------------------------------------------------------------------------
# Test-set degradations: MATLAB bicubic (BI) and Gaussian blur + subsampling (BD), spec §7.2


def _cubic(x):
    # Keys' cubic with a = -0.5, as MATLAB's imresize
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    return np.where(ax <= 1, 1.5 * ax3 - 2.5 * ax2 + 1,
                    np.where(ax <= 2, -0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2, 0.0))


@functools.lru_cache(maxsize=64)
def _imresize_weights(in_len, out_len, scale):
    """MATLAB imresize's bicubic weights along one axis: out[i] = sum_j w[i, j] x[src[i, j]], (out_len, taps)."""
    kernel_scale = min(scale, 1.0)  # downscaling widens the kernel: antialiasing
    width = 4.0 / kernel_scale
    u = np.arange(1, out_len + 1, dtype=np.float64) / scale + 0.5 * (1 - 1 / scale)
    idx = np.floor(u - width / 2)[:, None] + np.arange(int(math.ceil(width)) + 2)[None, :]  # 1-based input positions
    w = kernel_scale * _cubic(kernel_scale * (u[:, None] - idx))
    w /= w.sum(axis=1, keepdims=True)
    # out-of-range taps mirror with the edge pixel repeated (MATLAB's symmetric padding)
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len)[::-1]])
    src = mirror[np.mod(idx.astype(np.int64) - 1, 2 * in_len)]
    return src, w


def matlab_imresize(img, scale):
    """MATLAB `imresize(img, scale)`, default bicubic kernel with antialiasing. img (h, w) or (h, w, c):
    uint8 returns uint8 (rounded half up, clipped), float returns float64 unclipped. Rows first, in
    float64 without intermediate rounding (as the Python ports used by mmagic/BasicSR)."""
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    h, w = img.shape[:2]
    out_h, out_w = int(math.ceil(h * scale)), int(math.ceil(w * scale))
    # gathers instead of dense matrix products: no BLAS threads, which stall on a busy machine
    src, wt = _imresize_weights(h, out_h, float(scale))
    x = np.einsum("ot,ot...->o...", wt, img.astype(np.float64)[src])  # (oh, w, ...)
    src, wt = _imresize_weights(w, out_w, float(scale))
    x = np.einsum("ot,pot...->po...", wt, x[:, src])  # (oh, ow, ...)
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8) if img.dtype == np.uint8 else x


def bicubic_downsample(img, scale=4):
    """The BI degradation: MATLAB bicubic downsampling by an integer factor, uint8 out."""
    h, w = img.shape[:2]
    if h % scale or w % scale:
        raise ValueError(f"image size {h}x{w} is not divisible by scale {scale}")
    return matlab_imresize(img.astype(np.uint8, copy=False), 1.0 / scale)


def bd_downsample(img, sigma=1.6, scale=4):
    """The BD degradation: Gaussian blur (MATLAB fspecial, size 12 for sigma 1.6, replicate border,
    anchor (5, 5) as MATLAB's imfilter centre for an even kernel), then every scale-th pixel from 1."""
    size = int(math.ceil(3 * sigma)) * 2 + 2  # 12 for sigma 1.6: even, centred between pixels
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2  # -5.5 ... 5.5
    k, anchor = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma * sigma)), (size - 1) // 2
    blurred = cv2.filter2D(img.astype(np.float64), -1, k / k.sum(), anchor=(anchor, anchor),
                           borderType=cv2.BORDER_REPLICATE)
    return np.clip(np.floor(blurred[1:-1:scale, 1:-1:scale] + 0.5), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Built-in synthetic clips: textured world + camera path (pan, zoom, roll) + moving objects, drawn at
# 2x the GT resolution and low-passed before sampling: antialiased edges, sub-pixel motion.

_SS = 2  # supersampling factor of the render


def _low_freq(rng, h, w, cell):
    """Smooth random field (zero mean, unit std), bicubic upsampling of a coarse grid."""
    g = rng.standard_normal((max(2, h // cell + 2), max(2, w // cell + 2))).astype(np.float32)
    f = cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)
    return (f - f.mean()) / (f.std() + 1e-6)


def _fractal_noise(rng, h, w, beta):
    """Gaussian noise with a 1/f**beta amplitude spectrum, zero mean, unit std."""
    spec = np.fft.rfft2(rng.standard_normal((h, w)).astype(np.float32))
    fy, fx = np.fft.fftfreq(h).astype(np.float32)[:, None], np.fft.rfftfreq(w).astype(np.float32)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    n = np.fft.irfft2(spec / f ** beta, s=(h, w)).astype(np.float32)
    return (n - n.mean()) / (n.std() + 1e-6)


def _grating(rng, h, w, min_period, max_period):
    """Oriented sinusoid or soft square wave in [-1, 1]."""
    period, a = math.exp(rng.uniform(math.log(min_period), math.log(max_period))), rng.uniform(0, math.pi)
    y, x = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]
    g = np.cos((x * math.cos(a) + y * math.sin(a)) * (2 * math.pi / period) + rng.uniform(0, 2 * math.pi))
    if rng.random() < 0.5:  # square wave: sharp, regular edges
        g = np.tanh(g * rng.uniform(3, 10))
    return g


def _colour(rng, lo=0.0, hi=1.0):
    """A random RGB colour, mostly of moderate saturation as in natural scenes."""
    grey = rng.uniform(lo, hi)
    return np.clip(grey + rng.uniform(0.1, 0.6) * (rng.uniform(lo, hi, 3) - grey), 0, 1).astype(np.float32)


def _draw_shape(rng, img, size):
    """Blend one antialiased shape (rectangle, ellipse, polygon or stroke) into img in place."""
    h, w = img.shape[:2]
    r, cx, cy = size * math.exp(rng.uniform(-1.0, 1.0)), rng.uniform(0, w), rng.uniform(0, h)
    x0, y0 = int(max(0, cx - 1.5 * r - 2)), int(max(0, cy - 1.5 * r - 2))
    x1, y1 = int(min(w, cx + 1.5 * r + 3)), int(min(h, cy + 1.5 * r + 3))
    if x1 - x0 < 2 or y1 - y0 < 2:
        return
    mask, c = np.zeros((y1 - y0, x1 - x0), np.uint8), (cx - x0, cy - y0)
    kind = rng.integers(4)
    if kind == 0:  # rotated rectangle
        box = cv2.boxPoints((c, (r * rng.uniform(0.3, 2), r * rng.uniform(0.3, 2)), rng.uniform(0, 180)))
        cv2.fillPoly(mask, [np.round(box * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
    elif kind == 1:
        axes = (int(r * rng.uniform(0.3, 1) * 16), int(r * rng.uniform(0.3, 1) * 16))
        cv2.ellipse(mask, (int(c[0] * 16), int(c[1] * 16)), axes, rng.uniform(0, 180), 0, 360, 255,
                    -1, cv2.LINE_AA, shift=4)
    elif kind == 2:  # star-like polygon
        n = rng.integers(3, 9)
        ang, rad = np.sort(rng.uniform(0, 2 * math.pi, n)), r * rng.uniform(0.3, 1.0, n)
        pts = np.stack([c[0] + rad * np.cos(ang), c[1] + rad * np.sin(ang)], 1)
        cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
    else:  # stroke
        p = np.array([[c[0] - r * rng.uniform(-1, 1), c[1] - r * rng.uniform(-1, 1)],
                      [c[0] + r * rng.uniform(-1, 1), c[1] + r * rng.uniform(-1, 1)]])
        cv2.line(mask, tuple(np.round(p[0] * 16).astype(int)), tuple(np.round(p[1] * 16).astype(int)),
                 255, max(1, int(rng.uniform(1, 0.3 * r + 2))), cv2.LINE_AA, shift=4)
    m, patch = (mask.astype(np.float32) / 255.0)[..., None], img[y0:y1, x0:x1]
    if rng.random() < 0.3:  # textured fill
        g = _grating(rng, y1 - y0, x1 - x0, 3, 12)[..., None]
        fill = np.clip(_colour(rng, 0.2, 0.8) + 0.25 * g * _colour(rng, -1, 1), 0, 1)
    else:
        fill = _colour(rng)
    patch *= 1 - m
    patch += m * fill


def _texture(rng, h, w, num_shapes):
    """Colour texture (h, w, 3) in [0, 1]: smooth colour field, gratings in random regions, shapes, fine detail."""
    img = np.full((h, w, 3), _colour(rng, 0.25, 0.75), np.float32)
    for _ in range(2):
        img += 0.15 * _low_freq(rng, h, w, 64)[..., None] * _colour(rng, -1, 1)
    for _ in range(int(rng.integers(2, 6))):
        region = 1 / (1 + np.exp(-4 * (_low_freq(rng, h, w, 96) - rng.uniform(-0.5, 1.0))))
        g = _grating(rng, h, w, 3 * _SS, 30 * _SS)
        img += (rng.uniform(0.1, 0.3) * region * g)[..., None] * _colour(rng, -1, 1)
    for _ in range(num_shapes):
        _draw_shape(rng, img, size=rng.uniform(4, 24) * _SS)
    detail = _fractal_noise(rng, h, w, beta=rng.uniform(0.8, 1.3))
    img += rng.uniform(0.02, 0.06) * detail[..., None]
    return np.clip(img, 0, 1)


def _rot(a):
    return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


def synthetic_clip(seed, num_frames, gt_size, num_objects=None, zoom=True, rotation=True):
    """One clip: GT frames uint8 (t, gt_size, gt_size, 3) and its motion {"camera": centre (t, 2) (x, y) in GT
    pixels from frame 0, "zoom", "roll"}. A frame pixel p maps to canvas point c(t) + s(t) R(t) (p - centre):
    c(t) = c0 + v t + a t^2 / 2 + shake, s(t) = exp(z t), R(t) a roll by w t; the 2x canvas is prefiltered and
    sampled by a sub-pixel cubic warp. Objects: textured sprites with their own velocity and spin."""
    rng = np.random.default_rng(seed)
    ss, size = _SS, gt_size * _SS
    t = np.arange(num_frames, dtype=np.float64)
    # camera path in canvas pixels (2x); total travel bounded so long clips stay affordable
    speed = rng.uniform(0.3, 3.0) * ss * min(1.0, 60.0 / max(num_frames, 1))
    d = rng.uniform(0, 2 * math.pi)
    vel = speed * np.array([math.cos(d), math.sin(d)])
    acc = rng.normal(0, 0.02 * ss, 2) * min(1.0, 30.0 / max(num_frames, 1))
    shake, ph, fr = rng.uniform(0, 0.6) * ss, rng.uniform(0, 2 * math.pi, 2), rng.uniform(0.1, 0.5, 2)
    pos = vel[None] * t[:, None] + 0.5 * acc[None] * t[:, None] ** 2
    pos += shake * np.sin(fr[None] * t[:, None] + ph[None])
    scl = np.exp((rng.uniform(-0.12, 0.12) / max(num_frames, 1) if zoom else 0.0) * t)  # zoom s(t)
    ang = (rng.uniform(-0.05, 0.05) / max(num_frames, 1) if rotation else 0.0) * t  # roll
    # canvas big enough for every frame footprint, plus a margin for the cubic taps
    half = size / 2 * np.max(scl * (np.abs(np.cos(ang)) + np.abs(np.sin(ang))))
    lo, hi = pos.min(0) - half - 8, pos.max(0) + half + 8
    cw, ch = int(math.ceil(hi[0] - lo[0])), int(math.ceil(hi[1] - lo[1]))
    canvas = _texture(rng, ch, cw, num_shapes=int(cw * ch / (40 * ss) ** 2) + 10)
    centre_canvas = pos - lo  # camera centres in canvas coordinates
    # objects: sprites with alpha, moving in frame coordinates
    n_obj = int(rng.integers(2, 6)) if num_objects is None else num_objects
    objects = []
    for _ in range(n_obj):
        sh, sw = (int(size * rng.uniform(0.15, 0.4)) for _ in range(2))
        tex, alpha = _texture(rng, sh, sw, num_shapes=4), np.zeros((sh, sw), np.uint8)
        if rng.random() < 0.5:
            cv2.ellipse(alpha, (((sw - 1) / 2, (sh - 1) / 2), (sw - 3, sh - 3), 0.0), 255, -1, cv2.LINE_AA)
        else:
            n = rng.integers(5, 9)
            a, rr = np.sort(rng.uniform(0, 2 * math.pi, n)), rng.uniform(0.6, 1.0, n)
            pts = np.stack([(sw - 1) / 2 * (1 + rr * np.cos(a)), (sh - 1) / 2 * (1 + rr * np.sin(a))], 1)
            cv2.fillPoly(alpha, [np.round(pts * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
        rgba = np.concatenate([tex, alpha[..., None].astype(np.float32) / 255], axis=2)
        rgba = cv2.GaussianBlur(rgba, (0, 0), 0.4 * ss)  # prefiltered as the canvas is below
        p0 = rng.uniform(0.1, 0.9, 2) * size
        ov = rng.uniform(0.5, 4.0) * ss * min(1.0, 60.0 / max(num_frames, 1))
        od = rng.uniform(0, 2 * math.pi)
        objects.append((rgba, p0, ov * np.array([math.cos(od), math.sin(od)]),
                        rng.uniform(0, 2 * math.pi), rng.uniform(-0.03, 0.03)))
    # prefilter once at 2x (about the MTF of a 2x2 area average), then sample straight at GT size
    canvas = cv2.GaussianBlur(canvas, (0, 0), 0.4 * ss)
    frames, c_frame = np.empty((num_frames, gt_size, gt_size, 3), np.uint8), np.array([(gt_size - 1) / 2] * 2)
    for k in range(num_frames):
        A = ss * scl[k] * _rot(ang[k])  # GT pixel -> canvas pixel
        M = np.concatenate([A, (centre_canvas[k] - A @ c_frame)[:, None]], 1)
        frame = cv2.warpAffine(canvas, M, (gt_size, gt_size), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                               borderMode=cv2.BORDER_REFLECT)
        for rgba, p0, ov, a0, spin in objects:
            _paste_sprite(frame, rgba, (p0 + ov * k) / ss, a0 + spin * k, 1.0 / ss)
        frames[k] = np.clip(frame * 255 + 0.5, 0, 255).astype(np.uint8)
    camera = pos / ss  # camera centre path in GT pixels
    return frames, {"camera": camera - camera[0], "zoom": scl, "roll": ang}


def _paste_sprite(frame, rgba, centre, angle, scale):
    """Alpha-composite a sprite, rotated, scaled and centred at `centre` (frame pixels), in its bounding box."""
    sh, sw = rgba.shape[:2]
    A = scale * _rot(angle)  # sprite pixel offset -> frame pixel offset
    corners = (np.array([[0, 0], [sw, 0], [0, sh], [sw, sh]]) - [sw / 2, sh / 2]) @ A.T + centre
    x0, y0 = np.floor(corners.min(0)).astype(int)
    x1, y1 = np.ceil(corners.max(0)).astype(int) + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, frame.shape[1]), min(y1, frame.shape[0])
    if x1 <= x0 or y1 <= y0:
        return
    # inverse map: window pixel q -> sprite pixel A^-1 (q + (x0, y0) - centre) + sprite centre
    Ai = np.linalg.inv(A)
    off = Ai @ (np.array([x0, y0]) - centre) + [(sw - 1) / 2, (sh - 1) / 2]
    M = np.concatenate([Ai, off[:, None]], 1)
    patch = cv2.warpAffine(rgba, M, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    a, win = patch[..., 3:4], frame[y0:y1, x0:x1]
    win *= 1 - a
    win += a * patch[..., :3]


# ---------------------------------------------------------------------------------------------
# Datasets: training samples are a random window, crop and flips (_train_sample), evaluation ones whole clips.


def _need_dirs(*folders):
    for folder in folders:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"folder not found: {folder}")


def _list_frames(folder):
    """Sorted paths of the images in `folder` (upscale.py uses it too)."""
    _need_dirs(folder)
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMG_EXTS))
    if not names:
        raise ValueError(f"no image frames in folder: {folder}")
    return [os.path.join(folder, n) for n in names]


def _list_clips(folder):
    _need_dirs(folder)
    clips = sorted(n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n)))
    if not clips:
        raise ValueError(f"no clip folders in: {folder}")
    return clips


def _check_choice(what, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}: use {', '.join(choices[:-1])} or {choices[-1]}")


def _check_scale(gt_size, scale):
    if gt_size is not None and gt_size % scale:
        raise ValueError(f"gt_size {gt_size} must be divisible by scale {scale}")


def _check_length(paths, num_frames):
    if len(paths) < num_frames:
        raise ValueError(f"clip has {len(paths)} frames, fewer than num_frames={num_frames}: "
                         f"{os.path.dirname(paths[0])}")


def _check_pair(lq, gt, scale, lq_path, gt_path):
    if gt.shape[1] != lq.shape[1] * scale or gt.shape[2] != lq.shape[2] * scale:
        raise ValueError(f"GT size {gt.shape[2]}x{gt.shape[1]} is not {scale}x the LQ size "
                         f"{lq.shape[2]}x{lq.shape[1]}: {gt_path} vs {lq_path}")


def _read_clip(paths):
    """Read frames that must all have one size; error names the first mismatching frame."""
    frames = [read_image(p) for p in paths]
    for p, f in zip(paths, frames):
        if f.shape != frames[0].shape:
            raise ValueError(f"frame size {f.shape[1]}x{f.shape[0]} differs from "
                             f"{frames[0].shape[1]}x{frames[0].shape[0]} of {paths[0]}: {p}")
    return np.stack(frames)


def _read_clips(paths, scale):
    """([lq,] gt) frame path lists -> uint8 (t, h, w, 3) arrays; the GT must be `scale` x the LQ."""
    seqs = [_read_clip(p) for p in paths]
    if len(seqs) == 2:
        _check_pair(*seqs, scale, paths[0][0], paths[1][0])
    return seqs


def _augment(rng, *seqs):
    """Flip / transpose every frame of every sequence the same way; seqs are (t, h, w, 3) arrays."""
    hflip, vflip, transpose = rng.random(3) < 0.5
    seqs = [s[:, ::(-1 if vflip else 1), ::(-1 if hflip else 1)] for s in seqs]
    return [np.ascontiguousarray(s.transpose(0, 2, 1, 3) if transpose else s) for s in seqs]


def _train_sample(rng, paths, num_frames, gt_size, scale=1):
    """([lq,] gt) frame path lists -> a random window of num_frames (None: all), the same random crop of
    each (GT gt_size, LQ gt_size / scale; None: none) and flips/transpose (p = 0.5 each), uint8 arrays; start."""
    start = 0
    if num_frames is not None:
        _check_length(paths[-1], num_frames)
        start = int(rng.integers(0, len(paths[-1]) - num_frames + 1))
        paths = [p[start:start + num_frames] for p in paths]
    seqs = _read_clips(paths, scale)
    if gt_size is not None:  # placed on the first sequence, the LQ when paired
        size, (h, w) = gt_size // scale, seqs[0].shape[1:3]
        if h < size or w < size:
            raise ValueError(f"{'LQ ' if len(seqs) > 1 else ''}frames {w}x{h} are smaller than the crop "
                             f"{size}x{size}: {paths[0][0]}")
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        seqs = [s[:, top * f:(top + size) * f, left * f:(left + size) * f] for s, f in zip(seqs, (1, scale))]
    return _augment(rng, *seqs), start


class _Clips(torch.utils.data.Dataset):
    """clips: the clip names; paths: per clip one frame path list per field (lq, gt). A training set
    gives one _train_sample per clip, keyed "{clip}/{start:08d}"; the others whole clips, keyed clip."""
    fields, training, num_frames, gt_size, scale = ("lq", "gt"), False, None, None, 1

    def _find(self, roots, clips, num_frames=None):
        """Frame paths of each clip under each of roots ([lq_root,] gt_root); LQ, GT counts equal, >= num_frames."""
        self.clips, self.paths = clips, []
        for c in clips:
            folders = [os.path.join(r, c) for r in roots]
            paths = [_list_frames(f) for f in folders]
            if len(paths) == 2 and len(paths[0]) != len(paths[1]):
                raise ValueError(f"LQ clip has {len(paths[0])} frames but GT clip has {len(paths[1])}: "
                                 f"{folders[0]} vs {folders[1]}")
            self.paths.append(paths)
        for paths in self.paths if num_frames is not None else ():
            _check_length(paths[-1], num_frames)

    def __len__(self):
        return len(self.clips)

    def sample(self, index, rng=None):
        """One uint8 (t, h, w, 3) array per field, and the key."""
        if not self.training:
            return _read_clips(self.paths[index], self.scale), self.clips[index]
        seqs, start = _train_sample(rng, self.paths[index], self.num_frames, self.gt_size, self.scale)
        return seqs, f"{self.clips[index]}/{start:08d}"

    def __getitem__(self, index):
        seqs, key = self.sample(index, self.rng(index) if self.training else None)
        return {**{f: frames_to_tensor(s) for f, s in zip(self.fields, seqs)}, "key": key}


class _SampledDataset(torch.utils.data.Dataset):
    """Shared seeding: the random state of a sample depends only on (seed, rank, epoch, index)."""

    def __init__(self, seed=0, rank=None):
        if rank is None:
            dist = torch.distributed
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.seed, self.rank, self.epoch = int(seed), int(rank), 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def rng(self, index):
        return np.random.default_rng([self.seed, self.rank, self.epoch, int(index)])


class SyntheticClips(torch.utils.data.Dataset):
    """The built-in default data: clip i is synthetic_clip((seed, i)) with its BI LQ (seed=1: held-out clips)."""

    def __init__(self, num_clips, num_frames, gt_size, scale=4, seed=0):
        _check_scale(gt_size, scale)
        if num_clips < 1 or num_frames < 1:
            raise ValueError(f"num_clips and num_frames must be >= 1, got {num_clips}, {num_frames}")
        self.num_clips, self.num_frames, self.gt_size = int(num_clips), int(num_frames), int(gt_size)
        self.scale, self.seed = int(scale), int(seed)

    def __len__(self):
        return self.num_clips

    def __getitem__(self, index):
        if not 0 <= index < self.num_clips:
            raise IndexError(index)
        gt, _ = synthetic_clip([self.seed, index], self.num_frames, self.gt_size)
        lq = [bicubic_downsample(f, self.scale) for f in gt]
        return {"lq": frames_to_tensor(lq), "gt": frames_to_tensor(gt), "key": f"synthetic_s{self.seed}_{index:05d}"}


REDS4_CLIPS = ("000", "011", "015", "020")
REDSVAL_CLIPS = tuple(f"{i:03d}" for i in range(240, 270))


class REDS(_SampledDataset, _Clips):
    """REDS with val merged in as clips 240-269 (root/train_sharp, root/train_sharp_bicubic/X{scale}). Training
    splits, one random window per clip per epoch: "train" (every clip present but REDS4), "official_train"
    (clips 000-239 present); whole clips (gt_size, num_frames ignored): "reds4" (000, 011, 015, 020), "redsval"."""

    def __init__(self, root, split, num_frames=30, gt_size=256, scale=4, seed=0, rank=None):
        super().__init__(seed, rank)
        _check_choice("REDS split", split, ("train", "official_train", "reds4", "redsval"))
        _check_scale(gt_size, scale)
        self.gt_root = os.path.join(root, "train_sharp")
        self.lq_root = os.path.join(root, "train_sharp_bicubic", f"X{scale}")
        present = _list_clips(self.gt_root)
        _need_dirs(self.lq_root)
        self.split, self.training = split, split in ("train", "official_train")
        if self.training:
            clips = [c for c in present if (c not in REDS4_CLIPS if split == "train" else c.isdigit() and int(c) < 240)]
        else:  # benchmark splits must be complete, or the numbers silently change
            clips = list(REDS4_CLIPS if split == "reds4" else REDSVAL_CLIPS)
            for c in clips:
                if c not in present:
                    raise FileNotFoundError(f"REDS {split} clip missing: {os.path.join(self.gt_root, c)}")
        if not clips:
            raise ValueError(f"no clips for REDS split {split!r} in {self.gt_root}")
        self.num_frames, self.gt_size, self.scale = num_frames, gt_size, scale
        self._find((self.lq_root, self.gt_root), clips, num_frames if self.training else None)


class REDSSub(_SampledDataset, _Clips):
    """GT-only training clips for RealBasicVSR: root/train_sharp_sub/{clip}_s{index:03d}/*.png (from
    crop_sub_images.py; gt_dir picks another folder of clip folders). Items {"gt", "key"}."""
    fields, training = ("gt",), True

    def __init__(self, root, num_frames=15, gt_size=256, gt_dir="train_sharp_sub", seed=0, rank=None):
        super().__init__(seed, rank)
        self.gt_root = os.path.join(root, gt_dir)
        self._find([self.gt_root], _list_clips(self.gt_root), num_frames)
        self.num_frames, self.gt_size = num_frames, gt_size


class Vimeo90K(_SampledDataset, _Clips):
    """Vimeo-90K septuplets in the mmagic layout (spec §7.2): root/GT/{xxxxx}/{yyyy}/im1..im7.png,
    root/{BD|BI}x4/..., root/meta_info_Vimeo90K_{train|test}_GT.txt (one "xxxxx/yyyy ..." line each).
    "train": a paired crop + flips, LQ and GT mirrored to 14 frames. "test": the LQ mirrored to 14, GT
    only im4 as (1, 3, H, W); reduce the 14 outputs to the centre as 0.5 * (out[3] + out[10])."""

    def __init__(self, root, split, degradation="BI", gt_size=256, scale=4, seed=0, rank=None):
        super().__init__(seed, rank)
        _check_choice("Vimeo90K split", split, ("train", "test"))
        _check_choice("Vimeo90K degradation", degradation, ("BI", "BD"))
        meta = os.path.join(root, f"meta_info_Vimeo90K_{split}_GT.txt")
        if not os.path.isfile(meta):
            raise FileNotFoundError(f"Vimeo-90K annotation file not found: {meta}")
        with open(meta) as f:
            self.keys = self.clips = [line.split()[0] for line in f if line.strip()]
        if not self.keys:
            raise ValueError(f"no septuplets listed in {meta}")
        self.gt_root, self.lq_root = os.path.join(root, "GT"), os.path.join(root, f"{degradation}x{scale}")
        _need_dirs(self.gt_root, self.lq_root)
        self.training, self.gt_size, self.scale = split == "train", gt_size, scale

    def sample(self, index, rng=None):
        key = self.keys[index]
        lq_paths, gt_paths = ([os.path.join(r, key, f"im{i}.png") for i in range(1, 8)]
                              for r in (self.lq_root, self.gt_root))
        if self.training:
            (lq, gt), _ = _train_sample(rng, (lq_paths, gt_paths), None, self.gt_size, self.scale)
            gt = np.concatenate([gt, gt[::-1]])
        else:
            lq, gt = _read_clip(lq_paths), read_image(gt_paths[3])[None]
            _check_pair(lq, gt, self.scale, lq_paths[3], gt_paths[3])
        return (np.concatenate([lq, lq[::-1]]), gt), key


class PairedFolders(_Clips):
    """Whole-clip test sets (Vid4, UDM10): root/lq_dir/{clip}/*.png ("BIx4", "BDx4"), root/gt_dir/{clip}/*.png."""

    def __init__(self, root, lq_dir, gt_dir, scale=4):
        self.lq_root, self.gt_root = os.path.join(root, lq_dir), os.path.join(root, gt_dir)
        clips = _list_clips(self.gt_root)
        _need_dirs(self.lq_root)
        self._find((self.lq_root, self.gt_root), clips)
        self.scale = scale


class LQFolder(_Clips):
    """LQ-only clips (VideoLQ, user frames): root/{clip}/*.png, or root/*.png as one clip. Items {"lq", "key"}."""
    fields = ("lq",)

    def __init__(self, root):
        _need_dirs(root)
        if any(n.lower().endswith(IMG_EXTS) for n in os.listdir(root)):
            self.clips, self.paths = [os.path.basename(os.path.normpath(root))], [[_list_frames(root)]]
        else:
            self._find([root], _list_clips(root))


# ---------------------------------------------------------------------------------------------
# RealBasicVSR degradations (spec §6): the official MME recipe, on float32 frames in [0, 1]. Each transform
# takes a list of (h, w, 3) frames and a np.random.Generator, skips itself when U(0, 1) > p["prob"], draws
# its discrete choices once per sequence and walks its continuous parameters per frame (_walk):
#     p_{k+1} = clip(p_k + U(-step, step), range)


def unsharp_mask(img, kernel_size=51, sigma=0, weight=0.5, threshold=10):
    """Sharpen where the high-pass residue exceeds `threshold` grey levels; img float (h, w, 3) in [0, 1].
    sigma 0 lets OpenCV derive it from the size: 0.3 * ((51 - 1) / 2 - 1) + 0.8 = 8.0."""
    g = cv2.getGaussianKernel(kernel_size, sigma)  # the 2-D kernel is g g^T: filter separably
    residue = img - cv2.sepFilter2D(img, -1, g, g)
    mask = (np.abs(residue) * 255 > threshold).astype(np.float32)
    soft, sharp = cv2.sepFilter2D(mask, -1, g, g), np.clip(img + weight * residue, 0, 1)
    return soft * sharp + (1 - soft) * img


# Blur kernels (Real-ESRGAN formulation, spec §6.2), all on the grid -k//2+1 .. k//2, normalised to sum 1.

def _quadratic_form(k, sigma_x, sigma_y, theta):
    """Q = x^T Sigma^-1 x on the k x k grid, Sigma = R(theta) diag(sx^2, sy^2) R(theta)^T."""
    ax = np.arange(-k // 2 + 1.0, k // 2 + 1.0)
    xx, yy = np.meshgrid(ax, ax)
    R = _rot(theta)
    inv = np.linalg.inv(R @ np.diag([sigma_x ** 2, sigma_y ** 2]) @ R.T)
    return inv[0, 0] * xx * xx + (inv[0, 1] + inv[1, 0]) * xx * yy + inv[1, 1] * yy * yy


def gaussian_kernel(k, sigma_x, sigma_y, theta):
    q = np.exp(-0.5 * _quadratic_form(k, sigma_x, sigma_y, theta))
    return q / q.sum()


def generalized_gaussian_kernel(k, sigma_x, sigma_y, theta, beta):
    q = np.exp(-0.5 * _quadratic_form(k, sigma_x, sigma_y, theta) ** beta)
    return q / q.sum()


def plateau_kernel(k, sigma_x, sigma_y, theta, beta):
    q = 1 / (_quadratic_form(k, sigma_x, sigma_y, theta) ** beta + 1)
    return q / q.sum()


def _bessel_j1(x):
    # J1(x) = 1/(2 pi) * integral over [0, 2 pi) of cos(t - x sin t); the trapezoid rule is
    # spectrally accurate for this periodic integrand (128 nodes: exact to 1e-15 for x < 60)
    t = np.linspace(0, 2 * math.pi, 128, endpoint=False)
    return np.cos(t - np.asarray(x, np.float64)[..., None] * np.sin(t)).mean(-1)


def sinc_kernel(k, omega):
    """Circular low-pass with cutoff omega: omega J1(omega r) / (2 pi r), centre omega^2 / (4 pi)."""
    ax = np.arange(k) - (k - 1) / 2
    r = np.hypot(ax[:, None], ax[None, :])
    r[(k - 1) // 2, (k - 1) // 2] = 1.0  # placeholder, replaced below
    q = omega * _bessel_j1(omega * r) / (2 * math.pi * r)
    q[(k - 1) // 2, (k - 1) // 2] = omega ** 2 / (4 * math.pi)
    return q / q.sum()


def _resampled_beta(rng, beta):
    # Quirk kept from the reference (spec §6.2): the helper gets the degenerate range [beta, beta]
    # and re-draws from [beta, 1] or [1, beta] with p = 0.5 each, i.e. uniform between beta and 1.
    lo, hi = (beta, 1.0) if rng.random() < 0.5 else (1.0, beta)
    return lo + (hi - lo) * rng.random()  # np.random.uniform's formula, which allows lo > hi


def blur_kernel(kind, k, sigma_x, sigma_y, theta, beta_gaussian, beta_plateau, omega, rng):
    """A kernel of KERNEL_LIST: the *iso kinds use sigma_x on both axes, unrotated; the generalized and
    plateau kinds draw their beta from rng (_resampled_beta)."""
    if kind not in KERNEL_LIST:
        raise ValueError(f"unknown blur kernel type {kind!r}")
    if kind == "sinc":
        return sinc_kernel(k, omega)
    family, _, shape = kind.rpartition("_")
    sigma_y, theta = (sigma_x, 0.0) if shape == "iso" else (sigma_y, theta)
    if not family:
        return gaussian_kernel(k, sigma_x, sigma_y, theta)
    fn, beta = {"generalized": (generalized_gaussian_kernel, beta_gaussian),
                "plateau": (plateau_kernel, beta_plateau)}[family]
    return fn(k, sigma_x, sigma_y, theta, _resampled_beta(rng, beta))


def _skip(rng, p):
    return rng.random() > p.get("prob", 1.0)


def _walk(rng, value, step, lo, hi):
    return min(max(value + rng.uniform(-step, step), lo), hi)


def random_blur(frames, rng, p):
    if _skip(rng, p):
        return frames
    kind = p["kernel_list"][rng.choice(len(p["kernel_list"]), p=p["kernel_prob"])]
    k = int(p["kernel_size"][rng.integers(len(p["kernel_size"]))])
    ranges = {name: p.get(name, (0.0, 0.0)) for name in  # in blur_kernel's argument order
              ("sigma_x", "sigma_y", "rotate_angle", "beta_gaussian", "beta_plateau")}
    # omega not given: the Real-ESRGAN rule, a wider range for large kernels
    ranges["omega"] = p.get("omega") or ((math.pi / 3, math.pi) if k < 13 else (math.pi / 5, math.pi))
    value = {name: rng.uniform(*r) for name, r in ranges.items()}
    out = []
    for img in frames:
        if kind == "iso":  # separable: two 1-D passes equal the k x k kernel up to float rounding
            g = np.exp(-0.5 * (np.arange(-k // 2 + 1.0, k // 2 + 1.0) / value["sigma_x"]) ** 2)
            g = (g / g.sum()).astype(np.float32)
            out.append(cv2.sepFilter2D(img, -1, g, g))
        else:  # correlation, REFLECT_101
            out.append(cv2.filter2D(img, -1, blur_kernel(kind, k, *value.values(), rng).astype(np.float32)))
        for name, r in ranges.items():
            value[name] = _walk(rng, value[name], p.get(name + "_step", 0.0), *r)
    return out


_RESIZE_OPT = {"bilinear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA, "bicubic": cv2.INTER_CUBIC}


def random_resize(frames, rng, p):
    """Resize with one interpolation per sequence. Without target_size: up/down/keep mode, a scale
    relative to frame 0's size that walks per frame by resize_step (so frame sizes may differ)."""
    if _skip(rng, p):
        return frames
    opt = p["resize_opt"][rng.choice(len(p["resize_opt"]), p=p["resize_prob"])]
    _check_choice("resize_opt", opt, tuple(_RESIZE_OPT))
    interp = _RESIZE_OPT[opt]
    if p.get("target_size") is not None:
        th, tw = p["target_size"]
        return [cv2.resize(img, (tw, th), interpolation=interp) for img in frames]
    (h, w), (lo, hi) = frames[0].shape[:2], p["resize_scale"]
    mode = rng.choice(3, p=p["resize_mode_prob"])  # up, down, keep
    scale = rng.uniform(1, hi) if mode == 0 else rng.uniform(lo, 1) if mode == 1 else 1.0
    even, step = p.get("is_size_even", False), p.get("resize_step", 0.0)
    out = []
    for img in frames:
        th, tw = (2 * (n * scale // 2) if even else n * scale for n in (h, w))  # yuv420p needs even sizes
        out.append(cv2.resize(img, (max(int(tw), 2), max(int(th), 2)), interpolation=interp))
        if step:
            scale = _walk(rng, scale, step, lo, hi)
    return out


def _to_uint8(img):
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def random_noise(frames, rng, p):
    """Gaussian noise (sigma in grey levels) or, as MME / Real-ESRGAN, Poisson noise (poisson(x v) / v - x) *
    scale, x the 8-bit value, v = 2**ceil(log2(#distinct values)). Gray: one plane for all channels (Poisson: luma)."""
    if _skip(rng, p):
        return frames
    kind = p["noise_type"][rng.choice(len(p["noise_type"]), p=p["noise_prob"])]
    _check_choice("noise_type", kind, ("gaussian", "poisson"))
    name = "gaussian_sigma" if kind == "gaussian" else "poisson_scale"
    lo, hi = p[name]
    level, gray = rng.uniform(lo, hi), rng.random() < p[kind + "_gray_noise_prob"]  # drawn in this order
    out = []
    for img in frames:
        if kind == "gaussian":
            shape = img.shape[:2] + ((1,) if gray else (3,))
            noise = rng.standard_normal(shape, dtype=np.float32) * np.float32(level / 255)
        else:
            x8 = _to_uint8(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[..., None] if gray else img)
            vals = 2 ** math.ceil(math.log2(np.count_nonzero(np.bincount(x8.ravel(), minlength=256))))
            x = x8 / 255.0
            noise = (rng.poisson(x * vals) / vals - x).astype(np.float32) * np.float32(level)
        out.append(img + noise)
        level = _walk(rng, level, p.get(name + "_step", 0.0), lo, hi)
    return out


def random_jpeg(frames, rng, p):
    """JPEG at quality round(U(lo, hi)), walking per frame. As the official pipeline, RGB frames go
    to cv2 as if they were BGR: its YCbCr then weighs red as blue, so the chroma subsampling falls
    on swapped channels. That is the distribution the published weights were trained on."""
    if _skip(rng, p):
        return frames
    lo, hi = p["quality"]
    quality = round(rng.uniform(lo, hi))
    out = []
    for img in frames:
        _, buf = cv2.imencode(".jpg", _to_uint8(img), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        out.append(cv2.imdecode(buf, cv2.IMREAD_COLOR).astype(np.float32) / 255)
        quality = round(_walk(rng, quality, p.get("quality_step", 0.0), lo, hi))
    return out


@functools.lru_cache(maxsize=None)
def check_video_codec(name):
    """Raise a clear error if this PyAV/FFmpeg build cannot encode with `name` (no silent fallback)."""
    import av
    try:
        av.codec.Codec(name, "w")
    except Exception as e:
        raise RuntimeError(f"video codec {name!r} is not available in this PyAV/FFmpeg build "
                           f"(needed by the RealBasicVSR video-compression degradation): {e}") from None
    return name


def random_video_compression(frames, rng, p):
    """Encode into an in-memory mp4 (rate 1, yuv420p, the drawn bitrate, frame 0's size) and decode it
    back. Departures from the reference, for reproducible samples: one encoder thread, x264's mbtree
    off (with it, 5 runs of one clip gave 2-3 different outputs here; off, the 10 kb/s draws come out
    ~0.9 dB milder), other sizes resized to frame 0's here (not by PyAV), RGB -> yuv420p before the
    encoder. Also on purpose: frames are rounded and clipped to 8 bits (the reference truncates and wraps)."""
    import av
    if _skip(rng, p):
        return frames
    for c in p["codec"]:
        check_video_codec(c)
    codec = p["codec"][rng.choice(len(p["codec"]), p=p["codec_prob"])]
    bitrate = int(rng.integers(int(p["bitrate"][0]), int(p["bitrate"][1]) + 1))
    buf, (h, w) = io.BytesIO(), frames[0].shape[:2]
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=1)
        stream.height, stream.width, stream.pix_fmt, stream.bit_rate = h, w, "yuv420p", bitrate
        stream.codec_context.thread_count = 1
        if stream.codec_context.name == "libx264":  # the macroblock tree makes runs differ, even on one thread
            stream.options = {"x264-params": "mbtree=0"}
        for i, img in enumerate(frames):
            if img.shape[:2] != (h, w):
                shrink = img.shape[0] * img.shape[1] > h * w
                img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
            # convert to yuv420p here: left to the encoder, libx264's output is not reproducible
            frame = av.VideoFrame.from_ndarray(_to_uint8(img), format="rgb24").reformat(format="yuv420p")
            frame.pict_type, frame.pts = av.video.frame.PictureType.NONE, i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    buf.seek(0)
    with av.open(buf, "r", format="mp4") as container:
        container.streams.video[0].codec_context.thread_count = 1
        out = [f.to_ndarray(format="rgb24").astype(np.float32) / 255 for f in container.decode(video=0)]
    if len(out) != len(frames):
        raise RuntimeError(f"video compression with {codec} returned {len(out)} frames for {len(frames)}")
    return out


def quantize(frames):
    return [np.round(np.clip(img, 0, 1) * 255).astype(np.float32) / 255 for img in frames]


# The official recipe (MME / RealBasicVSR configs), grey levels on the 0-255 scale; the second order
# differs only where listed.
KERNEL_LIST = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso", "sinc")
KERNEL_PROB = (0.405, 0.225, 0.108, 0.027, 0.108, 0.027, 0.1)
KERNEL_SIZES = (7, 9, 11, 13, 15, 17, 19, 21)
INTERPOLATIONS = dict(resize_opt=("bilinear", "area", "bicubic"), resize_prob=(1 / 3, 1 / 3, 1 / 3))

BLUR_1 = dict(kernel_size=KERNEL_SIZES, kernel_list=KERNEL_LIST, kernel_prob=KERNEL_PROB,
              sigma_x=(0.2, 3), sigma_y=(0.2, 3), rotate_angle=(-3.1416, 3.1416),
              beta_gaussian=(0.5, 4), beta_plateau=(1, 2),
              sigma_x_step=0.02, sigma_y_step=0.02, rotate_angle_step=0.31416,
              beta_gaussian_step=0.05, beta_plateau_step=0.1, omega_step=0.0628)
RESIZE_1 = dict(resize_mode_prob=(0.2, 0.7, 0.1), resize_scale=(0.15, 1.5), resize_step=0.015,
                is_size_even=True, **INTERPOLATIONS)
NOISE_1 = dict(noise_type=("gaussian", "poisson"), noise_prob=(0.5, 0.5),
               gaussian_sigma=(1, 30), gaussian_gray_noise_prob=0.4, gaussian_sigma_step=0.1,
               poisson_scale=(0.05, 3), poisson_gray_noise_prob=0.4, poisson_scale_step=0.005)
JPEG = dict(quality=(30, 95), quality_step=3)
VIDEO = dict(codec=("libx264", "h264", "mpeg4"), codec_prob=(1 / 3, 1 / 3, 1 / 3), bitrate=(1e4, 1e5))

BLUR_2 = dict(BLUR_1, prob=0.8, sigma_x=(0.2, 1.5), sigma_y=(0.2, 1.5))
RESIZE_2 = dict(RESIZE_1, resize_mode_prob=(0.3, 0.4, 0.3), resize_scale=(0.3, 1.2), resize_step=0.03)
NOISE_2 = dict(NOISE_1, gaussian_sigma=(1, 25), poisson_scale=(0.05, 2.5))

FINAL_RESIZE = dict(INTERPOLATIONS)  # target_size: the LQ size, 64 x 64 for a 256 crop
FINAL_SINC = dict(prob=0.8, kernel_size=KERNEL_SIZES, kernel_list=("sinc",), kernel_prob=(1.0,),
                  omega=(3.1416 / 3, 3.1416), omega_step=0.0628)


def degrade_sequence(frames, rng, lq_size):
    """RealBasicVSR's LQ: float32 (h, w, 3) frames in [0, 1] -> (lq_size, lq_size, 3) frames on 8-bit levels."""
    lq = list(frames)
    for blur, resize, noise in ((BLUR_1, RESIZE_1, NOISE_1), (BLUR_2, RESIZE_2, NOISE_2)):  # first, second order
        lq = random_noise(random_resize(random_blur(lq, rng, blur), rng, resize), rng, noise)
        lq = random_jpeg(lq, rng, JPEG)
        if blur is BLUR_1:  # video compression in the first order only
            lq = random_video_compression(lq, rng, VIDEO)
    # the last pair in random order: video compression vs. resize to the LQ size + sinc blur
    final = [lambda x: random_video_compression(x, rng, VIDEO),
             lambda x: random_blur(random_resize(x, rng, dict(FINAL_RESIZE, target_size=(lq_size, lq_size))),
                                   rng, FINAL_SINC)]
    for i in rng.permutation(2):
        lq = final[i](lq)
    return quantize(lq)


class RealDegradationDataset(_SampledDataset):
    """RealBasicVSR training data (spec §6.1) from GT-only clips, root/gt_dir (REDSSub), or synthetic ones
    (root None): a REDSSub sample mirrored to 2n frames, gt_usm = unsharp_mask(gt), lq = degrade_sequence(gt_usm).
    Item: {"lq" (2n, 3, gt_size/scale, .), "gt" (2n, 3, gt_size, gt_size), "gt_usm", "key"}."""

    def __init__(self, root=None, num_frames=15, gt_size=256, scale=4, gt_dir="train_sharp_sub",
                 num_synthetic_clips=1000, seed=0, rank=None):
        super().__init__(seed, rank)
        _check_scale(gt_size, scale)
        for c in VIDEO["codec"]:  # fail at construction, not in a worker mid-training
            check_video_codec(c)
        self.clips = None if root is None else REDSSub(root, num_frames, gt_size, gt_dir, seed, rank)
        self.num_frames, self.gt_size, self.scale = num_frames, gt_size, scale
        self.num_synthetic_clips = num_synthetic_clips

    def __len__(self):
        return self.num_synthetic_clips if self.clips is None else len(self.clips)

    def __getitem__(self, index):
        rng = self.rng(index)
        if self.clips is None:
            gt, _ = synthetic_clip([self.seed, index], self.num_frames, self.gt_size)
            (gt,) = _augment(rng, gt)
            key = f"synthetic_s{self.seed}_{index:05d}"
        else:
            (gt,), key = self.clips.sample(index, rng)
        usm = [unsharp_mask(f) for f in gt.astype(np.float32) / 255]
        lq = degrade_sequence(usm + usm[::-1], rng, self.gt_size // self.scale)  # mirrored: x1..xn, xn..x1
        gt, usm = frames_to_tensor(gt), frames_to_tensor(usm)
        return {"lq": frames_to_tensor(lq), "gt": torch.cat([gt, gt.flip(0)]),
                "gt_usm": torch.cat([usm, usm.flip(0)]), "key": key}


# ---------------------------------------------------------------------------------------------
# Command line (module docstring)


def prepare_test_set(src, dst, degradation="bi", scale=4):
    """Degrade every image under `src` (any depth, e.g. {clip}/*.png) into the same tree of PNGs under
    `dst` ("bi": bicubic_downsample, "bd": bd_downsample), which must not exist (atomic_path)."""
    _check_choice("degradation", degradation, ("bi", "bd"))
    fn = {"bi": bicubic_downsample, "bd": lambda img, s: bd_downsample(img, 1.6, s)}[degradation]
    _need_dirs(src)
    if os.path.exists(dst):
        raise FileExistsError(f"output exists, not overwriting: {dst}")
    files = sorted(os.path.relpath(os.path.join(d, n), src) for d, _, names in os.walk(src)
                   for n in names if n.lower().endswith(IMG_EXTS))
    if not files:
        raise ValueError(f"no images under: {src}")
    from tqdm import tqdm
    with atomic_path(dst) as tmp:
        for rel in tqdm(files, desc=f"{degradation.upper()}x{scale}", unit="img"):
            out = os.path.join(tmp, os.path.splitext(rel)[0] + ".png")
            os.makedirs(os.path.dirname(out), exist_ok=True)
            write_image(out, fn(read_image(os.path.join(src, rel)), scale))
    return len(files)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Data tools: RealBasicVSR pipeline benchmark, BI/BD test-set preparation.")
    g = ap.add_argument_group("benchmark")
    g.add_argument("--bench-degradation", action="store_true", help="time the RealBasicVSR pipeline, one worker")
    g.add_argument("--root", default=None, help="REDS root with train_sharp_sub (default: synthetic GT)")
    g.add_argument("--samples", type=int, default=10, help="samples to time")
    g = ap.add_argument_group("test-set preparation")
    g.add_argument("--prepare", choices=["bi", "bd"], help="degrade --src into --dst (MATLAB bicubic or BD)")
    g.add_argument("--src", help="GT folder, e.g. data/Vid4/GT")
    g.add_argument("--dst", help="output folder, must not exist (default: BIx4, BDx2, ... beside --src; "
                                 "REDS train_sharp: train_sharp_bicubic/X4, X2)")
    g.add_argument("--scale", type=int, default=4, choices=[2, 4], help="downsampling factor (default: 4)")
    args = ap.parse_args(argv)
    try:
        if args.bench_degradation:  # one DataLoader worker = one core
            cv2.setNumThreads(1)
            torch.set_num_threads(1)
            ds = RealDegradationDataset(args.root, num_frames=15, gt_size=256)
            ds[0]  # warm-up (codec init, caches)
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(1, args.samples + 1):
                item = ds[i % len(ds)]
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            # CPU time is what one worker costs on an idle core; wall time also counts other load
            src = "synthetic GT" if args.root is None else args.root
            print(f"RealBasicVSR pipeline ({src}, 15 frames mirrored to 30, 256 crop, "
                  f"lq {tuple(item['lq'].shape)}): {args.samples / dc:.2f} samples/s per worker by CPU time "
                  f"({dc / args.samples:.2f} s/sample), {args.samples / dt:.2f} by wall time")
        elif args.prepare:
            if not args.src:
                ap.error("--prepare needs --src")
            src, name = os.path.normpath(args.src), f"{args.prepare.upper()}x{args.scale}"  # the usual names
            redsx = os.path.basename(src) == "train_sharp" and args.prepare == "bi"
            args.dst = args.dst or os.path.join(os.path.dirname(src), *(
                ("train_sharp_bicubic", f"X{args.scale}") if redsx else (name,)))
            n = prepare_test_set(args.src, args.dst, args.prepare, args.scale)
            print(f"wrote {n} images to {args.dst}")
        else:
            ap.print_help()
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
