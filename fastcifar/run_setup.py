"""What a run does once before its first timed step: check its steps, make its folder, and warm
up torch.compile and cudnn off the clock."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as functional
from torch import nn

from fastcifar.config import TrainConfig
from fastcifar.device import DeviceStep, PrecisionPlan, autocast
from fastcifar.errors import FastCifarError, MachineFault
from fastcifar.evaluation import predict_logits


def check_steps(config: TrainConfig, steps_per_epoch: int) -> None:
    """Refuse a loader with no full batch, and step evaluations that would never fall inside an
    epoch."""
    if steps_per_epoch == 0:
        raise FastCifarError("the train loader yields no full batch: lower --batch-size")
    if config.eval_every_steps >= steps_per_epoch:
        raise FastCifarError(
            f"--eval-every-steps {config.eval_every_steps} is not below the {steps_per_epoch} "
            "steps of an epoch, so no evaluation would fall inside one: lower it, or 0 for "
            "epoch ends only")


def warm_up(model: nn.Module, trained_model: nn.Module, config: TrainConfig,
             device: torch.device, plan: PrecisionPlan, device_step: DeviceStep,
             sample: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Forward/backward and an eval pass on the real model, then restore its state.

    torch.compile and cudnn autotuning happen here, off the clock; the weights and BN
    statistics are put back, so the run is the same as without the warm-up.
    """
    if device.type != "cuda" and not config.compile:
        return
    snapshot = copy.deepcopy(model.state_dict())
    images, labels = device_step(*sample)
    trained_model.train()
    for _ in range(2):
        with autocast(device, plan):
            loss = functional.cross_entropy(trained_model(images), labels)
        loss.backward()
    model.zero_grad(set_to_none=True)
    trained_model.eval()
    with torch.no_grad(), autocast(device, plan):
        predict_logits(trained_model, images, config.tta)
    model.load_state_dict(snapshot)
    trained_model.train()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_run_dir(config: TrainConfig) -> Path:
    """A new run folder under --out, named by time, recipe and seed (never an existing one)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(config.out_dir) / f"{stamp}-{config.recipe}-s{config.seed}"
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = Path(config.out_dir) / f"{stamp}-{config.recipe}-s{config.seed}-{suffix}"
    try:
        run_dir.mkdir(parents=True)
    except OSError as error:
        raise MachineFault(f"cannot create run folder {run_dir}: {error.strerror}") from error
    return run_dir
