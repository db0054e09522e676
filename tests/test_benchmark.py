"""benchmark: the loader throughput report's shape on tiny data, and the CLI's wiring."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fastcifar.config import LoaderBenchmarkConfig

PIPELINES = ["fastcifar", "ffcv_builtin", "torchvision_dataloader"]


@pytest.fixture(scope="module")
def loader_report(tiny_dataset, tmp_path_factory) -> tuple[dict, object]:
    """One real benchmark run: 1 pass, batches of 24 over the 120 tiny train images."""
    from fastcifar.benchmark import benchmark_loader

    json_path = tmp_path_factory.mktemp("benchmark") / "loader.json"
    config = LoaderBenchmarkConfig(data_dir=tiny_dataset, workers=2, batch_size=24, passes=1,
                                   jit_startup=False, json_path=json_path, command="test")
    stages = set()
    report = benchmark_loader(config, lambda stage, done, total: stages.add((stage, done, total)))
    return report, json_path, stages


def test_benchmark_loader_json_has_the_documented_shape(loader_report):
    report, json_path, stages = loader_report
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(report, default=str))
    assert report["benchmark"] == "loader"
    assert report["machine"]["cpu_cores"] >= 1
    assert (report["workers"], report["batch_size"], report["passes"]) == (2, 24, 1)
    assert report["command"] == "test" and report["train_images"] == 120
    assert [row["name"] for row in report["results"]] == PIPELINES
    for row in report["results"]:
        assert row["images_per_s"] > 0 and row["first_batch_seconds"] > 0
        assert row["images"] == 5 * 24  # drop_last: whole batches, counted at the consumer
        assert len(row["pass_images_per_s"]) == 1 and row["pass_images_per_s"][0] > 0
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
    assert report["ratios"]["fastcifar_vs_ffcv_builtin"] > 0
    assert report["ratios"]["fastcifar_vs_torchvision_dataloader"] > 0
    # progress between passes: warm-up + 1 timed pass per pipeline
    assert {("fastcifar", 2, 2), ("torchvision_dataloader", 0, 2)} <= stages
    table = json_path.with_suffix(".md").read_text()
    assert all(f"| {name} |" in table for name in PIPELINES)


def test_benchmark_loader_cli_builds_the_config(monkeypatch, tmp_path):
    import fastcifar.benchmark
    from fastcifar.cli import app

    seen = {}

    def fake_benchmark(config, progress=None):
        seen["config"] = config
        return {"results": [{"name": name, "images_per_s": 1.0, "build_seconds": 0.1,
                             "first_batch_seconds": 0.5} for name in PIPELINES]}

    monkeypatch.setattr(fastcifar.benchmark, "benchmark_loader", fake_benchmark)
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
