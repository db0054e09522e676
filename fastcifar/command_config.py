"""Frozen settings of the commands besides train (lr-find, evaluate, predict, export and the
benchmarks), checked on creation."""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path

from fastcifar.config import (
    DEFAULT_RECIPE,
    SEED,
    AugmentConfig,
    Device,
    LoaderConfig,
    Precision,
    TrainConfig,
    budget_rows,
    recipe,
    require_seed,
)
from fastcifar.errors import FastCifarError, require


@dataclass(frozen=True)
class LrFindConfig:
    """Settings of `fastcifar lr-find` (the range test) for the training run in `train`.

    `train` is the run the LR is found for, usually `recipe(name)` with the user's changes: its
    model settings, optimiser, weight decay and parameter groups, label smoothing, logit scale,
    augmentation, loader, device, precision and seed are used as they are; only the LR is swept.
    """

    train: TrainConfig = field(default_factory=lambda: recipe(DEFAULT_RECIPE))
    start_lr: float = 1e-7
    end_lr: float = 10.0
    iterations: int = 200
    mode: str = "exp"  # exp | linear
    out_dir: Path = Path("runs/lr-find")

    def __post_init__(self) -> None:
        require(0 < self.start_lr < self.end_lr, "need 0 < start LR < end LR")
        require(self.iterations >= 10, "the range test needs at least 10 iterations")
        require(self.mode in ("exp", "linear"), f"mode must be exp or linear, got {self.mode}")


# Test-time augmentation modes, as weights files store them: none; flip (the image and its
# mirror); multicrop (both, plus the 1-px up-left and down-right shifts: 6 passes).
TTA_MODES = ("none", "flip", "multicrop")


def tta_flags(mode: str) -> tuple[bool, bool]:
    """(tta, shifts) for `predict_logits` and TrainConfig from a TTA mode's name."""
    return mode in ("flip", "multicrop"), mode == "multicrop"


@dataclass(frozen=True)
class EvaluateConfig:
    """Settings of `fastcifar evaluate`: score saved best weights on the test set."""

    weights: Path  # a weights file (.safetensors) written by training
    loader: LoaderConfig = field(default_factory=LoaderConfig)  # data_dir, batch size, test_subset
    tta: str | None = None  # one of TTA_MODES; None: the mode stored with the weights
    out_dir: Path | None = None  # None: a `<weights name>-eval` folder beside the weights
    device: Device = Device.auto
    precision: Precision = Precision.auto
    channels_last: bool = True
    misclassified_count: int = 20  # images in the misclassified grid

    def __post_init__(self) -> None:
        require(Path(self.weights).is_file(), f"weights file not found: {self.weights}")
        require(self.tta is None or self.tta in TTA_MODES,
                 f"TTA mode must be one of {', '.join(TTA_MODES)}, got {self.tta!r}")
        require(self.misclassified_count >= 0, "misclassified count must be >= 0")

    @property
    def output_dir(self) -> Path:
        """Where the figures and the JSON go."""
        weights = Path(self.weights)
        return Path(self.out_dir) if self.out_dir is not None else (
            weights.parent / f"{weights.stem}-eval")


# The weights `fastcifar predict` uses unless given others: package data (weights/ in a checkout).
SHIPPED_WEIGHTS = Path(str(importlib.resources.files("fastcifar.shipped")
                           / "custresnet-cifar10.safetensors"))


@dataclass(frozen=True)
class PredictConfig:
    """Settings of `fastcifar predict`: the most likely classes of a user's images."""

    paths: tuple[Path, ...]  # image files and folders (a folder: the image files directly in it)
    weights: Path = SHIPPED_WEIGHTS  # a weights file (.safetensors) written by training
    top_k: int = 3  # classes reported per image
    keep_going: bool = False  # report unreadable inputs and predict the rest (still a failure)
    device: Device = Device.auto
    batch_size: int = 256  # images per forward pass

    def __post_init__(self) -> None:
        require(len(self.paths) > 0, "give at least one image file or folder")
        require(self.top_k >= 1, f"top-k must be at least 1, got {self.top_k}")
        require(self.batch_size > 0, f"batch size must be positive, got {self.batch_size}")
        if Path(self.weights) == SHIPPED_WEIGHTS and not SHIPPED_WEIGHTS.is_file():
            raise FastCifarError(f"no shipped weights at {SHIPPED_WEIGHTS} (this copy of fastcifar "
                                 "has none): pass --weights FILE.safetensors from `fastcifar train`")
        require(Path(self.weights).is_file(), f"weights file not found: {self.weights}")
        require(Path(self.weights).suffix != ".onnx" or self.device in (Device.auto, Device.cpu),
                f"an .onnx file runs on the CPU (onnxruntime), not on {self.device.value}: drop "
                "--device, or give its .safetensors weights")


@dataclass(frozen=True)
class ExportConfig:
    """Settings of `fastcifar export`: a weights file as an ONNX graph (uint8 images in,
    logits out), checked against PyTorch with onnxruntime on the first test images."""

    weights: Path  # a weights file (.safetensors) written by training
    out: Path  # the .onnx file to write
    tta: str | None = None  # one of TTA_MODES, built into the graph; None: the stored mode
    data_dir: Path = Path("datasets")  # converted data for the check (skipped without it)
    check_images: int = 1000  # first test images scored by both; 0: no check
    tolerance: float = 1e-3  # largest logit difference accepted

    def __post_init__(self) -> None:
        require(Path(self.weights).is_file(), f"weights file not found: {self.weights}")
        require(Path(self.out).suffix == ".onnx", f"the ONNX file's name must end in .onnx, "
                 f"got {self.out}")
        require(self.tta is None or self.tta in TTA_MODES,
                 f"TTA mode must be one of {', '.join(TTA_MODES)}, got {self.tta!r}")
        require(self.check_images >= 0, "check images must be >= 0")


