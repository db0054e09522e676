"""Data selection: the proxy's hardest images train, the proxy trains on all, resume keeps it."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from fastcifar.checkpoint import load_checkpoint
from fastcifar.config import AugmentConfig, LoaderConfig, Precision, recipe
from fastcifar.device import plan_precision
from fastcifar.errors import FastCifarError
from fastcifar.model import CustResNet
from fastcifar.selection import BatchSelection, batch_selection, hardest
from fastcifar.train_options import build_train_config
from fastcifar.training import TrainCallbacks, train

CPU = torch.device("cpu")


def _selecting_config(**changes):
    return recipe("express-progressive", epochs=4, select_fraction=0.5, **changes)


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


def test_the_proxy_is_custresnet_at_a_quarter_width_about_a_sixteenth_of_its_parameters():
    selection = BatchSelection(_selecting_config(), CPU, num_classes=10, steps_per_epoch=5)
    proxy_parameters = sum(p.numel() for p in selection.proxy.parameters())
    full_parameters = sum(p.numel() for p in CustResNet().parameters())
    assert full_parameters == 6_573_130
    assert 1 / 20 < proxy_parameters / full_parameters < 1 / 12
    assert selection.optimizers.muon is not None  # the run's own optimisers, Muon included


def test_no_selection_at_fraction_one_and_fractions_outside_zero_one_refused():
    model = CustResNet()
    assert batch_selection(recipe("express-progressive"), model, 5) is None
    assert batch_selection(_selecting_config(), model, 5) is not None
    for fraction in (0.0, 1.5):
        with pytest.raises(FastCifarError, match="select fraction"):
            recipe("express-progressive", select_fraction=fraction)


def _tiny(data_dir, tmp_path, **changes):
    base = recipe("express-progressive", epochs=2, select_fraction=0.5, make_plots=False,
                  loader=LoaderConfig(data_dir=data_dir, batch_size=16, workers=1),
                  augment=AugmentConfig(cutout_size=4), precision=Precision.fp32,
                  out_dir=tmp_path / "runs", weights_dir=tmp_path / "weights",
                  eval_from_epoch=1, tensorboard=False, tta=False, tta_shifts=False)
    return dataclasses.replace(base, **changes)


def test_a_selecting_run_steps_on_half_of_each_batch_and_resumes_as_if_never_stopped(
        tiny_dataset, tmp_path):
    full = train(_tiny(tiny_dataset, tmp_path / "a"))
    first = full.history[0]
    assert first.steps == 120 // 16  # one step per loader batch (120 train images)
    # The epoch's images/s count the images trained on: 8 of each 16.
    assert first.images_per_second * first.train_seconds == pytest.approx(8 * first.steps)
    with pytest.raises(_Stop):  # a crash right after epoch 1's checkpoint
        train(_tiny(tiny_dataset, tmp_path / "b"), callbacks=_StopAfterEpoch(1))
    (checkpoint,) = (tmp_path / "b" / "runs").glob("*/last.pt")
    assert load_checkpoint(checkpoint)["selection"]["model"]  # the proxy is saved
    resumed = train(_tiny(tiny_dataset, tmp_path / "b", resume=checkpoint))
    assert [row.train_loss for row in resumed.history] == [row.train_loss for row in full.history]
    assert ([row.test_accuracy for row in resumed.history]
            == [row.test_accuracy for row in full.history])


class _StopAfterEpoch(TrainCallbacks):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch(self, stats) -> None:
        if stats.epoch == self.epoch:
            raise _Stop


class _Stop(Exception):
    pass


def test_select_fraction_option_sets_the_config_and_its_absence_keeps_the_recipes():
    assert build_train_config(select_fraction=0.5).select_fraction == 0.5
    assert build_train_config().select_fraction == 1.0
