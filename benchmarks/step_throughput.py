"""Train-step images/s of CustResNet for each precision and memory format on this machine.

    python benchmarks/step_throughput.py --json benchmarks/results/cpu/step-throughput.json

Forward + backward + SGD step on random data (no loader), after one warm-up step; each setting
is timed in the same process, so the ratios compare like with like.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from fastcifar.atomic import check_can_write, write_json
from fastcifar.checkpoint import machine_description
from fastcifar.config import Device, Precision
from fastcifar.device import autocast, plan_precision, select_device
from fastcifar.errors import script_exit
from fastcifar.model import CustResNet


def images_per_second(device: torch.device, precision: Precision, channels_last: bool,
                      batch_size: int, steps: int) -> float:
    """Images per second over `steps` timed steps after one warm-up step."""
    plan = plan_precision(precision, device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = CustResNet().to(device=device, memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch_size, 3, 32, 32, device=device).contiguous(
        memory_format=memory_format)
    labels = torch.randint(0, 10, (batch_size,), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, plan):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()

    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batch_size * steps / (time.perf_counter() - started)


@script_exit()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, required=True)
    arguments = parser.parse_args()
    check_can_write(arguments.json)
    device = select_device(Device(arguments.device))
    precisions = [Precision.fp32, Precision.bf16] + (
        [Precision.fp16] if device.type == "cuda" else [])
    results = []
    for precision in precisions:
        for channels_last in (True, False):
            rate = images_per_second(device, precision, channels_last, arguments.batch_size,
                                     arguments.steps)
            results.append({"precision": precision.value, "channels_last": channels_last,
                            "images_per_s": round(rate, 1)})
            print(f"{precision.value:5s} channels_last={channels_last!s:5s} {rate:9.1f} images/s",
                  flush=True)
    write_json(arguments.json, {
        "benchmark": "train_step_throughput", "device": str(device),
        "machine": machine_description(device), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "batch_size": arguments.batch_size,
        "steps": arguments.steps, "command": "python " + " ".join(sys.argv),
        "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
