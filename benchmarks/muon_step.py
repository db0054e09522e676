"""Muon's optimiser step with torch's bf16 Newton-Schulz against the fp32 iteration that fp32
runs on the CPU use, timed interleaved in one process beside an fp32 forward and backward at
20 and 32 px, and a matmul in each dtype (the CPU's own rates).

    python benchmarks/muon_step.py --json benchmarks/results/cpu/muon-step.json

Each round times a forward+backward at each side, each followed by one optimiser step per
dtype (bf16 first), so the machine's speed swings hit all alike; the figures are medians over
the rounds (2 optimiser steps per dtype and round). The optimiser step is the recipe's whole step (SGD on BN
and the head, Muon on the conv filters) on the real CustResNet with the gradients of a batch.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from fastcifar.atomic import check_can_write, write_texts
from fastcifar.checkpoint import machine_description
from fastcifar.config import DEFAULT_RECIPE, recipe
from fastcifar.errors import script_exit
from fastcifar.model import build_model
from fastcifar.optim import Optimizers

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def matmul_gflops(dtype: torch.dtype, side: int = 1024) -> float:
    """The CPU's matmul rate in `dtype` on a side x side product."""
    a = torch.randn(side, side, dtype=dtype)
    a @ a  # first-use costs off the timing
    started = time.perf_counter()
    a @ a
    return 2 * side ** 3 / (time.perf_counter() - started) / 1e9


def bf16_flags() -> list[str]:
    """The CPU's vector flags that decide its bf16 speed (none of the AVX-512 ones: emulated)."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    return [flag for flag in wanted if flag in flags]


def timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def measure(rounds: int, batch_size: int) -> dict:
    """Median seconds per optimiser step (per Newton-Schulz dtype) and per forward+backward."""
    config = recipe(DEFAULT_RECIPE, epochs=6)  # as measured: below the budget row
    model = build_model(config, torch.device("cpu"),
                        torch.randint(0, 256, (1024, 3, 32, 32)).float())
    optimizers = Optimizers(model, config, steps_per_epoch=100)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    labels = torch.randint(0, 10, (batch_size,))
    batches = {side: torch.randn(batch_size, 3, side, side).contiguous(
        memory_format=torch.channels_last) for side in (20, 32)}

    def forward_backward(side: int) -> None:
        optimizers.zero_grad()
        criterion(model(batches[side]), labels).backward()

    def optimiser_step(name: str) -> None:
        optimizers.muon.orthogonalize_dtype = DTYPES[name]
        optimizers.step(scaler)
        optimizers.schedule_step()

    times: dict[str, list[float]] = {}
    for round_ in range(rounds + 1):  # the first round is untimed: first-use costs
        for side in batches:
            seconds = timed(lambda side=side: forward_backward(side))
            for name in DTYPES:
                step_seconds = timed(lambda name=name: optimiser_step(name))
                if round_:
                    times.setdefault(f"optimiser step, Newton-Schulz in {name}", []).append(
                        step_seconds)
            if round_:
                times.setdefault(f"forward+backward at {side} px (fp32)", []).append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}


@script_exit()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    markdown_path = args.json.with_suffix(".md")
    check_can_write(args.json, markdown_path)
    seconds = measure(args.rounds, args.batch_size)
    rates = {name: matmul_gflops(dtype) for name, dtype in DTYPES.items()}
    bf16, fp32 = (seconds[f"optimiser step, Newton-Schulz in {name}"] for name in DTYPES)
    report = {
        "command": "python " + shlex.join(sys.argv),
        "machine": {**machine_description(), "cpu_flags": bf16_flags()},
        "batch_size": args.batch_size, "rounds": args.rounds,
        "median_seconds": seconds, "matmul_gflops": rates,
        "optimiser_step_speedup_fp32_over_bf16": bf16 / fp32,
    }
    lines = ["# Muon step: Newton-Schulz in bf16 (torch's) against fp32\n",
             f"`{report['command']}` on {report['machine'].get('cpu', '?')} "
             f"(flags: {', '.join(report['machine']['cpu_flags']) or 'none'}), "
             f"batch {args.batch_size}, medians over {args.rounds} interleaved rounds "
             "(2 optimiser steps per dtype and round).\n",
             "| part | seconds |", "| --- | --- |"]
    lines += [f"| {name} | {value:.2f} |" for name, value in seconds.items()]
    lines += ["", f"Optimiser step: fp32 iteration **{bf16 / fp32:.1f}x** faster than bf16. "
              f"Matmul (1024^3): bf16 {rates['bf16']:.1f}, fp32 {rates['fp32']:.1f} GFLOP/s."]
    print("\n".join(lines))
    write_texts({args.json: json.dumps(report, indent=2) + "\n",
                 markdown_path: "\n".join(lines) + "\n"})


if __name__ == "__main__":
    main()
