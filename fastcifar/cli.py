"""The `fastcifar` command line: each command turns options into a config and calls the library."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import shlex
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fastcifar.config import (
    NO_AUGMENT,
    AugmentConfig,
    ConvertConfig,
    Device,
    LoaderConfig,
    OptimizerName,
    Precision,
    TrainConfig,
    recipe,
)
from fastcifar.errors import FastCifarError

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  pretty_exceptions_show_locals=False,
                  help="Fast CIFAR-10 training: convert once to FFCV, train CustResNet, measure.")
benchmark_app = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False,
                            help="Loader throughput and time-to-accuracy.")
app.add_typer(benchmark_app, name="benchmark")
console = Console(stderr=False, highlight=False)
warnings_console = Console(stderr=True, highlight=False)  # kept off stdout, e.g. under --json
_state = {"debug": False}

DATA, OPTIMISATION, AUGMENTATION, SYSTEM = "Data", "Optimisation", "Augmentation", "System"

# Options several commands share, declared once.
DataOption = Annotated[Path, typer.Option(help="Folder with the converted betons.",
                                          rich_help_panel=DATA)]
TrainSubsetOption = Annotated[int | None, typer.Option(help="Use the first N train images.",
                                                       rich_help_panel=DATA)]
TestSubsetOption = Annotated[int | None, typer.Option(help="Use the first N test images.",
                                                      rich_help_panel=DATA)]
DeviceOption = Annotated[Device, typer.Option(help="auto picks CUDA, then MPS, then CPU.",
                                              rich_help_panel=SYSTEM)]
PrecisionOption = Annotated[Precision, typer.Option(
    help="auto: bf16 on bf16-capable CUDA, else fp16 with a grad scaler; on the CPU train times "
    "fp32 and bf16 on its first batch and keeps the faster (other commands: fp32).",
    rich_help_panel=SYSTEM)]
WorkersOption = Annotated[int, typer.Option(help="Loader threads, 0 = one per core.",
                                            rich_help_panel=SYSTEM)]



class RecipeName(StrEnum):
    express = "express"
    fast = "fast"
    seed = "seed"


def _fail(error: FastCifarError) -> None:
    """Print the one-line message (a traceback only with --debug) and exit non-zero."""
    if _state["debug"]:
        raise error
    console.print(f"[red]error:[/red] {error}", soft_wrap=True)
    raise typer.Exit(getattr(error, "exit_code", 1))


def run_command(function, *args, **kwargs):
    """Call a library function, turning FastCifarError into the one-line exit."""
    try:
        return function(*args, **kwargs)
    except FastCifarError as error:
        _fail(error)
    except KeyboardInterrupt:  # a second Ctrl-C: stop now; checkpoints are written atomically
        if _state["debug"]:
            raise
        console.print("[red]interrupted:[/red] stopped at once; the last saved checkpoint is intact")
        raise typer.Exit(130) from None


@app.callback()
def main(debug: Annotated[bool, typer.Option(help="Show tracebacks for errors.")] = False) -> None:
    """Fast CIFAR-10 training on one machine."""
    _state["debug"] = debug


# ---------------------------------------------------------------- convert


@app.command()
def convert(
    source: Annotated[Path | None, typer.Option(help="cifar-10-python.tar.gz, its extracted "
                      "folder, or an ImageFolder tree (or .tar.gz of one). Default: look in "
                      "--out, then download.", rich_help_panel=DATA)] = None,
    out: Annotated[Path, typer.Option(help="Folder for the .beton files and metadata.",
                                      rich_help_panel=DATA)] = Path("datasets"),
    force: Annotated[bool, typer.Option(help="Rewrite even when up to date.")] = False,
    fix_images: Annotated[bool, typer.Option(help="Convert grey/RGBA images to RGB and resize "
                          "other sizes to 32x32 instead of rejecting them.")] = False,
    download: Annotated[bool, typer.Option(help="Download the official archive when no "
                        "source is found.")] = True,
) -> None:
    """Write CIFAR-10 once to FFCV .beton files (train, test) plus a metadata JSON."""
    from fastcifar.data.convert import convert as convert_dataset

    def progress(stage: str, done: int, total: int) -> None:
        if total:
            console.print(f"  {stage}: {done:,}/{total:,}", end="\r")

    config = run_command(ConvertConfig, source=source, out_dir=out, force=force,
                         fix_images=fix_images, download=download)
    result = run_command(convert_dataset, config, progress)
    counts = result.metadata["counts"]
    verb = "up to date" if result.skipped else f"written in {result.seconds:.1f} s"
    console.print(f"{result.train_path} ({counts['train']:,}) and {result.test_path} "
                  f"({counts['test']:,}) {verb}; metadata {result.metadata_path}")


# ---------------------------------------------------------------- train


def _torchrun_environment() -> tuple[bool, int]:
    """(distributed?, local rank) from the variables torchrun sets."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return world_size > 1, int(os.environ.get("LOCAL_RANK", "0"))


