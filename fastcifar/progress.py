"""How runs and reports look in a terminal: a Rich progress bar per epoch and one table row
after it, the range test's bar, and each command's closing lines."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
from rich.table import Table

from fastcifar.terminal import console, print_problem

if TYPE_CHECKING:  # annotations only: the commands import these modules lazily
    from fastcifar.config import TrainConfig
    from fastcifar.device import PrecisionChoice
    from fastcifar.evaluation import EvaluationReport
    from fastcifar.prediction import PredictReport
    from fastcifar.range_test import LrFindResult
    from fastcifar.records import EpochStats, Evaluation


def bars_are_drawn() -> bool:
    """Whether progress bars and one-line counters are drawn: on a terminal only (not a dumb
    one). Elsewhere (a log file, a pipe) a transient bar cannot be erased: each one left an
    empty line between the table's rows, and the counters piled up on one line."""
    return console.is_terminal and not console.is_dumb_terminal


def optimiser_text(config: TrainConfig) -> str:
    """The optimisers and peak LRs a run trains with, for its header: Muon's as well, since a
    budget row (from 12 epochs, the default recipe) changes them without a flag."""
    text = f"{config.optimizer.value} max LR {config.max_lr:g}"
    if config.muon_lr:
        filters = "normalized" if config.muon_normalize_filters else "raw"
        text += f", Muon LR {config.muon_lr:g} on {filters} filters"
    return text


class TableCallbacks:
    """Draws a progress bar per epoch (on a terminal) and one table row after it (rank 0 only)."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.progress = Progress("epoch {task.fields[epoch]}", BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), console=console, transient=True,
                                 disable=quiet or not bars_are_drawn())
        self.task = None

    def on_train_start(self, config: TrainConfig, steps_per_epoch: int, device: object,
                       precision: str, run_dir: Path) -> None:
        if self.quiet:
            return
        batch = config.loader.batch_size
        if config.select_fraction < 1:  # train acc and images/s then count the kept images
            from fastcifar.config import kept_per_batch

            batch = f"{batch}, the proxy's hardest {kept_per_batch(config.select_fraction, batch)}"
        console.print(f"recipe {config.recipe} | {config.epochs} epochs x {steps_per_epoch} "
                      f"steps | batch {batch} | {optimiser_text(config)} | {device} {precision} "
                      f"| run folder {run_dir}")
        console.print(f"{'epoch':>5} {'px':>3} {'lr':>9} {'train loss':>10} {'train acc':>9} "
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

    def on_epoch(self, stats: EpochStats) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
            self.progress.stop()
        if self.quiet:
            return
        test = ((f"{stats.test_loss:>9.4f} {stats.test_accuracy:>8.2%}")
                if stats.test_accuracy is not None else f"{'-':>9} {'-':>8}")  # not evaluated
        console.print(f"{stats.epoch:>5} {stats.train_size:>3} {stats.lr:>9.2e} "
                      f"{stats.train_loss:>10.4f} "
                      f"{stats.train_accuracy:>9.2%} {test} {stats.train_seconds:>8.1f} "
                      f"{stats.images_per_second:>9.0f}")

    def on_evaluation(self, evaluation: Evaluation) -> None:
        """A row for an evaluation inside an epoch: its fractional epoch and test columns."""
        if self.quiet:
            return
        console.print(f"{evaluation.epochs:>5.2f} {'':>3} {'':>9} {'':>10} {'':>9} "
                      f"{evaluation.test_loss:>9.4f} {evaluation.test_accuracy:>8.2%}")

    def on_precision(self, choice: PrecisionChoice) -> None:
        """The precision --precision auto chose on the CPU and the rates it measured."""
        if not self.quiet:
            console.print(f"precision auto: {choice.describe()} on the first batch")


@contextmanager
def step_bar(label: str, total: int) -> Iterator[Callable[[int, int], None]]:
    """A transient bar (on a terminal); yields the `(done, total)` callback that moves it."""
    with Progress(label, BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True, disable=not bars_are_drawn()) as bar:
        task = bar.add_task("", total=total)
        yield lambda done, _total: bar.update(task, completed=done)


def print_range_test(recipe_name: str, train_config: TrainConfig, found: LrFindResult) -> None:
    """What the LR range test ran on and what it suggests."""
    diverged = ", stopped early as the loss diverged" if found.stopped_early else ""
    console.print(f"{recipe_name} recipe ({train_config.optimizer.value}, weight decay "
                  f"{train_config.weight_decay:g}): {len(found.lrs)} steps at batch "
                  f"{train_config.loader.batch_size} on {found.device} {found.precision} in "
                  f"{found.seconds:.0f} s{diverged}")
    if train_config.muon_lr:
        console.print(f"Muon was off for the sweep (one optimiser's LR is swept): the suggestion "
                      f"is the SGD LR; Muon keeps --muon-lr {train_config.muon_lr:g}")
    console.print(f"suggested max LR {found.suggested_lr:.3g} (steepest descent); min-loss LR / "
                  f"10: {found.min_loss_lr_over_10:.3g}; plot {found.plot_path}, history "
                  f"{found.history_path}")


def print_evaluation(report: EvaluationReport) -> None:
    """Per-class accuracy as a table, then the overall line."""
    table = Table("class", "accuracy", title="per class")
    for name, accuracy in report.per_class_accuracy.items():
        table.add_row(name, f"{accuracy:.2%}")
    console.print(table)
    tta_source = "stored with the weights" if report.tta_from_weights else "as asked"
    console.print(f"test accuracy {report.accuracy:.2%} on {report.count:,} images "
                  f"({report.tta_mode} TTA {tta_source}, {report.device} "
                  f"{report.precision}; {report.misclassified_total:,} wrong); figures and JSON "
                  f"in {report.json_path.parent}")


def print_predictions(report: PredictReport, json_output: bool) -> None:
    """Top classes per image on stdout (or one JSON object); warnings and errors on stderr."""
    for row in report.predictions:
        if row.resized_from:
            print_problem("warning", f"{row.path}: resized from {row.resized_from[0]}x"
                                     f"{row.resized_from[1]} to 32x32")
    if json_output:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for row in report.predictions:
            typer.echo(f"{row.path}: " + ", ".join(f"{name} {probability:.1%}"
                                                   for name, probability in row.top))
    for problem in report.problems:
        print_problem("error", problem)


def print_time_to_accuracy(report: dict, json_path: Path) -> None:
    """Each budget's medians, which runs' target figures are upper bounds, then where the
    results file is."""
    from fastcifar.benchmark.time_to_accuracy import scoring_gap_note

    for budget, summary in report["median"].items():
        console.print(f"{budget} epochs: median " + ", ".join(
            f"{key}: {value}" for key, value in summary.items()))
    note = scoring_gap_note(report.get("runs", []))
    if note:
        console.print(note)
    console.print(f"results: {json_path}")


def show_pass(stage: str, done: int, total: int) -> None:
    """The loader benchmark's progress, on one line (on a terminal)."""
    if not bars_are_drawn():
        return
    console.print(f"  {stage}: pass {done}/{total} (the first warms up)   ", end="\r")


def print_loader_benchmark(report: dict, json_path: Path) -> None:
    """Each pipeline's images/s and start-up time, then where the results are."""
    for row in report["results"]:
        console.print(f"{row['name']:<24} {row['images_per_s']:>10,.0f} images/s  build + "
                      f"first batch {row['build_seconds'] + row['first_batch_seconds']:.1f} s")
    console.print(f"results: {json_path} and {json_path.with_suffix('.md')}")
