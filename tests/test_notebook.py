"""examples/quickstart.ipynb runs top to bottom (on small synthetic data) and shows its plots
and progress as a notebook would: images, no terminal escape codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_imagefolder
from fastcifar.config import ConvertConfig
from fastcifar.data.convert import convert
from narrow_custresnet import TEST_WIDTH

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_runs_top_to_bottom_with_its_plots(tmp_path):
    # Four batches of 64 (the fewest OneCycle plans for): an eighth of the default batch's images.
    source = write_imagefolder(tmp_path / "source", per_class_train=90, per_class_test=40)
    data = tmp_path / "data"
    convert(ConvertConfig(source=source, out_dir=data))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    (parameters,) = [cell for cell in notebook.cells
                     if "parameters" in cell.metadata.get("tags", [])]
    # The suite's narrow CustResNet, set in the kernel as conftest.py sets it here.
    parameters.source = (f"DATA = {str(data)!r}\nSOURCE = None\nEPOCHS = 1\n"
                         "TRAIN_SUBSET = None\nTEST_SUBSET = None\nBATCH_SIZE = 64\n"
                         f"import fastcifar.model\nfastcifar.model.CUSTRESNET_WIDTH = {TEST_WIDTH}")
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code"
               for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) >= 3  # the curves, the misclassified grid, the predictions
    printed = "".join(output.get("text", "") for output in outputs
                      if output.output_type == "stream")
    assert "epoch 1 (32 px)" in printed and "test accuracy" in printed
    assert "\x1b[" not in printed  # progress as a bar, not as escape codes
    assert list((tmp_path / "weights").glob("*.safetensors"))
    (run_dir,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"][-1]["steps"] == 4  # 270 images in batches of BATCH_SIZE
