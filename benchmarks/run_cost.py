"""What a whole run costs: counted training FLOPs, and the per-run wall time composed from
train steps, test passes and matmuls timed interleaved in one process.

    python benchmarks/run_cost.py --json benchmarks/results/cpu/run-cost.json

Compares two plans (default: today's `express-muon` at 6 epochs with a multi-crop test pass
every epoch, against `express-progressive` at 5 epochs with one final pass). FLOPs are counted
with `torch.utils.flop_counter` on the model's forward and backward (the optimiser's
Newton-Schulz iterations are timed, not counted). Seconds: rounds of (K train steps at each
train side, one multi-crop pass over a batch, a 2048^3 matmul in bf16 and fp32), so the
machine's speed swings hit every part alike; a run's time is then steps x the median step time
at its sides + passes x the pass time. `--profile` adds torch.profiler's top ops of one 32 px
step and one at the smallest side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from fastcifar.atomic import check_can_write, write_texts
from fastcifar.checkpoint import machine_description
from fastcifar.config import Device, Precision, TrainConfig, recipe
from fastcifar.device import DeviceStep, autocast, plan_precision, select_device
from fastcifar.errors import script_exit
from fastcifar.evaluation import predict_logits
from fastcifar.model import CustResNet, build_model
from fastcifar.optim import Optimizers

TRAIN_IMAGES, TEST_IMAGES = 50_000, 10_000
MEAN, STD = [125.3, 123.0, 113.9], [63.0, 62.1, 66.7]  # CIFAR-10's, 0-255: any close value


@dataclasses.dataclass(frozen=True)
class Plan:
    """A run as the cost model sees it: the recipe, its train sides per epoch, test passes."""

    name: str
    config: TrainConfig
    test_passes: int

    @property
    def sizes(self) -> list[int]:
        return [self.config.train_image_size(epoch) for epoch in range(self.config.epochs)]


def default_plans() -> list[Plan]:
    before = recipe("express-muon", epochs=6)
    after = recipe("express-progressive", epochs=5)
    return [Plan("express-muon, 6 epochs, a pass every epoch (before)", before, 6),
            Plan("express-progressive, 5 epochs, one final pass (now)", after, 1)]


def train_flops_per_image(size: int) -> float:
    """Forward + backward FLOPs of one train image at `size` px (batch of 2, per image)."""
    model = CustResNet().train()
    images = torch.randn(2, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        model(images).sum().backward()
    return counter.get_total_flops() / 2


def eval_flops_per_image(config: TrainConfig) -> float:
    """Forward FLOPs of one test image in the recipe's TTA mode (1, 2 or 6 passes)."""
    model = CustResNet().eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        predict_logits(model, torch.randn(2, 3, 32, 32), config.tta, config.tta_shifts)
    return counter.get_total_flops() / 2


class StepTimer:
    """The recipe's real train step (model, Muon/SGD, schedule, autocast) on synthetic
    batches at any side, and its test-time forward in the recipe's TTA mode."""

    def __init__(self, config: TrainConfig, device: torch.device, batch_size: int) -> None:
        self.config, self.device, self.batch_size = config, device, batch_size
        self.plan = plan_precision(config.precision, device)
        self.device_step = DeviceStep(MEAN, STD, device, config.channels_last)
        whitening = self._batch(32)[0].float()
        self.model = build_model(config, device, whitening)
        self.optimizers = Optimizers(self.model, config, 10**6)
        self.optimizers.orthogonalize_for(self.plan.autocast_dtype, device)  # as `train` does
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.plan.use_grad_scaler)
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    def _batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.randint(0, 256, (self.batch_size, 3, size, size), dtype=torch.uint8)
        return self.device_step(images, torch.randint(0, 10, (self.batch_size,)))

    def train_seconds(self, size: int, steps: int) -> tuple[float, float]:
        """(seconds per step, of which the optimisers' step) over `steps` steps."""
        images, labels = self._batch(size)
        self.model.train()
        total = optimiser = 0.0
        for _ in range(steps):
            started = time.perf_counter()
            self.optimizers.zero_grad()
            with autocast(self.device, self.plan):
                loss = self.criterion(self.model(images), labels)
            self.scaler.scale(loss).backward()
            _synchronize(self.device)
            stepped = time.perf_counter()
            self.optimizers.step(self.scaler)
            self.scaler.update()
            self.optimizers.schedule_step()
            _synchronize(self.device)
            optimiser += time.perf_counter() - stepped
            total += time.perf_counter() - started
        return total / steps, optimiser / steps

    def eval_seconds_per_image(self) -> float:
        images, _ = self._batch(32)
        self.model.eval()
        started = time.perf_counter()
        with torch.no_grad(), autocast(self.device, self.plan):
            predict_logits(self.model, images, self.config.tta, self.config.tta_shifts)
        _synchronize(self.device)
        return (time.perf_counter() - started) / self.batch_size


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops_per_second(dtype: torch.dtype, device: torch.device, side: int = 2048) -> float:
    left = torch.randn(side, side, device=device, dtype=dtype)
    right = torch.randn(side, side, device=device, dtype=dtype)
    started = time.perf_counter()
    left @ right
    _synchronize(device)
    return 2 * side**3 / (time.perf_counter() - started)


