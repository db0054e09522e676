"""Is test evaluation on CUDA repeatable? Train briefly, then evaluate the same model repeatedly.

    python benchmarks/gpu/eval_repeatability.py --data /tmp/datasets

Compares plain evaluation, evaluation with each host batch cloned before the copy (rules out
the loader reusing a buffer under an in-flight copy) and with a device sync per batch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fastcifar.config import LoaderConfig, recipe
from fastcifar.data.loaders import build_loaders
from fastcifar.device import DeviceStep, plan_precision, select_device
from fastcifar.errors import script_exit
from fastcifar.evaluation import evaluate_loader
from fastcifar.training import train


class ClonedBatches:
    """Yield copies of the loader's batches (and optionally sync the device after each)."""

    def __init__(self, loader, sync: bool) -> None:
        self.loader, self.sync = loader, sync

    def __iter__(self):
        for images, labels in self.loader:
            yield images.clone(), labels.clone()
            if self.sync and torch.cuda.is_available():
                torch.cuda.synchronize()


@script_exit()
def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path("datasets"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--test-subset", type=int, default=None)
    arguments = parser.parse_args()
    config = recipe("fast", epochs=arguments.epochs, seed=2, make_plots=False,
                    loader=LoaderConfig(data_dir=arguments.data,
                                        train_subset=arguments.train_subset,
                                        test_subset=arguments.test_subset),
                    out_dir=Path("/tmp/repeat-runs"), weights_dir=Path("/tmp/repeat-weights"))
    loaders = build_loaders(config.loader, config.augment, config.seed)
    result = train(config, loaders=loaders)
    device = select_device(config.device)
    plan = plan_precision(config.precision, device)
    step = DeviceStep(loaders.metadata.mean, loaders.metadata.std, device, True)
    print("history final", result.history[-1].test_accuracy)
    repeatable = True
    for tta in (False, True):
        plain = [evaluate_loader(result.final_model, loaders.test, step, plan, tta)[1] for _ in range(4)]
        cloned = [evaluate_loader(result.final_model, ClonedBatches(loaders.test, False), step, plan,
                           tta)[1] for _ in range(2)]
        synced = [evaluate_loader(result.final_model, ClonedBatches(loaders.test, True), step, plan,
                           tta)[1] for _ in range(2)]
        print(f"tta={tta} plain={plain} cloned={cloned} cloned+sync={synced}", flush=True)
        repeatable &= len(set(plain + cloned + synced)) == 1
    print("repeatable" if repeatable else "NOT repeatable: evaluations of one model differ")
    return 0 if repeatable else 1


if __name__ == "__main__":
    raise SystemExit(main())
