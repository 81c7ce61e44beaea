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
import itertools
import math
import os
import pickle
import re
import sys

import numpy as np
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


def add_x4_head(net, mid_channels):
    """The x4 tail shared by BasicVSR and BasicVSR++: two pixel-shuffle x2 stages, conv_hr, conv_last,
    and the bilinear x4 image skip. The attribute names are the checkpoint keys; call it where the
    reference registers them, so the state_dict order matches the published files."""
    net.upsample1 = PixelShufflePack(mid_channels, mid_channels, 2, upsample_kernel=3)
    net.upsample2 = PixelShufflePack(mid_channels, 64, 2, upsample_kernel=3)
    net.conv_hr = nn.Conv2d(64, 64, 3, 1, 1)
    net.conv_last = nn.Conv2d(64, 3, 3, 1, 1)
    net.img_upsample = nn.Upsample(scale_factor=4, mode="bilinear", align_corners=False)
    net.lrelu = nn.LeakyReLU(negative_slope=0.1, inplace=True)


def x4_head(net, feat):
    """(n, C, h, w) features -> (n, 3, 4h, 4w) residual, before the image skip is added."""
    feat = net.lrelu(net.upsample1(feat))
    feat = net.lrelu(net.upsample2(feat))
    feat = net.lrelu(net.conv_hr(feat))
    return net.conv_last(feat)


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
        if ref.dim() != 4 or ref.shape[1] != 3 or ref.shape != supp.shape:
            raise ValueError(f"SPyNet: expected two (n, 3, h, w) images of one shape, got {tuple(ref.shape)} "
                             f"and {tuple(supp.shape)}")
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
        raise ValueError(f"{name}: input frames of {h}x{w} are too small, the minimum is {min_size}x{min_size}")
    return lqs.shape


def is_mirror_extended(lqs):
    """True if the clip is [x, reversed(x)]; its forward flows are then the backward ones reversed.
    Decided afresh for every call (BasicSR's flag never resets)."""
    t = lqs.shape[1]
    if t % 2:
        return False
    lqs_1, lqs_2 = torch.chunk(lqs, 2, dim=1)
    return torch.equal(lqs_1, lqs_2.flip(1))


class HostCache:
    """Per-frame maps of a long clip kept in pinned host memory instead of on the GPU (mmagic's
    cpu_cache, without its stalls). On CUDA every copy runs on a stream of its own, so copies overlap
    the convolutions: `put` sends a map down once the kernels that made it are done, and `upload`
    starts bringing maps back up a step before `wait` hands them to the compute stream.
    Disabled (the plain path), every call is the identity; on CPU tensors (force_cpu_cache, the tests)
    the bookkeeping runs with no-op copies."""

    def __init__(self, device, enabled):
        self.device, self.enabled = device, enabled
        self.stream = torch.cuda.Stream(device) if enabled and device.type == "cuda" else None

    def put(self, x):
        if self.stream is None:
            return x
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            host.copy_(x, non_blocking=True)
        x.record_stream(self.stream)  # x's memory is not reused before the copy has read it
        return host

    def upload(self, maps):
        """Starts copying `maps` (a list; None entries pass through) to the GPU; give the result to wait."""
        if self.stream is None:
            return maps, None
        with torch.cuda.stream(self.stream):
            maps = [None if x is None else x.to(self.device, non_blocking=True) for x in maps]
            done = torch.cuda.Event()
            done.record(self.stream)
        return maps, done

    def wait(self, uploaded):
        maps, done = uploaded
        if done is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(done)
            for x in maps:
                if x is not None:
                    x.record_stream(stream)  # allocated on the copy stream, used on this one
        return maps

    def synchronize(self):
        """Before the CPU reads what `put` returned."""
        if self.stream is not None:
            self.stream.synchronize()


