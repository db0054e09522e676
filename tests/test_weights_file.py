"""Weights files: exact round trips (fp32 and fp16), refused writes, one-line refusals of files
that are not fastcifar weights, and headers that name no folder of the machine that wrote them."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors import safe_open

from conftest import trained_looking_model
from fastcifar.errors import FastCifarError
from fastcifar.model import CustResNet
from fastcifar.weights_file import METADATA_KEY, WEIGHTS_FORMAT_VERSION, read_weights_file, save_weights_file

METADATA = {"class_names": ["apple", "berry", "cherry"], "mean": [125.3, 123.0, 113.9],
            "std": [63.0, 62.1, 66.7], "logit_scale": 0.125, "tta": "flip", "recipe": "fast",
            "accuracy": 0.9137, "epochs": 24, "data_variant": "tiny", "git_commit": "abc1234"}


def test_weights_file_round_trips_tensors_and_metadata_exactly(tmp_path):
    model = trained_looking_model()
    path = tmp_path / "run-best.safetensors"
    save_weights_file(path, model.state_dict(), METADATA)
    state, metadata = read_weights_file(path)
    assert state.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name
    assert state["prep.layers.1.num_batches_tracked"].dtype == torch.int64
    assert {key: metadata[key] for key in METADATA} == METADATA
    with safe_open(str(path), framework="pt") as handle:  # one JSON string under "fastcifar"
        assert json.loads(handle.metadata()["fastcifar"])["recipe"] == "fast"
    assert not list(tmp_path.glob(".*.tmp"))


def test_fp16_weights_file_is_half_the_size_and_reads_back_as_float32(tmp_path):
    model = trained_looking_model()
    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    save_weights_file(full, model.state_dict(), METADATA)
    save_weights_file(half, model.state_dict(), METADATA, dtype=torch.float16)
    with safe_open(str(half), framework="pt") as handle:
        assert handle.get_tensor("fc.weight").dtype == torch.float16
        assert handle.get_tensor("layer1.conv.layers.2.num_batches_tracked").dtype == torch.int64
    assert half.stat().st_size < 0.55 * full.stat().st_size
    state, _ = read_weights_file(half)
    assert state["fc.weight"].dtype == torch.float32
    torch.testing.assert_close(state["fc.weight"], model.state_dict()["fc.weight"],
                               rtol=1e-3, atol=1e-4)
    reloaded = CustResNet(num_classes=3)
    reloaded.load_state_dict(state)  # every key and shape fits


def test_weights_file_without_required_metadata_is_not_written(tmp_path):
    path = tmp_path / "w.safetensors"
    for key in ("class_names", "mean", "std", "logit_scale", "tta"):
        incomplete = {name: value for name, value in METADATA.items() if name != key}
        with pytest.raises(FastCifarError, match=f"lacks {key}"):
            save_weights_file(path, CustResNet(num_classes=3).state_dict(), incomplete)
    with pytest.raises(FastCifarError, match="tta is 'sometimes'"):
        save_weights_file(path, {}, {**METADATA, "tta": "sometimes"})
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_weights_the_reader_would_refuse_are_not_written(tmp_path):
    path = tmp_path / "w.safetensors"
    state = trained_looking_model().state_dict()
    too_large = {**state, "fc.weight": state["fc.weight"] + 1e5}  # fp16 tops out at 65504
    with pytest.raises(FastCifarError, match=r"fc\.weight holds NaN or infinite values after "
                                             r"the cast to torch\.float16") as refused:
        save_weights_file(path, too_large, METADATA, dtype=torch.float16)
    assert "\n" not in str(refused.value) and str(path) in str(refused.value)
    diverged = {**state, "layer3.conv.layers.0.weight": torch.full_like(
        state["layer3.conv.layers.0.weight"], float("nan"))}
    with pytest.raises(FastCifarError, match=r"layer3\.conv\.layers\.0\.weight holds NaN"):
        save_weights_file(path, diverged, METADATA)
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file
    save_weights_file(path, too_large, METADATA)  # in fp32 the same values are fine
    assert read_weights_file(path)[0]["fc.weight"].max() > 1e5


def _assert_one_line_refusal(path, pattern: str) -> None:
    with pytest.raises(FastCifarError, match=pattern) as refused:
        read_weights_file(path)
    message = str(refused.value)
    assert "\n" not in message and str(path) in message
    assert "not a fastcifar weights file" in message


def test_files_that_are_not_weights_files_are_refused_in_one_line(tmp_path):
    state = CustResNet(num_classes=3).state_dict()
    pickled = tmp_path / "model.pt"
    torch.save({"model": state, **METADATA}, pickled)  # zip + pickle
    _assert_one_line_refusal(pickled, "not a safetensors file")
    raw_pickle = tmp_path / "raw.pkl"
    raw_pickle.write_bytes(pickle.dumps({"model": 1}))
    _assert_one_line_refusal(raw_pickle, "not a safetensors file")
    good = tmp_path / "good.safetensors"
    save_weights_file(good, state, METADATA)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    _assert_one_line_refusal(truncated, "not a safetensors file")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    _assert_one_line_refusal(empty, "not a safetensors file")
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    _assert_one_line_refusal(foreign, "without fastcifar's metadata")
    for key in ("mean", "tta"):
        lacking = tmp_path / f"lacking-{key}.safetensors"
        save_file({"weight": torch.zeros(2)}, str(lacking), metadata={"fastcifar": json.dumps(
            {name: value for name, value in METADATA.items() if name != key})})
        _assert_one_line_refusal(lacking, f"lacks {key}")
    not_json = tmp_path / "not-json.safetensors"
    save_file({"weight": torch.zeros(2)}, str(not_json), metadata={"fastcifar": "{oops"})
    _assert_one_line_refusal(not_json, "not valid JSON")
    with pytest.raises(FastCifarError, match="weights file not found"):
        read_weights_file(tmp_path / "missing.safetensors")


def test_weights_with_damaged_tensors_or_impossible_pixel_statistics_are_refused(tmp_path):
    # They loaded before and scored at random ("ship nan%", or a bool model at 100%).
    from safetensors.torch import save_file

    state = CustResNet(num_classes=3).state_dict()
    nan = {**state, "fc.weight": torch.full_like(state["fc.weight"], float("nan"))}
    whole = {**state, "fc.weight": state["fc.weight"].to(torch.int32)}
    flags = {**state, "fc.weight": state["fc.weight"] > 0}
    counter = "layer1.conv.layers.2.num_batches_tracked"
    float_counter = {**state, counter: state[counter].float()}
    for name, tensors, pattern in (
            ("nan", nan, "fc.weight holds NaN or infinite values"),
            ("int32", whole, "fc.weight is torch.int32, not floating point"),
            ("bool", flags, "fc.weight is torch.bool, not floating point"),
            ("counter", float_counter, f"{counter} is torch.float32, not a count")):
        path = tmp_path / f"{name}.safetensors"  # as a damaged copy would hold them:
        header = {"format_version": WEIGHTS_FORMAT_VERSION, **METADATA}  # save_weights_file
        save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(header)})  # refuses
        _assert_one_line_refusal(path, pattern)
    for key, values, pattern in (
            ("mean", [1e308, 0.0, 0.0], r"mean is not 3 pixel values in 0\.\.255"),
            ("std", [1e-320, 60.0, 60.0], r"std is not 3 pixel values in 0\.001\.\.255")):
        path = tmp_path / f"{key}.safetensors"
        save_file(dict(state), str(path), metadata={"fastcifar": json.dumps(
            {**METADATA, "format_version": 1, key: values})})
        _assert_one_line_refusal(path, pattern)
    good = tmp_path / "good.safetensors"
    save_weights_file(good, state, METADATA)
    assert read_weights_file(good)[0][counter].dtype == torch.int64


def test_a_header_claiming_a_huge_length_is_refused(tmp_path):
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    _assert_one_line_refusal(bogus, "not a safetensors file")


def test_shipped_weights_header_names_no_folder_of_the_machine_that_made_it():
    import json

    from fastcifar.command_config import SHIPPED_WEIGHTS
    from fastcifar.weights_file import read_weights_file

    if not SHIPPED_WEIGHTS.exists():
        pytest.skip("no shipped weights file in this checkout")
    header = json.dumps(read_weights_file(SHIPPED_WEIGHTS)[1])
    assert '"/' not in header  # no string value that starts at the root


def test_without_machine_paths_keeps_names_and_everything_else():
    from fastcifar.weights_file import without_machine_paths

    assert without_machine_paths({"a": "/work/x/datasets", "b": ["runs", "/tmp/w.pt"], "c": 3,
                                  "d": "relative/path"}) == {
        "a": "datasets", "b": ["runs", "w.pt"], "c": 3, "d": "relative/path"}
