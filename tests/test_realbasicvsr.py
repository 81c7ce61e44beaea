"""realbasicvsr.py against the reference-structured oracle (tests/reference_realbasicvsr.py), the
published checkpoints' keys and hand-computed loss values; and NIQE (metrics.py), the metric
RealBasicVSR is evaluated with, against BasicSR's values."""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import basicvsr
import metrics
import realbasicvsr as rbv
import weights

import reference_realbasicvsr as ref  # noqa: E402  (tests/ is on sys.path under pytest)
from helpers import published_keys  # noqa: E402

# The key lists of the published checkpoints are vendored in tests/keys; the tests rebuild them
# from the layout of open-mmlab/mmagic's modules below and compare.


def resblocks_keys(prefix, c_in, c, n):
    keys = [(prefix + "main.0.weight", [c, c_in, 3, 3]), (prefix + "main.0.bias", [c])]
    for j in range(n):
        for conv in ("conv1", "conv2"):
            keys += [
                (f"{prefix}main.2.{j}.{conv}.weight", [c, c, 3, 3]),
                (f"{prefix}main.2.{j}.{conv}.bias", [c]),
            ]
    return keys


def realbasicvsr_keys(c=64, n=20):
    """mmagic RealBasicVSRNet(c, n, n) state_dict (open-mmlab/mmagic:
    mmagic/models/editors/real_basicvsr/real_basicvsr_net.py): image cleaning, then the BasicVSRNet
    with its SPyNet."""
    keys = resblocks_keys("image_cleaning.0.", 3, c, n)
    keys += [("image_cleaning.1.weight", [3, c, 3, 3]), ("image_cleaning.1.bias", [3])]
    keys += [("basicvsr.spynet.mean", [1, 3, 1, 1]), ("basicvsr.spynet.std", [1, 3, 1, 1])]
    for level in range(6):
        for j, (o, i) in enumerate([(32, 8), (64, 32), (32, 64), (16, 32), (2, 16)]):
            p = f"basicvsr.spynet.basic_module.{level}.basic_module.{j}.conv."
            keys += [(p + "weight", [o, i, 7, 7]), (p + "bias", [o])]
    keys += resblocks_keys("basicvsr.backward_resblocks.", c + 3, c, n)
    keys += resblocks_keys("basicvsr.forward_resblocks.", c + 3, c, n)
    for name, shape in [
        ("fusion", [c, 2 * c, 1, 1]),
        ("upsample1.upsample_conv", [4 * c, c, 3, 3]),
        ("upsample2.upsample_conv", [256, c, 3, 3]),
        ("conv_hr", [64, 64, 3, 3]),
        ("conv_last", [3, 64, 3, 3]),
    ]:
        keys += [(f"basicvsr.{name}.weight", shape), (f"basicvsr.{name}.bias", shape[:1])]
    return keys


def unet_disc_keys(m=64):
    """mmagic UNetDiscriminatorWithSpectralNorm(3, m) state_dict (open-mmlab/mmagic:
    mmagic/models/editors/real_esrgan/unet_disc.py)."""
    keys = [("conv_0.weight", [m, 3, 3, 3]), ("conv_0.bias", [m])]
    convs = [
        (2 * m, m, 4),
        (4 * m, 2 * m, 4),
        (8 * m, 4 * m, 4),
        (4 * m, 8 * m, 3),
        (2 * m, 4 * m, 3),
        (m, 2 * m, 3),
        (m, m, 3),
        (m, m, 3),
    ]
    for i, (o, c_in, k) in enumerate(convs, start=1):
        keys += [
            (f"conv_{i}.weight_orig", [o, c_in, k, k]),
            (f"conv_{i}.weight_u", [o]),
            (f"conv_{i}.weight_v", [c_in * k * k]),
        ]
    return keys + [("conv_9.weight", [1, m, 3, 3]), ("conv_9.bias", [1])]


def test_key_rules_match_official_lists():
    """The rebuilt lists equal the published ones."""
    for name, keys in (
        ("keys_realbasicvsr_net.tsv", realbasicvsr_keys()),
        ("keys_unet_disc_sn.tsv", unet_disc_keys()),
    ):
        assert keys == published_keys(name), name


def shapes(module):
    return [(k, list(v.shape)) for k, v in module.state_dict().items()]


# ============================================================================ discriminator


def test_disc_keys_params_and_shape():
    """As mmagic's test_unet_disc.py: (1,3,16,16) -> (1,1,16,16); keys exactly the mmagic ones;
    4,376,897 parameters."""
    disc = rbv.UNetDiscriminatorSN(3)
    assert shapes(disc) == unet_disc_keys()
    assert sum(p.numel() for p in disc.parameters()) == 4376897
    assert disc(torch.rand(1, 3, 16, 16)).shape == (1, 1, 16, 16)


