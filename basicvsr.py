"""BasicVSR and BasicVSR++ for x4 video super-resolution, weight-compatible with mmagic.

  SPyNet            optical flow between two frames (Ranjan & Black 2017), the flow estimator of both networks
  BasicVSR          first-order bidirectional propagation (Chan et al., CVPR 2021); the SR part of RealBasicVSR
  BasicVSRPlusPlus  second-order grid propagation with flow-guided deformable alignment (Chan et al., CVPR 2022)
  load_weights      mmagic/mmediting .pth, BasicSR .pth, plain state dicts and our safetensors, strictly
  save_weights      safetensors, written atomically

Videos are (n, t, 3, h, w) RGB in [0, 1]; flows are (n, 2, h, w) in pixels, channel 0 = dx, channel 1 = dy.
Module and parameter names are mmagic's, so `model.state_dict()` keys equal the published checkpoints'.
The two irregular ops, flow warping and modulated deformable convolution, come from `kernels`.
"""
import argparse
import os
import pickle
import re
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

# ----------------------------------------------------------------------------------------
# Building blocks


def default_init_weights(modules, scale=1.0):
    """Kaiming-normal (fan_in) weights scaled by `scale`, zero biases: mmagic's init for SR convs."""
    for m in modules:
        nn.init.kaiming_normal_(m.weight)
        m.weight.data.mul_(scale)
        if m.bias is not None:
            m.bias.data.zero_()


class ResidualBlockNoBN(nn.Module):
    """x + conv2(relu(conv1(x))), no batch norm (EDSR). Small init (x0.1) keeps a deep stack near identity."""

    def __init__(self, mid_channels=64):
        super().__init__()
        self.conv1 = nn.Conv2d(mid_channels, mid_channels, 3, 1, 1, bias=True)
        self.conv2 = nn.Conv2d(mid_channels, mid_channels, 3, 1, 1, bias=True)
        self.relu = nn.ReLU(inplace=True)
        default_init_weights([self.conv1, self.conv2], 0.1)

    def forward(self, x):
        return x + self.conv2(self.relu(self.conv1(x)))


class ResidualBlocksWithInputConv(nn.Module):
    """conv(in -> out) + LeakyReLU(0.1), then `num_blocks` residual blocks."""

    def __init__(self, in_channels, out_channels=64, num_blocks=30):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=True),
            nn.LeakyReLU(negative_slope=0.1, inplace=True),
            nn.Sequential(*[ResidualBlockNoBN(out_channels) for _ in range(num_blocks)]),
        )

    def forward(self, feat):
        return self.main(feat)


