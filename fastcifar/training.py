"""The training loop: a run's parts and records (`Run`), the epoch loop (`train_epochs`) and
the per-epoch stats it reports."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn

from fastcifar.atomic import write_json
from fastcifar.checkpoint import (
    CHECKPOINT_KEYS,
    check_resume_compatible,
    load_checkpoint,
    read_weights_file,
    restore_rng_state,
    run_record,
    run_state,
    save_checkpoint,
    save_weights_file,
    seed_everything,
    weights_metadata,
)
from fastcifar.config import Precision, TrainConfig
from fastcifar.data.loaders import Loaders, build_loaders, first_train_images
from fastcifar.device import (
    DeviceStep,
    PrecisionPlan,
    autocast,
    measure_cpu_precision,
    measures_precision,
    plan_precision,
    select_device,
)
from fastcifar.distributed import (
    Distributed,
    StopRequest,
    broadcast_from_main,
    init_distributed,
    ranks_agree,
    share_run_dir,
    stop_agreed,
    stop_on_signals,
)
from fastcifar.epoch_state import EpochClock, TrainCallbacks, TrainingInterrupted, TrainSums
from fastcifar.errors import FastCifarError
from fastcifar.evaluation import evaluate_loader
from fastcifar.model import build_model, plain_state_dict
from fastcifar.optim import Lookahead, Optimizers
from fastcifar.records import EpochStats, Evaluation, TrainResult, epoch_end_evaluations, write_metrics
from fastcifar.run_faults import RunFaults
from fastcifar.run_log import TensorBoardLog
from fastcifar.run_setup import check_steps, make_run_dir, warm_up
from fastcifar.selection import batch_selection

__all__ = ["EpochStats", "Evaluation", "Run", "TrainCallbacks", "TrainResult",
           "TrainingInterrupted", "epoch_end_evaluations", "train", "train_epochs"]

# ---------------------------------------------------------------- the run


DIVERGENCE_CHECK_STEPS = 16  # also how often torchrun's ranks agree on a stop


class Run:
    """A training run in progress: the model, its optimisers and averages, where the results
    go, and what has been recorded so far (a checkpoint saves all of it)."""

    def __init__(self, config: TrainConfig, loaders: Loaders, device: torch.device,
                 plan: PrecisionPlan, distributed: Distributed, callbacks: TrainCallbacks,
                 resume_state: dict | None) -> None:
        self.config, self.loaders, self.device = config, loaders, device
        self.distributed, self.callbacks = distributed, callbacks
        self.steps_per_epoch = len(loaders.train)
        self.device_step = DeviceStep(loaders.metadata.mean, loaders.metadata.std, device,
                                      config.channels_last)
        self._build_parts()
        self._plan_precision(plan, resume_state)
        self.history: list[EpochStats] = []
        self.evaluations: list[Evaluation] = []
        self.lr_per_step: list[float] = []  # of every sitting: a resumed run plots them all
        self.start_epoch, self.steps, self.best_accuracy, self.warmup_seconds = 0, 0, -1.0, 0.0
        self.partial: dict | None = None  # progress inside the interrupted epoch resumed
        if resume_state is not None:
            self._restore(resume_state)
            self.run_dir = Path(config.resume).parent
        else:
            self.run_dir = share_run_dir(make_run_dir(config) if distributed.is_main
                                         else Path(config.out_dir), distributed)
        self._wrap_for_training()
        self.best_weights = Path(config.weights_dir) / f"{self.run_dir.name}-best.safetensors"
        self.final_weights = Path(config.weights_dir) / f"{self.run_dir.name}-final.safetensors"
        self.last_checkpoint = self.run_dir / "last.pt"
        self.faults = RunFaults(Path(config.resume) if resume_state is not None else None,
                                self.start_epoch, config.loader.batch_size, device)
        self.log = TensorBoardLog(self.run_dir, self.record, self.steps,
                                  enabled=config.tensorboard and distributed.is_main)
        if resume_state is not None and self.best_weights.exists():
            # An in-epoch pass may have saved better weights after the checkpoint resumed
            # from (a hard crash loses its update): never replace them with worse ones.
            saved = read_weights_file(self.best_weights)[1].get("accuracy", -1.0)
            self.best_accuracy = max(self.best_accuracy, saved)

    def _build_parts(self) -> None:
        config, device = self.config, self.device
        whitening_images = (first_train_images(self.loaders, config.loader, config.seed,
                                               self.device_step)
                            if config.whiten_init or config.whiten else None)
        self.model = build_model(config, device, whitening_images,
                                 num_classes=len(self.loaders.metadata.class_names))
        self.optimizers = Optimizers(self.model, config, self.steps_per_epoch)
        self.selection = batch_selection(config, self.model, self.steps_per_epoch, whitening_images)
        self.ema = (torch.optim.swa_utils.AveragedModel(
            self.model, use_buffers=True,
            multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config.ema_decay))
            if config.ema_decay > 0 else None)
        self.lookahead = (Lookahead(self.model, config.lookahead_every,
                                    config.epochs * self.steps_per_epoch)
                          if config.lookahead_every else None)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    def _plan_precision(self, plan: PrecisionPlan, resume_state: dict | None) -> None:
        """auto on the CPU: fp32 or bf16, whichever trains faster on the first batch (timed
        there, off the clock) unless the run is too short to repay the timing; a resumed run
        keeps the precision its checkpoint trained in."""
        config, device = self.config, self.device
        self.plan = plan
        auto_on_cpu = measures_precision(config.precision, device)
        steps = config.epochs * self.steps_per_epoch
        self.measure_precision = measures_precision(config.precision, device, steps)
        if auto_on_cpu and resume_state is not None:
            self.measure_precision = False
            self.plan = plan_precision(Precision(resume_state.get("precision", "fp32")), device)
        recorded = "auto (timed at the first batch)" if self.measure_precision else self.plan.name
        untimed = auto_on_cpu and resume_state is None and not self.measure_precision
        self.precision_label = (f"{self.plan.name} (auto, untimed: {steps} steps are too few to "
                                "repay timing fp32 against bf16)" if untimed else recorded)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.plan.use_grad_scaler)
        self.record = run_record(config, device, recorded)
        if resume_state is not None and "precision_images_per_second" in resume_state:
            self.record["precision_images_per_second"] = resume_state[
                "precision_images_per_second"]

    def _restore(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as error:  # e.g. a head for another class count
            raise FastCifarError(f"{self.config.resume} does not fit this data's model: "
                                 f"{str(error).splitlines()[-1].strip()}") from error
        self.optimizers.load_state_dict(state)
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        if self.lookahead is not None:
            self.lookahead.load_state_dict(state["lookahead"])
        if self.selection is not None:
            self.selection.load_state_dict(state["selection"])
        self.start_epoch, self.steps = state["epoch"], state["steps"]
        self.best_accuracy = state["best_accuracy"]
        self.warmup_seconds = state.get("warmup_seconds", 0.0)  # older checkpoints lack it
        self.lr_per_step = list(state.get("lr_per_step", []))  # older checkpoints lack it
        self.history = [EpochStats(**row) for row in state["history"]]
        self.evaluations = ([Evaluation(**row) for row in state["evaluations"]]
                            if "evaluations" in state  # older checkpoints lack them
                            else epoch_end_evaluations(self.history))
        self.partial = state.get("partial")
        restore_rng_state(state["rng"])

    def _wrap_for_training(self) -> None:
        """The model the loop steps (compiled, DDP) and the one it evaluates (EMA when kept)."""
        self.trained_model: nn.Module = self.model
        if self.config.compile:
            self.trained_model = torch.compile(self.model)
        if self.distributed.world_size > 1:
            self.trained_model = nn.parallel.DistributedDataParallel(
                self.trained_model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.eval_model = self.ema if self.ema is not None else self.trained_model
        self.evaluated_weights = self.ema.module if self.ema is not None else self.model

    # ------------------------------------------------------------ steps

    def first_batch(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Off the clock: time fp32 against bf16 when asked, and warm up compile/cudnn."""
        if self.measure_precision:
            choice = broadcast_from_main(
                measure_cpu_precision(self.model, self.device_step, (images, labels))
                if self.distributed.is_main else None, self.distributed)
            self.plan = choice.plan
            self.record.update(precision=self.plan.name,
                               precision_images_per_second=choice.images_per_second)
            if self.distributed.is_main:
                write_json(self.run_dir / "run.json", self.record)
            self.callbacks.on_precision(choice)
        warm_up(self.model, self.trained_model, self.config, self.device, self.plan,
                self.device_step, (images, labels), self.selection)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, sums: TrainSums) -> None:
        """zero_grad -> autocast forward -> backward (scaled for fp16) -> steps -> averages."""
        images, labels = self.device_step(images, labels)
        if self.selection is not None:  # the proxy's hardest images only
            images, labels = self.selection(images, labels, self.plan, self.scaler)
        self.optimizers.zero_grad()
        with autocast(self.device, self.plan):
            logits = self.trained_model(images)
            loss = self.criterion(logits, labels)
        self.scaler.scale(loss).backward()  # the scale is 1 unless fp16
        self.lr_per_step.append(self.optimizers.lr)  # the LR this step used
        group_lrs = self.optimizers.group_lrs() if self.log.enabled else {}
        self.optimizers.step(self.scaler)
        self.scaler.update()
        self.optimizers.schedule_step()
        self.steps += 1
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        if self.lookahead is not None:
            self.lookahead.after_step(self.model, self.steps)
        sums.add(loss, logits, labels)
        self.log.step(self.steps, loss, group_lrs, len(labels))

    # ------------------------------------------------------------ evaluations and records

    def evaluate_and_record(self, epochs: float, clock: EpochClock) -> Evaluation:
        """A test pass on the run's clock (training paused), recorded and kept if the best;
        the held-out score and the saving are off the clock."""
        clock.stop_training()
        started = time.perf_counter()
        test_loss, test_accuracy = evaluate_loader(self.eval_model, self.loaders.test,
                                                   self.device_step, self.plan, self.config.tta,
                                                   self.config.tta_shifts)
        clock.eval_seconds += time.perf_counter() - started
        evaluation = Evaluation(epochs, self.steps, test_loss, test_accuracy,
                                clock.trained_before + clock.train_seconds,
                                clock.evaluated_before + clock.eval_seconds,
                                self._score_holdout())
        self.evaluations.append(evaluation)
        self.log.evaluation(evaluation)
        self._keep_if_best(evaluation)
        self.trained_model.train()
        self.log.pause()
        clock.restart()
        return evaluation

    def _score_holdout(self) -> float | None:
        """Accuracy on the held-out train images (a tuning aid, not a cost)."""
        if self.loaders.holdout is None:
            return None
        return evaluate_loader(self.eval_model, self.loaders.holdout, self.device_step,
                               self.plan, self.config.tta, self.config.tta_shifts)[1]

    def _keep_if_best(self, evaluation: Evaluation) -> None:
        """Save the evaluated weights when this test pass is the best so far (any pass)."""
        if evaluation.test_accuracy <= self.best_accuracy:
            return
        # Non-essential: on a write fault the run goes on, and a later better pass tries again.
        if self.distributed.is_main and not self.faults.optional_write(
                "the best-weights copy", lambda: save_weights_file(
                    self.best_weights, plain_state_dict(self.evaluated_weights),
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
        stats = EpochStats(
            epoch=epoch + 1, lr=self.lr_per_step[-1] if self.lr_per_step else self.config.max_lr,
            train_loss=loss_sum / seen, train_accuracy=correct / seen,
            test_loss=evaluation.test_loss if evaluated else None,
            test_accuracy=evaluation.test_accuracy if evaluated else None,
            train_seconds=clock.train_seconds, eval_seconds=clock.eval_seconds,
            images_per_second=seen / clock.train_seconds, steps=self.steps,
            holdout_accuracy=evaluation.holdout_accuracy if evaluated else None,
            train_size=self.config.train_image_size(epoch))
        self.history.append(stats)
        self.save_checkpoint(epoch + 1)
        self.write_metrics()
        self.log.flush_steps()
        return stats

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
            save_checkpoint(self.last_checkpoint, run_state(
                self.model, self.optimizers, self.scaler, self.ema, self.lookahead, epoch,
                self.steps, self.history, self.evaluations, self.record, self.best_accuracy,
                self.warmup_seconds, self.lr_per_step, partial=partial,
                selection=self.selection))
            if partial is None:
                self.faults.checkpoint_saved(self.last_checkpoint, epoch)

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
        # Written again at the end: a run resumed from its last epoch's checkpoint (a write
        # that failed after it) has no epoch left to write it.
        if self.distributed.world_size > 1:
            self.write_metrics(world_size=self.distributed.world_size,
                               ranks_agree=ranks_agree(self.model, self.distributed))
        else:
            self.write_metrics()
        if self.distributed.is_main and self.evaluations:
            save_weights_file(self.final_weights, plain_state_dict(self.evaluated_weights),
                              weights_metadata(self.config, self.record, self.loaders,
                                               self.evaluations[-1], "final"))
        if self.config.make_plots and self.distributed.is_main:
            from fastcifar.plots import plot_training_curves

            self.faults.optional_write("the training-curves plot", lambda: plot_training_curves(
                self.history, self.lr_per_step, self.run_dir / "training_curves.png"))
        return TrainResult(
            self.history, self.run_dir,
            self.best_weights if self.best_accuracy >= 0 else None, self.best_accuracy,
            self.warmup_seconds, self.lr_per_step, reached, self.eval_model, self.evaluations,
            self.final_weights if self.evaluations else None, self.plan,
            self.record.get("precision_images_per_second", {}))


# ---------------------------------------------------------------- the loop


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
        resume_state = load_checkpoint(Path(config.resume), required=CHECKPOINT_KEYS)
        check_resume_compatible(resume_state.get("config", {}), config)
    loaders = loaders or build_loaders(config.loader, config.augment, config.seed, device=device)
    check_steps(config, len(loaders.train))
    run = Run(config, loaders, device, plan, distributed, callbacks, resume_state)
    with run.faults.end_in_one_line():
        try:
            if distributed.is_main:
                write_json(run.run_dir / "run.json", run.record)
            callbacks.on_train_start(config, run.steps_per_epoch, device,
                                     run.precision_label, run.run_dir)
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
        run.trained_model.train()
        sums = TrainSums(run.device, partial, run.distributed.is_main)
        clock = EpochClock(run.device, run.history, partial)
        done_before = partial["step"] if partial else 0  # resuming inside this epoch
        partial = None
        evaluate_inside = (config.eval_every_steps > 0
                           and epoch >= config.epochs - config.eval_steps_epochs)
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
                continue
            run.train_step(images, labels, sums)
            run.callbacks.on_step(epoch + 1, step, steps_per_epoch)
            # One host sync every DIVERGENCE_CHECK_STEPS steps (not per step): a run whose
            # loss went non-finite stops within that many steps, its last checkpoint intact.
            if run.steps % DIVERGENCE_CHECK_STEPS == 0 and not sums.finite():
                raise run.diverged(epoch)
            if stop_agreed(stop, run.steps, run.distributed, run.device,
                           DIVERGENCE_CHECK_STEPS):
                break
            if (evaluate_inside and step % config.eval_every_steps == 0
                    and step < steps_per_epoch):  # the epoch end evaluates anyway
                evaluation = run.evaluate_and_record(epoch + step / steps_per_epoch, clock)
                run.callbacks.on_evaluation(evaluation)
        if stop.signal_number is not None:
            del batches  # FFCV's worker thread stops with its iterator
            raise run.interrupted(epoch, step, clock, sums, stop.signal_number)
        run.callbacks.on_epoch(run.end_epoch(epoch, clock, sums))
        # An in-epoch pass at the target stops the run at this epoch's end; its time on the
        # clock is that pass's.
        if run.reached_target(epoch):
            return True
    return False
