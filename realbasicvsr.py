"""RealBasicVSR (Chan et al., "Investigating Tradeoffs in Real-World Video Super-Resolution",
CVPR 2022): the generator, its U-Net discriminator and the training losses.

The generator is an image-cleaning module in front of BasicVSR; it is trained first with pixel and
cleaning losses ("wogan"), then fine-tuned with a perceptual loss and a U-Net discriminator with
spectral norm. Module and state_dict names follow mmagic, so the published checkpoints load with
weights.load_weights (prefix "generator_ema" for inference, "discriminator" for the critic), and
the perceptual loss's VGG19 with weights.load_vgg19_features. Tensors are RGB in [0, 1]; a video
is (n, t, 3, h, w). The no-reference metric RealBasicVSR is evaluated with, NIQE, is in metrics.py.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from basicvsr import BasicVSR, ResidualBlocksWithInputConv, check_video

# ----------------------------------------------------------------------------------------------
# Generator: clean each LQ frame (up to three passes), then BasicVSR on the cleaned clip.


class RealBasicVSR(nn.Module):
    """forward(lqs (n, t, 3, h, w)) -> (n, t, 3, s*h, s*w) (s = scale, 4 or 2), or
    (outputs, cleaned_lqs) with return_lqs.

    image_cleaning predicts a residue that is added to the frames. The cleaning is repeated while
    mean |residue| over the whole batch is >= dynamic_refine_thres / 255, at most 3 passes; the
    default 255 (threshold 1.0) means one pass, as in training and the official inference.
    is_sequential_cleaning cleans frame by frame to save memory; the result is the same and, unlike
    the reference, the caller's tensor is never modified.

    SPyNet is frozen for the whole of training (requires_grad False), and so is image_cleaning when
    is_fix_cleaning. requires_grad_() called on this module keeps them frozen (a parent module's
    requires_grad_ would bypass that). An optimizer must take only the parameters with
    requires_grad.
    """

    def __init__(
        self,
        mid_channels=64,
        num_propagation_blocks=20,
        num_cleaning_blocks=20,
        dynamic_refine_thres=255,
        is_fix_cleaning=False,
        is_sequential_cleaning=False,
        scale=4,
    ):
        super().__init__()
        # saved with the weights
        self.config = dict(
            mid_channels=mid_channels,
            num_propagation_blocks=num_propagation_blocks,
            num_cleaning_blocks=num_cleaning_blocks,
            scale=scale,
        )
        self.scale = scale
        self.is_fix_cleaning = is_fix_cleaning
        self.is_sequential_cleaning = is_sequential_cleaning
        self.dynamic_refine_thres = dynamic_refine_thres / 255.0

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
            cleaned = []
            residue_sum = 0
            for i in range(t):
                residue = self.image_cleaning(lqs[:, i])  # (n, 3, h, w)
                cleaned.append(lqs[:, i] + residue)
                residue_sum = residue_sum + residue.abs().sum()
            return torch.stack(cleaned, dim=1), residue_sum / lqs.numel()
        residues = rearrange(
            self.image_cleaning(rearrange(lqs, "n t c h w -> (n t) c h w")),
            "(n t) c h w -> n t c h w",
            n=n,
        )
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
    """Per-pixel real/fake logits (N, 1, H, W) for frames (N, in_channels, H, W); H and W multiples
    of 8.

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
            raise ValueError(
                f"UNetDiscriminatorSN expects (N, {self.conv_0.in_channels}, H, W), "
                f"got {tuple(img.shape)}"
            )
        if img.size(2) % 8 or img.size(3) % 8:
            raise ValueError(
                f"UNetDiscriminatorSN needs H and W divisible by 8 (three stride-2 "
                f"levels with skips), got {tuple(img.shape[2:])}"
            )
        feat_0 = self.lrelu(self.conv_0(img))  # (N, m, H, W)
        feat_1 = self.lrelu(self.conv_1(feat_0))  # (N, 2m, H/2, W/2)
        feat_2 = self.lrelu(self.conv_2(feat_1))  # (N, 4m, H/4, W/4)
        feat_3 = self.lrelu(self.conv_3(feat_2))  # (N, 8m, H/8, W/8)

        feat_4 = self.lrelu(self.conv_4(self.upsample(feat_3)))  # (N, 4m, H/4, W/4)
        if self.skip_connection:
            feat_4 = feat_4 + feat_2
        feat_5 = self.lrelu(self.conv_5(self.upsample(feat_4)))  # (N, 2m, H/2, W/2)
        if self.skip_connection:
            feat_5 = feat_5 + feat_1
        feat_6 = self.lrelu(self.conv_6(self.upsample(feat_5)))  # (N, m, H, W)
        if self.skip_connection:
            feat_6 = feat_6 + feat_0

        out = self.lrelu(self.conv_7(feat_6))
        out = self.lrelu(self.conv_8(out))
        return self.conv_9(out)  # (N, 1, H, W) logits


