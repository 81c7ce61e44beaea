"""train.py and metrics.py: metrics against closed forms, the training loop on tiny models (loss
goes down, checkpoints, exact resume, the GAN stage, the NaN guard), torchrun DDP on CPU with the
SPyNet freeze, and evaluation mode."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from contextlib import nullcontext

import cv2
import numpy as np
import pytest
import torch

import basicvsr
import data
import files
import metrics
import realbasicvsr
import synthetic
import train
import weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# BasicVSR++ needs LR frames of at least 64x64, so its GT crop is 256; RealBasicVSR (BasicVSR
# inside) takes any size, so its tests use 32-pixel GT crops, one clip of 2 frames (mirrored to 4)
# a batch.
TINY_PP = (
    "--model basicvsrpp --mid-channels 8 --num-blocks 1 --num-frames 2 --crop-size 256 "
    "--device cpu --log-interval 1 --val-set none"
).split()
TINY_RBV = (
    "--model realbasicvsr_wogan --mid-channels 8 --num-blocks 1 --num-cleaning-blocks 1 "
    "--num-frames 2 --crop-size 32 --batch-size 1 --synthetic-clips 4 "
    "--device cpu --log-interval 1 --val-set none"
).split()


@pytest.fixture
def one_thread():
    """One intra-op thread for the in-process training runs: the tiny models gain nothing from
    more, and OpenMP threads that spin against other processes run several times slower; the
    thread count is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(log):
    return {r["iter"]: r["loss"] for r in log if "loss" in r}


def tensors(path):
    return weights.read_state_dict(path)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# the conv layers of torchvision's vgg19().features up to conv5_4 (index 34): index -> out channels
VGG19_CONVS = dict(
    zip(
        [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34],
        [64] * 2 + [128] * 2 + [256] * 4 + [512] * 8,
    )
)


def random_vgg19_file(path):
    """A random VGG19 in the layout of torchvision's vgg19-dcbb9e9d.pth (features.{i}.weight/bias),
    what --vgg-weights takes; He-scaled so the features keep their magnitude through 16 convs."""
    g = torch.Generator().manual_seed(0)
    state = {}
    c_in = 3  # RGB
    for i, c_out in VGG19_CONVS.items():
        w = torch.randn(c_out, c_in, 3, 3, generator=g) * math.sqrt(2 / (9 * c_in))
        state[f"features.{i}.weight"] = w
        state[f"features.{i}.bias"] = torch.randn(c_out, generator=g) * 0.01
        c_in = c_out
    torch.save(state, path)
    return str(path)


# ---------------------------------------------------------------------------------------------
# Metrics


def test_psnr_known_values():
    a = torch.full((3, 16, 16), 100.0)
    assert metrics.psnr(a, a.clone()) == math.inf
    for d in (1.0, 7.0):
        b = a + d
        assert metrics.psnr(a, b) == pytest.approx(20 * math.log10(255 / d), abs=1e-9)
        # the same offset on R, G, B moves Y by d * (65.481 + 128.553 + 24.966) / 255
        # = d * 219 / 255
        assert metrics.psnr(a, b, y_channel=True) == pytest.approx(
            20 * math.log10(255 / (d * 219 / 255)), abs=1e-9
        )
    # crop_border drops the border before the mean: an error only on the border disappears
    c = a.clone()
    c[:, 0, :] += 50
    assert metrics.psnr(a, c, crop_border=1) == math.inf
    assert metrics.psnr(a, c) == pytest.approx(10 * math.log10(255**2 / (2500 / 16)), abs=1e-9)


def test_rgb2y_bt601_studio_range():
    # pixels: black, white, pure red, pure blue
    img = torch.tensor(
        [[0.0, 255.0, 255.0, 0.0], [0.0, 255.0, 0.0, 0.0], [0.0, 255.0, 0.0, 255.0]],
        dtype=torch.float64,
    ).view(3, 1, 4)
    y = metrics.rgb2y(img).flatten().tolist()
    assert y == pytest.approx([16.0, 235.0, 16 + 65.481, 16 + 24.966], abs=1e-9)