def compute_flow(spynet, lqs, mirror, cache=None, chunk=None):
    """lqs (n, t, 3, h, w) -> (flows_forward, flows_backward), lists of t-1 flows (n, 2, h, w):
    flows_backward[k] goes from frame k to k+1, flows_forward[k] from frame k+1 to k.
    chunk: at most this many frame pairs per SPyNet call (bounds its activations); cache: a HostCache
    that keeps the flows."""
    n, t, c, h, w = lqs.shape
    if t == 1:
        return [], []
    chunk = chunk or t - 1

    def flows(ref, supp):  # (n, t-1, 3, h, w) each -> t-1 flows
        out = []
        for s in range(0, t - 1, chunk):
            r, p = ref[:, s:s + chunk], supp[:, s:s + chunk]
            f = spynet(r.reshape(-1, c, h, w), p.reshape(-1, c, h, w)).view(n, r.shape[1], 2, h, w)
            out += [f[:, i] if cache is None else cache.put(f[:, i]) for i in range(r.shape[1])]
        return out

    flows_backward = flows(lqs[:, :-1], lqs[:, 1:])
    # frame i of the mirrored clip is frame t-1-i
    flows_forward = flows_backward[::-1] if mirror else flows(lqs[:, 1:], lqs[:, :-1])
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
        add_x4_head(self, mid_channels)

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
            outputs.append(x4_head(self, out) + self.img_upsample(lr_curr))
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
        # out holds, per group and tap, the (dy, dx) offset residues (groups 0-7 around flow_1, 8-15
        # around flow_2), bounded by max_residue_magnitude * tanh, then the mask logits (sigmoid).
        # The kernel builds offsets and mask on the fly (kernels.flow_guided_offsets is the reference).
        return kernels.flow_guided_deform_conv2d(x, out, torch.cat([flow_1, flow_2], dim=1), self.weight, self.bias,
                                                 self.max_residue_magnitude, stride=1, padding=self.padding,
                                                 dilation=1, deform_groups=self.deform_groups)


