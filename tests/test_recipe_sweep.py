"""The tuning rounds' cells: what a round runs on held-out images is what its recorded train
options build, so the choice it hands a follow-up run (`best_train_options`) trains the cell
that won."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from test_cli import built_train_config

from fastcifar.config import RECIPES, replace_nested

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
    swept = replace_nested(base, **changes)
    built = built_train_config(monkeypatch, "--recipe", base.recipe, *options)
    assert replace_nested(built, loader=swept.loader, out_dir=swept.out_dir) == swept
