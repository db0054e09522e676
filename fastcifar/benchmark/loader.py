"""`fastcifar benchmark loader`: train-set images/s of the fastcifar pipeline against FFCV's
built-in ops and torchvision + DataLoader, with the JIT start-up cost; or (--compare-on-device)
fastcifar's FFCV path against its device-resident one, on the training device."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from fastcifar.atomic import atomic_path, check_can_write, file_set, write_json
from fastcifar.checkpoint import machine_description
from fastcifar.command_config import LoaderBenchmarkConfig
from fastcifar.config import AugmentConfig, LoaderConfig, PadMode
from fastcifar.data.augment import fill_colour
from fastcifar.data.loaders import (
    DatasetMetadata,
    build_loaders,
    builtin_train_pipeline,
    make_loader,
    read_metadata,
    test_pipeline,
    train_pipeline,
)
from fastcifar.device import DeviceStep, select_device
from fastcifar.errors import FastCifarError

LoaderProgress = Callable[[str, int, int], None]  # (pipeline, passes done, passes in all)

# What each pipeline does differently from the fused kernel (the work is otherwise the same:
# pad-crop 4, flip, one 8x8 cutout, jitter p 0.5, grayscale p 0.1, normalise, float32 NCHW
# channels-last tensors at the consumer).
LOADER_PIPELINE_NOTES = {
    "fastcifar": {"lacks": [], "notes": "fused numba kernel (uint8) in the FFCV loader, then "
                  "fastcifar.device.DeviceStep: a blocking copy to the report's device (the CPU "
                  "unless --compare-on-device) and normalising there"},
    "fastcifar_on_device": {"lacks": [], "notes": "--data-on-device: every image decoded once "
                            "into device memory (build_seconds: both betons), batches gathered "
                            "and augmented there with torch ops on the kernel's own draws, "
                            "then DeviceStep (no copy)"},
    "ffcv_builtin": {"lacks": ["hue", "grayscale"], "notes": "FFCV's own RandomTranslate, "
                     "RandomHorizontalFlip, Cutout, RandomBrightness/Contrast/Saturation (each "
                     "drawn on its own with the jitter p) and NormalizeImage"},
    "torchvision_dataloader": {"lacks": [], "notes": "torchvision.transforms.v2 per image "
                               "(RandomApply(ColorJitter, p), RandomGrayscale, RandomCrop with "
                               "the mean as fill, RandomHorizontalFlip, a square RandomErasing "
                               "with the mean, ToDtype, Normalize) in a torch DataLoader with "
                               "persistent worker processes; its holes stay inside the image"},
}


class _InMemoryTrainSet:
    """(CHW uint8 tensor, label) records from an NHWC uint8 array, through `transform`."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(self.images[index]).permute(2, 0, 1)
        return self.transform(image), int(self.labels[index])


def torchvision_train_transform(augment: AugmentConfig, mean: list[float],
                                std: list[float]) -> Callable:
    """The fused augmentation's parts as a torchvision.transforms.v2 pipeline, normalising."""
    from torchvision.transforms import v2

    fill = [int(value) for value in fill_colour(mean)]
    hole_fraction = augment.cutout_size ** 2 / 32 ** 2
    return v2.Compose([
        # colour first, on the source pixels only, as in the fused kernel
        v2.RandomApply([v2.ColorJitter(augment.brightness, augment.contrast,
                                       augment.saturation, augment.hue)], p=augment.p_jitter),
        v2.RandomGrayscale(p=augment.p_gray),
        v2.RandomCrop(32, padding=augment.pad, fill=tuple(fill)),
        v2.RandomHorizontalFlip(),
        *[v2.RandomErasing(p=1.0, scale=(hole_fraction, hole_fraction), ratio=(1.0, 1.0),
                           value=fill) for _ in range(augment.cutout_count)],
        v2.ToDtype(torch.float32, scale=False),
        v2.Normalize(mean, std),
    ])


def read_train_images_from_beton(config: LoaderBenchmarkConfig, workers: int
                                 ) -> tuple[np.ndarray, np.ndarray]:
    """Every train record (NHWC uint8, labels) decoded once from the beton into memory."""
    metadata = read_metadata(config.data_dir)
    loader_config = LoaderConfig(data_dir=config.data_dir, batch_size=config.batch_size,
                                 workers=workers)
    loader = make_loader(metadata.train_path, test_pipeline(), loader_config, False, None,
                         config.seed)
    images = np.empty((metadata.train_count, 32, 32, 3), dtype=np.uint8)
    labels = np.empty(metadata.train_count, dtype=np.int64)
    done = 0
    for batch_images, batch_labels in loader:  # NCHW channels-last views of NHWC buffers
        count = len(batch_labels)
        images[done:done + count] = batch_images.permute(0, 2, 3, 1).numpy()
        labels[done:done + count] = batch_labels.numpy()
        done += count
    return images, labels


