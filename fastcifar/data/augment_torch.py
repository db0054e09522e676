"""The fused train augmentation as batched torch ops, for batches already on the device
(`--data-on-device`). The random parameters are the numba kernel's own draws (`draw_batch`,
keyed by seed, sample indices and epoch), applied in its order and with its rounding, so both
paths give the same uint8 images (exactly for geometry, within 1 grey level with colour ops).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fastcifar.config import AugmentConfig, PadMode
from fastcifar.data.augment import draw_batch, scaled_length

# The kernel's float32 luma weights (ITU-R 601), as python floats: torch applies them to a
# float32 tensor in float32, as the kernel does.
_RED_WEIGHT, _GREEN_WEIGHT, _BLUE_WEIGHT = (float(np.float32(weight))
                                            for weight in (0.299, 0.587, 0.114))


@dataclass(frozen=True)
class BatchDraws:
    """One batch's drawn parameters on the device, plus what the host already knows of them."""

    geometry: torch.Tensor  # int64 (B, GEOMETRY_COLUMNS): crop offsets, flip, gray, holes
    colour: torch.Tensor  # float32 (B, COLOUR_COLUMNS): jitter on, the four factors
    hue_sextants: torch.Tensor  # float32 (B,): the hue shift as the kernel uses it, in [0, 6)
    colour_rows: torch.Tensor  # int64 (K,): the images that are jittered or grayed
    contrast: bool  # some jittered image has a contrast factor other than 1
    hue: bool  # some jittered image has a hue shift other than 0


def draw_epoch(config: AugmentConfig, seed: int, batches: np.ndarray, epoch: int,
               device: torch.device) -> list[BatchDraws]:
    """The draws for every batch of an epoch (`batches`: (steps, B) sample indices).

    Drawn on the host like the kernel's, then copied to the device in one go per tensor: no
    per-batch copy, so the training loop gets no host-device sync from the augmentation.
    """
    draws = [draw_batch(config, seed, indices, epoch) for indices in batches]
    geometry = np.stack([geometry for geometry, _ in draws]).astype(np.int64)
    colour = np.stack([colour for _, colour in draws])
    jitter = colour[..., 0] > 0.5
    # The kernel turns the shift into sextants once per image, in float64, then float32.
    sextants = (6.0 * (colour[..., 4].astype(np.float64) % 1.0)).astype(np.float32)
    rows = [np.flatnonzero(jitter[step] | (geometry[step, :, 3] == 1))
            for step in range(len(batches))]
    offsets = np.cumsum([0] + [len(step_rows) for step_rows in rows])
    geometry_device = torch.from_numpy(geometry).to(device)
    colour_device = torch.from_numpy(colour).to(device)
    sextants_device = torch.from_numpy(sextants).to(device)
    rows_device = torch.from_numpy(np.concatenate(rows).astype(np.int64)).to(device)
    return [BatchDraws(geometry_device[step], colour_device[step], sextants_device[step],
                       rows_device[offsets[step]:offsets[step + 1]],
                       bool((jitter[step] & (colour[step, :, 2] != 1.0)).any()),
                       bool((jitter[step] & (colour[step, :, 4] != 0.0)).any()))
            for step in range(len(batches))]


class TorchAugment:
    """Augments (B, H, W, 3) uint8 device batches with drawn parameters, like the kernel:
    colour ops on the source pixels (only where drawn), then pad-crop-flip, then cutout holes."""

    def __init__(self, config: AugmentConfig, seed: int, fill: np.ndarray,
                 device: torch.device) -> None:
        self.config, self.seed, self.device = config, seed, device
        self.fill = torch.tensor(np.array(fill), dtype=torch.uint8, device=device)

    def draw_epoch(self, batches: np.ndarray, epoch: int) -> list[BatchDraws]:
        """`draw_epoch` with this augmentation's settings and seed."""
        return draw_epoch(self.config, self.seed, batches, epoch, self.device)

    def __call__(self, images: torch.Tensor, draws: BatchDraws, size: int | None = None
                 ) -> torch.Tensor:
        """The augmented batch (a new tensor; `images` is left as it was), each crop
        downscaled to `size` x `size` when given (progressive resizing)."""
        config = self.config
        if draws.colour_rows.numel():
            images = images.clone()
            rows = draws.colour_rows
            images[rows] = adjust_colour(images[rows], draws.colour[rows],
                                         draws.hue_sextants[rows], draws.geometry[rows, 3] == 1,
                                         draws.contrast, draws.hue)
        return crop_flip_cutout(images, draws.geometry, config.pad,
                                config.pad_mode == PadMode.reflect, config.cutout_size,
                                config.cutout_count, self.fill, size)


