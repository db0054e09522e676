"""Measure what each training trick adds: short runs of named variants of a recipe.

    python benchmarks/recipe_sweep.py --data datasets --epochs 4 --json benchmarks/results/sweep.json

Each variant is the base recipe with a few settings replaced (loader__X / augment__X reach the
nested configs); every variant runs with the same seeds, and the JSON keeps each run's
per-epoch test accuracy, so the effect of a trick is read against the baseline of the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from fastcifar.config import LoaderConfig, Precision, recipe, replace_nested
from fastcifar.train import machine_description, select_device, train

VARIANTS: dict[str, dict] = {
    "fast": {},
    "no_cutout": {"augment__cutout_size": 0},
    "whiten": {"whiten_init": True},
    "zero_res": {"zero_init_residual": True},
    "whiten+zero_res": {"whiten_init": True, "zero_init_residual": True},
    "whiten+zero_res+no_cutout": {"whiten_init": True, "zero_init_residual": True,
                                  "augment__cutout_size": 0},
    "whiten+zero_res+batch256": {"whiten_init": True, "zero_init_residual": True,
                                 "loader__batch_size": 256},
    "whiten+zero_res+ema": {"whiten_init": True, "zero_init_residual": True,
                            "ema_decay": 0.98},
    "whiten+zero_res+batch256+no_cutout": {"whiten_init": True, "zero_init_residual": True,
                                           "loader__batch_size": 256, "augment__cutout_size": 0},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("datasets"))
    parser.add_argument("--recipe", default="fast")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--json", type=Path, required=True)
    arguments = parser.parse_args()
    base = recipe(arguments.recipe, epochs=arguments.epochs, make_plots=False,
                  precision=Precision.auto, out_dir=Path("/tmp/sweep-runs"),
                  weights_dir=Path("/tmp/sweep-weights"),
                  loader=LoaderConfig(data_dir=arguments.data, batch_size=arguments.batch_size,
                                      train_subset=arguments.train_subset))
    results = []
    for name in arguments.variants:
        for seed in arguments.seeds:
            config = replace_nested(base, seed=seed, **VARIANTS[name])
            started = time.perf_counter()
            result = train(config)
            accuracies = [row.test_accuracy for row in result.history]
            results.append({"variant": name, "seed": seed, "changes": VARIANTS[name],
                            "test_accuracy_per_epoch": accuracies,
                            "final_accuracy": accuracies[-1],
                            "train_seconds": sum(r.train_seconds for r in result.history),
                            "wall_seconds": time.perf_counter() - started})
            print(f"{name:32s} seed {seed}: " + " ".join(f"{a:.4f}" for a in accuracies),
                  flush=True)
    summary = {name: statistics.median(r["final_accuracy"] for r in results
                                       if r["variant"] == name) for name in arguments.variants}
    arguments.json.parent.mkdir(parents=True, exist_ok=True)
    arguments.json.write_text(json.dumps({
        "benchmark": "recipe_sweep", "recipe": arguments.recipe, "epochs": arguments.epochs,
        "data": "CIFAR-10 (JPEG-75 copy)", "train_subset": arguments.train_subset,
        "machine": machine_description(select_device(base.device)),
        "command": "python " + " ".join(sys.argv), "median_final_accuracy": summary,
        "runs": results}, indent=2))
    for name, accuracy in summary.items():
        print(f"{name:32s} median final {accuracy:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
