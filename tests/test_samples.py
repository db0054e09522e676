"""`show-augment`: the first train images as stored and the same images augmented, as grids."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from fastcifar.cli import app
from fastcifar.config import NO_AUGMENT, AugmentConfig, recipe
from fastcifar.data.augment import augment_batch, fill_colour
from fastcifar.data.loaders import read_metadata
from fastcifar.data.sources import read_source
from fastcifar.errors import FastCifarError
from fastcifar.samples import read_train_samples, show_augment


def test_samples_are_the_first_train_records_with_their_class_names(tiny_dataset,
                                                                    tiny_imagefolder):
    images, class_names = read_train_samples(tiny_dataset, 10)
    train = read_source(tiny_imagefolder).train
    np.testing.assert_array_equal(images, train.images[:10])
    names = read_source(tiny_imagefolder).class_names
    assert class_names == [names[label] for label in train.labels[:10]]


def test_show_augment_writes_both_grids_and_changes_pixels(tiny_dataset, tmp_path, check_png):
    preview = show_augment(tiny_dataset, AugmentConfig(cutout_size=8), 12, 0, tmp_path)
    check_png(preview.original_path)
    check_png(preview.augmented_path)
    assert preview.augmented.shape == preview.images.shape == (12, 32, 32, 3)
    changed = (preview.augmented != preview.images).any(axis=(1, 2, 3))
    assert changed.all()  # every image has a cutout hole at least
    unchanged = show_augment(tiny_dataset, NO_AUGMENT, 12, 0, tmp_path / "none")
    np.testing.assert_array_equal(unchanged.augmented, unchanged.images)


def test_show_augment_refuses_more_images_than_the_train_set(tiny_dataset, tmp_path):
    with pytest.raises(FastCifarError, match=r"--count must be in 1\.\.120, got 10000$"):
        show_augment(tiny_dataset, AugmentConfig(), 10_000, 0, tmp_path)
    with pytest.raises(FastCifarError, match="--seed must be in 0..4294967295, got 18446744073709551616"):
        show_augment(tiny_dataset, AugmentConfig(), 8, 2**64, tmp_path)  # an OverflowError
    assert not list(tmp_path.iterdir())


def grid_images(figure) -> np.ndarray:
    """The images an image-grid figure shows, in grid order."""
    return np.stack([axis.get_images()[0].get_array() for axis in figure.axes
                     if axis.get_images()])


def test_show_augment_command_uses_the_recipe_augmentation(tiny_dataset, tmp_path,
                                                           saved_figures):
    result = CliRunner().invoke(app, ["show-augment", "--recipe", "seed", "--count", "8",
                                      "--seed", "3", "--data", str(tiny_dataset),
                                      "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    samples, augmented = (grid_images(figure) for figure in saved_figures)
    images, _ = read_train_samples(tiny_dataset, 8)
    np.testing.assert_array_equal(samples, images)
    fill = fill_colour(read_metadata(tiny_dataset).mean)
    expected = augment_batch(images, np.arange(8), recipe("seed").augment, 3, fill)
    np.testing.assert_array_equal(augmented, expected)
    # the seed recipe's colour jitter and grayscale: the fast recipe's grid would differ
    fast = augment_batch(images, np.arange(8), recipe("fast").augment, 3, fill)
    assert (fast != expected).any()


def test_show_augment_refuses_a_grid_too_big_to_read(tiny_dataset, tmp_path, monkeypatch):
    # 50,000 images built 6,250 rows of axes, twice, for many minutes.
    import fastcifar.samples

    monkeypatch.setattr(fastcifar.samples, "MAX_GRID_IMAGES", 50)  # the tiny set has 120
    with pytest.raises(FastCifarError, match=r"--count must be in 1\.\.50, got 60 \(a bigger "
                                             r"grid is too small to read\)"):
        show_augment(tiny_dataset, AugmentConfig(), 60, 0, tmp_path)
    assert fastcifar.samples.read_train_samples(tiny_dataset, 50)[0].shape == (50, 32, 32, 3)