def build_train_config(
    recipe_name: Annotated[RecipeName, typer.Option("--recipe", help="Named defaults: fast "
                           "(SGD-Nesterov, label smoothing, TTA) or seed (the original Adam "
                           "recipe).", rich_help_panel=OPTIMISATION)] = RecipeName.fast,
    epochs: Annotated[int | None, typer.Option(help="Epochs; the OneCycle schedule is planned "
                      "for this budget (recipe default: 24).", rich_help_panel=OPTIMISATION)
                      ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per step (default 512).",
                          rich_help_panel=OPTIMISATION)] = None,
    optimizer: Annotated[OptimizerName | None, typer.Option(help="adam or sgd (default: the "
                         "recipe's).", rich_help_panel=OPTIMISATION)] = None,
    max_lr: Annotated[float | None, typer.Option(help="Peak LR of OneCycle, or 'auto' to run the "
                      "LR range test first (default: the recipe's).",
                      rich_help_panel=OPTIMISATION)] = None,
    pct_start: Annotated[float | None, typer.Option(help="Fraction of the steps spent warming "
                         "up to the peak LR.", rich_help_panel=OPTIMISATION)] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Weight decay (default: the "
                            "recipe's).", rich_help_panel=OPTIMISATION)] = None,
    label_smoothing: Annotated[float | None, typer.Option(help="Label smoothing (default: the "
                               "recipe's).", rich_help_panel=OPTIMISATION)] = None,
    logit_scale: Annotated[float | None, typer.Option(help="Constant multiplier of the logits "
                           "(fast: 0.125).", rich_help_panel=OPTIMISATION)] = None,
    ema: Annotated[float | None, typer.Option(help="Per-step weight EMA decay, 0 = off "
                   "(default: the recipe's).", rich_help_panel=OPTIMISATION)] = None,
    bn_momentum: Annotated[float | None, typer.Option(help="BatchNorm running-stat momentum "
                           "(torch default 0.1).", rich_help_panel=OPTIMISATION)] = None,
    whiten_init: Annotated[bool | None, typer.Option("--whiten-init/--no-whiten-init",
                           help="Start the prep conv as a whitening of 3x3 train patches.",
                           rich_help_panel=OPTIMISATION)] = None,
    zero_init_residual: Annotated[bool | None, typer.Option(
        "--zero-init-residual/--no-zero-init-residual", help="Start each residual branch's "
        "last BatchNorm scale at zero.", rich_help_panel=OPTIMISATION)] = None,
    tta: Annotated[bool | None, typer.Option("--tta/--no-tta", help="Evaluate with flip "
                   "test-time augmentation (default: the recipe's).",
                   rich_help_panel=OPTIMISATION)] = None,
    tta_shifts: Annotated[bool | None, typer.Option(
        "--tta-shifts/--no-tta-shifts", help="Multi-crop TTA: also the 1-px up-left and "
        "down-right shifts, weighted 0.5/0.25/0.25 (6 passes; needs --tta).",
        rich_help_panel=OPTIMISATION)] = None,
    lookahead_every: Annotated[int | None, typer.Option(help="Lookahead weight average every "
                               "N steps, copied back into the live weights; 0 = off.",
                               rich_help_panel=OPTIMISATION)] = None,
    bn_eps: Annotated[float | None, typer.Option(help="BatchNorm epsilon (torch: 1e-5).",
                      rich_help_panel=OPTIMISATION)] = None,
    bn_frozen_scale: Annotated[bool | None, typer.Option(
        "--bn-frozen-scale/--no-bn-frozen-scale", help="Keep BatchNorm scales at 1 (not "
        "trained).", rich_help_panel=OPTIMISATION)] = None,
    bn_bias_lr_scale: Annotated[float | None, typer.Option(help="BatchNorm shifts train at LR x "
                                "this and weight decay / this.",
                                rich_help_panel=OPTIMISATION)] = None,
    decay_norm: Annotated[bool | None, typer.Option(
        "--decay-norm/--no-decay-norm", help="Weight decay on BatchNorm parameters too.",
        rich_help_panel=OPTIMISATION)] = None,
    whiten: Annotated[bool | None, typer.Option(
        "--whiten/--no-whiten", help="Prep conv as a fixed 3x3 PCA whitening of train patches "
        "plus a trained 1x1 conv (folds back into the 3x3 conv in saved weights).",
        rich_help_panel=OPTIMISATION)] = None,
    dirac_init: Annotated[bool | None, typer.Option(
        "--dirac-init/--no-dirac-init", help="Each 3x3 conv's first in-channel filters start "
        "as the identity.", rich_help_panel=OPTIMISATION)] = None,
    muon_lr: Annotated[float | None, typer.Option(help="Peak LR of Muon for the conv filters "
                       "(SGD keeps the rest); 0 = off.", rich_help_panel=OPTIMISATION)] = None,
    momentum: Annotated[float | None, typer.Option(help="SGD momentum (default: the recipe's).",
                        rich_help_panel=OPTIMISATION)] = None,
    initial_lr_fraction: Annotated[float | None, typer.Option(
        help="The schedule starts at max LR x this.", rich_help_panel=OPTIMISATION)] = None,
    min_lr: Annotated[float | None, typer.Option(help="LR at the end of the schedule.",
                      rich_help_panel=OPTIMISATION)] = None,
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="Train "
                       "augmentation on/off (--no-augment takes no other augmentation "
                       "option).", rich_help_panel=AUGMENTATION)] = True,
    cutout: Annotated[int | None, typer.Option(help="Cutout hole side in pixels, 0 = off.",
                      rich_help_panel=AUGMENTATION)] = None,
    jitter: Annotated[float | None, typer.Option(help="Brightness/contrast/saturation "
                      "jitter magnitude, applied to half the images (either recipe); 0 turns "
                      "colour jitter off, the recipe's hue jitter too unless --hue is given.",
                      rich_help_panel=AUGMENTATION)] = None,
    hue: Annotated[float | None, typer.Option(help="Hue jitter (fraction of a turn), applied "
                   "to half the images with the other colour jitter (either recipe).",
                   rich_help_panel=AUGMENTATION)] = None,
    p_gray: Annotated[float | None, typer.Option(help="Grayscale probability.",
                      rich_help_panel=AUGMENTATION)] = None,
    pad: Annotated[int | None, typer.Option(help="Padding (pixels) before the random crop.",
                   rich_help_panel=AUGMENTATION)] = None,
    flip_alternate: Annotated[bool | None, typer.Option(
        "--flip-alternate/--no-flip-alternate", help="Flip a random half in epoch 0, then each "
        "image the other way every epoch.", rich_help_panel=AUGMENTATION)] = None,
    holdout: Annotated[int, typer.Option(help="Hold out N train images (stratified, the same "
                       "for every seed) and report accuracy on them at each evaluation.",
                       rich_help_panel=DATA)] = 0,
    data_on_device: Annotated[bool, typer.Option(help="Keep every converted image in device "
                              "memory and augment train batches there with torch ops (one "
                              "process only; another train order than FFCV's).",
                              rich_help_panel=DATA)] = False,
    data: DataOption = Path("datasets"),
    train_subset: TrainSubsetOption = None,
    test_subset: TestSubsetOption = None,
    device: DeviceOption = Device.auto,
    precision: PrecisionOption = Precision.auto,
    channels_last: Annotated[bool, typer.Option(help="Channels-last memory format.",
                             rich_help_panel=SYSTEM)] = True,
    compile_model: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile "
                             "the model.", rich_help_panel=SYSTEM)] = False,
    workers: WorkersOption = 0,
    eval_every_steps: Annotated[int, typer.Option(help="Also evaluate every this many steps "
                                "inside the last --eval-steps-epochs epochs (below the steps of an "
                                "epoch); 0 = at epoch ends only.", rich_help_panel=SYSTEM)] = 0,
    eval_steps_epochs: Annotated[int, typer.Option(help="How many final epochs get the "
                                 "--eval-every-steps evaluations.", rich_help_panel=SYSTEM)] = 1,
    seed: Annotated[int, typer.Option(help="Seed for weights, order and augmentation (the "
                                      "first seed of a benchmark).", rich_help_panel=SYSTEM)] = 0,
    out: Annotated[Path, typer.Option(help="Folder that gets one run folder per run.",
                                      rich_help_panel=SYSTEM)] = Path("runs"),
) -> TrainConfig:
    """The recipe with every train option the user gave replacing its default.

    Its parameters are also the train options of `train` and `benchmark time-to-accuracy`
    (see `with_train_options`), so they are declared once."""
    base = recipe(recipe_name.value)
    distributed, local_rank = _torchrun_environment()
    changes: dict[str, object] = {
        key: value for key, value in {
            "epochs": epochs, "optimizer": optimizer, "pct_start": pct_start,
            "weight_decay": weight_decay, "label_smoothing": label_smoothing,
            "logit_scale": logit_scale, "ema_decay": ema, "bn_momentum": bn_momentum,
            "whiten_init": whiten_init, "zero_init_residual": zero_init_residual, "tta": tta,
            "tta_shifts": tta_shifts, "lookahead_every": lookahead_every, "bn_eps": bn_eps,
            "bn_frozen_scale": bn_frozen_scale, "bn_bias_lr_scale": bn_bias_lr_scale,
            "decay_norm": decay_norm, "whiten": whiten, "dirac_init": dirac_init,
            "muon_lr": muon_lr, "momentum": momentum,
            "initial_lr_fraction": initial_lr_fraction,
        }.items() if value is not None
    }
    if max_lr is not None:
        base = base.with_max_lr(max_lr)
    if min_lr is not None:
        changes["min_lr"] = min_lr
    augment_config = (_augment_with_options(base.augment, cutout, jitter, hue, p_gray, pad,
                                            flip_alternate)
                      if augment else _no_augment(cutout, jitter, hue, p_gray, pad,
                                                  flip_alternate))
    loader = LoaderConfig(data_dir=data,
                          batch_size=base.loader.batch_size if batch_size is None else batch_size,
                          workers=workers, train_subset=train_subset, test_subset=test_subset,
                          distributed=distributed, holdout=holdout, on_device=data_on_device)
    return dataclasses.replace(
        base, loader=loader, augment=augment_config, device=device, precision=precision,
        channels_last=channels_last, compile=compile_model, seed=seed, out_dir=out,
        local_rank=local_rank, eval_every_steps=eval_every_steps,
        eval_steps_epochs=eval_steps_epochs, **changes)


