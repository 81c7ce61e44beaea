"""The whole models on a CUDA GPU (skipped without one), Triton vs the reference path; the op-level
CUDA tests are in test_deform_conv.py and test_flow_warp.py.

- BasicVSR++, BasicVSR and RealBasicVSR, use_backend("triton") vs ("torch"), TF32 off:
  fp32 outputs: max |diff| <= 1e-4 x max |reference - bilinear x4 of the input| (what the
  network adds to its skip); BasicVSR++'s parameter gradients within rel 1e-3 (all gradients
  as one vector, max |diff| / max |reference|); bf16 (autocast) outputs: the RMS error against
  the fp32 reference at most 2x the reference path's own bf16 RMS error + 1e-3;
- BasicVSR++ converted to channels-last vs NCHW, both on Triton: outputs max |diff| <= 1e-4
  (fp32) / 2e-2 (bf16), eager and compiled; parameter gradients within rel 5e-3.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import basicvsr
import bench
import kernels
from helpers import cuda, rel


# ----------------------------------------------------------------------------------------
# CUDA: whole models, Triton vs the reference path.

def build_model(arch):
    if arch == "basicvsr":
        torch.manual_seed(0)
        return bench.realistic_init(basicvsr.BasicVSR())
    return bench.build_network(arch, {})


@pytest.fixture
def no_tf32():
    # TF32 convolutions would round the two paths' slightly different features differently.
    saved = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    yield
    torch.backends.cudnn.allow_tf32 = saved[0]
    torch.set_float32_matmul_precision(saved[1])


def rms(a, b):
    return (a.double() - b.double()).square().mean().sqrt().item()


@cuda
@pytest.mark.parametrize("arch", ["basicvsrpp", "basicvsr", "realbasicvsr"])
def test_cuda_model_outputs_triton_vs_reference(arch, no_tf32):
    net = build_model(arch).cuda().eval()
    lqs = bench.moving_clip(5, 64, 96).cuda()
    outs = {}
    for backend in ("triton", "torch"):
        for dtype in (None, torch.bfloat16):
            with kernels.use_backend(backend), torch.inference_mode(), \
                    torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                outs[backend, dtype] = net(lqs).float()
    ref = outs["torch", None]
    assert torch.isfinite(outs["triton", torch.bfloat16]).all()
    # Relative to what the network adds to its bilinear x4 skip (~0.05 here, the output ~1).
    skip = F.interpolate(lqs.flatten(0, 1), scale_factor=4, mode="bilinear", align_corners=False).view_as(ref)
    err = (outs["triton", None] - ref).abs().max() / (ref - skip).abs().max()
    assert err <= 1e-4, err.item()
    err_triton, err_ref = rms(outs["triton", torch.bfloat16], ref), rms(outs["torch", torch.bfloat16], ref)
    assert err_triton <= 2 * err_ref + 1e-3, (err_triton, err_ref)


@cuda
def test_cuda_basicvsrpp_gradients_triton_vs_reference(no_tf32):
    net = build_model("basicvsrpp").cuda().train()
    lqs = bench.moving_clip(3, 64, 64).cuda()
    target = F.interpolate(lqs[0], scale_factor=4, mode="bicubic", align_corners=False)[None]
    grads = {}
    for backend in ("triton", "torch"):
        net.zero_grad(set_to_none=True)
        with kernels.use_backend(backend):
            torch.sqrt((net(lqs) - target) ** 2 + 1e-12).mean().backward()
        grads[backend] = {name: p.grad.flatten() for name, p in net.named_parameters() if p.grad is not None}
    assert grads["triton"].keys() == grads["torch"].keys()
    assert rel(torch.cat(list(grads["triton"].values())), torch.cat(list(grads["torch"].values()))) <= 1e-3


@cuda
def test_cuda_compiled_and_host_cache_basicvsrpp_equal_eager(no_tf32):
    """The two Triton variants of the model benchmark compute the same network: compile_network
    (inductor around the Triton custom ops) and the pinned-host feature cache with its copy stream."""
    net = build_model("basicvsrpp").cuda().eval()
    lqs = bench.moving_clip(6, 64, 96).cuda()
    compiled = basicvsr.compile_network(copy.deepcopy(net))
    for dtype in (None, torch.bfloat16):
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            eager = net(lqs).float()
            out_compiled = compiled(lqs).float()
            net.cpu_cache_length = 0
            out_cached = net(lqs).float()
            net.cpu_cache_length = 100
        assert out_cached.device.type == "cpu"
        tol = 1e-4 if dtype is None else 2e-2  # bf16: inductor fuses and rounds the glue differently
        assert (out_compiled - eager).abs().max().item() <= tol
        assert (out_cached - eager.cpu()).abs().max().item() <= 1e-6  # the same kernels in the same order


@cuda
def test_cuda_channels_last_basicvsrpp_equals_nchw(no_tf32):
    """The "triton + channels_last" variant (--channels-last) computes the same network: outputs in
    fp32 and bf16, compiled too, and the parameter gradients of a training step; its propagation
    features stay channels-last."""
    cl = torch.channels_last
    net = build_model("basicvsrpp").cuda().eval()
    nhwc = copy.deepcopy(net).to(memory_format=cl)
    compiled = basicvsr.compile_network(copy.deepcopy(nhwc))
    lqs = bench.moving_clip(6, 64, 96).cuda()
    layouts = []
    hook = nhwc.backbone["forward_2"].register_forward_hook(
        lambda m, i, o: layouts.append(o.is_contiguous(memory_format=cl) and not o.is_contiguous()))
    for dtype in (None, torch.bfloat16):
        with kernels.use_backend("triton"), torch.inference_mode(), \
                torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            ref, out, out_compiled = net(lqs).float(), nhwc(lqs).float(), compiled(lqs).float()
        tol = 1e-4 if dtype is None else 2e-2  # bf16: other convolution algorithms, rounded differently
        assert (out - ref).abs().max().item() <= tol
        assert (out_compiled - ref).abs().max().item() <= tol
    hook.remove()
    assert len(layouts) == 2 * 6 and all(layouts)

    target = F.interpolate(lqs[0, :3], scale_factor=4, mode="bicubic", align_corners=False)[None]
    grads = []
    for model in (net.train(), nhwc.train()):
        model.zero_grad(set_to_none=True)
        with kernels.use_backend("triton"):
            torch.sqrt((model(lqs[:, :3]) - target) ** 2 + 1e-12).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    # 5e-3: the two layouts' convolutions sum in different orders, and conv_last's bias gradient is
    # a sum over every output pixel of terms of both signs (on the CPU, fp32: rel 9e-4 from it alone).
    assert rel(grads[1], grads[0]) <= 5e-3
