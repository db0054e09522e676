"""Optimisers, their parameter groups and the per-step OneCycle learning-rate schedule."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
import torch.optim._muon as torch_muon
from torch import nn

from fastcifar.config import OptimizerName, TrainConfig
from fastcifar.errors import FastCifarError


def _norm_shifts(model: nn.Module) -> set[int]:
    """ids of the BatchNorm shift (bias) parameters."""
    return {id(module.bias) for module in model.modules()
            if isinstance(module, nn.BatchNorm2d) and module.bias is not None}


def parameter_groups(model: nn.Module, config: TrainConfig,
                     exclude: set[int] | None = None) -> list[dict]:
    """Weight decay on conv/linear weights; BN scales and shifts decay only with `decay_norm`.

    BN shifts form their own group at LR x `bn_bias_lr_scale` and weight decay / that scale
    (so LR x decay is unchanged). Each group records its `lr_scale` for the schedule.
    """
    exclude = exclude or set()
    shifts = _norm_shifts(model)
    scale = config.bn_bias_lr_scale
    trainable = [p for p in model.parameters() if p.requires_grad and id(p) not in exclude]
    shift_group = [p for p in trainable if id(p) in shifts and scale != 1.0]
    rest = [p for p in trainable if not (id(p) in shifts and scale != 1.0)]
    decayed = [p for p in rest if p.ndim > 1 or config.decay_norm]
    plain = [p for p in rest if p.ndim <= 1 and not config.decay_norm]
    groups = [{"params": decayed, "weight_decay": config.weight_decay, "lr_scale": 1.0,
               "name": "weights"}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0, "lr_scale": 1.0,
                       "name": "norm"})
    if shift_group:
        decay = config.weight_decay / scale if config.decay_norm else 0.0
        groups.append({"params": shift_group, "weight_decay": decay, "lr_scale": scale,
                       "name": "bn_shifts"})
    return [group for group in groups if group["params"]]


def make_optimizer(model: nn.Module, config: TrainConfig,
                   exclude: set[int] | None = None) -> torch.optim.Optimizer:
    """Adam or SGD (Nesterov) over the parameter groups (less `exclude`); the schedule sets the LR."""
    groups = parameter_groups(model, config, exclude)
    if config.optimizer == OptimizerName.adam:
        return torch.optim.Adam(groups, lr=config.max_lr)
    return torch.optim.SGD(groups, lr=config.max_lr, momentum=config.momentum,
                           nesterov=config.nesterov and config.momentum > 0)


def _matrix_view(tensor: torch.Tensor) -> torch.Tensor:
    """A conv filter bank (out, in, k, k) as an (out, in*k*k) matrix sharing its storage.

    Channels-last filters are contiguous in (out, k, k, in) order; orthogonalising a matrix
    with permuted columns permutes the result's columns, so either order serves Muon.
    """
    if tensor.is_contiguous():
        return tensor.view(tensor.shape[0], -1)
    permuted = tensor.permute(0, 2, 3, 1)
    if permuted.is_contiguous():
        return permuted.view(tensor.shape[0], -1)
    raise FastCifarError("Muon needs contiguous or channels-last conv filters")


def newton_schulz(matrix: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                  eps: float, dtype: torch.dtype) -> torch.Tensor:
    """torch.optim.Muon's quintic Newton-Schulz orthogonalisation, run in `dtype`.

    torch's own always casts to bf16, which a CPU without native bf16 (AVX2 only) emulates: on
    a 2-core AMD EPYC the recipe's optimiser step took 30.0 s with it and 0.64 s in fp32, beside
    5.8 s for the forward and backward of a 20 px batch of 512 (benchmarks/muon_step.py).
    `matrix` is left untouched (with momentum off it is Muon's momentum buffer).
    """
    a, b, c = coefficients
    ortho = matrix.to(dtype)
    tall = ortho.size(0) > ortho.size(1)
    if tall:  # iterate on the smaller Gram matrix
        ortho = ortho.T
    ortho = ortho / ortho.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = ortho @ ortho.T
        ortho = torch.addmm(ortho, torch.addmm(gram, gram, gram, beta=b, alpha=c), ortho, beta=a)
    return ortho.T if tall else ortho


@contextlib.contextmanager
def _torch_muon_orthogonalizes_in(dtype: torch.dtype) -> Iterator[None]:
    """torch's Muon step, with its Newton-Schulz iteration in `dtype` (torch offers no
    setting; its step looks the function up at each call)."""
    original = torch_muon._zeropower_via_newtonschulz
    torch_muon._zeropower_via_newtonschulz = functools.partial(newton_schulz, dtype=dtype)
    try:
        yield
    finally:
        torch_muon._zeropower_via_newtonschulz = original


def orthogonalization_dtype(precision_dtype: torch.dtype | None,
                            device: torch.device) -> torch.dtype:
    """The dtype Muon orthogonalises in: fp32 in an fp32 run on the CPU (auto picks fp32 where
    bf16 is slow there, and bf16 matmuls are then slow too), else bf16 as torch does."""
    return torch.float32 if precision_dtype is None and device.type == "cpu" else torch.bfloat16


class FilterMuon(torch.optim.Muon):
    """torch's Muon over 4-D conv filters, each seen as a matrix that shares its storage.

    torch.optim.Muon takes 2-D parameters only: it steps matrix views of the filters, whose
    gradients are set (as views too) as soon as each filter's gradient is accumulated.
    `zero_grad` clears the filters' own gradients too: left alone, autograd would add each
    step's gradient to the last and Muon would orthogonalise their running sum.
    """

    def __init__(self, filters: list[nn.Parameter], lr: float, momentum: float,
                 normalize_filters: bool = False) -> None:
        self.filters = list(filters)
        self.normalize_filters = normalize_filters
        self.matrices = [nn.Parameter(_matrix_view(filter_.data)) for filter_ in filters]
        for filter_, matrix in zip(filters, self.matrices, strict=True):
            filter_.register_post_accumulate_grad_hook(self._gradient_setter(matrix))
        super().__init__(self.matrices, lr=lr, momentum=momentum, nesterov=True,
                         weight_decay=0.0)
        self.orthogonalize_dtype = torch.bfloat16  # torch's; see orthogonalization_dtype

    @staticmethod
    def _gradient_setter(matrix: nn.Parameter):
        def set_gradient(filter_: torch.Tensor) -> None:
            # The gradient's columns in the order of the filter's matrix view (a view when
            # the layouts agree, else a copy: Muon only reads it).
            gradient = filter_.grad
            if not filter_.is_contiguous():  # channels-last filters: (out, k, k, in) order
                gradient = gradient.permute(0, 2, 3, 1)
            matrix.grad = gradient.reshape(gradient.shape[0], -1)
        return set_gradient

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Muon's step, after rescaling each filter matrix to norm sqrt(rows) when asked.

        An all-zero matrix stays zero (its norm is floored) rather than turning into NaNs.
        """
        if self.normalize_filters:
            for matrix in self.matrices:
                matrix.mul_(matrix.shape[0] ** 0.5 / matrix.norm().clamp_min(1e-12))
        if self.orthogonalize_dtype == torch.bfloat16:
            return super().step(closure)
        with _torch_muon_orthogonalizes_in(self.orthogonalize_dtype):
            return super().step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for filter_ in self.filters:
            if set_to_none:
                filter_.grad = None
            elif filter_.grad is not None:
                filter_.grad.zero_()


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int,
                   max_lr: float | None = None) -> torch.optim.lr_scheduler.OneCycleLR:
    """Two-phase linear OneCycle stepped per batch: initial -> max at pct_start -> min at the end.

    Each group peaks at `max_lr` (default the config's) times its `lr_scale`.
    """
    peak = config.max_lr if max_lr is None else max_lr
    total_steps = config.epochs * steps_per_epoch
    if total_steps < 4:
        raise FastCifarError(f"only {total_steps} training steps: OneCycle needs at least 4 "
                             "(more epochs, more data or a smaller --batch-size)")
    # torch needs at least two warm-up steps; only tiny smoke runs ever hit this floor.
    pct_start = max(config.pct_start, 2.0 / total_steps)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[peak * group.get("lr_scale", 1.0) for group in optimizer.param_groups],
        epochs=config.epochs,
        steps_per_epoch=steps_per_epoch,
        pct_start=pct_start,
        anneal_strategy="linear",
        three_phase=False,
        div_factor=1.0 / config.initial_lr_fraction,
        final_div_factor=config.max_lr * config.initial_lr_fraction / config.min_lr,
        cycle_momentum=config.cycle_momentum,
    )


