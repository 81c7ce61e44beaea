"""The data side on tiny trees built in tmp_path: files.py (images, the atomic write), data.py
(MATLAB bicubic, BI / BD, the datasets, --prepare), synthetic.py, degradations.py (RealBasicVSR's
pipeline) and crop_sub_images.py."""

import json
import math
import os

import cv2
import numpy as np
import pytest
import torch

import crop_sub_images as csi
import data
import degradations
import files
import synthetic
import video


def _write(path, img):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(path, np.ascontiguousarray(img[..., ::-1]))


def _rand_img(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _make_clip(folder, n, h, w, rng, fmt="{:08d}.png"):
    imgs = [_rand_img(rng, h, w) for _ in range(n)]
    for i, img in enumerate(imgs):
        _write(os.path.join(folder, fmt.format(i)), img)
    return imgs


# ---------------------------------------------------------------------------------------------
# image I/O


def test_read_write_image_roundtrip_and_errors(tmp_path):
    img = _rand_img(np.random.default_rng(0), 5, 7)
    p = str(tmp_path / "a.png")
    files.write_image(p, img)
    assert np.array_equal(files.read_image(p), img)
    assert os.listdir(tmp_path) == ["a.png"]  # no temporary left behind
    with pytest.raises(FileNotFoundError, match="missing.png"):
        files.read_image(str(tmp_path / "missing.png"))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="bad.png"):
        files.read_image(str(bad))


def test_atomic_path_removes_tmp_on_error(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with files.atomic_path(str(target)) as tmp:
            open(tmp, "wb").write(b"half")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# MATLAB bicubic and BD


def test_matlab_imresize_constant_and_ramp():
    const = np.full((16, 24, 3), 77, np.uint8)
    assert np.array_equal(data.matlab_imresize(const, 0.25), np.full((4, 6, 3), 77, np.uint8))
    # a linear ramp along w stays linear: output j (1-based) sits at input u = 4j - 1.5, away from
    # borders
    ramp = np.tile(np.arange(64, dtype=np.float64), (8, 1))  # value = column index (0-based)
    out = data.matlab_imresize(ramp, 0.25)
    assert out.shape == (2, 16)
    j = np.arange(1, 17)
    interior = slice(2, 14)
    np.testing.assert_allclose(out[0, interior], (4 * j - 1.5 - 1)[interior], atol=1e-9)


def test_matlab_imresize_hand_weights():
    # x1/4: every output sees 16 taps at distances +-0.5, +-1.5, ..., +-7.5 from u; weight
    # cubic(d/4)/4
    d = np.arange(-7.5, 8.0, 1.0)
    ad = np.abs(d / 4)
    k = (
        np.where(ad <= 1, 1.5 * ad**3 - 2.5 * ad**2 + 1, -0.5 * ad**3 + 2.5 * ad**2 - 4 * ad + 2)
        / 4
    )
    k /= k.sum()
    x = np.random.default_rng(1).random(64)
    out = data.matlab_imresize(x[None, :], 0.25)[0]
    # output 5 (1-based): u = 18.5, taps at input positions 11..26 (1-based)
    np.testing.assert_allclose(out[4], (k * x[10:26]).sum(), rtol=1e-12)
    # output 1 (u = 2.5) needs the mirrored border: taps 1-based -5..10, with -5..0 read as 6..1
    idx = np.arange(-5, 11)
    idx = np.where(idx < 1, 1 - idx, idx)
    np.testing.assert_allclose(out[0], (k * x[idx - 1]).sum(), rtol=1e-12)
    # the middle weights of the kernel, written out: cubic(0.125)/4 etc. before normalisation
    assert abs(k[7] - k[8]) < 1e-15 and k[7] > k[6] > k[5]


def test_matlab_imresize_uint8_rounds_half_up():
    img = np.array([[10, 11]], np.uint8)
    # upscaling x2 of two pixels: interior outputs are 10.x; check against the float path
    f = data.matlab_imresize(img.astype(np.float64), 2.0)
    u = data.matlab_imresize(img, 2.0)
    np.testing.assert_array_equal(u, np.clip(np.floor(f + 0.5), 0, 255).astype(np.uint8))


def test_bicubic_downsample_rejects_bad_size():
    with pytest.raises(ValueError, match="divisible"):
        data.bicubic_downsample(np.zeros((10, 12, 3), np.uint8), 4)


def test_bd_downsample_matches_direct_formula():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (32, 40, 3)).astype(np.uint8)
    out = data.bd_downsample(img)
    assert out.shape == (8, 10, 3) and out.dtype == np.uint8
    sigma = 1.6
    x = np.arange(12) - 5.5
    k = np.exp(-(x[:, None] ** 2 + x[None] ** 2) / (2 * sigma**2))
    k /= k.sum()
    pad = np.pad(img.astype(np.float64), ((5, 6), (5, 6), (0, 0)), mode="edge")
    for i, j in [(0, 0), (3, 4), (7, 9)]:
        # output (i, j) is blurred pixel (1+4i, 1+4j)
        y0 = 1 + 4 * i
        x0 = 1 + 4 * j
        ref = (k[..., None] * pad[y0 : y0 + 12, x0 : x0 + 12]).sum((0, 1))
        np.testing.assert_array_equal(out[i, j], np.floor(ref + 0.5).astype(np.uint8))


