"""basicvsr.py against the reference-structured oracle (tests/mmagic_reference.py), the official
keys, the reference's own unit tests (open-mmlab/mmagic: tests/test_models/test_editors/
test_basicvsr_plusplus_net, test_basicvsr; with ValueError for their AssertionError), and
weights.py: every checkpoint layout load_weights reads, which network a file holds, and the
convert command line."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import basicvsr
import kernels
import realbasicvsr
import weights
from basicvsr import BasicVSR, BasicVSRPlusPlus, SPyNet
from kernels.bench import moving_clip
from weights import load_weights, read_state_dict, save_weights

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mmagic_reference as ref  # noqa: E402
from helpers import cuda, published_keys, rel  # noqa: E402

TOL = 1e-4  # fp32, max abs, against the oracle


def randomize(model, seed=0):
    """Random non-zero weights everywhere, including the zero-initialised offset heads (so the
    deformable sampling moves away from the flow) and every bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("conv_offset.6.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            else:  # keep each layer's init scale, perturb every value
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def oracle_of(model, oracle):
    oracle.load_state_dict(model.state_dict())
    return oracle.eval()


def clip(t, h, w, seed, mirrored=False, n=1):
    g = torch.Generator().manual_seed(seed)
    if mirrored:
        half = torch.rand(n, t // 2, 3, h, w, generator=g)
        return torch.cat([half, half.flip(1)], dim=1)
    # smooth-ish moving content, so that SPyNet has something to track
    base = torch.rand(n, 1, 3, h + 8, w + 8, generator=g)
    frames = [base[..., i : i + h, 2 * i : 2 * i + w] for i in range(t)]  # t <= 5
    return torch.cat(frames, dim=1).contiguous()


def max_diff(a, b):
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------
# Fixtures: tiny networks with random weights (mid 16 / 8 channels, 1-2 blocks)


@pytest.fixture(scope="module")
def pp_lr():
    torch.manual_seed(0)
    return randomize(BasicVSRPlusPlus(mid_channels=8, num_blocks=1), seed=1)


@pytest.fixture(scope="module")
def pp_hr():
    torch.manual_seed(1)
    return randomize(BasicVSRPlusPlus(mid_channels=8, num_blocks=1, is_low_res_input=False), seed=2)


@pytest.fixture(scope="module")
def vsr():
    torch.manual_seed(2)
    return randomize(BasicVSR(mid_channels=8, num_blocks=2), seed=3)


# ----------------------------------------------------------------------------------------
# The oracle's own sanity (mmagic's tests/test_models/test_utils/test_flow_warp.py), so that
# agreeing with it means something.


def test_oracle_flow_warp_shift():
    x = torch.rand(1, 3, 10, 10)
    out = ref.flow_warp(x, -torch.ones(1, 10, 10, 2))
    expected = torch.zeros_like(x)
    expected[:, :, 1:, 1:] = x[:, :, :-1, :-1]
    assert (out - expected).abs().sum() < 1e-5
    with pytest.raises(ValueError):
        ref.flow_warp(torch.rand(1, 3, 10, 10), torch.rand(1, 4, 4, 2))


def test_oracle_dcn_matches_kernel_reference():
    # The oracle's grid_sample DCN and the kernel's im2col reference are two independent readings
    # of mmcv.
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 32, 9, 11, generator=g)
    offset = torch.randn(2, 16 * 18, 9, 11, generator=g) * 3
    mask = torch.rand(2, 16 * 9, 9, 11, generator=g)
    w, b = torch.randn(8, 32, 3, 3, generator=g), torch.randn(8, generator=g)
    a = ref.modulated_deform_conv2d(x, offset, mask, w, b, 1, 1, 1, 1, 16)
    r = kernels.deform_conv2d_reference(
        x, offset, mask, w, b, stride=1, padding=1, dilation=1, deform_groups=16
    )
    assert max_diff(a, r) < 1e-4


# ----------------------------------------------------------------------------------------
# Outputs against the oracle, fp32 on CPU


# a multiple of 32, and sizes SPyNet must resize
@pytest.mark.parametrize("h,w", [(64, 64), (36, 52)])
def test_spynet_matches_oracle(h, w):
    torch.manual_seed(3)
    net = randomize(SPyNet(), seed=4)
    oracle = oracle_of(net, ref.SPyNet())
    g = torch.Generator().manual_seed(5)
    a = torch.rand(2, 3, h + 4, w + 4, generator=g)
    ref_img, supp = a[..., 2 : 2 + h, 1 : 1 + w].contiguous(), a[..., :h, 3 : 3 + w].contiguous()
    with torch.no_grad():
        flow, flow_oracle = net(ref_img, supp), oracle(ref_img, supp)
    assert flow.shape == (2, 2, h, w)
    assert flow.abs().mean() > 0.1  # real, non-trivial flows
    assert max_diff(flow, flow_oracle) < TOL


@pytest.mark.parametrize("mirrored", [False, True])
def test_basicvsrpp_lr_matches_oracle(pp_lr, mirrored):
    oracle = oracle_of(pp_lr, ref.BasicVSRPlusPlusNet(8, 1))
    lqs = clip(4 if mirrored else 3, 64, 64, seed=6, mirrored=mirrored)
    residuals = []  # mean |offset - flow| in pixels, per alignment call
    hooks = [
        m.conv_offset.register_forward_hook(
            lambda m, i, o: residuals.append((10 * torch.tanh(o[:, :288])).abs().mean().item())
        )
        for m in pp_lr.deform_align.values()
    ]
    with torch.no_grad():
        out, expected = pp_lr(lqs), oracle(lqs)
    for h in hooks:
        h.remove()
    assert len(residuals) == 4 * (lqs.shape[1] - 1)
    assert min(residuals) > 0.15  # the DCN really deforms (pixels)
    assert oracle.is_mirror_extended == mirrored
    assert out.shape == (1, lqs.shape[1], 3, 256, 256)
    assert max_diff(out, expected) < TOL


@pytest.mark.parametrize("arch", ["basicvsrpp", "basicvsr"])
def test_x2_networks_match_oracle(arch):
    """scale=2: one pixel-shuffle x2 stage and a bilinear x2 skip; the x4 keys are kept, minus
    upsample2."""
    torch.manual_seed(12)
    net = randomize(
        BasicVSRPlusPlus(8, 1, scale=2) if arch == "basicvsrpp" else BasicVSR(8, 1, scale=2)
    ).eval()
    oracle = oracle_of(
        net,
        ref.BasicVSRPlusPlusNet(8, 1, scale=2)
        if arch == "basicvsrpp"
        else ref.BasicVSRNet(8, 1, scale=2),
    )
    lqs = clip(3, 64, 64, seed=13)
    with torch.no_grad():
        out, expected = net(lqs), oracle(lqs)
    assert out.shape == (1, 3, 3, 128, 128) and max_diff(out, expected) < TOL
    x4_keys = set((BasicVSRPlusPlus(8, 1) if arch == "basicvsrpp" else BasicVSR(8, 1)).state_dict())
    assert set(net.state_dict()) == {k for k in x4_keys if not k.startswith("upsample2.")}
    assert weights.network_from_keys(net.state_dict(), "x2")[1]["scale"] == 2


@pytest.mark.parametrize("mirrored", [False, True])
def test_basicvsrpp_hr_matches_oracle(pp_hr, mirrored):
    oracle = oracle_of(pp_hr, ref.BasicVSRPlusPlusNet(8, 1, is_low_res_input=False))
    lqs = clip(2 if mirrored else 3, 256, 256, seed=7, mirrored=mirrored)
    with torch.no_grad():
        out, expected = pp_hr(lqs), oracle(lqs)
    assert out.shape == lqs.shape
    assert max_diff(out, expected) < TOL


def test_alignment_matches_oracle():
    # One SecondOrderDeformableAlignment with large random offset residuals and distinct flows per
    # pixel.
    torch.manual_seed(5)
    da = randomize(
        basicvsr.SecondOrderDeformableAlignment(32, 16, 3, padding=1, deform_groups=16), seed=6
    )
    oracle = oracle_of(
        da, ref.SecondOrderDeformableAlignment(32, 16, 3, padding=1, deform_groups=16)
    )
    with torch.no_grad():
        da.conv_offset[6].weight.mul_(10)
    oracle.load_state_dict(da.state_dict())
    g = torch.Generator().manual_seed(7)
    x = torch.rand(2, 32, 12, 14, generator=g)
    extra = torch.rand(2, 48, 12, 14, generator=g)
    flow_1 = torch.randn(2, 2, 12, 14, generator=g) * 3
    flow_2 = torch.randn(2, 2, 12, 14, generator=g) * 3
    with torch.no_grad():
        out = da(x, extra, flow_1, flow_2)
        assert max_diff(out, oracle(x, extra, flow_1, flow_2)) < TOL
        # the offset residual matters: zeroing the offset head changes the result by far more
        # than TOL
        da.conv_offset[6].weight.zero_()
        assert max_diff(out, da(x, extra, flow_1, flow_2)) > 1000 * TOL


@pytest.mark.parametrize("mirrored", [False, True])
def test_basicvsr_matches_oracle(vsr, mirrored):
    oracle = oracle_of(vsr, ref.BasicVSRNet(8, 2))
    lqs = clip(4 if mirrored else 5, 20, 28, seed=9, mirrored=mirrored)
    with torch.no_grad():
        out, expected = vsr(lqs), oracle(lqs)
    assert out.shape == (1, lqs.shape[1], 3, 80, 112)
    assert max_diff(out, expected) < TOL


def test_mirror_detection_is_per_call(vsr):
    # A mirrored clip needs one SPyNet pass; the next, plain clip needs two again (BasicSR's flag
    # sticks).
    calls = []
    handle = vsr.spynet.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            for mirrored, expected_calls in [(True, 1), (False, 2), (True, 1)]:
                calls.clear()
                vsr(clip(4, 16, 16, seed=10, mirrored=mirrored))
                assert len(calls) == expected_calls
    finally:
        handle.remove()
    assert basicvsr.is_mirror_extended(clip(4, 8, 8, seed=1, mirrored=True))
    assert not basicvsr.is_mirror_extended(clip(3, 8, 8, seed=1))


# ----------------------------------------------------------------------------------------
# CPU cache (HostFrames) and bf16


# mirrored + cache crashes the reference (mmagic's compute_flow moves flows_forward = None to the
# CPU); here the forward flows are the backward ones reversed, on either path
@pytest.mark.parametrize("mirrored", [False, True])
def test_cpu_cache_path_equals_plain_path(pp_lr, mirrored):
    lqs = clip(4 if mirrored else 3, 64, 64, seed=11, mirrored=mirrored)
    batch_sizes = []  # of feat_extract calls: t at once on the plain path, chunks of 2 when caching
    handle = pp_lr.feat_extract.register_forward_hook(
        lambda m, i, o: batch_sizes.append(i[0].shape[0])
    )
    try:
        with torch.no_grad():
            plain = pp_lr(lqs)
            # t > 2: the cache path, HostFrames whose copies are the identity on CPU
            pp_lr.cpu_cache_length = 2
            pp_lr.cpu_cache_chunk = 2
            cached = pp_lr(lqs)
    finally:
        handle.remove()
        pp_lr.cpu_cache_length = 100
        pp_lr.cpu_cache_chunk = 8
    t = lqs.shape[1]
    assert batch_sizes == [t] + [2, t - 2]
    assert plain.shape == cached.shape == (1, t, 3, 256, 256)
    assert max_diff(plain, cached) < 1e-5


def test_host_frames_read_like_lists_one_upload_ahead(monkeypatch):
    """HostFrames through BasicVSR++'s reads (on CPU only the copies differ from a GPU's): the
    maps of a list, each uploaded once per pass and before it is read, except at a pass's start,
    with at most three maps on the device."""
    uploads = []
    upload = basicvsr.HostFrames.upload
    monkeypatch.setattr(
        basicvsr.HostFrames, "upload", lambda self, i: uploads.append(i) or upload(self, i)
    )
    t = 10
    maps = [torch.full((1, 1, 1, 1), float(i)) for i in range(t)]
    frames = basicvsr.host_frames(torch.device("cpu"))
    flows = frames()
    for m in maps:
        flows.append(m)
    assert len(flows) == t and sorted(flows.resident) == [t - 2, t - 1]

    # a forward branch's flows: flow_n1, then the flow of the step before again
    for k in range(t):
        assert k == 0 or k in flows.resident  # on its way since the read before
        assert flows[k] is maps[k]
        if k > 0:
            assert flows[k - 1] is maps[k - 1]
        assert len(flows.resident) <= 3
    assert uploads == list(range(t))

    # the same maps backward (a backward branch's list, reversed): those still on the device
    # are not uploaded again
    uploads.clear()
    backward = flows[::-1]
    for k in range(t):
        assert k in backward.resident
        assert backward[k] is maps[t - 1 - k]
        assert len(backward.resident) <= 3
    assert uploads == list(range(2, t))

    # a branch's own output, appended and read back two steps later: never uploaded
    uploads.clear()
    own = frames()
    for k in range(t):
        if k > 1:
            assert own[-2] is maps[k - 2]
        own.append(maps[k])
        assert len(own.resident) <= 3
    assert uploads == []

    # upsample pops the front: the next front is on its way
    popped = []
    while len(own):
        popped.append(own.pop(0))
        assert len(own) == 0 or 0 in own.resident
    assert len(popped) == t and all(a is b for a, b in zip(popped, maps))
    with pytest.raises(IndexError):
        own[0]


@pytest.mark.slow
def test_compile_network_equals_eager(pp_lr):
    """compile_network compiles the per-frame modules in place: same keys, same outputs (CPU
    inductor, the reference ops traced through), and the cache path runs compiled too."""
    net = copy.deepcopy(pp_lr)
    lqs = clip(3, 64, 64, seed=21)
    with torch.no_grad():
        eager = pp_lr(lqs)
        basicvsr.compile_network(net)
        compiled = net(lqs)
        net.cpu_cache_length = 0
        cached = net(lqs)
    assert list(net.state_dict()) == list(pp_lr.state_dict())
    kinds = {
        type(m).__name__
        for m in net.modules()
        if getattr(m, "_compiled_call_impl", None) is not None
    }
    assert kinds == {
        "ResidualBlocksWithInputConv",
        "SecondOrderDeformableAlignment",
        "SPyNetBasicModule",
        "PixelShufflePack",
    }
    assert max_diff(compiled, eager) < 1e-5
    assert max_diff(cached, eager) < 1e-5


# measured max abs 6e-4 .. 1.4e-3 (3 seeds) on these tiny random nets, outputs in about [0, 1]
BF16_BOUND = 5e-3


def test_bf16_autocast_close_to_fp32(pp_lr):
    lqs = clip(2, 64, 64, seed=13)
    with torch.no_grad():
        out32 = pp_lr(lqs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out16 = pp_lr(lqs)
    assert torch.isfinite(out16).all()
    err = max_diff(out16.float(), out32)
    assert 0 < err < BF16_BOUND, err


@cuda
def test_cuda_cpu_cache_bounded_memory_and_equal():
    torch.manual_seed(0)
    net = randomize(BasicVSRPlusPlus(16, 1), seed=1).cuda()
    g = torch.Generator().manual_seed(14)
    peaks = {}
    with torch.no_grad():
        for t in (8, 24):
            lqs = torch.rand(1, t, 3, 64, 64, generator=g).cuda()
            net.cpu_cache_length = 100
            plain = net(lqs).cpu()
            net.cpu_cache_length = 4
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            cached = net(lqs)
            peaks[t] = torch.cuda.max_memory_allocated() - base
            assert cached.device.type == "cpu"
            assert max_diff(plain, cached) < 1e-4
    # features live on the CPU: three times the frames, about the same GPU peak
    assert peaks[24] < 1.2 * peaks[8], peaks


# ----------------------------------------------------------------------------------------
# Keys, parameter counts (default sizes), shapes and errors (as mmagic's unit tests check them)


def keys_and_shapes(model):
    return [(k, list(v.shape)) for k, v in model.state_dict().items()]


def test_keys_and_parameter_counts():
    pp = BasicVSRPlusPlus()
    assert keys_and_shapes(pp) == published_keys("keys_basicvsrpp_c64n7.tsv")
    assert sum(p.numel() for p in pp.parameters()) == 7_322_927
    assert (
        sum(p.numel() for p in BasicVSRPlusPlus(is_low_res_input=False).parameters()) == 7_396_783
    )
    net = BasicVSR()
    assert keys_and_shapes(net) == published_keys("keys_basicvsr_net_c64n30.tsv")
    assert sum(p.numel() for p in net.parameters()) == 6_291_311
    assert len(SPyNet().state_dict()) == 62
    assert sum(p.numel() for p in SPyNet().parameters()) == 1_440_300


def test_inits():
    torch.manual_seed(0)
    pp = BasicVSRPlusPlus(16, 1)
    da = pp.deform_align["forward_1"]
    assert da.conv_offset[6].weight.abs().max() == 0 and da.conv_offset[6].bias.abs().max() == 0
    bound = 1 / (32 * 9) ** 0.5
    assert (
        da.weight.abs().max() <= bound
        and da.weight.abs().max() > 0.9 * bound
        and da.bias.abs().max() == 0
    )
    block = pp.backbone["backward_1"].main[2][0]
    std = block.conv1.weight.std().item()  # kaiming fan_in (sqrt(2 / 144)) x 0.1
    assert (
        0.07 * (2 / 144) ** 0.5 < std < 0.13 * (2 / 144) ** 0.5
        and block.conv1.bias.abs().max() == 0
    )
    assert torch.equal(pp.spynet.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))


def test_shapes_as_in_reference_tests(pp_lr, pp_hr):
    with torch.no_grad():
        assert pp_lr(torch.rand(1, 1, 3, 64, 64).repeat(1, 2, 1, 1, 1)).shape == (1, 2, 3, 256, 256)
        hr = torch.rand(1, 1, 3, 256, 256).repeat(1, 2, 1, 1, 1)
        assert pp_hr(hr).shape == (1, 2, 3, 256, 256)
        net = BasicVSR(mid_channels=8, num_blocks=1).eval()
        assert net(torch.rand(1, 2, 3, 64, 64)).shape == (1, 2, 3, 256, 256)
        # small inputs work: SPyNet pads
        assert net(torch.rand(1, 5, 3, 16, 16)).shape == (1, 5, 3, 64, 64)
        # a single frame, no flow
        assert net(torch.rand(1, 1, 3, 16, 16)).shape == (1, 1, 3, 64, 64)


@pytest.mark.parametrize(
    "shape,match",
    [
        ((1, 5, 3, 61, 61), "61x61"),
        ((1, 5, 3, 64, 61), "64x61"),
        ((5, 3, 64, 64), "shape"),
        ((1, 5, 4, 64, 64), "shape"),
    ],
)
def test_basicvsrpp_input_errors(pp_lr, shape, match):
    with pytest.raises(ValueError, match=match):
        pp_lr(torch.rand(*shape))


def test_hr_input_errors(pp_hr):
    with pytest.raises(ValueError, match="252x252"):
        pp_hr(torch.rand(1, 2, 3, 252, 252))
    with pytest.raises(ValueError, match="multiple of 4"):
        pp_hr(torch.rand(1, 2, 3, 258, 258))


def test_spynet_input_errors():
    net = SPyNet()
    with pytest.raises(ValueError, match="SPyNet"):
        net(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 40))
    with pytest.raises(ValueError, match="SPyNet"):
        net(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32))