def _output_summary(images: torch.Tensor) -> dict:
    """What a pipeline delivered (checks that all three hand over the same kind of batch)."""
    return {"dtype": str(images.dtype), "shape": list(images.shape),
            "channels_last": images.is_contiguous(memory_format=torch.channels_last),
            "mean": round(float(images.mean()), 3), "std": round(float(images.std()), 3)}


def _augment_fields(augment: AugmentConfig) -> dict:
    """The augmentation as plain JSON values (enums as strings)."""
    return {key: getattr(value, "value", value)
            for key, value in dataclasses.asdict(augment).items()}


def _time_loader_passes(name: str, build: Callable[[], Iterable], deliver: Callable,
                        passes: int, batches_per_pass: int, max_batches: int | None,
                        compiles: bool, progress: LoaderProgress | None) -> dict:
    """Build the loader, run one warm-up pass, then `passes` timed ones.

    Building an FFCV loader and its first batch hold the JIT compile. Images are counted at
    the consumer, after `deliver` turned the batch into the tensors a training step would use.
    """
    limit = min(batches_per_pass, max_batches or batches_per_pass)
    started = time.perf_counter()
    loader = build()
    build_seconds = time.perf_counter() - started

    def one_pass() -> tuple[int, float | None, torch.Tensor]:
        images = 0
        first_batch_seconds = None
        started = time.perf_counter()
        for step, batch in enumerate(loader, start=1):  # each iter() is a new epoch
            inputs, labels = deliver(*batch)
            images += labels.shape[0]
            if first_batch_seconds is None:
                first_batch_seconds = time.perf_counter() - started
            if step >= limit:
                break
        if inputs.device.type == "cuda":  # queued device work belongs to this pass
            torch.cuda.synchronize(inputs.device)
        return images, first_batch_seconds, inputs

    # Progress is reported between passes only: a callback per batch would be timed too.
    notify = progress or (lambda stage, done, total: None)
    notify(name, 0, passes + 1)
    started = time.perf_counter()
    _, first_batch_seconds, _ = one_pass()
    warmup_seconds = time.perf_counter() - started
    notify(name, 1, passes + 1)
    images = 0
    seconds = 0.0
    per_pass = []
    for index in range(passes):
        started = time.perf_counter()
        counted, _, last_inputs = one_pass()
        elapsed = time.perf_counter() - started
        seconds += elapsed
        images += counted
        per_pass.append(counted / elapsed)
        notify(name, index + 2, passes + 1)
    return {"name": name, "images_per_s": images / seconds, "images": images,
            "seconds": seconds, "pass_images_per_s": per_pass,
            "build_seconds": build_seconds, "first_batch_seconds": first_batch_seconds,
            "jit_seconds": build_seconds + first_batch_seconds if compiles else None,
            "warmup_pass_seconds": warmup_seconds,
            "measured_over": ("whole passes" if limit == batches_per_pass
                              else f"the first {limit} batches of each pass"),
            "output": _output_summary(last_inputs), **LOADER_PIPELINE_NOTES[name]}


def loader_first_batch_seconds(config: LoaderBenchmarkConfig, workers: int) -> dict:
    """Seconds from building the fastcifar train loader to its first batch (JIT included)."""
    started = time.perf_counter()
    metadata = read_metadata(config.data_dir)
    loader_config = LoaderConfig(data_dir=config.data_dir, batch_size=config.batch_size,
                                 workers=workers)
    loader = make_loader(metadata.train_path,
                         train_pipeline(config.augment, config.seed, metadata.mean),
                         loader_config, True, None, config.seed)
    batches = iter(loader)
    next(batches)
    first_batch_seconds = time.perf_counter() - started
    started = time.perf_counter()
    next(batches)
    return {"first_batch_seconds": first_batch_seconds,
            "next_batch_seconds": time.perf_counter() - started}


_JIT_CHILD = """
import json, sys, time
started = time.perf_counter()
from fastcifar.benchmark.loader import loader_first_batch_seconds, loader_config_from_json
config, workers = loader_config_from_json(sys.argv[1]), int(sys.argv[2])
import_seconds = time.perf_counter() - started
print(json.dumps({"import_seconds": import_seconds, **loader_first_batch_seconds(config, workers)}))
"""


def loader_config_from_json(text: str) -> LoaderBenchmarkConfig:
    """The config `_measure_jit_startup` hands to its child processes."""
    fields = json.loads(text)
    return LoaderBenchmarkConfig(data_dir=Path(fields["data_dir"]),
                                 batch_size=fields["batch_size"], seed=fields["seed"],
                                 augment=AugmentConfig(**{**fields["augment"], "pad_mode":
                                                          PadMode(fields["augment"]["pad_mode"])}))


