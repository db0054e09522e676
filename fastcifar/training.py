"""The training loop: a run's records around what it trains (`Run`, holding a
`model_trainer.ModelTrainer`) and the epoch loop (`train_epochs`)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from fastcifar.atomic import file_set, write_json
from fastcifar.checkpoint import (
    CHECKPOINT_KEYS,
    check_resume_compatible,
    check_resume_world_size,
    load_checkpoint,
    restore_rng_state,
    run_record,
    run_state,
    save_checkpoint,
    seed_everything,
)
from fastcifar.config import TrainConfig
from fastcifar.data.loaders import Loaders, build_loaders
from fastcifar.device import PrecisionPlan, plan_precision, select_device
from fastcifar.distributed import (
    Distributed,
    StopRequest,
    broadcast_from_main,
    init_distributed,
    main_writes_agreed,
    ranks_agree,
    share_run_dir,
    stop_agreed,
    stop_on_signals,
)
from fastcifar.epoch_state import EpochClock, TrainCallbacks, TrainingInterrupted, TrainSums
from fastcifar.errors import FastCifarError
from fastcifar.evaluation import evaluate_loader
from fastcifar.model import plain_state_dict
from fastcifar.model_trainer import ModelTrainer
from fastcifar.records import EpochStats, Evaluation, TrainResult, epoch_end_evaluations, write_metrics
from fastcifar.run_faults import RunFaults
from fastcifar.run_log import TensorBoardLog
from fastcifar.run_setup import check_steps, make_run_dir, require_weights_folder
from fastcifar.weights_file import read_weights_file, save_weights_file, weights_metadata

__all__ = ["EpochStats", "Evaluation", "Run", "TrainCallbacks", "TrainResult",
           "TrainingInterrupted", "epoch_end_evaluations", "train", "train_epochs"]

# ---------------------------------------------------------------- the run


DIVERGENCE_CHECK_STEPS = 16  # also how often torchrun's ranks agree on a stop


class Run:
    """A training run in progress: what it trains (`trainer`), where the results go, and what
    has been recorded so far (a checkpoint saves all of it)."""

    def __init__(self, config: TrainConfig, loaders: Loaders, device: torch.device,
                 plan: PrecisionPlan, distributed: Distributed, callbacks: TrainCallbacks,
                 resume_state: dict | None) -> None:
        self.config, self.loaders, self.device = config, loaders, device
        self.distributed, self.callbacks = distributed, callbacks
        self.steps_per_epoch = len(loaders.train)
        self.trainer = ModelTrainer(config, loaders, device, plan, distributed, resume_state)
        self.record = run_record(config, device, self.trainer.recorded_precision)
        if self.trainer.precision_note:
            self.record["precision_note"] = self.trainer.precision_note
        if self.trainer.hardware_note:  # not restored on resume: the machine may differ
            self.record["precision_hardware_note"] = self.trainer.hardware_note
        self.history: list[EpochStats] = []
        self.evaluations: list[Evaluation] = []
        self.start_epoch, self.best_accuracy, self.warmup_seconds = 0, -1.0, 0.0
        self.partial: dict | None = None  # progress inside the interrupted epoch resumed
        if resume_state is not None:
            self._restore_records(resume_state)
            self.run_dir = Path(config.resume).parent
        else:
            self.run_dir = share_run_dir(make_run_dir(config) if distributed.is_main
                                         else Path(config.out_dir), distributed)
        self.best_weights = Path(config.weights_dir) / f"{self.run_dir.name}-best.safetensors"
        self.final_weights = Path(config.weights_dir) / f"{self.run_dir.name}-final.safetensors"
        self.last_checkpoint = self.run_dir / "last.pt"
        self.faults = RunFaults(Path(config.resume) if resume_state is not None else None,
                                self.start_epoch, config.loader.batch_size, device, distributed)
        self.log = TensorBoardLog(self.run_dir, self.record, self.steps,
                                  enabled=config.tensorboard and distributed.is_main)
        if resume_state is not None and self.best_weights.exists():
            # An in-epoch pass may have saved better weights after the checkpoint resumed
            # from (a hard crash loses its update): never replace them with worse ones.
            saved = read_weights_file(self.best_weights)[1].get("accuracy", -1.0)
            self.best_accuracy = max(self.best_accuracy, saved)

    @property
    def steps(self) -> int:
        """Optimiser steps taken so far, over every sitting."""
        return self.trainer.steps

    def _restore_records(self, state: dict) -> None:
        """The records a checkpoint holds besides the trainer's state, and the RNGs."""
        for key in ("precision_images_per_second", "precision_note"):  # how it was chosen
            if key in state:
                self.record[key] = state[key]
        self.start_epoch = state["epoch"]
        self.best_accuracy = state["best_accuracy"]
        self.warmup_seconds = state.get("warmup_seconds", 0.0)  # older checkpoints lack it
        self.history = [EpochStats(**row) for row in state["history"]]
        self.evaluations = ([Evaluation(**row) for row in state["evaluations"]]
                            if "evaluations" in state  # older checkpoints lack them
                            else epoch_end_evaluations(self.history))
        self.partial = state.get("partial")
        restore_rng_state(state["rng"], self.device)

    # ------------------------------------------------------------ steps

    def first_batch(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Off the clock: time fp32 against bf16 when asked, and warm up compile/cudnn."""
        choice = self.trainer.first_batch(images, labels)
        if choice is None:
            return
        self.record.update(precision=choice.plan.name,
                           precision_images_per_second=choice.images_per_second)
        if self.distributed.is_main:
            write_json(self.run_dir / "run.json", self.record)
        self.callbacks.on_precision(choice)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, sums: TrainSums) -> None:
        """One optimiser step on a batch (the trainer's), logged."""
        self.trainer.step(images, labels, sums, self.log)

    # ------------------------------------------------------------ evaluations and records

    def evaluate_and_record(self, epochs: float, clock: EpochClock) -> Evaluation:
        """A test pass on the run's clock (training paused), recorded and kept if the best;
        the held-out score and the saving are off the clock."""
        clock.stop_training()
        started = time.perf_counter()
        test_loss, test_accuracy = self._evaluate(self.loaders.test)
        clock.eval_seconds += time.perf_counter() - started
        evaluation = Evaluation(epochs, self.steps, test_loss, test_accuracy,
                                clock.trained_before + clock.train_seconds,
                                clock.evaluated_before + clock.eval_seconds,
                                self._score_holdout())
        self.evaluations.append(evaluation)
        self.log.evaluation(evaluation)
        self._keep_if_best(evaluation)
        self.trainer.trained_model.train()
        self.log.pause()
        clock.restart()
        return evaluation

    def evaluate_inside(self, epoch: int, step: int, clock: EpochClock) -> None:
        """The in-epoch test pass after step `step` (1-based) of epoch `epoch` (0-based), if
        one is due: every --eval-every-steps steps in the last --eval-steps-epochs epochs, not
        at the epoch's end (which evaluates anyway)."""
        config = self.config
        if (config.eval_every_steps > 0 and epoch >= config.epochs - config.eval_steps_epochs
                and step % config.eval_every_steps == 0 and step < self.steps_per_epoch):
            evaluation = self.evaluate_and_record(epoch + step / self.steps_per_epoch, clock)
            self.callbacks.on_evaluation(evaluation)

    def _score_holdout(self) -> float | None:
        """Accuracy on the held-out train images (a tuning aid, not a cost)."""
        if self.loaders.holdout is None:
            return None
        return self._evaluate(self.loaders.holdout)[1]

    def _evaluate(self, loader: Iterable) -> tuple[float, float]:
        """Loss and accuracy of the evaluated model (EMA when kept) on `loader`, with TTA."""
        trainer = self.trainer
        return evaluate_loader(trainer.eval_model, loader, trainer.device_step, trainer.plan,
                               self.config.tta, self.config.tta_shifts)

    def _keep_if_best(self, evaluation: Evaluation) -> None:
        """Save the evaluated weights when this test pass is the best so far (any pass)."""
        if evaluation.test_accuracy <= self.best_accuracy:
            return
        # Non-essential: on a write fault the run goes on, and a later better pass tries again.
        if self.distributed.is_main and not self.faults.optional_write(
                "the best-weights copy", lambda: save_weights_file(
                    self.best_weights, plain_state_dict(self.trainer.evaluated_weights),
                    weights_metadata(self.config, self.record, self.loaders, evaluation,
                                     "best"))):
            return
        self.best_accuracy = evaluation.test_accuracy

    def end_epoch(self, epoch: int, clock: EpochClock, sums: TrainSums) -> EpochStats:
        """Close epoch `epoch` (0-based): its sums, a test pass (when due), the table row, a
        checkpoint."""
        clock.stop_training()
        loss_sum, correct, seen = sums.totals(self.distributed)
        if not math.isfinite(loss_sum):
            raise self.diverged(epoch)
        evaluated = self.evaluates_at_end(epoch)
        evaluation = self.evaluate_and_record(epoch + 1, clock) if evaluated else None
        lrs = self.trainer.lr_per_step
        stats = EpochStats(
            epoch=epoch + 1, lr=lrs[-1] if lrs else self.config.max_lr,
            train_loss=loss_sum / seen, train_accuracy=correct / seen,
            test_loss=evaluation.test_loss if evaluated else None,
            test_accuracy=evaluation.test_accuracy if evaluated else None,
            train_seconds=clock.train_seconds, eval_seconds=clock.eval_seconds,
            images_per_second=seen / clock.train_seconds, steps=self.steps,
            holdout_accuracy=evaluation.holdout_accuracy if evaluated else None,
            train_size=self.config.train_image_size(epoch))
        self.history.append(stats)
        main_writes_agreed(lambda: self.save_epoch_end(epoch + 1), self.distributed)
        # Every rank: a fault on any of them points to the checkpoint rank 0 just wrote.
        self.faults.checkpoint_saved(self.last_checkpoint, epoch + 1)
        self.log.flush_steps()
        return stats

    def save_epoch_end(self, epoch: int) -> None:
        """`last.pt` and the metrics after `epoch` completed epochs, as one set: a fault at
        either leaves both as the epoch before left them."""
        with file_set():
            self.save_checkpoint(epoch)
            self.write_metrics()

    def save_final(self, extra: dict[str, object]) -> None:
        """The metrics once more (a run resumed from its last epoch's checkpoint, after a
        write that failed, has no epoch left to write them) and the final weights: one set."""
        with file_set():
            self.write_metrics(**extra)
            if self.evaluations:
                save_weights_file(self.final_weights,
                                  plain_state_dict(self.trainer.evaluated_weights),
                                  weights_metadata(self.config, self.record, self.loaders,
                                                   self.evaluations[-1], "final"))

    def write_metrics(self, **extra: object) -> None:
        """metrics.json and metrics.csv (rank 0 writes them)."""
        if self.distributed.is_main:
            write_metrics(self.run_dir, self.history, self.evaluations, self.warmup_seconds,
                          self.best_accuracy, **extra)

    def evaluates_at_end(self, epoch: int) -> bool:
        """Whether epoch `epoch` (0-based) ends with a test pass: from --eval-from-epoch on
        (unset: every epoch on CUDA or with --stop-at-accuracy, else the last only), always
        the last, and the one that ends the run at its target."""
        every_epoch = self.device.type == "cuda" or self.config.stop_at_accuracy is not None
        from_epoch = self.config.eval_from_epoch or (1 if every_epoch else self.config.epochs)
        return (epoch + 1 >= from_epoch or epoch + 1 == self.config.epochs
                or self.reached_target(epoch))

    def reached_target(self, epoch: int) -> bool:
        """--stop-at-accuracy met by any pass of epoch `epoch` (0-based); rank 0 decides for
        all, since ranks that disagreed would wait for each other forever."""
        if self.config.stop_at_accuracy is None:
            return False
        accuracies = [row.test_accuracy for row in self.evaluations if row.epochs > epoch]
        return broadcast_from_main(max(accuracies, default=0.0) >= self.config.stop_at_accuracy,
                                   self.distributed)

    def save_checkpoint(self, epoch: int, partial: dict | None = None) -> None:
        """`last.pt` after `epoch` completed epochs (+ `partial` progress in the next one)."""
        if self.distributed.is_main:
            save_checkpoint(self.last_checkpoint, {**run_state(
                self.trainer.state_dict(), epoch, self.history, self.evaluations, self.record,
                self.best_accuracy, self.warmup_seconds, partial=partial, device=self.device),
                "world_size": self.distributed.world_size})

    def interrupted(self, epoch: int, step: int, clock: EpochClock, sums: TrainSums,
                    signal_number: int) -> TrainingInterrupted:
        """Save one checkpoint, with every rank's sums so far, inside epoch `epoch`."""
        train_seconds = clock.train_seconds_so_far()
        loss_sum, correct, seen = sums.totals(self.distributed)
        self.save_checkpoint(epoch, partial={
            "step": step, "loss_sum": loss_sum, "correct": int(correct), "seen": int(seen),
            "train_seconds": train_seconds, "eval_seconds": clock.eval_seconds})
        return TrainingInterrupted(signal_number, self.last_checkpoint)

    def diverged(self, epoch: int) -> FastCifarError:
        return FastCifarError(
            f"training diverged (non-finite loss) in epoch {epoch + 1}; the last good "
            f"checkpoint is {self.last_checkpoint}: lower --max-lr or use bf16/fp32")

    def finish(self, reached: bool) -> TrainResult:
        """Check the ranks agree, save the final weights and the plots; the run's result."""
        extra = ({"world_size": self.distributed.world_size,
                  "ranks_agree": ranks_agree(self.trainer.model, self.distributed)}
                 if self.distributed.world_size > 1 else {})
        main_writes_agreed(lambda: self.save_final(extra), self.distributed)
        if self.config.make_plots and self.distributed.is_main:
            from fastcifar.plots import plot_training_curves

            self.faults.optional_write("the training-curves plot", lambda: plot_training_curves(
                self.history, self.trainer.lr_per_step, self.run_dir / "training_curves.png",
                self.config.label_smoothing))
        return TrainResult(
            self.history, self.run_dir,
            # None when the best pass's file is not there: saved before a resume into another
            # --weights-dir, or its (non-essential) copy failed.
            self.best_weights if self.best_accuracy >= 0 and self.best_weights.is_file() else None,
            self.best_accuracy,
            self.warmup_seconds, self.trainer.lr_per_step, reached, self.trainer.eval_model, self.evaluations,
            self.final_weights if self.evaluations else None, self.trainer.plan,
            self.record.get("precision_images_per_second", {}))


# ---------------------------------------------------------------- the loop


def train(config: TrainConfig, callbacks: TrainCallbacks | None = None,
          loaders: Loaders | None = None, handle_signals: bool = True) -> TrainResult:
    """Train CustResNet with `config`; returns per-epoch stats, writes the run folder and weights."""
    callbacks = callbacks or TrainCallbacks()
    require_weights_folder(Path(config.weights_dir))  # before any set-up
    device = select_device(config.device, config.local_rank)
    plan = plan_precision(config.precision, device)
    distributed = init_distributed(config, device)
    seed_everything(config.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cudnn pick the fastest kernels
    resume_state = None
    if config.resume is not None:
        resume_state = load_checkpoint(Path(config.resume), required=CHECKPOINT_KEYS)
        check_resume_compatible(resume_state.get("config", {}), config)
        check_resume_world_size(resume_state.get("world_size"), distributed.world_size)
    loaders = loaders or build_loaders(config.loader, config.augment, config.seed, device=device)
    check_steps(config, len(loaders.train))
    run = Run(config, loaders, device, plan, distributed, callbacks, resume_state)
    with run.faults.end_in_one_line():
        try:
            main_writes_agreed(lambda: write_json(run.run_dir / "run.json", run.record),
                               distributed)
            callbacks.on_train_start(config, run.steps_per_epoch, device,
                                     run.trainer.precision_label, run.run_dir)
            # Every rank traps the signals; under torchrun they agree on the step to stop at.
            with stop_on_signals(handle_signals) as stop:
                reached = train_epochs(run, stop)
            return run.finish(reached)
        finally:
            run.log.close()


def train_epochs(run: Run, stop: StopRequest) -> bool:
    """The epoch loop, from the run's start epoch; True when --stop-at-accuracy was met."""
    config, steps_per_epoch, partial = run.config, run.steps_per_epoch, run.partial
    for epoch in range(run.start_epoch, config.epochs):
        run.trainer.trained_model.train()
        sums = TrainSums(run.device, partial, run.distributed.is_main)
        clock = EpochClock(run.device, run.history, partial)
        done_before = partial["step"] if partial else 0  # resuming inside this epoch
        partial = None
        # FFCV's order and the kernel's epoch-dependent flips both follow `epoch`.
        batches = run.loaders.train_epoch(epoch, config.train_image_size(epoch))
        step = 0
        for step in range(1, steps_per_epoch + 1):
            fetch_started = time.perf_counter()
            images, labels = next(batches)
            if step == 1 and epoch == run.start_epoch:
                # The first batch compiles the loader pipeline: a one-off, off the clock.
                run.first_batch(images, labels)
                run.warmup_seconds += time.perf_counter() - fetch_started
                clock.restart()
            if step <= done_before:  # trained before the interrupt (the same order)
                if step == done_before:
                    clock.restart()  # re-reading them is off the clock
                    # A stop comes before its step's in-epoch pass, so that pass is made now.
                    run.evaluate_inside(epoch, step, clock)
                continue
            run.train_step(images, labels, sums)
            run.callbacks.on_step(epoch + 1, step, steps_per_epoch)
            # One host sync every DIVERGENCE_CHECK_STEPS steps (not per step): a run whose
            # loss went non-finite stops within that many steps, its last checkpoint intact.
            if run.steps % DIVERGENCE_CHECK_STEPS == 0 and not sums.finite(run.distributed):
                raise run.diverged(epoch)
            if stop_agreed(stop, run.steps, run.distributed, run.device,
                           DIVERGENCE_CHECK_STEPS):
                break
            run.evaluate_inside(epoch, step, clock)
        # Under torchrun the ranks agree once more: a signal that reached one rank after their
        # last comparison must stop all of them here or none (else they would wait forever).
        if stop_agreed(stop, run.steps, run.distributed, run.device, every=1):
            del batches  # FFCV's worker thread stops with its iterator
            raise run.interrupted(epoch, step, clock, sums, stop.signal_number)
        run.callbacks.on_epoch(run.end_epoch(epoch, clock, sums))
        # An in-epoch pass at the target stops the run at this epoch's end; its time on the
        # clock is that pass's.
        if run.reached_target(epoch):
            return True
    return False
