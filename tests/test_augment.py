"""augment: the fused kernel against a slow per-image NumPy reference, its statistics, and FFCV.

The reference takes the parameters `draw_parameters` drew, so the randomness is pinned and
each part (pad/crop, flip, cutout, jitter, grayscale) can be checked pixel by pixel.
"""

from __future__ import annotations

import colorsys
import dataclasses
import threading

import numpy as np
import pytest

from fastcifar.config import MAX_CUTOUTS, NO_AUGMENT, AugmentConfig, LoaderConfig, PadMode
from fastcifar.data.augment import apply_augmentation, augment_batch, fill_colour
from fastcifar.data.augment_draws import draw_parameters

FILL = fill_colour([125.3, 122.9, 113.9])  # read-only uint8, as the kernel wants it
GEOMETRY_ONLY = AugmentConfig(pad=4, flip=True, cutout_size=8, cutout_count=1)
GEOMETRY_ONLY_NO_HOLES = AugmentConfig(pad=4, flip=True, cutout_size=0, cutout_count=0)
FULL = AugmentConfig(pad=4, flip=True, cutout_size=8, cutout_count=1, p_jitter=0.7,
                     brightness=0.4, contrast=0.4, saturation=0.4, hue=0.25, p_gray=0.3)


# ---------------------------------------------------------------- the slow reference


