"""`fastcifar benchmark`: loader throughput and time to a target test accuracy, each writing a
results file (JSON plus a Markdown table) named so that no run replaces another's."""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from fastcifar.config import Device, TrainConfig
from fastcifar.progress import TableCallbacks, print_loader_benchmark, print_time_to_accuracy, show_pass
from fastcifar.shared_options import DATA, SYSTEM, DataOption
from fastcifar.terminal import run_command
from fastcifar.train_options import with_train_options

benchmark_app = typer.Typer(no_args_is_help=True, pretty_exceptions_show_locals=False,
                            help="Loader throughput and time-to-accuracy.")


@benchmark_app.command("time-to-accuracy")
@with_train_options
def benchmark_time_to_accuracy(
    train_config: TrainConfig,
    target: Annotated[list[float], typer.Option(help="Test accuracy to reach; repeat for "
                      "several (e.g. --target 0.90 --target 0.94).")] = [0.90],  # noqa: B006
    runs: Annotated[int, typer.Option(help="Runs (seeds seed, seed+1, ...).")] = 1,
    budgets: Annotated[list[int] | None, typer.Option("--budget", help="Shortest-budget mode: "
                       "try these epoch budgets in order, stop at the first whose median final "
                       "accuracy reaches the highest target. Each trains with the settings "
                       "--epochs gives (a recipe's budget rows too).")] = None,
    stop_at_target: Annotated[bool, typer.Option(help="End each run once the highest target "
                              "is reached.")] = False,
    data_variant: Annotated[str, typer.Option(help="How the results name the data.",
                            rich_help_panel=DATA)] = "CIFAR-10 (JPEG-75 copy)",
    json_path: Annotated[Path | None, typer.Option("--json", help="Results file (default "
                         "benchmarks/results/time-to-accuracy-<recipe>-<epochs>ep-<device>-"
                         "<UTC time>.json); a .md "
                         "table goes beside it.")] = None,
    resume: Annotated[str | None, typer.Option(help="Continue an interrupted run from its "
                      "last.pt, or 'auto' for the newest under --out (a train run's too: its options "
                      "must match; one run, no --budget).", rich_help_panel=SYSTEM)] = None,
) -> None:
    """Wall time to reach target test accuracies (train / eval / warm-up split), per seed.

    Takes train's options (not --weights-dir or --stop-at-accuracy); the run folders go under --out,
    their weights to --out/weights. Ctrl-C saves a checkpoint; a one-run benchmark continues
    with the same options plus --resume.
    """
    from fastcifar.benchmark.time_to_accuracy import benchmark_time_to_accuracy as run_benchmark
    from fastcifar.checkpoint import resume_checkpoint
    from fastcifar.command_config import TimeToAccuracyConfig

    train_config = dataclasses.replace(train_config, weights_dir=train_config.out_dir / "weights",
                                       make_plots=False)
    json_path = json_path or default_time_to_accuracy_path(train_config)
    resume_path = run_command(resume_checkpoint, resume, train_config.out_dir)
    config = run_command(TimeToAccuracyConfig, train=train_config, targets=tuple(target),
                         runs=runs, stop_at_target=stop_at_target,
                         budgets=tuple(budgets or ()), json_path=json_path,
                         command=shlex.join(["fastcifar", *sys.argv[1:]]),
                         data_variant=data_variant,
                         resume=resume_path)
    report = run_command(run_benchmark, config, TableCallbacks())
    print_time_to_accuracy(report, json_path)


def default_time_to_accuracy_path(train_config: TrainConfig) -> Path:
    """benchmarks/results/time-to-accuracy-<recipe>-<epochs>ep-<device>-<UTC time>.json: named
    by what ran, and never the file of an earlier run."""
    device = train_config.device.value
    if train_config.device == Device.auto:
        device = "cuda" if _cuda_available() else "cpu"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return Path(f"benchmarks/results/time-to-accuracy-{train_config.recipe}-"
                f"{train_config.epochs}ep-{device}-{stamp}.json")


def default_loader_benchmark_path() -> Path:
    """benchmarks/results/loader-<UTC time>.json: a second run that day keeps the first's."""
    return Path(f"benchmarks/results/loader-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@benchmark_app.command("loader")
def benchmark_loader(
    data: DataOption = Path("datasets"),
    workers: Annotated[int, typer.Option(help="Loader threads (FFCV) and worker processes "
                       "(torch DataLoader), 0 = one per core.", rich_help_panel=SYSTEM)] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per batch.",
                                            rich_help_panel=DATA)] = 512,
    passes: Annotated[int, typer.Option(help="Timed passes over the train set (after one "
                      "warm-up pass).", rich_help_panel=SYSTEM)] = 3,
    torchvision_batches: Annotated[int | None, typer.Option(help="Time the torchvision "
                                   "baseline over this many batches per pass instead of "
                                   "whole passes.", rich_help_panel=SYSTEM)] = None,
    jit_startup: Annotated[bool, typer.Option(help="Also time the fastcifar loader's first "
                           "batch in fresh processes, with a cold and a warm numba cache.",
                           rich_help_panel=SYSTEM)] = True,
    json_path: Annotated[Path | None, typer.Option("--json", help="Results file (default "
                         "benchmarks/results/loader-<UTC time>.json); a .md table goes beside "
                         "it.")
                         ] = None,
    compare_on_device: Annotated[bool, typer.Option(help="Time only fastcifar's FFCV loader "
                                 "(a copy per batch) against --data-on-device's resident data, "
                                 "both handing over normalised batches on --device.",
                                 rich_help_panel=SYSTEM)] = False,
    device: Annotated[Device, typer.Option(help="Where --compare-on-device hands over batches "
                      "(auto: CUDA, then MPS, then CPU).", rich_help_panel=SYSTEM)
                      ] = Device.auto,
    max_batches: Annotated[int | None, typer.Option(help="Time every pipeline over this many "
                           "batches per pass instead of whole passes.",
                           rich_help_panel=SYSTEM)] = None,
) -> None:
    """Train-set images/s: fastcifar's fused loader vs FFCV's built-in ops vs a torchvision
    DataLoader; or, with --compare-on-device, the FFCV path vs the device-resident one."""

    from fastcifar.benchmark.loader import benchmark_loader as run_benchmark
    from fastcifar.command_config import LoaderBenchmarkConfig

    json_path = json_path or default_loader_benchmark_path()
    config = run_command(LoaderBenchmarkConfig, data_dir=data, workers=workers,
                         batch_size=batch_size, passes=passes,
                         torchvision_batches=torchvision_batches, jit_startup=jit_startup,
                         json_path=json_path, command=shlex.join(["fastcifar", *sys.argv[1:]]),
                         compare_on_device=compare_on_device, device=device,
                         max_batches=max_batches)
    print_loader_benchmark(run_command(run_benchmark, config, show_pass), json_path)
