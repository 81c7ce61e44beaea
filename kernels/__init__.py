"""The two irregular ops of BasicVSR++ and RealBasicVSR, each a Triton kernel with its
PyTorch reference beside it. `backend=None` runs Triton on CUDA tensors and the reference
otherwise; "triton" forces the kernel (CPU tensors need TRITON_INTERPRET=1); "torch" forces
the reference."""
from .deform_conv import deform_conv2d, deform_conv2d_reference
from .flow_warp import flow_warp, flow_warp_reference

__all__ = ["deform_conv2d", "deform_conv2d_reference", "flow_warp", "flow_warp_reference"]
