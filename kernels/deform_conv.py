"""Modulated deformable convolution (DCNv2) with mmcv's layout and conventions.

x       (n, c_in, h, w)
offset  (n, G*2*K, ho, wo), channel g*2K + 2k + (0: dy, 1: dx), K = kh*kw, k = i*kw + j
mask    (n, G*K, ho, wo),   channel g*K + k
weight  (c_out, c_in, kh, kw); input channels split evenly over the G deform groups.
A sample not strictly inside (-1, h) x (-1, w) contributes 0 and gets no offset/mask gradient.
The conventions are those of open-mmlab/mmcv:
mmcv/ops/csrc/common/cuda/modulated_deform_conv_cuda_kernel.cuh (pytorch/vision:
torchvision/csrc/ops/cpu/deform_conv2d_kernel.cpp has the same layout and differs only in the
gradient of a sample at exactly -1).

The flow-guided variant (BasicVSR++'s second-order alignment) builds offset and mask inside the
kernel from the raw output of the offset branch, instead of ~10 elementwise passes before it:
conv_offset (n, 3*G*K, ho, wo): channels [0, 2GK) offset logits in the offset layout above,
                                [2GK, 3GK) mask logits in the mask layout above
flows       (n, 2F, ho, wo): F flows, each (dx, dy) in pixels; deform group g uses flow g // (G/F)
offset = max_residue_magnitude * tanh(offset logits) + the group's flow as (dy, dx)
mask   = sigmoid(mask logits)

Layouts: the output takes x's memory format (kernels.common.memory_format: channels-last x,
channels-last output), on both paths; offset, mask, conv_offset and flows are read in whatever
strides they come.
"""

import contextlib

import torch
import triton
import triton.language as tl
from torch.nn.modules.utils import _pair

from .common import INTERPRET as _INTERPRET
from .common import autocast_inputs, memory_format, use_cpu_path, use_triton
from .cpu import deform_conv2d_by_rows, deform_conv2d_cpu


def _conv_size(x, weight, bias, stride, padding, dilation, deform_groups, op):
    """(ho, wo) after checking x, weight and bias; op names the function in the messages."""
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(
            f"{op}: x and weight must be 4-d, got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    n, c_in, h, w = x.shape
    c_out, c_w, kh, kw = weight.shape
    if c_w != c_in:
        raise ValueError(
            f"{op}: weight expects {c_w} input channels, x has {c_in} (groups must be 1)"
        )
    if deform_groups < 1 or c_in % deform_groups:
        raise ValueError(
            f"{op}: {c_in} input channels do not split into {deform_groups} deform groups"
        )
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"{op}: input {h}x{w} is too small for kernel {kh}x{kw} with this padding")
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"{op}: bias must be ({c_out},), got {tuple(bias.shape)}")
    return ho, wo


def _check(x, offset, mask, weight, bias, stride, padding, dilation, deform_groups):
    ho, wo = _conv_size(x, weight, bias, stride, padding, dilation, deform_groups, "deform_conv2d")
    n, K = x.shape[0], weight.shape[2] * weight.shape[3]
    if tuple(offset.shape) != (n, deform_groups * 2 * K, ho, wo):
        raise ValueError(
            f"deform_conv2d: offset must be {(n, deform_groups * 2 * K, ho, wo)}, "
            f"got {tuple(offset.shape)}"
        )
    if tuple(mask.shape) != (n, deform_groups * K, ho, wo):
        raise ValueError(
            f"deform_conv2d: mask must be {(n, deform_groups * K, ho, wo)}, got {tuple(mask.shape)}"
        )
    return ho, wo


