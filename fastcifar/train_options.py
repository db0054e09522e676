"""The train options, declared once: `build_train_config` turns them into a TrainConfig, and
`with_train_options` gives them to `train` and `benchmark time-to-accuracy`."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from fastcifar.augment_options import augment_with_options, no_augment_refusing_options
from fastcifar.command_config import tta_flags
from fastcifar.config import (
    Device,
    OptimizerName,
    Precision,
    TrainConfig,
    optimizer_rule,
    recipe,
)
from fastcifar.errors import FastCifarError
from fastcifar.shared_options import (
    AUGMENTATION,
    DATA,
    DEFAULT_RECIPE_NAME,
    EVALUATION,
    NETWORK,
    OPTIMISATION,
    OPTIMIZER_HELP,
    REGULARISATION,
    SYSTEM,
    DataOption,
    DeviceOption,
    PrecisionOption,
    RecipeName,
    TestSubsetOption,
    TrainSubsetOption,
    TTAMode,
    WorkersOption,
)
from fastcifar.terminal import console, fail, run_command

# What each train option group gives: an edit of the recipe's config.
ConfigEdit = Callable[[TrainConfig], TrainConfig]


def _torchrun_environment() -> tuple[bool, int]:
    """(distributed?, local rank) from the variables torchrun sets."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return world_size > 1, int(os.environ.get("LOCAL_RANK", "0"))


def recipe_options(
    recipe_name: Annotated[RecipeName, typer.Option("--recipe", help="Named defaults: "
                           "express-progressive (the default: express-muon training on 20 to "
                           "32 px images over the first 60% of the epochs), express-muon "
                           "(express with Muon on the conv filters), express (fast plus BN, "
                           "whitening, flip and TTA tricks), fast (SGD-Nesterov, label "
                           "smoothing, TTA) or seed (the original Adam recipe).",
                           rich_help_panel=OPTIMISATION)] = DEFAULT_RECIPE_NAME,
    epochs: Annotated[int | None, typer.Option(help="Epochs; the OneCycle schedule and the "
                      "recipe's budget rows (settings that follow the budget; see the run's "
                      "header) follow it (recipe default: 24).", rich_help_panel=OPTIMISATION)
                      ] = None,
) -> TrainConfig:
    """The named recipe at the epoch budget, its budget rows applied: what the other option
    groups edit."""
    return recipe(recipe_name.value, **({} if epochs is None else {"epochs": epochs}))


