"""benchmark: the loader throughput report's shape on tiny data, and the CLI's wiring."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fastcifar.benchmark.time_to_accuracy import (
    TargetHit,
    benchmark_time_to_accuracy,
    first_hits,
    write_time_to_accuracy_markdown,
)
from fastcifar.checkpoint import load_checkpoint
from fastcifar.command_config import LoaderBenchmarkConfig, TimeToAccuracyConfig
from fastcifar.config import Device, LoaderConfig, OptimizerName, Precision, recipe
from fastcifar.errors import FastCifarError
from fastcifar.training import (
    EpochStats,
    Evaluation,
    TrainCallbacks,
    TrainingInterrupted,
    epoch_end_evaluations,
)
from fastcifar.weights_file import read_weights_file

PIPELINES = ["fastcifar", "ffcv_builtin", "torchvision_dataloader"]


@pytest.fixture(scope="module")
def loader_report(tiny_dataset, tmp_path_factory) -> tuple[dict, object]:
    """One real benchmark run: 1 pass, batches of 24 over the 120 tiny train images.

    One worker: numba builds FFCV's pipelines without parallel loops then, which halved this
    fixture (60.5 -> 30.2 s on a 2-core AVX2 EPYC, 2026-11-30); the report's shape is the same."""
    from fastcifar.benchmark.loader import benchmark_loader

    json_path = tmp_path_factory.mktemp("benchmark") / "loader.json"
    config = LoaderBenchmarkConfig(data_dir=tiny_dataset, workers=1, batch_size=24, passes=1,
                                   jit_startup=False, json_path=json_path, command="test")
    stages = set()
    report = benchmark_loader(config, lambda stage, done, total: stages.add((stage, done, total)))
    return report, json_path, stages


def test_benchmark_loader_json_has_the_documented_shape(loader_report):
    report, json_path, stages = loader_report
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(report, default=str))
    assert report["benchmark"] == "loader"
    assert report["machine"]["cpu_cores"] >= 1
    assert (report["workers"], report["batch_size"], report["passes"]) == (1, 24, 1)
    assert report["command"] == "test" and report["train_images"] == 120
    assert [row["name"] for row in report["results"]] == PIPELINES
    for row in report["results"]:
        # the rate is the timed pass's images over its seconds (the warm-up pass apart)
        assert row["images"] == 5 * 24  # drop_last: whole batches, counted at the consumer
        assert row["images_per_s"] == pytest.approx(row["images"] / row["seconds"])
        assert row["pass_images_per_s"] == [pytest.approx(row["images_per_s"])]
        assert 0 < row["first_batch_seconds"] <= row["warmup_pass_seconds"]
        # all three hand the consumer the same kind of batch: normalised float32 channels-last
        assert row["output"]["dtype"] == "torch.float32" and row["output"]["channels_last"]
        assert row["output"]["shape"] == [24, 3, 32, 32]
        assert abs(row["output"]["mean"]) < 0.5 and 0.5 < row["output"]["std"] < 1.5
    jit = {row["name"]: row["jit_seconds"] for row in report["results"]}
    assert jit["fastcifar"] > 0 and jit["ffcv_builtin"] > 0
    for row in report["results"][:2]:
        assert row["jit_seconds"] == row["build_seconds"] + row["first_batch_seconds"]
    assert jit["torchvision_dataloader"] is None
    assert set(report["results"][1]["lacks"]) == {"hue", "grayscale"}
    speed = {row["name"]: row["images_per_s"] for row in report["results"]}
    assert report["ratios"] == {
        "fastcifar_vs_ffcv_builtin": speed["fastcifar"] / speed["ffcv_builtin"],
        "fastcifar_vs_torchvision_dataloader": speed["fastcifar"]
        / speed["torchvision_dataloader"]}
    # progress between passes: warm-up + 1 timed pass per pipeline
    assert {("fastcifar", 2, 2), ("torchvision_dataloader", 0, 2)} <= stages
    table = json_path.with_suffix(".md").read_text()
    assert all(f"| {name} |" in table for name in PIPELINES)


class PacedLoader:
    """A loader of 5 batches of 24 that takes `batch_seconds` per batch, and `first_seconds`
    more for the very first batch it ever gives (a JIT compile)."""

    def __init__(self, batch_seconds: float, first_seconds: float) -> None:
        self.batch_seconds, self.first_seconds = batch_seconds, first_seconds

    def __iter__(self):
        for _ in range(5):
            time.sleep(self.batch_seconds + self.first_seconds)
            self.first_seconds = 0.0
            yield torch.zeros(24, 3, 32, 32), torch.zeros(24, dtype=torch.long)


