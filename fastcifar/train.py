"""The training loop: train step, evaluation, checkpoints/resume, per-epoch stats."""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as functional
from torch import nn

from fastcifar.atomic import write_json
from fastcifar.checkpoint import (
    load_checkpoint,
    read_weights_file,
    restore_rng_state,
    rng_state,
    save_checkpoint,
    save_weights_file,
)
from fastcifar.config import Precision, TrainConfig
from fastcifar.data.loaders import Loaders, build_loaders
from fastcifar.device import (
    DeviceStep,
    PrecisionChoice,
    PrecisionPlan,
    autocast,
    measure_cpu_precision,
    measures_precision,
    plan_precision,
    select_device,
)
from fastcifar.distributed import (
    Distributed,
    all_reduce_max,
    all_reduce_sum,
    broadcast_from_main,
    init_distributed,
    ranks_agree,
    share_run_dir,
)
from fastcifar.errors import FastCifarError
from fastcifar.model import (
    CustResNet,
    dirac_init_,
    plain_state_dict,
    whiten_prep_,
    whitening_init_,
    zero_init_residuals_,
)
from fastcifar.optim import Lookahead, Optimizers

# ---------------------------------------------------------------- stats and callbacks


@dataclass(frozen=True)
class EpochStats:
    """One row of the per-epoch table."""

    epoch: int  # 1-based
    lr: float  # LR of the epoch's last step
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    train_seconds: float  # this epoch's training steps
    eval_seconds: float  # this epoch's evaluations (the epoch end's and any in the epoch)
    images_per_second: float  # training images per second of train time
    steps: int  # optimiser steps so far
    holdout_accuracy: float | None = None  # on the held-out train images (--holdout)


@dataclass(frozen=True)
class Evaluation:
    """One pass over the test set, placed on the run's clock (which starts at the first step)."""

    epochs: float  # epochs trained when it ran: fractional for one inside an epoch
    steps: int  # optimiser steps trained when it ran
    test_loss: float
    test_accuracy: float
    train_seconds: float  # training time before it, all epochs so far
    eval_seconds: float  # evaluation time up to its end, itself included
    holdout_accuracy: float | None = None  # on the held-out train images (--holdout)


def epoch_end_evaluations(history: list[EpochStats]) -> list[Evaluation]:
    """The evaluations a run without in-epoch evaluations made: one per epoch end."""
    evaluations, train_seconds, eval_seconds = [], 0.0, 0.0
    for row in history:
        train_seconds += row.train_seconds
        eval_seconds += row.eval_seconds
        evaluations.append(Evaluation(row.epoch, row.steps, row.test_loss, row.test_accuracy,
                                      train_seconds, eval_seconds, row.holdout_accuracy))
    return evaluations


@dataclass
class TrainResult:
    """What a run produced: the per-epoch stats and where its files are."""

    history: list[EpochStats]
    run_dir: Path
    best_weights: Path | None  # the best test pass's weights (chosen on the test set)
    best_accuracy: float
    warmup_seconds: float  # one-off: loader JIT, torch.compile, cudnn autotune (all sittings)
    lr_per_step: list[float] = field(default_factory=list)
    reached_target: bool = False
    final_model: nn.Module | None = None  # the evaluated model (EMA when kept) after the run
    evaluations: list[Evaluation] = field(default_factory=list)  # every test pass, in order
    final_weights: Path | None = None  # the weights at the end of the run
    plan: PrecisionPlan | None = None  # the precision trained in (measured when auto on CPU)
    precision_images_per_second: dict[str, float] = field(default_factory=dict)  # when measured

    @property
    def final_accuracy(self) -> float:
        """Test accuracy at the end of the run (the last epoch's evaluation)."""
        return self.history[-1].test_accuracy


