"""Test accuracy of trained checkpoints under three test-time augmentations, in one pass.

    python benchmarks/tta_variants.py CHECKPOINT [CHECKPOINT ...] [--data datasets] [--json PATH]

CHECKPOINT is a finished run's `last.pt` (its final weights, the EMA ones when kept) or a
weights file (`*-final.safetensors`, `*-best.safetensors`). The variants:
- none: the image alone (1 forward pass);
- flip: mean logits of the image and its mirror (2 passes, what `--tta flip` does);
- flip+translate: half the flip logits plus a quarter each of the flip logits of the image
  shifted one pixel up-left and one pixel down-right (6 passes); the uncovered edge is filled
  as the training crops filled it (train mean, or reflection).
Every variant scores the same model on the same decoded batches, so their accuracies differ by
the augmentation alone. Runs on the CPU.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time
from pathlib import Path

import torch
from torch.nn import functional

from fastcifar.atomic import check_can_write, write_json
from fastcifar.checkpoint import load_checkpoint
from fastcifar.config import LoaderConfig, Precision
from fastcifar.data.loaders import make_loader, read_metadata, test_pipeline
from fastcifar.device import DeviceStep, autocast, plan_precision
from fastcifar.errors import script_exit
from fastcifar.evaluation import load_weights, model_from_weights

VARIANTS = ("none", "flip", "flip+translate")


def flip_mean(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Mean logits of the images and their mirrors."""
    return (model(images).float() + model(torch.flip(images, dims=[3])).float()) / 2


def shifted(images: torch.Tensor, down_right: bool, reflect: bool) -> torch.Tensor:
    """Normalised images moved by one pixel; the edge is reflected or the mean (0 here)."""
    padded = functional.pad(images, (1, 1, 1, 1), mode="reflect" if reflect else "constant")
    start = 0 if down_right else 2
    height, width = images.shape[-2:]
    return padded[..., start:start + height, start:start + width].contiguous(
        memory_format=torch.channels_last)


@torch.no_grad()
def score_variants(checkpoint_path: Path, data_dir: Path, precision: Precision) -> dict:
    """Accuracy of one checkpoint's weights under each variant, and the pass's seconds."""
    checkpoint = (load_weights(checkpoint_path) if checkpoint_path.suffix == ".safetensors"
                  else load_checkpoint(checkpoint_path))
    if checkpoint.get("partial"):
        raise SystemExit(f"{checkpoint_path} is from inside an interrupted epoch: finish the run")
    if checkpoint.get("ema"):  # a run with --ema evaluated its averaged weights
        checkpoint["model"] = {key.removeprefix("module."): value
                               for key, value in checkpoint["ema"].items()
                               if key.startswith("module.")}
    metadata = read_metadata(data_dir)
    if checkpoint.setdefault("class_names", metadata.class_names) != metadata.class_names:
        raise SystemExit(f"{checkpoint_path} was trained on other classes than {data_dir}'s")
    config = checkpoint.get("config") or {}
    reflect = (config.get("augment") or {}).get("pad_mode") == "reflect"
    device = torch.device("cpu")
    plan = plan_precision(precision, device)
    model = model_from_weights(checkpoint, device, channels_last=True)
    device_step = DeviceStep(checkpoint.get("mean", metadata.mean),
                             checkpoint.get("std", metadata.std), device, channels_last=True)
    loader = make_loader(metadata.test_path, test_pipeline(),
                         LoaderConfig(data_dir=data_dir, batch_size=500), train=False,
                         subset=None, seed=0)
    correct = dict.fromkeys(VARIANTS, 0)
    count = 0
    started = time.perf_counter()
    for images, labels in loader:
        images, labels = device_step(images, labels)
        with autocast(device, plan):
            plain = model(images).float()  # fp32 averages: bf16's would tie close classes
            flip = (plain + model(torch.flip(images, dims=[3])).float()) / 2
            translate = (flip_mean(model, shifted(images, False, reflect))
                         + flip_mean(model, shifted(images, True, reflect))) / 2
        for name, logits in zip(VARIANTS, (plain, flip, (flip + translate) / 2), strict=True):
            correct[name] += int((logits.argmax(1) == labels).sum())
        count += len(labels)
    return {
        "checkpoint": str(checkpoint_path),
        "recipe": config.get("recipe"),
        "edge_fill": "reflect" if reflect else "train mean",
        "trained_epochs": checkpoint.get("epoch"),
        "test_images": count,
        "accuracy": {name: hits / count for name, hits in correct.items()},
        "forward_passes": {"none": 1, "flip": 2, "flip+translate": 6},
        "seconds_all_variants": time.perf_counter() - started,
    }


@script_exit()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--data", type=Path, default=Path("datasets"))
    parser.add_argument("--precision", type=Precision, default=Precision.fp32)
    parser.add_argument("--json", type=Path, default=None)
    arguments = parser.parse_args()
    if arguments.json is not None:
        check_can_write(arguments.json)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    report = {"benchmark": "tta_variants", "precision": arguments.precision.value,
              "machine": {"processor": platform.processor() or platform.machine(),
                          "torch": torch.__version__, "threads": torch.get_num_threads()},
              "commit": commit, "results": []}
    for path in arguments.checkpoints:
        row = score_variants(path, arguments.data, arguments.precision)
        report["results"].append(row)
        accuracies = ", ".join(f"{name} {value:.2%}" for name, value in row["accuracy"].items())
        print(f"{path}: {accuracies} ({row['seconds_all_variants']:.0f} s)", flush=True)
    if arguments.json is not None:
        write_json(arguments.json, report)


if __name__ == "__main__":
    main()