# ----------------------------------------------------------------------------------------------
# Losses. Stage 1 ("wogan"): F.l1_loss(out, gt_usm) + cleaning_loss. Stage 2 adds PerceptualLoss
# and 0.05 * gan_loss(D(out), True); the discriminator's real and fake losses are unweighted.


def charbonnier_loss(pred, target, eps=1e-12):
    """Mean of sqrt((pred - target)^2 + eps), a differentiable L1."""
    return torch.sqrt((pred - target) ** 2 + eps).mean()


def cleaning_loss(cleaned_lqs, gt_usm):
    """L1 between the cleaned LQ (n, t, 3, h, w) and the area-downsampled sharpened GT
    (n, t, 3, s*h, s*w), s the network's scale (4, or 2)."""
    if cleaned_lqs.dim() != 5 or gt_usm.dim() != 5:
        raise ValueError(
            f"cleaning_loss expects (n, t, c, h, w) tensors, got {tuple(cleaned_lqs.shape)} "
            f"and {tuple(gt_usm.shape)}"
        )
    n, t, c, h, w = gt_usm.shape
    s = h // max(cleaned_lqs.shape[3], 1)
    if tuple(cleaned_lqs.shape) != (n, t, c, h // s, w // s) or s not in (2, 4) or h % s or w % s:
        raise ValueError(
            f"cleaning_loss: cleaned LQ {tuple(cleaned_lqs.shape)} is not the x4- or x2-down "
            f"size of the GT {tuple(gt_usm.shape)}"
        )
    gt_clean = F.interpolate(
        rearrange(gt_usm, "n t c h w -> (n t) c h w"), scale_factor=1 / s, mode="area"
    )
    return F.l1_loss(cleaned_lqs, rearrange(gt_clean, "(n t) c h w -> n t c h w", n=n))


def gan_loss(logits, target_is_real, weight=1.0):
    """Vanilla GAN loss: BCE-with-logits against a label map of ones (real) or zeros (fake), times
    weight."""
    target = torch.full_like(logits, 1.0 if target_is_real else 0.0)
    return F.binary_cross_entropy_with_logits(logits, target) * weight


# VGG19 configuration "E" (torchvision): five blocks of (channels, number) 3x3 convs, each conv
# followed by a ReLU and each block by a 2x2 max-pool.
VGG19_BLOCKS = ((64, 2), (128, 2), (256, 4), (512, 4), (512, 4))
VGG_MEAN = [0.485, 0.456, 0.406]  # ImageNet statistics, for inputs in [0, 1]
VGG_STD = [0.229, 0.224, 0.225]


class VGG19Features(nn.Module):
    """torchvision's vgg19().features cut after `num_layers` modules; keys are
    features.N.weight/bias."""

    def __init__(self, num_layers=35):
        super().__init__()
        layers = []
        in_channels = 3
        for channels, num_convs in VGG19_BLOCKS:
            for _ in range(num_convs):
                layers += [nn.Conv2d(in_channels, channels, 3, 1, 1), nn.ReLU()]
                in_channels = channels
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.features = nn.Sequential(*layers[:num_layers])

    def forward(self, x, layer_ids):
        """Outputs of the given module indices (conv indices give pre-ReLU features)."""
        feats = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in layer_ids:
                feats[i] = x
        return feats


class PerceptualLoss(nn.Module):
    """Weighted L1 between VGG19 pre-ReLU features of pred and gt (perceptual_weight 1, no style
    loss).

    The VGG starts random: load torchvision's ImageNet weights (vgg19-dcbb9e9d.pth) into `self.vgg`
    with weights.load_vgg19_features before training. It is frozen and stays in eval mode.
    forward(pred, gt) takes (n, t, 3, H, W) or (N, 3, H, W) in [0, 1]; gt is detached.
    """

    # conv1_2, conv2_2, conv3_4, conv4_4, conv5_4 of torchvision's vgg19().features
    layer_weights = {2: 0.1, 7: 0.1, 16: 1.0, 25: 1.0, 34: 1.0}

    def __init__(self):
        super().__init__()
        self.vgg = VGG19Features(num_layers=max(self.layer_weights) + 1)
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
            raise ValueError(
                f"PerceptualLoss expects pred and gt of the same shape (n, t, 3, H, W) or "
                f"(N, 3, H, W), got {tuple(pred.shape)} and {tuple(gt.shape)}"
            )
        pred = pred.reshape(-1, *pred.shape[-3:])
        gt = gt.detach().reshape(-1, *gt.shape[-3:])
        pred_feats = self._features(pred)
        gt_feats = self._features(gt)
        loss = 0
        for i, w in self.layer_weights.items():
            loss = loss + F.l1_loss(pred_feats[i], gt_feats[i]) * w
        return loss