class TrainCallbacks:
    """Hooks through which the loop reports progress; the CLI subclasses it to draw."""

    def on_train_start(self, config: TrainConfig, steps_per_epoch: int, device: torch.device,
                       precision: str, run_dir: Path) -> None:
        """Called once, after set-up."""

    def on_step(self, epoch: int, step: int, steps_per_epoch: int) -> None:
        """Called after each optimiser step (epoch 1-based, step within the epoch 1-based)."""

    def on_epoch(self, stats: EpochStats) -> None:
        """Called after each epoch's evaluation."""

    def on_evaluation(self, evaluation: Evaluation) -> None:
        """Called after each evaluation inside an epoch (see `TrainConfig.eval_every_steps`)."""

    def on_precision(self, choice: PrecisionChoice) -> None:
        """Called once `--precision auto` on the CPU has timed fp32 and bf16 (first batch)."""


class TrainingInterrupted(FastCifarError):
    """SIGINT/SIGTERM stopped training at a step boundary after a checkpoint was saved."""

    def __init__(self, signal_number: int, checkpoint: Path, how_to_continue: str = "") -> None:
        self.signal_number = signal_number
        self.exit_code = 128 + signal_number
        self.checkpoint = checkpoint
        how_to_continue = how_to_continue or f"continue with the same options plus `--resume {checkpoint}`"
        super().__init__(f"interrupted; checkpoint saved to {checkpoint}: {how_to_continue}")


# ---------------------------------------------------------------- reproducibility and records


def seed_everything(seed: int) -> None:
    """Python, numpy and torch RNGs; the loader order and augmentation take the seed directly."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_record(config: TrainConfig, device: torch.device, precision: str) -> dict:
    """Config, versions, hardware and git commit: stored with every run and checkpoint."""
    import importlib.metadata

    import numba

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "config": config_to_dict(config),
        # str(): torch.__version__ is a str subclass that torch.load(weights_only) refuses.
        "versions": {"torch": str(torch.__version__), "ffcv": importlib.metadata.version("ffcv"),
                     "numba": numba.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "hardware": machine_description(device),
        "precision": precision,
        "git_commit": commit or None,
    }


def machine_description(device: torch.device | None = None) -> dict:
    """CPU model and core count, memory, and the GPU name when one is used."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    description = {"cpu": cpu, "cpu_cores": len(os.sched_getaffinity(0)),
                   "platform": platform.platform()}
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        description["memory_gib"] = round(pages / 2**30, 1)
    except (ValueError, OSError):
        pass
    if device is not None and device.type == "cuda":
        description["gpu"] = torch.cuda.get_device_name(device)
    return description


def config_to_dict(config: TrainConfig) -> dict:
    """JSON-friendly `asdict` (paths and enums as strings)."""
    def plain(value: object) -> object:
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        if isinstance(value, Path):
            return str(value)
        if hasattr(value, "value"):
            return value.value
        return value

    return plain(asdict(config))


def weights_metadata(config: TrainConfig, record: dict, loaders: Loaders,
                     evaluation: Evaluation, which: str) -> dict:
    """The metadata header of a weights file train writes (`which`: "best" or "final").

    What predict/evaluate need (classes, mean/std, logit scale, TTA mode) and what a person
    needs to trust the file: recipe, the accuracy and when it was measured, data, commit.
    """
    metadata = loaders.metadata
    source = metadata.source
    data_variant = f"{Path(str(source.get('path') or '?')).name} ({source.get('kind', '?')})"
    if loaders.train_count != metadata.train_count:
        data_variant += f", first {loaders.train_count:,} of {metadata.train_count:,} train images"
    return {
        "class_names": list(metadata.class_names), "mean": list(metadata.mean),
        "std": list(metadata.std), "logit_scale": config.logit_scale,
        "tta": tta_mode(config.tta, config.tta_shifts),
        "weights": which,
        "recipe": config.recipe,
        "accuracy": evaluation.test_accuracy,  # on the test set, with the TTA mode above
        "accuracy_note": ("the best test pass of the run: chosen on the test set" if which == "best"
                          else "the test pass at the end of the run"),
        "test_images": loaders.test_count,
        "epochs": evaluation.epochs, "steps": evaluation.steps,
        "data_variant": data_variant, "data_source": source,
        "git_commit": record["git_commit"], "precision": record["precision"],
        "config": record["config"], "versions": record["versions"], "hardware": record["hardware"],
    }