# Per image, once --jitter or --hue turns colour jitter on: the seed recipe's probability,
# whichever recipe it is added to, so the same options give the same augmentation.
JITTER_PROBABILITY = 0.5


def _augment_with_options(base: AugmentConfig, cutout: int | None, jitter: float | None,
                          hue: float | None, p_gray: float | None, pad: int | None = None,
                          flip_alternate: bool | None = None) -> AugmentConfig:
    """The recipe's augmentation with the augmentation options replacing its settings."""
    changes: dict[str, object] = {key: value for key, value in {
        "cutout_size": cutout, "p_gray": p_gray, "hue": hue, "pad": pad,
        "flip_alternate": flip_alternate}.items() if value is not None}
    if jitter is not None:
        changes.update(brightness=jitter, contrast=jitter, saturation=jitter)
        if not jitter and hue is None:  # --jitter 0: no colour jitter at all
            changes["hue"] = 0.0
    if jitter is not None or hue is not None:
        changes["p_jitter"] = JITTER_PROBABILITY
    return dataclasses.replace(base, **changes)


def _no_augment(cutout: int | None, jitter: float | None, hue: float | None,
                p_gray: float | None, pad: int | None = None,
                flip_alternate: bool | None = None) -> AugmentConfig:
    """NO_AUGMENT, refusing augmentation options it would silently ignore."""
    given = [f"--{name}" for name, value in (("cutout", cutout), ("jitter", jitter),
                                             ("hue", hue), ("p-gray", p_gray), ("pad", pad),
                                             ("flip-alternate", flip_alternate))
             if value is not None]
    if given:
        raise FastCifarError(f"--no-augment turns all augmentation off: drop it or "
                             f"{', '.join(given)}")
    return NO_AUGMENT


