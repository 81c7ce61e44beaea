"""Data for BasicVSR++ and RealBasicVSR: the datasets, the BI / BD test-set degradations and the
preparation of test sets. Elsewhere: image files and frame folders in files.py, the built-in
synthetic clips in synthetic.py, RealBasicVSR's degradations in degradations.py, video in video.py.

Every dataset item is a dict of float32 torch tensors in [0, 1], RGB, frames first:
    {"lq": (t, 3, h, w), "gt": (t, 3, s*h, s*w), "key": str}
    RealDegradationDataset adds "gt_usm" (the unsharp-masked GT the LQ is made from);
    LQFolder items have no "gt", REDSSub ones no "lq"; Vimeo90K "test" ones only the centre GT
    frame (1, 3, H, W).

Public names, in file order:
    frames_to_tensor(frames) -> (t, 3, h, w) float32
    matlab_imresize(img, scale)                 MATLAB imresize, bicubic, antialiased
    bicubic_downsample(img, scale=4)            the BI test-set degradation, uint8
    bd_downsample(img, sigma=1.6, scale=4)      the BD one: Gaussian blur, then subsampling
    SyntheticClips(num_clips, num_frames, gt_size, scale=4, seed=0)   the built-in default data
    REDS(root, split, num_frames=30, gt_size=256, scale=4)
                                                "train", "official_train", "reds4", "redsval"
    REDSSub(root, num_frames=15, gt_size=256)   GT-only sub-image clips (train_sharp_sub)
    Vimeo90K(root, split, degradation="BI", gt_size=256)   septuplets mirrored to 14 frames
    PairedFolders(root, lq_dir, gt_dir, scale=4)           Vid4 / UDM10 style test sets
    LQFolder(root)                              LQ-only clips
    RealDegradationDataset(root=None, num_frames=15, gt_size=256, ...)   RealBasicVSR training data
    prepare_test_set(src, dst, degradation="bi", scale=4)  a BI or BD copy of a tree of images

Command line: `--bench-degradation` (RealBasicVSR samples/s, one worker),
`--prepare bi|bd --src GT`.

Randomness: a training sample is a pure function of (seed, rank, epoch (set_epoch), index),
whatever num_workers.
"""

import argparse
import functools
import math
import os
import sys
import time

import cv2
import numpy as np
import torch

from degradations import VIDEO, check_choice, degrade_sequence, unsharp_mask
from files import IMG_EXTS, atomic_path, list_frames, read_image, write_image
from synthetic import synthetic_clip
from video import check_video_codec

# ---------------------------------------------------------------------------------------------
# Frames to tensors


def frames_to_tensor(frames):
    """List / array of (h, w, 3) frames, uint8 or float in [0, 1] -> (t, 3, h, w) float32 tensor."""
    arr = np.stack(frames) if isinstance(frames, (list, tuple)) else frames
    t = torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))
    return t.float().div_(255.0) if arr.dtype == np.uint8 else t.float()


# ---------------------------------------------------------------------------------------------
# Test-set degradations: MATLAB bicubic (BI) and Gaussian blur + subsampling (BD), as
# open-mmlab/mmagic: tools/dataset_converters/vimeo90k/preprocess_vimeo90k_dataset.py makes them


def _cubic(x):
    # Keys' cubic with a = -0.5, as MATLAB's imresize
    ax = np.abs(x)
    ax2 = ax * ax
    ax3 = ax2 * ax
    return np.where(
        ax <= 1,
        1.5 * ax3 - 2.5 * ax2 + 1,
        np.where(ax <= 2, -0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2, 0.0),
    )


@functools.lru_cache(maxsize=64)
def _imresize_weights(in_len, out_len, scale):
    """MATLAB imresize's bicubic weights along one axis, (out_len, taps) each:
    out[i] = sum_j w[i, j] x[src[i, j]]."""
    kernel_scale = min(scale, 1.0)  # downscaling widens the kernel: antialiasing
    width = 4.0 / kernel_scale
    u = np.arange(1, out_len + 1, dtype=np.float64) / scale + 0.5 * (1 - 1 / scale)
    idx = (
        np.floor(u - width / 2)[:, None] + np.arange(int(math.ceil(width)) + 2)[None, :]
    )  # 1-based input positions
    w = kernel_scale * _cubic(kernel_scale * (u[:, None] - idx))
    w /= w.sum(axis=1, keepdims=True)
    # out-of-range taps mirror with the edge pixel repeated (MATLAB's symmetric padding)
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len)[::-1]])
    src = mirror[np.mod(idx.astype(np.int64) - 1, 2 * in_len)]
    return src, w


