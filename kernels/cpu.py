"""The CPU path of the modulated deformable convolution: deform_conv2d_reference's arithmetic
(mmcv's modulated_deform_conv2d: bilinear samples, zero outside the map, times the mask, then one
GEMM) without its full-frame temporaries.

The reference materialises every intermediate of the column matrix (c_in*K rows by ho*wo
columns: 265 MB per call at BasicVSR++'s 128 channels and 180x320) about a dozen times: gathers,
clamps, masks, products, sums, each a fresh page-faulting buffer. Here everything is done a tile
of output rows at a time: the sampling positions (G*K per pixel, c_in/G times fewer than the
columns), one F.grid_sample (ATen's vectorised bilinear sampler, which reads zero outside the map
like the reference) that gathers the tile's columns, a product with the mask and one addmm, so a
tile's temporaries stay a few MB. Autograd runs through these ops. BasicVSR++'s flow-guided op
also makes its offsets and mask (tanh, sigmoid, the flows added) tile by tile, through
deform_conv2d_by_rows. (The reference under torch.compile, one fused C++ loop for the columns,
measured ~2.7x slower than this on one thread at BasicVSR++'s layer, after ~25 s of
compilation.)

Positions go through grid_sample's normalised coordinates (align_corners=False: p -> (2p+1)/size
- 1 and back), which moves them by a few fp32 ulps of the pixel coordinate: outputs differ from
the reference by up to ~2e-5 relative on white-noise features, and a position that lands
exactly on an integer may take the bilinear cell on the other side of it (same value; that
cell's one-sided offset gradient).
"""

import torch
import torch.nn.functional as F

from .common import memory_format

# Column-matrix elements per tile (c_in*K rows x tile columns): 4 MB of fp32. At BasicVSR++'s
# layer, 2^20 to 2^22 run alike and the whole frame in one tile (2^26) ~1.8x slower.
TILE_ELEMENTS = 1 << 20


def deform_conv2d_cpu(x, offset, mask, weight, bias, stride, padding, dilation, deform_groups):
    """deform_conv2d_reference's result, tile by tile; arguments already checked (stride, padding,
    dilation as pairs). Returns (n, c_out, ho, wo) in x's dtype and memory format."""

    def offset_and_mask(i, rows):
        return offset[i, :, rows], mask[i, :, rows]

    size = offset.shape[2:]
    conv = (stride, padding, dilation, deform_groups)
    return deform_conv2d_by_rows(x, offset_and_mask, size, weight, bias, *conv)


def deform_conv2d_by_rows(
    x, offset_and_mask, size, weight, bias, stride, padding, dilation, deform_groups
):
    """deform_conv2d_cpu with the offsets and mask made a tile at a time: offset_and_mask(i, rows)
    returns sample i's offset (2GK, r, wo) and mask (GK, r, wo) at the output rows `rows` (a
    slice of r rows), in mmcv's layouts; size = (ho, wo). BasicVSR++'s op makes them there from
    the offset branch's output, so that its tanh, sigmoid and flow addition also run on a tile's
    few hundred KB instead of a full frame's tens of MB."""
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    G, K = deform_groups, kh * kw
    cg = c_in // G
    ho, wo = size
    acc = torch.promote_types(x.dtype, torch.float32)  # positions and samples, as the reference
    dev = x.device

    base_y = (torch.arange(ho, device=dev) * stride[0] - padding[0]).to(acc).view(ho, 1)
    base_x = (torch.arange(wo, device=dev) * stride[1] - padding[1]).to(acc)
    tap_y = (torch.arange(kh, device=dev) * dilation[0]).to(acc).repeat_interleave(kw)
    tap_x = (torch.arange(kw, device=dev) * dilation[1]).to(acc).repeat(kh)
    base_y = tap_y.view(K, 1, 1) + base_y  # (K, ho, 1): tap k = i*kw + j of output row
    base_x = tap_x.view(K, 1, 1) + base_x  # (K, 1, wo)

    # x as (n, G, cg, h, w) with each group's map channels-last (the cg channels of a pixel
    # side by side), whatever x's layout: grid_sample then reads a sample's channels from one or
    # two cache lines. Measured on a tile at BasicVSR++'s layer: ~1.6x faster than sampling a
    # channels-last x (all groups' channels interleaved), a little faster than NCHW planes.
    xg = x.unflatten(1, (G, cg)).permute(0, 1, 3, 4, 2)
    xg = xg.to(acc).contiguous().permute(0, 1, 4, 2, 3)
    wmat = weight.reshape(c_out, c_in * K).to(x.dtype)  # column c*K + k, as weight.flatten(1)
    b = None if bias is None else bias.to(x.dtype).view(c_out, 1)
    rows = max(1, min(ho, TILE_ELEMENTS // (c_in * K * wo)))
    outs = []
    for i in range(n):
        for r0 in range(0, ho, rows):
            r = slice(r0, min(ho, r0 + rows))
            offset, mask = offset_and_mask(i, r)
            off = offset.view(G, K, 2, -1, wo)
            # Sampling positions (G, K, rows, wo) in grid_sample's coordinates; a sample outside
            # (-1, h) x (-1, w), NaN included, is parked at -2, where all four corners read 0.
            py = off[:, :, 0].to(acc) + base_y[:, r]
            px = off[:, :, 1].to(acc) + base_x
            inside = (py > -1) & (px > -1) & (py < h) & (px < w)
            gy = torch.where(inside, py * (2.0 / h) + (1.0 / h - 1.0), -3.0 / h - 1.0)
            gx = torch.where(inside, px * (2.0 / w) + (1.0 / w - 1.0), -3.0 / w - 1.0)
            grid = torch.stack((gx, gy), dim=-1).view(G, -1, wo, 2)  # (G, K*rows, wo, 2)
            m = torch.where(inside, mask.view(G, K, -1, wo).to(acc), 0.0)
            cols = F.grid_sample(xg[i], grid, align_corners=False)  # (G, cg, K*rows, wo)
            # in place: grid_sample's backward does not need its output
            cols = cols.view(G, cg, K, -1, wo).mul_(m.view(G, 1, K, -1, wo))
            cols = cols.view(c_in * K, -1).to(x.dtype)
            out = wmat @ cols if b is None else torch.addmm(b, wmat, cols)
            outs.append(out.view(c_out, -1, wo))
    out = torch.cat(outs, dim=1).view(c_out, n, ho, wo).transpose(0, 1)
    return out.contiguous(memory_format=memory_format(x))