@pytest.mark.parametrize("skip_connection", [True, False])
def test_disc_matches_reference(skip_connection):
    torch.manual_seed(0)
    disc = rbv.UNetDiscriminatorSN(3, mid_channels=8, skip_connection=skip_connection)
    # spectral norm keeps activations small; scale the plain convs for O(1) logits
    with torch.no_grad():
        disc.conv_0.weight.mul_(10)
        disc.conv_9.weight.mul_(100)
    # a few training-mode calls run power iterations, so u and v are no longer their random init
    u0 = disc.conv_3.weight_u.clone()
    for _ in range(3):
        disc(torch.rand(2, 3, 32, 32))
    assert not torch.allclose(u0, disc.conv_3.weight_u)
    disc.eval()
    x = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        out = disc(x)
        expected = ref.unet_disc_ref(x, disc.state_dict(), skip_connection)
    assert out.shape == (2, 1, 32, 48)
    assert (out - expected).abs().max() < 1e-4
    assert out.std() > 0.1  # not a degenerate constant map


def test_disc_bad_input():
    disc = rbv.UNetDiscriminatorSN(3, mid_channels=4)
    with pytest.raises(ValueError, match="divisible by 8"):
        disc(torch.rand(1, 3, 20, 16))
    with pytest.raises(ValueError, match="expects"):
        disc(torch.rand(1, 1, 3, 16, 16))


# ============================================================================ losses


def test_l1_and_charbonnier_hand_values():
    pred = torch.tensor([0.0, 1.0, 2.0, -1.0])
    target = torch.tensor([1.0, 1.0, 0.0, 1.0])
    assert F.l1_loss(pred, target).item() == pytest.approx((1 + 0 + 2 + 2) / 4)
    assert rbv.charbonnier_loss(pred, target).item() == pytest.approx(
        (1 + 1e-6 + 2 + 2) / 4, abs=1e-6
    )
    expected = (math.sqrt(1 + 0.5) + math.sqrt(0.5) + 2 * math.sqrt(4 + 0.5)) / 4
    assert rbv.charbonnier_loss(pred, target, eps=0.5).item() == pytest.approx(expected, rel=1e-6)


def test_cleaning_loss_hand_value():
    # GT (1,1,3,8,8) made of 4x4 constant blocks: the area-downsampled GT is the block values.
    blocks = torch.tensor([[0.2, 0.4], [0.6, 1.0]])
    gt = blocks.repeat_interleave(4, 0).repeat_interleave(4, 1).expand(1, 1, 3, 8, 8).contiguous()
    gt[..., 0, 0] += 0.8  # inside block (0,0): its mean rises by 0.8/16 = 0.05
    cleaned = torch.zeros(1, 1, 3, 2, 2)
    expected = (0.25 + 0.4 + 0.6 + 1.0) / 4
    assert rbv.cleaning_loss(cleaned, gt).item() == pytest.approx(expected, rel=1e-6)
    # x2: 2x2 cells; the raised pixel lifts its cell by 0.8/4:
    # (3 * 0.2 + 0.4 + 4 * (0.4 + 0.6 + 1.0)) / 16
    assert rbv.cleaning_loss(torch.zeros(1, 1, 3, 4, 4), gt).item() == pytest.approx(
        9.0 / 16, rel=1e-6
    )
    with pytest.raises(ValueError, match="x4- or x2-down"):
        rbv.cleaning_loss(torch.zeros(1, 1, 3, 3, 3), gt)


def test_gan_loss_hand_values():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 3.0]])
    softplus = lambda z: math.log1p(math.exp(z))  # noqa: E731
    real = (softplus(-0.0) + softplus(-2.0) + softplus(1.0) + softplus(-3.0)) / 4
    fake = (softplus(0.0) + softplus(2.0) + softplus(-1.0) + softplus(3.0)) / 4
    assert rbv.gan_loss(logits, True).item() == pytest.approx(real, rel=1e-6)
    assert rbv.gan_loss(logits, False).item() == pytest.approx(fake, rel=1e-6)
    assert rbv.gan_loss(logits, True, weight=0.05).item() == pytest.approx(0.05 * real, rel=1e-6)


# ============================================================================ perceptual loss


