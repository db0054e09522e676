"""Write CIFAR-10 once to FFCV .beton files plus a metadata JSON, atomically and only when stale."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastcifar.atomic import atomic_path, write_json
from fastcifar.config import ConvertConfig
from fastcifar.data.sources import (
    CifarArrays,
    Progress,
    Split,
    download_official,
    find_source,
    read_source,
)
from fastcifar.data.writer_watch import writer_deaths_raise
from fastcifar.errors import FastCifarError, MachineFault

TRAIN_BETON = "cifar10_train.beton"
TEST_BETON = "cifar10_test.beton"
METADATA = "cifar10_meta.json"
FORMAT_VERSION = 1  # bump when the beton layout or the metadata's meaning changes


@dataclass(frozen=True)
class ConvertResult:
    """Where the betons and metadata are, what they hold, and whether this call wrote them."""

    train_path: Path
    test_path: Path
    metadata_path: Path
    metadata: dict
    skipped: bool
    seconds: float


class _SplitDataset:
    """The indexed dataset FFCV's writer consumes: (HWC uint8 image, int label)."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.split.images[index], int(self.split.labels[index])


def _write_beton(split: Split, path: Path, workers: int) -> None:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    # raw mode: CIFAR images are tiny, so decoding JPEG would cost more than reading bytes.
    writer = DatasetWriter(
        str(path),
        {"image": RGBImageField(write_mode="raw", max_resolution=32), "label": IntField()},
        num_workers=workers,
    )
    try:
        with writer_deaths_raise():
            writer.from_indexed_dataset(_SplitDataset(split), chunksize=1000)
    except BaseException:
        # FFCV frees its shared index only when the write completes.
        with contextlib.suppress(AttributeError, OSError):
            writer.metadata_sm.close()
            writer.metadata_sm.unlink()
        raise


def _replace_betons(data: CifarArrays, out_dir: Path, workers: int,
                    progress: Progress) -> None:
    """Write both betons beside the old ones; only once both are whole does the old metadata
    go and do they replace the old betons, so a failed write leaves an earlier conversion as
    it was, and a crash while replacing never leaves a set that looks complete."""
    # Renamed into place in reverse order of entry: the train beton first, then the test one.
    with (atomic_path(out_dir / TEST_BETON) as new_test,
          atomic_path(out_dir / TRAIN_BETON) as new_train):
        progress("write train", 0, len(data.train.labels))
        _write_beton(data.train, new_train, workers)
        progress("write test", 0, len(data.test.labels))
        _write_beton(data.test, new_test, workers)
        (out_dir / METADATA).unlink(missing_ok=True)


def channel_statistics(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0-255 scale) of (N, H, W, 3) uint8 images, in float64."""
    pixels = images.reshape(-1, 3)
    total = np.zeros(3)
    total_squares = np.zeros(3)
    for start in range(0, len(pixels), 1 << 22):  # chunks keep the float64 copy small
        chunk = pixels[start:start + (1 << 22)].astype(np.float64)
        total += chunk.sum(axis=0)
        total_squares += (chunk * chunk).sum(axis=0)
    mean = total / len(pixels)
    std = np.sqrt(total_squares / len(pixels) - mean * mean)
    return mean.tolist(), std.tolist()


def _counts(labels: np.ndarray, class_names: list[str]) -> dict[str, int]:
    counts = np.bincount(labels, minlength=len(class_names))
    return {name: int(count) for name, count in zip(class_names, counts, strict=True)}


def _versions() -> dict[str, str]:
    import importlib.metadata

    import torch

    return {"ffcv": importlib.metadata.version("ffcv"), "numpy": np.__version__,
            "torch": torch.__version__}


def build_metadata(data: CifarArrays, train_path: Path, test_path: Path,
                   statistics: tuple[list[float], list[float]], listing: str | None) -> dict:
    """Everything a loader or a reader of the folder needs to trust and use the betons
    (`statistics`: the train images' channel mean and std; `listing`: a folder source's)."""
    mean, std = statistics
    return {
        "format_version": FORMAT_VERSION,
        "class_names": data.class_names,
        "counts": {"train": int(len(data.train.labels)), "test": int(len(data.test.labels))},
        "counts_per_class": {"train": _counts(data.train.labels, data.class_names),
                             "test": _counts(data.test.labels, data.class_names)},
        "mean": mean,
        "std": std,
        "source": {"path": data.source, "kind": data.source_kind,
                   "sha256": data.source_fingerprint, "listing_sha256": listing},
        "betons": {"train": {"file": train_path.name, "bytes": train_path.stat().st_size},
                   "test": {"file": test_path.name, "bytes": test_path.stat().st_size}},
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def metadata_problem(metadata: object) -> str | None:
    """What is wrong with the metadata's shape, or None: the keys and types readers rely on."""
    if not isinstance(metadata, dict):
        return "not a JSON object"
    missing = [key for key in ("format_version", "betons", "class_names", "mean", "std",
                               "counts") if key not in metadata]
    if missing:
        return f"lacks {', '.join(missing)}"
    if not _is_count(metadata["format_version"]):
        return "format_version is not a whole number"
    problem = (class_names_problem(metadata["class_names"])
               or pixel_statistics_problem(metadata["mean"], metadata["std"]))
    if problem:
        return problem
    betons, counts = metadata["betons"], metadata["counts"]
    for split in ("train", "test"):
        entry = betons.get(split) if isinstance(betons, dict) else None
        if not (isinstance(entry, dict) and isinstance(entry.get("file"), str)
                and _is_count(entry.get("bytes"))):
            return f"betons.{split} is not a file name and its size"
        if not (isinstance(counts, dict) and _is_count(counts.get(split))):
            return f"counts.{split} is not a count"
    return None


