"""RealBasicVSR's degradations (Chan et al., "Investigating Tradeoffs in Real-World Video
Super-Resolution", CVPR 2022, Sec. 4): second-order blur, resize, noise, JPEG and video compression
on float32 RGB frames in [0, 1], with the recipe of the official training config
(ckkelvinchan/RealBasicVSR: configs/realbasicvsr_c64b20_1x30x8_lr5e-5_150k_reds.py, whose
transforms are open-mmlab/mmagic @ v0.16.0: mmedit/datasets/pipelines/random_degradations.py) and
Real-ESRGAN's blur kernels (xinntao/Real-ESRGAN; XPixelGroup/BasicSR:
basicsr/data/degradations.py).

Each transform takes a list of (h, w, 3) frames and a np.random.Generator, skips itself when
U(0, 1) > p["prob"], draws its discrete choices once per sequence and walks its continuous
parameters per frame (_walk), the paper's stochastic degradation scheme:
    p_{k+1} = clip(p_k + U(-step, step), range)

Public names, in file order:
    unsharp_mask(img)                           the sharpened GT the LQ is made from
    gaussian_kernel, generalized_gaussian_kernel, plateau_kernel, sinc_kernel, blur_kernel
    check_choice(what, value, choices)          a named option's check (data.py's too)
    random_blur, random_resize, random_noise, random_jpeg, random_video_compression, quantize
    KERNEL_LIST ... FINAL_SINC                  the official recipe, one dict per transform
    degrade_sequence(frames, rng, lq_size)      the whole pipeline: GT frames -> LQ frames
"""

import io
import math

import cv2
import numpy as np

from video import check_video_codec

# ---------------------------------------------------------------------------------------------
# Unsharp masking: the GT is sharpened before the LQ is made from it


def unsharp_mask(img, kernel_size=51, sigma=0, weight=0.5, threshold=10):
    """Sharpen where the high-pass residue exceeds `threshold` grey levels; img float (h, w, 3) in
    [0, 1]. sigma 0 lets OpenCV derive it from the size: 0.3 * ((51 - 1) / 2 - 1) + 0.8 = 8.0."""
    g = cv2.getGaussianKernel(kernel_size, sigma)  # the 2-D kernel is g g^T: filter separably
    residue = img - cv2.sepFilter2D(img, -1, g, g)
    mask = (np.abs(residue) * 255 > threshold).astype(np.float32)
    soft = cv2.sepFilter2D(mask, -1, g, g)
    sharp = np.clip(img + weight * residue, 0, 1)
    return soft * sharp + (1 - soft) * img


# ---------------------------------------------------------------------------------------------
# Blur kernels, Real-ESRGAN's (XPixelGroup/BasicSR: basicsr/data/degradations.py): all on the grid
# -k//2+1 .. k//2, normalised to sum 1


