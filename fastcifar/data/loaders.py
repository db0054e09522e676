"""Build a run's loaders: the one place that chooses FFCV's host loader (with the fused
kernel) or the device-resident data path; and the images the whitened prep conv is fitted on."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fastcifar.config import AugmentConfig, LoaderConfig
from fastcifar.data.augment import EpochCell, fill_colour, make_fused_augment
from fastcifar.data.dataset import (
    STORED_SIZE,
    DatasetMetadata,
    Loaders,
    RecordSelection,
    read_labels,
    read_metadata,
    select_records,
    split_holdout,
)
from fastcifar.data.pipelines import (
    builtin_train_pipeline,
    image_pipeline,
    label_pipeline,
    make_loader,
    test_pipeline,
    train_pipeline,
)

if TYPE_CHECKING:
    import torch

# Re-exported: the names callers import from here.
__all__ = ["STORED_SIZE", "DatasetMetadata", "Loaders", "RecordSelection", "build_loaders",
           "builtin_train_pipeline", "first_stored_images", "first_train_images",
           "image_pipeline", "label_pipeline", "make_loader", "read_labels", "read_metadata",
           "select_records", "split_holdout", "test_pipeline", "train_pipeline"]


def build_loaders(config: LoaderConfig, augment: AugmentConfig | None, seed: int,
                  device: torch.device | None = None) -> Loaders:
    """Train (random order, drop_last, fused augmentation), test (sequential) and held-out
    (sequential, from the train file) loaders. With `config.on_device`, the device-resident
    ones (`device_data`) on `device` (None: the CPU)."""
    metadata = read_metadata(config.data_dir)
    selection = select_records(config, metadata)
    train_count, test_count, holdout_count = selection.counts(metadata)
    if config.on_device:
        from fastcifar.data.device_data import build_device_loaders

        return build_device_loaders(config, augment, seed, metadata, selection, device)
    epoch_cell = EpochCell()
    augmentation = (make_fused_augment(augment, seed, fill_colour(metadata.mean), epoch_cell,
                                       STORED_SIZE) if augment is not None else None)
    train = make_loader(metadata.train_path, image_pipeline(augmentation), config, True,
                        selection.train, seed)
    # Every rank evaluates the whole test set: metrics need no gathering and stay exact.
    whole = replace(config, distributed=False)
    test = make_loader(metadata.test_path, test_pipeline(), whole, False, selection.test, seed)
    holdout = (make_loader(metadata.train_path, test_pipeline(), whole, False,
                           selection.holdout, seed) if selection.holdout is not None else None)
    return Loaders(train, test, metadata, train_count, test_count, holdout, holdout_count,
                   epoch_cell, None if augmentation is None else functools.partial(
                       _resize_ffcv_train, train, augmentation))


def _resize_ffcv_train(loader, augmentation, size: int) -> None:
    """The kernel's output side for the next epoch; FFCV regenerates the pipeline (its code
    and its buffers' shapes) only when the side changes."""
    loader.recompile = size != augmentation.output_size
    augmentation.output_size = size


def first_train_images(loaders: Loaders, config: LoaderConfig, seed: int,
                       normalise: Callable[[torch.Tensor, torch.Tensor], tuple],
                       count: int = 5120) -> torch.Tensor:
    """The first `count` train images, unaugmented and normalised by `normalise` (the device
    step), as one float CPU tensor: what the whitened prep conv is fitted on."""
    import torch

    count = min(count, loaders.train_count)
    # Every torchrun rank fits the same filters: all of them read the same images.
    loader = make_loader(loaders.metadata.train_path, test_pipeline(),
                         replace(config, distributed=False), False, np.arange(count), seed)
    return torch.cat([normalise(images, labels)[0].float().cpu() for images, labels in loader])


def first_stored_images(data_dir: Path, split: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `count` images of a converted split ("train" or "test") as stored, uint8
    (N, 32, 32, 3) RGB, and their labels: what a person looks at, or a check scores. Copied:
    FFCV reuses a few batch buffers, and views would show later batches' images."""
    metadata = read_metadata(data_dir)
    loader = make_loader(metadata.train_path if split == "train" else metadata.test_path,
                         test_pipeline(), LoaderConfig(data_dir=data_dir, workers=1), False,
                         np.arange(count), 0)
    images, labels = zip(*((batch.permute(0, 2, 3, 1).numpy().copy(), names.numpy().copy())
                           for batch, names in loader), strict=True)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)
