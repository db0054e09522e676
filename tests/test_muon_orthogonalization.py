"""Muon's Newton-Schulz iteration in fp32 for fp32 runs on the CPU: the same iteration as
torch's, the step it gives, and the run choosing it from its precision (and the proxy too)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.optim._muon as torch_muon
from test_train import tiny_config
from torch import nn

from fastcifar.config import AugmentConfig, Precision, recipe
from fastcifar.data.loaders import build_loaders
from fastcifar.device import PrecisionChoice, PrecisionPlan, plan_precision
from fastcifar.distributed import Distributed
from fastcifar.model_trainer import ModelTrainer
from fastcifar.optim import FilterMuon, newton_schulz, orthogonalization_dtype
from fastcifar.training import train

CPU = torch.device("cpu")

COEFFICIENTS = (torch_muon.DEFAULT_A, torch_muon.DEFAULT_B, torch_muon.DEFAULT_C)


@pytest.mark.parametrize("shape", [(8, 36), (36, 8)])
def test_newton_schulz_is_torchs_iteration_in_the_dtype_asked_and_leaves_its_input(shape):
    torch.manual_seed(0)
    matrix = torch.randn(shape)
    kept = matrix.clone()
    torchs = torch_muon._zeropower_via_newtonschulz(matrix, COEFFICIENTS, 5, torch_muon.EPS)
    in_bf16 = newton_schulz(matrix, COEFFICIENTS, 5, torch_muon.EPS, torch.bfloat16)
    in_fp32 = newton_schulz(matrix, COEFFICIENTS, 5, torch_muon.EPS, torch.float32)
    assert torch.equal(in_bf16, torchs)  # the same operations, in the same order
    assert in_fp32.dtype == torch.float32 and in_fp32.shape == matrix.shape
    torch.testing.assert_close(in_fp32, torchs.float(), atol=0.05, rtol=0)
    assert not torch.equal(in_fp32.bfloat16(), torchs)  # it did run in fp32
    assert torch.equal(matrix, kept)  # with momentum off it is Muon's momentum buffer


def _first_step(dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(filters before, their gradient, after) for one FilterMuon step (None: the default)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, bias=False)
    muon = FilterMuon([conv.weight], lr=0.1, momentum=0.5)
    if dtype is not None:
        muon.orthogonalize_dtype = dtype
    conv(torch.randn(2, 4, 6, 6)).square().mean().backward()
    before, gradient = conv.weight.detach().flatten(1).clone(), conv.weight.grad.flatten(1).clone()
    muon.step()
    return before, gradient, conv.weight.detach().flatten(1)


def test_filter_muon_steps_with_the_fp32_iteration_when_set_and_puts_torchs_back():
    before, gradient, after = _first_step(torch.float32)
    buffer = torch.zeros_like(gradient).lerp_(gradient, 0.5)  # Muon's momentum, Nesterov
    update = newton_schulz(gradient.lerp(buffer, 0.5), COEFFICIENTS, 5, torch_muon.EPS,
                           torch.float32)
    expected = before - 0.1 * math.sqrt(max(1, 8 / 36)) * update
    torch.testing.assert_close(after, expected, atol=1e-6, rtol=0)
    assert torch_muon._zeropower_via_newtonschulz.__module__ == "torch.optim._muon"
    _, _, default = _first_step(None)  # torch's bf16 iteration: a different step
    assert (default - expected).abs().max() > 1e-4


def test_orthogonalization_dtype_is_fp32_only_for_fp32_runs_on_the_cpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert orthogonalization_dtype(None, cpu) == torch.float32
    assert orthogonalization_dtype(torch.bfloat16, cpu) == torch.bfloat16
    assert orthogonalization_dtype(None, cuda) == torch.bfloat16  # tensor cores: torch's way
    assert orthogonalization_dtype(torch.float16, cuda) == torch.bfloat16


def _muon_config(data_dir, tmp_path, **changes):
    base = tiny_config(data_dir, tmp_path, epochs=4, augment=AugmentConfig(cutout_size=4))
    muon = recipe("express-muon")
    return dataclasses.replace(base, muon_lr=muon.muon_lr, muon_momentum=muon.muon_momentum,
                               **changes)


def _record_dtypes(monkeypatch) -> list[torch.dtype]:
    """The dtype each Muon step would orthogonalise in; the steps themselves are skipped (a
    bf16 iteration takes ~30 s a step on a CPU without native bf16; the unit tests above check
    the step)."""
    seen: list[torch.dtype] = []

    def recording_step(self, closure=None):
        seen.append(self.orthogonalize_dtype)

    monkeypatch.setattr(FilterMuon, "step", recording_step)
    return seen


def test_an_fp32_cpu_run_orthogonalizes_in_fp32(tiny_dataset, tmp_path, monkeypatch):
    seen = _record_dtypes(monkeypatch)
    result = train(_muon_config(tiny_dataset, tmp_path, precision=Precision.fp32, epochs=2))
    assert len(seen) == result.history[-1].steps and set(seen) == {torch.float32}


@pytest.mark.parametrize("timed", [PrecisionPlan(None, False), PrecisionPlan(torch.bfloat16, False)])
def test_the_precision_timing_sets_the_dtype_of_the_models_muon_and_the_proxys(
        tiny_dataset, tmp_path, monkeypatch, timed):
    # auto on the CPU starts in fp32 and the timing at the first batch picks the plan after
    # the optimisers exist: both Muons must follow it. (A bf16 run is slow on CPUs without
    # native bf16, so this checks the trainer, not a whole run.)
    monkeypatch.setattr("fastcifar.model_trainer.measure_cpu_precision",
                        lambda *args: PrecisionChoice(timed, {"fp32": 1.0, "bf16": 1.0}))
    monkeypatch.setattr("fastcifar.device.cpu_lacks_native_bf16", lambda: False)  # any CPU
    config = _muon_config(tiny_dataset, tmp_path, precision=Precision.auto, select_fraction=0.5,
                          whiten=False)
    loaders = build_loaders(config.loader, config.augment, config.seed, device=CPU)
    trainer = ModelTrainer(config, loaders, CPU, plan_precision(config.precision, CPU),
                           Distributed(), None)
    muons = [trainer.optimizers.muon, trainer.selection.optimizers.muon]
    assert trainer.measure_precision and {muon.orthogonalize_dtype for muon in muons} == {
        torch.float32}
    images, labels = next(loaders.train_epoch(0, 32))
    trainer.first_batch(images, labels)
    expected = orthogonalization_dtype(timed.autocast_dtype, CPU)
    assert trainer.plan == timed and {muon.orthogonalize_dtype for muon in muons} == {expected}


@pytest.mark.parametrize("saved", ["fp32", "bf16"])
def test_a_resumed_auto_run_orthogonalizes_in_the_precision_its_checkpoint_trained_in(
        tiny_dataset, tmp_path, saved):
    # A resumed auto run is not timed again: its plan, and Muon's dtype, come from last.pt.
    config = _muon_config(tiny_dataset, tmp_path, precision=Precision.auto, select_fraction=0.5,
                          whiten=False)
    loaders = build_loaders(config.loader, config.augment, config.seed, device=CPU)
    plan = plan_precision(config.precision, CPU)
    state = {**ModelTrainer(config, loaders, CPU, plan, Distributed(), None).state_dict(),
             "precision": saved}
    trainer = ModelTrainer(config, loaders, CPU, plan, Distributed(), state)
    expected = torch.float32 if saved == "fp32" else torch.bfloat16
    assert not trainer.measure_precision and trainer.plan.name == saved
    muons = [trainer.optimizers.muon, trainer.selection.optimizers.muon]
    assert {muon.orthogonalize_dtype for muon in muons} == {expected}