def test_loader_timing_counts_timed_passes_at_their_real_rate():
    from fastcifar.benchmark.loader import _time_loader_passes

    progress = []
    row = _time_loader_passes("fastcifar", lambda: PacedLoader(0.1, 1.0),
                              lambda images, labels: (images, labels), passes=2,
                              batches_per_pass=5, max_batches=None, compiles=True,
                              progress=lambda *stage: progress.append(stage))
    # 24 images per 0.1 s: 240 images/s at most (a busy machine wakes sleepers late); with
    # the warm-up's slow first batch counted a pass would reach 120 / 1.5 s = 80 images/s
    assert row["images"] == 2 * 5 * 24
    assert 120 < row["images_per_s"] <= 240 and len(row["pass_images_per_s"]) == 2
    assert all(120 < rate <= 240 for rate in row["pass_images_per_s"])
    assert row["first_batch_seconds"] >= 1.1 and row["warmup_pass_seconds"] >= 1.5
    assert row["jit_seconds"] == row["build_seconds"] + row["first_batch_seconds"]
    assert progress == [("fastcifar", 0, 3), ("fastcifar", 1, 3), ("fastcifar", 2, 3),
                        ("fastcifar", 3, 3)]
    limited = _time_loader_passes("fastcifar", lambda: PacedLoader(0.01, 0.0),
                                  lambda images, labels: (images, labels), passes=1,
                                  batches_per_pass=5, max_batches=2, compiles=False,
                                  progress=None)
    assert limited["images"] == 2 * 24 and limited["jit_seconds"] is None
    assert limited["measured_over"] == "the first 2 batches of each pass"


def test_benchmark_loader_cli_builds_the_config(monkeypatch, tmp_path):
    import fastcifar.benchmark.loader
    from fastcifar.cli import app

    seen = {}

    def fake_benchmark(config, progress=None):
        seen["config"] = config
        return {"results": [{"name": name, "images_per_s": 1.0, "build_seconds": 0.1,
                             "first_batch_seconds": 0.5} for name in PIPELINES]}

    monkeypatch.setattr(fastcifar.benchmark.loader, "benchmark_loader", fake_benchmark)
    result = CliRunner().invoke(app, ["benchmark", "loader", "--data", str(tmp_path),
                                      "--workers", "3", "--batch-size", "64", "--passes", "2",
                                      "--no-jit-startup", "--json", str(tmp_path / "l.json")])
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert (config.data_dir, config.workers, config.batch_size, config.passes) == (
        tmp_path, 3, 64, 2)
    assert config.json_path == tmp_path / "l.json" and not config.jit_startup
    assert "torchvision_dataloader" in result.output


def test_benchmark_loader_cli_rejects_zero_passes(tmp_path):
    from fastcifar.cli import app

    result = CliRunner().invoke(app, ["benchmark", "loader", "--passes", "0",
                                      "--data", str(tmp_path)])
    assert result.exit_code == 1 and "passes must be >= 1" in result.output


def test_benchmark_loader_compares_the_ffcv_and_device_resident_paths(tiny_dataset, tmp_path,
                                                                       monkeypatch):
    import fastcifar.benchmark.loader
    from fastcifar.benchmark.loader import benchmark_loader
    from fastcifar.config import Device

    built = []  # the device-resident row must really time the device-resident loaders
    real_build = fastcifar.benchmark.loader.build_loaders

    def spy(config, *arguments, **keywords):
        built.append(config.on_device)
        return real_build(config, *arguments, **keywords)

    monkeypatch.setattr(fastcifar.benchmark.loader, "build_loaders", spy)
    json_path = tmp_path / "on-device.json"
    report = benchmark_loader(LoaderBenchmarkConfig(
        data_dir=tiny_dataset, workers=1, batch_size=24, passes=2, max_batches=4,
        compare_on_device=True, device=Device.cpu, json_path=json_path, command="test"))
    assert [row["name"] for row in report["results"]] == ["fastcifar", "fastcifar_on_device"]
    assert report["device"] == "cpu" and "jit_startup" not in report and built == [True]
    for row in report["results"]:
        assert row["images"] == 2 * 4 * 24  # 4 of the 5 batches, in each of 2 timed passes
        assert row["measured_over"] == "the first 4 batches of each pass"
        assert row["output"]["dtype"] == "torch.float32" and row["output"]["channels_last"]
        assert abs(row["output"]["mean"]) < 0.5 and 0.5 < row["output"]["std"] < 1.5
    speed = [row["images_per_s"] for row in report["results"]]
    assert report["ratios"] == {"on_device_vs_fastcifar": speed[1] / speed[0]}
    table = json_path.with_suffix(".md").read_text()
    assert "| fastcifar_on_device |" in table and "batches handed over on cpu" in table


def test_benchmark_loader_cli_passes_the_device_comparison(monkeypatch, tmp_path):
    import fastcifar.benchmark.loader
    from fastcifar.cli import app
    from fastcifar.config import Device

    seen = {}

    def fake_benchmark(config, progress=None):
        seen["config"] = config
        return {"results": []}

    monkeypatch.setattr(fastcifar.benchmark.loader, "benchmark_loader", fake_benchmark)
    result = CliRunner().invoke(app, ["benchmark", "loader", "--data", str(tmp_path),
                                      "--compare-on-device", "--device", "cpu",
                                      "--max-batches", "3", "--json", str(tmp_path / "l.json")])
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert (config.compare_on_device, config.device, config.max_batches) == (True, Device.cpu, 3)
    alone = CliRunner().invoke(app, ["benchmark", "loader", "--device", "cpu",
                                     "--data", str(tmp_path)])
    assert alone.exit_code == 1 and "--device is for --compare-on-device" in alone.output


# ---------------------------------------------------------------- time to accuracy