def with_train_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give `command` every train option (build_train_config's parameters) after its own.

    The command is called with its own options plus `train_config`, the config the train
    options build; `--max-lr auto` runs the LR range test first.
    """
    shared = [parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY) for parameter in
              inspect.signature(build_train_config, eval_str=True).parameters.values()]
    own = [parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY) for parameter in
           inspect.signature(command, eval_str=True).parameters.values()
           if parameter.name != "train_config"]
    shared_names = [parameter.name for parameter in shared]
    lr_parameter = next(index for index, parameter in enumerate(shared) if parameter.name == "max_lr")
    shared[lr_parameter] = shared[lr_parameter].replace(annotation=Annotated[
        str | None, *shared[lr_parameter].annotation.__metadata__])  # a number or 'auto'

    @functools.wraps(command)
    def command_with_train_options(**values: object) -> None:
        options = {name: values.pop(name) for name in shared_names}
        max_lr = options.pop("max_lr")
        if max_lr == "auto" and values.get("resume"):
            _fail(FastCifarError("--max-lr auto with --resume: the checkpoint already holds its "
                                 "LR; drop --max-lr"))
        numeric_lr = None if max_lr in (None, "auto") else run_command(_parse_float, max_lr,
                                                                       "max-lr")
        config = run_command(build_train_config, **options, max_lr=numeric_lr)
        if max_lr == "auto" and config.loader.distributed:
            # Each rank would run its own range test on its own shard and pick its own LR.
            _fail(FastCifarError("--max-lr auto is not supported under torchrun: run "
                                 "`fastcifar lr-find` once and pass its suggestion as --max-lr"))
        if max_lr == "auto":
            config = run_command(_with_found_lr, config)
        command(train_config=config, **values)

    command_with_train_options.__signature__ = inspect.Signature(own + shared)
    return command_with_train_options


class TableCallbacks:
    """Draws a progress bar per epoch and one table row after it (rank 0 only)."""

    def __init__(self, quiet: bool = False) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self.quiet = quiet
        self.progress = Progress("epoch {task.fields[epoch]}", BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), console=console, transient=True,
                                 disable=quiet)
        self.task = None

    def on_train_start(self, config, steps_per_epoch, device, precision, run_dir) -> None:
        if self.quiet:
            return
        console.print(f"recipe {config.recipe} | {config.epochs} epochs x {steps_per_epoch} "
                      f"steps | batch {config.loader.batch_size} | {config.optimizer.value} "
                      f"max LR {config.max_lr:g} | {device} {precision} | run folder {run_dir}")
        console.print(f"{'epoch':>5} {'lr':>9} {'train loss':>10} {'train acc':>9} "
                      f"{'test loss':>9} {'test acc':>8} {'seconds':>8} {'images/s':>9}")

    def on_step(self, epoch: int, step: int, steps_per_epoch: int) -> None:
        if self.quiet:
            return
        if step == 1 or self.task is None:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.progress.start()
            self.task = self.progress.add_task("", total=steps_per_epoch, epoch=epoch)
        self.progress.update(self.task, completed=step)

    def on_epoch(self, stats) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
            self.progress.stop()
        if self.quiet:
            return
        console.print(f"{stats.epoch:>5} {stats.lr:>9.2e} {stats.train_loss:>10.4f} "
                      f"{stats.train_accuracy:>9.2%} {stats.test_loss:>9.4f} "
                      f"{stats.test_accuracy:>8.2%} {stats.train_seconds:>8.1f} "
                      f"{stats.images_per_second:>9.0f}")

    def on_evaluation(self, evaluation) -> None:
        """A row for an evaluation inside an epoch: its fractional epoch and test columns."""
        if self.quiet:
            return
        console.print(f"{evaluation.epochs:>5.2f} {'':>9} {'':>10} {'':>9} "
                      f"{evaluation.test_loss:>9.4f} {evaluation.test_accuracy:>8.2%}")

    def on_precision(self, choice) -> None:
        """The precision --precision auto chose on the CPU and the rates it measured."""
        if not self.quiet:
            console.print(f"precision auto: {choice.describe()} on the first batch")


@app.command()
@with_train_options
def train(
    train_config: TrainConfig,
    weights: Annotated[Path, typer.Option(help="Folder for the run's best and final weights "
                                          "(.safetensors).", rich_help_panel=SYSTEM)
                       ] = Path("weights"),
    resume: Annotated[str | None, typer.Option(help="Checkpoint to continue, or 'auto' for "
                      "the newest under --out.", rich_help_panel=SYSTEM)] = None,
    stop_at_accuracy: Annotated[float | None, typer.Option(help="End the run once test "
                                "accuracy reaches this (e.g. 0.90).",
                                rich_help_panel=OPTIMISATION)] = None,
) -> None:
    """Train CustResNet: OneCycle LR, mixed precision, per-epoch table, final and best weights saved."""
    from fastcifar.train import find_latest_checkpoint
    from fastcifar.train import train as run_training

    resume_path = (run_command(find_latest_checkpoint, train_config.out_dir) if resume == "auto"
                   else Path(resume) if resume else None)
    config = run_command(dataclasses.replace, train_config, weights_dir=weights,
                         resume=resume_path, stop_at_accuracy=stop_at_accuracy)
    rank_is_main = int(os.environ.get("RANK", "0")) == 0
    result = run_command(run_training, config, TableCallbacks(quiet=not rank_is_main))
    if rank_is_main:
        console.print(f"final test accuracy {result.final_accuracy:.2%} (weights "
                      f"{result.final_weights}); best test pass {result.best_accuracy:.2%} "
                      f"(chosen on the test set; weights {result.best_weights}); run folder "
                      f"{result.run_dir}", soft_wrap=True)


def _parse_float(text: str, option: str) -> float:
    try:
        return float(text)
    except ValueError as error:
        raise FastCifarError(f"--{option} takes a number or 'auto', got {text!r}") from error


def _with_found_lr(config: TrainConfig) -> TrainConfig:
    """Run the LR range test with the train settings and use its suggestion as max LR."""
    from fastcifar.config import LrFindConfig
    from fastcifar.lr_find import lr_find

    finder = LrFindConfig(train=config, out_dir=Path(config.out_dir) / "lr-find")
    found = lr_find(finder)
    console.print(f"LR range test suggests max LR {found.suggested_lr:.3g} ({found.plot_path})")
    return config.with_max_lr(found.suggested_lr)


# ---------------------------------------------------------------- lr-find


class SweepMode(StrEnum):
    exp = "exp"
    linear = "linear"


@app.command()
def lr_find(
    recipe_name: Annotated[RecipeName, typer.Option("--recipe", help="The training recipe the "
                           "LR is for: its optimiser, weight decay, label smoothing, logit "
                           "scale, model and augmentation.", rich_help_panel=OPTIMISATION)
                           ] = RecipeName.fast,
    iters: Annotated[int, typer.Option(help="Steps of the sweep, one batch each.",
                                       rich_help_panel=OPTIMISATION)] = 200,
    start_lr: Annotated[float, typer.Option(help="LR of the first step.",
                                            rich_help_panel=OPTIMISATION)] = 1e-7,
    end_lr: Annotated[float, typer.Option(help="LR of the last step.",
                                          rich_help_panel=OPTIMISATION)] = 10.0,
    mode: Annotated[SweepMode, typer.Option(help="How the LR grows per step.",
                                            rich_help_panel=OPTIMISATION)] = SweepMode.exp,
    optimizer: Annotated[OptimizerName | None, typer.Option(help="adam or sgd (default: the "
                         "recipe's).", rich_help_panel=OPTIMISATION)] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Weight decay (default: the "
                            "recipe's).", rich_help_panel=OPTIMISATION)] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per step; the suggestion is for "
                          "this batch size (default 512).", rich_help_panel=OPTIMISATION)
                          ] = None,
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="The recipe's train "
                       "augmentation on/off.", rich_help_panel=AUGMENTATION)] = True,
    data: DataOption = Path("datasets"),
    train_subset: TrainSubsetOption = None,
    device: DeviceOption = Device.auto,
    precision: PrecisionOption = Precision.auto,
    channels_last: Annotated[bool, typer.Option(help="Channels-last memory format.",
                             rich_help_panel=SYSTEM)] = True,
    workers: WorkersOption = 0,
    seed: Annotated[int, typer.Option(help="Seed for weights, order and augmentation.",
                                      rich_help_panel=SYSTEM)] = 0,
    out: Annotated[Path, typer.Option(help="Folder for lr_find.png, .csv and .json.",
                                      rich_help_panel=SYSTEM)] = Path("runs/lr-find"),
) -> None:
    """LR range test on the real train loader for a recipe: loss per LR, a suggested max LR."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from fastcifar.config import LrFindConfig
    from fastcifar.lr_find import lr_find as run_range_test

    base = run_command(recipe, recipe_name.value)
    loader = run_command(LoaderConfig, data_dir=data, batch_size=batch_size or
                         base.loader.batch_size, workers=workers, train_subset=train_subset)
    changes = {key: value for key, value in {"optimizer": optimizer,
               "weight_decay": weight_decay}.items() if value is not None}
    train_config = run_command(dataclasses.replace, base, loader=loader, augment=base.augment
                               if augment else NO_AUGMENT, device=device, precision=precision,
                               channels_last=channels_last, seed=seed, **changes)
    config = run_command(LrFindConfig, train=train_config, start_lr=start_lr, end_lr=end_lr,
                         iterations=iters, mode=mode.value, out_dir=out)
    with Progress("range test", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("", total=iters)
        found = run_command(run_range_test, config,
                            lambda done, total: bar.update(task, completed=done))
    diverged = ", stopped early as the loss diverged" if found.stopped_early else ""
    console.print(f"{recipe_name.value} recipe ({train_config.optimizer.value}, weight decay "
                  f"{train_config.weight_decay:g}): {len(found.lrs)} steps at batch "
                  f"{loader.batch_size} on {found.device} {found.precision} in "
                  f"{found.seconds:.0f} s{diverged}", soft_wrap=True)
    console.print(f"suggested max LR {found.suggested_lr:.3g} (steepest descent); min-loss LR / "
                  f"10: {found.min_loss_lr_over_10:.3g}; plot {found.plot_path}, history "
                  f"{found.history_path}", soft_wrap=True)


# ---------------------------------------------------------------- summary


@app.command()
def summary(
    batch_size: Annotated[int, typer.Option(help="Batch size of the example input.")] = 1,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object (totals, "
                           "layer rows, receptive-field rows) instead of tables.")] = False,
) -> None:
    """CustResNet's layers and parameters (torchinfo) and its receptive field per layer."""
    import json

    from fastcifar.model import CustResNet, receptive_field_table, summary_record
    from fastcifar.model import summary as torchinfo_summary

    if batch_size < 1:
        _fail(FastCifarError(f"batch size must be positive, got {batch_size}"))
    model = CustResNet()
    if json_output:
        typer.echo(json.dumps(summary_record(model, batch_size), indent=2))
        return
    typer.echo(str(torchinfo_summary(model, batch_size)))
    table = Table("layer", "kernel", "stride", "pad", "RF", "jump", "start",
                  title="receptive field (RF, pixels) along the deepest path")
    for row in receptive_field_table(model):
        table.add_row(row.name, *(str(value) for value in (row.kernel, row.stride, row.padding,
                                                            row.receptive_field, row.jump)),
                      f"{row.start:g}")
    console.print(table)


# ---------------------------------------------------------------- evaluate


@app.command()
def evaluate(
    weights: Annotated[Path, typer.Argument(help="A .safetensors weights file written by "
                                               "train.")],
    tta: Annotated[bool | None, typer.Option("--tta/--no-tta", help="Average each image's "
                   "logits with its mirror's (default: the mode stored with the weights).",
                   show_default=False)] = None,
    data: DataOption = Path("datasets"),
    test_subset: TestSubsetOption = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.",
                                            rich_help_panel=SYSTEM)] = 512,
    device: DeviceOption = Device.auto,
    precision: PrecisionOption = Precision.auto,
    workers: WorkersOption = 0,
    out: Annotated[Path | None, typer.Option(help="Folder for the figures and JSON (default: "
                   "WEIGHTS' name + '-eval', beside it).", rich_help_panel=SYSTEM)] = None,
) -> None:
    """Test accuracy of saved weights, per class, with confusion matrix and misclassified images."""
    from fastcifar.config import EvaluateConfig
    from fastcifar.evaluate import evaluate_weights

    loader = run_command(LoaderConfig, data_dir=data, batch_size=batch_size, workers=workers,
                         test_subset=test_subset)
    config = run_command(EvaluateConfig, weights=weights, loader=loader, tta=tta, out_dir=out,
                         device=device, precision=precision)
    report = run_command(evaluate_weights, config)
    table = Table("class", "accuracy", title="per class")
    for name, accuracy in report.per_class_accuracy.items():
        table.add_row(name, f"{accuracy:.2%}")
    console.print(table)
    tta_source = "stored with the weights" if report.tta_from_weights else "as asked"
    console.print(f"test accuracy {report.accuracy:.2%} on {report.count:,} images "
                  f"({report.tta_mode} TTA {tta_source}, {report.device} "
                  f"{report.precision}; {report.misclassified_total:,} wrong); figures and JSON "
                  f"in {report.json_path.parent}", soft_wrap=True)


