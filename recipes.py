"""The published training recipes of BasicVSR++ and RealBasicVSR (CVPR 2022), those of the
official configs, as plain dicts; the small settings train.py uses on its built-in synthetic
clips; the run defaults; and the protocol each test set is measured with. Every recipe field can
be overridden by train.py's flag of the same name (underscores -> dashes).
"""

# ---------------------------------------------------------------------------------------------
# The recipes.

BASICVSRPP_REDS4 = dict(
    arch="basicvsrpp",
    scale=4,
    mid_channels=64,
    num_blocks=7,
    num_cleaning_blocks=0,
    train_set="reds",
    val_set="reds4",
    degradation="BI",
    lq_dir=None,
    gt_dir=None,
    metric_channel="rgb",
    crop_border=0,
    num_frames=30,
    crop_size=256,
    batch_size=1,
    pixel_loss="charbonnier",
    pixel_target="gt",
    cleaning_weight=0.0,
    perceptual_weight=0.0,
    gan_weight=0.0,
    d_mid_channels=64,
    lr=1e-4,
    lr_d=0.0,
    betas=(0.9, 0.99),
    lr_schedule="cosine",
    eta_min=1e-7,
    lr_period=None,
    max_iters=600_000,
    spynet_lr_mult=0.25,
    spynet_fix_iters=5000,
    ema_decay=0.0,
    grad_clip=0.0,
    needs_spynet_weights=True,
    num_workers=6,
    val_interval=5000,
    save_interval=5000,
    val_clips=None,
)
REALBASICVSR_WOGAN = dict(
    BASICVSRPP_REDS4,
    arch="realbasicvsr",
    mid_channels=64,
    num_blocks=20,
    num_cleaning_blocks=20,
    train_set="reds_sub",
    val_set="udm10",
    lq_dir="BIx4",
    gt_dir="GT",
    num_frames=15,
    crop_size=256,
    batch_size=2,  # 15 frames, mirrored to 30 by the dataset
    pixel_loss="l1",
    pixel_target="gt_usm",
    cleaning_weight=1.0,
    lr=1e-4,
    lr_schedule="constant",
    max_iters=300_000,
    spynet_lr_mult=1.0,
    spynet_fix_iters=-1,  # SPyNet frozen throughout
    ema_decay=0.999,
    num_workers=10,
)
RECIPES = {
    # REDS4 BI x4, open-mmlab/mmagic: configs/basicvsr_pp/basicvsr-pp_c64n7_8xb1-600k_reds4.py:
    # Charbonnier, cosine 1e-4 -> 1e-7 over 600k, SPyNet x0.25 and frozen 5k.
    "basicvsrpp": BASICVSRPP_REDS4,
    # Vimeo-90K, open-mmlab/mmagic: configs/basicvsr_pp/basicvsr-pp_c64n7_4xb2-300k_vimeo90k-bi.py
    # and -bd.py: 7 frames mirrored to 14, batch 2/GPU, 300k, SPyNet trained from the start,
    # validation on Vid4 (Y channel).
    "basicvsrpp_vimeo_bi": dict(
        BASICVSRPP_REDS4,
        train_set="vimeo90k",
        degradation="BI",
        val_set="vid4",
        lq_dir="BIx4",
        gt_dir="GT",
        metric_channel="y",
        num_frames=7,
        batch_size=2,
        max_iters=300_000,
        spynet_fix_iters=0,
    ),
    "basicvsrpp_vimeo_bd": dict(
        BASICVSRPP_REDS4,
        train_set="vimeo90k",
        degradation="BD",
        val_set="vid4",
        lq_dir="BDx4",
        gt_dir="GT",
        metric_channel="y",
        num_frames=7,
        batch_size=2,
        max_iters=300_000,
        spynet_fix_iters=0,
    ),
    # RealBasicVSR stage 1, ckkelvinchan/RealBasicVSR:
    # configs/realbasicvsr_wogan_c64b20_2x30x8_lr1e-4_300k_reds.py: L1 on the sharpened GT +
    # cleaning loss, EMA 0.999.
    "realbasicvsr_wogan": REALBASICVSR_WOGAN,
    # Stage 2, configs/realbasicvsr_c64b20_1x30x8_lr5e-5_150k_reds.py: + perceptual (1.0) + GAN
    # (0.05); G 5e-5, D 1e-4; starts from stage 1 (--init).
    "realbasicvsr": dict(
        REALBASICVSR_WOGAN,
        perceptual_weight=1.0,
        gan_weight=0.05,
        lr=5e-5,
        lr_d=1e-4,
        max_iters=150_000,
        batch_size=1,
        needs_spynet_weights=False,
    ),
}

# Without --data-root: the built-in synthetic clips (RealBasicVSR: through the degradations), with
# small settings (flags win); on a CPU a smaller network too, which passes bicubic within minutes.
# BasicVSR++ needs LR frames of 64x64, hence its 256 crop.
SYNTHETIC = {
    "basicvsrpp": dict(
        num_frames=5,
        crop_size=256,
        synthetic_clips=200,
        val_clips=2,
        num_workers=4,
        val_interval=500,
        save_interval=500,
        max_iters=5000,
    ),
    "realbasicvsr": dict(
        num_frames=5,
        crop_size=128,
        synthetic_clips=200,
        val_clips=2,
        num_workers=4,
        val_interval=500,
        save_interval=500,
        max_iters=5000,
    ),
}
SYNTHETIC_CPU = {
    "basicvsrpp": dict(
        num_frames=2,
        mid_channels=16,
        num_blocks=2,
        num_workers=0,
        lr=1e-3,
        val_interval=50,
        save_interval=50,
        max_iters=1000,
    ),
    "realbasicvsr": dict(
        num_frames=2,
        crop_size=64,
        mid_channels=16,
        num_blocks=2,
        num_cleaning_blocks=2,
        d_mid_channels=16,
        num_workers=0,
        val_interval=50,
        save_interval=50,
        max_iters=1000,
    ),
}

# The published files the recipes start from; nothing is downloaded.
SPYNET_FILE = "spynet_20210409-c6c1bd09.pth"
VGG_FILE = "vgg19-dcbb9e9d.pth"

# Run settings that no recipe sets (train.py's flags override them).
RUN_DEFAULTS = dict(
    seed=0,
    amp="none",
    compile=False,
    log_interval=10,
    keep_last=3,
    max_nonfinite=10,
    synthetic_clips=200,
)


# ---------------------------------------------------------------------------------------------
# Evaluation.

# set -> metric channel and default LQ/GT folder names, as the published results are measured
# (open-mmlab/mmagic: configs/_base_/datasets/basicvsr_test_config.py)
EVAL_SETS = {
    "reds4": ("rgb", None, None),
    "redsval": ("rgb", None, None),
    "vid4": ("y", "BIx4", "GT"),
    "udm10": ("y", "BDx4", "GT"),
    "vimeo90k_t": ("y", None, None),
    "folders": ("rgb", None, None),
    "videolq": ("rgb", None, None),  # videolq: LQ only, NIQE
}
