"""Test oracle: SPyNet, BasicVSRNet and BasicVSRPlusPlusNet in the reference implementation's own
structure (open-mmlab/mmagic: mmagic/models/editors/basicvsr/basicvsr_net.py,
basicvsr_plusplus_net/basicvsr_plusplus_net.py, mmagic/models/utils/flow_warp.py), written
independently of basicvsr.py.

It keeps the reference's shapes of computation: flows as (n, t-1, 2, h, w) tensors, the `feats`
dict with `mapping_idx` / `flow_idx`, flow_warp from a meshgrid + F.grid_sample on (n, h, w, 2)
flows, the mirror flag as module state set by check_if_mirror_extended, and the DCN as one
F.grid_sample per deform group (not kernels.deform_conv2d). Module trees carry the mmagic key
names, so `oracle.load_state_dict(model.state_dict())` works. No weight init: the tests load the
weights under test. No CPU cache (it never triggers on CPU in the reference either).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def flow_warp(x, flow, interpolation="bilinear", padding_mode="zeros", align_corners=True):
    """x (n, c, h, w), flow (n, h, w, 2) in pixels -> x sampled at p + flow(p)."""
    if x.size()[-2:] != flow.size()[1:3]:
        raise ValueError(
            f"flow_warp: x {tuple(x.shape)} and flow {tuple(flow.shape)} differ in size"
        )
    _, _, h, w = x.size()
    grid_y, grid_x = torch.meshgrid(
        torch.arange(0, h, device=x.device), torch.arange(0, w, device=x.device), indexing="ij"
    )
    grid = torch.stack((grid_x, grid_y), 2).type_as(x)  # (h, w, 2), x first
    grid_flow = grid + flow
    grid_flow_x = 2.0 * grid_flow[:, :, :, 0] / max(w - 1, 1) - 1.0
    grid_flow_y = 2.0 * grid_flow[:, :, :, 1] / max(h - 1, 1) - 1.0
    grid_flow = torch.stack((grid_flow_x, grid_flow_y), dim=3)
    return F.grid_sample(
        x, grid_flow, mode=interpolation, padding_mode=padding_mode, align_corners=align_corners
    )


def modulated_deform_conv2d(
    x, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups
):
    """DCNv2 with mmcv's layouts (offset channel g*2K + 2k + {0: dy, 1: dx}, mask g*K + k), by
    bilinear sampling each deform group's channels at all K taps with grid_sample (zero padding
    gives mmcv's "0 outside (-1, h) x (-1, w)"), masking, and a matmul. Stride/dilation 1,
    groups 1 only."""
    if stride != 1 or dilation != 1 or groups != 1:
        raise NotImplementedError("oracle DCN: stride 1, dilation 1, groups 1 only")
    n, c, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    G = deform_groups
    K = kh * kw
    ho, wo = h + 2 * padding - kh + 1, w + 2 * padding - kw + 1
    ky, kx = torch.meshgrid(
        torch.arange(kh, dtype=x.dtype), torch.arange(kw, dtype=x.dtype), indexing="ij"
    )
    off = offset.view(n, G, K, 2, ho, wo)
    py = (
        (torch.arange(ho, dtype=x.dtype) - padding).view(1, 1, 1, ho, 1)
        + ky.reshape(1, 1, K, 1, 1)
        + off[:, :, :, 0]
    )
    px = (
        (torch.arange(wo, dtype=x.dtype) - padding).view(1, 1, 1, 1, wo)
        + kx.reshape(1, 1, K, 1, 1)
        + off[:, :, :, 1]
    )
    grid = torch.stack((2.0 * px / max(w - 1, 1) - 1.0, 2.0 * py / max(h - 1, 1) - 1.0), dim=-1)
    sampled = F.grid_sample(
        x.reshape(n * G, c // G, h, w),
        grid.view(n * G, K * ho, wo, 2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=True,
    )  # (n*G, c/G, K*ho, wo)
    sampled = sampled.view(n, G, c // G, K, ho, wo) * mask.view(n, G, 1, K, ho, wo)
    columns = sampled.reshape(n, c * K, ho * wo)  # row (g*c/G + ci)*K + k = channel*K + k
    out = torch.matmul(weight.reshape(c_out, c * K), columns) + bias.view(1, c_out, 1)
    return out.view(n, c_out, ho, wo)


# ----------------------------------------------------------------------------------------
# Building blocks (mmagic sr_backbone / upsample / mmcv ConvModule)


class ResidualBlockNoBN(nn.Module):
    def __init__(self, mid_channels=64, res_scale=1.0):
        super().__init__()
        self.res_scale = res_scale
        self.conv1 = nn.Conv2d(mid_channels, mid_channels, 3, 1, 1, bias=True)
        self.conv2 = nn.Conv2d(mid_channels, mid_channels, 3, 1, 1, bias=True)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x
        out = self.conv2(self.relu(self.conv1(x)))
        return identity + out * self.res_scale


class ResidualBlocksWithInputConv(nn.Module):
    def __init__(self, in_channels, out_channels=64, num_blocks=30):
        super().__init__()
        main = [
            nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=True),
            nn.LeakyReLU(negative_slope=0.1, inplace=True),
        ]
        main.append(
            nn.Sequential(
                *[ResidualBlockNoBN(mid_channels=out_channels) for _ in range(num_blocks)]
            )
        )
        self.main = nn.Sequential(*main)

    def forward(self, feat):
        return self.main(feat)


class PixelShufflePack(nn.Module):
    def __init__(self, in_channels, out_channels, scale_factor, upsample_kernel):
        super().__init__()
        self.scale_factor = scale_factor
        self.upsample_conv = nn.Conv2d(
            in_channels,
            out_channels * scale_factor * scale_factor,
            upsample_kernel,
            padding=(upsample_kernel - 1) // 2,
        )

    def forward(self, x):
        return F.pixel_shuffle(self.upsample_conv(x), self.scale_factor)


class ConvModule(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, with_relu):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=True)
        self.activate = nn.ReLU(inplace=True) if with_relu else None

    def forward(self, x):
        x = self.conv(x)
        if self.activate is not None:
            x = self.activate(x)
        return x


# ----------------------------------------------------------------------------------------
# SPyNet


class SPyNetBasicModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.basic_module = nn.Sequential(
            ConvModule(8, 32, 7, 1, 3, True),
            ConvModule(32, 64, 7, 1, 3, True),
            ConvModule(64, 32, 7, 1, 3, True),
            ConvModule(32, 16, 7, 1, 3, True),
            ConvModule(16, 2, 7, 1, 3, False),
        )

    def forward(self, tensor_input):
        return self.basic_module(tensor_input)


class SPyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.basic_module = nn.ModuleList([SPyNetBasicModule() for _ in range(6)])
        self.register_buffer("mean", torch.Tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.Tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def compute_flow(self, ref, supp):
        n, _, h, w = ref.size()
        ref = [(ref - self.mean) / self.std]
        supp = [(supp - self.mean) / self.std]
        for _ in range(5):
            ref.append(
                F.avg_pool2d(input=ref[-1], kernel_size=2, stride=2, count_include_pad=False)
            )
            supp.append(
                F.avg_pool2d(input=supp[-1], kernel_size=2, stride=2, count_include_pad=False)
            )
        ref = ref[::-1]
        supp = supp[::-1]
        flow = ref[0].new_zeros(n, 2, h // 32, w // 32)
        for level in range(len(ref)):
            if level == 0:
                flow_up = flow
            else:
                flow_up = (
                    F.interpolate(input=flow, scale_factor=2, mode="bilinear", align_corners=True)
                    * 2.0
                )
            flow = flow_up + self.basic_module[level](
                torch.cat(
                    [
                        ref[level],
                        flow_warp(supp[level], flow_up.permute(0, 2, 3, 1), padding_mode="border"),
                        flow_up,
                    ],
                    1,
                )
            )
        return flow

    def forward(self, ref, supp):
        h, w = ref.shape[2:4]
        w_up = w if (w % 32) == 0 else 32 * (w // 32 + 1)
        h_up = h if (h % 32) == 0 else 32 * (h // 32 + 1)
        ref = F.interpolate(input=ref, size=(h_up, w_up), mode="bilinear", align_corners=False)
        supp = F.interpolate(input=supp, size=(h_up, w_up), mode="bilinear", align_corners=False)
        flow = F.interpolate(
            input=self.compute_flow(ref, supp), size=(h, w), mode="bilinear", align_corners=False
        )
        flow[:, 0, :, :] *= float(w) / float(w_up)
        flow[:, 1, :, :] *= float(h) / float(h_up)
        return flow


# ----------------------------------------------------------------------------------------
# BasicVSRNet


class BasicVSRNet(nn.Module):
    # scale=2 (the x2 models, not in mmagic): one pixel-shuffle stage to 64 channels, bilinear x2
    # skip
    def __init__(self, mid_channels=64, num_blocks=30, scale=4):
        super().__init__()
        self.mid_channels = mid_channels
        self.spynet = SPyNet()
        self.backward_resblocks = ResidualBlocksWithInputConv(
            mid_channels + 3, mid_channels, num_blocks
        )
        self.forward_resblocks = ResidualBlocksWithInputConv(
            mid_channels + 3, mid_channels, num_blocks
        )
        self.fusion = nn.Conv2d(mid_channels * 2, mid_channels, 1, 1, 0, bias=True)
        if scale == 4:
            self.upsample1 = PixelShufflePack(mid_channels, mid_channels, 2, upsample_kernel=3)
            self.upsample2 = PixelShufflePack(mid_channels, 64, 2, upsample_kernel=3)
        else:
            self.upsample1 = PixelShufflePack(mid_channels, 64, 2, upsample_kernel=3)
            self.upsample2 = nn.Identity()
        self.conv_hr = nn.Conv2d(64, 64, 3, 1, 1)
        self.conv_last = nn.Conv2d(64, 3, 3, 1, 1)
        self.img_upsample = nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=False)
        self.lrelu = nn.LeakyReLU(negative_slope=0.1, inplace=True)

    def check_if_mirror_extended(self, lrs):
        self.is_mirror_extended = False
        if lrs.size(1) % 2 == 0:
            lrs_1, lrs_2 = torch.chunk(lrs, 2, dim=1)
            if torch.norm(lrs_1 - lrs_2.flip(1)) == 0:
                self.is_mirror_extended = True

    def compute_flow(self, lrs):
        n, t, c, h, w = lrs.size()
        lrs_1 = lrs[:, :-1, :, :, :].reshape(-1, c, h, w)
        lrs_2 = lrs[:, 1:, :, :, :].reshape(-1, c, h, w)
        flows_backward = self.spynet(lrs_1, lrs_2).view(n, t - 1, 2, h, w)
        if self.is_mirror_extended:
            flows_forward = None
        else:
            flows_forward = self.spynet(lrs_2, lrs_1).view(n, t - 1, 2, h, w)
        return flows_forward, flows_backward

    def forward(self, lrs):
        n, t, c, h, w = lrs.size()
        self.check_if_mirror_extended(lrs)
        flows_forward, flows_backward = self.compute_flow(lrs)

        outputs = []
        feat_prop = lrs.new_zeros(n, self.mid_channels, h, w)
        for i in range(t - 1, -1, -1):
            if i < t - 1:
                flow = flows_backward[:, i, :, :, :]
                feat_prop = flow_warp(feat_prop, flow.permute(0, 2, 3, 1))
            feat_prop = torch.cat([lrs[:, i, :, :, :], feat_prop], dim=1)
            feat_prop = self.backward_resblocks(feat_prop)
            outputs.append(feat_prop)
        outputs = outputs[::-1]

        feat_prop = torch.zeros_like(feat_prop)
        for i in range(0, t):
            lr_curr = lrs[:, i, :, :, :]
            if i > 0:
                if flows_forward is not None:
                    flow = flows_forward[:, i - 1, :, :, :]
                else:
                    flow = flows_backward[:, -i, :, :, :]
                feat_prop = flow_warp(feat_prop, flow.permute(0, 2, 3, 1))
            feat_prop = torch.cat([lr_curr, feat_prop], dim=1)
            feat_prop = self.forward_resblocks(feat_prop)

            out = torch.cat([outputs[i], feat_prop], dim=1)
            out = self.lrelu(self.fusion(out))
            out = self.lrelu(self.upsample1(out))
            if not isinstance(self.upsample2, nn.Identity):
                out = self.lrelu(self.upsample2(out))
            out = self.lrelu(self.conv_hr(out))
            out = self.conv_last(out)
            base = self.img_upsample(lr_curr)
            out += base
            outputs[i] = out
        return torch.stack(outputs, dim=1)


# ----------------------------------------------------------------------------------------
# BasicVSRPlusPlusNet


class SecondOrderDeformableAlignment(nn.Module):
    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        padding,
        deform_groups,
        max_residue_magnitude=10,
    ):
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = 1, padding, 1, 1
        self.deform_groups = deform_groups
        self.max_residue_magnitude = max_residue_magnitude
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.conv_offset = nn.Sequential(
            nn.Conv2d(3 * out_channels + 4, out_channels, 3, 1, 1),
            nn.LeakyReLU(negative_slope=0.1, inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1),
            nn.LeakyReLU(negative_slope=0.1, inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1),
            nn.LeakyReLU(negative_slope=0.1, inplace=True),
            nn.Conv2d(out_channels, 27 * deform_groups, 3, 1, 1),
        )

    def forward(self, x, extra_feat, flow_1, flow_2):
        extra_feat = torch.cat([extra_feat, flow_1, flow_2], dim=1)
        out = self.conv_offset(extra_feat)
        o1, o2, mask = torch.chunk(out, 3, dim=1)

        offset = self.max_residue_magnitude * torch.tanh(torch.cat((o1, o2), dim=1))
        offset_1, offset_2 = torch.chunk(offset, 2, dim=1)
        offset_1 = offset_1 + flow_1.flip(1).repeat(1, offset_1.size(1) // 2, 1, 1)
        offset_2 = offset_2 + flow_2.flip(1).repeat(1, offset_2.size(1) // 2, 1, 1)
        offset = torch.cat([offset_1, offset_2], dim=1)
        mask = torch.sigmoid(mask)
        return modulated_deform_conv2d(
            x,
            offset,
            mask,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.deform_groups,
        )


class BasicVSRPlusPlusNet(nn.Module):
    def __init__(
        self,
        mid_channels=64,
        num_blocks=7,
        max_residue_magnitude=10,
        is_low_res_input=True,
        scale=4,
    ):
        super().__init__()
        self.mid_channels = mid_channels
        self.is_low_res_input = is_low_res_input
        self.spynet = SPyNet()
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
        self.deform_align = nn.ModuleDict()
        self.backbone = nn.ModuleDict()
        modules = ["backward_1", "forward_1", "backward_2", "forward_2"]
        for i, module in enumerate(modules):
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
        self.reconstruction = ResidualBlocksWithInputConv(5 * mid_channels, mid_channels, 5)
        self.upsample1 = PixelShufflePack(
            mid_channels, mid_channels if scale == 4 else 64, 2, upsample_kernel=3
        )
        self.upsample2 = (
            PixelShufflePack(mid_channels, 64, 2, upsample_kernel=3) if scale == 4 else None
        )
        self.conv_hr = nn.Conv2d(64, 64, 3, 1, 1)
        self.conv_last = nn.Conv2d(64, 3, 3, 1, 1)
        self.img_upsample = nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=False)
        self.lrelu = nn.LeakyReLU(negative_slope=0.1, inplace=True)
        self.is_mirror_extended = False

    # the same mirror test and batched flows as BasicVSR's
    check_if_mirror_extended = BasicVSRNet.check_if_mirror_extended
    compute_flow = BasicVSRNet.compute_flow

    def propagate(self, feats, flows, module_name):
        n, t, _, h, w = flows.size()
        frame_idx = list(range(0, t + 1))
        flow_idx = list(range(-1, t))
        mapping_idx = list(range(0, len(feats["spatial"])))
        mapping_idx += mapping_idx[::-1]
        if "backward" in module_name:
            frame_idx = frame_idx[::-1]
            flow_idx = frame_idx

        feat_prop = flows.new_zeros(n, self.mid_channels, h, w)
        for i, idx in enumerate(frame_idx):
            feat_current = feats["spatial"][mapping_idx[idx]]
            if i > 0:
                flow_n1 = flows[:, flow_idx[i], :, :, :]
                cond_n1 = flow_warp(feat_prop, flow_n1.permute(0, 2, 3, 1))
                feat_n2 = torch.zeros_like(feat_prop)
                flow_n2 = torch.zeros_like(flow_n1)
                cond_n2 = torch.zeros_like(cond_n1)
                if i > 1:
                    feat_n2 = feats[module_name][-2]
                    flow_n2 = flows[:, flow_idx[i - 1], :, :, :]
                    flow_n2 = flow_n1 + flow_warp(flow_n2, flow_n1.permute(0, 2, 3, 1))
                    cond_n2 = flow_warp(feat_n2, flow_n2.permute(0, 2, 3, 1))
                cond = torch.cat([cond_n1, feat_current, cond_n2], dim=1)
                feat_prop = torch.cat([feat_prop, feat_n2], dim=1)
                feat_prop = self.deform_align[module_name](feat_prop, cond, flow_n1, flow_n2)

            feat = (
                [feat_current]
                + [feats[k][idx] for k in feats if k not in ["spatial", module_name]]
                + [feat_prop]
            )
            feat = torch.cat(feat, dim=1)
            feat_prop = feat_prop + self.backbone[module_name](feat)
            feats[module_name].append(feat_prop)

        if "backward" in module_name:
            feats[module_name] = feats[module_name][::-1]
        return feats

    def upsample(self, lqs, feats):
        outputs = []
        mapping_idx = list(range(0, len(feats["spatial"])))
        mapping_idx += mapping_idx[::-1]
        for i in range(0, lqs.size(1)):
            hr = [feats[k].pop(0) for k in feats if k != "spatial"]
            hr.insert(0, feats["spatial"][mapping_idx[i]])
            hr = torch.cat(hr, dim=1)
            hr = self.reconstruction(hr)
            hr = self.lrelu(self.upsample1(hr))
            if self.upsample2 is not None:
                hr = self.lrelu(self.upsample2(hr))
            hr = self.lrelu(self.conv_hr(hr))
            hr = self.conv_last(hr)
            if self.is_low_res_input:
                hr += self.img_upsample(lqs[:, i, :, :, :])
            else:
                hr += lqs[:, i, :, :, :]
            outputs.append(hr)
        return torch.stack(outputs, dim=1)

    def forward(self, lqs):
        n, t, c, h, w = lqs.size()
        if self.is_low_res_input:
            lqs_downsample = lqs.clone()
        else:
            lqs_downsample = F.interpolate(
                lqs.view(-1, c, h, w), scale_factor=0.25, mode="bicubic"
            ).view(n, t, c, h // 4, w // 4)
        self.check_if_mirror_extended(lqs)

        feats = {}
        feats_ = self.feat_extract(lqs.view(-1, c, h, w))
        h, w = feats_.shape[2:]
        feats_ = feats_.view(n, t, -1, h, w)
        feats["spatial"] = [feats_[:, i, :, :, :] for i in range(0, t)]

        assert lqs_downsample.size(3) >= 64 and lqs_downsample.size(4) >= 64
        flows_forward, flows_backward = self.compute_flow(lqs_downsample)

        for iter_ in [1, 2]:
            for direction in ["backward", "forward"]:
                module = f"{direction}_{iter_}"
                feats[module] = []
                if direction == "backward":
                    flows = flows_backward
                elif flows_forward is not None:
                    flows = flows_forward
                else:
                    flows = flows_backward.flip(1)
                feats = self.propagate(feats, flows, module)
        return self.upsample(lqs, feats)
