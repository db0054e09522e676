"""ONNX export: the graph takes uint8 images and matches PyTorch's logits in each TTA mode,
carries its metadata, and serves as predict's weights; files without metadata are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import sharpened_untrained_custresnet
from fastcifar.cli import app
from fastcifar.command_config import ExportConfig
from fastcifar.data.loaders import read_metadata
from fastcifar.data.sources import read_source
from fastcifar.errors import FastCifarError
from fastcifar.model import CustResNet
from fastcifar.weights_file import METADATA_KEY, save_weights_file

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

from fastcifar.export import OnnxClassifier, export_onnx  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_weights(tiny_dataset, tmp_path_factory):
    """An untrained 3-class CustResNet with a sharpened head (its TTA modes disagree)."""
    model = sharpened_untrained_custresnet(logit_scale=0.5)
    metadata = read_metadata(tiny_dataset)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_weights_file(path, model.state_dict(), {
        "accuracy": 0.5, "epochs": 2, "class_names": metadata.class_names, "mean": metadata.mean,
        "std": metadata.std, "logit_scale": 0.5, "tta": "multicrop", "recipe": "fast"})
    return path


def direct_logits(model: CustResNet, mean, std, images: np.ndarray, mode: str) -> np.ndarray:
    """The logits written out by hand: normalise, then the TTA mode's passes."""
    inputs = (torch.from_numpy(images).float() - torch.tensor(mean).view(1, 3, 1, 1)) / (
        torch.tensor(std).view(1, 3, 1, 1))

    def scored(batch):
        logits = model(batch)
        return (logits + model(batch.flip(3))) / 2 if mode != "none" else logits

    with torch.no_grad():
        logits = scored(inputs)
        if mode == "multicrop":
            padded = torch.nn.functional.pad(inputs, (1, 1, 1, 1), mode="reflect")
            logits = (0.5 * logits + 0.25 * scored(padded[:, :, 2:, 2:])
                      + 0.25 * scored(padded[:, :, :-2, :-2]))
    return logits.numpy()


@pytest.mark.parametrize("mode", ["none", "flip", "multicrop"])
def test_the_graph_takes_uint8_images_of_any_batch_and_matches_pytorch(tiny_weights,
                                                                       tiny_dataset,
                                                                       tiny_imagefolder,
                                                                       tmp_path, mode):
    report = export_onnx(ExportConfig(weights=tiny_weights, out=tmp_path / "m.onnx", tta=mode,
                                      data_dir=tiny_dataset, check_images=1000))
    assert report.tta == mode and report.checked_images == 60  # the whole tiny test set
    assert report.max_logit_difference <= 1e-3 and report.top1_agreement == 1.0
    classifier = OnnxClassifier.load(report.path)
    assert classifier.metadata["tta"] == mode
    assert classifier.metadata["class_names"] == read_metadata(tiny_dataset).class_names
    model = CustResNet(num_classes=3, logit_scale=0.5)
    from fastcifar.weights_file import read_weights_file

    state, saved = read_weights_file(tiny_weights)
    model.load_state_dict(state)
    model.eval()
    images = read_source(tiny_imagefolder).test.images.transpose(0, 3, 1, 2).copy()
    for batch in (1, 7, 60):  # the batch axis is dynamic
        got = classifier.logits(images[:batch])
        expected = direct_logits(model, saved["mean"], saved["std"], images[:batch], mode)
        assert got.shape == (batch, 3) and np.abs(got - expected).max() <= 1e-3
    others = [direct_logits(model, saved["mean"], saved["std"], images, other).argmax(1)
              for other in {"none", "flip", "multicrop"} - {mode}]
    assert all((classifier.logits(images).argmax(1) != other).sum() >= 2 for other in others)