# ---------------------------------------------------------------- model, step, evaluation


def build_model(config: TrainConfig, device: torch.device,
                whitening_images: torch.Tensor | None = None, num_classes: int = 10) -> nn.Module:
    """CustResNet on the device, channels-last when asked, BN settings and initialisation set.

    `num_classes` is the data's (its metadata's class names), so the saved weights fit it.
    `whitening_images` (normalised train images) fit `whiten` / `whiten_init`.
    """
    model = CustResNet(num_classes=num_classes, dropout=config.dropout,
                       logit_scale=config.logit_scale)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum, module.eps = config.bn_momentum, config.bn_eps
            module.weight.requires_grad_(not config.bn_frozen_scale)  # stays a parameter at 1
    if config.dirac_init:
        dirac_init_(model)
    needs_images = config.whiten or config.whiten_init
    if needs_images and whitening_images is None:
        raise FastCifarError("whitening needs train images to fit")
    if config.whiten_init:
        whitening_init_(model.prep.layers[0], whitening_images)
    if config.whiten:
        whiten_prep_(model, whitening_images, config.whiten_eps)
    if config.zero_init_residual:
        zero_init_residuals_(model)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    return model.to(device=device, memory_format=memory_format)


def _flip_averaged(model: nn.Module, images: torch.Tensor, tta: bool) -> torch.Tensor:
    logits = model(images)
    return (logits + model(torch.flip(images, dims=[3]))) / 2 if tta else logits


def tta_mode(tta: bool, shifts: bool) -> str:
    """The TTA mode's name, as weights files store it: none, flip or multicrop."""
    return "multicrop" if tta and shifts else "flip" if tta else "none"


def tta_flags(mode: str) -> tuple[bool, bool]:
    """(tta, shifts) for `predict_logits` from a stored TTA mode's name."""
    return mode in ("flip", "multicrop"), mode == "multicrop"


def predict_logits(model: nn.Module, images: torch.Tensor, tta: bool,
                   shifts: bool = False) -> torch.Tensor:
    """Logits, averaged with those of the mirrored images when `tta` is set.

    `shifts` (multi-crop) adds the flip-averaged logits of the image moved 1 px up-left and
    1 px down-right (reflected border), weighted 0.5 / 0.25 / 0.25: 6 forward passes.
    """
    logits = _flip_averaged(model, images, tta)
    if not shifts:
        return logits
    padded = functional.pad(images, (1, 1, 1, 1), mode="reflect")
    height, width = images.shape[2], images.shape[3]
    up_left = _flip_averaged(model, padded[:, :, 2:height + 2, 2:width + 2], tta)
    down_right = _flip_averaged(model, padded[:, :, :height, :width], tta)
    return 0.5 * logits + 0.25 * up_left + 0.25 * down_right