def reference_grey(image: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of (..., 3) float RGB."""
    return 0.299 * image[..., 0] + 0.587 * image[..., 1] + 0.114 * image[..., 2]


def reference_colour(image: np.ndarray, colour: np.ndarray, gray: bool) -> np.ndarray:
    """Colour jitter then grayscale of one (H, W, 3) uint8 image, as float64 on 0..255."""
    pixels = image.astype(np.float64)
    if colour[0] > 0.5:
        brightness, contrast, saturation, hue_shift = (float(v) for v in colour[1:5])
        pixels = np.clip(pixels * brightness, 0, 255)
        mean = reference_grey(pixels).mean()  # of the whole brightness-adjusted source image
        pixels = np.clip(mean + contrast * (pixels - mean), 0, 255)
        grey = reference_grey(pixels)[..., None]
        pixels = np.clip(grey + saturation * (pixels - grey), 0, 255)
        for y in range(pixels.shape[0]):
            for x in range(pixels.shape[1]):
                hue, value_saturation, value = colorsys.rgb_to_hsv(*pixels[y, x])
                pixels[y, x] = colorsys.hsv_to_rgb((hue + hue_shift) % 1.0, value_saturation,
                                                   value)
    if gray:
        pixels = np.repeat(reference_grey(pixels)[..., None], 3, axis=2)
    return pixels


def reference_geometry(image: np.ndarray, geometry: np.ndarray, pad: int, reflect: bool,
                       cutout_size: int, cutout_count: int, fill: np.ndarray) -> np.ndarray:
    """Pad, crop at the drawn offset, flip, then fill the cutout holes, of one uint8 image."""
    height, width = image.shape[:2]
    if reflect:
        padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    else:
        padded = np.empty((height + 2 * pad, width + 2 * pad, 3), dtype=np.uint8)
        padded[:] = fill
        padded[pad:pad + height, pad:pad + width] = image
    offset_y, offset_x = geometry[0], geometry[1]
    out = padded[offset_y:offset_y + height, offset_x:offset_x + width].copy()
    if geometry[2]:
        out = out[:, ::-1].copy()
    for hole in range(cutout_count):
        top, left = geometry[4 + 2 * hole], geometry[5 + 2 * hole]
        # holes may hang over the border; clip (a negative slice start would wrap around)
        out[max(top, 0):max(top + cutout_size, 0), max(left, 0):max(left + cutout_size, 0)] = fill
    return out


def reference_augment(images: np.ndarray, geometry: np.ndarray, colour: np.ndarray,
                      config: AugmentConfig, fill: np.ndarray) -> np.ndarray:
    """The whole augmentation, image by image: colour on source pixels, round, then geometry."""
    out = np.empty_like(images)
    for i, image in enumerate(images):
        coloured = np.floor(reference_colour(image, colour[i], geometry[i, 3] == 1) + 0.5)
        out[i] = reference_geometry(coloured.astype(np.uint8), geometry[i], config.pad,
                                    config.pad_mode == PadMode.reflect, config.cutout_size,
                                    config.cutout_count, fill)
    return out


def draw(config: AugmentConfig, seed: int, indices: np.ndarray,
         epoch: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's draws for `config`, as `augment_batch` makes them."""
    jitter = config.p_jitter if config.jitter_enabled else 0.0
    return draw_parameters(seed, np.asarray(indices, dtype=np.int64), epoch, config.pad,
                           config.flip, config.flip_alternate, config.cutout_size,
                           config.cutout_count, jitter, config.brightness, config.contrast,
                           config.saturation, config.hue, config.p_gray)


def random_images(count: int, seed: int = 0, low: int = 0, high: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, (count, 32, 32, 3), dtype=np.uint8)


def smooth_images(count: int, seed: int = 0) -> np.ndarray:
    """Photo-like images (smooth colour gradients plus a little noise), so hue and
    saturation have colour to act on and the contrast mean is not always mid-grey."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, 32)
    start = rng.uniform(0, 255, (count, 1, 1, 3))
    slope_y = rng.uniform(-200, 200, (count, 1, 1, 3)) * ramp[None, :, None, None]
    slope_x = rng.uniform(-200, 200, (count, 1, 1, 3)) * ramp[None, None, :, None]
    noise = rng.normal(0, 6, (count, 32, 32, 3))
    return np.clip(start + slope_y + slope_x + noise, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- exact parts


@pytest.mark.parametrize("pad_mode", [PadMode.constant, PadMode.reflect])
@pytest.mark.parametrize("pad, cutout_size, cutout_count", [(4, 8, 1), (2, 5, 3), (7, 0, 0),
                                                            (0, 11, MAX_CUTOUTS)])
def test_crop_flip_cutout_match_reference_exactly(pad_mode, pad, cutout_size, cutout_count):
    config = AugmentConfig(pad=pad, pad_mode=pad_mode, flip=True, cutout_size=cutout_size,
                           cutout_count=cutout_count)
    images = random_images(200, seed=pad)
    indices = np.arange(200)
    geometry, colour = draw(config, 3, indices)
    out = augment_batch(images, indices, config, 3, FILL)
    np.testing.assert_array_equal(out, reference_augment(images, geometry, colour, config, FILL))
    # the draws covered the cases the reference distinguishes
    assert 0 < geometry[:, 2].sum() < 200
    assert set(geometry[:, 0]) == set(range(2 * pad + 1))


def test_reflect_padding_repeats_no_fill_colour():
    config = AugmentConfig(pad=4, pad_mode=PadMode.reflect, flip=False, cutout_size=0,
                           cutout_count=0)
    images = random_images(50, low=0, high=100)  # never the fill colour
    out = augment_batch(images, np.arange(50), config, 0, np.array([200, 200, 200], np.uint8))
    assert (out < 100).all()


def test_jitter_and_gray_match_reference_within_one_grey_level():
    images = smooth_images(48, seed=1)
    indices = np.arange(100, 148)
    geometry, colour = draw(FULL, 5, indices)
    out = augment_batch(images, indices, FULL, 5, FILL)
    expected = reference_augment(images, geometry, colour, FULL, FILL)
    difference = np.abs(out.astype(np.int16) - expected)
    assert difference.max() <= 1
    # off-by-one only where float rounding lands on a .5 boundary, not systematically
    assert (difference == 0).mean() > 0.99
    jittered, grey = colour[:, 0] > 0.5, geometry[:, 3] == 1
    assert jittered.any() and (~jittered).any() and grey.any() and (~grey).any()
    assert (out != images).any(axis=(1, 2, 3)).all()


@pytest.mark.parametrize("part", ["brightness", "contrast", "saturation", "hue"])
def test_each_jitter_part_alone_matches_reference(part):
    config = dataclasses.replace(NO_AUGMENT, p_jitter=1.0, **{part: 0.5 if part == "hue" else 0.6})
    images = smooth_images(24, seed=2)
    indices = np.arange(24)
    geometry, colour = draw(config, 9, indices)
    out = augment_batch(images, indices, config, 9, FILL)
    expected = reference_augment(images, geometry, colour, config, FILL)
    assert np.abs(out.astype(np.int16) - expected).max() <= 1
    assert (out != images).mean() > 0.3  # the part really acted


def test_grayscale_gives_equal_channels():
    config = dataclasses.replace(FULL, pad=0, cutout_size=0, cutout_count=0, p_gray=1.0)
    out = augment_batch(smooth_images(64, seed=3), np.arange(64), config, 1, FILL)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_hue_rotation_keeps_grey_pixels_grey():
    levels = np.random.default_rng(4).integers(0, 256, (64, 32, 32, 1), dtype=np.uint8)
    greys = np.repeat(levels, 3, axis=3)
    config = dataclasses.replace(NO_AUGMENT, p_jitter=1.0, hue=0.5, brightness=0.3,
                                 contrast=0.3, saturation=0.5)
    out = augment_batch(greys, np.arange(64), config, 2, FILL)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert (out != greys).any()


def test_hue_rotation_by_a_third_turns_red_into_green():
    red = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    red[..., 0] = 200
    geometry = np.zeros((1, 4 + 2 * MAX_CUTOUTS), dtype=np.int32)
    colour = np.array([[1.0, 1.0, 1.0, 1.0, 1 / 3]], dtype=np.float32)
    out = apply_augmentation(red, np.empty_like(red), geometry, colour, 0, False, 0, 0, FILL)
    assert (out[..., 0] == 0).all() and (out[..., 1] == 200).all() and (out[..., 2] == 0).all()


def test_all_parts_off_returns_the_input():
    images = random_images(64, seed=5)
    np.testing.assert_array_equal(augment_batch(images, np.arange(64), NO_AUGMENT, 7, FILL),
                                  images)


def test_jitter_with_unit_factors_returns_the_input():
    # jitter on, every factor exactly 1 and no hue shift: the colour path must not drift
    images = random_images(64, seed=6)
    geometry, colour = draw_parameters(0, np.arange(64), 0, 0, False, False, 0, 0, 1.0, 0.0,
                                       0.0, 0.0, 0.0, 0.0)
    assert (colour[:, 0] == 1).all()
    out = apply_augmentation(images, np.empty_like(images), geometry, colour, 0, False, 0, 0,
                             FILL)
    np.testing.assert_array_equal(out, images)


def test_augment_batch_accepts_a_non_contiguous_view():
    images = random_images(16, seed=12)
    view = images[:, :, ::-1]  # e.g. a mirrored view of stored images
    np.testing.assert_array_equal(augment_batch(view, np.arange(16), FULL, 4, FILL),
                                  augment_batch(view.copy(), np.arange(16), FULL, 4, FILL))


def test_fill_colour_rounds_the_mean():
    np.testing.assert_array_equal(fill_colour([125.3, 122.5, 113.86]), [125, 122, 114])


# ---------------------------------------------------------------- reproducibility


def test_same_seed_and_indices_give_the_same_output():
    images = smooth_images(32, seed=7)
    indices = np.arange(500, 532)
    first = augment_batch(images, indices, FULL, 11, FILL)
    np.testing.assert_array_equal(augment_batch(images, indices, FULL, 11, FILL), first)
    assert (augment_batch(images, indices, FULL, 12, FILL) != first).any(axis=(1, 2, 3)).mean() > 0.9
    # the draws depend on which samples form the batch (FFCV passes their indices)
    assert (augment_batch(images, indices + 1, FULL, 11, FILL) != first).any()


def test_draws_do_not_depend_on_the_thread_count():
    import numba

    images = smooth_images(32, seed=8)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = augment_batch(images, np.arange(32), FULL, 3, FILL)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(augment_batch(images, np.arange(32), FULL, 3, FILL), single)


# ---------------------------------------------------------------- statistics over many images

MANY = 4000


def test_flip_rate_is_one_half():
    config = AugmentConfig(pad=0, flip=True, cutout_size=0, cutout_count=0)
    images = random_images(MANY, seed=9)
    out = augment_batch(images, np.arange(MANY), config, 0, FILL)
    flipped = (out == images[:, :, ::-1]).all(axis=(1, 2, 3))
    unchanged = (out == images).all(axis=(1, 2, 3))
    assert (flipped ^ unchanged).all()
    assert abs(flipped.mean() - 0.5) < 0.03


def test_jitter_and_gray_probabilities_and_ranges():
    config = AugmentConfig(pad=0, flip=False, cutout_size=0, cutout_count=0, p_jitter=0.5,
                           brightness=0.1, contrast=0.2, saturation=0.3, hue=0.05, p_gray=0.1)
    geometry, colour = draw(config, 4, np.arange(MANY))
    assert abs(colour[:, 0].mean() - 0.5) < 0.03
    assert abs(geometry[:, 3].mean() - 0.1) < 0.015
    for column, magnitude in ((1, 0.1), (2, 0.2), (3, 0.3)):
        factors = colour[:, column]
        assert (np.abs(factors - 1) <= magnitude + 1e-6).all()
        assert abs(factors.mean() - 1) < magnitude * 0.05
        assert factors.min() < 1 - 0.9 * magnitude and factors.max() > 1 + 0.9 * magnitude
    assert (np.abs(colour[:, 4]) <= 0.05 + 1e-6).all() and abs(colour[:, 4].mean()) < 0.003
    # the flags drawn are the ones applied: gray images (and only they) have equal channels
    images = smooth_images(MANY, seed=10)
    out = augment_batch(images, np.arange(MANY), config, 4, FILL)
    equal_channels = ((out[..., 0] == out[..., 1]) & (out[..., 1] == out[..., 2])).all(axis=(1, 2))
    np.testing.assert_array_equal(equal_channels, geometry[:, 3] == 1)


def test_cutout_area_matches_a_centred_hole_clipped_at_the_border():
    size = 8
    config = AugmentConfig(pad=0, flip=False, cutout_size=size, cutout_count=1)
    images = random_images(MANY, seed=11, low=1)  # never the (0, 0, 0) fill
    out = augment_batch(images, np.arange(MANY), config, 6, np.zeros(3, np.uint8))
    area = (out == 0).all(axis=3).sum(axis=(1, 2))
    # hole rows: [centre - size//2, centre + size//2) clipped to the image, centre uniform
    covered = [min(32, c - size // 2 + size) - max(0, c - size // 2) for c in range(32)]
    expected_mean = np.mean(covered) ** 2  # rows and columns are drawn independently
    assert area.min() >= min(covered) ** 2 and area.max() == size * size
    assert abs(area.mean() - expected_mean) < 1.0
    # the hole is a square (or a clipped rectangle): its bounding box is all filled
    for image_mask in (out[:50] == 0).all(axis=3):
        rows, columns = np.nonzero(image_mask)
        box = (rows.max() - rows.min() + 1) * (columns.max() - columns.min() + 1)
        assert box == image_mask.sum()


@pytest.mark.parametrize("pad", [1, 4, 9])
def test_crop_offsets_are_uniform_in_zero_to_twice_the_pad(pad):
    config = AugmentConfig(pad=pad, flip=False, cutout_size=0, cutout_count=0)
    geometry, _ = draw(config, 8, np.arange(MANY))
    for column in (0, 1):
        counts = np.bincount(geometry[:, column], minlength=2 * pad + 1)
        assert geometry[:, column].min() >= 0 and len(counts) == 2 * pad + 1
        expected = MANY / (2 * pad + 1)
        assert (np.abs(counts - expected) < 5 * np.sqrt(expected)).all()


# ---------------------------------------------------------------- through a real FFCV Loader


def _epoch(loader, timeout_seconds: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    """One pass as NHWC uint8 arrays (copied: FFCV reuses its buffers) and labels.

    Read in a thread with a timeout: when FFCV's loader thread dies (e.g. a numba compile
    error) the consumer would otherwise wait forever.
    """
    images, labels = [], []

    def read() -> None:
        for batch_images, batch_labels in loader:
            images.append(batch_images.permute(0, 2, 3, 1).numpy().copy())
            labels.append(batch_labels.numpy().copy())
        done.set()

    done = threading.Event()
    threading.Thread(target=read, daemon=True).start()
    if not done.wait(timeout_seconds):
        pytest.fail(f"the FFCV loader delivered no full pass in {timeout_seconds:.0f} s "
                    "(its thread died? see the captured stderr)")
    return np.stack(images), np.stack(labels)


def test_loader_compiles_after_augment_batch_with_a_writable_fill(tiny_dataset):
    from fastcifar.data.loaders import build_loaders

    writable = np.array([10, 20, 30], dtype=np.uint8)
    images = smooth_images(8)
    augment_batch(images, np.arange(8), FULL, 0, writable)
    # Building a Loader runs FFCV's in-place edit of numba's writable uint8[::1] type.
    loader = build_loaders(LoaderConfig(data_dir=tiny_dataset, batch_size=24, workers=2), FULL,
                           seed=0).train
    augment_batch(images, np.arange(8), FULL, 0, writable)
    images, labels = _epoch(loader)
    assert images.shape == (5, 24, 32, 32, 3) and labels.shape == (5, 24)


def test_loader_keeps_labels_and_repeats_batches_with_the_same_seed(tiny_dataset):
    from fastcifar.data.loaders import build_loaders, read_metadata

    config = LoaderConfig(data_dir=tiny_dataset, batch_size=24, workers=2)
    augment = dataclasses.replace(FULL, pad_mode=PadMode.reflect, cutout_count=2)
    plain_images, plain_labels = _epoch(build_loaders(config, None, seed=5).train)
    images, labels = _epoch(build_loaders(config, augment, seed=5).train)
    rerun_images, rerun_labels = _epoch(build_loaders(config, augment, seed=5).train)
    other_images, _ = _epoch(build_loaders(config, augment, seed=6).train)

    np.testing.assert_array_equal(rerun_images, images)
    np.testing.assert_array_equal(rerun_labels, labels)
    assert (other_images != images).any()
    # The order depends on the seed only, so the unaugmented loader shows which records each
    # batch holds; find them in the beton to get the indices FFCV passed to the kernel.
    records, record_labels = _beton_records(tiny_dataset)
    lookup = {record.tobytes(): index for index, record in enumerate(records)}
    fill = fill_colour(read_metadata(tiny_dataset).mean)
    for batch, plain, batch_labels in zip(images, plain_images, labels, strict=True):
        indices = np.array([lookup[image.tobytes()] for image in plain])
        np.testing.assert_array_equal(batch_labels, record_labels[indices])
        np.testing.assert_array_equal(batch, augment_batch(plain, indices, augment, 5, fill))
    np.testing.assert_array_equal(labels, plain_labels)
    assert (images != plain_images).any(axis=(2, 3, 4)).mean() > 0.9


def _beton_records(data_dir) -> tuple[np.ndarray, np.ndarray]:
    """All train records in file order through the unaugmented test-style pipeline."""
    from fastcifar.data.loaders import make_loader, read_metadata, test_pipeline

    metadata = read_metadata(data_dir)
    loader = make_loader(metadata.train_path, test_pipeline(),
                         LoaderConfig(data_dir=data_dir, batch_size=40, workers=1), False, None, 0)
    images, labels = _epoch(loader)
    images, labels = images.reshape(-1, 32, 32, 3), labels.reshape(-1)
    assert len({image.tobytes() for image in images}) == len(images)  # records are distinct
    return images, labels


# ---------------------------------------------------------------- rates and colour ops, measured


def test_jitter_gray_and_cutout_rates_measured_on_the_outputs():
    config = AugmentConfig(pad=0, flip=False, cutout_size=8, cutout_count=1, p_jitter=0.3,
                           brightness=0.4, p_gray=0.2)
    images = np.clip(smooth_images(MANY, seed=13), 1, 255)  # never the (0, 0, 0) fill
    out = augment_batch(images, np.arange(MANY), config, 7, np.zeros(3, np.uint8))
    hole = (out == 0).all(axis=3)
    assert hole.any(axis=(1, 2)).all()  # cutout: every image gets its hole
    kept = ~hole[..., None].repeat(3, axis=3)
    equal_channels = ((out[..., 0] == out[..., 1]) & (out[..., 1] == out[..., 2])) | hole
    gray = equal_channels.all(axis=(1, 2))
    assert abs(gray.mean() - 0.2) < 0.025
    # jittered: further than rounding from the image (or its grey version) outside the hole
    grey_source = np.floor(reference_grey(images.astype(np.float64)) + 0.5)
    unjittered = np.where(gray[:, None, None, None], grey_source[..., None], images)
    distance = np.where(kept, np.abs(out.astype(np.int16) - unjittered), 0).max(axis=(1, 2, 3))
    assert abs((distance >= 2).mean() - 0.3) < 0.03


def test_the_train_batches_do_not_depend_on_the_loader_thread_count(tiny_dataset):
    # What lets a run resume with another --workers (checkpoint._RESUMABLE_DIFFERENCES).
    from fastcifar.data.loaders import build_loaders

    augment = dataclasses.replace(FULL, pad_mode=PadMode.reflect, cutout_count=2)
    (images, labels), (other_images, other_labels) = (
        _epoch(build_loaders(LoaderConfig(data_dir=tiny_dataset, batch_size=24, workers=workers),
                             augment, seed=5).train) for workers in (1, 2))
    np.testing.assert_array_equal(other_images, images)
    np.testing.assert_array_equal(other_labels, labels)


def test_same_image_is_augmented_differently_each_epoch_through_the_loader(tiny_dataset):
    from fastcifar.data.loaders import build_loaders

    config = LoaderConfig(data_dir=tiny_dataset, batch_size=24, workers=2)
    augment = dataclasses.replace(FULL, flip=False)  # crop, cutout, jitter and gray
    augmented_loader = build_loaders(config, augment, seed=3).train
    plain_loader = build_loaders(config, None, seed=3).train  # shows each epoch's order
    records, _ = _beton_records(tiny_dataset)
    lookup = {record.tobytes(): index for index, record in enumerate(records)}
    by_epoch = []
    for _ in range(2):
        augmented, _ = _epoch(augmented_loader)
        plain, _ = _epoch(plain_loader)
        indices = [lookup[image.tobytes()] for image in plain.reshape(-1, 32, 32, 3)]
        by_epoch.append(dict(zip(indices, augmented.reshape(-1, 32, 32, 3), strict=True)))
    first, second = by_epoch
    assert set(first) == set(second) and len(first) == 120  # the same records, reordered
    assert all((first[index] != second[index]).any() for index in first)


@pytest.mark.parametrize("part, factor", [
    ("brightness", 0.6), ("brightness", 1.4), ("contrast", 0.6), ("contrast", 1.4),
    ("saturation", 0.5), ("saturation", 1.5), ("hue", 0.1), ("hue", -0.3), ("grayscale", None)])
def test_each_colour_op_matches_torchvision_within_one_grey_level(part, factor):
    import torch
    from torchvision.transforms.v2 import functional

    images = smooth_images(16, seed=14)
    geometry = np.zeros((16, 4 + 2 * MAX_CUTOUTS), np.int32)  # no crop offset, flip or hole
    colour = np.array([[1, 1, 1, 1, 0]] * 16, np.float32)  # jitter on, every factor neutral
    column = {"brightness": 1, "contrast": 2, "saturation": 3, "hue": 4}.get(part)
    if column is None:
        colour[:, 0], geometry[:, 3] = 0, 1  # grayscale alone
    else:
        colour[:, column] = factor
    out = apply_augmentation(images, np.empty_like(images), geometry, colour, 0, False, 0, 0,
                             FILL)
    tensors = torch.from_numpy(images).permute(0, 3, 1, 2)
    expected = {
        "brightness": lambda: functional.adjust_brightness(tensors, factor),
        "contrast": lambda: functional.adjust_contrast(tensors, factor),
        "saturation": lambda: functional.adjust_saturation(tensors, factor),
        "hue": lambda: functional.adjust_hue(tensors, factor),
        "grayscale": lambda: functional.rgb_to_grayscale(tensors, num_output_channels=3),
    }[part]().permute(0, 2, 3, 1).numpy()
    difference = np.abs(out.astype(np.int16) - expected.astype(np.int16))
    assert difference.max() <= 1, part
    assert (out != images).mean() > 0.3  # the op did change the images


# ---------------------------------------------------------------- alternating flip


ALTERNATE = AugmentConfig(pad=0, flip=True, flip_alternate=True, cutout_size=0, cutout_count=0)


def _flipped(out: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Which outputs are their image mirrored (asserting each is the image or its mirror)."""
    mirrored = (out == images[:, :, ::-1]).all(axis=(1, 2, 3))
    assert (mirrored | (out == images).all(axis=(1, 2, 3))).all()
    return mirrored