def _ssim_by_hand(x, y):
    """One channel, every valid 11x11 window, explicit Gaussian weights and the SSIM formula."""
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            a, b = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
            cov = (w * (a - ma) * (b - mb)).sum()
            vals.append(
                (2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
            )
    return float(np.mean(vals))


def test_ssim_known_values():
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.integers(0, 256, (3, 13, 12)).astype(np.float64))
    assert metrics.ssim(a, a.clone()) == pytest.approx(1.0, abs=1e-12)
    # constant images: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    c1 = (0.01 * 255) ** 2
    p, q = torch.full((3, 11, 11), 60.0), torch.full((3, 11, 11), 90.0)
    assert metrics.ssim(p, q) == pytest.approx((2 * 60 * 90 + c1) / (60**2 + 90**2 + c1), abs=1e-12)
    # random images: per channel by hand over the 3x2 valid windows, then the channel mean
    b = (a + torch.from_numpy(rng.normal(0, 80, (3, 13, 12)))).clamp(0, 255).round()
    want = np.mean([_ssim_by_hand(a[c].numpy(), b[c].numpy()) for c in range(3)])
    assert metrics.ssim(a, b) == pytest.approx(want, abs=1e-10)
    assert 0.1 < want < 0.9  # a real, non-trivial value


def test_vimeo_t_centre_frame_and_bicubic():
    """Vimeo-90K-T: 7 frames mirrored to 14, the prediction is 0.5 * (out[3] + out[10])."""
    lqs = torch.rand(1, 7, 3, 4, 4)

    def model(x):  # output frame k = (k + 1) everywhere; checks which frames are averaged
        assert x.shape[1] == 14 and basicvsr.is_mirror_extended(x)
        return torch.arange(1.0, 15.0).view(1, 14, 1, 1, 1).expand(1, 14, 3, 16, 16)

    for clip in (lqs, torch.cat([lqs, lqs.flip(1)], 1)):  # mirrored here, or by the dataset
        out = train.infer(model, clip, gt_frames=1, amp_ctx=nullcontext())
        assert out.shape == (1, 1, 3, 16, 16) and torch.all(out == 0.5 * (4 + 11))
        bic = train.bicubic(clip, gt_frames=1, scale=4)
        want = torch.nn.functional.interpolate(
            lqs[:, 3], scale_factor=4, mode="bicubic", align_corners=False
        )
        assert torch.allclose(bic[:, 0], want)


def test_lr_schedule_and_ema():
    cfg = dict(lr_schedule="cosine", lr_period=100, eta_min=1e-7)
    assert train.lr_at(0, 1e-4, cfg) == pytest.approx(1e-4)
    assert train.lr_at(50, 1e-4, cfg) == pytest.approx(1e-7 + 0.5 * (1e-4 - 1e-7))
    assert train.lr_at(100, 2.5e-5, cfg) == pytest.approx(1e-7)
    assert train.lr_at(150, 2.5e-5, cfg) == pytest.approx(1e-7)
    assert train.lr_at(7, 3e-5, dict(cfg, lr_schedule="constant")) == 3e-5

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    model[0].bias.requires_grad_(False)  # a frozen parameter is copied, not averaged
    model[1].running_mean.fill_(3.0)
    before = ema[0].weight.detach().clone()
    train.ema_update(ema, model, 0.999)
    assert torch.allclose(ema[0].weight, 0.999 * before + 0.001 * model[0].weight)
    assert torch.equal(ema[0].bias, model[0].bias)
    assert torch.equal(ema[1].running_mean, model[1].running_mean)


# ---------------------------------------------------------------------------------------------
# Training on tiny models


