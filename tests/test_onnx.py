"""ONNX export (upscale.export_onnx, --export) and the onnxruntime path (--onnx), on CPU with tiny
random-weight networks. Each exported file is compared with the PyTorch network's own forward at
two frame sizes (one file: height and width are dynamic), max |difference| <= 1e-4 (fp32; measured
below 2e-6), and the command line's --onnx frames with the --weights run's, within 1 grey level.
Exports are slow (~10-40 s each on 2 cores), so each network is exported once per module."""
import os

import numpy as np
import onnx
import pytest
import torch

import basicvsr
import upscale as ups
from basicvsr import BasicVSR, BasicVSRPlusPlus
from realbasicvsr import RealBasicVSR

TOL = 1e-4   # max |ONNX - PyTorch|, fp32 outputs in [0, 1]-ish
FRAMES = 3   # the exported window: BasicVSR++'s second-order (n-2) connection needs 3; 2 where it is not there


def _perturb_offsets(model):
    # the published init zeroes the offset branch's last conv (offsets = flows); make them vary
    for m in model.modules():
        if isinstance(m, basicvsr.SecondOrderDeformableAlignment):
            torch.nn.init.normal_(m.conv_offset[-1].weight, std=0.02)
    return model


NETWORKS = {  # name: (network, two input sizes (h, w), frames)
    "basicvsrpp": (lambda: _perturb_offsets(BasicVSRPlusPlus(8, 1)), [(64, 72), (72, 64)], FRAMES),
    "basicvsrpp_x1": (lambda: _perturb_offsets(BasicVSRPlusPlus(8, 1, is_low_res_input=False)),
                      [(256, 260), (264, 256)], 2),
    "realbasicvsr": (lambda: RealBasicVSR(8, 1, 1, is_sequential_cleaning=True), [(64, 72), (66, 80)], 2),
}


@pytest.fixture(scope="module")
def basicvsr_files(tmp_path_factory):
    """BasicVSR(8, 1): saved weights and the file `upscale.py --export` writes from them."""
    root = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    weights, path = root / "basicvsr.safetensors", root / "basicvsr.onnx"
    basicvsr.save_weights(BasicVSR(8, 1), weights)
    assert ups.main(["--export", str(path), "--weights", str(weights), "--frames", str(FRAMES)]) == 0
    return weights, path


@pytest.fixture(scope="module", params=list(NETWORKS))
def exported(request, tmp_path_factory):
    torch.manual_seed(1)
    build, sizes, frames = NETWORKS[request.param]
    model = build().eval()
    path = tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx"
    ups.export_onnx(model, path, frames=frames)
    return model, path, sizes


def _check_against_torch(model, path, sizes):
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    net = ups.OnnxNetwork(str(path))
    assert net.scale == ups.scale_of(model)
    torch.manual_seed(2)
    for h, w in sizes:  # one file, two sizes
        lqs = torch.rand(1, net.frames, 3, h, w)
        with torch.no_grad():
            ref = model(lqs)
        out = net(lqs)
        assert out.shape == ref.shape
        assert (out - ref).abs().max().item() <= TOL


def test_export_matches_pytorch(exported):
    model, path, sizes = exported
    names = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "GridSample" in names
    assert ("DeformConv" in names) == isinstance(model, BasicVSRPlusPlus)
    _check_against_torch(model, path, sizes)


def test_basicvsr_command_line_export(basicvsr_files):
    weights, path = basicvsr_files
    _check_against_torch(ups.load_network(str(weights)), path, [(40, 48), (33, 70)])
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["network"] == "BasicVSR" and meta["scale"] == "4"


def test_short_window_is_mirror_padded(basicvsr_files):
    # a 2-frame window runs as frames (0, 1, 0): the outputs of 0 and 1 of the PyTorch network on that clip
    weights, path = basicvsr_files
    model, net = ups.load_network(str(weights)), ups.OnnxNetwork(str(path))
    lqs = torch.rand(1, 2, 3, 32, 40)
    with torch.no_grad():
        ref = model(lqs[:, [0, 1, 0]])[:, :2]
    assert (net(lqs) - ref).abs().max().item() <= TOL


def _frames(root, name, n):
    folder = root / name
    folder.mkdir()
    import data
    for i, frame in enumerate(data.synthetic_clip(3, n, 48)[0]):
        data.write_image(str(folder / f"{i:04d}.png"), frame)
    return folder


def _read(folder):
    import data
    return np.stack([data.read_image(str(folder / f)) for f in sorted(os.listdir(folder))]).astype(int)


def test_command_line_onnx_matches_weights(basicvsr_files, tmp_path):
    # windows of exactly 3 frames (chunk 3, no context frames; the last one reaches back), so both runs
    # see the same clips
    weights, path = basicvsr_files
    frames = _frames(tmp_path, "in", 5)
    common = ["--chunk", "3", "--overlap", "0", "--tile", "0", "--scene-threshold", "0", "--device", "cpu"]
    assert ups.main([str(frames), str(tmp_path / "torch"), "--weights", str(weights), *common]) == 0
    assert ups.main([str(frames), str(tmp_path / "onnx"), "--onnx", str(path), *common]) == 0
    a, b = _read(tmp_path / "torch"), _read(tmp_path / "onnx")
    assert a.shape == b.shape == (5, 192, 192, 3)
    assert np.abs(a - b).max() <= 1


def test_bad_provider_and_files(basicvsr_files, tmp_path, capsys):
    weights, path = basicvsr_files
    frames = _frames(tmp_path, "in", 2)
    out = tmp_path / "out"
    assert ups.main([str(frames), str(out), "--onnx", str(path), "--provider", "cuda"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --provider cuda") and "onnxruntime-gpu" in err[0]
    assert ups.main([str(frames), str(out), "--onnx", str(tmp_path / "missing.onnx")]) == 1
    assert capsys.readouterr().err.strip().startswith("error: --onnx")
    assert ups.main(["--export", str(tmp_path / "m.onnx")]) == 1
    assert "--weights" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["in"]  # nothing left behind
