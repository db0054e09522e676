"""A user's images -> the most likely classes, with the shipped or given weights file.

Images are read with Pillow (PNG, JPEG, WebP, ...), made RGB and 32x32, normalised with the
mean/std stored with the weights and scored in the TTA mode stored with them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from fastcifar.command_config import PredictConfig, tta_flags
from fastcifar.config import Device
from fastcifar.device import DeviceStep, select_device
from fastcifar.errors import FastCifarError
from fastcifar.evaluation import (
    NON_FINITE_SCORES,
    load_weights,
    model_from_weights,
    predict_logits,
)

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


# Formats Pillow names an extension for but cannot decode by itself: Ghostscript's (EPS, PS)
# and MPEG (its header only). Save-only formats (PDF) and stub handlers (HDF5, GRIB, BUFR) are
# left out by what Pillow registers.
_UNDECODED_FORMATS = {"EPS", "MPEG"}


def readable_extensions() -> set[str]:
    """The file extensions of the image formats Pillow can open and decode on its own: what a
    folder's image files are (a PDF or .h5 beside the photos failed the whole folder before)."""
    Image.init()

    def decodes(format_name: str) -> bool:
        factory = Image.OPEN.get(format_name, (None,))[0]
        return (factory is not None and format_name not in _UNDECODED_FORMATS
                and not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)))

    return {extension.lower() for extension, format_name in Image.registered_extensions().items()
            if decodes("JPEG" if format_name == "MPO" else format_name)}  # MPO opens as JPEG


def image_files(paths: tuple[Path, ...]) -> tuple[list[Path], list[InputProblem]]:
    """The files to score: each file as given, and a folder's image files (by extension, sorted).

    A missing path and a folder without image files are problems.
    """
    extensions = readable_extensions()
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
            # Upright as shown: a phone stores a portrait photo sideways with an EXIF turn.
            upright = ImageOps.exif_transpose(image)
            mode, size = upright.mode, upright.size
            rgb = upright.convert("RGB")  # grey, palette, RGBA (alpha dropped), CMYK, ...
    except UnidentifiedImageError:
        raise FastCifarError(f"{path}: not an image file Pillow can read") from None
    except Image.DecompressionBombError:
        raise FastCifarError(f"{path}: too many pixels to be a photo to classify") from None
    except (FileNotFoundError, IsADirectoryError, PermissionError) as error:
        raise FastCifarError(f"{path}: {error.strerror.lower()}") from None
    except (OSError, SyntaxError, ValueError) as error:  # Pillow's errors for damaged files
        detail = " ".join(str(error).split()) or type(error).__name__
        raise FastCifarError(f"{path}: corrupt or truncated image ({detail})") from None
    return image_from_pil(rgb, Path(path), mode, size)


def image_from_pil(rgb: Image.Image, name: Path, mode: str, size: tuple[int, int]) -> _Image:
    """An RGB Pillow image as the 32x32 pixels the model scores (bicubic when resized)."""
    if 0 in size:
        raise FastCifarError(f"{name}: an empty image ({size[0]}x{size[1]} pixels)")
    resized_from = None
    if size != (IMAGE_SIZE, IMAGE_SIZE):
        rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
        resized_from = size
    return _Image(name, np.asarray(rgb, dtype=np.uint8), resized_from, mode)


def predict(config: PredictConfig) -> PredictReport:
    """Score every input image; the first bad input is an error unless `keep_going` is set.

    With `keep_going` the report lists the problems beside the predictions of the other images.
    `config.weights` is a fastcifar weights file, or an ONNX file `fastcifar export` wrote
    (then onnxruntime scores the images).
    """
    scorer = open_scorer(Path(config.weights), config.device)  # refuses other files
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
    predictions = score_images(scorer, images, config.top_k, config.batch_size)
    return PredictReport(predictions, problems, Path(config.weights), scorer.tta, scorer.device)


def score_images(scorer: Scorer, images: list[_Image], top_k: int, batch_size: int
                 ) -> list[ImagePrediction]:
    """The top `top_k` classes of each image, scored in batches."""
    top_k = min(top_k, len(scorer.class_names))
    predictions: list[ImagePrediction] = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        pixels = torch.from_numpy(np.stack([image.pixels for image in batch])).permute(0, 3, 1, 2)
        logits = scorer.logits(pixels).float()
        if not bool(torch.isfinite(logits).all()):
            raise FastCifarError(NON_FINITE_SCORES)
        probabilities, indices = torch.softmax(logits, dim=1).topk(top_k, dim=1)
        for image, row_probabilities, row_indices in zip(batch, probabilities.tolist(),
                                                          indices.tolist(), strict=True):
            predictions.append(ImagePrediction(
                image.path, [(scorer.class_names[i], p)
                             for i, p in zip(row_indices, row_probabilities, strict=True)],
                image.resized_from, image.mode))
    return predictions


@dataclass(frozen=True)
class Scorer:
    """Logits for uint8 NCHW images in the weights' TTA mode, with the weights' class names."""

    class_names: list[str]
    tta: str
    device: str
    logits: Callable[[torch.Tensor], torch.Tensor]


def open_scorer(weights: Path, device_choice: Device) -> Scorer:
    """A weights file's model on the chosen device, or an exported ONNX file in onnxruntime."""
    if weights.suffix == ".onnx":
        from fastcifar.export import OnnxClassifier

        classifier = OnnxClassifier.load(weights)
        return Scorer(list(classifier.metadata["class_names"]), classifier.metadata["tta"],
                      "cpu (onnxruntime)",
                      lambda pixels: torch.from_numpy(classifier.logits(pixels.numpy())))
    checkpoint = load_weights(weights)  # refuses anything but a fastcifar weights file
    device = select_device(device_choice)
    model = model_from_weights(checkpoint, device, channels_last=True)
    device_step = DeviceStep(checkpoint["mean"], checkpoint["std"], device, channels_last=True)

    @torch.no_grad()
    def logits(pixels: torch.Tensor) -> torch.Tensor:
        inputs, _ = device_step(pixels, torch.zeros(len(pixels), dtype=torch.long))
        return predict_logits(model, inputs, *tta_flags(checkpoint["tta"])).cpu()

    return Scorer(list(checkpoint["class_names"]), checkpoint["tta"], str(device), logits)
