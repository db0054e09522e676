"""FFCV pipelines as lists of operations, and the FFCV Loader over a beton: the whole host
data path of a split reads in a few lines."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fastcifar.config import AugmentConfig, LoaderConfig
from fastcifar.data.augment import EpochCell, fill_colour, make_fused_augment


def train_pipeline(augment: AugmentConfig | None, seed: int, mean: list[float],
                   epoch_cell: EpochCell | None = None) -> list:
    """decode -> fused augmentation (crop/flip/cutout/jitter/gray, uint8) -> NCHW tensor view."""
    return image_pipeline(None if augment is None else make_fused_augment(
        augment, seed, fill_colour(mean), epoch_cell))


def image_pipeline(augmentation=None) -> list:
    """decode -> `augmentation` (an FFCV operation, or none) -> NCHW uint8 tensor view."""
    from ffcv.fields.decoders import SimpleRGBImageDecoder
    from ffcv.transforms import ToTensor, ToTorchImage

    return [SimpleRGBImageDecoder(), *([] if augmentation is None else [augmentation]),
            ToTensor(), ToTorchImage(channels_last=True, convert_back_int16=False)]


def test_pipeline() -> list:
    """decode -> NCHW tensor view; no augmentation."""
    return image_pipeline()


def builtin_train_pipeline(augment: AugmentConfig, mean: list[float], std: list[float]) -> list:
    """The closest train pipeline made of FFCV's own ops (for `benchmark loader`), normalising."""
    from ffcv.fields.decoders import SimpleRGBImageDecoder
    from ffcv.transforms import (
        Cutout,
        NormalizeImage,
        RandomHorizontalFlip,
        RandomTranslate,
        ToTensor,
        ToTorchImage,
    )
    from ffcv.transforms.color_jitter import RandomBrightness, RandomContrast, RandomSaturation

    fill = tuple(int(v) for v in fill_colour(mean))
    return [
        SimpleRGBImageDecoder(),
        RandomTranslate(padding=augment.pad, fill=fill),
        RandomHorizontalFlip(),
        Cutout(augment.cutout_size, fill),
        RandomBrightness(augment.brightness, p=augment.p_jitter),
        RandomContrast(augment.contrast, p=augment.p_jitter),
        RandomSaturation(augment.saturation, p=augment.p_jitter),
        NormalizeImage(np.array(mean), np.array(std), np.float32),
        ToTensor(),
        ToTorchImage(channels_last=True, convert_back_int16=False),
    ]


def label_pipeline() -> list:
    from ffcv.fields.decoders import IntDecoder
    from ffcv.transforms import Squeeze, ToTensor

    return [IntDecoder(), ToTensor(), Squeeze(1)]


def _worker_count(requested: int) -> int:
    import os

    return requested if requested > 0 else len(os.sched_getaffinity(0))


def make_loader(path: Path, image_pipeline: list, config: LoaderConfig, train: bool,
                subset: np.ndarray | None, seed: int, batch_size: int | None = None):
    """An FFCV Loader over `path` with the given image pipeline and the label pipeline."""
    from ffcv.loader import Loader, OrderOption

    return Loader(
        str(path),
        batch_size=batch_size or config.batch_size,
        num_workers=_worker_count(config.workers),
        order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL,
        drop_last=train,  # equal-size train steps keep BN statistics and the LR schedule even
        os_cache=True,  # CIFAR-10 betons are small: let the page cache hold them
        distributed=config.distributed,
        seed=seed,
        indices=subset,
        pipelines={"image": image_pipeline, "label": label_pipeline()},
    )
