"""Make the shipped weights file: a run's final weights as fp16 safetensors, metadata kept.

    python benchmarks/ship_weights.py weights/RUN-final.safetensors \\
        weights/custresnet-cifar10.safetensors

fp16 halves the file (about 13 MB for 6.57 M parameters); the metadata (classes, mean/std,
TTA mode, recipe, test accuracy, commit, ...) is copied and the stored dtype added.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fastcifar.checkpoint import read_weights_file, save_weights_file


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("final_weights", type=Path)
    parser.add_argument("out", type=Path)
    arguments = parser.parse_args()
    state, metadata = read_weights_file(arguments.final_weights)
    save_weights_file(arguments.out, state, {**metadata, "stored_dtype": "float16",
                                             "made_from": arguments.final_weights.name},
                      dtype=torch.float16)
    print(f"{arguments.out}: {arguments.out.stat().st_size / 2**20:.1f} MiB, test accuracy "
          f"{metadata['accuracy']:.4f} ({metadata['tta']} TTA) after {metadata['epochs']} epochs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
