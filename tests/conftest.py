"""Shared fixtures: tiny synthetic CIFAR-like sources (ImageFolder PNGs, official pickle format),
and the narrow CustResNet the suite trains."""

from __future__ import annotations

import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fastcifar.model
from fastcifar.config import ConvertConfig
from fastcifar.data.convert import convert
from narrow_custresnet import TEST_WIDTH

TINY_CLASSES = ["apple", "berry", "cherry"]
# Easy classes: a distinct base colour per class plus noise, so a model learns them in a few steps.
CLASS_COLOURS = np.array([[220, 40, 40], [40, 200, 60], [50, 60, 220]], dtype=np.int16)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow and real-data tests first (in their order, then the rest in theirs): pytest-xdist
    hands tests out in this order, so no worker starts a minute-long test near the end while the
    other sits idle."""
    items.sort(key=lambda item: not (item.get_closest_marker("slow")
                                     or item.get_closest_marker("realdata")))


# CustResNet's plan at a quarter of its width (~1/16 of its FLOPs) for the tests: they check
# the training machinery, and at full width their steps were most of the suite's time on 2
# cores. The model's own tests and the real-data tests (the shipped weights), marked full_width
# or realdata, build the real 6,573,130-parameter network, and so does every fresh process that
# runs `python -m fastcifar` (or `-c`). torchrun's ranks and the notebook's kernel narrow
# themselves through narrow_custresnet.py, to match this process.
FULL_WIDTH = fastcifar.model.CUSTRESNET_WIDTH


@pytest.fixture(scope="session", autouse=True)
def narrow_custresnet():
    """CustResNet at TEST_WIDTH for the whole session, module and session fixtures that train
    included (they are set up before any test's own fixtures)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(fastcifar.model, "CUSTRESNET_WIDTH", TEST_WIDTH)
        yield


@pytest.fixture(autouse=True)
def full_width_when_marked(request, monkeypatch) -> None:
    """The real width for the tests marked full_width or realdata."""
    if request.node.get_closest_marker("full_width") or request.node.get_closest_marker(
            "realdata"):
        monkeypatch.setattr(fastcifar.model, "CUSTRESNET_WIDTH", FULL_WIDTH)


def sharpened_untrained_custresnet(logit_scale: float):
    """An untrained 3-class CustResNet (the suite's narrow one) whose TTA modes disagree on the
    tiny test set: an untrained head gives one class for every image, so its weights are scaled
    up (x100), and seed 8's filters then answer 9 of the 60 test images differently with and
    without flip (17 without TTA and with multi-crop, 8 with flip and with multi-crop)."""
    import torch

    from fastcifar.model import CustResNet

    torch.manual_seed(8)
    model = CustResNet(num_classes=3, logit_scale=logit_scale)
    with torch.no_grad():
        model.fc.weight.mul_(100)
    return model


def trained_looking_model():
    """A 3-class CustResNet whose BN buffers are not at their defaults (as after training), for
    exact round trips through weights files and checkpoints."""
    import torch

    from fastcifar.model import CustResNet

    torch.manual_seed(0)
    model = CustResNet(num_classes=3)
    model.train()
    model(torch.randn(4, 3, 32, 32))
    return model


def synthetic_images(labels: np.ndarray, seed: int) -> np.ndarray:
    """(N, 32, 32, 3) uint8 images: the class colour, a bright square at a class position, noise."""
    rng = np.random.default_rng(seed)
    images = CLASS_COLOURS[labels % len(CLASS_COLOURS)][:, None, None, :] + rng.integers(
        -40, 40, size=(len(labels), 32, 32, 3))
    for i, label in enumerate(labels):
        top = 4 + 8 * (label % 3)
        images[i, top:top + 8, top:top + 8] = 250
    return np.clip(images, 0, 255).astype(np.uint8)


def write_imagefolder(root: Path, per_class_train: int = 40, per_class_test: int = 20,
                      classes: list[str] = TINY_CLASSES, seed: int = 0) -> Path:
    """ROOT/train/<class>/NNNN.png and ROOT/test/<class>/NNNN.png; returns ROOT."""
    for split, count in (("train", per_class_train), ("test", per_class_test)):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            images = synthetic_images(np.full(count, label), seed + 7 * label + len(split))
            for i, image in enumerate(images):
                Image.fromarray(image).save(folder / f"{i:04d}.png")
    return root


def write_official_archive(path: Path, per_batch: int = 20, seed: int = 0) -> tuple[dict, dict]:
    """A tiny archive in the official cifar-10-python pickle layout; returns train/test arrays."""
    rng = np.random.default_rng(seed)
    names = [f"class{i}" for i in range(10)]
    folder = path.parent / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, dict] = {"train": {"images": [], "labels": []},
                               "test": {"images": [], "labels": []}}

    def batch(name: str, split: str) -> None:
        labels = rng.integers(0, 10, per_batch)
        images = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
        data = images.transpose(0, 3, 1, 2).reshape(per_batch, -1)
        # protocols 2, 4 and 5 pickle numpy arrays and bytes through different globals
        protocol = (2, 4, 5)[len(list(folder.iterdir())) % 3]
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"labels": labels.tolist()},
                                                 protocol=protocol))
        arrays[split]["images"].append(images)
        arrays[split]["labels"].append(labels)

    for i in range(1, 6):
        batch(f"data_batch_{i}", "train")
    batch("test_batch", "test")
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [n.encode() for n in names]}))
    with tarfile.open(path, "w:gz") as archive:
        archive.add(folder, arcname="cifar-10-batches-py")
    train = {k: np.concatenate(v) for k, v in arrays["train"].items()}
    test = {k: np.concatenate(v) for k, v in arrays["test"].items()}
    return train, test


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory) -> Path:
    """A 3-class ImageFolder tree: 40 train and 20 test PNGs per class."""
    return write_imagefolder(tmp_path_factory.mktemp("imagefolder"))