def test_basicvsr_input_errors(vsr):
    for shape in [(3, 3, 16, 16), (1, 3, 1, 16, 16)]:
        with pytest.raises(ValueError, match="shape"):
            vsr(torch.rand(*shape))


# ----------------------------------------------------------------------------------------
# Checkpoint formats: built from the model's own state dict with each layout's key names


@pytest.fixture(scope="module")
def tiny_lqs():
    # one frame keeps these cheap; SPyNet is covered by the exact state check
    return clip(1, 64, 64, seed=15)


@pytest.fixture(scope="module")
def tiny_out(pp_lr, tiny_lqs):
    with torch.no_grad():
        return pp_lr(tiny_lqs)


def to_basicsr(state):
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        # ...basic_module.L.basic_module.j.conv.w -> ...basic_module.L.basic_module.2j.w
        if "spynet" in parts and parts[-2] == "conv":
            k = ".".join(parts[:-3] + [str(2 * int(parts[-3])), parts[-1]])
        k = k.replace("upsample1.upsample_conv.", "upconv1.").replace(
            "upsample2.upsample_conv.", "upconv2."
        )
        out[k] = v
    return out


class OpaqueMeta:
    """A class weights_only=True refuses, like mmengine's objects in mmagic 1.x metadata."""

    def __init__(self):
        self.history = [1, 2, 3]


