"""RealBasicVSR (Chan et al., "Investigating Tradeoffs in Real-World Video Super-Resolution", CVPR 2022).

The generator is an image-cleaning module in front of BasicVSR; it is trained first with pixel and
cleaning losses ("wogan"), then fine-tuned with a perceptual loss and a U-Net discriminator with
spectral norm. Module and state_dict names follow mmagic, so the published checkpoints load with
basicvsr.load_weights (prefix "generator_ema" for inference, "discriminator" for the critic).
Tensors are RGB in [0, 1]; a video is (n, t, 3, h, w). niqe(img), at the end, is the no-reference
metric RealBasicVSR is evaluated with on real videos.
"""
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import data
from basicvsr import BasicVSR, ResidualBlocksWithInputConv, check_video, load_strict, read_state_dict

# ----------------------------------------------------------------------------------------------
# Generator: clean each LQ frame (up to three passes), then BasicVSR on the cleaned clip.


class RealBasicVSR(nn.Module):
    """forward(lqs (n, t, 3, h, w)) -> (n, t, 3, s*h, s*w) (s = scale, 4 or 2), or (outputs, cleaned_lqs)
    with return_lqs.

    image_cleaning predicts a residue that is added to the frames. The cleaning is repeated while
    mean |residue| over the whole batch is >= dynamic_refine_thres / 255, at most 3 passes; the
    default 255 (threshold 1.0) means one pass, as in training and the official inference.
    is_sequential_cleaning cleans frame by frame to save memory; the result is the same and, unlike
    the reference, the caller's tensor is never modified.

    SPyNet is frozen for the whole of training (requires_grad False), and so is image_cleaning when
    is_fix_cleaning. requires_grad_() called on this module keeps them frozen (a parent module's
    requires_grad_ would bypass that). An optimizer must take only the parameters with requires_grad.
    """

    def __init__(self, mid_channels=64, num_propagation_blocks=20, num_cleaning_blocks=20,
                 dynamic_refine_thres=255, is_fix_cleaning=False, is_sequential_cleaning=False, scale=4):
        super().__init__()
        self.config = dict(mid_channels=mid_channels, num_propagation_blocks=num_propagation_blocks,  # saved
                           num_cleaning_blocks=num_cleaning_blocks, scale=scale)                     # with the weights
        self.scale = scale
        self.is_fix_cleaning = is_fix_cleaning
        self.is_sequential_cleaning = is_sequential_cleaning
        self.dynamic_refine_thres = dynamic_refine_thres / 255.

        # no activation before the last conv: the output is a signed residue
        self.image_cleaning = nn.Sequential(
            ResidualBlocksWithInputConv(3, mid_channels, num_cleaning_blocks),
            nn.Conv2d(mid_channels, 3, 3, 1, 1, bias=True),
        )
        self.basicvsr = BasicVSR(mid_channels, num_propagation_blocks, scale)
        self.requires_grad_(True)  # applies the freezing rules below

    def requires_grad_(self, requires_grad=True):
        super().requires_grad_(requires_grad)
        self.basicvsr.spynet.requires_grad_(False)
        if self.is_fix_cleaning:
            self.image_cleaning.requires_grad_(False)
        return self

    def clean(self, lqs):
        """One cleaning pass: (cleaned lqs, mean |residue|), both over the whole batch."""
        n, t, c, h, w = lqs.shape
        if self.is_sequential_cleaning:
            cleaned, residue_sum = [], 0
            for i in range(t):
                residue = self.image_cleaning(lqs[:, i])           # (n, 3, h, w)
                cleaned.append(lqs[:, i] + residue)
                residue_sum = residue_sum + residue.abs().sum()
            return torch.stack(cleaned, dim=1), residue_sum / lqs.numel()
        residues = rearrange(self.image_cleaning(rearrange(lqs, "n t c h w -> (n t) c h w")),
                             "(n t) c h w -> n t c h w", n=n)
        return lqs + residues, residues.abs().mean()

    def forward(self, lqs, return_lqs=False):
        check_video(lqs, "RealBasicVSR")
        for _ in range(3):
            lqs, residue_mean = self.clean(lqs)
            if residue_mean < self.dynamic_refine_thres:
                break
        # the bilinear skip inside BasicVSR adds the cleaned frames
        outputs = self.basicvsr(lqs)
        if return_lqs:
            return outputs, lqs
        return outputs