def augment_batch_torch(images: torch.Tensor, indices: np.ndarray, config: AugmentConfig,
                        seed: int, fill: np.ndarray, epoch: int = 0, size: int | None = None
                        ) -> torch.Tensor:
    """One (B, H, W, 3) uint8 batch augmented on its device: `augment_batch`'s torch twin."""
    augment = TorchAugment(config, seed, fill, images.device)
    draws = augment.draw_epoch(np.asarray(indices, dtype=np.int64)[None], epoch)[0]
    return augment(images, draws, size)


# ---------------------------------------------------------------- colour


def _gray(values: torch.Tensor) -> torch.Tensor:
    """Luma of (K, 3, H, W) float32 RGB planes, as (K, 1, H, W)."""
    return (values[:, 0:1] * _RED_WEIGHT + values[:, 1:2] * _GREEN_WEIGHT
            + values[:, 2:3] * _BLUE_WEIGHT)


def _rotate_hue(values: torch.Tensor, shift_sextants: torch.Tensor) -> torch.Tensor:
    """RGB (0-255) -> HSV, hue += shift (in sextants, [0, 6)) -> RGB, as the kernel's
    `_rotate_hue`: the hue kept in sextants, the way back a clamped triangle wave per channel."""
    red, green, blue = values[:, 0:1], values[:, 1:2], values[:, 2:3]
    high = torch.maximum(torch.maximum(red, green), blue)
    low = torch.minimum(torch.minimum(red, green), blue)
    delta = high - low
    inverse = torch.where(delta > 0, 1.0 / delta, 0.0)  # grey pixels keep delta 0
    sextant = 4.0 + (red - green) * inverse  # blue is the largest
    sextant = torch.where(high == green, 2.0 + (blue - red) * inverse, sextant)
    sextant = torch.where(high == red, (green - blue) * inverse, sextant)  # in [-1, 1]
    sextant = sextant + shift_sextants  # in [-1, 11): one wrap brings it into [0, 6)
    sextant = torch.where(sextant < 0, sextant + 6.0, sextant)
    sextant = torch.where(sextant >= 6.0, sextant - 6.0, sextant)
    return torch.cat([low + delta * ((sextant - 3.0).abs() - 1.0).clamp(0, 1),
                      low + delta * (2.0 - (sextant - 2.0).abs()).clamp(0, 1),
                      low + delta * (2.0 - (sextant - 4.0).abs()).clamp(0, 1)], dim=1)


def adjust_colour(images: torch.Tensor, colour: torch.Tensor, hue_sextants: torch.Tensor,
                  gray: torch.Tensor, contrast: bool = True, hue: bool = True) -> torch.Tensor:
    """Jitter (brightness, contrast, saturation, hue, in that order) where `colour[:, 0]` is
    set, then grayscale where `gray`, of (K, H, W, 3) uint8 images; rounded back to uint8.

    `contrast`/`hue` False skip ops the host knows change no image. Images neither jittered nor
    grayed come back unchanged (the jitter is computed for every image, then selected).
    """
    # Planar (K, 3, H, W) floats: each channel is a contiguous plane, so every op vectorises
    # (on interleaved RGB, channel slices are strided and the CPU runs ~10x slower).
    source = images.permute(0, 3, 1, 2).contiguous().float()
    factors = colour.view(-1, colour.shape[1], 1, 1)  # column j: factors[:, j:j + 1]
    values = (source * factors[:, 1:2]).clamp(0, 255)
    if contrast:
        # Contrast blends towards the mean grey of the brightness-adjusted source image.
        mean = _gray(values).sum(dim=(2, 3), keepdim=True) / (images.shape[1] * images.shape[2])
        blended = (mean + factors[:, 2:3] * (values - mean)).clamp(0, 255)
        values = torch.where(factors[:, 2:3] != 1.0, blended, values)
    grey = _gray(values)
    values = (grey + factors[:, 3:4] * (values - grey)).clamp(0, 255)
    if hue:
        rotated = _rotate_hue(values, hue_sextants.view(-1, 1, 1, 1))
        values = torch.where(factors[:, 4:5] != 0.0, rotated, values)
    values = torch.where(factors[:, 0:1] > 0.5, values, source)
    values = torch.where(gray.view(-1, 1, 1, 1), _gray(values).expand_as(values), values)
    rounded = (values + 0.5).to(torch.uint8)  # values lie in [0, 255]: + 0.5 and truncate
    return rounded.permute(0, 2, 3, 1)