class BasicVSRPlusPlus(nn.Module):
    """forward(lqs (n, t, 3, h, w)) -> (n, t, 3, 4h, 4w), or (n, t, 3, h, w) when is_low_res_input=False
    (then h, w are multiples of 4 and the network works at h/4 x w/4). The LR size must be >= 64x64.

    Long clips: when t > cpu_cache_length and the input is on a GPU, per-frame features and flows live
    in pinned CPU memory (HostCache) and only the maps a step needs are on the GPU, so GPU memory stays
    a few frames' worth; the output is then returned on the CPU. The copies run on their own stream,
    one step ahead, and features and flows are computed cpu_cache_chunk frames at a time. Setting
    cpu_cache_length = 0 takes that path for any clip; `force_cpu_cache = True` takes it for CPU
    inputs too (the copies are no-ops), which is how the tests exercise it.
    """

    def __init__(self, mid_channels=64, num_blocks=7, max_residue_magnitude=10, is_low_res_input=True,
                 cpu_cache_length=100):
        super().__init__()
        self.mid_channels = mid_channels
        self.is_low_res_input = is_low_res_input
        self.cpu_cache_length = cpu_cache_length
        self.cpu_cache_chunk = 8  # frames per feature-extraction / SPyNet call when caching
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
        add_x4_head(self, mid_channels)

    def propagate(self, feats, flows, module_name, cache):
        """Second-order grid propagation of one branch; appends its per-frame output to feats[module_name].

        feats: dict of per-frame feature lists (n, C, h, w), in temporal order;
        flows: t-1 flows; entry flow_idx[i] aligns the state of step i-1 to the frame of step i;
        cache: the HostCache that holds feats and flows.
        """
        t = len(feats["spatial"])
        frame_idx = list(range(t))
        flow_idx = list(range(-1, t - 1))
        if module_name.startswith("backward"):
            frame_idx = frame_idx[::-1]
            flow_idx = frame_idx
        earlier = [k for k in feats if k not in ("spatial", module_name)]

        def fetch(i):  # what step i reads: its frame's spatial and earlier-branch features, its two flows
            idx = frame_idx[i]
            return cache.upload([feats["spatial"][idx]] + [feats[k][idx] for k in earlier]
                                + [flows[flow_idx[i]] if i > 0 else None, flows[flow_idx[i - 1]] if i > 1 else None])

        pending = fetch(0)
        recent = []  # the outputs of the last two steps, kept on the device for the n-2 connection
        for i in range(t):
            feat_current, *feat_earlier, flow_n1, flow_prev = cache.wait(pending)
            if i + 1 < t:
                pending = fetch(i + 1)  # its copies overlap this step's convolutions
            if i == 0:
                feat_prop = torch.zeros_like(feat_current)
            else:  # align the state (n-1) and the output of two steps ago (n-2) to this frame
                cond_n1 = kernels.flow_warp(feat_prop, flow_n1)
                feat_n2 = torch.zeros_like(feat_prop)
                flow_n2 = torch.zeros_like(flow_n1)
                cond_n2 = torch.zeros_like(cond_n1)
                if i > 1:
                    feat_n2 = recent[0]
                    # compose n-2 -> n-1 -> n: flow_n2 = flow_n1 + flow(n-1 -> n-2) sampled at p + flow_n1
                    flow_n2 = flow_n1 + kernels.flow_warp(flow_prev, flow_n1)
                    cond_n2 = kernels.flow_warp(feat_n2, flow_n2)
                cond = torch.cat([cond_n1, feat_current, cond_n2], dim=1)
                feat_prop = self.deform_align[module_name](torch.cat([feat_prop, feat_n2], dim=1), cond,
                                                           flow_n1, flow_n2)

            # aggregate: this frame's spatial features, every earlier branch at this frame, the state
            feat = torch.cat([feat_current] + feat_earlier + [feat_prop], dim=1)
            feat_prop = feat_prop + self.backbone[module_name](feat)
            recent = recent[-1:] + [feat_prop]
            feats[module_name].append(cache.put(feat_prop))

        if module_name.startswith("backward"):
            feats[module_name] = feats[module_name][::-1]

    def upsample(self, lqs, feats, cache):
        """Reconstruct each frame from all branches, x4 by pixel shuffle, plus the upsampled input."""
        t = lqs.shape[1]

        def fetch(i):
            maps = cache.upload([feats[k][i] for k in feats])
            for k in feats:  # frame i's features are no longer needed once on their way
                feats[k][i] = None
            return maps

        pending = fetch(0)
        outputs = []
        for i in range(t):
            hr = torch.cat(cache.wait(pending), dim=1)  # (n, 5C, h, w)
            if i + 1 < t:
                pending = fetch(i + 1)
            hr = self.reconstruction(hr)
            hr = x4_head(self, hr)
            # the skip is bilinear x4 (not bicubic), as in the reference
            hr = hr + (self.img_upsample(lqs[:, i]) if self.is_low_res_input else lqs[:, i])
            outputs.append(cache.put(hr))
        cache.synchronize()  # the copies must land before the CPU reads them
        return torch.stack(outputs, dim=1)

    def forward(self, lqs):
        # SPyNet's flows need LR frames of at least 64x64 (the reference asserts it)
        n, t, c, h, w = check_video(lqs, "BasicVSRPlusPlus", min_size=64 if self.is_low_res_input else 256)
        cache = HostCache(lqs.device, t > self.cpu_cache_length and (lqs.is_cuda or self.force_cpu_cache))
        # all frames in one batch, as mmagic does, unless caching: then chunks bound the activations
        chunk = self.cpu_cache_chunk if cache.enabled else t

        if self.is_low_res_input:
            lqs_downsample = lqs
        else:
            if h % 4 or w % 4:
                raise ValueError(f"BasicVSRPlusPlus: with is_low_res_input=False the frame size must be a "
                                 f"multiple of 4, got {h}x{w}")
            lqs_downsample = F.interpolate(lqs.reshape(-1, c, h, w), scale_factor=0.25, mode="bicubic")
            lqs_downsample = lqs_downsample.view(n, t, c, h // 4, w // 4)

        # spatial features, one list entry per frame (n, C, h', w')
        feats = {"spatial": []}
        for s in range(0, t, chunk):
            feat = self.feat_extract(lqs[:, s:s + chunk].reshape(-1, c, h, w))
            feats["spatial"] += [cache.put(f) for f in feat.view(n, -1, *feat.shape[1:]).unbind(1)]

        flows_forward, flows_backward = compute_flow(self.spynet, lqs_downsample, is_mirror_extended(lqs),
                                                     cache if cache.enabled else None, chunk)

        for iter_ in [1, 2]:
            for direction in ["backward", "forward"]:
                module_name = f"{direction}_{iter_}"
                feats[module_name] = []
                flows = flows_backward if direction == "backward" else flows_forward
                self.propagate(feats, flows, module_name, cache)

        return self.upsample(lqs, feats, cache)


# ----------------------------------------------------------------------------------------
# torch.compile. A clip runs the same few modules once per frame and branch, so compiling those
# modules (not the whole network, whose Python loop depends on the clip length) fuses the
# pointwise glue between the convolutions (LeakyReLU, residual adds, the offsets' tanh, flow
# addition and sigmoid) and cuts per-op launch overhead. The custom ops of `kernels` are traced,
# not broken around.

COMPILED_MODULES = (ResidualBlocksWithInputConv, SecondOrderDeformableAlignment, SPyNetBasicModule, PixelShufflePack)


def compile_network(model, mode=None):
    """Compiles, in place, every per-frame module of `model` (BasicVSR, BasicVSR++, RealBasicVSR):
    the propagation, reconstruction and cleaning blocks, the deformable alignments, SPyNet's levels
    and the upsampling convolutions. Keys and weights are unchanged (nn.Module.compile). The first
    clip of each new frame size pays the compilation. mode: torch.compile's (None: the default;
    CUDA-graph modes do not suit the per-frame features kept across calls)."""
    # The compiled code is shared per module class; BasicVSR++ alone needs ~6 variants of
    # ResidualBlocksWithInputConv (input widths, depths) per dtype, more than dynamo's default limit
    # of 8 recompilations, past which it would silently run the rest eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for m in model.modules():
        if isinstance(m, COMPILED_MODULES):
            m.compile(mode=mode)
    return model


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
# Upscaling videos. The LR stream is cut into scenes where the mean grey-level difference of
# two consecutive thumbnails jumps; each scene into chunks of `chunk` frames, each run with
# up to `overlap` neighbouring frames on either side that warm the recurrence and whose
# outputs are dropped; each frame, optionally, into overlapping tiles blended with linear
# ramps. Peak memory depends on chunk and tile size, never on the length of the video.

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MIN_TILE = 64        # smaller tiles starve SPyNet's coarsest level (and BasicVSR++ refuses them)
MIN_CHUNK, MAX_CHUNK = 15, 60   # automatic chunk lengths: RealBasicVSR's training length .. diminishing returns
CPU_BUDGET = 4 << 30            # bytes the automatic settings aim for on CPU


def min_input_size(model):
    """Smallest LR height and width `model` accepts: 64 for BasicVSR++ (SPyNet), else 1."""
    for m in model.modules():
        if isinstance(m, BasicVSRPlusPlus):
            if not m.is_low_res_input:
                raise ValueError("upscale: BasicVSRPlusPlus(is_low_res_input=False) restores at the input size; "
                                 "upscale needs a x4 network")
            return 64
    return 1


def _precision_dtype(precision, device):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision fp16 needs a CUDA device, got {device}; on CPU use bf16 or fp32")
    if precision == "bf16" and device.type not in ("cuda", "cpu"):
        raise ValueError(f"precision bf16 runs on CUDA or CPU, got {device}")
    return PRECISIONS[precision]


# Peak memory of one run on a window of t frames of h x w LR pixels, an estimate:
#   t * h * w * (maps * C * b + 60)  +  h * w * K * b  +  parameters
# maps * C * b: the features each frame keeps until its reconstruction (BasicVSR++: the spatial
# map and four branches, maps = 5; BasicVSR: the backward branch, maps = 1), b bytes per value
# (4 for fp32, 2 under autocast); 60: flows, input and output frames. K: what one step needs
# on top, mostly the 64-channel x4 upsampling of one frame (K = 3300), and on CPU for BasicVSR++
# the sampling buffers of the reference DCN (K = 8300).
# Calibrated on CPU from the peak RSS of one forward pass (C = 64, 64x64 and 128x128 frames,
# t = 3..12, fp32 and bf16); it matches those runs within 20%. The CUDA figures are not
# measured: they assume the Triton DCN needs no such buffers, and the caching allocator adds
# slack, so the automatic settings keep 25% of the free GPU memory in reserve. BasicVSR++'s
# CPU offload (windows longer than cpu_cache_length on CUDA) makes this an overestimate.


def estimate_memory(model, t, h, w, precision="fp32", device="cuda"):
    """Estimated peak bytes of model(lqs) for lqs of shape (1, t, 3, h, w); see the note above."""
    b = 4 if PRECISIONS[precision] is None else 2
    net = next(m for m in model.modules() if isinstance(m, (BasicVSR, BasicVSRPlusPlus)))
    maps = 5 if isinstance(net, BasicVSRPlusPlus) else 1
    k = 8300 if maps == 5 and torch.device(device).type == "cpu" else 3300
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return t * h * w * (maps * net.mid_channels * b + 60) + h * w * k * b + params


def choose_settings(model, h, w, device, precision="fp32", chunk=None, overlap=4, tile=None):
    """Fill in chunk and tile for h x w frames; chunk None and tile None mean automatic, tile 0
    whole frames. Automatic: the longest chunk, up to MAX_CHUNK, that fits the memory budget with
    whole frames; if fewer than MIN_CHUNK (or the given chunk) fit, the largest tile, a multiple
    of 32, with which they do. Budget: 75% of the free GPU memory on CUDA, CPU_BUDGET elsewhere.
    Returns (chunk, tile or None, estimated peak bytes, budget bytes)."""
    if device.type == "cuda":
        budget = int(0.75 * torch.cuda.mem_get_info(device)[0])
    else:
        budget = CPU_BUDGET
    if tile is None:
        sizes = [None] + [s for s in range(max(h, w) // 32 * 32, MIN_TILE - 1, -32) if s < max(h, w)]
    else:
        sizes = [None if tile == 0 or tile >= max(h, w) else tile]

    def cost(t, size):
        th, tw = (h, w) if size is None else (min(h, size), min(w, size))
        return estimate_memory(model, t, th, tw, precision, device)

    for size in sizes:
        fixed, per_frame = cost(0, size), cost(1, size) - cost(0, size)  # linear in the window length
        fit = min(MAX_CHUNK, (budget - fixed) // per_frame - 2 * overlap)
        if fit >= (chunk or MIN_CHUNK):
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
        self.threshold, self.previous = threshold, None

    def __call__(self, frame):
        if not self.threshold:
            return False
        thumb = _grey_thumbnail(frame)
        cut = self.previous is not None and (thumb - self.previous).abs().mean().item() > self.threshold
        self.previous = thumb
        return cut


def plan_windows(frames, chunk, overlap, is_cut):
    """Group a stream of frames into model runs, yielding (window, first, last): a list of frames
    and the range window[first:last] whose outputs are kept. Every frame is kept exactly once.

    Within a scene, chunk [a, a+chunk) runs on [a-overlap, a+chunk+overlap) as soon as that
    many frames have arrived. The last chunk of a scene, of any length, reaches back so that its
    run still sees chunk + overlap frames where the scene has them. Windows never cross a cut."""
    buf, base, done = [], 0, 0   # frames still needed, scene index of buf[0], frames emitted

    def tail():
        end = base + len(buf)
        if done < end:
            start = max(0, min(done, end - chunk) - overlap)
            yield buf[start - base:], done - start, end - start

    for frame in frames:
        if is_cut(frame):
            yield from tail()
            buf, base, done = [], 0, 0
        buf.append(frame)
        if base + len(buf) - done >= chunk + overlap:
            start = max(0, done - overlap)
            yield buf[start - base:done + chunk + overlap - base], done - start, done + chunk - start
            done += chunk
            # the longest look-back is the last chunk's: chunk + overlap frames before the scene's end
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


def _run(model, lqs, dtype, frames_desc):
    with torch.autocast(lqs.device.type, dtype=dtype, enabled=dtype is not None):
        out = model(lqs)
    if not torch.isfinite(out).all():
        raise FloatingPointError(f"upscale: the network produced inf/NaN for {frames_desc}"
                                 + ("; try precision bf16 or fp32" if dtype == torch.float16 else ""))
    return out.float()


@torch.inference_mode()
def upscale_window(model, window, first, last, device, dtype, tile=None, tile_overlap=16):
    """Run `model` on a list of RGB uint8 (h, w, 3) frames and return the x4 outputs of
    window[first:last] as uint8 (last - first, 4h, 4w, 3) on the CPU, tiled if tile < h or w."""
    lqs = torch.from_numpy(np.stack(window)).to(device).permute(0, 3, 1, 2).float().div_(255)[None]
    t, _, h, w = lqs.shape[1:]
    desc = f"frames {first}..{last - 1} of a window of {t}"
    if tile is None or (tile >= h and tile >= w):
        out = _run(model, lqs, dtype, desc)[0, first:last]
    else:
        ys, xs = tile_starts(h, tile, tile_overlap), tile_starts(w, tile, tile_overlap)
        th, tw = min(tile, h), min(tile, w)
        out = torch.zeros(last - first, 3, 4 * h, 4 * w)
        weight_sum = torch.zeros(4 * h, 4 * w)
        for i, y in enumerate(ys):
            for j, x in enumerate(xs):
                patch = _run(model, lqs[..., y:y + th, x:x + tw], dtype, f"{desc}, tile at x={x}, y={y}")
                weight = _ramp(ys, th, i, 4)[:, None] * _ramp(xs, tw, j, 4)[None, :]
                out[..., 4 * y:4 * (y + th), 4 * x:4 * (x + tw)] += patch[0, first:last].cpu() * weight
                weight_sum[4 * y:4 * (y + th), 4 * x:4 * (x + tw)] += weight
        out /= weight_sum
    return out.clamp_(0, 1).mul_(255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu()


def upscale(model, frames, *, device=None, precision="fp32", chunk=None, overlap=4, tile=None, tile_overlap=16,
            scene_threshold=20.0, max_frames=None, progress=False):
    """Upscale a video x4, streaming: yields RGB uint8 (4h, 4w, 3) frames in order.

    model: BasicVSRPlusPlus, BasicVSR or RealBasicVSR (moved to `device`, set to eval).
    frames: an iterable of RGB uint8 (h, w, 3) frames, or a path (video file or frame folder,
        read with data.read_video). Frames are read as the chunks need them.
    device: default CUDA if available, else CPU. precision: fp32, bf16 or fp16 (CUDA only),
        through torch.autocast; a non-finite output raises FloatingPointError.
    chunk, overlap: frames per run, and context frames on each side whose outputs are dropped.
        Measured on a random BasicVSR with strengthened propagation (chunk 4, 12 frames), the
        output is 42.5, 46.8, 50.7, 56.9 dB from the whole clip's for overlap 0, 1, 2, 4.
    tile, tile_overlap: LR tile size (>= 64) and overlap in pixels; tiles are blended with ramps.
        chunk=None / tile=None pick settings from the frame size and the free memory
        (choose_settings); tile=0 forces whole frames.
    scene_threshold: mean grey-level difference (0-255) of 32x32 thumbnails that starts a new
        scene; no run crosses a cut. None or 0 disables.
    max_frames: stop after this many input frames. progress: print the settings and show a bar.
    """
    import tqdm
    import data  # the video reader pulls in cv2 and PyAV, which the networks do not need

    if isinstance(frames, (str, os.PathLike)):
        frames = data.read_video(frames)
    source = getattr(frames, "path", "frames")  # for messages
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"not a device: {device!r} (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: CUDA is not available")
    dtype = _precision_dtype(precision, device)
    for name, value, lo in [("chunk", chunk, 1), ("overlap", overlap, 0), ("tile", tile, 0),
                            ("tile_overlap", tile_overlap, 0), ("max_frames", max_frames, 1)]:
        if value is not None and (not isinstance(value, int) or value < lo):
            raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    if tile and tile < MIN_TILE:
        raise ValueError(f"tile must be at least {MIN_TILE} LR pixels, got {tile}")

    total = getattr(frames, "num_frames", None)
    stream = iter(frames) if max_frames is None else itertools.islice(frames, max_frames)
    first = next(stream, None)
    if first is None:
        raise ValueError(f"{source}: no frames to upscale")
    h, w = _check_frame(first, None, 0, source)
    min_size = min_input_size(model)
    if h < min_size or w < min_size:
        raise ValueError(f"{source}: frames of {w}x{h} are too small for {type(model).__name__}, which needs "
                         f"at least {min_size}x{min_size}")

    model = model.to(device).eval()
    chunk, tile, estimate, budget = choose_settings(model, h, w, device, precision, chunk, overlap, tile)
    if tile and 2 * tile_overlap > tile:
        raise ValueError(f"tile_overlap must be at most half the tile ({tile}), got {tile_overlap}")
    if progress:
        where = "free on " + str(device) if device.type == "cuda" else "CPU budget"
        print(f"upscale: {w}x{h} -> {4 * w}x{4 * h}, {type(model).__name__} on {device} ({precision}); "
              f"chunk {chunk} + {overlap} context frames each side; "
              f"{f'tiles of {tile} px, {tile_overlap} px overlap' if tile else 'whole frames'}; "
              f"scene cuts {f'at a grey-level change > {scene_threshold:g}' if scene_threshold else 'off'}; "
              f"estimated peak {estimate / 2**30:.2f} GiB "
              f"(budget {budget / 2**30:.1f} GiB {where})", file=sys.stderr)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def checked(stream):
        yield first
        for i, frame in enumerate(stream, 1):
            _check_frame(frame, (h, w), i, source)
            yield frame

    if total is not None and max_frames is not None:
        total = min(total, max_frames)
    bar = tqdm.tqdm(total=total, unit="frame", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for window, a, b in plan_windows(checked(stream), chunk, overlap, SceneCuts(scene_threshold)):
            out = upscale_window(model, window, a, b, device, dtype, tile, tile_overlap)
            for frame in out.numpy():
                yield frame
            bar.update(b - a)
    finally:
        bar.close()
    if progress and device.type == "cuda":
        print(f"upscale: peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB "
              f"(estimated {estimate / 2**30:.2f} GiB)", file=sys.stderr)


def _check_frame(frame, size, index, source):
    if not hasattr(frame, "dtype") or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"{source}: frame {index} is not RGB uint8 (h, w, 3): "
                         f"{getattr(frame, 'dtype', type(frame).__name__)} {getattr(frame, 'shape', '')}")
    if size is not None and frame.shape[:2] != size:
        raise ValueError(f"{source}: frame {index} is {frame.shape[1]}x{frame.shape[0]}, the first frame "
                         f"{size[1]}x{size[0]}; all frames must have the same size")
    return frame.shape[:2]


# ----------------------------------------------------------------------------------------
# Command line. `python basicvsr.py INPUT OUTPUT --weights FILE` upscales with BasicVSR++
# (--arch basicvsr: BasicVSR); `python basicvsr.py --convert SRC DST` converts a checkpoint.
# realbasicvsr.py's command line reuses add_upscale_args and run_upscale with its own network.

UPSCALE_ERRORS = (ValueError, OSError, FloatingPointError)


def add_upscale_args(parser):
    """INPUT, OUTPUT, --weights and the upscaling options; returns the "network" group, where a
    script adds its own architecture flags."""
    parser.add_argument("input", nargs="?", metavar="INPUT",
                        help="video file (.mp4 .mov .mkv .avi ...) or a folder of frames")
    parser.add_argument("output", nargs="?", metavar="OUTPUT",
                        help="video file (.mp4 .mkv .mov: H.264 crf 18, the input's fps) or a folder for PNG frames")
    parser.add_argument("--weights", metavar="FILE", help="checkpoint: mmagic/mmediting or BasicSR .pth, safetensors")
    net = parser.add_argument_group("network (default: the published architecture)")
    net.add_argument("--mid-channels", type=int, metavar="C", help="feature channels (published: 64)")
    net.add_argument("--num-blocks", type=int, metavar="B", help="residual blocks per propagation branch")
    run = parser.add_argument_group("memory and speed (by default chunk and tile fit the free memory)")
    run.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda if available, else cpu)")
    run.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                     help="autocast dtype; fp16 needs CUDA (default: fp32)")
    run.add_argument("--chunk", type=int, metavar="N", help="frames per run of the network")
    run.add_argument("--overlap", type=int, default=4, metavar="K",
                     help="context frames on each side of a chunk, run and then dropped (default: 4)")
    run.add_argument("--tile", type=int, metavar="T", help=f"LR tile size in pixels, >= {MIN_TILE}; 0: whole frames")
    run.add_argument("--tile-overlap", type=int, default=16, metavar="P",
                     help="LR pixels shared by neighbouring tiles, blended linearly (default: 16)")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the per-frame modules (compile_network); the first window is slower")
    run.add_argument("--channels-last", action="store_true",
                     help="run the network in channels-last (NHWC) memory format, native to cuDNN's bf16 convolutions")
    video = parser.add_argument_group("video")
    video.add_argument("--max-frames", type=int, metavar="N", help="upscale only the first N frames")
    video.add_argument("--scene-threshold", type=float, default=20.0, metavar="D",
                       help="mean grey-level change (0-255) between frames that restarts the recurrence; 0: off "
                            "(default: 20)")
    video.add_argument("--fps", type=float, help="output frame rate (default: the input's; 25 for frame folders)")
    video.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    video.add_argument("--no-audio", action="store_true",
                       help="leave out the input's audio (default: copied, or AAC where OUTPUT's container cannot "
                            "hold the codec; cut to the written video)")
    return net


def run_upscale(args, build_network):
    """The upscaling command: read args.input, build_network(args), load args.weights, write
    args.output. Returns the exit status; an expected failure prints one line `error: ...` and
    leaves nothing behind (the output is written under a temporary name, renamed at the end)."""
    import data
    try:
        if not args.weights:
            raise ValueError("--weights FILE is required")
        reader = data.read_video(args.input, fps=args.fps)
        if os.path.abspath(args.input) == os.path.abspath(args.output):
            raise ValueError(f"OUTPUT is the INPUT: {args.output}")
        audio_from = None if args.no_audio or os.path.isdir(args.input) else args.input
        with data.VideoWriter(args.output, reader.fps, overwrite=args.overwrite, audio_from=audio_from) as writer:
            reencoded = [codec for codec, mode in writer.audio if mode == "aac"]
            if reencoded:
                print(f"note: {os.path.basename(args.output)} cannot hold the {', '.join(reencoded)} audio of the "
                      f"input as it is: re-encoding it to AAC", file=sys.stderr)
            model = load_weights(build_network(args), args.weights)
            if args.channels_last:
                model = model.to(memory_format=torch.channels_last)
            if args.compile:
                compile_network(model)
            for frame in upscale(model, reader, device=args.device, precision=args.precision, chunk=args.chunk,
                                 overlap=args.overlap, tile=args.tile, tile_overlap=args.tile_overlap,
                                 scene_threshold=args.scene_threshold, max_frames=args.max_frames, progress=True):
                writer.write(frame)
        audio = "".join(f", {codec} audio {'copied' if mode == 'copy' else 'as AAC'}" for codec, mode in writer.audio)
        print(f"{args.output}: {writer.count} frames of {writer.size[1]}x{writer.size[0]} at {reader.fps:g} fps{audio}",
              file=sys.stderr)
        return 0
    except torch.OutOfMemoryError:
        print("error: out of GPU memory; pass a smaller --chunk or --tile, or --precision bf16/fp16", file=sys.stderr)
        return 1
    except UPSCALE_ERRORS as e:
        print("error: " + str(e).replace("\n", " "), file=sys.stderr)
        return 1


def _build_network(args):
    if args.arch == "basicvsr":
        return BasicVSR(args.mid_channels or 64, args.num_blocks or 30)
    return BasicVSRPlusPlus(args.mid_channels or 64, args.num_blocks or 7)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Upscale a video x4 with BasicVSR++ (or BasicVSR), or convert a checkpoint.",
        epilog="examples:\n"
               "  python basicvsr.py input.mp4 output.mp4 --weights basicvsr_plusplus_reds4.pth\n"
               "  python basicvsr.py frames/ out_frames/ --weights w.safetensors --arch basicvsr --tile 256\n"
               "  python basicvsr.py --convert SRC.pth DST.safetensors [--prefix generator_ema]",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    net = add_upscale_args(parser)
    net.add_argument("--arch", choices=["basicvsrpp", "basicvsr"], default="basicvsrpp",
                     help="BasicVSR++ (default) or BasicVSR")
    convert = parser.add_argument_group("convert a checkpoint (mmagic/mmediting, BasicSR, plain .pth, safetensors) "
                                        "to our safetensors")
    convert.add_argument("--convert", nargs=2, metavar=("SRC", "DST"), help="checkpoint to read, safetensors to write")
    convert.add_argument("--prefix", default=None,
                         help="part of the file to take, e.g. generator, generator_ema, discriminator, params "
                              "(default: generator_ema, else generator; BasicSR: params_ema, else params)")
    args = parser.parse_args(argv)

    if args.convert:
        src, dst = args.convert
        try:
            state = read_state_dict(src, args.prefix)
            save_weights(state, dst)
        except UPSCALE_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{src} -> {dst}: {len(state)} tensors, {sum(v.numel() for v in state.values()):,} values")
        return 0
    if not (args.input and args.output):
        parser.error("pass INPUT OUTPUT --weights FILE to upscale, or --convert SRC DST")
    return run_upscale(args, _build_network)


if __name__ == "__main__":
    sys.exit(main())
