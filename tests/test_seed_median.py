"""benchmarks/seed_median.py: one median from per-seed records, and only from records that
trained the same settings."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "seed_median.py"
spec = importlib.util.spec_from_file_location("seed_median", SCRIPT)
seed_median = importlib.util.module_from_spec(spec)
spec.loader.exec_module(seed_median)


def record(seed: int, accuracy: float, *, gpu: bool = False, **config_changes) -> dict:
    """A time-to-accuracy record of one finished 24-epoch run, shaped as the benchmark writes it."""
    config = {"recipe": "express-progressive", "epochs": 24, "weight_decay": 5e-4,
              "seed": seed, "out_dir": f"/runs/{seed}", "device": "cuda" if gpu else "auto",
              "eval_from_epoch": 24, "loader": {"data_dir": "/data", "batch_size": 512},
              **config_changes}
    machine = {"cpu": "AMD EPYC", "cpu_cores": 2}
    if gpu:
        machine = {"cpu": "Intel Xeon", "cpu_cores": 16, "gpu": "NVIDIA H200"}
    return {"recipe": "express-progressive", "epochs": 24, "device": "cuda:0" if gpu else "cpu",
            "precision": "bf16", "machine": machine, "date": f"2026-11-2{seed} 10:00:00 UTC",
            "commit": "abc1234", "config": config,
            "runs": [{"seed": seed, "budget_epochs": 24, "epochs_run": 24,
                      "final_accuracy": accuracy, "final_accuracy_no_tta": accuracy - 0.01,
                      "final_accuracy_tta": accuracy - 0.002}]}


def test_median_over_seeds_from_two_machines():
    records = [("b.json", record(2, 0.9230, gpu=True)), ("a.json", record(0, 0.9214)),
               ("c.json", record(1, 0.9260, gpu=True))]
    report = seed_median.summary(records)
    assert [row["seed"] for row in report["runs"]] == [0, 1, 2]
    assert report["median_final_accuracy"] == pytest.approx(0.9230)
    assert report["median_no_tta"] == pytest.approx(0.9130)
    assert report["runs"][0]["machine"] == "2-core AMD EPYC, bf16"
    assert report["runs"][1]["machine"] == "1x NVIDIA H200, bf16"
    assert report["runs"][1]["source"] == "c.json"


def test_places_and_test_schedule_may_differ():
    other = record(1, 0.92, eval_from_epoch=1, out_dir="/elsewhere")
    other["config"]["loader"]["data_dir"] = "/other-data"
    assert len(seed_median.summary([("a", record(0, 0.92)), ("b", other)])["runs"]) == 2


def test_refuses_records_that_trained_other_settings():
    records = [("a.json", record(0, 0.92)), ("b.json", record(1, 0.93, weight_decay=1e-3))]
    with pytest.raises(ValueError, match="b.json trains other settings.*weight_decay"):
        seed_median.summary(records)
    other_batch = record(1, 0.93)
    other_batch["config"]["loader"]["batch_size"] = 256
    with pytest.raises(ValueError, match="loader"):
        seed_median.summary([("a", record(0, 0.92)), ("b", other_batch)])


def test_refuses_a_repeated_seed_and_a_run_cut_short():
    with pytest.raises(ValueError, match="seed 0 appears twice"):
        seed_median.summary([("a", record(0, 0.92)), ("b", record(0, 0.93))])
    short = copy.deepcopy(record(1, 0.80))
    short["runs"][0]["epochs_run"] = 11
    with pytest.raises(ValueError, match="ran 11 epochs"):
        seed_median.summary([("a", record(0, 0.92)), ("b", short)])


def test_main_writes_both_files_or_none(tmp_path, monkeypatch, capsys):
    paths = []
    for seed, accuracy in [(0, 0.9214), (1, 0.9240)]:
        paths.append(tmp_path / f"seed{seed}.json")
        paths[-1].write_text(json.dumps(record(seed, accuracy)))
    out = tmp_path / "median-24ep"
    monkeypatch.setattr("sys.argv", ["seed_median.py", *map(str, paths), "--out", str(out)])
    assert seed_median.main() == 0
    written = json.loads(out.with_suffix(".json").read_text())
    assert written["median_final_accuracy"] == pytest.approx(0.9227)
    assert "**Median final accuracy: 92.27%** over 2 seed(s)" in out.with_suffix(".md").read_text()
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps(record(2, 0.93, weight_decay=1e-3)))
    refused = tmp_path / "refused"
    monkeypatch.setattr("sys.argv", ["seed_median.py", str(paths[0]), str(mixed),
                                     "--out", str(refused)])
    assert seed_median.main() == 1
    assert "trains other settings" in capsys.readouterr().err
    assert not list(tmp_path.glob("refused*"))


def test_a_record_that_is_not_an_object_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    monkeypatch.setattr("sys.argv", ["seed_median.py", str(bad), "--out", str(tmp_path / "m")])
    assert seed_median.main() == 1
    assert capsys.readouterr().err.startswith("error: ")
    assert not list(tmp_path.glob("m.*"))


@pytest.mark.parametrize("out, written", [("median.24ep", "median.24ep"), ("m.json", "m"),
                                          ("m.md", "m")])
def test_out_keeps_a_dot_in_its_name(tmp_path, monkeypatch, out, written):
    path = tmp_path / "seed0.json"
    path.write_text(json.dumps(record(0, 0.92)))
    monkeypatch.setattr("sys.argv", ["seed_median.py", str(path), "--out", str(tmp_path / out)])
    assert seed_median.main() == 0
    assert sorted(p.name for p in tmp_path.glob(f"{written}.*")) == [f"{written}.json",
                                                                      f"{written}.md"]


def test_a_failed_write_is_a_one_line_machine_fault(tmp_path, monkeypatch, capsys):
    path = tmp_path / "seed0.json"
    path.write_text(json.dumps(record(0, 0.92)))
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setattr("sys.argv", ["seed_median.py", str(path), "--out",
                                     str(blocked / "median")])
    with pytest.raises(SystemExit) as stopped:  # script_exit: one line, exit 74
        seed_median.main()
    assert stopped.value.code == 74
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: could not write")
