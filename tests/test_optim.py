"""optim: which parameters decay, and the OneCycle schedule's values step by step."""

from __future__ import annotations

import pytest
import torch

from fastcifar.config import recipe
from fastcifar.model import CustResNet
from fastcifar.optim import make_optimizer, make_scheduler


def one_step_with_zero_gradients(decay_norm: bool, optimizer_name: str) -> dict[str, bool]:
    """Which parameters one optimiser step moved when every gradient is zero: only weight
    decay can move them."""
    torch.manual_seed(0)
    model = CustResNet(num_classes=3)
    config = recipe("fast", optimizer=optimizer_name, weight_decay=0.5, max_lr=0.1,
                    decay_norm=decay_norm)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.bias.fill_(0.5)  # zero at init: decay would not show on it
    optimizer = make_optimizer(model, config)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    return {name: not torch.equal(parameter, before[name])
            for name, parameter in model.named_parameters()}


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_batchnorm_parameters_and_biases_get_no_weight_decay(optimizer_name):
    moved = one_step_with_zero_gradients(decay_norm=False, optimizer_name=optimizer_name)
    model = CustResNet(num_classes=3)
    batchnorm = {f"{module_name}.{name}" for module_name, module in model.named_modules()
                 if isinstance(module, torch.nn.BatchNorm2d)
                 for name, _ in module.named_parameters()}
    plain = batchnorm | {name for name in moved if name.endswith(".bias")}
    assert len(batchnorm) == 2 * 8 and "fc.bias" in plain  # 8 BatchNorms, the head's bias
    assert {name for name, was_moved in moved.items() if not was_moved} == plain


def test_decay_norm_decays_every_parameter():
    assert all(one_step_with_zero_gradients(decay_norm=True, optimizer_name="sgd").values())


def test_schedule_starts_peaks_and_ends_at_the_configured_lrs():
    config = recipe("fast", epochs=8)  # 0.4 peak, a tenth of it at the start, 4e-5 at the end
    optimizer = make_optimizer(torch.nn.Linear(2, 2), config)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch=10)
    lrs = []
    for _ in range(80):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    peak_step = 19  # a quarter of the 80 steps warm up
    assert lrs[0] == pytest.approx(0.04) and lrs[-1] == pytest.approx(4e-5)
    assert max(lrs) == pytest.approx(0.4) and lrs.index(max(lrs)) == peak_step
    rises = [b - a for a, b in zip(lrs[:peak_step + 1], lrs[1:peak_step + 1], strict=False)]
    falls = [b - a for a, b in zip(lrs[peak_step:], lrs[peak_step + 1:], strict=False)]
    assert rises == pytest.approx([0.36 / peak_step] * peak_step)  # linear warm-up
    assert falls == pytest.approx([(4e-5 - 0.4) / 60] * 60)  # linear decay


def test_muons_schedule_ends_at_the_fraction_of_its_peak_that_sgds_does():
    # As --min-lr's help says: --max-lr moves Muon's end, though not its peak.
    import warnings

    from fastcifar.optim import FilterMuon

    config = recipe("express-muon", epochs=2, max_lr=0.2)  # SGD: 0.2 down to 8e-5
    muon = FilterMuon([torch.nn.Parameter(torch.ones(4, 2, 3, 3))], config.muon_lr,
                      config.muon_momentum, False)
    scheduler = make_scheduler(muon, config, 10, config.muon_lr)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stepping the schedule alone
        for _ in range(20):
            lrs.append(muon.param_groups[0]["lr"])
            scheduler.step()
    assert max(lrs) == pytest.approx(config.muon_lr)
    assert lrs[-1] == pytest.approx(config.muon_lr * config.min_lr / config.max_lr)  # 9.6e-5
