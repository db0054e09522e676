"""The median over seeds of one recipe's budget, from time-to-accuracy records made apart.

    python benchmarks/seed_median.py benchmarks/results/cpu/time-to-accuracy-*-24ep-cpu-seed*.json \\
        --out benchmarks/results/cpu/median-express-progressive-24ep

A long budget is trained one seed per call (a run cut short loses only itself), on days or
machines that may differ. This joins those records into one median: it refuses records whose
training settings differ (anything but the seed and the run's own folders and schedule of test
passes) or that repeat a seed, and each row names the machine, date and commit it came from.
Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from fastcifar.atomic import write_texts
from fastcifar.errors import script_exit

# Config keys that say where a run wrote or how often it was scored, not what it trained.
NOT_TRAINING = {"seed", "out_dir", "weights_dir", "resume", "local_rank", "make_plots",
                "tensorboard", "eval_every_steps", "eval_steps_epochs", "eval_from_epoch",
                "stop_at_accuracy", "device", "precision", "compile"}
NOT_TRAINING_LOADER = {"data_dir", "workers", "distributed", "on_device"}


def training_settings(record: dict) -> dict:
    """The part of a record's config that decides the trained weights (seed and places aside)."""
    config = {key: value for key, value in record["config"].items() if key not in NOT_TRAINING}
    config["loader"] = {key: value for key, value in config["loader"].items()
                        if key not in NOT_TRAINING_LOADER}
    return config


def seed_rows(records: list[tuple[str, dict]]) -> list[dict]:
    """One row per run: its seed, figures and provenance. Raises ValueError on mixed settings."""
    if not records:
        raise ValueError("no records given")
    reference_name, reference = records[0]
    rows: list[dict] = []
    for name, record in records:
        if training_settings(record) != training_settings(reference):
            ours, theirs = training_settings(record), training_settings(reference)
            changed = sorted(key for key in ours.keys() | theirs.keys()
                             if ours.get(key) != theirs.get(key))
            raise ValueError(f"{name} trains other settings than {reference_name}: "
                             f"{', '.join(changed)}")
        for run in record["runs"]:
            if run["budget_epochs"] != reference["epochs"] or run["epochs_run"] != run[
                    "budget_epochs"]:
                raise ValueError(f"{name}: seed {run['seed']} ran {run['epochs_run']} epochs "
                                 f"of a {run['budget_epochs']}-epoch budget, not "
                                 f"{reference['epochs']}")
            if any(row["seed"] == run["seed"] for row in rows):
                raise ValueError(f"seed {run['seed']} appears twice ({name})")
            rows.append({"seed": run["seed"], "final_accuracy": run["final_accuracy"],
                         "no_tta": run["final_accuracy_no_tta"],
                         "flip_tta": run["final_accuracy_tta"],
                         "machine": machine_words(record), "date": record["date"],
                         "commit": record["commit"], "source": name})
    return sorted(rows, key=lambda row: row["seed"])


def machine_words(record: dict) -> str:
    """The machine as a results table names it: the GPU when one trained, else the CPU."""
    machine = record["machine"]
    if record["device"] != "cpu" and machine.get("gpu"):
        return f"1x {machine['gpu']}, {record['precision']}"
    return f"{machine['cpu_cores']}-core {machine['cpu']}, {record['precision']}"


def summary(records: list[tuple[str, dict]]) -> dict:
    """The runs' rows and their median final accuracy (the recipe's multi-crop figure)."""
    rows = seed_rows(records)
    reference = records[0][1]
    return {"recipe": reference["recipe"], "epochs": reference["epochs"], "runs": rows,
            "median_final_accuracy": statistics.median(row["final_accuracy"] for row in rows),
            "median_no_tta": statistics.median(row["no_tta"] for row in rows)}


def markdown(report: dict, command: str) -> str:
    """The summary as the results folder's tables read."""
    percent = lambda value: "-" if value is None else f"{value:.2%}"  # noqa: E731
    lines = [f"# Median over seeds: `{report['recipe']}`, {report['epochs']}-epoch budget", "",
             f"`{command}`", "",
             "| seed | final acc | no TTA | flip TTA | machine | date | commit | record |",
             "|---:|---:|---:|---:|---|---|---|---|"]
    lines += [f"| {row['seed']} | {percent(row['final_accuracy'])} | {percent(row['no_tta'])} "
              f"| {percent(row['flip_tta'])} | {row['machine']} | {row['date']} | "
              f"{row['commit']} | `{Path(row['source']).name}` |" for row in report["runs"]]
    lines += ["", f"**Median final accuracy: {percent(report['median_final_accuracy'])}** over "
              f"{len(report['runs'])} seed(s) (no TTA: {percent(report['median_no_tta'])})."]
    return "\n".join(lines) + "\n"


def output_paths(out: Path) -> tuple[Path, Path]:
    """OUT.json and OUT.md; a dot inside OUT's name is kept, a given .json or .md is dropped."""
    stem = out.with_suffix("") if out.suffix in (".json", ".md") else out
    return stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".md")


def write_pair(out: Path, report: dict, command: str) -> None:
    """Write OUT.json and OUT.md as a pair (neither is new if either write fails)."""
    json_path, markdown_path = output_paths(out)
    write_texts({json_path: json.dumps({**report, "command": command}, indent=2) + "\n",
                 markdown_path: markdown(report, command)})


@script_exit()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", type=Path, nargs="+", help="time-to-accuracy JSON files")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    arguments = parser.parse_args()
    try:
        records = [(str(path), json.loads(path.read_text())) for path in arguments.records]
        report = summary(records)
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    command = "python benchmarks/seed_median.py " + " ".join(sys.argv[1:])
    write_pair(arguments.out, report, command)
    print(f"median final accuracy {report['median_final_accuracy']:.2%} over "
          f"{len(report['runs'])} seed(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