def assert_same_outputs(model, expected, lqs, reference_model):
    ours, theirs = model.state_dict(), reference_model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.no_grad():
        assert torch.equal(model.eval()(lqs), expected)


def fresh():
    torch.manual_seed(99)
    return BasicVSRPlusPlus(mid_channels=8, num_blocks=1)


def test_load_mmagic(tmp_path, pp_lr, tiny_out, tiny_lqs):
    state = pp_lr.state_dict()
    other = {k: torch.randn_like(v) for k, v in state.items()}
    disc = torch.nn.Conv2d(3, 4, 3)
    path = tmp_path / "mmagic.pth"
    torch.save(
        {
            "meta": {"iter": 600000, "config": "..."},
            "state_dict": {
                **{f"generator.{k}": v for k, v in other.items()},
                **{f"generator_ema.{k}": v for k, v in state.items()},
                **{f"discriminator.{k}": v for k, v in disc.state_dict().items()},
            },
        },
        path,
    )
    model = load_weights(fresh(), path)  # default: generator_ema
    assert_same_outputs(model, tiny_out, tiny_lqs, pp_lr)
    for prefix in ["generator", "generator."]:
        model = load_weights(fresh(), path, prefix=prefix)
        assert all(torch.equal(model.state_dict()[k], other[k]) for k in other)
    d2 = load_weights(torch.nn.Conv2d(3, 4, 3), path, prefix="discriminator")
    assert torch.equal(d2.weight, disc.weight)

    # mmediting 0.x: generator only; mmagic 1.x: metadata objects weights_only refuses
    path2 = tmp_path / "mmedit.pth"
    torch.save(
        {
            "meta": {"obj": OpaqueMeta()},
            "state_dict": {f"generator.{k}": v for k, v in state.items()},
        },
        path2,
    )
    with pytest.raises(Exception):
        torch.load(path2, weights_only=True)
    assert_same_outputs(load_weights(fresh(), path2), tiny_out, tiny_lqs, pp_lr)


