"""TensorBoard event files in the run folder, so `tensorboard --logdir runs` shows every run:
per step the train loss, the LR of each parameter group (Muon's included) and images/s; per
test pass the test loss and accuracy and the held-out accuracy; the config as text.

The per-step losses stay on the device until the epoch ends (one host sync per epoch, as the
loop itself). The event files are non-essential: without the tensorboard package, or after a
failed write, the run warns once and goes on without them."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import torch

from fastcifar.records import Evaluation
from fastcifar.terminal import print_problem


class TensorBoardLog:
    """One run's event writer (rank 0 only); `enabled` is False once it cannot write."""

    def __init__(self, run_dir: Path, config: dict, first_step: int, enabled: bool = True
                 ) -> None:
        self.writer = None
        self.pending: list[tuple[int, torch.Tensor, dict[str, float], float]] = []
        self.last_step_end: float | None = None
        if not enabled:  # --no-tensorboard, or a rank other than 0
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print_problem("warning", "the tensorboard package is not installed: no event "
                                     "files (pip install 'fastcifar[tensorboard]')")
            return
        _quiet_writer_thread_errors()
        # purge_step: a resumed run drops what the interrupted sitting logged after its checkpoint.
        self._guard(lambda: self._open(SummaryWriter, run_dir, config, first_step))

    def _open(self, writer_class, run_dir: Path, config: dict, first_step: int) -> None:
        self.writer = writer_class(log_dir=str(run_dir), purge_step=first_step or None)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str)
                             + "\n```", global_step=first_step)

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def step(self, step: int, loss: torch.Tensor, lrs: dict[str, float], images: int) -> None:
        """Keep step `step`'s loss (on the device), the LRs it used and its images/s."""
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = images / (now - self.last_step_end) if self.last_step_end is not None else 0.0
        self.last_step_end = now
        self.pending.append((step, loss.detach(), lrs, rate))

    def pause(self) -> None:
        """Time off the train clock (a test pass) does not count against the next step."""
        self.last_step_end = None

    def flush_steps(self) -> None:
        """Write the pending steps' scalars: one host sync for all their losses."""
        if not self.enabled or not self.pending:
            return
        losses = torch.stack([loss.float() for _, loss, _, _ in self.pending]).tolist()
        pending, self.pending = self.pending, []

        def write() -> None:
            for (step, _, lrs, rate), loss in zip(pending, losses, strict=True):
                self.writer.add_scalar("train/loss", loss, step)
                for group, lr in lrs.items():
                    self.writer.add_scalar(f"lr/{group}", lr, step)
                if rate > 0:
                    self.writer.add_scalar("train/images_per_second", rate, step)

        self._guard(write)

    def evaluation(self, evaluation: Evaluation) -> None:
        """A test pass at its step: test loss and accuracy, and held-out accuracy if any."""
        if not self.enabled:
            return

        def write() -> None:
            self.writer.add_scalar("test/loss", evaluation.test_loss, evaluation.steps)
            self.writer.add_scalar("test/accuracy", evaluation.test_accuracy, evaluation.steps)
            if evaluation.holdout_accuracy is not None:
                self.writer.add_scalar("holdout/accuracy", evaluation.holdout_accuracy,
                                       evaluation.steps)

        self._guard(write)

    def close(self) -> None:
        """Write what is pending and close the files (also after an error)."""
        if not self.enabled:
            return
        self.flush_steps()  # may find the files unwritable and turn the log off
        if self.writer is not None:
            self._guard(self.writer.close)
        self.writer = None

    def _guard(self, write) -> None:
        try:
            write()
        except OSError as error:
            print_problem("warning", f"TensorBoard event files could not be written "
                                     f"({error.strerror or error}); training goes on without them")
            self.writer = None


_quiet = {"installed": False}


def _quiet_writer_thread_errors() -> None:
    """tensorboard's writer thread keeps a failed write for the next call from the run (where
    `_guard` turns it into one warning) and re-raises it too: keep that second copy, a
    traceback, off the terminal."""
    if _quiet["installed"]:
        return
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if type(args.thread).__name__ != "_AsyncWriterThread":
            previous(args)

    threading.excepthook = hook
    _quiet["installed"] = True
