"""The Python API: `import fastcifar` gives convert, train, lr_find, evaluate and predict with
plain keyword arguments; predict takes paths, Pillow images and uint8 arrays alike."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import fastcifar
from fastcifar.api import EpochBars
from fastcifar.cli import app
from fastcifar.config import DEFAULT_RECIPE, Device, OptimizerName, PadMode, Precision, recipe
from fastcifar.errors import FastCifarError


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("api")
    result = fastcifar.train(epochs=2, recipe_name="fast", data=tiny_dataset, batch_size=24,
                             workers=1, precision=Precision.fp32, max_lr=0.05, tta=False,
                             make_plots=False, out_dir=folder / "runs",
                             weights_dir=folder / "weights", progress=False)
    return result


def test_train_returns_the_history_and_the_weights(trained):
    assert [row.epoch for row in trained.history] == [1, 2]
    assert trained.final_weights.is_file() and trained.run_dir.is_dir()
    assert trained.history[-1].test_accuracy is not None


def test_train_config_is_the_recipe_at_the_budget_with_the_settings_given(tiny_dataset):
    config = fastcifar.train_config(epochs=6, data=tiny_dataset, augment__pad=3, seed=4)
    assert config == recipe(DEFAULT_RECIPE, epochs=6, seed=4, loader=config.loader,
                            augment=config.augment)
    assert config.augment.pad == 3 and config.loader.data_dir == tiny_dataset
    with pytest.raises(FastCifarError, match="unknown train setting"):
        fastcifar.train_config(learning_rate=0.1)
    # From 24 epochs the recipe normalizes Muon's filters; without Muon that goes too
    assert fastcifar.train_config(epochs=24).muon_normalize_filters
    assert not fastcifar.train_config(epochs=24, muon_lr=0).muon_normalize_filters
    # Adam on a Muon recipe turns Muon off, as `train --optimizer adam` does
    adam = fastcifar.train_config(epochs=24, optimizer="adam")
    assert adam.optimizer == "adam" and adam.muon_lr == 0 and not adam.muon_normalize_filters
    assert fastcifar.train_config(epochs=6, optimizer="sgd").muon_lr > 0
    with pytest.raises(FastCifarError, match="Muon pairs with SGD"):
        fastcifar.train_config(optimizer="adam", muon_lr=0.1)
    # Enum fields take their names, as on the command line
    named = fastcifar.train_config(device="cpu", precision="fp32", augment__pad_mode="constant")
    assert named.device is Device.cpu and named.precision is Precision.fp32
    assert named.augment.pad_mode is PadMode.constant and type(adam.optimizer) is OptimizerName
    with pytest.raises(FastCifarError, match="device must be one of .*cuda.*, got 'gpu'"):
        fastcifar.train_config(device="gpu")
    with pytest.raises(FastCifarError, match="device must be one of"):
        fastcifar.predict(np.zeros((32, 32, 3), np.uint8), device="gpu")


def test_predict_takes_paths_pillow_images_and_arrays_alike(trained, tiny_dataset, tmp_path):
    images, names = fastcifar.api.test_images(tiny_dataset, 6)
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8 and len(names) == 6
    paths = []
    for index, pixels in enumerate(images):
        paths.append(tmp_path / f"{index}.png")
        Image.fromarray(pixels).save(paths[-1])
    weights = trained.final_weights
    answers = [[row.top for row in fastcifar.predict(given, weights=weights, top_k=2,
                                                     device="cpu")]
               for given in (paths, [Image.fromarray(pixels) for pixels in images], images)]
    assert answers[0] == answers[1] == answers[2]
    cli = CliRunner().invoke(app, ["predict", *map(str, paths), "--weights", str(weights),
                                   "--top-k", "2", "--json", "--device", "cpu"])
    assert [[tuple(top.values()) for top in row["top"]]
            for row in json.loads(cli.stdout)["predictions"]] == [
        [tuple(pair) for pair in row] for row in answers[0]]
    # a list mixing the three kinds, as the README shows (an array in a list was refused)
    mixed = fastcifar.predict([paths[0], Image.fromarray(images[1]), images[2]], weights=weights,
                              top_k=2, device="cpu")
    assert [row.top for row in mixed] == answers[0][:3]
    assert [str(row.path) for row in mixed][1:] == ["image 1", "image 2"]
    single = fastcifar.predict(images[0], weights=weights, device="cpu")
    assert single[0].top == fastcifar.predict(images[:1], weights=weights, device="cpu")[0].top
    with pytest.raises(FastCifarError, match="uint8 RGB"):
        fastcifar.predict(images.astype(np.float32), weights=weights)
    with pytest.raises(FastCifarError, match=r"image 0: an empty image \(0x0 pixels\)"):
        fastcifar.predict(np.zeros((1, 0, 0, 3), np.uint8), weights=weights)  # scored "cat"
    with pytest.raises(FastCifarError, match=r"nowhere\.png: no such file or directory$"):
        fastcifar.predict(tmp_path / "nowhere.png", weights=weights)  # "corrupt or truncated"
    with pytest.raises(FastCifarError, match="count must be positive, got 0"):
        fastcifar.api.test_images(tiny_dataset, 0)
    with pytest.raises(FastCifarError, match="count 61 is more than the 60 test images"):
        fastcifar.api.test_images(tiny_dataset, 61)  # 60 of them, silently, before


def test_test_images_are_the_records_in_order_past_ffcvs_reused_batch_buffers(tiny_dataset,
                                                                            monkeypatch):
    import fastcifar.data.loaders as loaders

    real = loaders.make_loader  # batches of 4: the 60 test images fill FFCV's few buffers 3 times
    monkeypatch.setattr(loaders, "make_loader", lambda *args, **kwargs: real(
        *args, **{**kwargs, "batch_size": 4}))
    images, names = fastcifar.api.test_images(tiny_dataset, 60)
    monkeypatch.undo()
    whole, whole_names = fastcifar.api.test_images(tiny_dataset, 60)  # one batch of 512
    np.testing.assert_array_equal(images, whole)
    assert names == whole_names and len({image.tobytes() for image in images}) == 60


def test_evaluate_scores_the_weights_in_the_mode_asked(trained, tiny_dataset, tmp_path):
    report = fastcifar.evaluate(trained.final_weights, data=tiny_dataset, tta="flip",
                                out_dir=tmp_path, device="cpu")
    assert report.count == 60 and report.tta_mode == "flip" and report.json_path.is_file()


def test_the_entry_points_do_not_hide_the_modules():
    import fastcifar.training

    assert callable(fastcifar.train) and fastcifar.train is fastcifar.api.train
    assert fastcifar.training.train is not fastcifar.train
    with pytest.raises(AttributeError):
        fastcifar.no_such_thing  # noqa: B018


def test_the_notebook_header_names_the_optimisers_a_budget_row_set(capsys, tmp_path):
    EpochBars().on_train_start(recipe("express-progressive", epochs=12), 97,
                               "cpu", "bf16", tmp_path)
    header = capsys.readouterr().out
    assert "sgd max LR 0.8, Muon LR 0.12 on normalized filters" in header
    assert "12 epochs x 97 steps" in header and str(tmp_path) in header


def test_lr_find_takes_the_sweeps_range_and_mode_as_the_command_does(tiny_dataset, monkeypatch):
    # start_lr and end_lr went to TrainConfig before: "unknown train setting".
    import fastcifar.range_test

    seen = []
    monkeypatch.setattr(fastcifar.range_test, "lr_find", seen.append)
    fastcifar.lr_find(data=tiny_dataset, start_lr=1e-5, end_lr=1.0, mode="linear", iterations=20,
                      weight_decay=1e-3)
    (config,) = seen
    assert (config.start_lr, config.end_lr, config.mode, config.iterations) == (1e-5, 1.0,
                                                                                "linear", 20)
    assert config.train.weight_decay == 1e-3
