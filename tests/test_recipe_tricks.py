"""The express recipe's tricks, each checked on what it must do (and failing when broken).

Model side: whitening re-parametrisation, dirac init, frozen BN scales. Optimiser side: fast
BN shifts, Muon on conv filters, lookahead averaging. Evaluation: multi-crop TTA. Data: held-out
train images. The loop: every trick together trains, and resumes bit for bit.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from fastcifar.config import EXPRESS, LoaderConfig, Precision, recipe
from fastcifar.data.loaders import build_loaders, read_labels, split_holdout
from fastcifar.device import DeviceStep
from fastcifar.errors import FastCifarError
from fastcifar.evaluation import predict_logits
from fastcifar.model import (
    CustResNet,
    build_model,
    dirac_init_,
    plain_state_dict,
    whiten_prep_,
    whitening_filters,
)
from fastcifar.optim import FilterMuon, Lookahead, Optimizers
from fastcifar.training import train
from fastcifar.weights_file import read_weights_file


def smooth_batch(count: int = 64, seed: int = 0) -> torch.Tensor:
    """Correlated (blurred) normalised images, like natural ones, so whitening has work to do."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(count, 3, 36, 36, generator=generator)
    blurred = nn.functional.avg_pool2d(noise, 5, stride=1)
    mixed = blurred + 0.5 * blurred.mean(dim=1, keepdim=True)  # correlate the channels
    return (mixed - mixed.mean()) / mixed.std()


# ---------------------------------------------------------------- model


def test_whitening_filters_decorrelate_the_patches():
    images = smooth_batch(128)
    filters = whitening_filters(images, 3, eps=1e-6)
    assert filters.shape == (27, 3, 3, 3)
    out = nn.functional.conv2d(images, filters).permute(1, 0, 2, 3).flatten(1)
    covariance = torch.cov(out.double())
    torch.testing.assert_close(covariance, torch.eye(27, dtype=torch.float64), atol=0.02,
                               rtol=0)


@pytest.mark.full_width
def test_whitened_prep_folds_into_the_plain_conv_and_keeps_the_parameter_count():
    model = CustResNet()
    whitened = whiten_prep_(model, smooth_batch(), eps=1e-2)
    assert sum(p.numel() for p in model.parameters()) == 6_573_130
    assert whitened.whitening.requires_grad is False  # a buffer: fixed, not trained
    x = smooth_batch(8, seed=1)
    torch.testing.assert_close(whitened(x), whitened.forward_unfolded(x), atol=1e-5, rtol=1e-5)
    plain = CustResNet()
    plain.load_state_dict(plain_state_dict(model))  # the saved weights are plain CustResNet's
    model.eval(), plain.eval()
    torch.testing.assert_close(plain(x), model(x), atol=1e-5, rtol=1e-5)


def test_whitened_prep_trains_the_mixing_weights_only():
    model = CustResNet()
    whitened = whiten_prep_(model, smooth_batch(), eps=1e-2)
    before = whitened.whitening.clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(smooth_batch(8)).sum().backward()
    optimizer.step()
    torch.testing.assert_close(whitened.whitening, before, rtol=0, atol=0)
    assert whitened.mixing.grad is not None and whitened.mixing.grad.abs().sum() > 0


@pytest.mark.full_width  # its inputs have the real network's channel counts
def test_dirac_init_makes_each_conv_pass_its_inputs_through():
    model = CustResNet()
    assert dirac_init_(model) == 8  # every 3x3 conv of the layer plan
    conv = model.layer1.residual[0].layers[0]
    x = torch.randn(2, 128, 8, 8)
    torch.testing.assert_close(conv(x)[:, :128], x)
    prep = model.prep.layers[0]
    assert torch.equal(prep(x[:, :3])[:, :3], x[:, :3])


@pytest.mark.full_width
def test_build_model_freezes_bn_scales_and_sets_bn_eps_and_momentum():
    config = dataclasses.replace(EXPRESS, whiten=False, channels_last=False, bn_eps=1e-12,
                                 bn_momentum=0.6)
    model = build_model(config, torch.device("cpu"))
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not m.weight.requires_grad and m.eps == 1e-12 and m.momentum == 0.6
               for m in norms)
    assert sum(p.numel() for p in model.parameters()) == 6_573_130  # still parameters


