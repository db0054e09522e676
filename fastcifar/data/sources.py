"""Read CIFAR-10 from the official archive, its extracted folder or an ImageFolder tree (or .tar.gz).

Every reader returns the same plain arrays, so `convert` never cares where the images came from.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fastcifar.errors import FastCifarError

OFFICIAL_ARCHIVE_NAME = "cifar-10-python.tar.gz"
OFFICIAL_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
OFFICIAL_FOLDER_NAME = "cifar-10-batches-py"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
IMAGE_SIZE = 32

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class Split:
    """One split as arrays: images (N, 32, 32, 3) uint8 RGB, labels (N,) int64."""

    images: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class CifarArrays:
    """Both splits, the class names in label order, and where they came from."""

    train: Split
    test: Split
    class_names: list[str]
    source: str  # path as given, or the download URL
    source_kind: str  # official_archive | official_folder | imagefolder | imagefolder_archive
    source_fingerprint: str  # sha256 of the file (archives) or of the relative paths + bytes


def _no_progress(stage: str, done: int, total: int) -> None:
    return None


# ---------------------------------------------------------------- the official pickle format


# What a CIFAR-10 batch may name: numpy arrays as numpy 1.x (numpy.core) and 2.x (numpy._core)
# pickle them, and bytes as Python 3 writes them at protocol 2. A pickle runs code only through
# the globals it names, so anything else is refused before it is looked up.
BATCH_PICKLE_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
})


class BatchUnpickler(pickle.Unpickler):
    """Reads a batch file's dicts, lists, bytes, numbers and numpy arrays, and nothing else."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in BATCH_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which no CIFAR-10 batch "
                                         "holds (refused: unpickling it could run code)")
        return super().find_class(module, name)


def _load_batch(name: str, data: bytes) -> dict:
    """One official batch file as a dict, through `BatchUnpickler`."""
    try:
        loaded = BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise FastCifarError(f"corrupt CIFAR-10 batch {name}: {error}") from error
    if not isinstance(loaded, dict):
        raise FastCifarError(f"corrupt CIFAR-10 batch {name}: it holds a "
                             f"{type(loaded).__name__}, not a dict")
    return loaded


def _read_batches(read_member: Callable[[str], bytes]) -> tuple[Split, Split, list[str]]:
    """Decode the official pickle batches given a function that returns a member's bytes."""
    def load(name: str) -> dict:
        return _load_batch(name, read_member(name))

    def split(names: list[str], class_count: int) -> Split:
        batches = [load(name) for name in names]
        data = np.concatenate([batch[b"data"] for batch in batches])
        labels = np.concatenate([np.asarray(batch[b"labels"]) for batch in batches])
        images = data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
        where = names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"
        check_labels(labels, len(images), class_count, where)
        return Split(np.ascontiguousarray(images, dtype=np.uint8), labels.astype(np.int64))

    try:
        class_names = [name.decode() for name in load("batches.meta")[b"label_names"]]
        train = split([f"data_batch_{i}" for i in range(1, 6)], len(class_names))
        return train, split(["test_batch"], len(class_names)), class_names
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise FastCifarError(f"not the CIFAR-10 batch layout (b'data', b'labels', "
                             f"b'label_names' of 3x32x32 images): {error!r}") from error


def check_labels(labels: np.ndarray, image_count: int, class_count: int, where: str) -> None:
    """Refuse labels that are not one whole class index per image, naming the batches,
    before anything is written (FFCV's writer processes die on them)."""
    problem = None
    if labels.ndim != 1 or len(labels) != image_count:
        problem = f"{image_count} images and {labels.size} labels"
    elif len(labels) and not np.issubdtype(labels.dtype, np.integer):
        problem = f"{labels.dtype} labels, not class indices"
    elif len(labels) and (labels.min() < 0 or labels.max() >= class_count):
        problem = (f"labels {labels.min()}..{labels.max()}, but {class_count} class names "
                   f"allow 0..{class_count - 1}")
    if problem:
        raise FastCifarError(f"corrupt CIFAR-10 batches ({where}): {problem}")


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_official_md5(path: Path) -> None:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != OFFICIAL_ARCHIVE_MD5:
        raise FastCifarError(
            f"{path} is named like the official CIFAR-10 archive but its md5 is "
            f"{digest.hexdigest()}, not {OFFICIAL_ARCHIVE_MD5}: re-download it"
        )


# ---------------------------------------------------------------- ImageFolder trees


