"""benchmarks/tta_variants.py: the shifts move the image, and its plain and flip scores agree
with the train loop's own evaluation of the same weights."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from fastcifar.checkpoint import load_checkpoint
from fastcifar.config import LoaderConfig, Precision, recipe
from fastcifar.data.loaders import make_loader, read_metadata
from fastcifar.data.loaders import test_pipeline as image_pipeline_for_testing
from fastcifar.evaluate import model_from_weights
from fastcifar.train import DeviceStep, evaluate, plan_precision, train

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
    assert row["accuracy"]["none"] == pytest.approx(evaluate(model, loader, step, plan, False)[1])
    assert row["accuracy"]["flip"] == pytest.approx(evaluate(model, loader, step, plan, True)[1])
    assert row["accuracy"]["flip"] == pytest.approx(result.history[-1].test_accuracy)
    assert 0 <= row["accuracy"]["flip+translate"] <= 1 and row["trained_epochs"] == 2