def test_alternating_flip_mirrors_half_then_flips_each_image_every_epoch():
    images = random_images(MANY, seed=21)
    indices = np.arange(MANY) * 7 + 3  # any sample indices
    flips = [_flipped(augment_batch(images, indices, ALTERNATE, 4, FILL, epoch=epoch), images)
             for epoch in range(3)]
    assert abs(flips[0].mean() - 0.5) < 0.05
    np.testing.assert_array_equal(flips[1], ~flips[0])  # every image the other way
    np.testing.assert_array_equal(flips[2], flips[0])
    # A sample's flip depends on the sample and the epoch, not on its batch or position.
    order = np.random.default_rng(0).permutation(MANY)[:100]
    shuffled = augment_batch(images[order], indices[order], ALTERNATE, 4, FILL, epoch=1)
    np.testing.assert_array_equal(_flipped(shuffled, images[order]), flips[1][order])


def test_alternating_flip_follows_the_epoch_through_the_loader_and_a_resume(tiny_dataset):
    from fastcifar.data.loaders import build_loaders

    config = LoaderConfig(data_dir=tiny_dataset, batch_size=24, workers=2)
    records, _ = _beton_records(tiny_dataset)
    lookup = {record.tobytes(): index for index, record in enumerate(records)}

    def flips(loaders, epoch: int) -> dict[int, bool]:
        images, _ = _epoch(loaders.train_epoch(epoch))
        seen = {}
        for image in images.reshape(-1, 32, 32, 3):
            if image.tobytes() in lookup:
                seen[lookup[image.tobytes()]] = False
            else:
                seen[lookup[image[:, ::-1].tobytes()]] = True
        return seen

    loaders = build_loaders(config, ALTERNATE, seed=3)
    first, second = flips(loaders, 0), flips(loaders, 1)
    assert len(first) == len(second) == 120
    assert 0.3 < np.mean(list(first.values())) < 0.7
    assert all(second[index] != first[index] for index in first)
    resumed = build_loaders(config, ALTERNATE, seed=3)  # a new process resuming at epoch 2
    assert flips(resumed, 2) == first


