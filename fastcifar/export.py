"""ONNX export of a weights file, and ONNX files as predict's weights.

The exported graph takes uint8 NCHW RGB images (any batch size, 32x32) and returns logits: the
weights' normalisation and their TTA mode (flip and 1-px shifts) are inside it, so a deployment
needs nothing but the file. Class names, mean/std and the TTA mode go into the model's metadata
(`metadata_props["fastcifar"]`, one JSON string, as in weights files). An ONNX file is protobuf
data: reading one runs no code from it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastcifar.atomic import check_can_write, write_bytes
from fastcifar.command_config import ExportConfig, tta_flags
from fastcifar.data.convert import METADATA
from fastcifar.errors import FastCifarError, first_line
from fastcifar.evaluation import load_weights, model_from_weights, predict_logits
from fastcifar.weights_file import METADATA_KEY, REQUIRED_METADATA, metadata_problem

ONNX_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "images", "logits"


class Uint8Classifier(nn.Module):
    """CustResNet behind its weights' normalisation and TTA: uint8 NCHW in, logits out."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float], tta: str) -> None:
        super().__init__()
        self.model = model
        self.tta, self.shifts = tta_flags(tta)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return predict_logits(self.model, (images.float() - self.mean) / self.std, self.tta,
                              self.shifts)


@dataclass(frozen=True)
class ExportReport:
    """What was written and, when test images were at hand, how it agrees with PyTorch."""

    path: Path
    tta: str
    bytes: int
    checked_images: int  # 0: no converted dataset to check against
    max_logit_difference: float | None
    top1_agreement: float | None


def require_onnx_packages(*names: str) -> None:
    """A one-line error naming the fix when a package of the optional `export` extra is missing
    (a bare ImportError traceback before)."""
    import importlib

    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise FastCifarError(f"{' and '.join(missing)} not installed: ONNX files need the export "
                             "extra (pip install 'fastcifar[export]')")


def export_onnx(config: ExportConfig) -> ExportReport:
    """Write the ONNX file for `config.weights` and check it with onnxruntime."""
    checking = bool(config.check_images) and (Path(config.data_dir) / METADATA).is_file()
    require_onnx_packages("onnx", "onnxscript", *(["onnxruntime"] if checking else []))
    checkpoint = load_weights(config.weights)
    check_can_write(config.out)  # before the minute of exporting, not after
    tta = config.tta or checkpoint["tta"]
    classifier = Uint8Classifier(model_from_weights(checkpoint, torch.device("cpu"), False),
                                 checkpoint["mean"], checkpoint["std"], tta).eval()
    metadata = {key: checkpoint[key] for key in REQUIRED_METADATA} | {
        "tta": tta, "input": "uint8 NCHW RGB 32x32, any batch size", "output": "logits",
        "source_weights": Path(config.weights).name,
        **{key: checkpoint[key] for key in ("recipe", "accuracy") if key in checkpoint}}
    data = _onnx_bytes(classifier, metadata)
    checked, difference, agreement = 0, None, None
    if checking:
        images = _first_test_images(config.data_dir, config.check_images)
        with torch.no_grad():
            expected = classifier(torch.from_numpy(images)).numpy()
        got = OnnxClassifier.from_bytes(data, "the exported graph").logits(images)
        checked = len(images)
        difference = float(np.abs(got - expected).max())
        agreement = float((got.argmax(1) == expected.argmax(1)).mean())
        if not difference <= config.tolerance:  # NaN too
            raise FastCifarError(f"the ONNX graph's logits differ from PyTorch's by {difference:.2g} "
                                 f"(tolerance {config.tolerance:g}); nothing was written")
    write_bytes(config.out, data)
    return ExportReport(Path(config.out), tta, len(data), checked, difference, agreement)


def _onnx_bytes(classifier: Uint8Classifier, metadata: dict) -> bytes:
    """The graph (batch axis dynamic) with the metadata, serialised."""
    import warnings

    example = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            classifier, (example,), dynamo=True, opset_version=ONNX_OPSET, verbose=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}})
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata, default=str)
    return proto.SerializeToString()


def _first_test_images(data_dir: Path, count: int) -> np.ndarray:
    """The first `count` converted test images (all of them where there are fewer), uint8 NCHW."""
    from fastcifar.data.loaders import first_stored_images, read_metadata

    count = min(count, read_metadata(data_dir).test_count)
    return np.ascontiguousarray(first_stored_images(data_dir, "test", count)[0].transpose(0, 3, 1, 2))


class OnnxClassifier:
    """An exported file run by onnxruntime: class names, mean/std and TTA mode from its
    metadata; `logits` takes uint8 NCHW images."""

    def __init__(self, session, metadata: dict) -> None:
        self.session, self.metadata = session, metadata

    @classmethod
    def from_bytes(cls, data: bytes, name: str) -> OnnxClassifier:
        require_onnx_packages("onnx", "onnxruntime")
        import onnx
        import onnxruntime

        try:
            proto = onnx.load_from_string(data)
            session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        except Exception as error:  # protobuf and onnxruntime errors of a file not ours
            raise FastCifarError(f"{name} is not a readable ONNX model: {first_line(error)}"
                                 ) from None
        metadata = _metadata(proto, name)
        problem = _graph_problem(session, len(metadata["class_names"]))
        if problem:
            raise FastCifarError(f"{name} is not a graph `fastcifar export` wrote: {problem}")
        return cls(session, metadata)

    @classmethod
    def load(cls, path: Path) -> OnnxClassifier:
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise FastCifarError(f"cannot read {path}: {error.strerror}") from None
        return cls.from_bytes(data, str(path))

    def logits(self, images: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images)})[0]


def _metadata(proto, name: str) -> dict:
    """The fastcifar metadata of an ONNX model, or a one-line refusal."""
    entries = {entry.key: entry.value for entry in proto.metadata_props}
    try:
        metadata = json.loads(entries[METADATA_KEY])
    except (KeyError, ValueError):
        raise FastCifarError(f"{name} has no fastcifar metadata (class names, mean/std, TTA "
                             "mode): export it with `fastcifar export WEIGHTS --onnx OUT`") from None
    problem = metadata_problem(metadata)
    if problem:
        raise FastCifarError(f"{name}'s fastcifar metadata {problem}: export it again with "
                             "`fastcifar export`")
    return metadata


def _graph_problem(session, class_count: int) -> str | None:
    """What keeps the graph from scoring as `export` writes it (uint8 NCHW images in, one logit
    per class out), or None."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [(node.name, node.type) for node in inputs] != [(INPUT_NAME, "tensor(uint8)")]:
        return (f"its inputs are {[(node.name, node.type) for node in inputs]}, not "
                f"{INPUT_NAME} (uint8 images)")
    if OUTPUT_NAME not in [node.name for node in outputs]:
        return f"it has no {OUTPUT_NAME} output"
    width = next(node.shape for node in outputs if node.name == OUTPUT_NAME)[-1:]
    if width and isinstance(width[0], int) and width[0] != class_count:
        return f"it gives {width[0]} logits for {class_count} class names"
    return None
