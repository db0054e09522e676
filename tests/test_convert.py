"""convert: exact round-trip through the betons, metadata, freshness, and rejected input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REAL_DATA, TINY_CLASSES, write_imagefolder, write_official_archive
from fastcifar.config import ConvertConfig
from fastcifar.data.convert import METADATA, TEST_BETON, TRAIN_BETON, convert
from fastcifar.data.sources import read_source
from fastcifar.errors import FastCifarError


def read_beton(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """All records of a beton in file order, without augmentation."""
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    loader = Loader(str(path), batch_size=64, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
    images, labels = zip(*[(x.copy(), y.copy()) for x, y in loader], strict=True)
    return np.concatenate(images), np.concatenate(labels).ravel()


def test_convert_round_trip_official_archive_is_exact(tmp_path):
    train, test = write_official_archive(tmp_path / "src" / "cifar-10-python-small.tar.gz")
    result = convert(ConvertConfig(source=tmp_path / "src" / "cifar-10-python-small.tar.gz",
                                   out_dir=tmp_path / "out"))
    images, labels = read_beton(result.train_path)
    np.testing.assert_array_equal(images, train["images"])
    np.testing.assert_array_equal(labels, train["labels"])
    images, labels = read_beton(result.test_path)
    np.testing.assert_array_equal(images, test["images"])
    np.testing.assert_array_equal(labels, test["labels"])
    assert result.metadata["counts"] == {"train": 100, "test": 20}
    assert result.metadata["source"]["kind"] == "official_archive"


def test_convert_round_trip_imagefolder_is_exact(tiny_imagefolder, tmp_path):
    result = convert(ConvertConfig(source=tiny_imagefolder, out_dir=tmp_path))
    for split, beton in (("train", result.train_path), ("test", result.test_path)):
        images, labels = read_beton(beton)
        # each PNG, read here with Pillow, is stored once, pixel for pixel, with the label of
        # its class folder (classes in name order)
        expected = sorted((np.asarray(Image.open(path).convert("RGB")).tobytes(), label)
                          for label, name in enumerate(TINY_CLASSES)
                          for path in (tiny_imagefolder / split / name).glob("*.png"))
        stored = sorted((image.tobytes(), int(label))
                        for image, label in zip(images, labels, strict=True))
        assert stored == expected, split


def test_convert_writes_metadata_with_counts_and_statistics(tiny_dataset):
    metadata = json.loads((tiny_dataset / METADATA).read_text())
    assert metadata["class_names"] == TINY_CLASSES
    assert metadata["counts"] == {"train": 120, "test": 60}
    assert metadata["counts_per_class"]["train"] == {name: 40 for name in TINY_CLASSES}
    source = read_source(Path(metadata["source"]["path"]))
    expected_mean = source.train.images.reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(metadata["mean"], expected_mean, rtol=1e-9)
    np.testing.assert_allclose(metadata["std"], source.train.images.reshape(-1, 3).std(axis=0),
                               rtol=1e-6)
    assert {"ffcv", "numpy", "torch"} <= set(metadata["versions"])
    assert len(metadata["source"]["sha256"]) == 64


def test_imagefolder_subset_holds_every_class(tiny_imagefolder):
    labels = read_source(tiny_imagefolder).train.labels
    assert set(labels[:30]) == {0, 1, 2}


def test_convert_skips_when_fresh_and_redoes_with_force(tiny_imagefolder, tmp_path):
    first = convert(ConvertConfig(source=tiny_imagefolder, out_dir=tmp_path))
    written = (tmp_path / TRAIN_BETON).stat().st_mtime_ns
    second = convert(ConvertConfig(source=tiny_imagefolder, out_dir=tmp_path))
    assert not first.skipped and second.skipped
    assert (tmp_path / TRAIN_BETON).stat().st_mtime_ns == written
    third = convert(ConvertConfig(source=tiny_imagefolder, out_dir=tmp_path, force=True))
    assert not third.skipped
    assert (tmp_path / TRAIN_BETON).stat().st_mtime_ns != written


def test_a_folder_replaced_by_a_copy_with_older_times_is_converted_again(tmp_path):
    # `cp -a` / `tar x` keep the files' times: comparing the newest with the metadata's time
    # kept the first tree's betons for the second tree.
    import os
    import shutil

    source = write_imagefolder(tmp_path / "src", per_class_train=3, per_class_test=2)
    first = convert(ConvertConfig(source=source, out_dir=tmp_path / "out"))
    shutil.rmtree(source)
    write_imagefolder(source, per_class_train=3, per_class_test=2, classes=[*TINY_CLASSES, "date"])
    for path in source.rglob("*"):
        os.utime(path, ns=(1, 1))  # long before the first conversion
    second = convert(ConvertConfig(source=source, out_dir=tmp_path / "out"))
    assert first.metadata["class_names"] == TINY_CLASSES and not second.skipped
    assert second.metadata["class_names"] == [*TINY_CLASSES, "date"]
    assert convert(ConvertConfig(source=source, out_dir=tmp_path / "out")).skipped
    os.utime(next(source.rglob("*.png")))  # touched: read again, as before
    assert not convert(ConvertConfig(source=source, out_dir=tmp_path / "out")).skipped
    # a tree one folder down in the folder given is skipped too (its path was compared)
    nested = write_imagefolder(tmp_path / "outer" / "cifar", per_class_train=2, per_class_test=1)
    first = convert(ConvertConfig(source=nested.parent, out_dir=tmp_path / "nested"))
    assert first.metadata["source"]["path"] == str(nested) and not first.skipped
    assert convert(ConvertConfig(source=nested.parent, out_dir=tmp_path / "nested")).skipped


def test_images_that_cannot_be_normalised_are_refused_before_writing(tmp_path):
    # A channel with one value everywhere has std 0: the metadata was written, then refused by
    # every reader, and `convert --force` wrote it again.
    root = write_imagefolder(tmp_path / "src", per_class_train=2, per_class_test=1)
    for image in root.rglob("*.png"):
        Image.new("RGB", (32, 32), (10, 120, 200)).save(image)
    with pytest.raises(FastCifarError, match=r"std is not 3 pixel values in 0\.001\.\.255 .*"
                                             r"cannot be normalised"):
        convert(ConvertConfig(source=root, out_dir=tmp_path / "out"))
    assert not (tmp_path / "out" / METADATA).exists() and not (tmp_path / "out" / TRAIN_BETON).exists()


def test_convert_redoes_when_a_beton_is_truncated(tiny_imagefolder, tmp_path):
    convert(ConvertConfig(source=tiny_imagefolder, out_dir=tmp_path))
    beton = tmp_path / TEST_BETON
    beton.write_bytes(beton.read_bytes()[:1000])
    assert not convert(ConvertConfig(source=tiny_imagefolder, out_dir=tmp_path)).skipped


def test_convert_rejects_truncated_archive(tmp_path):
    archive = tmp_path / "cifar-small.tar.gz"
    write_official_archive(archive)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(FastCifarError, match="corrupt or truncated archive"):
        convert(ConvertConfig(source=archive, out_dir=tmp_path / "out"))
    assert not list((tmp_path / "out").glob("*.beton"))
    empty = tmp_path / "empty.tar.gz"
    empty.write_bytes(b"")
    with pytest.raises(FastCifarError, match="corrupt or truncated archive") as refused:
        convert(ConvertConfig(source=empty, out_dir=tmp_path / "out"))
    assert "\n" not in str(refused.value)  # tarfile lists every method it tried, a line each


def test_convert_rejects_official_name_with_wrong_md5(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    write_official_archive(archive)
    with pytest.raises(FastCifarError, match="md5"):
        convert(ConvertConfig(source=archive, out_dir=tmp_path / "out"))


class _RunsCode:
    """Unpickling this calls open(marker, "w"): the file appears if anything unpickles it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("payload", ["code", "list", "no labels"])
