"""Optimisers and the per-step OneCycle learning-rate schedule."""

from __future__ import annotations

import torch
from torch import nn

from fastcifar.config import OptimizerName, TrainConfig
from fastcifar.errors import FastCifarError


def parameter_groups(model: nn.Module, weight_decay: float, decay_norm: bool) -> list[dict]:
    """Conv/linear weights decay; BN scales and shifts decay only when `decay_norm` is set."""
    decayed = [p for p in model.parameters() if p.requires_grad and (p.ndim > 1 or decay_norm)]
    plain = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1 and not decay_norm]
    groups = [{"params": decayed, "weight_decay": weight_decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    return groups


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam or SGD (Nesterov) over the parameter groups; the schedule sets the LR."""
    groups = parameter_groups(model, config.weight_decay, config.decay_norm)
    if config.optimizer == OptimizerName.adam:
        return torch.optim.Adam(groups, lr=config.max_lr)
    return torch.optim.SGD(groups, lr=config.max_lr, momentum=config.momentum,
                           nesterov=config.nesterov and config.momentum > 0)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """Two-phase linear OneCycle stepped per batch: initial -> max at pct_start -> min at the end."""
    initial_lr = config.max_lr * config.initial_lr_fraction
    total_steps = config.epochs * steps_per_epoch
    if total_steps < 4:
        raise FastCifarError(f"only {total_steps} training steps: OneCycle needs at least 4 "
                             "(more epochs, more data or a smaller --batch-size)")
    # torch needs at least two warm-up steps; only tiny smoke runs ever hit this floor.
    pct_start = min(max(config.pct_start, 2.0 / total_steps), 0.5)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.max_lr,
        epochs=config.epochs,
        steps_per_epoch=steps_per_epoch,
        pct_start=pct_start,
        anneal_strategy="linear",
        three_phase=False,
        div_factor=1.0 / config.initial_lr_fraction,
        final_div_factor=initial_lr / config.min_lr,
        cycle_momentum=config.cycle_momentum,
    )
