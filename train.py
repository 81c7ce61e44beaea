"""Train and evaluate BasicVSR++ and RealBasicVSR (CVPR 2022) with the published recipes, those of
the official configs: `python train.py --model basicvsrpp` (the built-in synthetic clips; a CPU is
enough), under torchrun for several GPUs, `--eval` for test-set PSNR/SSIM (NIQE without GT);
README's Training section has the commands.

The recipes are in recipes.py. This file reads top to bottom: flags, distributed setup, the data
stream, validation, models, checkpoints, one training iteration, the training loop, evaluation.
"""

import argparse
import copy
import glob
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import tqdm
from torch.nn.parallel import DistributedDataParallel as DDP

import basicvsr
import data
import files
import realbasicvsr
import weights
from files import atomic_path
from metrics import niqe, psnr, ssim
from recipes import (
    EVAL_SETS,
    RECIPES,
    RUN_DEFAULTS,
    SPYNET_FILE,
    SYNTHETIC,
    SYNTHETIC_CPU,
    VGG_FILE,
)

# ---------------------------------------------------------------------------------------------
# Flags. Recipe fields default to None so that "given on the command line" is visible.


def build_parser():
    p = argparse.ArgumentParser(description="Train or evaluate BasicVSR++ / RealBasicVSR.")
    p.error = lambda message: p.exit(2, f"error: {message}\n")  # one line
    p.add_argument("--model", required=True, choices=sorted(RECIPES), help="recipe (recipes.py)")
    g = p.add_argument_group("data")
    g.add_argument("--data-root", help="training data root; none: the built-in synthetic clips")
    g.add_argument("--val-root", help="validation data root (default: --data-root for reds4)")
    g.add_argument(
        "--val-set",
        choices=[
            "reds4",
            "redsval",
            "vid4",
            "udm10",
            "vimeo90k_t",
            "folders",
            "videolq",
            "synthetic",
            "none",
        ],
    )
    g.add_argument("--lq-dir", help="LQ folder name of a Vid4/UDM10-style set, e.g. BIx4, BDx4")
    g.add_argument("--gt-dir", help="GT folder name of a Vid4/UDM10-style set")
    g.add_argument("--degradation", choices=["BI", "BD"], help="Vimeo-90K LQ degradation")
    g.add_argument("--num-frames", type=int, help="frames per training clip")
    g.add_argument("--crop-size", type=int, help="GT crop size (LQ crop = crop / scale)")
    g.add_argument("--batch-size", type=int, help="clips per GPU (total = this x world size)")
    g.add_argument("--num-workers", type=int, default=None, help="DataLoader workers per rank")
    g.add_argument("--val-clips", type=int, help="validate on the first N clips only")
    g.add_argument("--synthetic-clips", type=int, help="number of synthetic training clips")
    g = p.add_argument_group("model")
    g.add_argument(
        "--scale",
        type=int,
        choices=[4, 2],
        help="upscaling factor (default: 4; x2 LQ folders: X2, BIx2)",
    )
    g.add_argument("--mid-channels", type=int)
    g.add_argument(
        "--num-blocks", type=int, help="residual blocks (RealBasicVSR: propagation blocks)"
    )
    g.add_argument("--num-cleaning-blocks", type=int, help="RealBasicVSR cleaning blocks")
    g.add_argument("--d-mid-channels", type=int, help="discriminator width (GAN stage)")
    g.add_argument("--spynet-weights", help=f"pretrained SPyNet ({SPYNET_FILE})")
    g.add_argument("--vgg-weights", help=f"torchvision VGG19 ({VGG_FILE}) for the perceptual loss")
    g.add_argument(
        "--init", help="initial weights only (file or run folder; EMA weights preferred)"
    )
    g = p.add_argument_group("losses and optimisation")
    g.add_argument("--pixel-loss", choices=["charbonnier", "l1"])
    g.add_argument("--cleaning-weight", type=float)
    g.add_argument("--perceptual-weight", type=float)
    g.add_argument("--gan-weight", type=float)
    g.add_argument("--lr", type=float, help="generator learning rate")
    g.add_argument("--lr-d", type=float, help="discriminator learning rate")
    g.add_argument("--betas", type=float, nargs=2)
    g.add_argument("--lr-schedule", choices=["cosine", "constant"])
    g.add_argument("--eta-min", type=float, help="cosine schedule floor")
    g.add_argument(
        "--lr-period", type=int, help="cosine period in iterations (default: --max-iters)"
    )
    g.add_argument("--max-iters", type=int)
    g.add_argument("--spynet-lr-mult", type=float)
    g.add_argument(
        "--spynet-fix-iters", type=int, help="SPyNet frozen for this many iterations (-1: always)"
    )
    g.add_argument("--ema-decay", type=float, help="0: no EMA")
    g.add_argument("--grad-clip", type=float, help="max gradient norm; 0: off")
    g = p.add_argument_group("run")
    g.add_argument("--out-dir", help="run folder (default runs/<model>)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", help="cpu, cuda (default: cuda if available)")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], default=None)
    g.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile the generator's per-frame modules (basicvsr.compile_network)",
    )
    g.add_argument("--resume", help="run folder or checkpoint file to continue exactly")
    g.add_argument("--val-interval", type=int)
    g.add_argument("--save-interval", type=int)
    g.add_argument("--log-interval", type=int)
    g.add_argument("--keep-last", type=int, help="checkpoints kept")
    g.add_argument(
        "--max-nonfinite", type=int, help="stop after this many non-finite losses in a row"
    )
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", action="store_true", help="evaluate --weights on --eval-set and exit")
    g.add_argument(
        "--weights", help="weights to evaluate: .safetensors, a published .pth, or a run folder"
    )
    g.add_argument(
        "--eval-set",
        choices=["reds4", "redsval", "vid4", "udm10", "vimeo90k_t", "folders", "videolq"],
        help="videolq (or any LQ-only folder of clips): NIQE, no GT needed",
    )
    g.add_argument("--metric-channel", choices=["rgb", "y"])
    g.add_argument("--crop-border", type=int)
    return p


FLAG_ONLY = (
    "model",
    "data_root",
    "val_root",
    "out_dir",
    "device",
    "resume",
    "init",
    "spynet_weights",
    "vgg_weights",
    "eval",
    "weights",
    "eval_set",
)


