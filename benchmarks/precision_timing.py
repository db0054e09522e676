"""How long `--precision auto`'s first-batch timing takes on this CPU, with its prune (a
precision stops being timed once it cannot win) and without (each precision timed alone, all
its steps), on a batch of 512 random 20 px images (the default recipe's first side).

    python benchmarks/precision_timing.py --json benchmarks/results/cpu/precision-timing.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from fastcifar.atomic import check_can_write, write_json
from fastcifar.checkpoint import machine_description
from fastcifar.device import CPU_PRECISIONS, DeviceStep, PrecisionPlan, measure_cpu_precision
from fastcifar.errors import script_exit
from fastcifar.model import CustResNet


def timed(model: torch.nn.Module, step: DeviceStep, sample: tuple[torch.Tensor, torch.Tensor],
          candidates: tuple[PrecisionPlan, ...]) -> tuple[float, dict[str, float]]:
    """Seconds one timing takes, and the images per second it measured."""
    started = time.perf_counter()
    choice = measure_cpu_precision(model, step, sample, candidates)
    return time.perf_counter() - started, choice.images_per_second


@script_exit()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--side", type=int, default=20)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    check_can_write(args.json)
    torch.manual_seed(0)
    model = CustResNet().to(memory_format=torch.channels_last)
    sample = (torch.randint(0, 256, (args.batch_size, 3, args.side, args.side), dtype=torch.uint8),
              torch.randint(0, 10, (args.batch_size,)))
    step = DeviceStep([125.0] * 3, [63.0] * 3, torch.device("cpu"), channels_last=True)
    pruned_seconds, pruned_rates = timed(model, step, sample, CPU_PRECISIONS)
    alone = {plan.name: timed(model, step, sample, (plan,)) for plan in CPU_PRECISIONS}
    report = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_description(torch.device("cpu")),
        "batch_size": args.batch_size, "side": args.side,
        "with_prune": {"seconds": round(pruned_seconds, 1), "images_per_second": pruned_rates},
        "without_prune": {"seconds": round(sum(seconds for seconds, _ in alone.values()), 1),
                          "images_per_second": {name: rates[name]
                                                for name, (_, rates) in alone.items()}},
    }
    print(json.dumps(report, indent=2))
    write_json(args.json, report)


if __name__ == "__main__":
    main()