def _check_glue(conv_offset, flows, deform_groups, taps, op, size=None):
    """Checks conv_offset (n, 3GK, ho, wo) and flows (n, 2F, ho, wo), (n, ho, wo) = size or
    conv_offset's; returns F."""
    if conv_offset.dim() != 4 or flows.dim() != 4:
        raise ValueError(
            f"{op}: conv_offset and flows must be 4-d, "
            f"got {tuple(conv_offset.shape)} and {tuple(flows.shape)}"
        )
    if deform_groups < 1 or taps < 1:
        raise ValueError(
            f"{op}: deform_groups and taps must be >= 1, got {deform_groups} and {taps}"
        )
    G, K = deform_groups, taps
    n, ho, wo = size if size is not None else (conv_offset.shape[0], *conv_offset.shape[2:])
    if conv_offset.shape[1] != 3 * G * K:
        raise ValueError(
            f"{op}: conv_offset must have 3 * deform_groups * taps = {3 * G * K} channels "
            f"(offset logits, then mask logits), got {conv_offset.shape[1]}"
        )
    if tuple(conv_offset.shape) != (n, 3 * G * K, ho, wo):
        raise ValueError(
            f"{op}: conv_offset must be {(n, 3 * G * K, ho, wo)}, got {tuple(conv_offset.shape)}"
        )
    c = flows.shape[1]
    if c < 2 or c % 2 or G % (c // 2):
        raise ValueError(
            f"{op}: flows must have 2 channels (dx, dy) per flow and deform_groups ({G}) must be "
            f"a multiple of the number of flows, got {c} channels"
        )
    if tuple(flows.shape) != (n, c, ho, wo):
        raise ValueError(f"{op}: flows must be {(n, c, ho, wo)}, got {tuple(flows.shape)}")
    return c // 2


# ----------------------------------------------------------------------------------------
# PyTorch reference: the test oracle of both the Triton kernel and the CPU path (kernels.cpu),
# and what backend="torch" runs. It builds the whole im2col matrix at once.


def deform_conv2d_reference(
    x, offset, mask, weight, bias=None, stride=1, padding=0, dilation=1, deform_groups=1
):
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    ho, wo = _check(x, offset, mask, weight, bias, stride, padding, dilation, deform_groups)
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    G, K, cg = deform_groups, kh * kw, c_in // deform_groups
    dev = x.device
    acc = torch.promote_types(x.dtype, torch.float32)  # fp32 positions and sums; fp64 for gradcheck

    # Sampling positions in fp32: (n, G, K, ho, wo).
    base_y = (torch.arange(ho, device=dev) * stride[0] - padding[0]).to(acc)
    base_x = (torch.arange(wo, device=dev) * stride[1] - padding[1]).to(acc)
    tap_y = (
        (torch.arange(kh, device=dev) * dilation[0]).to(acc).repeat_interleave(kw)
    )  # k = i*kw + j
    tap_x = (torch.arange(kw, device=dev) * dilation[1]).to(acc).repeat(kh)
    off = offset.to(acc).view(n, G, K, 2, ho, wo)
    py = base_y.view(1, 1, 1, ho, 1) + tap_y.view(1, 1, K, 1, 1) + off[:, :, :, 0]
    px = base_x.view(1, 1, 1, 1, wo) + tap_x.view(1, 1, K, 1, 1) + off[:, :, :, 1]

    inside = (py > -1) & (px > -1) & (py < h) & (px < w)
    # Park the rest (NaN, inf, huge) at -2, where every corner is outside: floor() and long()
    # stay defined and their gradients are 0 rather than NaN.
    py, px = torch.where(inside, py, -2.0), torch.where(inside, px, -2.0)
    y0, x0 = torch.floor(py), torch.floor(px)
    ly, lx = py - y0, px - x0
    y0, x0 = y0.long(), x0.long()

    xg = x.reshape(n, G, cg, h * w).to(acc)
    cols = x.new_zeros((n, G, cg, K * ho * wo), dtype=acc)
    for dy, dx, wt in (
        (0, 0, (1 - ly) * (1 - lx)),
        (0, 1, (1 - ly) * lx),
        (1, 0, ly * (1 - lx)),
        (1, 1, ly * lx),
    ):
        yc, xc = y0 + dy, x0 + dx
        ok = inside & (yc >= 0) & (yc < h) & (xc >= 0) & (xc < w)
        idx = (yc.clamp(0, h - 1) * w + xc.clamp(0, w - 1)).view(n, G, 1, -1).expand(n, G, cg, -1)
        wt = torch.where(ok, wt, torch.zeros_like(wt)).view(n, G, 1, -1)
        cols = cols + torch.gather(xg, 3, idx) * wt
    m = torch.where(inside, mask.to(acc).view(n, G, K, ho, wo), torch.zeros_like(py))
    cols = cols * m.view(n, G, 1, -1)

    # Row index c*K + k matches weight.flatten(1).
    cols = cols.view(n, c_in * K, ho * wo).to(x.dtype)
    out = weight.reshape(c_out, c_in * K).to(x.dtype) @ cols
    if bias is not None:
        out = out + bias.to(out.dtype).view(1, c_out, 1)
    return out.view(n, c_out, ho, wo).contiguous(memory_format=memory_format(x))


# The flow-guided glue in PyTorch: the reference path's first half, and the backward's chain rule.


def _add_flows(residue, flows, deform_groups):
    """residue (n, 2GK, h, w) + each group's flow, flipped from (dx, dy) to (dy, dx)."""
    n, _, h, w = residue.shape
    F = flows.shape[1] // 2
    flow_yx = flows.to(residue.dtype).view(n, F, 1, 1, 2, h, w).flip(4)
    return (residue.view(n, F, deform_groups // F, -1, 2, h, w) + flow_yx).view(n, -1, h, w)


def flow_guided_offsets(conv_offset, flows, max_residue_magnitude, deform_groups, taps):
    """BasicVSR++'s offsets and mask from the offset branch's raw output (layouts in the module
    docstring): offset (n, 2GK, h, w) = max_residue_magnitude * tanh(logits) + flows,
    mask (n, GK, h, w) = sigmoid(logits). Computed in fp32 (fp64 stays fp64)."""
    _check_glue(conv_offset, flows, deform_groups, taps, "flow_guided_offsets")
    _, offset, mask = _glue(conv_offset, flows, max_residue_magnitude, deform_groups, taps)
    return offset, mask


def _glue(conv_offset, flows, max_residue_magnitude, deform_groups, taps):
    """(tanh of the offset logits, offset, mask), unchecked; the backward needs the tanh too."""
    acc = torch.promote_types(torch.promote_types(conv_offset.dtype, flows.dtype), torch.float32)
    logits = conv_offset.to(acc)
    split = 2 * deform_groups * taps
    t = torch.tanh(logits[:, :split])
    return (
        t,
        _add_flows(max_residue_magnitude * t, flows, deform_groups),
        torch.sigmoid(logits[:, split:]),
    )


# ----------------------------------------------------------------------------------------
# Triton kernels. Layouts inside: x channels-last (n, h, w, c_in) so that one corner of one
# deform group is a contiguous channel vector; weight reordered once to (K, c_in, c_out);
# offset, mask, flows, out and grad_out through their strides (S<tensor>_<dim>): NCHW, a tile of
# output pixels reads and writes contiguous rows; channels-last, the [pixels, c_out] output tile
# writes contiguous channel runs.
# A channel chunk is a [GPB groups, CPB channels] block, flattened to GPB*CPB >= 16 columns
# for tl.dot. CPB is the group width padded to a power of two, so groups narrower than 16
# channels share a chunk (the forward cuts groups wider than 32 into 32-channel slices);
# padded columns are masked to zero on both sides of the dot.


# INTERP_BF16 works around two bf16 gaps of Triton's CPU interpreter, so that the CPU tests see
# GPU numerics: it multiplies bf16 tiles as their raw uint16 bits (converting to fp32 first is
# exact), and it truncates fp32 -> bf16 where a GPU rounds to nearest even.


@triton.jit
def _mma(a, b, acc, PREC: tl.constexpr, INTERP_BF16: tl.constexpr):
    if INTERP_BF16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _cast(v, dtype: tl.constexpr, INTERP_BF16: tl.constexpr):
    if INTERP_BF16:
        if dtype == tl.bfloat16:
            u = v.to(tl.uint32, bitcast=True)
            u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16  # round to nearest even
            v = u.to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def _tanh(v):
    """fp32 tanh from exp(-2|v|), which cannot overflow: exactly +-1 for large |v|, NaN for NaN.
    A Taylor polynomial below |v| = 1/4, where 1 - exp(-2|v|) would cancel."""
    a = tl.abs(v)
    e = tl.exp(-2.0 * a)
    s = tl.minimum(a, 0.25)  # keeps s * s finite on the other branch
    s2 = s * s
    small = s * (
        1.0 + s2 * (-1.0 / 3.0 + s2 * (2.0 / 15.0 + s2 * (-17.0 / 315.0 + s2 * (62.0 / 2835.0))))
    )
    t = tl.where(a < 0.25, small, (1.0 - e) / (1.0 + e))
    return tl.where(v < 0.0, -t, t)


@triton.jit
def _sigmoid(v):
    """fp32 sigmoid from exp(-|v|), which cannot overflow; NaN for NaN."""
    e = tl.exp(-tl.abs(v))
    return tl.where(v >= 0.0, 1.0, e) / (1.0 + e)


@triton.jit
def _at(ptr, b, chan, oy, ox, S_N, S_C, S_H, S_W):
    """[BP, GPB] pointers to channels chan [GPB] of pixels (oy, ox) [BP] of image b, with int64
    offsets."""
    pix = oy.to(tl.int64) * S_H + ox.to(tl.int64) * S_W
    return ptr + (b.to(tl.int64) * S_N + chan.to(tl.int64) * S_C)[None, :] + pix[:, None]


@triton.jit
def _taps(
    off_ptr,
    msk_ptr,
    flow_ptr,
    MAG,
    GPF,
    b,
    g,
    g_ok,
    k,
    oy,
    ox,
    p_ok,
    H,
    W,
    G,
    SO_N,
    SO_C,
    SO_H,
    SO_W,
    SM_N,
    SM_C,
    SM_H,
    SM_W,
    SF_N,
    SF_C,
    SF_H,
    SF_W,
    SH,
    SW,
    PH,
    PW,
    DH,
    DW,
    KH: tl.constexpr,
    KW: tl.constexpr,
    FUSED: tl.constexpr,
):
    """Sampling position of tap k for a tile of pixels [BP] and a block of groups [GPB]:
    floor corner (y0, x0), fractions (ly, lx), mask m (0 outside the guard), inside.
    Computed once per (pixel, group, tap) and broadcast over the group's channels.
    SO_*, SM_*, SF_*: strides of off, msk and flow.
    FUSED: off_ptr is conv_offset (offset logits, then mask logits; msk_ptr and SM_* unused) and
    flow_ptr the flows, GPF groups per flow; offset and mask are built here in fp32 (see the module
    docstring)."""
    K: tl.constexpr = KH * KW
    ok = p_ok[:, None] & g_ok[None, :]
    if FUSED:
        lg_at = _at(off_ptr, b, g * (2 * K) + 2 * k, oy, ox, SO_N, SO_C, SO_H, SO_W)
        dy = MAG * _tanh(tl.load(lg_at, mask=ok, other=0.0).to(tl.float32))
        dx = MAG * _tanh(tl.load(lg_at + SO_C, mask=ok, other=0.0).to(tl.float32))
        m_at = _at(off_ptr, b, 2 * K * G + g * K + k, oy, ox, SO_N, SO_C, SO_H, SO_W)
        m = _sigmoid(tl.load(m_at, mask=ok, other=0.0).to(tl.float32))
        fl_at = _at(flow_ptr, b, (g // GPF) * 2, oy, ox, SF_N, SF_C, SF_H, SF_W)
        dx += tl.load(fl_at, mask=ok, other=0.0).to(tl.float32)
        dy += tl.load(fl_at + SF_C, mask=ok, other=0.0).to(tl.float32)
    else:
        off_at = _at(off_ptr, b, g * (2 * K) + 2 * k, oy, ox, SO_N, SO_C, SO_H, SO_W)
        dy = tl.load(off_at, mask=ok, other=0.0).to(tl.float32)
        dx = tl.load(off_at + SO_C, mask=ok, other=0.0).to(tl.float32)
        m_at = _at(msk_ptr, b, g * K + k, oy, ox, SM_N, SM_C, SM_H, SM_W)
        m = tl.load(m_at, mask=ok, other=0.0).to(tl.float32)
    # Positions in fp32 whatever the data dtype.
    py = (oy * SH - PH + (k // KW) * DH).to(tl.float32)[:, None] + dy
    px = (ox * SW - PW + (k % KW) * DW).to(tl.float32)[:, None] + dx
    # mmcv's guard; NaN fails every comparison, so non-finite positions are outside too.
    inside = ok & (py > -1.0) & (px > -1.0) & (py < H) & (px < W)
    # Park outside positions at -2 so the float->int conversion below is always defined.
    py = tl.where(inside, py, -2.0)
    px = tl.where(inside, px, -2.0)
    y0f = tl.floor(py)
    x0f = tl.floor(px)
    m = tl.where(inside, m, 0.0)
    return y0f.to(tl.int32), x0f.to(tl.int32), py - y0f, px - x0f, m, inside


@triton.jit
def _corner(y, x, ok, H, W, C_IN):
    """Offset (int64, before adding the channel) of pixel (y, x) in a channels-last image, and
    whether it lies inside; indices are clamped so even masked-off lanes point in bounds."""
    valid = ok & (y >= 0) & (y < H) & (x >= 0) & (x < W)
    yc = tl.minimum(tl.maximum(y, 0), H - 1)
    xc = tl.minimum(tl.maximum(x, 0), W - 1)
    return (yc * W + xc).to(tl.int64) * C_IN, valid


@triton.jit
def _dcn_fwd_kernel(
    x_ptr,
    off_ptr,
    msk_ptr,
    flow_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    H,
    W,
    HO,
    WO,
    C_IN,
    C_OUT,
    G,
    TILES_W,
    SH,
    SW,
    PH,
    PW,
    DH,
    DW,
    MAG,
    GPF,
    SO_N,
    SO_C,
    SO_H,
    SO_W,
    SM_N,
    SM_C,
    SM_H,
    SM_W,
    SF_N,
    SF_C,
    SF_H,
    SF_W,
    SY_N,
    SY_C,
    SY_H,
    SY_W,
    CG: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
    GPB: tl.constexpr,
    CPB: tl.constexpr,
    BLOCK_CO: tl.constexpr,
    PREC: tl.constexpr,
    INTERP_BF16: tl.constexpr,
    FUSED: tl.constexpr,
):
    """One program: a TILE_H x TILE_W tile of output pixels x BLOCK_CO output channels of one image.
    out[p, co] = sum over taps k and channels c of sample[p, k, c] * w[k, c, co] (implicit GEMM).
    FUSED: the flow-guided variant (see _taps); flow_ptr, MAG and GPF are unused otherwise.
    SY_*: the output's strides; the others as in _taps."""
    BP: tl.constexpr = TILE_H * TILE_W
    CHUNK: tl.constexpr = GPB * CPB
    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    co = tl.program_id(2) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = co < C_OUT
    r = tl.arange(0, BP)
    oy = (pid_t // TILES_W) * TILE_H + r // TILE_W
    ox = (pid_t % TILES_W) * TILE_W + r % TILE_W
    p_ok = (oy < HO) & (ox < WO)
    xb = x_ptr + b.to(tl.int64) * H * W * C_IN
    gi = tl.arange(0, GPB)
    ci = tl.arange(0, CPB)

    acc = tl.zeros((BP, BLOCK_CO), dtype=tl.float32)
    for g0 in range(0, G, GPB):
        g = g0 + gi
        g_ok = g < G
        for k in range(KH * KW):
            y0, x0, ly, lx, m, inside = _taps(
                off_ptr,
                msk_ptr,
                flow_ptr,
                MAG,
                GPF,
                b,
                g,
                g_ok,
                k,
                oy,
                ox,
                p_ok,
                H,
                W,
                G,
                SO_N,
                SO_C,
                SO_H,
                SO_W,
                SM_N,
                SM_C,
                SM_H,
                SM_W,
                SF_N,
                SF_C,
                SF_H,
                SF_W,
                SH,
                SW,
                PH,
                PW,
                DH,
                DW,
                KH,
                KW,
                FUSED,
            )
            a00, v00 = _corner(y0, x0, inside, H, W, C_IN)
            a01, v01 = _corner(y0, x0 + 1, inside, H, W, C_IN)
            a10, v10 = _corner(y0 + 1, x0, inside, H, W, C_IN)
            a11, v11 = _corner(y0 + 1, x0 + 1, inside, H, W, C_IN)
            # Bilinear weights with the mask folded in: [BP, GPB, 1].
            w00 = ((1.0 - ly) * (1.0 - lx) * m)[:, :, None]
            w01 = ((1.0 - ly) * lx * m)[:, :, None]
            w10 = (ly * (1.0 - lx) * m)[:, :, None]
            w11 = (ly * lx * m)[:, :, None]
            for c0 in range(0, CG, CPB):
                c = c0 + ci
                chan = (g * CG)[:, None] + c[None, :]  # [GPB, CPB]
                ch_ok = g_ok[:, None] & (c < CG)[None, :]
                ch3 = chan[None, :, :]
                ok3 = ch_ok[None, :, :]
                s = w00 * tl.load(
                    xb + a00[:, :, None] + ch3, mask=v00[:, :, None] & ok3, other=0.0
                ).to(tl.float32)
                s += w01 * tl.load(
                    xb + a01[:, :, None] + ch3, mask=v01[:, :, None] & ok3, other=0.0
                ).to(tl.float32)
                s += w10 * tl.load(
                    xb + a10[:, :, None] + ch3, mask=v10[:, :, None] & ok3, other=0.0
                ).to(tl.float32)
                s += w11 * tl.load(
                    xb + a11[:, :, None] + ch3, mask=v11[:, :, None] & ok3, other=0.0
                ).to(tl.float32)
                cols = _cast(tl.reshape(s, (BP, CHUNK)), out_ptr.dtype.element_ty, INTERP_BF16)
                rows = tl.reshape(chan, (CHUNK,))
                rows_ok = tl.reshape(ch_ok, (CHUNK,))
                w_at = w_ptr + (k * C_IN + rows).to(tl.int64)[:, None] * C_OUT + co[None, :]
                wk = tl.load(w_at, mask=rows_ok[:, None] & co_ok[None, :], other=0.0)
                acc = _mma(cols, wk, acc, PREC, INTERP_BF16)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
    out_at = _at(out_ptr, b, co, oy, ox, SY_N, SY_C, SY_H, SY_W)
    tl.store(
        out_at,
        _cast(acc, out_ptr.dtype.element_ty, INTERP_BF16),
        mask=p_ok[:, None] & co_ok[None, :],
    )


@triton.jit
def _bwd_corner(
    xb, gxb, y, x, inside, wt, d_dy, d_dx, gcol, gm, ch3, ok3, H, W, C_IN, s, g_mask, g_dy, g_dx
):
    """One bilinear corner (bilinear weight wt, and d wt/dy, d wt/dx), all [BP, GPB]: gathers it,
    adds it to the sample s and to the per-group sums of gcol * (sample, d/dy, d/dx), and scatters
    its share of grad_x (gm = gcol * mask) with fp32 atomics."""
    a, valid = _corner(y, x, inside, H, W, C_IN)
    at = a[:, :, None] + ch3
    ok = valid[:, :, None] & ok3
    q = tl.load(xb + at, mask=ok, other=0.0).to(tl.float32)
    t = tl.sum(gcol * q, axis=2)
    tl.atomic_add(gxb + at, gm * wt[:, :, None], mask=ok, sem="relaxed")
    return s + wt[:, :, None] * q, g_mask + wt * t, g_dy + d_dy * t, g_dx + d_dx * t


# One backward kernel. A program owns one tap k and one chunk of whole deform groups, and walks
# a strided share of all (image, pixel tile) pairs. Owning (k, group) makes grad_offset and
# grad_mask plain writes, reduced over the group's channels inside the program; walking many
# tiles lets grad_weight[k, chunk, :] stay in fp32 registers and be written once per program
# as a partial (summed over the few SPLITS afterwards: deterministic, no atomics on 70k hot
# addresses). Only grad_x, whose destinations depend on the offsets, is scattered with atomics
# into an fp32 buffer. The columns are recomputed from x, never stored.
@triton.jit
def _dcn_bwd_kernel(
    x_ptr,
    off_ptr,
    msk_ptr,
    w_ptr,
    gout_ptr,
    gx_ptr,
    goff_ptr,
    gmsk_ptr,
    gw_ptr,
    N,
    H,
    W,
    HO,
    WO,
    C_IN,
    C_OUT,
    G,
    TILES_W,
    TILES,
    N_CHUNK,
    SPLITS,
    SH,
    SW,
    PH,
    PW,
    DH,
    DW,
    SO_N,
    SO_C,
    SO_H,
    SO_W,
    SM_N,
    SM_C,
    SM_H,
    SM_W,
    SG_N,
    SG_C,
    SG_H,
    SG_W,
    CG: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
    GPB: tl.constexpr,
    CPB: tl.constexpr,
    BLOCK_CO: tl.constexpr,
    PREC: tl.constexpr,
    INTERP_BF16: tl.constexpr,
):
    K: tl.constexpr = KH * KW
    BP: tl.constexpr = TILE_H * TILE_W
    CHUNK: tl.constexpr = GPB * CPB
    k = tl.program_id(0) // N_CHUNK
    g = (tl.program_id(0) % N_CHUNK) * GPB + tl.arange(0, GPB)
    split = tl.program_id(1)
    g_ok = g < G
    c = tl.arange(0, CPB)
    chan = (g * CG)[:, None] + c[None, :]  # [GPB, CPB]
    ch_ok = g_ok[:, None] & (c < CG)[None, :]
    ch3 = chan[None, :, :]
    ok3 = ch_ok[None, :, :]
    rows = tl.reshape(chan, (CHUNK,))
    rows_ok = tl.reshape(ch_ok, (CHUNK,))
    co = tl.arange(0, BLOCK_CO)
    co_ok = co < C_OUT
    # w[k, rows, :] transposed: [BLOCK_CO, CHUNK].
    wk_t = tl.load(
        w_ptr + (k * C_IN + rows).to(tl.int64)[None, :] * C_OUT + co[:, None],
        mask=rows_ok[None, :] & co_ok[:, None],
        other=0.0,
    )
    r = tl.arange(0, BP)

    gw = tl.zeros((CHUNK, BLOCK_CO), dtype=tl.float32)
    for t in range(split, N * TILES, SPLITS):
        b = t // TILES
        oy = ((t % TILES) // TILES_W) * TILE_H + r // TILE_W
        ox = ((t % TILES) % TILES_W) * TILE_W + r % TILE_W
        p_ok = (oy < HO) & (ox < WO)
        gout = tl.load(
            _at(gout_ptr, b, co, oy, ox, SG_N, SG_C, SG_H, SG_W),
            mask=p_ok[:, None] & co_ok[None, :],
            other=0.0,
        )  # [BP, BLOCK_CO]
        # Gradient of the sampled columns, gcol[p, c] = sum_co gout[p, co] w[k, c, co].
        gcol = _mma(gout, wk_t, tl.zeros((BP, CHUNK), dtype=tl.float32), PREC, INTERP_BF16)
        gcol = tl.reshape(gcol, (BP, GPB, CPB))

        y0, x0, ly, lx, m, inside = _taps(
            off_ptr,
            msk_ptr,
            off_ptr,
            0.0,
            1,
            b,
            g,
            g_ok,
            k,
            oy,
            ox,
            p_ok,
            H,
            W,
            G,
            SO_N,
            SO_C,
            SO_H,
            SO_W,
            SM_N,
            SM_C,
            SM_H,
            SM_W,
            SO_N,
            SO_C,
            SO_H,
            SO_W,
            SH,
            SW,
            PH,
            PW,
            DH,
            DW,
            KH,
            KW,
            False,
        )
        # Corner by corner: the unmasked sample s, the per-group sums of gcol times the sample and
        # its y/x derivatives (outside corners read as 0, as in mmcv), and grad_x's scatter.
        xb = x_ptr + b.to(tl.int64) * H * W * C_IN
        gxb = gx_ptr + b.to(tl.int64) * H * W * C_IN
        gm = gcol * m[:, :, None]
        s = tl.zeros((BP, GPB, CPB), dtype=tl.float32)
        g_mask = tl.zeros((BP, GPB), dtype=tl.float32)
        g_dy = tl.zeros((BP, GPB), dtype=tl.float32)
        g_dx = tl.zeros((BP, GPB), dtype=tl.float32)
        s, g_mask, g_dy, g_dx = _bwd_corner(
            xb,
            gxb,
            y0,
            x0,
            inside,
            (1.0 - ly) * (1.0 - lx),
            lx - 1.0,
            ly - 1.0,
            gcol,
            gm,
            ch3,
            ok3,
            H,
            W,
            C_IN,
            s,
            g_mask,
            g_dy,
            g_dx,
        )
        s, g_mask, g_dy, g_dx = _bwd_corner(
            xb,
            gxb,
            y0,
            x0 + 1,
            inside,
            (1.0 - ly) * lx,
            -lx,
            1.0 - ly,
            gcol,
            gm,
            ch3,
            ok3,
            H,
            W,
            C_IN,
            s,
            g_mask,
            g_dy,
            g_dx,
        )
        s, g_mask, g_dy, g_dx = _bwd_corner(
            xb,
            gxb,
            y0 + 1,
            x0,
            inside,
            ly * (1.0 - lx),
            1.0 - lx,
            -ly,
            gcol,
            gm,
            ch3,
            ok3,
            H,
            W,
            C_IN,
            s,
            g_mask,
            g_dy,
            g_dx,
        )
        s, g_mask, g_dy, g_dx = _bwd_corner(
            xb,
            gxb,
            y0 + 1,
            x0 + 1,
            inside,
            ly * lx,
            lx,
            ly,
            gcol,
            gm,
            ch3,
            ok3,
            H,
            W,
            C_IN,
            s,
            g_mask,
            g_dy,
            g_dx,
        )

        # Owned writes of the segmented reductions, 0 outside the guard.
        # grad_offset and grad_mask have the strides of offset and mask (the launcher sees to it).
        ok2 = p_ok[:, None] & g_ok[None, :]
        g_mask = tl.where(inside, g_mask, 0.0)
        g_dy = tl.where(inside, m * g_dy, 0.0)
        g_dx = tl.where(inside, m * g_dx, 0.0)
        tl.store(
            _at(gmsk_ptr, b, g * K + k, oy, ox, SM_N, SM_C, SM_H, SM_W),
            _cast(g_mask, gmsk_ptr.dtype.element_ty, INTERP_BF16),
            mask=ok2,
        )
        goff_at = _at(goff_ptr, b, g * (2 * K) + 2 * k, oy, ox, SO_N, SO_C, SO_H, SO_W)
        tl.store(goff_at, _cast(g_dy, goff_ptr.dtype.element_ty, INTERP_BF16), mask=ok2)
        tl.store(goff_at + SO_C, _cast(g_dx, goff_ptr.dtype.element_ty, INTERP_BF16), mask=ok2)

        # grad_w[k, c, co] += sum_p cols[p, c] gout[p, co], with the same rounded columns as the
        # forward.
        cols = _cast(
            tl.reshape(s * m[:, :, None], (BP, CHUNK)), gout_ptr.dtype.element_ty, INTERP_BF16
        )
        gw = _mma(tl.trans(cols), gout, gw, PREC, INTERP_BF16)

    gw_at = gw_ptr + ((split * K + k) * C_IN + rows).to(tl.int64)[:, None] * C_OUT + co[None, :]
    tl.store(gw_at, gw, mask=rows_ok[:, None] & co_ok[None, :])


# ----------------------------------------------------------------------------------------
# Launchers: plain tensors in, plain tensors out. Inputs are only read. x is copied to
# channels-last unless it is so already; the others are read through their strides.


def _next_pow2(v):
    return 1 << max(0, int(v) - 1).bit_length()


def _chunking(G, cg, chunk, whole_groups):
    """(GPB, CPB): groups per chunk and channels per group in a chunk of about `chunk` columns,
    at least 16 (tl.dot's minimum). whole_groups keeps each group in one chunk (backward)."""
    cpb = _next_pow2(cg)
    if cpb > chunk and not whole_groups:
        return 1, chunk
    gpb = max(1, chunk // cpb)
    gpb = min(gpb, max(_next_pow2(G), 16 // cpb if cpb < 16 else 1))
    return gpb, cpb


def _dot_settings(x):
    # fp32 follows torch's matmul setting: exact ("ieee") unless the user allowed TF32.
    # For bf16/fp16 operands the flag has no effect.
    exact = x.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
    return ("ieee" if exact else "tf32"), _INTERPRET and x.dtype == torch.bfloat16


def _tiles(ho, wo, backward, ieee=False):
    """(TILE_H, TILE_W, tiles_h, tiles_w, num_warps). Rows of 16 pixels keep offset/mask/out
    accesses coalesced. Sizes come from register counts of an offline sm_90 compile (no
    spills: forward 4x16 px x 32 ch at 4 warps, backward 2x16 px x 32 ch at 8 warps, ~115-236
    registers), not from timings. ieee: a forward with exact fp32 dots (FMA, no tensor cores)
    spills at 4 warps (255 registers) and not at 8 (~160), so it gets 8. The interpreter pays per
    program, so it gets big tiles."""
    if _INTERPRET:
        th, tw, warps = 16, 16, 4
    else:
        th, tw, warps = (2, 16, 8) if backward else (4, 16, 8 if ieee else 4)
    return th, tw, triton.cdiv(ho, th), triton.cdiv(wo, tw), warps


def _launch_checks(op, x, weight, bias, **read_as_fp32):
    """weight and bias must match x's dtype; read_as_fp32 (offsets, masks, logits, flows) may be
    any floating dtype: the kernels convert them to fp32 on load."""
    for name, t in (("weight", weight), ("bias", bias), *read_as_fp32.items()):
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device}, x on {x.device}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"{op}: the Triton backend takes float32, bfloat16 or float16, got {x.dtype}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"{op}: {name} is {t.dtype} but x is {x.dtype}")
    for name, t in read_as_fp32.items():
        if not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be floating point, got {t.dtype}")


def _on_device(x):
    # Triton launches on the current CUDA device.
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _empty_output(x, c_out, ho, wo):
    """The forward's output (n, c_out, ho, wo) in x's memory format; the real and fake paths share
    it."""
    return torch.empty(
        (x.shape[0], c_out, ho, wo), device=x.device, dtype=x.dtype, memory_format=memory_format(x)
    )


def _launch_forward(
    x, off, msk, flows, mag, weight, bias, stride, padding, dilation, deform_groups, size
):
    """The forward kernel. flows None: off and msk are offset and mask; otherwise off is
    conv_offset (msk unused), flows the flows and mag max_residue_magnitude."""
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    (ho, wo), G = size, deform_groups
    fused = flows is not None
    x_cl = x.contiguous(memory_format=torch.channels_last)  # (n, h, w, c_in) in memory
    w_kcc = weight.permute(2, 3, 1, 0).reshape(kh * kw, c_in, c_out).contiguous()
    out = _empty_output(x, c_out, ho, wo)
    prec, interp_bf16 = _dot_settings(x)
    th, tw, tiles_h, tiles_w, warps = _tiles(ho, wo, backward=False, ieee=prec == "ieee")
    gpb, cpb = _chunking(G, c_in // G, 32, whole_groups=False)
    block_co = min(64, max(16, _next_pow2(c_out)))
    grid = (
        tiles_h * tiles_w,
        n,
        triton.cdiv(c_out, block_co),
    )  # tiles fastest: one image at a time in L2
    msk, flows = (off, flows) if fused else (msk, off)  # the unused one: any tensor
    with _on_device(x):
        _dcn_fwd_kernel[grid](
            x_cl,
            off,
            msk,
            flows,
            w_kcc,
            bias if bias is not None else w_kcc,
            out,
            h,
            w,
            ho,
            wo,
            c_in,
            c_out,
            G,
            tiles_w,
            stride[0],
            stride[1],
            padding[0],
            padding[1],
            dilation[0],
            dilation[1],
            float(mag),
            G // (flows.shape[1] // 2) if fused else 1,
            *off.stride(),
            *msk.stride(),
            *flows.stride(),
            *out.stride(),
            CG=c_in // G,
            KH=kh,
            KW=kw,
            HAS_BIAS=bias is not None,
            TILE_H=th,
            TILE_W=tw,
            GPB=gpb,
            CPB=cpb,
            BLOCK_CO=block_co,
            PREC=prec,
            INTERP_BF16=interp_bf16,
            FUSED=fused,
            num_warps=warps,
            num_stages=1,
        )
    return out


def _forward(x, offset, mask, weight, bias, stride, padding, dilation, deform_groups):
    size = _check(x, offset, mask, weight, bias, stride, padding, dilation, deform_groups)
    _launch_checks("deform_conv2d", x, weight, bias, offset=offset, mask=mask)
    return _launch_forward(
        x, offset, mask, None, 0.0, weight, bias, stride, padding, dilation, deform_groups, size
    )


def _fused_size(
    x,
    conv_offset,
    flows,
    weight,
    bias,
    max_residue_magnitude,
    stride,
    padding,
    dilation,
    deform_groups,
):
    """(ho, wo) of flow_guided_deform_conv2d after checking its arguments."""
    op = "flow_guided_deform_conv2d"
    ho, wo = _conv_size(x, weight, bias, stride, padding, dilation, deform_groups, op)
    _check_glue(
        conv_offset,
        flows,
        deform_groups,
        weight.shape[2] * weight.shape[3],
        op,
        (x.shape[0], ho, wo),
    )
    return ho, wo


def _forward_fused(
    x,
    conv_offset,
    flows,
    weight,
    bias,
    max_residue_magnitude,
    stride,
    padding,
    dilation,
    deform_groups,
):
    ho, wo = _fused_size(
        x,
        conv_offset,
        flows,
        weight,
        bias,
        max_residue_magnitude,
        stride,
        padding,
        dilation,
        deform_groups,
    )
    _launch_checks(
        "flow_guided_deform_conv2d", x, weight, bias, conv_offset=conv_offset, flows=flows
    )
    return _launch_forward(
        x,
        conv_offset,
        None,
        flows,
        max_residue_magnitude,
        weight,
        bias,
        stride,
        padding,
        dilation,
        deform_groups,
        (ho, wo),
    )


def _backward(grad_out, x, offset, mask, weight, stride, padding, dilation, deform_groups):
    """grad_x, grad_offset, grad_mask, grad_weight (grad_bias, a plain sum, is left to autograd)."""
    ho, wo = _check(x, offset, mask, weight, None, stride, padding, dilation, deform_groups)
    _launch_checks("deform_conv2d", x, weight, None, offset=offset, mask=mask)
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    G, K = deform_groups, kh * kw
    x_cl = x.contiguous(memory_format=torch.channels_last)
    w_kcc = weight.permute(2, 3, 1, 0).reshape(K, c_in, c_out).contiguous()
    grad_out = grad_out.to(x.dtype)  # read through its strides, 0 included
    # grad_offset and grad_mask come in the memory formats of offset and mask; the kernel writes
    # them with the strides of offset and mask, which are the same once those are dense.
    off_format, msk_format = memory_format(offset), memory_format(mask)
    offset, mask = (
        offset.contiguous(memory_format=off_format),
        mask.contiguous(memory_format=msk_format),
    )
    th, tw, tiles_h, tiles_w, warps = _tiles(ho, wo, backward=True)
    gpb, cpb = _chunking(G, c_in // G, 32, whole_groups=True)
    n_chunk = triton.cdiv(G, gpb)
    tiles = tiles_h * tiles_w
    if x.is_cuda:  # about 4 programs per SM; each split adds one fp32 partial of grad_weight
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        splits = max(1, min(n * tiles, triton.cdiv(4 * sms, K * n_chunk)))
    else:  # interpreter: few programs, but keep the split path exercised
        splits = min(2, n * tiles)
    gx = torch.zeros((n, h, w, c_in), device=x.device, dtype=torch.float32)
    g_off = torch.empty(offset.shape, device=x.device, dtype=offset.dtype, memory_format=off_format)
    g_msk = torch.empty(mask.shape, device=x.device, dtype=mask.dtype, memory_format=msk_format)
    gw = torch.empty((splits, K, c_in, c_out), device=x.device, dtype=torch.float32)
    prec, interp_bf16 = _dot_settings(x)
    with _on_device(x):
        _dcn_bwd_kernel[(K * n_chunk, splits)](
            x_cl,
            offset,
            mask,
            w_kcc,
            grad_out,
            gx,
            g_off,
            g_msk,
            gw,
            n,
            h,
            w,
            ho,
            wo,
            c_in,
            c_out,
            G,
            tiles_w,
            tiles,
            n_chunk,
            splits,
            stride[0],
            stride[1],
            padding[0],
            padding[1],
            dilation[0],
            dilation[1],
            *offset.stride(),
            *mask.stride(),
            *grad_out.stride(),
            CG=c_in // G,
            KH=kh,
            KW=kw,
            TILE_H=th,
            TILE_W=tw,
            GPB=gpb,
            CPB=cpb,
            BLOCK_CO=max(16, _next_pow2(c_out)),
            PREC=prec,
            INTERP_BF16=interp_bf16,
            num_warps=warps,
            num_stages=1,
        )
    # Each gradient in its input's memory format. grad_x: for a channels-last fp32 x the buffer
    # itself, else one pass (cast and/or back to NCHW); grad_w: the partials summed, reordered.
    grad_x = gx.permute(0, 3, 1, 2).to(x.dtype, memory_format=memory_format(x))
    grad_w = torch.empty(
        weight.shape, device=x.device, dtype=weight.dtype, memory_format=memory_format(weight)
    )
    grad_w.copy_(gw.sum(0).permute(2, 1, 0).view(c_out, c_in, kh, kw))
    return grad_x, g_off, g_msk, grad_w


def _backward_fused(
    grad_out,
    x,
    conv_offset,
    flows,
    weight,
    max_residue_magnitude,
    stride,
    padding,
    dilation,
    deform_groups,
):
    """grad_x, grad_conv_offset, grad_flows, grad_weight: the glue recomputed in fp32 (as the
    kernel built it), the plain DCN backward, then the chain rule through the glue."""
    op = "flow_guided_deform_conv2d"
    G, K = deform_groups, weight.shape[2] * weight.shape[3]
    ho, wo = _conv_size(x, weight, None, stride, padding, dilation, G, op)
    F = _check_glue(conv_offset, flows, G, K, op, (x.shape[0], ho, wo))
    t, offset, mask = _glue(conv_offset, flows, max_residue_magnitude, G, K)
    grad_x, g_off, g_msk, grad_w = _backward(
        grad_out, x, offset, mask, weight, stride, padding, dilation, G
    )
    n = x.shape[0]
    # d tanh = 1 - tanh^2, d sigmoid = s (1 - s); each flow gets the sum over its groups' taps.
    # Both gradients in the memory formats of their inputs.
    g_logits = torch.empty(
        conv_offset.shape,
        device=x.device,
        dtype=conv_offset.dtype,
        memory_format=memory_format(conv_offset),
    )
    g_logits[:, : 2 * G * K] = g_off * (max_residue_magnitude * (1 - t * t))
    g_logits[:, 2 * G * K :] = g_msk * (mask * (1 - mask))
    g_flows = g_off.view(n, F, -1, 2, ho, wo).sum(2).flip(2).reshape(n, 2 * F, ho, wo)
    return grad_x, g_logits, g_flows.to(flows.dtype, memory_format=memory_format(flows)), grad_w


# ----------------------------------------------------------------------------------------
# torch.library custom ops, so torch.compile traces through the kernels without graph breaks.


def _empty_grads(*inputs):
    """Fake gradients of the backward ops: each in its input's memory format, as the real ones."""
    return tuple(
        torch.empty(t.shape, device=t.device, dtype=t.dtype, memory_format=memory_format(t))
        for t in inputs
    )


def _register(name, tensors, params, forward, backward, size):
    """Registers vsr::<name>(x, *tensors, weight, bias, *params) -> out, its backward op
    vsr::<name>_backward(grad_out, x, *tensors, weight, *params) -> (grad_x, *grad_tensors,
    grad_weight), fake implementations of both, and the autograd formula that joins them (grad_bias,
    a plain sum, is done here). tensors, params: schema entries ("Tensor offset", "int[] stride").
    size(*forward inputs) checks them and returns (ho, wo)."""
    grads = len(tensors) + 2
    args = ", ".join(("Tensor x", *tensors, "Tensor weight"))
    fwd_op = torch.library.custom_op(
        f"vsr::{name}",
        forward,
        mutates_args=(),
        schema=f"({args}, Tensor? bias, {', '.join(params)}) -> Tensor",
    )
    bwd_op = torch.library.custom_op(
        f"vsr::{name}_backward",
        backward,
        mutates_args=(),
        schema=f"(Tensor grad_out, {args}, {', '.join(params)}) -> "
        f"({', '.join(['Tensor'] * grads)})",
    )
    fwd_op.register_fake(lambda *a: _empty_output(a[0], a[grads - 1].shape[0], *size(*a)))
    bwd_op.register_fake(lambda grad_out, *a: _empty_grads(*a[:grads]))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:grads])
        bias, ctx.params = inputs[grads], inputs[grads + 1 :]
        ctx.bias_dtype = None if bias is None else bias.dtype

    def autograd_backward(ctx, grad_out):
        grad_bias = None
        if ctx.bias_dtype is not None:
            grad_bias = grad_out.sum((0, 2, 3), dtype=torch.float32).to(ctx.bias_dtype)
        return *bwd_op(grad_out, *ctx.saved_tensors, *ctx.params), grad_bias, *[None] * len(params)

    fwd_op.register_autograd(autograd_backward, setup_context=setup_context)


_CONV = ("int[] stride", "int[] padding", "int[] dilation", "int deform_groups")
_register("deform_conv2d", ("Tensor offset", "Tensor mask"), _CONV, _forward, _backward, _check)
_register(
    "flow_guided_deform_conv2d",
    ("Tensor conv_offset", "Tensor flows"),
    ("float max_residue_magnitude", *_CONV),
    _forward_fused,
    _backward_fused,
    _fused_size,
)


# ----------------------------------------------------------------------------------------
# Public functions.


def deform_conv2d(
    x,
    offset,
    mask,
    weight,
    bias=None,
    stride=1,
    padding=0,
    dilation=1,
    deform_groups=1,
    backend=None,
):
    """Modulated deformable convolution; see the module docstring for layouts.

    backend: "triton", "torch", or None: the default of kernels.use_backend, which outside any
    use_backend block is Triton for CUDA tensors and the CPU path (cpu.py) for CPU tensors.
    Under torch.autocast, x, mask, weight and bias run in the autocast dtype and the offsets in
    fp32. Otherwise mask, weight and bias follow x's dtype.
    """
    stride, padding, dilation = list(_pair(stride)), list(_pair(padding)), list(_pair(dilation))
    triton_ = use_triton("deform_conv2d", backend, x)
    _check(x, offset, mask, weight, bias, stride, padding, dilation, deform_groups)
    (x, mask, weight, bias), (offset,) = autocast_inputs(x, (x, mask, weight, bias), (offset,))
    with torch.autocast(x.device.type, enabled=False):
        if triton_:
            return torch.ops.vsr.deform_conv2d(
                x, offset, mask, weight, bias, stride, padding, dilation, deform_groups
            )
        conv = deform_conv2d_cpu if use_cpu_path(backend, x) else deform_conv2d_reference
        return conv(x, offset, mask, weight, bias, stride, padding, dilation, deform_groups)


def flow_guided_deform_conv2d(
    x,
    conv_offset,
    flows,
    weight,
    bias=None,
    max_residue_magnitude=10.0,
    stride=1,
    padding=0,
    dilation=1,
    deform_groups=1,
    backend=None,
):
    """deform_conv2d with BasicVSR++'s offsets and mask, built from the offset branch's raw
    output conv_offset (n, 3GK, ho, wo) and the flows (n, 2F, ho, wo): see the module docstring.
    The Triton kernel builds them on the fly in fp32; the reference path is flow_guided_offsets
    followed by deform_conv2d_reference. backend as in deform_conv2d.
    Under torch.autocast, x, weight and bias run in the autocast dtype, conv_offset is read in
    its own dtype (e.g. the bf16 conv output) and the flows in fp32. Otherwise weight and bias
    follow x's dtype. Offsets and mask are fp32 in both cases.
    """
    op = "flow_guided_deform_conv2d"
    stride, padding, dilation = list(_pair(stride)), list(_pair(padding)), list(_pair(dilation))
    triton_ = use_triton(op, backend, x)
    ho, wo = _conv_size(x, weight, bias, stride, padding, dilation, deform_groups, op)
    taps = weight.shape[2] * weight.shape[3]
    _check_glue(conv_offset, flows, deform_groups, taps, op, (x.shape[0], ho, wo))
    (x, weight, bias), (flows,) = autocast_inputs(
        x, (x, weight, bias), (flows,)
    )  # conv_offset as it comes
    mag = float(max_residue_magnitude)
    with torch.autocast(x.device.type, enabled=False):
        if triton_:
            return torch.ops.vsr.flow_guided_deform_conv2d(
                x, conv_offset, flows, weight, bias, mag, stride, padding, dilation, deform_groups
            )
        conv = (weight, bias, stride, padding, dilation, deform_groups)
        if not use_cpu_path(backend, x):
            offset, mask = flow_guided_offsets(conv_offset, flows, mag, deform_groups, taps)
            return deform_conv2d_reference(x, offset, mask, *conv)

        def offset_and_mask(i, rows):  # flow_guided_offsets at these output rows only
            # NCHW (a copy of a few hundred KB), like the positions it is combined with: from
            # a channels-last conv_offset, each of those ops would stride across channels.
            logits = conv_offset[i : i + 1, :, rows].contiguous()
            _, offset, mask = _glue(logits, flows[i : i + 1, :, rows], mag, deform_groups, taps)
            return offset[0], mask[0]

        return deform_conv2d_by_rows(x, offset_and_mask, (ho, wo), *conv)


# ----------------------------------------------------------------------------------------
# ONNX: both ops as DeformConv (opset 19), for torch.onnx.export(dynamo=True,
# custom_translation_table=...); the flow-guided glue is ordinary ONNX ops in front of it.
# DeformConv has mmcv's layouts (offset (n, G*K*2, ho, wo) as per-tap (dy, dx); mask
# (n, G*K, ho, wo)) and its guard (a sample outside (-1, h) x (-1, w) is 0).


def onnx_translations(opset):
    """{torch op: ONNX Script function} for vsr::deform_conv2d and vsr::flow_guided_deform_conv2d at
    `opset` (>= 19)."""
    from .common import onnx_opset

    op = onnx_opset(opset)

    def deform_conv2d(x, offset, mask, weight, bias, stride, padding, dilation, deform_groups):
        kh, kw = weight.shape[2], weight.shape[3]
        return op.DeformConv(
            x,
            weight,
            offset,
            bias,
            mask,
            dilations=list(dilation),
            group=1,
            kernel_shape=[kh, kw],
            offset_group=deform_groups,
            pads=[padding[0], padding[1], padding[0], padding[1]],
            strides=list(stride),
        )

    def flow_guided_deform_conv2d(
        x,
        conv_offset,
        flows,
        weight,
        bias,
        max_residue_magnitude,
        stride,
        padding,
        dilation,
        deform_groups,
    ):
        # flow_guided_offsets in ONNX: offset = mag * tanh(logits) + each group's flow as (dy, dx),
        # mask = sigmoid(logits); groups g // (G / F) take flow g of the F flows
        G, K, F = deform_groups, weight.shape[2] * weight.shape[3], flows.shape[1] // 2
        residue = op.Mul(
            op.Tanh(op.Slice(conv_offset, [0], [2 * G * K], [1])), float(max_residue_magnitude)
        )
        mask = op.Sigmoid(op.Slice(conv_offset, [2 * G * K], [3 * G * K], [1]))
        flow_yx = op.Gather(
            op.Reshape(flows, [0, F, 1, 2, -1]), [1, 0], axis=3
        )  # (n, F, 1, (dy, dx), h*w)
        offset = op.Reshape(
            op.Add(op.Reshape(residue, [0, F, G // F * K, 2, -1]), flow_yx), op.Shape(residue)
        )
        return deform_conv2d(
            x, offset, mask, weight, bias, stride, padding, dilation, deform_groups
        )

    return {
        torch.ops.vsr.deform_conv2d.default: deform_conv2d,
        torch.ops.vsr.flow_guided_deform_conv2d.default: flow_guided_deform_conv2d,
    }