def test_predict_with_the_onnx_file_gives_the_answers_of_the_weights_file(tiny_weights,
                                                                          tiny_dataset,
                                                                          tiny_imagefolder,
                                                                          tmp_path):
    exported = runner.invoke(app, ["export", str(tiny_weights), "--onnx", str(tmp_path / "m.onnx"),
                                   "--data", str(tiny_dataset)])
    assert exported.exit_code == 0, exported.output
    assert "multicrop TTA in the graph" in exported.output and "60 test images" in exported.output
    folder = tmp_path / "images"
    folder.mkdir()
    for index, image in enumerate(read_source(tiny_imagefolder).test.images[::6]):
        Image.fromarray(image).save(folder / f"{index:02d}.png")
    answers = {}
    for weights in (tiny_weights, tmp_path / "m.onnx"):
        result = runner.invoke(app, ["predict", str(folder), "--weights", str(weights), "--json",
                                     "--device", "cpu"])
        assert result.exit_code == 0, result.output
        answers[weights.suffix] = json.loads(result.stdout)
    assert answers[".onnx"]["tta"] == "multicrop" and "onnxruntime" in answers[".onnx"]["device"]
    for device in ("cuda", "mps"):  # it ran on the CPU whatever --device said
        asked = runner.invoke(app, ["predict", str(folder), "--weights", str(tmp_path / "m.onnx"),
                                    "--device", device])
        assert asked.exit_code == 1 and (
            f"runs on the CPU (onnxruntime), not on {device}: drop --device" in asked.stderr)
    for onnx_row, torch_row in zip(answers[".onnx"]["predictions"],
                                   answers[".safetensors"]["predictions"], strict=True):
        assert [top["class"] for top in onnx_row["top"]] == [top["class"] for top in
                                                             torch_row["top"]]
        assert [top["probability"] for top in onnx_row["top"]] == pytest.approx(
            [top["probability"] for top in torch_row["top"]], abs=1e-4)


def test_onnx_files_without_fastcifar_metadata_are_refused_in_one_line(tiny_weights,
                                                                        tiny_imagefolder,
                                                                        tmp_path):
    report = export_onnx(ExportConfig(weights=tiny_weights, out=tmp_path / "m.onnx",
                                      check_images=0))
    assert report.checked_images == 0
    proto = onnx.load(str(report.path))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    image = next((tiny_imagefolder / "test").rglob("*.png"))
    for name, message in (("bare.onnx", "has no fastcifar metadata"),
                          ("junk.onnx", "is not a readable ONNX model")):
        result = runner.invoke(app, ["predict", str(image), "--weights", str(tmp_path / name)])
        assert result.exit_code == 1 and message in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps({"class_names": ["a"]}))
    onnx.save(proto, str(tmp_path / "partial.onnx"))
    with pytest.raises(FastCifarError, match="metadata lacks mean, std, logit_scale"):
        OnnxClassifier.load(tmp_path / "partial.onnx")
    # Metadata or a graph that would not score as exported: an IndexError, a TypeError or an
    # onnxruntime traceback before.
    saved = json.loads(onnx.load(str(report.path)).metadata_props[0].value)
    for name, change, message in (
            ("two.onnx", {"class_names": ["a", "b"]}, "gives 3 logits for 2 class names"),
            ("five.onnx", {"class_names": 5}, "class_names is not a list of distinct names")):
        del proto.metadata_props[:]
        proto.metadata_props.add(key=METADATA_KEY, value=json.dumps({**saved, **change}))
        onnx.save(proto, str(tmp_path / name))
        with pytest.raises(FastCifarError, match=message):
            OnnxClassifier.load(tmp_path / name)
    from onnx import TensorProto, helper

    floats = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    foreign = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["logits"])], "foreign", [floats],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])]))
    foreign.metadata_props.add(key=METADATA_KEY, value=json.dumps(saved))
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    with pytest.raises(FastCifarError, match=r"its inputs are \[\('x', 'tensor\(float\)'\)\]"):
        OnnxClassifier.load(tmp_path / "foreign.onnx")


