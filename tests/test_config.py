"""config: settings are refused when out of range, never silently changed later."""

from __future__ import annotations

import numpy as np
import pytest

from fastcifar.config import MAX_CUTOUTS, AugmentConfig, recipe
from fastcifar.data.augment import augment_batch, fill_colour
from fastcifar.errors import FastCifarError


def test_pct_start_above_half_is_refused_not_clamped():
    assert recipe("fast", pct_start=0.5).pct_start == 0.5
    with pytest.raises(FastCifarError, match=r"pct_start must be in \(0, 0.5\], got 0.6"):
        recipe("fast", pct_start=0.6)


def test_cutout_count_limit_is_the_kernels():
    images = np.full((4, 32, 32, 3), 200, np.uint8)
    config = AugmentConfig(pad=0, flip=False, cutout_size=1, cutout_count=MAX_CUTOUTS)
    out = augment_batch(images, np.arange(4), config, 0, fill_colour([0, 0, 0]))
    holes = (out == 0).all(axis=3).sum(axis=(1, 2))
    # every allowed hole is drawn (1-pixel holes; two may land on the same pixel)
    assert holes.max() == MAX_CUTOUTS and holes.min() >= MAX_CUTOUTS - 2
    with pytest.raises(FastCifarError, match=f"cutout count must be in 0..{MAX_CUTOUTS}"):
        AugmentConfig(cutout_count=MAX_CUTOUTS + 1)


def test_train_sizes_ramp_from_the_start_side_to_32_and_end_at_32():
    from fastcifar.config import TrainConfig

    def sizes(epochs: int, start: int, ramp: float) -> list[int]:
        config = TrainConfig(epochs=epochs, train_size_start=start, train_size_ramp=ramp)
        return [config.train_image_size(epoch) for epoch in range(epochs)]

    assert sizes(5, 20, 0.6) == [20, 24, 28, 32, 32]
    assert sizes(6, 20, 0.6) == [20, 24, 28, 28, 32, 32]
    assert sizes(3, 32, 0.6) == [32, 32, 32]  # 32: off
    assert sizes(4, 20, 0.0) == [32] * 4  # no ramp: off
    assert sizes(2, 16, 0.99) == [16, 32]  # the last epoch is always at 32 px
    assert sizes(1, 16, 0.9) == [32]


@pytest.mark.parametrize("changes", [{"train_size_start": 4}, {"train_size_start": 40},
                                     {"train_size_ramp": 1.0}, {"train_size_ramp": -0.1}])
def test_train_size_settings_out_of_range_are_refused(changes):
    from fastcifar.config import TrainConfig

    with pytest.raises(FastCifarError, match="train size"):
        TrainConfig(**changes)


def test_library_configs_without_a_recipe_named_use_the_default_recipe():
    from fastcifar.command_config import LrFindConfig, TimeToAccuracyConfig
    from fastcifar.config import DEFAULT_RECIPE

    assert TimeToAccuracyConfig().train == recipe(DEFAULT_RECIPE)
    assert LrFindConfig().train == recipe(DEFAULT_RECIPE)


def test_the_default_recipe_normalizes_muons_filters_at_half_its_lr_from_12_epochs():
    # The long-budget row (92.55% median of 3 seeds at 24 epochs on an H200, against 92.11%;
    # +0.86 on held-out images at 12 epochs)
    from fastcifar.config import DEFAULT_RECIPE, RECIPES

    base = RECIPES[DEFAULT_RECIPE]
    for epochs in (6, 11):
        short = recipe(DEFAULT_RECIPE, epochs=epochs)
        assert (short.muon_lr, short.muon_normalize_filters) == (base.muon_lr, False) == (0.24,
                                                                                         False)
    for long in (recipe(DEFAULT_RECIPE, epochs=12), recipe(DEFAULT_RECIPE, epochs=24),
                 recipe(DEFAULT_RECIPE)):  # its own 24
        assert (long.muon_lr, long.muon_normalize_filters) == (0.12, True)
    assert recipe(DEFAULT_RECIPE).epochs == 24
    assert not recipe(DEFAULT_RECIPE, epochs=24, muon_normalize_filters=False).muon_normalize_filters


def test_budget_rows_follow_the_epochs_and_give_way_to_explicit_settings(monkeypatch):
    import fastcifar.config as config_module
    from fastcifar.command_config import TimeToAccuracyConfig
    from fastcifar.config import RECIPES

    monkeypatch.setitem(config_module.BUDGET_SETTINGS, "express-progressive",
                        ((12, {"augment__pad": 4}), (20, {"label_smoothing": 0.1})))
    short, middle, long = (recipe("express-progressive", epochs=epochs) for epochs in (6, 12, 24))
    base = RECIPES["express-progressive"]
    assert (short.augment.pad, short.label_smoothing) == (base.augment.pad, base.label_smoothing)
    assert (middle.augment.pad, middle.label_smoothing) == (4, base.label_smoothing)
    assert (long.augment.pad, long.label_smoothing) == (4, 0.1) and long.epochs == 24
    assert recipe("express-progressive").augment.pad == 4  # the recipe's own 24 epochs
    assert recipe("express-progressive", epochs=24, label_smoothing=0.3).label_smoothing == 0.3
    assert recipe("express-muon", epochs=24).augment.pad == RECIPES["express-muon"].augment.pad
    with pytest.raises(FastCifarError, match="run one --epochs per budget"):
        TimeToAccuracyConfig(train=long, budgets=(6, 24))
    TimeToAccuracyConfig(train=recipe("fast"), budgets=(6, 24))  # no rows: budgets allowed
    TimeToAccuracyConfig(train=short, budgets=(4, 6))  # the same rows (none): allowed
    # The budgets share their settings but not --epochs' (24 unless given): the line says
    # which --epochs serves them.
    with pytest.raises(FastCifarError, match=r"those of --epochs 24: give --epochs 8 \(they"):
        TimeToAccuracyConfig(train=long, budgets=(6, 8))
