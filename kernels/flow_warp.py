"""Backward warping with an optical flow: out[p] = x[p + flow(p)], bilinear.

flow is (n, 2, h, w) in pixels, channel 0 = dx, channel 1 = dy. Semantics are those of
F.grid_sample(bilinear, align_corners=True) on the grid built from the flow, which is what
mmagic's flow_warp does.
"""
import torch
import torch.nn.functional as F


def _check(x, flow, padding_mode):
    if x.dim() != 4 or flow.dim() != 4 or flow.shape[1] != 2:
        raise ValueError(f"flow_warp: expected x (n, c, h, w) and flow (n, 2, h, w), got {tuple(x.shape)} and {tuple(flow.shape)}")
    if x.shape[0] != flow.shape[0] or x.shape[-2:] != flow.shape[-2:]:
        raise ValueError(f"flow_warp: x {tuple(x.shape)} and flow {tuple(flow.shape)} differ in batch or spatial size")
    if padding_mode not in ("zeros", "border"):
        raise ValueError(f"flow_warp: padding_mode must be 'zeros' or 'border', got {padding_mode!r}")


# ----------------------------------------------------------------------------------------
# PyTorch reference: the CPU path and the test oracle.

def flow_warp_reference(x, flow, padding_mode="zeros"):
    _check(x, flow, padding_mode)
    n, _, h, w = x.shape
    acc = torch.promote_types(x.dtype, torch.float32)
    # Positions in fp32 whatever x's dtype: bf16 cannot hold pixel coordinates (kernels.md §4.3).
    grid_y, grid_x = torch.meshgrid(torch.arange(h, device=x.device, dtype=acc),
                                    torch.arange(w, device=x.device, dtype=acc), indexing="ij")
    gx = grid_x + flow[:, 0].to(acc)
    gy = grid_y + flow[:, 1].to(acc)
    grid = torch.stack((2.0 * gx / max(w - 1, 1) - 1.0, 2.0 * gy / max(h - 1, 1) - 1.0), dim=3)
    out = F.grid_sample(x.to(acc), grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------------------
# Public function.

def flow_warp(x, flow, padding_mode="zeros", backend=None):
    """Warp x (n, c, h, w) by flow (n, 2, h, w); see the module docstring."""
    _check(x, flow, padding_mode)
    if backend not in (None, "torch", "triton"):
        raise ValueError(f"flow_warp: backend must be None, 'torch' or 'triton', got {backend!r}")
    if backend == "triton" or (backend is None and x.is_cuda):
        raise NotImplementedError("flow_warp: Triton kernel not landed yet")
    return flow_warp_reference(x, flow, padding_mode)