def tiny_time_to_accuracy(data_dir, tmp_path, **changes) -> TimeToAccuracyConfig:
    """The fast recipe scaled to the 3-class tiny data (batches of 24, fp32, no TTA), with a
    test pass every epoch (a CPU run's default is the last only)."""
    train_config = recipe("fast", epochs=6, max_lr=0.05, tta=False, make_plots=False,
                          loader=LoaderConfig(data_dir=data_dir, batch_size=24, workers=1),
                          precision=Precision.fp32, out_dir=tmp_path / "runs",
                          weights_dir=tmp_path / "weights", eval_from_epoch=1)
    return dataclasses.replace(TimeToAccuracyConfig(train=train_config, command="test",
                                                    json_path=tmp_path / "tta.json"), **changes)


def test_first_hits_sums_train_and_eval_time_up_to_the_first_epoch_at_target():
    history = [EpochStats(epoch, 0.1, 1.0, 0.5, 1.0, accuracy, 10.0 * epoch, 2.0, 100.0, 5 * epoch)
               for epoch, accuracy in ((1, 0.5), (2, 0.91), (3, 0.89), (4, 0.95))]
    hits = first_hits(epoch_end_evaluations(history), (0.9, 0.94, 0.99))
    assert hits["0.9"] == TargetHit(epochs=2, steps=10, seconds=34.0, train_seconds=30.0,
                                    eval_seconds=4.0)
    assert hits["0.94"] == TargetHit(epochs=4, steps=20, seconds=108.0, train_seconds=100.0,
                                     eval_seconds=8.0)
    assert hits["0.99"] is None


def test_first_hits_takes_the_first_evaluation_inside_an_epoch_at_target():
    evaluations = [Evaluation(1, 5, 1.0, 0.5, 10.0, 2.0), Evaluation(1.4, 7, 1.0, 0.92, 14.0, 4.0),
                   Evaluation(2, 10, 1.0, 0.91, 20.0, 6.0)]
    assert first_hits(evaluations, (0.9,))["0.9"] == TargetHit(
        epochs=1.4, steps=7, seconds=18.0, train_seconds=14.0, eval_seconds=4.0)


class ScriptedAccuracy:
    """Stands in for the train loop's `evaluate`: these accuracies in turn, the real timing."""

    def __init__(self, accuracies: list[float]) -> None:
        self.accuracies = list(accuracies)

    def __call__(self, model, loader, device_step, plan, tta, shifts=False) -> tuple[float, float]:
        time.sleep(0.01)  # an evaluation takes time on the clock
        return 1.0, self.accuracies.pop(0)


def test_evaluations_inside_the_last_epochs_time_the_target_between_epoch_ends(
        tiny_dataset, tmp_path, monkeypatch):
    import fastcifar.training

    # 5 steps per epoch; every 2 steps in the last 2 of 4 epochs: epochs 1, 2, 2.4, 2.8, 3, ...
    accuracies = [0.3, 0.5, 0.6, 0.95, 0.93, 0.96, 0.97, 0.98]
    monkeypatch.setattr(fastcifar.training, "evaluate_loader", ScriptedAccuracy(accuracies))
    base = tiny_time_to_accuracy(tiny_dataset, tmp_path, targets=(0.9,), stop_at_target=True)
    config = dataclasses.replace(base, train=dataclasses.replace(
        base.train, epochs=4, eval_every_steps=2, eval_steps_epochs=2))
    report = benchmark_time_to_accuracy(config)
    [run] = report["runs"]
    assert [row["epochs"] for row in run["evaluations"]] == pytest.approx([1, 2, 2.4, 2.8, 3])
    assert [row["steps"] for row in run["evaluations"]] == [5, 10, 12, 14, 15]
    assert run["epochs_run"] == 3  # the target, hit inside epoch 3, ends the run at its end
    hit, at_target = run["targets"]["0.9"], run["evaluations"][3]
    assert (hit["epochs"], hit["steps"]) == (pytest.approx(2.8), 14)
    assert (hit["train_seconds"], hit["eval_seconds"]) == (at_target["train_seconds"],
                                                           at_target["eval_seconds"])
    # the clock: training time excludes the evaluations, which land in their epoch's eval time
    last = run["evaluations"][-1]
    assert last["train_seconds"] == pytest.approx(sum(row["train_seconds"]
                                                      for row in run["per_epoch"]))
    assert last["eval_seconds"] == pytest.approx(sum(row["eval_seconds"]
                                                     for row in run["per_epoch"]))
    assert run["per_epoch"][2]["eval_seconds"] >= 3 * 0.01  # epoch 3 evaluated three times
    seconds = [(row["train_seconds"], row["eval_seconds"]) for row in run["evaluations"]]
    assert seconds == sorted(seconds)
    assert "| 2.8 ep, " in config.json_path.with_suffix(".md").read_text()
    # the best pass (0.95) fell inside epoch 3: its weights are the ones kept
    [best_weights] = (tmp_path / "weights").glob("*-best.safetensors")
    _, best = read_weights_file(best_weights)
    assert (best["accuracy"], best["epochs"], best["steps"]) == (0.95, pytest.approx(2.8), 14)


