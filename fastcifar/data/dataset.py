"""The converted dataset as the loaders see it: its checked metadata and betons, which records
each split reads (subsets, the held-out split), and the `Loaders` container both loader
kinds return."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastcifar.config import FULL_TRAIN_SIZE, LoaderConfig
from fastcifar.data.augment import EpochCell
from fastcifar.data.convert import FORMAT_VERSION, METADATA, metadata_problem
from fastcifar.data.loader_guard import check_unchanged, guarded_batches
from fastcifar.errors import FastCifarError

# The side of the stored CIFAR-10 images, pixels: what the test set is scored at.
STORED_SIZE = FULL_TRAIN_SIZE


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
    beton_bytes: dict = field(default_factory=dict)  # beton path -> its size when opened

    def check_betons_unchanged(self) -> None:
        """LoaderFailed when a beton was truncated or replaced since it was checked."""
        for path, size in self.beton_bytes.items():
            check_unchanged(path, size)


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
    except (OSError, ValueError) as error:
        raise FastCifarError(f"corrupt metadata file {metadata_path}: rerun `fastcifar convert "
                             "--force`") from error
    problem = metadata_problem(metadata)
    if problem:
        raise FastCifarError(f"corrupt metadata file {metadata_path} ({problem}): rerun "
                             "`fastcifar convert --force`")
    version, betons, counts = metadata["format_version"], metadata["betons"], metadata["counts"]
    names, mean, std = metadata["class_names"], metadata["mean"], metadata["std"]
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
                           paths["train"], paths["test"], metadata.get("source") or {},
                           {path: path.stat().st_size for path in paths.values()})


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
    # Each record's stored side, from the index: one that is not 32 px means a damaged file
    # (FFCV's decoder would fail with a TypeError when the loader is built).
    images = reader.metadata[f"f{list(reader.handlers).index('image')}"]
    if not ((images["height"] == STORED_SIZE).all() and (images["width"] == STORED_SIZE).all()):
        raise FastCifarError(f"{path} records images that are not {STORED_SIZE}x{STORED_SIZE} "
                             "(a damaged file): rerun `fastcifar convert --force`")


def _subset(count: int | None, available: int, split: str) -> np.ndarray | None:
    if count is None:
        return None
    if count > available:
        raise FastCifarError(f"--{split}-subset {count} is larger than the {available} "
                             f"{split} records")
    return np.arange(count)


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
        self.metadata.check_betons_unchanged()
        return guarded_batches(self.train, "train")


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
