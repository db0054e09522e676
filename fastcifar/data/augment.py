"""The fused train augmentation: one numba kernel, one call per batch, uint8 in and uint8 out.

pad + random crop, horizontal flip, cutout, colour jitter (brightness, contrast, saturation,
hue), grayscale and, for progressive resizing, an antialiased downscale of the crop. Random
parameters (augment_draws.py) are drawn serially from a counter-based hash of
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

from fastcifar.config import AugmentConfig, PadMode
from fastcifar.data.augment_draws import draw_parameters

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


@njit(cache=True, inline="always")
def _coloured(image: np.ndarray, geometry_row: np.ndarray, colour_row: np.ndarray) -> np.ndarray:
    """The image after its drawn colour ops (jitter, grayscale), or itself when none was drawn."""
    jitter, gray = colour_row[0] > 0.5, geometry_row[3] == 1
    if jitter or gray:
        return _adjust_colour(image, jitter, colour_row[1], colour_row[2], colour_row[3],
                              colour_row[4], gray)
    return image


@njit(cache=True, inline="always")
def _crop_flip(source: np.ndarray, target: np.ndarray, offset_y: int, offset_x: int,
               flipped: bool, pad: int, reflect: bool, fill: np.ndarray) -> None:
    """Pad-crop-flip one (H, W, 3) image into `target` as a gather through per-row and
    per-column source maps: target (y, x) reads padded (y + offset_y, x' + offset_x), where
    x' = W - 1 - x when flipped; -1 in a map means the padding fill."""
    height, width = source.shape[0], source.shape[1]
    rows = np.empty(height, dtype=np.int64)
    columns = np.empty(width, dtype=np.int64)
    for y in range(height):
        rows[y] = _source_index(y + offset_y - pad, height, reflect)
    for x in range(width):
        column = width - 1 - x if flipped else x
        columns[x] = _source_index(column + offset_x - pad, width, reflect)
    for y in range(height):
        source_y = rows[y]
        for x in range(width):
            source_x = columns[x]
            if source_y < 0 or source_x < 0:
                target[y, x, 0], target[y, x, 1], target[y, x, 2] = fill[0], fill[1], fill[2]
            else:
                target[y, x, 0] = source[source_y, source_x, 0]
                target[y, x, 1] = source[source_y, source_x, 1]
                target[y, x, 2] = source[source_y, source_x, 2]


@njit(cache=True, inline="always")
def _cut_holes(target: np.ndarray, geometry_row: np.ndarray, cutout_size: int,
               cutout_count: int, full_size: int, fill: np.ndarray) -> None:
    """Fill the drawn holes of one image. Holes are drawn around a centre anywhere in the
    full-size image (so they may hang over the border); a smaller `target` gets them scaled."""
    size = target.shape[0]
    side = scaled_length(cutout_size, size, full_size)
    for hole in range(cutout_count):
        top = scaled_offset(geometry_row[4 + 2 * hole], size, full_size)
        left = scaled_offset(geometry_row[5 + 2 * hole], size, full_size)
        for y in range(max(top, 0), min(top + side, size)):
            for x in range(max(left, 0), min(left + side, size)):
                target[y, x, 0], target[y, x, 1], target[y, x, 2] = fill[0], fill[1], fill[2]


@njit(cache=True)
def scaled_offset(offset: int, size: int, full_size: int) -> int:
    """A hole's top or left, drawn at `full_size`, on a `size` image (floored)."""
    return (offset * size) // full_size


@njit(cache=True)
def scaled_length(length: int, size: int, full_size: int) -> int:
    """A hole's side, drawn at `full_size`, on a `size` image (rounded, at least 1 if any)."""
    if length == 0:
        return 0
    return max((length * size + full_size // 2) // full_size, 1)


def resample_table(full_size: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Antialiased bilinear weights from `full_size` to `size` pixels along one axis.

    (first source index int64 [size], weights float32 [size, taps]): output pixel o is
    sum_t weights[o, t] * source[first[o] + t]. The triangle filter is widened by the scale,
    the definition torch's `interpolate(mode="bilinear", antialias=True)` and PIL use, so the
    device-resident path (which calls torch) gives the same images.
    """
    scale = full_size / size
    support = max(scale, 1.0)
    first = np.empty(size, dtype=np.int64)
    rows = []
    for output in range(size):
        centre = scale * (output + 0.5)
        low = max(int(centre - support + 0.5), 0)
        high = min(int(centre + support + 0.5), full_size)
        taps = (np.arange(low, high) - centre + 0.5) / support
        weights = np.clip(1.0 - np.abs(taps), 0.0, None)
        first[output] = low
        rows.append(weights / weights.sum())
    table = np.zeros((size, max(len(row) for row in rows)), dtype=np.float32)
    for output, row in enumerate(rows):
        table[output, :len(row)] = row
    return first, table


@njit(cache=True, inline="always")
def _resample(image: np.ndarray, target: np.ndarray, first: np.ndarray,
              weights: np.ndarray) -> None:
    """Downscale one (H, W, 3) uint8 image into `target` (S, S, 3): rows, then columns, in
    float32, rounded to the nearest grey level."""
    height, size, taps = image.shape[0], target.shape[0], weights.shape[1]
    across = np.zeros((height, size, 3), dtype=np.float32)
    for y in range(height):
        for x in range(size):
            for tap in range(taps):
                weight = weights[x, tap]
                if weight > 0.0:
                    for channel in range(3):
                        across[y, x, channel] += weight * np.float32(
                            image[y, first[x] + tap, channel])
    for y in range(size):
        for x in range(size):
            for channel in range(3):
                total = np.float32(0.0)
                for tap in range(taps):
                    weight = weights[y, tap]
                    if weight > 0.0:  # zero weights pad the table past the image's edge
                        total += weight * across[first[y] + tap, x, channel]
                total = _clamp(total)
                target[y, x, channel] = np.uint8(total + np.float32(0.5))


@njit(cache=True, parallel=True, fastmath=True)
def apply_augmentation(images: np.ndarray, out: np.ndarray, geometry: np.ndarray,
                       colour: np.ndarray, pad: int, reflect: bool, cutout_size: int,
                       cutout_count: int, fill: np.ndarray) -> np.ndarray:
    """Augment C-contiguous (N, H, W, 3) uint8 `images` into `out` with the drawn parameters.

    Per image: colour ops on the source pixels (only when drawn), then pad-crop-flip as a
    gather, then the cutout holes. Padding and holes get the raw `fill`, the read-only uint8
    RGB of `fill_colour` (see `_read_only_fill` for why read-only).
    """
    for i in prange(images.shape[0]):
        source = _coloured(images[i], geometry[i], colour[i])
        _crop_flip(source, out[i], geometry[i, 0], geometry[i, 1], geometry[i, 2] == 1, pad,
                   reflect, fill)
        _cut_holes(out[i], geometry[i], cutout_size, cutout_count, images.shape[1], fill)
    return out


@njit(cache=True, parallel=True, fastmath=True)
def apply_augmentation_resized(images: np.ndarray, out: np.ndarray, geometry: np.ndarray,
                               colour: np.ndarray, pad: int, reflect: bool, cutout_size: int,
                               cutout_count: int, fill: np.ndarray, first: np.ndarray,
                               weights: np.ndarray) -> np.ndarray:
    """`apply_augmentation` to (N, S, S, 3) `out`: the crop is downscaled (`resample_table`'s
    `first`, `weights`) before the holes, which are scaled to S. One pass per image."""
    height, width = images.shape[1], images.shape[2]
    for i in prange(images.shape[0]):
        source = _coloured(images[i], geometry[i], colour[i])
        cropped = np.empty((height, width, 3), dtype=np.uint8)
        _crop_flip(source, cropped, geometry[i, 0], geometry[i, 1], geometry[i, 2] == 1, pad,
                   reflect, fill)
        _resample(cropped, out[i], first, weights)
        _cut_holes(out[i], geometry[i], cutout_size, cutout_count, height, fill)
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
                  fill: np.ndarray, epoch: int = 0, size: int | None = None) -> np.ndarray:
    """Augment one batch outside FFCV (plots, tests); the same draws as inside the loader.

    `size` below the images' side downscales each crop to size x size (progressive resizing).
    """
    geometry, colour = draw_batch(config, seed, indices, epoch)
    images = np.ascontiguousarray(images)  # the kernel reads each image as a flat run
    arguments = (geometry, colour, config.pad, config.pad_mode == PadMode.reflect,
                 config.cutout_size, config.cutout_count, _read_only_fill(fill))
    full_size = images.shape[1]
    if size is None or size == full_size:
        return apply_augmentation(images, np.empty_like(images), *arguments)
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    return apply_augmentation_resized(images, out, *arguments,
                                      *resample_table(full_size, size))


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
                       epoch_cell: EpochCell | None = None, full_size: int = 32):
    """The FFCV Operation running the fused kernel on decoded (N, 32, 32, 3) uint8 batches.

    Its `output_size` (default `full_size`) is the side of the images it hands on; a change
    takes effect when the Loader next generates its code (`Loaders.train_epoch` asks for it).
    """
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.operation import Operation

    class FusedAugment(Operation):
        """pad-crop, flip, cutout, colour jitter, grayscale and downscaling in one pass."""

        def __init__(self) -> None:
            super().__init__()
            self.epoch_cell = epoch_cell or EpochCell()  # kept alive with the operation
            self.output_size = full_size

        def generate_code(self) -> Callable:
            draw_args = _draw_arguments(config)
            pad, reflect = config.pad, config.pad_mode == PadMode.reflect
            size, holes = config.cutout_size, config.cutout_count
            fill_rgb = _read_only_fill(fill)
            address = self.epoch_cell.address
            if self.output_size == full_size:
                def fused_augment(images, out, indices):
                    epoch = _load_int64(address)
                    geometry, colour = draw_parameters(seed, indices, epoch, *draw_args)
                    return apply_augmentation(images, out, geometry, colour, pad, reflect,
                                              size, holes, fill_rgb)
            else:
                first, weights = resample_table(full_size, self.output_size)

                def fused_augment(images, out, indices):
                    epoch = _load_int64(address)
                    geometry, colour = draw_parameters(seed, indices, epoch, *draw_args)
                    return apply_augmentation_resized(images, out, geometry, colour, pad,
                                                      reflect, size, holes, fill_rgb, first,
                                                      weights)

            fused_augment.with_indices = True  # FFCV passes the batch's sample indices
            return fused_augment

        def declare_state_and_memory(self, previous_state):
            shape = (self.output_size, self.output_size, previous_state.shape[2])
            return (replace(previous_state, jit_mode=True, shape=shape),
                    AllocationQuery(shape, previous_state.dtype))

    return FusedAugment()