def matlab_imresize(img, scale):
    """MATLAB `imresize(img, scale)`, default bicubic kernel with antialiasing. img (h, w) or
    (h, w, c): uint8 returns uint8 (rounded half up, clipped), float returns float64 unclipped.
    Rows first, in float64 without intermediate rounding (as the Python ports used by
    mmagic/BasicSR)."""
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    h, w = img.shape[:2]
    out_h = int(math.ceil(h * scale))
    out_w = int(math.ceil(w * scale))
    # gathers instead of dense matrix products: no BLAS threads, which stall on a busy machine
    src, wt = _imresize_weights(h, out_h, float(scale))
    x = np.einsum("ot,ot...->o...", wt, img.astype(np.float64)[src])  # (oh, w, ...)
    src, wt = _imresize_weights(w, out_w, float(scale))
    x = np.einsum("ot,pot...->po...", wt, x[:, src])  # (oh, ow, ...)
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8) if img.dtype == np.uint8 else x


def bicubic_downsample(img, scale=4):
    """The BI degradation: MATLAB bicubic downsampling by an integer factor, uint8 out."""
    h, w = img.shape[:2]
    if h % scale or w % scale:
        raise ValueError(f"image size {h}x{w} is not divisible by scale {scale}")
    return matlab_imresize(img.astype(np.uint8, copy=False), 1.0 / scale)


def bd_downsample(img, sigma=1.6, scale=4):
    """The BD degradation: Gaussian blur (MATLAB fspecial, size 12 for sigma 1.6, replicate border,
    anchor (5, 5) as MATLAB's imfilter centre for an even kernel), then every scale-th pixel
    from 1."""
    size = int(math.ceil(3 * sigma)) * 2 + 2  # 12 for sigma 1.6: even, centred between pixels
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2  # -5.5 ... 5.5
    k = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma * sigma))
    anchor = (size - 1) // 2
    blurred = cv2.filter2D(
        img.astype(np.float64),
        -1,
        k / k.sum(),
        anchor=(anchor, anchor),
        borderType=cv2.BORDER_REPLICATE,
    )
    return np.clip(np.floor(blurred[1:-1:scale, 1:-1:scale] + 0.5), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Datasets: a training sample is a random window, crop and flips (_train_sample), an evaluation
# one a whole clip.


def _need_dirs(*folders):
    for folder in folders:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"folder not found: {folder}")


def _list_clips(folder):
    _need_dirs(folder)
    clips = sorted(n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n)))
    if not clips:
        raise ValueError(f"no clip folders in: {folder}")
    return clips


def _check_scale(gt_size, scale):
    if gt_size is not None and gt_size % scale:
        raise ValueError(f"gt_size {gt_size} must be divisible by scale {scale}")


def _check_length(paths, num_frames):
    if len(paths) < num_frames:
        raise ValueError(
            f"clip has {len(paths)} frames, fewer than num_frames={num_frames}: "
            f"{os.path.dirname(paths[0])}"
        )


def _check_pair(lq, gt, scale, lq_path, gt_path):
    if gt.shape[1] != lq.shape[1] * scale or gt.shape[2] != lq.shape[2] * scale:
        raise ValueError(
            f"GT size {gt.shape[2]}x{gt.shape[1]} is not {scale}x the LQ size "
            f"{lq.shape[2]}x{lq.shape[1]}: {gt_path} vs {lq_path}"
        )


def _read_clip(paths):
    """Read frames that must all have one size; error names the first mismatching frame."""
    frames = [read_image(p) for p in paths]
    for p, f in zip(paths, frames):
        if f.shape != frames[0].shape:
            raise ValueError(
                f"frame size {f.shape[1]}x{f.shape[0]} differs from "
                f"{frames[0].shape[1]}x{frames[0].shape[0]} of {paths[0]}: {p}"
            )
    return np.stack(frames)


def _read_clips(paths, scale):
    """([lq,] gt) frame path lists -> uint8 (t, h, w, 3) arrays; the GT must be `scale` x the LQ."""
    seqs = [_read_clip(p) for p in paths]
    if len(seqs) == 2:
        _check_pair(*seqs, scale, paths[0][0], paths[1][0])
    return seqs


