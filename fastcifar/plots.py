"""Matplotlib (Agg) figures a person looks at: training curves, image grids, the LR finder
curve and the confusion matrix."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from fastcifar.atomic import atomic_path

# Figures are made with matplotlib's object API, not pyplot: no backend is chosen or changed,
# so files are written headless and a notebook's inline plots keep working beside them.


def _save(figure, path: Path) -> Path:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100, bbox_inches="tight")
    return path


def _single_axis(size: tuple[float, float]):
    figure = Figure(figsize=size)
    return figure, figure.subplots()


def plot_training_curves(history: list, lr_per_step: list[float], path: Path,
                         label_smoothing: float = 0.0) -> Path:
    """Train/test loss and accuracy per epoch (test where evaluated), and the LR per step.

    With `label_smoothing` the train loss is against smoothed targets (it cannot fall below
    their entropy) and the test loss against the labels: the legend says so, since the test
    curve then lies below the train one even where the model fits the train images better.
    """
    epochs = [row.epoch for row in history]
    tested = [row for row in history if row.test_accuracy is not None]
    test_epochs = [row.epoch for row in tested]
    figure = Figure(figsize=(15, 4))
    loss_axis, accuracy_axis, lr_axis = figure.subplots(1, 3)
    smoothed = f" (targets smoothed by {label_smoothing:g})" if label_smoothing else ""
    loss_axis.plot(epochs, [row.train_loss for row in history], "o-", label="train" + smoothed)
    loss_axis.plot(test_epochs, [row.test_loss for row in tested], "o-",
                   label="test (plain labels)" if label_smoothing else "test")
    loss_axis.set(title="loss" + (": the two are not comparable" if label_smoothing else ""),
                  xlabel="epoch")
    loss_axis.legend()
    accuracy_axis.plot(epochs, [100 * row.train_accuracy for row in history], "o-", label="train")
    accuracy_axis.plot(test_epochs, [100 * row.test_accuracy for row in tested], "o-",
                       label="test")
    accuracy_axis.set(title="accuracy (%)", xlabel="epoch")
    accuracy_axis.legend()
    lr_axis.plot(range(1, len(lr_per_step) + 1), lr_per_step)
    lr_axis.set(title="learning rate per step", xlabel="step")
    for axis in (loss_axis, accuracy_axis, lr_axis):
        axis.grid(alpha=0.3)
    return _save(figure, path)


def plot_image_grid(images: np.ndarray, labels: list[str], path: Path, columns: int = 8,
                    title: str | None = None) -> Path:
    """(N, H, W, 3) uint8 images in a grid, each titled by its label (lines split on "\\n").

    A second title line such as "pred: cat / true: dog" fits under the class name; with no
    images the figure says so instead of being blank.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) images, got shape {images.shape}")
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    count = len(images)
    columns = max(1, min(columns, count))
    rows = max(1, math.ceil(count / columns))
    lines = max((label.count("\n") + 1 for label in labels), default=1)
    # 1.6 inch cells at 100 dpi: each 32-pixel image is drawn ~5x, pixels kept sharp.
    figure = Figure(layout="constrained",
                    figsize=(1.6 * columns, (1.5 + 0.2 * lines) * rows + 0.4))
    axes = figure.subplots(rows, columns, squeeze=False)
    for position, axis in enumerate(axes.flat):
        axis.axis("off")
        if position < count:
            axis.imshow(images[position], interpolation="nearest")
            axis.set_title(labels[position], fontsize=9)
    if count == 0:
        axes[0, 0].text(0.5, 0.5, "no images", ha="center", va="center", fontsize=12)
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def plot_lr_finder(lrs: list[float], losses: list[float], suggested_lr: float, path: Path,
                   min_loss_lr_over_10: float | None = None) -> Path:
    """Smoothed loss against LR (log axis), the suggested LR marked (and min-loss LR / 10)."""
    lrs_array, losses_array = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    figure, axis = _single_axis((7, 4.5))
    axis.plot(lrs_array, losses_array, color="tab:blue", label="loss (smoothed)")
    suggested_loss = float(np.interp(np.log(suggested_lr), np.log(lrs_array), losses_array))
    axis.axvline(suggested_lr, color="tab:red", linestyle="--", alpha=0.6)
    axis.scatter([suggested_lr], [suggested_loss], s=60, color="tab:red", zorder=3,
                 label=f"steepest descent: {suggested_lr:.3g}")
    if min_loss_lr_over_10 is not None:
        axis.axvline(min_loss_lr_over_10, color="tab:green", linestyle=":",
                     label=f"min-loss LR / 10: {min_loss_lr_over_10:.3g}")
    axis.set_xscale("log")
    # Keep the divergence tail from squashing the interesting part of the curve.
    finite = losses_array[np.isfinite(losses_array)]
    if finite.size:
        low, start = float(finite.min()), float(finite[0])
        axis.set_ylim(low - 0.05 * abs(low), max(start, low) + 0.5 * (abs(start - low) + 0.1))
    axis.set(title="LR range test", xlabel="learning rate (log scale)", ylabel="training loss")
    axis.grid(alpha=0.3, which="both")
    axis.legend()
    return _save(figure, path)


def plot_confusion_matrix(matrix: np.ndarray, class_names: list[str], path: Path,
                          title: str | None = None) -> Path:
    """Counts per (true, predicted) class, shaded by the fraction of each true class."""
    matrix = np.asarray(matrix)
    count = len(class_names)
    if matrix.shape != (count, count):
        raise ValueError(f"matrix shape {matrix.shape} does not match {count} class names")
    fractions = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.6 * count + 2.0)
    figure, axis = _single_axis((size + 1, size))
    shading = axis.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(shading, ax=axis, fraction=0.046, pad=0.04, label="fraction of true class")
    for true in range(count):
        for predicted in range(count):
            colour = "white" if fractions[true, predicted] > 0.5 else "black"
            axis.text(predicted, true, f"{int(matrix[true, predicted])}", ha="center",
                      va="center", fontsize=8, color=colour)
    axis.set_xticks(range(count), class_names, rotation=45, ha="right")
    axis.set_yticks(range(count), class_names)
    axis.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    figure.tight_layout()
    return _save(figure, path)