@torch.no_grad()
def evaluate(model: nn.Module, loader, device_step: DeviceStep, plan: PrecisionPlan,
             tta: bool, shifts: bool = False) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over the loader (eval mode, no gradients)."""
    model.eval()
    total_loss = torch.zeros((), device=device_step.device)
    correct = torch.zeros((), device=device_step.device, dtype=torch.long)
    count = 0
    for images, labels in loader:
        images, labels = device_step(images, labels)
        with autocast(device_step.device, plan):
            logits = predict_logits(model, images, tta, shifts)
        total_loss += functional.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
        count += len(labels)
    # One host-device sync for the whole pass.
    return total_loss.item() / max(count, 1), correct.item() / max(count, 1)


# ---------------------------------------------------------------- checkpoints


def _checkpoint_state(model, optimizers: Optimizers, scaler, ema, lookahead, epoch, steps,
                      history, evaluations, record, best_accuracy, warmup_seconds: float,
                      lr_per_step: list[float], partial: dict | None = None) -> dict:
    return {
        "partial": partial,  # progress inside an interrupted epoch
        "lr_per_step": list(lr_per_step),  # of every sitting: a resumed run plots them all
        "warmup_seconds": warmup_seconds,  # of every sitting so far
        "evaluations": [asdict(evaluation) for evaluation in evaluations],
        "model": model.state_dict(),
        **optimizers.state_dict(),  # optimizer, scheduler (+ muon, muon_scheduler)
        "scaler": scaler.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "lookahead": lookahead.state_dict() if lookahead is not None else None,
        "epoch": epoch,  # completed epochs
        "steps": steps,
        "history": [asdict(stats) for stats in history],
        "best_accuracy": best_accuracy,
        "rng": rng_state(),  # tensors and plain values: loadable with weights_only
        **record,
    }


# Settings that may differ between a run and its resumption (they do not change the maths).
_RESUMABLE_DIFFERENCES = {"resume", "out_dir", "weights_dir", "make_plots", "stop_at_accuracy",
                          "local_rank", "device", "eval_every_steps", "eval_steps_epochs"}


def _check_resume_compatible(saved: dict, config: TrainConfig) -> None:
    current = config_to_dict(config)
    differing = sorted(key for key in current if key not in _RESUMABLE_DIFFERENCES
                       and saved.get(key) != current[key])
    if differing:
        raise FastCifarError("checkpoint was made with other settings (" + ", ".join(differing)
                             + "): resume with the same options or start a new run")


def find_latest_checkpoint(out_dir: Path) -> Path:
    """`--resume auto`: the newest `last.pt` of any run folder in `out_dir`."""
    candidates = sorted(Path(out_dir).glob("*/last.pt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FastCifarError(f"--resume auto: no checkpoint (*/last.pt) under {out_dir}")
    return candidates[-1]


# ---------------------------------------------------------------- signals


class _StopRequest:
    """SIGINT/SIGTERM set a flag checked at step boundaries; a second SIGINT exits at once."""

    def __init__(self) -> None:
        self.signal_number: int | None = None

    def handle(self, signal_number: int, frame) -> None:
        if self.signal_number is not None:
            raise KeyboardInterrupt  # second signal: stop now; checkpoints are atomic
        self.signal_number = signal_number


@contextmanager
def _stop_on_signals(enabled: bool) -> Iterator[_StopRequest]:
    request = _StopRequest()
    if not enabled:
        yield request
        return
    previous = {number: signal.signal(number, request.handle)
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


# ---------------------------------------------------------------- the loop


def _warm_up(model: nn.Module, trained_model: nn.Module, config: TrainConfig,
             device: torch.device, plan: PrecisionPlan, device_step: DeviceStep,
             sample: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Forward/backward and an eval pass on the real model, then restore its state.

    torch.compile and cudnn autotuning happen here, off the clock; the weights and BN
    statistics are put back, so the run is the same as without the warm-up.
    """
    if device.type != "cuda" and not config.compile:
        return
    snapshot = copy.deepcopy(model.state_dict())
    images, labels = device_step(*sample)
    trained_model.train()
    for _ in range(2):
        with autocast(device, plan):
            loss = functional.cross_entropy(trained_model(images), labels)
        loss.backward()
    model.zero_grad(set_to_none=True)
    trained_model.eval()
    with torch.no_grad(), autocast(device, plan):
        predict_logits(trained_model, images, config.tta)
    model.load_state_dict(snapshot)
    trained_model.train()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _first_train_images(loaders: Loaders, config: TrainConfig, device_step: DeviceStep,
                        count: int = 5120) -> torch.Tensor:
    """The first `count` train images, unaugmented and normalised (for the whitening init)."""
    from fastcifar.data.loaders import make_loader, test_pipeline

    count = min(count, loaders.train_count)
    loader = make_loader(loaders.metadata.train_path, test_pipeline(), config.loader, False,
                         np.arange(count), config.seed)
    return torch.cat([device_step(images, labels)[0].float().cpu() for images, labels in loader])


DIVERGENCE_CHECK_STEPS = 16  # also how often torchrun's ranks agree on a stop