def _augment(rng, *seqs):
    """Flip / transpose every frame of every sequence the same way; seqs are (t, h, w, 3) arrays."""
    hflip, vflip, transpose = rng.random(3) < 0.5
    seqs = [s[:, :: (-1 if vflip else 1), :: (-1 if hflip else 1)] for s in seqs]
    return [np.ascontiguousarray(s.transpose(0, 2, 1, 3) if transpose else s) for s in seqs]


def _train_sample(rng, paths, num_frames, gt_size, scale=1):
    """([lq,] gt) frame path lists -> (uint8 arrays, start): a random window of num_frames (None:
    all), the same random crop of each (GT gt_size, LQ gt_size / scale; None: none) and
    flips/transpose (p = 0.5 each)."""
    start = 0
    if num_frames is not None:
        _check_length(paths[-1], num_frames)
        start = int(rng.integers(0, len(paths[-1]) - num_frames + 1))
        paths = [p[start : start + num_frames] for p in paths]
    seqs = _read_clips(paths, scale)
    if gt_size is not None:  # placed on the first sequence, the LQ when paired
        size = gt_size // scale
        h, w = seqs[0].shape[1:3]
        if h < size or w < size:
            raise ValueError(
                f"{'LQ ' if len(seqs) > 1 else ''}frames {w}x{h} are smaller than the crop "
                f"{size}x{size}: {paths[0][0]}"
            )
        top = int(rng.integers(0, h - size + 1))
        left = int(rng.integers(0, w - size + 1))
        seqs = [
            s[:, top * f : (top + size) * f, left * f : (left + size) * f]
            for s, f in zip(seqs, (1, scale))
        ]
    return _augment(rng, *seqs), start


class _Clips(torch.utils.data.Dataset):
    """clips: the clip names; paths: per clip one frame path list per field (lq, gt). A training
    set gives one _train_sample per clip, keyed "{clip}/{start:08d}"; the others whole clips, keyed
    clip."""

    fields = ("lq", "gt")
    training = False
    num_frames = None
    gt_size = None
    scale = 1

    def _find(self, roots, clips, num_frames=None):
        """Frame paths of each clip under each of roots ([lq_root,] gt_root); LQ, GT counts equal,
        >= num_frames."""
        self.clips = clips
        self.paths = []
        for c in clips:
            folders = [os.path.join(r, c) for r in roots]
            paths = [list_frames(f) for f in folders]
            if len(paths) == 2 and len(paths[0]) != len(paths[1]):
                raise ValueError(
                    f"LQ clip has {len(paths[0])} frames but GT clip has {len(paths[1])}: "
                    f"{folders[0]} vs {folders[1]}"
                )
            self.paths.append(paths)
        for paths in self.paths if num_frames is not None else ():
            _check_length(paths[-1], num_frames)

    def __len__(self):
        return len(self.clips)

    def sample(self, index, rng=None):
        """One uint8 (t, h, w, 3) array per field, and the key."""
        if not self.training:
            return _read_clips(self.paths[index], self.scale), self.clips[index]
        seqs, start = _train_sample(
            rng, self.paths[index], self.num_frames, self.gt_size, self.scale
        )
        return seqs, f"{self.clips[index]}/{start:08d}"

    def __getitem__(self, index):
        seqs, key = self.sample(index, self.rng(index) if self.training else None)
        return {**{f: frames_to_tensor(s) for f, s in zip(self.fields, seqs)}, "key": key}


class _SampledDataset(torch.utils.data.Dataset):
    """Shared seeding: the random state of a sample depends only on (seed, rank, epoch, index)."""

    def __init__(self, seed=0, rank=None):
        if rank is None:
            dist = torch.distributed
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.seed = int(seed)
        self.rank = int(rank)
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def rng(self, index):
        return np.random.default_rng([self.seed, self.rank, self.epoch, int(index)])


class SyntheticClips(torch.utils.data.Dataset):
    """The built-in default data: clip i is synthetic_clip((seed, i)) with its BI LQ (seed=1:
    held-out clips)."""

    def __init__(self, num_clips, num_frames, gt_size, scale=4, seed=0):
        _check_scale(gt_size, scale)
        if num_clips < 1 or num_frames < 1:
            raise ValueError(
                f"num_clips and num_frames must be >= 1, got {num_clips}, {num_frames}"
            )
        self.num_clips = int(num_clips)
        self.num_frames = int(num_frames)
        self.gt_size = int(gt_size)
        self.scale = int(scale)
        self.seed = int(seed)

    def __len__(self):
        return self.num_clips

    def __getitem__(self, index):
        if not 0 <= index < self.num_clips:
            raise IndexError(index)
        gt, _ = synthetic_clip([self.seed, index], self.num_frames, self.gt_size)
        lq = [bicubic_downsample(f, self.scale) for f in gt]
        return {
            "lq": frames_to_tensor(lq),
            "gt": frames_to_tensor(gt),
            "key": f"synthetic_s{self.seed}_{index:05d}",
        }