def _measure_jit_startup(config: LoaderBenchmarkConfig, workers: int) -> dict:
    """First-batch time of the fastcifar loader in two fresh processes sharing a new, empty
    numba cache folder: the first compiles the kernels (cold), the second loads them (warm).
    FFCV's generated pipeline code is compiled in both: numba cannot cache its closures."""
    fields = {"data_dir": str(Path(config.data_dir).resolve()),
              "batch_size": config.batch_size, "seed": config.seed,
              "augment": _augment_fields(config.augment)}
    runs = {}
    with tempfile.TemporaryDirectory(prefix="fastcifar-numba-cache-") as cache_dir:
        environment = {**os.environ, "NUMBA_CACHE_DIR": cache_dir}
        for label in ("cold_cache", "warm_cache"):
            child = subprocess.run([sys.executable, "-c", _JIT_CHILD, json.dumps(fields),
                                    str(workers)], env=environment, capture_output=True,
                                   text=True, check=False)
            if child.returncode != 0:
                last_line = (child.stderr.strip().splitlines() or ["no output"])[-1]
                raise FastCifarError(f"the JIT start-up child process failed: {last_line}")
            runs[label] = json.loads(child.stdout.strip().splitlines()[-1])
    runs["note"] = ("fresh process each; first_batch_seconds runs from building the loader to "
                    "its first batch and holds the JIT compile; a new NUMBA_CACHE_DIR is shared "
                    "by the two, so the first compiles the cache=True kernels and the second "
                    "loads them")
    return runs


def _write_loader_markdown(path: Path, report: dict) -> None:
    """A short table beside the JSON: images/s, first batch, ratio to fastcifar."""
    lines = [f"# Loader throughput ({report['date']})", "",
             f"`{report['command']}`", "",
             f"{report['machine'].get('cpu', '?')}, {report['machine'].get('cpu_cores')} cores; "
             f"batches handed over on {report.get('device', 'cpu')}; "
             f"{report['workers']} workers, batch {report['batch_size']}, "
             f"{report['passes']} timed passes over {report['train_images']:,} train images "
             "after a warm-up pass.", "",
             "| pipeline | images/s | fastcifar is x faster | build + first batch (s) | lacks "
             "| measured over |",
             "|---|---:|---:|---:|---|---|"]
    fastest = report["results"][0]["images_per_s"]
    for row in report["results"]:
        lines.append(f"| {row['name']} | {row['images_per_s']:,.0f} | "
                     f"{fastest / row['images_per_s']:.1f} | "
                     f"{row['build_seconds'] + row['first_batch_seconds']:.2f} | "
                     f"{', '.join(row['lacks']) or '-'} | {row['measured_over']} |")
    if "on_device_vs_fastcifar" in report["ratios"]:
        lines += ["", "The device-resident path (`--data-on-device`) gives "
                  f"{report['ratios']['on_device_vs_fastcifar']:.2f}x the images/s of the FFCV "
                  "path (fastcifar), which copies each batch to the device."]
    startup = report.get("jit_startup")
    if startup:
        lines += ["", "JIT start-up of the fastcifar loader (fresh process each, build to first "
                  f"batch): cold numba cache {startup['cold_cache']['first_batch_seconds']:.1f} s, "
                  f"warm cache {startup['warm_cache']['first_batch_seconds']:.1f} s."]
    with atomic_path(path) as temporary:
        temporary.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _time_host_pipelines(config: LoaderBenchmarkConfig, metadata: DatasetMetadata, workers: int,
                         progress: LoaderProgress | None) -> tuple[list[dict], dict]:
    """fastcifar, FFCV's built-in ops and a torchvision DataLoader, all handing over CPU
    batches; returns their rows and the report fields they add."""
    loader_config = LoaderConfig(data_dir=config.data_dir, batch_size=config.batch_size,
                                 workers=workers)
    batches_per_pass = metadata.train_count // config.batch_size  # drop_last everywhere
    mean, std = metadata.mean, metadata.std

    def ffcv_loader(pipeline: list) -> Callable[[], Iterable]:
        return lambda: make_loader(metadata.train_path, pipeline, loader_config, True, None,
                                   config.seed)

    def passthrough(images: torch.Tensor, labels: torch.Tensor):
        return images, labels

    results = []
    device_step = DeviceStep(mean, std, torch.device("cpu"), channels_last=True)
    results.append(_time_loader_passes(
        "fastcifar", ffcv_loader(train_pipeline(config.augment, config.seed, mean)),
        device_step, config.passes, batches_per_pass, config.max_batches, True, progress))
    results.append(_time_loader_passes(
        "ffcv_builtin", ffcv_loader(builtin_train_pipeline(config.augment, mean, std)),
        passthrough, config.passes, batches_per_pass, config.max_batches, True, progress))

    started = time.perf_counter()
    images, labels = read_train_images_from_beton(config, workers)
    read_seconds = time.perf_counter() - started
    dataset = _InMemoryTrainSet(images, labels, torchvision_train_transform(config.augment,
                                                                            mean, std))

    def torch_loader() -> Iterable:
        return torch.utils.data.DataLoader(
            dataset, batch_size=config.batch_size, shuffle=True, drop_last=True,
            num_workers=workers, persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(config.seed))

    def to_channels_last(images: torch.Tensor, labels: torch.Tensor):
        return images.contiguous(memory_format=torch.channels_last), labels

    limits = [limit for limit in (config.torchvision_batches, config.max_batches) if limit]
    # (its persistent workers stop when the loader is dropped, on return)
    results.append(_time_loader_passes("torchvision_dataloader", torch_loader,
                                       to_channels_last, config.passes, batches_per_pass,
                                       min(limits, default=None), False, progress))
    speed = {row["name"]: row["images_per_s"] for row in results}
    return results, {
        "torchvision_images": "decoded once from the train beton into a uint8 array in memory "
                              f"({read_seconds:.1f} s, not timed)",
        "ratios": {"fastcifar_vs_ffcv_builtin": speed["fastcifar"] / speed["ffcv_builtin"],
                   "fastcifar_vs_torchvision_dataloader":
                       speed["fastcifar"] / speed["torchvision_dataloader"]}}