def optimisation_options(
    batch_size: Annotated[int | None, typer.Option(help="Images per batch, a step each (default "
                          "512; --select-fraction trains on part); per process under torchrun, "
                          "the LR not rescaled.", rich_help_panel=OPTIMISATION)] = None,
    select_fraction: Annotated[float | None, typer.Option(help="Step on this fraction of each "
                               "batch: the images a quarter-width proxy net, trained alongside, "
                               "finds hardest (0.5 with --batch-size 1024: 512 of 1024); 1 = "
                               "all (default: the recipe's).", rich_help_panel=OPTIMISATION)
                               ] = None,
    optimizer: Annotated[OptimizerName | None, typer.Option(help=OPTIMIZER_HELP,
                         rich_help_panel=OPTIMISATION)] = None,
    max_lr: Annotated[float | None, typer.Option(help="Peak LR of OneCycle, or 'auto' to run the "
                      "LR range test first (default: the recipe's). With Muon (express-muon, "
                      "express-progressive) it moves the SGD groups only (BN shifts, head): "
                      "--muon-lr sets the filters', and 'auto' sweeps with Muon off.",
                      rich_help_panel=OPTIMISATION)] = None,
    min_lr: Annotated[float | None, typer.Option(help="LR at the end of the schedule. Muon's "
                      "LR ends at the same fraction of its peak (min LR / max LR), so "
                      "--max-lr or --min-lr moves its end too.",
                      rich_help_panel=OPTIMISATION)] = None,
    initial_lr_fraction: Annotated[float | None, typer.Option(
        help="The schedule starts at max LR x this.", rich_help_panel=OPTIMISATION)] = None,
    pct_start: Annotated[float | None, typer.Option(help="Fraction of the steps spent warming "
                         "up to the peak LR.", rich_help_panel=OPTIMISATION)] = None,
    momentum: Annotated[float | None, typer.Option(help="SGD momentum (default: the recipe's); "
                        "refused where it would be ignored: under Adam and with a cycled "
                        "momentum (the seed recipe).", rich_help_panel=OPTIMISATION)] = None,
    muon_lr: Annotated[float | None, typer.Option(help="Peak LR of Muon for the conv filters "
                       "(SGD keeps the rest); 0 = off.", rich_help_panel=OPTIMISATION)] = None,
    muon_momentum: Annotated[float | None, typer.Option(help="Muon's Nesterov momentum "
                             "(default: the recipe's).", rich_help_panel=OPTIMISATION)] = None,
    muon_normalize_filters: Annotated[bool | None, typer.Option(
        "--muon-normalize-filters/--no-muon-normalize-filters", help="Rescale each conv "
        "layer's filters to Frobenius norm sqrt(output channels) before each Muon step "
        "(default: the recipe's).",
        rich_help_panel=OPTIMISATION)] = None,
    train_size_start: Annotated[int | None, typer.Option(help="Progressive resizing: side (px) "
                                "of epoch 1's train images, growing to 32 over "
                                "--train-size-ramp of the run; 32 = off (default: the "
                                "recipe's).", rich_help_panel=OPTIMISATION)] = None,
    train_size_ramp: Annotated[float | None, typer.Option(help="Fraction of the epochs over "
                               "which the train images grow to 32 px; 0 = off (default: the recipe's).",
                               rich_help_panel=OPTIMISATION)] = None,
) -> ConfigEdit:
    """The optimiser, its LR schedule, the batch (and what of it trains) and progressive
    resizing: one rule for --optimizer (optimizer_rule); --momentum refused where ignored."""
    changes = _given(optimizer=optimizer, pct_start=pct_start, momentum=momentum,
                     muon_lr=muon_lr, muon_momentum=muon_momentum,
                     muon_normalize_filters=muon_normalize_filters, min_lr=min_lr,
                     initial_lr_fraction=initial_lr_fraction, train_size_start=train_size_start,
                     train_size_ramp=train_size_ramp, select_fraction=select_fraction)
    changes.update(optimizer_rule(optimizer, muon_lr, muon_normalize_filters))

    def edit(config: TrainConfig) -> TrainConfig:
        if momentum is not None and (config.cycle_momentum or changes.get(
                "optimizer", config.optimizer) != OptimizerName.sgd):
            raise FastCifarError("--momentum sets SGD's fixed momentum: this run uses Adam or "
                                 "cycles momentum (0.85-0.95), so it would be ignored")
        if max_lr is not None:
            config = config.with_max_lr(max_lr)
        if batch_size is not None:
            config = dataclasses.replace(config, loader=dataclasses.replace(
                config.loader, batch_size=batch_size))
        return dataclasses.replace(config, **changes)
    return edit


def regularisation_options(
    weight_decay: Annotated[float | None, typer.Option(help="Weight decay (default: the "
                            "recipe's).", rich_help_panel=REGULARISATION)] = None,
    decay_norm: Annotated[bool | None, typer.Option(
        "--decay-norm/--no-decay-norm", help="Weight decay on BatchNorm parameters too.",
        rich_help_panel=REGULARISATION)] = None,
    label_smoothing: Annotated[float | None, typer.Option(help="Label smoothing (default: the "
                               "recipe's).", rich_help_panel=REGULARISATION)] = None,
    logit_scale: Annotated[float | None, typer.Option(help="Constant multiplier of the logits "
                           "(default: the recipe's).", rich_help_panel=REGULARISATION)] = None,
    ema: Annotated[float | None, typer.Option(help="Per-step weight EMA decay, 0 = off "
                   "(default: the recipe's).", rich_help_panel=REGULARISATION)] = None,
    lookahead_every: Annotated[int | None, typer.Option(help="Lookahead weight average every "
                               "N steps, copied back into the live weights; 0 = off.",
                               rich_help_panel=REGULARISATION)] = None,
) -> ConfigEdit:
    """Weight decay, label smoothing, the logit scale and weight averaging."""
    return _replacing(weight_decay=weight_decay, decay_norm=decay_norm,
                      label_smoothing=label_smoothing, logit_scale=logit_scale, ema_decay=ema,
                      lookahead_every=lookahead_every)


