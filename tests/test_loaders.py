"""Loaders: shapes, dtypes and layout, subsets, augmentation changes pixels not labels, checks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import logits_of_two_test_passes
from fastcifar.config import NO_AUGMENT, AugmentConfig, LoaderConfig
from fastcifar.data.augment import fill_colour
from fastcifar.data.convert import METADATA, TRAIN_BETON
from fastcifar.data.loaders import build_loaders, read_metadata
from fastcifar.device import DeviceStep
from fastcifar.errors import FastCifarError


def _records(data_dir, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Every record of a split in file order, (N, 32, 32, 3) uint8 and labels, read with a
    plain sequential FFCV loader: the truth the loaders under test are checked against."""
    from fastcifar.data.loaders import make_loader, test_pipeline

    metadata = read_metadata(data_dir)
    path = metadata.train_path if split == "train" else metadata.test_path
    loader = make_loader(path, test_pipeline(), LoaderConfig(data_dir=data_dir, workers=1),
                         False, None, 0, batch_size=1000)
    images, labels = zip(*[(x.permute(0, 2, 3, 1).numpy().copy(), y.numpy().copy())
                           for x, y in loader], strict=True)
    return np.concatenate(images), np.concatenate(labels)


def _as_rows(images: np.ndarray) -> list[bytes]:
    return sorted(image.tobytes() for image in images)


def test_train_and_test_batches_are_uint8_nchw_channels_last(tiny_dataset):
    loaders = build_loaders(LoaderConfig(data_dir=tiny_dataset, batch_size=32, workers=1),
                            AugmentConfig(), seed=0)
    images, labels = next(iter(loaders.train))
    assert images.dtype == torch.uint8 and images.shape == (32, 3, 32, 32)
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.int64 and labels.shape == (32,)
    assert len(loaders.train) == 120 // 32  # drop_last
    # Every test image, in file order, each with its own label.
    test_images, test_labels = _records(tiny_dataset, "test")
    batches = [(x.permute(0, 2, 3, 1).numpy().copy(), y.numpy().copy()) for x, y in loaders.test]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in batches]), test_images)
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), test_labels)


def test_subsets_take_the_first_records(tiny_dataset):
    loaders = build_loaders(LoaderConfig(data_dir=tiny_dataset, batch_size=16, workers=1,
                                         train_subset=48, test_subset=20), NO_AUGMENT, 0)
    assert len(loaders.train) == 3
    train_images, train_labels = _records(tiny_dataset, "train")
    test_images, test_labels = _records(tiny_dataset, "test")
    got = [(x.permute(0, 2, 3, 1).numpy().copy(), y.numpy().copy()) for x, y in loaders.train]
    images, labels = np.concatenate([x for x, _ in got]), np.concatenate([y for _, y in got])
    assert _as_rows(images) == _as_rows(train_images[:48])  # the first 48, shuffled
    lookup = {image.tobytes(): label for image, label in zip(train_images, train_labels,
                                                               strict=True)}
    assert [lookup[image.tobytes()] for image in images] == labels.tolist()
    test = [(x.permute(0, 2, 3, 1).numpy().copy(), y.numpy().copy()) for x, y in loaders.test]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in test]), test_images[:20])
    np.testing.assert_array_equal(np.concatenate([y for _, y in test]), test_labels[:20])


