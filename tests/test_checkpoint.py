"""Resume checkpoints: exact round trips with RNG states, one-line refusals, nothing executed;
what a resume may change."""

from __future__ import annotations

import dataclasses
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import trained_looking_model
from fastcifar.checkpoint import load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from fastcifar.cli import app
from fastcifar.errors import FastCifarError


def test_checkpoint_round_trips_with_weights_only_and_restores_rng_states(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = {"model": trained_looking_model().state_dict(), "rng": rng_state(),
             "history": [{"epoch": 1, "test_accuracy": 0.5}], "config": {"recipe": "fast"}}
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    path = tmp_path / "last.pt"
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert "cuda" not in loaded["rng"]  # a CPU run's; test_gpu.py saves and restores a GPU's
    assert loaded["history"] == state["history"]
    assert torch.equal(loaded["model"]["fc.weight"], state["model"]["fc.weight"])


def test_old_format_checkpoint_with_numpy_rng_state_is_refused_in_one_line(tmp_path):
    old = tmp_path / "last.pt"
    torch.save({"model": {}, "rng": {"numpy": np.random.get_state()}}, old)
    with pytest.raises(FastCifarError, match="cannot resume from .*older fastcifar") as refused:
        load_checkpoint(old)
    assert "\n" not in str(refused.value)


class _Payload:
    """Unpickling this calls open(marker, "w"): the file appears if anything unpickles it."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_code_running_pickle_is_refused_by_evaluate_predict_and_resume(tiny_dataset, tmp_path):
    marker = tmp_path / "payload-ran"
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps({"model": _Payload(marker)}))
    zipped = tmp_path / "evil.pt"
    torch.save({"model": _Payload(marker)}, zipped)
    proof = tmp_path / "proof"  # the payload is live: plain pickle runs it
    pickle.loads(pickle.dumps(_Payload(proof)))
    assert proof.exists()
    image = tmp_path / "image.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)

    runner = CliRunner()
    for evil in (raw, zipped):
        commands = {
            "evaluate": ["evaluate", str(evil), "--data", str(tiny_dataset), "--device", "cpu"],
            "predict": ["predict", str(image), "--weights", str(evil), "--device", "cpu"],
            "resume": ["train", "--resume", str(evil), "--data", str(tiny_dataset), "--out",
                       str(tmp_path / "runs"), "--weights", str(tmp_path / "weights")],
        }
        for name, arguments in commands.items():
            result = runner.invoke(app, arguments)
            assert result.exit_code == 1, (name, result.output)
            lines = [line for line in result.output.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("error:"), (name, result.output)
            assert evil.name in lines[0] and "Traceback" not in result.output
            assert not marker.exists(), f"{name} ran the payload of {evil.name}"


def test_resume_accepts_a_checkpoint_from_before_an_option_existed_and_refuses_real_changes():
    from fastcifar.checkpoint import check_resume_compatible, config_to_dict
    from fastcifar.config import recipe

    config = recipe("express")
    older = config_to_dict(config)
    del older["loader"]["on_device"], older["muon_lr"]  # saved before these options existed
    check_resume_compatible(older, config)
    # the refusal names each changed field (a nested one by its path) with both values
    with pytest.raises(FastCifarError, match=r"\(loader\.on_device: False in the checkpoint, "
                                             r"True now\)"):
        check_resume_compatible(older, dataclasses.replace(
            config, loader=dataclasses.replace(config.loader, on_device=True)))
    with pytest.raises(FastCifarError, match=r"\(muon_lr: 0\.0 in the checkpoint, 0\.1 now; "
                                             r"tta_shifts: True in the checkpoint, False now\)"):
        check_resume_compatible(older, dataclasses.replace(config, muon_lr=0.1, tta_shifts=False))
    # a nested setting this version no longer has is refused, even one saved as None
    retired = {**older, "augment": {**older["augment"], "retired_option": None}}
    with pytest.raises(FastCifarError, match=r"\(augment\.retired_option: None in the "
                                             r"checkpoint, not an option of this version\)"):
        check_resume_compatible(retired, config)


def test_resume_takes_another_thread_count_and_the_data_folder_named_otherwise(tmp_path,
                                                                               monkeypatch):
    # Both were refused as "other settings", though neither changes a batch.
    from fastcifar.checkpoint import check_resume_compatible, config_to_dict
    from fastcifar.config import recipe

    monkeypatch.chdir(tmp_path)
    config = recipe("express")
    saved = config_to_dict(dataclasses.replace(
        config, loader=dataclasses.replace(config.loader, workers=1, data_dir=Path("datasets"))))
    for loader in (dataclasses.replace(config.loader, workers=2, data_dir=Path("datasets")),
                   dataclasses.replace(config.loader, workers=1,
                                       data_dir=tmp_path / "datasets")):
        check_resume_compatible(saved, dataclasses.replace(config, loader=loader))
    other = dataclasses.replace(config.loader, workers=1, data_dir=tmp_path / "elsewhere")
    with pytest.raises(FastCifarError, match=r"loader\.data_dir: 'datasets' in the checkpoint"):
        check_resume_compatible(saved, dataclasses.replace(config, loader=other))


def test_a_run_resumed_in_fp16_from_an_unscaled_checkpoint_starts_from_a_fresh_scale():
    from fastcifar.model_trainer import load_scaler_state

    unscaled = torch.amp.GradScaler("cpu", enabled=False).state_dict()  # fp32 or bf16: {}
    fresh = torch.amp.GradScaler("cpu", init_scale=1024.0)  # fp16 here (enabled)
    load_scaler_state(fresh, unscaled)
    assert fresh.get_scale() == 1024.0
    saved = torch.amp.GradScaler("cpu", init_scale=256.0)
    load_scaler_state(fresh, saved.state_dict())  # an fp16 checkpoint's scale is taken
    assert fresh.get_scale() == 256.0
