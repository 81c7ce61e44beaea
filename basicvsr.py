"""BasicVSR and BasicVSR++ for x4 (or x2) video super-resolution, weight-compatible with mmagic.

  SPyNet            optical flow between two frames (Ranjan & Black, CVPR 2017), the flow
                    estimator of both networks
  BasicVSR          first-order bidirectional propagation (Chan et al., CVPR 2021); the SR part
                    of RealBasicVSR
  BasicVSRPlusPlus  second-order grid propagation with flow-guided deformable alignment
                    (Chan et al., CVPR 2022)
  compile_network   torch.compile of the modules every frame runs
  HostFrames        BasicVSR++'s per-frame lists in pinned host memory, for long clips

Videos are (n, t, 3, h, w) RGB in [0, 1]; flows are (n, 2, h, w) in pixels, channel 0 = dx,
channel 1 = dy. Module and parameter names are mmagic's, so `model.state_dict()` keys equal the
published checkpoints' (open-mmlab/mmagic: mmagic/models/editors/basicvsr_plusplus_net/
basicvsr_plusplus_net.py and basicvsr/basicvsr_net.py). The two irregular ops, flow warping and
modulated deformable convolution, come from `kernels`.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import kernels

# ----------------------------------------------------------------------------------------
# Export. torch.export (the ONNX export of export.py) traces one graph that must serve every
# clip and frame size, so while it traces, the networks take no branch on the frames' values or
# size: they compute both flows of a mirrored clip, and SPyNet resizes at every size.


def exporting():
    """Whether torch.export is tracing the network."""
    return torch.compiler.is_exporting()


# ----------------------------------------------------------------------------------------
# Building blocks


def default_init_weights(modules, scale=1.0):
    """Kaiming-normal (fan_in) weights scaled by `scale`, zero biases: mmagic's init for SR
    convolutions."""
    for m in modules:
        nn.init.kaiming_normal_(m.weight)
        m.weight.data.mul_(scale)
        if m.bias is not None:
            m.bias.data.zero_()


class ResidualBlockNoBN(nn.Module):
    """x + conv2(relu(conv1(x))), no batch norm (EDSR). The small init (x0.1) keeps a deep stack
    near the identity."""

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
        self.upsample_conv = nn.Conv2d(
            in_channels,
            out_channels * scale_factor * scale_factor,
            upsample_kernel,
            padding=(upsample_kernel - 1) // 2,
        )
        default_init_weights([self.upsample_conv], 1.0)

    def forward(self, x):
        return F.pixel_shuffle(self.upsample_conv(x), self.scale_factor)


def add_head(net, mid_channels, scale):
    """The upsampling tail shared by BasicVSR and BasicVSR++. x4 (the published one): two
    pixel-shuffle x2 stages, conv_hr, conv_last and the bilinear x4 image skip; x2: one
    pixel-shuffle x2 stage and a bilinear x2 skip, the other names unchanged. The attribute names
    are the checkpoint keys; call it where the reference registers them, so the state_dict order
    matches the published files."""
    if scale not in (2, 4):
        raise ValueError(f"{type(net).__name__}: scale must be 2 or 4, got {scale}")
    net.upsample1 = PixelShufflePack(
        mid_channels, mid_channels if scale == 4 else 64, 2, upsample_kernel=3
    )
    if scale == 4:
        net.upsample2 = PixelShufflePack(mid_channels, 64, 2, upsample_kernel=3)
    net.conv_hr = nn.Conv2d(64, 64, 3, 1, 1)
    net.conv_last = nn.Conv2d(64, 3, 3, 1, 1)
    net.img_upsample = nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=False)
    net.lrelu = nn.LeakyReLU(negative_slope=0.1, inplace=True)


def head(net, feat):
    """(n, C, h, w) features -> (n, 3, s*h, s*w) residual, before the image skip is added."""
    feat = net.lrelu(net.upsample1(feat))
    if hasattr(net, "upsample2"):
        feat = net.lrelu(net.upsample2(feat))
    feat = net.lrelu(net.conv_hr(feat))
    return net.conv_last(feat)


# ----------------------------------------------------------------------------------------
# SPyNet: a 6-level coarse-to-fine pyramid; each level refines the upsampled flow of the
# level below from [ref, supp warped by the current flow, current flow].


class ConvModule(nn.Module):
    """Conv2d (k7, bias) plus optional ReLU, with the conv at `.conv` as in mmcv's ConvModule
    (the keys need it)."""

    def __init__(self, in_channels, out_channels, act=True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 7, 1, 3, bias=True)
        self.act = nn.ReLU(inplace=True) if act else None
        # mmcv's default init
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv.bias)

    def forward(self, x):
        x = self.conv(x)
        return self.act(x) if self.act is not None else x


class SPyNetBasicModule(nn.Module):
    """One pyramid level: [ref(3), warped supp(3), flow(2)] -> flow residual (2)."""

    def __init__(self):
        super().__init__()
        self.basic_module = nn.Sequential(
            ConvModule(8, 32),
            ConvModule(32, 64),
            ConvModule(64, 32),
            ConvModule(32, 16),
            ConvModule(16, 2, act=False),
        )

    def forward(self, x):
        return self.basic_module(x)


class SPyNet(nn.Module):
    """forward(ref, supp) -> flow (n, 2, h, w) from ref to supp: flow_warp(supp, flow) is
    aligned to ref."""

    def __init__(self):
        super().__init__()
        self.basic_module = nn.ModuleList([SPyNetBasicModule() for _ in range(6)])
        # ImageNet statistics; persistent, so they are part of every mmagic state dict.
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def zero_flow_(self):
        """Untrained, SPyNet returns flows of ~10 px on 64x64 frames, so the alignment is noise;
        with each level's last conv zeroed it returns zero flow (an identity warp) until trained,
        and still learns (its gradients are not zero). For training without the pretrained
        weights."""
        for level in self.basic_module:
            nn.init.zeros_(level.basic_module[-1].conv.weight)
            nn.init.zeros_(level.basic_module[-1].conv.bias)
        return self

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
            else:  # twice the size, so twice the displacement (size=: simpler to export than
                # scale_factor=2)
                size = ref[level].shape[2:]
                flow_up = F.interpolate(flow, size=size, mode="bilinear", align_corners=True) * 2.0
            supp_warped = kernels.flow_warp(supp[level], flow_up, padding_mode="border")
            flow = flow_up + self.basic_module[level](
                torch.cat([ref[level], supp_warped, flow_up], dim=1)
            )
        return flow

    def forward(self, ref, supp):
        if ref.dim() != 4 or ref.shape[1] != 3 or ref.shape != supp.shape:
            raise ValueError(
                f"SPyNet: expected two (n, 3, h, w) images of one shape, got {tuple(ref.shape)} "
                f"and {tuple(supp.shape)}"
            )
        h, w = ref.shape[2:]
        # The pyramid halves the size 5 times: work at the next multiple of 32 (rounded up without
        # a negative floor division, which ONNX truncates).
        h_up = (h + 31) // 32 * 32
        w_up = (w + 31) // 32 * 32
        # an identity at multiples of 32; exported, the size is unknown, so always
        resize = exporting() or (h_up, w_up) != (h, w)
        if resize:
            ref = F.interpolate(ref, size=(h_up, w_up), mode="bilinear", align_corners=False)
            supp = F.interpolate(supp, size=(h_up, w_up), mode="bilinear", align_corners=False)
        flow = self.compute_flow(ref, supp)
        if resize:
            flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)
            flow = torch.cat([flow[:, :1] * (w / w_up), flow[:, 1:] * (h / h_up)], dim=1)
        return flow


# ----------------------------------------------------------------------------------------
# Shared by both networks: input checks, mirror detection, the flows of a clip.


def check_video(lqs, name, min_size=0):
    """(n, t, 3, h, w) or ValueError; `min_size` is the smallest h, w the network handles."""
    if lqs.dim() != 5 or lqs.shape[2] != 3:
        raise ValueError(f"{name}: expected a video (n, t, 3, h, w), got shape {tuple(lqs.shape)}")
    if lqs.shape[1] < 1:
        raise ValueError(f"{name}: the clip has no frames, shape {tuple(lqs.shape)}")
    h, w = lqs.shape[3:]
    if h < min_size or w < min_size:
        raise ValueError(
            f"{name}: input frames of {h}x{w} are too small, the minimum is {min_size}x{min_size}"
        )
    return lqs.shape


def is_mirror_extended(lqs):
    """True if the clip is [x, reversed(x)]; its forward flows are then the backward ones
    reversed. Decided afresh for every call (BasicSR's flag never resets). False while exporting:
    an exported network computes both flows, right for any clip."""
    t = lqs.shape[1]
    if t % 2 or exporting():
        return False
    lqs_1, lqs_2 = torch.chunk(lqs, 2, dim=1)
    return torch.equal(lqs_1, lqs_2.flip(1))


def compute_flow(spynet, lqs, mirror, frames=list, chunk=None):
    """lqs (n, t, 3, h, w) -> (flows_forward, flows_backward), lists of t-1 flows (n, 2, h, w):
    flows_backward[k] goes from frame k to k+1, flows_forward[k] from frame k+1 to k.
    mirror: the clip is mirrored (is_mirror_extended), so one SPyNet pass gives both directions;
    frames: the constructor of the lists (list, or host_frames' for BasicVSR++ on long clips);
    chunk: at most this many frame pairs per SPyNet call (bounds its activations)."""
    n, t, c, h, w = lqs.shape
    if t == 1:
        return frames(), frames()
    chunk = chunk or t - 1

    def flows(ref, supp):  # (n, t-1, 3, h, w) each -> t-1 flows
        out = frames()
        for s in range(0, t - 1, chunk):
            r = rearrange(ref[:, s : s + chunk], "n t c h w -> (n t) c h w")
            p = rearrange(supp[:, s : s + chunk], "n t c h w -> (n t) c h w")
            f = rearrange(spynet(r, p), "(n t) c h w -> n t c h w", n=n)
            for flow in f.unbind(1):
                out.append(flow)
        return out

    flows_backward = flows(lqs[:, :-1], lqs[:, 1:])
    # frame i of the mirrored clip is frame t-1-i
    flows_forward = flows_backward[::-1] if mirror else flows(lqs[:, 1:], lqs[:, :-1])
    return flows_forward, flows_backward


# ----------------------------------------------------------------------------------------
# BasicVSR: backward then forward propagation of a feature map, each step warping the
# previous state with the SPyNet flow; the two directions are fused and upsampled per frame.


class BasicVSR(nn.Module):
    """forward(lqs (n, t, 3, h, w)) -> (n, t, 3, s*h, s*w), s = scale (4, or 2). Any h, w >= 1
    works: SPyNet pads to 32."""

    def __init__(self, mid_channels=64, num_blocks=30, scale=4):
        super().__init__()
        # the constructor arguments, saved with the weights
        self.config = dict(mid_channels=mid_channels, num_blocks=num_blocks, scale=scale)
        self.scale = scale
        self.mid_channels = mid_channels
        self.spynet = SPyNet()
        self.backward_resblocks = ResidualBlocksWithInputConv(
            mid_channels + 3, mid_channels, num_blocks
        )
        self.forward_resblocks = ResidualBlocksWithInputConv(
            mid_channels + 3, mid_channels, num_blocks
        )
        self.fusion = nn.Conv2d(mid_channels * 2, mid_channels, 1, 1, 0, bias=True)
        add_head(self, mid_channels, scale)

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
            outputs.append(head(self, out) + self.img_upsample(lr_curr))
            feats_backward[i] = None
        return torch.stack(outputs, dim=1)


# ----------------------------------------------------------------------------------------
# BasicVSR++ (Chan et al., "BasicVSR++: Improving Video Super-Resolution with Enhanced
# Propagation and Alignment", CVPR 2022). Second-order grid propagation (Sec. 3.1): four
# branches, backward and forward twice, each aggregating the spatial features and every earlier
# branch, each step taking the state of frame n-1 and the output of frame n-2. Flow-guided
# deformable alignment (Sec. 3.2): the offsets are residuals around the flow, bounded by
# max_residue_magnitude * tanh, predicted from the flow-warped features; the DCN then samples the
# *unwarped* features of frames n-1 and n-2 (deform groups 0-7 and 8-15).


class SecondOrderDeformableAlignment(nn.Module):
    """DCNv2 (mmcv ModulatedDeformConv2d weights) whose offsets and mask come from conv_offset.

    forward(x (n, 2C, h, w), extra_feat (n, 3C, h, w), flow_1, flow_2 (n, 2, h, w)) -> (n, C, h, w)
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size=3,
        padding=1,
        deform_groups=16,
        max_residue_magnitude=10,
    ):
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
            # 9 taps x (dy, dx, mask) per group
            nn.Conv2d(out_channels, 27 * deform_groups, 3, 1, 1),
        )
        # mmcv's DCN init; a zero last layer makes the initial offsets the flow and the mask 0.5.
        stdv = 1.0 / (in_channels * kernel_size * kernel_size) ** 0.5
        nn.init.uniform_(self.weight, -stdv, stdv)
        nn.init.zeros_(self.bias)
        nn.init.zeros_(self.conv_offset[-1].weight)
        nn.init.zeros_(self.conv_offset[-1].bias)

    def forward(self, x, extra_feat, flow_1, flow_2):
        flows = torch.cat([flow_1, flow_2], dim=1)
        # The flows in the features' memory format: beside NCHW flows, channels-last features
        # would make the concatenation NCHW (torch.cat's rule for mixed layouts), which the first
        # convolution then copies back to channels-last.
        flows_like_feat = flows.contiguous(memory_format=kernels.memory_format(extra_feat))
        out = self.conv_offset(torch.cat([extra_feat, flows_like_feat], dim=1))
        # out holds, per group and tap, the (dy, dx) offset residues (groups 0-7 around flow_1,
        # 8-15 around flow_2), bounded by max_residue_magnitude * tanh, then the mask logits
        # (sigmoid). The kernel builds offsets and mask on the fly (kernels.flow_guided_offsets is
        # the reference).
        return kernels.flow_guided_deform_conv2d(
            x,
            out,
            flows,
            self.weight,
            self.bias,
            self.max_residue_magnitude,
            stride=1,
            padding=self.padding,
            dilation=1,
            deform_groups=self.deform_groups,
        )


