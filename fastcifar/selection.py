"""Data selection (`--select-fraction`): a narrow proxy network, trained alongside on every
image, scores each train batch, and the main model steps only on the images the proxy finds
hardest (airbench96's proxy-loss selection, with the proxy trained jointly, not beforehand)."""

from __future__ import annotations

import torch
from torch import nn

from fastcifar.config import TrainConfig, kept_per_batch
from fastcifar.device import PrecisionPlan, autocast
from fastcifar.distributed import Distributed, finite_on_every_rank
from fastcifar.errors import FastCifarError
from fastcifar.model import CustResNet, build_model
from fastcifar.optim import Optimizers

# The proxy is CustResNet's plan at a quarter of its width: ~1/16 of its FLOPs and parameters.
PROXY_WIDTH_DIVISOR = 4
DIVERGENCE_CHECK_CALLS = 16  # a host sync this often: a proxy gone non-finite would pick at random


def hardest(losses: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the `fraction` of `losses` that are largest (at least one), largest first."""
    return torch.topk(losses, kept_per_batch(fraction, len(losses)), sorted=True).indices


class BatchSelection:
    """Keeps the hardest `config.select_fraction` of each batch, by a proxy's per-image loss.

    The proxy is built and trained as the run's model is (its settings, whitening fitted on the
    same images, its optimisers and schedule) on the whole batch, on plain cross-entropy (label
    smoothing would only squeeze the scores); the loss that scores a batch is the one it then
    steps on, so each batch costs the proxy one forward and one backward pass. Under torchrun
    each rank's proxy trains on its own shard (not all-reduced); a checkpoint keeps rank 0's.
    """

    def __init__(self, config: TrainConfig, device: torch.device, num_classes: int,
                 steps_per_epoch: int, whitening_images: torch.Tensor | None = None,
                 distributed: Distributed | None = None) -> None:
        self.fraction, self.device = config.select_fraction, device
        self.distributed = distributed or Distributed()
        self.proxy = build_model(config, device, whitening_images, num_classes,
                                 width_divisor=PROXY_WIDTH_DIVISOR)
        self.optimizers = Optimizers(self.proxy, config, steps_per_epoch)
        self.criterion = nn.CrossEntropyLoss(reduction="none")
        self.loss_sum, self.calls = torch.zeros((), device=device), 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, plan: PrecisionPlan,
                 scaler: torch.amp.GradScaler) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's hardest images and their labels, after one proxy step on all of it.
        `scaler` is the proxy's own (fp16): updated here, apart from the model's."""
        self.proxy.train()
        self.optimizers.zero_grad()
        with autocast(self.device, plan):
            losses = self.criterion(self.proxy(images), labels)
        scaler.scale(losses.mean()).backward()
        self.optimizers.step(scaler)
        scaler.update()
        self.optimizers.schedule_step()
        scores = losses.detach().float()
        self._check_finite(scores.mean())
        chosen = hardest(scores, self.fraction)
        return images[chosen], labels[chosen]

    def _check_finite(self, loss: torch.Tensor) -> None:
        """Refuse to go on once the proxy's loss is non-finite (checked every 16 calls). Each
        rank's proxy is its own, so under torchrun the ranks compare (one all-reduce) and all
        stop at the same call, none left waiting for a rank that stopped alone."""
        self.loss_sum += loss
        self.calls += 1
        if self.calls % DIVERGENCE_CHECK_CALLS:
            return
        if not finite_on_every_rank(self.loss_sum, self.distributed):
            raise FastCifarError("the data-selection proxy diverged (non-finite loss): lower "
                                 "--max-lr / --muon-lr, or train without --select-fraction")

    def state_dict(self) -> dict:
        return {"model": self.proxy.state_dict(), **self.optimizers.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.proxy.load_state_dict(state["model"])
        self.optimizers.load_state_dict(state)


def batch_selection(config: TrainConfig, model: CustResNet, steps_per_epoch: int,
                    whitening_images: torch.Tensor | None,
                    distributed: Distributed | None = None) -> BatchSelection | None:
    """The selection for `model`'s run (a proxy on its device, for its classes, whitened on
    the images that whitened it), or None when the run trains on every image."""
    if config.select_fraction >= 1:
        return None
    return BatchSelection(config, next(model.parameters()).device, model.fc.out_features,
                          steps_per_epoch, whitening_images, distributed)