@pytest.mark.slow
def test_loss_decreases_checkpoints_and_validation(one_thread, tmp_path, capsys):
    out = tmp_path / "run"
    # one synthetic clip: every iteration sees the same batch
    train.main(
        TINY_PP
        + [
            "--synthetic-clips",
            "1",
            "--max-iters",
            "4",
            "--lr",
            "1e-3",
            "--save-interval",
            "2",
            "--keep-last",
            "1",
            "--val-set",
            "synthetic",
            "--val-clips",
            "1",
            "--val-interval",
            "4",
            "--out-dir",
            str(out),
        ]
    )
    text = capsys.readouterr().out
    assert "built-in synthetic clips" in text and "warning: no --spynet-weights" in text
    log = read_log(out)
    loss = losses(log)
    assert sorted(loss) == [1, 2, 3, 4] and loss[4] < loss[1]
    # keep-last 1: only the final checkpoint is left, and it loads into the model
    names = sorted(os.listdir(out))
    assert "iter_0000004.safetensors" in names and "iter_0000004.state.pt" in names
    assert not any(n.startswith("iter_0000002") for n in names)
    weights.load_weights(basicvsr.BasicVSRPlusPlus(8, 1), out / "iter_0000004.safetensors")
    state = torch.load(out / "iter_0000004.state.pt", weights_only=True)
    assert state["step"] == 4 and state["config"]["total_batch_size"] == 1
    assert state["config"]["mid_channels"] == 8 and state["config"]["lr"] == 1e-3
    # validation: PSNR / SSIM / bicubic PSNR logged, and the bicubic | output | GT image saved
    val = [r for r in log if "val_psnr" in r]
    assert len(val) == 1 and val[0]["iter"] == 4
    assert all(math.isfinite(val[0][k]) for k in ("val_psnr", "val_ssim", "val_bicubic_psnr"))
    img = cv2.imread(str(out / "val_0000004.png"))
    assert img.shape == (256, 3 * 256, 3)


