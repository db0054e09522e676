"""Where and in what precision the model runs: device choice, the precision plan (timed on the
CPU), autocast, and the device step that turns loader batches into normalised device tensors."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as functional
from torch import nn

from fastcifar.config import Device, Precision
from fastcifar.errors import FastCifarError


def select_device(choice: Device, local_rank: int = 0) -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU; an explicit choice must be available, and a
    torchrun rank's GPU (`local_rank`) must exist."""
    if choice == Device.auto:
        if torch.cuda.is_available():
            return _rank_gpu(local_rank)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if choice == Device.cuda and not torch.cuda.is_available():
        raise FastCifarError("--device cuda asked for, but no CUDA device is available")
    if choice == Device.mps and not torch.backends.mps.is_available():
        raise FastCifarError("--device mps asked for, but MPS is not available")
    return _rank_gpu(local_rank) if choice == Device.cuda else torch.device(choice.value)


def _rank_gpu(local_rank: int) -> torch.device:
    """GPU `local_rank`: 'invalid device ordinal' deep in torch before, with more ranks than GPUs."""
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise FastCifarError(f"torchrun rank {local_rank} has no GPU of its own: this machine has "
                             f"{count}; start at most {count} (--nproc-per-node {count})")
    return torch.device("cuda", local_rank)


@dataclass(frozen=True)
class PrecisionPlan:
    """The autocast dtype (None: fp32) and whether fp16 needs a gradient scaler."""

    autocast_dtype: torch.dtype | None
    use_grad_scaler: bool

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]


def plan_precision(choice: Precision, device: torch.device) -> PrecisionPlan:
    """auto: bf16 on bf16-capable CUDA, fp16 + scaler on older CUDA, fp32 elsewhere.

    On the CPU bf16 is faster on some machines and slower on others, so `train` replaces
    auto's fp32 there with the faster of the two, measured (`measure_precision`).
    """
    if choice == Precision.auto:
        if device.type == "cuda":
            # bf16 in hardware from Ampere (compute capability 8); torch's is_bf16_supported()
            # also says yes where it only emulates bf16 (a T4, a V100), far slower than fp16.
            major, _ = torch.cuda.get_device_capability(device)
            choice = Precision.bf16 if major >= 8 else Precision.fp16
        else:
            choice = Precision.fp32
    if choice == Precision.fp16 and device.type == "cpu":
        raise FastCifarError("fp16 autocast is for CUDA; use --precision bf16 or fp32 on the CPU")
    dtype = {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16,
             Precision.fp32: None}[choice]
    return PrecisionPlan(dtype, dtype == torch.float16)


# Timing takes up to 8 steps on the first batch (one untimed and three timed per precision).
# Where bf16 steps twice as fast as fp32 (AMD EPYC) they cost about 12 bf16 steps, which a run repays
# only in more than about 12 steps; a shorter run (a smoke test, a notebook's first look: 4
# steps would add 8 of timing) trains in fp32 untimed. CPU flags do not settle it where bf16 is
# native (a 2-core Intel Xeon with AVX-512 ran bf16 at 0.72x fp32), and fp32 is the safe side.
MIN_STEPS_TO_TIME_PRECISION = 16

# bf16 arithmetic in hardware, by architecture (torch.cpu.get_capabilities' names). Without it
# bf16 is emulated and cannot win: 7.7 against 85-96 images/s on a 2-core AMD EPYC with AVX2
# only, where timing the two cost 155 s at a batch of 512 (benchmarks/results/cpu/
# precision-timing.json). Other architectures are timed.
NATIVE_BF16_FLAGS = {"x86_64": ("avx512_bf16", "amx_bf16"), "arm64": ("bf16", "sve_bf16"),
                     "aarch64": ("bf16", "sve_bf16")}
NO_NATIVE_BF16 = "this CPU has no bf16 arithmetic in hardware"


def cpu_lacks_native_bf16(capabilities: Mapping[str, object] | None = None) -> bool:
    """True where the CPU's flags show no bf16 arithmetic in hardware (False where they do, where
    the architecture is not one NATIVE_BF16_FLAGS knows, or where torch predates
    torch.cpu.get_capabilities: those are timed)."""
    if capabilities is None:
        get_capabilities = getattr(torch.cpu, "get_capabilities", None)
        capabilities = get_capabilities() if get_capabilities is not None else {}
    flags = NATIVE_BF16_FLAGS.get(str(capabilities.get("architecture", "")).lower())
    return flags is not None and not any(capabilities.get(flag) for flag in flags)


def measures_precision(choice: Precision, device: torch.device,
                       training_steps: int | None = None) -> bool:
    """Whether `train` picks the precision by timing: auto on a CPU with native bf16, in a run
    of at least MIN_STEPS_TO_TIME_PRECISION steps (`training_steps` None: a run whose length is
    not known)."""
    long_enough = training_steps is None or training_steps >= MIN_STEPS_TO_TIME_PRECISION
    return (choice == Precision.auto and device.type == "cpu" and long_enough
            and not cpu_lacks_native_bf16())