def test_convert_refuses_a_batch_that_is_not_cifar_data_and_keeps_the_earlier_dataset(
        tmp_path, tiny_imagefolder, payload):
    import pickle

    out = tmp_path / "out"
    convert(ConvertConfig(source=tiny_imagefolder, out_dir=out))
    before = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    folder = tmp_path / "src" / "cifar-10-batches-py"
    write_official_archive(tmp_path / "src" / "cifar-small.tar.gz")
    marker = tmp_path / "ran"
    batch = {"code": {b"data": _RunsCode(marker), b"labels": [0]}, "list": [1, 2],
             "no labels": {b"data": np.zeros((1, 3072), np.uint8)}}[payload]
    (folder / "data_batch_3").write_bytes(pickle.dumps(batch))
    message = {"code": r"corrupt CIFAR-10 batch data_batch_3: it names (io|builtins)\.open.*could run code",
               "list": "holds a list, not a dict", "no labels": "not the CIFAR-10 batch layout"}
    with pytest.raises(FastCifarError, match=message[payload]):
        convert(ConvertConfig(source=folder, out_dir=out, force=True))
    assert not marker.exists()  # the payload never ran
    assert {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()} == before


def test_convert_rejects_wrong_image_size_naming_the_file(tmp_path):
    root = write_imagefolder(tmp_path / "src", per_class_train=3, per_class_test=2)
    bad = root / "train" / TINY_CLASSES[0] / "0001.png"
    Image.new("RGB", (40, 40)).save(bad)
    with pytest.raises(FastCifarError, match="0001.png is 40x40"):
        convert(ConvertConfig(source=root, out_dir=tmp_path / "out"))
    assert not (tmp_path / "out" / METADATA).exists()
    fixed = convert(ConvertConfig(source=root, out_dir=tmp_path / "out", fix_images=True))
    assert fixed.metadata["counts"]["train"] == 9


