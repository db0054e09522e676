"""Make the shipped weights file: a run's final weights as fp16 safetensors, metadata kept.

    python benchmarks/ship_weights.py weights/RUN-final.safetensors \\
        weights/custresnet-cifar10.safetensors --data datasets

fp16 halves the file (about 13 MB for 6.57 M parameters); the metadata (classes, mean/std,
TTA mode, recipe, test accuracy, commit, ...) is copied and the stored dtype added. With
`--data`, the fp16 file itself is then scored on the whole test set in fp32 on the CPU with no
TTA, flip TTA and its own TTA mode, and those figures go in the header as `accuracy_by_tta`:
they are the file's figures on any machine. The first FIRST_IMAGES test images (all of a
smaller set) are scored too, with no TTA (`accuracy_on_first_images`): the real-data test
checks the file against that figure, which costs a fifth of a whole-set pass.
Passing the shipped file as both paths re-scores it (with `--data`) and keeps its other
metadata. Absolute paths in the metadata are cut to their last names.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from fastcifar.command_config import TTA_MODES, EvaluateConfig
from fastcifar.config import Device, LoaderConfig, Precision
from fastcifar.data.dataset import read_metadata
from fastcifar.errors import script_exit
from fastcifar.evaluation import evaluate_weights
from fastcifar.weights_file import read_weights_file, save_weights_file, without_machine_paths

FIRST_IMAGES = 2000  # the real-data test's check: a fifth of a whole-set pass


def score(weights: Path, data_dir: Path, tta: str, test_subset: int | None = None) -> float:
    """Test accuracy of a weights file in one TTA mode (CPU, fp32), on the first
    `test_subset` test images (None: all of them)."""
    with tempfile.TemporaryDirectory() as out_dir:
        report = evaluate_weights(EvaluateConfig(
            weights=weights, loader=LoaderConfig(data_dir=data_dir, test_subset=test_subset),
            tta=tta, out_dir=Path(out_dir), device=Device.cpu, precision=Precision.fp32))
    return report.accuracy


def score_by_tta(weights: Path, data_dir: Path) -> dict[str, float]:
    """Test accuracy of a weights file in each TTA mode (none, flip, multicrop; CPU, fp32)."""
    return {mode: score(weights, data_dir, mode) for mode in TTA_MODES}


@script_exit()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("final_weights", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--data", type=Path, help="converted dataset folder: score the file")
    arguments = parser.parse_args()
    state, metadata = read_weights_file(arguments.final_weights)
    metadata = without_machine_paths(metadata)  # older files kept the trainer's folders
    if metadata.get("stored_dtype") != "float16":
        metadata = {**metadata, "stored_dtype": "float16",
                    "made_from": arguments.final_weights.name}
    save_weights_file(arguments.out, state, metadata, dtype=torch.float16)
    if arguments.data is not None:
        scores = score_by_tta(arguments.out, arguments.data)
        images = min(FIRST_IMAGES, read_metadata(arguments.data).test_count)
        first = score(arguments.out, arguments.data, "none", images)
        metadata = {**metadata, "accuracy_by_tta": scores,
                    "accuracy_by_tta_note": "this fp16 file on the whole test set, CPU, fp32",
                    "accuracy_on_first_images": {"images": images, "none": first}}
        save_weights_file(arguments.out, state, metadata, dtype=torch.float16)
        print("test accuracy by TTA mode: " + ", ".join(
            f"{mode} {accuracy:.2%}" for mode, accuracy in scores.items()))
    print(f"{arguments.out}: {arguments.out.stat().st_size / 2**20:.1f} MiB, test accuracy "
          f"{metadata['accuracy']:.4f} ({metadata['tta']} TTA) after {metadata['epochs']} epochs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
