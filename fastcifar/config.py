"""Frozen settings of convert and of training (augmentation, loader, run), checked on creation,
and the named training recipes; the other commands' settings are in command_config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from fastcifar.errors import require


class Device(StrEnum):
    auto = "auto"
    cuda = "cuda"
    mps = "mps"
    cpu = "cpu"


class Precision(StrEnum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class OptimizerName(StrEnum):
    adam = "adam"
    sgd = "sgd"


class PadMode(StrEnum):
    constant = "constant"  # fill the border with the train mean
    reflect = "reflect"


# Holes per image: the kernel's parameter table has one (top, left) column pair per hole.
MAX_CUTOUTS = 8
# Progressive resizing: sides of the train images (px); the full one is CIFAR-10's own, the
# smallest leaves CustResNet's last block a 1x1 map.
FULL_TRAIN_SIZE, MIN_TRAIN_SIZE, TRAIN_SIZE_STEP = 32, 8, 4


@dataclass(frozen=True)
class ConvertConfig:
    """Settings of `fastcifar convert`."""

    source: Path | None = None  # archive, extracted folder, ImageFolder tree; None: find/download
    out_dir: Path = Path("datasets")
    force: bool = False  # rewrite even when the outputs are up to date
    fix_images: bool = False  # convert grey/RGBA images to RGB instead of rejecting them
    download: bool = True  # allow torchvision's downloader when no source is found

    def __post_init__(self) -> None:
        if self.source is not None:
            require(Path(self.source).exists(), f"source not found: {self.source}")


@dataclass(frozen=True)
class AugmentConfig:
    """The fused train augmentation; each part is off when its size/probability is 0."""

    pad: int = 4  # pixels of padding before the random 32x32 crop
    pad_mode: PadMode = PadMode.constant
    flip: bool = True  # horizontal flip with probability 0.5
    # With flip: epoch 0 flips a random half; epoch e flips an image exactly when its epoch-0
    # flip XOR (e is odd), so every image is seen both ways in any two consecutive epochs.
    flip_alternate: bool = False
    cutout_size: int = 8  # side of each square hole, pixels
    cutout_count: int = 1
    p_jitter: float = 0.0  # probability of colour jitter per image
    brightness: float = 0.0  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0  # shift drawn from [-h, h] of a full turn (at most 0.5)
    p_gray: float = 0.0  # probability of grayscale per image

    def __post_init__(self) -> None:
        require(0 <= self.pad <= 16, f"pad must be in 0..16, got {self.pad}")
        require(0 <= self.cutout_size <= 32, f"cutout size must be in 0..32, got {self.cutout_size}")
        require(0 <= self.cutout_count <= MAX_CUTOUTS,
                 f"cutout count must be in 0..{MAX_CUTOUTS}, got {self.cutout_count}")
        for name in ("p_jitter", "p_gray"):
            value = getattr(self, name)
            require(0.0 <= value <= 1.0, f"{name} must be a probability, got {value}")
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            require(0.0 <= value <= 1.0, f"{name} must be in [0, 1], got {value}")
        require(0.0 <= self.hue <= 0.5, f"hue must be in [0, 0.5], got {self.hue}")

    @property
    def jitter_enabled(self) -> bool:
        return self.p_jitter > 0 and (self.brightness or self.contrast or self.saturation or self.hue)


NO_AUGMENT = AugmentConfig(pad=0, flip=False, cutout_size=0, cutout_count=0)


@dataclass(frozen=True)
class LoaderConfig:
    """Which betons to read and how to batch them."""

    data_dir: Path = Path("datasets")
    batch_size: int = 512
    workers: int = 0  # 0: one per CPU core
    train_subset: int | None = None  # first N train records only
    # N train images (stratified by class, the same whatever the seed) never trained on: each
    # evaluation also scores them, so settings can be chosen without looking at the test set.
    holdout: int = 0
    test_subset: int | None = None
    distributed: bool = False  # set for torchrun; each rank reads its shard
    # Hold every converted image in device memory (CIFAR-10: ~180 MB) and augment train batches
    # there with torch ops, instead of FFCV's host loader and a per-batch copy (device_data.py).
    on_device: bool = False

    def __post_init__(self) -> None:
        require(self.batch_size > 0, f"batch size must be positive, got {self.batch_size}")
        require(not (self.on_device and self.distributed),
                 "--data-on-device is for one process, not torchrun: drop it or run without torchrun")
        require(self.workers >= 0, f"workers must be >= 0, got {self.workers}")
        require(self.holdout >= 0, f"holdout must be >= 0, got {self.holdout}")
        for name in ("train_subset", "test_subset"):
            value = getattr(self, name)
            require(value is None or value > 0, f"{name} must be positive, got {value}")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of `fastcifar train`. The field defaults are the base the named recipes
    (`RECIPES`, `recipe(name)`) start from: SGD with pad 4, flip and cutout 8, none of the
    recipes' tricks. A run usually starts from a recipe: the CLI's default is DEFAULT_RECIPE."""

    loader: LoaderConfig = field(default_factory=LoaderConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    recipe: str = "custom"
    epochs: int = 24
    optimizer: OptimizerName = OptimizerName.sgd
    max_lr: float = 0.4  # peak LR of the schedule, as given: not rescaled for other batch sizes
    min_lr: float = 1e-6  # LR at the end of the schedule (> 0)
    initial_lr_fraction: float = 0.1  # the schedule starts at max_lr * this
    pct_start: float = 5 / 24  # fraction of steps spent warming up to the peak (at most 0.5)
    momentum: float = 0.9
    nesterov: bool = True
    cycle_momentum: bool = False  # OneCycle also cycles momentum / Adam's beta1 (0.85-0.95)
    weight_decay: float = 5e-4
    decay_norm: bool = False  # apply weight decay to BatchNorm scales and shifts too
    label_smoothing: float = 0.0
    logit_scale: float = 1.0  # constant multiplier of the logits
    # Measured effects below: H100, 4-epoch budget, 2 seeds (benchmarks/results/gpu/sweep-4ep-h100.json)
    # unless stated otherwise.
    ema_decay: float = 0.0  # per-step EMA of the weights; 0: off. 0.98: -0.4 points (whiten+zero_res)
    # Lookahead EMA: every `lookahead_every` steps the average moves towards the live weights
    # (decay 0.95^k * (step/total)^3, all float state incl. BN statistics) and is copied back
    # into the live network; the last step copies it in once more. 0: off.
    lookahead_every: int = 0
    tta: bool = False  # evaluate on the image and its mirror: +0.5 points at 24 epochs (fast)
    tta_shifts: bool = False  # with tta: also the 1-px up-left and down-right shifts (6 passes)
    bn_momentum: float = 0.1  # torch's BatchNorm running-stat momentum
    bn_eps: float = 1e-5  # torch's BatchNorm epsilon
    bn_frozen_scale: bool = False  # BN scales stay at 1 (still parameters, requires_grad off)
    bn_bias_lr_scale: float = 1.0  # BN shifts train at LR x this and weight decay / this
    whiten: bool = False  # prep conv = fixed 3x3 PCA whitening (27 filters) + trained 1x1 27->64
    whiten_eps: float = 1e-2  # added to the patch covariance's eigenvalues (normalised pixels)
    dirac_init: bool = False  # each 3x3 conv's first in-channel filters start as the identity
    muon_lr: float = 0.0  # > 0: Muon (this peak LR) for conv filters, SGD for the rest
    muon_momentum: float = 0.6
    # Each filter matrix rescaled to Frobenius norm sqrt(its rows) before each Muon step, as
    # airbench's Muon does: Muon's steps have a fixed size, so without this the filters grow
    # and their effective LR (behind BN) falls with the number of steps taken.
    muon_normalize_filters: bool = False
    whiten_init: bool = False  # prep conv starts as a whitening of 3x3 train patches:
    #                            +9 points after epoch 1, +0.0 at the end of 4 epochs
    zero_init_residual: bool = False  # residual branches start at zero: -3.5 points
    # Progressive resizing: epoch 1 trains on crops downscaled to `train_size_start` px, and
    # the side grows linearly (in steps of 4 px) to the stored 32 px over the first
    # `train_size_ramp` of the epochs; the last epoch and every test pass are at 32 px. A
    # 20 px step costs ~0.39 of a 32 px one. 32 or a ramp of 0: off.
    train_size_start: int = 32
    train_size_ramp: float = 0.0
    # Data selection (selection.py): a quarter-width proxy trained alongside on every image
    # scores each batch, and the model steps on this fraction of it, highest proxy loss first
    # (--batch-size 1024 with 0.5: 512 images chosen from 1024 a step). 1: off.
    select_fraction: float = 1.0
    dropout: float = 0.0
    device: Device = Device.auto
    precision: Precision = Precision.auto
    channels_last: bool = True
    compile: bool = False  # torch.compile the model (CUDA only benefits)
    seed: int = 0
    out_dir: Path = Path("runs")  # a run folder is created inside
    weights_dir: Path = Path("weights")
    resume: Path | None = None
    local_rank: int = 0  # this process's GPU under torchrun (the CLI reads LOCAL_RANK)
    stop_at_accuracy: float | None = None  # stop once test accuracy reaches this
    # Also evaluate every this many steps inside the last `eval_steps_epochs` epochs (0: only at
    # epoch ends): a time to accuracy then lands between epoch ends, not on the next one.
    eval_every_steps: int = 0
    eval_steps_epochs: int = 1
    # Test passes at epoch ends from this epoch on (1-based; the last epoch always gets one).
    # None: every epoch on CUDA, the last only elsewhere: on 2 CPU cores a multi-crop pass
    # costs about 130 s, a third of a bf16 epoch, and a run needs only its final accuracy.
    eval_from_epoch: int | None = None
    make_plots: bool = True
    tensorboard: bool = True  # event files in the run folder (needs the tensorboard package)

    def __post_init__(self) -> None:
        require_seed(self.seed)
        require(self.epochs > 0, f"epochs must be positive, got {self.epochs}")
        require(self.max_lr > 0, f"max LR must be positive, got {self.max_lr}")
        require(0 < self.min_lr <= self.max_lr, "min LR must be in (0, max LR]")
        require(0 < self.initial_lr_fraction <= 1, "initial LR fraction must be in (0, 1]")
        # OneCycle warms up for at most half the run (make_scheduler): refuse more, never clamp.
        require(0 < self.pct_start <= 0.5, f"pct_start must be in (0, 0.5], got {self.pct_start}")
        require(self.weight_decay >= 0, "weight decay must be >= 0")
        require(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        require(0 < self.logit_scale < float("inf"), f"logit scale must be positive, got {self.logit_scale}")
        require(0 <= self.label_smoothing < 1, "label smoothing must be in [0, 1)")
        require(0 <= self.ema_decay < 1, "EMA decay must be in [0, 1)")
        require(0 < self.bn_momentum <= 1, "BN momentum must be in (0, 1]")
        require(self.bn_eps > 0, "BN eps must be positive")
        require(self.bn_bias_lr_scale > 0, "BN bias LR scale must be positive")
        require(self.whiten_eps > 0, "whitening eps must be positive")
        require(self.lookahead_every >= 0, "lookahead-every must be >= 0 (0: off)")
        require(not (self.lookahead_every and self.ema_decay),
                 "--lookahead-every and --ema are two kinds of weight averaging: pick one")
        require(not (self.whiten and self.whiten_init),
                 "--whiten replaces the prep conv's training; drop --whiten-init")
        require(self.tta or not self.tta_shifts, "tta_shifts adds shifts to the flip: it "
                 "needs tta (the CLI's --tta multicrop sets both)")
        require(self.muon_lr >= 0, "Muon LR must be >= 0 (0: off)")
        require(0 <= self.muon_momentum < 1, "Muon momentum must be in [0, 1)")
        require(self.muon_lr or not self.muon_normalize_filters,
                 "--muon-normalize-filters rescales the filters Muon steps: it needs --muon-lr")
        require(not self.muon_lr or self.optimizer == OptimizerName.sgd,
                 "Muon pairs with SGD for the non-filter parameters: use --optimizer sgd, or "
                 "--muon-lr 0 to train without Muon")
        require(0 <= self.dropout < 1, "dropout must be in [0, 1)")
        require(0 < self.select_fraction <= 1, "select fraction must be in (0, 1] (1: off), "
                 f"got {self.select_fraction}")
        require(not (self.zero_init_residual and self.bn_frozen_scale),
                 "--zero-init-residual zeroes BN scales that --bn-frozen-scale then keeps at "
                 "zero, which kills the residual branches: drop one of them")
        if self.stop_at_accuracy is not None:
            require(0 < self.stop_at_accuracy <= 1, "target accuracy must be in (0, 1]")
        require(self.eval_every_steps >= 0, "eval-every-steps must be >= 0 (0: epoch ends only)")
        require(self.eval_steps_epochs >= 1, "eval-steps-epochs must be >= 1")
        require(self.eval_from_epoch is None or self.eval_from_epoch >= 1,
                 "eval-from-epoch must be >= 1 (1: every epoch)")
        require(MIN_TRAIN_SIZE <= self.train_size_start <= FULL_TRAIN_SIZE,
                 f"train size start must be in {MIN_TRAIN_SIZE}..{FULL_TRAIN_SIZE} px, got "
                 f"{self.train_size_start}")
        require(0 <= self.train_size_ramp < 1,
                 f"train size ramp must be a fraction of the run in [0, 1), got "
                 f"{self.train_size_ramp}")

    def train_image_size(self, epoch: int) -> int:
        """The side (px) of epoch `epoch`'s (0-based) train images under progressive resizing."""
        ramp_epochs = min(round(self.train_size_ramp * self.epochs), self.epochs - 1)
        if epoch >= ramp_epochs or self.train_size_start == FULL_TRAIN_SIZE:
            return FULL_TRAIN_SIZE
        size = self.train_size_start + (FULL_TRAIN_SIZE - self.train_size_start) * (
            epoch / ramp_epochs)
        return min(int(size / TRAIN_SIZE_STEP + 0.5) * TRAIN_SIZE_STEP, FULL_TRAIN_SIZE)

    def with_max_lr(self, max_lr: float) -> TrainConfig:
        """This config peaking at `max_lr`, its schedule's floor kept at or below the new peak."""
        return dataclasses.replace(self, max_lr=max_lr, min_lr=min(self.min_lr, max_lr))


MAX_SEED = 2**32 - 1  # numpy's and FFCV's seeds are 32-bit


def require_seed(seed: int, what: str = "--seed") -> None:
    require(0 <= seed <= MAX_SEED, f"{what} must be in 0..{MAX_SEED}, got {seed}")


def optimizer_rule(optimizer: OptimizerName | None, muon_lr: float | None,
                   muon_normalize_filters: bool | None = None) -> dict:
    """The one rule for --optimizer on a Muon recipe, in train and lr-find alike: Muon pairs
    with SGD only, so Adam turns it off, unless --muon-lr asks for it (refused by the config).
    A run without Muon (Adam, --muon-lr 0) drops the filter normalization only Muon uses (on
    in the default recipe from 12 epochs) unless --muon-normalize-filters asks for it."""
    changes: dict[str, object] = {}
    if optimizer not in (None, OptimizerName.sgd) and muon_lr is None:
        changes["muon_lr"] = 0.0
    if changes.get("muon_lr", muon_lr) == 0 and muon_normalize_filters is None:
        changes["muon_normalize_filters"] = False
    return changes


def kept_per_batch(fraction: float, batch_size: int) -> int:
    """How many images of a `batch_size` batch a step trains on with `select_fraction`
    `fraction`: the nearest whole number, at least one."""
    return max(1, round(fraction * batch_size))


# The original notebook's recipe: Adam, OneCycle peaking at epoch 5 of 24 at the LR the range
# test suggested, pad-crop/flip/cutout 8 plus light colour jitter and grayscale.
SEED = TrainConfig(
    recipe="seed",
    optimizer=OptimizerName.adam,
    max_lr=6.58e-4,
    min_lr=1e-6,
    initial_lr_fraction=0.04,  # OneCycle's default div_factor of 25
    pct_start=5 / 24,
    cycle_momentum=True,  # torch's OneCycle default, as the notebook used it
    weight_decay=1e-4,
    decay_norm=True,
    augment=AugmentConfig(p_jitter=0.5, brightness=0.1, contrast=0.1, saturation=0.1,
                          hue=0.05, p_gray=0.1),
)

# SGD-Nesterov at a high LR with a short warm-up and linear decay, label smoothing, small
# logits and flip TTA. Measured on an H100 (benchmarks/results/gpu): 91.5% at 24 epochs against
# the seed recipe's 89.3%; 90% first reached with a 12-epoch budget; 85.6% after 4 epochs
# (without cutout 85.9%, so cutout costs 0.3 points at 4 epochs; kept for longer budgets).
FAST = TrainConfig(
    recipe="fast",
    optimizer=OptimizerName.sgd,
    max_lr=0.4,
    min_lr=4e-5,
    initial_lr_fraction=0.1,
    pct_start=0.25,
    weight_decay=5e-4,
    label_smoothing=0.2,
    logit_scale=0.125,
    ema_decay=0.0,
    tta=True,
)

# The fast recipe plus tricks of the "How to train your ResNet" series and airbench, each an
# option of its own: frozen BN scales with fast BN shifts, a whitened prep conv, alternating
# flip, multi-crop TTA, identity (dirac) init, a higher LR and lighter augmentation. Chosen on
# 5,000 held-out train images at a 6-epoch budget on an H100 (benchmarks/results/gpu/
# 2026-11-26: sweep-6ep.md, tuning-6ep.md); lookahead averaging (--lookahead-every 5 with BN
# momentum 0.6) did not help there and is off. (Muon's 6-point loss in that sweep was a bug in
# its gradients, fixed since: see express-muon.)
# Test accuracy at a 6-epoch budget: 89.77% (3-seed median; fast needs 8 epochs for 88.8%).
EXPRESS = dataclasses.replace(
    FAST,
    recipe="express",
    max_lr=0.8,
    min_lr=8e-5,
    decay_norm=True,
    bn_frozen_scale=True,
    bn_bias_lr_scale=64.0,
    whiten=True,
    dirac_init=True,
    tta_shifts=True,
    augment=AugmentConfig(pad=2, pad_mode=PadMode.reflect, flip_alternate=True, cutout_size=0,
                          cutout_count=0),
)

# express with Muon (Newton-Schulz orthogonalised momentum, 0.6) on the conv filters at peak LR
# 0.24; BN shifts and the head keep SGD. Chosen on held-out train images (2-core CPU, 1 seed):
# 33.5% -> 64.6% after 2 epochs on 10,000 images, 59.1% -> 80.6% after 4 on 14,000
# (benchmarks/results/cpu/muon-proxy-*.md). Full data, 6-epoch budget, 2-core CPU, 3 seeds: 90%
# at epochs 6 / 5 / 6, final 90.97% median (express on that CPU: 90% at epoch 8;
# benchmarks/results/cpu/time-to-accuracy-express-muon-6ep-cpu*.md).
EXPRESS_MUON = dataclasses.replace(EXPRESS, recipe="express-muon", muon_lr=0.24)

# express-muon with progressive resizing: train images grow from 20 to 32 px over the first
# 60% of the epochs (at 5 epochs: 20, 24, 28, 32, 32 px), so a 5-epoch run trains on 0.74 of
# the FLOPs of five 32 px epochs. On held-out train images (15,000 train, 5,000 held out, 1
# seed, multi-crop; benchmarks/results/cpu/resize-proxy-15k.md): 5 epochs 85.64% with
# resizing, 85.36% without, 83.76% for 4 epochs at 32 px (about the same train time); six
# epochs at 32 px (express-muon's budget) 86.02%.
EXPRESS_PROGRESSIVE = dataclasses.replace(EXPRESS_MUON, recipe="express-progressive",
                                          train_size_start=20, train_size_ramp=0.6)

RECIPES: dict[str, TrainConfig] = {"seed": SEED, "fast": FAST, "express": EXPRESS,
                                   "express-muon": EXPRESS_MUON,
                                   "express-progressive": EXPRESS_PROGRESSIVE}
DEFAULT_RECIPE = "express-progressive"


# Settings that follow the epoch budget, per recipe, as data: rows of (from this many epochs,
# changes in `replace_nested` form). `recipe(name, epochs=N)` applies every row that N reaches,
# in order; a budget below the first row keeps the recipe as written above.
#
# express-progressive from 12 epochs: Muon at half its LR (0.12) on filters rescaled to a fixed
# norm before each step (--muon-normalize-filters), so its fixed-size steps keep their size
# relative to the filters, which otherwise grow 9-11x over 24 epochs. Chosen on held-out train
# images (24 epochs, 45,000 train, 5,000 held out, seed 0, multi-crop): 92.30% (CPU) against the
# recipe's 91.94% (H200). Confirmed on the test set (H200, 2026-11-29, 3 seeds; benchmarks/
# results/gpu/2026-11-29/long-median-24ep.md): 92.56 / 92.24 / 92.55%, median 92.55%, against
# 92.07 / 92.34 / 92.11%, median 92.11%, without the row (2026-11-28). At 12 epochs on held-out
# images (25,000 train, 5,000 held out, 2 seeds, CPU; benchmarks/results/cpu/long-12ep-25k.md):
# 90.84% median against 89.98% without (+1.04 and +0.68 by seed); normalized filters at LR 0.24
# 90.32% (median of 2), LR 0.12 on raw filters 89.52% (seed 0). Confirmed on the test set at
# 12 epochs (all the data, CPU, 2026-11-30; benchmarks/results/cpu/median-express-progressive-
# 12ep.md): 92.01 / 92.00 / 91.94%, median 92.00%, against 91.66 / 91.63 / 91.49%, median
# 91.63%, without the row (+0.35, +0.37 and +0.45 by seed). Normalized filters at Muon's own
# LR lost at 24 epochs (test set, CPU, seed 0: 91.85% against 92.14%), at LR 0.08 a 12-epoch
# proxy lost 0.36. On all the data held out (45,000 train, 12 epochs, seed 0, CPU; benchmarks/
# results/cpu/long-ablation-12ep-45k-seed0.md): the row 91.58%, LR 0.24 on normalized filters
# 90.96%, LR 0.12 on raw filters 91.18%. Budgets from 7 to 11
# epochs keep the recipe, as 6 epochs do (90.55% median, H200). On held-out proxies (25,000
# train, 2 seeds, CPU; benchmarks/results/cpu/long-{8,10}ep-25k*.md) the row gained less there:
# +0.22 median at 8 epochs (a tie and +0.44) and at 10 (+0.16, +0.28), against +0.86 at 12; on
# the test set at 10 epochs (all the data, CPU, 2 seeds; benchmarks/results/cpu/median-express-
# progressive-with-row-10ep.md) +0.08: 91.75% median against 91.67% (+0.04, +0.12 by seed).
# Tried and not rows: airbench's pad 4 + cutout 12 (24 epochs held out, H200, seed 0: 92.04%
# against 91.94%, inside one seed's noise; lost 0.58-1.52 points on 12-epoch CPU proxies),
# lookahead (+0.08 on the 25,000-image proxy), data selection (--select-fraction 0.5 of 1024 at
# twice the epochs: -0.62 on that proxy).
BUDGET_SETTINGS: dict[str, tuple[tuple[int, dict[str, object]], ...]] = {
    "express-progressive": ((12, {"muon_lr": 0.12, "muon_normalize_filters": True}),),
}


def recipe(name: str, **overrides: object) -> TrainConfig:
    """A named recipe at its budget (`epochs`, default 24) with the budget's settings
    (BUDGET_SETTINGS), then `overrides` replacing settings (nested configs included)."""
    require(name in RECIPES, f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return dataclasses.replace(at_budget(name, overrides.get("epochs", RECIPES[name].epochs)),
                               **overrides)


def budget_rows(name: str, epochs: int) -> tuple[dict[str, object], ...]:
    """The changes of the BUDGET_SETTINGS rows of recipe `name` that an `epochs`-epoch run
    reaches, in order."""
    return tuple(changes for from_epochs, changes in BUDGET_SETTINGS.get(name, ())
                 if epochs >= from_epochs)


def at_budget(name: str, epochs: int) -> TrainConfig:
    """Recipe `name` with the BUDGET_SETTINGS rows that an `epochs`-epoch run reaches."""
    config = RECIPES[name]
    for changes in budget_rows(name, epochs):
        config = replace_nested(config, **changes)
    return config


def replace_nested(config: TrainConfig, **changes: object) -> TrainConfig:
    """`dataclasses.replace` that also accepts loader__X / augment__X keys for nested fields."""
    nested: dict[str, dict[str, object]] = {}
    flat = {}
    for key, value in changes.items():
        if "__" in key:
            outer, inner = key.split("__", 1)
            nested.setdefault(outer, {})[inner] = value
        else:
            flat[key] = value
    for outer, inner_changes in nested.items():
        flat[outer] = dataclasses.replace(getattr(config, outer), **inner_changes)
    return dataclasses.replace(config, **flat)
