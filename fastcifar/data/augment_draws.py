"""The train augmentation's random parameters, drawn serially from a counter-based hash of
(seed, the batch's sample indices, position): a rerun with the same seed and loader order gives
the same batches whatever the thread count (augment.py applies them)."""

from __future__ import annotations

import numpy as np
from numba import njit

from fastcifar.config import MAX_CUTOUTS

# geometry columns: crop offset y, crop offset x, flip, gray, then (top, left) per cutout hole
GEOMETRY_COLUMNS = 4 + 2 * MAX_CUTOUTS
# colour columns: jitter on (0/1), brightness, contrast, saturation factors, hue shift (turns)
COLOUR_COLUMNS = 5

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@njit(cache=True)
def _mix64(z: np.uint64) -> np.uint64:
    """splitmix64's finaliser: a well-spread 64-bit hash of a 64-bit counter."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(cache=True)
def _uniform(key: np.uint64, slot: int) -> float:
    """The `slot`-th uniform draw in [0, 1) of the stream named by `key`."""
    bits = _mix64(key + np.uint64(slot + 1) * _GOLDEN)
    return float(bits >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@njit(cache=True)
def first_flip(seed: int, index: int) -> bool:
    """Whether sample `index` is flipped in epoch 0 under alternating flip (a fair coin)."""
    key = _mix64(_mix64(np.uint64(seed) ^ _GOLDEN) ^ _mix64(np.uint64(index) + _GOLDEN))
    return _uniform(key, 0) < 0.5


@njit(cache=True)
def draw_parameters(seed: int, indices: np.ndarray, epoch: int, pad: int, flip: bool,
                    flip_alternate: bool, cutout_size: int, cutout_count: int, p_jitter: float,
                    brightness: float, contrast: float, saturation: float, hue: float,
                    p_gray: float):
    """Per-image random parameters for one batch: (geometry int32 [n, G], colour float32 [n, C]).

    `epoch` only matters for alternating flip, whose flips depend on the sample and the epoch
    alone; every other draw depends on the batch's sample indices.
    """
    count = indices.shape[0]
    odd_epoch = epoch % 2 == 1
    batch_key = _mix64(np.uint64(seed) ^ _GOLDEN)
    for j in range(count):  # the batch's composition and order differ every epoch
        batch_key = _mix64(batch_key ^ np.uint64(indices[j]))
    geometry = np.zeros((count, GEOMETRY_COLUMNS), dtype=np.int32)
    colour = np.ones((count, COLOUR_COLUMNS), dtype=np.float32)
    for i in range(count):
        key = _mix64(batch_key + np.uint64(i) * _GOLDEN)
        geometry[i, 0] = int(_uniform(key, 0) * (2 * pad + 1))
        geometry[i, 1] = int(_uniform(key, 1) * (2 * pad + 1))
        if flip_alternate:
            geometry[i, 2] = 1 if flip and first_flip(seed, indices[i]) != odd_epoch else 0
        else:
            geometry[i, 2] = 1 if flip and _uniform(key, 2) < 0.5 else 0
        geometry[i, 3] = 1 if _uniform(key, 3) < p_gray else 0
        for hole in range(cutout_count):
            centre_y = int(_uniform(key, 10 + 2 * hole) * 32)
            centre_x = int(_uniform(key, 11 + 2 * hole) * 32)
            geometry[i, 4 + 2 * hole] = centre_y - cutout_size // 2
            geometry[i, 5 + 2 * hole] = centre_x - cutout_size // 2
        jitter = _uniform(key, 4) < p_jitter
        colour[i, 0] = 1.0 if jitter else 0.0
        colour[i, 1] = 1.0 + brightness * (2.0 * _uniform(key, 5) - 1.0)
        colour[i, 2] = 1.0 + contrast * (2.0 * _uniform(key, 6) - 1.0)
        colour[i, 3] = 1.0 + saturation * (2.0 * _uniform(key, 7) - 1.0)
        colour[i, 4] = hue * (2.0 * _uniform(key, 8) - 1.0)
    return geometry, colour
