"""LR range test (torch-lr-finder) on the real FFCV train loader and the training device path.

The LR grows each step from `start_lr` to `end_lr`; the suggestion is the LR where the smoothed
loss falls fastest, with the min-loss LR / 10 as a second opinion. Model and optimiser are
reset. torch-lr-finder sets one LR for every parameter group; each step applies a group's
`lr_scale` on top (express: BN shifts x64), so the sweep steps the groups as training does.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch_lr_finder import LRFinder, TrainDataLoaderIter

from fastcifar.atomic import atomic_path, check_can_write, file_set, write_json
from fastcifar.checkpoint import config_to_dict, machine_description, seed_everything
from fastcifar.command_config import LrFindConfig
from fastcifar.config import TrainConfig
from fastcifar.data.loaders import build_loaders, first_train_images
from fastcifar.device import DeviceStep, PrecisionPlan, plan_precision, select_device
from fastcifar.errors import FastCifarError
from fastcifar.model import build_model
from fastcifar.optim import make_optimizer

StepProgress = Callable[[int, int], None]  # (steps done, total steps)

# Like torch-lr-finder's own plot, ignore the first steps for the suggestion: they are noisy.
SKIP_START = 10


@dataclass(frozen=True)
class LrFindResult:
    """The range test's history (LR per step, smoothed loss) and what it suggests."""

    lrs: list[float]
    losses: list[float]  # exponentially smoothed (factor 0.05) training loss
    suggested_lr: float  # steepest descent of the smoothed loss
    min_loss_lr_over_10: float  # second opinion: the LR of the lowest loss, divided by 10
    stopped_early: bool  # the loss passed 5x its best and the test stopped
    plot_path: Path
    history_path: Path  # CSV: step, lr, loss
    json_path: Path  # history, suggestions, config, device
    device: str
    precision: str
    seconds: float


class DeviceBatches(TrainDataLoaderIter):
    """Feeds torch-lr-finder normalised device batches from a loader of uint8 batches.

    Restarts the loader when it runs out (more steps than an epoch), as torch-lr-finder's
    own iterator does, and reports each batch through `progress`.
    """

    def __init__(self, loader: Iterable, device_step: DeviceStep, total: int,
                 progress: StepProgress | None = None) -> None:
        super().__init__(loader, auto_reset=True)
        self.device_step = device_step
        self.total = total
        self.progress = progress
        self.done = 0

    def inputs_labels_from_batch(self, batch_data) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch_data[0], batch_data[1]
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)
        return self.device_step(images, labels)

    def close(self) -> None:
        """Stop the loader's worker thread (FFCV) now rather than at garbage collection."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


def suggest_lrs(lrs: list[float], losses: list[float]) -> tuple[float, float]:
    """(steepest-descent LR, min-loss LR / 10) of a smoothed range-test curve.

    The steepest point is searched between the first SKIP_START steps (noise) and the lowest
    loss (past it the loss only climbs); the gradient is taken against log LR, which is the
    step index for an exponential sweep, as in torch-lr-finder's `plot`.
    """
    lrs_array, losses_array = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    finite = np.isfinite(losses_array)
    if finite.sum() < 3:
        raise FastCifarError("the range test produced fewer than 3 finite losses: lower "
                             "--start-lr or raise --iters")
    lrs_array, losses_array = lrs_array[finite], losses_array[finite]
    lowest = int(losses_array.argmin())
    stop = lowest + 1
    start = SKIP_START if stop - SKIP_START >= 3 else 0
    if stop - start < 3:  # the loss never fell: fall back to the whole curve
        start, stop = 0, len(losses_array)
    window = slice(start, stop)
    slopes = np.gradient(losses_array[window], np.log(lrs_array[window]))
    suggested = float(lrs_array[window][int(slopes.argmin())])
    return suggested, float(lrs_array[lowest] / 10)


@contextlib.contextmanager
def scaled_group_lrs(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """While open, each optimiser step runs every group at its LR x its `lr_scale`, and the
    LRs are put back after it: torch-lr-finder drives one LR, the recipe's ratios still hold."""
    swept: list[float] = []

    def scale(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        swept[:] = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * group.get("lr_scale", 1.0)

    def restore(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        for group, lr in zip(optimizer.param_groups, swept, strict=True):
            group["lr"] = lr

    handles = [optimizer.register_step_pre_hook(scale),
               optimizer.register_step_post_hook(restore)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_range_test(model: nn.Module, optimizer: torch.optim.Optimizer, loader: Iterable,
                   device_step: DeviceStep, plan: PrecisionPlan, config: LrFindConfig,
                   progress: StepProgress | None = None) -> tuple[list[float], list[float]]:
    """torch-lr-finder's range test over `loader`; model and optimiser are reset afterwards.

    Returns (LR per step, smoothed loss per step); the test stops early when the loss diverges.
    """
    device = device_step.device
    amp = ({"amp_backend": "torch",
            "amp_config": {"device_type": device.type, "dtype": plan.autocast_dtype},
            "grad_scaler": torch.amp.GradScaler(device.type, enabled=plan.use_grad_scaler)}
           if plan.autocast_dtype is not None else {})
    criterion = nn.CrossEntropyLoss(label_smoothing=config.train.label_smoothing)
    finder = LRFinder(model, optimizer, criterion, device=device, **amp)
    batches = DeviceBatches(loader, device_step, config.iterations, progress)
    try:
        # torch-lr-finder draws a tqdm bar and prints; the caller reports through `progress`.
        with (contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()),
              warnings.catch_warnings(), scaled_group_lrs(optimizer)):
            warnings.filterwarnings("ignore", message=".*get_last_lr.*")
            finder.range_test(batches, start_lr=config.start_lr, end_lr=config.end_lr,
                              num_iter=config.iterations, step_mode=config.mode)
    finally:
        batches.close()
        finder.reset()  # the weights, BN statistics and optimiser state from before the test
    return [float(lr) for lr in finder.history["lr"]], [float(x) for x in finder.history["loss"]]


def train_settings(config: LrFindConfig) -> TrainConfig:
    """The training run's config with the LR at the sweep's start (the test sets it per step).

    Muon is off: the sweep drives one optimiser's LR, so with a Muon recipe it finds the SGD
    LR (`--max-lr`, which then steps the BN shifts and the head) and Muon keeps `--muon-lr`.
    It steps on whole batches, so a run that keeps part of each (--select-fraction) is refused.
    """
    if config.train.select_fraction < 1:
        raise FastCifarError("the LR range test steps on whole batches, without the selection "
                             "proxy: with --select-fraction give --max-lr a number")
    return dataclasses.replace(config.train, max_lr=config.start_lr, min_lr=config.start_lr,
                               muon_lr=0.0, muon_normalize_filters=False, make_plots=False)


def _write_history(out_dir: Path, lrs: list[float], losses: list[float]) -> Path:
    path = out_dir / "lr_find.csv"
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "lr", "loss"])
        writer.writerows((step, f"{lr:.6g}", f"{loss:.6f}")
                         for step, (lr, loss) in enumerate(zip(lrs, losses, strict=True), 1))
    return path


