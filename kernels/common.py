"""What deform_conv.py, flow_warp.py and cpu.py share: the memory-format rule of their outputs,
the choice between the Triton kernel, the CPU path and the PyTorch reference, and the casts under
torch.autocast."""

import torch
import triton

BACKENDS = (None, "torch", "triton")
# Read once, before the kernels are decorated: TRITON_INTERPRET=1 must be set before triton's
# first import for the kernels to run on CPU tensors.
INTERPRET = bool(triton.knobs.runtime.interpret)


def memory_format(x):
    """torch.channels_last where x's strides order its dims C, W, H, N from fastest to slowest, else
    torch.contiguous_format: torch's suggest_memory_format rule, so a layout the strides leave
    ambiguous (1x1 maps, or one channel, of an NCHW tensor) stays NCHW. Real and fake paths of
    both ops take their output layouts from it, so torch.compile sees the strides they return."""
    if x.dim() != 4 or x.stride(1) == 0:
        return torch.contiguous_format
    least = 0
    for d in (1, 3, 2, 0):
        if x.shape[d] == 0 or x.stride(d) < least or (d == 0 and least == x.stride(1)):
            return torch.contiguous_format
        least = x.stride(d) * x.shape[d]
    return torch.channels_last


def exporting():
    """Whether torch.export (and so torch.onnx.export(dynamo=True)) is tracing: the ops then
    appear as their torch.library custom ops (vsr::*) whatever the device, never as the
    reference's loops."""
    return torch.compiler.is_exporting()


def use_triton(op, backend, x):
    """Whether `backend` (an op's argument: None, "torch" or "triton") means the Triton kernel for
    x. None is kernels.use_backend's default, which outside any block is Triton for CUDA
    tensors."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be None, 'torch' or 'triton', got {backend!r}")
    backend = _default_if_none(backend)
    if exporting():
        return True  # the custom ops: torch.export traces their fakes, ONNX export translates them
    triton_ = backend == "triton" or (backend is None and x.is_cuda)
    if triton_ and not x.is_cuda and not INTERPRET:
        raise RuntimeError(
            f"{op}: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set "
            "before triton is imported to run on the CPU"
        )
    return triton_


def use_cpu_path(backend, x):
    """For an op that does not run its Triton kernel (use_triton is False): whether it takes its
    CPU path (kernels.cpu) rather than the PyTorch reference. The default does for CPU tensors
    (backend None, and kernels.use_backend's None); "torch" forces the reference."""
    return _default_if_none(backend) is None and x.device.type == "cpu"


def _default_if_none(backend):
    """An op's `backend` argument, or kernels.use_backend's default where it is None."""
    if backend is None:
        from . import get_backend  # the package is loaded by the time an op runs

        backend = get_backend()
    return backend


def autocast_inputs(x, low, fp32):
    """(low, fp32) as the ops run them. Under torch.autocast on x's device: `low` (features,
    weights) in the autocast dtype and `fp32` (offsets, flows: sampling positions) in float32.
    Otherwise `low` in x's dtype and `fp32` unchanged. None entries stay None."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        fp32 = [None if t is None else t.to(torch.float32) for t in fp32]
    else:
        dtype = x.dtype
    return [None if t is None else t.to(dtype) for t in low], list(fp32)


def onnx_opset(version):
    """ONNX Script's default-domain opset `version` (19 and up: DeformConv), for the ops' ONNX
    translations; onnxscript is imported only when a model is exported."""
    if version < 19:
        raise ValueError(f"ONNX export: opset {version} has no DeformConv; use 19 or later")
    import onnxscript

    try:
        return getattr(onnxscript, f"opset{version}")
    except AttributeError:
        raise ValueError(
            f"ONNX export: onnxscript {onnxscript.__version__} does not know opset {version}"
        ) from None