@pytest.mark.slow
def test_resume_is_exact(one_thread, tmp_path, monkeypatch, capsys):
    """6 iterations in one go == 3 iterations + resume for 3 (losses and final weights, EMA
    included), with a different number of DataLoader workers after the resume; and == a run
    stopped by SIGINT after iteration 2 (no checkpoint due there), then resumed."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    train.main(
        TINY_RBV
        + ["--max-iters", "6", "--save-interval", "3", "--keep-last", "2", "--out-dir", str(a)]
    )
    train.main(
        TINY_RBV
        + [
            "--max-iters",
            "6",
            "--resume",
            str(a / "iter_0000003.state.pt"),
            "--out-dir",
            str(b),
            "--num-workers",
            "1",
        ]
    )
    la, lb = losses(read_log(a)), losses(read_log(b))
    assert sorted(lb) == [4, 5, 6]
    assert [la[i] for i in (4, 5, 6)] == [lb[i] for i in (4, 5, 6)]

    train_step = train.Trainer.train_step
    steps = []

    def train_step_then_ctrl_c(self, batch):  # Ctrl-C arrives during iteration 2, and again at once
        steps.append(None)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return train_step(self, batch)

    monkeypatch.setattr(train.Trainer, "train_step", train_step_then_ctrl_c)
    with pytest.raises(SystemExit) as stop:
        train.main(TINY_RBV + ["--max-iters", "6", "--save-interval", "3", "--out-dir", str(c)])
    assert stop.value.code == 130 and len(steps) == 2
    out = capsys.readouterr().out
    assert f"continue with `python train.py --model realbasicvsr_wogan --resume {c}`" in out
    assert sorted(os.listdir(c)) == [
        "iter_0000002.safetensors",
        "iter_0000002.state.pt",
        "iter_0000002_ema.safetensors",
        "log.jsonl",
    ]
    monkeypatch.setattr(train.Trainer, "train_step", train_step)
    train.main(["--model", "realbasicvsr_wogan", "--resume", str(c)])
    lc = losses(read_log(c))
    assert [la[i] for i in range(1, 7)] == [lc[i] for i in range(1, 7)]
    assert_same_weights(
        tensors(a / "iter_0000006_ema.safetensors"), tensors(c / "iter_0000006_ema.safetensors")
    )
    assert len(set(la.values())) == 6  # the batches really differ from step to step
    assert_same_weights(
        tensors(a / "iter_0000006.safetensors"), tensors(b / "iter_0000006.safetensors")
    )
    assert_same_weights(
        tensors(a / "iter_0000006_ema.safetensors"), tensors(b / "iter_0000006_ema.safetensors")
    )
    # the EMA is not the generator
    ema, gen = tensors(a / "iter_0000006_ema.safetensors"), tensors(a / "iter_0000006.safetensors")
    assert not torch.equal(ema["basicvsr.conv_last.weight"], gen["basicvsr.conv_last.weight"])
    # SPyNet stays frozen in RealBasicVSR; generator and EMA carry the same SPyNet
    assert torch.equal(
        ema["basicvsr.spynet.basic_module.0.basic_module.0.conv.weight"],
        gen["basicvsr.spynet.basic_module.0.basic_module.0.conv.weight"],
    )


@pytest.mark.slow
def test_gan_stage_all_losses_and_init_prefers_ema(one_thread, tmp_path, capsys):
    # a stage-1 checkpoint whose EMA differs from its generator
    torch.manual_seed(1)
    stage1 = tmp_path / "stage1"
    os.makedirs(stage1)
    weights.save_weights(realbasicvsr.RealBasicVSR(8, 1, 1), stage1 / "iter_0000010.safetensors")
    weights.save_weights(
        realbasicvsr.RealBasicVSR(8, 1, 1), stage1 / "iter_0000010_ema.safetensors"
    )
    torch.save({"step": 10}, stage1 / "iter_0000010.state.pt")
    args = [a if a != "realbasicvsr_wogan" else "realbasicvsr" for a in TINY_RBV]
    args += [
        "--d-mid-channels",
        "8",
        "--max-iters",
        "2",
        "--out-dir",
        str(tmp_path / "gan"),
    ]
    with pytest.raises(SystemExit, match="error: .*--vgg-weights"):  # the GAN stage needs VGG19
        train.main(args)
    # G at lr 0: the weights stay those it was initialised with, so they show which file --init took
    vgg = random_vgg19_file(tmp_path / "vgg19.pth")
    train.main(args + ["--vgg-weights", vgg, "--init", str(stage1), "--lr", "0"])
    assert "EMA from " + str(stage1 / "iter_0000010_ema.safetensors") in capsys.readouterr().out
    log = [r for r in read_log(tmp_path / "gan") if "loss" in r]
    assert len(log) == 2
    for r in log:
        for k in ("pix", "clean", "perceptual", "gan", "d_real", "d_fake"):
            assert math.isfinite(r[k]) and r[k] > 0, k
        assert r["loss"] == pytest.approx(
            r["pix"] + r["clean"] + r["perceptual"] + r["gan"], rel=1e-6
        )
    # as the official config's load_from: G from the generator, the EMA from the EMA; with G fixed,
    # two EMA steps give ema = g + 0.999^2 (ema0 - g) (SPyNet, frozen, is copied from G)
    g0, ema0 = (
        tensors(stage1 / "iter_0000010.safetensors"),
        tensors(stage1 / "iter_0000010_ema.safetensors"),
    )
    assert_same_weights(tensors(tmp_path / "gan" / "iter_0000002.safetensors"), g0)
    ema2 = tensors(tmp_path / "gan" / "iter_0000002_ema.safetensors")
    for k in g0:
        want = g0[k] if "spynet" in k else g0[k] + 0.999**2 * (ema0[k] - g0[k])
        assert torch.allclose(ema2[k], want, rtol=0, atol=1e-6), k  # fp32 lerp rounding
    state = torch.load(tmp_path / "gan" / "iter_0000002.state.pt", weights_only=True)
    # both networks stepped twice (Adam's per-parameter step counter)
    assert all(float(s["step"]) == 2 for s in state["trainer"]["opt_d"]["state"].values())
    assert all(float(s["step"]) == 2 for s in state["trainer"]["opt_g"]["state"].values())
    assert "conv_1.weight_orig" in state["trainer"]["discriminator"]


def test_nan_guard_skips_then_stops(one_thread, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    args = TINY_RBV + [
        "--max-iters",
        "10",
        "--save-interval",
        "1",
        "--keep-last",
        "5",
        "--max-nonfinite",
        "3",
        "--out-dir",
        str(out),
    ]
    cleaning_loss = realbasicvsr.cleaning_loss
    calls = []

    def cleaning_loss_nan_at_2_4_5_6(cleaned_lqs, gt_usm):  # called once per iteration
        calls.append(None)
        nan_or_1 = float("nan") if len(calls) in (2, 4, 5, 6) else 1.0
        return cleaning_loss(cleaned_lqs, gt_usm) * nan_or_1

    monkeypatch.setattr(realbasicvsr, "cleaning_loss", cleaning_loss_nan_at_2_4_5_6)
    with pytest.raises(SystemExit) as stop:
        train.main(args)
    msg = str(stop.value.code)
    assert "3 non-finite losses in a row" in msg and "iter_0000003.safetensors" in msg
    log = read_log(out)
    assert sorted(losses(log)) == [1, 3]  # 2 was skipped; 4, 5, 6 stopped the run
    assert max(r.get("nonfinite", 0) for r in log) == 4
    # no checkpoint is written inside a run of bad steps; the last good one is complete and finite
    names = os.listdir(out)
    assert "iter_0000001.state.pt" in names and "iter_0000003.state.pt" in names
    assert not any(
        n.startswith(("iter_0000002", "iter_0000004", "iter_0000005", "iter_0000006"))
        for n in names
    )
    w = tensors(out / "iter_0000003.safetensors")
    assert all(torch.isfinite(v).all() for v in w.values())
    # the NaN step was not applied: 3 iterations, 2 Adam steps
    state = torch.load(out / "iter_0000003.state.pt", weights_only=True)
    assert {float(s["step"]) for s in state["trainer"]["opt_g"]["state"].values()} == {2.0}


# ---------------------------------------------------------------------------------------------
# torchrun DDP on CPU (gloo)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_ranks_spynet_freeze(tmp_path):
    """Two ranks, SPyNet frozen for 2 iterations then trained: no crash at the switch, SPyNet
    untouched during the freeze and changed after, both ranks end with identical weights."""
    torch.manual_seed(3)
    spynet_file = tmp_path / "spynet.safetensors"
    weights.save_weights(basicvsr.SPyNet(), spynet_file)
    out = tmp_path / "ddp"
    # train.py run by torchrun, each rank then writing its final weights to compare them
    script = tmp_path / "train_and_dump.py"
    script.write_text(
        textwrap.dedent(f"""\
            import os
            import sys

            sys.path.insert(0, {ROOT!r})
            import train
            import weights

            trainers = []
            init = train.Trainer.__init__


            def init_and_keep(self, *args, **kwargs):
                init(self, *args, **kwargs)
                trainers.append(self)


            train.Trainer.__init__ = init_and_keep
            train.main(sys.argv[1:])
            name = f"rank{{os.environ['RANK']}}_final.safetensors"
            weights.save_weights(trainers[0].g_raw, os.path.join({str(out)!r}, name))
            """)
    )
    cmd = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            str(script),
        ]
        + TINY_PP
        + [
            "--synthetic-clips",
            "2",
            "--max-iters",
            "4",
            "--spynet-fix-iters",
            "2",
            "--save-interval",
            "2",
            "--keep-last",
            "2",
            "--spynet-weights",
            str(spynet_file),
            "--out-dir",
            str(out),
        ]
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "spynet: trained from iteration 3" in run.stdout
    assert run.stdout.count("train: iterations") == 1  # rank 0 alone prints
    state = torch.load(out / "iter_0000004.state.pt", weights_only=True)
    assert state["config"]["world_size"] == 2 and state["config"]["total_batch_size"] == 2
    pre = tensors(spynet_file)
    w2, w4 = tensors(out / "iter_0000002.safetensors"), tensors(out / "iter_0000004.safetensors")
    spy = [k for k in w2 if k.startswith("spynet.") and not k.endswith(("mean", "std"))]
    assert spy and all(torch.equal(w2[k], pre[k[len("spynet.") :]]) for k in spy)
    assert any(not torch.equal(w4[k], w2[k]) for k in spy)
    assert not torch.equal(w2["conv_last.weight"], w4["conv_last.weight"])
    r0, r1 = tensors(out / "rank0_final.safetensors"), tensors(out / "rank1_final.safetensors")
    assert_same_weights(r0, r1)
    assert_same_weights(r0, w4)
    # the two ranks trained on different clips: rank-averaged losses are logged
    assert all(math.isfinite(v) for v in losses(read_log(out)).values())


# ---------------------------------------------------------------------------------------------
# Evaluation mode


def test_eval_on_vid4_layout(one_thread, tmp_path, capsys):
    gt_frames = [synthetic.synthetic_clip(5, 2, 256)[0][i] for i in range(2)]
    for d in ("GT", "BIx4"):
        os.makedirs(tmp_path / d / "clipA")
    for i, frame in enumerate(gt_frames):
        files.write_image(str(tmp_path / "GT" / "clipA" / f"{i:04d}.png"), frame)
        files.write_image(
            str(tmp_path / "BIx4" / "clipA" / f"{i:04d}.png"), data.bicubic_downsample(frame)
        )
    torch.manual_seed(0)
    model = basicvsr.BasicVSRPlusPlus(8, 1).eval()
    weights.save_weights(model, tmp_path / "w.safetensors")
    rows, (p, s, b) = train.main(
        [
            "--model",
            "basicvsrpp",
            "--eval",
            "--weights",
            str(tmp_path / "w.safetensors"),
            "--data-root",
            str(tmp_path),
            "--eval-set",
            "vid4",
            "--mid-channels",
            "8",
            "--num-blocks",
            "1",
            "--device",
            "cpu",
        ]
    )
    text = capsys.readouterr().out
    assert "clipA" in text and "mean (1 clips)" in text and "Y channel" in text
    # the same numbers computed here: Y channel (vid4), crop 0, 8-bit rounding, frame mean
    lq = (
        torch.stack(
            [torch.from_numpy(data.bicubic_downsample(f)).permute(2, 0, 1) for f in gt_frames]
        ).float()
        / 255
    )
    with torch.no_grad():
        out = model(lq[None])[0].clamp(0, 1).mul(255).round().double()
    gt = torch.stack([torch.from_numpy(f).permute(2, 0, 1) for f in gt_frames]).double()
    w = torch.tensor([65.481, 128.553, 24.966], dtype=torch.float64).view(3, 1, 1) / 255
    mse = [(((o - g) * w).sum(0) ** 2).mean().item() for o, g in zip(out, gt)]
    want = np.mean([10 * math.log10(255**2 / m) for m in mse])
    assert rows[0][0] == "clipA" and p == pytest.approx(want, abs=1e-6)
    assert 0 < s < 1 and b > 10


@pytest.mark.slow
def test_compile_flag_trains_like_eager(one_thread, tmp_path, monkeypatch):
    """--compile (basicvsr.compile_network on the generator, inductor on CPU) gives the eager run's
    losses and weights, and its checkpoints keep the published key names."""
    a, b = tmp_path / "eager", tmp_path / "compiled"
    args = TINY_RBV + ["--max-iters", "2", "--save-interval", "2", "--ema-decay", "0"]
    compiled = []

    def compile_network(model):
        compiled.append(type(model).__name__)
        return basicvsr_compile_network(model)

    basicvsr_compile_network = basicvsr.compile_network
    monkeypatch.setattr(basicvsr, "compile_network", compile_network)
    train.main(args + ["--out-dir", str(a)])
    assert compiled == []
    train.main(args + ["--out-dir", str(b), "--compile"])
    assert compiled == ["RealBasicVSR"]
    la, lb = losses(read_log(a)), losses(read_log(b))
    assert sorted(la) == sorted(lb) == [1, 2]
    for i in (1, 2):
        assert abs(la[i] - lb[i]) <= 1e-5 * abs(la[i]), (la, lb)
    wa, wb = tensors(a / "iter_0000002.safetensors"), tensors(b / "iter_0000002.safetensors")
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5


# ---------------------------------------------------------------------------------------------
# A user's mistakes: one `error:` line, and no run folder left behind
#
#   mistake                                      the line names
#   --data-root that does not exist              the folder
#   --resume of a folder with no checkpoint      the folder, iter_*.state.pt
#   --resume of a missing path                   the path
#   the same command again (run folder exists)   the exact --resume command
#   --init with another network's weights        the file, "does not fit"
#   a truncated .pth (--spynet-weights)          the file, "is the file complete"
#   a truncated .safetensors (--init)            the file, "is the file complete"


@pytest.mark.slow
def test_mistakes_are_one_line_and_leave_nothing(one_thread, tmp_path):
    torch.manual_seed(0)
    weights.save_weights(basicvsr.BasicVSR(8, 1), tmp_path / "basicvsr.safetensors")
    torch.save(basicvsr.SPyNet().state_dict(), tmp_path / "spynet.pth")
    (tmp_path / "truncated.pth").write_bytes((tmp_path / "spynet.pth").read_bytes()[:5000])
    (tmp_path / "truncated.safetensors").write_bytes(
        (tmp_path / "basicvsr.safetensors").read_bytes()[:5000]
    )
    (tmp_path / "empty_run").mkdir()
    run = tmp_path / "run"
    cases = [
        (["--data-root", str(tmp_path / "nonexistent")], [str(tmp_path / "nonexistent")]),
        (["--resume", str(tmp_path / "empty_run")], ["empty_run", "iter_*.state.pt"]),
        (["--resume", str(tmp_path / "missing")], ["missing", "no such run folder"]),
        (
            ["--init", str(tmp_path / "basicvsr.safetensors")],
            ["basicvsr.safetensors", "does not fit BasicVSRPlusPlus"],
        ),
        (
            ["--spynet-weights", str(tmp_path / "truncated.pth")],
            ["truncated.pth", "is the file complete"],
        ),
        (
            ["--init", str(tmp_path / "truncated.safetensors")],
            ["truncated.safetensors", "is the file complete"],
        ),
    ]
    before = sorted(os.listdir(tmp_path))
    for extra, words in cases:
        with pytest.raises(SystemExit) as stop:
            train.main(TINY_PP + ["--max-iters", "1", "--out-dir", str(run)] + extra)
        line = str(stop.value.code)
        assert line.startswith("error: ") and "\n" not in line, (extra, line)
        assert all(w in line for w in words), (extra, line)
        assert sorted(os.listdir(tmp_path)) == before, extra  # no run folder, nothing else
    train.main(TINY_PP + ["--max-iters", "1", "--out-dir", str(run)])
    kept = sorted(os.listdir(run))
    with pytest.raises(SystemExit) as stop:  # the same command again
        train.main(TINY_PP + ["--max-iters", "1", "--out-dir", str(run)])
    assert f"continue it with `python train.py --model basicvsrpp --resume {run}`" in str(
        stop.value.code
    )
    assert sorted(os.listdir(run)) == kept


@pytest.mark.slow
def test_sigterm_checkpoints_and_says_how_to_resume(tmp_path):
    """A real process: SIGTERM during training writes a checkpoint at the current iteration, prints
    the resume command and exits 143, with no traceback; the checkpoint resumes."""
    out = tmp_path / "run"
    cmd = (
        [sys.executable, os.path.join(ROOT, "train.py")]
        + TINY_PP
        + ["--max-iters", "1000", "--save-interval", "1000", "--out-dir", str(out)]
    )
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(600):  # until the first iteration is logged (at most a minute)
            if (out / "log.jsonl").exists() and (out / "log.jsonl").read_text():
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr
    step = max(losses(read_log(out)))
    assert f"SIGTERM: stopped after iteration {step}" in stdout
    assert f"continue with `python train.py --model basicvsrpp --resume {out}`" in stdout
    state = torch.load(out / f"iter_{step:07d}.state.pt", weights_only=True)
    assert state["step"] == step and not any(".tmp-" in n for n in os.listdir(out))


@pytest.mark.slow
def test_x2_training_and_weights(one_thread, tmp_path):
    """--scale 2: the x2 networks train on x2 data (synthetic clips, bicubic x2 baseline), and their
    weights say x2, so upscale.py needs no flag."""
    out = tmp_path / "x2"
    train.main(
        TINY_PP
        + [
            "--scale",
            "2",
            "--crop-size",
            "128",
            "--max-iters",
            "2",
            "--val-set",
            "synthetic",
            "--val-clips",
            "1",
            "--val-interval",
            "2",
            "--out-dir",
            str(out),
        ]
    )
    state = torch.load(out / "iter_0000002.state.pt", weights_only=True)
    assert state["config"]["scale"] == 2
    model = weights.load_network(out / "iter_0000002.safetensors")
    assert model.scale == 2 and model.config["mid_channels"] == 8
    val = [r for r in read_log(out) if "val_psnr" in r][0]
    assert math.isfinite(val["val_psnr"])
    assert val["val_bicubic_psnr"] > 20  # bicubic x2 of the synthetic clip
    assert cv2.imread(str(out / "val_0000002.png")).shape == (128, 3 * 128, 3)


def test_eval_videolq_is_niqe(one_thread, tmp_path, capsys):
    """--eval-set videolq: LQ clips only, scored by the NIQE of the output frames (no GT)."""
    for clip_name, seed in (("000", 1), ("001", 2)):
        for i, frame in enumerate(synthetic.synthetic_clip(seed, 2, 64)[0]):
            os.makedirs(tmp_path / "VideoLQ" / clip_name, exist_ok=True)
            files.write_image(str(tmp_path / "VideoLQ" / clip_name / f"{i:08d}.png"), frame)
    torch.manual_seed(0)
    model = basicvsr.BasicVSR(8, 1).eval()
    weights.save_weights(model, tmp_path / "w.safetensors")
    rows, (q, s, b) = train.main(
        [
            "--model",
            "realbasicvsr",
            "--eval",
            "--eval-set",
            "videolq",
            "--weights",
            str(tmp_path / "w.safetensors"),
            "--data-root",
            str(tmp_path / "VideoLQ"),
            "--device",
            "cpu",
        ]
    )
    text = capsys.readouterr().out
    assert [r[0] for r in rows] == ["000", "001"]
    assert math.isnan(s) and "mean (2 clips): NIQE" in text
    lq = data.frames_to_tensor(list(synthetic.synthetic_clip(1, 2, 64)[0]))[None]
    with torch.no_grad():
        out = model(lq)[0].clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy()
    assert rows[0][1] == pytest.approx(np.mean([metrics.niqe(o) for o in out]), abs=1e-9)
