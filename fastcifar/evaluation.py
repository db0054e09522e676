"""Test passes (the TTA modes) and scoring a weights file on the test set: accuracy, per-class
accuracy, confusion matrix and the misclassified images, written as figures and a JSON (the
library side of `fastcifar evaluate`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as functional
from torch import nn

from fastcifar.atomic import check_can_write, file_set, write_json
from fastcifar.command_config import EvaluateConfig, tta_flags
from fastcifar.data.loader_guard import guarded_batches
from fastcifar.data.loaders import make_loader, read_metadata, test_pipeline
from fastcifar.device import DeviceStep, PrecisionPlan, autocast, plan_precision, select_device
from fastcifar.errors import FastCifarError
from fastcifar.model import CustResNet
from fastcifar.weights_file import read_weights_file, tta_mode


def _flip_averaged(model: nn.Module, images: torch.Tensor, tta: bool) -> torch.Tensor:
    # In fp32: under bf16 autocast the averages (and the argmax after them) would round to
    # bf16's 8 bits, where two close classes tie and the lower index wins.
    logits = model(images).float()
    return (logits + model(torch.flip(images, dims=[3])).float()) / 2 if tta else logits


def predict_logits(model: nn.Module, images: torch.Tensor, tta: bool,
                   shifts: bool = False) -> torch.Tensor:
    """Logits, averaged with those of the mirrored images when `tta` is set.

    `shifts` (multi-crop) adds the flip-averaged logits of the image moved 1 px up-left and
    1 px down-right (reflected border), weighted 0.5 / 0.25 / 0.25: 6 forward passes.
    """
    logits = _flip_averaged(model, images, tta)
    if not shifts:
        return logits
    padded = functional.pad(images, (1, 1, 1, 1), mode="reflect")
    height, width = images.shape[2], images.shape[3]
    up_left = _flip_averaged(model, padded[:, :, 2:height + 2, 2:width + 2], tta)
    down_right = _flip_averaged(model, padded[:, :, :height, :width], tta)
    return 0.5 * logits + 0.25 * up_left + 0.25 * down_right


@torch.no_grad()
def evaluate_loader(model: nn.Module, loader: Iterable, device_step: DeviceStep,
                    plan: PrecisionPlan, tta: bool, shifts: bool = False) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over the loader (eval mode, no gradients)."""
    model.eval()
    total_loss = torch.zeros((), device=device_step.device)
    correct = torch.zeros((), device=device_step.device, dtype=torch.long)
    count = 0
    for images, labels in guarded_batches(loader, "evaluation"):
        images, labels = device_step(images, labels)
        with autocast(device_step.device, plan):
            logits = predict_logits(model, images, tta, shifts)
        total_loss += functional.cross_entropy(logits.float(), labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
        count += len(labels)
    # One host-device sync for the whole pass.
    return total_loss.item() / max(count, 1), correct.item() / max(count, 1)


@dataclass(frozen=True)
class EvaluationReport:
    """Test-set figures for one weights file and where its outputs were written."""

    weights: Path
    accuracy: float
    per_class_accuracy: dict[str, float]
    confusion_matrix: list[list[int]]  # rows: true class, columns: predicted class
    class_names: list[str]
    count: int  # test images scored
    tta: bool
    tta_mode: str  # none, flip or multicrop
    tta_from_weights: bool  # the TTA mode stored with the weights (no --tta given)
    trained_accuracy: float | None  # what training recorded for these weights
    epoch: float | None  # fractional when the best pass fell inside an epoch
    misclassified: list[dict]  # the shown ones: test index, true and predicted class
    misclassified_total: int
    confusion_plot: Path
    misclassified_plot: Path
    json_path: Path
    device: str
    precision: str
    seconds: float


@dataclass(frozen=True)
class TestPredictions:
    """Predicted and true labels of the test set, in loader order, with the images shown."""

    predictions: np.ndarray  # int64 (N,)
    labels: np.ndarray  # int64 (N,)
    images: np.ndarray  # uint8 (N, 32, 32, 3)


# A file can pass every check and still score inf or NaN (an extreme logit_scale, an exported
# graph with damaged weights); its answers would be noise, so it is refused.
NON_FINITE_SCORES = ("the weights give non-finite scores (inf or NaN) for these images: the "
                     "file is damaged or was saved from a diverged run")


def load_weights(path: Path) -> dict:
    """A weights file (safetensors) as one dict: its metadata plus the state dict as "model".

    Files that are not fastcifar weights files get a one-line error; none is unpickled.
    """
    state_dict, metadata = read_weights_file(Path(path))
    return {**metadata, "model": state_dict}


def model_from_weights(checkpoint: dict, device: torch.device, channels_last: bool) -> nn.Module:
    """CustResNet with the saved weights and logit scale, in eval mode on `device`.

    `checkpoint` is `load_weights`'s dict, or a resume checkpoint's with class names added.
    """
    logit_scale = float(checkpoint.get("logit_scale",
                                       (checkpoint.get("config") or {}).get("logit_scale", 1.0)))
    model = CustResNet(num_classes=len(checkpoint["class_names"]), logit_scale=logit_scale)
    problem = fit_problem(model.state_dict(), checkpoint["model"])
    if problem:
        raise FastCifarError(f"the saved weights do not fit CustResNet for "
                             f"{len(checkpoint['class_names'])} classes: {problem}")
    model.load_state_dict(checkpoint["model"])
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return model.to(device=device, memory_format=memory_format).eval()


def fit_problem(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str | None:
    """Which tensors are missing, extra or of another shape (the first of each), or None."""
    missing = [name for name in expected if name not in given]
    extra = [name for name in given if name not in expected]
    reshaped = [f"{name} is {tuple(given[name].shape)}, not {tuple(tensor.shape)}"
                for name, tensor in expected.items()
                if name in given and given[name].shape != tensor.shape]
    parts = [f"{what} {names[0]}" + (f" and {len(names) - 1} more" if len(names) > 1 else "")
             for what, names in (("missing", missing), ("extra", extra), ("", reshaped)) if names]
    return "; ".join(part.strip() for part in parts) or None


@torch.no_grad()
def predict_test_set(model: nn.Module, loader: Iterable, device_step: DeviceStep,
                     plan: PrecisionPlan, tta: bool, shifts: bool = False) -> TestPredictions:
    """Predictions over the whole loader; images are copied to the host for the figures."""
    model.eval()
    predictions, labels, images = [], [], []
    finite = torch.ones((), dtype=torch.bool, device=device_step.device)
    for batch_images, batch_labels in guarded_batches(loader, "test"):  # a dead loader: one line
        # FFCV reuses its batch buffers: copy the host images before the next batch arrives.
        images.append(batch_images.permute(0, 2, 3, 1).numpy().copy())
        labels.append(batch_labels.numpy().copy())
        device_images, _ = device_step(batch_images, batch_labels)
        with autocast(device_step.device, plan):
            logits = predict_logits(model, device_images, tta, shifts)
        finite &= torch.isfinite(logits).all()
        predictions.append(logits.argmax(1))
    if not predictions:
        raise FastCifarError("the test loader yielded no images")
    if not bool(finite):
        raise FastCifarError(NON_FINITE_SCORES)
    # One host-device sync for the whole pass.
    return TestPredictions(torch.cat(predictions).cpu().numpy().astype(np.int64),
                           np.concatenate(labels).astype(np.int64), np.concatenate(images))


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, class_count: int) -> np.ndarray:
    """Counts of (true, predicted) pairs: rows are true classes, columns predicted ones."""
    pairs = np.asarray(labels, dtype=np.int64) * class_count + np.asarray(predictions, np.int64)
    return np.bincount(pairs, minlength=class_count * class_count).reshape(class_count,
                                                                           class_count)


def per_class_accuracy(matrix: np.ndarray) -> np.ndarray:
    """Fraction of each true class predicted correctly (0 for a class with no images)."""
    return np.diag(matrix) / np.maximum(matrix.sum(axis=1), 1)


def select_misclassified(predictions: np.ndarray, labels: np.ndarray, limit: int) -> np.ndarray:
    """Indices of the first `limit` images whose prediction differs from the label."""
    wrong = np.flatnonzero(np.asarray(predictions) != np.asarray(labels))
    return wrong[:max(limit, 0)]


def _test_subset(count: int | None, available: int) -> np.ndarray | None:
    if count is None:
        return None
    if count > available:
        raise FastCifarError(f"--test-subset {count} is larger than the {available} test records")
    return np.arange(count)


EVALUATION_FILES = ("confusion_matrix.png", "misclassified.png", "evaluation.json")


def evaluate_weights(config: EvaluateConfig) -> EvaluationReport:
    """Score the weights on the test set; write confusion/misclassified PNGs and a JSON."""
    from fastcifar.plots import plot_confusion_matrix, plot_image_grid

    started = time.perf_counter()
    checkpoint = load_weights(config.weights)
    out_dir = config.output_dir
    # Before the test pass, and so that a folder in the way never leaves half the set written.
    check_can_write(*(out_dir / name for name in EVALUATION_FILES))
    class_names = list(checkpoint["class_names"])
    metadata = read_metadata(config.loader.data_dir)
    if metadata.class_names != class_names:
        raise FastCifarError(f"the weights were trained on classes {class_names}, but "
                             f"{config.loader.data_dir} holds {metadata.class_names}")
    device = select_device(config.device)
    plan = plan_precision(config.precision, device)
    model = model_from_weights(checkpoint, device, config.channels_last)
    # The TTA mode the weights were trained and reported with, unless the user chose one.
    tta, shifts = tta_flags(config.tta or checkpoint["tta"])
    # The normalisation the weights were trained with, as saved beside them.
    device_step = DeviceStep(checkpoint["mean"], checkpoint["std"], device, config.channels_last)
    loader = make_loader(metadata.test_path, test_pipeline(), config.loader, train=False,
                         subset=_test_subset(config.loader.test_subset, metadata.test_count),
                         seed=0)
    result = predict_test_set(model, loader, device_step, plan, tta, shifts)

    matrix = confusion_matrix(result.labels, result.predictions, len(class_names))
    accuracy = float(np.trace(matrix) / matrix.sum())
    wrong = select_misclassified(result.predictions, result.labels, config.misclassified_count)
    misclassified = [{"index": int(i), "true": class_names[result.labels[i]],
                      "predicted": class_names[result.predictions[i]]} for i in wrong]
    misclassified_total = int((result.predictions != result.labels).sum())

    tta_note = {"none": "", "flip": " with flip TTA", "multicrop": " with multi-crop TTA"}[
        tta_mode(tta, shifts)]
    with file_set():  # the plots and the report: all new or none
        confusion_plot = plot_confusion_matrix(
            matrix, class_names, out_dir / "confusion_matrix.png",
            title=f"test accuracy {accuracy:.2%}{tta_note} ({len(result.labels):,} images)")
        misclassified_plot = plot_image_grid(
            result.images[wrong], [f"pred: {row['predicted']}\ntrue: {row['true']}"
                                   for row in misclassified],
            out_dir / "misclassified.png", columns=5,
            title=f"misclassified test images: {len(wrong)} of {misclassified_total}")
        report = EvaluationReport(
            weights=Path(config.weights), accuracy=accuracy,
            per_class_accuracy=dict(zip(class_names, map(float, per_class_accuracy(matrix)),
                                        strict=True)),
            confusion_matrix=matrix.tolist(), class_names=class_names, count=len(result.labels),
            tta=tta, tta_mode=tta_mode(tta, shifts), tta_from_weights=config.tta is None,
            trained_accuracy=checkpoint.get("accuracy"),
            epoch=checkpoint.get("epochs"), misclassified=misclassified,
            misclassified_total=misclassified_total, confusion_plot=confusion_plot,
            misclassified_plot=misclassified_plot, json_path=out_dir / "evaluation.json",
            device=str(device), precision=plan.name, seconds=time.perf_counter() - started)
        write_json(report.json_path, _report_to_dict(report))
    return report


def _report_to_dict(report: EvaluationReport) -> dict:
    return {key: str(value) if isinstance(value, Path) else value
            for key, value in asdict(report).items()}
