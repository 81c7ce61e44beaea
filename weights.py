"""Weights files: one reader for every published layout, strict loading, our safetensors that
name their network, and which network a file holds.

  safetensors (ours)        flat {key: tensor}; metadata "network" and "config" name the network
  mmagic / mmediting .pth   {"meta": ..., "state_dict": {"generator.<key>": ...}} (also
                            generator_ema., discriminator.)
  BasicSR .pth              {"params_ema" or "params": {...}}, SPyNet convs at
                            basic_module.{0,2,4,6,8} and upsamplers upconv1/upconv2 (renamed here)
  plain .pth                {key: tensor}
  standalone SPyNet files   no mean/std buffers: these constants are taken from the model

read_state_dict reads any of them as {mmagic key: tensor}; load_weights puts that into a network,
strictly; save_weights writes our safetensors (convert: any file to ours); network_of says which
network and size a file holds, and load_network builds it with its weights. scale_of and
min_input_size answer what upscale.py and export.py ask of a network, built or exported.
"""

import contextlib
import json
import os
import pickle
import re

import torch
import torch.nn as nn

from basicvsr import (
    BasicVSR,
    BasicVSRPlusPlus,
    SecondOrderDeformableAlignment,
    SPyNet,
    SPyNetBasicModule,
)
from files import atomic_path
from realbasicvsr import RealBasicVSR

# ----------------------------------------------------------------------------------------
# Reading: every layout -> {mmagic key: tensor}


def _is_safetensors(path):
    # 8-byte little-endian header length, then the JSON header
    with open(path, "rb") as f:
        head = f.read(9)
    return (
        len(head) == 9
        and head[8:9] == b"{"
        and int.from_bytes(head[:8], "little") < os.path.getsize(path)
    )


class _Opaque:
    """Stand-in for any non-tensor object in a checkpoint's metadata (mmengine's message hub,
    numpy, ...)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _TensorsOnlyUnpickler(pickle.Unpickler):
    # Resolves only tensor rebuilding and plain containers; every other global becomes _Opaque,
    # so no code from the file ever runs.
    def find_class(self, module, name):
        if (module == "torch._utils" and name.startswith("_rebuild_")) or (module, name) in {
            ("collections", "OrderedDict"),
            ("torch", "Size"),
            ("torch", "device"),
        }:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return _Opaque


class _TensorsOnlyPickle:
    """The pickle module torch.load is given for files weights_only refuses."""

    Unpickler = _TensorsOnlyUnpickler
    load = staticmethod(lambda f, **kw: _TensorsOnlyUnpickler(f, **kw).load())


def _torch_load(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Training checkpoints (mmagic 1.x) carry objects weights_only refuses in their metadata;
        # read the tensors and leave those objects opaque.
        return torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=_TensorsOnlyPickle
        )


# BasicSR names SPyNet's convolutions by their place in a Sequential with ReLU modules
# (basic_module.{0,2,4,6,8}) and its upsamplers upconv1/upconv2 (XPixelGroup/BasicSR:
# basicsr/archs/basicvsrpp_arch.py, spynet_arch.py).
_BASICSR_SPYNET = re.compile(r"^(.*\bbasic_module\.\d+\.basic_module\.)(\d+)\.(weight|bias)$")
_BASICSR_UPCONV = re.compile(r"^(.*?)\bupconv([12])\.")


def _from_basicsr_names(state):
    """BasicSR's SPyNet and upsampler names -> mmagic's (other keys unchanged)."""
    out = {}
    for k, v in state.items():
        m = _BASICSR_SPYNET.match(k)
        if m and int(m.group(2)) % 2 == 0:
            k = f"{m.group(1)}{int(m.group(2)) // 2}.conv.{m.group(3)}"
        k = _BASICSR_UPCONV.sub(r"\1upsample\2.upsample_conv.", k)
        out[k] = v
    return out


def _strip_prefix(state, prefix, path):
    prefix = prefix.rstrip(".") + "."
    selected = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not selected:
        heads = sorted({k.split(".")[0] for k in state})
        raise ValueError(f"{path}: no keys start with {prefix!r}; the top-level names are {heads}")
    return selected


def read_state_dict(path, prefix=None):
    """Any supported checkpoint file -> {mmagic key: tensor} for one network.

    prefix picks the network inside the file (with or without the trailing dot): for mmagic files
    it defaults to "generator_ema." when present, else "generator."; "discriminator" etc. pick
    another part. For BasicSR files "params" or "params_ema" picks the part (default params_ema
    when present)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    is_safetensors = _is_safetensors(path)
    try:
        if is_safetensors:
            import safetensors.torch

            state = safetensors.torch.load_file(path)
        else:
            obj = _torch_load(path)
    except Exception as e:  # truncated or not a checkpoint; the loaders' own messages vary
        raise ValueError(
            f"{path}: cannot read it as a checkpoint ({type(e).__name__}: {str(e)[:120]}); "
            f"is the file complete?"
        ) from None
    if not is_safetensors:
        if not isinstance(obj, dict):
            raise ValueError(
                f"{path}: expected a dict of tensors or a checkpoint dict, got {type(obj).__name__}"
            )
        if isinstance(obj.get("state_dict"), dict):  # mmagic / mmediting
            state = obj["state_dict"]
            if prefix is None:  # the EMA generator when the file has one
                for p in ("generator_ema.", "generator."):
                    if any(k.startswith(p) for k in state):
                        prefix = p
                        break
        elif any(isinstance(obj.get(p), dict) for p in ("params_ema", "params")):  # BasicSR
            part = "params_ema" if isinstance(obj.get("params_ema"), dict) else "params"
            if prefix is not None and prefix.rstrip(".") in ("params", "params_ema"):
                part = prefix.rstrip(".")
                prefix = None
                if not isinstance(obj.get(part), dict):
                    raise ValueError(f"{path}: BasicSR checkpoint has no {part!r}")
            state = obj[part]
        else:
            state = obj
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise ValueError(
                f"{path}: not a state dict; non-tensor entries {bad[:5]}"
                f"{f' and {len(bad) - 5} more' if len(bad) > 5 else ''}"
            )
    if prefix is not None:
        state = _strip_prefix(state, prefix, path)
    return _from_basicsr_names(state)