REDS4_CLIPS = ("000", "011", "015", "020")
REDSVAL_CLIPS = tuple(f"{i:03d}" for i in range(240, 270))


class REDS(_SampledDataset, _Clips):
    """REDS with val merged in as clips 240-269 (root/train_sharp,
    root/train_sharp_bicubic/X{scale}). Training splits, one random window per clip per epoch:
    "train" (every clip present but REDS4), "official_train" (clips 000-239 present); whole clips
    (gt_size, num_frames ignored): "reds4" (000, 011, 015, 020), "redsval"."""

    def __init__(self, root, split, num_frames=30, gt_size=256, scale=4, seed=0, rank=None):
        super().__init__(seed, rank)
        check_choice("REDS split", split, ("train", "official_train", "reds4", "redsval"))
        _check_scale(gt_size, scale)
        self.gt_root = os.path.join(root, "train_sharp")
        self.lq_root = os.path.join(root, "train_sharp_bicubic", f"X{scale}")
        present = _list_clips(self.gt_root)
        _need_dirs(self.lq_root)
        self.split = split
        self.training = split in ("train", "official_train")
        if self.training:
            clips = [
                c
                for c in present
                if (c not in REDS4_CLIPS if split == "train" else c.isdigit() and int(c) < 240)
            ]
        else:  # benchmark splits must be complete, or the numbers silently change
            clips = list(REDS4_CLIPS if split == "reds4" else REDSVAL_CLIPS)
            for c in clips:
                if c not in present:
                    raise FileNotFoundError(
                        f"REDS {split} clip missing: {os.path.join(self.gt_root, c)}"
                    )
        if not clips:
            raise ValueError(f"no clips for REDS split {split!r} in {self.gt_root}")
        self.num_frames = num_frames
        self.gt_size = gt_size
        self.scale = scale
        self._find((self.lq_root, self.gt_root), clips, num_frames if self.training else None)


class REDSSub(_SampledDataset, _Clips):
    """GT-only training clips for RealBasicVSR: root/train_sharp_sub/{clip}_s{index:03d}/*.png (from
    crop_sub_images.py; gt_dir picks another folder of clip folders). Items {"gt", "key"}."""

    fields = ("gt",)
    training = True

    def __init__(
        self, root, num_frames=15, gt_size=256, gt_dir="train_sharp_sub", seed=0, rank=None
    ):
        super().__init__(seed, rank)
        self.gt_root = os.path.join(root, gt_dir)
        self._find([self.gt_root], _list_clips(self.gt_root), num_frames)
        self.num_frames = num_frames
        self.gt_size = gt_size


class Vimeo90K(_SampledDataset, _Clips):
    """Vimeo-90K septuplets in the mmagic layout (open-mmlab/mmagic:
    configs/basicvsr/basicvsr_2xb4_vimeo90k-bi.py): root/GT/{xxxxx}/{yyyy}/im1..im7.png,
    root/{BD|BI}x4/..., root/meta_info_Vimeo90K_{train|test}_GT.txt (one "xxxxx/yyyy ..." line
    each). "train": a paired crop + flips, LQ and GT mirrored to 14 frames. "test": the LQ mirrored
    to 14, GT only im4 as (1, 3, H, W); reduce the 14 outputs to the centre as
    0.5 * (out[3] + out[10])."""

    def __init__(self, root, split, degradation="BI", gt_size=256, scale=4, seed=0, rank=None):
        super().__init__(seed, rank)
        check_choice("Vimeo90K split", split, ("train", "test"))
        check_choice("Vimeo90K degradation", degradation, ("BI", "BD"))
        meta = os.path.join(root, f"meta_info_Vimeo90K_{split}_GT.txt")
        if not os.path.isfile(meta):
            raise FileNotFoundError(f"Vimeo-90K annotation file not found: {meta}")
        with open(meta) as f:
            self.keys = self.clips = [line.split()[0] for line in f if line.strip()]
        if not self.keys:
            raise ValueError(f"no septuplets listed in {meta}")
        self.gt_root = os.path.join(root, "GT")
        self.lq_root = os.path.join(root, f"{degradation}x{scale}")
        _need_dirs(self.gt_root, self.lq_root)
        self.training = split == "train"
        self.gt_size = gt_size
        self.scale = scale

    def sample(self, index, rng=None):
        key = self.keys[index]
        lq_paths, gt_paths = (
            [os.path.join(r, key, f"im{i}.png") for i in range(1, 8)]
            for r in (self.lq_root, self.gt_root)
        )
        if self.training:
            (lq, gt), _ = _train_sample(rng, (lq_paths, gt_paths), None, self.gt_size, self.scale)
            gt = np.concatenate([gt, gt[::-1]])
        else:
            lq = _read_clip(lq_paths)
            gt = read_image(gt_paths[3])[None]
            _check_pair(lq, gt, self.scale, lq_paths[3], gt_paths[3])
        return (np.concatenate([lq, lq[::-1]]), gt), key


