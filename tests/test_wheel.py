"""A wheel carries the shipped weights: built, installed into a fresh virtual environment
outside the checkout, it predicts with them from any folder."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastcifar.command_config import SHIPPED_WEIGHTS

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS_IN_WHEEL = "fastcifar/shipped/custresnet-cifar10.safetensors"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if not SHIPPED_WEIGHTS.is_file():
        pytest.skip("no shipped weights file in this checkout")
    out = tmp_path_factory.mktemp("wheel")
    # A copy of the checkout: building writes build/ and egg-info, which stay out of the tree.
    source = out / "source"
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard"],
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        origin = ROOT / name
        if origin.is_symlink():
            target.symlink_to(os.readlink(origin))
        elif origin.is_file():
            target.write_bytes(origin.read_bytes())
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "-w", str(out / "dist"), str(source)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (path,) = (out / "dist").glob("fastcifar-*.whl")
    return path


def test_the_wheel_holds_the_shipped_weights(wheel):
    with zipfile.ZipFile(wheel) as archive:
        assert sha256(archive.read(WEIGHTS_IN_WHEEL)) == sha256(SHIPPED_WEIGHTS.read_bytes())
        assert not [name for name in archive.namelist() if name.startswith(("tests/", "weights/"))]


@pytest.mark.slow
def test_an_installed_wheel_predicts_from_outside_the_checkout(wheel, tmp_path):
    environment = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(environment)], check=True)
    python = environment / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig."
                                "get_paths()['purelib'])"], capture_output=True, text=True,
                               check=True).stdout.strip())
    # The dependencies (torch, FFCV, ...) come from this environment, as with system
    # site-packages: a path line only, so this environment's editable fastcifar stays out.
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                                "--no-deps", "--no-index", str(wheel)],
                               capture_output=True, text=True)
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-2000:]
    image = tmp_path / "elsewhere" / "cat.png"
    image.parent.mkdir()
    Image.fromarray(np.full((32, 32, 3), 120, dtype=np.uint8)).save(image)
    script = ("import fastcifar, fastcifar.command_config as c; print(fastcifar.__file__); "
              f"print(c.SHIPPED_WEIGHTS); print(fastcifar.predict({str(image)!r})[0].top[0][0])")
    run = subprocess.run([str(python), "-c", script], cwd=image.parent, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": ""})
    assert run.returncode == 0, run.stderr[-3000:]
    module, weights, top_class = run.stdout.split("\n")[:3]
    assert module.startswith(str(site)) and weights.startswith(str(site))
    assert top_class in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                         "horse", "ship", "truck")
    command = subprocess.run([str(environment / "bin" / "fastcifar"), "predict", str(image),
                              "--top-k", "1", "--device", "cpu"], cwd=image.parent,
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert command.returncode == 0, command.stderr[-3000:]
    assert command.stdout.strip().startswith(f"{image}: {top_class}")
