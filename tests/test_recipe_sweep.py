"""The tuning rounds' cells: what a round runs on held-out images is what its recorded train
options build, so the choice it hands a follow-up run (`best_train_options`) trains the cell
that won."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from test_cli import built_train_config

from fastcifar.config import RECIPES, LoaderConfig, replace_nested

SWEEP = Path(__file__).resolve().parent.parent / "benchmarks" / "recipe_sweep.py"


def load_sweep():
    spec = importlib.util.spec_from_file_location("recipe_sweep", SWEEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sweep = load_sweep()
# Rounds whose base is a named recipe as it stands (the tuning round starts from an older
# express that no --recipe names).
NAMED_ROUNDS = [(plan, name) for plan, (base, cells) in sweep.ROUNDS.items()
                if RECIPES.get(base.recipe) == base for name in cells]


def test_every_round_but_tuning_starts_from_a_named_recipe():
    assert {plan for plan, _ in NAMED_ROUNDS} == set(sweep.ROUNDS) - {"tuning"}


@pytest.mark.parametrize(("plan", "cell"), NAMED_ROUNDS)
def test_a_cells_train_options_build_the_config_it_runs(monkeypatch, plan, cell):
    base, cells = sweep.ROUNDS[plan]
    changes, options = cells[cell]
    loader = LoaderConfig()
    swept = sweep.cell_config(base, changes, base.seed, loader, base.epochs)
    built = built_train_config(monkeypatch, "--recipe", base.recipe,
                               *sweep.cell_train_options(changes, options, base.epochs))
    # The sweep's own settings (where runs go, TTA on for scoring) are not the cell's.
    sweep_own = {"make_plots", "out_dir", "weights_dir", "tta", "tta_shifts"}
    assert replace_nested(built, **{key: getattr(swept, key) for key in sweep_own}) == swept


def cell(*scores: tuple[int, float]) -> dict:
    return {"runs": [{"seed": seed, "final_holdout": {"none": score, "flip": score,
                                                      "multicrop": score}}
                     for seed, score in scores]}


def test_the_best_cell_is_ranked_over_the_seeds_every_candidate_ran():
    # b won seed 0; a's second seed would lift its median above b's single seed, but b has no
    # seed 1, so the ranking uses seed 0 alone.
    cells = {"a": cell((0, 0.90), (1, 0.96)), "b": cell((0, 0.92)), "c": {"runs": []}}
    assert sweep.best_cell(cells, ["a", "b", "c"]) == "b"
    cells["b"] = cell((0, 0.92), (1, 0.91))
    assert sweep.best_cell(cells, ["a", "b", "c"]) == "a"  # medians 0.93 against 0.915
    assert sweep.best_cell({"c": {"runs": []}}, ["c"]) is None


def test_a_misspelt_cell_name_is_refused_before_anything_runs(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("sys.argv", ["recipe_sweep.py", "--plan", "long", "--only", "+ pad4",
                                     "--data", str(tmp_path), "--json", str(tmp_path / "s.json")])
    with pytest.raises(SystemExit) as stopped:
        sweep.main()
    assert stopped.value.code == 2
    assert "--only names no cell of this plan: + pad4" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()


@pytest.mark.parametrize(("epochs", "twins"), [
    (12, {"the row": "express-progressive"}),  # the budget row is on in the base
    (11, {"- the row (the recipe before it)": "express-progressive"}),  # and off below 12
])
def test_a_cell_with_an_earlier_cells_settings_at_the_budget_is_not_run_again(epochs, twins):
    table = sweep.round_variants("long")
    assert sweep.twin_cells(table, LoaderConfig(), epochs) == twins


def test_a_twin_candidate_is_ranked_by_the_cell_that_ran_its_settings(monkeypatch, tmp_path):
    scores = {"express-progressive": 0.93, "+ pad 4": 0.92}

    def fake_run(base, changes, seed, loader, epochs) -> dict:
        name = next(name for name, (cell, _) in sweep.LONG_ROUND.items() if cell == changes)
        return {"seed": seed, "final_holdout": dict.fromkeys(("none", "flip", "multicrop"),
                                                             scores[name]),
                "train_seconds": 1.0, "wall_seconds": 1.0}

    monkeypatch.setattr(sweep, "run_cell", fake_run)
    report_path = tmp_path / "s.json"
    monkeypatch.setattr("sys.argv", [
        "recipe_sweep.py", "--plan", "long", "--epochs", "24", "--seeds", "0",
        "--only", "express-progressive", "the row", "+ pad 4",
        "--candidates", "the row", "+ pad 4", "--data", str(tmp_path), "--json", str(report_path)])
    assert sweep.main() == 0
    report = json.loads(report_path.read_text())
    assert report["cells"]["the row"] == {**report["cells"]["the row"], "runs": [],
                                          "same_as": "express-progressive"}
    assert report["best"] == "express-progressive"  # its runs are the row's at 24 epochs
    assert "the row (= express-progressive)" in report_path.with_suffix(".md").read_text()


def test_the_report_ranks_only_the_cells_that_only_kept(monkeypatch, tmp_path):
    def fake_run(base, changes, seed, loader, epochs) -> dict:
        return {"seed": seed, "final_holdout": dict.fromkeys(("none", "flip", "multicrop"), 0.9),
                "train_seconds": 1.0, "wall_seconds": 1.0}

    monkeypatch.setattr(sweep, "run_cell", fake_run)
    report_path = tmp_path / "s.json"
    monkeypatch.setattr("sys.argv", [
        "recipe_sweep.py", "--plan", "long", "--epochs", "8", "--seeds", "0",
        "--only", "express-progressive", "the row", "--data", str(tmp_path),
        "--json", str(report_path)])
    assert sweep.main() == 0
    assert json.loads(report_path.read_text())["candidates"] == ["express-progressive",
                                                                 "the row"]
    assert "Best of express-progressive, the row: **" in report_path.with_suffix(".md").read_text()