def resolve_config(args, device, world_size, saved=None):
    """Recipe -> synthetic defaults -> flags; a resumed run starts from its saved config instead."""
    if saved is not None:
        cfg = dict(saved)
        if args.data_root is not None:  # the data may have moved
            cfg["data_root"] = args.data_root
    else:
        cfg = dict(RUN_DEFAULTS, **RECIPES[args.model], model=args.model, data_root=args.data_root)
        if args.data_root is None:
            cfg.update(SYNTHETIC[cfg["arch"]])
            if device.type == "cpu":
                cfg.update(SYNTHETIC_CPU[cfg["arch"]])
            cfg.update(
                val_set="synthetic",
                metric_channel="rgb",
                crop_border=0,  # x2: the same LR crops
                crop_size=cfg["crop_size"] * (args.scale or 4) // 4,
            )
    for k, v in vars(args).items():
        if k in FLAG_ONLY or v is None:
            continue
        cfg[k] = tuple(v) if isinstance(v, list) else v
    if args.val_root is not None or saved is None:
        cfg["val_root"] = (
            args.val_root
            if args.val_root is not None
            else (cfg["data_root"] if cfg["val_set"] in ("reds4", "redsval") else None)
        )
    if cfg.get("lr_period") is None:
        cfg["lr_period"] = cfg["max_iters"]
    cfg["world_size"] = world_size
    cfg["total_batch_size"] = cfg["batch_size"] * world_size
    for k in (
        "num_frames",
        "crop_size",
        "batch_size",
        "max_iters",
        "val_interval",
        "save_interval",
        "log_interval",
        "keep_last",
        "max_nonfinite",
    ):
        if cfg[k] < 1:
            raise ValueError(f"train.py: --{k.replace('_', '-')} must be >= 1, got {cfg[k]}")
    if cfg["crop_size"] % 4:
        raise ValueError(f"train.py: --crop-size must be a multiple of 4, got {cfg['crop_size']}")
    if cfg["gan_weight"] > 0 and cfg["lr_d"] <= 0:
        raise ValueError("train.py: a GAN loss needs --lr-d > 0")
    return cfg


# ---------------------------------------------------------------------------------------------
# Distributed setup: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; rank 0 alone logs and writes.


def setup_distributed(device_flag):
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    name = device_flag or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.py: --device cuda but no GPU is visible")
        if ddp or device.index is None:
            device = torch.device("cuda", local_rank if ddp else 0)
        torch.cuda.set_device(device)
    if ddp and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return ddp, rank, world_size, device


def print0(*a, rank=0, **k):
    if rank == 0:
        print(*a, **k, flush=True)


def all_reduce_max(flag, ddp):
    """A local bool -> the same bool on every rank (True if any rank said True)."""
    if not ddp:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_reduce_mean(values, ddp):
    if not ddp or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def _comm_device():
    return torch.cuda.current_device() if dist.get_backend() == "nccl" else "cpu"


# ---------------------------------------------------------------------------------------------
# The data stream: each rank's share of each epoch's permutation (DistributedSampler), running on
# across epochs from any position, so a resumed run sees the batches the uninterrupted run would.
# Augmentations are drawn from (seed, rank, epoch, index): worker count and resume do not matter.


class EndlessStream(torch.utils.data.Sampler):
    """Yields (epoch, clip index) for one rank, from sample number `start` of this rank's stream."""

    def __init__(self, dataset, rank, world_size, seed, start=0):
        self.sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False
        )
        self.start = start

    def __iter__(self):
        per_epoch = len(self.sampler)
        epoch, offset = divmod(self.start, per_epoch)
        while True:
            self.sampler.set_epoch(epoch)
            for index in list(self.sampler)[offset:]:
                yield epoch, index
            epoch, offset = epoch + 1, 0


