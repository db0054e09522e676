"""Figures: image grids, LR-finder curve and confusion matrix are complete PNGs a person can read."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import CLASS_COLOURS, synthetic_images
from fastcifar.plots import plot_confusion_matrix, plot_image_grid, plot_lr_finder


def test_image_grid_shows_every_image_with_its_pixels(tmp_path, check_png):
    labels = np.arange(10) % 3
    images = synthetic_images(labels, seed=0)
    images[0] = CLASS_COLOURS[0]  # one solid image whose colour must appear in the figure
    titles = [f"class {label}\npred: a / true: b" for label in labels]
    path = plot_image_grid(images, titles, tmp_path / "grid.png", columns=5, title="ten images")
    width, height = check_png(path)
    assert 600 <= width <= 1600 and 300 <= height <= 1000 and width > height  # 5 x 2 cells
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    solid = (pixels == CLASS_COLOURS[0]).all(axis=1).sum()
    assert solid > 100 * 100  # drawn several times larger than 32x32, without smoothing


def test_image_grid_without_images_still_writes_a_figure(tmp_path, check_png):
    path = plot_image_grid(np.zeros((0, 32, 32, 3), np.uint8), [], tmp_path / "empty.png")
    assert min(check_png(path)) > 50


def test_image_grid_rejects_labels_that_do_not_match(tmp_path):
    with pytest.raises(ValueError, match="labels"):
        plot_image_grid(np.zeros((2, 32, 32, 3), np.uint8), ["one"], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_lr_finder_plot_marks_the_suggestion_on_a_log_axis(tmp_path, check_png):
    lrs = np.logspace(-6, 1, 50)
    losses = 2.3 - 1.5 / (1 + np.exp(-(np.log10(lrs) + 3) * 2)) + np.where(lrs > 1, lrs, 0)
    path = plot_lr_finder(lrs.tolist(), losses.tolist(), 1e-3, tmp_path / "lr.png",
                          min_loss_lr_over_10=0.01)
    width, height = check_png(path)
    assert 500 <= width <= 1000 and 300 <= height <= 700


def test_confusion_matrix_plot_has_a_cell_per_class_pair(tmp_path, check_png):
    matrix = np.array([[8, 1, 1], [0, 10, 0], [3, 0, 7]])
    path = plot_confusion_matrix(matrix, ["apple", "berry", "cherry"], tmp_path / "cm.png",
                                 title="test accuracy 83%")
    width, height = check_png(path)
    assert 300 <= width <= 1000 and 300 <= height <= 1000
    with pytest.raises(ValueError, match="class names"):
        plot_confusion_matrix(matrix, ["apple", "berry"], tmp_path / "bad.png")