LR_FIND_FILES = ("png", "csv", "json")  # lr_find.* in the output folder


def lr_find(config: LrFindConfig, progress: StepProgress | None = None) -> LrFindResult:
    """Run the range test on the train loader; write lr_find.{png,csv,json} into config.out_dir."""
    from fastcifar.plots import plot_lr_finder

    started = time.perf_counter()
    check_can_write(*(Path(config.out_dir) / f"lr_find.{suffix}" for suffix in LR_FIND_FILES))
    settings = train_settings(config)
    device = select_device(settings.device)
    plan = plan_precision(settings.precision, device)
    seed_everything(settings.seed)
    loaders = build_loaders(settings.loader, settings.augment, settings.seed, device=device)
    device_step = DeviceStep(loaders.metadata.mean, loaders.metadata.std, device,
                             settings.channels_last)
    # A whitened prep conv is fitted on train images, as in train.
    whitening_images = (first_train_images(loaders, settings.loader, settings.seed, device_step)
                        if settings.whiten or settings.whiten_init else None)
    model = build_model(settings, device, whitening_images,
                        num_classes=len(loaders.metadata.class_names))
    optimizer = make_optimizer(model, settings)
    lrs, losses = run_range_test(model, optimizer, loaders.train, device_step, plan, config,
                                 progress)
    if not lrs or not math.isfinite(losses[0]):
        raise FastCifarError("the range test's first loss is not finite: check the data, or "
                             "use --precision fp32")
    suggested, second_opinion = suggest_lrs(lrs, losses)
    stopped_early = len(lrs) < config.iterations

    out_dir = Path(config.out_dir)
    with file_set():  # lr_find.png, .csv and .json: all new or none
        plot_path = plot_lr_finder(lrs, losses, suggested, out_dir / "lr_find.png",
                                   min_loss_lr_over_10=second_opinion)
        history_path = _write_history(out_dir, lrs, losses)
        json_path = out_dir / "lr_find.json"
        seconds = time.perf_counter() - started
        write_json(json_path, {
            "suggested_lr": suggested, "min_loss_lr_over_10": second_opinion,
            "stopped_early": stopped_early, "batch_size": settings.loader.batch_size,
            "recipe": settings.recipe,
            "lrs": lrs, "losses": losses, "config": config_to_dict(config),
            "device": str(device), "precision": plan.name, "seconds": seconds,
            "hardware": machine_description(device),
        })
    return LrFindResult(lrs, losses, suggested, second_opinion, stopped_early, plot_path,
                        history_path, json_path, str(device), plan.name, seconds)