def network_options(
    bn_momentum: Annotated[float | None, typer.Option(help="BatchNorm running-stat momentum "
                           "(torch default 0.1).", rich_help_panel=NETWORK)] = None,
    bn_eps: Annotated[float | None, typer.Option(help="BatchNorm epsilon (torch: 1e-5).",
                      rich_help_panel=NETWORK)] = None,
    bn_frozen_scale: Annotated[bool | None, typer.Option(
        "--bn-frozen-scale/--no-bn-frozen-scale", help="Keep BatchNorm scales at 1 (not "
        "trained).", rich_help_panel=NETWORK)] = None,
    bn_bias_lr_scale: Annotated[float | None, typer.Option(help="BatchNorm shifts train at LR x "
                                "this and weight decay / this.",
                                rich_help_panel=NETWORK)] = None,
    whiten: Annotated[bool | None, typer.Option(
        "--whiten/--no-whiten", help="Prep conv as a fixed 3x3 PCA whitening of train patches "
        "plus a trained 1x1 conv (folds back into the 3x3 conv in saved weights).",
        rich_help_panel=NETWORK)] = None,
    whiten_init: Annotated[bool | None, typer.Option("--whiten-init/--no-whiten-init",
                           help="Start the prep conv as a whitening of 3x3 train patches.",
                           rich_help_panel=NETWORK)] = None,
    dirac_init: Annotated[bool | None, typer.Option(
        "--dirac-init/--no-dirac-init", help="Each 3x3 conv's first in-channel filters start "
        "as the identity.", rich_help_panel=NETWORK)] = None,
    zero_init_residual: Annotated[bool | None, typer.Option(
        "--zero-init-residual/--no-zero-init-residual", help="Start each residual branch's "
        "last BatchNorm scale at zero.", rich_help_panel=NETWORK)] = None,
) -> ConfigEdit:
    """How CustResNet's layers start and normalise (its layers themselves are fixed)."""
    return _replacing(bn_momentum=bn_momentum, bn_eps=bn_eps, bn_frozen_scale=bn_frozen_scale,
                      bn_bias_lr_scale=bn_bias_lr_scale, whiten=whiten, whiten_init=whiten_init,
                      dirac_init=dirac_init, zero_init_residual=zero_init_residual)


def evaluation_options(
    tta: Annotated[TTAMode | None, typer.Option(
        help="Test-time augmentation of the test passes, as evaluate and export take it: none, "
        "flip (2 passes) or multicrop (the flip and 1-px up-left and down-right shifts, "
        "weighted 0.5/0.25/0.25: 6 passes); stored with the weights. Default: the recipe's.",
        rich_help_panel=EVALUATION, show_default=False)] = None,
    no_tta: Annotated[bool, typer.Option("--no-tta", help="The same as --tta none.",
                                         rich_help_panel=EVALUATION)] = False,
    eval_every_steps: Annotated[int, typer.Option(help="Also evaluate every this many steps "
                                "inside the last --eval-steps-epochs epochs (below the steps of an "
                                "epoch); 0 = at epoch ends only.", rich_help_panel=EVALUATION)] = 0,
    eval_steps_epochs: Annotated[int, typer.Option(help="How many final epochs get the "
                                 "--eval-every-steps evaluations.",
                                 rich_help_panel=EVALUATION)] = 1,
    eval_from_epoch: Annotated[int | None, typer.Option(help="Test passes at epoch ends from "
                               "this epoch on; the last always gets one. Default: every epoch "
                               "on CUDA or with a stop at a target (train's --stop-at-accuracy, "
                               "the benchmark's --stop-at-target), else the last only (on a "
                               "CPU a multi-crop pass costs ~0.37 of an epoch).",
                               rich_help_panel=EVALUATION)] = None,
) -> ConfigEdit:
    """Test-time augmentation and when the test passes run."""
    if no_tta and tta not in (None, TTAMode.none):
        raise FastCifarError(f"--no-tta and --tta {tta.value} disagree: give one of them")
    mode = TTAMode.none if no_tta else tta
    flip, shifts = tta_flags(mode.value) if mode else (None, None)
    return _replacing(tta=flip, tta_shifts=shifts, eval_every_steps=eval_every_steps,
                      eval_steps_epochs=eval_steps_epochs, eval_from_epoch=eval_from_epoch,
                      keep_none={"eval_from_epoch"})