class BasicVSRPlusPlus(nn.Module):
    """forward(lqs (n, t, 3, h, w)) -> (n, t, 3, s*h, s*w), s = scale (4, or 2), or
    (n, t, 3, h, w) when is_low_res_input=False (then h, w are multiples of 4 and the network
    works at h/4 x w/4). The LR size must be >= 64x64.

    Long clips (mmagic's cpu_cache): when t > cpu_cache_length, features and flows are computed
    cpu_cache_chunk frames at a time, and the per-frame lists are HostFrames: on a GPU the maps
    live in pinned host memory and only those a step reads are on the GPU, so GPU memory stays a
    few frames' worth; the output is returned on the CPU. cpu_cache_length = 0 takes this path
    for any clip (upscale.py --host-cache); on CPU its copies are the identity.
    """

    def __init__(
        self,
        mid_channels=64,
        num_blocks=7,
        max_residue_magnitude=10,
        is_low_res_input=True,
        cpu_cache_length=100,
        scale=4,
    ):
        super().__init__()
        # the constructor arguments the weights need, saved with them
        self.config = dict(
            mid_channels=mid_channels,
            num_blocks=num_blocks,
            max_residue_magnitude=max_residue_magnitude,
            is_low_res_input=is_low_res_input,
            scale=scale,
        )
        if not is_low_res_input and scale != 4:
            raise ValueError(
                "BasicVSRPlusPlus: is_low_res_input=False restores at the input size with the x4 "
                "head; scale must be 4"
            )
        self.scale = scale if is_low_res_input else 1  # output size / input size
        self.mid_channels = mid_channels
        self.is_low_res_input = is_low_res_input
        self.cpu_cache_length = cpu_cache_length
        self.cpu_cache_chunk = 8  # frames per feature-extraction and SPyNet call, long clips

        self.spynet = SPyNet()

        # per-frame features, at the LR size (HR input: two stride-2 convs first)
        if is_low_res_input:
            self.feat_extract = ResidualBlocksWithInputConv(3, mid_channels, 5)
        else:
            self.feat_extract = nn.Sequential(
                nn.Conv2d(3, mid_channels, 3, 2, 1),
                nn.LeakyReLU(negative_slope=0.1, inplace=True),
                nn.Conv2d(mid_channels, mid_channels, 3, 2, 1),
                nn.LeakyReLU(negative_slope=0.1, inplace=True),
                ResidualBlocksWithInputConv(mid_channels, mid_channels, 5),
            )

        # four propagation branches; branch k aggregates the spatial features and all earlier
        # branches
        self.deform_align = nn.ModuleDict()
        self.backbone = nn.ModuleDict()
        for i, module in enumerate(["backward_1", "forward_1", "backward_2", "forward_2"]):
            self.deform_align[module] = SecondOrderDeformableAlignment(
                2 * mid_channels,
                mid_channels,
                3,
                padding=1,
                deform_groups=16,
                max_residue_magnitude=max_residue_magnitude,
            )
            self.backbone[module] = ResidualBlocksWithInputConv(
                (2 + i) * mid_channels, mid_channels, num_blocks
            )

        # reconstruction from [spatial, backward_1, forward_1, backward_2, forward_2], then the head
        self.reconstruction = ResidualBlocksWithInputConv(5 * mid_channels, mid_channels, 5)
        add_head(self, mid_channels, scale)

    def propagate(self, feats, flows, module_name):
        """Second-order grid propagation (Sec. 3.1) of one branch: appends its output at every
        frame to feats[module_name], in temporal order.

        feats: dict of per-frame feature lists (n, C, h, w) in temporal order, one per branch so
        far and "spatial"; flows: the t-1 flows of this direction; flows[flow_idx[i]] aligns the
        state of step i-1 to the frame of step i.
        """
        t = len(feats["spatial"])
        frame_idx = list(range(t))
        flow_idx = list(range(-1, t - 1))
        if module_name.startswith("backward"):
            frame_idx = frame_idx[::-1]
            flow_idx = frame_idx
        # the grid: every earlier branch's output at this frame is aggregated too
        earlier = [k for k in feats if k not in ("spatial", module_name)]

        for i, idx in enumerate(frame_idx):
            feat_current = feats["spatial"][idx]
            if i == 0:
                feat_prop = torch.zeros_like(feat_current)
            else:  # align the state (n-1) and the output of two steps ago (n-2) to this frame
                flow_n1 = flows[flow_idx[i]]
                cond_n1 = kernels.flow_warp(feat_prop, flow_n1)
                feat_n2 = torch.zeros_like(feat_prop)
                flow_n2 = torch.zeros_like(flow_n1)
                cond_n2 = torch.zeros_like(cond_n1)
                if i > 1:
                    feat_n2 = feats[module_name][-2]
                    # n-2 -> n: flow_n1, plus the flow n-1 -> n-2 sampled where flow_n1 points
                    flow_n2 = flow_n1 + kernels.flow_warp(flows[flow_idx[i - 1]], flow_n1)
                    cond_n2 = kernels.flow_warp(feat_n2, flow_n2)
                # flow-guided deformable alignment (Sec. 3.2): the warped features condition the
                # offsets and masks, the DCN samples the unwarped ones
                cond = torch.cat([cond_n1, feat_current, cond_n2], dim=1)
                feat_prop = torch.cat([feat_prop, feat_n2], dim=1)
                feat_prop = self.deform_align[module_name](feat_prop, cond, flow_n1, flow_n2)

            # aggregate this frame's spatial features, every earlier branch and the state
            feat = [feat_current] + [feats[k][idx] for k in earlier] + [feat_prop]
            feat_prop = feat_prop + self.backbone[module_name](torch.cat(feat, dim=1))
            feats[module_name].append(feat_prop)

        if module_name.startswith("backward"):
            feats[module_name] = feats[module_name][::-1]

    def upsample(self, lqs, feats, frames=list):
        """Reconstruct each frame from all branches, upsample it by pixel shuffle and add the
        upsampled input. frames: the constructor of the output list (forward)."""
        outputs = frames()
        for i in range(lqs.shape[1]):
            # frame i's features leave the lists once used, as in mmagic
            hr = torch.cat([feats[k].pop(0) for k in feats], dim=1)  # (n, 5C, h, w)
            hr = self.reconstruction(hr)
            hr = head(self, hr)
            # the skip is bilinear (not bicubic), as in the reference
            hr = hr + (self.img_upsample(lqs[:, i]) if self.is_low_res_input else lqs[:, i])
            outputs.append(hr)
        # a long clip is returned from host memory: the GPU never holds all of it
        if isinstance(outputs, HostFrames):
            outputs = outputs.on_host()
        return torch.stack(outputs, dim=1)

    def forward(self, lqs):
        # SPyNet's flows need LR frames of at least 64x64 (the reference asserts it)
        n, t, c, h, w = check_video(
            lqs, "BasicVSRPlusPlus", min_size=64 if self.is_low_res_input else 256
        )
        # The per-frame lists: Python lists, or for a long clip lists in host memory, filled
        # cpu_cache_chunk frames per feature-extraction and SPyNet call to bound their
        # activations (otherwise all frames in one call, as in mmagic).
        frames = list
        chunk = t
        if t > self.cpu_cache_length:
            frames = host_frames(lqs.device)
            chunk = self.cpu_cache_chunk

        if self.is_low_res_input:
            lqs_downsample = lqs
        else:
            if h % 4 or w % 4:
                raise ValueError(
                    f"BasicVSRPlusPlus: with is_low_res_input=False the frame size must be a "
                    f"multiple of 4, got {h}x{w}"
                )
            lqs_downsample = F.interpolate(
                rearrange(lqs, "n t c h w -> (n t) c h w"), scale_factor=0.25, mode="bicubic"
            )
            lqs_downsample = rearrange(lqs_downsample, "(n t) c h w -> n t c h w", n=n)

        # spatial features, one list entry per frame (n, C, h', w')
        feats = {"spatial": frames()}
        for s in range(0, t, chunk):
            feat = self.feat_extract(rearrange(lqs[:, s : s + chunk], "n t c h w -> (n t) c h w"))
            for f in rearrange(feat, "(n t) c h w -> n t c h w", n=n).unbind(1):
                feats["spatial"].append(f)

        flows_forward, flows_backward = compute_flow(
            self.spynet, lqs_downsample, is_mirror_extended(lqs), frames, chunk
        )

        for iter_ in [1, 2]:
            for direction in ["backward", "forward"]:
                module_name = f"{direction}_{iter_}"
                feats[module_name] = frames()
                flows = flows_backward if direction == "backward" else flows_forward
                self.propagate(feats, flows, module_name)

        return self.upsample(lqs, feats, frames)