def test_augmentation_changes_pixels_but_never_labels(tiny_dataset):
    def epoch(augment):
        loaders = build_loaders(LoaderConfig(data_dir=tiny_dataset, batch_size=40, workers=1),
                                augment, seed=3)
        batches = [(x.permute(0, 2, 3, 1).numpy().copy(), y.clone()) for x, y in loaders.train]
        return np.concatenate([x for x, _ in batches]), torch.cat([y for _, y in batches])

    plain_images, plain_labels = epoch(NO_AUGMENT)
    holes_only = AugmentConfig(pad=0, flip=False, cutout_size=8, cutout_count=1)
    augmented_images, augmented_labels = epoch(holes_only)
    # same seed -> same order, so labels line up one to one
    assert torch.equal(plain_labels, augmented_labels)
    fill = fill_colour(read_metadata(tiny_dataset).mean)
    for plain, augmented in zip(plain_images, augmented_images, strict=True):
        changed = (plain != augmented).any(axis=2)
        rows, columns = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
        assert len(rows) and len(columns)  # every image gets its hole
        # The same image, changed only inside one hole of at most 8 x 8, filled with the fill.
        assert rows[-1] - rows[0] < 8 and columns[-1] - columns[0] < 8
        hole = augmented[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1]
        assert (hole == fill).all()


def test_device_step_normalises_on_the_device():
    images = torch.full((2, 3, 32, 32), 100, dtype=torch.uint8)
    step = DeviceStep([100.0, 50.0, 0.0], [1.0, 10.0, 50.0], torch.device("cpu"), True)
    floats, labels = step(images, torch.tensor([1, 2]))
    assert floats.dtype == torch.float32
    assert floats.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(floats[0, :, 0, 0].numpy(), [0.0, 5.0, 2.0], rtol=1e-6)
    assert labels.tolist() == [1, 2]


def test_missing_dataset_says_run_convert_first(tmp_path):
    with pytest.raises(FastCifarError, match="run `fastcifar convert` first"):
        read_metadata(tmp_path)


def test_truncated_beton_is_rejected(tiny_dataset, tmp_path):
    copy = shutil.copytree(tiny_dataset, tmp_path / "data")
    beton = copy / TRAIN_BETON
    beton.write_bytes(beton.read_bytes()[:-100])
    with pytest.raises(FastCifarError, match="truncated"):
        read_metadata(copy)


def test_metadata_that_does_not_match_its_betons_is_rejected(tiny_dataset, tmp_path):
    copy = shutil.copytree(tiny_dataset, tmp_path / "data")
    metadata = json.loads((copy / METADATA).read_text())
    metadata["counts"]["train"] = 999
    (copy / METADATA).write_text(json.dumps(metadata))
    with pytest.raises(FastCifarError, match="holds 120 records"):
        read_metadata(copy)


@pytest.mark.parametrize("change, problem", [
    ({"betons": {"train": {"file": "cifar10_train.beton", "bytes": 1}}}, "betons.test is not"),
    ({"betons": []}, "betons.train is not a file name"),
    ({"counts": {"train": 120}}, "counts.test is not a count"),
    ({"mean": "grey"}, "mean is not 3 pixel values"),
    ({"mean": [1.0, 2.0]}, "mean is not 3 pixel values"),
    ({"class_names": ["a", "a", "b"]}, "class_names is not a list of distinct names"),
    ({"format_version": True}, "format_version is not a whole number"),
    ({"std": None}, "std is not 3 pixel values"),
])
def test_metadata_of_the_wrong_shape_is_refused_in_one_line(tiny_dataset, tmp_path, change,
                                                            problem):
    # A valid JSON file of another shape gave a KeyError or TypeError traceback in every
    # command that reads --data.
    copy = shutil.copytree(tiny_dataset, tmp_path / "data")
    metadata = json.loads((copy / METADATA).read_text())
    (copy / METADATA).write_text(json.dumps({**metadata, **change}))
    with pytest.raises(FastCifarError, match=f"corrupt metadata file .*{problem}") as refused:
        read_metadata(copy)
    assert "\n" not in str(refused.value)


def test_convert_redoes_metadata_of_the_wrong_shape(tiny_dataset, tiny_imagefolder, tmp_path):
    # Its is-it-up-to-date check gave an AttributeError traceback on these.
    from fastcifar.config import ConvertConfig
    from fastcifar.data.convert import convert

    copy = shutil.copytree(tiny_dataset, tmp_path / "data")
    metadata = json.loads((copy / METADATA).read_text())
    for damaged in ({**metadata, "betons": []}, {**metadata, "source": None}, None):
        (copy / METADATA).write_text(json.dumps(damaged))
        assert not convert(ConvertConfig(source=tiny_imagefolder, out_dir=copy)).skipped
        assert read_metadata(copy).train_count == 120