def augmentation_options(
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="Train "
                       "augmentation on/off (--no-augment takes no other augmentation "
                       "option).", rich_help_panel=AUGMENTATION)] = True,
    cutout: Annotated[int | None, typer.Option(help="Cutout hole side in pixels, 0 = off; on a "
                      "recipe without holes it turns one on (see --cutout-count).",
                      rich_help_panel=AUGMENTATION)] = None,
    cutout_count: Annotated[int | None, typer.Option(help="Cutout holes per image (default: "
                            "the recipe's, or 1 when --cutout turns cutout on).",
                            rich_help_panel=AUGMENTATION)] = None,
    jitter: Annotated[float | None, typer.Option(help="Brightness/contrast/saturation "
                      "jitter magnitude, applied to half the images (any recipe); 0 turns "
                      "colour jitter off, the recipe's hue jitter too unless --hue is given.",
                      rich_help_panel=AUGMENTATION)] = None,
    hue: Annotated[float | None, typer.Option(help="Hue jitter (fraction of a turn), applied "
                   "to half the images with the other colour jitter (any recipe).",
                   rich_help_panel=AUGMENTATION)] = None,
    p_gray: Annotated[float | None, typer.Option(help="Grayscale probability.",
                      rich_help_panel=AUGMENTATION)] = None,
    pad: Annotated[int | None, typer.Option(help="Padding (pixels) before the random crop.",
                   rich_help_panel=AUGMENTATION)] = None,
    flip_alternate: Annotated[bool | None, typer.Option(
        "--flip-alternate/--no-flip-alternate", help="Flip a random half in the first epoch, "
        "then each image the other way every epoch.", rich_help_panel=AUGMENTATION)] = None,
) -> ConfigEdit:
    """The recipe's train augmentation with these options replacing its settings, or none."""
    options = (cutout, jitter, hue, p_gray, pad, flip_alternate, cutout_count)
    if not augment:
        no_augment = no_augment_refusing_options(*options)
        return lambda config: dataclasses.replace(config, augment=no_augment)
    return lambda config: dataclasses.replace(
        config, augment=augment_with_options(config.augment, *options))


def data_options(
    data: DataOption = Path("datasets"),
    train_subset: TrainSubsetOption = None,
    test_subset: TestSubsetOption = None,
    holdout: Annotated[int, typer.Option(help="Hold out N train images (stratified, the same "
                       "for every seed) and report accuracy on them at each evaluation; with "
                       "--train-subset M it trains on M - N.",
                       rich_help_panel=DATA)] = 0,
    data_on_device: Annotated[bool, typer.Option(help="Keep every converted image in device "
                              "memory and augment train batches there with torch ops (one "
                              "process only; another train order than FFCV's). For GPUs: on a "
                              "CPU it is slower (0.04-0.26x measured).",
                              rich_help_panel=DATA)] = False,
) -> ConfigEdit:
    """Which images train and test, where they live, and this process's shard under torchrun."""
    distributed = _torchrun_environment()[0]
    return lambda config: dataclasses.replace(config, loader=dataclasses.replace(
        config.loader, data_dir=data, train_subset=train_subset, test_subset=test_subset,
        holdout=holdout, on_device=data_on_device, distributed=distributed))


def system_options(
    device: DeviceOption = Device.auto,
    precision: PrecisionOption = Precision.auto,
    channels_last: Annotated[bool, typer.Option(help="Channels-last memory format.",
                             rich_help_panel=SYSTEM)] = True,
    compile_model: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile "
                             "the model.", rich_help_panel=SYSTEM)] = False,
    workers: WorkersOption = 0,
    tensorboard: Annotated[bool, typer.Option(help="TensorBoard event files in the run folder "
                           "(`tensorboard --logdir runs`): per-step loss, LR per group, "
                           "images/s; per test pass loss and accuracy.",
                           rich_help_panel=SYSTEM)] = True,
    seed: Annotated[int, typer.Option(help="Seed for weights, order and augmentation (the "
                                      "first seed of a benchmark).", rich_help_panel=SYSTEM)] = 0,
    out: Annotated[Path, typer.Option(help="Folder that gets one run folder per run.",
                                      rich_help_panel=SYSTEM)] = Path("runs"),
) -> ConfigEdit:
    """The device, precision, memory format, compile, loader threads, TensorBoard, seed, run
    folder and torchrun's local rank."""
    local_rank = _torchrun_environment()[1]
    return lambda config: dataclasses.replace(
        config, device=device, precision=precision, channels_last=channels_last,
        compile=compile_model, tensorboard=tensorboard, seed=seed, out_dir=out,
        local_rank=local_rank, loader=dataclasses.replace(config.loader, workers=workers))


