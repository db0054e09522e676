"""Device-resident loaders (`--data-on-device`): each beton is decoded once into a uint8 tensor
in device memory (CIFAR-10: ~180 MB), and train batches are gathered and augmented there with
torch ops, so no batch is copied from the host while training. Same interface as FFCV's path.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from fastcifar.config import AugmentConfig, LoaderConfig
from fastcifar.data.augment import fill_colour
from fastcifar.data.augment_torch import TorchAugment
from fastcifar.data.dataset import DatasetMetadata, Loaders, RecordSelection
from fastcifar.data.pipelines import make_loader, test_pipeline

Batch = tuple[torch.Tensor, torch.Tensor]  # uint8 (B, 3, H, W) channels-last, int64 (B,)


@dataclass(frozen=True)
class DeviceSplit:
    """Decoded records of one beton on the device; row k holds beton record `records[k]`."""

    images: torch.Tensor  # uint8 (N, H, W, 3): FFCV's batch layout, so batches are views
    labels: torch.Tensor  # int64 (N,)
    records: np.ndarray  # int64 (N,): keys the augmentation draws, as FFCV's sample indices do

    def rows(self, rows: np.ndarray) -> DeviceSplit:
        """A new split holding only `rows` (a copy on the device)."""
        index = torch.from_numpy(rows).to(self.images.device)
        return DeviceSplit(self.images[index], self.labels[index], self.records[rows])


def read_split(path: Path, records: np.ndarray, config: LoaderConfig,
               device: torch.device) -> DeviceSplit:
    """Decode `records` of the beton at `path` once, through FFCV's sequential test pipeline,
    and move them to `device`."""
    loader = make_loader(path, test_pipeline(), replace(config, distributed=False, on_device=False),
                         False, records, seed=0)
    images, labels, done = None, torch.empty(len(records), dtype=torch.int64), 0
    for batch_images, batch_labels in loader:  # NCHW channels-last views of NHWC buffers
        hwc = batch_images.permute(0, 2, 3, 1)
        if images is None:
            images = torch.empty((len(records), *hwc.shape[1:]), dtype=torch.uint8)
        count = len(batch_labels)
        # Copies, and blocking ones: FFCV refills these (pinned, on CUDA) buffers later.
        images[done:done + count] = hwc
        labels[done:done + count] = batch_labels
        done += count
    return DeviceSplit(images.to(device), labels.to(device), np.asarray(records, dtype=np.int64))


class SequentialDeviceLoader:
    """A split's batches in record order, as views of its device tensors (test, held-out)."""

    def __init__(self, split: DeviceSplit, batch_size: int) -> None:
        self.split, self.batch_size = split, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.split.records) / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        for start in range(0, len(self.split.records), self.batch_size):
            end = start + self.batch_size
            yield self.split.images[start:end].permute(0, 3, 1, 2), self.split.labels[start:end]


def epoch_permutation(count: int, seed: int, epoch: int) -> np.ndarray:
    """The train order of epoch `epoch`: a permutation of range(count) fixed by (seed, epoch),
    drawn on the CPU so that every device (and a resumed run) sees the same order."""
    key = np.random.SeedSequence([seed % 2 ** 64, epoch]).generate_state(1, np.uint64)[0]
    generator = torch.Generator().manual_seed(int(key))
    return torch.randperm(count, generator=generator).numpy()


class DeviceTrainLoader:
    """Train batches from device memory: a (seed, epoch) order, drop_last, augmented there.

    Like FFCV's Loader, `iter()` runs epoch `next_epoch` and advances it, and `len()` is the
    number of full batches.
    """

    def __init__(self, split: DeviceSplit, rows: np.ndarray, batch_size: int,
                 augment: TorchAugment | None, seed: int) -> None:
        self.split, self.rows, self.batch_size = split, rows, batch_size
        self.augment, self.seed = augment, seed
        self.next_epoch = 0
        self.image_size: int | None = None  # None: as stored; else each crop downscaled to it

    def set_image_size(self, size: int) -> None:
        """Downscale each augmented crop to `size` x `size` from the next epoch on."""
        self.image_size = size

    def __len__(self) -> int:
        return len(self.rows) // self.batch_size  # equal steps: even BN statistics and schedule

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.next_epoch
        self.next_epoch += 1
        return self._batches(epoch)

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """(steps, batch) split rows of epoch `epoch`'s batches, on the host."""
        order = self.rows[epoch_permutation(len(self.rows), self.seed, epoch)]
        return order[:len(self) * self.batch_size].reshape(len(self), self.batch_size)

    def _batches(self, epoch: int) -> Iterator[Batch]:
        rows = self.epoch_rows(epoch)
        rows_device = torch.from_numpy(rows).to(self.split.images.device)  # one copy per epoch
        draws = (self.augment.draw_epoch(self.split.records[rows], epoch)
                 if self.augment is not None else None)
        for step in range(len(rows)):
            images = self.split.images[rows_device[step]]
            if draws is not None:
                images = self.augment(images, draws[step], self.image_size)
            yield images.permute(0, 3, 1, 2), self.split.labels[rows_device[step]]


def build_device_loaders(config: LoaderConfig, augment: AugmentConfig | None, seed: int,
                         metadata: DatasetMetadata, selection: RecordSelection,
                         device: torch.device | None = None) -> Loaders:
    """`Loaders` over device-resident data: the train file read once (train and held-out
    records), the test file once; `device` None means the CPU."""
    device = device or torch.device("cpu")
    train_records = (np.arange(metadata.train_count) if selection.train is None
                     else np.asarray(selection.train, dtype=np.int64))
    test_records = (np.arange(metadata.test_count) if selection.test is None
                    else np.asarray(selection.test, dtype=np.int64))
    holdout_records = selection.holdout
    needed = np.union1d(train_records, [] if holdout_records is None else holdout_records
                        ).astype(np.int64)  # sorted: rows are found by searchsorted
    train_split = read_split(metadata.train_path, needed, config, device)
    test_split = read_split(metadata.test_path, test_records, config, device)
    torch_augment = (TorchAugment(augment, seed, fill_colour(metadata.mean), device)
                     if augment is not None else None)
    train = DeviceTrainLoader(train_split, np.searchsorted(needed, train_records),
                              config.batch_size, torch_augment, seed)
    holdout = None
    if holdout_records is not None:
        holdout_split = train_split.rows(np.searchsorted(needed, holdout_records))
        holdout = SequentialDeviceLoader(holdout_split, config.batch_size)
    return Loaders(train, SequentialDeviceLoader(test_split, config.batch_size), metadata,
                   len(train_records), len(test_records), holdout,
                   0 if holdout_records is None else len(holdout_records),
                   set_train_size=train.set_image_size if torch_augment is not None else None)