@pytest.mark.parametrize("part", ["params", "params_ema"])
def test_load_basicsr(tmp_path, pp_lr, tiny_out, tiny_lqs, part):
    state = to_basicsr(pp_lr.state_dict())
    assert "spynet.basic_module.0.basic_module.8.weight" in state and "upconv2.weight" in state
    ckpt = (
        {"params": state}
        if part == "params"
        else {"params": {k: torch.zeros_like(v) for k, v in state.items()}, "params_ema": state}
    )
    torch.save(ckpt, tmp_path / "bsr.pth")
    assert_same_outputs(load_weights(fresh(), tmp_path / "bsr.pth"), tiny_out, tiny_lqs, pp_lr)
    if part == "params_ema":  # an explicit part
        model = load_weights(fresh(), tmp_path / "bsr.pth", prefix="params")
        assert model.conv_last.weight.abs().max() == 0


def test_load_plain_and_safetensors(tmp_path, pp_lr, tiny_out, tiny_lqs):
    torch.save(pp_lr.state_dict(), tmp_path / "plain.pth")
    assert_same_outputs(load_weights(fresh(), tmp_path / "plain.pth"), tiny_out, tiny_lqs, pp_lr)
    save_weights(pp_lr, tmp_path / "ours.safetensors")
    assert_same_outputs(
        load_weights(fresh(), tmp_path / "ours.safetensors"), tiny_out, tiny_lqs, pp_lr
    )
    save_weights(pp_lr.state_dict(), tmp_path / "ours.bin")  # detected by content, not extension
    assert_same_outputs(load_weights(fresh(), tmp_path / "ours.bin"), tiny_out, tiny_lqs, pp_lr)


