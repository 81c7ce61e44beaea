"""The built-in synthetic clips: the default training data, so that training runs with no dataset.

A textured world seen by a moving camera (pan, zoom, roll) with objects moving on their own paths,
drawn at twice the GT resolution and low-passed before sampling: antialiased edges and sub-pixel
motion, as in real footage.
"""

import math

import cv2
import numpy as np

_SS = 2  # supersampling factor of the render

# ---------------------------------------------------------------------------------------------
# Textures: smooth colour fields, gratings, shapes and fine detail


def _low_freq(rng, h, w, cell):
    """Smooth random field (zero mean, unit std), bicubic upsampling of a coarse grid."""
    g = rng.standard_normal((max(2, h // cell + 2), max(2, w // cell + 2))).astype(np.float32)
    f = cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)
    return (f - f.mean()) / (f.std() + 1e-6)


def _fractal_noise(rng, h, w, beta):
    """Gaussian noise with a 1/f**beta amplitude spectrum, zero mean, unit std."""
    spec = np.fft.rfft2(rng.standard_normal((h, w)).astype(np.float32))
    fy = np.fft.fftfreq(h).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(w).astype(np.float32)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    n = np.fft.irfft2(spec / f**beta, s=(h, w)).astype(np.float32)
    return (n - n.mean()) / (n.std() + 1e-6)


def _grating(rng, h, w, min_period, max_period):
    """Oriented sinusoid or soft square wave in [-1, 1]."""
    period = math.exp(rng.uniform(math.log(min_period), math.log(max_period)))
    a = rng.uniform(0, math.pi)
    y = np.arange(h, dtype=np.float32)[:, None]
    x = np.arange(w, dtype=np.float32)[None, :]
    g = np.cos(
        (x * math.cos(a) + y * math.sin(a)) * (2 * math.pi / period) + rng.uniform(0, 2 * math.pi)
    )
    if rng.random() < 0.5:  # square wave: sharp, regular edges
        g = np.tanh(g * rng.uniform(3, 10))
    return g


def _colour(rng, lo=0.0, hi=1.0):
    """A random RGB colour, mostly of moderate saturation as in natural scenes."""
    grey = rng.uniform(lo, hi)
    return np.clip(grey + rng.uniform(0.1, 0.6) * (rng.uniform(lo, hi, 3) - grey), 0, 1).astype(
        np.float32
    )


def _draw_shape(rng, img, size):
    """Blend one antialiased shape (rectangle, ellipse, polygon or stroke) into img in place."""
    h, w = img.shape[:2]
    r = size * math.exp(rng.uniform(-1.0, 1.0))
    cx = rng.uniform(0, w)
    cy = rng.uniform(0, h)
    # the bounding box (x0, y0) - (x1, y1), clipped to the image
    x0 = int(max(0, cx - 1.5 * r - 2))
    y0 = int(max(0, cy - 1.5 * r - 2))
    x1 = int(min(w, cx + 1.5 * r + 3))
    y1 = int(min(h, cy + 1.5 * r + 3))
    if x1 - x0 < 2 or y1 - y0 < 2:
        return
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    c = (cx - x0, cy - y0)  # the centre, in the box
    kind = rng.integers(4)
    if kind == 0:  # rotated rectangle
        box = cv2.boxPoints(
            (c, (r * rng.uniform(0.3, 2), r * rng.uniform(0.3, 2)), rng.uniform(0, 180))
        )
        cv2.fillPoly(mask, [np.round(box * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
    elif kind == 1:
        axes = (int(r * rng.uniform(0.3, 1) * 16), int(r * rng.uniform(0.3, 1) * 16))
        cv2.ellipse(
            mask,
            (int(c[0] * 16), int(c[1] * 16)),
            axes,
            rng.uniform(0, 180),
            0,
            360,
            255,
            -1,
            cv2.LINE_AA,
            shift=4,
        )
    elif kind == 2:  # star-like polygon
        n = rng.integers(3, 9)
        ang = np.sort(rng.uniform(0, 2 * math.pi, n))
        rad = r * rng.uniform(0.3, 1.0, n)
        pts = np.stack([c[0] + rad * np.cos(ang), c[1] + rad * np.sin(ang)], 1)
        cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
    else:  # stroke
        p = np.array(
            [
                [c[0] - r * rng.uniform(-1, 1), c[1] - r * rng.uniform(-1, 1)],
                [c[0] + r * rng.uniform(-1, 1), c[1] + r * rng.uniform(-1, 1)],
            ]
        )
        cv2.line(
            mask,
            tuple(np.round(p[0] * 16).astype(int)),
            tuple(np.round(p[1] * 16).astype(int)),
            255,
            max(1, int(rng.uniform(1, 0.3 * r + 2))),
            cv2.LINE_AA,
            shift=4,
        )
    m = (mask.astype(np.float32) / 255.0)[..., None]
    patch = img[y0:y1, x0:x1]
    if rng.random() < 0.3:  # textured fill
        g = _grating(rng, y1 - y0, x1 - x0, 3, 12)[..., None]
        fill = np.clip(_colour(rng, 0.2, 0.8) + 0.25 * g * _colour(rng, -1, 1), 0, 1)
    else:
        fill = _colour(rng)
    patch *= 1 - m
    patch += m * fill


def _texture(rng, h, w, num_shapes):
    """Colour texture (h, w, 3) in [0, 1]: smooth colour field, gratings in random regions, shapes,
    fine detail."""
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


# ---------------------------------------------------------------------------------------------
# Clips: a camera path over a textured canvas, and sprites moving on their own


def _rot(a):
    return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


def synthetic_clip(seed, num_frames, gt_size, num_objects=None, zoom=True, rotation=True):
    """One clip: GT frames uint8 (t, gt_size, gt_size, 3) and its motion {"camera": centre (t, 2)
    (x, y) in GT pixels from frame 0, "zoom", "roll"}. A frame pixel p maps to canvas point
    c(t) + s(t) R(t) (p - centre): c(t) = c0 + v t + a t^2 / 2 + shake, s(t) = exp(z t), R(t) a
    roll by w t; the 2x canvas is prefiltered and sampled by a sub-pixel cubic warp. Objects:
    textured sprites with their own velocity and spin."""
    rng = np.random.default_rng(seed)
    ss = _SS
    size = gt_size * _SS
    t = np.arange(num_frames, dtype=np.float64)
    # camera path in canvas pixels (2x); total travel bounded so long clips stay affordable
    speed = rng.uniform(0.3, 3.0) * ss * min(1.0, 60.0 / max(num_frames, 1))
    d = rng.uniform(0, 2 * math.pi)
    vel = speed * np.array([math.cos(d), math.sin(d)])
    acc = rng.normal(0, 0.02 * ss, 2) * min(1.0, 30.0 / max(num_frames, 1))
    # shake: a sinusoid per axis, of amplitude `shake`, phases ph and frequencies fr
    shake = rng.uniform(0, 0.6) * ss
    ph = rng.uniform(0, 2 * math.pi, 2)
    fr = rng.uniform(0.1, 0.5, 2)
    pos = vel[None] * t[:, None] + 0.5 * acc[None] * t[:, None] ** 2
    pos += shake * np.sin(fr[None] * t[:, None] + ph[None])
    scl = np.exp((rng.uniform(-0.12, 0.12) / max(num_frames, 1) if zoom else 0.0) * t)  # zoom s(t)
    ang = (rng.uniform(-0.05, 0.05) / max(num_frames, 1) if rotation else 0.0) * t  # roll
    # canvas big enough for every frame footprint, plus a margin for the cubic taps
    half = size / 2 * np.max(scl * (np.abs(np.cos(ang)) + np.abs(np.sin(ang))))
    lo = pos.min(0) - half - 8
    hi = pos.max(0) + half + 8
    cw = int(math.ceil(hi[0] - lo[0]))
    ch = int(math.ceil(hi[1] - lo[1]))
    canvas = _texture(rng, ch, cw, num_shapes=int(cw * ch / (40 * ss) ** 2) + 10)
    centre_canvas = pos - lo  # camera centres in canvas coordinates
    # objects: sprites with alpha, moving in frame coordinates
    n_obj = int(rng.integers(2, 6)) if num_objects is None else num_objects
    objects = []
    for _ in range(n_obj):
        sh, sw = (int(size * rng.uniform(0.15, 0.4)) for _ in range(2))
        tex = _texture(rng, sh, sw, num_shapes=4)
        alpha = np.zeros((sh, sw), np.uint8)
        if rng.random() < 0.5:
            cv2.ellipse(
                alpha, (((sw - 1) / 2, (sh - 1) / 2), (sw - 3, sh - 3), 0.0), 255, -1, cv2.LINE_AA
            )
        else:
            n = rng.integers(5, 9)
            a = np.sort(rng.uniform(0, 2 * math.pi, n))
            rr = rng.uniform(0.6, 1.0, n)
            pts = np.stack(
                [(sw - 1) / 2 * (1 + rr * np.cos(a)), (sh - 1) / 2 * (1 + rr * np.sin(a))], 1
            )
            cv2.fillPoly(alpha, [np.round(pts * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
        rgba = np.concatenate([tex, alpha[..., None].astype(np.float32) / 255], axis=2)
        rgba = cv2.GaussianBlur(rgba, (0, 0), 0.4 * ss)  # prefiltered as the canvas is below
        p0 = rng.uniform(0.1, 0.9, 2) * size
        ov = rng.uniform(0.5, 4.0) * ss * min(1.0, 60.0 / max(num_frames, 1))
        od = rng.uniform(0, 2 * math.pi)
        objects.append(
            (
                rgba,
                p0,
                ov * np.array([math.cos(od), math.sin(od)]),
                rng.uniform(0, 2 * math.pi),
                rng.uniform(-0.03, 0.03),
            )
        )
    # prefilter once at 2x (about the MTF of a 2x2 area average), then sample straight at GT size
    canvas = cv2.GaussianBlur(canvas, (0, 0), 0.4 * ss)
    frames = np.empty((num_frames, gt_size, gt_size, 3), np.uint8)
    c_frame = np.array([(gt_size - 1) / 2] * 2)  # the frame centre
    for k in range(num_frames):
        A = ss * scl[k] * _rot(ang[k])  # GT pixel -> canvas pixel
        M = np.concatenate([A, (centre_canvas[k] - A @ c_frame)[:, None]], 1)
        frame = cv2.warpAffine(
            canvas,
            M,
            (gt_size, gt_size),
            flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REFLECT,
        )
        for rgba, p0, ov, a0, spin in objects:
            _paste_sprite(frame, rgba, (p0 + ov * k) / ss, a0 + spin * k, 1.0 / ss)
        frames[k] = np.clip(frame * 255 + 0.5, 0, 255).astype(np.uint8)
    camera = pos / ss  # camera centre path in GT pixels
    return frames, {"camera": camera - camera[0], "zoom": scl, "roll": ang}


def _paste_sprite(frame, rgba, centre, angle, scale):
    """Alpha-composite a sprite, rotated, scaled and centred at `centre` (frame pixels), in its
    bounding box."""
    sh, sw = rgba.shape[:2]
    A = scale * _rot(angle)  # sprite pixel offset -> frame pixel offset
    corners = (np.array([[0, 0], [sw, 0], [0, sh], [sw, sh]]) - [sw / 2, sh / 2]) @ A.T + centre
    x0, y0 = np.floor(corners.min(0)).astype(int)
    x1, y1 = np.ceil(corners.max(0)).astype(int) + 1
    x0 = max(x0, 0)
    y0 = max(y0, 0)
    x1 = min(x1, frame.shape[1])
    y1 = min(y1, frame.shape[0])
    if x1 <= x0 or y1 <= y0:
        return
    # inverse map: window pixel q -> sprite pixel A^-1 (q + (x0, y0) - centre) + sprite centre
    Ai = np.linalg.inv(A)
    off = Ai @ (np.array([x0, y0]) - centre) + [(sw - 1) / 2, (sh - 1) / 2]
    M = np.concatenate([Ai, off[:, None]], 1)
    patch = cv2.warpAffine(
        rgba,
        M,
        (x1 - x0, y1 - y0),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    a = patch[..., 3:4]
    win = frame[y0:y1, x0:x1]
    win *= 1 - a
    win += a * patch[..., :3]