# ---------------------------------------------------------------- progressive resizing


@pytest.mark.parametrize("size", [8, 16, 20, 24, 28])
def test_resized_crops_are_torch_antialiased_bilinear_of_the_full_size_crops(size):
    import torch

    images = smooth_images(64, seed=5)
    full = augment_batch(images, np.arange(64), GEOMETRY_ONLY_NO_HOLES, 2, FILL)
    small = augment_batch(images, np.arange(64), GEOMETRY_ONLY_NO_HOLES, 2, FILL, size=size)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(full).permute(0, 3, 1, 2).float(), size=(size, size),
        mode="bilinear", antialias=True, align_corners=False).permute(0, 2, 3, 1).numpy()
    assert small.shape == (64, size, size, 3)
    assert np.abs(small - expected).max() <= 0.5 + 1e-3  # rounded to the nearest grey level


def test_resized_crops_keep_a_flat_image_flat_and_scale_the_holes():
    flat = np.full((16, 32, 32, 3), 90, dtype=np.uint8)
    config = AugmentConfig(pad=0, flip=True, cutout_size=16, cutout_count=1)
    fill = np.array([0, 0, 0], dtype=np.uint8)
    small = augment_batch(flat, np.arange(16), config, 4, fill, size=16)
    holes = (small == 0).all(axis=3)
    assert set(np.unique(small)) == {0, 90}
    assert 0 < holes.sum(axis=(1, 2)).max() <= 8 * 8  # a 16 px hole at 32 is 8 px at 16
    assert holes.sum(axis=(1, 2)).max() == 64  # some hole lies wholly inside