class EpochIndexed(torch.utils.data.Dataset):
    """dataset[(epoch, index)]: sets the dataset's epoch (in whichever worker holds this copy)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        if hasattr(self.dataset, "set_epoch"):  # SyntheticClips draws no epochs
            self.dataset.set_epoch(epoch)
        return self.dataset[index]


def build_train_set(cfg, rank):
    seed = cfg["seed"]
    root = cfg["data_root"]
    scale = cfg["scale"]
    if cfg["arch"] == "realbasicvsr":
        # GT clips (REDS sub-images, or synthetic ones) through degradations.py's pipeline
        return data.RealDegradationDataset(
            root,
            num_frames=cfg["num_frames"],
            gt_size=cfg["crop_size"],
            scale=scale,
            num_synthetic_clips=cfg["synthetic_clips"],
            seed=seed,
            rank=rank,
        )
    if root is None:
        return data.SyntheticClips(
            cfg["synthetic_clips"], cfg["num_frames"], cfg["crop_size"], scale, seed=seed
        )
    if cfg["train_set"] == "reds":
        return data.REDS(
            root, "train", cfg["num_frames"], cfg["crop_size"], scale, seed=seed, rank=rank
        )
    if cfg["train_set"] == "vimeo90k":
        if cfg["num_frames"] != 7:
            raise ValueError(
                f"train.py: Vimeo-90K septuplets have 7 frames (mirrored to 14), "
                f"got --num-frames {cfg['num_frames']}"
            )
        return data.Vimeo90K(
            root,
            "train",
            degradation=cfg["degradation"],
            gt_size=cfg["crop_size"],
            scale=scale,
            seed=seed,
            rank=rank,
        )
    raise ValueError(f"train.py: unknown train_set {cfg['train_set']!r}")


def build_eval_set(name, root, cfg):
    """Whole clips for validation / evaluation."""
    scale = cfg["scale"]
    if name == "synthetic":  # held-out clips: another seed than the training clips
        if cfg["arch"] == "realbasicvsr":
            return data.RealDegradationDataset(
                None,
                num_frames=cfg["num_frames"],
                gt_size=cfg["crop_size"],
                scale=scale,
                seed=cfg["seed"] + 1,
                rank=0,
            )
        return data.SyntheticClips(
            cfg["val_clips"] or 2, cfg["num_frames"], cfg["crop_size"], scale, seed=cfg["seed"] + 1
        )
    if root is None:
        raise ValueError(
            f"train.py: the {name} set needs a root folder (--val-root, or --data-root for --eval)"
        )
    if name in ("reds4", "redsval"):
        return data.REDS(root, name, scale=scale)
    if name in ("vid4", "udm10", "folders"):
        if not cfg.get("lq_dir") or not cfg.get("gt_dir"):
            raise ValueError(
                f"train.py: the {name} set needs --lq-dir and --gt-dir (e.g. BIx4 and GT)"
            )
        return data.PairedFolders(
            root, cfg["lq_dir"].replace("x4", f"x{scale}"), cfg["gt_dir"], scale
        )
    if name == "vimeo90k_t":
        return data.Vimeo90K(root, "test", degradation=cfg["degradation"], scale=scale)
    if name == "videolq":
        return data.LQFolder(root)
    raise ValueError(f"train.py: unknown evaluation set {name!r}")


# ---------------------------------------------------------------------------------------------
# Validation / evaluation: whole clips, one at a time, spread over the ranks, scored by
# metrics.py on frames rounded to 8 bits.


def metrics_text(p, s, b, frames=None):
    """One row or mean of evaluate_clips as text: NIQE where there was no GT, else PSNR / SSIM."""
    n = f", {frames} frames" if frames else ""
    return (
        f"NIQE {p:.4f}{n}"
        if math.isnan(s)
        else f"PSNR {p:.4f}  SSIM {s:.4f}  (bicubic PSNR {b:.4f}{n})"
    )


def to_255(frames):
    """[0, 1] float frames -> [0, 255], clamped and rounded as when saved as 8-bit images."""
    return (frames.float().clamp(0, 1) * 255.0).round()


def infer(model, lqs, gt_frames, amp_ctx):
    """Model output for a clip (1, t, 3, h, w). A single GT frame means Vimeo-90K-T: the 7
    LQ frames mirrored to 14 (by the dataset, or here), and the centre prediction is the mean of
    out[3] and out[10], the two outputs of frame 4."""
    centre = gt_frames == 1 and lqs.shape[1] > 1
    if centre and not basicvsr.is_mirror_extended(lqs):
        lqs = torch.cat([lqs, lqs.flip(1)], dim=1)
    with amp_ctx:
        out = model(lqs).float()
    if centre:
        t = out.shape[1]
        out = (0.5 * (out[:, t // 4] + out[:, -1 - t // 4])).unsqueeze(1)
    return out


def bicubic(lqs, gt_frames, scale):
    """Bicubic upscaling of the LQ, the baseline printed beside the model (Vimeo-90K-T: frame 4
    only)."""
    if gt_frames == 1 and lqs.shape[1] > 1:
        k = lqs.shape[1] // 4 if basicvsr.is_mirror_extended(lqs) else lqs.shape[1] // 2
        lqs = lqs[:, k : k + 1]
    n, t, c, h, w = lqs.shape
    up = F.interpolate(
        lqs.reshape(n * t, c, h, w).float(), scale_factor=scale, mode="bicubic", align_corners=False
    )
    return up.view(n, t, c, scale * h, scale * w)


@torch.no_grad()
def evaluate_clips(
    model,
    dataset,
    cfg,
    device,
    amp_ctx,
    rank=0,
    world_size=1,
    ddp=False,
    image_path=None,
    max_clips=None,
    verbose=False,
):
    """[(key, psnr, ssim, bicubic_psnr, frames)] of the clips (clip i on rank i % world_size) on
    every rank, and their means; a clip without GT (VideoLQ) gets the output's NIQE for PSNR and
    nan for the rest."""
    was_training = model.training
    model.eval()
    y = cfg["metric_channel"] == "y"
    border = cfg["crop_border"]
    num = len(dataset) if not max_clips else min(max_clips, len(dataset))
    rows = []
    for i in range(rank, num, world_size):
        item = dataset[i]
        lqs = item["lq"][None].to(device)
        gt = item.get("gt")
        if gt is None:  # no GT (VideoLQ, real footage): the NIQE of the output frames
            out = to_255(infer(model, lqs, 0, amp_ctx)[0]).byte().permute(0, 2, 3, 1).cpu().numpy()
            q = [niqe(o) for o in out]
            rows.append((item["key"], sum(q) / len(q), math.nan, math.nan, len(q)))
            if verbose:
                print(f"  {item['key']:<24s} {metrics_text(*rows[-1][1:])}", flush=True)
            continue
        out = to_255(infer(model, lqs, gt.shape[0], amp_ctx)[0]).to(device)
        gt255 = to_255(gt).to(device)
        bic = to_255(bicubic(lqs, gt.shape[0], gt.shape[-1] // lqs.shape[-1])[0])
        p = [psnr(o, g, border, y) for o, g in zip(out, gt255)]
        s = [ssim(o, g, border, y) for o, g in zip(out, gt255)]
        b = [psnr(o, g, border, y) for o, g in zip(bic, gt255)]
        rows.append((item["key"], sum(p) / len(p), sum(s) / len(s), sum(b) / len(b), len(p)))
        if verbose:
            print(f"  {item['key']:<24s} {metrics_text(*rows[-1][1:])}", flush=True)
        if i == 0 and image_path is not None:
            k = out.shape[0] // 2
            # bicubic | output | GT
            side_by_side = torch.cat([bic[k].cpu(), out[k].cpu(), gt255[k].cpu()], dim=2)
            files.write_image(image_path, side_by_side.permute(1, 2, 0).numpy().astype(np.uint8))
    if ddp:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    model.train(was_training)
    means = (
        tuple(sum(r[j] for r in rows) / len(rows) for j in (1, 2, 3))
        if rows
        else (float("nan"),) * 3
    )
    return rows, means


# ---------------------------------------------------------------------------------------------
# Models.


def build_generator(cfg):
    if cfg["arch"] == "basicvsrpp":
        return basicvsr.BasicVSRPlusPlus(
            mid_channels=cfg["mid_channels"], num_blocks=cfg["num_blocks"], scale=cfg["scale"]
        )
    if cfg["arch"] == "realbasicvsr":
        return realbasicvsr.RealBasicVSR(
            mid_channels=cfg["mid_channels"],
            num_propagation_blocks=cfg["num_blocks"],
            num_cleaning_blocks=cfg["num_cleaning_blocks"],
            scale=cfg["scale"],
        )
    raise ValueError(f"train.py: unknown arch {cfg['arch']!r}")


def spynet_params(model):
    return [p for n, p in model.named_parameters() if "spynet" in n]


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * param for trained parameters; frozen parameters
    (SPyNet) and buffers are copied, as mmagic's ExponentialMovingAverageHook
    (open-mmlab/mmagic: mmagic/engine/hooks/ema.py)."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        if p.requires_grad:
            p_ema.lerp_(p, 1.0 - decay)
        else:
            p_ema.copy_(p)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def lr_at(step, base_lr, cfg):
    """Cosine to eta_min over lr_period (mmagic's CosineRestartLR, one period), or constant; of the
    step alone."""
    if cfg["lr_schedule"] == "constant":
        return base_lr
    t = min(step, cfg["lr_period"]) / cfg["lr_period"]
    return cfg["eta_min"] + 0.5 * (base_lr - cfg["eta_min"]) * (1 + math.cos(math.pi * t))


def weights_file(path, what, ema=True):
    """A weights file, or the latest checkpoint of a run folder; with ema, our EMA file beside it
    wins."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path}: no such file or run folder")
    if os.path.isdir(path):
        path = latest_checkpoint(path, what) + ".safetensors"
    if path.endswith(".state.pt"):
        path = path[: -len(".state.pt")] + ".safetensors"
    if ema and path.endswith(".safetensors") and not path.endswith("_ema.safetensors"):
        ema_path = path[: -len(".safetensors")] + "_ema.safetensors"
        if os.path.isfile(ema_path):
            return ema_path
    return path


