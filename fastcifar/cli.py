"""The `fastcifar` command line: each command turns options into a config and calls the library."""

from __future__ import annotations

import dataclasses
import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fastcifar.benchmark.commands import benchmark_app
from fastcifar.config import (
    NO_AUGMENT,
    ConvertConfig,
    Device,
    LoaderConfig,
    OptimizerName,
    Precision,
    TrainConfig,
    optimizer_rule,
    recipe,
)
from fastcifar.errors import FastCifarError
from fastcifar.progress import (
    TableCallbacks,
    bars_are_drawn,
    print_evaluation,
    print_predictions,
    print_range_test,
    step_bar,
)
from fastcifar.shared_options import (
    AUGMENTATION,
    DATA,
    DEFAULT_RECIPE_NAME,
    EVALUATION,
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
from fastcifar.terminal import console, fail, run_command, show_tracebacks
from fastcifar.train_options import with_train_options

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  pretty_exceptions_show_locals=False,
                  help="Fast CIFAR-10 training: convert once to FFCV, train CustResNet, measure.")
app.add_typer(benchmark_app, name="benchmark")


@app.callback()
def main(debug: Annotated[bool, typer.Option(help="Show tracebacks for errors.")] = False) -> None:
    """Fast CIFAR-10 training on one machine."""
    show_tracebacks(debug)


# ---------------------------------------------------------------- convert


@app.command()
def convert(
    source: Annotated[Path | None, typer.Option(help="cifar-10-python.tar.gz, its extracted "
                      "folder, or an ImageFolder tree (or .tar.gz of one). Default: look in "
                      "--out, then the current folder, then download.",
                      rich_help_panel=DATA)] = None,
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
        if total and bars_are_drawn():
            console.print(f"  {stage}: {done:,}/{total:,}", end="\r")

    config = run_command(ConvertConfig, source=source, out_dir=out, force=force,
                         fix_images=fix_images, download=download)
    result = run_command(convert_dataset, config, progress)
    counts = result.metadata["counts"]
    verb = "up to date" if result.skipped else f"written in {result.seconds:.1f} s"
    console.print(f"{result.train_path} ({counts['train']:,}) and {result.test_path} "
                  f"({counts['test']:,}) {verb}; metadata {result.metadata_path}")


# ---------------------------------------------------------------- train


@app.command()
@with_train_options
def train(
    train_config: TrainConfig,
    weights: Annotated[Path, typer.Option(
        "--weights-dir", "--weights", help="Folder for the run's best and final weights "
        "(.safetensors); a folder here, where predict's --weights is a file.",
        rich_help_panel=SYSTEM)] = Path("weights"),
    resume: Annotated[str | None, typer.Option(help="Checkpoint to continue, or 'auto' for "
                      "the newest under --out.", rich_help_panel=SYSTEM)] = None,
    stop_at_accuracy: Annotated[float | None, typer.Option(help="End the run once test "
                                "accuracy reaches this (e.g. 0.90; a choice made on the test "
                                "set, as are the -best weights).",
                                rich_help_panel=EVALUATION)] = None,
) -> None:
    """Train CustResNet: OneCycle LR, mixed precision, per-epoch table, final and best weights saved.

    Options that show no default take the recipe's (--recipe).
    """
    from fastcifar.checkpoint import resume_checkpoint
    from fastcifar.training import train as run_training

    resume_path = run_command(resume_checkpoint, resume, train_config.out_dir)
    config = run_command(dataclasses.replace, train_config, weights_dir=weights,
                         resume=resume_path, stop_at_accuracy=stop_at_accuracy)
    rank_is_main = int(os.environ.get("RANK", "0")) == 0
    result = run_command(run_training, config, TableCallbacks(quiet=not rank_is_main))
    if rank_is_main:
        best_file = (f"weights {result.best_weights}" if result.best_weights else
                     "its weights are not in the weights folder")
        console.print(f"final test accuracy {result.final_accuracy:.2%} (weights "
                      f"{result.final_weights}); best test pass {result.best_accuracy:.2%} "
                      f"(chosen on the test set; {best_file}); run folder {result.run_dir}")


# ---------------------------------------------------------------- lr-find


class SweepMode(StrEnum):
    exp = "exp"
    linear = "linear"


@app.command()
def lr_find(
    recipe_name: Annotated[RecipeName, typer.Option("--recipe", help="The training recipe the "
                           "LR is for: its optimiser, weight decay, label smoothing, logit "
                           "scale, model and augmentation.", rich_help_panel=OPTIMISATION)
                           ] = DEFAULT_RECIPE_NAME,
    iters: Annotated[int, typer.Option(help="Steps of the sweep, one batch each.",
                                       rich_help_panel=OPTIMISATION)] = 200,
    start_lr: Annotated[float, typer.Option(help="LR of the first step.",
                                            rich_help_panel=OPTIMISATION)] = 1e-7,
    end_lr: Annotated[float, typer.Option(help="LR of the last step.",
                                          rich_help_panel=OPTIMISATION)] = 10.0,
    mode: Annotated[SweepMode, typer.Option(help="How the LR grows per step.",
                                            rich_help_panel=OPTIMISATION)] = SweepMode.exp,
    optimizer: Annotated[OptimizerName | None, typer.Option(help=OPTIMIZER_HELP,
                         rich_help_panel=OPTIMISATION)] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Weight decay (default: the "
                            "recipe's).", rich_help_panel=REGULARISATION)] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per step; the suggestion is for "
                          "this batch size (default: the recipe's).", rich_help_panel=OPTIMISATION)
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
    from fastcifar.command_config import LrFindConfig
    from fastcifar.range_test import lr_find as run_range_test

    base = run_command(recipe, recipe_name.value)
    batch_size = base.loader.batch_size if batch_size is None else batch_size
    loader = run_command(LoaderConfig, data_dir=data, batch_size=batch_size, workers=workers,
                         train_subset=train_subset)
    changes = {key: value for key, value in {"optimizer": optimizer,
               "weight_decay": weight_decay}.items() if value is not None}
    changes.update(optimizer_rule(optimizer, None))
    train_config = run_command(dataclasses.replace, base, loader=loader, augment=base.augment
                               if augment else NO_AUGMENT, device=device, precision=precision,
                               channels_last=channels_last, seed=seed, **changes)
    config = run_command(LrFindConfig, train=train_config, start_lr=start_lr, end_lr=end_lr,
                         iterations=iters, mode=mode.value, out_dir=out)
    with step_bar("range test", iters) as show_step:
        found = run_command(run_range_test, config, show_step)
    print_range_test(recipe_name.value, train_config, found)


