"""The two irregular ops of BasicVSR++ and RealBasicVSR, each a Triton kernel with its
PyTorch reference beside it; the deformable convolution also has a CPU path (cpu.py), the
reference's arithmetic a tile of output rows at a time.

    deform_conv2d(x, offset, mask, weight, bias=None, stride=1, padding=0, dilation=1,
                  deform_groups=1, backend=None)          # mmcv modulated_deform_conv2d
    flow_warp(x, flow, padding_mode="zeros", backend=None) # flow (n, 2, h, w): dx, dy in pixels
    flow_guided_deform_conv2d(x, conv_offset, flows, weight, bias=None, max_residue_magnitude=10.0,
                              stride=1, padding=0, dilation=1, deform_groups=1, backend=None)
    memory_format(x)  # torch.channels_last or torch.contiguous_format: the ops' output layout

flow_guided_deform_conv2d is deform_conv2d with BasicVSR++'s offset/mask glue fused into the
kernel. conv_offset (n, 3*G*K, ho, wo) is the raw output of the offset branch: offset logits
in the offset layout, then mask logits in the mask layout. flows (n, 2F, ho, wo) holds F flows
(dx, dy each); deform group g adds flow g // (G // F) (BasicVSR++: torch.cat([flow_1, flow_2], 1)).
offset = max_residue_magnitude * tanh(offset logits) + flow as (dy, dx), mask = sigmoid(mask
logits), both in fp32. Its reference is flow_guided_offsets(conv_offset, flows,
max_residue_magnitude, deform_groups, taps) -> (offset, mask), followed by
deform_conv2d_reference.

backend: "triton" forces the kernel (CPU tensors need TRITON_INTERPRET=1 set before triton is
imported), "torch" forces the reference, None takes the default below.

Default backend. `backend=None` means the default set by `use_backend`, which switches whole
models without touching their code:

    with kernels.use_backend("torch"):     # the same network on the PyTorch references
        out = model(lqs)

Outside any `use_backend` block, and inside `use_backend(None)`, None means Triton for CUDA
tensors, and for CPU tensors the CPU path (the flow-guided op: flow_guided_offsets, then the
CPU path; flow_warp: its reference, already ATen's grid_sample). An explicit `backend=`
argument always wins. The default is process-wide (every thread sees it, autograd's included);
the previous one is restored when the block exits, also on an exception. The choice is made in
the forward call, so a backward pass follows its forward's backend wherever it runs.
"""

import contextlib

from .common import BACKENDS, memory_format

_default_backend = None


def get_backend():
    """The backend that `backend=None` currently means: None (automatic), "torch" or "triton"."""
    return _default_backend


@contextlib.contextmanager
def use_backend(backend):
    """Within the block, ops called with backend=None use `backend` ("torch", "triton" or None)."""
    global _default_backend
    if backend not in BACKENDS:
        raise ValueError(
            f"kernels.use_backend: backend must be None, 'torch' or 'triton', got {backend!r}"
        )
    previous, _default_backend = _default_backend, backend
    try:
        yield
    finally:
        _default_backend = previous


# Imported after get_backend exists: the public functions look it up at call time.
from .deform_conv import (  # noqa: E402
    deform_conv2d,
    deform_conv2d_reference,
    flow_guided_deform_conv2d,
    flow_guided_offsets,
)
from .flow_warp import flow_warp, flow_warp_reference  # noqa: E402


def onnx_translations(opset=20):
    """custom_translation_table for torch.onnx.export(dynamo=True) of a model that calls these ops:
    DeformConv (opset >= 19) for both convolutions, GridSample for flow_warp. While torch.export
    traces, the ops appear as their custom ops (vsr::*) whatever the device (common.exporting)."""
    from .deform_conv import onnx_translations as deform_conv_onnx
    from .flow_warp import onnx_translations as flow_warp_onnx

    return {**deform_conv_onnx(opset), **flow_warp_onnx(opset)}


__all__ = [
    "deform_conv2d",
    "deform_conv2d_reference",
    "flow_guided_deform_conv2d",
    "flow_guided_offsets",
    "flow_warp",
    "flow_warp_reference",
    "memory_format",
    "get_backend",
    "onnx_translations",
    "use_backend",
]
