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


def test_lr_finder_plot_marks_the_suggestion_on_a_log_axis(tmp_path, check_png, saved_figures):
    lrs = np.logspace(-6, 1, 50)
    losses = 2.3 - 1.5 / (1 + np.exp(-(np.log10(lrs) + 3) * 2)) + np.where(lrs > 1, lrs, 0)
    path = plot_lr_finder(lrs.tolist(), losses.tolist(), 1e-3, tmp_path / "lr.png",
                          min_loss_lr_over_10=0.01)
    check_png(path)
    [axis] = saved_figures[0].axes
    assert axis.get_xscale() == "log"
    curve, suggested_line, min_loss_line = axis.get_lines()
    np.testing.assert_allclose(curve.get_xdata(), lrs)
    np.testing.assert_allclose(curve.get_ydata(), losses)
    assert list(suggested_line.get_xdata()) == [1e-3, 1e-3]
    assert list(min_loss_line.get_xdata()) == [0.01, 0.01]
    # the marker sits on the curve at the suggested LR
    [marker] = axis.collections
    [[marker_lr, marker_loss]] = marker.get_offsets()
    assert marker_lr == 1e-3
    assert marker_loss == pytest.approx(np.interp(np.log(1e-3), np.log(lrs), losses))
    # the divergence tail (losses up to 12) does not squash the falling part (2.3 to 0.8)
    bottom, top = axis.get_ylim()
    assert bottom < losses.min() and 2.3 < top < 4


def test_training_curves_show_the_history_and_every_step_lr(tmp_path, check_png,
                                                            saved_figures):
    from fastcifar.plots import plot_training_curves
    from fastcifar.training import EpochStats

    history = [EpochStats(epoch, 0.1, 2.0 / epoch, 0.3 * epoch, 1.5 / epoch, 0.25 * epoch,
                          1.0, 1.0, 100.0, 5 * epoch) for epoch in (1, 2, 3)]
    lrs = [0.01 * step for step in range(1, 16)]
    check_png(plot_training_curves(history, lrs, tmp_path / "curves.png"))
    loss_axis, accuracy_axis, lr_axis = saved_figures[0].axes
    train_loss, test_loss = loss_axis.get_lines()
    assert list(train_loss.get_xdata()) == [1, 2, 3]
    assert list(train_loss.get_ydata()) == [2.0, 1.0, pytest.approx(2 / 3)]
    assert list(test_loss.get_ydata()) == [1.5, 0.75, 0.5]
    train_accuracy, test_accuracy = accuracy_axis.get_lines()
    assert list(train_accuracy.get_ydata()) == pytest.approx([30, 60, 90])  # percent
    assert list(test_accuracy.get_ydata()) == pytest.approx([25, 50, 75])
    [lr_line] = lr_axis.get_lines()
    assert list(lr_line.get_xdata()) == list(range(1, 16)) and list(lr_line.get_ydata()) == lrs
    assert [line.get_label() for line in (train_loss, test_loss)] == ["train", "test"]
    # smoothed targets: the train loss has a floor the test loss lacks, and the legend says so
    plot_training_curves(history, lrs, tmp_path / "smoothed.png", label_smoothing=0.2)
    smoothed_axis = saved_figures[1].axes[0]
    assert [line.get_label() for line in smoothed_axis.get_lines()] == [
        "train (targets smoothed by 0.2)", "test (plain labels)"]
    assert smoothed_axis.get_title() == "loss: the two are not comparable"


def test_confusion_matrix_plot_shades_row_fractions_and_prints_counts(tmp_path, check_png,
                                                                      saved_figures):
    matrix = np.array([[8, 1, 1], [0, 4, 0], [3, 0, 12]])  # classes of 10, 4 and 15 images
    path = plot_confusion_matrix(matrix, ["apple", "berry", "cherry"], tmp_path / "cm.png",
                                 title="test accuracy 83%")
    check_png(path)
    axis = saved_figures[0].axes[0]
    [image] = axis.get_images()
    # shaded by the fraction of each true class (rows), so a small class is not washed out
    np.testing.assert_allclose(image.get_array(), matrix / matrix.sum(axis=1, keepdims=True))
    cells = {(int(text.get_position()[1]), int(text.get_position()[0])): text.get_text()
             for text in axis.texts}
    assert cells == {(true, predicted): str(matrix[true, predicted])
                     for true in range(3) for predicted in range(3)}
    assert [label.get_text() for label in axis.get_xticklabels()] == ["apple", "berry", "cherry"]
    assert axis.get_ylabel() == "true" and axis.get_title() == "test accuracy 83%"
    with pytest.raises(ValueError, match="class names"):
        plot_confusion_matrix(matrix, ["apple", "berry"], tmp_path / "bad.png")
