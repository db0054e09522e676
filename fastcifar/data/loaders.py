"""Build the train/test FFCV Loaders: pipelines as lists of operations, checked betons, subsets."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fastcifar.config import AugmentConfig, LoaderConfig
from fastcifar.data.augment import EpochCell, fill_colour, make_fused_augment
from fastcifar.data.convert import FORMAT_VERSION, METADATA
from fastcifar.errors import FastCifarError

# The side of the stored CIFAR-10 images, pixels: what the test set is scored at.
STORED_SIZE = 32

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DatasetMetadata:
    """What `convert` recorded: class names, counts and the train mean/std (0-255 scale)."""

    class_names: list[str]
    train_count: int
    test_count: int
    mean: list[float]
    std: list[float]
    train_path: Path
    test_path: Path
    source: dict = field(default_factory=dict)  # what was converted: path, kind, sha256


def read_metadata(data_dir: Path) -> DatasetMetadata:
    """Read and check the metadata and betons in `data_dir` (sizes, fields, format)."""
    data_dir = Path(data_dir)
    metadata_path = data_dir / METADATA
    if not metadata_path.is_file():
        raise FastCifarError(
            f"no converted dataset in {data_dir}: run `fastcifar convert` first (or pass --data)"
        )
    try:
        metadata = json.loads(metadata_path.read_text())
        version = metadata["format_version"]
        betons = metadata["betons"]
        names, mean, std = metadata["class_names"], metadata["mean"], metadata["std"]
        counts = metadata["counts"]
    except (ValueError, KeyError, TypeError) as error:
        raise FastCifarError(f"corrupt metadata file {metadata_path}: rerun `fastcifar convert "
                             "--force`") from error
    if version != FORMAT_VERSION:
        raise FastCifarError(f"{metadata_path} is format {version}, this fastcifar reads "
                             f"{FORMAT_VERSION}: rerun `fastcifar convert --force`")
    paths = {}
    for split in ("train", "test"):
        path = data_dir / betons[split]["file"]
        if not path.is_file():
            raise FastCifarError(f"missing {path}: run `fastcifar convert` first")
        if path.stat().st_size != betons[split]["bytes"]:
            raise FastCifarError(
                f"{path} is {path.stat().st_size} bytes but the metadata says "
                f"{betons[split]['bytes']} (truncated or replaced): rerun `fastcifar convert --force`"
            )
        _check_beton_fields(path, counts[split])
        paths[split] = path
    return DatasetMetadata(names, counts["train"], counts["test"], mean, std,
                           paths["train"], paths["test"], metadata.get("source") or {})


def _check_beton_fields(path: Path, expected_count: int) -> None:
    """The beton must hold `image` (RGB) and `label` (int) fields and the recorded count."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader

    try:
        reader = Reader(str(path))
    except Exception as error:  # FFCV raises assorted errors for damaged headers
        raise FastCifarError(f"{path} is not a readable FFCV beton: {error}") from error
    fields = {name: type(field) for name, field in reader.handlers.items()}
    if fields != {"image": RGBImageField, "label": IntField}:
        raise FastCifarError(f"{path} has fields {sorted(fields)}, expected image and label")
    if reader.num_samples != expected_count:
        raise FastCifarError(f"{path} holds {reader.num_samples} records, the metadata says "
                             f"{expected_count}: rerun `fastcifar convert --force`")


def train_pipeline(augment: AugmentConfig | None, seed: int, mean: list[float],
                   epoch_cell: EpochCell | None = None) -> list:
    """decode -> fused augmentation (crop/flip/cutout/jitter/gray, uint8) -> NCHW tensor view."""
    return image_pipeline(None if augment is None else make_fused_augment(
        augment, seed, fill_colour(mean), epoch_cell))


def image_pipeline(augmentation=None) -> list:
    """decode -> `augmentation` (an FFCV operation, or none) -> NCHW uint8 tensor view."""
    from ffcv.fields.decoders import SimpleRGBImageDecoder
    from ffcv.transforms import ToTensor, ToTorchImage

    return [SimpleRGBImageDecoder(), *([] if augmentation is None else [augmentation]),
            ToTensor(), ToTorchImage(channels_last=True, convert_back_int16=False)]


def test_pipeline() -> list:
    """decode -> NCHW tensor view; no augmentation."""
    return image_pipeline()


def builtin_train_pipeline(augment: AugmentConfig, mean: list[float], std: list[float]) -> list:
    """The closest train pipeline made of FFCV's own ops (for `benchmark loader`), normalising."""
    from ffcv.fields.decoders import SimpleRGBImageDecoder
    from ffcv.transforms import (
        Cutout,
        NormalizeImage,
        RandomHorizontalFlip,
        RandomTranslate,
        ToTensor,
        ToTorchImage,
    )
    from ffcv.transforms.color_jitter import RandomBrightness, RandomContrast, RandomSaturation

    fill = tuple(int(v) for v in fill_colour(mean))
    return [
        SimpleRGBImageDecoder(),
        RandomTranslate(padding=augment.pad, fill=fill),
        RandomHorizontalFlip(),
        Cutout(augment.cutout_size, fill),
        RandomBrightness(augment.brightness, p=augment.p_jitter),
        RandomContrast(augment.contrast, p=augment.p_jitter),
        RandomSaturation(augment.saturation, p=augment.p_jitter),
        NormalizeImage(np.array(mean), np.array(std), np.float32),
        ToTensor(),
        ToTorchImage(channels_last=True, convert_back_int16=False),
    ]


