"""ONNX export (export_onnx, --export) and the onnxruntime path (--onnx), on CPU with tiny
random-weight networks. Every exported file passes onnx.checker and runs in onnxruntime within
max |difference| <= 1e-4 of the PyTorch network's own forward (fp32; measured below 2e-6); the
command line's --onnx frames match the --weights run's within 1 grey level.
Exports are slow (on two CPU cores a fixed-size one takes ~4-8 s, one with dynamic height and width
~3x that), so there is one dynamic export, BasicVSR's by `upscale.py --export` (as users write
them; 2 frames), checked at two frame sizes with that one file; BasicVSR++ x4, x1 and RealBasicVSR
are exported at one fixed frame size (export_onnx(size=...)) and checked there. Each file is
written once per module. All of it is slow (ONNX export and onnxruntime)."""

import os

import numpy as np
import onnx
import pytest
import torch

import basicvsr
import files
import synthetic
import upscale as ups
import weights
from basicvsr import BasicVSR, BasicVSRPlusPlus
from export import OnnxNetwork, export_onnx
from realbasicvsr import RealBasicVSR

pytestmark = pytest.mark.slow  # every test exports or runs onnxruntime

TOL = 1e-4  # max |ONNX - PyTorch|, fp32 outputs in [0, 1]-ish


def _perturb_offsets(model):
    # the published init zeroes the offset branch's last conv (offsets = flows); make them vary
    for m in model.modules():
        if isinstance(m, basicvsr.SecondOrderDeformableAlignment):
            torch.nn.init.normal_(m.conv_offset[-1].weight, std=0.02)
    return model


# name: (network, its fixed export size (h, w): the smallest it takes, h != w so that a transposed
# h and w would show, frames)
NETWORKS = {
    "basicvsrpp": (
        lambda: _perturb_offsets(BasicVSRPlusPlus(8, 1)),
        (64, 72),
        3,
    ),  # >= 64 LR; 3: the n-2 connection
    "basicvsrpp_x1": (
        lambda: _perturb_offsets(BasicVSRPlusPlus(8, 1, is_low_res_input=False)),
        (256, 260),
        2,
    ),  # >= 256, multiples of 4
    "realbasicvsr": (
        lambda: RealBasicVSR(8, 1, 1, is_sequential_cleaning=True),
        (64, 72),
        2,
    ),  # >= 64 LR
}
BASICVSR_SIZES = [(40, 48), (33, 70)]  # the dynamic file: two sizes, one of them odd


@pytest.fixture(scope="module")
def basicvsr_files(tmp_path_factory):
    """BasicVSR(8, 1): saved weights and the file `upscale.py --export` writes from them (h, w
    dynamic; a 2-frame window, the least there is: BasicVSR has no second-order connection)."""
    root = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    weights_path = root / "basicvsr.safetensors"
    path = root / "basicvsr.onnx"
    weights.save_weights(BasicVSR(8, 1), weights_path)
    assert ups.main(["--export", str(path), "--weights", str(weights_path), "--frames", "2"]) == 0
    return weights_path, path


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """export(name) -> (network, its fixed-size export, size), each written once per module (static
    shapes: ~3x faster to write than dynamic ones)."""
    root = tmp_path_factory.mktemp("onnx")
    done = {}

    def get(name):
        if name not in done:
            torch.manual_seed(1)
            build, size, frames = NETWORKS[name]
            model = build().eval()
            path = root / f"{name}.onnx"
            export_onnx(model, path, frames=frames, size=size)
            done[name] = model, path, size
        return done[name]

    return get


def _check_against_torch(model, path, sizes):
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    net = OnnxNetwork(str(path))
    assert net.scale == weights.scale_of(model)
    torch.manual_seed(2)
    for h, w in sizes:
        lqs = torch.rand(1, net.frames, 3, h, w)
        with torch.no_grad():
            ref = model(lqs)
        out = net(lqs)
        assert out.shape == ref.shape
        assert (out - ref).abs().max().item() <= TOL
    return net


@pytest.mark.parametrize("name", list(NETWORKS))
def test_export_matches_pytorch(export, name):
    model, path, size = export(name)
    names = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "GridSample" in names
    assert ("DeformConv" in names) == isinstance(model, BasicVSRPlusPlus)
    net = _check_against_torch(model, path, [size])
    assert net.session.get_inputs()[0].shape[3:] == list(size)  # fixed: only this size runs


def test_basicvsr_command_line_export(basicvsr_files):
    # one file, two frame sizes: height and width are dynamic
    weights_path, path = basicvsr_files
    assert "GridSample" in {n.op_type for n in onnx.load(str(path)).graph.node}
    net = _check_against_torch(weights.load_network(str(weights_path)), path, BASICVSR_SIZES)
    assert all(isinstance(d, str) for d in net.session.get_inputs()[0].shape[3:])  # symbolic h, w
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["network"] == "BasicVSR" and meta["scale"] == "4"


def test_short_window_is_mirror_padded(export):
    # BasicVSR++'s 3-frame file: a 2-frame window runs as frames (0, 1, 0): the outputs of 0 and 1
    # of the PyTorch network on that clip
    model, path, size = export("basicvsrpp")
    net = OnnxNetwork(str(path))
    torch.manual_seed(3)
    lqs = torch.rand(1, 2, 3, *size)
    with torch.no_grad():
        ref = model(lqs[:, [0, 1, 0]])[:, :2]
    assert (net(lqs) - ref).abs().max().item() <= TOL


def _frames(root, name, n):
    folder = root / name
    folder.mkdir()

    for i, frame in enumerate(synthetic.synthetic_clip(3, n, 48)[0]):
        files.write_image(str(folder / f"{i:04d}.png"), frame)
    return folder


def _read(folder):

    return np.stack([files.read_image(str(folder / f)) for f in sorted(os.listdir(folder))]).astype(
        int
    )


def test_command_line_onnx_matches_weights(basicvsr_files, tmp_path):
    # windows of exactly 2 frames, the exported window (chunk 2, no context frames; the last one
    # reaches back), so both runs see the same clips
    weights_path, path = basicvsr_files
    frames = _frames(tmp_path, "in", 5)
    common = [
        "--chunk",
        "2",
        "--overlap",
        "0",
        "--tile",
        "0",
        "--scene-threshold",
        "0",
        "--device",
        "cpu",
    ]
    assert (
        ups.main([str(frames), str(tmp_path / "torch"), "--weights", str(weights_path), *common])
        == 0
    )
    assert ups.main([str(frames), str(tmp_path / "onnx"), "--onnx", str(path), *common]) == 0
    a, b = _read(tmp_path / "torch"), _read(tmp_path / "onnx")
    assert a.shape == b.shape == (5, 192, 192, 3)
    assert np.abs(a - b).max() <= 1


def test_bad_provider_and_files(basicvsr_files, tmp_path, capsys):
    weights_path, path = basicvsr_files
    frames = _frames(tmp_path, "in", 2)
    out = tmp_path / "out"
    assert ups.main([str(frames), str(out), "--onnx", str(path), "--provider", "cuda"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and err[0].startswith("error: --provider cuda")
        and "onnxruntime-gpu" in err[0]
    )
    assert ups.main([str(frames), str(out), "--onnx", str(tmp_path / "missing.onnx")]) == 1
    assert capsys.readouterr().err.strip().startswith("error: --onnx")
    assert ups.main(["--export", str(tmp_path / "m.onnx")]) == 1
    assert "--weights" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["in"]  # nothing left behind
