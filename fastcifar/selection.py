"""Data selection (`--select-fraction`): a narrow proxy network, trained alongside on every
image, scores each train batch, and the main model steps only on the images the proxy finds
hardest (airbench96's proxy-loss selection, with the proxy trained jointly, not beforehand)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fastcifar.config import TrainConfig
from fastcifar.device import PrecisionPlan, autocast
from fastcifar.model import CustResNet, build_model
from fastcifar.optim import Optimizers

# The proxy is CustResNet's plan at a quarter of its width: ~1/16 of its FLOPs and parameters.
PROXY_WIDTH = 16


def kept_per_batch(fraction: float, batch_size: int) -> int:
    """How many of a `batch_size` batch the model steps on: the nearest to `fraction` of it,
    at least one."""
    return max(1, round(fraction * batch_size))


def hardest(losses: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the `fraction` of `losses` that are largest (at least one), largest first."""
    return torch.topk(losses, kept_per_batch(fraction, len(losses)), sorted=True).indices


class BatchSelection:
    """Keeps the hardest `config.select_fraction` of each batch, by a proxy's per-image loss.

    The proxy trains with the run's own optimisers and schedule (a copy of them over its
    parameters) on the whole batch; the loss that scores a batch is the one it then steps on,
    so each batch costs the proxy one forward and one backward pass. Under torchrun each rank's
    proxy trains on its own shard (its steps are not all-reduced); a checkpoint keeps rank 0's.
    """

    def __init__(self, config: TrainConfig, device: torch.device, num_classes: int,
                 steps_per_epoch: int) -> None:
        self.fraction, self.device = config.select_fraction, device
        # Whitening fits 27 filters into the prep conv, more than the proxy's 16.
        proxy_config = dataclasses.replace(config, whiten=False, whiten_init=False)
        self.proxy = build_model(proxy_config, device, num_classes=num_classes,
                                 width=PROXY_WIDTH)
        self.optimizers = Optimizers(self.proxy, proxy_config, steps_per_epoch)
        self.criterion = nn.CrossEntropyLoss(reduction="none")

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, plan: PrecisionPlan,
                 scaler: torch.amp.GradScaler) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's hardest images and their labels, after one proxy step on all of it."""
        self.proxy.train()
        self.optimizers.zero_grad()
        with autocast(self.device, plan):
            losses = self.criterion(self.proxy(images), labels)
        scaler.scale(losses.mean()).backward()
        self.optimizers.step(scaler)
        self.optimizers.schedule_step()
        chosen = hardest(losses.detach().float(), self.fraction)
        return images[chosen], labels[chosen]

    def state_dict(self) -> dict:
        return {"model": self.proxy.state_dict(), **self.optimizers.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.proxy.load_state_dict(state["model"])
        self.optimizers.load_state_dict(state)


def batch_selection(config: TrainConfig, model: CustResNet,
                    steps_per_epoch: int) -> BatchSelection | None:
    """The selection for `model`'s run (a proxy on its device, for its classes), or None when
    the run trains on every image (`select_fraction` 1)."""
    if config.select_fraction >= 1:
        return None
    return BatchSelection(config, next(model.parameters()).device, model.fc.out_features,
                          steps_per_epoch)