def _decode_image(data: bytes, name: str, fix_images: bool) -> np.ndarray:
    """Decode one image to (32, 32, 3) uint8, rejecting other sizes/modes unless asked to fix."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise FastCifarError(f"not a readable image: {name}") from error
    except Image.DecompressionBombError as error:  # Pillow refuses to decode it at all
        raise FastCifarError(f"image {name} is too large to decode ({error})") from error
    if image.size != (IMAGE_SIZE, IMAGE_SIZE) and not fix_images:
        raise FastCifarError(f"image {name} is {image.size[0]}x{image.size[1]}, expected 32x32 "
                             "(pass --fix-images to resize)")
    if image.mode != "RGB" and not fix_images:
        raise FastCifarError(f"image {name} has mode {image.mode}, expected RGB (pass "
                             "--fix-images to convert)")
    image = _as_rgb(image)
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def _as_rgb(image: Image.Image) -> Image.Image:
    """The image as 8-bit RGB: grey, palette, RGBA (alpha dropped), CMYK, and 16-bit grey scaled
    to 8 bits (Pillow's own conversion clips it, so a 16-bit PNG came out white)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        pixels = np.clip(np.asarray(image).astype(np.int64), 0, 65535) >> 8
        image = Image.fromarray(pixels.astype(np.uint8), "L")
    return image if image.mode == "RGB" else image.convert("RGB")


@dataclass(frozen=True)
class _Entry:
    split: str
    class_name: str
    name: str  # path shown in messages
    data: bytes


def _assemble(entries: list[_Entry], where: str, fix_images: bool,
              progress: Progress) -> tuple[Split, Split, list[str]]:
    """Group decoded entries into sorted-class splits; checks both splits and every class."""
    splits = {"train": [], "test": []}
    for entry in entries:
        splits[entry.split].append(entry)
    for split_name, items in splits.items():
        if not items:
            raise FastCifarError(f"{where} has no images under {split_name}/<class>/")
    class_names = sorted({entry.class_name for entry in splits["train"]})
    test_classes = sorted({entry.class_name for entry in splits["test"]})
    if test_classes != class_names:
        missing = sorted(set(class_names) ^ set(test_classes))
        raise FastCifarError(f"{where}: train and test class folders differ ({', '.join(missing)})")
    index = {name: i for i, name in enumerate(class_names)}
    total = len(entries)
    done = 0

    def build(items: list[_Entry]) -> Split:
        nonlocal done
        items = sorted(items, key=lambda entry: entry.name)
        images = np.empty((len(items), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        # Pillow releases the GIL while decoding, so threads use every core.
        with ThreadPoolExecutor() as pool:
            decoded = pool.map(lambda e: _decode_image(e.data, e.name, fix_images), items,
                               chunksize=256)
            for i, image in enumerate(decoded):
                images[i] = image
                done += 1
                if done % 2048 == 0 or done == total:
                    progress("decode", done, total)
        labels = np.array([index[entry.class_name] for entry in items], dtype=np.int64)
        # A fixed shuffle (like the official batches) so the first N records hold every class.
        order = np.random.default_rng(0).permutation(len(items))
        return Split(images[order], labels[order])

    return build(splits["train"]), build(splits["test"]), class_names


def _split_and_class(parts: tuple[str, ...]) -> tuple[str, str] | None:
    """('…', 'train', 'cat', 'x.png') -> ('train', 'cat'), for paths with an image suffix."""
    if len(parts) < 3 or parts[-3] not in ("train", "test"):
        return None
    if not parts[-1].lower().endswith(IMAGE_SUFFIXES) or parts[-1].startswith("."):
        return None
    if parts[-2].startswith("."):  # a hidden folder (.ipynb_checkpoints) is no class
        return None
    return parts[-3], parts[-2]


def _find_imagefolder_root(folder: Path) -> Path | None:
    """The folder itself or a single child that holds train/ and test/."""
    for candidate in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return candidate
    return None


def folder_files(root: Path) -> list[Path]:
    """The files under `root`, sorted, leaving out hidden files and folders (.DS_Store,
    .ipynb_checkpoints). Symlinked folders are followed, as a person browsing the tree sees
    them (`rglob` skipped them, and a linked class's images with them); a link back to a
    folder above it is not, so a loop ends."""
    files: list[Path] = []
    for folder, folders, names in os.walk(root, followlinks=True):
        above = {os.path.realpath(parent) for parent in Path(folder).parents}
        folders[:] = [name for name in folders if not name.startswith(".")
                      and os.path.realpath(os.path.join(folder, name)) not in above | {
                          os.path.realpath(folder)}]
        files.extend(Path(folder) / name for name in names if not name.startswith("."))
    return sorted(files)


def _read_imagefolder(root: Path, fix_images: bool, progress: Progress) -> CifarArrays:
    try:
        return _read_imagefolder_files(root, fix_images, progress)
    except OSError as error:  # a folder or image this user may not read, a disk error
        raise FastCifarError(f"cannot read {error.filename or root}: "
                             f"{error.strerror or error}") from None


def _read_imagefolder_files(root: Path, fix_images: bool, progress: Progress) -> CifarArrays:
    files = folder_files(root)
    for split in ("train", "test"):
        for class_dir in sorted(p for p in (root / split).iterdir()
                                if p.is_dir() and not p.name.startswith(".")):
            if not any(f.suffix.lower() in IMAGE_SUFFIXES for f in class_dir.iterdir()):
                raise FastCifarError(f"class folder {class_dir} holds no images")
    digest = hashlib.sha256()
    entries = []
    for path in files:
        relative = path.relative_to(root)
        key = _split_and_class(relative.parts)
        if key is None or not path.is_file():
            continue
        data = path.read_bytes()
        digest.update(os.fsencode(relative) + b"\0" + data)  # any bytes a name may hold
        entries.append(_Entry(key[0], key[1], str(path), data))
    train, test, class_names = _assemble(entries, str(root), fix_images, progress)
    return CifarArrays(train, test, class_names, str(root), "imagefolder", digest.hexdigest())


# ---------------------------------------------------------------- archives


def _read_members(path: Path, progress: Progress) -> tuple[dict[str, bytes], list[_Entry]]:
    """Official batch files by name, and ImageFolder-style image entries, from a tar archive."""
    batches: dict[str, bytes] = {}
    entries: list[_Entry] = []
    with tarfile.open(path, "r:*") as archive:
        for member in archive:
            if not (member.isfile() or member.islnk() or member.issym()):  # links: their target
                continue
            parts = Path(member.name).parts
            official = len(parts) >= 2 and parts[-2] == OFFICIAL_FOLDER_NAME
            key = None if official else _split_and_class(parts)
            if not official and key is None:
                continue
            try:
                handle = archive.extractfile(member)
            except KeyError:  # a link to a member the archive lacks
                raise FastCifarError(f"{path}: {member.name} links to {member.linkname}, which "
                                     "is not in the archive") from None
            data = handle.read() if handle else b""
            if official:
                batches[parts[-1]] = data
            else:
                entries.append(_Entry(key[0], key[1], f"{path}:{member.name}", data))
                if len(entries) % 4096 == 0:
                    progress("read", len(entries), 0)
    return batches, entries


def _read_archive(path: Path, fix_images: bool, progress: Progress) -> CifarArrays:
    if path.name == OFFICIAL_ARCHIVE_NAME:
        _check_official_md5(path)
    try:
        batches, entries = _read_members(path, progress)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        # tarfile's "r:*" lists each compression it tried, one per line: keep the first.
        reason = (str(error).splitlines() or [type(error).__name__])[0].rstrip(":")
        raise FastCifarError(f"corrupt or truncated archive {path}: {reason}") from error
    fingerprint = file_sha256(path)
    if batches:
        def member(name: str) -> bytes:
            if name not in batches:
                raise FastCifarError(f"archive {path} lacks {OFFICIAL_FOLDER_NAME}/{name}")
            return batches[name]

        train, test, class_names = _read_batches(member)
        return CifarArrays(train, test, class_names, str(path), "official_archive", fingerprint)
    if not entries:
        raise FastCifarError(
            f"archive {path} holds neither {OFFICIAL_FOLDER_NAME}/ nor train/<class>/ images"
        )
    train, test, class_names = _assemble(entries, str(path), fix_images, progress)
    return CifarArrays(train, test, class_names, str(path), "imagefolder_archive", fingerprint)


def _read_official_folder(folder: Path) -> CifarArrays:
    digest = hashlib.sha256()

    def member(name: str) -> bytes:
        file = folder / name
        if not file.is_file():
            raise FastCifarError(f"{folder} lacks {name}")
        data = file.read_bytes()
        digest.update(name.encode() + b"\0" + data)
        return data

    train, test, class_names = _read_batches(member)
    return CifarArrays(train, test, class_names, str(folder), "official_folder", digest.hexdigest())


# ---------------------------------------------------------------- entry points


def find_source(search_dirs: list[Path]) -> Path | None:
    """The first CIFAR-10 source lying in one of `search_dirs` (archive first, then folder)."""
    for folder in search_dirs:
        for candidate in (folder / OFFICIAL_ARCHIVE_NAME, folder / OFFICIAL_FOLDER_NAME):
            if candidate.exists():
                return candidate
    return None


def download_official(root: Path) -> Path:
    """Fetch the official archive with torchvision's downloader (md5-checked); needs a network."""
    from torchvision.datasets.utils import download_url

    url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    try:
        download_url(url, str(root), OFFICIAL_ARCHIVE_NAME, OFFICIAL_ARCHIVE_MD5)
    except Exception as error:  # any network failure means the same thing to the user
        raise FastCifarError(
            "no CIFAR-10 source found and the download failed (offline?): pass --source with "
            "cifar-10-python.tar.gz, its extracted folder, or an ImageFolder tree"
        ) from error
    return root / OFFICIAL_ARCHIVE_NAME


def read_source(path: Path, fix_images: bool = False,
                progress: Progress = _no_progress) -> CifarArrays:
    """Read CIFAR-10 from an archive, an extracted official folder or an ImageFolder tree."""
    path = Path(path)
    if not path.exists():
        raise FastCifarError(f"source not found: {path}")
    if path.is_file():
        return _read_archive(path, fix_images, progress)
    if (path / "data_batch_1").is_file():
        return _read_official_folder(path)
    if (path / OFFICIAL_FOLDER_NAME / "data_batch_1").is_file():
        return _read_official_folder(path / OFFICIAL_FOLDER_NAME)
    root = _find_imagefolder_root(path)
    if root is None:
        raise FastCifarError(
            f"{path} is not a CIFAR-10 source: expected {OFFICIAL_FOLDER_NAME}/ batches or "
            "train/<class>/ and test/<class>/ image folders"
        )
    return _read_imagefolder(root, fix_images, progress)