def _stop_agreed(stop: _StopRequest, steps: int, distributed: Distributed,
                 device: torch.device) -> bool:
    """Whether to stop after this step: on a signal to this process or, under torchrun, to any
    rank; ranks compare every DIVERGENCE_CHECK_STEPS steps, so they stop at the same step."""
    if distributed.world_size == 1:
        return stop.signal_number is not None
    if steps % DIVERGENCE_CHECK_STEPS:
        return False
    agreed = all_reduce_max(stop.signal_number or 0, distributed, device)
    if agreed and stop.signal_number is None:
        stop.signal_number = agreed  # another rank's signal stops this one too
    return bool(agreed)


def _diverged(epoch: int, last_checkpoint: Path) -> FastCifarError:
    return FastCifarError(
        f"training diverged (non-finite loss) in epoch {epoch + 1}; the last good checkpoint "
        f"is {last_checkpoint}: lower --max-lr or use bf16/fp32")


def _make_run_dir(config: TrainConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(config.out_dir) / f"{stamp}-{config.recipe}-s{config.seed}"
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = Path(config.out_dir) / f"{stamp}-{config.recipe}-s{config.seed}-{suffix}"
    try:
        run_dir.mkdir(parents=True)
    except OSError as error:
        raise FastCifarError(f"cannot create run folder {run_dir}: {error.strerror}") from error
    return run_dir


def train(config: TrainConfig, callbacks: TrainCallbacks | None = None,
          loaders: Loaders | None = None, handle_signals: bool = True) -> TrainResult:
    """Train CustResNet with `config`; returns per-epoch stats, writes the run folder and weights."""
    callbacks = callbacks or TrainCallbacks()
    device = select_device(config.device, config.local_rank)
    plan = plan_precision(config.precision, device)
    distributed = init_distributed(config, device)
    seed_everything(config.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cudnn pick the fastest kernels

    resume_state = None
    if config.resume is not None:
        resume_state = load_checkpoint(Path(config.resume))
        _check_resume_compatible(resume_state.get("config", {}), config)

    loaders = loaders or build_loaders(config.loader, config.augment, config.seed, device=device)
    steps_per_epoch = len(loaders.train)
    if steps_per_epoch == 0:
        raise FastCifarError("the train loader yields no full batch: lower --batch-size")
    if config.eval_every_steps >= steps_per_epoch:
        raise FastCifarError(
            f"--eval-every-steps {config.eval_every_steps} is not below the {steps_per_epoch} "
            "steps of an epoch, so no evaluation would fall inside one: lower it, or 0 for "
            "epoch ends only")
    device_step = DeviceStep(loaders.metadata.mean, loaders.metadata.std, device,
                             config.channels_last)
    whitening_images = (_first_train_images(loaders, config, device_step)
                        if config.whiten_init or config.whiten else None)
    model = build_model(config, device, whitening_images,
                        num_classes=len(loaders.metadata.class_names))
    optimizers = Optimizers(model, config, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=plan.use_grad_scaler)
    ema = (torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config.ema_decay),
        use_buffers=True) if config.ema_decay > 0 else None)
    lookahead = (Lookahead(model, config.lookahead_every, config.epochs * steps_per_epoch)
                 if config.lookahead_every else None)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    # auto on the CPU: fp32 or bf16, whichever trains faster on the first batch (timed there,
    # off the clock); a resumed run keeps the precision its checkpoint was trained in.
    measure = measures_precision(config.precision, device) and resume_state is None
    if measures_precision(config.precision, device) and resume_state is not None:
        plan = plan_precision(Precision(resume_state.get("precision", "fp32")), device)
    record = run_record(config, device, "auto (timed at the first batch)" if measure
                        else plan.name)
    if resume_state is not None and "precision_images_per_second" in resume_state:
        record["precision_images_per_second"] = resume_state["precision_images_per_second"]

    history: list[EpochStats] = []
    evaluations: list[Evaluation] = []
    start_epoch, steps, best_accuracy, warmup_seconds = 0, 0, -1.0, 0.0
    if resume_state is not None:
        try:
            model.load_state_dict(resume_state["model"])
        except RuntimeError as error:  # e.g. a head for another class count
            raise FastCifarError(f"{config.resume} does not fit this data's model: "
                                 f"{str(error).splitlines()[-1].strip()}") from error
        optimizers.load_state_dict(resume_state)
        scaler.load_state_dict(resume_state["scaler"])
        if ema is not None and resume_state["ema"] is not None:
            ema.load_state_dict(resume_state["ema"])
        if lookahead is not None:
            lookahead.load_state_dict(resume_state["lookahead"])
        start_epoch, steps = resume_state["epoch"], resume_state["steps"]
        best_accuracy = resume_state["best_accuracy"]
        warmup_seconds = resume_state.get("warmup_seconds", 0.0)  # older checkpoints lack it
        history = [EpochStats(**row) for row in resume_state["history"]]
        evaluations = ([Evaluation(**row) for row in resume_state["evaluations"]]
                       if "evaluations" in resume_state  # older checkpoints lack them
                       else epoch_end_evaluations(history))
        restore_rng_state(resume_state["rng"])
        run_dir = Path(config.resume).parent
    else:
        run_dir = share_run_dir(
            _make_run_dir(config) if distributed.is_main else Path(config.out_dir), distributed)

    trained_model: nn.Module = model
    if config.compile:
        trained_model = torch.compile(model)
    if distributed.world_size > 1:
        trained_model = nn.parallel.DistributedDataParallel(
            trained_model, device_ids=[device.index] if device.type == "cuda" else None)
    # Evaluate the EMA weights when kept, else the (compiled) training model.
    eval_model = ema if ema is not None else trained_model

    if distributed.is_main:
        write_json(run_dir / "run.json", record)
    callbacks.on_train_start(config, steps_per_epoch, device, record["precision"], run_dir)

    best_weights = Path(config.weights_dir) / f"{run_dir.name}-best.safetensors"
    final_weights = Path(config.weights_dir) / f"{run_dir.name}-final.safetensors"
    if resume_state is not None and best_weights.exists():
        # An in-epoch pass may have saved better weights after the checkpoint we resume from
        # (a hard crash loses that checkpoint's update): never replace them with worse ones.
        best_accuracy = max(best_accuracy,
                            read_weights_file(best_weights)[1].get("accuracy", -1.0))
    # The LR of each step trained so far, earlier sittings included (older checkpoints lack it).
    lr_per_step: list[float] = list(resume_state.get("lr_per_step", [])
                                    if resume_state is not None else [])
    reached = False
    last_checkpoint = run_dir / "last.pt"

    def keep_if_best(evaluation: Evaluation) -> None:
        """Save the evaluated weights when this test pass is the best so far (any evaluation)."""
        nonlocal best_accuracy
        if evaluation.test_accuracy <= best_accuracy:
            return
        best_accuracy = evaluation.test_accuracy
        if distributed.is_main:
            best_model = ema.module if ema is not None else model
            save_weights_file(best_weights, plain_state_dict(best_model), weights_metadata(
                config, record, loaders, evaluation, "best"))

    def score_holdout() -> float | None:
        """Accuracy on the held-out train images (off the clock: a tuning aid, not a cost)."""
        if loaders.holdout is None:
            return None
        return evaluate(eval_model, loaders.holdout, device_step, plan, config.tta,
                        config.tta_shifts)[1]

    partial = resume_state.get("partial") if resume_state is not None else None
    # Every rank traps the signals; under torchrun they agree on the step to stop at.
    with _stop_on_signals(handle_signals) as stop:
        for epoch in range(start_epoch, config.epochs):
            trained_model.train()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            # seconds_before: this epoch's train time before epoch_started (the clock pauses
            # for in-epoch evaluations and restarts after an interrupt)
            seen, done_before, seconds_before, epoch_eval_seconds = 0, 0, 0.0, 0.0
            if partial is not None:  # resuming inside this epoch: its first steps are done
                if distributed.is_main:  # the saved sums are all ranks' together
                    loss_sum += partial["loss_sum"]
                    correct += partial["correct"]
                    seen = partial["seen"]
                done_before = partial["step"]
                seconds_before = partial["train_seconds"]
                epoch_eval_seconds, partial = partial.get("eval_seconds", 0.0), None
            trained_before = sum(row.train_seconds for row in history)
            evaluated_before = sum(row.eval_seconds for row in history)
            evaluate_inside = (config.eval_every_steps > 0
                               and epoch >= config.epochs - config.eval_steps_epochs)
            epoch_started = time.perf_counter()
            # FFCV's order and the kernel's epoch-dependent flips both follow `epoch`.
            batches = loaders.train_epoch(epoch)
            step_in_epoch = 0
            for step_in_epoch in range(1, steps_per_epoch + 1):
                if step_in_epoch == 1 and epoch == start_epoch:
                    # The first batch compiles the loader pipeline: a one-off, off the clock.
                    fetch_started = time.perf_counter()
                    images, labels = next(batches)
                    if measure:
                        choice = broadcast_from_main(
                            measure_cpu_precision(model, device_step, (images, labels))
                            if distributed.is_main else None, distributed)
                        plan = choice.plan
                        record.update(precision=plan.name,
                                      precision_images_per_second=choice.images_per_second)
                        if distributed.is_main:
                            write_json(run_dir / "run.json", record)
                        callbacks.on_precision(choice)
                    _warm_up(model, trained_model, config, device, plan, device_step,
                             (images, labels))
                    warmup_seconds += time.perf_counter() - fetch_started
                    epoch_started = time.perf_counter()
                else:
                    images, labels = next(batches)
                if step_in_epoch <= done_before:  # trained before the interrupt (same order)
                    if step_in_epoch == done_before:
                        epoch_started = time.perf_counter()  # re-reading them is off the clock
                    continue
                images, labels = device_step(images, labels)
                optimizers.zero_grad()
                with autocast(device, plan):
                    logits = trained_model(images)
                    loss = criterion(logits, labels)
                scaler.scale(loss).backward()  # the scale is 1 unless fp16
                lr_per_step.append(optimizers.lr)  # the LR this step used
                optimizers.step(scaler)
                scaler.update()
                optimizers.schedule_step()
                steps += 1
                if ema is not None:
                    ema.update_parameters(model)
                if lookahead is not None:
                    lookahead.after_step(model, steps)
                # Running sums stay on the device: no sync per step.
                loss_sum += loss.detach().float() * len(labels)
                correct += (logits.detach().argmax(1) == labels).sum()
                seen += len(labels)
                callbacks.on_step(epoch + 1, step_in_epoch, steps_per_epoch)
                # One host sync every DIVERGENCE_CHECK_STEPS steps (not per step): a run whose
                # loss went non-finite stops within that many steps, its last checkpoint intact.
                if steps % DIVERGENCE_CHECK_STEPS == 0 and not torch.isfinite(loss_sum).item():
                    raise _diverged(epoch, last_checkpoint)
                if _stop_agreed(stop, steps, distributed, device):
                    break
                if (evaluate_inside and step_in_epoch % config.eval_every_steps == 0
                        and step_in_epoch < steps_per_epoch):  # the epoch end evaluates anyway
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    eval_started = time.perf_counter()
                    seconds_before += eval_started - epoch_started
                    test_loss, test_accuracy = evaluate(eval_model, loaders.test, device_step,
                                                        plan, config.tta, config.tta_shifts)
                    epoch_eval_seconds += time.perf_counter() - eval_started
                    evaluations.append(Evaluation(
                        epoch + step_in_epoch / steps_per_epoch, steps, test_loss, test_accuracy,
                        trained_before + seconds_before, evaluated_before + epoch_eval_seconds,
                        score_holdout()))
                    keep_if_best(evaluations[-1])  # saving is off the clock, as at epoch ends
                    callbacks.on_evaluation(evaluations[-1])
                    trained_model.train()
                    epoch_started = time.perf_counter()
            if stop.signal_number is not None:
                del batches  # FFCV's worker thread stops with its iterator
                partial_sums = all_reduce_sum(torch.stack([
                    loss_sum, correct.float(), torch.tensor(float(seen), device=device)]),
                    distributed).tolist()
                if distributed.is_main:  # one checkpoint, with every rank's sums so far
                    save_checkpoint(last_checkpoint, _checkpoint_state(
                        model, optimizers, scaler, ema, lookahead, epoch, steps, history,
                        evaluations, record, best_accuracy, warmup_seconds, lr_per_step,
                        partial={
                            "step": step_in_epoch, "loss_sum": partial_sums[0],
                            "correct": int(partial_sums[1]), "seen": int(partial_sums[2]),
                            "train_seconds": seconds_before + time.perf_counter() - epoch_started,
                            "eval_seconds": epoch_eval_seconds}))
                raise TrainingInterrupted(stop.signal_number, last_checkpoint)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_seconds = seconds_before + time.perf_counter() - epoch_started
            totals = all_reduce_sum(torch.stack([loss_sum, correct.float(),
                                                  torch.tensor(float(seen), device=device)]),
                                     distributed)
            train_loss_sum, train_correct, train_seen = totals.tolist()  # one sync per epoch
            if not math.isfinite(train_loss_sum):
                raise _diverged(epoch, last_checkpoint)

            eval_started = time.perf_counter()
            test_loss, test_accuracy = evaluate(eval_model, loaders.test, device_step, plan,
                                                config.tta, config.tta_shifts)
            eval_seconds = epoch_eval_seconds + time.perf_counter() - eval_started
            evaluations.append(Evaluation(epoch + 1, steps, test_loss, test_accuracy,
                                          trained_before + train_seconds,
                                          evaluated_before + eval_seconds, score_holdout()))
            stats = EpochStats(
                epoch=epoch + 1, lr=lr_per_step[-1] if lr_per_step else config.max_lr,
                train_loss=train_loss_sum / train_seen, train_accuracy=train_correct / train_seen,
                test_loss=test_loss, test_accuracy=test_accuracy, train_seconds=train_seconds,
                eval_seconds=eval_seconds, images_per_second=train_seen / train_seconds,
                steps=steps, holdout_accuracy=evaluations[-1].holdout_accuracy,
            )
            history.append(stats)
            keep_if_best(evaluations[-1])
            if distributed.is_main:
                save_checkpoint(last_checkpoint, _checkpoint_state(
                    model, optimizers, scaler, ema, lookahead, epoch + 1, steps, history,
                    evaluations, record, best_accuracy, warmup_seconds, lr_per_step))
            if distributed.is_main:
                write_json(run_dir / "metrics.json",
                           {"epochs": [asdict(row) for row in history],
                            "evaluations": [asdict(row) for row in evaluations],
                            "warmup_seconds": warmup_seconds, "best_accuracy": best_accuracy})
            callbacks.on_epoch(stats)
            # An in-epoch evaluation at the target stops the run at this epoch's end; its
            # time on the clock is that evaluation's.
            epoch_accuracies = [row.test_accuracy for row in evaluations if row.epochs > epoch]
            reached = (config.stop_at_accuracy is not None
                       and max(epoch_accuracies) >= config.stop_at_accuracy)
            # Rank 0 decides for all: ranks that disagreed would wait for each other forever.
            if distributed.world_size > 1:
                reached = broadcast_from_main(reached, distributed)
            if reached:
                break

    if distributed.world_size > 1:
        agree = ranks_agree(model, distributed)
        if distributed.is_main:
            metrics_path = run_dir / "metrics.json"
            write_json(metrics_path, {**json.loads(metrics_path.read_text()),
                                      "world_size": distributed.world_size,
                                      "ranks_agree": agree})
    if distributed.is_main and evaluations:
        save_weights_file(final_weights, plain_state_dict(ema.module if ema is not None else model),
                          weights_metadata(config, record, loaders, evaluations[-1], "final"))
    result = TrainResult(history, run_dir, best_weights if best_accuracy >= 0 else None,
                         best_accuracy, warmup_seconds, lr_per_step, reached, eval_model,
                         evaluations, final_weights if evaluations else None, plan,
                         record.get("precision_images_per_second", {}))
    if config.make_plots and distributed.is_main:
        from fastcifar.plots import plot_training_curves

        plot_training_curves(history, lr_per_step, run_dir / "training_curves.png")
    return result