# ---------------------------------------------------------------- summary


@app.command()
def summary(
    batch_size: Annotated[int, typer.Option(help="Batch size of the example input.")] = 1,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object (totals, "
                           "layer rows, receptive-field rows) instead of tables.")] = False,
) -> None:
    """CustResNet's layers and parameters (torchinfo) and its receptive field per layer."""
    import json

    from fastcifar.model import CustResNet, receptive_field_table, summary_record, summary_text

    if batch_size < 1:
        fail(FastCifarError(f"batch size must be positive, got {batch_size}"))
    model = CustResNet()
    if json_output:
        typer.echo(json.dumps(run_command(summary_record, model, batch_size), indent=2))
        return
    typer.echo(run_command(summary_text, model, batch_size))
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
    tta: Annotated[TTAMode | None, typer.Option(help="Test-time augmentation: none, flip "
                   "(the image and its mirror) or multicrop (also 1-px shifts, 6 passes). "
                   "Default: the mode stored with the weights.", show_default=False)] = None,
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
    from fastcifar.command_config import EvaluateConfig
    from fastcifar.evaluation import evaluate_weights

    loader = run_command(LoaderConfig, data_dir=data, batch_size=batch_size, workers=workers,
                         test_subset=test_subset)
    config = run_command(EvaluateConfig, weights=weights, loader=loader,
                         tta=tta.value if tta else None, out_dir=out,
                         device=device, precision=precision)
    print_evaluation(run_command(evaluate_weights, config))


# ---------------------------------------------------------------- predict


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(help="Image files (PNG, JPEG, WebP, ...) or "
                     "folders of them.", show_default=False)],
    weights: Annotated[Path | None, typer.Option(help="A .safetensors weights file from train, "
                       "or an .onnx file from export (run by onnxruntime); default: the "
                       "shipped weights, which install with the package.",
                       show_default=False)] = None,
    top_k: Annotated[int, typer.Option(help="Classes shown per image.")] = 3,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    keep_going: Annotated[bool, typer.Option(help="Report unreadable inputs and predict the "
                          "others (the exit status is still 1).")] = False,
    device: DeviceOption = Device.auto,
) -> None:
    """The most likely classes of your images; other sizes than 32x32 are resized (a warning)."""
    from fastcifar.command_config import PredictConfig
    from fastcifar.prediction import predict as run_predict

    config = run_command(PredictConfig, paths=tuple(paths), top_k=top_k, keep_going=keep_going,
                         device=device, **({"weights": weights} if weights else {}))
    report = run_command(run_predict, config)
    print_predictions(report, json_output)
    if report.problems:
        raise typer.Exit(1)


# ---------------------------------------------------------------- export


@app.command()
def export(
    weights: Annotated[Path, typer.Argument(help="A .safetensors weights file written by "
                                               "train.")],
    onnx: Annotated[Path, typer.Option("--onnx", help="The ONNX file to write (uint8 NCHW "
                    "images in, logits out; batch axis dynamic).")],
    tta: Annotated[TTAMode | None, typer.Option(help="TTA built into the graph (default: the "
                   "mode stored with the weights).", show_default=False)] = None,
    data: DataOption = Path("datasets"),
    check: Annotated[int, typer.Option(help="Check the graph against PyTorch on this many test "
                     "images with onnxruntime (skipped without converted data); 0 = no "
                     "check.")] = 1000,
) -> None:
    """Export weights to ONNX with normalisation and TTA inside; class names, mean/std and the
    TTA mode in its metadata. `predict --weights OUT.onnx` runs it with onnxruntime."""
    from fastcifar.command_config import ExportConfig
    from fastcifar.export import export_onnx

    config = run_command(ExportConfig, weights=weights, out=onnx,
                         tta=tta.value if tta else None, data_dir=data, check_images=check)
    report = run_command(export_onnx, config)
    checked = (f"; checked on {report.checked_images:,} test images: largest logit difference "
               f"{report.max_logit_difference:.1e}, same top-1 on "
               f"{report.top1_agreement:.2%}" if report.checked_images else
               "; not checked (--check 0)" if check == 0 else "; not checked (no converted data)")
    console.print(f"wrote {report.path} ({report.bytes / 1e6:.1f} MB, {report.tta} TTA in the "
                  f"graph){checked}")


# ---------------------------------------------------------------- show-augment


@app.command()
def show_augment(
    recipe_name: Annotated[RecipeName, typer.Option("--recipe", help="Whose augmentation to "
                           "show.", rich_help_panel=AUGMENTATION)] = DEFAULT_RECIPE_NAME,
    count: Annotated[int, typer.Option(help="Images in each grid (the first N train images, at "
                                            "most 1,024).",
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
                  f"recipe's augmentation, seed {seed})")


def entry() -> None:
    """`python -m fastcifar`."""
    app(prog_name="fastcifar")


if __name__ == "__main__":
    sys.exit(entry())