# ----------------------------------------------------------------------------------------
# Strict loading: every key the network has, no other, each in its shape


def _few(keys, n=5):
    """The first n of `keys`, sorted, and how many there are."""
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (
        f" ... ({len(keys)} in all)" if len(keys) > n else f" ({len(keys)})"
    )


def load_strict(model, state, path, optional=()):
    """model.load_state_dict(state), where a missing key (other than `optional` ones), an unexpected
    or a mis-shaped one raises one ValueError naming the keys and the file. Returns the model."""
    own = model.state_dict()
    missing = set(own) - set(state) - set(optional)
    unexpected = set(state) - set(own)
    misshaped = [
        f"{k} (file {list(state[k].shape)}, model {list(own[k].shape)})"
        for k in sorted(set(state) & set(own))
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or misshaped:
        problems = []
        if missing:
            problems.append(f"missing {_few(missing)}")
        if unexpected:
            problems.append(f"unexpected {_few(unexpected)}")
        if misshaped:
            problems.append(f"mis-shaped {_few(misshaped, 3)}")
        raise ValueError(
            f"{os.fspath(path)} does not fit {type(model).__name__}: " + "; ".join(problems)
        )
    model.load_state_dict({**{k: own[k] for k in optional if k not in state}, **state}, strict=True)
    return model


def load_state(model, state, path):
    """load_strict, where SPyNet's mean/std may be absent (they are constants). Returns the
    model."""
    constants = {
        f"{name}.{b}".lstrip(".")
        for name, m in model.named_modules()
        if isinstance(m, SPyNet)
        for b in ("mean", "std")
    }
    return load_strict(model, state, path, optional=constants)


def load_weights(model, path, prefix=None):
    """Load any supported checkpoint into `model`, strictly (load_state). Returns the model."""
    return load_state(model, read_state_dict(path, prefix), path)


def load_vgg19_features(vgg, path):
    """Load torchvision's vgg19-dcbb9e9d.pth (or a .safetensors copy) into VGG19Features, strictly.

    The classifier.* entries of the torchvision file are not needed and are skipped.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"VGG19 weights not found: {path} (torchvision's vgg19-dcbb9e9d.pth)"
        )
    state = read_state_dict(path)
    load_strict(vgg, {k: v for k, v in state.items() if not k.startswith("classifier.")}, path)


# ----------------------------------------------------------------------------------------
# Saving: our safetensors, which name their network


def save_weights(model_or_state_dict, path):
    """Write a module's state dict (or a dict of tensors) to `path` as safetensors, atomically.
    The file describes itself: its metadata names the network and its constructor arguments (a
    module's `config`, else what the keys say), so upscale.py needs no architecture flags."""
    import safetensors.torch

    if isinstance(model_or_state_dict, nn.Module):
        state = model_or_state_dict.state_dict()
        config = getattr(model_or_state_dict, "config", None)
        network = type(model_or_state_dict).__name__ if config is not None else None
    else:
        state = model_or_state_dict
        network = None
        config = None
        # a part that is no upscaling network (a discriminator) is saved without a description
        with contextlib.suppress(ValueError):
            network, config = network_from_keys(state, path)
    metadata = {"format": "pt"}
    if network is not None:
        metadata.update(network=network, config=json.dumps(config))
    # safetensors wants contiguous CPU tensors that share no storage
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)


def convert(src, dst, prefix):
    """upscale.py --convert: any supported checkpoint (its part `prefix`) -> our safetensors."""
    state = read_state_dict(src, prefix)
    save_weights(state, dst)
    print(
        f"{src} -> {dst}: {len(state)} tensors, {sum(v.numel() for v in state.values()):,} values"
    )


# ----------------------------------------------------------------------------------------
# Which network a file holds. Our safetensors say it in their metadata; the published .pth files
# (mmagic, mmediting, BasicSR) are recognised by their key names, and sizes are read off the
# shapes: the channels from a convolution, the blocks by counting them.


def _count(state, prefix):
    """Number of residual blocks prefix{i}.conv1.weight."""
    return len(
        {
            k[len(prefix) :].split(".")[0]
            for k in state
            if k.startswith(prefix) and k.endswith("conv1.weight")
        }
    )


def _scale(state, prefix):
    """4 with the second pixel-shuffle stage (every published file), else 2."""
    return 4 if prefix + "upsample2.upsample_conv.weight" in state else 2


def network_from_keys(state, path):
    """(class name, constructor kwargs) of the upscaling network `state` fits, or one ValueError
    saying what the file holds instead."""
    if (
        "deform_align.backward_1.conv_offset.0.weight" in state
        and "backbone.backward_1.main.0.weight" in state
    ):
        return "BasicVSRPlusPlus", dict(
            mid_channels=state["backbone.backward_1.main.0.weight"].shape[0],
            num_blocks=_count(state, "backbone.backward_1.main.2."),
            max_residue_magnitude=10,  # a constant of the published models, not in the file
            # an HR input starts with two stride-2 convolutions instead
            is_low_res_input="feat_extract.main.0.weight" in state,
            scale=_scale(state, ""),
        )
    if (
        "image_cleaning.0.main.0.weight" in state
        and "basicvsr.backward_resblocks.main.0.weight" in state
    ):
        return "RealBasicVSR", dict(
            mid_channels=state["image_cleaning.0.main.0.weight"].shape[0],
            num_propagation_blocks=_count(state, "basicvsr.backward_resblocks.main.2."),
            num_cleaning_blocks=_count(state, "image_cleaning.0.main.2."),
            scale=_scale(state, "basicvsr."),
        )
    if "backward_resblocks.main.0.weight" in state:
        return "BasicVSR", dict(
            mid_channels=state["backward_resblocks.main.0.weight"].shape[0],
            num_blocks=_count(state, "backward_resblocks.main.2."),
            scale=_scale(state, ""),
        )
    if state and all(k.startswith("basic_module.") or k in ("mean", "std") for k in state):
        raise ValueError(
            f"{path} holds SPyNet, the optical-flow network, not an upscaling network "
            f"(train.py takes it as --spynet-weights)"
        )
    if "conv_0.weight" in state and any(k.startswith("conv_9.") for k in state):
        raise ValueError(f"{path} holds the UNet discriminator, not an upscaling network")
    heads = sorted({k.split(".")[0] for k in state})
    raise ValueError(
        f"{path} fits no network here (BasicVSR++, BasicVSR, RealBasicVSR): its top-level "
        f"names are {heads[:8]}{' ...' if len(heads) > 8 else ''}"
    )


def network_of(path, state):
    """(class name, constructor kwargs) of the network whose weights `state` (read from `path`) are:
    our safetensors' metadata, else network_from_keys."""
    if _is_safetensors(path):
        import safetensors

        with safetensors.safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
        if "network" in metadata:
            return metadata["network"], json.loads(metadata["config"])
    return network_from_keys(state, path)


# ----------------------------------------------------------------------------------------
# Loading the network a file holds; what callers ask of a network


NETWORKS = {
    "BasicVSRPlusPlus": BasicVSRPlusPlus,
    "BasicVSR": BasicVSR,
    "RealBasicVSR": RealBasicVSR,
}


def load_network(path, refine_thres=255):
    """The network a weights file holds (network_of: our safetensors' metadata, or the key
    names and shapes of a published .pth), with its weights. RealBasicVSR is built as the
    official inference runs it: sequential cleaning, `refine_thres` (0-255) for more passes."""
    state = read_state_dict(path)
    name, config = network_of(path, state)
    if name == "RealBasicVSR":
        config = dict(config, is_sequential_cleaning=True, dynamic_refine_thres=refine_thres)
    return load_state(NETWORKS[name](**config), state, path)


def scale_of(model):
    """Output size / input size: 4 or 2, or 1 for BasicVSR++ restoring at the input size (deblur,
    denoise, decompression: is_low_res_input=False)."""
    return model.scale


def min_input_size(model):
    """Smallest frame the network is run on: 64 LR pixels for SPyNet's coarsest level in
    BasicVSR++ and RealBasicVSR; BasicVSR pads to SPyNet's multiple of 32, and upscale.py pads
    the frames of x1 models, so any size. An exported network (export.OnnxNetwork: an
    onnxruntime session, no module tree to inspect) answers itself: its `min_size` is the value
    the file recorded at export, from this function."""
    if hasattr(model, "min_size"):
        return model.min_size
    if scale_of(model) == 1 or isinstance(model, BasicVSR):
        return 1
    return 64


# ---------------------------------------------------------------------------------------------
# Random weights of trained networks' scale, for benchmarks and kernel tests: where the sampling
# kernels read, and so their speed, depends on the flows and offsets. Calibrated on a 64x96 clip
# panning 2 px per frame: mean |flow| ~1 px, mean |offset residue| ~0.5 px.
SPYNET_FLOW_SCALE = 0.1
OFFSET_RESIDUE_STD = 0.1


@torch.no_grad()
def realistic_init(net):
    """Random weights, but flows and offsets of the size trained networks produce, since the
    sampling kernels' memory traffic depends on where they read:
    - SPyNet: each level's flow residual is scaled down (random SPyNet flows are tens of pixels);
    - deformable alignment: the last conv_offset layer, zero at init (offsets = flow, mask 0.5),
      gets small random weights, so offsets leave the flow by about a pixel and masks vary."""
    gen = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, SPyNetBasicModule):
            last = m.basic_module[-1].conv
            last.weight.mul_(SPYNET_FLOW_SCALE)
            last.bias.mul_(SPYNET_FLOW_SCALE)
        elif isinstance(m, SecondOrderDeformableAlignment):
            last = m.conv_offset[-1]
            last.weight.copy_(torch.randn(last.weight.shape, generator=gen) * OFFSET_RESIDUE_STD)
    return net
