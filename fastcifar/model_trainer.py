"""What a run trains and steps (`ModelTrainer`): the model and its compiled/DDP/EMA views, the
optimisers, lookahead, the selection proxy, the precision and its grad scaler; one step at a
time. `training.Run` keeps the records around it."""

from __future__ import annotations

import torch
from torch import nn

from fastcifar.config import Precision, TrainConfig
from fastcifar.data.loaders import Loaders, first_train_images
from fastcifar.device import (
    DeviceStep,
    PrecisionChoice,
    PrecisionPlan,
    autocast,
    emulated_bf16_note,
    measure_cpu_precision,
    measures_precision,
    plan_precision,
    untimed_auto_reason,
)
from fastcifar.distributed import Distributed, broadcast_from_main
from fastcifar.epoch_state import TrainSums
from fastcifar.errors import FastCifarError
from fastcifar.model import build_model
from fastcifar.optim import Lookahead, Optimizers
from fastcifar.run_log import TensorBoardLog
from fastcifar.run_setup import warm_up
from fastcifar.selection import batch_selection


class ModelTrainer:
    """The model and everything that steps it; `state_dict` holds all of it for `last.pt`."""

    def __init__(self, config: TrainConfig, loaders: Loaders, device: torch.device,
                 plan: PrecisionPlan, distributed: Distributed,
                 resume_state: dict | None) -> None:
        self.config, self.device, self.distributed = config, device, distributed
        self.steps_per_epoch = len(loaders.train)
        # The test passes' batch sizes (a full one and the shorter last), warmed up off the clock.
        test_batch = config.loader.batch_size
        self.test_batch_sizes = tuple(dict.fromkeys(
            size for size in (min(test_batch, loaders.test_count), loaders.test_count % test_batch)
            if size))
        self.device_step = DeviceStep(loaders.metadata.mean, loaders.metadata.std, device,
                                      config.channels_last)
        self.steps = 0
        self.lr_per_step: list[float] = []  # of every sitting: a resumed run plots them all
        self._build(loaders)
        self._plan_precision(plan, resume_state)
        if resume_state is not None:
            self.load_state_dict(resume_state)
        self._wrap_for_training()

    def _build(self, loaders: Loaders) -> None:
        config, device = self.config, self.device
        whitening_images = (first_train_images(loaders, config.loader, config.seed,
                                               self.device_step)
                            if config.whiten_init or config.whiten else None)
        self.model = build_model(config, device, whitening_images,
                                 num_classes=len(loaders.metadata.class_names))
        self.optimizers = Optimizers(self.model, config, self.steps_per_epoch)
        self.selection = batch_selection(config, self.model, self.steps_per_epoch,
                                         whitening_images, self.distributed)
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
        auto_on_cpu = config.precision == Precision.auto and device.type == "cpu"
        steps = config.epochs * self.steps_per_epoch
        self.measure_precision = measures_precision(config.precision, device, steps)
        if auto_on_cpu and resume_state is not None:
            self.measure_precision = False
            self.plan = plan_precision(Precision(resume_state.get("precision", "fp32")), device)
        # What run.json records until the first batch is timed (the plan, once it is known).
        self.recorded_precision = ("auto (timed at the first batch)" if self.measure_precision
                                   else self.plan.name)
        # Why an untimed auto run trains in its plan (kept by its checkpoint), and whether this
        # machine emulates its bf16 (this sitting's), for run.json and the header line.
        self.precision_note = (untimed_auto_reason(steps)
                               if auto_on_cpu and resume_state is None
                               and not self.measure_precision else None)
        self.hardware_note = emulated_bf16_note(self.plan, device)
        notes = "; ".join(note for note in (self.precision_note, self.hardware_note) if note)
        self.precision_label = (f"{self.plan.name} ({notes})" if notes
                                else self.recorded_precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.plan.use_grad_scaler)
        # The proxy's own: its overflows must not lower the model's loss scale (under torchrun
        # each rank's proxy differs, so the ranks' scales, and so their weights, would part).
        self.proxy_scaler = torch.amp.GradScaler(device.type, enabled=self.plan.use_grad_scaler)
        self._orthogonalize_for_plan()

    def _orthogonalize_for_plan(self) -> None:
        """Muon's Newton-Schulz in fp32 in an fp32 run on the CPU (47x faster where bf16 is
        emulated), for the model and the selection proxy alike."""
        proxy = [self.selection.optimizers] if self.selection is not None else []
        for optimizers in (self.optimizers, *proxy):
            optimizers.orthogonalize_for(self.plan.autocast_dtype, self.device)

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

    def first_batch(self, images: torch.Tensor, labels: torch.Tensor) -> PrecisionChoice | None:
        """Off the clock: time fp32 against bf16 when asked (rank 0 times, every rank takes its
        choice), and warm up compile/cudnn. Returns the timed choice, if one was made."""
        choice = None
        if self.measure_precision:
            choice = broadcast_from_main(
                measure_cpu_precision(self.model, self.device_step, (images, labels))
                if self.distributed.is_main else None, self.distributed)
            self.plan = choice.plan
            self._orthogonalize_for_plan()
        warm_up(self.model, self.trained_model, self.config, self.device, self.plan,
                self.device_step, (images, labels), self.selection, self.eval_model,
                self.test_batch_sizes)
        return choice

    def step(self, images: torch.Tensor, labels: torch.Tensor, sums: TrainSums,
             log: TensorBoardLog) -> None:
        """zero_grad -> autocast forward -> backward (scaled for fp16) -> steps -> averages."""
        images, labels = self.device_step(images, labels)
        if self.selection is not None:  # the proxy's hardest images only
            images, labels = self.selection(images, labels, self.plan, self.proxy_scaler)
        self.optimizers.zero_grad()
        with autocast(self.device, self.plan):
            logits = self.trained_model(images)
            loss = self.criterion(logits, labels)
        self.scaler.scale(loss).backward()  # the scale is 1 unless fp16
        self.lr_per_step.append(self.optimizers.lr)  # the LR this step used
        group_lrs = self.optimizers.group_lrs() if log.enabled else {}
        self.optimizers.step(self.scaler)
        self.scaler.update()
        self.optimizers.schedule_step()
        self.steps += 1
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        if self.lookahead is not None:
            self.lookahead.after_step(self.model, self.steps)
        sums.add(loss, logits, labels)
        log.step(self.steps, loss, group_lrs, len(labels))

    def state_dict(self) -> dict:
        """The model, optimisers, scaler, averages, proxy, steps and LRs, as `last.pt` keys."""
        return {
            "model": self.model.state_dict(),
            **self.optimizers.state_dict(),  # optimizer, scheduler (+ muon, muon_scheduler)
            "scaler": self.scaler.state_dict(),
            "proxy_scaler": self.proxy_scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "lookahead": self.lookahead.state_dict() if self.lookahead is not None else None,
            "selection": (self.selection.state_dict() if self.selection is not None
                          else None),  # its proxy
            "steps": self.steps,
            "lr_per_step": list(self.lr_per_step),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` saved; a model that does not fit is one line."""
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as error:  # e.g. a head for another class count
            raise FastCifarError(f"{self.config.resume} does not fit this data's model: "
                                 f"{str(error).splitlines()[-1].strip()}") from error
        self.optimizers.load_state_dict(state)
        load_scaler_state(self.scaler, state["scaler"])
        # Older checkpoints: the proxy shared the model's scaler, so it carries on from that scale
        load_scaler_state(self.proxy_scaler, state.get("proxy_scaler", state["scaler"]))
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        if self.lookahead is not None:
            self.lookahead.load_state_dict(state["lookahead"])
        if self.selection is not None:
            self.selection.load_state_dict(state["selection"])
        self.steps = state["steps"]
        self.lr_per_step = list(state.get("lr_per_step", []))  # older checkpoints lack it


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict) -> None:
    """A saved loss scale, where there is one: a run resumed in fp16 (auto on a GPU without
    bf16) from a checkpoint that trained unscaled (fp32, bf16) starts from a fresh scale, where
    torch's load would refuse the empty state."""
    if state:
        scaler.load_state_dict(state)