@torch.no_grad()
def saved_weights_accuracy(checkpoint: Path, data_dir: Path, tta: bool) -> float:
    """Test accuracy of a checkpoint's weights, computed directly (mirror logits averaged
    when `tta`), not through the library's evaluation."""
    from fastcifar.data.loaders import make_loader, read_metadata
    from fastcifar.data.loaders import test_pipeline as unaugmented_pipeline
    from fastcifar.device import DeviceStep
    from fastcifar.evaluation import model_from_weights

    metadata = read_metadata(data_dir)
    cpu = torch.device("cpu")
    model = model_from_weights({**load_checkpoint(checkpoint),
                                "class_names": metadata.class_names}, cpu, True)
    loader = make_loader(metadata.test_path, unaugmented_pipeline(),
                         LoaderConfig(data_dir=data_dir, batch_size=60, workers=1),
                         train=False, subset=None, seed=0)
    step = DeviceStep(metadata.mean, metadata.std, cpu, True)
    correct = 0
    for images, labels in loader:
        images, labels = step(images, labels)
        logits = model(images)
        if tta:
            logits = (logits + model(torch.flip(images, dims=[3]))) / 2
        correct += int((logits.argmax(1) == labels).sum())
    return correct / metadata.test_count


def test_time_to_accuracy_stops_at_the_target_and_reports_split_times(tiny_dataset, tmp_path,
                                                                     monkeypatch):
    import fastcifar.benchmark.time_to_accuracy
    import fastcifar.evaluation

    final_passes = []  # (tta, batches, accuracy) of the benchmark's own test passes

    def recording_evaluate(model, loader, device_step, plan, tta, shifts=False):
        loss, accuracy = fastcifar.evaluation.evaluate_loader(model, loader, device_step, plan, tta)
        final_passes.append((tta, len(loader), accuracy))
        return loss, accuracy

    monkeypatch.setattr(fastcifar.benchmark.time_to_accuracy, "evaluate_loader",
                        recording_evaluate)
    config = tiny_time_to_accuracy(tiny_dataset, tmp_path, targets=(0.6,), stop_at_target=True)
    report = benchmark_time_to_accuracy(config)
    assert json.loads(config.json_path.read_text()) == json.loads(json.dumps(report))
    assert (report["benchmark"], report["recipe"], report["epochs"]) == ("time_to_accuracy",
                                                                         "fast", 6)
    assert report["device"] == "cpu" and report["train_subset"] is None
    assert report["command"] == "test" and report["machine"]["cpu_cores"] >= 1
    [run] = report["runs"]
    hit = run["targets"]["0.6"]
    assert run["seed"] == 0 and hit is not None
    # the run ended at the evaluation that first reached the target, before its budget
    assert run["epochs_run"] == hit["epochs"] < 6
    accuracies = [row["test_accuracy"] for row in run["per_epoch"]]
    assert accuracies[-1] >= 0.6 and all(accuracy < 0.6 for accuracy in accuracies[:-1])
    assert hit["steps"] == run["per_epoch"][-1]["steps"] == 5 * hit["epochs"]  # 120 / 24
    assert hit["train_seconds"] > 0 and hit["eval_seconds"] > 0 and run["warmup_seconds"] > 0
    assert hit["seconds"] == pytest.approx(hit["train_seconds"] + hit["eval_seconds"])
    assert hit["train_seconds"] == pytest.approx(sum(row["train_seconds"]
                                                     for row in run["per_epoch"]))
    # the final accuracies are those of the run's last weights on the whole test set (3
    # batches), without and with flip TTA, as scored here on their own
    checkpoint = Path(run["run_dir"]) / "last.pt"
    no_tta = saved_weights_accuracy(checkpoint, tiny_dataset, False)
    tta = saved_weights_accuracy(checkpoint, tiny_dataset, True)
    assert final_passes == [(False, 3, no_tta), (True, 3, tta)]
    assert (run["final_accuracy_no_tta"], run["final_accuracy_tta"]) == (no_tta, tta)
    assert run["final_accuracy_no_tta"] == run["final_accuracy"]  # trained without TTA
    assert report["median"]["6"]["0.6"]["reached"] == "1/1"
    assert run["budget_epochs"] == 6
    table = config.json_path.with_suffix(".md").read_text()
    assert "| to 60% |" in table and f"| 6 | 0 | {run['epochs_run']} | {hit['epochs']} ep, " in table


def test_time_to_accuracy_reports_a_missed_target_as_null_over_several_seeds(tiny_dataset,
                                                                            tmp_path):
    base = tiny_time_to_accuracy(tiny_dataset, tmp_path)
    # an LR too small to learn anything in one epoch: both targets stay out of reach
    untrained = dataclasses.replace(base.train, epochs=1, max_lr=1e-7, min_lr=1e-8, seed=3)
    config = dataclasses.replace(base, targets=(0.5, 1.0), runs=2, train=untrained)
    report = benchmark_time_to_accuracy(config)
    assert [run["seed"] for run in report["runs"]] == [3, 4]
    assert all(run["epochs_run"] == 1 and run["final_accuracy"] < 0.5 for run in report["runs"])
    assert all(run["targets"] == {"0.5": None, "1.0": None} for run in report["runs"])
    assert report["median"]["1"]["1.0"] == {"seconds": None, "epochs": None, "reached": "0/2"}
    saved = json.loads(config.json_path.read_text())
    assert saved["runs"][0]["targets"]["0.5"] is None  # null in the JSON
    table = config.json_path.with_suffix(".md").read_text()
    assert table.count("not reached") == 2 * 2 + 2  # two runs and the median row, two targets


