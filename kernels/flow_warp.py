"""Backward warping with an optical flow: out[p] = x[p + flow(p)], bilinear.

flow is (n, 2, h, w) in pixels, channel 0 = dx, channel 1 = dy. Semantics are those of
F.grid_sample(bilinear, align_corners=True) on the grid built from the flow, which is what
mmagic's flow_warp does. Two conventions come with that:
  - a map one pixel wide (or high) collapses that coordinate to 0, flow ignored, no gradient;
  - "border" padding clamps the position, and a position at or beyond the border gets no
    flow gradient (grid_sample's clip_coordinates_set_grad).
Non-finite or far-outside positions are pinned to -2 (just outside) before anything else, so
they sample zeros ("zeros") or the border ("border", NaN goes to 0, +inf to w-1) and get no
flow gradient. CUDA grid_sample does the same; CPU grid_sample would return NaN.

The output takes x's memory format (kernels.common.memory_format): a channels-last x gives a
channels-last output, on both paths, so a network converted with
.to(memory_format=torch.channels_last) stays so.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .common import INTERPRET, autocast_inputs, memory_format, use_triton


def _check(x, flow, padding_mode):
    if x.dim() != 4 or flow.dim() != 4 or flow.shape[1] != 2:
        raise ValueError(
            f"flow_warp: expected x (n, c, h, w) and flow (n, 2, h, w), "
            f"got {tuple(x.shape)} and {tuple(flow.shape)}"
        )
    if x.shape[0] != flow.shape[0] or x.shape[-2:] != flow.shape[-2:]:
        raise ValueError(
            f"flow_warp: x {tuple(x.shape)} and flow {tuple(flow.shape)} "
            "differ in batch or spatial size"
        )
    if padding_mode not in ("zeros", "border"):
        raise ValueError(
            f"flow_warp: padding_mode must be 'zeros' or 'border', got {padding_mode!r}"
        )


# ----------------------------------------------------------------------------------------
# PyTorch reference: the CPU path and the test oracle.


def _pin(pos, size):
    # NaN fails both comparisons and lands on -2; the gradient through the pin is 0 there,
    # as grid_sample's would be for a position that far out.
    pos = torch.where(pos > -2.0, pos, torch.full_like(pos, -2.0))
    return torch.where(pos < size + 1.0, pos, torch.full_like(pos, size + 1.0))


def flow_warp_reference(x, flow, padding_mode="zeros"):
    _check(x, flow, padding_mode)
    n, _, h, w = x.shape
    acc = torch.promote_types(x.dtype, torch.float32)
    # Positions in fp32 whatever x's dtype: bf16 cannot hold pixel coordinates (8 significant
    # bits: the ulp is 2 px in [256, 512)), and grid_sample takes the grid in x's dtype.
    grid_y, grid_x = torch.meshgrid(
        torch.arange(h, device=x.device, dtype=acc),
        torch.arange(w, device=x.device, dtype=acc),
        indexing="ij",
    )
    gx = _pin(grid_x + flow[:, 0].to(acc), w)
    gy = _pin(grid_y + flow[:, 1].to(acc), h)
    grid = torch.stack((2.0 * gx / max(w - 1, 1) - 1.0, 2.0 * gy / max(h - 1, 1) - 1.0), dim=3)
    out = F.grid_sample(
        x.to(acc), grid, mode="bilinear", padding_mode=padding_mode, align_corners=True
    )
    return out.to(x.dtype).contiguous(memory_format=memory_format(x))


# ----------------------------------------------------------------------------------------
# Triton kernels. A program works on a tile of BLOCK_P pixels of one image by BLOCK_C
# channels: the position, the corners and the four bilinear weights are computed once per
# pixel in fp32 and broadcast over the channels. The forward gives each channel block its own
# program (more parallelism at batch 1; the flow re-read is 8 B/pixel, from L2). The backward
# program loops over all channel blocks, so grad_flow is a plain in-program sum over channels
# (no atomics, deterministic). Only grad_x scatters, into an fp32 buffer.


@triton.jit
def _sample_position(
    i, j, flow_base, sfc, sfh, sfw, h, w, scale_x, scale_y, ok_p, BORDER: tl.constexpr
):
    """Pixel-unit position (ix, iy) of each output pixel, pinned and clamped as grid_sample."""
    f_off = i * sfh + j * sfw
    dx = tl.load(flow_base + f_off, mask=ok_p, other=0.0).to(tl.float32)
    dy = tl.load(flow_base + sfc + f_off, mask=ok_p, other=0.0).to(tl.float32)
    ix = j.to(tl.float32) + dx
    iy = i.to(tl.float32) + dy
    ix = tl.where(ix > -2.0, ix, -2.0)
    ix = tl.where(ix < w + 1.0, ix, w + 1.0)
    iy = tl.where(iy > -2.0, iy, -2.0)
    iy = tl.where(iy < h + 1.0, iy, h + 1.0)
    # scale is 0 for a 1-pixel axis (grid_sample's (size-1)/2 unnormalisation), else 1.
    ix = ix * scale_x
    iy = iy * scale_y
    # d(clamped)/d(position): 1 strictly inside the border, 0 at or beyond it.
    gclip_x = tl.zeros_like(ix) + scale_x
    gclip_y = tl.zeros_like(iy) + scale_y
    if BORDER:
        gclip_x = tl.where((ix > 0.0) & (ix < w - 1.0), gclip_x, 0.0)
        gclip_y = tl.where((iy > 0.0) & (iy < h - 1.0), gclip_y, 0.0)
        ix = tl.minimum(tl.maximum(ix, 0.0), w - 1.0)
        iy = tl.minimum(tl.maximum(iy, 0.0), h - 1.0)
    return ix, iy, gclip_x, gclip_y


@triton.jit
def _corners(ix, iy, h, w, ok_p):
    """Top-left corner (x0, y0), fractional parts (lx, ly), and for the corners 00, 01, 10, 11
    (row, column) their bilinear weights and whether they lie inside (and the pixel is real);
    weights and validity come as (1, P), ready to broadcast over a block of channels."""
    fx = tl.floor(ix)
    fy = tl.floor(iy)
    lx = ix - fx
    ly = iy - fy
    # ix, iy are finite and within [-2, size+1] here, so the int casts are safe.
    x0 = fx.to(tl.int32)
    y0 = fy.to(tl.int32)
    okx0 = (x0 >= 0) & (x0 < w)
    okx1 = (x0 >= -1) & (x0 < w - 1)
    oky0 = (y0 >= 0) & (y0 < h)
    oky1 = (y0 >= -1) & (y0 < h - 1)
    w00 = ((1.0 - ly) * (1.0 - lx))[None, :]
    w01 = ((1.0 - ly) * lx)[None, :]
    w10 = (ly * (1.0 - lx))[None, :]
    w11 = (ly * lx)[None, :]
    m00 = (ok_p & oky0 & okx0)[None, :]
    m01 = (ok_p & oky0 & okx1)[None, :]
    m10 = (ok_p & oky1 & okx0)[None, :]
    m11 = (ok_p & oky1 & okx1)[None, :]
    return x0, y0, lx, ly, w00, w01, w10, w11, m00, m01, m10, m11


@triton.jit
def _gather(xc, off00, sxh, sxw, ok_c, m00, m01, m10, m11):
    """The four corners of each pixel for a block of channels, fp32, 0 where outside."""
    v00 = tl.load(xc + off00, mask=ok_c & m00, other=0.0).to(tl.float32)
    v01 = tl.load(xc + off00 + sxw, mask=ok_c & m01, other=0.0).to(tl.float32)
    v10 = tl.load(xc + off00 + sxh, mask=ok_c & m10, other=0.0).to(tl.float32)
    v11 = tl.load(xc + off00 + sxh + sxw, mask=ok_c & m11, other=0.0).to(tl.float32)
    return v00, v01, v10, v11


@triton.jit
def _flow_warp_fwd_kernel(
    x_ptr,
    flow_ptr,
    out_ptr,
    C,
    h,
    w,
    scale_x,
    scale_y,
    sxn,
    sxc,
    sxh,
    sxw,
    sfn,
    sfc,
    sfh,
    sfw,
    son,
    soc,
    soh,
    sow,
    BORDER: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)  # (P,)
    ok_p = p < h * w
    i = p // w
    j = p % w

    ix, iy, _, _ = _sample_position(
        i, j, flow_ptr + n * sfn, sfc, sfh, sfw, h, w, scale_x, scale_y, ok_p, BORDER
    )
    x0, y0, lx, ly, w00, w01, w10, w11, m00, m01, m10, m11 = _corners(ix, iy, h, w, ok_p)
    off00 = (y0 * sxh + x0 * sxw)[None, :]
    o_off = (i * soh + j * sow)[None, :]

    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # (C_blk,)
    ok_c = (cc < C)[:, None]
    xc = x_ptr + n * sxn + (cc.to(tl.int64) * sxc)[:, None]  # (C_blk, 1) pointers
    v00, v01, v10, v11 = _gather(xc, off00, sxh, sxw, ok_c, m00, m01, m10, m11)
    val = w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11
    oc = out_ptr + n * son + (cc.to(tl.int64) * soc)[:, None]
    tl.store(oc + o_off, val.to(out_ptr.dtype.element_ty), mask=ok_c & ok_p[None, :])


@triton.jit
def _flow_warp_bwd_kernel(
    gout_ptr,
    x_ptr,
    flow_ptr,
    gx_ptr,
    gflow_ptr,
    C,
    h,
    w,
    scale_x,
    scale_y,
    sgn,
    sgc,
    sgh,
    sgw,
    sxn,
    sxc,
    sxh,
    sxw,
    sfn,
    sfc,
    sfh,
    sfw,
    sdn,
    sdc,
    sdh,
    sdw,
    BORDER: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # grad_x (fp32, strides sd*: x's memory format) gets the four weighted scatters; grad_flow
    # (fp32, contiguous (n, 2, h, w)) gets sum_c g * d(sample)/d(position), chained through the
    # clamp.
    pid_p = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    ok_p = p < h * w
    i = p // w
    j = p % w

    ix, iy, gclip_x, gclip_y = _sample_position(
        i, j, flow_ptr + n * sfn, sfc, sfh, sfw, h, w, scale_x, scale_y, ok_p, BORDER
    )
    x0, y0, lx, ly, w00, w01, w10, w11, m00, m01, m10, m11 = _corners(ix, iy, h, w, ok_p)
    ly1 = ly[None, :]
    lx1 = lx[None, :]
    off00 = (y0 * sxh + x0 * sxw)[None, :]
    g_off = (i * sgh + j * sgw)[None, :]
    # Skip the scatter of corners whose weight is 0 (3 of 4 for integer flows).
    d00 = (y0 * sdh + x0 * sdw)[None, :]
    a00 = m00 & (w00 != 0.0)
    a01 = m01 & (w01 != 0.0)
    a10 = m10 & (w10 != 0.0)
    a11 = m11 & (w11 != 0.0)

    x_base = x_ptr + n * sxn
    g_base = gout_ptr + n * sgn
    gx_base = gx_ptr + n * sdn
    acc_x = tl.zeros((BLOCK_P,), dtype=tl.float32)
    acc_y = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        ok_c = (cc < C)[:, None]
        g = tl.load(
            g_base + (cc.to(tl.int64) * sgc)[:, None] + g_off, mask=ok_c & ok_p[None, :], other=0.0
        ).to(tl.float32)
        xc = x_base + (cc.to(tl.int64) * sxc)[:, None]
        v00, v01, v10, v11 = _gather(xc, off00, sxh, sxw, ok_c, m00, m01, m10, m11)
        # d(sample)/d(ix) and d(sample)/d(iy), out-of-range corners counted as 0.
        acc_x += tl.sum(g * ((1.0 - ly1) * (v01 - v00) + ly1 * (v11 - v10)), axis=0)
        acc_y += tl.sum(g * ((1.0 - lx1) * (v10 - v00) + lx1 * (v11 - v01)), axis=0)

        gxc = gx_base + (cc.to(tl.int64) * sdc)[:, None] + d00
        tl.atomic_add(gxc, g * w00, mask=ok_c & a00, sem="relaxed")
        tl.atomic_add(gxc + sdw, g * w01, mask=ok_c & a01, sem="relaxed")
        tl.atomic_add(gxc + sdh, g * w10, mask=ok_c & a10, sem="relaxed")
        tl.atomic_add(gxc + sdh + sdw, g * w11, mask=ok_c & a11, sem="relaxed")

    gf_base = gflow_ptr + n * 2 * h * w
    tl.store(gf_base + p, acc_x * gclip_x, mask=ok_p)
    tl.store(gf_base + h * w + p, acc_y * gclip_y, mask=ok_p)


# ----------------------------------------------------------------------------------------
# Launchers.

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _launch_check(x, flow, *more):
    if not x.is_cuda and not INTERPRET:
        raise RuntimeError(
            "flow_warp: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
            "triton is first imported for CPU tensors"
        )
    if any(t.device != x.device for t in (flow, *more)):
        raise ValueError(
            f"flow_warp: x and flow must be on one device, got {x.device} and {flow.device}"
        )
    if x.dtype not in _TRITON_DTYPES or flow.dtype not in _TRITON_DTYPES:
        raise ValueError(
            "flow_warp: the Triton kernel takes float32/bfloat16/float16, "
            f"got x {x.dtype}, flow {flow.dtype}"
        )
    for t in (x, flow, *more):
        # The within-image offsets are int32; per-image bases and channel offsets are int64.
        if (t.shape[2] - 1) * t.stride(2) + (t.shape[3] - 1) * t.stride(3) >= 2**31:
            raise ValueError(
                f"flow_warp: a {tuple(t.shape)} tensor with strides {t.stride()} "
                "is too large for int32 offsets"
            )


def _blocks(C):
    block_c = min(16, triton.next_power_of_2(C))
    block_p = min(1024, max(128, 2048 // block_c))
    return block_p, block_c


def _flow_warp_triton(x, flow, padding_mode):
    _launch_check(x, flow)
    n, C, h, w = x.shape
    out = torch.empty((n, C, h, w), device=x.device, dtype=x.dtype, memory_format=memory_format(x))
    if out.numel() == 0:
        return out
    block_p, block_c = _blocks(C)
    grid = (
        triton.cdiv(h * w, block_p),
        triton.cdiv(C, block_c),
        n,
    )  # batch-major: one image hot in L2
    _flow_warp_fwd_kernel[grid](
        x,
        flow,
        out,
        C,
        h,
        w,
        float(w > 1),
        float(h > 1),
        *x.stride(),
        *flow.stride(),
        *out.stride(),
        BORDER=padding_mode == "border",
        BLOCK_P=block_p,
        BLOCK_C=block_c,
        num_warps=4,
    )
    return out


def _flow_warp_backward_triton(grad_out, x, flow, padding_mode):
    n, C, h, w = x.shape
    # grad_x in x's memory format (scattered in fp32, then cast); grad_flow NCHW.
    grad_x = torch.empty(
        (n, C, h, w), device=x.device, dtype=torch.float32, memory_format=memory_format(x)
    ).zero_()
    grad_flow = torch.zeros((n, 2, h, w), device=x.device, dtype=torch.float32)
    _launch_check(x, flow, grad_out, grad_x)
    if n * h * w > 0:
        block_p, block_c = _blocks(C)
        grid = (triton.cdiv(h * w, block_p), n)
        _flow_warp_bwd_kernel[grid](
            grad_out,
            x,
            flow,
            grad_x,
            grad_flow,
            C,
            h,
            w,
            float(w > 1),
            float(h > 1),
            *grad_out.stride(),
            *x.stride(),
            *flow.stride(),
            *grad_x.stride(),
            BORDER=padding_mode == "border",
            BLOCK_P=block_p,
            BLOCK_C=block_c,
            num_warps=4,
        )
    return grad_x.to(x.dtype), grad_flow.to(flow.dtype)


# ----------------------------------------------------------------------------------------
# torch.library custom ops: opaque to torch.compile, differentiable through register_autograd.


@torch.library.custom_op("vsr::flow_warp", mutates_args=())
def _flow_warp_op(x: torch.Tensor, flow: torch.Tensor, padding_mode: str) -> torch.Tensor:
    return _flow_warp_triton(x, flow, padding_mode)


@_flow_warp_op.register_fake
def _(x, flow, padding_mode):
    return torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=memory_format(x))


@torch.library.custom_op("vsr::flow_warp_backward", mutates_args=())
def _flow_warp_backward_op(
    grad_out: torch.Tensor, x: torch.Tensor, flow: torch.Tensor, padding_mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return _flow_warp_backward_triton(grad_out, x, flow, padding_mode)


@_flow_warp_backward_op.register_fake
def _(grad_out, x, flow, padding_mode):
    return (
        torch.empty(x.shape, device=x.device, dtype=x.dtype, memory_format=memory_format(x)),
        flow.new_empty(flow.shape),
    )


def _setup_context(ctx, inputs, output):
    x, flow, padding_mode = inputs
    ctx.save_for_backward(x, flow)
    ctx.padding_mode = padding_mode


def _backward(ctx, grad_out):
    x, flow = ctx.saved_tensors
    grad_x, grad_flow = _flow_warp_backward_op(grad_out, x, flow, ctx.padding_mode)
    return grad_x, grad_flow, None


_flow_warp_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------
# Public function.


def flow_warp(x, flow, padding_mode="zeros", backend=None):
    """Warp x (n, c, h, w) by flow (n, 2, h, w); see the module docstring. backend: "triton",
    "torch", or None: the default of kernels.use_backend (automatic outside any block)."""
    _check(x, flow, padding_mode)
    triton_ = use_triton("flow_warp", backend, x)
    (x,), (flow,) = autocast_inputs(x, (x,), (flow,))
    if triton_:
        return _flow_warp_op(x, flow, padding_mode)
    return flow_warp_reference(x, flow, padding_mode)


# ----------------------------------------------------------------------------------------
# ONNX: vsr::flow_warp as GridSample on the reference's grid, for torch.onnx.export(dynamo=True,
# custom_translation_table=...). The grid is built from the flow's runtime shape, so one exported
# file takes any frame size.


def onnx_translations(opset):
    """{torch op: ONNX Script function} for vsr::flow_warp at `opset` (>= 19)."""
    from onnx import TensorProto

    from .common import onnx_opset

    op = onnx_opset(opset)
    mode = "bilinear" if opset < 20 else "linear"  # GridSample-20 renamed the mode

    def axis(shape, d, view):
        """(size as float (1,), positions 0..size-1 shaped `view`) of dim d."""
        size = op.Cast(op.Slice(shape, [d], [d + 1]), to=TensorProto.FLOAT)
        pos = op.Range(
            op.Constant(value_float=0.0), op.Squeeze(size, [0]), op.Constant(value_float=1.0)
        )
        return size, op.Reshape(pos, view)

    def normalised(pos, size):
        # the reference's pinning (NaN and far-outside positions go to -2, just outside), then
        # grid_sample's align_corners=True coordinates; a 1-pixel axis collapses to 0
        pos = op.Where(op.Greater(pos, -2.0), pos, op.Constant(value_float=-2.0))
        pos = op.Where(op.Less(pos, op.Add(size, 1.0)), pos, op.Add(size, 1.0))
        return op.Sub(
            op.Div(op.Mul(pos, 2.0), op.Max(op.Sub(size, 1.0), op.Constant(value_float=1.0))), 1.0
        )

    def flow_warp(x, flow, padding_mode):
        shape = op.Shape(flow)
        h, ys = axis(shape, 2, [1, 1, -1, 1])
        w, xs = axis(shape, 3, [1, 1, 1, -1])
        gx = normalised(op.Add(op.Slice(flow, [0], [1], [1]), xs), w)  # (n, 1, h, w)
        gy = normalised(op.Add(op.Slice(flow, [1], [2], [1]), ys), h)
        grid = op.Transpose(op.Concat(gx, gy, axis=1), perm=[0, 2, 3, 1])  # (n, h, w, 2): x, y
        return op.GridSample(x, grid, align_corners=1, mode=mode, padding_mode=padding_mode)

    return {torch.ops.vsr.flow_warp.default: flow_warp}
