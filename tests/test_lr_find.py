"""LR range test: finite history rising in LR, a suggestion inside the range, model untouched."""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import fastcifar.range_test
from conftest import synthetic_images
from fastcifar.cli import app
from fastcifar.command_config import LrFindConfig
from fastcifar.config import DEFAULT_RECIPE, NO_AUGMENT, Device, LoaderConfig, Precision, recipe
from fastcifar.device import DeviceStep, plan_precision
from fastcifar.errors import FastCifarError
from fastcifar.model import CustResNet
from fastcifar.range_test import lr_find, run_range_test, suggest_lrs, train_settings


def test_suggestion_is_the_steepest_descent_before_the_lowest_loss():
    lrs = np.logspace(-6, 1, 71)  # ten points per decade
    # Falls fastest at 1e-3, lowest near 1e-1, then climbs steeply (the divergence).
    losses = 2.3 - 1.5 / (1 + np.exp(-(np.log10(lrs) + 3) * 3)) + np.maximum(lrs - 0.1, 0) * 5
    suggested, second_opinion = suggest_lrs(lrs.tolist(), losses.tolist())
    assert suggested == pytest.approx(1e-3, rel=0.01)
    lowest = lrs[np.argmin(losses)]
    assert second_opinion == pytest.approx(lowest / 10) and 1e-3 < lowest <= 0.2


def test_suggestion_of_a_loss_that_never_falls_is_its_flattest_point():
    lrs = np.logspace(-5, 0, 20)
    # rises all the way, most slowly at step 7 (a cubic's flat point)
    losses = 2 + ((np.arange(20) - 7) / 10) ** 3
    suggested, second_opinion = suggest_lrs(lrs.tolist(), losses.tolist())
    assert suggested == lrs[7] and second_opinion == pytest.approx(lrs[0] / 10)
    with pytest.raises(FastCifarError, match="finite"):
        suggest_lrs([1e-3, 1e-2, 1e-1], [1.0, math.nan, math.inf])


def test_range_test_leaves_weights_and_optimizer_as_they_were():
    torch.manual_seed(0)
    model = CustResNet(num_classes=3).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    weights_before = copy.deepcopy(model.state_dict())  # parameters and BN statistics
    optimizer_before = copy.deepcopy(optimizer.state_dict())
    labels = np.arange(12) % 3
    images = torch.from_numpy(synthetic_images(labels, seed=1)).permute(0, 3, 1, 2)
    # Three batches of four for ten steps: the loader is restarted when it runs out.
    batches = [(images[i:i + 4], torch.from_numpy(labels[i:i + 4])) for i in range(0, 12, 4)]
    device = torch.device("cpu")
    step = DeviceStep([128.0] * 3, [64.0] * 3, device, channels_last=True)
    config = LrFindConfig(start_lr=1e-5, end_lr=1.0, iterations=10)
    lrs, losses = run_range_test(model, optimizer, batches, step,
                                 plan_precision(Precision.bf16, device), config)

    assert 2 <= len(lrs) <= 10 and len(losses) == len(lrs)
    assert lrs[0] == pytest.approx(1e-5) and all(b > a for a, b in zip(lrs, lrs[1:], strict=False))
    assert all(math.isfinite(loss) for loss in losses)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights_before[name]), name
    assert optimizer.state_dict() == optimizer_before  # no Adam moments, the original LR
    assert optimizer.param_groups[0]["lr"] == 1e-3