# ---------------------------------------------------------------- geometry


def _source_index(index: torch.Tensor, size: int, reflect: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(where padded coordinates read in the image, clamped to it; whether that is inside it
    rather than the fill). Reflection needs pad < size, which AugmentConfig ensures."""
    if reflect:
        index = index.abs()
        index = torch.where(index >= size, 2 * (size - 1) - index, index)
        return index, torch.ones_like(index, dtype=torch.bool)
    inside = (index >= 0) & (index < size)
    return index.clamp(0, size - 1), inside


def crop_flip_cutout(images: torch.Tensor, geometry: torch.Tensor, pad: int, reflect: bool,
                     cutout_size: int, cutout_count: int, fill: torch.Tensor,
                     size: int | None = None) -> torch.Tensor:
    """Pad, crop at the drawn offsets and flip (one gather), downscale to `size` when given
    (antialiased bilinear, the kernel's `resample_table`), then fill the cutout holes.

    Output (y, x) reads padded (y + offset_y, x' + offset_x), x' = width - 1 - x when flipped;
    holes lie around a centre anywhere in the image, so they may hang over the border, and
    are scaled with the image.
    """
    count, height, width = images.shape[:3]
    ys = torch.arange(height, device=images.device)
    xs = torch.arange(width, device=images.device)
    rows, row_inside = _source_index(ys + (geometry[:, 0:1] - pad), height, reflect)
    flipped = torch.where(geometry[:, 2:3] == 1, width - 1 - xs, xs)
    columns, column_inside = _source_index(flipped + (geometry[:, 1:2] - pad), width, reflect)
    batch = torch.arange(count, device=images.device)[:, None, None]
    out = images[batch, rows[:, :, None], columns[:, None, :]]
    inside = (row_inside[:, :, None] & column_inside[:, None, :])[..., None]
    out = torch.where(inside, out, fill)
    if size is not None and size != height:
        out = _downscale(out, size)
    return _cut_holes(out, geometry, cutout_size, cutout_count, height, fill)


def _downscale(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, size, size, 3) uint8, antialiased bilinear, rounded."""
    planes = images.permute(0, 3, 1, 2).float()
    small = torch.nn.functional.interpolate(planes, size=(size, size), mode="bilinear",
                                            antialias=True, align_corners=False)
    return (small.clamp(0, 255) + 0.5).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _cut_holes(images: torch.Tensor, geometry: torch.Tensor, cutout_size: int,
               cutout_count: int, full_size: int, fill: torch.Tensor) -> torch.Tensor:
    """Fill each image's drawn holes (drawn at `full_size`, scaled as the kernel does)."""
    if not cutout_count or not cutout_size:
        return images
    size = images.shape[1]
    side = scaled_length(cutout_size, size, full_size)
    positions = torch.arange(size, device=images.device)
    filled = torch.zeros(images.shape[:3], dtype=torch.bool, device=images.device)
    for hole in range(cutout_count):
        top = torch.div(geometry[:, 4 + 2 * hole:5 + 2 * hole] * size, full_size,
                        rounding_mode="floor")
        left = torch.div(geometry[:, 5 + 2 * hole:6 + 2 * hole] * size, full_size,
                         rounding_mode="floor")
        in_rows = (positions >= top) & (positions < top + side)
        in_columns = (positions >= left) & (positions < left + side)
        filled |= in_rows[:, :, None] & in_columns[:, None, :]
    return torch.where(filled[..., None], fill, images)