@pytest.mark.parametrize("layout", ["mmagic", "basicsr"])
def test_load_standalone_spynet(tmp_path, pp_lr, layout):
    spynet_state = {
        k[len("spynet.") :]: v
        for k, v in pp_lr.state_dict().items()
        if k.startswith("spynet.") and not k.endswith(("mean", "std"))
    }
    assert len(spynet_state) == 60
    if layout == "mmagic":
        torch.save({"meta": {}, "state_dict": spynet_state}, tmp_path / "spynet.pth")
    else:
        torch.save(
            {"params": to_basicsr({f"spynet.{k}": v for k, v in spynet_state.items()})},
            tmp_path / "s.pth",
        )
        sd = torch.load(tmp_path / "s.pth")["params"]
        torch.save(
            {"params": {k[len("spynet.") :]: v for k, v in sd.items()}}, tmp_path / "spynet.pth"
        )
    model = fresh()
    load_weights(model.spynet, tmp_path / "spynet.pth")
    # kept, not in the file
    assert torch.equal(model.spynet.std.flatten(), torch.tensor([0.229, 0.224, 0.225]))
    a, b = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.spynet(a, b), pp_lr.spynet(a, b))


def test_strict_load_errors(tmp_path, pp_lr):
    state = dict(pp_lr.state_dict())
    missing = dict(state)
    del missing["conv_hr.bias"]
    unexpected = {**state, "conv_extra.weight": torch.zeros(1)}
    misshaped = {**state, "conv_last.weight": torch.zeros(3, 32, 3, 3)}
    for name, sd, words in [
        ("missing", missing, ["missing", "conv_hr.bias"]),
        ("unexpected", unexpected, ["unexpected", "conv_extra.weight"]),
        ("misshaped", misshaped, ["mis-shaped", "conv_last.weight", "[3, 32, 3, 3]"]),
    ]:
        path = tmp_path / f"{name}.pth"
        torch.save(sd, path)
        with pytest.raises(ValueError) as err:
            load_weights(fresh(), path)
        for word in words + [str(path)]:
            assert word in str(err.value)
    # many missing keys: the first few and the count
    with pytest.raises(ValueError, match=r"\(272 in all\); unexpected x"):
        load_weights(BasicVSRPlusPlus(), _save(tmp_path / "empty.pth", {"x": torch.zeros(1)}))
    with pytest.raises(ValueError, match="no keys start with 'generator_ema.'"):
        load_weights(fresh(), tmp_path / "missing.pth", prefix="generator_ema")
    with pytest.raises(ValueError, match="not a state dict"):
        load_weights(fresh(), _save(tmp_path / "junk.pth", {"a": 1, "b": torch.zeros(1)}))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_weights(fresh(), tmp_path / "nope.pth")


