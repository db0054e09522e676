"""The command line end to end on tiny data, and its one-line errors."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fastcifar.cli import app

runner = CliRunner()


def test_convert_then_train_end_to_end(tiny_imagefolder, tmp_path):
    data = tmp_path / "data"
    result = runner.invoke(app, ["convert", "--source", str(tiny_imagefolder), "--out", str(data)])
    assert result.exit_code == 0, result.output
    assert "written" in result.output
    assert "write train: " not in result.output  # its one-line counter: a terminal's, not a log's
    again = runner.invoke(app, ["convert", "--source", str(tiny_imagefolder), "--out", str(data)])
    assert "up to date" in again.output
    result = runner.invoke(app, [
        "train", "--epochs", "2", "--batch-size", "24", "--data", str(data), "--max-lr", "0.05",
        "--precision", "fp32", "--workers", "1", "--out", str(tmp_path / "runs"),
        "--weights-dir", str(tmp_path / "weights"), "--cutout", "4", "--eval-from-epoch", "2"])
    assert result.exit_code == 0, result.output
    assert "test acc" in result.output
    # Not a terminal here, as in a log file: no progress bar, so no empty line in the table
    table = result.output[result.output.index("epoch "):result.output.index("final test")]
    assert "" not in table.strip().splitlines(), table
    # ... and no line broken at column 80: the header's run folder is whole, to copy
    (run_dir,) = (tmp_path / "runs").iterdir()
    header = next(line for line in result.output.splitlines() if line.startswith("recipe "))
    assert len(header) > 80  # longer than the width a log file would have been wrapped at
    assert header.endswith(f"run folder {run_dir}"), result.output
    assert "| sgd max LR 0.05, Muon LR 0.24 on raw filters |" in header  # below the 12-epoch row
    epoch_one = next(line.split() for line in result.output.splitlines()
                     if line.split()[:1] == ["1"])
    assert epoch_one[5:7] == ["-", "-"]  # no test pass before --eval-from-epoch
    assert epoch_one[1] == "20"  # the default recipe's first epoch trains on 20 px images
    closing = result.output.strip().splitlines()[-1]  # the final figure first, then the best
    assert closing.startswith("final test accuracy ")
    assert closing.index("final test accuracy") < closing.index("best test pass")
    assert "(chosen on the test set" in closing
    assert list((tmp_path / "weights").glob("*-best.safetensors"))
    assert list((tmp_path / "weights").glob("*-final.safetensors"))


def test_the_train_header_names_the_optimisers_a_budget_row_set():
    from fastcifar.config import recipe
    from fastcifar.progress import optimiser_text

    assert optimiser_text(recipe("express-progressive", epochs=12)) == (
        "sgd max LR 0.8, Muon LR 0.12 on normalized filters")  # the 12-epoch row, no flag
    assert optimiser_text(recipe("express-progressive", epochs=6)) == (
        "sgd max LR 0.8, Muon LR 0.24 on raw filters")
    assert optimiser_text(recipe("fast")) == "sgd max LR 0.4"


def test_train_without_betons_says_run_convert_first(tmp_path):
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "none")])
    assert result.exit_code == 1
    assert "run `fastcifar convert` first" in result.output
    assert "Traceback" not in result.output


def test_convert_missing_source_is_one_line_error(tmp_path):
    result = runner.invoke(app, ["convert", "--source", str(tmp_path / "nope.tar.gz")])
    assert result.exit_code == 1
    assert "source not found" in result.output and "Traceback" not in result.output


def test_messages_print_square_brackets_whole(tmp_path, capsys):
    # Rich read "[test]" and "[tensorboard]" as markup tags and dropped them from the line.
    from fastcifar.terminal import print_problem

    result = runner.invoke(app, ["convert", "--source", str(tmp_path / "cifar[test]" / "x.tar.gz")])
    assert result.exit_code == 1 and f"{tmp_path / 'cifar[test]' / 'x.tar.gz'}" in result.stderr
    print_problem("warning", "pip install 'fastcifar[tensorboard]'")
    assert capsys.readouterr().err == "warning: pip install 'fastcifar[tensorboard]'\n"


def test_nonsense_options_exit_non_zero(tiny_dataset, tmp_path):
    negative = runner.invoke(app, ["train", "--epochs", "-3", "--data", str(tiny_dataset)])
    assert negative.exit_code == 1 and "epochs must be positive" in negative.output
    device = runner.invoke(app, ["train", "--device", "tpu", "--data", str(tiny_dataset)])
    assert device.exit_code == 2  # Typer rejects the unknown choice
    batch = runner.invoke(app, ["train", "--batch-size", "4096", "--data", str(tiny_dataset),
                                "--out", str(tmp_path)])
    assert batch.exit_code == 1 and "batch size 4096" in batch.output


def built_train_config(monkeypatch, *arguments: str):
    """The TrainConfig `fastcifar train ARGUMENTS` hands the library (training is stubbed)."""
    import fastcifar.training
    from fastcifar.errors import FastCifarError

    seen = {}

    def stop(config, callbacks=None):
        seen["config"] = config
        raise FastCifarError("stopped by the test")

    monkeypatch.setattr(fastcifar.training, "train", stop)
    result = runner.invoke(app, ["train", *arguments])
    assert "stopped by the test" in result.output, result.output
    return seen["config"]


def test_commands_default_to_the_default_recipe(monkeypatch):
    import typer.main

    from fastcifar.config import DEFAULT_RECIPE, RECIPES
    from fastcifar.shared_options import RecipeName

    assert DEFAULT_RECIPE == "express-progressive" and sorted(RecipeName) == sorted(RECIPES)
    assert built_train_config(monkeypatch).recipe == DEFAULT_RECIPE
    commands = typer.main.get_command(app).commands
    for name in ("train", "lr-find", "show-augment"):
        option = next(param for param in commands[name].params if param.name == "recipe_name")
        assert option.default == DEFAULT_RECIPE, name
    benchmark = commands["benchmark"].commands["time-to-accuracy"]
    assert next(param.default for param in benchmark.params
                if param.name == "recipe_name") == DEFAULT_RECIPE


def test_train_takes_the_tta_modes_of_evaluate_and_export(monkeypatch):
    # express's own mode is multi-crop; each mode replaces it, --no-tta as --tta none.
    assert built_train_config(monkeypatch, "--recipe", "express").tta_shifts
    for arguments, flags in ((["--tta", "none"], (False, False)), (["--no-tta"], (False, False)),
                             (["--tta", "flip"], (True, False)),
                             (["--tta", "multicrop"], (True, True))):
        config = built_train_config(monkeypatch, "--recipe", "express", *arguments)
        assert (config.tta, config.tta_shifts) == flags, arguments
    assert built_train_config(monkeypatch, "--recipe", "seed", "--tta", "multicrop").tta_shifts
    both = runner.invoke(app, ["train", "--no-tta", "--tta", "flip"])
    assert both.exit_code == 1 and "--no-tta and --tta flip disagree" in both.output
    unknown = runner.invoke(app, ["train", "--tta", "shifts"])
    assert unknown.exit_code == 2 and "'shifts' is not one of" in unknown.output


def test_jitter_options_give_the_same_augmentation_on_either_recipe(monkeypatch):
    for recipe_name in ("fast", "seed"):
        augment = built_train_config(monkeypatch, "--recipe", recipe_name, "--jitter", "0.2",
                                     "--hue", "0.1").augment
        assert (augment.p_jitter, augment.brightness, augment.contrast, augment.saturation,
                augment.hue) == (0.5, 0.2, 0.2, 0.2, 0.1), recipe_name
        hue_only = built_train_config(monkeypatch, "--recipe", recipe_name, "--hue", "0.1")
        assert (hue_only.augment.p_jitter, hue_only.augment.hue) == (0.5, 0.1), recipe_name


def test_cutout_turns_one_hole_on_for_a_recipe_without_holes(monkeypatch):
    express = built_train_config(monkeypatch, "--recipe", "express-muon", "--cutout", "12")
    assert (express.augment.cutout_size, express.augment.cutout_count) == (12, 1)
    two = built_train_config(monkeypatch, "--cutout", "8", "--cutout-count", "2").augment
    assert (two.cutout_size, two.cutout_count) == (8, 2)
    fast = built_train_config(monkeypatch, "--recipe", "fast", "--cutout", "6").augment
    assert (fast.cutout_size, fast.cutout_count) == (6, 1)  # fast's own single hole
    off = built_train_config(monkeypatch, "--recipe", "fast", "--cutout", "0").augment
    assert off.cutout_size == 0  # 0 still turns it off


def test_train_options_that_would_be_ignored_or_break_the_run_are_refused(monkeypatch):
    import fastcifar.training

    monkeypatch.setattr(fastcifar.training, "train", lambda config, callbacks=None: None)
    for arguments, message in (
            (["--recipe", "seed", "--momentum", "0.8"], "would be ignored"),
            (["--recipe", "fast", "--optimizer", "adam", "--momentum", "0.8"],
             "would be ignored"),
            (["--recipe", "express", "--zero-init-residual"], "kills the residual branches"),
            (["--cutout-count", "2"], "--cutout-count 2 cuts nothing: this recipe's holes are 0 px"),
            (["--recipe", "fast", "--momentum", "-0.1"], "momentum must be in [0, 1), got -0.1"),
            (["--recipe", "fast", "--momentum", "1.5"], "momentum must be in [0, 1)"),
            (["--logit-scale", "-1"], "logit scale must be positive, got -1.0")):
        result = runner.invoke(app, ["train", *arguments])  # training itself is stubbed
        assert result.exit_code == 1 and message in result.output, arguments
    assert built_train_config(monkeypatch, "--recipe", "fast", "--momentum", "0.8").momentum == 0.8


def test_adam_on_a_muon_recipe_trains_without_muon_as_lr_find_sweeps_it(monkeypatch):
    from fastcifar.config import DEFAULT_RECIPE, RECIPES, OptimizerName

    assert RECIPES[DEFAULT_RECIPE].muon_lr > 0
    adam = built_train_config(monkeypatch, "--optimizer", "adam")
    assert adam.optimizer == OptimizerName.adam and adam.muon_lr == 0
    both = runner.invoke(app, ["train", "--optimizer", "adam", "--muon-lr", "0.2"])
    assert both.exit_code == 1 and "Muon pairs with SGD" in both.output
    # At 24 epochs the recipe also normalizes Muon's filters: without Muon that goes too,
    # unless asked for (then refused, as it has nothing to act on)
    assert RECIPES[DEFAULT_RECIPE].epochs == 24 and not adam.muon_normalize_filters
    assert not built_train_config(monkeypatch, "--muon-lr", "0").muon_normalize_filters
    assert built_train_config(monkeypatch, "--epochs", "24").muon_normalize_filters
    asked = runner.invoke(app, ["train", "--muon-lr", "0", "--muon-normalize-filters"])
    assert asked.exit_code == 1 and "it needs --muon-lr" in asked.output


def test_train_help_says_what_options_do_where_it_is_not_obvious():
    import typer.main

    options = {parameter.name: parameter.help
               for parameter in typer.main.get_command(app).commands["train"].params}
    assert "SGD groups only" in options["max_lr"] and "Muon off" in options["max_lr"]
    assert "fp32 on MPS" in options["precision"] and "lr-find" in options["precision"]
    assert "per process" in options["batch_size"] and "not rescaled" in options["batch_size"]
    assert "slower" in options["data_on_device"]
    assert "M - N" in options["holdout"] and "test set" in options["stop_at_accuracy"]
    assert "the last only" in options["eval_from_epoch"]


def test_loader_benchmark_default_file_is_named_to_the_second(monkeypatch):
    from fastcifar.benchmark.commands import default_loader_benchmark_path

    monkeypatch.setattr(time, "gmtime", lambda *_: time.struct_time((2026, 11, 28, 9, 5, 7, 5,
                                                                      332, 0)))
    assert default_loader_benchmark_path() == Path("benchmarks/results/loader-20261128-090507.json")


def test_jitter_zero_turns_all_colour_jitter_off_unless_hue_is_given(monkeypatch):
    seed_default = built_train_config(monkeypatch, "--recipe", "seed").augment
    assert seed_default.jitter_enabled and seed_default.hue == 0.05
    off = built_train_config(monkeypatch, "--recipe", "seed", "--jitter", "0").augment
    assert not off.jitter_enabled and off.hue == 0
    hue_kept = built_train_config(monkeypatch, "--recipe", "seed", "--jitter", "0",
                                  "--hue", "0.05").augment
    assert hue_kept.jitter_enabled and (hue_kept.brightness, hue_kept.hue) == (0, 0.05)


def test_jitter_options_say_how_they_apply():
    import typer.main

    options = {parameter.name: parameter.help
               for parameter in typer.main.get_command(app).commands["train"].params}
    assert "half the images (any recipe)" in options["jitter"]
    assert "hue jitter too unless --hue" in options["jitter"]
    assert "half the images" in options["hue"]
    assert "takes no other augmentation option" in options["augment"]


def tiny_train_arguments(data, tmp_path, epochs: int = 1) -> list[str]:
    return ["train", "--epochs", str(epochs), "--batch-size", "24", "--data", str(data),
            "--precision", "fp32", "--device", "cpu", "--workers", "1", "--no-tta",
            "--cutout", "4", "--out", str(tmp_path / "runs"), "--weights", str(tmp_path / "w")]


def test_max_lr_auto_trains_at_the_range_tests_suggestion(tiny_dataset, tmp_path, monkeypatch):
    import functools
    import json

    import fastcifar.command_config
    from fastcifar.checkpoint import load_checkpoint

    # the range test as `--max-lr auto` runs it, shortened to 12 steps for the test
    monkeypatch.setattr(fastcifar.command_config, "LrFindConfig", functools.partial(
        fastcifar.command_config.LrFindConfig, iterations=12, start_lr=1e-4, end_lr=1.0))
    result = runner.invoke(app, [*tiny_train_arguments(tiny_dataset, tmp_path),
                                 "--max-lr", "auto"])
    assert result.exit_code == 0, result.output
    found = json.loads((tmp_path / "runs" / "lr-find" / "lr_find.json").read_text())
    assert found["batch_size"] == 24 and len(found["lrs"]) >= 2
    assert f"suggests max LR {found['suggested_lr']:.3g}" in result.output
    [checkpoint] = (tmp_path / "runs").glob("*/last.pt")
    saved = load_checkpoint(checkpoint)
    assert saved["config"]["max_lr"] == found["suggested_lr"]
    assert max(saved["lr_per_step"]) == pytest.approx(found["suggested_lr"])  # the peak


def test_resume_auto_finishes_the_newest_interrupted_run(tiny_dataset, tmp_path, monkeypatch):
    import json

    from fastcifar.errors import FastCifarError
    from fastcifar.progress import TableCallbacks

    arguments = tiny_train_arguments(tiny_dataset, tmp_path, epochs=2)
    real_on_epoch = TableCallbacks.on_epoch

    def stop_after_epoch_one(self, stats):  # a crash once epoch 1's checkpoint is saved
        real_on_epoch(self, stats)
        raise FastCifarError("stopped by the test")

    monkeypatch.setattr(TableCallbacks, "on_epoch", stop_after_epoch_one)
    stopped = runner.invoke(app, arguments)
    assert stopped.exit_code == 1 and "stopped by the test" in stopped.output
    [run_dir] = (tmp_path / "runs").iterdir()
    monkeypatch.setattr(TableCallbacks, "on_epoch", real_on_epoch)
    resumed = runner.invoke(app, [*arguments, "--resume", "auto"])
    assert resumed.exit_code == 0, resumed.output
    assert list((tmp_path / "runs").iterdir()) == [run_dir]  # continued, not a new run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["epochs"]] == [1, 2]
    assert "final test accuracy" in resumed.output


def test_max_lr_auto_is_refused_under_torchrun(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    result = CliRunner().invoke(app, ["train", "--max-lr", "auto", "--data", str(tiny_dataset),
                                      "--out", str(tmp_path / "runs")])
    assert result.exit_code == 1
    assert "--max-lr auto is not supported under torchrun" in result.output
    assert not (tmp_path / "runs").exists()  # refused before anything ran


def test_each_train_option_group_is_one_help_panel():
    """build_train_config is split by --help panel: every option of a group sits in its panel,
    and no option is declared twice."""
    import inspect

    from fastcifar.train_options import OPTION_GROUPS, recipe_options, train_option_parameters

    panels = {}
    for group in (recipe_options, *OPTION_GROUPS):
        for parameter in inspect.signature(group, eval_str=True).parameters.values():
            option = next(m for m in parameter.annotation.__metadata__ if hasattr(m, "help"))
            panels.setdefault(group.__name__, set()).add(option.rich_help_panel)
    assert {name: len(found) for name, found in panels.items()} == {
        name: 1 for name in panels}
    assert panels["recipe_options"] == panels["optimisation_options"]  # recipe and schedule
    names = [parameter.name for parameter in train_option_parameters()]
    assert len(names) == len(set(names))


def test_build_train_config_refuses_an_option_no_group_takes():
    from fastcifar.train_options import build_train_config

    with pytest.raises(TypeError, match="unknown options: cutuot"):
        build_train_config(cutuot=4)
    assert build_train_config(cutout=4).augment.cutout_size == 4


@pytest.mark.parametrize("weights", ["a file", "a new .safetensors name"])
def test_train_refuses_a_weights_file_for_its_weights_folder(tiny_dataset, tmp_path, weights):
    # train's --weights-dir (alias --weights) is a folder, predict's --weights a file: a file
    # given here lost the best weights and failed the final write at the run's end.
    target = tmp_path / "custresnet.safetensors"
    if weights == "a file":
        target = tmp_path / "weights"
        target.write_bytes(b"not a folder")
    result = runner.invoke(app, ["train", "--epochs", "1", "--batch-size", "24", "--data",
                                 str(tiny_dataset), "--precision", "fp32", "--workers", "1",
                                 "--out", str(tmp_path / "runs"), "--weights", str(target)])
    assert result.exit_code == 1, result.output
    assert f"--weights-dir {target} is a file name: it takes the folder" in result.output
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())
    assert (weights != "a file" or target.read_bytes() == b"not a folder")
    assert weights == "a file" or not target.exists()


def test_an_existing_folder_is_a_weights_folder_whatever_its_name(tmp_path):
    from fastcifar.run_setup import require_weights_folder

    (tmp_path / "odd.safetensors").mkdir()
    require_weights_folder(tmp_path / "odd.safetensors")
    require_weights_folder(tmp_path / "new-folder")
