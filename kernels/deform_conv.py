"""Modulated deformable convolution (DCNv2) with mmcv's layout and conventions.

x       (n, c_in, h, w)
offset  (n, G*2*K, ho, wo), channel g*2K + 2k + (0: dy, 1: dx), K = kh*kw, k = i*kw + j
mask    (n, G*K, ho, wo),   channel g*K + k
weight  (c_out, c_in, kh, kw); input channels split evenly over the G deform groups.
A sample not strictly inside (-1, h) x (-1, w) contributes 0 and gets no offset/mask gradient.
"""
import torch
from torch.nn.modules.utils import _pair


def _check(x, offset, mask, weight, bias, stride, padding, dilation, deform_groups):
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"deform_conv2d: x and weight must be 4-d, got {tuple(x.shape)} and {tuple(weight.shape)}")
    n, c_in, h, w = x.shape
    c_out, c_w, kh, kw = weight.shape
    if c_w != c_in:
        raise ValueError(f"deform_conv2d: weight expects {c_w} input channels, x has {c_in} (groups must be 1)")
    if deform_groups < 1 or c_in % deform_groups:
        raise ValueError(f"deform_conv2d: {c_in} input channels do not split into {deform_groups} deform groups")
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"deform_conv2d: input {h}x{w} is too small for kernel {kh}x{kw} with this padding")
    K = kh * kw
    if tuple(offset.shape) != (n, deform_groups * 2 * K, ho, wo):
        raise ValueError(f"deform_conv2d: offset must be {(n, deform_groups * 2 * K, ho, wo)}, got {tuple(offset.shape)}")
    if tuple(mask.shape) != (n, deform_groups * K, ho, wo):
        raise ValueError(f"deform_conv2d: mask must be {(n, deform_groups * K, ho, wo)}, got {tuple(mask.shape)}")
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"deform_conv2d: bias must be ({c_out},), got {tuple(bias.shape)}")
    return ho, wo


# ----------------------------------------------------------------------------------------
# PyTorch reference: the CPU path and the test oracle. It builds the im2col matrix, which
# is fine on a CPU and exactly what the Triton kernel avoids.

def deform_conv2d_reference(x, offset, mask, weight, bias=None, stride=1, padding=0, dilation=1, deform_groups=1):
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
    tap_y = (torch.arange(kh, device=dev) * dilation[0]).to(acc).repeat_interleave(kw)  # k = i*kw + j
    tap_x = (torch.arange(kw, device=dev) * dilation[1]).to(acc).repeat(kh)
    off = offset.to(acc).view(n, G, K, 2, ho, wo)
    py = base_y.view(1, 1, 1, ho, 1) + tap_y.view(1, 1, K, 1, 1) + off[:, :, :, 0]
    px = base_x.view(1, 1, 1, 1, wo) + tap_x.view(1, 1, K, 1, 1) + off[:, :, :, 1]

    inside = (py > -1) & (px > -1) & (py < h) & (px < w)
    y0, x0 = torch.floor(py), torch.floor(px)
    ly, lx = py - y0, px - x0
    y0, x0 = y0.long(), x0.long()

    xg = x.reshape(n, G, cg, h * w).to(acc)
    cols = x.new_zeros((n, G, cg, K * ho * wo), dtype=acc)
    for dy, dx, wt in ((0, 0, (1 - ly) * (1 - lx)), (0, 1, (1 - ly) * lx), (1, 0, ly * (1 - lx)), (1, 1, ly * lx)):
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
    return out.view(n, c_out, ho, wo)


# ----------------------------------------------------------------------------------------
# Public function.

def deform_conv2d(x, offset, mask, weight, bias=None, stride=1, padding=0, dilation=1, deform_groups=1, backend=None):
    """Modulated deformable convolution; see the module docstring for layouts."""
    if backend not in (None, "torch", "triton"):
        raise ValueError(f"deform_conv2d: backend must be None, 'torch' or 'triton', got {backend!r}")
    if backend == "triton" or (backend is None and x.is_cuda):
        raise NotImplementedError("deform_conv2d: Triton kernel not landed yet")
    return deform_conv2d_reference(x, offset, mask, weight, bias, stride, padding, dilation, deform_groups)