# ---------------------------------------------------------------------------------------------
# synthetic clips


def test_synthetic_clips_deterministic_and_shapes():
    a = data.SyntheticClips(2, 5, 64, seed=3)
    b = data.SyntheticClips(2, 5, 64, seed=3)
    x = a[1]
    y = b[1]
    assert x["gt"].shape == (5, 3, 64, 64) and x["lq"].shape == (5, 3, 16, 16)
    assert x["gt"].dtype == torch.float32 and 0 <= x["gt"].min() and x["gt"].max() <= 1
    assert torch.equal(x["gt"], y["gt"]) and torch.equal(x["lq"], y["lq"])
    assert not torch.equal(a[0]["gt"], x["gt"])
    assert not torch.equal(data.SyntheticClips(2, 5, 64, seed=4)[1]["gt"], x["gt"])
    # LQ is the BI degradation of the GT
    gt8 = (x["gt"][0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    lq8 = (x["lq"][0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(lq8, data.bicubic_downsample(gt8))


def test_synthetic_clip_has_texture_and_recoverable_pan():
    for seed in range(3):
        f, info = synthetic.synthetic_clip(seed, 4, 96, num_objects=0, zoom=False, rotation=False)
        g = f.astype(np.float64).mean(-1)
        # high frequencies exist: a visible share of the energy is above half the Nyquist frequency
        spec = np.abs(np.fft.fft2(g[0] - g[0].mean())) ** 2
        fy, fx = np.meshgrid(np.fft.fftfreq(96), np.fft.fftfreq(96), indexing="ij")
        assert spec[np.hypot(fx, fy) > 0.25].sum() / spec.sum() > 1e-3
        for k in range(3):
            d = info["camera"][k + 1] - info["camera"][k]  # camera moves by d: content by -d
            assert np.abs(g[k + 1] - g[k]).mean() > 0.5
            m = np.float64([[1, 0, -d[0]], [0, 1, -d[1]]])  # g[k](y) = g[k+1](y - d)
            back = cv2.warpAffine(
                g[k + 1], m, (96, 96), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP
            )
            c = slice(12, -12)
            err_aligned = np.abs(back[c, c] - g[k][c, c]).mean()
            err_raw = np.abs(g[k + 1][c, c] - g[k][c, c]).mean()
            assert err_aligned < 0.35 * err_raw, (seed, k, err_aligned, err_raw)
            # and recoverable from the frames alone (copies: OpenCV 5 windows its inputs in place)
            win = cv2.createHanningWindow((96, 96), cv2.CV_64F)
            (dx, dy), _ = cv2.phaseCorrelate(g[k].copy(), g[k + 1].copy(), win)
            assert abs(dx + d[0]) < 0.4 and abs(dy + d[1]) < 0.4, (dx, dy, d)


def test_synthetic_clip_objects_move_independently():
    f0, info = synthetic.synthetic_clip(7, 3, 96, num_objects=0, zoom=False, rotation=False)
    f1, _ = synthetic.synthetic_clip(7, 3, 96, num_objects=4, zoom=False, rotation=False)
    assert not np.array_equal(f0, f1)


# ---------------------------------------------------------------------------------------------
# REDS


def _reds_tree(root, clips, n=6, h=16, w=24, scale=4, seed=0):
    rng = np.random.default_rng(seed)
    for c in clips:
        gt = _make_clip(os.path.join(root, "train_sharp", c), n, h * scale, w * scale, rng)
        for i, g in enumerate(gt):
            _write(
                os.path.join(root, "train_sharp_bicubic", f"X{scale}", c, f"{i:08d}.png"),
                cv2.resize(g, (w, h), interpolation=cv2.INTER_AREA),
            )


@pytest.fixture(scope="module")
def reds_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("reds"))
    _reds_tree(
        root, ["000", "001", "011", "015", "020", "239"] + list(data.REDSVAL_CLIPS), n=4, h=8, w=12
    )
    return root


def test_reds_splits(reds_root):
    assert data.REDS(reds_root, "train", num_frames=3, gt_size=16).clips == ["001", "239"] + list(
        data.REDSVAL_CLIPS
    )
    assert data.REDS(reds_root, "official_train", 3, 16).clips == [
        "000",
        "001",
        "011",
        "015",
        "020",
        "239",
    ]
    assert data.REDS(reds_root, "reds4").clips == ["000", "011", "015", "020"]
    assert data.REDS(reds_root, "redsval").clips == list(data.REDSVAL_CLIPS)
    with pytest.raises(ValueError, match="unknown REDS split"):
        data.REDS(reds_root, "test")


def test_reds_val_whole_clip(reds_root):
    item = data.REDS(reds_root, "reds4")[1]
    assert (
        item["key"] == "011"
        and item["lq"].shape == (4, 3, 8, 12)
        and item["gt"].shape == (4, 3, 32, 48)
    )
    ref = files.read_image(os.path.join(reds_root, "train_sharp", "011", "00000002.png"))
    assert torch.equal(item["gt"][2], torch.from_numpy(ref).permute(2, 0, 1).float() / 255)


def test_reds_train_sample_is_paired_crop_and_deterministic(reds_root):
    ds = data.REDS(reds_root, "train", num_frames=3, gt_size=16, scale=4, seed=5)
    a = ds[0]
    b = ds[0]
    assert a["lq"].shape == (3, 3, 4, 4) and a["gt"].shape == (3, 3, 16, 16)
    assert torch.equal(a["gt"], b["gt"]) and a["key"] == b["key"]
    keys = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        s = ds[0]
        keys.add(s["key"])
        # LQ was made by area x4 of GT, so the crops must still correspond after flips/transpose
        down = torch.nn.functional.avg_pool2d(s["gt"], 4)
        assert (down - s["lq"]).abs().max() < 1.5 / 255
    assert len(keys) > 1  # the window moves between epochs
    other = data.REDS(reds_root, "train", num_frames=3, gt_size=16, scale=4, seed=5, rank=1)[0]
    ds.set_epoch(0)
    assert not torch.equal(other["gt"], ds[0]["gt"])


def test_reds_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_sharp"):
        data.REDS(str(tmp_path / "nope"), "train")
    root = str(tmp_path / "r")
    _reds_tree(root, ["001", "002"], n=3, h=8, w=8)
    with pytest.raises(FileNotFoundError, match="000"):
        data.REDS(root, "reds4")
    with pytest.raises(ValueError, match="fewer than num_frames.*001"):
        data.REDS(root, "train", num_frames=5, gt_size=16)
    os.remove(os.path.join(root, "train_sharp_bicubic", "X4", "002", "00000002.png"))
    with pytest.raises(ValueError, match="frames.*002"):
        data.REDS(root, "train", num_frames=2, gt_size=16)


def test_reds_size_mismatch_and_corrupt_frame(tmp_path):
    root = str(tmp_path / "r")
    _reds_tree(root, ["001"], n=3, h=8, w=8)
    _write(
        os.path.join(root, "train_sharp", "001", "00000001.png"), np.zeros((30, 32, 3), np.uint8)
    )
    ds = data.REDS(root, "train", num_frames=3, gt_size=16)
    with pytest.raises(ValueError, match="00000001.png"):
        ds[0]
    _reds_tree(root, ["001"], n=3, h=8, w=8)
    for i in range(3):
        _write(
            os.path.join(root, "train_sharp", "001", f"{i:08d}.png"),
            np.zeros((24, 24, 3), np.uint8),
        )
    with pytest.raises(ValueError, match="not 4x the LQ size"):
        data.REDS(root, "train", num_frames=3, gt_size=16)[0]
    _reds_tree(root, ["001"], n=3, h=8, w=8)
    with open(os.path.join(root, "train_sharp", "001", "00000000.png"), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(ValueError, match="corrupt.*00000000.png"):
        data.REDS(root, "train", num_frames=3, gt_size=16)[0]


# ---------------------------------------------------------------------------------------------
# RealBasicVSR degradations


def _centre_ratio(k, dy, dx):
    c = k.shape[0] // 2
    return k[c + dy, c + dx] / k[c, c]


def test_blur_kernels_sum_to_one_and_match_closed_forms():
    sx = 2.0
    sy = 1.2
    th = 0.7
    beta = 1.6
    R = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    inv = np.linalg.inv(R @ np.diag([sx**2, sy**2]) @ R.T)
    for dx, dy in [(3, -2), (-1, 4), (0, 1)]:
        v = np.array([dx, dy], float)  # x is the column offset, y the row offset
        q = v @ inv @ v
        k = degradations.gaussian_kernel(21, sx, sy, th)
        assert abs(k.sum() - 1) < 1e-12 and k.shape == (21, 21)
        np.testing.assert_allclose(_centre_ratio(k, dy, dx), math.exp(-0.5 * q), rtol=1e-10)
        k = degradations.generalized_gaussian_kernel(15, sx, sy, th, beta)
        np.testing.assert_allclose(_centre_ratio(k, dy, dx), math.exp(-0.5 * q**beta), rtol=1e-10)
        k = degradations.plateau_kernel(15, sx, sy, th, beta)
        assert abs(k.sum() - 1) < 1e-12
        np.testing.assert_allclose(_centre_ratio(k, dy, dx), 1 / (q**beta + 1), rtol=1e-10)
    iso = degradations.gaussian_kernel(7, 1.0, 1.0, 0.0)
    np.testing.assert_allclose(_centre_ratio(iso, 2, 1), math.exp(-0.5 * 5), rtol=1e-10)


def test_sinc_kernel_and_bessel():
    # J1 against torch's independent implementation, over the whole argument range a kernel uses
    x = np.linspace(0.0, 47.0, 200)
    ref = torch.special.bessel_j1(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(degradations._bessel_j1(x), ref, atol=1e-6)  # torch: ~1e-7 off at 5
    np.testing.assert_allclose(
        degradations._bessel_j1(np.array([1.0, 5.0, 10.0])),  # tabulated values
        [0.4400505857449335, -0.3275791375914652, 0.04347274616886144],
        atol=1e-14,
    )
    omega = 2.0
    k = 13
    ker = degradations.sinc_kernel(k, omega)
    assert abs(ker.sum() - 1) < 1e-12
    r = math.hypot(3, 4)
    expected = (omega * degradations._bessel_j1(omega * r) / (2 * math.pi * r)) / (
        omega**2 / (4 * math.pi)
    )
    np.testing.assert_allclose(_centre_ratio(ker, 3, 4), expected, rtol=1e-10)
    np.testing.assert_allclose(ker, ker.T, atol=1e-15)


def test_beta_resampling_quirk():
    rng = np.random.default_rng(0)
    b = np.array([degradations._resampled_beta(rng, 4.0) for _ in range(2000)])
    assert b.min() >= 1 and b.max() <= 4 and abs(b.mean() - 2.5) < 0.1  # uniform on [1, 4]
    b = np.array([degradations._resampled_beta(rng, 0.5) for _ in range(2000)])
    assert b.min() >= 0.5 and b.max() <= 1 and abs(b.mean() - 0.75) < 0.03


def test_random_blur_applies_the_kernel_by_correlation():
    img = np.zeros((31, 31, 3), np.float32)
    img[15, 15] = 1
    p = dict(
        kernel_size=(9,),
        kernel_list=("aniso",),
        kernel_prob=(1.0,),
        sigma_x=(1.5, 1.5),
        sigma_y=(0.8, 0.8),
        rotate_angle=(0.4, 0.4),
    )
    out = degradations.random_blur([img], np.random.default_rng(0), p)[0]
    k = degradations.gaussian_kernel(9, 1.5, 0.8, 0.4)
    # correlation of an impulse gives the kernel flipped in both axes
    np.testing.assert_allclose(out[11:20, 11:20, 0], k[::-1, ::-1], atol=1e-7)
    assert degradations.random_blur([img], np.random.default_rng(0), dict(p, prob=0.0))[0] is img
    # the separable path for iso kernels gives the same result as the 2-D kernel
    x = np.random.default_rng(1).random((30, 40, 3)).astype(np.float32)
    iso = dict(p, kernel_list=("iso",), kernel_size=(15,))
    out = degradations.random_blur([x], np.random.default_rng(0), iso)[0]
    ref = cv2.filter2D(x, -1, degradations.gaussian_kernel(15, 1.5, 1.5, 0.0).astype(np.float32))
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_random_blur_walk_stays_in_range():
    img = np.zeros((41, 41, 3), np.float32)
    img[20, 20] = 1
    p = dict(
        degradations.BLUR_1,
        kernel_list=("iso",),
        kernel_prob=(1.0,),
        kernel_size=(21,),
        sigma_x_step=0.5,
    )
    out = degradations.random_blur([img] * 20, np.random.default_rng(3), p)
    sig = []
    for o in out:
        w = o[..., 0]
        y = np.arange(41) - 20
        sig.append(math.sqrt((w.sum(0) * y * y).sum() / w.sum()))
    sig = np.array(sig)
    assert np.all(sig > 0.19) and np.all(sig < 3.05) and np.ptp(sig) > 0.1
    assert np.all(np.abs(np.diff(sig)) < 0.6)


def test_unsharp_mask_matches_direct_formula():
    rng = np.random.default_rng(4)
    img = cv2.GaussianBlur(rng.random((40, 48, 3)).astype(np.float32), (0, 0), 1.5)
    img[10:30, 20] = 0.95  # a sharp line, so the threshold mask is partly on
    g = cv2.getGaussianKernel(51, 8.0)
    K = (g @ g.T).astype(np.float64)
    x = img.astype(np.float64)
    residue = x - cv2.filter2D(x, -1, K)
    mask = (np.abs(residue) * 255 > 10).astype(np.float64)
    soft = cv2.filter2D(mask, -1, K)
    ref = soft * np.clip(x + 0.5 * residue, 0, 1) + (1 - soft) * x
    out = degradations.unsharp_mask(img)
    assert 0.01 < mask.mean() < 0.99
    np.testing.assert_allclose(out, ref, atol=2e-5)


def _noise_p(**kw):
    return dict(degradations.NOISE_1, gaussian_sigma_step=0.0, poisson_scale_step=0.0, **kw)


def test_gaussian_noise_std_and_gray():
    img = np.full((128, 128, 3), 0.5, np.float32)
    p = _noise_p(noise_prob=(1.0, 0.0), gaussian_sigma=(10, 10), gaussian_gray_noise_prob=0.0)
    n = degradations.random_noise([img], np.random.default_rng(0), p)[0] - img
    assert abs(n.std() * 255 / 10 - 1) < 0.03 and abs(n.mean()) < 1e-3
    assert np.abs(n[..., 0] - n[..., 1]).mean() > 1e-3
    n = (
        degradations.random_noise(
            [img], np.random.default_rng(0), dict(p, gaussian_gray_noise_prob=1.0)
        )[0]
        - img
    )
    assert np.array_equal(n[..., 0], n[..., 2]) and abs(n.std() * 255 / 10 - 1) < 0.05


def test_poisson_noise_level_on_unit_scale():
    # left half: a ramp with all 256 grey levels (so v = 256); right half: constant x = 128/255
    img = np.empty((256, 512, 3), np.float32)
    img[:, :256] = (np.arange(256) / 255.0)[None, :, None]
    img[:, 256:] = 128 / 255
    for scale in (0.5, 2.0):
        p = _noise_p(
            noise_prob=(0.0, 1.0), poisson_scale=(scale, scale), poisson_gray_noise_prob=0.0
        )
        n = degradations.random_noise([img], np.random.default_rng(1), p)[0] - img
        expected = scale * math.sqrt((128 / 255) / 256)  # std = scale * sqrt(x / v) on [0, 1]
        assert abs(n[:, 256:].std() / expected - 1) < 0.05, (n[:, 256:].std(), expected)
        # about sqrt(255) times stronger than mmagic 1.x's 0-255 variant
        # (mmagic/datasets/transforms/random_degradations.py, which draws on the 0-255 scale)
        assert n[:, 256:].std() * 255 > 10 * scale * math.sqrt(128 / 256)
    p = _noise_p(noise_prob=(0.0, 1.0), poisson_scale=(1, 1), poisson_gray_noise_prob=1.0)
    n = degradations.random_noise([img], np.random.default_rng(1), p)[0] - img
    assert np.array_equal(n[..., 0], n[..., 1])


def _jpeg(img, q, order="official"):
    """JPEG round trip; "official": RGB handed to cv2 as if BGR (the reference pipeline's order)."""
    rgb = degradations._to_uint8(img)
    bgr = rgb if order == "official" else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, q])
    out = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return (out if order == "official" else cv2.cvtColor(out, cv2.COLOR_BGR2RGB)).astype(
        np.float32
    ) / 255


def test_jpeg_colour_order_is_the_official_one():
    """Fine stripes in the blue channel only: in the true order blue weighs 0.114 in JPEG's luma and
    the stripes fall into the subsampled chroma; in the official (swapped) order blue is taken for
    red (0.299), so more of them survive. The degradation must behave like the official order."""
    img = np.full((32, 32, 3), 0.5, np.float32)
    img[:, ::2, 2] = 0.9
    out = degradations.random_jpeg([img], np.random.default_rng(0), dict(quality=(90, 90)))[0]
    err = np.abs(out[..., 2] - img[..., 2]).mean()
    official = np.abs(_jpeg(img, 90)[..., 2] - img[..., 2]).mean()
    true_order = np.abs(_jpeg(img, 90, "true")[..., 2] - img[..., 2]).mean()
    assert official < 0.9 * true_order  # the two orders really differ here (measured 0.81)
    assert abs(err - official) < 0.1 * (true_order - official)


def test_jpeg_quality_range_and_walk():
    rng = np.random.default_rng(5)
    frames = [
        cv2.GaussianBlur(rng.random((24, 24, 3)).astype(np.float32), (0, 0), 1) for _ in range(6)
    ]
    for seed in range(3):
        out = degradations.random_jpeg(frames, np.random.default_rng(seed), degradations.JPEG)
        qs = []
        for f, o in zip(frames, out):
            match = [q for q in range(1, 101) if np.array_equal(_jpeg(f, q), o)]
            assert match and all(30 <= q <= 95 for q in match), match
            qs.append(match)
        for a, b in zip(qs, qs[1:]):  # the walk moves by at most the step 3 (after rounding)
            assert min(abs(x - y) for x in a for y in b) <= 3
    out = degradations.random_jpeg(frames[:1], np.random.default_rng(0), dict(quality=(95, 95)))
    assert np.array_equal(out[0], _jpeg(frames[0], 95))


def test_random_resize_even_sizes_and_range():
    img = np.random.default_rng(0).random((37, 53, 3)).astype(np.float32)
    for seed in range(20):
        out = degradations.random_resize(
            [img] * 8, np.random.default_rng(seed), degradations.RESIZE_1
        )
        for o in out:
            h, w = o.shape[:2]
            assert h % 2 == 0 and w % 2 == 0
            assert 2 * (37 * 0.15 // 2) <= h <= 37 * 1.5 and 2 * (53 * 0.15 // 2) <= w <= 53 * 1.5
    out = degradations.random_resize(
        [img] * 3, np.random.default_rng(0), dict(degradations.FINAL_RESIZE, target_size=(16, 12))
    )
    assert all(o.shape == (16, 12, 3) for o in out)
    with pytest.raises(ValueError, match="resize_opt"):
        degradations.random_resize(
            [img], np.random.default_rng(0), dict(resize_opt=("nearest",), resize_prob=(1.0,))
        )


@pytest.mark.parametrize("codec", ["libx264", "h264", "mpeg4"])
def test_video_compression_each_codec(codec):
    rng = np.random.default_rng(0)
    frames = [
        cv2.GaussianBlur(rng.random((32, 48, 3)).astype(np.float32), (0, 0), 2) for _ in range(5)
    ]
    p = dict(degradations.VIDEO, codec=(codec,), codec_prob=(1.0,))
    out = degradations.random_video_compression(frames, np.random.default_rng(1), p)
    assert len(out) == 5 and all(o.shape == (32, 48, 3) and o.dtype == np.float32 for o in out)
    err = np.mean([np.abs(o - f).mean() for o, f in zip(out, frames)])
    assert 1e-3 < err < 0.2
    # frames of different sizes (the resize walk) come back at frame 0's size, reproducibly
    frames[1] = cv2.resize(frames[1], (50, 34))
    frames[3] = cv2.resize(frames[3], (44, 30))
    runs = [
        degradations.random_video_compression(frames, np.random.default_rng(1), p) for _ in range(3)
    ]
    assert all(o.shape == (32, 48, 3) for o in runs[0])
    assert all(np.array_equal(a, b) for r in runs[1:] for a, b in zip(runs[0], r))


def test_libx264_is_reproducible():
    """x264 with the macroblock tree (the official options) gave 2-3 different outputs in 5 runs of
    one clip here, which breaks exact resume; mbtree=0 gives the same bits every run. A known value:
    a synthetic 128x128 clip at 10 kb/s comes back at 36.21 dB (35.29 with mbtree, 0.4 dB slack)."""
    frames = list(synthetic.synthetic_clip(3, 10, 128)[0].astype(np.float32) / 255)
    p = dict(degradations.VIDEO, codec=("libx264",), codec_prob=(1.0,), bitrate=(1e4, 1e4))
    runs = [
        degradations.random_video_compression(frames, np.random.default_rng(1), p) for _ in range(5)
    ]
    assert all(np.array_equal(a, b) for r in runs[1:] for a, b in zip(runs[0], r))
    mse = np.mean((np.stack(runs[0]) - np.stack(frames)) ** 2)
    assert 35.8 < 10 * math.log10(1 / mse) < 36.6


def test_video_codec_missing_is_an_error():
    with pytest.raises(RuntimeError, match="no_such_codec"):
        video.check_video_codec("no_such_codec")
    p = dict(degradations.VIDEO, codec=("libx264", "no_such_codec"), codec_prob=(1.0, 0.0))
    with pytest.raises(RuntimeError, match="no_such_codec"):
        degradations.random_video_compression(
            [np.zeros((16, 16, 3), np.float32)], np.random.default_rng(0), p
        )


def test_real_degradation_dataset_synthetic_determinism():
    ds = data.RealDegradationDataset(None, num_frames=3, gt_size=64, num_synthetic_clips=4, seed=2)
    a = ds[1]
    b = ds[1]
    assert (
        a["lq"].shape == (6, 3, 16, 16)
        and a["gt"].shape == (6, 3, 64, 64)
        and a["gt_usm"].shape == (6, 3, 64, 64)
    )
    for k in a:
        assert a[k] == b[k] if k == "key" else torch.equal(a[k], b[k])
    assert not torch.equal(ds[2]["lq"], a["lq"])
    ds.set_epoch(1)
    assert not torch.equal(ds[1]["lq"], a["lq"])
    # mirrored sequence, USM of the GT, 8-bit LQ
    assert torch.equal(a["gt"], a["gt"].flip(0)) and torch.equal(a["gt_usm"], a["gt_usm"].flip(0))
    usm = degradations.unsharp_mask(a["gt"][0].permute(1, 2, 0).numpy())
    np.testing.assert_allclose(a["gt_usm"][0].permute(1, 2, 0).numpy(), usm, atol=1e-6)
    q = a["lq"] * 255
    assert torch.allclose(q, q.round(), atol=1e-3) and a["lq"].min() >= 0 and a["lq"].max() <= 1


# ---------------------------------------------------------------------------------------------
# GT-only sub-image clips with the degradation pipeline


def test_redssub_and_real_degradation_from_folder(tmp_path):
    rng = np.random.default_rng(0)
    for c in ["000_s001", "000_s002"]:
        _make_clip(str(tmp_path / "train_sharp_sub" / c), 4, 40, 48, rng)
    sub = data.REDSSub(str(tmp_path), num_frames=3, gt_size=32, seed=1)
    item = sub[1]
    assert item["gt"].shape == (3, 3, 32, 32) and item["key"].startswith("000_s002/")
    ds = data.RealDegradationDataset(str(tmp_path), num_frames=3, gt_size=32, seed=1)
    s = ds[1]
    assert len(ds) == 2 and s["lq"].shape == (6, 3, 8, 8) and s["gt"].shape == (6, 3, 32, 32)
    # same window, crop and flips for the same seed/index
    assert torch.equal(s["gt"][:3], item["gt"])
    with pytest.raises(ValueError, match="fewer than num_frames.*000_s001"):
        data.REDSSub(str(tmp_path), num_frames=5)
    with pytest.raises(FileNotFoundError, match="train_sharp_sub"):
        data.RealDegradationDataset(str(tmp_path / "none"))


# ---------------------------------------------------------------------------------------------
# Vimeo-90K, paired folders, LQ folders


def _vimeo_tree(root, keys, split, h=8, w=12):
    rng = np.random.default_rng(1)
    for key in keys:
        for i in range(1, 8):
            gt = _rand_img(rng, 4 * h, 4 * w)
            _write(os.path.join(root, "GT", key, f"im{i}.png"), gt)
            _write(os.path.join(root, "BIx4", key, f"im{i}.png"), data.bicubic_downsample(gt))
            _write(os.path.join(root, "BDx4", key, f"im{i}.png"), data.bd_downsample(gt))
    with open(os.path.join(root, f"meta_info_Vimeo90K_{split}_GT.txt"), "w") as f:
        f.write("\n".join(f"{k} (32,48,3)" for k in keys))


def test_vimeo90k_train_and_test(tmp_path):
    root = str(tmp_path)
    _vimeo_tree(root, ["00001/0001", "00001/0002"], "train")
    _vimeo_tree(root, ["00002/0001"], "test")
    tr = data.Vimeo90K(root, "train", "BD", gt_size=16)
    item = tr[1]
    assert len(tr) == 2 and item["key"] == "00001/0002"
    assert item["lq"].shape == (14, 3, 4, 4) and item["gt"].shape == (14, 3, 16, 16)
    assert torch.equal(item["lq"], item["lq"].flip(0)) and torch.equal(
        item["gt"], item["gt"].flip(0)
    )
    te = data.Vimeo90K(root, "test", "BI")[0]
    assert te["lq"].shape == (14, 3, 8, 12) and te["gt"].shape == (1, 3, 32, 48)
    gt4 = files.read_image(os.path.join(root, "GT", "00002/0001", "im4.png"))
    assert torch.equal(te["gt"][0], data.frames_to_tensor([gt4])[0])
    lq1 = files.read_image(os.path.join(root, "BIx4", "00002/0001", "im1.png"))
    assert torch.equal(te["lq"][0], te["lq"][13]) and torch.equal(
        te["lq"][0], data.frames_to_tensor([lq1])[0]
    )
    with pytest.raises(FileNotFoundError, match="meta_info_Vimeo90K_test_GT.txt"):
        data.Vimeo90K(str(tmp_path / "x"), "test")
    os.remove(os.path.join(root, "BIx4", "00002/0001", "im5.png"))
    with pytest.raises(FileNotFoundError, match="im5.png"):
        data.Vimeo90K(root, "test")[0]


def test_paired_folders_and_lq_folder(tmp_path):
    rng = np.random.default_rng(2)
    for clip, n in [("calendar", 3), ("city", 2)]:
        gts = _make_clip(str(tmp_path / "GT" / clip), n, 16, 20, rng)
        for i, g in enumerate(gts):
            _write(str(tmp_path / "BIx4" / clip / f"{i:08d}.png"), data.bicubic_downsample(g))
    ds = data.PairedFolders(str(tmp_path), "BIx4", "GT")
    assert [ds[i]["key"] for i in range(2)] == ["calendar", "city"]
    assert ds[0]["lq"].shape == (3, 3, 4, 5) and ds[0]["gt"].shape == (3, 3, 16, 20)
    lq = data.LQFolder(str(tmp_path / "BIx4"))
    assert len(lq) == 2 and lq[1]["lq"].shape == (2, 3, 4, 5) and "gt" not in lq[1]
    single = data.LQFolder(str(tmp_path / "BIx4" / "city"))
    assert len(single) == 1 and single[0]["key"] == "city"
    # errors: sizes not matching the scale, frame counts, empty clip, missing root, empty folder
    with pytest.raises(ValueError, match="not 3x"):
        data.PairedFolders(str(tmp_path), "BIx4", "GT", scale=3)[0]
    os.remove(str(tmp_path / "BIx4" / "city" / "00000001.png"))
    with pytest.raises(ValueError, match="1 frames but GT clip has 2.*city"):
        data.PairedFolders(str(tmp_path), "BIx4", "GT")
    os.remove(str(tmp_path / "BIx4" / "city" / "00000000.png"))
    with pytest.raises(ValueError, match="no image frames.*city"):
        data.PairedFolders(str(tmp_path), "BIx4", "GT")
    with pytest.raises(FileNotFoundError, match="nope"):
        data.LQFolder(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="empty"):
        data.LQFolder(str(tmp_path / "empty"))


def test_prepare_test_set_cli(tmp_path):
    rng = np.random.default_rng(3)
    gts = _make_clip(str(tmp_path / "GT" / "walk"), 2, 16, 24, rng)
    data.main(["--prepare", "bd", "--src", str(tmp_path / "GT"), "--dst", str(tmp_path / "BDx4")])
    out = files.read_image(str(tmp_path / "BDx4" / "walk" / "00000001.png"))
    assert np.array_equal(out, data.bd_downsample(gts[1]))
    assert sorted(os.listdir(tmp_path)) == ["BDx4", "GT"]
    with pytest.raises(SystemExit, match="exists"):
        data.main(
            ["--prepare", "bi", "--src", str(tmp_path / "GT"), "--dst", str(tmp_path / "BDx4")]
        )
    # x2, the folder named by the usual convention beside --src: BIx2; REDS: train_sharp_bicubic/X2
    data.main(["--prepare", "bi", "--scale", "2", "--src", str(tmp_path / "GT")])
    out = files.read_image(str(tmp_path / "BIx2" / "walk" / "00000000.png"))
    assert out.shape == (8, 12, 3) and np.array_equal(out, data.bicubic_downsample(gts[0], 2))
    os.rename(tmp_path / "GT", tmp_path / "train_sharp")
    data.main(["--prepare", "bi", "--scale", "2", "--src", str(tmp_path / "train_sharp")])
    assert os.path.isfile(tmp_path / "train_sharp_bicubic" / "X2" / "walk" / "00000001.png")


# ---------------------------------------------------------------------------------------------
# crop_sub_images.py (ckkelvinchan/RealBasicVSR: crop_sub_images.py's grid)

STATE = ".crop_sub_images.json"


def test_crop_positions_official_examples():
    # a 720x1280 REDS frame: crop 480, step 240; its x4 LQ: crop 120, step 60
    assert csi.crop_positions(720, 480, 240, 0) == [0, 240]
    assert csi.crop_positions(1280, 480, 240, 0) == [0, 240, 480, 720, 800]
    assert csi.crop_positions(180, 120, 60, 0) == [0, 60]
    assert csi.crop_positions(320, 120, 60, 0) == [0, 60, 120, 180, 200]
    assert csi.crop_positions(1280, 480, 240, 100) == [0, 240, 480, 720]  # 80 left over <= thresh


def test_crop_sub_images_layout_resume_and_refusal(tmp_path, capsys):
    root = str(tmp_path / "REDS")
    _reds_tree(root, ["000", "011"], n=2, h=18, w=32)  # 72x128 GT: the 720x1280 example at 1/10
    args = [
        "--data-root",
        root,
        "--scales",
        "4",
        "--crop-size",
        "48",
        "--step",
        "24",
        "--n-thread",
        "1",
    ]
    csi.main(args)
    sub = os.path.join(root, "train_sharp_sub")
    expected = [STATE] + [f"{c}_s{i:03d}" for c in ("000", "011") for i in range(1, 11)]
    assert sorted(os.listdir(sub)) == sorted(expected)
    gt = files.read_image(os.path.join(root, "train_sharp", "011", "00000001.png"))
    # crop 7 is row 2, column 2, at (24, 24); crop 10 row 2, column 5, at (24, 80)
    crop = files.read_image(os.path.join(sub, "011_s007", "00000001.png"))
    assert np.array_equal(crop, gt[24:72, 24:72])
    crop = files.read_image(os.path.join(sub, "011_s010", "00000001.png"))
    assert np.array_equal(crop, gt[24:72, 80:128])
    lq = files.read_image(os.path.join(root, "train_sharp_bicubic", "X4", "011", "00000001.png"))
    crop = files.read_image(
        os.path.join(root, "train_sharp_bicubic", "X4_sub", "011_s010", "00000001.png")
    )
    assert crop.shape == (12, 12, 3) and np.array_equal(crop, lq[6:18, 20:32])
    # a complete folder is reported, not rewritten
    mtime = os.path.getmtime(os.path.join(sub, "000_s001", "00000000.png"))
    csi.main(args)
    assert "already complete" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(sub, "000_s001", "00000000.png")) == mtime
    # an interrupted run resumes: only missing files are written, stale temporaries removed
    os.remove(os.path.join(sub, "000_s003", "00000001.png"))
    open(os.path.join(sub, "000_s003", "00000001.tmp-deadbeef.png"), "wb").write(b"half")
    state = os.path.join(sub, STATE)
    st = json.load(open(state))
    st.pop("complete")
    json.dump(st, open(state, "w"))
    assert csi.crop_folder(os.path.join(root, "train_sharp"), sub, 48, 24, 0, 3, 1) == 1
    assert sorted(os.listdir(os.path.join(sub, "000_s003"))) == ["00000000.png", "00000001.png"]
    # other arguments on a started folder are refused; a foreign existing folder is not touched
    st["complete"] = False
    json.dump(st, open(state, "w"))
    with pytest.raises(ValueError, match="other arguments"):
        csi.crop_folder(os.path.join(root, "train_sharp"), sub, 40, 20, 0, 3, 1)
    os.makedirs(os.path.join(root, "other_out"))
    with pytest.raises(FileExistsError, match="other_out"):
        csi.crop_folder(
            os.path.join(root, "train_sharp"), os.path.join(root, "other_out"), 48, 24, 0, 3, 1
        )


def test_crop_sub_images_errors(tmp_path):
    with pytest.raises(SystemExit, match="train_sharp"):
        csi.main(["--data-root", str(tmp_path / "none"), "--n-thread", "1"])
    root = str(tmp_path / "REDS")
    _reds_tree(root, ["000"], n=1, h=18, w=32)
    with pytest.raises(SystemExit, match="divisible by scale 4"):
        csi.main(["--data-root", root, "--scales", "4", "--crop-size", "50", "--n-thread", "1"])
    with open(os.path.join(root, "train_sharp", "000", "00000000.png"), "wb") as f:
        f.write(b"corrupt")
    with pytest.raises(SystemExit, match="00000000.png"):
        csi.main(["--data-root", root, "--crop-size", "48", "--step", "24", "--n-thread", "1"])
    sub = os.path.join(root, "train_sharp_sub")
    assert os.listdir(sub) == [STATE]  # nothing half-written; the run can be resumed


@pytest.mark.slow  # a multiprocessing pool
def test_crop_sub_images_parallel(tmp_path):
    root = str(tmp_path / "REDS")
    _reds_tree(root, ["000"], n=3, h=18, w=32)
    csi.main(["--data-root", root, "--crop-size", "48", "--step", "24", "--n-thread", "2"])
    assert len(os.listdir(os.path.join(root, "train_sharp_sub", "000_s010"))) == 3