def test_export_finds_an_output_it_cannot_write_before_it_exports(tiny_weights, tmp_path,
                                                                  monkeypatch):
    # It spent about a minute exporting before the write failed.
    import fastcifar.export

    monkeypatch.setattr(fastcifar.export, "_onnx_bytes", None)  # exporting would fail
    (tmp_path / "taken").write_text("a file where the folder should be")
    result = runner.invoke(app, ["export", str(tiny_weights), "--onnx",
                                 str(tmp_path / "taken" / "m.onnx")])
    assert result.exit_code == 74 and "could not write" in result.output, result.output


def test_a_missing_onnx_package_is_one_line_naming_the_extra(tiny_weights, tmp_path,
                                                             monkeypatch):
    report = export_onnx(ExportConfig(weights=tiny_weights, out=tmp_path / "m.onnx",
                                      check_images=0))
    image = tmp_path / "cat.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    for hidden, arguments in (
            ("onnxscript", ["export", str(tiny_weights), "--onnx", str(tmp_path / "n.onnx")]),
            ("onnxruntime", ["predict", str(image), "--weights", str(report.path)])):
        with monkeypatch.context() as patch:
            patch.setitem(__import__("sys").modules, hidden, None)  # import raises ImportError
            result = runner.invoke(app, arguments)
        assert result.exit_code == 1, result.output
        assert result.stderr.strip().splitlines() == [
            f"error: {hidden} not installed: ONNX files need the export extra (pip install "
            "'fastcifar[export]')"]
    assert not (tmp_path / "n.onnx").exists()
    with monkeypatch.context() as patch:  # no data to check against: onnxruntime is not needed
        patch.setitem(__import__("sys").modules, "onnxruntime", None)
        unchecked = runner.invoke(app, ["export", str(tiny_weights), "--onnx",
                                        str(tmp_path / "u.onnx"), "--data", str(tmp_path / "none")])
    assert unchecked.exit_code == 0 and "not checked (no converted data)" in unchecked.output


def test_export_says_why_it_did_not_check(tiny_weights, tiny_dataset, tmp_path):
    for check, reason in (("0", "not checked (--check 0)"),
                          ("10", "not checked (no converted data)")):
        data = tiny_dataset if check == "0" else tmp_path / "no-data"
        result = runner.invoke(app, ["export", str(tiny_weights), "--onnx",
                                     str(tmp_path / f"{check}.onnx"), "--check", check,
                                     "--data", str(data)])
        assert result.exit_code == 0 and reason in result.output, result.output


def test_export_refuses_bad_options_in_one_line(tiny_weights, tmp_path):
    with pytest.raises(FastCifarError, match="must end in .onnx"):
        ExportConfig(weights=tiny_weights, out=tmp_path / "m.bin")
    with pytest.raises(FastCifarError, match="TTA mode must be one of"):
        ExportConfig(weights=tiny_weights, out=tmp_path / "m.onnx", tta="shifts")
    with pytest.raises(FastCifarError, match="weights file not found"):
        ExportConfig(weights=tmp_path / "none.safetensors", out=tmp_path / "m.onnx")


@pytest.mark.realdata
def test_shipped_weights_export_agrees_with_pytorch_on_the_first_64_test_images(real_dataset,
                                                                                tmp_path):
    # 64 real images, not export's default 1,000 (131 s on 2 cores): the graph's agreement
    # with PyTorch is checked on every image, each through all 6 multi-crop passes; the tiny
    # set's tests check each TTA mode. 256 images took 58-62 s in the suite.
    from fastcifar.command_config import SHIPPED_WEIGHTS

    if not SHIPPED_WEIGHTS.exists():
        pytest.skip("no shipped weights file in this checkout")
    report = export_onnx(ExportConfig(weights=SHIPPED_WEIGHTS, out=tmp_path / "m.onnx",
                                      data_dir=real_dataset, check_images=64))
    assert report.checked_images == 64 and report.tta == "multicrop"
    assert report.max_logit_difference <= 1e-3 and report.top1_agreement == 1.0