def require_report_path(json_path: Path | None) -> None:
    """A benchmark's Markdown table goes beside its JSON as .md: a --json ending in .md would
    be overwritten by it, and the results lost."""
    require(json_path is None or Path(json_path).suffix.lower() != ".md",
            f"--json {json_path}: the Markdown table is written beside it as .md and would "
            "replace it; give the results file another suffix (.json)")


@dataclass(frozen=True)
class TimeToAccuracyConfig:
    """Settings of `fastcifar benchmark time-to-accuracy`; `train` defaults to the default
    recipe, as the command's does."""

    train: TrainConfig = field(default_factory=lambda: recipe(DEFAULT_RECIPE))
    targets: tuple[float, ...] = (0.90,)
    runs: int = 1  # seeds train.seed .. train.seed + runs - 1
    stop_at_target: bool = False  # stop each run once the highest target is reached
    budgets: tuple[int, ...] = ()  # shortest-budget mode: try these --epochs in order
    json_path: Path | None = None
    command: str = ""
    data_variant: str = "CIFAR-10 (JPEG-75 copy)"
    # Continue an interrupted benchmark run from its last.pt: a CPU run of 24 epochs can outlast
    # a sitting. Its per-epoch train/eval seconds carry over, so the times stay whole.
    resume: Path | None = None

    def __post_init__(self) -> None:
        require_report_path(self.json_path)
        require_seed(self.train.seed + self.runs - 1, "the last run's seed (--seed + --runs - 1)")
        require(bool(self.targets) and all(0 < t <= 1 for t in self.targets),
                 "targets must be accuracies in (0, 1]")
        require(self.resume is None or (self.runs == 1 and not self.budgets),
                 "--resume continues one run: use it without --runs or --budget")
        require(self.runs >= 1, f"runs must be >= 1, got {self.runs}")
        require(all(b > 0 for b in self.budgets), "budgets must be positive epoch counts")
        # Budget rows are applied when the config is built for one --epochs: a --budget run
        # would train every budget with the settings of that one, so its budgets must reach
        # the rows that --epochs reaches (below 12 epochs the default recipe has none).
        if self.budgets:
            self._require_budgets_share_the_settings()

    def _require_budgets_share_the_settings(self) -> None:
        """Every --budget trains with the settings built for --epochs (24 unless given), which
        depend on the budget in some recipes: say which --epochs would serve, if one can."""
        recipe_name, epochs = self.train.recipe, self.train.epochs
        reached = {len(budget_rows(recipe_name, budget)) for budget in self.budgets}
        if reached == {len(budget_rows(recipe_name, epochs))}:
            return
        fix = (f"give --epochs {max(self.budgets)} (they share them)" if len(reached) == 1
               else "run one --epochs per budget instead of --budget")
        raise FastCifarError(f"{recipe_name}'s settings follow its epoch budget, and --budget "
                             f"trains every budget with those of --epochs {epochs}: {fix}")


@dataclass(frozen=True)
class LoaderBenchmarkConfig:
    """Settings of `fastcifar benchmark loader`: train-set throughput of three pipelines."""

    data_dir: Path = Path("datasets")
    workers: int = 0  # loader threads (FFCV) / worker processes (torch); 0: one per CPU core
    batch_size: int = 512
    passes: int = 3  # timed whole passes over the train set, after one warm-up pass
    torchvision_batches: int | None = None  # time torchvision over this many batches per pass
    augment: AugmentConfig = field(default_factory=lambda: SEED.augment)  # the same for all
    seed: int = 0
    jit_startup: bool = True  # also time the first batch in fresh processes, cold/warm JIT cache
    json_path: Path | None = None  # None: return the report without writing it
    command: str = ""  # the command line, recorded in the report
    # Time only fastcifar's FFCV path (a blocking copy per batch) against its device-resident
    # path (--data-on-device), both handing over normalised batches on `device`.
    compare_on_device: bool = False
    device: Device = Device.auto  # used by compare_on_device; the other pipelines run on the CPU
    max_batches: int | None = None  # time every pipeline over this many batches per pass

    def __post_init__(self) -> None:
        require_report_path(self.json_path)
        require_seed(self.seed)
        require(self.batch_size > 0, f"batch size must be positive, got {self.batch_size}")
        require(self.workers >= 0, f"workers must be >= 0, got {self.workers}")
        require(self.passes >= 1, f"passes must be >= 1, got {self.passes}")
        require(self.max_batches is None or self.max_batches > 0,
                 f"max batches must be positive, got {self.max_batches}")
        require(self.compare_on_device or self.device == Device.auto,
                 "--device is for --compare-on-device (the other pipelines run on the CPU)")
        require(self.torchvision_batches is None or self.torchvision_batches > 0,
                 f"torchvision batches must be positive, got {self.torchvision_batches}")
