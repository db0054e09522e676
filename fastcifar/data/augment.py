"""The fused train augmentation: one numba kernel, one pass per image, uint8 in and uint8 out.

pad + random crop, horizontal flip, cutout, colour jitter (brightness, contrast, saturation,
hue) and grayscale. Random parameters are drawn serially from a counter-based hash of
(seed, the batch's sample indices, position), so a rerun with the same seed and loader order
gives the same batches whatever the thread count; the per-pixel work then runs in parallel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
from numba import njit, prange

from fastcifar.config import AugmentConfig, PadMode

MAX_CUTOUTS = 8
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
def draw_parameters(seed: int, indices: np.ndarray, pad: int, flip: bool, cutout_size: int,
                    cutout_count: int, p_jitter: float, brightness: float, contrast: float,
                    saturation: float, hue: float, p_gray: float):
    """Per-image random parameters for one batch: (geometry int32 [n, G], colour float32 [n, C])."""
    count = indices.shape[0]
    batch_key = _mix64(np.uint64(seed) ^ _GOLDEN)
    for j in range(count):  # the batch's composition and order differ every epoch
        batch_key = _mix64(batch_key ^ np.uint64(indices[j]))
    geometry = np.zeros((count, GEOMETRY_COLUMNS), dtype=np.int32)
    colour = np.ones((count, COLOUR_COLUMNS), dtype=np.float32)
    for i in range(count):
        key = _mix64(batch_key + np.uint64(i) * _GOLDEN)
        geometry[i, 0] = int(_uniform(key, 0) * (2 * pad + 1))
        geometry[i, 1] = int(_uniform(key, 1) * (2 * pad + 1))
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


@njit(cache=True, inline="always")
def _clamp(value: float) -> float:
    return min(255.0, max(0.0, value))


@njit(cache=True, inline="always")
def _gray(red: float, green: float, blue: float) -> float:
    return 0.299 * red + 0.587 * green + 0.114 * blue


@njit(cache=True)
def _rotate_hue(red: float, green: float, blue: float, shift: float):
    """RGB (0-255) -> HSV, hue += shift (turns), -> RGB; grey pixels stay grey."""
    high = max(red, max(green, blue))
    low = min(red, min(green, blue))
    delta = high - low
    if delta <= 0.0:
        return red, green, blue
    if high == red:
        hue = ((green - blue) / delta) / 6.0
    elif high == green:
        hue = (2.0 + (blue - red) / delta) / 6.0
    else:
        hue = (4.0 + (red - green) / delta) / 6.0
    hue = (hue + shift) % 1.0
    saturation = delta / high
    sector = hue * 6.0
    index = int(sector) % 6
    fraction = sector - int(sector)
    p = high * (1.0 - saturation)
    q = high * (1.0 - saturation * fraction)
    t = high * (1.0 - saturation * (1.0 - fraction))
    if index == 0:
        return high, t, p
    if index == 1:
        return q, high, p
    if index == 2:
        return p, high, t
    if index == 3:
        return p, q, high
    if index == 4:
        return t, p, high
    return high, p, q


@njit(cache=True, parallel=True, fastmath=True)
def apply_augmentation(images: np.ndarray, out: np.ndarray, geometry: np.ndarray,
                       colour: np.ndarray, pad: int, reflect: bool, cutout_size: int,
                       cutout_count: int, fill: np.ndarray) -> np.ndarray:
    """Augment (N, H, W, 3) uint8 `images` into `out` with the drawn per-image parameters.

    `fill` is the read-only uint8 RGB of `fill_colour` (see `_read_only_fill` for why).
    """
    count, height, width = images.shape[0], images.shape[1], images.shape[2]
    for i in prange(count):
        offset_y, offset_x = geometry[i, 0], geometry[i, 1]
        flipped, gray = geometry[i, 2] == 1, geometry[i, 3] == 1
        jitter = colour[i, 0] > 0.5
        brightness, contrast = colour[i, 1], colour[i, 2]
        saturation, hue_shift = colour[i, 3], colour[i, 4]
        # Contrast blends towards the mean grey of the brightness-adjusted source image.
        mean_gray = 0.0
        if jitter and contrast != 1.0:
            for y in range(height):
                for x in range(width):
                    mean_gray += _gray(_clamp(images[i, y, x, 0] * brightness),
                                       _clamp(images[i, y, x, 1] * brightness),
                                       _clamp(images[i, y, x, 2] * brightness))
            mean_gray /= height * width
        for y in range(height):
            source_y = y + offset_y - pad
            if reflect:
                source_y = -source_y if source_y < 0 else source_y
                source_y = 2 * (height - 1) - source_y if source_y >= height else source_y
            for x in range(width):
                filled = False
                for hole in range(cutout_count):
                    top, left = geometry[i, 4 + 2 * hole], geometry[i, 5 + 2 * hole]
                    if top <= y < top + cutout_size and left <= x < left + cutout_size:
                        filled = True
                source_x = (width - 1 - x if flipped else x) + offset_x - pad
                if reflect:
                    source_x = -source_x if source_x < 0 else source_x
                    source_x = 2 * (width - 1) - source_x if source_x >= width else source_x
                if not (0 <= source_y < height and 0 <= source_x < width):
                    filled = True
                if filled:
                    out[i, y, x, 0], out[i, y, x, 1], out[i, y, x, 2] = fill[0], fill[1], fill[2]
                    continue
                red = float(images[i, source_y, source_x, 0])
                green = float(images[i, source_y, source_x, 1])
                blue = float(images[i, source_y, source_x, 2])
                if jitter:
                    red, green = _clamp(red * brightness), _clamp(green * brightness)
                    blue = _clamp(blue * brightness)
                    red = _clamp(mean_gray + contrast * (red - mean_gray))
                    green = _clamp(mean_gray + contrast * (green - mean_gray))
                    blue = _clamp(mean_gray + contrast * (blue - mean_gray))
                    grey = _gray(red, green, blue)
                    red = _clamp(grey + saturation * (red - grey))
                    green = _clamp(grey + saturation * (green - grey))
                    blue = _clamp(grey + saturation * (blue - grey))
                    if hue_shift != 0.0:
                        red, green, blue = _rotate_hue(red, green, blue, hue_shift)
                if gray:
                    red = green = blue = _gray(red, green, blue)
                out[i, y, x, 0] = np.uint8(red + 0.5)
                out[i, y, x, 1] = np.uint8(green + 0.5)
                out[i, y, x, 2] = np.uint8(blue + 0.5)
    return out


def fill_colour(mean: list[float]) -> np.ndarray:
    """The constant fill (padding, cutout): the train mean as uint8 RGB, i.e. zero after normalising."""
    return _read_only_fill([int(round(value)) for value in mean])


def _read_only_fill(fill: np.ndarray | list[int]) -> np.ndarray:
    """A read-only uint8[3] copy of `fill`, the only form the kernel should be called with.

    Why: FFCV 1.0.2's memory managers do `nb.uint8[::1].mutable = False` when a Loader is
    built, mutating numba's shared type for writable 1-D uint8 arrays in place. Any dispatcher
    compiled with such an argument earlier gets a corrupt signature table (KeyError on the next
    compile), which kills FFCV's loader thread and hangs the consumer. A read-only array has
    its own numba type, which FFCV never touches.
    """
    fill = np.array(fill, dtype=np.uint8).reshape(3)
    fill.setflags(write=False)
    return fill


def augment_batch(images: np.ndarray, indices: np.ndarray, config: AugmentConfig, seed: int,
                  fill: np.ndarray) -> np.ndarray:
    """Augment one batch outside FFCV (plots, tests); the same draws as inside the loader."""
    geometry, colour = draw_parameters(seed, np.asarray(indices, dtype=np.int64),
                                       *_draw_arguments(config))
    out = np.empty_like(images)
    return apply_augmentation(images, out, geometry, colour, config.pad,
                              config.pad_mode == PadMode.reflect, config.cutout_size,
                              config.cutout_count, _read_only_fill(fill))


def _draw_arguments(config: AugmentConfig) -> tuple:
    """The AugmentConfig fields `draw_parameters` takes after (seed, indices), in order."""
    jitter = config.p_jitter if config.jitter_enabled else 0.0
    return (config.pad, config.flip, config.cutout_size, config.cutout_count, jitter,
            config.brightness, config.contrast, config.saturation, config.hue, config.p_gray)


def make_fused_augment(config: AugmentConfig, seed: int, fill: np.ndarray):
    """The FFCV Operation running the fused kernel on decoded (N, 32, 32, 3) uint8 batches."""
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.operation import Operation

    class FusedAugment(Operation):
        """pad-crop, flip, cutout, colour jitter and grayscale in one pass (see module doc)."""

        def generate_code(self) -> Callable:
            draw_args = _draw_arguments(config)
            pad, reflect = config.pad, config.pad_mode == PadMode.reflect
            size, holes = config.cutout_size, config.cutout_count
            fill_rgb = _read_only_fill(fill)

            def fused_augment(images, out, indices):
                geometry, colour = draw_parameters(seed, indices, *draw_args)
                return apply_augmentation(images, out, geometry, colour, pad, reflect, size,
                                          holes, fill_rgb)

            fused_augment.with_indices = True  # FFCV passes the batch's sample indices
            return fused_augment

        def declare_state_and_memory(self, previous_state):
            return (replace(previous_state, jit_mode=True),
                    AllocationQuery(previous_state.shape, previous_state.dtype))

    return FusedAugment()