def test_convert_rejects_grayscale_unless_asked(tmp_path):
    root = write_imagefolder(tmp_path / "src", per_class_train=3, per_class_test=2)
    Image.new("L", (32, 32), 128).save(root / "test" / TINY_CLASSES[1] / "0000.png")
    with pytest.raises(FastCifarError, match="mode L"):
        convert(ConvertConfig(source=root, out_dir=tmp_path / "out"))
    result = convert(ConvertConfig(source=root, out_dir=tmp_path / "out", fix_images=True))
    assert result.metadata["counts"]["test"] == 6


def test_convert_rejects_non_image_file(tmp_path):
    root = write_imagefolder(tmp_path / "src", per_class_train=3, per_class_test=2)
    (root / "train" / TINY_CLASSES[2] / "0002.png").write_bytes(b"not an image")
    with pytest.raises(FastCifarError, match="not a readable image"):
        convert(ConvertConfig(source=root, out_dir=tmp_path / "out"))


def test_convert_refuses_an_image_too_large_to_decode(tmp_path, monkeypatch):
    # Pillow's DecompressionBombError is not an OSError: it gave a traceback.
    from PIL import Image as PILImage

    root = write_imagefolder(tmp_path / "src", per_class_train=3, per_class_test=2)
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)  # a 32x32 image counts as a bomb
    with pytest.raises(FastCifarError, match="is too large to decode"):
        convert(ConvertConfig(source=root, out_dir=tmp_path / "out"))


def test_convert_rejects_folder_without_splits_and_empty_class(tmp_path):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FastCifarError, match="not a CIFAR-10 source"):
        convert(ConvertConfig(source=tmp_path / "nothing", out_dir=tmp_path / "out"))
    root = write_imagefolder(tmp_path / "src", per_class_train=2, per_class_test=2)
    (root / "train" / "empty").mkdir()
    with pytest.raises(FastCifarError, match="holds no images"):
        convert(ConvertConfig(source=root, out_dir=tmp_path / "out"))


def test_convert_offline_without_source_says_how_to_pass_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FastCifarError, match="--source"):
        convert(ConvertConfig(out_dir=tmp_path / "out", download=False))


def test_convert_reports_unwritable_output_even_as_root(tiny_imagefolder, tmp_path):
    # No permission bits (root, as CI runs, ignores them): places that cannot be written.
    out_file = tmp_path / "out-is-a-file"
    out_file.write_text("x")
    with pytest.raises(FastCifarError, match="cannot write to .*out-is-a-file"):
        convert(ConvertConfig(source=tiny_imagefolder, out_dir=out_file))
    taken = tmp_path / "beton-is-a-folder"
    (taken / TRAIN_BETON).mkdir(parents=True)
    with pytest.raises(FastCifarError, match=f"{TRAIN_BETON} is not a file: move it away"):
        convert(ConvertConfig(source=tiny_imagefolder, out_dir=taken))
    assert not (taken / METADATA).exists() and not list(taken.glob(".*.tmp"))


def test_convert_reports_output_path_that_is_a_file(tiny_imagefolder, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(FastCifarError, match="cannot write"):
        convert(ConvertConfig(source=tiny_imagefolder, out_dir=blocker / "out"))


@pytest.mark.realdata
@pytest.mark.skipif(not REAL_DATA.exists(), reason="real CIFAR-10 JPEG copy not present")
def test_convert_real_jpeg_copy_has_all_records(real_dataset):
    # real_dataset is the real copy as `convert` wrote it (once for the whole suite).
    metadata = json.loads((real_dataset / METADATA).read_text())
    assert metadata["counts"] == {"train": 50_000, "test": 10_000}
    assert set(metadata["counts_per_class"]["train"].values()) == {5000}
    assert set(metadata["counts_per_class"]["test"].values()) == {1000}
    assert metadata["class_names"][:3] == ["airplane", "automobile", "bird"]


@pytest.mark.parametrize("labels, message", [
    ([10] + [0] * 19, r"\(data_batch_1\.\.data_batch_5\): labels 0\.\.10, but 10 class names allow 0\.\.9"),
    ([-1] + [0] * 19, r"labels -1\.\.9,"),
    ([0] * 21, "100 images and 101 labels"),
    ([0.5] * 20, "float64 labels, not class indices"),
])
def test_bad_labels_are_refused_before_an_earlier_conversion_is_touched(tmp_path, labels,
                                                                       message):
    # FFCV's writer processes died on such labels and left convert waiting forever, after
    # the earlier conversion's metadata was gone.
    import pickle

    write_official_archive(tmp_path / "src" / "cifar-small.tar.gz")
    folder = tmp_path / "src" / "cifar-10-batches-py"
    out = tmp_path / "data"
    convert(ConvertConfig(source=folder, out_dir=out))
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    batch = pickle.loads((folder / "data_batch_3").read_bytes())
    (folder / "data_batch_3").write_bytes(pickle.dumps({**batch, b"labels": labels}))
    with pytest.raises(FastCifarError, match=message):
        convert(ConvertConfig(source=folder, out_dir=out, force=True))
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
