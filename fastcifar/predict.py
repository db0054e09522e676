"""A user's images -> the most likely classes, with the shipped or given weights file.

Images are read with Pillow (PNG, JPEG, WebP, ...), made RGB and 32x32, normalised with the
mean/std stored with the weights and scored in the TTA mode stored with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fastcifar.config import PredictConfig
from fastcifar.device import DeviceStep, select_device
from fastcifar.errors import FastCifarError
from fastcifar.evaluate import load_weights, model_from_weights, predict_logits, tta_flags

IMAGE_SIZE = 32  # the side CustResNet was trained on


@dataclass(frozen=True)
class ImagePrediction:
    """The top classes of one image, most likely first."""

    path: Path
    top: list[tuple[str, float]]  # (class name, softmax probability)
    resized_from: tuple[int, int] | None  # (width, height) when it was not 32x32
    mode: str  # Pillow's mode as read ("RGB", "RGBA", "L", ...); all are scored as RGB


@dataclass(frozen=True)
class InputProblem:
    """An input that could not be scored and why (one line)."""

    path: Path
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass(frozen=True)
class PredictReport:
    """Predictions for the readable inputs and the problems with the others."""

    predictions: list[ImagePrediction]
    problems: list[InputProblem]
    weights: Path
    tta: str  # the TTA mode stored with the weights
    device: str

    def to_dict(self) -> dict:
        """The report as JSON-friendly data (for `fastcifar predict --json`)."""
        return {
            "weights": str(self.weights), "tta": self.tta, "device": self.device,
            "predictions": [{
                "path": str(row.path),
                "top": [{"class": name, "probability": probability}
                        for name, probability in row.top],
                "resized_from": list(row.resized_from) if row.resized_from else None,
                "mode": row.mode,
            } for row in self.predictions],
            "errors": [{"path": str(problem.path), "error": problem.message}
                       for problem in self.problems],
        }


@dataclass(frozen=True)
class _Image:
    path: Path
    pixels: np.ndarray  # uint8 (32, 32, 3)
    resized_from: tuple[int, int] | None
    mode: str


def image_files(paths: tuple[Path, ...]) -> tuple[list[Path], list[InputProblem]]:
    """The files to score: each file as given, and a folder's image files (by extension, sorted).

    A missing path and a folder without image files are problems.
    """
    extensions = {extension.lower() for extension in Image.registered_extensions()}
    files: list[Path] = []
    problems: list[InputProblem] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(child for child in path.iterdir() if child.is_file()
                           and not child.name.startswith(".")
                           and child.suffix.lower() in extensions)
            if not found:
                problems.append(InputProblem(path, "no image files in this folder"))
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            problems.append(InputProblem(path, "no such file or folder"))
    return files, problems


def read_image(path: Path) -> _Image:
    """The image as 32x32 RGB uint8 pixels; unreadable files raise FastCifarError naming them."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated or corrupt file fails here, not later
            mode, size = image.mode, image.size
            rgb = image.convert("RGB")  # grey, palette, RGBA (alpha dropped), CMYK, ...
    except UnidentifiedImageError:
        raise FastCifarError(f"{path}: not an image file Pillow can read") from None
    except Image.DecompressionBombError:
        raise FastCifarError(f"{path}: too many pixels to be a photo to classify") from None
    except (OSError, SyntaxError, ValueError) as error:  # Pillow's errors for damaged files
        detail = " ".join(str(error).split()) or type(error).__name__
        raise FastCifarError(f"{path}: corrupt or truncated image ({detail})") from None
    resized_from = None
    if size != (IMAGE_SIZE, IMAGE_SIZE):
        rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
        resized_from = size
    return _Image(Path(path), np.asarray(rgb, dtype=np.uint8), resized_from, mode)


def predict(config: PredictConfig) -> PredictReport:
    """Score every input image; the first bad input is an error unless `keep_going` is set.

    With `keep_going` the report lists the problems beside the predictions of the other images.
    """
    weights = load_weights(config.weights)  # refuses anything but a fastcifar weights file
    class_names = list(weights["class_names"])
    files, problems = image_files(config.paths)
    images: list[_Image] = []
    for path in files:
        try:
            images.append(read_image(path))
        except FastCifarError as error:
            problems.append(InputProblem(path, str(error).removeprefix(f"{path}: ")))
    if problems and not config.keep_going:
        raise FastCifarError(str(problems[0]) + (
            f" (and {len(problems) - 1} more; --keep-going reports all)" if len(problems) > 1
            else ""))

    device = select_device(config.device)
    model = model_from_weights(weights, device, channels_last=True)
    device_step = DeviceStep(weights["mean"], weights["std"], device, channels_last=True)
    top_k = min(config.top_k, len(class_names))
    predictions: list[ImagePrediction] = []
    for start in range(0, len(images), config.batch_size):
        batch = images[start:start + config.batch_size]
        pixels = torch.from_numpy(np.stack([image.pixels for image in batch])).permute(0, 3, 1, 2)
        inputs, _ = device_step(pixels, torch.zeros(len(batch), dtype=torch.long))
        with torch.no_grad():
            logits = predict_logits(model, inputs, *tta_flags(weights["tta"]))
        probabilities, indices = torch.softmax(logits.float(), dim=1).topk(top_k, dim=1)
        for image, row_probabilities, row_indices in zip(batch, probabilities.tolist(),
                                                          indices.tolist(), strict=True):
            predictions.append(ImagePrediction(
                image.path, [(class_names[i], p) for i, p in zip(row_indices, row_probabilities,
                                                                  strict=True)],
                image.resized_from, image.mode))
    return PredictReport(predictions, problems, Path(config.weights), weights["tta"], str(device))

