"""TensorBoard event files and metrics.csv: read back and checked against metrics.json."""

from __future__ import annotations

import csv
import json

import pytest

from fastcifar.config import AugmentConfig, LoaderConfig, Precision, recipe
from fastcifar.training import train

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def logged_config(data_dir, tmp_path, **changes):
    """fast with Muon on the filters (so every kind of parameter group logs its LR), a
    held-out split and a test pass after each of 2 epochs."""
    return recipe("fast", epochs=2, max_lr=0.05, muon_lr=0.05, tta=False, make_plots=False,
                  loader=LoaderConfig(data_dir=data_dir, batch_size=24, workers=1, holdout=24),
                  augment=AugmentConfig(cutout_size=4), precision=Precision.fp32,
                  out_dir=tmp_path / "runs", weights_dir=tmp_path / "weights",
                  eval_from_epoch=1, **changes)


def test_event_files_hold_what_metrics_json_records(tiny_dataset, tmp_path):
    result = train(logged_config(tiny_dataset, tmp_path))
    events = EventAccumulator(str(result.run_dir))
    events.Reload()
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    steps_per_epoch = metrics["epochs"][0]["steps"]
    losses = events.Scalars("train/loss")
    assert [event.step for event in losses] == list(range(1, 2 * steps_per_epoch + 1))
    for epoch, row in enumerate(metrics["epochs"]):  # equal batches: the epoch's loss is the mean
        chunk = losses[epoch * steps_per_epoch:(epoch + 1) * steps_per_epoch]
        assert sum(event.value for event in chunk) / len(chunk) == pytest.approx(
            row["train_loss"], rel=1e-5)
    tested = events.Scalars("test/accuracy")
    assert [(event.step, event.value) for event in tested] == [
        (evaluation["steps"], pytest.approx(evaluation["test_accuracy"], abs=1e-6))
        for evaluation in metrics["evaluations"]]
    assert [event.value for event in events.Scalars("test/loss")] == pytest.approx(
        [evaluation["test_loss"] for evaluation in metrics["evaluations"]], rel=1e-6)
    assert [event.value for event in events.Scalars("holdout/accuracy")] == pytest.approx(
        [evaluation["holdout_accuracy"] for evaluation in metrics["evaluations"]], abs=1e-6)
    lrs = events.Scalars("lr/sgd/weights")
    assert [event.value for event in lrs] == pytest.approx(result.lr_per_step, rel=1e-6)
    muon = [event.value for event in events.Scalars("lr/muon/filters")]
    assert len(muon) == len(lrs) and max(muon) == pytest.approx(0.05, rel=1e-6)
    rates = [event.value for event in events.Scalars("train/images_per_second")]
    assert len(rates) >= len(lrs) - 2 and min(rates) > 0
    assert "config/text_summary" in events.Tags()["tensors"]


def test_metrics_csv_has_the_rows_of_metrics_json(tiny_dataset, tmp_path):
    result = train(logged_config(tiny_dataset, tmp_path, tensorboard=False))
    assert not list(result.run_dir.glob("events.out.tfevents.*"))  # --no-tensorboard
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    with open(result.run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(metrics["epochs"]) == 2
    for row, expected in zip(rows, metrics["epochs"], strict=True):
        assert set(row) == set(expected)
        assert float(row["train_loss"]) == expected["train_loss"]
        assert float(row["test_accuracy"]) == expected["test_accuracy"]
        assert int(row["train_size"]) == expected["train_size"]