def load_init(model, ema, path, rank):
    """--init: weights only, as the official GAN config's load_from: the generator from the
    generator's weights and the EMA from the EMA's (generator_ema in mmagic files, _ema beside
    ours), with no EMA-to-generator copy. A file with one set of weights fills both."""
    g_path, ema_path = weights_file(path, "--init", ema=False), weights_file(path, "--init")
    try:
        g_state = weights.read_state_dict(g_path, "generator")
    except ValueError:  # not an mmagic file with a generator part
        g_state = weights.read_state_dict(g_path)
    print0(
        f"init: generator from {g_path}" + (f", EMA from {ema_path}" if ema is not None else ""),
        rank=rank,
    )
    weights.load_state(model, g_state, g_path)
    if ema is not None:
        weights.load_weights(ema, ema_path)  # mmagic files: generator_ema when present


# ---------------------------------------------------------------------------------------------
# Checkpoints: iter_NNNNNNN.safetensors (generator), iter_NNNNNNN_ema.safetensors (EMA generator),
# iter_NNNNNNN.state.pt (optimisers, discriminator, grad scalers, step, per-rank RNG states,
# config). All written tmp-then-rename, the state last: a state file marks a complete checkpoint.


def rng_state(device):
    # torch's generators only: every data draw goes through an explicit np.random.Generator
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def latest_checkpoint(folder, what="--resume"):
    states = sorted(glob.glob(os.path.join(folder, "iter_*.state.pt")))
    if not states:
        raise FileNotFoundError(f"train.py: {what}: no iter_*.state.pt checkpoint in {folder}")
    return states[-1][: -len(".state.pt")]


def checkpoint_stem(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"train.py: --resume {path}: no such run folder or checkpoint file")
    if os.path.isdir(path):
        return latest_checkpoint(path)
    for suffix in (".state.pt", "_ema.safetensors", ".safetensors"):
        if path.endswith(suffix):
            stem = path[: -len(suffix)]
            if not os.path.isfile(stem + ".state.pt"):
                raise FileNotFoundError(f"train.py: --resume: {stem}.state.pt not found")
            return stem
    raise ValueError(
        f"train.py: --resume takes a run folder or an iter_*.state.pt / .safetensors file, "
        f"got {path}"
    )


def save_checkpoint(out_dir, step, state, g_raw, ema, keep_last):
    stem = os.path.join(out_dir, f"iter_{step:07d}")
    weights.save_weights(g_raw, stem + ".safetensors")
    if ema is not None:
        weights.save_weights(ema, stem + "_ema.safetensors")
    with atomic_path(stem + ".state.pt") as tmp:
        torch.save(state, tmp)
    for old in sorted(glob.glob(os.path.join(out_dir, "iter_*.state.pt")))[:-keep_last]:
        old_stem = old[: -len(".state.pt")]
        for f in (old, old_stem + ".safetensors", old_stem + "_ema.safetensors"):
            if os.path.exists(f):
                os.remove(f)
    return stem


# ---------------------------------------------------------------------------------------------
# One training iteration, as the official training models (open-mmlab/mmagic:
# mmagic/models/editors/basicvsr/basicvsr.py, real_basicvsr/real_basicvsr.py). Generator: pixel
# loss (+ cleaning, perceptual and 0.05 x GAN with D frozen); then, in the GAN stage, D:
# BCE(D(gt), 1) + BCE(D(out.detach()), 0), D applied per frame. A non-finite loss, agreed on by
# all ranks, skips the update.