def label_pipeline() -> list:
    from ffcv.fields.decoders import IntDecoder
    from ffcv.transforms import Squeeze, ToTensor

    return [IntDecoder(), ToTensor(), Squeeze(1)]


def _worker_count(requested: int) -> int:
    import os

    return requested if requested > 0 else len(os.sched_getaffinity(0))


def _subset(count: int | None, available: int, split: str) -> np.ndarray | None:
    if count is None:
        return None
    if count > available:
        raise FastCifarError(f"--{split}-subset {count} is larger than the {available} "
                             f"{split} records")
    return np.arange(count)


def make_loader(path: Path, image_pipeline: list, config: LoaderConfig, train: bool,
                subset: np.ndarray | None, seed: int, batch_size: int | None = None):
    """An FFCV Loader over `path` with the given image pipeline and the label pipeline."""
    from ffcv.loader import Loader, OrderOption

    return Loader(
        str(path),
        batch_size=batch_size or config.batch_size,
        num_workers=_worker_count(config.workers),
        order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL,
        drop_last=train,  # equal-size train steps keep BN statistics and the LR schedule even
        os_cache=True,  # CIFAR-10 betons are small: let the page cache hold them
        distributed=config.distributed,
        seed=seed,
        indices=subset,
        pipelines={"image": image_pipeline, "label": label_pipeline()},
    )


def read_labels(path: Path) -> np.ndarray:
    """Every record's label, read from the beton's index (no image is decoded)."""
    from ffcv.reader import Reader

    reader = Reader(str(path))
    label_field = list(reader.handlers).index("label")
    return np.asarray(reader.metadata[f"f{label_field}"], dtype=np.int64)


def split_holdout(labels: np.ndarray, count: int, candidates: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, holdout indices): `count` held-out images, as equal per class as can be.

    The choice uses a fixed generator, not the run's seed, so every run of a sweep is scored
    on the same held-out images.
    """
    candidates = np.arange(len(labels)) if candidates is None else np.asarray(candidates)
    if not 0 < count < len(candidates):
        raise FastCifarError(f"--holdout {count} must leave train images: there are "
                             f"{len(candidates)}")
    shuffled = np.random.default_rng(20261126).permutation(candidates)
    classes = labels[shuffled]
    # Rank of each image within its class in the shuffled order; take ranks round-robin.
    rank = np.zeros(len(shuffled), dtype=np.int64)
    for label in np.unique(classes):
        members = classes == label
        rank[members] = np.arange(members.sum())
    held = shuffled[np.lexsort((np.arange(len(shuffled)), rank))[:count]]
    return np.setdiff1d(candidates, held), np.sort(held)


@dataclass
class Loaders:
    """The train, test and (optional) held-out loaders with the metadata they were built from."""

    train: object
    test: object
    metadata: DatasetMetadata
    train_count: int
    test_count: int
    holdout: object | None = None  # train images never trained on, in the test pipeline
    holdout_count: int = 0
    epoch_cell: EpochCell | None = None  # the epoch the augmentation kernel sees
    # Sets the side of the train images the next epoch yields (progressive resizing).
    set_train_size: Callable[[int], None] | None = None

    def train_epoch(self, epoch: int, image_size: int | None = None):
        """An iterator over train epoch `epoch` (0-based): FFCV's order for it and the kernel's
        epoch-dependent draws (alternating flip) both follow `epoch`, also after a resume.

        `image_size` (None: the stored side) makes the augmentation downscale each crop to it.
        """
        self.train.next_epoch = epoch
        if self.epoch_cell is not None:
            self.epoch_cell.set(epoch)
        if image_size is not None and self.set_train_size is not None:
            self.set_train_size(image_size)
        elif image_size is not None and image_size != STORED_SIZE:
            raise FastCifarError("these loaders cannot resize train images")
        return iter(self.train)


@dataclass(frozen=True)
class RecordSelection:
    """Which beton records each loader reads: None means every record of its file."""

    train: np.ndarray | None
    test: np.ndarray | None
    holdout: np.ndarray | None  # train-file records held out of training, or None

    def counts(self, metadata: DatasetMetadata) -> tuple[int, int, int]:
        """(train, test, holdout) image counts."""
        return (metadata.train_count if self.train is None else len(self.train),
                metadata.test_count if self.test is None else len(self.test),
                0 if self.holdout is None else len(self.holdout))


def select_records(config: LoaderConfig, metadata: DatasetMetadata) -> RecordSelection:
    """The subsets and the held-out split that `config` asks for, checked against the data."""
    train_subset = _subset(config.train_subset, metadata.train_count, "train")
    test_subset = _subset(config.test_subset, metadata.test_count, "test")
    holdout_indices = None
    if config.holdout:
        train_subset, holdout_indices = split_holdout(read_labels(metadata.train_path),
                                                      config.holdout, train_subset)
    selection = RecordSelection(train_subset, test_subset, holdout_indices)
    train_count = selection.counts(metadata)[0]
    if config.batch_size > train_count:
        raise FastCifarError(f"batch size {config.batch_size} is larger than the {train_count} "
                             "train images: no full batch to train on")
    return selection


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
