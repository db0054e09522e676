"""Run state: seeds and the run record, and resumable checkpoints (torch, loaded with
weights_only, so a file a user hands in is never unpickled). Weights files: weights_file.py.
"""

from __future__ import annotations

import io
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
from fastcifar.config import TrainConfig
from fastcifar.errors import FastCifarError, first_line

if TYPE_CHECKING:  # annotations only: these modules import this one
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
    return first_line(error)


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
                          "eval_from_epoch",
                          "loader.workers"}  # the batches do not depend on the thread count


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

    differing = [change for key in sorted(current)
                 for change in _setting_changes(key, saved_value(key), current[key])]
    if differing:
        raise FastCifarError("checkpoint was made with other settings (" + "; ".join(differing)
                             + "): resume with the same options or start a new run")


_ABSENT = object()  # a nested setting that one side has and the other lacks


def _setting_changes(key: str, saved: object, current: object) -> list[str]:
    """'key: saved -> current' for a setting that differs (each differing field of a nested
    one, as loader.on_device), so the refusal says which option to give back."""
    if saved == current or key in _RESUMABLE_DIFFERENCES:
        return []
    if key == "loader.data_dir" and Path(str(saved)).resolve() == Path(str(current)).resolve():
        return []  # the same folder, named relative once and absolute once
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