class PairedFolders(_Clips):
    """Whole-clip test sets (Vid4, UDM10): root/lq_dir/{clip}/*.png ("BIx4", "BDx4"),
    root/gt_dir/{clip}/*.png."""

    def __init__(self, root, lq_dir, gt_dir, scale=4):
        self.lq_root = os.path.join(root, lq_dir)
        self.gt_root = os.path.join(root, gt_dir)
        clips = _list_clips(self.gt_root)
        _need_dirs(self.lq_root)
        self._find((self.lq_root, self.gt_root), clips)
        self.scale = scale


class LQFolder(_Clips):
    """LQ-only clips (VideoLQ, user frames): root/{clip}/*.png, or root/*.png as one clip. Items
    {"lq", "key"}."""

    fields = ("lq",)

    def __init__(self, root):
        _need_dirs(root)
        if any(n.lower().endswith(IMG_EXTS) for n in os.listdir(root)):
            self.clips = [os.path.basename(os.path.normpath(root))]
            self.paths = [[list_frames(root)]]
        else:
            self._find([root], _list_clips(root))


class RealDegradationDataset(_SampledDataset):
    """RealBasicVSR training data (Chan et al., CVPR 2022, Sec. 4; the pipeline of
    ckkelvinchan/RealBasicVSR: configs/realbasicvsr_c64b20_1x30x8_lr5e-5_150k_reds.py) from GT-only
    clips, root/gt_dir (REDSSub), or synthetic ones (root None): a REDSSub sample mirrored to 2n
    frames, gt_usm = unsharp_mask(gt), lq = degrade_sequence(gt_usm).
    Item: {"lq" (2n, 3, gt_size/scale, .), "gt" (2n, 3, gt_size, gt_size), "gt_usm", "key"}."""

    def __init__(
        self,
        root=None,
        num_frames=15,
        gt_size=256,
        scale=4,
        gt_dir="train_sharp_sub",
        num_synthetic_clips=1000,
        seed=0,
        rank=None,
    ):
        super().__init__(seed, rank)
        _check_scale(gt_size, scale)
        for c in VIDEO["codec"]:  # fail at construction, not in a worker mid-training
            check_video_codec(c)
        self.clips = (
            None if root is None else REDSSub(root, num_frames, gt_size, gt_dir, seed, rank)
        )
        self.num_frames = num_frames
        self.gt_size = gt_size
        self.scale = scale
        self.num_synthetic_clips = num_synthetic_clips

    def __len__(self):
        return self.num_synthetic_clips if self.clips is None else len(self.clips)

    def __getitem__(self, index):
        rng = self.rng(index)
        if self.clips is None:
            gt, _ = synthetic_clip([self.seed, index], self.num_frames, self.gt_size)
            (gt,) = _augment(rng, gt)
            key = f"synthetic_s{self.seed}_{index:05d}"
        else:
            (gt,), key = self.clips.sample(index, rng)
        usm = [unsharp_mask(f) for f in gt.astype(np.float32) / 255]
        # mirrored: x1..xn, xn..x1
        lq = degrade_sequence(usm + usm[::-1], rng, self.gt_size // self.scale)
        gt = frames_to_tensor(gt)
        usm = frames_to_tensor(usm)
        return {
            "lq": frames_to_tensor(lq),
            "gt": torch.cat([gt, gt.flip(0)]),
            "gt_usm": torch.cat([usm, usm.flip(0)]),
            "key": key,
        }


# ---------------------------------------------------------------------------------------------
# Test-set preparation and the command line (module docstring)


def prepare_test_set(src, dst, degradation="bi", scale=4):
    """Degrade every image under `src` (any depth, e.g. {clip}/*.png) into the same tree of PNGs
    under `dst` ("bi": bicubic_downsample, "bd": bd_downsample), which must not exist (atomic_path).
    Returns the number of images."""
    check_choice("degradation", degradation, ("bi", "bd"))
    fn = {"bi": bicubic_downsample, "bd": lambda img, s: bd_downsample(img, 1.6, s)}[degradation]
    _need_dirs(src)
    if os.path.exists(dst):
        raise FileExistsError(f"output exists, not overwriting: {dst}")
    files = sorted(
        os.path.relpath(os.path.join(d, n), src)
        for d, _, names in os.walk(src)
        for n in names
        if n.lower().endswith(IMG_EXTS)
    )
    if not files:
        raise ValueError(f"no images under: {src}")
    from tqdm import tqdm

    with atomic_path(dst) as tmp:
        for rel in tqdm(files, desc=f"{degradation.upper()}x{scale}", unit="img"):
            out = os.path.join(tmp, os.path.splitext(rel)[0] + ".png")
            os.makedirs(os.path.dirname(out), exist_ok=True)
            write_image(out, fn(read_image(os.path.join(src, rel)), scale))
    return len(files)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Data tools: RealBasicVSR pipeline benchmark, BI/BD test-set preparation."
    )
    ap.error = lambda message: ap.exit(2, f"error: {message}\n")  # one line
    g = ap.add_argument_group("benchmark")
    g.add_argument(
        "--bench-degradation",
        action="store_true",
        help="time the RealBasicVSR pipeline, one worker",
    )
    g.add_argument(
        "--root", default=None, help="REDS root with train_sharp_sub (default: synthetic GT)"
    )
    g.add_argument("--samples", type=int, default=10, help="samples to time")
    g = ap.add_argument_group("test-set preparation")
    g.add_argument(
        "--prepare", choices=["bi", "bd"], help="degrade --src into --dst (MATLAB bicubic or BD)"
    )
    g.add_argument("--src", help="GT folder, e.g. data/Vid4/GT")
    g.add_argument(
        "--dst",
        help="output folder, must not exist (default: BIx4, BDx2, ... beside --src; "
        "REDS train_sharp: train_sharp_bicubic/X4, X2)",
    )
    g.add_argument(
        "--scale", type=int, default=4, choices=[2, 4], help="downsampling factor (default: 4)"
    )
    args = ap.parse_args(argv)
    try:
        if args.bench_degradation:  # one DataLoader worker = one core
            cv2.setNumThreads(1)
            torch.set_num_threads(1)
            ds = RealDegradationDataset(args.root, num_frames=15, gt_size=256)
            ds[0]  # warm-up (codec init, caches)
            t0 = time.perf_counter()
            c0 = time.process_time()
            for i in range(1, args.samples + 1):
                item = ds[i % len(ds)]
            dt = time.perf_counter() - t0
            dc = time.process_time() - c0
            # CPU time is what one worker costs on an idle core; wall time also counts other load
            src = "synthetic GT" if args.root is None else args.root
            print(
                f"RealBasicVSR pipeline ({src}, 15 frames mirrored to 30, 256 crop, "
                f"lq {tuple(item['lq'].shape)}): {args.samples / dc:.2f} samples/s per worker "
                f"by CPU time ({dc / args.samples:.2f} s/sample), {args.samples / dt:.2f} by wall "
                "time"
            )
        elif args.prepare:
            if not args.src:
                ap.error("--prepare needs --src")
            # the usual names: BIx4, BDx2, ... beside --src; REDS: train_sharp_bicubic/X4, X2
            src = os.path.normpath(args.src)
            redsx = os.path.basename(src) == "train_sharp" and args.prepare == "bi"
            if redsx:
                names = ("train_sharp_bicubic", f"X{args.scale}")
            else:
                names = (f"{args.prepare.upper()}x{args.scale}",)
            args.dst = args.dst or os.path.join(os.path.dirname(src), *names)
            n = prepare_test_set(args.src, args.dst, args.prepare, args.scale)
            print(f"wrote {n} images to {args.dst}")
        else:
            ap.print_help()
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