def emulated_bf16_note(plan: PrecisionPlan, device: torch.device) -> str | None:
    """A note for a bf16 run on a CPU that emulates bf16 (None otherwise), worked out afresh at
    each sitting: fp32 trained 11-12x faster on an AVX2-only EPYC (precision-timing.json)."""
    if plan.autocast_dtype == torch.bfloat16 and device.type == "cpu" and cpu_lacks_native_bf16():
        return f"emulated: {NO_NATIVE_BF16}; fp32 was ~10x faster on an AVX2-only CPU"
    return None


def untimed_auto_reason(training_steps: int) -> str:
    """Why auto on the CPU trains in fp32 without timing bf16 (run.json and the header line)."""
    if cpu_lacks_native_bf16():
        return f"auto, untimed: {NO_NATIVE_BF16} (bf16 is emulated)"
    return f"auto, untimed: {training_steps} steps are too few to repay timing fp32 against bf16"


# What auto chooses between on the CPU.
CPU_PRECISIONS = (PrecisionPlan(None, False), PrecisionPlan(torch.bfloat16, False))


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision `--precision auto` measured as fastest, and the rates it measured."""

    plan: PrecisionPlan
    images_per_second: dict[str, float]  # training images per second, per precision name

    def describe(self) -> str:
        """e.g. 'bf16 (bf16 272 images/s, fp32 120 images/s)'."""
        rates = ", ".join(f"{name} {rate:,.0f} images/s"
                          for name, rate in sorted(self.images_per_second.items(),
                                                   key=lambda item: -item[1]))
        return f"{self.plan.name} ({rates})"


def measure_precision(train_step: Callable[[PrecisionPlan], None], images_per_step: int,
                      candidates: tuple[PrecisionPlan, ...] = CPU_PRECISIONS,
                      timed_steps: int = 3,
                      timer: Callable[[], float] = time.perf_counter) -> PrecisionChoice:
    """Time up to `timed_steps` calls of `train_step(plan)` per candidate, after one untimed call.

    The untimed call takes first-use costs (allocations, oneDNN kernel choice) off the timing.
    A candidate stops once its timed steps outlast the fastest earlier candidate's whole timing:
    it cannot win, and its rate comes from the steps it took (where bf16 is emulated one such
    step is ~64 s, so this saves two). Returns the candidate with the most images per second
    (the first one on a tie).
    """
    rates: dict[str, float] = {}
    for plan in candidates:
        to_beat = images_per_step * timed_steps / max(rates.values()) if rates else float("inf")
        train_step(plan)
        started, steps, elapsed = timer(), 0, 0.0
        while steps < timed_steps and elapsed <= to_beat:
            train_step(plan)
            steps += 1
            elapsed = timer() - started
        rates[plan.name] = images_per_step * steps / max(elapsed, 1e-9)
    fastest = max(candidates, key=lambda plan: rates[plan.name])
    return PrecisionChoice(fastest, rates)


def measure_cpu_precision(model: nn.Module, device_step: DeviceStep,
                           sample: tuple[torch.Tensor, torch.Tensor],
                           candidates: tuple[PrecisionPlan, ...] = CPU_PRECISIONS
                           ) -> PrecisionChoice:
    """Forward/backward steps of the real model on the real first batch, fp32 against bf16.

    No optimiser step; the weights, BN statistics, gradients, train mode and torch RNG are put
    back, so the run is the same as with that precision chosen by hand. Muon's step follows the
    choice (fp32 iteration in fp32, `optim.orthogonalization_dtype`) and is not timed: where bf16
    matmuls are emulated the forward and backward already lose by 93 to 8 images/s.
    """
    images, labels = device_step(*sample)
    snapshot = copy.deepcopy(model.state_dict())
    was_training = model.training
    model.train()

    def train_step(plan: PrecisionPlan) -> None:
        with autocast(images.device, plan):
            loss = functional.cross_entropy(model(images), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)

    with torch.random.fork_rng(devices=[]):  # dropout draws would shift the run's RNG
        choice = measure_precision(train_step, len(labels), candidates)
    model.load_state_dict(snapshot)
    model.train(was_training)
    return choice


def autocast(device: torch.device, plan: PrecisionPlan):
    """The autocast context for the forward pass (a no-op in fp32)."""
    return torch.autocast(device.type, dtype=plan.autocast_dtype or torch.float32,
                          enabled=plan.autocast_dtype is not None)


class DeviceStep:
    """uint8 NCHW batch -> normalised float on the device, channels-last; labels alongside."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device,
                 channels_last: bool) -> None:
        self.device = device
        # (x - mean) / std as one fused x * (1 / std) + (-mean / std): one pass, one output.
        self.inverse_std = (1.0 / torch.tensor(std, device=device)).view(1, 3, 1, 1)
        self.shift = -torch.tensor(mean, device=device).view(1, 3, 1, 1) * self.inverse_std
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor, labels: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        # Always a blocking copy: FFCV reuses its batch buffers (pinned on CUDA machines) and
        # its loader thread refills a slot without waiting for the GPU, so an asynchronous copy
        # could read the next batch's pixels (seen on an H100: repeated evaluations of one
        # model differed). A 512-image uint8 batch is 1.5 MB: the wait is about 0.1 ms.
        images = images.to(self.device, non_blocking=False)
        labels = labels.to(self.device, non_blocking=False)
        images = torch.addcmul(self.shift, images.float(), self.inverse_std)
        return images.contiguous(memory_format=self.memory_format), labels