def random_torchvision_vgg19(path):
    """A random state dict in torchvision's vgg19 key layout (features + a token classifier)."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    c_in = 3
    for i, c_out in zip(ref.VGG19_CONVS, [64] * 2 + [128] * 2 + [256] * 4 + [512] * 8):
        # He-scaled so features keep a sensible magnitude through 16 convs
        sd[f"features.{i}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=g) * math.sqrt(
            2 / (9 * c_in)
        )
        sd[f"features.{i}.bias"] = torch.randn(c_out, generator=g) * 0.01
        c_in = c_out
    # the real file also holds classifier.{0,3,6}.*; they are skipped (small stand-ins here)
    sd["classifier.0.weight"] = torch.zeros(4, 4)
    sd["classifier.6.bias"] = torch.zeros(4)
    torch.save(sd, path)
    return sd


def test_perceptual_loss_loads_torchvision_vgg19(tmp_path):
    path = tmp_path / "vgg19-dcbb9e9d.pth"
    sd = random_torchvision_vgg19(path)
    loss_fn = rbv.PerceptualLoss()
    weights.load_vgg19_features(loss_fn.vgg, str(path))
    assert loss_fn.layer_weights == {2: 0.1, 7: 0.1, 16: 1.0, 25: 1.0, 34: 1.0}
    assert not any(p.requires_grad for p in loss_fn.parameters())
    loss_fn.train()
    assert not loss_fn.vgg.training

    torch.manual_seed(0)
    gt = torch.rand(1, 2, 3, 32, 32)
    pred = (gt + 0.1 * torch.randn_like(gt)).requires_grad_(True)
    loss = loss_fn(pred, gt)
    expected = ref.perceptual_loss_ref(pred.detach(), gt, sd, loss_fn.layer_weights)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    # one layer on its own, as a hand check of the pre-ReLU tap and the 0.1 weight
    only2 = ref.perceptual_loss_ref(pred.detach(), gt, sd, {2: 0.1})

    def conv1_2(x):
        x = (x - loss_fn.mean) / loss_fn.std
        x = F.relu(F.conv2d(x, sd["features.0.weight"], sd["features.0.bias"], padding=1))
        return F.conv2d(x, sd["features.2.weight"], sd["features.2.bias"], padding=1)

    hand = 0.1 * (conv1_2(pred.detach().flatten(0, 1)) - conv1_2(gt.flatten(0, 1))).abs().mean()
    assert only2.item() == pytest.approx(hand.item(), rel=1e-5)
    # the same on (N,3,H,W) input, and gradients reach pred but not the VGG
    assert loss_fn(pred.flatten(0, 1), gt.flatten(0, 1)).item() == pytest.approx(
        loss.item(), rel=1e-6
    )
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss_fn.parameters())


def test_perceptual_loss_errors(tmp_path):
    vgg = rbv.PerceptualLoss().vgg
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        weights.load_vgg19_features(vgg, str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, bad)
    with pytest.raises(ValueError, match="bad.pth"):
        weights.load_vgg19_features(vgg, str(bad))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        weights.load_vgg19_features(vgg, str(garbage))


# ============================================================================ generator


def tiny_generator(mid_channels=8, seed=0, **kwargs):
    """RealBasicVSR(mid, 1, 1) whose cleaning roughly halves the frames each pass, so mean |residue|
    shrinks from pass to pass (about 0.26, 0.12, 0.06 on uniform noise) and the threshold picks
    1, 2 or 3 passes; the random weights on top keep every part of the module in play."""
    torch.manual_seed(seed)
    model = rbv.RealBasicVSR(mid_channels, 1, 1, **kwargs)
    with torch.no_grad():
        for c in range(3):
            model.image_cleaning[0].main[0].weight[c, c, 1, 1] += 1
            model.image_cleaning[1].weight[c, c, 1, 1] -= 0.5
    return model


def reference_outputs(model, lqs, thres, sequential):
    sd = model.state_dict()
    net = basicvsr.BasicVSR(
        model.basicvsr.mid_channels, len(model.basicvsr.forward_resblocks.main[2])
    )
    net.load_state_dict(
        {k[len("basicvsr.") :]: v for k, v in sd.items() if k.startswith("basicvsr.")}
    )
    with torch.no_grad():
        return ref.real_basicvsr_ref(lqs, sd, net, thres, sequential)


def test_generator_keys_and_params():
    model = rbv.RealBasicVSR()
    assert shapes(model) == realbasicvsr_keys()
    assert sum(p.numel() for p in model.parameters()) == 6294834
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4854534
    assert model.dynamic_refine_thres == 1.0


@pytest.mark.parametrize(
    "passes, thres, sequential",
    [
        (1, 255, True),
        (2, 0.18 * 255, False),
        (2, 0.18 * 255, True),
        (3, 0.08 * 255, False),
        (3, 0.0, True),
    ],
)
def test_generator_matches_reference(passes, thres, sequential):
    """Batched or sequential cleaning vs the reference loop: outputs, cleaned LQs, number of
    passes."""
    torch.manual_seed(1)
    lqs = torch.rand(2, 2, 3, 16, 16)  # n=2: the stopping test is one mean over the whole batch
    lqs_copy = lqs.clone()
    model = tiny_generator(dynamic_refine_thres=thres, is_sequential_cleaning=sequential)
    calls = []
    model.image_cleaning.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        out, cleaned = model(lqs, return_lqs=True)
    ref_out, ref_cleaned, ref_passes = reference_outputs(model, lqs, thres, sequential)
    assert ref_passes == passes
    assert len(calls) == passes * (lqs.size(1) if sequential else 1)
    assert out.shape == (2, 2, 3, 64, 64) and cleaned.shape == lqs.shape
    assert (cleaned - ref_cleaned).abs().max() < 1e-4
    assert (out - ref_out).abs().max() < 1e-4
    assert torch.equal(lqs, lqs_copy), "the caller's tensor was modified"
    assert (cleaned - lqs).abs().mean() > 0.1  # the cleaning did something


def test_generator_default_shapes():
    """As mmagic's test_real_basicvsr_net.py, with the default (64, 20, 20) network, in one forward
    call; 3 frames, not 5, to save CPU time (the frame count does not change the shapes)."""
    torch.manual_seed(0)
    model = rbv.RealBasicVSR(is_fix_cleaning=True, is_sequential_cleaning=True)
    assert not any(p.requires_grad for p in model.image_cleaning.parameters())
    with torch.no_grad():
        out, cleaned = model(torch.rand(1, 3, 3, 64, 64), return_lqs=True)
    assert out.shape == (1, 3, 3, 256, 256) and cleaned.shape == (1, 3, 3, 64, 64)
    assert torch.isfinite(out).all()


def test_generator_bad_input():
    model = tiny_generator()
    with pytest.raises(ValueError, match="RealBasicVSR"):
        model(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="RealBasicVSR"):
        model(torch.rand(1, 2, 1, 32, 32))


def test_gradients_flow_but_not_into_spynet():
    model = tiny_generator()
    model.requires_grad_(True)  # must not unfreeze SPyNet
    assert not any(p.requires_grad for p in model.basicvsr.spynet.parameters())
    lqs = torch.rand(1, 2, 3, 16, 16)
    gt = torch.rand(1, 2, 3, 64, 64)
    out, cleaned = model(lqs, return_lqs=True)
    (F.l1_loss(out, gt) + rbv.cleaning_loss(cleaned, gt)).backward()
    for name in (
        "image_cleaning",
        "basicvsr.backward_resblocks",
        "basicvsr.forward_resblocks",
        "basicvsr.fusion",
        "basicvsr.conv_last",
    ):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(name)]
        assert grads and all(g is not None for g in grads), name
        assert sum(g.abs().sum() for g in grads) > 0, name
    assert all(p.grad is None for p in model.basicvsr.spynet.parameters())

    fixed = tiny_generator(is_fix_cleaning=True).requires_grad_(True)
    assert not any(p.requires_grad for p in fixed.image_cleaning.parameters())
    fixed(lqs).abs().mean().backward()
    assert all(p.grad is None for p in fixed.image_cleaning.parameters())
    assert fixed.basicvsr.conv_last.weight.grad is not None


def test_training_losses_finite():
    """As mmagic's test_real_basicvsr.py: tiny net (mid 4, 1 block, thres 5) and D (mid 4); all
    four G losses and both D losses."""
    torch.manual_seed(0)
    net = rbv.RealBasicVSR(4, 1, 1, dynamic_refine_thres=5)
    disc = rbv.UNetDiscriminatorSN(3, 4)
    perceptual = rbv.PerceptualLoss()
    lq = torch.rand(1, 2, 3, 16, 16)
    gt = torch.rand(1, 2, 3, 64, 64)
    gt_usm = torch.rand(1, 2, 3, 64, 64)
    out, cleaned = net(lq, return_lqs=True)
    losses = {
        "loss_pix": F.l1_loss(out, gt_usm),
        "loss_clean": rbv.cleaning_loss(cleaned, gt_usm),
        "loss_perceptual": perceptual(out, gt_usm),
        "loss_gan": rbv.gan_loss(disc(out.flatten(0, 1)), True, weight=0.05),
        "loss_d_real": rbv.gan_loss(disc(gt.flatten(0, 1)), True),
        "loss_d_fake": rbv.gan_loss(disc(out.detach().flatten(0, 1)), False),
    }
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    sum(losses.values()).backward()
    assert net.image_cleaning[1].weight.grad is not None and disc.conv_0.weight.grad is not None


def test_load_published_layout(tmp_path):
    """An mmagic-style RealBasicVSR checkpoint: the generator loads from generator_ema by default,
    the discriminator (spectral-norm u, v buffers included) from prefix "discriminator"."""
    gen = tiny_generator(seed=1)
    gen_ema = tiny_generator(seed=2)
    torch.manual_seed(3)
    disc = rbv.UNetDiscriminatorSN(3, 8)
    for _ in range(2):  # move u, v away from their init
        disc(torch.rand(1, 3, 16, 16))
    state = {}
    for name, module in (("generator", gen), ("generator_ema", gen_ema), ("discriminator", disc)):
        state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    path = tmp_path / "realbasicvsr_c64b20_mmagic.pth"
    torch.save({"meta": {"iter": 150000}, "state_dict": state}, path)

    loaded = weights.load_weights(tiny_generator(seed=4), path)
    for k, v in gen_ema.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k

    disc2 = weights.load_weights(rbv.UNetDiscriminatorSN(3, 8), path, prefix="discriminator")
    for k, v in disc.state_dict().items():
        assert torch.equal(disc2.state_dict()[k], v), k
    disc.eval()
    disc2.eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(disc(x), disc2(x))

    # our own safetensors round trip
    weights.save_weights(disc2, tmp_path / "disc.safetensors")
    disc3 = weights.load_weights(
        rbv.UNetDiscriminatorSN(3, 8), tmp_path / "disc.safetensors"
    ).eval()
    with torch.no_grad():
        assert torch.equal(disc(x), disc3(x))


# ============================================================================ NIQE

# The NIQE inputs are committed (tests/data/niqe_inputs.npz, RGB uint8): textured synthetic frames
# ("a", "crop_200x300", "192x192"), "a" plus Gaussian noise of sigma 20 ("a_noise20"), and a frame
# downscaled and upscaled x4 with the MATLAB bicubic ("smooth"). Rendered once with
# synthetic.synthetic_clip (seeds 0, 1, 3, 2) on OpenCV 5.1; regenerating them on another OpenCV or
# CPU moves a few pixels by a grey level, which is why they are stored rather than drawn here.
NIQE_INPUTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "niqe_inputs.npz")


# BasicSR 1.4.2 (PyPI sdist), basicsr/metrics/niqe.py calculate_niqe(img[..., ::-1], crop_border=0,
# input_order='HWC', convert_to='y') -- BasicSR takes BGR -- numpy 2.4.6, scipy 1.17.1,
# torch 2.13.0 CPU, computed 2026-12-03. Value and the input's pixel sum (to tell changed inputs
# from a changed metric).
_NIQE_BASICSR = {
    "a": (5.690433493810372, 18805903),
    "crop_200x300": (9.07181776594531, 24171258),
    "a_noise20": (14.674981032019822, 18817255),
    "smooth": (8.128951493320509, 21713084),
    "192x192": (5.124279216087084, 15158134),
}


@pytest.fixture(scope="module")
def niqe_images():
    with np.load(NIQE_INPUTS) as f:
        return {name: f[name] for name in f.files}


def test_niqe_matches_basicsr(niqe_images):
    # 1e-3: BasicSR resizes the second scale in float32 torch; we agree to ~1e-4 (its own value
    # moves by about that when that resize is perturbed by one float32 ulp)
    for name, (value, pixel_sum) in _NIQE_BASICSR.items():
        img = niqe_images[name]
        assert int(img.astype(np.int64).sum()) == pixel_sum, f"{NIQE_INPUTS}: {name} changed"
        assert abs(metrics.niqe(img) - value) < 1e-3, (name, metrics.niqe(img), value)


def test_niqe_noise_scores_worse(niqe_images):
    a = niqe_images["a"]
    scores = [
        metrics.niqe(
            np.clip(a + np.random.default_rng(1).normal(0, s, a.shape), 0, 255)
            .round()
            .astype(np.uint8)
        )
        for s in (0, 5, 20)
    ]
    assert scores[0] < scores[1] < scores[2], scores
    assert metrics.niqe(a[..., ::-1]) != pytest.approx(scores[0])  # RGB order matters (Y weights)
    with pytest.raises(ValueError):
        metrics.niqe(a[:96, :96])  # one block: no covariance