def small_report(first_passes: list[float] | None) -> dict:
    """A time-to-accuracy report of one run per first-pass epoch, as the benchmark writes it
    (cut to what the table reads); None: an older report without "evaluations"."""
    hit = {"epochs": 5, "steps": 485, "seconds": 100.0, "train_seconds": 90.0,
           "eval_seconds": 10.0}
    runs = [{"seed": seed, "budget_epochs": 6, "epochs_run": 6, "targets": {"0.9": hit},
             "warmup_seconds": 1.0, "final_accuracy": 0.91, "final_accuracy_no_tta": 0.9,
             "final_accuracy_tta": 0.905}
            for seed in range(len(first_passes or [1]))]
    for run, first in zip(runs, first_passes or [], strict=False):
        run["evaluations"] = [{"epochs": epoch} for epoch in (first, 6)]
    return {"machine": {"cpu": "cpu", "cpu_cores": 2},
            "config": {"precision": "bf16", "loader": {"batch_size": 512}}, "targets": [0.9],
            "recipe": "express-muon", "command": "c", "device": "cpu", "data": "d",
            "commit": "abc", "runs": runs,
            "median": {"6": {"final_accuracy": 0.91,
                             "0.9": {"seconds": 100.0, "epochs": 5, "reached": "1/1"}}}}


@pytest.mark.parametrize(("first_passes", "note"), [
    (None, None), ([1, 0.5], None),
    ([5, 1], "First test pass: seed 0 (6-epoch budget) at epoch 5. A target"),
    ([1, 2.5], "First test pass: seed 1 (6-epoch budget) at epoch 2.5. A target")])
def test_time_to_accuracy_table_says_when_early_epochs_had_no_test_pass(tmp_path, capsys,
                                                                        first_passes, note):
    from fastcifar.progress import print_time_to_accuracy

    path = tmp_path / "report.md"
    write_time_to_accuracy_markdown(path, small_report(first_passes))
    table = path.read_text()
    assert "| 6 | 0 | 6 | 5 ep, 100.0 s (90.0 + 10.0) |" in table
    assert ("upper bounds" in table) == (note is not None)
    assert note is None or note in table
    # The terminal says it too: a CPU run scores only its last epoch unless told otherwise
    print_time_to_accuracy(small_report(first_passes), path.with_suffix(".json"))
    printed = capsys.readouterr().out
    assert printed.startswith("6 epochs: median final_accuracy: 0.91")
    assert ("upper bounds" in printed) == (note is not None)
    assert note is None or note in printed


def test_shortest_budget_mode_stops_at_the_first_budget_that_reaches_the_target(tiny_dataset,
                                                                               tmp_path):
    config = tiny_time_to_accuracy(tiny_dataset, tmp_path, targets=(0.6,), budgets=(1, 4, 5))
    report = benchmark_time_to_accuracy(config)
    budgets_run = [run["epochs_run"] for run in report["runs"]]
    finals = {run["epochs_run"]: run["final_accuracy"] for run in report["runs"]}
    shortest = report["shortest_budget_epochs"]
    assert shortest in (1, 4) and budgets_run[-1] == shortest and 5 not in budgets_run
    assert finals[shortest] >= 0.6
    assert all(finals[budget] < 0.6 for budget in budgets_run[:-1])
    assert f"reaches 60%: {shortest} epochs" in config.json_path.with_suffix(".md").read_text()


def test_time_to_accuracy_cli_takes_every_train_option(monkeypatch, tmp_path):
    import fastcifar.benchmark.time_to_accuracy
    from fastcifar.cli import app

    seen = {}

    def fake_benchmark(config, callbacks=None):
        seen["config"] = config
        return {"median": {}}

    monkeypatch.setattr(fastcifar.benchmark.time_to_accuracy, "benchmark_time_to_accuracy",
                        fake_benchmark)
    arguments = [
        "benchmark", "time-to-accuracy", "--recipe", "seed", "--epochs", "8", "--runs", "3",
        "--target", "0.9", "--target", "0.94", "--budget", "8", "--budget", "12", "--seed", "5",
        "--batch-size", "256", "--max-lr", "0.002", "--pct-start", "0.3", "--logit-scale",
        "0.5", "--bn-momentum", "0.2", "--whiten-init", "--zero-init-residual", "--ema", "0.99",
        "--label-smoothing", "0.1", "--cutout", "0", "--no-tta", "--precision", "fp32",
        "--eval-every-steps", "20", "--eval-steps-epochs", "2", "--optimizer", "sgd",
        "--muon-lr", "0.3", "--muon-momentum", "0.8", "--muon-normalize-filters",
        "--device", "cpu", "--data", str(tmp_path), "--out", str(tmp_path / "runs"),
        "--json", str(tmp_path / "t.json")]
    monkeypatch.setattr(sys, "argv", ["fastcifar", *arguments])  # as a shell would run it
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    config = seen["config"]
    train_config = config.train
    assert (config.targets, config.runs, config.budgets) == ((0.9, 0.94), 3, (8, 12))
    assert (train_config.recipe, train_config.epochs, train_config.seed) == ("seed", 8, 5)
    assert train_config.optimizer == OptimizerName.sgd  # Muon pairs with SGD
    assert (train_config.muon_lr, train_config.muon_momentum) == (0.3, 0.8)
    assert train_config.muon_normalize_filters
    assert (train_config.loader.batch_size, train_config.max_lr, train_config.pct_start) == (
        256, 0.002, 0.3)
    assert (train_config.logit_scale, train_config.bn_momentum, train_config.ema_decay) == (
        0.5, 0.2, 0.99)
    assert train_config.whiten_init and train_config.zero_init_residual
    assert train_config.label_smoothing == 0.1 and not train_config.tta
    assert (train_config.eval_every_steps, train_config.eval_steps_epochs) == (20, 2)
    assert train_config.augment.cutout_size == 0 and train_config.augment.p_gray == 0.1
    assert train_config.weights_dir == tmp_path / "runs" / "weights"
    assert not train_config.make_plots and config.json_path == tmp_path / "t.json"
    assert config.command == shlex.join(["fastcifar", *arguments])  # rerunnable as recorded