# ---------------------------------------------------------------- predict


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(help="Image files (PNG, JPEG, WebP, ...) or "
                     "folders of them.", show_default=False)],
    weights: Annotated[Path | None, typer.Option(help="A .safetensors weights file from train "
                       "(default: the shipped weights/custresnet-cifar10.safetensors).",
                       show_default=False)] = None,
    top_k: Annotated[int, typer.Option(help="Classes shown per image.")] = 3,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    keep_going: Annotated[bool, typer.Option(help="Report unreadable inputs and predict the "
                          "others (the exit status is still 1).")] = False,
    device: DeviceOption = Device.auto,
) -> None:
    """The most likely classes of your images; other sizes than 32x32 are resized (a warning)."""
    import json

    from fastcifar.config import PredictConfig
    from fastcifar.predict import predict as run_predict

    config = run_command(PredictConfig, paths=tuple(paths), top_k=top_k, keep_going=keep_going,
                         device=device, **({"weights": weights} if weights else {}))
    report = run_command(run_predict, config)
    for row in report.predictions:
        if row.resized_from:
            warnings_console.print(f"[yellow]warning:[/yellow] {escape(str(row.path))}: resized "
                                   f"from {row.resized_from[0]}x{row.resized_from[1]} to 32x32",
                                   soft_wrap=True)
    if json_output:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for row in report.predictions:
            typer.echo(f"{row.path}: " + ", ".join(f"{name} {probability:.1%}"
                                                   for name, probability in row.top))
    for problem in report.problems:
        warnings_console.print(f"[red]error:[/red] {escape(str(problem))}", soft_wrap=True)
    if report.problems:
        raise typer.Exit(1)