class Trainer:
    def __init__(self, cfg, g_raw, ema, d_raw, percep, device, ddp, amp):
        self.cfg = cfg
        self.g_raw = g_raw  # the generator; self.g is its DDP wrapper (set_phase)
        self.ema = ema
        self.d_raw = d_raw  # the discriminator (GAN stage); self.d is its DDP wrapper
        self.percep = percep
        self.device = device
        self.ddp = ddp
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.amp_ctx = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
        spy = set(map(id, spynet_params(g_raw)))
        betas = tuple(cfg["betas"])
        self.opt_g = torch.optim.Adam(
            [
                {"params": [p for p in g_raw.parameters() if id(p) not in spy], "lr_mult": 1.0},
                {
                    "params": [p for p in g_raw.parameters() if id(p) in spy],
                    "lr_mult": cfg["spynet_lr_mult"],
                },
            ],
            lr=cfg["lr"],
            betas=betas,
        )
        self.opt_d = (
            torch.optim.Adam(d_raw.parameters(), lr=cfg["lr_d"], betas=betas) if d_raw else None
        )
        # fp16 needs loss scaling; bf16 and fp32 do not (the scalers are then no-ops)
        self.scaler_g = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.scaler_d = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.g = self.d = None
        self.spynet_frozen = None

    def wrap(self, module):
        return (
            DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.ddp
            else module
        )

    def set_phase(self, step):
        """SPyNet freeze under DDP without find_unused_parameters: DDP reduces only the parameters
        that require grad when it is built, so at the switch every rank, at the same iteration,
        unfreezes SPyNet and rebuilds the wrapper (toggling it under a live one crashes the
        reference)."""
        fix = self.cfg["spynet_fix_iters"]
        frozen = fix < 0 or step < fix  # of the iteration alone: a resumed run lands in its phase
        if frozen == self.spynet_frozen:
            return False
        for p in spynet_params(self.g_raw):
            p.requires_grad_(not frozen)
        self.spynet_frozen = frozen
        self.g = None  # drop the old wrapper (and its reducer hooks) before building the new one
        self.g = self.wrap(self.g_raw)
        if self.d is None and self.d_raw is not None:
            self.d = self.wrap(self.d_raw)
        return True

    def set_lr(self, step):
        for group in self.opt_g.param_groups:
            group["lr"] = lr_at(step, self.cfg["lr"] * group["lr_mult"], self.cfg)
        if self.opt_d is not None:
            for group in self.opt_d.param_groups:
                group["lr"] = lr_at(step, self.cfg["lr_d"], self.cfg)
        return self.opt_g.param_groups[0]["lr"]

    def _step(self, loss, opt, scaler, params):
        """backward + (clip) + step; False if the gradients are not finite."""
        scaler.scale(loss).backward()
        ok = True
        if self.cfg["grad_clip"] > 0:
            scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg["grad_clip"])
            # fp16: the scaler itself skips the steps with inf gradients
            ok = bool(torch.isfinite(norm)) or scaler.is_enabled()
        if ok:
            scaler.step(opt)
        scaler.update()
        return ok

    def train_step(self, batch):
        """One iteration; returns (dict of float losses, True if the update was applied)."""
        cfg = self.cfg
        lqs = batch["lq"].to(self.device, non_blocking=True)
        gt = batch["gt"].to(self.device, non_blocking=True)
        target = batch[cfg["pixel_target"]].to(self.device, non_blocking=True)
        self.opt_g.zero_grad(set_to_none=True)
        losses = {}
        with self.amp_ctx:
            if cfg["cleaning_weight"] > 0:
                out, lqs_clean = self.g(lqs, return_lqs=True)
            else:
                out = self.g(lqs)
        pixel = realbasicvsr.charbonnier_loss if cfg["pixel_loss"] == "charbonnier" else F.l1_loss
        losses["pix"] = pixel(out.float(), target)
        if cfg["cleaning_weight"] > 0:
            losses["clean"] = cfg["cleaning_weight"] * realbasicvsr.cleaning_loss(
                lqs_clean.float(), target
            )
        if cfg["perceptual_weight"] > 0:
            with self.amp_ctx:
                losses["perceptual"] = cfg["perceptual_weight"] * self.percep(out, target).float()
        if cfg["gan_weight"] > 0:
            # D frozen for the generator step; the bare module, so D's DDP reducer is not involved
            self.d_raw.requires_grad_(False)
            with self.amp_ctx:
                fake_logits = self.d_raw(out.flatten(0, 1))
            losses["gan"] = realbasicvsr.gan_loss(
                fake_logits.float(), True, weight=cfg["gan_weight"]
            )
        loss_g = sum(losses.values())
        if all_reduce_max(not torch.isfinite(loss_g).item(), self.ddp):
            return {k: v.item() for k, v in losses.items()} | {"loss": loss_g.item()}, False
        # the gradients are all-reduced, so every rank reaches the same verdict here
        ok = self._step(loss_g, self.opt_g, self.scaler_g, self.g_raw.parameters())
        if cfg["gan_weight"] > 0:
            self.d_raw.requires_grad_(True)
            self.opt_d.zero_grad(set_to_none=True)
            real_target = gt.flatten(0, 1)  # the unsharpened GT is "real" (official configs)
            # real and fake each backward on their own, as in the reference (half the activations)
            with self.amp_ctx:
                real_logits = self.d(real_target)
            losses["d_real"] = realbasicvsr.gan_loss(real_logits.float(), True)
            self.scaler_d.scale(losses["d_real"]).backward()
            with self.amp_ctx:
                fake_logits = self.d(out.detach().flatten(0, 1))
            losses["d_fake"] = realbasicvsr.gan_loss(fake_logits.float(), False)
            self.scaler_d.scale(losses["d_fake"]).backward()
            d_bad = not torch.isfinite(losses["d_real"] + losses["d_fake"]).item()
            if all_reduce_max(d_bad, self.ddp):
                ok = False
            else:
                self.scaler_d.step(self.opt_d)
            self.scaler_d.update()
        if self.ema is not None and ok:
            ema_update(self.ema, self.g_raw, cfg["ema_decay"])
        return {k: v.item() for k, v in losses.items()} | {"loss": loss_g.item()}, ok

    def state_dict(self):
        return {
            "opt_g": self.opt_g.state_dict(),
            "scaler_g": self.scaler_g.state_dict(),
            "scaler_d": self.scaler_d.state_dict(),
            "opt_d": self.opt_d.state_dict() if self.opt_d else None,
            "discriminator": self.d_raw.state_dict() if self.d_raw else None,
        }

    def load_state_dict(self, state):
        self.opt_g.load_state_dict(state["opt_g"])
        self.scaler_g.load_state_dict(state["scaler_g"])
        self.scaler_d.load_state_dict(state["scaler_d"])
        if self.opt_d is not None:
            self.opt_d.load_state_dict(state["opt_d"])
            self.d_raw.load_state_dict(state["discriminator"])


# ---------------------------------------------------------------------------------------------
# The training loop. Setup reads everything (checkpoint, config, weights, data) before the run
# folder is made, so a mistake leaves nothing behind; each iteration then is one step, a log
# line, a checkpoint, a validation, and a stop when Ctrl-C / SIGTERM asked for one.