def _quadratic_form(k, sigma_x, sigma_y, theta):
    """Q = x^T Sigma^-1 x on the k x k grid, Sigma = R(theta) diag(sx^2, sy^2) R(theta)^T."""
    ax = np.arange(-k // 2 + 1.0, k // 2 + 1.0)
    xx, yy = np.meshgrid(ax, ax)
    c = math.cos(theta)
    s = math.sin(theta)
    R = np.array([[c, -s], [s, c]])  # rotation by theta
    inv = np.linalg.inv(R @ np.diag([sigma_x**2, sigma_y**2]) @ R.T)
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
    """Circular low-pass with cutoff omega: omega J1(omega r) / (2 pi r), centre value
    omega^2 / (4 pi)."""
    ax = np.arange(k) - (k - 1) / 2
    r = np.hypot(ax[:, None], ax[None, :])
    r[(k - 1) // 2, (k - 1) // 2] = 1.0  # placeholder, replaced below
    q = omega * _bessel_j1(omega * r) / (2 * math.pi * r)
    q[(k - 1) // 2, (k - 1) // 2] = omega**2 / (4 * math.pi)
    return q / q.sum()


def _resampled_beta(rng, beta):
    # Quirk kept from the reference: its RandomBlur hands Real-ESRGAN's kernel helpers (BasicSR:
    # random_bivariate_generalized_Gaussian, random_bivariate_plateau) the degenerate range
    # [beta, beta], and they re-draw from [beta, 1] or [1, beta] with p = 0.5 each, i.e. uniform
    # between beta and 1.
    lo, hi = (beta, 1.0) if rng.random() < 0.5 else (1.0, beta)
    return lo + (hi - lo) * rng.random()  # np.random.uniform's formula, which allows lo > hi


def blur_kernel(kind, k, sigma_x, sigma_y, theta, beta_gaussian, beta_plateau, omega, rng):
    """A kernel of KERNEL_LIST: the *iso kinds use sigma_x on both axes, unrotated; the
    generalized and plateau kinds draw their beta from rng (_resampled_beta)."""
    if kind not in KERNEL_LIST:
        raise ValueError(f"unknown blur kernel type {kind!r}")
    if kind == "sinc":
        return sinc_kernel(k, omega)
    family, _, shape = kind.rpartition("_")
    sigma_y, theta = (sigma_x, 0.0) if shape == "iso" else (sigma_y, theta)
    if not family:
        return gaussian_kernel(k, sigma_x, sigma_y, theta)
    fn, beta = {
        "generalized": (generalized_gaussian_kernel, beta_gaussian),
        "plateau": (plateau_kernel, beta_plateau),
    }[family]
    return fn(k, sigma_x, sigma_y, theta, _resampled_beta(rng, beta))


# ---------------------------------------------------------------------------------------------
# The transforms, on a list of frames


def check_choice(what, value, choices):
    """ValueError naming `what` unless value is one of `choices`."""
    if value not in choices:
        raise ValueError(
            f"unknown {what} {value!r}: use {', '.join(choices[:-1])} or {choices[-1]}"
        )


def _skip(rng, p):
    return rng.random() > p.get("prob", 1.0)


def _walk(rng, value, step, lo, hi):
    return min(max(value + rng.uniform(-step, step), lo), hi)


def random_blur(frames, rng, p):
    if _skip(rng, p):
        return frames
    kind = p["kernel_list"][rng.choice(len(p["kernel_list"]), p=p["kernel_prob"])]
    k = int(p["kernel_size"][rng.integers(len(p["kernel_size"]))])
    # in blur_kernel's argument order
    names = ("sigma_x", "sigma_y", "rotate_angle", "beta_gaussian", "beta_plateau")
    ranges = {name: p.get(name, (0.0, 0.0)) for name in names}
    # omega not given: the Real-ESRGAN rule, a wider range for large kernels
    ranges["omega"] = p.get("omega") or (
        (math.pi / 3, math.pi) if k < 13 else (math.pi / 5, math.pi)
    )
    value = {name: rng.uniform(*r) for name, r in ranges.items()}
    out = []
    for img in frames:
        if kind == "iso":  # separable: two 1-D passes equal the k x k kernel up to float rounding
            g = np.exp(-0.5 * (np.arange(-k // 2 + 1.0, k // 2 + 1.0) / value["sigma_x"]) ** 2)
            g = (g / g.sum()).astype(np.float32)
            out.append(cv2.sepFilter2D(img, -1, g, g))
        else:  # correlation, REFLECT_101
            kernel = blur_kernel(kind, k, *value.values(), rng).astype(np.float32)
            out.append(cv2.filter2D(img, -1, kernel))
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
    check_choice("resize_opt", opt, tuple(_RESIZE_OPT))
    interp = _RESIZE_OPT[opt]
    if p.get("target_size") is not None:
        th, tw = p["target_size"]
        return [cv2.resize(img, (tw, th), interpolation=interp) for img in frames]
    h, w = frames[0].shape[:2]
    lo, hi = p["resize_scale"]
    mode = rng.choice(3, p=p["resize_mode_prob"])  # up, down, keep
    scale = rng.uniform(1, hi) if mode == 0 else rng.uniform(lo, 1) if mode == 1 else 1.0
    even = p.get("is_size_even", False)  # yuv420p needs even sizes
    step = p.get("resize_step", 0.0)
    out = []
    for img in frames:
        th, tw = (2 * (n * scale // 2) if even else n * scale for n in (h, w))
        out.append(cv2.resize(img, (max(int(tw), 2), max(int(th), 2)), interpolation=interp))
        if step:
            scale = _walk(rng, scale, step, lo, hi)
    return out


def _to_uint8(img):
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def random_noise(frames, rng, p):
    """Gaussian noise (sigma in grey levels) or, as the official pipeline and Real-ESRGAN, Poisson
    noise (poisson(x v) / v - x) * scale, x the 8-bit value on [0, 1],
    v = 2**ceil(log2(#distinct values)). Gray: one plane for all channels (Poisson: luma)."""
    if _skip(rng, p):
        return frames
    kind = p["noise_type"][rng.choice(len(p["noise_type"]), p=p["noise_prob"])]
    check_choice("noise_type", kind, ("gaussian", "poisson"))
    name = "gaussian_sigma" if kind == "gaussian" else "poisson_scale"
    lo, hi = p[name]
    level = rng.uniform(lo, hi)  # drawn before gray
    gray = rng.random() < p[kind + "_gray_noise_prob"]
    out = []
    for img in frames:
        if kind == "gaussian":
            shape = img.shape[:2] + ((1,) if gray else (3,))
            noise = rng.standard_normal(shape, dtype=np.float32) * np.float32(level / 255)
        else:
            x8 = _to_uint8(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[..., None] if gray else img)
            vals = 2 ** math.ceil(
                math.log2(np.count_nonzero(np.bincount(x8.ravel(), minlength=256)))
            )
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


def random_video_compression(frames, rng, p):
    """Encode into an in-memory mp4 (rate 1, yuv420p, the drawn bitrate, frame 0's size) and decode
    it back. Departures from the reference, for reproducible samples: one encoder thread, x264's
    mbtree off (with it, 5 runs of one clip gave 2-3 different outputs; off, the 10 kb/s draws come
    out ~0.9 dB milder), other sizes resized to frame 0's here (not by PyAV), RGB -> yuv420p before
    the encoder. Also on purpose: frames are rounded and clipped to 8 bits (the reference truncates
    and wraps)."""
    import av

    if _skip(rng, p):
        return frames
    for c in p["codec"]:
        check_video_codec(c)
    codec = p["codec"][rng.choice(len(p["codec"]), p=p["codec_prob"])]
    bitrate = int(rng.integers(int(p["bitrate"][0]), int(p["bitrate"][1]) + 1))
    buf = io.BytesIO()
    h, w = frames[0].shape[:2]
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=1)
        stream.height = h
        stream.width = w
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = bitrate
        stream.codec_context.thread_count = 1
        # the macroblock tree makes runs differ, even on one thread
        if stream.codec_context.name == "libx264":
            stream.options = {"x264-params": "mbtree=0"}
        for i, img in enumerate(frames):
            if img.shape[:2] != (h, w):
                shrink = img.shape[0] * img.shape[1] > h * w
                img = cv2.resize(
                    img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
                )
            # convert to yuv420p here: left to the encoder, libx264's output is not reproducible
            frame = av.VideoFrame.from_ndarray(_to_uint8(img), format="rgb24").reformat(
                format="yuv420p"
            )
            frame.pict_type = av.video.frame.PictureType.NONE
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    buf.seek(0)
    with av.open(buf, "r", format="mp4") as container:
        container.streams.video[0].codec_context.thread_count = 1
        out = [
            f.to_ndarray(format="rgb24").astype(np.float32) / 255 for f in container.decode(video=0)
        ]
    if len(out) != len(frames):
        raise RuntimeError(
            f"video compression with {codec} returned {len(out)} frames for {len(frames)}"
        )
    return out


def quantize(frames):
    """Round to 8-bit levels, clipped to [0, 1]: the pipeline's last step."""
    return [np.round(np.clip(img, 0, 1) * 255).astype(np.float32) / 255 for img in frames]


# ---------------------------------------------------------------------------------------------
# The official recipe (ckkelvinchan/RealBasicVSR:
# configs/realbasicvsr_c64b20_1x30x8_lr5e-5_150k_reds.py), grey levels on the 0-255 scale; the
# second order differs only where listed.
KERNEL_LIST = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
    "sinc",
)
KERNEL_PROB = (0.405, 0.225, 0.108, 0.027, 0.108, 0.027, 0.1)
KERNEL_SIZES = (7, 9, 11, 13, 15, 17, 19, 21)
INTERPOLATIONS = dict(resize_opt=("bilinear", "area", "bicubic"), resize_prob=(1 / 3, 1 / 3, 1 / 3))

BLUR_1 = dict(
    kernel_size=KERNEL_SIZES,
    kernel_list=KERNEL_LIST,
    kernel_prob=KERNEL_PROB,
    sigma_x=(0.2, 3),
    sigma_y=(0.2, 3),
    rotate_angle=(-3.1416, 3.1416),
    beta_gaussian=(0.5, 4),
    beta_plateau=(1, 2),
    sigma_x_step=0.02,
    sigma_y_step=0.02,
    rotate_angle_step=0.31416,
    beta_gaussian_step=0.05,
    beta_plateau_step=0.1,
    omega_step=0.0628,
)
RESIZE_1 = dict(
    resize_mode_prob=(0.2, 0.7, 0.1),
    resize_scale=(0.15, 1.5),
    resize_step=0.015,
    is_size_even=True,
    **INTERPOLATIONS,
)
NOISE_1 = dict(
    noise_type=("gaussian", "poisson"),
    noise_prob=(0.5, 0.5),
    gaussian_sigma=(1, 30),
    gaussian_gray_noise_prob=0.4,
    gaussian_sigma_step=0.1,
    poisson_scale=(0.05, 3),
    poisson_gray_noise_prob=0.4,
    poisson_scale_step=0.005,
)
JPEG = dict(quality=(30, 95), quality_step=3)
VIDEO = dict(
    codec=("libx264", "h264", "mpeg4"), codec_prob=(1 / 3, 1 / 3, 1 / 3), bitrate=(1e4, 1e5)
)

BLUR_2 = dict(BLUR_1, prob=0.8, sigma_x=(0.2, 1.5), sigma_y=(0.2, 1.5))
RESIZE_2 = dict(
    RESIZE_1, resize_mode_prob=(0.3, 0.4, 0.3), resize_scale=(0.3, 1.2), resize_step=0.03
)
NOISE_2 = dict(NOISE_1, gaussian_sigma=(1, 25), poisson_scale=(0.05, 2.5))

FINAL_RESIZE = dict(INTERPOLATIONS)  # target_size: the LQ size, 64 x 64 for a 256 crop
FINAL_SINC = dict(
    prob=0.8,
    kernel_size=KERNEL_SIZES,
    kernel_list=("sinc",),
    kernel_prob=(1.0,),
    omega=(3.1416 / 3, 3.1416),
    omega_step=0.0628,
)


def degrade_sequence(frames, rng, lq_size):
    """RealBasicVSR's LQ: float32 (h, w, 3) frames in [0, 1] -> (lq_size, lq_size, 3) frames on
    8-bit levels."""
    lq = list(frames)
    orders = ((BLUR_1, RESIZE_1, NOISE_1), (BLUR_2, RESIZE_2, NOISE_2))  # first, second order
    for blur, resize, noise in orders:
        lq = random_noise(random_resize(random_blur(lq, rng, blur), rng, resize), rng, noise)
        lq = random_jpeg(lq, rng, JPEG)
        if blur is BLUR_1:  # video compression in the first order only
            lq = random_video_compression(lq, rng, VIDEO)
    # the last pair in random order: video compression vs. resize to the LQ size + sinc blur
    final = [
        lambda x: random_video_compression(x, rng, VIDEO),
        lambda x: random_blur(
            random_resize(x, rng, dict(FINAL_RESIZE, target_size=(lq_size, lq_size))),
            rng,
            FINAL_SINC,
        ),
    ]
    for i in rng.permutation(2):
        lq = final[i](lq)
    return quantize(lq)