# ----------------------------------------------------------------------------------------------
# U-Net discriminator with spectral normalisation (Real-ESRGAN's critic, reused by RealBasicVSR)


class UNetDiscriminatorSN(nn.Module):
    """Per-pixel real/fake logits (N, 1, H, W) for frames (N, in_channels, H, W); H, W multiples of 8.

    Spectral norm is torch.nn.utils.spectral_norm, so the state_dict holds weight_orig, weight_u and
    weight_v as in the published checkpoints. In training mode every forward call does one power
    iteration and updates u, v; in eval mode the stored u, v are used as they are.
    """

    def __init__(self, in_channels=3, mid_channels=64, skip_connection=True):
        super().__init__()
        sn = nn.utils.spectral_norm
        m = mid_channels
        self.skip_connection = skip_connection

        self.conv_0 = nn.Conv2d(in_channels, m, 3, 1, 1)
        # encoder: three stride-2 4x4 convs, no bias (spectral norm)
        self.conv_1 = sn(nn.Conv2d(m, m * 2, 4, 2, 1, bias=False))
        self.conv_2 = sn(nn.Conv2d(m * 2, m * 4, 4, 2, 1, bias=False))
        self.conv_3 = sn(nn.Conv2d(m * 4, m * 8, 4, 2, 1, bias=False))
        # decoder: bilinear x2 then 3x3 conv, with skips from the encoder
        self.conv_4 = sn(nn.Conv2d(m * 8, m * 4, 3, 1, 1, bias=False))
        self.conv_5 = sn(nn.Conv2d(m * 4, m * 2, 3, 1, 1, bias=False))
        self.conv_6 = sn(nn.Conv2d(m * 2, m, 3, 1, 1, bias=False))
        # head
        self.conv_7 = sn(nn.Conv2d(m, m, 3, 1, 1, bias=False))
        self.conv_8 = sn(nn.Conv2d(m, m, 3, 1, 1, bias=False))
        self.conv_9 = nn.Conv2d(m, 1, 3, 1, 1)

        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2)

    def forward(self, img):
        if img.dim() != 4 or img.size(1) != self.conv_0.in_channels:
            raise ValueError(f"UNetDiscriminatorSN expects (N, {self.conv_0.in_channels}, H, W), "
                             f"got {tuple(img.shape)}")
        if img.size(2) % 8 or img.size(3) % 8:
            raise ValueError(f"UNetDiscriminatorSN needs H and W divisible by 8 (three stride-2 "
                             f"levels with skips), got {tuple(img.shape[2:])}")
        feat_0 = self.lrelu(self.conv_0(img))          # (N, m, H, W)
        feat_1 = self.lrelu(self.conv_1(feat_0))       # (N, 2m, H/2, W/2)
        feat_2 = self.lrelu(self.conv_2(feat_1))       # (N, 4m, H/4, W/4)
        feat_3 = self.lrelu(self.conv_3(feat_2))       # (N, 8m, H/8, W/8)

        feat_4 = self.lrelu(self.conv_4(self.upsample(feat_3)))   # (N, 4m, H/4, W/4)
        if self.skip_connection:
            feat_4 = feat_4 + feat_2
        feat_5 = self.lrelu(self.conv_5(self.upsample(feat_4)))   # (N, 2m, H/2, W/2)
        if self.skip_connection:
            feat_5 = feat_5 + feat_1
        feat_6 = self.lrelu(self.conv_6(self.upsample(feat_5)))   # (N, m, H, W)
        if self.skip_connection:
            feat_6 = feat_6 + feat_0

        out = self.lrelu(self.conv_7(feat_6))
        out = self.lrelu(self.conv_8(out))
        return self.conv_9(out)                        # (N, 1, H, W) logits