def load_resume(args):
    """--resume: the checkpoint's stem and its state (step, config, optimisers, RNG states)."""
    if not args.resume:
        return None, None
    stem = checkpoint_stem(args.resume)
    return stem, torch.load(stem + ".state.pt", map_location="cpu", weights_only=True)


def check_run(cfg, args, device, ddp, rank):
    """Says what runs and raises on a mistake; returns the command that continues the run."""
    for flag in ("data_root", "val_root"):
        if cfg.get(flag) is not None and not os.path.isdir(cfg[flag]):
            raise ValueError(f"train.py: --{flag.replace('_', '-')} {cfg[flag]}: no such folder")
    if cfg["data_root"] is None:
        print0(
            f"data: no --data-root, training on the built-in synthetic clips"
            f"{' through the degradation pipeline' if cfg['arch'] == 'realbasicvsr' else ''}"
            f" with small {'CPU ' if device.type == 'cpu' else ''}settings"
            f" (flags override them)",
            rank=rank,
        )
    starts_trained = args.spynet_weights or args.init or args.resume
    if cfg["needs_spynet_weights"] and not starts_trained:
        print0(
            f"warning: no --spynet-weights: SPyNet starts untrained (zero flow); the "
            f"{cfg['model']} recipe starts from the pretrained {SPYNET_FILE}",
            rank=rank,
        )
    if cfg["perceptual_weight"] > 0 and not args.vgg_weights:
        raise ValueError(
            f"train.py: --model {cfg['model']} needs --vgg-weights (torchvision's {VGG_FILE}) "
            f"for the perceptual loss"
        )
    if cfg["gan_weight"] > 0 and not args.init and not args.resume:
        print0(
            "warning: no --init: the GAN stage starts from scratch; the recipe starts from the "
            "stage-1 (realbasicvsr_wogan) weights",
            rank=rank,
        )
    print0(
        "config (total batch = batch_size x world_size):\n"
        + "\n".join(f"  {k:22s} {cfg[k]}" for k in sorted(cfg)),
        rank=rank,
    )
    launcher = f"torchrun --nproc_per_node={cfg['world_size']} " if ddp else "python "
    resume_cmd = f"{launcher}train.py --model {cfg['model']} --resume {cfg['out_dir']}"
    if not args.resume and glob.glob(os.path.join(cfg["out_dir"], "iter_*.state.pt")):
        # keep-last pruning would otherwise delete the new run's checkpoints, not the old ones
        raise ValueError(
            f"train.py: {cfg['out_dir']} already holds checkpoints; continue it with "
            f"`{resume_cmd}`, or pick another --out-dir"
        )
    return resume_cmd


def build_trainer(cfg, args, device, ddp, rank):
    """The networks, with identical initial weights on every rank (DDP also broadcasts rank 0's),
    and the Trainer that steps them."""
    if device.type == "cuda":
        # fixed training shapes; GPU runs are not bitwise reproducible anyway
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(cfg["seed"])
    g_raw = build_generator(cfg)
    spynet = g_raw.basicvsr.spynet if cfg["arch"] == "realbasicvsr" else g_raw.spynet
    if args.spynet_weights:
        weights.load_weights(spynet, args.spynet_weights)
    else:
        spynet.zero_flow_()
    g_raw.to(device).train()
    ema = copy.deepcopy(g_raw).requires_grad_(False) if cfg["ema_decay"] > 0 else None
    if args.init:
        load_init(g_raw, ema, args.init, rank)
    if cfg["compile"]:  # after the EMA copy: the EMA only evaluates, and stays eager
        basicvsr.compile_network(g_raw)
    d_raw = None
    if cfg["gan_weight"] > 0:
        d_raw = realbasicvsr.UNetDiscriminatorSN(3, cfg["d_mid_channels"]).to(device).train()
    percep = None
    if cfg["perceptual_weight"] > 0:
        percep = realbasicvsr.PerceptualLoss()
        weights.load_vgg19_features(percep.vgg, args.vgg_weights)
        percep = percep.to(device)
    return Trainer(cfg, g_raw, ema, d_raw, percep, device, ddp, cfg["amp"])


def restore(trainer, stem, state, rank, world_size):
    """A resumed run's weights, optimisers and random states; returns the iteration it stopped
    at. A new run starts at 0, each rank with its own random stream."""
    seed = trainer.cfg["seed"]
    if state is None:
        torch.manual_seed(seed + rank)
        return 0
    weights.load_weights(trainer.g_raw, stem + ".safetensors")
    if trainer.ema is not None:
        weights.load_weights(trainer.ema, stem + "_ema.safetensors")
    trainer.load_state_dict(state["trainer"])
    rngs = state["rng"]
    if len(rngs) == world_size:
        set_rng_state(rngs[rank], trainer.device)
    else:
        print0(
            f"warning: resuming a {len(rngs)}-rank run on {world_size} ranks: the data stream "
            f"and random states differ from an uninterrupted run",
            rank=rank,
        )
        torch.manual_seed(seed + rank)
    print0(f"resume: {stem} at iteration {state['step']}", rank=rank)
    return state["step"]


def training_batches(cfg, start, rank, world_size, device):
    """This rank's batches from iteration `start` on, those the uninterrupted run would draw."""
    train_set = build_train_set(cfg, rank)
    stream = EndlessStream(
        train_set, rank, world_size, cfg["seed"], start=start * cfg["batch_size"]
    )
    loader = torch.utils.data.DataLoader(
        EpochIndexed(train_set),
        batch_size=cfg["batch_size"],
        sampler=stream,
        num_workers=cfg["num_workers"],
        pin_memory=device.type == "cuda",
        persistent_workers=cfg["num_workers"] > 0,
        # not the global RNG: resume stays exact
        generator=torch.Generator().manual_seed(cfg["seed"] + rank),
    )
    return iter(loader)


