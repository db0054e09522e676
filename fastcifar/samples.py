"""Sample grids for eyeballing the data path: the first train images as stored, and the same
images after the fused train augmentation (the library side of `fastcifar show-augment`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastcifar.atomic import file_set
from fastcifar.config import AugmentConfig, require_seed
from fastcifar.data.augment import augment_batch, fill_colour
from fastcifar.data.loaders import first_stored_images, read_metadata
from fastcifar.errors import FastCifarError


@dataclass(frozen=True)
class AugmentPreview:
    """The two grids `show_augment` wrote and the images in them."""

    original_path: Path
    augmented_path: Path
    images: np.ndarray  # uint8 (N, 32, 32, 3), as stored
    augmented: np.ndarray  # the same images through the train augmentation
    class_names: list[str]  # one per image


# The most images a grid shows: 1,024 is 128 rows of 8 cells (a 16,000-pixel-tall figure);
# 50,000 built 6,250 rows of axes, twice, for many minutes.
MAX_GRID_IMAGES = 1024


def read_train_samples(data_dir: Path, count: int) -> tuple[np.ndarray, list[str]]:
    """The first `count` train images as stored (NHWC uint8) and their class names."""
    metadata = read_metadata(data_dir)
    most = min(metadata.train_count, MAX_GRID_IMAGES)
    if not 0 < count <= most:
        too_big = count > most == MAX_GRID_IMAGES  # the grid's limit, not the train set's
        raise FastCifarError(f"--count must be in 1..{most}, got {count}"
                             + (" (a bigger grid is too small to read)" if too_big else ""))
    images, labels = first_stored_images(data_dir, "train", count)
    return images, [metadata.class_names[label] for label in labels.tolist()]


def show_augment(data_dir: Path, augment: AugmentConfig, count: int, seed: int,
                 out_dir: Path) -> AugmentPreview:
    """Write samples.png (first train images) and augmented.png (the same, augmented)."""
    from fastcifar.plots import plot_image_grid

    require_seed(seed)
    images, class_names = read_train_samples(data_dir, count)
    mean = read_metadata(data_dir).mean
    # The draws of the loader for a batch of these sample indices with this seed.
    augmented = augment_batch(images, np.arange(count), augment, seed, fill_colour(mean))
    with file_set():  # both grids new, or neither
        original_path = plot_image_grid(images, class_names, Path(out_dir) / "samples.png",
                                         title=f"first {count} train images")
        augmented_path = plot_image_grid(augmented, class_names, Path(out_dir) / "augmented.png",
                                         title=f"the same images augmented (seed {seed})")
    return AugmentPreview(original_path, augmented_path, images, augmented, class_names)