def test_default_time_to_accuracy_file_names_what_ran_and_never_repeats(monkeypatch):
    import fastcifar.benchmark.commands
    from fastcifar.benchmark.commands import default_time_to_accuracy_path

    monkeypatch.setattr(fastcifar.benchmark.commands, "_cuda_available", lambda: False)
    config = dataclasses.replace(recipe("express-muon"), epochs=6, device=Device.auto)
    first = default_time_to_accuracy_path(config)
    assert first.parent == Path("benchmarks/results")
    assert first.name.startswith("time-to-accuracy-express-muon-6ep-cpu-")
    time.sleep(1.1)
    assert default_time_to_accuracy_path(config) != first
    monkeypatch.setattr(fastcifar.benchmark.commands, "_cuda_available", lambda: True)
    assert "-6ep-cuda-" in default_time_to_accuracy_path(config).name


def test_train_cli_passes_its_own_options_and_the_shared_ones(monkeypatch, tmp_path):
    import fastcifar.training
    from fastcifar.cli import app

    seen = {}

    def fake_train(config, callbacks=None):
        seen["config"] = config
        raise FastCifarError("stopped by the test")

    monkeypatch.setattr(fastcifar.training, "train", fake_train)
    result = CliRunner().invoke(app, [
        "train", "--recipe", "fast", "--epochs", "3", "--weights", str(tmp_path / "w"),
        "--stop-at-accuracy", "0.9", "--whiten-init", "--max-lr", "0.1", "--data", str(tmp_path)])
    assert result.exit_code == 1 and "stopped by the test" in result.output
    config = seen["config"]
    assert (config.recipe, config.epochs, config.max_lr, config.stop_at_accuracy) == (
        "fast", 3, 0.1, 0.9)
    assert config.weights_dir == tmp_path / "w" and config.whiten_init and config.resume is None


class SignalAtStep(TrainCallbacks):
    """Sends this process `signal_number` at one step, as Ctrl-C or `kill` would."""

    def __init__(self, epoch: int, step: int, signal_number: int) -> None:
        self.epoch, self.step, self.signal_number = epoch, step, signal_number

    def on_step(self, epoch: int, step: int, steps_per_epoch: int) -> None:
        if (epoch, step) == (self.epoch, self.step):
            os.kill(os.getpid(), self.signal_number)


