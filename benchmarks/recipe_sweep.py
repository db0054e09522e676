"""The ablation table: tricks added one at a time (cascade), then each removed (leave-one-out).

    python benchmarks/recipe_sweep.py --data datasets --epochs 6 --seeds 0 1 --holdout 5000 \\
        --json benchmarks/results/gpu/sweep-6ep.json

Every cell is a run at a fixed budget scored on held-out train images (`--holdout`), never on
the test set, with each TTA mode (none / flip / multi-crop) on the final weights. The cascade
starts from `fast` and ends at `express` as first set (FIRST_EXPRESS), then adds Muon;
leave-one-out removes each trick from it; `--plan tuning` tries the second round of settings,
`--plan muon` the (fixed) Muon optimiser on today's express, `--plan resize` progressive
resizing and shorter budgets on express-muon (a cell may name its own `epochs`), `--plan long`
the long-budget augmentation on express-progressive.
`--seconds` bounds the wall time: cells run seed by seed in table order, and what
did not fit is listed as skipped. The JSON names the variant with the best median multi-crop
holdout accuracy among `--candidates`, which a follow-up run can use.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

from fastcifar.atomic import check_can_write, write_texts
from fastcifar.checkpoint import machine_description
from fastcifar.config import (
    EXPRESS,
    EXPRESS_MUON,
    EXPRESS_PROGRESSIVE,
    FAST,
    RECIPES,
    LoaderConfig,
    TrainConfig,
    at_budget,
    replace_nested,
)
from fastcifar.data.loaders import build_loaders
from fastcifar.device import DeviceStep, plan_precision, select_device
from fastcifar.errors import script_exit
from fastcifar.evaluation import evaluate_loader
from fastcifar.training import train

# Each trick as the settings that turn it on (from `fast`) and off again (from `express`).
TRICKS: dict[str, tuple[dict, dict]] = {
    "bn": ({"bn_frozen_scale": True, "bn_bias_lr_scale": 64.0, "decay_norm": True},
           {"bn_frozen_scale": False, "bn_bias_lr_scale": 1.0, "decay_norm": False}),
    "whiten": ({"whiten": True}, {"whiten": False}),
    "lookahead": ({"lookahead_every": 5, "bn_momentum": 0.6, "bn_eps": 1e-12},
                  {"lookahead_every": 0, "bn_momentum": 0.1, "bn_eps": 1e-5}),
    "alternating_flip": ({"augment__flip_alternate": True}, {"augment__flip_alternate": False}),
    "dirac": ({"dirac_init": True}, {"dirac_init": False}),
}
MUON = {"muon_lr": 0.24}
# express as the 2026-11-26 ablation found it, before the tuning round turned lookahead off and
# raised weight decay: both tables start here, so rerunning them repeats what was measured.
FIRST_EXPRESS = dataclasses.replace(EXPRESS, lookahead_every=5, bn_momentum=0.6, bn_eps=1e-12,
                                    weight_decay=2.5e-4)

# Second round, on the ablation's lead (lookahead did not help at this budget): settings as
# config changes and as the train options that make them, so a chosen cell can be rerun.
NO_LOOKAHEAD = ({"lookahead_every": 0, "bn_momentum": 0.1, "bn_eps": 1e-5},
                ["--lookahead-every", "0", "--bn-momentum", "0.1", "--bn-eps", "1e-5"])
TUNING: dict[str, tuple[dict, list[str]]] = {
    "express": ({}, []),
    "express - lookahead": NO_LOOKAHEAD,
    "- lookahead - dirac": ({**NO_LOOKAHEAD[0], "dirac_init": False},
                           NO_LOOKAHEAD[1] + ["--no-dirac-init"]),
    "- lookahead, max LR 1.2": ({**NO_LOOKAHEAD[0], "max_lr": 1.2, "min_lr": 1.2e-4},
                                NO_LOOKAHEAD[1] + ["--max-lr", "1.2", "--min-lr", "1.2e-4"]),
    "- lookahead, decay 5e-4": ({**NO_LOOKAHEAD[0], "weight_decay": 5e-4},
                                NO_LOOKAHEAD[1] + ["--weight-decay", "5e-4"]),
    "- lookahead, pad 4": ({**NO_LOOKAHEAD[0], "augment__pad": 4},
                           NO_LOOKAHEAD[1] + ["--pad", "4"]),
}


# Third round, after the Muon fix: until commit 17ac295 FilterMuon let autograd sum every
# step's filter gradient, so the ablation's "express + muon" cell measured a broken optimiser.
# Relative to today's express (lookahead off, weight decay 5e-4).
MUON_ROUND: dict[str, tuple[dict, list[str]]] = {
    "express": ({}, []),
    **{f"express + muon {lr:g}": ({"muon_lr": lr}, ["--muon-lr", f"{lr:g}"])
       for lr in (0.1, 0.24, 0.5)},
    # Not yet measured with Muon: a higher Muon momentum, lighter label smoothing.
    "express + muon 0.24, momentum 0.8": ({"muon_lr": 0.24, "muon_momentum": 0.8},
                                          ["--muon-lr", "0.24", "--muon-momentum", "0.8"]),
    "express + muon 0.24, smoothing 0.1": ({"muon_lr": 0.24, "label_smoothing": 0.1},
                                           ["--muon-lr", "0.24", "--label-smoothing", "0.1"]),
}
# Progressive resizing and fewer epochs, from express-muon (the default until then): equal
# epochs (5 and 6, each with and without resizing) and about equal train time (4 epochs at
# 32 px cost about as much as 5 with the 20 -> 32 px ramp).
RAMP = {"train_size_start": 20, "train_size_ramp": 0.6}
RAMP_OPTIONS = ["--train-size-start", "20", "--train-size-ramp", "0.6"]
RESIZE_ROUND: dict[str, tuple[dict, list[str]]] = {
    "5 ep, resize 20->32 over 0.6": ({"epochs": 5, **RAMP}, ["--epochs", "5", *RAMP_OPTIONS]),
    "5 ep, 32 px": ({"epochs": 5}, ["--epochs", "5"]),
    "4 ep, 32 px": ({"epochs": 4}, ["--epochs", "4"]),
    "6 ep, resize 20->32 over 0.6": ({"epochs": 6, **RAMP}, ["--epochs", "6", *RAMP_OPTIONS]),
    "6 ep, 32 px (express-muon)": ({"epochs": 6}, ["--epochs", "6"]),
}
# Long budgets, from express-progressive: its 6-epoch augmentation (pad 2, no cutout) overfits
# at 24 epochs (99.99% train accuracy). airbench's longer runs translate by 4 px and cut a
# 12 px hole; the four cells are both, each alone, and neither (the leave-one-out rows); a
# gentler 8 px hole sits between. The last averages the weights instead.
PAD4 = {"augment__pad": 4}
LOOKAHEAD_OPTIONS = ["--lookahead-every", "5", "--bn-momentum", "0.6", "--bn-eps", "1e-12"]
CUTOUT12 = {"augment__cutout_size": 12, "augment__cutout_count": 1}
LONG_ROUND: dict[str, tuple[dict, list[str]]] = {
    # From 12 epochs the base has its budget row on (Muon at LR 0.12 on normalized filters:
    # 92.55% median of 3 test-set seeds at 24 epochs, H200): "the row" repeats it there, and the
    # three cells after it take the row off in parts (the ablation). Each names both of the
    # row's settings, so below 12 epochs, where the base has the row off, they put the same pairs
    # side by side (the base is then "- the row"); a cell that repeats an earlier one's settings
    # at the budget is not run again. 24 epochs on fewer images: --train-subset 17500 --holdout
    # 5000 (cpu/long-ablation-24ep-12k5-seed0.md, ~17 min a cell on an avx512_bf16 EPYC); 12
    # epochs on 25,000: cpu/long-12ep-25k.md (~16 min a cell there). The selection cell runs
    # twice the epochs, so at a 6-epoch budget its 12 epochs turn the row on for it as for
    # "the row".
    "express-progressive": ({}, []),
    "the row": ({"muon_lr": 0.12, "muon_normalize_filters": True},
                ["--muon-lr", "0.12", "--muon-normalize-filters"]),
    "- normalized filters": ({"muon_lr": 0.12, "muon_normalize_filters": False},
                             ["--muon-lr", "0.12", "--no-muon-normalize-filters"]),
    # Normalized filters at Muon's own LR: at 24 epochs (CPU, test set, seed 0) they fitted far
    # less (97.8% train accuracy at the end) and lost 0.29 point against the recipe without.
    "- Muon LR 0.12 (0.24)": ({"muon_lr": 0.24, "muon_normalize_filters": True},
                              ["--muon-lr", "0.24", "--muon-normalize-filters"]),
    "- the row (the recipe before it)": (
        {"muon_lr": 0.24, "muon_normalize_filters": False},
        ["--muon-lr", "0.24", "--no-muon-normalize-filters"]),
    "+ pad 4": (PAD4, ["--pad", "4"]),
    "+ cutout 8": ({**CUTOUT12, "augment__cutout_size": 8}, ["--cutout", "8"]),
    "+ cutout 12": (CUTOUT12, ["--cutout", "12"]),
    "+ pad 4 + cutout 12": ({**PAD4, **CUTOUT12}, ["--pad", "4", "--cutout", "12"]),
    # Weight averaging instead of more augmentation (airbench's lookahead EMA).
    "+ lookahead": (TRICKS["lookahead"][0], LOOKAHEAD_OPTIONS),
    # After the H200's 24-epoch cells (2026-11-28, seed 0: + pad 4 + cutout 12 was +0.10, inside
    # noise): that pair with weight averaging too, and the ramp off (on that GPU the ramp's
    # smaller images trained no faster, and each new side cost ~2.6 s).
    "+ pad 4 + cutout 12 + lookahead": ({**PAD4, **CUTOUT12, **TRICKS["lookahead"][0]},
                                        ["--pad", "4", "--cutout", "12", *LOOKAHEAD_OPTIONS]),
    "32 px throughout": ({"train_size_start": 32}, ["--train-size-start", "32"]),
    # A per-step weight EMA (about 2,100 steps at 24 epochs, so 0.999 averages the last ~1,000):
    # weight averaging is said to matter more at long budgets; lookahead is the other kind.
    "+ EMA 0.999": ({"ema_decay": 0.999}, ["--ema", "0.999"]),
    # Data selection (selection.py): batches of 1024, each step on the 512 a quarter-width proxy
    # finds hardest, over twice the epochs: the model takes the base's steps on the same number
    # of images, chosen from twice as many (the proxy costs ~1/8 more in operations). At 12
    # epochs on 25,000 images (CPU, seed 0): 89.64% held out against the base's 90.26%.
    "+ proxy selection, half of 1024, 2x epochs": (
        {"select_fraction": 0.5, "loader__batch_size": 1024, "data_passes": 2},
        ["--batch-size", "1024", "--select-fraction", "0.5"]),
}
# The rounds that choose train options: their base recipe and their cells.
ROUNDS = {"tuning": (FIRST_EXPRESS, TUNING), "muon": (EXPRESS, MUON_ROUND),
          "resize": (EXPRESS_MUON, RESIZE_ROUND), "long": (EXPRESS_PROGRESSIVE, LONG_ROUND)}


def variants() -> dict[str, tuple[TrainConfig, dict]]:
    """Table order: cascade from fast to express (+ Muon), then express less each trick."""
    table: dict[str, tuple[TrainConfig, dict]] = {}
    changes: dict = {}
    table["fast"] = (FAST, {})
    for name, (on, _) in TRICKS.items():
        changes = {**changes, **on}
        table[f"+ {name}"] = (FAST, dict(changes))
    table["+ knobs = express"] = (FIRST_EXPRESS, {})
    table["express + muon"] = (FIRST_EXPRESS, dict(MUON))
    for name, (_, off) in TRICKS.items():
        table[f"express - {name}"] = (FIRST_EXPRESS, dict(off))
    # "express - knobs" is the cascade's "+ dirac" cell: the same settings, not run twice.
    return table


def round_variants(plan: str) -> dict[str, tuple[TrainConfig, dict]]:
    base, cells = ROUNDS[plan]
    return {name: (base, changes) for name, (changes, _) in cells.items()}


def cell_config(base: TrainConfig, changes: dict, seed: int, loader: LoaderConfig,
                epochs: int) -> TrainConfig:
    """The config a cell runs at an `epochs` budget. A cell whose changes name `epochs` runs
    that budget instead; one that names `data_passes` runs `epochs` x that (the same steps when
    each keeps 1/data_passes of a batch data_passes times the size); its `loader__batch_size`
    replaces the loader's. A named recipe's cells change it as --recipe gives it at that
    budget (its BUDGET_SETTINGS rows on)."""
    changes = dict(changes)
    data_passes = changes.pop("data_passes", 1)
    epochs = changes.get("epochs", epochs * data_passes)
    if RECIPES.get(base.recipe) == base:
        base = at_budget(base.recipe, epochs)
    if "loader__batch_size" in changes:
        loader = dataclasses.replace(loader, batch_size=changes["loader__batch_size"])
    config = replace_nested(base, **changes)
    return replace_nested(config, seed=seed, epochs=epochs,
                          make_plots=False, loader=loader,
                          out_dir=Path("/tmp/sweep-runs"), weights_dir=Path("/tmp/sweep-weights"),
                          tta=True, tta_shifts=False)


def run_cell(base: TrainConfig, changes: dict, seed: int, loader: LoaderConfig,
             epochs: int) -> dict:
    """One run of `cell_config`; final holdout accuracy for each TTA mode, per-epoch holdout
    accuracy."""
    config = cell_config(base, changes, seed, loader, epochs)
    started = time.perf_counter()
    loaders = build_loaders(config.loader, config.augment, config.seed)
    result = train(config, loaders=loaders)
    model = result.final_model
    device = next(model.parameters()).device
    step = DeviceStep(loaders.metadata.mean, loaders.metadata.std, device, config.channels_last)
    plan = plan_precision(config.precision, device)
    final = {mode: evaluate_loader(model, loaders.holdout, step, plan, tta, shifts)[1]
             for mode, tta, shifts in (("none", False, False), ("flip", True, False),
                                       ("multicrop", True, True))}
    return {"seed": seed, "holdout_per_epoch": [row.holdout_accuracy for row in result.history],
            "final_holdout": final,
            "train_seconds": sum(row.train_seconds for row in result.history),
            "train_sizes": [row.train_size for row in result.history],
            "wall_seconds": time.perf_counter() - started}


def twin_cells(table: dict[str, tuple[TrainConfig, dict]], loader: LoaderConfig,
               epochs: int) -> dict[str, str]:
    """Each cell whose config at this budget is an earlier cell's, with that cell's name: it is
    not run again (from 12 epochs "the row" is the base; below, "- the row" is)."""
    configs: dict[str, TrainConfig] = {}
    twins = {}
    for name, (base, changes) in table.items():
        config = cell_config(base, changes, 0, loader, epochs)
        twin = next((earlier for earlier, seen in configs.items() if seen == config), None)
        if twin is None:
            configs[name] = config
        else:
            twins[name] = twin
    return twins


def cell_train_options(changes: dict, options: list[str], epochs: int) -> list[str]:
    """The train options that rebuild a cell at an `epochs` budget: its own, and --epochs for a
    cell that runs `data_passes` x the budget."""
    passes = changes.get("data_passes", 1)
    return [*options, "--epochs", str(epochs * passes)] if passes != 1 else list(options)


def best_cell(cells: dict, candidates: list[str]) -> str | None:
    """The candidate with the best median multi-crop held-out accuracy over the seeds that every
    candidate run completed: a cell cut short by the time bound is not ranked by 1 seed
    against others' 2-seed medians."""
    ran = [name for name in candidates if cells.get(name, {}).get("runs")]
    if not ran:
        return None
    common = set.intersection(*({run["seed"] for run in cells[name]["runs"]} for name in ran))

    def score(name: str) -> float:
        return summarise([run for run in cells[name]["runs"] if run["seed"] in common])["multicrop"]

    return max(ran, key=score)


