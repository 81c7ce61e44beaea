import math

import pytest
import torch
import torch.nn.functional as F

import realbasicvsr as rbv
import reference_realbasicvsr as ref  # noqa: E402  (tests/ is on sys.path under pytest)

REF_DIR = "/work/shared/ref"


def read_keys(name):
    """{key: shape} from a keys_*.tsv file."""
    keys = {}
    with open(f"{REF_DIR}/{name}") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            k, shape = line.rstrip("\n").split("\t")
            keys[k] = [int(s) for s in shape.strip("[]").split(",")]
    return keys


def shapes(module):
    return {k: list(v.shape) for k, v in module.state_dict().items()}


# ============================================================================ discriminator


def test_disc_keys_params_and_shape():
    """spec §11.7: (1,3,16,16) -> (1,1,16,16); keys exactly the mmagic ones; 4,376,897 parameters."""
    disc = rbv.UNetDiscriminatorSN(3)
    assert shapes(disc) == read_keys("keys_unet_disc_sn.tsv")
    assert list(disc.state_dict()) == list(read_keys("keys_unet_disc_sn.tsv"))
    assert sum(p.numel() for p in disc.parameters()) == 4376897
    assert disc(torch.rand(1, 3, 16, 16)).shape == (1, 1, 16, 16)


@pytest.mark.parametrize("skip_connection", [True, False])
def test_disc_matches_reference(skip_connection):
    torch.manual_seed(0)
    disc = rbv.UNetDiscriminatorSN(3, mid_channels=8, skip_connection=skip_connection)
    with torch.no_grad():  # spectral norm keeps activations small; scale the plain convs for O(1) logits
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
    assert rbv.l1_loss(pred, target).item() == pytest.approx((1 + 0 + 2 + 2) / 4)
    assert rbv.charbonnier_loss(pred, target).item() == pytest.approx((1 + 1e-6 + 2 + 2) / 4, abs=1e-6)
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
    with pytest.raises(ValueError, match="x4-down"):
        rbv.cleaning_loss(torch.zeros(1, 1, 3, 4, 4), gt)


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
    sd, c_in = {}, 3
    for i, c_out in zip(ref.VGG19_CONVS, [64] * 2 + [128] * 2 + [256] * 4 + [512] * 8):
        # He-scaled so features keep a sensible magnitude through 16 convs
        sd[f"features.{i}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=g) * math.sqrt(2 / (9 * c_in))
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
    loss_fn = rbv.PerceptualLoss(vgg_weights=str(path))
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
    conv1_2 = lambda x: F.conv2d(F.relu(F.conv2d((x - loss_fn.mean) / loss_fn.std, sd["features.0.weight"],  # noqa: E731
                                                 sd["features.0.bias"], padding=1)),
                                 sd["features.2.weight"], sd["features.2.bias"], padding=1)
    hand = 0.1 * (conv1_2(pred.detach().flatten(0, 1)) - conv1_2(gt.flatten(0, 1))).abs().mean()
    assert only2.item() == pytest.approx(hand.item(), rel=1e-5)
    # the same on (N,3,H,W) input, and gradients reach pred but not the VGG
    assert loss_fn(pred.flatten(0, 1), gt.flatten(0, 1)).item() == pytest.approx(loss.item(), rel=1e-6)
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss_fn.parameters())


def test_perceptual_loss_errors(tmp_path):
    with pytest.raises(ValueError, match="vgg19-dcbb9e9d.pth"):
        rbv.PerceptualLoss()
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        rbv.PerceptualLoss(vgg_weights=str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, bad)
    with pytest.raises(ValueError, match="bad.pth"):
        rbv.PerceptualLoss(vgg_weights=str(bad))
