"""Image quality metrics, as the published results are measured: PSNR and SSIM against a ground
truth (MATLAB-style, as mmagic and BasicSR compute them), and NIQE without one, the metric
RealBasicVSR reports on real videos."""

import math
import os

import numpy as np
import torch
import torch.nn.functional as F

import data

# ----------------------------------------------------------------------------------------------
# PSNR and SSIM on [0, 255] images, optionally on the Y channel of BT.601 (studio range), with a
# border cropped (open-mmlab/mmagic: mmagic/evaluation/metrics/psnr.py, ssim.py): SSIM uses an
# 11x11 Gaussian window, sigma 1.5, "valid" filtering, per channel then averaged.


def rgb2y(img):
    """(..., 3, h, w) RGB in [0, 255] -> (..., 1, h, w) Y in [16, 235]."""
    r, g, b = img.unbind(-3)
    return (16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0).unsqueeze(-3)


def _prepare(img1, img2, crop_border, y_channel):
    if img1.shape != img2.shape or img1.dim() != 3:
        raise ValueError(
            f"metrics expect two (c, h, w) images of the same shape, got "
            f"{tuple(img1.shape)} and {tuple(img2.shape)}"
        )
    img1, img2 = img1.double(), img2.double()
    if y_channel:
        img1, img2 = rgb2y(img1), rgb2y(img2)
    if crop_border:
        img1 = img1[:, crop_border:-crop_border, crop_border:-crop_border]
        img2 = img2[:, crop_border:-crop_border, crop_border:-crop_border]
    return img1, img2


def psnr(img1, img2, crop_border=0, y_channel=False):
    """PSNR in dB of two (3, h, w) images in [0, 255]; inf when they are identical."""
    img1, img2 = _prepare(img1, img2, crop_border, y_channel)
    mse = torch.mean((img1 - img2) ** 2).item()
    return float("inf") if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def _gaussian_window(device):
    x = torch.arange(11, dtype=torch.float64, device=device) - 5
    k = torch.exp(-(x**2) / (2 * 1.5**2))
    return k / k.sum()  # what cv2.getGaussianKernel(11, 1.5) returns


def ssim(img1, img2, crop_border=0, y_channel=False):
    """MATLAB-style SSIM of two (3, h, w) images in [0, 255] (frames of at least 11x11)."""
    img1, img2 = _prepare(img1, img2, crop_border, y_channel)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    k = _gaussian_window(img1.device)
    wy, wx = k.view(1, 1, 11, 1), k.view(1, 1, 1, 11)

    def blur(x):  # separable 11x11 Gaussian, valid region only: = filter2D(...)[5:-5, 5:-5]
        return F.conv2d(F.conv2d(x, wy), wx)

    x, y = img1.unsqueeze(1), img2.unsqueeze(1)  # channels as a batch: (c, 1, h, w)
    mu1, mu2 = blur(x), blur(y)
    sigma1_sq = blur(x * x) - mu1**2
    sigma2_sq = blur(y * y) - mu2**2
    sigma12 = blur(x * y) - mu1 * mu2
    ssim_map = ((2 * mu1 * mu2 + c1) * (2 * sigma12 + c2)) / (
        (mu1**2 + mu2**2 + c1) * (sigma1_sq + sigma2_sq + c2)
    )
    return ssim_map.mean(dim=(1, 2, 3)).mean().item()


# ----------------------------------------------------------------------------------------------
# NIQE (Mittal, Soundararajan and Bovik, "Making a 'Completely Blind' Image Quality Analyzer",
# IEEE Signal Processing Letters 2013; equations numbered as there), which needs no ground truth:
# the metric RealBasicVSR (CVPR 2022) reports on real videos (VideoLQ). The official MATLAB code as
# BasicSR ports it (XPixelGroup/BasicSR: basicsr/metrics/niqe.py), to the same numbers.

# The pristine model, BasicSR 1.4.2's basicsr/metrics/niqe_pris_params.npz: the official MATLAB
# release's mu_prisparam / cov_prisparam, and its 7x7 Gaussian window, sigma 7/6.
_NIQE_PARAMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "niqe_pris_params.npz")
# The AGGD shape grid of the official code and its gamma-function tables: the fits are a lookup.
_AGGD_ALPHA = np.arange(0.2, 10.001, 0.001)
_AGGD_G1 = np.array([math.gamma(1 / a) for a in _AGGD_ALPHA])
_AGGD_G2 = np.array([math.gamma(2 / a) for a in _AGGD_ALPHA])
_AGGD_G3 = np.array([math.gamma(3 / a) for a in _AGGD_ALPHA])
_AGGD_RHO = _AGGD_G2**2 / (_AGGD_G1 * _AGGD_G3)  # increasing in alpha: searchsorted finds it