# Below this a channel is all but constant, and dividing by it blows the images up to inf.
MIN_PIXEL_STD = 1e-3


def class_names_problem(names: object) -> str | None:
    """What is wrong with recorded class names (the metadata's, a weights file's), or None."""
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)
            and len(set(names)) == len(names)):
        return "class_names is not a list of distinct names"
    return None


def pixel_statistics_problem(mean: object, std: object) -> str | None:
    """What is wrong with a per-channel mean and std on the 0-255 scale (the metadata's, a
    weights file's), or None."""
    for key, values, low in (("mean", mean, 0), ("std", std, MIN_PIXEL_STD)):
        if not (isinstance(values, list) and len(values) == 3
                and all(is_finite_number(v) and low <= v <= 255 for v in values)):
            return f"{key} is not 3 pixel values in {low:g}..255 (one per channel)"
    return None


def is_finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _folder_listing_sha256(folder: Path) -> str:
    """sha256 of each file's name, size and modification time under a folder source: a file
    added, removed, resized or touched changes it. (Comparing the newest time with the
    metadata's missed a tree copied in with its older times, `cp -a` or `tar x`.)"""
    from fastcifar.data.sources import folder_files

    digest = hashlib.sha256()
    for path in folder_files(folder):
        try:
            stat = path.stat()
        except FileNotFoundError:  # a broken link
            stat = path.lstat()
        digest.update(os.fsencode(path.relative_to(folder))
                      + f"\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _up_to_date(out_dir: Path, source: Path, listing: str | None) -> dict | None:
    """The existing metadata when the betons in `out_dir` were made from this same source: an
    archive with the same sha256, a folder with the same `listing` (_folder_listing_sha256)."""
    from fastcifar.data.sources import file_sha256

    metadata_path = out_dir / METADATA
    try:
        metadata = json.loads(metadata_path.read_text())
    except (OSError, ValueError):
        return None
    if metadata_problem(metadata) or metadata["format_version"] != FORMAT_VERSION:
        return None
    for entry in metadata["betons"].values():
        beton = out_dir / entry["file"]
        if not beton.is_file() or beton.stat().st_size != entry["bytes"]:
            return None
    recorded = metadata.get("source")
    # The data may lie one folder down (ROOT/cifar-10-batches-py, ROOT/one-folder/train): the
    # metadata names that folder.
    if not isinstance(recorded, dict) or str(source) not in (
            recorded.get("path"), str(Path(str(recorded.get("path"))).parent)):
        return None
    if source.is_file():
        return metadata if recorded.get("sha256") == file_sha256(source) else None
    return metadata if listing is not None and recorded.get("listing_sha256") == listing else None


@contextlib.contextmanager
def _exclusive_lock(out_dir: Path) -> Iterator[None]:
    """Serialise conversions into the same folder; the second one then finds it up to date."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        handle = open(out_dir / ".convert.lock", "w")  # noqa: SIM115 - held for the block
    except OSError as error:
        raise MachineFault(f"cannot write to {out_dir}: {error.strerror}") from error
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def resolve_source(config: ConvertConfig) -> Path:
    """The source to read: the one given, one lying in the output folder, or a download."""
    if config.source is not None:
        return Path(config.source).resolve()
    found = find_source([config.out_dir, Path.cwd()])
    if found is not None:
        return found.resolve()
    if not config.download:
        raise FastCifarError(
            "no CIFAR-10 source found: pass --source with cifar-10-python.tar.gz, its extracted "
            "folder, or an ImageFolder tree (train/<class>/, test/<class>/)"
        )
    return download_official(config.out_dir).resolve()


def _no_progress(stage: str, done: int, total: int) -> None:
    return None


def convert(config: ConvertConfig, progress: Progress = _no_progress) -> ConvertResult:
    """Convert the source to `cifar10_{train,test}.beton` + metadata in `config.out_dir`."""
    started = time.perf_counter()
    out_dir = Path(config.out_dir)
    source = resolve_source(config)
    train_path, test_path, metadata_path = (out_dir / TRAIN_BETON, out_dir / TEST_BETON,
                                            out_dir / METADATA)
    with _exclusive_lock(out_dir):
        for path in (train_path, test_path, metadata_path):
            if path.exists() and not path.is_file():
                raise FastCifarError(f"{path} is not a file: move it away or convert to "
                                     "another --out")
        # Taken before the read: a file changed during it makes the next convert read again.
        listing = _folder_listing_sha256(source) if source.is_dir() else None
        existing = None if config.force else _up_to_date(out_dir, source, listing)
        if existing is not None:
            return ConvertResult(train_path, test_path, metadata_path, existing, True,
                                 time.perf_counter() - started)
        # A source that fails to read leaves an earlier conversion as it was.
        data = read_source(source, fix_images=config.fix_images, progress=progress)
        statistics = _normalisable_statistics(data, source)
        workers = max(1, min(8, _cpu_count()))
        _check_free_space(out_dir, data, workers)
        _replace_betons(data, out_dir, workers, progress)
        metadata = build_metadata(data, train_path, test_path, statistics, listing)
        write_json(metadata_path, metadata)
    return ConvertResult(train_path, test_path, metadata_path, metadata, False,
                         time.perf_counter() - started)


def _normalisable_statistics(data: CifarArrays, source: Path) -> tuple[list[float], list[float]]:
    """The train images' channel mean and std, refused before anything is written when a
    channel cannot be normalised (the same value in every pixel: a std of 0), which every
    reader of the metadata would refuse after a conversion that said it succeeded."""
    statistics = channel_statistics(data.train.images)
    problem = pixel_statistics_problem(*statistics)
    if problem:
        raise FastCifarError(f"cannot convert {source}: the train images' pixel {problem}, so "
                             "they cannot be normalised (a channel has one value in every image)")
    return statistics


# A raw beton holds each image's bytes plus its metadata row, in pages of 8 MiB, each writer
# process finishing its own last page (measured: 3,547 bytes per train image, 50.6 MB for the
# 10,000 test images with 3 writers).
BETON_BYTES_PER_IMAGE = 3600
BETON_PAGE_BYTES = 8 << 20


def beton_bytes_needed(image_count: int, image_bytes: int, workers: int) -> int:
    """An upper estimate of one raw beton's size."""
    return image_count * max(BETON_BYTES_PER_IMAGE, image_bytes + 528) + (
        workers + 1) * BETON_PAGE_BYTES


def _check_free_space(out_dir: Path, data: CifarArrays, workers: int) -> None:
    """Refuse before writing when the betons cannot fit, saying how much room they need (a
    writer process that dies on a full disk only ends the write). The old betons stay until
    the new ones replace them, so the new ones need all their room."""
    import shutil

    needed = sum(beton_bytes_needed(len(split.labels), int(np.prod(split.images.shape[1:])),
                                    workers)
                 for split in (data.train, data.test)) + (1 << 20)
    free = shutil.disk_usage(out_dir).free
    if needed > free:
        raise MachineFault(f"not enough space in {out_dir}: the betons need about "
                           f"{needed / 1e6:,.0f} MB and {free / 1e6:,.0f} MB are free; free "
                           "space or convert to another disk with --out")


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0))
