"""The fused train augmentation: one numba kernel, one call per batch, uint8 in and uint8 out.

pad + random crop, horizontal flip, cutout, colour jitter (brightness, contrast, saturation,
hue) and grayscale. Random parameters are drawn serially from a counter-based hash of
(seed, the batch's sample indices, position), so a rerun with the same seed and loader order
gives the same batches whatever the thread count; the images are then augmented in parallel,
each by colour ops on its own pixels (only when drawn) and one gather for pad/crop/flip.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from fastcifar.config import MAX_CUTOUTS, AugmentConfig, PadMode

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


# The colour ops run in float32 over a whole image at a time, in simple loops with selects
# instead of branches, so LLVM vectorises them (about 8x faster than per-pixel float64 code
# with a branchy HSV conversion). float32 is ample: values stay within 1e-4 of float64 ones.
_RED_WEIGHT, _GREEN_WEIGHT, _BLUE_WEIGHT = np.float32(0.299), np.float32(0.587), np.float32(0.114)


@njit(cache=True, inline="always")
def _clamp(value: np.float32) -> np.float32:
    """Clamp to [0, 255] with selects (NaN-unaware on purpose, so it vectorises)."""
    value = value if value > 0.0 else np.float32(0.0)
    return value if value < 255.0 else np.float32(255.0)


@njit(cache=True, inline="always")
def _unit(value: np.float32) -> np.float32:
    value = value if value > 0.0 else np.float32(0.0)
    return value if value < 1.0 else np.float32(1.0)


@njit(cache=True, inline="always")
def _gray(red: np.float32, green: np.float32, blue: np.float32) -> np.float32:
    return _RED_WEIGHT * red + _GREEN_WEIGHT * green + _BLUE_WEIGHT * blue


@njit(cache=True, inline="always")
def _rotate_hue(red: np.float32, green: np.float32, blue: np.float32,
                shift_sextants: np.float32):
    """RGB (0-255) -> HSV, hue += shift, -> RGB; grey pixels stay grey.

    The hue is kept in sextants (hue * 6, in [0, 6)) and `shift_sextants` must lie in [0, 6).
    HSV's piecewise-linear way back to RGB is written as low + delta * a clamped triangle wave
    per channel: the same values as the textbook 6-way branch, without it or a modulo per
    pixel. A grey pixel has delta 0, so it comes back unchanged.
    """
    high = red if red > green else green
    high = high if high > blue else blue
    low = red if red < green else green
    low = low if low < blue else blue
    delta = high - low
    inverse = np.float32(1.0) / delta if delta > 0.0 else np.float32(0.0)
    sextant = np.float32(4.0) + (red - green) * inverse  # blue is the largest
    sextant = np.float32(2.0) + (blue - red) * inverse if high == green else sextant
    sextant = (green - blue) * inverse if high == red else sextant  # in [-1, 1]
    sextant += shift_sextants  # now in [-1, 11): one wrap brings it into [0, 6)
    sextant = sextant + np.float32(6.0) if sextant < 0.0 else sextant
    sextant = sextant - np.float32(6.0) if sextant >= 6.0 else sextant
    return (low + delta * _unit(abs(sextant - np.float32(3.0)) - np.float32(1.0)),
            low + delta * _unit(np.float32(2.0) - abs(sextant - np.float32(2.0))),
            low + delta * _unit(np.float32(2.0) - abs(sextant - np.float32(4.0))))


@njit(cache=True, fastmath=True)
def _adjust_colour(image: np.ndarray, jitter: bool, brightness: float, contrast: float,
                   saturation: float, hue_shift: float, gray: bool) -> np.ndarray:
    """Jitter (brightness, contrast, saturation, hue, in that order) then grayscale of one
    C-contiguous (H, W, 3) uint8 image, rounded back to a new uint8 image."""
    pixels = image.shape[0] * image.shape[1]
    source = image.reshape(3 * pixels)  # r, g, b, r, g, b, ...
    values = np.empty(3 * pixels, dtype=np.float32)
    if jitter:
        factor = np.float32(brightness)
        for j in range(3 * pixels):
            values[j] = _clamp(np.float32(source[j]) * factor)
        if contrast != 1.0:
            # Contrast blends towards the mean grey of the brightness-adjusted source image.
            total = np.float32(0.0)
            for k in range(pixels):
                total += _gray(values[3 * k], values[3 * k + 1], values[3 * k + 2])
            mean, factor = total / np.float32(pixels), np.float32(contrast)
            for j in range(3 * pixels):
                values[j] = _clamp(mean + factor * (values[j] - mean))
        factor = np.float32(saturation)
        for k in range(pixels):
            red, green, blue = values[3 * k], values[3 * k + 1], values[3 * k + 2]
            grey = _gray(red, green, blue)
            values[3 * k] = _clamp(grey + factor * (red - grey))
            values[3 * k + 1] = _clamp(grey + factor * (green - grey))
            values[3 * k + 2] = _clamp(grey + factor * (blue - grey))
        if hue_shift != 0.0:
            shift_sextants = np.float32(6.0 * (hue_shift % 1.0))  # the modulo once per image
            for k in range(pixels):
                values[3 * k], values[3 * k + 1], values[3 * k + 2] = _rotate_hue(
                    values[3 * k], values[3 * k + 1], values[3 * k + 2], shift_sextants)
    else:
        for j in range(3 * pixels):
            values[j] = np.float32(source[j])
    if gray:
        for k in range(pixels):
            grey = _gray(values[3 * k], values[3 * k + 1], values[3 * k + 2])
            values[3 * k] = values[3 * k + 1] = values[3 * k + 2] = grey
    adjusted = np.empty_like(image)
    rounded = adjusted.reshape(3 * pixels)
    for j in range(3 * pixels):
        rounded[j] = np.uint8(values[j] + np.float32(0.5))  # values lie in [0, 255]
    return adjusted


@njit(cache=True, inline="always")
def _source_index(index: int, size: int, reflect: bool) -> int:
    """Where padded coordinate `index - pad` reads in the image: reflected, or -1 for fill."""
    if reflect:
        index = -index if index < 0 else index
        return 2 * (size - 1) - index if index >= size else index
    return index if 0 <= index < size else -1


@njit(cache=True, parallel=True, fastmath=True)
def apply_augmentation(images: np.ndarray, out: np.ndarray, geometry: np.ndarray,
                       colour: np.ndarray, pad: int, reflect: bool, cutout_size: int,
                       cutout_count: int, fill: np.ndarray) -> np.ndarray:
    """Augment C-contiguous (N, H, W, 3) uint8 `images` into `out` with the drawn parameters.

    Per image: colour ops on the source pixels (only when drawn), then pad-crop-flip as a
    gather through per-row and per-column source maps, then the cutout holes. Padding and
    holes get the raw `fill`, the read-only uint8 RGB of `fill_colour` (see
    `_read_only_fill` for why read-only).
    """
    count, height, width = images.shape[0], images.shape[1], images.shape[2]
    for i in prange(count):
        jitter, gray = colour[i, 0] > 0.5, geometry[i, 3] == 1
        source = images[i]
        if jitter or gray:
            source = _adjust_colour(images[i], jitter, colour[i, 1], colour[i, 2],
                                    colour[i, 3], colour[i, 4], gray)
        # Crop then flip: output (y, x) reads padded (y + offset_y, x' + offset_x), where
        # x' = width - 1 - x when flipped; -1 in a map means the padding fill.
        rows = np.empty(height, dtype=np.int64)
        columns = np.empty(width, dtype=np.int64)
        for y in range(height):
            rows[y] = _source_index(y + geometry[i, 0] - pad, height, reflect)
        for x in range(width):
            column = width - 1 - x if geometry[i, 2] == 1 else x
            columns[x] = _source_index(column + geometry[i, 1] - pad, width, reflect)
        for y in range(height):
            source_y = rows[y]
            for x in range(width):
                source_x = columns[x]
                if source_y < 0 or source_x < 0:
                    out[i, y, x, 0], out[i, y, x, 1], out[i, y, x, 2] = fill[0], fill[1], fill[2]
                else:
                    out[i, y, x, 0] = source[source_y, source_x, 0]
                    out[i, y, x, 1] = source[source_y, source_x, 1]
                    out[i, y, x, 2] = source[source_y, source_x, 2]
        # Holes are drawn around a centre anywhere in the image, so they may hang over the border.
        for hole in range(cutout_count):
            top, left = geometry[i, 4 + 2 * hole], geometry[i, 5 + 2 * hole]
            for y in range(max(top, 0), min(top + cutout_size, height)):
                for x in range(max(left, 0), min(left + cutout_size, width)):
                    out[i, y, x, 0], out[i, y, x, 1], out[i, y, x, 2] = fill[0], fill[1], fill[2]
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


def draw_batch(config: AugmentConfig, seed: int, indices: np.ndarray, epoch: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
    """(geometry, colour) for one batch of sample `indices`: the draws the loader's kernel makes,
    for callers outside FFCV (`augment_batch`, the device-resident path)."""
    return draw_parameters(seed, np.asarray(indices, dtype=np.int64), epoch,
                           *_draw_arguments(config))


def augment_batch(images: np.ndarray, indices: np.ndarray, config: AugmentConfig, seed: int,
                  fill: np.ndarray, epoch: int = 0) -> np.ndarray:
    """Augment one batch outside FFCV (plots, tests); the same draws as inside the loader."""
    geometry, colour = draw_batch(config, seed, indices, epoch)
    images = np.ascontiguousarray(images)  # the kernel reads each image as a flat run
    out = np.empty_like(images)
    return apply_augmentation(images, out, geometry, colour, config.pad,
                              config.pad_mode == PadMode.reflect, config.cutout_size,
                              config.cutout_count, _read_only_fill(fill))


def _draw_arguments(config: AugmentConfig) -> tuple:
    """The AugmentConfig fields `draw_parameters` takes after (seed, indices), in order."""
    jitter = config.p_jitter if config.jitter_enabled else 0.0
    return (config.pad, config.flip, config.flip_alternate, config.cutout_size,
            config.cutout_count, jitter, config.brightness, config.contrast, config.saturation,
            config.hue, config.p_gray)


@intrinsic
def _load_int64(typing_context, address):
    """Read the int64 at a raw `address`: the live value, where a captured array is frozen."""
    def codegen(context, builder, signature, arguments):
        pointer = builder.inttoptr(arguments[0], ir.IntType(64).as_pointer())
        return builder.load_atomic(pointer, "acquire", 8)

    return types.int64(types.intp), codegen


class EpochCell:
    """The epoch the loader is in, readable from inside the compiled FFCV pipeline.

    FFCV gives an operation only the batch and its sample indices, and numba freezes any array
    a kernel captures; so the pipeline reads this cell's memory by address on every batch.
    The loop sets it before it starts an epoch's iterator (`Loaders.train_epoch`).
    """

    def __init__(self) -> None:
        self._value = np.zeros(1, dtype=np.int64)  # kept alive with the cell

    @property
    def address(self) -> int:
        return self._value.ctypes.data

    @property
    def epoch(self) -> int:
        return int(self._value[0])

    def set(self, epoch: int) -> None:
        self._value[0] = epoch


def make_fused_augment(config: AugmentConfig, seed: int, fill: np.ndarray,
                       epoch_cell: EpochCell | None = None):
    """The FFCV Operation running the fused kernel on decoded (N, 32, 32, 3) uint8 batches."""
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.operation import Operation

    class FusedAugment(Operation):
        """pad-crop, flip, cutout, colour jitter and grayscale in one pass (see module doc)."""

        def __init__(self) -> None:
            super().__init__()
            self.epoch_cell = epoch_cell or EpochCell()  # kept alive with the operation

        def generate_code(self) -> Callable:
            draw_args = _draw_arguments(config)
            pad, reflect = config.pad, config.pad_mode == PadMode.reflect
            size, holes = config.cutout_size, config.cutout_count
            fill_rgb = _read_only_fill(fill)
            address = self.epoch_cell.address

            def fused_augment(images, out, indices):
                epoch = _load_int64(address)
                geometry, colour = draw_parameters(seed, indices, epoch, *draw_args)
                return apply_augmentation(images, out, geometry, colour, pad, reflect, size,
                                          holes, fill_rgb)

            fused_augment.with_indices = True  # FFCV passes the batch's sample indices
            return fused_augment

        def declare_state_and_memory(self, previous_state):
            return (replace(previous_state, jit_mode=True),
                    AllocationQuery(previous_state.shape, previous_state.dtype))

    return FusedAugment()
