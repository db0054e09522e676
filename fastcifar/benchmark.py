"""Benchmarks with results files: loader throughput and time to a target test accuracy."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastcifar.atomic import atomic_path, write_json
from fastcifar.config import (
    AugmentConfig,
    LoaderBenchmarkConfig,
    LoaderConfig,
    PadMode,
    TimeToAccuracyConfig,
    TrainConfig,
)
from fastcifar.data.augment import fill_colour
from fastcifar.data.loaders import (
    build_loaders,
    builtin_train_pipeline,
    make_loader,
    read_metadata,
    test_pipeline,
    train_pipeline,
)
from fastcifar.device import DeviceStep, measures_precision, plan_precision, select_device
from fastcifar.errors import FastCifarError
from fastcifar.train import (
    Evaluation,
    TrainCallbacks,
    TrainingInterrupted,
    evaluate,
    machine_description,
    run_record,
    train,
)

# ---------------------------------------------------------------- time to accuracy


@dataclass(frozen=True)
class TargetHit:
    """When a run's test accuracy first reached a target (timed from the first training step)."""

    epochs: float  # fractional when an evaluation inside an epoch reached it
    steps: int
    seconds: float  # train + eval seconds up to and including that evaluation
    train_seconds: float
    eval_seconds: float


def first_hits(evaluations: list[Evaluation], targets: tuple[float, ...]
               ) -> dict[str, TargetHit | None]:
    """For each target, the first evaluation whose test accuracy reaches it (None: never)."""
    hits: dict[str, TargetHit | None] = {}
    for target in targets:
        hit = next((row for row in evaluations if row.test_accuracy >= target), None)
        hits[str(target)] = None if hit is None else TargetHit(
            hit.epochs, hit.steps, hit.train_seconds + hit.eval_seconds, hit.train_seconds,
            hit.eval_seconds)
    return hits


def _run_to_accuracy(config: TimeToAccuracyConfig, train_config: TrainConfig,
                     callbacks: TrainCallbacks | None) -> dict:
    """One seeded run: target hits, warm-up, final accuracy with and without TTA."""
    loaders = build_loaders(train_config.loader, train_config.augment, train_config.seed)
    stop_at = max(config.targets) if config.stop_at_target else None
    result = train(dataclasses.replace(train_config, stop_at_accuracy=stop_at, make_plots=False,
                                       resume=config.resume), callbacks, loaders=loaders)
    device = select_device(train_config.device, train_config.local_rank)
    plan = result.plan  # auto on the CPU: what the run measured as faster
    step = DeviceStep(loaders.metadata.mean, loaders.metadata.std, device,
                      train_config.channels_last)
    final = {}
    for tta in (False, True):
        final[tta] = evaluate(result.final_model, loaders.test, step, plan, tta)[1]
    return {
        "seed": train_config.seed,
        "budget_epochs": train_config.epochs,
        "targets": {key: (dataclasses.asdict(hit) if hit else None)
                    for key, hit in first_hits(result.evaluations, config.targets).items()},
        "warmup_seconds": result.warmup_seconds,  # every sitting of a resumed run
        "resumed_from": str(config.resume) if config.resume else None,
        "epochs_run": len(result.history),
        "precision": plan.name,
        "precision_images_per_second": result.precision_images_per_second,  # when measured
        "final_accuracy": result.history[-1].test_accuracy,
        "final_accuracy_no_tta": final[False],
        "final_accuracy_tta": final[True],
        "per_epoch": [dataclasses.asdict(row) for row in result.history],
        "evaluations": [dataclasses.asdict(row) for row in result.evaluations],
        "run_dir": str(result.run_dir),
    }


def _median_summary(runs: list[dict], targets: tuple[float, ...]) -> dict:
    summary: dict[str, object] = {
        "final_accuracy": statistics.median(run["final_accuracy"] for run in runs)}
    for target in targets:
        hits = [run["targets"][str(target)] for run in runs]
        reached = [hit for hit in hits if hit is not None]
        # A median over runs that missed counts them as infinitely slow.
        if len(reached) * 2 > len(hits):
            ordered = sorted(hit["seconds"] for hit in reached) + [math.inf] * (len(hits) -
                                                                                len(reached))
            epochs = sorted(hit["epochs"] for hit in reached) + [math.inf] * (len(hits) -
                                                                              len(reached))
            summary[str(target)] = {"seconds": statistics.median(ordered),
                                    "epochs": statistics.median(epochs),
                                    "reached": f"{len(reached)}/{len(hits)}"}
        else:
            summary[str(target)] = {"seconds": None, "epochs": None,
                                    "reached": f"{len(reached)}/{len(hits)}"}
    return summary


