"""Test oracle for realbasicvsr.py, written in the reference code's own structure (mmagic
RealBasicVSRNet / UNetDiscriminatorWithSpectralNorm), working from a state dict with plain
torch.nn.functional calls. Only the BasicVSR part is delegated to basicvsr.BasicVSR, which has its
own oracle.
"""

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------- image cleaning


def residual_blocks_with_input_conv_ref(x, sd, prefix):
    """conv3x3 + LeakyReLU(0.1), then ResidualBlockNoBN: x + conv2(relu(conv1(x)))."""
    x = F.leaky_relu(
        F.conv2d(x, sd[prefix + "main.0.weight"], sd[prefix + "main.0.bias"], padding=1), 0.1
    )
    j = 0
    while f"{prefix}main.2.{j}.conv1.weight" in sd:
        p = f"{prefix}main.2.{j}."
        y = F.relu(F.conv2d(x, sd[p + "conv1.weight"], sd[p + "conv1.bias"], padding=1))
        x = x + F.conv2d(y, sd[p + "conv2.weight"], sd[p + "conv2.bias"], padding=1)
        j += 1
    return x


def image_cleaning_ref(x, sd):
    """(N, 3, h, w) -> predicted residue (N, 3, h, w)."""
    feat = residual_blocks_with_input_conv_ref(x, sd, "image_cleaning.0.")
    return F.conv2d(feat, sd["image_cleaning.1.weight"], sd["image_cleaning.1.bias"], padding=1)


# ---------------------------------------------------------------- generator forward


def real_basicvsr_ref(
    lqs, sd, basicvsr_net, dynamic_refine_thres=255, is_sequential_cleaning=False
):
    """Returns (outputs, cleaned lqs, number of cleaning passes).

    basicvsr_net: a basicvsr.BasicVSR holding the `basicvsr.*` weights of sd.
    """
    lqs = lqs.clone()  # the reference edits its input in place in sequential mode
    thres = dynamic_refine_thres / 255.0
    n, t, c, h, w = lqs.size()
    passes = 0
    for _ in range(0, 3):  # at most 3 cleaning passes
        passes += 1
        if is_sequential_cleaning:
            residues = []
            for i in range(0, t):
                residue = image_cleaning_ref(lqs[:, i, :, :, :], sd)
                lqs[:, i, :, :, :] += residue
                residues.append(residue)
            residues = torch.stack(residues, dim=1)
        else:
            lqs = lqs.view(-1, c, h, w)
            residues = image_cleaning_ref(lqs, sd)
            lqs = (lqs + residues).view(n, t, c, h, w)

        if torch.mean(torch.abs(residues)) < thres:
            break

    outputs = basicvsr_net(lqs)
    return outputs, lqs, passes


# ---------------------------------------------------------------- discriminator


def spectral_norm_weight_ref(sd, name):
    """Eval-mode spectral norm: W / sigma with sigma = u^T W_mat v from the stored u, v."""
    w = sd[name + ".weight_orig"]
    u = sd[name + ".weight_u"]
    v = sd[name + ".weight_v"]
    sigma = torch.dot(u, torch.mv(w.reshape(w.size(0), -1), v))
    return w / sigma


def unet_disc_ref(img, sd, skip_connection=True):
    def lrelu(x):
        return F.leaky_relu(x, negative_slope=0.2)

    def up(x):
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)

    def sn_conv(x, name, stride=1):
        return F.conv2d(x, spectral_norm_weight_ref(sd, name), stride=stride, padding=1)

    x0 = lrelu(F.conv2d(img, sd["conv_0.weight"], sd["conv_0.bias"], padding=1))
    x1 = lrelu(sn_conv(x0, "conv_1", stride=2))
    x2 = lrelu(sn_conv(x1, "conv_2", stride=2))
    x3 = lrelu(sn_conv(x2, "conv_3", stride=2))

    x4 = lrelu(sn_conv(up(x3), "conv_4"))
    if skip_connection:
        x4 = x4 + x2
    x5 = lrelu(sn_conv(up(x4), "conv_5"))
    if skip_connection:
        x5 = x5 + x1
    x6 = lrelu(sn_conv(up(x5), "conv_6"))
    if skip_connection:
        x6 = x6 + x0

    out = lrelu(sn_conv(x6, "conv_7"))
    out = lrelu(sn_conv(out, "conv_8"))
    return F.conv2d(out, sd["conv_9.weight"], sd["conv_9.bias"], padding=1)


# ---------------------------------------------------------------- VGG19 perceptual loss

# conv and max-pool indices in torchvision's vgg19().features; the rest are ReLUs
VGG19_CONVS = [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34]
VGG19_POOLS = [4, 9, 18, 27, 36]


def vgg19_features_ref(x, sd, layer_ids):
    """Pre-ReLU conv outputs at layer_ids from a torchvision-format state dict (features.N.*)."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # ImageNet statistics
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (x - mean) / std
    feats = {}
    for i in range(max(layer_ids) + 1):
        if i in VGG19_CONVS:
            x = F.conv2d(x, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"], padding=1)
            if i in layer_ids:
                feats[i] = x
        elif i in VGG19_POOLS:
            x = F.max_pool2d(x, 2, 2)
        else:
            x = F.relu(x)
    return feats


def perceptual_loss_ref(pred, gt, sd, layer_weights):
    pred = pred.reshape(-1, 3, *pred.shape[-2:])
    gt = gt.reshape(-1, 3, *gt.shape[-2:])
    fp = vgg19_features_ref(pred, sd, layer_weights)
    fg = vgg19_features_ref(gt, sd, layer_weights)
    return sum((fp[i] - fg[i]).abs().mean() * w for i, w in layer_weights.items())
