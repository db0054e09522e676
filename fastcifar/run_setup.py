"""What a run does once before its first timed step: check its steps, make its folder, and warm
up torch.compile and cudnn off the clock."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as functional
from torch import nn

from fastcifar.config import FULL_TRAIN_SIZE, TrainConfig, kept_per_batch
from fastcifar.device import DeviceStep, PrecisionPlan, autocast
from fastcifar.errors import FastCifarError, MachineFault
from fastcifar.evaluation import predict_logits

if TYPE_CHECKING:
    from fastcifar.selection import BatchSelection


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
            sample: tuple[torch.Tensor, torch.Tensor],
            selection: BatchSelection | None = None, eval_model: nn.Module | None = None,
            test_batch_sizes: tuple[int, ...] = ()) -> None:
    """Forward/backward passes on the real model (at the size a step trains: the selected part
    of a batch) and on the selection proxy, at every image side the run trains at (progressive
    resizing), and test passes of `eval_model` (default: `trained_model`) at 32 px at each of
    `test_batch_sizes` (the test loader's full and last batch; default: the sample's).

    torch.compile and cudnn autotuning happen here, off the clock: before, the next side and
    the first test pass compiled on the run's clock. The weights, BN statistics and RNG states
    (dropout draws) are put back, so the run is the same as without the warm-up.
    """
    if device.type != "cuda" and not config.compile:
        return
    images, labels = device_step(*sample)
    kept = kept_per_batch(config.select_fraction, len(labels))
    sides = sorted({config.train_image_size(epoch) for epoch in range(config.epochs)})
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for side in sides:
            _warm_up_network(model, trained_model, _at_side(images[:kept], side),
                             labels[:kept], device, plan)
            if selection is not None:
                _warm_up_network(selection.proxy, selection.proxy, _at_side(images, side),
                                 labels, device, plan)
        test_images = _at_side(images, FULL_TRAIN_SIZE)
        for size in test_batch_sizes or (len(images),):
            batch = test_images.repeat(-(-size // len(test_images)), 1, 1, 1)[:size]
            # `is None`, not `or`: a compiled module refuses len(), and so truth testing.
            _warm_up_test_pass(trained_model if eval_model is None else eval_model, batch, device,
                               plan, config.tta, config.tta_shifts)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm_up_network(model: nn.Module, trained_model: nn.Module, images: torch.Tensor,
                     labels: torch.Tensor, device: torch.device, plan: PrecisionPlan) -> None:
    """Two forward/backward passes of `trained_model`; `model`'s state put back."""
    snapshot = copy.deepcopy(model.state_dict())
    trained_model.train()
    for _ in range(2):
        with autocast(device, plan):
            loss = functional.cross_entropy(trained_model(images), labels)
        loss.backward()
    model.zero_grad(set_to_none=True)
    model.load_state_dict(snapshot)


def _warm_up_test_pass(model: nn.Module, images: torch.Tensor, device: torch.device,
                       plan: PrecisionPlan, tta: bool, shifts: bool) -> None:
    """An eval pass in the TTA mode (eval mode changes no state), then back to train mode."""
    model.eval()
    with torch.no_grad(), autocast(device, plan):
        predict_logits(model, images, tta, shifts)
    model.train()


def _at_side(images: torch.Tensor, side: int) -> torch.Tensor:
    """`images` resized to `side` px in their memory format (only the shape matters here)."""
    if images.shape[-1] == side:
        return images
    layout = (torch.channels_last if images.is_contiguous(memory_format=torch.channels_last)
              and not images.is_contiguous() else torch.contiguous_format)
    return functional.interpolate(images, size=(side, side), mode="bilinear",
                                  align_corners=False).contiguous(memory_format=layout)


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


def require_weights_folder(weights_dir: Path) -> None:
    """--weights-dir names a folder (predict's --weights a file): refuse a file before the
    run, whose best weights would be lost and whose final write would fail at its end."""
    if not weights_dir.is_dir() and (weights_dir.exists() or weights_dir.suffix == ".safetensors"):
        raise FastCifarError(f"--weights-dir {weights_dir} is a file name: it takes the folder the "
                             "run's best and final .safetensors files go to")