# ---------------------------------------------------------------- show-augment


@app.command()
def show_augment(
    recipe_name: Annotated[RecipeName, typer.Option("--recipe", help="Whose augmentation to "
                           "show.", rich_help_panel=AUGMENTATION)] = RecipeName.fast,
    count: Annotated[int, typer.Option(help="Images in each grid (the first N train images).",
                                       rich_help_panel=DATA)] = 32,
    data: DataOption = Path("datasets"),
    seed: Annotated[int, typer.Option(help="Augmentation seed.", rich_help_panel=SYSTEM)] = 0,
    out: Annotated[Path, typer.Option(help="Folder for samples.png and augmented.png.",
                                      rich_help_panel=SYSTEM)] = Path("runs/show-augment"),
) -> None:
    """Write a grid of train images and a grid of the same images through the train augmentation."""
    from fastcifar.samples import show_augment as write_grids

    augment = run_command(recipe, recipe_name.value).augment
    preview = run_command(write_grids, data, augment, count, seed, out)
    console.print(f"{preview.original_path} and {preview.augmented_path} ({recipe_name.value} "
                  f"recipe's augmentation, seed {seed})", soft_wrap=True)


@benchmark_app.command("time-to-accuracy")
@with_train_options
def benchmark_time_to_accuracy(
    train_config: TrainConfig,
    target: Annotated[list[float], typer.Option(help="Test accuracy to reach; repeat for "
                      "several (e.g. --target 0.90 --target 0.94).")] = [0.90],  # noqa: B006
    runs: Annotated[int, typer.Option(help="Runs (seeds seed, seed+1, ...).")] = 1,
    budgets: Annotated[list[int] | None, typer.Option("--budget", help="Shortest-budget mode: "
                       "try these epoch budgets in order, stop at the first whose median final "
                       "accuracy reaches the highest target.")] = None,
    stop_at_target: Annotated[bool, typer.Option(help="End each run once the highest target "
                              "is reached.")] = False,
    data_variant: Annotated[str, typer.Option(help="How the results name the data.",
                            rich_help_panel=DATA)] = "CIFAR-10 (JPEG-75 copy)",
    json_path: Annotated[Path | None, typer.Option("--json", help="Results file (default "
                         "benchmarks/results/time-to-accuracy-<recipe>-<device>.json); a .md "
                         "table goes beside it.")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue an interrupted run from its "
                      "last.pt (same options, one run, no --budget).", rich_help_panel=SYSTEM)
                      ] = None,
) -> None:
    """Wall time to reach target test accuracies (train / eval / warm-up split), per seed.

    Takes train's options (not --weights or --stop-at-accuracy); the run folders go under --out,
    their weights to --out/weights. Ctrl-C saves a checkpoint; a one-run benchmark continues
    with the same options plus --resume.
    """
    from fastcifar.benchmark.time_to_accuracy import benchmark_time_to_accuracy as run_benchmark
    from fastcifar.config import TimeToAccuracyConfig

    train_config = dataclasses.replace(train_config, weights_dir=train_config.out_dir / "weights",
                                       make_plots=False)
    device_name = ("cuda" if train_config.device == Device.auto and _cuda_available()
                   else train_config.device.value)
    json_path = json_path or Path(f"benchmarks/results/time-to-accuracy-{train_config.recipe}-"
                                  f"{device_name}.json")
    config = run_command(TimeToAccuracyConfig, train=train_config, targets=tuple(target),
                         runs=runs, stop_at_target=stop_at_target,
                         budgets=tuple(budgets or ()), json_path=json_path,
                         command=shlex.join(["fastcifar", *sys.argv[1:]]),
                         data_variant=data_variant,
                         resume=resume)
    report = run_command(run_benchmark, config, TableCallbacks())
    for budget, summary in report["median"].items():
        console.print(f"{budget} epochs: median " + ", ".join(
            f"{key}: {value}" for key, value in summary.items()))
    console.print(f"results: {json_path}")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@benchmark_app.command("loader")
