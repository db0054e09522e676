"""benchmarks/tta_variants.py: the shifts move the image, its plain and flip scores agree
with the train loop's own evaluation of the same weights, and flip+translate combines the
shifted mirror pairs with the right weights."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from conftest import sharpened_untrained_custresnet
from fastcifar.checkpoint import load_checkpoint
from fastcifar.config import LoaderConfig, Precision, recipe
from fastcifar.data.loaders import make_loader, read_metadata
from fastcifar.data.loaders import test_pipeline as image_pipeline_for_testing
from fastcifar.device import DeviceStep, plan_precision
from fastcifar.evaluation import evaluate_loader, model_from_weights
from fastcifar.training import train

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "tta_variants.py"


@pytest.fixture(scope="module")
def tta_variants():
    spec = importlib.util.spec_from_file_location("tta_variants", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shifts_move_the_image_one_pixel(tta_variants):
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4) + 1
    down_right = tta_variants.shifted(images, True, reflect=False)
    up_left = tta_variants.shifted(images, False, reflect=False)
    assert torch.equal(down_right[..., 1:, 1:], images[..., :-1, :-1])
    assert torch.equal(up_left[..., :-1, :-1], images[..., 1:, 1:])
    # the uncovered edge holds the normalised train mean (0) or the reflected neighbours
    assert down_right[..., 0, :].abs().sum() == 0 and up_left[..., :, -1].abs().sum() == 0
    reflected = tta_variants.shifted(images, True, reflect=True)
    assert torch.equal(reflected[..., 0, 1:], images[..., 1, :-1])


def test_plain_and_flip_scores_match_the_train_loop(tta_variants, tiny_dataset, tmp_path):
    config = recipe("fast", epochs=2, max_lr=0.05, make_plots=False, precision=Precision.fp32,
                    loader=LoaderConfig(data_dir=tiny_dataset, batch_size=24, workers=1),
                    out_dir=tmp_path / "runs", weights_dir=tmp_path / "weights")
    result = train(config)
    checkpoint = result.run_dir / "last.pt"
    row = tta_variants.score_variants(checkpoint, tiny_dataset, Precision.fp32)

    metadata = read_metadata(tiny_dataset)
    device = torch.device("cpu")
    model = model_from_weights({**load_checkpoint(checkpoint),
                                "class_names": metadata.class_names}, device, True)
    loader = make_loader(metadata.test_path, image_pipeline_for_testing(), config.loader, train=False,
                         subset=None, seed=0)
    step = DeviceStep(metadata.mean, metadata.std, device, True)
    plan = plan_precision(Precision.fp32, device)
    assert row["test_images"] == metadata.test_count
    assert row["accuracy"]["none"] == pytest.approx(evaluate_loader(model, loader, step, plan, False)[1])
    assert row["accuracy"]["flip"] == pytest.approx(evaluate_loader(model, loader, step, plan, True)[1])
    assert row["accuracy"]["flip"] == pytest.approx(result.history[-1].test_accuracy)
    assert row["trained_epochs"] == 2


def moved(images: torch.Tensor, down_right: bool) -> torch.Tensor:
    """Images moved one pixel down-right or up-left; the uncovered edge is 0 (the mean)."""
    out = torch.zeros_like(images)
    if down_right:
        out[..., 1:, 1:] = images[..., :-1, :-1]
    else:
        out[..., :-1, :-1] = images[..., 1:, 1:]
    return out


def test_flip_translate_weighs_the_mirror_pair_half_and_each_shifted_pair_a_quarter(
        tta_variants, tiny_dataset, tmp_path, monkeypatch):
    # A linear model: every pixel moves its logits, so the variants predict differently.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 3)).eval()
    metadata = read_metadata(tiny_dataset)
    loader = make_loader(metadata.test_path, image_pipeline_for_testing(),
                         LoaderConfig(data_dir=tiny_dataset, batch_size=60, workers=1),
                         train=False, subset=None, seed=0)
    [stored] = [images.clone() for images, _ in loader]  # FFCV reuses its buffers
    mean = torch.tensor(metadata.mean).view(1, 3, 1, 1)
    images = (stored.float() - mean) / torch.tensor(metadata.std).view(1, 3, 1, 1)

    def pair(batch: torch.Tensor) -> torch.Tensor:
        return (model(batch) + model(torch.flip(batch, dims=[3]))) / 2

    with torch.no_grad():
        logits = {"none": model(images), "flip": pair(images),
                  "flip+translate": pair(images) / 2 + pair(moved(images, True)) / 4
                  + pair(moved(images, False)) / 4}
    predictions = {name: value.argmax(1) for name, value in logits.items()}
    # Label each image with the prediction expected of flip+translate: that variant must
    # then score exactly 1, and any other arithmetic that changes one prediction scores less.
    labels = predictions["flip+translate"]
    monkeypatch.setattr(tta_variants, "model_from_weights", lambda *_, **__: model)
    monkeypatch.setattr(tta_variants, "make_loader", lambda *_, **__: [(stored, labels)])
    checkpoint = tmp_path / "linear.pt"
    torch.save({"model": {}, "epoch": 1, "config": {"augment": {"pad_mode": "constant"}}},
               checkpoint)
    row = tta_variants.score_variants(checkpoint, tiny_dataset, Precision.fp32)

    assert row["accuracy"]["flip+translate"] == 1.0
    for name in ("none", "flip"):
        assert row["accuracy"][name] == int((predictions[name] == labels).sum()) / 60, name
    assert row["accuracy"]["flip"] < 1  # the shifted pairs change predictions: the test can tell


def test_each_column_holds_its_own_mode(tta_variants, tiny_dataset, tmp_path):
    """Weights whose plain and flip accuracies differ: a swapped column shows."""
    from fastcifar.weights_file import save_weights_file

    model = sharpened_untrained_custresnet(logit_scale=0.5)  # its TTA modes disagree
    metadata = read_metadata(tiny_dataset)
    weights = tmp_path / "sharp.safetensors"
    save_weights_file(weights, model.state_dict(), {
        "class_names": metadata.class_names, "mean": metadata.mean, "std": metadata.std,
        "logit_scale": 0.5, "tta": "none"})
    row = tta_variants.score_variants(weights, tiny_dataset, Precision.fp32)
    device = torch.device("cpu")
    model.eval()
    loader = make_loader(metadata.test_path, image_pipeline_for_testing(),
                         LoaderConfig(data_dir=tiny_dataset, batch_size=24, workers=1),
                         train=False, subset=None, seed=0)
    step = DeviceStep(metadata.mean, metadata.std, device, True)
    plan = plan_precision(Precision.fp32, device)
    plain = evaluate_loader(model.to(memory_format=torch.channels_last), loader, step, plan,
                            False)[1]
    flip = evaluate_loader(model, loader, step, plan, True)[1]
    assert plain != flip  # the columns differ, so the check has teeth
    assert row["accuracy"]["none"] == pytest.approx(plain)
    assert row["accuracy"]["flip"] == pytest.approx(flip)