# The train options by --help panel, applied in this order to the recipe_options' recipe. Each
# config check pairs fields of one group, so no valid end config is refused halfway; a check
# across groups would depend on this order.
OPTION_GROUPS: tuple[Callable[..., ConfigEdit], ...] = (
    optimisation_options, regularisation_options, network_options, evaluation_options,
    augmentation_options, data_options, system_options)


def build_train_config(**options: object) -> TrainConfig:
    """The recipe with every train option the user gave replacing its default.

    Its parameters, the option groups' (see `train_option_parameters`), are also the train
    options of `train` and `benchmark time-to-accuracy` (see `with_train_options`)."""
    parameters = {parameter.name for parameter in train_option_parameters()}
    _require_known(options, parameters)
    config = recipe_options(**_options_of(recipe_options, options))
    for group in OPTION_GROUPS:
        config = group(**_options_of(group, options))(config)
    return config


def train_option_parameters() -> list[inspect.Parameter]:
    """Every train option as a keyword-only parameter, group by group."""
    return [parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for group in (recipe_options, *OPTION_GROUPS)
            for parameter in inspect.signature(group, eval_str=True).parameters.values()]


def _options_of(group: Callable[..., object], options: dict[str, object]) -> dict[str, object]:
    """The options that `group` takes (the ones not given keep its defaults)."""
    names = inspect.signature(group).parameters
    return {name: value for name, value in options.items() if name in names}


def _require_known(options: dict[str, object], parameters: set[str]) -> None:
    unknown = sorted(set(options) - parameters)
    if unknown:
        raise TypeError(f"build_train_config got unknown options: {', '.join(unknown)}")


def _given(**values: object) -> dict[str, object]:
    """The values an option group was given (None: the option was not given)."""
    return {key: value for key, value in values.items() if value is not None}


def _replacing(keep_none: frozenset[str] | set[str] = frozenset(), **values: object) -> ConfigEdit:
    """An edit that sets each given value (and each name in keep_none, even to None)."""
    changes = {key: value for key, value in values.items()
               if value is not None or key in keep_none}
    return lambda config: dataclasses.replace(config, **changes)


def with_train_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give `command` every train option after its own: it is called with its own options
    plus `train_config`, the config they build (`--max-lr auto` runs the LR range test first)."""
    shared = train_option_parameters()
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
            fail(FastCifarError("--max-lr auto with --resume: the checkpoint already holds its "
                                 "LR; drop --max-lr"))
        numeric_lr = None if max_lr in (None, "auto") else run_command(_parse_float, max_lr,
                                                                       "max-lr")
        config = run_command(build_train_config, **options, max_lr=numeric_lr)
        if max_lr == "auto" and config.loader.distributed:
            # Each rank would run its own range test on its own shard and pick its own LR.
            fail(FastCifarError("--max-lr auto is not supported under torchrun: run "
                                 "`fastcifar lr-find` once and pass its suggestion as --max-lr"))
        if max_lr == "auto":
            config = run_command(_with_found_lr, config)
        command(train_config=config, **values)

    command_with_train_options.__signature__ = inspect.Signature(own + shared)
    return command_with_train_options


def _parse_float(text: str, option: str) -> float:
    try:
        return float(text)
    except ValueError as error:
        raise FastCifarError(f"--{option} takes a number or 'auto', got {text!r}") from error


def _with_found_lr(config: TrainConfig) -> TrainConfig:
    """Run the LR range test with the train settings and use its suggestion as max LR."""
    from fastcifar.command_config import LrFindConfig
    from fastcifar.range_test import lr_find

    finder = LrFindConfig(train=config, out_dir=Path(config.out_dir) / "lr-find")
    found = lr_find(finder)
    console.print(f"LR range test suggests max LR {found.suggested_lr:.3g} ({found.plot_path})")
    return config.with_max_lr(found.suggested_lr)