def benchmark_loader(
    data: DataOption = Path("datasets"),
    workers: Annotated[int, typer.Option(help="Loader threads (FFCV) and worker processes "
                       "(torch DataLoader), 0 = one per core.", rich_help_panel=SYSTEM)] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per batch.",
                                            rich_help_panel=DATA)] = 512,
    passes: Annotated[int, typer.Option(help="Timed passes over the train set (after one "
                      "warm-up pass).", rich_help_panel=SYSTEM)] = 3,
    torchvision_batches: Annotated[int | None, typer.Option(help="Time the torchvision "
                                   "baseline over this many batches per pass instead of "
                                   "whole passes.", rich_help_panel=SYSTEM)] = None,
    jit_startup: Annotated[bool, typer.Option(help="Also time the fastcifar loader's first "
                           "batch in fresh processes, with a cold and a warm numba cache.",
                           rich_help_panel=SYSTEM)] = True,
    json_path: Annotated[Path | None, typer.Option("--json", help="Results file (default "
                         "benchmarks/results/loader-<date>.json); a .md table goes beside it.")
                         ] = None,
    compare_on_device: Annotated[bool, typer.Option(help="Time only fastcifar's FFCV loader "
                                 "(a copy per batch) against --data-on-device's resident data, "
                                 "both handing over normalised batches on --device.",
                                 rich_help_panel=SYSTEM)] = False,
    device: Annotated[Device, typer.Option(help="Where --compare-on-device hands over batches "
                      "(auto: CUDA, then MPS, then CPU).", rich_help_panel=SYSTEM)
                      ] = Device.auto,
    max_batches: Annotated[int | None, typer.Option(help="Time every pipeline over this many "
                           "batches per pass instead of whole passes.",
                           rich_help_panel=SYSTEM)] = None,
) -> None:
    """Train-set images/s: fastcifar's fused loader vs FFCV's built-in ops vs a torchvision
    DataLoader; or, with --compare-on-device, the FFCV path vs the device-resident one."""
    import time

    from fastcifar.benchmark.loader import benchmark_loader as run_benchmark
    from fastcifar.config import LoaderBenchmarkConfig

    json_path = json_path or Path(f"benchmarks/results/loader-{time.strftime('%Y-%m-%d')}.json")
    config = run_command(LoaderBenchmarkConfig, data_dir=data, workers=workers,
                         batch_size=batch_size, passes=passes,
                         torchvision_batches=torchvision_batches, jit_startup=jit_startup,
                         json_path=json_path, command=shlex.join(["fastcifar", *sys.argv[1:]]),
                         compare_on_device=compare_on_device, device=device,
                         max_batches=max_batches)

    def progress(stage: str, done: int, total: int) -> None:
        console.print(f"  {stage}: pass {done}/{total} (the first warms up)   ", end="\r")

    report = run_command(run_benchmark, config, progress)
    for row in report["results"]:
        console.print(f"{row['name']:<24} {row['images_per_s']:>10,.0f} images/s  build + "
                      f"first batch {row['build_seconds'] + row['first_batch_seconds']:.1f} s")
    console.print(f"results: {json_path} and {json_path.with_suffix('.md')}")


def entry() -> None:
    """`python -m fastcifar`."""
    app(prog_name="fastcifar")


if __name__ == "__main__":
    sys.exit(entry())
