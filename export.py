"""ONNX export of every network, and the exported file run by onnxruntime.

export_onnx unrolls the recurrences over a fixed window of frames, with height and width dynamic;
the two irregular ops become ONNX DeformConv and GridSample (kernels.onnx_translations).
OnnxNetwork runs such a file as a torch module, so upscale() streams videos through it unchanged.
"""

import contextlib
import os
import sys

import torch

from files import atomic_path
from realbasicvsr import RealBasicVSR
from weights import min_input_size, scale_of

ONNX_FRAMES = 15  # the window of an exported file, unless --frames
ONNX_OPSET = 20  # DeformConv exists from opset 19
# onnxruntime's execution providers by --provider; each falls back to those listed before it
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class _CleanedOnce(torch.nn.Module):
    """RealBasicVSR without its data-dependent branch: extra cleaning passes (refine_thres < 255)
    as torch.where over three; else one pass, as the default threshold 255 (1.0) gives in training
    and the official inference (ckkelvinchan/RealBasicVSR): a mean |residue| >= 1 is nonsense."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, lqs):
        lqs, residue = self.net.clean(lqs)
        if self.net.dynamic_refine_thres < 1:
            lqs_2, residue_2 = self.net.clean(lqs)
            lqs_2 = torch.where(
                residue_2 < self.net.dynamic_refine_thres, lqs_2, self.net.clean(lqs_2)[0]
            )
            lqs = torch.where(residue < self.net.dynamic_refine_thres, lqs, lqs_2)
        return self.net.basicvsr(lqs)


def export_onnx(model, path, frames=ONNX_FRAMES, opset=ONNX_OPSET, size=None):
    """Write `model` to `path` as ONNX, atomically: lqs (1, frames, 3, h, w) -> (1, frames, 3,
    s*h, s*w), fp32, h and w dynamic (x1 models: multiples of 4, >= 256) or fixed at size=(h, w)
    (a file for that frame size only; it exports ~3x faster). Both flows are computed (no mirror
    detection). metadata_props: network, scale, min_size, mid_channels, read by OnnxNetwork."""
    import kernels

    if not isinstance(frames, int) or frames < 2:
        raise ValueError(f"--frames must be an integer >= 2, got {frames!r}")
    model = model.cpu().float().eval()
    s = scale_of(model)
    dims = [
        4 * torch.export.Dim(n, min=64, max=4096)  # x1: multiples of 4, >= 256
        if s == 1
        else torch.export.Dim(n, min=max(2, min_input_size(model)), max=4096)
        for n in ("h", "w")
    ]
    lqs = torch.rand(1, frames, 3, *(size or ((256, 260) if s == 1 else (64, 72))))
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        program = torch.onnx.export(
            _CleanedOnce(model).eval() if isinstance(model, RealBasicVSR) else model,
            (lqs,),
            dynamo=True,
            opset_version=opset,
            input_names=["lqs"],
            output_names=["output"],
            dynamic_shapes=None if size else ({3: dims[0], 4: dims[1]},),
            optimize=False,
            custom_translation_table=kernels.onnx_translations(opset),
        )
    inner = model.basicvsr if isinstance(model, RealBasicVSR) else model
    program.model.metadata_props.update(
        network=type(model).__name__,
        scale=str(s),
        min_size=str(min_input_size(model)),
        mid_channels=str(inner.mid_channels),
    )
    with atomic_path(path) as tmp:
        program.save(tmp, external_data=False)


class OnnxNetwork(torch.nn.Module):
    """A file of export_onnx run by onnxruntime: forward(lqs (1, t, 3, h, w)), t up to the
    exported window. A shorter window (a scene's last) is padded in time by mirroring (frames
    t-2, t-3, ...; their outputs dropped): no frame is neutral to a recurrent network, and
    mirrored clips are what it saw in training. Only kept frames near the padding differ from the
    PyTorch run, as extra context frames would."""

    def __init__(self, path, provider="cpu"):
        super().__init__()
        import onnxruntime as ort

        if not os.path.isfile(path):
            raise FileNotFoundError(f"--onnx {path}: no such file (write one with --export)")
        if PROVIDERS[provider] not in ort.get_available_providers():
            raise ValueError(
                f"--provider {provider}: this onnxruntime has no {PROVIDERS[provider]} (only "
                f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu in place of "
                f"onnxruntime{' and TensorRT' if provider == 'tensorrt' else ''}"
            )
        # the provider, then those before it in PROVIDERS: TensorRT falls back to CUDA, then CPU
        providers = list(PROVIDERS.values())[list(PROVIDERS).index(provider) :: -1]
        try:
            self.session = ort.InferenceSession(path, providers=providers)
            meta = self.session.get_modelmeta().custom_metadata_map
            self.network = meta["network"]
            self.scale = int(meta["scale"])
            self.min_size = int(meta["min_size"])
            self.mid_channels = int(meta["mid_channels"])
            self.frames = self.session.get_inputs()[0].shape[1]
        except Exception as e:  # not ONNX, or not written by export_onnx
            raise ValueError(
                f"--onnx {path}: not a network exported by upscale.py --export "
                f"({type(e).__name__}: {str(e)[:120]})"
            ) from None

    def forward(self, lqs):
        t = lqs.shape[1]
        period = max(1, 2 * (t - 1))  # frame i >= t is frame period - i (mirrored, periodic)
        index = [min(i % period, period - i % period) for i in range(self.frames)]
        (out,) = self.session.run(None, {"lqs": lqs[:, index].float().cpu().numpy()})
        return torch.from_numpy(out[:, :t])