def test_range_test_steps_each_group_at_the_swept_lr_times_its_scale():
    torch.manual_seed(0)
    model = CustResNet(num_classes=3)
    shifts = [module.bias for module in model.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    others = [p for p in model.parameters() if all(p is not shift for shift in shifts)]
    optimizer = torch.optim.SGD([{"params": others, "lr_scale": 1.0},
                                 {"params": shifts, "lr_scale": 64.0}], lr=1e-3)
    stepped_at = []  # each step's group LRs, seen by a hook that runs inside the step
    optimizer.register_step_post_hook(
        lambda optimizer, args, kwargs: stepped_at.append(
            [group["lr"] for group in optimizer.param_groups]))
    labels = np.arange(8) % 3
    images = torch.from_numpy(synthetic_images(labels, seed=2)).permute(0, 3, 1, 2)
    batches = [(images, torch.from_numpy(labels))]
    step = DeviceStep([128.0] * 3, [64.0] * 3, torch.device("cpu"), channels_last=False)
    config = LrFindConfig(start_lr=1e-5, end_lr=1e-2, iterations=10)
    lrs, _ = run_range_test(model, optimizer, batches, step,
                            plan_precision(Precision.fp32, torch.device("cpu")), config)
    assert len(stepped_at) == len(lrs) == 10
    for swept, (main, shift) in zip(lrs, stepped_at, strict=True):
        assert main == pytest.approx(swept) and shift == pytest.approx(64 * swept)
    assert [group["lr"] for group in optimizer.param_groups] == [1e-3, 1e-3]  # put back
    optimizer.step()  # the hooks are gone once the test is over
    assert stepped_at[-1] == [1e-3, 1e-3]


def test_lr_find_on_the_real_loader_writes_plot_and_history(tiny_dataset, tmp_path, check_png):
    # Batches of 4, not tiny_train's 8: where bf16 is emulated each image costs ~0.5 s.
    train_config = tiny_train(tiny_dataset, "seed", precision=Precision.bf16)
    train_config = dataclasses.replace(train_config, loader=dataclasses.replace(
        train_config.loader, batch_size=4))
    config = LrFindConfig(train=train_config, start_lr=1e-5, end_lr=1.0, iterations=12,
                          out_dir=tmp_path / "lr")
    steps = []
    result = lr_find(config, progress=lambda done, total: steps.append((done, total)))

    assert len(result.lrs) == len(result.losses) and 2 <= len(result.lrs) <= 12
    assert all(b > a for a, b in zip(result.lrs, result.lrs[1:], strict=False))
    assert all(math.isfinite(loss) for loss in result.losses)
    # the exponential sweep from 1e-5 to 1 over the 12 steps, as far as it went
    expected_lrs = 1e-5 * 1e5 ** (np.arange(len(result.lrs)) / 11)
    assert result.lrs == pytest.approx(expected_lrs.tolist(), rel=1e-9)
    # the suggestions are those of the recorded history
    assert (result.suggested_lr, result.min_loss_lr_over_10) == suggest_lrs(result.lrs,
                                                                            result.losses)
    assert result.min_loss_lr_over_10 == result.lrs[int(np.argmin(result.losses))] / 10
    assert steps[0] == (1, 12) and steps[-1][0] == len(result.lrs)
    assert result.precision == "bf16" and result.device == "cpu"
    check_png(result.plot_path)
    with open(result.history_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(row["lr"]) for row in rows] == pytest.approx(result.lrs, rel=1e-5)
    saved = json.loads(result.json_path.read_text())
    assert saved["suggested_lr"] == result.suggested_lr and saved["batch_size"] == 4
    assert saved["losses"] == result.losses and saved["config"]["iterations"] == 12


def test_range_test_sweeps_with_muon_and_its_filter_normalization_off(tmp_path):
    # The sweep drives SGD's LR alone: a Muon recipe with normalised filters must still build.
    config = LrFindConfig(train=recipe("express-progressive", muon_normalize_filters=True),
                          start_lr=1e-5, end_lr=1.0, iterations=12, out_dir=tmp_path)
    settings = train_settings(config)
    assert settings.muon_lr == 0.0 and not settings.muon_normalize_filters


def tiny_train(data_dir, recipe_name: str, **changes):
    return dataclasses.replace(recipe(recipe_name), loader=LoaderConfig(
        data_dir=data_dir, batch_size=8, workers=1), augment=NO_AUGMENT, device=Device.cpu,
        **changes)


@pytest.mark.parametrize("recipe_name", ["express", "fast", "seed"])
def test_range_test_uses_the_recipes_optimizer_loss_and_model(tiny_dataset, tmp_path,
                                                             monkeypatch, recipe_name):
    seen = {}

    class SpyFinder(fastcifar.range_test.LRFinder):
        def __init__(self, model, optimizer, criterion, **kwargs):
            seen.update(model=model, optimizer=optimizer, criterion=criterion)
            super().__init__(model, optimizer, criterion, **kwargs)

    monkeypatch.setattr(fastcifar.range_test, "LRFinder", SpyFinder)
    lr_find(LrFindConfig(train=tiny_train(tiny_dataset, recipe_name), start_lr=1e-5, end_lr=1e-2,
                         iterations=10, out_dir=tmp_path))
    expected = recipe(recipe_name)
    optimizer = seen["optimizer"]
    assert type(optimizer).__name__.lower() == expected.optimizer.value
    decays = sorted({group["weight_decay"] for group in optimizer.param_groups})
    if expected.bn_bias_lr_scale != 1:  # express: BN shifts decay / that scale
        assert decays == [expected.weight_decay / expected.bn_bias_lr_scale,
                          expected.weight_decay]
    else:
        assert decays == ([expected.weight_decay] if expected.decay_norm
                          else [0.0, expected.weight_decay])  # BN scales/shifts undecayed
    if expected.optimizer.value == "sgd":
        assert optimizer.param_groups[0]["momentum"] == expected.momentum
        assert optimizer.param_groups[0]["nesterov"] == expected.nesterov
    assert seen["criterion"].label_smoothing == expected.label_smoothing
    assert seen["model"].logit_scale == expected.logit_scale
    if expected.whiten:  # the prep conv whitened on train images, as train fits it
        from fastcifar.model import WhitenedConv2d

        assert isinstance(seen["model"].prep.layers[0], WhitenedConv2d)


def test_lr_find_default_is_what_train_runs_with_no_options():
    """From Python as from the CLI, no recipe named means the same run: the range test's
    default is the config `fastcifar train` builds from no options, and the API's."""
    from fastcifar.api import train_config
    from fastcifar.command_config import TimeToAccuracyConfig
    from fastcifar.train_options import build_train_config

    cli_default = build_train_config()
    assert LrFindConfig().train == cli_default == train_config()
    assert TimeToAccuracyConfig().train == cli_default
    assert cli_default == recipe(DEFAULT_RECIPE)


def test_lr_find_config_rejects_a_backwards_range():
    with pytest.raises(FastCifarError, match="start LR"):
        LrFindConfig(start_lr=1.0, end_lr=1e-3)


def test_lr_find_finds_an_output_it_cannot_write_before_it_sweeps(tiny_dataset, tmp_path,
                                                                   monkeypatch):
    # It swept first, then wrote the plot and the CSV and failed at the JSON: half a set.
    import fastcifar.range_test

    monkeypatch.setattr(fastcifar.range_test, "build_loaders", None)  # sweeping would fail
    (tmp_path / "out" / "lr_find.json").mkdir(parents=True)
    result = CliRunner().invoke(app, ["lr-find", "--data", str(tiny_dataset),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 74 and "lr_find.json: it is a folder" in result.output
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["lr_find.json"]


def test_lr_find_refuses_a_zero_batch_size(tmp_path):
    result = CliRunner().invoke(app, ["lr-find", "--batch-size", "0", "--data", str(tmp_path),
                                      "--out", str(tmp_path / "out")])
    # The project's own refusal, not Typer's "No such option" or a usage error.
    assert result.exit_code == 1 and "batch size must be positive, got 0" in result.output
    assert "No such option" not in result.output and not (tmp_path / "out").exists()


def test_lr_find_command_prints_the_suggestion(tiny_dataset, tmp_path):
    result = CliRunner().invoke(app, [
        "lr-find", "--iters", "10", "--batch-size", "8", "--start-lr", "1e-5", "--end-lr", "1",
        "--no-augment", "--data", str(tiny_dataset), "--workers", "1", "--device", "cpu",
        "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "suggested max LR" in result.output and (tmp_path / "lr_find.png").is_file()
    assert "express-progressive recipe (sgd, weight decay 0.0005)" in result.output  # default
    assert json.loads((tmp_path / "lr_find.json").read_text())["recipe"] == "express-progressive"
    seed = CliRunner().invoke(app, [
        "lr-find", "--recipe", "seed", "--iters", "10", "--batch-size", "8", "--start-lr", "1e-5",
        "--end-lr", "1", "--data", str(tiny_dataset), "--workers", "1", "--device", "cpu",
        "--out", str(tmp_path / "seed")])
    assert seed.exit_code == 0, seed.output
    assert "seed recipe (adam, weight decay 0.0001)" in seed.output
    too_few = CliRunner().invoke(app, ["lr-find", "--iters", "3", "--data", str(tiny_dataset)])
    assert too_few.exit_code == 1 and "at least 10 iterations" in too_few.output


def test_train_max_lr_auto_runs_the_range_test_for_the_same_training_config(tmp_path,
                                                                            monkeypatch):
    from types import SimpleNamespace

    from fastcifar.train_options import _with_found_lr

    seen = []

    def fake_lr_find(config):
        seen.append(config)
        return SimpleNamespace(suggested_lr=0.123, plot_path=tmp_path / "lr_find.png")

    monkeypatch.setattr(fastcifar.range_test, "lr_find", fake_lr_find)
    config = dataclasses.replace(recipe("seed"), out_dir=tmp_path)
    found = _with_found_lr(config)
    assert seen[0].train == config and seen[0].out_dir == tmp_path / "lr-find"
    assert found.max_lr == 0.123 and found.optimizer == config.optimizer



@pytest.mark.parametrize("optimizer", [None, "adam"])
def test_a_muon_recipe_is_swept_without_muon_on_every_parameter(tiny_dataset, tmp_path,
                                                               monkeypatch, optimizer):
    seen = {}

    class SpyFinder(fastcifar.range_test.LRFinder):
        def __init__(self, model, optimizer, criterion, **kwargs):
            seen.update(model=model, optimizer=optimizer)
            super().__init__(model, optimizer, criterion, **kwargs)

    monkeypatch.setattr(fastcifar.range_test, "LRFinder", SpyFinder)
    result = CliRunner().invoke(app, [
        "lr-find", "--recipe", "express-muon", "--iters", "10", "--batch-size", "8", "--start-lr",
        "1e-5", "--end-lr", "1", "--no-augment", "--data", str(tiny_dataset), "--workers", "1",
        "--device", "cpu", "--out", str(tmp_path)] + (["--optimizer", optimizer] if optimizer
                                                     else []))
    assert result.exit_code == 0, result.output
    # SGD, the recipe's own: Muon keeps its LR; Adam (which Muon does not pair with): no Muon
    assert ("Muon was off for the sweep" in result.output) == (optimizer is None)
    assert ("--muon-lr 0.24" in result.output) == (optimizer is None)
    swept = {id(p) for group in seen["optimizer"].param_groups for p in group["params"]}
    trainable = {id(p) for p in seen["model"].parameters() if p.requires_grad}
    expected = torch.optim.Adam if optimizer == "adam" else torch.optim.SGD
    assert isinstance(seen["optimizer"], expected) and swept == trainable
