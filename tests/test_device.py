"""device: which GPU a torchrun rank takes and which precision `auto` picks on CUDA, checked
on the CPU with torch's CUDA queries stood in for (CI has no GPU)."""

from __future__ import annotations

import pytest
import torch

from fastcifar.config import Device, Precision
from fastcifar.device import plan_precision, select_device
from fastcifar.errors import FastCifarError


@pytest.fixture
def one_gpu(monkeypatch):
    """A machine whose torch sees one CUDA device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_a_torchrun_rank_without_a_gpu_of_its_own_is_one_line(one_gpu):
    assert select_device(Device.auto, 0) == torch.device("cuda", 0)
    for choice in (Device.auto, Device.cuda):  # "invalid device ordinal" deep in torch before
        with pytest.raises(FastCifarError, match=r"rank 1 has no GPU of its own: this machine "
                                                 r"has 1; start at most 1 \(--nproc-per-node 1\)"):
            select_device(choice, 1)


@pytest.mark.parametrize(("capability", "expected"), [((7, 5), "fp16"), ((7, 0), "fp16"),
                                                      ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_is_bf16_from_ampere_and_fp16_with_a_scaler_before(monkeypatch, capability,
                                                                          expected):
    # torch's is_bf16_supported() also says yes where bf16 is only emulated (a T4, a V100).
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    plan = plan_precision(Precision.auto, torch.device("cuda", 0))
    assert plan.name == expected and plan.use_grad_scaler == (expected == "fp16")
