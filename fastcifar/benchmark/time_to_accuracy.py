"""`fastcifar benchmark time-to-accuracy`: seeded runs of a recipe, epochs and seconds to each
target accuracy, a JSON report and a markdown table beside it."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from fastcifar.atomic import atomic_path, check_can_write, file_set, write_json
from fastcifar.checkpoint import machine_description, run_record
from fastcifar.command_config import TimeToAccuracyConfig
from fastcifar.config import TrainConfig
from fastcifar.data.loaders import (
    build_loaders,
)
from fastcifar.device import DeviceStep, measures_precision, plan_precision, select_device
from fastcifar.evaluation import evaluate_loader
from fastcifar.records import Evaluation
from fastcifar.training import TrainCallbacks, TrainingInterrupted, train


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
    device = select_device(train_config.device, train_config.local_rank)
    loaders = build_loaders(train_config.loader, train_config.augment, train_config.seed,
                            device=device)
    stop_at = max(config.targets) if config.stop_at_target else None
    result = train(dataclasses.replace(train_config, stop_at_accuracy=stop_at, make_plots=False,
                                       resume=config.resume), callbacks, loaders=loaders)
    plan = result.plan  # auto on the CPU: what the run measured as faster
    step = DeviceStep(loaders.metadata.mean, loaders.metadata.std, device,
                      train_config.channels_last)
    final = {}
    for tta in (False, True):
        final[tta] = evaluate_loader(result.final_model, loaders.test, step, plan, tta)[1]
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
    if config.json_path is not None:  # before hours of training, not after
        check_can_write(config.json_path, Path(config.json_path).with_suffix(".md"))
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
        with file_set():  # the JSON and its table: both new or neither
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


def _format_passes(run: dict) -> str:
    """How many test passes a run made and their seconds in all (older reports: '?')."""
    evaluations = run.get("evaluations")
    if not evaluations:
        return "?"
    seconds = evaluations[-1].get("eval_seconds")
    return str(len(evaluations)) + ("" if seconds is None else f", {seconds:,.1f}")


def scoring_gap_note(runs: list[dict]) -> str | None:
    """A sentence naming the runs whose first test pass came after epoch 1 (`--eval-from-epoch`,
    or a CPU run's default): a target they first met there may have been met earlier, so those
    figures are upper bounds. None when every run scored from epoch 1."""
    late = [f"seed {run['seed']} ({run.get('budget_epochs', run['epochs_run'])}-epoch budget) "
            f"at epoch {round(run['evaluations'][0]['epochs'], 2):g}"
            for run in runs if run.get("evaluations") and run["evaluations"][0]["epochs"] > 1]
    if not late:  # older reports lack "evaluations": they scored every epoch
        return None
    return (f"First test pass: {'; '.join(late)}. A target first met at that pass may have been "
            "met earlier, so read its epochs and seconds as upper bounds.")


def _paragraph(text: str | None) -> list[str]:
    """`text` as a Markdown paragraph's lines (none for None)."""
    return [] if text is None else [text, ""]


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
             "apart.", "", *_paragraph(scoring_gap_note(report["runs"])),
             "| budget (epochs) | seed | epochs run | " + " | ".join(
                 f"to {_percent(target)}" for target in targets)
             + " | test passes (s) | warm-up (s) | final acc | no TTA | flip TTA |",
             "|---:|---:|---:|" + "---|" * len(targets) + "---:|---:|---:|---:|---:|"]
    for run in report["runs"]:
        # older reports lack the key; their runs never stopped early, so epochs run = budget
        budget = run.get("budget_epochs", run["epochs_run"])
        seed = f"{run['seed']} (resumed)" if run.get("resumed_from") else run["seed"]
        lines.append(f"| {budget} | {seed} | {run['epochs_run']} | "
                     + " | ".join(_format_hit(run["targets"][target]) for target in targets)
                     + f" | {_format_passes(run)} | {run['warmup_seconds']:.1f} | "
                     f"{run['final_accuracy']:.2%} | "
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