# ----------------------------------------------------------------------------------------------
# Losses. Stage 1 ("wogan"): l1(out, gt_usm) + cleaning_loss. Stage 2 adds PerceptualLoss and
# 0.05 * gan_loss(D(out), True); the discriminator's real and fake losses are unweighted.


def l1_loss(pred, target):
    """Mean absolute error."""
    return F.l1_loss(pred, target)


def charbonnier_loss(pred, target, eps=1e-12):
    """Mean of sqrt((pred - target)^2 + eps), a differentiable L1."""
    return torch.sqrt((pred - target) ** 2 + eps).mean()


def cleaning_loss(cleaned_lqs, gt_usm):
    """L1 between the cleaned LQ (n, t, 3, h, w) and the area-downsampled sharpened GT (n, t, 3, s*h,
    s*w), s the network's scale (4, or 2)."""
    if cleaned_lqs.dim() != 5 or gt_usm.dim() != 5:
        raise ValueError(f"cleaning_loss expects (n, t, c, h, w) tensors, got {tuple(cleaned_lqs.shape)} "
                         f"and {tuple(gt_usm.shape)}")
    n, t, c, h, w = gt_usm.shape
    s = h // max(cleaned_lqs.shape[3], 1)
    if tuple(cleaned_lqs.shape) != (n, t, c, h // s, w // s) or s not in (2, 4) or h % s or w % s:
        raise ValueError(f"cleaning_loss: cleaned LQ {tuple(cleaned_lqs.shape)} is not the x4- or x2-down "
                         f"size of the GT {tuple(gt_usm.shape)}")
    gt_clean = F.interpolate(rearrange(gt_usm, "n t c h w -> (n t) c h w"), scale_factor=1 / s, mode="area")
    return F.l1_loss(cleaned_lqs, rearrange(gt_clean, "(n t) c h w -> n t c h w", n=n))


def gan_loss(logits, target_is_real, weight=1.0):
    """Vanilla GAN loss: BCE-with-logits against a label map of ones (real) or zeros (fake), times weight."""
    target = torch.full_like(logits, 1.0 if target_is_real else 0.0)
    return F.binary_cross_entropy_with_logits(logits, target) * weight


# VGG19 configuration "E" (torchvision): channels of each 3x3 conv, "M" = 2x2 max-pool.
VGG19_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
             512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]
VGG_MEAN = [0.485, 0.456, 0.406]  # ImageNet statistics, for inputs in [0, 1]
VGG_STD = [0.229, 0.224, 0.225]


class VGG19Features(nn.Module):
    """torchvision's vgg19().features cut after `num_layers` modules; keys are features.N.weight/bias."""

    def __init__(self, num_layers=35):
        super().__init__()
        layers, in_channels = [], 3
        for v in VGG19_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_channels, v, 3, 1, 1), nn.ReLU()]
                in_channels = v
        self.features = nn.Sequential(*layers[:num_layers])

    def forward(self, x, layer_ids):
        """Outputs of the given module indices (conv indices give pre-ReLU features)."""
        feats = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in layer_ids:
                feats[i] = x
        return feats


