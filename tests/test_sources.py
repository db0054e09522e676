"""ImageFolder trees and archives as users have them: linked class folders and images, hidden
folders, names that are not UTF-8, unreadable files and 16-bit grey images."""

from __future__ import annotations

import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_CLASSES, write_imagefolder
from fastcifar.data.sources import read_source
from fastcifar.errors import FastCifarError


def test_a_symlinked_class_folder_is_read_like_any_other(tmp_path):
    root = write_imagefolder(tmp_path / "src", per_class_train=3, per_class_test=2)
    extra = write_imagefolder(tmp_path / "elsewhere", per_class_train=4, per_class_test=1,
                              classes=["zebra"])
    for split in ("train", "test"):
        (root / split / "zebra").symlink_to(extra / split / "zebra", target_is_directory=True)
    (root / "train" / TINY_CLASSES[0] / "loop").symlink_to(root, target_is_directory=True)
    data = read_source(root)
    assert data.class_names == [*TINY_CLASSES, "zebra"]
    assert np.bincount(data.train.labels).tolist() == [3, 3, 3, 4]  # the loop adds nothing
    assert np.bincount(data.test.labels).tolist() == [2, 2, 2, 1]
    # A second name for a class folder is a class of its own, as a person browsing sees it
    # (whichever of the two the disk listed first was kept, the other dropped).
    for split in ("train", "test"):
        (root / split / "aardvark").symlink_to(root / split / TINY_CLASSES[1])
    data = read_source(root)
    assert data.class_names == ["aardvark", *TINY_CLASSES, "zebra"]
    assert np.bincount(data.train.labels).tolist() == [3, 3, 3, 3, 4]


def test_hidden_folders_are_no_classes(tmp_path):
    root = write_imagefolder(tmp_path / "src", per_class_train=3, per_class_test=2)
    for split in ("train", "test"):
        hidden = root / split / ".ipynb_checkpoints"
        hidden.mkdir()
        Image.new("RGB", (32, 32)).save(hidden / "0000-checkpoint.png")
    (root / "train" / ".empty-hidden").mkdir()
    for source in (root, _archive(root, tmp_path / "src.tar.gz")):
        data = read_source(source)
        assert data.class_names == TINY_CLASSES and len(data.train.labels) == 9, source


def test_hardlinked_and_symlinked_images_in_an_archive_count_as_in_the_folder(tmp_path):
    root = write_imagefolder(tmp_path / "src", per_class_train=3, per_class_test=2)
    folder = root / "train" / TINY_CLASSES[1]
    os.link(folder / "0000.png", folder / "0100.png")
    (folder / "0101.png").symlink_to("0001.png")
    from_folder = read_source(root)
    from_archive = read_source(_archive(root, tmp_path / "src.tar.gz"))
    assert len(from_folder.train.labels) == len(from_archive.train.labels) == 11
    np.testing.assert_array_equal(from_folder.train.images, from_archive.train.images)


def test_an_archive_link_to_a_missing_member_is_one_line(tmp_path):
    root = write_imagefolder(tmp_path / "src", per_class_train=2, per_class_test=2)
    archive = tmp_path / "src.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(root, arcname="src")
        link = tarfile.TarInfo("src/train/apple/9999.png")
        link.type, link.linkname = tarfile.SYMTYPE, "../../outside.png"
        tar.addfile(link)
    with pytest.raises(FastCifarError, match=r"9999\.png links to \.\./\.\./outside\.png, which "
                                             r"is not in the archive"):
        read_source(archive)


def test_a_file_name_that_is_not_utf8_is_read(tmp_path):
    root = write_imagefolder(tmp_path / "src", per_class_train=2, per_class_test=2)
    folder = os.fsencode(root / "train" / TINY_CLASSES[2])
    os.rename(folder + b"/0000.png", folder + b"/caf\xe9.png")  # Latin-1, not UTF-8
    data = read_source(root)  # a UnicodeEncodeError traceback before
    assert len(data.train.labels) == 6


def test_an_unreadable_image_is_one_line_naming_it(tmp_path, monkeypatch):
    root = write_imagefolder(tmp_path / "src", per_class_train=2, per_class_test=2)
    locked = root / "train" / TINY_CLASSES[0] / "0001.png"
    real = type(locked).read_bytes

    def read_bytes(path):  # chmod 000 does not stop root, who runs the tests in CI
        if path == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(type(locked), "read_bytes", read_bytes)
    with pytest.raises(FastCifarError, match=f"cannot read {locked}: Permission denied$"):
        read_source(root)


def test_fix_images_scales_16_bit_grey_to_8_bits(tmp_path):
    root = write_imagefolder(tmp_path / "src", per_class_train=2, per_class_test=2)
    grey = root / "test" / TINY_CLASSES[0] / "0000.png"
    Image.fromarray(np.full((64, 64), 30000, np.uint16)).save(grey)  # 46% grey, 16 bits
    with pytest.raises(FastCifarError, match="is 64x64"):
        read_source(root)
    data = read_source(root, fix_images=True)
    index = _index_of(data.test.images, 30000 >> 8)
    assert (data.test.images[index] == 30000 >> 8).all()  # 255 (white) before


def _index_of(images: np.ndarray, value: int) -> int:
    (found,) = [i for i, image in enumerate(images) if (image == value).all()]
    return found


def _archive(root, path):
    with tarfile.open(path, "w:gz") as tar:
        tar.add(root, arcname=root.name)
    return path