class PixelShufflePack(nn.Module):
    """conv(in -> out * s^2) then pixel shuffle: upsampling by `scale_factor` (ESPCN)."""

    def __init__(self, in_channels, out_channels, scale_factor, upsample_kernel):
        super().__init__()
        self.scale_factor = scale_factor
        self.upsample_conv = nn.Conv2d(in_channels, out_channels * scale_factor * scale_factor,
                                       upsample_kernel, padding=(upsample_kernel - 1) // 2)
        default_init_weights([self.upsample_conv], 1.0)

    def forward(self, x):
        return F.pixel_shuffle(self.upsample_conv(x), self.scale_factor)


# ----------------------------------------------------------------------------------------
# SPyNet: a 6-level coarse-to-fine pyramid; each level refines the upsampled flow of the
# level below from [ref, supp warped by the current flow, current flow].


class ConvModule(nn.Module):
    """Conv2d (k7, bias) plus optional ReLU, with the conv at `.conv` as in mmcv's ConvModule (the keys need it)."""

    def __init__(self, in_channels, out_channels, act=True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 7, 1, 3, bias=True)
        self.act = nn.ReLU(inplace=True) if act else None
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")  # mmcv's default
        nn.init.zeros_(self.conv.bias)

    def forward(self, x):
        x = self.conv(x)
        return self.act(x) if self.act is not None else x


class SPyNetBasicModule(nn.Module):
    """One pyramid level: [ref(3), warped supp(3), flow(2)] -> flow residual (2)."""

    def __init__(self):
        super().__init__()
        self.basic_module = nn.Sequential(
            ConvModule(8, 32), ConvModule(32, 64), ConvModule(64, 32), ConvModule(32, 16),
            ConvModule(16, 2, act=False))

    def forward(self, x):
        return self.basic_module(x)


class SPyNet(nn.Module):
    """forward(ref, supp) -> flow (n, 2, h, w) from ref to supp: flow_warp(supp, flow) is aligned to ref."""

    def __init__(self):
        super().__init__()
        self.basic_module = nn.ModuleList([SPyNetBasicModule() for _ in range(6)])
        # ImageNet statistics; persistent, so they are part of every mmagic state dict.
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def compute_flow(self, ref, supp):
        """ref, supp (n, 3, h, w) with h, w multiples of 32 -> flow (n, 2, h, w)."""
        ref = [(ref - self.mean) / self.std]
        supp = [(supp - self.mean) / self.std]
        for _ in range(5):  # 6 levels, finest first
            ref.append(F.avg_pool2d(ref[-1], kernel_size=2, stride=2, count_include_pad=False))
            supp.append(F.avg_pool2d(supp[-1], kernel_size=2, stride=2, count_include_pad=False))
        ref, supp = ref[::-1], supp[::-1]  # level 0 is the coarsest, 1/32 size

        n, _, h, w = ref[0].shape
        flow = ref[0].new_zeros(n, 2, h, w)
        for level in range(6):
            if level == 0:
                flow_up = flow
            else:  # twice the size, so twice the displacement
                flow_up = F.interpolate(flow, scale_factor=2, mode="bilinear", align_corners=True) * 2.0
            supp_warped = kernels.flow_warp(supp[level], flow_up, padding_mode="border")
            flow = flow_up + self.basic_module[level](torch.cat([ref[level], supp_warped, flow_up], dim=1))
        return flow

    def forward(self, ref, supp):
        h, w = ref.shape[2:]
        # The pyramid halves the size 5 times: work at the next multiple of 32.
        h_up, w_up = -(-h // 32) * 32, -(-w // 32) * 32
        if (h_up, w_up) != (h, w):
            ref = F.interpolate(ref, size=(h_up, w_up), mode="bilinear", align_corners=False)
            supp = F.interpolate(supp, size=(h_up, w_up), mode="bilinear", align_corners=False)
        flow = self.compute_flow(ref, supp)
        if (h_up, w_up) != (h, w):
            flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)
            flow = torch.cat([flow[:, :1] * (w / w_up), flow[:, 1:] * (h / h_up)], dim=1)
        return flow


# ----------------------------------------------------------------------------------------
# Shared by both networks: input checks, mirror detection, per-step flows, CPU offload.


def check_video(lqs, name, min_size=0):
    """(n, t, 3, h, w) or ValueError; `min_size` is the smallest h, w the network handles."""
    if lqs.dim() != 5 or lqs.shape[2] != 3:
        raise ValueError(f"{name}: expected a video (n, t, 3, h, w), got shape {tuple(lqs.shape)}")
    if lqs.shape[1] < 1:
        raise ValueError(f"{name}: the clip has no frames, shape {tuple(lqs.shape)}")
    h, w = lqs.shape[3:]
    if h < min_size or w < min_size:
        raise ValueError(f"{name}: input frames of {h}x{w} are too small; the low-resolution size must be "
                         f"at least {min_size}x{min_size}")
    return lqs.shape


def is_mirror_extended(lqs):
    """True if the clip is [x, reversed(x)]; its forward flows are then the backward ones reversed.
    Decided afresh for every call (BasicSR's flag never resets)."""
    t = lqs.shape[1]
    if t % 2:
        return False
    lqs_1, lqs_2 = torch.chunk(lqs, 2, dim=1)
    return torch.equal(lqs_1, lqs_2.flip(1))


def offload(x, cpu_cache):
    # Asynchronous copy into pinned memory; later uploads are ordered after it on the same stream.
    return x.to("cpu", non_blocking=True) if cpu_cache else x


def compute_flow(spynet, lqs, mirror, cpu_cache=False):
    """lqs (n, t, 3, h, w) -> (flows_forward, flows_backward), lists of t-1 flows (n, 2, h, w):
    flows_backward[k] goes from frame k to k+1, flows_forward[k] from frame k+1 to k."""
    n, t, c, h, w = lqs.shape
    if t == 1:
        return [], []
    if cpu_cache:  # one pair at a time, so SPyNet's activations stay a frame's worth
        flows_backward = [offload(spynet(lqs[:, i], lqs[:, i + 1]), True) for i in range(t - 1)]
        flows_forward = None if mirror else [offload(spynet(lqs[:, i + 1], lqs[:, i]), True) for i in range(t - 1)]
    else:
        lqs_1 = lqs[:, :-1].reshape(-1, c, h, w)
        lqs_2 = lqs[:, 1:].reshape(-1, c, h, w)
        flows_backward = list(spynet(lqs_1, lqs_2).view(n, t - 1, 2, h, w).unbind(1))
        flows_forward = None if mirror else list(spynet(lqs_2, lqs_1).view(n, t - 1, 2, h, w).unbind(1))
    if mirror:  # frame i of the mirrored clip is frame t-1-i
        flows_forward = flows_backward[::-1]
    return flows_forward, flows_backward


# ----------------------------------------------------------------------------------------
# BasicVSR: backward then forward propagation of a feature map, each step warping the
# previous state with the SPyNet flow; the two directions are fused and upsampled per frame.


class BasicVSR(nn.Module):
    """forward(lqs (n, t, 3, h, w)) -> (n, t, 3, 4h, 4w). Any h, w >= 1 works: SPyNet pads to 32."""

    def __init__(self, mid_channels=64, num_blocks=30):
        super().__init__()
        self.mid_channels = mid_channels
        self.spynet = SPyNet()
        self.backward_resblocks = ResidualBlocksWithInputConv(mid_channels + 3, mid_channels, num_blocks)
        self.forward_resblocks = ResidualBlocksWithInputConv(mid_channels + 3, mid_channels, num_blocks)
        self.fusion = nn.Conv2d(mid_channels * 2, mid_channels, 1, 1, 0, bias=True)
        self.upsample1 = PixelShufflePack(mid_channels, mid_channels, 2, upsample_kernel=3)
        self.upsample2 = PixelShufflePack(mid_channels, 64, 2, upsample_kernel=3)
        self.conv_hr = nn.Conv2d(64, 64, 3, 1, 1)
        self.conv_last = nn.Conv2d(64, 3, 3, 1, 1)
        self.img_upsample = nn.Upsample(scale_factor=4, mode="bilinear", align_corners=False)
        self.lrelu = nn.LeakyReLU(negative_slope=0.1, inplace=True)

    def forward(self, lqs):
        n, t, c, h, w = check_video(lqs, "BasicVSR")
        flows_forward, flows_backward = compute_flow(self.spynet, lqs, is_mirror_extended(lqs))

        # backward propagation, t-1 .. 0; the RGB frame goes first in the concatenation
        feats_backward = [None] * t
        feat_prop = lqs.new_zeros(n, self.mid_channels, h, w)
        for i in range(t - 1, -1, -1):
            if i < t - 1:
                feat_prop = kernels.flow_warp(feat_prop, flows_backward[i])
            feat_prop = self.backward_resblocks(torch.cat([lqs[:, i], feat_prop], dim=1))
            feats_backward[i] = feat_prop

        # forward propagation, 0 .. t-1, fused with the backward features and upsampled
        outputs = []
        feat_prop = torch.zeros_like(feat_prop)
        for i in range(t):
            lr_curr = lqs[:, i]
            if i > 0:
                feat_prop = kernels.flow_warp(feat_prop, flows_forward[i - 1])
            feat_prop = self.forward_resblocks(torch.cat([lr_curr, feat_prop], dim=1))

            out = self.lrelu(self.fusion(torch.cat([feats_backward[i], feat_prop], dim=1)))
            out = self.lrelu(self.upsample1(out))
            out = self.lrelu(self.upsample2(out))
            out = self.lrelu(self.conv_hr(out))
            out = self.conv_last(out)
            outputs.append(out + self.img_upsample(lr_curr))
            feats_backward[i] = None
        return torch.stack(outputs, dim=1)


# ----------------------------------------------------------------------------------------
# BasicVSR++: flow-guided deformable alignment. The offsets are residuals around the flow,
# bounded by max_residue_magnitude * tanh, predicted from the flow-warped features; the DCN
# then samples the *unwarped* features of frames n-1 and n-2 (deform groups 0-7 and 8-15).


class SecondOrderDeformableAlignment(nn.Module):
    """DCNv2 (mmcv ModulatedDeformConv2d weights) whose offsets and mask come from conv_offset.

    forward(x (n, 2C, h, w), extra_feat (n, 3C, h, w), flow_1, flow_2 (n, 2, h, w)) -> (n, C, h, w)
    """

    def __init__(self, in_channels, out_channels, kernel_size=3, padding=1, deform_groups=16,
                 max_residue_magnitude=10):
        super().__init__()
        self.padding = padding
        self.deform_groups = deform_groups
        self.max_residue_magnitude = max_residue_magnitude
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.conv_offset = nn.Sequential(
            nn.Conv2d(3 * out_channels + 4, out_channels, 3, 1, 1),
            nn.LeakyReLU(negative_slope=0.1, inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1),
            nn.LeakyReLU(negative_slope=0.1, inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1),
            nn.LeakyReLU(negative_slope=0.1, inplace=True),
            nn.Conv2d(out_channels, 27 * deform_groups, 3, 1, 1),  # 9 taps x (dy, dx, mask) per group
        )
        # mmcv's DCN init; a zero last layer makes the initial offsets the flow and the mask 0.5.
        stdv = 1.0 / (in_channels * kernel_size * kernel_size) ** 0.5
        nn.init.uniform_(self.weight, -stdv, stdv)
        nn.init.zeros_(self.bias)
        nn.init.zeros_(self.conv_offset[-1].weight)
        nn.init.zeros_(self.conv_offset[-1].bias)

    def forward(self, x, extra_feat, flow_1, flow_2):
        out = self.conv_offset(torch.cat([extra_feat, flow_1, flow_2], dim=1))
        o1, o2, mask = torch.chunk(out, 3, dim=1)

        # offsets are (dy, dx) pairs, the flow is (dx, dy): flip, then one copy per tap and group
        offset = self.max_residue_magnitude * torch.tanh(torch.cat((o1, o2), dim=1))
        offset_1, offset_2 = torch.chunk(offset, 2, dim=1)
        offset_1 = offset_1 + flow_1.flip(1).repeat(1, offset_1.size(1) // 2, 1, 1)
        offset_2 = offset_2 + flow_2.flip(1).repeat(1, offset_2.size(1) // 2, 1, 1)
        offset = torch.cat([offset_1, offset_2], dim=1)
        mask = torch.sigmoid(mask)

        return kernels.deform_conv2d(x, offset, mask, self.weight, self.bias, stride=1, padding=self.padding,
                                     dilation=1, deform_groups=self.deform_groups)


class BasicVSRPlusPlus(nn.Module):
    """forward(lqs (n, t, 3, h, w)) -> (n, t, 3, 4h, 4w), or (n, t, 3, h, w) when is_low_res_input=False
    (then h, w are multiples of 4 and the network works at h/4 x w/4). The LR size must be >= 64x64.

    Long clips: when t > cpu_cache_length and the input is on a GPU, per-frame features and flows live
    in (pinned) CPU memory and only the frames a step needs are uploaded, so GPU memory stays a few
    frames' worth; the output is then returned on the CPU. Setting `force_cpu_cache = True` takes the
    same path for CPU inputs too (the copies are no-ops), which is how the tests exercise it.
    """

    def __init__(self, mid_channels=64, num_blocks=7, max_residue_magnitude=10, is_low_res_input=True,
                 cpu_cache_length=100):
        super().__init__()
        self.mid_channels = mid_channels
        self.is_low_res_input = is_low_res_input
        self.cpu_cache_length = cpu_cache_length
        self.force_cpu_cache = False

        self.spynet = SPyNet()

        # per-frame features, at the LR size (HR input: two stride-2 convs first)
        if is_low_res_input:
            self.feat_extract = ResidualBlocksWithInputConv(3, mid_channels, 5)
        else:
            self.feat_extract = nn.Sequential(
                nn.Conv2d(3, mid_channels, 3, 2, 1), nn.LeakyReLU(negative_slope=0.1, inplace=True),
                nn.Conv2d(mid_channels, mid_channels, 3, 2, 1), nn.LeakyReLU(negative_slope=0.1, inplace=True),
                ResidualBlocksWithInputConv(mid_channels, mid_channels, 5))

        # four propagation branches; branch k aggregates the spatial features and all earlier branches
        self.deform_align = nn.ModuleDict()
        self.backbone = nn.ModuleDict()
        for i, module in enumerate(["backward_1", "forward_1", "backward_2", "forward_2"]):
            self.deform_align[module] = SecondOrderDeformableAlignment(
                2 * mid_channels, mid_channels, 3, padding=1, deform_groups=16,
                max_residue_magnitude=max_residue_magnitude)
            self.backbone[module] = ResidualBlocksWithInputConv((2 + i) * mid_channels, mid_channels, num_blocks)

        # reconstruction from [spatial, backward_1, forward_1, backward_2, forward_2], then x4
        self.reconstruction = ResidualBlocksWithInputConv(5 * mid_channels, mid_channels, 5)
        self.upsample1 = PixelShufflePack(mid_channels, mid_channels, 2, upsample_kernel=3)
        self.upsample2 = PixelShufflePack(mid_channels, 64, 2, upsample_kernel=3)
        self.conv_hr = nn.Conv2d(64, 64, 3, 1, 1)
        self.conv_last = nn.Conv2d(64, 3, 3, 1, 1)
        self.img_upsample = nn.Upsample(scale_factor=4, mode="bilinear", align_corners=False)
        self.lrelu = nn.LeakyReLU(negative_slope=0.1, inplace=True)

    def propagate(self, feats, flows, module_name, cpu_cache, device):
        """Second-order grid propagation of one branch; appends its per-frame output to feats[module_name].

        feats: dict of per-frame feature lists (n, C, h, w), in temporal order;
        flows: t-1 flows; entry flow_idx[i] aligns the state of step i-1 to the frame of step i.
        """
        t = len(feats["spatial"])
        frame_idx = list(range(t))
        flow_idx = list(range(-1, t - 1))
        if module_name.startswith("backward"):
            frame_idx = frame_idx[::-1]
            flow_idx = frame_idx

        def fetch(x):
            return x.to(device, non_blocking=True)

        feat_prop = torch.zeros_like(fetch(feats["spatial"][0]))
        for i, idx in enumerate(frame_idx):
            feat_current = fetch(feats["spatial"][idx])
            if i > 0:  # align the state (n-1) and the output of two steps ago (n-2) to this frame
                flow_n1 = fetch(flows[flow_idx[i]])
                cond_n1 = kernels.flow_warp(feat_prop, flow_n1)
                feat_n2 = torch.zeros_like(feat_prop)
                flow_n2 = torch.zeros_like(flow_n1)
                cond_n2 = torch.zeros_like(cond_n1)
                if i > 1:
                    feat_n2 = fetch(feats[module_name][-2])
                    # compose n-2 -> n-1 -> n: flow_n2 = flow_n1 + flow(n-1 -> n-2) sampled at p + flow_n1
                    flow_n2 = flow_n1 + kernels.flow_warp(fetch(flows[flow_idx[i - 1]]), flow_n1)
                    cond_n2 = kernels.flow_warp(feat_n2, flow_n2)
                cond = torch.cat([cond_n1, feat_current, cond_n2], dim=1)
                feat_prop = self.deform_align[module_name](torch.cat([feat_prop, feat_n2], dim=1), cond,
                                                           flow_n1, flow_n2)

            # aggregate: this frame's spatial features, every earlier branch at this frame, the state
            feat = [feat_current] + [fetch(feats[k][idx]) for k in feats if k not in ("spatial", module_name)]
            feat = torch.cat(feat + [feat_prop], dim=1)
            feat_prop = feat_prop + self.backbone[module_name](feat)
            feats[module_name].append(offload(feat_prop, cpu_cache))

        if module_name.startswith("backward"):
            feats[module_name] = feats[module_name][::-1]

    def upsample(self, lqs, feats, cpu_cache, device):
        """Reconstruct each frame from all branches, x4 by pixel shuffle, plus the upsampled input."""
        outputs = []
        for i in range(lqs.shape[1]):
            hr = torch.cat([feats[k][i].to(device, non_blocking=True) for k in feats], dim=1)  # (n, 5C, h, w)
            for k in feats:  # free frame i's features as we go
                feats[k][i] = None
            hr = self.reconstruction(hr)
            hr = self.lrelu(self.upsample1(hr))
            hr = self.lrelu(self.upsample2(hr))
            hr = self.lrelu(self.conv_hr(hr))
            hr = self.conv_last(hr)
            # the skip is bilinear x4 (not bicubic), as in the reference
            hr = hr + (self.img_upsample(lqs[:, i]) if self.is_low_res_input else lqs[:, i])
            outputs.append(offload(hr, cpu_cache))
        if cpu_cache and device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # the copies must land before the CPU reads them
        return torch.stack(outputs, dim=1)

    def forward(self, lqs):
        n, t, c, h, w = check_video(lqs, "BasicVSRPlusPlus")
        device = lqs.device
        cpu_cache = t > self.cpu_cache_length and (lqs.is_cuda or self.force_cpu_cache)

        if self.is_low_res_input:
            lqs_downsample = lqs
        else:
            if h % 4 or w % 4:
                raise ValueError(f"BasicVSRPlusPlus: with is_low_res_input=False the frame size must be a "
                                 f"multiple of 4, got {h}x{w}")
            lqs_downsample = F.interpolate(lqs.reshape(-1, c, h, w), scale_factor=0.25, mode="bicubic")
            lqs_downsample = lqs_downsample.view(n, t, c, h // 4, w // 4)
        check_video(lqs_downsample, "BasicVSRPlusPlus", min_size=64)

        # spatial features, one list entry per frame (n, C, h', w')
        if cpu_cache:
            feats = {"spatial": [offload(self.feat_extract(lqs[:, i]), True) for i in range(t)]}
        else:
            feat = self.feat_extract(lqs.reshape(-1, c, h, w))
            feats = {"spatial": list(feat.view(n, t, *feat.shape[1:]).unbind(1))}

        flows_forward, flows_backward = compute_flow(self.spynet, lqs_downsample, is_mirror_extended(lqs),
                                                     cpu_cache)

        for iter_ in [1, 2]:
            for direction in ["backward", "forward"]:
                module_name = f"{direction}_{iter_}"
                feats[module_name] = []
                flows = flows_backward if direction == "backward" else flows_forward
                self.propagate(feats, flows, module_name, cpu_cache, device)

        return self.upsample(lqs, feats, cpu_cache, device)


# ----------------------------------------------------------------------------------------
# Weights. One reader for every published layout, strict loading, atomic safetensors saving.
#   safetensors (ours)              flat {key: tensor}
#   mmagic / mmediting .pth         {"meta": ..., "state_dict": {"generator.<key>": ...}} (also generator_ema.)
#   BasicSR .pth                    {"params_ema" or "params": {...}}, SPyNet convs at basic_module.{0,2,4,6,8}
#                                   and upsamplers upconv1/upconv2 (renamed here)
#   plain .pth                      {key: tensor}
#   standalone SPyNet checkpoints   no mean/std buffers: these constants are taken from the model


def _is_safetensors(path):
    # 8-byte little-endian header length, then the JSON header
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path)


class _Opaque:
    """Stand-in for any non-tensor object in a checkpoint's metadata (mmengine's message hub, numpy, ...)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _TensorsOnlyUnpickler(pickle.Unpickler):
    # Resolves only tensor rebuilding and plain containers; every other global becomes _Opaque,
    # so no code from the file ever runs.
    def find_class(self, module, name):
        if (module == "torch._utils" and name.startswith("_rebuild_")) or (module, name) in {
                ("collections", "OrderedDict"), ("torch", "Size"), ("torch", "device")}:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return _Opaque


class _TensorsOnlyPickle:
    Unpickler = _TensorsOnlyUnpickler
    load = staticmethod(lambda f, **kw: _TensorsOnlyUnpickler(f, **kw).load())


def _torch_load(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Training checkpoints (mmagic 1.x) carry objects weights_only refuses in their metadata;
        # read the tensors and leave those objects opaque.
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_TensorsOnlyPickle)


_BASICSR_SPYNET = re.compile(r"^(.*\bbasic_module\.\d+\.basic_module\.)(\d+)\.(weight|bias)$")
_BASICSR_UPCONV = re.compile(r"^(.*?)\bupconv([12])\.")


def _from_basicsr_names(state):
    """BasicSR's SPyNet (Sequential with ReLU modules: convs at 0,2,..,8) and upsampler names -> mmagic's."""
    out = {}
    for k, v in state.items():
        m = _BASICSR_SPYNET.match(k)
        if m and int(m.group(2)) % 2 == 0:
            k = f"{m.group(1)}{int(m.group(2)) // 2}.conv.{m.group(3)}"
        k = _BASICSR_UPCONV.sub(r"\1upsample\2.upsample_conv.", k)
        out[k] = v
    return out


def _strip_prefix(state, prefix, path):
    prefix = prefix.rstrip(".") + "."
    selected = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not selected:
        heads = sorted({k.split(".")[0] for k in state})
        raise ValueError(f"{path}: no keys start with {prefix!r}; the top-level names are {heads}")
    return selected


def read_state_dict(path, prefix=None):
    """Any supported checkpoint file -> {mmagic key: tensor} for one network.

    prefix picks the network inside the file (with or without the trailing dot): for mmagic files it
    defaults to "generator_ema." when present, else "generator."; "discriminator" etc. pick another part.
    For BasicSR files "params" or "params_ema" picks the part (default params_ema when present)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if _is_safetensors(path):
        import safetensors.torch
        state = safetensors.torch.load_file(path)
    else:
        obj = _torch_load(path)
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: expected a dict of tensors or a checkpoint dict, got {type(obj).__name__}")
        if isinstance(obj.get("state_dict"), dict):  # mmagic / mmediting
            state = obj["state_dict"]
            if prefix is None:
                prefix = next((p for p in ("generator_ema.", "generator.") if any(k.startswith(p) for k in state)),
                              None)
        elif isinstance(obj.get("params_ema"), dict) or isinstance(obj.get("params"), dict):  # BasicSR
            part = "params_ema" if isinstance(obj.get("params_ema"), dict) else "params"
            if prefix is not None and prefix.rstrip(".") in ("params", "params_ema"):
                part, prefix = prefix.rstrip("."), None
                if not isinstance(obj.get(part), dict):
                    raise ValueError(f"{path}: BasicSR checkpoint has no {part!r}")
            state = obj[part]
        else:
            state = obj
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise ValueError(f"{path}: not a state dict; non-tensor entries {bad[:5]}"
                             f"{f' and {len(bad) - 5} more' if len(bad) > 5 else ''}")
    if prefix is not None:
        state = _strip_prefix(state, prefix, path)
    return _from_basicsr_names(state)


def _few(keys, n=5):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else f" ({len(keys)})")


def load_weights(model, path, prefix=None):
    """Load any supported checkpoint into `model`, strictly: a missing, unexpected or mis-shaped key
    raises one ValueError naming the keys and the file. SPyNet's mean/std may be absent (they are
    constants). Returns the model."""
    state = read_state_dict(path, prefix)
    own = model.state_dict()
    constants = {f"{name}.{b}".lstrip(".") for name, m in model.named_modules() if isinstance(m, SPyNet)
                 for b in ("mean", "std")}
    missing = set(own) - set(state) - constants
    unexpected = set(state) - set(own)
    misshaped = [f"{k} (file {list(state[k].shape)}, model {list(own[k].shape)})"
                 for k in sorted(set(state) & set(own)) if state[k].shape != own[k].shape]
    if missing or unexpected or misshaped:
        problems = []
        if missing:
            problems.append(f"missing {_few(missing)}")
        if unexpected:
            problems.append(f"unexpected {_few(unexpected)}")
        if misshaped:
            problems.append(f"mis-shaped {_few(misshaped, 3)}")
        raise ValueError(f"{os.fspath(path)} does not fit {type(model).__name__}: " + "; ".join(problems))
    for k in constants - set(state):
        state[k] = own[k]
    model.load_state_dict(state, strict=True)
    return model


def save_weights(model_or_state_dict, path):
    """Write a module's state dict (or a dict of tensors) to `path` as safetensors, atomically:
    a temporary file in the same directory, fsync, then rename over `path`."""
    import safetensors.torch
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    # safetensors wants contiguous CPU tensors that share no storage
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    data = safetensors.torch.save(tensors, metadata={"format": "pt"})
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------------------
# Command line


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="BasicVSR / BasicVSR++ tools.",
        epilog="convert: python basicvsr.py --convert SRC DST [--prefix P]")
    convert = parser.add_argument_group("convert a checkpoint (mmagic/mmediting, BasicSR, plain .pth, safetensors) "
                                        "to our safetensors")
    convert.add_argument("--convert", nargs=2, metavar=("SRC", "DST"), help="checkpoint to read, safetensors to write")
    convert.add_argument("--prefix", default=None,
                         help="part of the file to take, e.g. generator, generator_ema, discriminator, params "
                              "(default: generator_ema, else generator; BasicSR: params_ema, else params)")
    args = parser.parse_args(argv)

    if args.convert:
        src, dst = args.convert
        state = read_state_dict(src, args.prefix)
        save_weights(state, dst)
        print(f"{src} -> {dst}: {len(state)} tensors, {sum(v.numel() for v in state.values()):,} values")
        return
    parser.error("nothing to do: pass --convert SRC DST")


if __name__ == "__main__":
    main()