def benchmark_time_to_accuracy(config: TimeToAccuracyConfig,
                               callbacks: TrainCallbacks | None = None) -> dict:
    """Run the recipe for each seed (and each budget in shortest-budget mode); write the JSON."""
    budgets = config.budgets or (config.train.epochs,)
    report: dict[str, object] = {
        "benchmark": "time_to_accuracy", "recipe": config.train.recipe,
        "epochs": config.train.epochs, "targets": list(config.targets),
        "device": str(select_device(config.train.device)),
        "train_subset": config.train.loader.train_subset, "data": config.data_variant,
        "machine": machine_description(select_device(config.train.device)),
        "command": config.command, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    # Taken before the runs: the code that runs is the code checked out when they start.
    device = select_device(config.train.device)
    precision = ("auto (fp32 or bf16, timed by each run)"
                 if measures_precision(config.train.precision, device)
                 else plan_precision(config.train.precision, device).name)
    record = run_record(config.train, device, precision)
    report.update(versions=record["versions"], commit=record["git_commit"],
                  config=record["config"], precision=precision)
    shortest: int | None = None
    all_runs: dict[str, list[dict]] = {}
    for budget in budgets:
        runs = []
        for index in range(config.runs):
            run_config = dataclasses.replace(config.train, epochs=budget,
                                             seed=config.train.seed + index)
            try:
                runs.append(_run_to_accuracy(config, run_config, callbacks))
            except TrainingInterrupted as interrupted:
                if config.runs == 1 and not config.budgets:
                    raise
                # --resume continues one run: say how to finish this one on its own
                raise TrainingInterrupted(
                    interrupted.signal_number, interrupted.checkpoint,
                    f"the runs finished before it keep their metrics.json; continue this run "
                    f"alone with the same options but `--runs 1 --seed {run_config.seed} "
                    f"--epochs {budget} --resume {interrupted.checkpoint}` (no --budget)"
                ) from None
        all_runs[str(budget)] = runs
        median_final = statistics.median(run["final_accuracy"] for run in runs)
        if shortest is None and median_final >= max(config.targets):
            shortest = budget
            if config.budgets:
                break  # shortest-budget mode: longer budgets need not run
    report["runs"] = [run for runs in all_runs.values() for run in runs]
    if measures_precision(config.train.precision, device):
        report["precision"] = "/".join(sorted({run["precision"] for run in report["runs"]}))
    report["median"] = {budget: _median_summary(runs, config.targets)
                        for budget, runs in all_runs.items()}
    if config.budgets:
        report["shortest_budget_epochs"] = shortest
    if config.json_path is not None:
        write_json(config.json_path, report)
        write_time_to_accuracy_markdown(Path(config.json_path).with_suffix(".md"), report)
    return report


def _percent(fraction: float | str) -> str:
    return f"{float(fraction) * 100:g}%"  # 0.935 -> 93.5%, 0.9 -> 90%


def _format_hit(hit: dict | None) -> str:
    if hit is None:
        return "not reached"
    return (f"{round(hit['epochs'], 2):g} ep, {hit['seconds']:,.1f} s ({hit['train_seconds']:,.1f} + "
            f"{hit['eval_seconds']:,.1f})")


def write_time_to_accuracy_markdown(path: Path, report: dict) -> None:
    """A table beside the JSON: per run, epochs and seconds (train + eval) to each target."""
    machine = report["machine"]
    hardware = machine.get("gpu") or f"{machine.get('cpu', '?')}, {machine.get('cpu_cores')} cores"
    config = report["config"]
    targets = [str(target) for target in report["targets"]]
    dated = f" ({report['date']})" if "date" in report else ""  # older reports lack it
    lines = [f"# Time to accuracy: recipe {report['recipe']}{dated}", "",
             f"`{report['command']}`", "",
             f"{hardware}; device {report['device']}, precision "
             f"{report.get('precision', config['precision'])}, batch "
             f"{config['loader']['batch_size']}; data {report['data']}; commit "
             f"{report['commit'] or 'unknown'}. Seconds run from the first training step and "
             "hold train + eval time; the one-off warm-up (summed over sittings when resumed) is "
             "apart.", "",
             "| budget (epochs) | seed | epochs run | " + " | ".join(
                 f"to {_percent(target)}" for target in targets)
             + " | warm-up (s) | final acc | no TTA | flip TTA |",
             "|---:|---:|---:|" + "---|" * len(targets) + "---:|---:|---:|---:|"]
    for run in report["runs"]:
        # older reports lack the key; their runs never stopped early, so epochs run = budget
        budget = run.get("budget_epochs", run["epochs_run"])
        seed = f"{run['seed']} (resumed)" if run.get("resumed_from") else run["seed"]
        lines.append(f"| {budget} | {seed} | {run['epochs_run']} | "
                     + " | ".join(_format_hit(run["targets"][target]) for target in targets)
                     + f" | {run['warmup_seconds']:.1f} | {run['final_accuracy']:.2%} | "
                     f"{run['final_accuracy_no_tta']:.2%} | {run['final_accuracy_tta']:.2%} |")
    lines += ["", "| budget (epochs) | median final acc | " + " | ".join(
        f"median to {_percent(target)} (epochs, s; runs reaching it)" for target in targets)
        + " |", "|---:|---:|" + "---|" * len(targets)]
    for budget, summary in report["median"].items():
        cells = []
        for target in targets:
            median = summary[target]
            cells.append(f"median not reached; {median['reached']}" if median["seconds"] is None
                         else f"{round(median['epochs'], 2):g} ep, {median['seconds']:,.1f} s; "
                         f"{median['reached']}")
        lines.append(f"| {budget} | {summary['final_accuracy']:.2%} | " + " | ".join(cells) + " |")
    if "shortest_budget_epochs" in report:
        shortest = report["shortest_budget_epochs"]
        lines += ["", f"Shortest budget whose median final accuracy reaches "
                  f"{_percent(max(report['targets']))}: " + (
                      f"{shortest} epochs." if shortest is not None else
                      f"none of those tried ({', '.join(report['median'])} epochs).")]
    with atomic_path(path) as temporary:
        temporary.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- loader throughput

LoaderProgress = Callable[[str, int, int], None]  # (pipeline, passes done, passes in all)

# What each pipeline does differently from the fused kernel (the work is otherwise the same:
# pad-crop 4, flip, one 8x8 cutout, jitter p 0.5, grayscale p 0.1, normalise, float32 NCHW
# channels-last tensors at the consumer).
LOADER_PIPELINE_NOTES = {
    "fastcifar": {"lacks": [], "notes": "fused numba kernel (uint8) in the FFCV loader, then "
                  "fastcifar.train.DeviceStep normalising on the CPU"},
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
from fastcifar.benchmark import loader_first_batch_seconds, loader_config_from_json
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
    startup = report.get("jit_startup")
    if startup:
        lines += ["", "JIT start-up of the fastcifar loader (fresh process each, build to first "
                  f"batch): cold numba cache {startup['cold_cache']['first_batch_seconds']:.1f} s, "
                  f"warm cache {startup['warm_cache']['first_batch_seconds']:.1f} s."]
    with atomic_path(path) as temporary:
        temporary.write_text("\n".join(lines) + "\n", encoding="utf-8")


def benchmark_loader(config: LoaderBenchmarkConfig,
                     progress: LoaderProgress | None = None) -> dict:
    """Train-set images/s of the fastcifar pipeline, FFCV's built-in ops and a torchvision
    DataLoader, in this process, with the same augmentation, workers and batch size."""
    metadata = read_metadata(config.data_dir)
    workers = config.workers or len(os.sched_getaffinity(0))
    if config.batch_size > metadata.train_count:
        raise FastCifarError(f"batch size {config.batch_size} is larger than the "
                             f"{metadata.train_count} train images")
    load_before = os.getloadavg()[0]
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
        device_step, config.passes, batches_per_pass, None, True, progress))
    results.append(_time_loader_passes(
        "ffcv_builtin", ffcv_loader(builtin_train_pipeline(config.augment, mean, std)),
        passthrough, config.passes, batches_per_pass, None, True, progress))

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

    # (its persistent workers stop when the loader is dropped, on return)
    results.append(_time_loader_passes("torchvision_dataloader", torch_loader,
                                       to_channels_last, config.passes, batches_per_pass,
                                       config.torchvision_batches, False, progress))
    speed = {row["name"]: row["images_per_s"] for row in results}
    report = {
        "benchmark": "loader",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_description(),
        "load_average_1min_before": load_before,
        "workers": workers,
        "batch_size": config.batch_size,
        "passes": config.passes,
        "train_images": metadata.train_count,
        "data": str(metadata.train_path),
        "torchvision_images": "decoded once from the train beton into a uint8 array in memory "
                              f"({read_seconds:.1f} s, not timed)",
        "augment": _augment_fields(config.augment),
        "seed": config.seed,
        "command": config.command,
        "results": results,
        "ratios": {"fastcifar_vs_ffcv_builtin": speed["fastcifar"] / speed["ffcv_builtin"],
                   "fastcifar_vs_torchvision_dataloader":
                       speed["fastcifar"] / speed["torchvision_dataloader"]},
        "jit_seconds_note": "build_seconds + first_batch_seconds: building the FFCV loader and "
                            "its first batch, where FFCV compiles its pipeline code (every "
                            "time) and fastcifar's kernels come from the numba cache when warm",
    }
    if config.jit_startup:
        report["jit_startup"] = _measure_jit_startup(config, workers)
    if config.json_path is not None:
        write_json(config.json_path, report)
        _write_loader_markdown(Path(config.json_path).with_suffix(".md"), report)
    return report
