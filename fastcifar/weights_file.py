"""Weights files: a model's state dict as safetensors with a JSON metadata header (classes,
mean/std, TTA mode, and what a person needs to trust the file). safetensors reads a header and
raw tensor bytes only, so a file a user hands in is never unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fastcifar.atomic import write_bytes
from fastcifar.command_config import TTA_MODES
from fastcifar.config import TrainConfig
from fastcifar.data.convert import class_names_problem, is_finite_number, pixel_statistics_problem
from fastcifar.errors import FastCifarError, first_line

if TYPE_CHECKING:  # annotations only: these modules import this one
    from fastcifar.data.loaders import Loaders
    from fastcifar.records import Evaluation

METADATA_KEY = "fastcifar"  # the safetensors header key holding the metadata as one JSON string
WEIGHTS_FORMAT_VERSION = 1
# What a reader needs to use the weights; everything else in the metadata is for people
# (recipe, accuracy, epochs, data variant, commit, config, versions, hardware).
REQUIRED_METADATA = ("class_names", "mean", "std", "logit_scale", "tta")


def tta_mode(tta: bool, shifts: bool) -> str:
    """The TTA mode's name, as weights files store it: none, flip or multicrop."""
    return "multicrop" if tta and shifts else "flip" if tta else "none"


def save_weights_file(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict,
                      dtype: torch.dtype | None = None) -> None:
    """Write a model's state dict as a safetensors file with `metadata` in its header, atomically.

    The metadata is stored as one JSON string under the header key "fastcifar" and must hold
    REQUIRED_METADATA (mean/std on the 0-255 scale, `tta` one of TTA_MODES). `dtype` (e.g.
    torch.float16 for the shipped file) casts the floating-point tensors; integer buffers such as
    BatchNorm's `num_batches_tracked` stay integers. Tensors `read_weights_file` would refuse
    (NaN or infinite, say from an fp16 cast that overflowed) are refused before anything is written.
    """
    problem = metadata_problem(metadata)
    if problem:
        raise FastCifarError(f"cannot write weights file {path}: metadata {problem}")
    from safetensors.torch import save

    tensors = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[name] = tensor.contiguous()
    problem = _tensor_problem(tensors)  # read_weights_file would refuse the file: never write it
    if problem:
        cast = f" after the cast to {dtype}" if dtype is not None else ""
        raise FastCifarError(f"cannot write weights file {path}: {problem}{cast}")
    header = json.dumps({"format_version": WEIGHTS_FORMAT_VERSION, **metadata}, default=str,
                        allow_nan=False)
    # Serialised in memory and written by Python: safetensors' own writer reports a full disk
    # as a SafetensorError, not an OSError.
    write_bytes(path, save(tensors, metadata={METADATA_KEY: header}))


def read_weights_file(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(float32 state dict, metadata) of a file `save_weights_file` wrote.

    Anything else (a pickle or zip checkpoint, a truncated or damaged file, a safetensors file
    without fastcifar's metadata) gets a one-line error naming the file. safetensors reads a
    JSON header and raw tensor bytes only, so nothing in the file is ever executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FastCifarError(f"weights file not found: {path}")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # safetensors' errors for files not its own
        raise _not_weights(path, f"not a safetensors file: {first_line(error)}") from None
    if METADATA_KEY not in header:
        raise _not_weights(path, "a safetensors file without fastcifar's metadata")
    try:
        metadata = json.loads(header[METADATA_KEY])
    except ValueError:
        raise _not_weights(path, "its metadata is not valid JSON") from None
    problem = metadata_problem(metadata)
    if problem:
        raise _not_weights(path, f"metadata {problem}")
    if metadata.get("format_version") != WEIGHTS_FORMAT_VERSION:
        raise _not_weights(path, f"format {metadata.get('format_version')}, this fastcifar reads "
                                 f"{WEIGHTS_FORMAT_VERSION}")
    problem = _tensor_problem(tensors)
    if problem:
        raise _not_weights(path, problem)
    return {name: tensor.float() if tensor.is_floating_point() else tensor
            for name, tensor in tensors.items()}, metadata


def _tensor_problem(tensors: dict[str, torch.Tensor]) -> str | None:
    """What is wrong with the tensors, or None: weights are finite floats, and only the
    BatchNorm step counters are whole numbers (a diverged run's NaN would score at random)."""
    for name, tensor in tensors.items():
        if name.endswith("num_batches_tracked"):
            if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
                return f"{name} is {tensor.dtype}, not a count"
        elif not tensor.is_floating_point():
            return f"{name} is {tensor.dtype}, not floating point"
        elif not bool(torch.isfinite(tensor).all()):
            return f"{name} holds NaN or infinite values"
    return None


def metadata_problem(metadata: object) -> str | None:
    """What is wrong with weights metadata (a weights file's or an exported graph's), or None:
    the keys and types a reader relies on."""
    if not isinstance(metadata, dict):
        return "is not a JSON object"
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        return f"lacks {', '.join(missing)}"
    problem = (class_names_problem(metadata["class_names"])
               or pixel_statistics_problem(metadata["mean"], metadata["std"]))
    if problem:
        return problem
    if not (is_finite_number(metadata["logit_scale"]) and metadata["logit_scale"] > 0):
        return "logit_scale is not a positive number"
    if metadata["tta"] not in TTA_MODES:
        return f"tta is {metadata['tta']!r}, not one of {', '.join(TTA_MODES)}"
    return None


def _not_weights(path: Path, reason: str) -> FastCifarError:
    return FastCifarError(f"{path} is not a fastcifar weights file ({reason}); pass a "
                          ".safetensors file written by `fastcifar train`")


def weights_metadata(config: TrainConfig, record: dict, loaders: Loaders,
                     evaluation: Evaluation, which: str) -> dict:
    """The metadata header of a weights file train writes (`which`: "best" or "final").

    What predict/evaluate need (classes, mean/std, logit scale, TTA mode) and what a person
    needs to trust the file: recipe, the accuracy and when it was measured, data, commit.
    """
    metadata = loaders.metadata
    source = metadata.source
    data_variant = f"{Path(str(source.get('path') or '?')).name} ({source.get('kind', '?')})"
    if loaders.train_count != metadata.train_count:
        data_variant += f", first {loaders.train_count:,} of {metadata.train_count:,} train images"
    return {
        "class_names": list(metadata.class_names), "mean": list(metadata.mean),
        "std": list(metadata.std), "logit_scale": config.logit_scale,
        "tta": tta_mode(config.tta, config.tta_shifts),
        "weights": which,
        "recipe": config.recipe,
        "accuracy": evaluation.test_accuracy,  # on the test set, with the TTA mode above
        "accuracy_note": ("the best test pass of the run: chosen on the test set" if which == "best"
                          else "the test pass at the end of the run"),
        "test_images": loaders.test_count,
        "epochs": evaluation.epochs, "steps": evaluation.steps,
        "data_variant": data_variant, "data_source": without_machine_paths(source),
        "git_commit": record["git_commit"], "precision": record["precision"],
        "config": without_machine_paths(record["config"]), "versions": record["versions"],
        "hardware": record["hardware"],
    }


def without_machine_paths(value: object) -> object:
    """`value` with every absolute path (a string starting at the root) cut to its last name:
    a weights file travels, and the folders of the machine that wrote it mean nothing there."""
    if isinstance(value, dict):
        return {key: without_machine_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_machine_paths(item) for item in value]
    if isinstance(value, str) and Path(value).is_absolute():
        return Path(value).name
    return value