# ----------------------------------------------------------------------------------------
# torch.compile. A clip runs the same few modules once per frame and branch, so compiling those
# modules (not the whole network, whose Python loop depends on the clip length) fuses the
# pointwise glue between the convolutions (LeakyReLU, residual adds, the offsets' tanh, flow
# addition and sigmoid) and cuts per-op launch overhead. The custom ops of `kernels` are traced,
# not broken around.

COMPILED_MODULES = (
    ResidualBlocksWithInputConv,
    SecondOrderDeformableAlignment,
    SPyNetBasicModule,
    PixelShufflePack,
)


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
# Host memory for long clips (mmagic's cpu_cache, without its stalls). BasicVSR++ keeps four
# feature maps per frame and branch until the clip is reconstructed, which a long clip cannot
# fit on a GPU. Its lists then hold the maps in pinned host memory, and the propagation and
# reconstruction read them back one frame at a time, in an order these lists can follow: frame
# by frame, forward or backward, with a look back at the frame before (the flow of step n-1, the
# output of two steps ago).


def host_frames(device):
    """The constructor of BasicVSRPlusPlus.forward's lists for a long clip: HostFrames on
    `device` that share one copy stream."""
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    return lambda: HostFrames(device, stream)


class HostFrames:
    """A list of per-frame maps (n, C, h, w) held in pinned host memory, read back to `device`.

    append copies a map down; reading one (frames[i], frames.pop(0)) hands back a device copy.
    The copies run on `stream`, so they overlap the convolutions: a read that moves on to another
    frame starts uploading the next one in the direction the reads go (both neighbours while that
    is not known yet). The device keeps the maps next to the last read (a step looks back at the
    frame before), or the last two appended (the propagation reads back the output of two steps
    ago): a few maps, however long the list. On CPU (stream None) the copies are the identity.
    """

    def __init__(self, device, stream):
        self.device = device
        self.stream = stream
        self.host = []  # the maps in host memory, in list order
        self.resident = {}  # index -> [device map, event marking the end of its upload or None]
        self.position = None  # the index of the last read that moved on
        self.step = None  # +1 or -1, the direction of the reads, once known

    def __len__(self):
        return len(self.host)

    def append(self, x):
        if self.stream is None:
            host = x
        else:
            # the copy starts after the kernels that made x
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
                host.copy_(x, non_blocking=True)
            x.record_stream(self.stream)  # x's memory is not reused before the copy has read it
        self.host.append(host)
        last = len(self.host) - 1
        self.resident = {i: entry for i, entry in self.resident.items() if i >= last - 1}
        self.resident[last] = [x, None]

    def __getitem__(self, index):
        if isinstance(index, slice):  # the same maps in another order (a backward branch's list)
            kept = range(len(self.host))[index]
            out = HostFrames(self.device, self.stream)
            out.host = [self.host[i] for i in kept]
            out.resident = {j: self.resident[i] for j, i in enumerate(kept) if i in self.resident}
            return out
        index = range(len(self.host))[index]  # resolves negative indices, raises IndexError
        looks_back = self.step is not None and index == self.position - self.step
        if index != self.position and not looks_back:
            self.move_to(index)
        elif index not in self.resident:
            self.resident[index] = self.upload(index)
        return self.handed_over(self.resident[index])

    def move_to(self, index):
        """The reads move on to `index`: its map and its neighbours stay or come to the device,
        the next one in the direction of the reads on its way, the others go."""
        near = self.position is not None and abs(index - self.position) == 1
        self.step = index - self.position if near else None
        self.position = index
        self.resident = {i: e for i, e in self.resident.items() if abs(i - index) <= 1}
        if index not in self.resident:  # first, as it is needed first
            self.resident[index] = self.upload(index)
        for i in [index + self.step] if self.step else [index - 1, index + 1]:
            if 0 <= i < len(self.host) and i not in self.resident:
                self.resident[i] = self.upload(i)

    def pop(self, index):
        """Reads map `index` and removes it; the maps after it move up (upsample pops the front,
        and the next map is then on its way)."""
        x = self[index]
        index = range(len(self.host))[index]
        del self.host[index]
        self.resident = {i - (i > index): e for i, e in self.resident.items() if i != index}
        self.position = index - 1  # the map now at `index` is the next one on
        return x

    def upload(self, index):
        """Starts copying map `index` to the device: [device map, event marking the end]."""
        if self.stream is None:
            return [self.host[index], None]
        with torch.cuda.stream(self.stream):
            x = self.host[index].to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return [x, done]

    def handed_over(self, entry):
        """The device map of `entry`, safe to use on the current stream."""
        x, done = entry
        if done is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(done)
            x.record_stream(stream)  # allocated on the copy stream, used on this one
            entry[1] = None
        return x

    def on_host(self):
        """The maps in host memory, once every copy has landed."""
        if self.stream is not None:
            self.stream.synchronize()
        return list(self.host)