def _save(path, obj):
    torch.save(obj, path)
    return path


def test_save_weights_atomic_overwrite(tmp_path, pp_lr):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"old")
    save_weights(pp_lr, path)
    assert os.listdir(tmp_path) == ["w.safetensors"]  # no temporary left behind
    shared = torch.zeros(4)
    save_weights({"a": shared, "b": shared[:2]}, path)  # views of one storage are fine
    assert torch.equal(read_state_dict(path)["b"], torch.zeros(2))


def upscale_cli(*args, cwd):
    """python upscale.py ARGS, as a user runs it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, os.path.join(root, "upscale.py"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd)


@pytest.mark.slow
def test_convert_cli(tmp_path, pp_lr, tiny_out, tiny_lqs):
    src = tmp_path / "ckpt.pth"
    dst = tmp_path / "out.safetensors"
    torch.save(
        {"state_dict": {f"generator.{k}": v for k, v in to_basicsr(pp_lr.state_dict()).items()}},
        src,
    )
    res = upscale_cli("--convert", src, dst, "--prefix", "generator", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "out.safetensors" in res.stdout
    assert_same_outputs(load_weights(fresh(), dst), tiny_out, tiny_lqs, pp_lr)
    # safetensors -> safetensors
    res = upscale_cli("--convert", dst, tmp_path / "again.safetensors", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    import safetensors

    with (
        safetensors.safe_open(dst, "pt") as a,
        safetensors.safe_open(tmp_path / "again.safetensors", "pt") as b,
    ):
        assert a.metadata() == b.metadata() and a.metadata()["network"] == "BasicVSRPlusPlus"
        assert a.keys() == b.keys() and all(
            torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys()
        )
    # nothing to do: argparse's usage error (SystemExit 2)
    res = upscale_cli(cwd=tmp_path)
    assert res.returncode == 2 and "error:" in res.stderr


# ----------------------------------------------------------------------------------------
# Self-describing weights: every published architecture is recognised from its file alone


def published_file(path, model, layout):
    """model's state dict saved as a published file would hold it. The values are zeros expanded
    from one element, so even the 128-channel files take a few kilobytes (detection reads
    shapes)."""
    state = {
        k: torch.zeros(1, dtype=v.dtype).expand(v.shape) for k, v in model.state_dict().items()
    }
    if layout == "mmagic":  # mmagic/mmediting: generator (+ EMA, discriminator) under state_dict
        torch.save(
            {
                "meta": {"mmedit_version": "0.x"},
                "state_dict": {f"generator.{k}": v for k, v in state.items()},
            },
            path,
        )
    elif layout == "mmagic_gan":
        disc = {
            "conv_0.weight": torch.zeros(1).expand(64, 3, 3, 3),
            "conv_9.weight": torch.zeros(1).expand(1, 64, 3, 3),
        }
        torch.save(
            {
                "state_dict": {
                    **{f"generator.{k}": v for k, v in state.items()},
                    **{f"generator_ema.{k}": v for k, v in state.items()},
                    **{f"discriminator.{k}": v for k, v in disc.items()},
                }
            },
            path,
        )
    else:  # BasicSR
        torch.save({"params": to_basicsr(state)}, path)
    return str(path)


def meta_model(cls, **kwargs):
    with torch.device("meta"):  # shapes only: no memory for the 128-channel networks
        return cls(**kwargs)


# (the published files, the network as mmagic builds it, the file's layout)
PUBLISHED = [
    (
        "basicvsr_plusplus_c64n7 (REDS4, Vimeo-90K BI/BD)",
        BasicVSRPlusPlus,
        dict(mid_channels=64, num_blocks=7),
        "mmagic",
    ),
    (
        "basicvsr_plusplus_c128n25_ntire_vsr",
        BasicVSRPlusPlus,
        dict(mid_channels=128, num_blocks=25),
        "mmagic",
    ),
    (
        "basicvsr_plusplus_c128n25_ntire_decompress_track1-3",
        BasicVSRPlusPlus,
        dict(mid_channels=128, num_blocks=25, is_low_res_input=False),
        "mmagic",
    ),
    (
        "basicvsr_plusplus_deblur_dvd/gopro, denoise",
        BasicVSRPlusPlus,
        dict(mid_channels=64, num_blocks=15, is_low_res_input=False),
        "mmagic",
    ),
    ("basicvsr_reds4 / vimeo90k_bi / bd", BasicVSR, dict(mid_channels=64, num_blocks=30), "mmagic"),
    ("BasicSR BasicVSR++", BasicVSRPlusPlus, dict(mid_channels=64, num_blocks=7), "basicsr"),
]


@pytest.mark.parametrize(
    "name,cls,kwargs,layout", PUBLISHED, ids=[p[0].split(" ")[0] for p in PUBLISHED]
)
def test_published_architectures_are_detected(tmp_path, name, cls, kwargs, layout):
    path = published_file(tmp_path / "published.pth", meta_model(cls, **kwargs), layout)
    network, config = weights.network_of(path, read_state_dict(path))
    expected = (
        {"max_residue_magnitude": 10, "is_low_res_input": True, "scale": 4, **kwargs}
        if cls is BasicVSRPlusPlus
        else {"scale": 4, **kwargs}
    )
    assert (network, config) == (cls.__name__, expected)
    model = weights.load_network(path)  # built at that size, and the file loads strictly into it
    assert type(model) is cls and model.config == expected
    assert weights.scale_of(model) == (1 if kwargs.get("is_low_res_input") is False else 4)


def test_realbasicvsr_gan_file_is_detected_and_prefers_ema(tmp_path):
    net = realbasicvsr.RealBasicVSR(8, 2, 3)
    state = {k: torch.rand(v.shape) for k, v in net.state_dict().items()}
    ema = {k: v + 1 for k, v in state.items()}
    torch.save(
        {
            "state_dict": {
                **{f"generator.{k}": v for k, v in state.items()},
                **{f"generator_ema.{k}": v for k, v in ema.items()},
                "discriminator.conv_0.weight": torch.zeros(8, 3, 3, 3),
            }
        },
        tmp_path / "rbv.pth",
    )
    model = weights.load_network(tmp_path / "rbv.pth", refine_thres=20)
    assert type(model) is realbasicvsr.RealBasicVSR and model.is_sequential_cleaning
    assert model.config == dict(
        mid_channels=8, num_propagation_blocks=2, num_cleaning_blocks=3, scale=4
    )
    assert model.dynamic_refine_thres == pytest.approx(20 / 255)
    assert torch.equal(
        model.state_dict()["image_cleaning.1.weight"], ema["image_cleaning.1.weight"]
    )


def test_our_safetensors_name_their_network(tmp_path):
    """train.py's and --convert's files carry the network and its arguments in their metadata;
    a safetensors without them (another tool's) is recognised by its keys."""
    import safetensors.torch

    net = BasicVSRPlusPlus(16, 2)
    save_weights(net, tmp_path / "ours.safetensors")
    with safetensors.safe_open(tmp_path / "ours.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["network"] == "BasicVSRPlusPlus"
    assert json.loads(meta["config"]) == dict(
        mid_channels=16, num_blocks=2, max_residue_magnitude=10, is_low_res_input=True, scale=4
    )
    safetensors.torch.save_file(net.state_dict(), tmp_path / "bare.safetensors")
    for name in ("ours", "bare"):
        model = weights.load_network(tmp_path / f"{name}.safetensors")
        assert model.config == net.config
        assert all(
            torch.equal(a, b)
            for a, b in zip(model.state_dict().values(), net.state_dict().values())
        )


def test_files_that_are_no_upscaling_network(tmp_path):
    spynet = {k: v for k, v in SPyNet().state_dict().items() if k not in ("mean", "std")}
    torch.save({"state_dict": spynet}, tmp_path / "spynet_20210409-c6c1bd09.pth")
    with pytest.raises(ValueError, match="SPyNet, the optical-flow network"):
        weights.load_network(tmp_path / "spynet_20210409-c6c1bd09.pth")
    torch.save(
        {
            "state_dict": {
                "discriminator.conv_0.weight": torch.zeros(1),
                "discriminator.conv_9.weight": torch.zeros(1),
            }
        },
        tmp_path / "d.pth",
    )
    with pytest.raises(ValueError, match="UNet discriminator"):
        weights.network_of(tmp_path / "d.pth", read_state_dict(tmp_path / "d.pth", "discriminator"))
    torch.save({"encoder.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"fits no network here .*\['encoder'\]"):
        weights.load_network(tmp_path / "other.pth")


# ----------------------------------------------------------------------------------------
# CUDA: whole models, Triton vs the reference path (skipped without a GPU); the op-level CUDA
# tests are in test_deform_conv.py and test_flow_warp.py.
# - BasicVSR++, BasicVSR and RealBasicVSR, use_backend("triton") vs ("torch"), TF32 off:
#   fp32 outputs: max |diff| <= 1e-4 x max |reference - bilinear x4 of the input| (what the
#   network adds to its skip); BasicVSR++'s parameter gradients within rel 1e-3 (all gradients
#   as one vector, max |diff| / max |reference|); bf16 (autocast) outputs: the RMS error against
#   the fp32 reference at most 2x the reference path's own bf16 RMS error + 1e-3;
# - BasicVSR++ converted to channels-last vs NCHW, both on Triton: outputs max |diff| <= 1e-4
#   (fp32) / 2e-2 (bf16), eager and compiled; parameter gradients within rel 5e-3.


@torch.no_grad()
def build_model(arch):
    """A default-size network with random weights of trained networks' scale (flows, offsets)."""
    torch.manual_seed(0)
    net = {
        "basicvsrpp": BasicVSRPlusPlus,
        "basicvsr": BasicVSR,
        "realbasicvsr": realbasicvsr.RealBasicVSR,
    }[arch]()
    return weights.realistic_init(net)


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
    lqs = moving_clip(5, 64, 96).cuda()
    outs = {}
    for backend in ("triton", "torch"):
        for dtype in (None, torch.bfloat16):
            with (
                kernels.use_backend(backend),
                torch.inference_mode(),
                torch.autocast("cuda", dtype=dtype, enabled=dtype is not None),
            ):
                outs[backend, dtype] = net(lqs).float()
    ref = outs["torch", None]
    assert torch.isfinite(outs["triton", torch.bfloat16]).all()
    # Relative to what the network adds to its bilinear x4 skip (~0.05 here, the output ~1).
    skip = F.interpolate(
        lqs.flatten(0, 1), scale_factor=4, mode="bilinear", align_corners=False
    ).view_as(ref)
    err = (outs["triton", None] - ref).abs().max() / (ref - skip).abs().max()
    assert err <= 1e-4, err.item()
    err_triton = rms(outs["triton", torch.bfloat16], ref)
    err_ref = rms(outs["torch", torch.bfloat16], ref)
    assert err_triton <= 2 * err_ref + 1e-3, (err_triton, err_ref)


@cuda
def test_cuda_basicvsrpp_gradients_triton_vs_reference(no_tf32):
    net = build_model("basicvsrpp").cuda().train()
    lqs = moving_clip(3, 64, 64).cuda()
    target = F.interpolate(lqs[0], scale_factor=4, mode="bicubic", align_corners=False)[None]
    grads = {}
    for backend in ("triton", "torch"):
        net.zero_grad(set_to_none=True)
        with kernels.use_backend(backend):
            torch.sqrt((net(lqs) - target) ** 2 + 1e-12).mean().backward()
        grads[backend] = {
            name: p.grad.flatten() for name, p in net.named_parameters() if p.grad is not None
        }
    assert grads["triton"].keys() == grads["torch"].keys()
    assert (
        rel(torch.cat(list(grads["triton"].values())), torch.cat(list(grads["torch"].values())))
        <= 1e-3
    )


@cuda
@pytest.mark.slow
def test_cuda_compiled_and_host_cache_basicvsrpp_equal_eager(no_tf32):
    """The two Triton variants of the model benchmark compute the same network: compile_network
    (inductor around the Triton custom ops) and HostFrames, the pinned host lists with their copy
    stream."""
    net = build_model("basicvsrpp").cuda().eval()
    lqs = moving_clip(6, 64, 96).cuda()
    compiled = basicvsr.compile_network(copy.deepcopy(net))
    for dtype in (None, torch.bfloat16):
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            eager = net(lqs).float()
            out_compiled = compiled(lqs).float()
            net.cpu_cache_length = 0
            out_cached = net(lqs).float()
            net.cpu_cache_length = 100
        assert out_cached.device.type == "cpu"
        # bf16: inductor fuses and rounds the glue differently
        tol = 1e-4 if dtype is None else 2e-2
        assert (out_compiled - eager).abs().max().item() <= tol
        # the same kernels in the same order
        assert (out_cached - eager.cpu()).abs().max().item() <= 1e-6


@cuda
@pytest.mark.slow
def test_cuda_channels_last_basicvsrpp_equals_nchw(no_tf32):
    """The "triton + channels_last" variant (--channels-last) computes the same network: outputs in
    fp32 and bf16, compiled too, and the parameter gradients of a training step; its propagation
    features stay channels-last."""
    cl = torch.channels_last
    net = build_model("basicvsrpp").cuda().eval()
    nhwc = copy.deepcopy(net).to(memory_format=cl)
    compiled = basicvsr.compile_network(copy.deepcopy(nhwc))
    lqs = moving_clip(6, 64, 96).cuda()
    layouts = []
    hook = nhwc.backbone["forward_2"].register_forward_hook(
        lambda m, i, o: layouts.append(o.is_contiguous(memory_format=cl) and not o.is_contiguous())
    )
    for dtype in (None, torch.bfloat16):
        with (
            kernels.use_backend("triton"),
            torch.inference_mode(),
            torch.autocast("cuda", dtype=dtype, enabled=dtype is not None),
        ):
            ref, out, out_compiled = net(lqs).float(), nhwc(lqs).float(), compiled(lqs).float()
        # bf16: other convolution algorithms, rounded differently
        tol = 1e-4 if dtype is None else 2e-2
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
        grads.append(
            torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        )
    # 5e-3: the two layouts' convolutions sum in different orders, and conv_last's bias gradient
    # is a sum over every output pixel of terms of both signs (on the CPU, fp32: rel 9e-4 from it
    # alone).
    assert rel(grads[1], grads[0]) <= 5e-3