class Optimizers:
    """The run's optimisers and schedules, stepped as one: SGD/Adam, plus Muon when asked.

    With `muon_lr` > 0 the conv filters go to Muon (its own peak LR, the same schedule shape)
    and everything else (BN, the head) to SGD-Nesterov.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, steps_per_epoch: int) -> None:
        filters = ([p for p in model.parameters() if p.requires_grad and p.ndim == 4]
                   if config.muon_lr > 0 else [])
        self.main = make_optimizer(model, config, exclude={id(p) for p in filters})
        self.main_schedule = make_scheduler(self.main, config, steps_per_epoch)
        self.muon = (FilterMuon(filters, config.muon_lr, config.muon_momentum,
                                config.muon_normalize_filters) if filters else None)
        self.muon_schedule = (make_scheduler(self.muon, config, steps_per_epoch, config.muon_lr)
                              if self.muon is not None else None)

    def orthogonalize_for(self, precision_dtype: torch.dtype | None,
                          device: torch.device) -> None:
        """Set Muon's Newton-Schulz dtype for a run in `precision_dtype` (None: fp32)."""
        if self.muon is not None:
            self.muon.orthogonalize_dtype = orthogonalization_dtype(precision_dtype, device)

    @property
    def lr(self) -> float:
        """The LR the next step uses (the main optimiser's first group)."""
        return self.main.param_groups[0]["lr"]

    def group_lrs(self) -> dict[str, float]:
        """The LR the next step uses in each parameter group, by name (`sgd/weights`,
        `sgd/bn_shifts`, ..., `muon/filters`)."""
        kind = type(self.main).__name__.lower()
        lrs = {f"{kind}/{group.get('name', index)}": group["lr"]
               for index, group in enumerate(self.main.param_groups)}
        if self.muon is not None:
            lrs["muon/filters"] = self.muon.param_groups[0]["lr"]
        return lrs

    def zero_grad(self) -> None:
        self.main.zero_grad(set_to_none=True)
        if self.muon is not None:
            self.muon.zero_grad(set_to_none=True)

    def step(self, scaler: torch.amp.GradScaler) -> None:
        """One optimiser step each (through the fp16 scaler; a plain step otherwise)."""
        scaler.step(self.main)
        if self.muon is not None:
            scaler.step(self.muon)

    def schedule_step(self) -> None:
        self.main_schedule.step()
        if self.muon_schedule is not None:
            self.muon_schedule.step()

    def state_dict(self) -> dict:
        state = {"optimizer": self.main.state_dict(), "scheduler": self.main_schedule.state_dict()}
        if self.muon is not None:
            state.update(muon=self.muon.state_dict(), muon_scheduler=self.muon_schedule.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        self.main.load_state_dict(state["optimizer"])
        self.main_schedule.load_state_dict(state["scheduler"])
        if self.muon is not None:
            self.muon.load_state_dict(state["muon"])
            self.muon_schedule.load_state_dict(state["muon_scheduler"])


class Lookahead:
    """Lookahead-style weight average: every `every` steps the average moves towards the live
    weights and is copied back into them; the last step copies it in once more.

    The decay 0.95^every * (step / total)^3 starts near 0 (the average follows the live
    weights) and grows to ~0.77 at the end. It covers all float state, BN statistics included.
    """

    def __init__(self, model: nn.Module, every: int, total_steps: int) -> None:
        self.every, self.total_steps = every, total_steps
        self.average = {name: value.detach().clone()
                        for name, value in model.state_dict().items() if value.is_floating_point()}

    def decay(self, step: int) -> float:
        return 0.95 ** self.every * (step / self.total_steps) ** 3

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        """Call after optimiser step number `step` (1-based, counted over the whole run)."""
        if step % self.every == 0:
            self._update(model, self.decay(step))
        if step == self.total_steps:
            self._update(model, 1.0)  # the run ends on the average

    def _update(self, model: nn.Module, decay: float) -> None:
        live = model.state_dict()
        averages = list(self.average.values())
        currents = [live[name] for name in self.average]
        torch._foreach_lerp_(averages, currents, 1.0 - decay)
        torch._foreach_copy_(currents, averages)

    def state_dict(self) -> dict:
        return {"average": self.average}

    def load_state_dict(self, state: dict) -> None:
        for name, value in state["average"].items():
            self.average[name].copy_(value)
