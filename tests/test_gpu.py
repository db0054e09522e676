"""CUDA-only paths (fp16 grad scaler, bf16, non-blocking copies, torch.compile); skip without CUDA."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import logits_of_two_test_passes
from fastcifar.config import AugmentConfig, Device, LoaderConfig, Precision, recipe
from fastcifar.device import DeviceStep, plan_precision
from fastcifar.training import train

pytestmark = [pytest.mark.gpu, pytest.mark.full_width,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def gpu_config(data_dir, tmp_path, **changes):
    base = recipe("fast", epochs=3, max_lr=0.05, make_plots=False, device=Device.cuda,
                  loader=LoaderConfig(data_dir=data_dir, batch_size=24, workers=2),
                  augment=AugmentConfig(cutout_size=4), out_dir=tmp_path / "runs",
                  weights_dir=tmp_path / "weights")
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize("precision", [Precision.fp16, Precision.bf16, Precision.fp32])
def test_cuda_training_learns_in_each_precision(tiny_dataset, tmp_path, precision):
    result = train(gpu_config(tiny_dataset, tmp_path, precision=precision))
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.history[-1].test_accuracy >= 0.8


def test_fp16_uses_a_grad_scaler_and_bf16_does_not():
    device = torch.device("cuda")
    assert plan_precision(Precision.fp16, device).use_grad_scaler
    assert not plan_precision(Precision.bf16, device).use_grad_scaler


def test_device_step_copies_to_cuda_channels_last():
    step = DeviceStep([0.0] * 3, [1.0] * 3, torch.device("cuda"), True)
    images, labels = step(torch.full((2, 3, 32, 32), 7, dtype=torch.uint8), torch.tensor([1, 2]))
    assert images.is_cuda and labels.is_cuda
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert float(images[0, 0, 0, 0]) == 7.0


def test_compiled_cuda_training_runs(tiny_dataset, tmp_path):
    result = train(gpu_config(tiny_dataset, tmp_path, epochs=1, compile=True))
    assert result.history[0].train_loss > 0 and result.warmup_seconds > 0


def test_device_step_matches_a_cpu_reference_from_a_pinned_buffer():
    # The real CIFAR-10 mean/std and a pinned source, as FFCV hands batches over on CUDA.
    mean, std = [125.3, 123.0, 113.9], [63.0, 62.1, 66.7]
    images = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8).pin_memory()
    expected = (images.float() - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
        1, 3, 1, 1)
    step = DeviceStep(mean, std, torch.device("cuda"), True)
    result, _ = step(images, torch.zeros(512, dtype=torch.long).pin_memory())
    images.zero_()  # what the loader thread does to the buffer next: the copy must be done
    torch.testing.assert_close(result.cpu(), expected, atol=1e-4, rtol=1e-5)


def test_two_evaluations_through_the_real_test_loader_give_identical_logits(tiny_dataset):
    first, second, count = logits_of_two_test_passes(tiny_dataset, torch.device("cuda"), 4)
    assert first.shape[0] == count
    assert torch.equal(first, second)


def test_device_resident_batches_stay_on_cuda_and_match_the_cpu_path(tiny_dataset):
    import numpy as np

    from fastcifar.data.augment import augment_batch, fill_colour
    from fastcifar.data.augment_torch import augment_batch_torch
    from fastcifar.data.loaders import build_loaders

    config = LoaderConfig(data_dir=tiny_dataset, batch_size=24, workers=2, on_device=True)
    geometry = AugmentConfig(pad=2, cutout_size=4, flip_alternate=True)  # exact on any device
    on_cuda = build_loaders(config, geometry, 0, device=torch.device("cuda"))
    on_cpu = build_loaders(config, geometry, 0)
    for (images, labels), (cpu_images, cpu_labels) in zip(
            on_cuda.train_epoch(1), on_cpu.train_epoch(1), strict=True):
        assert images.is_cuda and images.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(images.cpu(), cpu_images) and torch.equal(labels.cpu(), cpu_labels)
    step = DeviceStep(on_cuda.metadata.mean, on_cuda.metadata.std, torch.device("cuda"), True)
    assert step(images, labels)[0].is_cuda
    # colour ops on the GPU: within 1 grey level of the numba kernel, as on the CPU
    colour = recipe("seed").augment
    source = np.random.default_rng(0).integers(0, 256, (256, 32, 32, 3), dtype=np.uint8)
    fill = fill_colour(on_cuda.metadata.mean)
    kernel = augment_batch(source, np.arange(256), colour, 0, fill).astype(np.int16)
    on_gpu = augment_batch_torch(torch.from_numpy(source).cuda(), np.arange(256), colour, 0, fill)
    assert np.abs(on_gpu.cpu().numpy().astype(np.int16) - kernel).max() <= 1


def test_a_selecting_run_learns_in_fp16_with_a_loss_scaler_of_its_own_for_the_proxy(
        tiny_dataset, tmp_path):
    # CPU twins: test_selection.py's test_a_selecting_run_learns_in_bf16 (no scaler) and
    # test_the_proxy_updates_its_own_loss_scale.
    from fastcifar.checkpoint import load_checkpoint

    result = train(gpu_config(tiny_dataset, tmp_path, precision=Precision.fp16,
                              select_fraction=0.5))
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.history[-1].test_accuracy > 0.5  # 3 classes: chance is 1/3
    saved = load_checkpoint(result.run_dir / "last.pt")
    # Both scales were saved; that the proxy steps its own is the CPU test
    # test_the_trainer_gives_the_proxy_a_scaler_apart_from_the_models.
    assert saved["scaler"] and saved["proxy_scaler"]


def test_checkpoint_rng_state_restores_the_cuda_generator():
    # CPU twin: test_checkpoint.py's round trip of the Python, numpy and torch states.
    from fastcifar.checkpoint import restore_rng_state, rng_state

    # The last GPU, as a rank's under torchrun. On a one-GPU machine it is the default one,
    # so there this cannot tell the run's device from cuda:0.
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    torch.cuda.manual_seed_all(3)
    state = rng_state(device)
    expected = torch.rand(4, device=device)
    torch.cuda.manual_seed_all(9)
    restore_rng_state(state, device)
    assert torch.equal(torch.rand(4, device=device), expected)  # dropout draws on the GPU