def validation_set(cfg, rank):
    """The validation clips, or None: no validation."""
    if cfg["val_set"] == "none":
        return None
    if cfg["val_set"] != "synthetic" and cfg["val_root"] is None:
        print0(
            f"warning: no --val-root for the {cfg['val_set']} validation set: validation is off",
            rank=rank,
        )
        return None
    return build_eval_set(cfg["val_set"], cfg["val_root"], cfg)


class RunLog:
    """The run folder's log.jsonl, made on entry: one JSON record a line, with the wall seconds
    since training started. Rank 0 writes; on the other ranks a record goes nowhere."""

    def __init__(self, out_dir, rank):
        self.out_dir = out_dir
        self.rank = rank
        self.file = None
        self.start = None

    def __enter__(self):
        if self.rank == 0:
            os.makedirs(self.out_dir, exist_ok=True)
            self.file = open(os.path.join(self.out_dir, "log.jsonl"), "a")
        self.start = time.time()
        return self

    def __call__(self, record):
        if self.file:
            record = record | {"time": round(time.time() - self.start, 1)}
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def __exit__(self, *exc):
        if self.file:
            self.file.close()


@contextmanager
def stop_requests():
    """Ctrl-C / SIGTERM only ask to stop: the list yielded collects the signals, the iteration
    finishes, every rank agrees on where to stop, a checkpoint is written there. A second signal
    during the write changes nothing. Signal handlers exist in the main thread only."""
    stop = []
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, lambda signum, frame: stop.append(signum))
    try:
        yield stop
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


class LossMeter:
    """The losses of the applied updates since the last log line, and the iterations timed since
    then (validation is not timed)."""

    def __init__(self):
        self.sums = {}
        self.count = 0
        self.restart_clock()

    def restart_clock(self):
        self.t0 = time.time()
        self.iters = 0

    def add(self, losses, ok):
        self.iters += 1
        if ok:
            for k, v in losses.items():
                self.sums[k] = self.sums.get(k, 0.0) + v
            self.count += 1


def spynet_phase(trainer, step):
    """The line saying whether SPyNet is frozen or trained from this iteration on."""
    fix = trainer.cfg["spynet_fix_iters"]
    until = f" to {fix}" if trainer.spynet_frozen and fix > 0 else ""
    state = "frozen" if trainer.spynet_frozen else "trained"
    return f"spynet: {state} from iteration {step + 1}{until}"


def report(trainer, meter, step, lr, nonfinite_total, log, rank):
    """One log line: the losses (means over iterations and ranks), lr, speed, ETA, memory."""
    names = sorted(meter.sums)
    means = [meter.sums[k] / meter.count for k in names]
    means = dict(zip(names, all_reduce_mean(means, trainer.ddp)))
    it_s = meter.iters / max(time.time() - meter.t0, 1e-9)
    device = trainer.device
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    max_iters = trainer.cfg["max_iters"]
    parts = " ".join(f"{k} {means[k]:.4g}" for k in names if k != "loss")
    eta = tqdm.tqdm.format_interval((max_iters - step) / it_s)
    print0(
        f"iter  {step:>7d}/{max_iters} | loss {means.get('loss', float('nan')):.4g} ({parts}) | "
        f"lr {lr:.2e} | {it_s:.2f} it/s | eta {eta} | "
        f"mem {'%.1fG' % mem if mem is not None else '-'} | non-finite {nonfinite_total}",
        rank=rank,
    )
    record = {"iter": step, **means, "lr": lr, "it_s": it_s, "nonfinite": nonfinite_total}
    log(record | ({"mem_gb": mem} if mem is not None else {}))


def report_nonfinite(losses, step, nonfinite_run, nonfinite_total, log, rank):
    """A skipped update, on the console and in the log."""
    print0(
        f"iter  {step:>7d} | non-finite loss ({losses['loss']}): update skipped "
        f"({nonfinite_run} in a row, {nonfinite_total} in all)",
        rank=rank,
    )
    log({"iter": step, "nonfinite": nonfinite_total})


def checkpoint(trainer, step, nonfinite_total, rank, world_size):
    """Every rank's RNG state to rank 0, which saves and returns the checkpoint's stem (the other
    ranks, which print nothing, None)."""
    rngs = [rng_state(trainer.device)] * world_size
    if trainer.ddp:
        dist.all_gather_object(rngs, rng_state(trainer.device))
    if rank != 0:
        return None
    cfg = trainer.cfg
    state = {
        "step": step,
        "config": cfg,
        "trainer": trainer.state_dict(),
        "rng": rngs,
        "nonfinite_total": nonfinite_total,
    }
    return save_checkpoint(
        cfg["out_dir"], step, state, trainer.g_raw, trainer.ema, cfg["keep_last"]
    )


def validate(trainer, val_set, step, log, rank, world_size):
    """The EMA generator (else the generator) on the validation clips: PSNR / SSIM / bicubic PSNR,
    or NIQE for clips without GT; rank 0 keeps the last keep_last bicubic | output | GT images."""
    cfg = trainer.cfg
    out_dir = cfg["out_dir"]
    ema = trainer.ema
    image = os.path.join(out_dir, f"val_{step:07d}.png") if rank == 0 else None
    rows, (p, s, b) = evaluate_clips(
        ema if ema is not None else trainer.g_raw,
        val_set,
        cfg,
        trainer.device,
        trainer.amp_ctx,
        rank,
        world_size,
        trainer.ddp,
        image,
        cfg["val_clips"],
    )
    which = f"{cfg['metric_channel'].upper()}, {len(rows)} clips"
    if ema is not None:
        which += ", EMA"
    print0(f"val   {step:>7d} | {metrics_text(p, s, b)} ({which})", rank=rank)
    if math.isnan(s):
        log({"iter": step, "val_niqe": p})
    else:
        log({"iter": step, "val_psnr": p, "val_ssim": s, "val_bicubic_psnr": b})
    if rank == 0:
        for old in sorted(glob.glob(os.path.join(out_dir, "val_*.png")))[: -cfg["keep_last"]]:
            os.remove(old)


def stop_nonfinite(step, nonfinite_run, last_ckpt, cfg, ddp, rank):
    """Too many non-finite losses in a row: rank 0 exits with the message, the others with 1."""
    last = last_ckpt + ".safetensors" if last_ckpt else "none"
    msg = (
        f"train.py: stopping at iteration {step}: {nonfinite_run} non-finite losses in a row "
        f"(--max-nonfinite {cfg['max_nonfinite']}); last good checkpoint: {last} (untouched)"
    )
    if ddp:
        dist.destroy_process_group()
    sys.exit(msg if rank == 0 else 1)


