"""ONNX export against PyTorch on this CPU: top-1 agreement on the whole test set, and the cost
per image of each, timed in interleaved rounds in one process (both in their weights' TTA mode).

    python benchmarks/onnx_cost.py --data datasets --json benchmarks/results/cpu/onnx-cost.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fastcifar.api import test_images
from fastcifar.atomic import check_can_write, write_texts
from fastcifar.checkpoint import machine_description
from fastcifar.command_config import SHIPPED_WEIGHTS, ExportConfig
from fastcifar.config import Device
from fastcifar.data.loaders import read_metadata
from fastcifar.errors import script_exit
from fastcifar.export import OnnxClassifier, export_onnx
from fastcifar.prediction import open_scorer


def agreement(torch_logits, onnx_logits, images: np.ndarray, batch: int) -> tuple[float, float]:
    """(share of equal top-1, largest logit difference) over `images`."""
    same, largest = 0, 0.0
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        expected = torch_logits(torch.from_numpy(chunk)).numpy()
        got = onnx_logits(chunk)
        same += int((expected.argmax(1) == got.argmax(1)).sum())
        largest = max(largest, float(np.abs(expected - got).max()))
    return same / len(images), largest


def seconds_per_image(score, images: np.ndarray) -> float:
    started = time.perf_counter()
    score(images)
    return (time.perf_counter() - started) / len(images)


@script_exit()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weights", type=Path, default=SHIPPED_WEIGHTS)
    parser.add_argument("--data", type=Path, default=Path("datasets"))
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, required=True)
    arguments = parser.parse_args()
    markdown_path = arguments.json.with_suffix(".md")
    check_can_write(arguments.json, markdown_path)
    nchw, _ = test_images(arguments.data, read_metadata(arguments.data).test_count)  # all
    nchw = np.ascontiguousarray(nchw.transpose(0, 3, 1, 2))
    with tempfile.TemporaryDirectory() as folder:
        report = export_onnx(ExportConfig(weights=arguments.weights, out=Path(folder) / "m.onnx",
                                          check_images=0))
        onnx_model = OnnxClassifier.load(report.path)
    scorer = open_scorer(Path(arguments.weights), Device.cpu)
    share, largest = agreement(scorer.logits, onnx_model.logits, nchw, arguments.batch)
    timed = nchw[:arguments.batch]
    costs: dict[str, list[float]] = {"pytorch": [], "onnxruntime": []}
    for _ in range(arguments.rounds):  # interleaved: a drift in CPU speed hits both alike
        costs["pytorch"].append(seconds_per_image(scorer.logits, torch.from_numpy(timed)))
        costs["onnxruntime"].append(seconds_per_image(onnx_model.logits, timed))
    medians = {name: statistics.median(values) for name, values in costs.items()}
    result = {
        "benchmark": "onnx_cost", "weights": Path(arguments.weights).name, "tta": report.tta,
        "test_images": len(nchw), "top1_agreement": share, "max_logit_difference": largest,
        "batch": arguments.batch, "rounds": arguments.rounds,
        "ms_per_image": {name: 1000 * value for name, value in medians.items()},
        "ms_per_image_by_round": {name: [1000 * v for v in values]
                                  for name, values in costs.items()},
        "onnxruntime_over_pytorch_time": medians["onnxruntime"] / medians["pytorch"],
        "torch_threads": torch.get_num_threads(), "machine": machine_description(
            torch.device("cpu")),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python " + shlex.join(sys.argv)}
    write_texts({arguments.json: json.dumps(result, indent=2) + "\n",
                 markdown_path: markdown(result)})
    print(json.dumps({key: result[key] for key in ("top1_agreement", "max_logit_difference",
                                                   "ms_per_image")}, indent=2))
    return 0


def markdown(result: dict) -> str:
    """The .md beside the JSON: agreement and cost per image in two lines."""
    return (
        f"# ONNX export against PyTorch ({result['machine']['cpu']})\n\n"
        f"Weights `{result['weights']}`, {result['tta']} TTA in both. Command: "
        f"`{result['command']}`\n\n"
        f"- same top-1 on **{result['top1_agreement']:.2%}** of the {result['test_images']:,} test images; "
        f"largest logit difference {result['max_logit_difference']:.1e}\n"
        f"- cost per image (batch {result['batch']}, median of {result['rounds']} interleaved "
        f"rounds): PyTorch {result['ms_per_image']['pytorch']:.2f} ms, onnxruntime "
        f"{result['ms_per_image']['onnxruntime']:.2f} ms: onnxruntime takes "
        f"**{result['onnxruntime_over_pytorch_time']:.2f}x** PyTorch's time\n")


if __name__ == "__main__":
    sys.exit(main())