def load_vgg19_features(vgg, path):
    """Load torchvision's vgg19-dcbb9e9d.pth (or a .safetensors copy) into VGG19Features, strictly.

    The classifier.* entries of the torchvision file are not needed and are skipped.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VGG19 weights not found: {path} (torchvision's vgg19-dcbb9e9d.pth)")
    state = read_state_dict(path)
    load_strict(vgg, {k: v for k, v in state.items() if not k.startswith("classifier.")}, path)


class PerceptualLoss(nn.Module):
    """Weighted L1 between VGG19 pre-ReLU features of pred and gt (perceptual_weight 1, no style loss).

    vgg_weights: path to torchvision's vgg19-dcbb9e9d.pth (required for training), or the string
    "random" for a randomly initialised VGG (tests only). The VGG is frozen and stays in eval mode.
    forward(pred, gt) takes (n, t, 3, H, W) or (N, 3, H, W) in [0, 1]; gt is detached.
    """

    # conv1_2, conv2_2, conv3_4, conv4_4, conv5_4 of torchvision's vgg19().features
    layer_weights = {2: 0.1, 7: 0.1, 16: 1.0, 25: 1.0, 34: 1.0}

    def __init__(self, vgg_weights=None):
        super().__init__()
        if vgg_weights is None:
            raise ValueError("PerceptualLoss needs the ImageNet VGG19 weights: pass --vgg-weights "
                             "pointing to torchvision's vgg19-dcbb9e9d.pth")
        self.vgg = VGG19Features(num_layers=max(self.layer_weights) + 1)
        if vgg_weights != "random":
            load_vgg19_features(self.vgg, vgg_weights)
        self.vgg.requires_grad_(False)
        self.vgg.eval()
        self.register_buffer("mean", torch.tensor(VGG_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(VGG_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode=True):
        super().train(mode)
        self.vgg.eval()  # the feature extractor is fixed whatever the caller's mode
        return self

    def _features(self, x):
        return self.vgg((x - self.mean) / self.std, self.layer_weights)

    def forward(self, pred, gt):
        if pred.shape != gt.shape or pred.dim() not in (4, 5) or pred.size(-3) != 3:
            raise ValueError(f"PerceptualLoss expects pred and gt of the same shape (n, t, 3, H, W) or "
                             f"(N, 3, H, W), got {tuple(pred.shape)} and {tuple(gt.shape)}")
        pred = pred.reshape(-1, *pred.shape[-3:])
        gt = gt.detach().reshape(-1, *gt.shape[-3:])
        pred_feats, gt_feats = self._features(pred), self._features(gt)
        loss = 0
        for i, w in self.layer_weights.items():
            loss = loss + F.l1_loss(pred_feats[i], gt_feats[i]) * w
        return loss


# ----------------------------------------------------------------------------------------------
# NIQE: the no-reference metric RealBasicVSR is evaluated with on real videos (VideoLQ), where no
# GT exists. train.py reports it (train.niqe) for clips without GT.

# NIQE (Mittal et al. 2013) pristine model: BasicSR 1.4.2 basicsr/metrics/niqe_pris_params.npz (the official
# MATLAB release's mu_prisparam / cov_prisparam, and its 7x7 Gaussian window, sigma 7/6)
_NIQE_PARAMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "niqe_pris_params.npz")
# AGGD shape grid of the official code and its gamma-function tables: the fits are a lookup in these
_AGGD_ALPHA = np.arange(0.2, 10.001, 0.001)
_AGGD_G1, _AGGD_G2, _AGGD_G3 = (np.array([math.gamma(k / a) for a in _AGGD_ALPHA]) for k in (1, 2, 3))
_AGGD_RHO = _AGGD_G2 ** 2 / (_AGGD_G1 * _AGGD_G3)  # increasing in alpha: nearest entry by searchsorted


def _aggd_fit(x):
    """Moment-matching AGGD fit of each row of x (n, m): alpha, beta_l, beta_r and the table index."""
    with np.errstate(invalid="ignore", divide="ignore"):  # no negative (positive) values: nan, as BasicSR
        l_std = np.sqrt((x * x * (x < 0)).sum(1) / (x < 0).sum(1))
        r_std = np.sqrt((x * x * (x > 0)).sum(1) / (x > 0).sum(1))
        g = l_std / r_std
        r = np.abs(x).mean(1) ** 2 / (x * x).mean(1) * (g ** 3 + 1) * (g + 1) / (g ** 2 + 1) ** 2
    j = np.clip(np.searchsorted(_AGGD_RHO, r), 1, len(_AGGD_RHO) - 1)
    i = np.where(np.abs(_AGGD_RHO[j - 1] - r) <= np.abs(_AGGD_RHO[j] - r), j - 1, j)  # argmin |rho - r|
    i = np.where(np.isnan(r), 0, i)  # np.argmin over nan picks the first entry: keep BasicSR's alpha = 0.2
    s = np.sqrt(_AGGD_G1[i] / _AGGD_G3[i])
    return _AGGD_ALPHA[i], l_std * s, r_std * s, i


def _niqe_features(x):
    """The 18 NIQE features of each block of x (n, b, b) of MSCN coefficients."""
    a, bl, br, _ = _aggd_fit(x.reshape(len(x), -1))
    f = [a, (bl + br) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):  # neighbour products: H, V, two diagonals (wrapping, as BasicSR)
        a, bl, br, i = _aggd_fit((x * np.roll(x, shift, axis=(1, 2))).reshape(len(x), -1))
        f += [a, (br - bl) * _AGGD_G2[i] / _AGGD_G1[i], bl, br]  # shape, mean (Eq. 8), left and right scales
    return np.stack(f, 1)


def _blur_nearest(x, k):
    """scipy.ndimage.convolve(x, k, mode='nearest') for a symmetric k (no flip needed)."""
    r, (h, w) = k.shape[0] // 2, x.shape
    p = np.pad(x, r, mode="edge")
    return sum(k[i, j] * p[i:i + h, j:j + w] for i in range(k.shape[0]) for j in range(k.shape[1]))


def niqe(img):
    """NIQE of an (h, w, 3) RGB uint8 image, lower is better: the official MATLAB code as ported by BasicSR,
    calculate_niqe(bgr, crop_border=0, input_order='HWC', convert_to='y'). Y channel, 96x96 blocks without
    overlap, two scales, distance of the blocks' multivariate Gaussian to the pristine one."""
    with np.load(_NIQE_PARAMS) as p:
        mu_pris, cov_pris, k = p["mu_pris_param"][0], p["cov_pris_param"], p["gaussian_window"]
    # BT.601 studio-range Y (MATLAB rgb2ycbcr) with BasicSR's float32 round trip and its rounding; BasicSR takes
    # BGR, so its weights run over B, G, R: same products and order as here
    y = np.dot(img[..., ::-1].astype(np.float32) / 255, [24.966, 128.553, 65.481]) + 16.0
    y = np.round((y / 255).astype(np.float32) * 255)
    h, w = (s // 96 * 96 for s in y.shape)  # whole blocks only
    if h * w < 2 * 96 * 96:  # one block has no covariance (BasicSR fails in pinv)
        raise ValueError(f"NIQE needs at least two 96x96 blocks, got {img.shape[:2]}")
    y, feats = y[:h, :w], []
    for scale in (1, 2):
        # float32 as BasicSR (scipy's convolve keeps the input dtype): flat areas give exact zeros (nan features)
        mu = _blur_nearest(y, k).astype(np.float32)
        sigma = np.sqrt(np.abs(_blur_nearest(y * y, k).astype(np.float32) - mu * mu))
        x, b = (y - mu) / (sigma + 1), 96 // scale  # MSCN coefficients (Eq. 1); the block shrinks with the image
        feats.append(_niqe_features(x.reshape(h // 96, b, w // 96, b).transpose(0, 2, 1, 3).reshape(-1, b, b)))
        # MATLAB imresize(y, 0.5), bicubic with antialiasing; float32 as BasicSR's torch port
        y = data.matlab_imresize(y / 255, 0.5).astype(np.float32) * 255
    f = np.concatenate(feats, 1)
    # MVG fit of the image's blocks (nanmean; covariance of the rows without nan, as MATLAB's nancov)
    d = mu_pris - np.nanmean(f, 0)
    cov = (cov_pris + np.cov(f[~np.isnan(f).any(1)], rowvar=False)) / 2
    return float(np.sqrt(d @ np.linalg.pinv(cov) @ d))  # Eq. 10
