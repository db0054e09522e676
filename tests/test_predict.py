"""predict: a user's images -> top-k classes equal to the model's own, and one-line refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fastcifar.cli import app
from fastcifar.command_config import SHIPPED_WEIGHTS, PredictConfig
from fastcifar.config import Device
from fastcifar.errors import FastCifarError
from fastcifar.model import CustResNet
from fastcifar.prediction import predict
from fastcifar.weights_file import save_weights_file

CLASSES = ["apple", "berry", "cherry"]
MEAN, STD = [120.0, 110.0, 100.0], [60.0, 55.0, 50.0]
LOGIT_SCALE = 0.5


def tiny_model() -> CustResNet:
    torch.manual_seed(5)
    model = CustResNet(num_classes=3, logit_scale=LOGIT_SCALE)
    model.train()
    model(torch.randn(8, 3, 32, 32))  # BN statistics away from their defaults
    return model.eval()


def write_weights(path: Path, tta: str) -> Path:
    save_weights_file(path, tiny_model().state_dict(), {
        "class_names": CLASSES, "mean": MEAN, "std": STD, "logit_scale": LOGIT_SCALE,
        "tta": tta})
    return path


@pytest.fixture(params=["none", "flip"])
def weights(request, tmp_path) -> Path:
    return write_weights(tmp_path / f"tiny-{request.param}.safetensors", request.param)


def random_pixels(seed: int, size: tuple[int, int] = (32, 32)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def direct_probabilities(pixels: np.ndarray, tta: bool) -> np.ndarray:
    """Softmax of the model on (x - mean) / std, without predict's code path."""
    model = tiny_model()
    inputs = (torch.from_numpy(pixels).permute(2, 0, 1)[None].float()
              - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model(inputs)
        if tta:
            logits = (logits + model(inputs.flip(3))) / 2
    return torch.softmax(logits, 1)[0].numpy()


def config(paths, weights, **changes) -> PredictConfig:
    return PredictConfig(paths=tuple(paths), weights=weights, device=Device.cpu, **changes)


def test_predictions_equal_the_models_own_in_the_stored_tta_mode(weights, tmp_path):
    pixels = [random_pixels(seed) for seed in range(3)]
    paths = []
    for index, image in enumerate(pixels):
        paths.append(tmp_path / f"image{index}.png")
        Image.fromarray(image).save(paths[-1])
    tta = weights.name.endswith("flip.safetensors")
    report = predict(config(paths, weights, top_k=2))
    assert report.tta == ("flip" if tta else "none") and not report.problems
    assert [row.path for row in report.predictions] == paths
    for row, image in zip(report.predictions, pixels, strict=True):
        expected = direct_probabilities(image, tta)
        order = np.argsort(-expected)[:2]
        assert [name for name, _ in row.top] == [CLASSES[i] for i in order]
        assert [p for _, p in row.top] == pytest.approx(expected[order].tolist(), abs=1e-5)
        assert row.resized_from is None


def test_other_formats_modes_and_sizes_are_read_as_32x32_rgb(tmp_path):
    weights = write_weights(tmp_path / "w.safetensors", "none")
    rgb = random_pixels(1)
    Image.fromarray(rgb).save(tmp_path / "a.webp", lossless=True)
    Image.fromarray(rgb).save(tmp_path / "b.bmp")
    rgba = np.dstack([rgb, np.full((32, 32), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "c.png")
    Image.fromarray(rgb[..., 0], "L").save(tmp_path / "d.png")
    Image.fromarray(random_pixels(2, (64, 48))).save(tmp_path / "e.jpg")
    report = predict(config([tmp_path / name for name in ("a.webp", "b.bmp", "c.png", "d.png",
                                                          "e.jpg")], weights, top_k=1))
    rows = {row.path.name: row for row in report.predictions}
    expected = CLASSES[int(np.argmax(direct_probabilities(rgb, False)))]
    # lossless formats and RGBA (alpha dropped) give the model the same pixels
    assert rows["a.webp"].top[0][0] == rows["b.bmp"].top[0][0] == expected
    assert rows["c.png"].top[0][0] == expected and rows["c.png"].mode == "RGBA"
    grey = np.repeat(rgb[..., :1], 3, axis=2)
    assert rows["d.png"].mode == "L"
    assert rows["d.png"].top[0][1] == pytest.approx(float(direct_probabilities(grey, False).max()),
                                                    abs=1e-5)
    assert rows["e.jpg"].resized_from == (64, 48)
    assert all(rows[name].resized_from is None for name in ("a.webp", "b.bmp", "c.png", "d.png"))


def test_a_folder_means_its_image_files(tmp_path):
    weights = write_weights(tmp_path / "w.safetensors", "none")
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("b.png", "a.jpg", "c.PNG"):
        Image.fromarray(random_pixels(3)).save(folder / name, format="PNG" if "png" in
                                               name.lower() else "JPEG")
    (folder / "notes.txt").write_text("not an image")
    # Formats Pillow names but cannot read back as pixels failed the whole folder.
    Image.fromarray(random_pixels(4)).save(folder / "scan.pdf")
    (folder / "table.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    (folder / "figure.eps").write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n")
    (folder / "nested").mkdir()
    report = predict(config([folder], weights, top_k=5))
    assert [row.path.name for row in report.predictions] == ["a.jpg", "b.png", "c.PNG"]
    assert all(len(row.top) == 3 for row in report.predictions)  # top-k capped at the classes
    assert all(sum(p for _, p in row.top) == pytest.approx(1.0) for row in report.predictions)


def test_a_photo_is_read_upright_as_its_exif_orientation_says(tmp_path):
    from fastcifar.prediction import read_image

    pixels = np.zeros((32, 64, 3), np.uint8)  # 64 wide, 32 high: red left, blue right
    pixels[:, :32], pixels[:, 32:] = (250, 0, 0), (0, 0, 250)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: stored sideways, shown turned 90 degrees clockwise
    Image.fromarray(pixels).save(tmp_path / "portrait.jpg", exif=exif, quality=95)
    image = read_image(tmp_path / "portrait.jpg")
    assert image.resized_from == (32, 64)  # width x height as shown
    assert image.pixels[:12, :, 0].mean() > 200 and image.pixels[-12:, :, 2].mean() > 200  # red on top
    from fastcifar.api import _as_images  # the Python API's Pillow images: the same, upright

    with Image.open(tmp_path / "portrait.jpg") as opened:
        (in_memory,) = _as_images([opened])
    np.testing.assert_array_equal(in_memory.pixels, image.pixels)
    assert in_memory.resized_from == (32, 64)


def test_an_image_it_may_not_read_is_not_called_corrupt(tmp_path, monkeypatch):
    import fastcifar.prediction

    def refused(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(fastcifar.prediction.Image, "open", refused)
    with pytest.raises(FastCifarError, match=r"locked\.png: permission denied$"):
        fastcifar.prediction.read_image(tmp_path / "locked.png")


def bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Each kind of bad input and the words its one-line error has."""
    text = tmp_path / "notes.png"
    text.write_text("I am text with an image's name")
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    good = tmp_path / "good.png"
    Image.fromarray(random_pixels(4, (64, 64))).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    return {"missing": (tmp_path / "nowhere.png", "no such file or folder"),
            "not an image": (text, "not an image file"),
            "empty folder": (empty, "no image files in this folder"),
            "corrupt": (truncated, "corrupt or truncated image")}


def test_each_bad_input_is_a_one_line_error_naming_it(tmp_path):
    weights = write_weights(tmp_path / "w.safetensors", "none")
    for kind, (path, words) in bad_inputs(tmp_path).items():
        with pytest.raises(FastCifarError) as refused:
            predict(config([tmp_path / "good.png", path], weights))
        message = str(refused.value)
        assert message.startswith(f"{path}: ") and words in message, kind
        assert "\n" not in message


def test_keep_going_reports_the_others_and_still_fails(tmp_path):
    weights = write_weights(tmp_path / "w.safetensors", "none")
    bad = bad_inputs(tmp_path)
    paths = [tmp_path / "good.png", *(path for path, _ in bad.values())]
    report = predict(config(paths, weights, keep_going=True))
    assert [row.path.name for row in report.predictions] == ["good.png"]
    assert sorted(problem.path for problem in report.problems) == sorted(p for p, _ in bad.values())

    result = CliRunner().invoke(app, ["predict", *map(str, paths), "--weights", str(weights),
                                      "--device", "cpu", "--keep-going"])
    assert result.exit_code == 1
    assert f"{tmp_path / 'good.png'}: " in result.stdout
    assert "resized from 64x64 to 32x32" in result.stderr
    assert result.stderr.count("error:") == len(bad)


def test_predict_command_prints_top_k_and_json(tmp_path):
    weights = write_weights(tmp_path / "w.safetensors", "flip")
    image = tmp_path / "cat.png"
    Image.fromarray(random_pixels(6)).save(image)
    shown = CliRunner().invoke(app, ["predict", str(image), "--weights", str(weights),
                                     "--top-k", "2", "--device", "cpu"])
    assert shown.exit_code == 0, shown.output
    line = shown.stdout.strip()
    assert line.startswith(f"{image}: ") and line.count("%") == 2
    as_json = CliRunner().invoke(app, ["predict", str(image), "--weights", str(weights),
                                       "--json", "--device", "cpu"])
    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.stdout)
    assert report["tta"] == "flip" and report["errors"] == []
    [row] = report["predictions"]
    assert row["path"] == str(image) and len(row["top"]) == 3
    bad = CliRunner().invoke(app, ["predict", str(tmp_path / "nowhere.png"), "--weights",
                                   str(weights)])
    assert bad.exit_code == 1 and "nowhere.png: no such file or folder" in bad.output
    assert "Traceback" not in bad.output


@pytest.mark.full_width
def test_default_weights_are_the_shipped_file_with_a_clear_error_when_absent(tmp_path,
                                                                            monkeypatch):
    image = tmp_path / "cat.png"
    Image.fromarray(random_pixels(3)).save(image)
    result = CliRunner().invoke(app, ["predict", str(image), "--device", "cpu"])
    assert result.exit_code == 0, result.output  # no --weights: the shipped file predicts
    shipped = CliRunner().invoke(app, ["predict", str(image), "--device", "cpu", "--weights",
                                       str(SHIPPED_WEIGHTS)])
    assert shipped.exit_code == 0 and result.output == shipped.output
    # package data, which in a checkout is the repository's weights/ file
    assert SHIPPED_WEIGHTS.parts[-3:] == ("fastcifar", "shipped", "custresnet-cifar10.safetensors")
    in_checkout = SHIPPED_WEIGHTS.resolve()
    assert in_checkout.parts[-2:] == ("weights", "custresnet-cifar10.safetensors")
    assert (in_checkout.parent.parent / "fastcifar" / "prediction.py").is_file()  # repo root
    import fastcifar.command_config

    absent = tmp_path / "weights" / "custresnet-cifar10.safetensors"
    monkeypatch.setattr(fastcifar.command_config, "SHIPPED_WEIGHTS", absent)
    with pytest.raises(FastCifarError, match="no shipped weights at .*: pass --weights") as error:
        PredictConfig(paths=(tmp_path,), weights=absent)
    assert "\n" not in str(error.value)
    with pytest.raises(FastCifarError, match="weights file not found"):
        PredictConfig(paths=(tmp_path,), weights=tmp_path / "mine.safetensors")