def test_resample_table_weights_sum_to_one_and_stay_inside_the_image():
    from fastcifar.data.augment import resample_table

    for size in (8, 20, 24, 28):
        first, weights = resample_table(32, size)
        np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)
        last_used = first + np.array([np.flatnonzero(row).max() for row in weights])
        assert first.min() >= 0 and last_used.max() <= 31


def test_loader_yields_each_epochs_side_and_recompiles_only_when_it_changes(tiny_dataset):
    from fastcifar.data.loaders import build_loaders

    loaders = build_loaders(LoaderConfig(data_dir=tiny_dataset, batch_size=24, workers=2),
                            GEOMETRY_ONLY, seed=1)
    compiles = []
    original = loaders.train.generate_code

    def counting_generate_code():
        compiles.append(True)
        return original()

    loaders.train.generate_code = counting_generate_code
    sides = []
    for epoch, size in enumerate([20, 20, 28, 32, 32]):
        images, _ = _epoch(loaders.train_epoch(epoch, size))
        sides.append(images.shape[2:4])
    assert sides == [(20, 20), (20, 20), (28, 28), (32, 32), (32, 32)]
    assert len(compiles) == 3  # 32 (built) -> 20, 20 -> 28, 28 -> 32
    # The same draws as augment_batch at that side: resizing keeps the seed's batches.
    records, _ = _beton_records(tiny_dataset)
    plain, _ = _epoch(build_loaders(LoaderConfig(data_dir=tiny_dataset, batch_size=24,
                                                 workers=2), None, seed=1).train)
    lookup = {record.tobytes(): index for index, record in enumerate(records)}
    resized, _ = _epoch(loaders.train_epoch(0, 24))
    from fastcifar.data.loaders import read_metadata

    fill = fill_colour(read_metadata(tiny_dataset).mean)
    for batch, plain_batch in zip(resized, plain, strict=True):
        indices = np.array([lookup[image.tobytes()] for image in plain_batch])
        np.testing.assert_array_equal(
            batch, augment_batch(plain_batch, indices, GEOMETRY_ONLY, 1, fill, size=24))