class JumpingClock:
    """The train loop's `time`, with a clock that can jump ahead (a long sitting, quickly)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def perf_counter(self) -> float:
        return time.perf_counter() + self.offset

    def __getattr__(self, name: str):
        return getattr(time, name)


class SignalAfterAnHour(SignalAtStep):
    """At its step, the clock jumps an hour ahead, then the signal comes."""

    def __init__(self, epoch: int, step: int, signal_number: int, clock: JumpingClock) -> None:
        super().__init__(epoch, step, signal_number)
        self.clock = clock

    def on_step(self, epoch: int, step: int, steps_per_epoch: int) -> None:
        if (epoch, step) == (self.epoch, self.step):
            self.clock.offset += 3600.0
        super().on_step(epoch, step, steps_per_epoch)


def test_interrupted_time_to_accuracy_run_resumes_with_its_earlier_epochs(tiny_dataset, tmp_path,
                                                                         monkeypatch):
    import fastcifar.epoch_state
    import fastcifar.training

    clock = JumpingClock()
    monkeypatch.setattr(fastcifar.training, "time", clock)
    monkeypatch.setattr(fastcifar.epoch_state, "time", clock)  # the epoch's clock reads it
    base = tiny_time_to_accuracy(tiny_dataset, tmp_path)
    config = dataclasses.replace(base, targets=(0.3,),  # chance is 1/3: reached once trained
                                 train=dataclasses.replace(base.train, epochs=3))
    with pytest.raises(TrainingInterrupted) as interrupted:
        benchmark_time_to_accuracy(config, SignalAfterAnHour(2, 2, signal.SIGINT, clock))
    assert not config.json_path.exists()  # no results file for a run that did not finish
    checkpoint = interrupted.value.checkpoint
    saved = load_checkpoint(checkpoint)
    report = benchmark_time_to_accuracy(dataclasses.replace(config, resume=checkpoint))
    [run] = report["runs"]
    assert run["resumed_from"] == str(checkpoint) and run["run_dir"] == str(checkpoint.parent)
    assert [row["epoch"] for row in run["per_epoch"]] == [1, 2, 3]
    assert run["per_epoch"][0] == saved["history"][0]  # the epoch before the interrupt, kept
    # epoch 2's time holds the hour before the interrupt as well as the steps after it
    assert saved["partial"]["train_seconds"] >= 3600
    assert run["per_epoch"][1]["train_seconds"] > saved["partial"]["train_seconds"]
    assert run["per_epoch"][2]["train_seconds"] < 3600  # the jump counts once, where it happened
    hit = run["targets"]["0.3"]
    assert hit["train_seconds"] == pytest.approx(sum(
        row["train_seconds"] for row in run["per_epoch"][:int(hit["epochs"])]))
    assert "| 3 | 0 (resumed) | 3 |" in config.json_path.with_suffix(".md").read_text()


@pytest.mark.parametrize(("stop_step", "before_stop"), [(3, [1, 1.4]), (2, [1])])
def test_evaluations_inside_an_interrupted_epoch_are_kept_on_resume(tiny_dataset, tmp_path,
                                                                   monkeypatch, stop_step,
                                                                   before_stop):
    import fastcifar.training

    # epochs 1, 1.4, 1.8, 2, with the interrupt at epoch 2's step 3 (after the 1.4 pass) or at
    # its step 2 (before the 1.4 pass, which the resumed sitting then makes)
    scripted = ScriptedAccuracy([0.5, 0.6, 0.8, 0.7])
    monkeypatch.setattr(fastcifar.training, "evaluate_loader", scripted)
    base = tiny_time_to_accuracy(tiny_dataset, tmp_path, targets=(0.75,))
    config = dataclasses.replace(base, train=dataclasses.replace(base.train, epochs=2,
                                                                 eval_every_steps=2))
    with pytest.raises(TrainingInterrupted) as interrupted:
        benchmark_time_to_accuracy(config, SignalAtStep(2, stop_step, signal.SIGINT))
    saved = load_checkpoint(interrupted.value.checkpoint)
    assert saved["partial"]["step"] == stop_step
    assert [row["epochs"] for row in saved["evaluations"]] == pytest.approx(before_stop)
    assert (saved["partial"]["eval_seconds"] >= 0.01) == (len(before_stop) == 2)
    assert saved["warmup_seconds"] > 0
    # an earlier sitting's warm-up, made long enough that only carrying it can explain it
    torch.save({**saved, "warmup_seconds": 1000.0}, interrupted.value.checkpoint)
    report = benchmark_time_to_accuracy(dataclasses.replace(
        config, resume=interrupted.value.checkpoint))
    [run] = report["runs"]
    assert [row["epochs"] for row in run["evaluations"]] == pytest.approx([1, 1.4, 1.8, 2])
    assert run["per_epoch"][1]["eval_seconds"] >= 3 * 0.01  # the one before the stop counts
    assert run["targets"]["0.75"]["epochs"] == pytest.approx(1.8)
    # both sittings compiled the loader pipeline: their warm-ups add up
    assert run["warmup_seconds"] > 1000


def test_resume_never_replaces_best_weights_saved_after_its_checkpoint(tiny_dataset, tmp_path,
                                                                       monkeypatch):
    import fastcifar.training

    # epochs 1, 1.4 (best) | interrupt | 1.8, 2: both later passes are worse than 1.4's
    monkeypatch.setattr(fastcifar.training, "evaluate_loader", ScriptedAccuracy([0.5, 0.6, 0.55, 0.58]))
    base = tiny_time_to_accuracy(tiny_dataset, tmp_path)
    config = dataclasses.replace(base, train=dataclasses.replace(base.train, epochs=2,
                                                                 eval_every_steps=2))
    with pytest.raises(TrainingInterrupted) as interrupted:
        benchmark_time_to_accuracy(config, SignalAtStep(2, 3, signal.SIGINT))
    # a hard crash would leave an older checkpoint, whose best is the epoch-1 pass
    saved = load_checkpoint(interrupted.value.checkpoint)
    torch.save({**saved, "best_accuracy": 0.5}, interrupted.value.checkpoint)
    benchmark_time_to_accuracy(dataclasses.replace(config, resume=interrupted.value.checkpoint))
    [best_weights] = (tmp_path / "weights").glob("*-best.safetensors")
    _, best = read_weights_file(best_weights)
    assert (best["accuracy"], best["epochs"]) == (0.6, pytest.approx(1.4))


def test_a_resume_into_another_weights_folder_names_no_best_file_it_lacks(tiny_dataset, tmp_path,
                                                                         monkeypatch):
    import fastcifar.training

    # epoch 1: 0.6, the best, saved in weights/ | interrupted in epoch 2 | epoch 2: 0.5
    monkeypatch.setattr(fastcifar.training, "evaluate_loader", ScriptedAccuracy([0.6, 0.5]))
    config = dataclasses.replace(tiny_time_to_accuracy(tiny_dataset, tmp_path).train, epochs=2)
    with pytest.raises(TrainingInterrupted) as interrupted:
        fastcifar.training.train(config, SignalAtStep(2, 2, signal.SIGINT))
    result = fastcifar.training.train(dataclasses.replace(
        config, resume=interrupted.value.checkpoint, weights_dir=tmp_path / "other"))
    assert result.best_accuracy == 0.6 and result.best_weights is None  # other/...-best before
    assert result.final_weights.parent == tmp_path / "other" and result.final_weights.is_file()


def test_evaluating_every_epoch_length_or_more_steps_is_refused(tiny_dataset, tmp_path):
    base = tiny_time_to_accuracy(tiny_dataset, tmp_path)  # 5 steps per epoch
    config = dataclasses.replace(base, train=dataclasses.replace(base.train, eval_every_steps=5))
    with pytest.raises(FastCifarError, match="--eval-every-steps 5 is not below the 5 steps"):
        benchmark_time_to_accuracy(config)


def test_interrupting_one_of_several_runs_says_how_to_finish_it_alone(tiny_dataset, tmp_path):
    base = tiny_time_to_accuracy(tiny_dataset, tmp_path)
    config = dataclasses.replace(base, runs=2,
                                 train=dataclasses.replace(base.train, epochs=2, seed=7))
    with pytest.raises(TrainingInterrupted) as interrupted:
        benchmark_time_to_accuracy(config, SignalAtStep(1, 2, signal.SIGTERM))
    assert interrupted.value.exit_code == 143
    assert (f"--runs 1 --seed 7 --epochs 2 --resume {interrupted.value.checkpoint}"
            in str(interrupted.value))


@pytest.mark.parametrize("command", [["loader"], ["time-to-accuracy"]])
def test_a_results_file_its_own_markdown_table_would_replace_is_refused(tmp_path, command):
    # The JSON was written, then overwritten by the table: "results: x.md and x.md".
    from fastcifar.cli import app

    result = CliRunner().invoke(app, ["benchmark", *command, "--json", str(tmp_path / "x.MD"),
                                      "--data", str(tmp_path)])
    assert result.exit_code == 1 and "would replace it" in result.output, result.output
    assert not list(tmp_path.iterdir())


def test_time_to_accuracy_resume_is_for_one_run(tmp_path):
    from fastcifar.cli import app

    result = CliRunner().invoke(app, ["benchmark", "time-to-accuracy", "--runs", "2",
                                      "--resume", str(tmp_path / "last.pt"),
                                      "--data", str(tmp_path)])
    assert result.exit_code == 1 and "--resume continues one run" in result.output


@pytest.mark.parametrize("arguments, message", [
    (["--max-lr", "fast"], "--max-lr takes a number or 'auto'"),
    (["--max-lr", "auto", "--resume", "runs/x/last.pt"], "--max-lr auto with --resume"),
    (["--eval-every-steps", "-1"], "eval-every-steps must be >= 0"),
    (["--eval-steps-epochs", "0"], "eval-steps-epochs must be >= 1"),
    (["--pct-start", "0.6"], "pct_start must be in (0, 0.5], got 0.6"),
    (["--batch-size", "0"], "batch size must be positive, got 0"),  # not the default 512
    (["--seed", "-1"], "--seed must be in 0..4294967295, got -1"),  # numpy raised
    (["--no-augment", "--cutout", "4", "--hue", "0.1"],
     "--no-augment turns all augmentation off: drop it or --cutout, --hue"),
])
def test_train_options_reject_bad_values(tmp_path, arguments, message):
    from fastcifar.cli import app

    for command in (["train"], ["benchmark", "time-to-accuracy"]):
        result = CliRunner().invoke(app, [*command, *arguments, "--data", str(tmp_path)])
        assert result.exit_code == 1 and message in result.output, result.output


def test_every_flag_names_one_option_per_command():
    import typer.main

    from fastcifar.cli import app

    commands = typer.main.get_command(app).commands
    for command in (commands["train"], commands["benchmark"].commands["time-to-accuracy"]):
        flags = [flag for parameter in command.params
                 for flag in (*parameter.opts, *parameter.secondary_opts)]
        assert len(flags) == len(set(flags)), sorted(flag for flag in flags
                                                     if flags.count(flag) > 1)
        assert {"--whiten-init", "--recipe", "--seed", "--data"} <= set(flags)


def test_time_to_accuracy_resume_auto_takes_the_newest_checkpoint_under_out(tmp_path,
                                                                         monkeypatch):
    # As train's --resume auto: the newest run folder's last.pt under --out.
    import fastcifar.benchmark.time_to_accuracy
    from fastcifar.cli import app

    for age, run in ((100, "older"), (10, "newer")):
        checkpoint = tmp_path / "runs" / run / "last.pt"
        checkpoint.parent.mkdir(parents=True)
        checkpoint.write_bytes(b"")
        os.utime(checkpoint, (time.time() - age, time.time() - age))
    resumed = []
    monkeypatch.setattr(fastcifar.benchmark.time_to_accuracy, "benchmark_time_to_accuracy",
                        lambda config, callbacks: resumed.append(config.resume))
    monkeypatch.setattr("fastcifar.benchmark.commands.print_time_to_accuracy", lambda *a: None)
    arguments = ["benchmark", "time-to-accuracy", "--resume", "auto", "--data", str(tmp_path),
                 "--json", str(tmp_path / "r.json")]
    result = CliRunner().invoke(app, [*arguments, "--out", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert resumed == [tmp_path / "runs" / "newer" / "last.pt"]
    empty = CliRunner().invoke(app, [*arguments, "--out", str(tmp_path / "none")])
    assert empty.exit_code == 1 and "--resume auto: no checkpoint" in empty.output