def _aggd_fit(x):
    """Moment-matching AGGD fit of each row of x (n, m): alpha, beta_l, beta_r and the table
    index."""
    # no negative (positive) values: nan, as BasicSR
    with np.errstate(invalid="ignore", divide="ignore"):
        l_std = np.sqrt((x * x * (x < 0)).sum(1) / (x < 0).sum(1))
        r_std = np.sqrt((x * x * (x > 0)).sum(1) / (x > 0).sum(1))
        g = l_std / r_std
        r = np.abs(x).mean(1) ** 2 / (x * x).mean(1) * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
    # argmin |rho - r|, and for r = nan the first entry (alpha 0.2), as np.argmin in BasicSR
    j = np.clip(np.searchsorted(_AGGD_RHO, r), 1, len(_AGGD_RHO) - 1)
    i = np.where(np.abs(_AGGD_RHO[j - 1] - r) <= np.abs(_AGGD_RHO[j] - r), j - 1, j)
    i = np.where(np.isnan(r), 0, i)
    s = np.sqrt(_AGGD_G1[i] / _AGGD_G3[i])
    return _AGGD_ALPHA[i], l_std * s, r_std * s, i


def _niqe_features(x):
    """The 18 NIQE features of each block of x (n, b, b) of MSCN coefficients."""
    a, bl, br, _ = _aggd_fit(x.reshape(len(x), -1))
    f = [a, (bl + br) / 2]
    # products with the neighbour: horizontal, vertical, two diagonals (wrapping, as BasicSR)
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        a, bl, br, i = _aggd_fit((x * np.roll(x, shift, axis=(1, 2))).reshape(len(x), -1))
        mean = (br - bl) * _AGGD_G2[i] / _AGGD_G1[i]  # Eq. 8
        f += [a, mean, bl, br]
    return np.stack(f, 1)


def _blur_nearest(x, k):
    """scipy.ndimage.convolve(x, k, mode='nearest') for a symmetric k (no flip needed)."""
    r = k.shape[0] // 2
    h, w = x.shape
    p = np.pad(x, r, mode="edge")
    return sum(
        k[i, j] * p[i : i + h, j : j + w] for i in range(k.shape[0]) for j in range(k.shape[1])
    )


def niqe(img):
    """NIQE of an (h, w, 3) RGB uint8 image, lower is better: BasicSR's
    calculate_niqe(bgr, crop_border=0, input_order='HWC', convert_to='y'). Y channel, 96x96 blocks
    without overlap, two scales, the distance of the blocks' multivariate Gaussian to the pristine
    one."""
    with np.load(_NIQE_PARAMS) as p:
        mu_pris = p["mu_pris_param"][0]
        cov_pris = p["cov_pris_param"]
        k = p["gaussian_window"]
    # BT.601 studio-range Y (MATLAB rgb2ycbcr) with BasicSR's float32 round trip and its rounding;
    # BasicSR takes BGR, so its weights run over B, G, R: the same products in the same order
    y = np.dot(img[..., ::-1].astype(np.float32) / 255, [24.966, 128.553, 65.481]) + 16.0
    y = np.round((y / 255).astype(np.float32) * 255)
    h, w = (s // 96 * 96 for s in y.shape)  # whole blocks only
    if h * w < 2 * 96 * 96:  # one block has no covariance (BasicSR fails in pinv)
        raise ValueError(f"NIQE needs at least two 96x96 blocks, got {img.shape[:2]}")
    y = y[:h, :w]
    feats = []
    for scale in (1, 2):
        # float32 as BasicSR (scipy's convolve keeps the input dtype): flat areas give exact zeros
        # (nan features)
        mu = _blur_nearest(y, k).astype(np.float32)
        sigma = np.sqrt(np.abs(_blur_nearest(y * y, k).astype(np.float32) - mu * mu))
        x = (y - mu) / (sigma + 1)  # MSCN coefficients (Eq. 1)
        b = 96 // scale  # the block shrinks with the image
        blocks = x.reshape(h // 96, b, w // 96, b).transpose(0, 2, 1, 3).reshape(-1, b, b)
        feats.append(_niqe_features(blocks))
        # MATLAB imresize(y, 0.5), bicubic with antialiasing; float32 as BasicSR's torch port
        y = data.matlab_imresize(y / 255, 0.5).astype(np.float32) * 255
    f = np.concatenate(feats, 1)
    # the MVG of the image's blocks: nanmean, and the covariance of the rows without nan (MATLAB's
    # nancov)
    d = mu_pris - np.nanmean(f, 0)
    cov = (cov_pris + np.cov(f[~np.isnan(f).any(1)], rowvar=False)) / 2
    return float(np.sqrt(d @ np.linalg.pinv(cov) @ d))  # Eq. 10