def test_a_beton_whose_index_records_another_image_size_is_rejected(tiny_dataset, tmp_path):
    # The right size, one record's height damaged: a 120-line TypeError traceback before.
    from ffcv.reader import Reader
    from ffcv.types import HeaderType

    copy = shutil.copytree(tiny_dataset, tmp_path / "data")
    beton = copy / TRAIN_BETON
    reader = Reader(str(beton))
    records = reader.metadata.copy()
    records["f0"]["height"][0] = 64
    with open(beton, "r+b") as handle:  # the index follows the header and field descriptors
        handle.seek(HeaderType.itemsize + reader.field_descriptors.nbytes)
        handle.write(records.tobytes())
    with pytest.raises(FastCifarError, match="images that are not 32x32 .*convert --force"):
        read_metadata(copy)


def test_subset_and_batch_size_larger_than_data_are_rejected(tiny_dataset):
    with pytest.raises(FastCifarError, match="larger than the 120 train"):
        build_loaders(LoaderConfig(data_dir=tiny_dataset, train_subset=500), NO_AUGMENT, 0)
    with pytest.raises(FastCifarError, match="batch size 512"):
        build_loaders(LoaderConfig(data_dir=tiny_dataset, batch_size=512), NO_AUGMENT, 0)


def test_beton_with_other_fields_is_rejected(tiny_dataset, tmp_path):
    from ffcv.fields import FloatField, IntField
    from ffcv.writer import DatasetWriter

    copy = shutil.copytree(tiny_dataset, tmp_path / "data")
    metadata = json.loads((copy / METADATA).read_text())
    beton = copy / metadata["betons"]["train"]["file"]
    beton.unlink()
    writer = DatasetWriter(str(beton), {"value": FloatField(), "label": IntField()}, num_workers=1)
    writer.from_indexed_dataset([(float(i), i % 3) for i in range(120)])
    metadata["betons"]["train"]["bytes"] = beton.stat().st_size
    (copy / METADATA).write_text(json.dumps(metadata))
    with pytest.raises(FastCifarError, match="expected image and label"):
        read_metadata(copy)


def test_first_train_images_are_the_same_on_every_torchrun_rank(tiny_dataset, monkeypatch):
    import dataclasses

    import fastcifar.data.loaders as loaders_module

    config = LoaderConfig(data_dir=tiny_dataset, batch_size=8, workers=1)
    loaders = build_loaders(config, NO_AUGMENT, seed=0)
    step = DeviceStep(loaders.metadata.mean, loaders.metadata.std, torch.device("cpu"), False)
    expected = loaders_module.first_train_images(loaders, config, 0, step, count=20)
    seen = []
    real_make_loader = loaders_module.make_loader

    def make_loader(path, pipeline, loader_config, train, indices, seed):
        seen.append(loader_config.distributed)  # a sharded loader would give each rank its own
        return real_make_loader(path, pipeline, dataclasses.replace(loader_config,
                                distributed=False), train, indices, seed)

    monkeypatch.setattr(loaders_module, "make_loader", make_loader)
    ranked = dataclasses.replace(config, distributed=True)
    images = loaders_module.first_train_images(loaders, ranked, 0, step, count=20)
    assert seen == [False] and torch.equal(images, expected) and images.shape[0] == 20


def test_two_evaluations_through_the_real_test_loader_give_identical_logits_on_cpu(tiny_dataset):
    """The CPU twin of the CUDA test: FFCV reuses its batch buffers several batches ahead, so
    a pass that read a buffer being refilled would not repeat itself."""
    first, second, count = logits_of_two_test_passes(tiny_dataset, torch.device("cpu"), 2)
    assert first.shape[0] == count
    assert torch.equal(first, second)
