"""Helpers shared by the test files."""

import os

import pytest
import torch

import kernels
from kernels.bench import moving_clip

CL = torch.channels_last
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel(a, b):
    """Norm-wise relative error max|a - b| / max|b|, b the oracle (in float64)."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def is_cl(t):
    """Channels-last and not NCHW-contiguous: the layout is not ambiguous."""
    return t.is_contiguous(memory_format=CL) and not t.is_contiguous()


@torch.no_grad()
def tiny_alignment():
    """BasicVSR++'s op call sites in miniature, through basicvsr.py's own modules: SPyNet (warps
    inside), a feature warp, and the second-order deformable alignment (the DCN)."""
    import basicvsr
    import weights

    torch.manual_seed(0)
    spynet = weights.realistic_init(basicvsr.SPyNet())
    align = weights.realistic_init(
        basicvsr.SecondOrderDeformableAlignment(32, 16, deform_groups=16)
    )
    clip = moving_clip(2, 32, 32)[0]
    feat = torch.randn(1, 16, 32, 32)

    @torch.no_grad()
    def step():
        flow = spynet(clip[1:], clip[:1])
        cond = kernels.flow_warp(feat, flow)
        return align(torch.cat([feat, feat], 1), torch.cat([cond, feat, cond], 1), flow, flow)

    return step


KEYS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "keys")


def published_keys(name):
    """[(key, shape)] of a published checkpoint, from its vendored list tests/keys/<name>."""
    with open(os.path.join(KEYS_DIR, name)) as f:
        rows = [
            line.rstrip("\n").split("\t") for line in f if line.strip() and not line.startswith("#")
        ]
    return [(k, [int(s) for s in shape.strip("[]").split(",")]) for k, shape in rows]