def stop_signalled(stop, step, last_ckpt, resume_cmd, rank):
    """Exit 128 + the signal (130 Ctrl-C, 143 SIGTERM) with the command that continues the run."""
    signum = stop[0] if stop else signal.SIGTERM  # another rank was signalled
    saved = f"checkpoint {last_ckpt}.state.pt" if last_ckpt else "no checkpoint yet"
    print0(
        f"{signal.Signals(signum).name}: stopped after iteration {step}; {saved}; "
        f"continue with `{resume_cmd}`",
        rank=rank,
    )
    sys.exit(128 + signum)


def train(args, ddp, rank, world_size, device):
    """Set up, then train to max_iters; returns the run's config."""
    stem, saved = load_resume(args)
    cfg = resolve_config(args, device, world_size, saved["config"] if saved else None)
    default_dir = os.path.dirname(stem) if stem else os.path.join("runs", cfg["model"])
    cfg["out_dir"] = args.out_dir or default_dir
    resume_cmd = check_run(cfg, args, device, ddp, rank)
    trainer = build_trainer(cfg, args, device, ddp, rank)
    start = restore(trainer, stem, saved, rank, world_size)
    batches = training_batches(cfg, start, rank, world_size, device)
    val_set = validation_set(cfg, rank)

    step = start  # iterations done
    max_iters = cfg["max_iters"]
    last_ckpt = stem  # the last complete checkpoint
    nonfinite_total = saved["nonfinite_total"] if saved else 0
    nonfinite_run = 0  # non-finite losses in a row
    meter = LossMeter()
    with RunLog(cfg["out_dir"], rank) as log, stop_requests() as stop:
        where = f"{world_size} x {device.type}"
        print0(f"train: iterations {start + 1}..{max_iters} on {where}", rank=rank)
        while step < max_iters:
            if trainer.set_phase(step):
                print0(spynet_phase(trainer, step), rank=rank)
            lr = trainer.set_lr(step)
            losses, ok = trainer.train_step(next(batches))
            step += 1
            meter.add(losses, ok)
            nonfinite_run = 0 if ok else nonfinite_run + 1
            if not ok:
                nonfinite_total += 1
                report_nonfinite(losses, step, nonfinite_run, nonfinite_total, log, rank)
                if nonfinite_run >= cfg["max_nonfinite"]:
                    stop_nonfinite(step, nonfinite_run, last_ckpt, cfg, ddp, rank)
            if (step % cfg["log_interval"] == 0 or step == max_iters) and meter.count:
                report(trainer, meter, step, lr, nonfinite_total, log, rank)
                meter = LossMeter()
            stopping = all_reduce_max(bool(stop), ddp)  # the same iteration on every rank
            if step % cfg["save_interval"] == 0 or step == max_iters or stopping:
                if nonfinite_run:  # keep the last checkpoint a good one
                    print0(
                        f"save  {step:>7d} | skipped: inside a run of non-finite losses", rank=rank
                    )
                else:
                    last_ckpt = checkpoint(trainer, step, nonfinite_total, rank, world_size)
            if val_set is not None and (step % cfg["val_interval"] == 0 or step == max_iters):
                validate(trainer, val_set, step, log, rank, world_size)
                meter.restart_clock()
            if stopping:
                stop_signalled(stop, step, last_ckpt, resume_cmd, rank)
    return cfg


# ---------------------------------------------------------------------------------------------
# Evaluation of published or trained weights on a test set.


def evaluate(args, ddp, rank, world_size, device):
    if not args.weights:
        raise ValueError("train.py: --eval needs --weights FILE")
    if not args.data_root:
        raise ValueError("train.py: --eval needs --data-root (the test set folder)")
    cfg = dict(RUN_DEFAULTS, **RECIPES[args.model])
    name = args.eval_set or cfg["val_set"]
    if name != cfg["val_set"]:  # the recipe's own protocol for its validation set, else EVAL_SETS'
        channel, lq_dir, gt_dir = EVAL_SETS[name]
        cfg.update(metric_channel=channel, lq_dir=lq_dir, gt_dir=gt_dir)
    cfg.update(
        {
            k: getattr(args, k)
            for k in (
                "lq_dir",
                "gt_dir",
                "degradation",
                "metric_channel",
                "crop_border",
                "amp",
                "val_clips",
            )
            if getattr(args, k) is not None
        }
    )
    path = weights_file(args.weights, "--weights")
    model = weights.load_network(path).to(device).eval()  # the network and its size from the file
    cfg["scale"] = model.scale
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg["amp"])
    amp_ctx = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    dataset = build_eval_set(name, args.data_root, cfg)
    print0(
        f"eval: {path} on {name} ({args.data_root}), {cfg['metric_channel'].upper()} channel, "
        f"crop border {cfg['crop_border']}",
        rank=rank,
    )
    rows, (p, s, b) = evaluate_clips(
        model,
        dataset,
        cfg,
        device,
        amp_ctx,
        rank,
        world_size,
        ddp,
        max_clips=cfg["val_clips"],
        verbose=world_size == 1,
    )
    if world_size > 1:
        for key, *values in rows:
            print0(f"  {key:<24s} {metrics_text(*values)}", rank=rank)
    print0(f"mean ({len(rows)} clips): {metrics_text(p, s, b)}", rank=rank)
    return rows, (p, s, b)


def main(argv=None):
    """A user's mistake (a missing or unreadable file or folder, a bad value) is one `error:` line
    and exit 1, raised before the run folder is made; an interrupted run exits 130 or 143."""
    args = build_parser().parse_args(argv)
    ddp = False
    try:
        ddp, rank, world_size, device = setup_distributed(args.device)
        if args.eval:
            return evaluate(args, ddp, rank, world_size, device)
        return train(args, ddp, rank, world_size, device)
    except (ValueError, OSError) as e:
        sys.exit("error: " + str(e).removeprefix("train.py: ").replace("\n", " "))
    finally:
        if ddp and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