def profile_step(timer: StepTimer, size: int, rows: int = 15) -> str:
    """torch.profiler's top ops (by self CPU time) of one train step at `size` px."""
    from torch.profiler import ProfilerActivity, profile

    timer.train_seconds(size, 1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                           if timer.device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        timer.train_seconds(size, 1)
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def measure(plans: list[Plan], device: torch.device, rounds: int, steps: int) -> dict:
    """Interleaved rounds: each plan's step at each side, its test forward, the matmuls."""
    sizes = sorted({size for plan in plans for size in plan.sizes})
    timers = {plan.name: StepTimer(plan.config, device, plan.config.loader.batch_size)
              for plan in plans}
    for timer in timers.values():  # warm-up: allocator, oneDNN primitives, not timed
        for size in sizes:
            timer.train_seconds(size, 1)
        timer.eval_seconds_per_image()
    samples: dict = {name: {"step": {size: [] for size in sizes},
                            "optimiser": {size: [] for size in sizes}, "eval": []}
                     for name in timers}
    matmul: dict[str, list[float]] = {"bf16": [], "fp32": []}
    for round_index in range(rounds):
        for name, timer in timers.items():
            for size in sizes:
                step, optimiser = timer.train_seconds(size, steps)
                samples[name]["step"][size].append(step)
                samples[name]["optimiser"][size].append(optimiser)
            samples[name]["eval"].append(timer.eval_seconds_per_image())
        matmul["bf16"].append(matmul_flops_per_second(torch.bfloat16, device))
        matmul["fp32"].append(matmul_flops_per_second(torch.float32, device))
        print(f"round {round_index + 1}/{rounds} done", flush=True)
    return {"samples": samples, "matmul": matmul, "sizes": sizes,
            "precision": {name: timer.plan.name for name, timer in timers.items()}}


def cost_of(plan: Plan, measured: dict, flops: dict[int, float]) -> dict:
    """Counted FLOPs and modelled seconds of one whole run of `plan`."""
    config, samples = plan.config, measured["samples"][plan.name]
    steps = TRAIN_IMAGES // config.loader.batch_size
    images = steps * config.loader.batch_size
    step_seconds = {size: statistics.median(samples["step"][size]) for size in plan.sizes}
    eval_per_image = statistics.median(samples["eval"])
    train_flops = sum(images * flops[size] for size in plan.sizes)
    eval_flops = plan.test_passes * TEST_IMAGES * eval_flops_per_image(config)
    train_seconds = sum(steps * step_seconds[size] for size in plan.sizes)
    eval_seconds = plan.test_passes * TEST_IMAGES * eval_per_image
    return {"epochs": config.epochs, "train_sizes": plan.sizes, "test_passes": plan.test_passes,
            "tta": "multicrop" if config.tta_shifts else "flip" if config.tta else "none",
            "train_flops": train_flops, "eval_flops": eval_flops,
            "train_seconds": train_seconds, "eval_seconds": eval_seconds,
            "run_seconds": train_seconds + eval_seconds}


def step_rates(plans: list[Plan], measured: dict, flops: dict[int, float]) -> list[dict]:
    """Per plan and side: images/s and the step's FLOP rate against the matmul rates."""
    bf16 = statistics.median(measured["matmul"]["bf16"])
    fp32 = statistics.median(measured["matmul"]["fp32"])
    rows = []
    for plan in plans:
        samples = measured["samples"][plan.name]
        for size in sorted(set(plan.sizes)):
            seconds = statistics.median(samples["step"][size])
            rate = plan.config.loader.batch_size * flops[size] / seconds
            rows.append({"plan": plan.name, "size": size,
                         "images_per_second": plan.config.loader.batch_size / seconds,
                         "optimiser_share": statistics.median(samples["optimiser"][size])
                         / seconds,
                         "step_gflops": rate / 1e9, "over_bf16_matmul": rate / bf16,
                         "over_fp32_matmul": rate / fp32})
    return rows


def markdown(report: dict) -> str:
    """The .md beside the JSON: the plans' modelled costs, then their step rates."""
    before, after = report["plans"][0], report["plans"][-1]
    lines = [f"# Run cost: {before['name']} against {after['name']}", "",
             f"`{report['command']}`", "",
             f"{report['machine'].get('gpu') or report['machine'].get('cpu')}, "
             f"{report['machine'].get('cpu_cores')} cores; {report['date']}; "
             f"{report['rounds']} interleaved rounds of {report['steps']} steps per side. "
             "Seconds are modelled from the medians (steps x step time + passes x pass time), "
             "without warm-up; FLOPs are counted (forward + backward; test passes forward).", "",
             "| plan | epochs (train px) | test passes | train GFLOP | test GFLOP | train s | "
             "test s | run s |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for plan in report["plans"]:
        cost = plan["cost"]
        lines.append(f"| {plan['name']} | {cost['epochs']} ({', '.join(map(str, cost['train_sizes']))}) "
                     f"| {cost['test_passes']} {cost['tta']} | {cost['train_flops'] / 1e9:,.0f} | "
                     f"{cost['eval_flops'] / 1e9:,.0f} | {cost['train_seconds']:,.0f} | "
                     f"{cost['eval_seconds']:,.0f} | {cost['run_seconds']:,.0f} |")
    ratios = report["ratios"]
    lines += ["", f"Before / now: training FLOPs **{ratios['train_flops']:.2f}x**, train + "
              f"test FLOPs {ratios['all_flops']:.2f}x, train seconds "
              f"{ratios['train_seconds']:.2f}x, run seconds **{ratios['run_seconds']:.2f}x**.",
              "", "| plan | train px | images/s | optimiser share | step GFLOP/s | / bf16 matmul | "
              "/ fp32 matmul |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in report["step_rates"]:
        lines.append(f"| {row['plan']} | {row['size']} | {row['images_per_second']:.0f} | "
                     f"{row['optimiser_share']:.0%} | {row['step_gflops']:.0f} | "
                     f"{row['over_bf16_matmul']:.2f} | {row['over_fp32_matmul']:.2f} |")
    matmul = report["matmul_gflops"]
    lines += ["", f"2048^3 matmul: bf16 {matmul['bf16']:.0f} GFLOP/s, fp32 {matmul['fp32']:.0f} "
              "GFLOP/s (medians over the rounds)."]
    for name, table in report.get("profiles", {}).items():
        lines += ["", f"## torch.profiler, one train step: {name}", "", "```", table, "```"]
    return "\n".join(lines) + "\n"


@script_exit()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="train steps per side per round")
    parser.add_argument("--device", type=Device, default=Device.auto)
    parser.add_argument("--precision", type=Precision, default=None,
                        help="default: bf16 on the CPU (what train measures as faster on "
                        "bf16-capable CPUs), auto elsewhere")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", type=Path, required=True)
    arguments = parser.parse_args()
    markdown_path = arguments.json.with_suffix(".md")
    check_can_write(arguments.json, markdown_path)
    device = select_device(arguments.device)
    precision = arguments.precision or (Precision.bf16 if device.type == "cpu"
                                        else Precision.auto)
    plans = [dataclasses.replace(plan, config=dataclasses.replace(
        plan.config, precision=precision, device=arguments.device)) for plan in default_plans()]
    sizes = sorted({size for plan in plans for size in plan.sizes})
    flops = {size: train_flops_per_image(size) for size in sizes}
    measured = measure(plans, device, arguments.rounds, arguments.steps)
    costs = {plan.name: cost_of(plan, measured, flops) for plan in plans}
    before, after = costs[plans[0].name], costs[plans[-1].name]
    report = {
        "benchmark": "run_cost", "command": "python " + shlex.join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine_description(device), "torch": torch.__version__,
        "rounds": arguments.rounds, "steps": arguments.steps,
        "train_gflops_per_image": {size: value / 1e9 for size, value in flops.items()},
        "plans": [{"name": plan.name, "recipe": plan.config.recipe,
                   "precision": measured["precision"][plan.name], "cost": costs[plan.name]}
                  for plan in plans],
        "ratios": {"train_flops": before["train_flops"] / after["train_flops"],
                   "all_flops": (before["train_flops"] + before["eval_flops"])
                   / (after["train_flops"] + after["eval_flops"]),
                   "train_seconds": before["train_seconds"] / after["train_seconds"],
                   "run_seconds": before["run_seconds"] / after["run_seconds"]},
        "step_rates": step_rates(plans, measured, flops),
        "matmul_gflops": {name: statistics.median(values) / 1e9
                          for name, values in measured["matmul"].items()},
        "samples": measured["samples"],
    }
    if arguments.profile:
        timer = StepTimer(plans[-1].config, device, plans[-1].config.loader.batch_size)
        report["profiles"] = {f"{size} px": profile_step(timer, size)
                              for size in (32, min(sizes))}
    table = markdown(report)
    print(table)
    write_texts({arguments.json: json.dumps(report, indent=2) + "\n", markdown_path: table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