@pytest.fixture(scope="session")
def tiny_dataset(tiny_imagefolder, tmp_path_factory) -> Path:
    """The tiny ImageFolder converted to betons; returns the data folder (do not modify it)."""
    out_dir = tmp_path_factory.mktemp("data")
    convert(ConvertConfig(source=tiny_imagefolder, out_dir=out_dir))
    return out_dir


REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg.tar.gz"


@pytest.fixture
def check_png():
    """`check_png(path) -> (width, height)`: the figure is a complete, valid PNG and no
    temporary file of the atomic write is left beside it."""
    def check(path: Path) -> tuple[int, int]:
        assert Path(path).is_file(), f"{path} was not written"
        with Image.open(path) as image:
            assert image.format == "PNG"
            image.verify()  # reads every chunk and checks its CRC
        assert not list(Path(path).parent.glob(".*.tmp")), "a temporary file was left behind"
        with Image.open(path) as image:
            return image.size

    return check


@pytest.fixture
def saved_figures(monkeypatch) -> list:
    """The matplotlib figures `fastcifar.plots` saves during a test, in order, still readable:
    tests check what a figure shows (its data, marks, scales), not only that a PNG exists."""
    import fastcifar.plots

    figures = []
    real_save = fastcifar.plots._save

    def save(figure, path: Path) -> Path:
        figures.append(figure)
        return real_save(figure, path)

    monkeypatch.setattr(fastcifar.plots, "_save", save)
    return figures


@pytest.fixture(scope="session")
def real_dataset(tmp_path_factory) -> Path:
    """The real CIFAR-10 JPEG copy converted to betons (skips without it); do not modify it.

    One conversion (~40 s) serves every pytest-xdist worker: they share the folder above their
    own temporary ones, and `convert` locks it, so the second finds the betons up to date."""
    if not REAL_DATA.exists():
        pytest.skip("real CIFAR-10 JPEG copy not present")
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out_dir = shared / "real-data"
    convert(ConvertConfig(source=REAL_DATA, out_dir=out_dir))
    return out_dir


def logits_of_two_test_passes(data_dir: Path, device, workers: int):
    """(first, second, test count): an untrained CustResNet's logits from two passes through
    the real FFCV test loader in batches of 8 (several batches ahead in reused buffers)."""
    import torch

    from fastcifar.config import LoaderConfig
    from fastcifar.data.loaders import build_loaders
    from fastcifar.device import DeviceStep
    from fastcifar.model import CustResNet

    loaders = build_loaders(LoaderConfig(data_dir=data_dir, batch_size=8, workers=workers),
                            None, 0)
    step = DeviceStep(loaders.metadata.mean, loaders.metadata.std, device, True)
    model = CustResNet(num_classes=3).to(device).to(memory_format=torch.channels_last).eval()

    def logits():
        with torch.no_grad():
            return torch.cat([model(step(images, labels)[0]) for images, labels in loaders.test])

    return logits(), logits(), loaders.test_count