def summarise(runs: list[dict]) -> dict:
    modes = ("none", "flip", "multicrop")
    return {mode: statistics.median(run["final_holdout"][mode] for run in runs) for mode in modes}


def markdown(report: dict) -> str:
    """The .md beside the JSON: one row per cell, then the best."""
    machine = report["machine"].get("gpu") or report["machine"]["cpu"]
    title = {"ablation": "Ablation", "tuning": "Tuning round", "resize": "Resizing round",
             "long": "Long-budget round"}.get(report["plan"], "Muon round")
    budget = ("budgets as each variant names" if report["plan"] == "resize"
              else f"a {report['epochs']}-epoch budget")
    lines = [f"# {title} at {budget} ({machine})",
             "", f"Median final accuracy on {report['holdout']} held-out train images (never "
             "trained on; not the test set), seeds " + ", ".join(map(str, report["seeds"]))
             + f". Command: `{report['command']}`", "",
             "| variant | runs | no TTA | flip TTA | multi-crop TTA | train s (median) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, cell in report["cells"].items():
        if cell["runs"]:
            median = cell["median"]
            seconds = statistics.median(run["train_seconds"] for run in cell["runs"])
            lines.append(f"| {name} | {len(cell['runs'])} | {median['none']:.2%} | "
                         f"{median['flip']:.2%} | {median['multicrop']:.2%} | {seconds:,.0f} |")
    twins = [f"{name} (= {cell['same_as']})" for name, cell in report["cells"].items()
             if cell.get("same_as")]
    if twins:
        lines += ["", "Not run again (the same settings at this budget): " + ", ".join(twins)]
    if report["skipped"]:
        lines += ["", "Not run (time budget): " + ", ".join(report["skipped"])]
    lines += ["", f"Best of {', '.join(report['candidates'])}: **{report['best']}**"]
    if report.get("best_train_options") is not None:
        lines.append(f"(train options: `{' '.join(report['best_train_options'])}`)")
    return "\n".join(lines) + "\n"


@script_exit()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("datasets"))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--holdout", type=int, default=5000)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--only", nargs="*", default=None, help="run these variants only")
    parser.add_argument("--plan", choices=["ablation", *ROUNDS], default="ablation")
    parser.add_argument("--candidates", nargs="+", default=None,
                        help="variants the best is chosen from (default: the plan's)")
    parser.add_argument("--seconds", type=float, default=float("inf"), help="wall-time budget")
    parser.add_argument("--json", type=Path, required=True)
    arguments = parser.parse_args()
    markdown_path = arguments.json.with_suffix(".md")
    check_can_write(arguments.json, markdown_path)
    # The test set is not used for any choice: a small slice keeps the per-epoch pass cheap.
    loader = LoaderConfig(data_dir=arguments.data, holdout=arguments.holdout,
                          train_subset=arguments.train_subset, test_subset=512)
    plan = variants() if arguments.plan == "ablation" else round_variants(arguments.plan)
    options = ROUNDS[arguments.plan][1] if arguments.plan in ROUNDS else {}
    unknown = sorted(set(arguments.only or []) - set(plan))
    if unknown:  # a misspelt cell would otherwise run nothing
        parser.error(f"--only names no cell of this plan: {', '.join(unknown)}; "
                     f"its cells: {', '.join(plan)}")
    table = {name: cell for name, cell in plan.items()
             if arguments.only is None or name in arguments.only}
    twins = twin_cells(table, loader, arguments.epochs)
    candidates = arguments.candidates or (["+ knobs = express", "express + muon"]
                                          if arguments.plan == "ablation" else list(options))
    # A twin is ranked as the cell that ran its settings; a cell --only left out is no candidate
    # (the report named every cell of the plan as ranked before).
    candidates = list(dict.fromkeys(twins.get(name, name) for name in candidates
                                    if name in table))
    cells = {name: {"changes": {key: str(value) for key, value in changes.items()},
                    "recipe": base.recipe, "runs": []} for name, (base, changes) in table.items()}
    for name, twin in twins.items():
        cells[name]["same_as"] = twin
    started, skipped, last_wall = time.perf_counter(), [], 0.0
    for seed in arguments.seeds:
        for name, (base, changes) in table.items():
            if name in twins:
                continue
            # A cell that would not end inside --seconds (judged by the last one's time per data
            # pass) is skipped, so the sweep ends within its budget.
            if (time.perf_counter() - started + last_wall * changes.get("data_passes", 1)
                    > arguments.seconds):
                skipped.append(f"{name} (seed {seed})")
                continue
            run = run_cell(base, changes, seed, loader, arguments.epochs)
            last_wall = run["wall_seconds"] / changes.get("data_passes", 1)
            cells[name]["runs"].append(run)
            print(f"{name:28s} seed {seed}: " + " ".join(
                f"{mode} {value:.4f}" for mode, value in run["final_holdout"].items())
                + f"  ({run['wall_seconds']:.1f} s)", flush=True)
    for cell in cells.values():
        cell["median"] = summarise(cell["runs"]) if cell["runs"] else None
    best = best_cell(cells, candidates)
    device = select_device(FIRST_EXPRESS.device)
    report = {"benchmark": "recipe_sweep", "epochs": arguments.epochs, "seeds": arguments.seeds,
              "holdout": arguments.holdout, "train_subset": arguments.train_subset,
              "data": "CIFAR-10 (JPEG-75 copy)", "machine": machine_description(device),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "python " + shlex.join(sys.argv), "cells": cells, "skipped": skipped,
              "plan": arguments.plan, "candidates": candidates, "best": best,
              "best_train_options": (cell_train_options(*options[best], arguments.epochs)
                                     if best in options else None)}
    write_texts({arguments.json: json.dumps(report, indent=2) + "\n",
                 markdown_path: markdown(report)})
    print(f"best: {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
