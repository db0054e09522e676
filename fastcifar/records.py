"""What a run records: per-epoch stats, test passes and the run's result, as plain dataclasses
that the loop writes and checkpoints, reports and benchmarks read."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from fastcifar.atomic import file_set, write_json, write_text

if TYPE_CHECKING:
    from torch import nn

    from fastcifar.device import PrecisionPlan


@dataclass(frozen=True)
class EpochStats:
    """One row of the per-epoch table."""

    epoch: int  # 1-based
    lr: float  # LR of the epoch's last step
    train_loss: float
    train_accuracy: float
    test_loss: float | None  # None: no test pass at this epoch's end (--eval-from-epoch)
    test_accuracy: float | None
    train_seconds: float  # this epoch's training steps
    eval_seconds: float  # this epoch's evaluations (the epoch end's and any in the epoch)
    images_per_second: float  # training images per second of train time
    steps: int  # optimiser steps so far
    holdout_accuracy: float | None = None  # on the held-out train images (--holdout)
    train_size: int = 32  # side of the train images, px (below 32: progressive resizing)


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


def epochs_csv(history: list[EpochStats]) -> str:
    """The per-epoch rows as CSV (a header of EpochStats' field names; empty cells where an
    epoch had no test pass), for spreadsheets."""
    text = io.StringIO()
    writer = csv.DictWriter(text, [field.name for field in fields(EpochStats)],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(asdict(row) for row in history)
    return text.getvalue()


def write_metrics(run_dir: Path, history: list[EpochStats], evaluations: list[Evaluation],
                  warmup_seconds: float, best_accuracy: float, **extra: object) -> None:
    """`metrics.json`, and `metrics.csv` for spreadsheets: every epoch row and test pass so far
    (one file set: a fault leaves both as they were)."""
    with file_set():
        write_json(run_dir / "metrics.json",
                   {"epochs": [asdict(row) for row in history],
                    "evaluations": [asdict(row) for row in evaluations],
                    "warmup_seconds": warmup_seconds, "best_accuracy": best_accuracy, **extra})
        write_text(run_dir / "metrics.csv", epochs_csv(history))


def epoch_end_evaluations(history: list[EpochStats]) -> list[Evaluation]:
    """The evaluations a run without in-epoch evaluations made: one per evaluated epoch end."""
    evaluations, train_seconds, eval_seconds = [], 0.0, 0.0
    for row in history:
        train_seconds += row.train_seconds
        eval_seconds += row.eval_seconds
        if row.test_accuracy is None:
            continue
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