def _time_device_paths(config: LoaderBenchmarkConfig, metadata: DatasetMetadata, workers: int,
                       progress: LoaderProgress | None) -> tuple[list[dict], dict]:
    """fastcifar's FFCV loader (a blocking copy per batch, as in training) against the
    device-resident path, both handing over normalised batches on `config.device`."""
    device = select_device(config.device)
    loader_config = LoaderConfig(data_dir=config.data_dir, batch_size=config.batch_size,
                                 workers=workers)
    batches_per_pass = metadata.train_count // config.batch_size
    device_step = DeviceStep(metadata.mean, metadata.std, device, channels_last=True)

    def ffcv() -> Iterable:
        return make_loader(metadata.train_path,
                           train_pipeline(config.augment, config.seed, metadata.mean),
                           loader_config, True, None, config.seed)

    def resident() -> Iterable:
        return build_loaders(dataclasses.replace(loader_config, on_device=True), config.augment,
                             config.seed, device=device).train

    results = [_time_loader_passes(name, build, device_step, config.passes, batches_per_pass,
                                   config.max_batches, compiles, progress)
               for name, build, compiles in (("fastcifar", ffcv, True),
                                             ("fastcifar_on_device", resident, False))]
    return results, {"device": str(device), "ratios": {
        "on_device_vs_fastcifar": results[1]["images_per_s"] / results[0]["images_per_s"]}}


def benchmark_loader(config: LoaderBenchmarkConfig,
                     progress: LoaderProgress | None = None) -> dict:
    """Train-set images/s of the fastcifar pipeline, FFCV's built-in ops and a torchvision
    DataLoader, in this process, with the same augmentation, workers and batch size; with
    `compare_on_device`, of fastcifar's FFCV and device-resident paths on the device."""
    metadata = read_metadata(config.data_dir)
    workers = config.workers or len(os.sched_getaffinity(0))
    if config.batch_size > metadata.train_count:
        raise FastCifarError(f"batch size {config.batch_size} is larger than the "
                             f"{metadata.train_count} train images")
    if config.json_path is not None:  # before minutes of timing, not after
        check_can_write(config.json_path, Path(config.json_path).with_suffix(".md"))
    load_before = os.getloadavg()[0]
    measure = _time_device_paths if config.compare_on_device else _time_host_pipelines
    results, fields = measure(config, metadata, workers, progress)
    report = {
        "benchmark": "loader",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_description(select_device(config.device)
                                       if config.compare_on_device else None),
        "load_average_1min_before": load_before,
        "workers": workers,
        "batch_size": config.batch_size,
        "passes": config.passes,
        "train_images": metadata.train_count,
        "data": str(metadata.train_path),
        "device": "cpu",
        "augment": _augment_fields(config.augment),
        "seed": config.seed,
        "command": config.command,
        "results": results,
        **fields,
        "jit_seconds_note": "build_seconds + first_batch_seconds: building the FFCV loader and "
                            "its first batch, where FFCV compiles its pipeline code (every "
                            "time) and fastcifar's kernels come from the numba cache when warm",
    }
    if config.jit_startup and not config.compare_on_device:
        report["jit_startup"] = _measure_jit_startup(config, workers)
    if config.json_path is not None:
        with file_set():  # the JSON and its table: both new or neither
            write_json(config.json_path, report)
            _write_loader_markdown(Path(config.json_path).with_suffix(".md"), report)
    return report
