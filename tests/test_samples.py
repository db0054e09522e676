"""`show-augment`: the first train images as stored and the same images augmented, as grids."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from fastcifar.cli import app
from fastcifar.config import NO_AUGMENT, AugmentConfig
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
    with pytest.raises(FastCifarError, match="--count"):
        show_augment(tiny_dataset, AugmentConfig(), 10_000, 0, tmp_path)


def test_show_augment_command_uses_the_recipe_augmentation(tiny_dataset, tmp_path):
    result = CliRunner().invoke(app, ["show-augment", "--recipe", "seed", "--count", "8",
                                      "--data", str(tiny_dataset), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "samples.png").is_file() and (tmp_path / "augmented.png").is_file()
