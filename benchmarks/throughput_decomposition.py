"""Where training time goes: the loader alone, the train step alone, and the two together.

    python benchmarks/throughput_decomposition.py --data datasets --json results.json

Three rates in images/s, measured in one process with the recipe's own model, optimisers and
precision: (1) the train loader with an empty loop body; (2) the train step on synthetic
batches already on the device; (3) end to end, loader batches through the device step and the
train step. End to end well below the step alone means the loader limits training.
--data-on-device measures the device-resident data path (`fastcifar train --data-on-device`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from fastcifar.atomic import check_can_write, write_json
from fastcifar.checkpoint import machine_description
from fastcifar.config import LoaderConfig, recipe
from fastcifar.data.loaders import build_loaders
from fastcifar.device import DeviceStep, autocast, plan_precision, select_device
from fastcifar.errors import script_exit
from fastcifar.model import build_model
from fastcifar.optim import Optimizers


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_rate(loaders, epochs: int) -> tuple[float, torch.Tensor]:
    """Images/s of whole train epochs with nothing done per batch, and a copy of one batch."""
    count, sample = 0, None
    for epoch in range(epochs + 1):  # epoch 0 compiles the pipeline: not timed
        if epoch == 1:
            started = time.perf_counter()
        for images, _ in loaders.train_epoch(epoch):
            count += len(images) if epoch else 0
            sample = images.clone() if sample is None else sample
    _synchronize(sample.device)  # device-resident batches are augmented asynchronously
    return count / (time.perf_counter() - started), sample


@script_exit()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("datasets"))
    parser.add_argument("--recipe", default="express")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per measurement")
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--data-on-device", action="store_true",
                        help="the device-resident data path instead of FFCV's loader")
    parser.add_argument("--json", type=Path, required=True)
    arguments = parser.parse_args()
    check_can_write(arguments.json)
    config = recipe(arguments.recipe, make_plots=False, loader=LoaderConfig(
        data_dir=arguments.data, train_subset=arguments.train_subset,
        on_device=arguments.data_on_device))
    device = select_device(config.device)
    plan = plan_precision(config.precision, device)
    loaders = build_loaders(config.loader, config.augment, config.seed, device=device)
    step = DeviceStep(loaders.metadata.mean, loaders.metadata.std, device, config.channels_last)
    loader_only, sample = loader_rate(loaders, arguments.epochs)
    whitening = step(sample, torch.zeros(len(sample), dtype=torch.long))[0].float()
    model = build_model(config, device, whitening, len(loaders.metadata.class_names))
    optimizers = Optimizers(model, config, len(loaders.train))
    optimizers.orthogonalize_for(plan.autocast_dtype, device)  # as `train` does
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    def train_step(images: torch.Tensor, labels: torch.Tensor) -> None:
        optimizers.zero_grad()
        with autocast(device, plan):
            loss = criterion(model(images), labels)
        loss.backward()
        optimizers.main.step()
        if optimizers.muon is not None:
            optimizers.muon.step()

    steps = arguments.epochs * len(loaders.train)
    batch_size = config.loader.batch_size
    rates = {"loader_only": loader_only}

    synthetic = torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8)
    images, labels = step(synthetic, torch.randint(0, 10, (batch_size,)))
    for _ in range(3):  # cudnn autotuning, not timed
        train_step(images, labels)
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        train_step(images, labels)
    _synchronize(device)
    rates["step_only"] = steps * batch_size / (time.perf_counter() - started)

    count = 0
    started = time.perf_counter()
    for epoch in range(1, arguments.epochs + 1):
        for host_images, host_labels in loaders.train_epoch(epoch):
            train_step(*step(host_images, host_labels))
            count += len(host_images)
    _synchronize(device)
    rates["end_to_end"] = count / (time.perf_counter() - started)
    rates["end_to_end_over_step_only"] = rates["end_to_end"] / rates["step_only"]

    for name, value in rates.items():
        print(f"{name:28s} {value:12.2f}", flush=True)
    write_json(arguments.json, {
        "benchmark": "throughput_decomposition", "recipe": arguments.recipe,
        "data_on_device": arguments.data_on_device,
        "precision": plan.name, "batch_size": batch_size, "timed_epochs": arguments.epochs,
        "train_images_per_epoch": loaders.train_count, "device": str(device),
        "machine": machine_description(device), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"), "command": "python " + " ".join(sys.argv),
        "images_per_second": rates})
    return 0


if __name__ == "__main__":
    sys.exit(main())
