"""Run state and weights files: seeds and the run record, resumable checkpoints (torch, loaded
with weights_only) and weights files (safetensors with a JSON metadata header). A file a user
hands in is never unpickled.
"""

from __future__ import annotations

import io
import json
import os
import platform
import random
import subprocess
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fastcifar.atomic import write_bytes
from fastcifar.command_config import TTA_MODES
from fastcifar.config import TrainConfig
from fastcifar.data.convert import class_names_problem, is_finite_number, pixel_statistics_problem
from fastcifar.errors import FastCifarError

if TYPE_CHECKING:  # annotations only: these modules import this one
    from fastcifar.data.loaders import Loaders
    from fastcifar.records import EpochStats, Evaluation

# ---------------------------------------------------------------- resumable checkpoints


# What every checkpoint `run_state` writes holds and a resumed run reads (a plain state_dict
# has none of them).
CHECKPOINT_KEYS = ("model", "optimizer", "scaler", "epoch", "steps", "history", "best_accuracy",
                   "rng", "config")


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save through a temporary file, fsync and rename.

    `state` must hold only tensors and plain values (dict, list, tuple, str, number, bool,
    None), so that `load_checkpoint` can read it back with `weights_only=True`.
    """
    # Serialised in memory, then written by Python: torch's zip writer turns a full disk
    # into an unrelated RuntimeError.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(path, buffer.getbuffer())


def load_checkpoint(path: Path, required: tuple[str, ...] = ()) -> dict:
    """A checkpoint written by `save_checkpoint`, read with torch's weights-only unpickler.

    That unpickler builds only tensors and plain values and refuses any other object, so a
    crafted file (a `__reduce__` payload) cannot run code: it gets a one-line error instead, as
    do damaged files and checkpoints from before RNG states were stored as plain values. A
    state lacking one of the `required` keys is refused as not a fastcifar checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FastCifarError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it did not write; the load is refused or fine.
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch errors of a file not ours
        raise FastCifarError(
            f"cannot resume from {path}: not a checkpoint that loads as tensors and plain values "
            f"(damaged, written by an older fastcifar, or not a checkpoint: "
            f"{_unpickler_reason(error)}); nothing in it was run") from None
    if not isinstance(state, dict):
        raise FastCifarError(f"{path} is not a fastcifar checkpoint (it holds a "
                             f"{type(state).__name__}, not a dict)")
    missing = [key for key in required if key not in state]
    if missing:
        raise FastCifarError(f"{path} is not a fastcifar checkpoint (no {', '.join(missing)}): "
                             "resume from a run folder's last.pt")
    return state


def _unpickler_reason(error: BaseException) -> str:
    """What torch.load's weights-only unpickler refused, without torch's advice around it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            reason = line.split("WeightsUnpickler error:", 1)[1].strip()
            if not reason and index + 1 < len(lines):
                reason = lines[index + 1]
            return reason.split(". ")[0].rstrip(".")
        if line.startswith("Trying to load unsupported"):
            return line.rstrip(".")
    return _first_line(error)


def rng_state(device: torch.device | None = None) -> dict:
    """Python, numpy, torch and (for a CUDA `device`) that GPU's RNG states, as tensors and
    plain values (weights-only loadable)."""
    version, python_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    cuda = ({"cuda": torch.cuda.get_rng_state(device)}
            if device is not None and device.type == "cuda" else {})
    return {
        "python": {"version": version, "state": list(python_state), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                  "position": int(position), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        **cuda,
    }


def restore_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Put back the RNG states `rng_state` returned (a GPU's on the CUDA `device` this run
    trains on: under torchrun each rank's own, which is rank 0's saved state)."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32),
                         numpy["position"], numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device is not None and device.type == "cuda":  # dropout draws
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------- weights files

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
        raise _not_weights(path, f"not a safetensors file: {_first_line(error)}") from None
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


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def seed_everything(seed: int) -> None:
    """Python, numpy and torch RNGs; the loader order and augmentation take the seed directly."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_record(config: TrainConfig, device: torch.device, precision: str) -> dict:
    """Config, versions, hardware and git commit: stored with every run and checkpoint."""
    import importlib.metadata

    import numba

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "config": config_to_dict(config),
        # str(): torch.__version__ is a str subclass that torch.load(weights_only) refuses.
        "versions": {"torch": str(torch.__version__), "ffcv": importlib.metadata.version("ffcv"),
                     "numba": numba.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "hardware": machine_description(device),
        "precision": precision,
        "git_commit": commit or None,
    }


