"""Data selection: the proxy's hardest images train, the proxy trains on all, resume keeps it."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from test_train import _Stop, _StopAfterEpoch
from torch import nn

from fastcifar.checkpoint import load_checkpoint
from fastcifar.command_config import LrFindConfig
from fastcifar.config import AugmentConfig, LoaderConfig, Precision, recipe
from fastcifar.device import DeviceStep, plan_precision
from fastcifar.errors import FastCifarError
from fastcifar.model import CustResNet, WhitenedConv2d, build_model
from fastcifar.range_test import train_settings
from fastcifar.run_setup import warm_up
from fastcifar.selection import DIVERGENCE_CHECK_CALLS, BatchSelection, batch_selection, hardest
from fastcifar.train_options import build_train_config
from fastcifar.training import train

CPU = torch.device("cpu")


def _selecting_config(**changes):
    """The default recipe selecting half of each batch; unwhitened unless asked (whitening
    fits on train images)."""
    return recipe("express-progressive", epochs=4, select_fraction=0.5,
                  **{"whiten": False, **changes})


def test_hardest_keeps_the_largest_losses_largest_first_and_at_least_one():
    losses = torch.tensor([0.1, 2.0, 0.5, 3.0, 1.0, 0.2])
    assert hardest(losses, 0.5).tolist() == [3, 1, 4]
    assert hardest(losses, 0.01).tolist() == [3]
    assert hardest(losses, 1.0).tolist() == [3, 1, 4, 2, 5, 0]


def test_selection_returns_the_images_the_proxy_scored_hardest_and_steps_the_proxy():
    torch.manual_seed(0)
    selection = BatchSelection(_selecting_config(), CPU, num_classes=10, steps_per_epoch=5)
    images = torch.randn(16, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (16,))
    before = copy.deepcopy(selection.proxy).train()
    with torch.no_grad():
        losses = nn.functional.cross_entropy(before(images), labels, reduction="none")
    expected = torch.topk(losses, 8).indices
    plan = plan_precision(Precision.fp32, CPU)
    chosen_images, chosen_labels = selection(images, labels, plan,
                                             torch.amp.GradScaler("cpu", enabled=False))
    assert torch.equal(chosen_images, images[expected])
    assert torch.equal(chosen_labels, labels[expected])
    assert chosen_images.is_contiguous(memory_format=torch.channels_last)
    moved = [not torch.equal(a, b) for a, b in zip(before.parameters(),
                                                    selection.proxy.parameters(), strict=True)]
    assert any(moved)  # the proxy took its step on the whole batch


@pytest.mark.full_width
def test_the_proxy_is_custresnet_at_a_quarter_width_about_a_sixteenth_of_its_parameters():
    selection = BatchSelection(_selecting_config(), CPU, num_classes=10, steps_per_epoch=5)
    proxy_parameters = sum(p.numel() for p in selection.proxy.parameters())
    full_parameters = sum(p.numel() for p in CustResNet().parameters())
    assert full_parameters == 6_573_130
    assert 1 / 20 < proxy_parameters / full_parameters < 1 / 12
    assert selection.optimizers.muon is not None  # the run's own optimisers, Muon included


def test_the_proxy_is_whitened_on_the_images_that_whiten_the_model():
    config = _selecting_config(whiten=True)
    images = torch.randn(64, 3, 32, 32)
    selection = BatchSelection(config, CPU, 10, 5, whitening_images=images)
    model = build_model(config, CPU, images)
    proxy_prep, model_prep = selection.proxy.prep.layers[0], model.prep.layers[0]
    assert isinstance(proxy_prep, WhitenedConv2d) and isinstance(model_prep, WhitenedConv2d)
    torch.testing.assert_close(proxy_prep.whitening, model_prep.whitening)  # the same fit


def test_no_selection_at_fraction_one_and_fractions_outside_zero_one_refused():
    model = CustResNet()
    assert batch_selection(recipe("express-progressive"), model, 5, None) is None
    assert batch_selection(_selecting_config(), model, 5, None) is not None
    for fraction in (0.0, 1.5):
        with pytest.raises(FastCifarError, match="select fraction"):
            recipe("express-progressive", select_fraction=fraction)


def _tiny(data_dir, tmp_path, **changes):
    """A 2-epoch selecting run on 48 of the tiny set's train images: 3 loader batches of 16 an
    epoch, each trained on its 8 hardest."""
    base = recipe("express-progressive", epochs=2, select_fraction=0.5, make_plots=False,
                  loader=LoaderConfig(data_dir=data_dir, batch_size=16, workers=1,
                                      train_subset=48),
                  augment=AugmentConfig(cutout_size=4), precision=Precision.fp32,
                  out_dir=tmp_path / "runs", weights_dir=tmp_path / "weights",
                  eval_from_epoch=1, tensorboard=False, tta=False, tta_shifts=False)
    return dataclasses.replace(base, **changes)


def test_a_selecting_run_steps_on_half_of_each_batch_and_resumes_as_if_never_stopped(
        tiny_dataset, tmp_path):
    full = train(_tiny(tiny_dataset, tmp_path / "a"))
    first = full.history[0]
    assert first.steps == 48 // 16  # one step per loader batch
    # The epoch's images/s count the images trained on: 8 of each 16.
    assert first.images_per_second * first.train_seconds == pytest.approx(8 * first.steps)
    with pytest.raises(_Stop):  # a crash right after epoch 1's checkpoint
        train(_tiny(tiny_dataset, tmp_path / "b"), callbacks=_StopAfterEpoch(1))
    (checkpoint,) = (tmp_path / "b" / "runs").glob("*/last.pt")
    saved = load_checkpoint(checkpoint)
    assert saved["selection"]["model"]  # the proxy is saved, and its loss scaler apart
    assert "proxy_scaler" in saved and "scaler" in saved
    resumed = train(_tiny(tiny_dataset, tmp_path / "b", resume=checkpoint))
    assert [row.train_loss for row in resumed.history] == [row.train_loss for row in full.history]
    assert ([row.test_accuracy for row in resumed.history]
            == [row.test_accuracy for row in full.history])


def test_select_fraction_option_sets_the_config_and_its_absence_keeps_the_recipes():
    assert build_train_config(select_fraction=0.5).select_fraction == 0.5
    assert build_train_config().select_fraction == 1.0


def test_the_lr_range_test_refuses_a_selecting_run_it_would_not_match():
    with pytest.raises(FastCifarError, match="with --select-fraction give --max-lr a number"):
        train_settings(LrFindConfig(train=_selecting_config()))
    assert train_settings(LrFindConfig(train=recipe("express-progressive"))).muon_lr == 0.0


def test_a_diverged_proxy_stops_the_run_with_one_line():
    selection = BatchSelection(_selecting_config(), CPU, num_classes=10, steps_per_epoch=40)
    with torch.no_grad():
        selection.proxy.fc.weight.fill_(float("nan"))
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    plan, scaler = plan_precision(Precision.fp32, CPU), torch.amp.GradScaler("cpu", enabled=False)
    with pytest.raises(FastCifarError, match="proxy diverged"):
        for _ in range(DIVERGENCE_CHECK_CALLS):
            selection(images, labels, plan, scaler)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_the_proxy_updates_its_own_loss_scale():
    # fp16 runs: a proxy overflow lowers the scale the proxy was given (its own; the model's
    # is another, ModelTrainer.proxy_scaler), and the proxy's step is skipped (its schedule
    # steps anyway, which torch warns of).
    selection = BatchSelection(_selecting_config(), CPU, num_classes=10, steps_per_epoch=40)
    with torch.no_grad():
        selection.proxy.fc.weight.fill_(float("inf"))
    before = copy.deepcopy(selection.proxy)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    selection(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)),
              plan_precision(Precision.fp32, CPU), scaler)
    assert scaler.get_scale() == 512.0
    assert all(torch.equal(a, b) for a, b in zip(before.parameters(),
                                                  selection.proxy.parameters(), strict=True))


def test_the_trainer_gives_the_proxy_a_scaler_apart_from_the_models(tiny_dataset, tmp_path,
                                                                     monkeypatch):
    from fastcifar.data.loaders import build_loaders
    from fastcifar.distributed import Distributed
    from fastcifar.model_trainer import ModelTrainer

    given = []
    real_call = BatchSelection.__call__

    def recording_call(selection, images, labels, plan, scaler):
        given.append(scaler)
        return real_call(selection, images, labels, plan, scaler)

    monkeypatch.setattr(BatchSelection, "__call__", recording_call)
    config = _tiny(tiny_dataset, tmp_path)
    loaders = build_loaders(config.loader, config.augment, config.seed, device=CPU)
    trainer = ModelTrainer(config, loaders, CPU, plan_precision(config.precision, CPU),
                           Distributed(), None)

    class Ignored:  # the step's sums and TensorBoard log
        enabled = False

        def add(self, *values) -> None: ...

        def step(self, *values) -> None: ...

    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    trainer.step(images, torch.arange(16) % 3, Ignored(), Ignored())
    assert given == [trainer.proxy_scaler] and trainer.proxy_scaler is not trainer.scaler


def test_warm_up_runs_the_model_at_the_kept_size_and_the_proxy_whole_then_restores_both():
    # compile: the warm-up runs on the CPU too; dropout: its draws must not move the RNG
    config = _selecting_config(compile=True, dropout=0.1)
    model = build_model(config, CPU)
    selection = BatchSelection(config, CPU, 10, 5)
    sizes: dict[str, set[int]] = {"model": set(), "proxy": set()}
    model.register_forward_hook(lambda _m, args, _o: sizes["model"].add(len(args[0])))
    selection.proxy.register_forward_hook(lambda _m, args, _o: sizes["proxy"].add(len(args[0])))
    before = [{k: v.clone() for k, v in net.state_dict().items()}
              for net in (model, selection.proxy)]
    step = DeviceStep([120.0] * 3, [60.0] * 3, CPU, True)
    sample = (torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.arange(8) % 10)
    rng_before = torch.get_rng_state()
    warm_up(model, model, config, CPU, plan_precision(Precision.fp32, CPU), step, sample,
            selection)
    # steps on the kept 4; the test pass (TTA passes keep the batch size) on the whole sample
    assert sizes["model"] == {4, 8} and sizes["proxy"] == {8}
    for net, state in zip((model, selection.proxy), before, strict=True):
        assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
        assert net.training
    assert torch.equal(torch.get_rng_state(), rng_before)  # a resumed run draws as one not


def test_a_selecting_run_learns_in_bf16(tiny_dataset, tmp_path):
    # The CPU twin of test_gpu.py's fp16 selecting run (its recipe and assertions), with one
    # test pass without TTA, at the end: where bf16 is emulated, each pass costs ~10 s.
    config = recipe("fast", epochs=3, max_lr=0.05, make_plots=False, select_fraction=0.5,
                    loader=LoaderConfig(data_dir=tiny_dataset, batch_size=24, workers=1),
                    augment=AugmentConfig(cutout_size=4), out_dir=tmp_path / "runs",
                    weights_dir=tmp_path / "weights", precision=Precision.bf16,
                    tta=False, tensorboard=False)
    result = train(config)
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.history[-1].test_accuracy > 0.5  # 3 classes: chance is 1/3
    assert json.loads((result.run_dir / "run.json").read_text())["precision"] == "bf16"