# ---------------------------------------------------------------- optimisers


def _model_for(config) -> nn.Module:
    return build_model(dataclasses.replace(config, whiten=False), torch.device("cpu"))


def test_bn_shifts_train_at_64x_the_lr_with_decay_divided_by_64():
    config = dataclasses.replace(EXPRESS, muon_lr=0.0)
    model = _model_for(config)
    optimizers = Optimizers(model, config, steps_per_epoch=10)
    shifts = {id(m.bias) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    (group,) = [g for g in optimizers.main.param_groups if id(g["params"][0]) in shifts]
    assert {id(p) for p in group["params"]} == shifts
    assert group["weight_decay"] == pytest.approx(config.weight_decay / 64)
    main_lrs, shift_lrs = [], []
    for _ in range(config.epochs * 10):
        main_lrs.append(optimizers.main.param_groups[0]["lr"])
        shift_lrs.append(group["lr"])
        optimizers.main.step()  # no gradients: the weights stay, the schedule advances
        optimizers.schedule_step()
    assert max(main_lrs) == pytest.approx(config.max_lr)
    assert shift_lrs == pytest.approx([64 * lr for lr in main_lrs])
    scales = [m.weight for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    in_groups = {id(p) for g in optimizers.main.param_groups for p in g["params"]}
    assert not any(id(p) in in_groups for p in scales)  # frozen scales are not optimised


def test_muon_steps_the_conv_filters_with_orthogonal_updates_and_sgd_the_rest():
    config = dataclasses.replace(EXPRESS, muon_lr=0.05, muon_momentum=0.0)
    model = _model_for(config).to(memory_format=torch.channels_last)
    optimizers = Optimizers(model, config, steps_per_epoch=10)
    filters = [p for p in model.parameters() if p.ndim == 4]
    muon_ids = {id(p) for p in optimizers.muon.matrices}
    assert len(muon_ids) == len(filters) == 8
    main_ids = {id(p) for g in optimizers.main.param_groups for p in g["params"]}
    assert not main_ids & {id(p) for p in filters}  # each parameter in one optimiser only
    assert id(model.fc.weight) in main_ids
    before = [p.detach().clone() for p in filters]
    model(torch.randn(32, 3, 32, 32)).square().mean().backward()
    optimizers.step(torch.amp.GradScaler("cpu", enabled=False))
    lr = optimizers.muon.param_groups[0]["lr"]
    for old, new in zip(before, filters, strict=True):
        update = (old - new).flatten(1).double()
        rows, columns = update.shape  # torch's Muon scales tall matrices' steps up
        singular_values = torch.linalg.svdvals(update / (lr * max(1.0, rows / columns) ** 0.5))
        # Newton-Schulz orthogonalises approximately: the leading singular values sit near 1
        # (an SGD step's spread over orders of magnitude); low-rank directions stay small.
        assert singular_values.max() < 1.5
        assert singular_values[:len(singular_values) // 4].min() > 0.5


def test_filter_muon_shares_storage_with_the_filters():
    conv = nn.Conv2d(4, 8, 3).to(memory_format=torch.channels_last)
    muon = FilterMuon([conv.weight], lr=0.1, momentum=0.0)
    muon.matrices[0].data.add_(1.0)
    assert torch.equal(conv.weight.detach().permute(0, 2, 3, 1).flatten(1),
                       muon.matrices[0].detach())


def test_filter_muon_steps_like_muon_on_the_filter_matrices_step_after_step():
    # Each step must see that step's gradient only, in the matrix view's column order.
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, bias=False).to(memory_format=torch.channels_last)
    reference = nn.Parameter(conv.weight.detach().permute(0, 2, 3, 1).reshape(8, -1).clone())
    muon = FilterMuon([conv.weight], lr=0.1, momentum=0.5)
    plain = torch.optim.Muon([reference], lr=0.1, momentum=0.5, nesterov=True, weight_decay=0.0)
    for _ in range(3):
        images = torch.randn(2, 4, 6, 6)
        muon.zero_grad()
        plain.zero_grad()
        conv(images).square().mean().backward()
        filters = reference.view(8, 3, 3, 4).permute(0, 3, 1, 2)
        nn.functional.conv2d(images, filters).square().mean().backward()
        muon.step()
        plain.step()
        torch.testing.assert_close(conv.weight.detach().permute(0, 2, 3, 1).reshape(8, -1),
                                   reference.detach())


def test_filter_muon_normalizes_each_filter_before_its_step_when_asked():
    # Rescaled to norm sqrt(rows) first, then Muon's step with the gradient taken before: the
    # step plain Muon takes from the rescaled filters. Without the option the norm is kept.
    torch.manual_seed(0)
    convs = [nn.Conv2d(4, 8, 3, bias=False).to(memory_format=torch.channels_last)
             for _ in range(2)]
    convs[1].load_state_dict(convs[0].state_dict())
    images = torch.randn(2, 4, 6, 6)
    normalized = FilterMuon([convs[0].weight], lr=0.1, momentum=0.5, normalize_filters=True)
    untouched = FilterMuon([convs[1].weight], lr=0.1, momentum=0.5)
    for conv in convs:
        conv(images).square().mean().backward()
    matrix = convs[1].weight.detach().permute(0, 2, 3, 1).reshape(8, -1).clone()
    gradient = convs[1].weight.grad.permute(0, 2, 3, 1).reshape(8, -1).clone()
    references = [nn.Parameter(matrix * 8 ** 0.5 / matrix.norm()), nn.Parameter(matrix.clone())]
    for reference in references:
        reference.grad = gradient.clone()
    plain = torch.optim.Muon(references, lr=0.1, momentum=0.5, nesterov=True, weight_decay=0.0)
    assert abs(matrix.norm() - 8 ** 0.5) > 0.5  # the check has teeth: init is not at sqrt(8)
    normalized.step()
    untouched.step()
    plain.step()
    for conv, reference in zip(convs, references, strict=True):
        torch.testing.assert_close(conv.weight.detach().permute(0, 2, 3, 1).reshape(8, -1),
                                   reference.detach())


def test_filter_muon_normalize_keeps_an_all_zero_filter_finite():
    # 0 / 0 would make the filter NaN and with it every later batch's loss.
    conv = nn.Conv2d(4, 8, 3, bias=False).to(memory_format=torch.channels_last)
    nn.init.zeros_(conv.weight)
    muon = FilterMuon([conv.weight], lr=0.1, momentum=0.5, normalize_filters=True)
    conv(torch.randn(2, 4, 6, 6)).square().mean().backward()
    muon.step()
    assert torch.isfinite(conv.weight).all()


def test_muon_normalize_filters_is_an_option_of_muon_runs():
    assert recipe("express-muon", muon_normalize_filters=True).muon_normalize_filters
    with pytest.raises(FastCifarError, match="needs --muon-lr"):
        recipe("express", muon_normalize_filters=True)


def test_lookahead_moves_the_average_and_resets_the_live_weights():
    model = nn.Linear(3, 2)
    start = model.weight.detach().clone()
    lookahead = Lookahead(model, every=5, total_steps=20)
    with torch.no_grad():
        model.weight.add_(1.0)
    lookahead.after_step(model, 4)  # not an update step: nothing happens
    torch.testing.assert_close(model.weight.detach(), start + 1.0)
    lookahead.after_step(model, 5)
    decay = 0.95 ** 5 * (5 / 20) ** 3
    expected = start + (1 - decay) * 1.0
    torch.testing.assert_close(lookahead.average["weight"], expected)
    torch.testing.assert_close(model.weight.detach(), expected)  # the live weights follow
    with torch.no_grad():
        model.weight.add_(1.0)
    lookahead.after_step(model, 20)  # the last step: update, then copy the average in
    torch.testing.assert_close(model.weight.detach(), lookahead.average["weight"])
    assert lookahead.decay(20) == pytest.approx(0.95 ** 5)


# ---------------------------------------------------------------- evaluation


class _ShiftProbe(nn.Module):
    """Logits that show where the image's (0, 0) pixel and (0, 31) pixel came from."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images[:, 0, 0, :2].clone()


def test_multicrop_tta_weights_the_shifted_and_mirrored_views():
    images = torch.arange(32.0).repeat(1, 3, 32, 1)  # pixel value = its column
    model = _ShiftProbe()
    plain = predict_logits(model, images, tta=True)
    torch.testing.assert_close(plain, torch.tensor([[15.5, 15.5]]))  # (0 + 31) / 2, (1 + 30) / 2
    multicrop = predict_logits(model, images, tta=True, shifts=True)
    # up-left view starts at column 1, down-right at reflected column 1; mirrors likewise
    up_left = torch.tensor([[(1 + 30) / 2, (2 + 29) / 2]])
    down_right = torch.tensor([[(1 + 30) / 2, (0 + 31) / 2]])
    torch.testing.assert_close(multicrop, 0.5 * plain + 0.25 * up_left + 0.25 * down_right)


class _CloseCallInBf16(nn.Module):
    """bf16 logits, as a model gives them under bf16 autocast: class 1 leads by bf16's smallest
    step at 1 in the plain view and ties class 0 in the mirrored one."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        left = images[:, 0, 0, 0]  # 1 in the plain view, 0 mirrored
        return torch.stack([torch.ones_like(left), 1 + left * 2 ** -7], 1).to(torch.bfloat16)


def test_tta_averages_and_scores_bf16_logits_in_fp32():
    images = torch.tensor([[[[1.0, 0.0]]]])
    averaged = predict_logits(_CloseCallInBf16(), images, tta=True)
    # (1 + 1.0078125) / 2 = 1.00390625 needs a 9th bit: in bf16 it rounds to 1, a tie with
    # class 0 that argmax would give to class 0
    assert averaged.dtype == torch.float32 and averaged.argmax(1).item() == 1
    torch.testing.assert_close(averaged, torch.tensor([[1.0, 1.00390625]]))


# ---------------------------------------------------------------- data


def test_holdout_is_stratified_disjoint_and_the_same_for_every_seed(tiny_dataset):
    loaders = build_loaders(LoaderConfig(data_dir=tiny_dataset, batch_size=8, holdout=30),
                            None, seed=0)
    other = build_loaders(LoaderConfig(data_dir=tiny_dataset, batch_size=8, holdout=30),
                          None, seed=5)
    assert loaders.train_count == 120 - 30 and loaders.holdout_count == 30
    held = np.concatenate([labels.numpy() for _, labels in loaders.holdout])
    assert np.bincount(held).tolist() == [10, 10, 10]
    labels = read_labels(loaders.metadata.train_path)
    train_part, held_part = split_holdout(labels, 30)
    assert not set(train_part) & set(held_part) and len(train_part) + len(held_part) == 120
    assert np.array_equal(held, labels[held_part])
    assert np.array_equal(np.concatenate([b.numpy() for _, b in other.holdout]), held)


def test_holdout_must_leave_train_images(tiny_dataset):
    from fastcifar.errors import FastCifarError

    with pytest.raises(FastCifarError, match="holdout"):
        build_loaders(LoaderConfig(data_dir=tiny_dataset, holdout=120), None, seed=0)


# ---------------------------------------------------------------- the loop


def express_config(data_dir, tmp_path, **changes):
    # 12 steps of 24 images: the real-data peak LR (0.8) is far too high for so few.
    base = recipe("express", epochs=3, make_plots=False, precision=Precision.fp32,
                  loader=LoaderConfig(data_dir=data_dir, batch_size=24, workers=1, holdout=24),
                  out_dir=tmp_path / "runs", weights_dir=tmp_path / "weights").with_max_lr(0.05)
    return dataclasses.replace(base, **changes)


@pytest.mark.slow
def test_express_with_every_trick_learns_saves_plain_weights_and_resumes_bit_for_bit(
        tiny_dataset, tmp_path):
    from fastcifar.training import TrainCallbacks

    class Stop(Exception):
        pass

    class StopAfterFirstEpoch(TrainCallbacks):
        def on_epoch(self, stats) -> None:
            raise Stop

    # express plus the three it leaves off
    tricks = {"muon_lr": 0.05, "muon_normalize_filters": True, "lookahead_every": 2}
    full = train(express_config(tiny_dataset, tmp_path / "a", **tricks))
    history = full.history
    assert history[-1].train_loss < history[0].train_loss
    assert history[-1].test_accuracy >= 0.8 and history[-1].holdout_accuracy >= 0.8
    state_dict, _ = read_weights_file(full.best_weights)
    CustResNet(num_classes=3, logit_scale=0.125).load_state_dict(state_dict)  # folded, strict

    with pytest.raises(Stop):
        train(express_config(tiny_dataset, tmp_path / "b", **tricks),
              callbacks=StopAfterFirstEpoch())
    (checkpoint,) = (tmp_path / "b" / "runs").glob("*/last.pt")
    resumed = train(express_config(tiny_dataset, tmp_path / "b", **tricks, resume=checkpoint))
    assert [r.train_loss for r in resumed.history] == [r.train_loss for r in history]
    assert [r.holdout_accuracy for r in resumed.history] == [
        r.holdout_accuracy for r in history]


class NonBlockingCopies(TorchFunctionMode):
    """Records every torch call that asks for an asynchronous copy, whichever route it takes:
    Tensor.to, Tensor.cuda, Tensor.copy_ (keyword or positional non_blocking). With
    `fake_cuda`, copies aimed at CUDA return the tensor itself, so a CPU machine runs the
    GPU path's calls."""

    def __init__(self, fake_cuda: bool = False) -> None:
        super().__init__()
        self.seen: list[str] = []
        self.fake_cuda = fake_cuda

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        positional = name in ("to", "cuda", "copy_") and any(arg is True for arg in args[1:])
        if kwargs.get("non_blocking") or positional:
            self.seen.append(name)
        aimed_at_cuda = name == "cuda" or (name == "to" and any(
            isinstance(arg, torch.device) and arg.type == "cuda" for arg in args[1:]))
        if self.fake_cuda and aimed_at_cuda:
            return args[0]
        return func(*args, **kwargs)


def test_device_step_never_copies_asynchronously_and_keeps_its_batch_when_the_buffer_changes(
        monkeypatch):
    # FFCV reuses its batch buffers, pinned on CUDA machines: the CPU twin of test_gpu's
    # pinned-buffer test. On the GPU path (a CUDA device, a pinned batch) no call may ask for
    # a non-blocking copy, and rewriting the buffer after the call, as the loader thread does,
    # leaves the normalised batch as it was.
    mean, std = [125.3, 123.0, 113.9], [63.0, 62.1, 66.7]
    step = DeviceStep(mean, std, torch.device("cpu"), True)
    step.device = torch.device("cuda")  # what the loop passes on a GPU machine
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self, *args: True)
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    expected = (images.float() - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
        1, 3, 1, 1)
    with NonBlockingCopies(fake_cuda=True) as copies:
        result, _ = step(images, torch.zeros(16, dtype=torch.long))
    images.zero_()
    assert copies.seen == []
    torch.testing.assert_close(result, expected, atol=1e-4, rtol=1e-5)


def test_the_copy_recorder_sees_each_route_to_an_asynchronous_copy():
    source, target = torch.zeros(2), torch.empty(2)
    with NonBlockingCopies() as copies:
        source.to("cpu", non_blocking=True)
        source.to("cpu", torch.float32, True)
        target.copy_(source, non_blocking=True)
        target.copy_(source, True)
        source.to("cpu")
    assert copies.seen == ["to", "to", "copy_", "copy_"]
    with NonBlockingCopies(fake_cuda=True) as copies:
        assert source.to(torch.device("cuda"), non_blocking=True) is source
        assert source.cuda(non_blocking=True) is source
    assert copies.seen == ["to", "cuda"]