def machine_description(device: torch.device | None = None) -> dict:
    """CPU model and core count, memory, and the GPU name when one is used."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    description = {"cpu": cpu, "cpu_cores": len(os.sched_getaffinity(0)),
                   "platform": platform.platform()}
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        description["memory_gib"] = round(pages / 2**30, 1)
    except (ValueError, OSError):
        pass
    if device is not None and device.type == "cuda":
        description["gpu"] = torch.cuda.get_device_name(device)
    return description


def config_to_dict(config: TrainConfig) -> dict:
    """JSON-friendly `asdict` (paths and enums as strings)."""
    def plain(value: object) -> object:
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        if isinstance(value, Path):
            return str(value)
        if hasattr(value, "value"):
            return value.value
        return value

    return plain(asdict(config))


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


def run_state(trainer_state: dict, epoch: int, history: list[EpochStats],
              evaluations: list[Evaluation], record: dict, best_accuracy: float,
              warmup_seconds: float, partial: dict | None = None,
              device: torch.device | None = None) -> dict:
    """Everything a resumed run needs, as tensors and plain values (loadable weights_only):
    `trainer_state` (model, optimisers, averages, steps: `ModelTrainer.state_dict`), the
    run's records and the RNG states (with `device`'s, when it is a GPU)."""
    return {
        "partial": partial,  # progress inside an interrupted epoch
        "warmup_seconds": warmup_seconds,  # of every sitting so far
        "evaluations": [asdict(evaluation) for evaluation in evaluations],
        **trainer_state,
        "epoch": epoch,  # completed epochs
        "history": [asdict(stats) for stats in history],
        "best_accuracy": best_accuracy,
        "rng": rng_state(device),  # tensors and plain values: loadable with weights_only
        **record,
    }


# Settings that may differ between a run and its resumption (they do not change the maths).
_RESUMABLE_DIFFERENCES = {"resume", "out_dir", "weights_dir", "make_plots", "tensorboard",
                          "stop_at_accuracy",
                          "local_rank", "device", "eval_every_steps", "eval_steps_epochs",
                          "eval_from_epoch"}


def check_resume_compatible(saved: dict, config: TrainConfig) -> None:
    """Refuse a checkpoint whose config differs in a setting that changes the maths.

    A setting the saved config lacks (a checkpoint from before the option existed) counts as
    its default: new options default to the behaviour that came before them.
    """
    current, defaults = config_to_dict(config), config_to_dict(TrainConfig())

    def saved_value(key: str) -> object:
        value = saved.get(key, defaults.get(key))
        if isinstance(value, dict) and isinstance(defaults.get(key), dict):
            value = {**defaults[key], **value}  # nested settings (loader, augment) likewise
        return value

    differing = [change for key in sorted(current) if key not in _RESUMABLE_DIFFERENCES
                 for change in _setting_changes(key, saved_value(key), current[key])]
    if differing:
        raise FastCifarError("checkpoint was made with other settings (" + "; ".join(differing)
                             + "): resume with the same options or start a new run")


_ABSENT = object()  # a nested setting that one side has and the other lacks


def _setting_changes(key: str, saved: object, current: object) -> list[str]:
    """'key: saved -> current' for a setting that differs (each differing field of a nested
    one, as loader.on_device), so the refusal says which option to give back."""
    if saved == current:
        return []
    if isinstance(saved, dict) and isinstance(current, dict):
        return [change for inner in sorted(current.keys() | saved.keys())
                for change in _setting_changes(f"{key}.{inner}", saved.get(inner, _ABSENT),
                                               current.get(inner, _ABSENT))]
    if current is _ABSENT:
        return [f"{key}: {saved!r} in the checkpoint, not an option of this version"]
    if saved is _ABSENT:
        return [f"{key}: not in the checkpoint, {current!r} now"]
    return [f"{key}: {saved!r} in the checkpoint, {current!r} now"]


def check_resume_world_size(saved: int | None, current: int) -> None:
    """Refuse a checkpoint made by another number of processes: --batch-size is per process,
    so the steps per epoch, the schedule's length and each rank's shard would all change.
    `saved` None: a checkpoint from before the count was stored (not checked)."""
    if saved is not None and saved != current:
        how = ("without torchrun" if saved == 1
               else f"under torchrun --nproc_per_node {saved} (processes in all)")
        raise FastCifarError(
            f"checkpoint was made by {saved} training process(es), this run has {current}: "
            f"--batch-size is per process, so the schedule would differ; resume {how}, or "
            "start a new run")


def resume_checkpoint(resume: str | None, out_dir: Path) -> Path | None:
    """--resume's checkpoint: a path, or for 'auto' the newest run folder's last.pt in out_dir."""
    if resume != "auto":
        return Path(resume) if resume else None
    candidates = sorted(Path(out_dir).glob("*/last.pt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FastCifarError(f"--resume auto: no checkpoint (*/last.pt) under {out_dir}")
    return candidates[-1]
