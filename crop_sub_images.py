"""Crop REDS frames into overlapping sub-images for faster I/O, as RealBasicVSR's training data
is made (ckkelvinchan/RealBasicVSR: crop_sub_images.py).

    python crop_sub_images.py --data-root data/REDS --scales 4

train_sharp -> train_sharp_sub with crop 480, step 240, thresh 0, and for each scale s
train_sharp_bicubic/X{s} -> train_sharp_bicubic/X{s}_sub with crop, step and thresh divided by s.
Each crop position of a clip becomes its own clip: {clip}_s{index:03d}/{frame}.png, index counted
row-major from 1 (a 720x1280 frame gives 10 crops).

Safe to interrupt: every file is written under a temporary name and renamed, and a rerun skips
files already there. An output folder records its arguments in .crop_sub_images.json; a rerun
with other arguments is refused, and a folder marked complete is reported and left alone.
"""

import argparse
import json
import os
import sys
from multiprocessing import Pool

import cv2
import numpy as np

from files import IMG_EXTS, atomic_path

STATE_FILE = ".crop_sub_images.json"


def crop_positions(length, crop_size, step, thresh_size):
    """Top (or left) offsets: every `step` from 0, plus a last crop flush with the far edge if
    more than `thresh_size` pixels would otherwise be left over."""
    if length < crop_size:
        return []
    pos = list(range(0, length - crop_size + 1, step))
    if length - (pos[-1] + crop_size) > thresh_size:
        pos.append(length - crop_size)
    return pos


def crop_one(task):
    """Crop one frame into all grid positions; returns the number of files written (existing ones
    skipped)."""
    path, clip, save_folder, crop_size, step, thresh_size, level = task
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"cannot read image (missing, corrupt or unsupported): {path}")
    name, ext = os.path.splitext(os.path.basename(path))
    h, w = img.shape[:2]
    hs = crop_positions(h, crop_size, step, thresh_size)
    ws = crop_positions(w, crop_size, step, thresh_size)
    if not hs or not ws:
        raise ValueError(f"image {w}x{h} is smaller than the crop size {crop_size}: {path}")
    written = 0
    index = 0
    for y in hs:
        for x in ws:
            index += 1
            out = os.path.join(save_folder, f"{clip}_s{index:03d}", f"{name}{ext}")
            if os.path.exists(out):  # complete: files only appear through an atomic rename
                continue
            os.makedirs(os.path.dirname(out), exist_ok=True)
            ok, buf = cv2.imencode(
                ext,
                np.ascontiguousarray(img[y : y + crop_size, x : x + crop_size]),
                [cv2.IMWRITE_PNG_COMPRESSION, level],
            )
            if not ok:
                raise ValueError(f"cannot encode crop as {ext}: {out}")
            with atomic_path(out) as tmp:
                with open(tmp, "wb") as f:
                    f.write(buf.tobytes())
            written += 1
    return written


def _list_images(input_folder):
    """(path, clip) for every image below input_folder; the clip is the parent folder's name."""
    items = []
    for d, _, names in os.walk(input_folder):
        for n in sorted(names):
            if n.lower().endswith(IMG_EXTS) and atomic_path.TAG not in n:
                items.append((os.path.join(d, n), os.path.basename(d)))
    return sorted(items)


def _remove_stale_tmp(folder):
    # leftovers of a killed run (a rename that never happened)
    for d, _, names in os.walk(folder):
        for n in names:
            if atomic_path.TAG in n:
                os.remove(os.path.join(d, n))


def crop_folder(input_folder, save_folder, crop_size, step, thresh_size, level, n_thread):
    """Crop every image of input_folder into save_folder; returns the number of files written (0
    if already complete)."""
    from tqdm import tqdm

    if not os.path.isdir(input_folder):
        raise FileNotFoundError(f"input folder not found: {input_folder}")
    state = {
        "input": os.path.abspath(input_folder),
        "crop_size": crop_size,
        "step": step,
        "thresh_size": thresh_size,
        "compression_level": level,
    }
    state_path = os.path.join(save_folder, STATE_FILE)
    if os.path.isdir(save_folder):
        if not os.path.isfile(state_path):
            raise FileExistsError(
                f"output folder exists but was not made by this script, "
                f"not touching it: {save_folder}"
            )
        with open(state_path) as f:
            old = json.load(f)
        if old.get("complete"):
            print(f"already complete, not overwriting: {save_folder}")
            return 0
        if {k: old.get(k) for k in state} != state:
            raise ValueError(
                f"output folder was started with other arguments {old}, not mixing: {save_folder}"
            )
        _remove_stale_tmp(save_folder)
        print(f"resuming: {save_folder}")
    else:
        os.makedirs(save_folder)
        with atomic_path(state_path) as tmp, open(tmp, "w") as f:
            json.dump(state, f)
    images = _list_images(input_folder)
    if not images:
        raise ValueError(f"no images in input folder: {input_folder}")
    tasks = [(p, clip, save_folder, crop_size, step, thresh_size, level) for p, clip in images]
    written = 0
    bar = tqdm(total=len(tasks), desc=os.path.basename(os.path.normpath(save_folder)), unit="img")
    if n_thread <= 1:
        for t in tasks:
            written += crop_one(t)
            bar.update()
    else:
        with Pool(n_thread) as pool:
            for n in pool.imap_unordered(crop_one, tasks, chunksize=4):
                written += n
                bar.update()
    bar.close()
    with atomic_path(state_path) as tmp, open(tmp, "w") as f:
        json.dump(dict(state, complete=True), f)
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Crop REDS train_sharp (and its bicubic LQ) into sub-image clips."
    )
    ap.error = lambda message: ap.exit(2, f"error: {message}\n")  # one line
    ap.add_argument(
        "--data-root", required=True, help="REDS root holding train_sharp and train_sharp_bicubic"
    )
    ap.add_argument(
        "--scales", type=int, nargs="*", default=[], help="LQ scales to crop too, e.g. 4"
    )
    g = ap.add_argument_group("grid (GT pixels; divided by s for X{s})")
    g.add_argument("--crop-size", type=int, default=480, help="crop size")
    g.add_argument("--step", type=int, default=240, help="step between crops")
    g.add_argument(
        "--thresh-size",
        type=int,
        default=0,
        help="add an edge-flush crop if more than this is left over",
    )
    g = ap.add_argument_group("output")
    g.add_argument("--compression-level", type=int, default=3, help="PNG compression level 0-9")
    g.add_argument(
        "--n-thread", type=int, default=min(20, os.cpu_count() or 1), help="worker processes"
    )
    args = ap.parse_args(argv)
    jobs = [
        (
            os.path.join(args.data_root, "train_sharp"),
            os.path.join(args.data_root, "train_sharp_sub"),
            1,
        )
    ]
    for s in args.scales:
        lq = os.path.join(args.data_root, "train_sharp_bicubic", f"X{s}")
        jobs.append((lq, lq + "_sub", s))
    try:
        for s in args.scales:
            if args.crop_size % s or args.step % s or args.thresh_size % s:
                raise ValueError(
                    f"--crop-size, --step and --thresh-size must be divisible by scale {s}"
                )
        for src, dst, s in jobs:  # check every input before writing anything
            if not os.path.isdir(src):
                raise FileNotFoundError(f"input folder not found: {src}")
        for src, dst, s in jobs:
            n = crop_folder(
                src,
                dst,
                args.crop_size // s,
                args.step // s,
                args.thresh_size // s,
                args.compression_level,
                args.n_thread,
            )
            print(f"{dst}: {n} files written")
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
