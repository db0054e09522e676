"""An epoch's clock and running sums, and the hooks (`TrainCallbacks`) and interrupt
(`TrainingInterrupted`) through which the training loop reports."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fastcifar.distributed import Distributed, all_reduce_sum, finite_on_every_rank
from fastcifar.errors import FastCifarError

if TYPE_CHECKING:
    from fastcifar.config import TrainConfig
    from fastcifar.device import PrecisionChoice
    from fastcifar.records import EpochStats, Evaluation


# ---------------------------------------------------------------- callbacks


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
        # The benchmarks/ scripts take no --resume.
        self.script_message = (f"interrupted; checkpoint saved to {checkpoint}: this script does "
                               "not resume its runs, so run it again (the run's options are in "
                               f"{Path(checkpoint).parent / 'run.json'})")


# ---------------------------------------------------------------- the epoch's clock and sums


class EpochClock:
    """One epoch's train and evaluation seconds, placed on the run's clock.

    Training time pauses while evaluating; `restart` drops time spent off the clock (the
    warm-up, re-reading the batches trained before an interrupt).
    """

    def __init__(self, device: torch.device, history: list[EpochStats],
                 partial: dict | None = None) -> None:
        self.device = device
        self.trained_before = sum(row.train_seconds for row in history)
        self.evaluated_before = sum(row.eval_seconds for row in history)
        self.train_seconds = partial["train_seconds"] if partial else 0.0
        self.eval_seconds = partial.get("eval_seconds", 0.0) if partial else 0.0
        self.started: float | None = time.perf_counter()  # None: training is paused

    def restart(self) -> None:
        self.started = time.perf_counter()

    def stop_training(self) -> None:
        """Add the train time since the last (re)start, once; waits for the device's queue."""
        if self.started is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.train_seconds += time.perf_counter() - self.started
        self.started = None

    def train_seconds_so_far(self) -> float:
        """This epoch's train time up to now, without waiting for the device (interrupts)."""
        running = time.perf_counter() - self.started if self.started is not None else 0.0
        return self.train_seconds + running


class TrainSums:
    """An epoch's running loss, correct and seen counts, kept on the device: no sync per step."""

    def __init__(self, device: torch.device, partial: dict | None = None,
                 is_main: bool = True) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.seen = 0
        if partial is not None and is_main:  # a checkpoint's sums are all ranks' together
            self.loss_sum += partial["loss_sum"]
            self.correct += partial["correct"]
            self.seen = partial["seen"]

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum += loss.detach().float() * len(labels)
        self.correct += (logits.detach().argmax(1) == labels).sum()
        self.seen += len(labels)

    def finite(self, distributed: Distributed) -> bool:
        """Whether every rank's loss so far is finite: one host sync (and under torchrun one
        all-reduce), so call it every few steps. All ranks get the same answer and stop at the
        same step; a rank that stopped alone left the others waiting at the next collective."""
        return finite_on_every_rank(self.loss_sum, distributed)

    def totals(self, distributed: Distributed) -> tuple[float, float, float]:
        """(loss sum, correct, seen) over all ranks: one sync."""
        device = self.loss_sum.device
        summed = all_reduce_sum(torch.stack([self.loss_sum, self.correct.float(),
                                             torch.tensor(float(self.seen), device=device)]),
                                distributed)
        loss_sum, correct, seen = summed.tolist()
        return loss_sum, correct, seen
