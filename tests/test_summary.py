"""`fastcifar summary`: 6,573,130 parameters, torchinfo's layer rows and a receptive field of 81."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from fastcifar.cli import app
from fastcifar.model import CustResNet, summary_record

pytestmark = pytest.mark.full_width  # the real network, not the suite's narrow one


def test_summary_record_counts_parameters_layers_and_receptive_field():
    record = summary_record(CustResNet(), batch_size=2)
    assert record["total_params"] == record["trainable_params"] == 6_573_130
    layers = {row["name"]: row for row in record["layers"]}
    assert layers["prep.layers.0"]["type"] == "Conv2d"
    assert layers["prep.layers.0"]["params"] == 3 * 64 * 3 * 3
    assert layers["prep.layers.0"]["output_size"] == [2, 64, 32, 32]
    assert layers["layer3.residual.1.layers.0"]["params"] == 512 * 512 * 9
    assert layers["fc"]["params"] == 512 * 10 + 10 and layers["fc"]["output_size"] == [2, 10]
    assert record["receptive_field"] == 81
    rows = record["receptive_field_rows"]
    assert rows[0]["name"] == "input" and rows[-1]["name"] == "pool"
    assert rows[-1]["receptive_field"] == 81 and rows[-1]["jump"] == 32
    assert json.loads(json.dumps(record)) == record  # JSON-friendly as it is


def test_summary_command_prints_tables_or_json():
    runner = CliRunner()
    text = runner.invoke(app, ["summary"], terminal_width=200)
    assert text.exit_code == 0, text.output
    assert "Total params: 6,573,130" in text.output
    assert "layer3.residual.1.layers.0" in text.output and "│ 81 " in text.output
    # every conv's kernel shows (torchinfo's default depth stopped above all but prep's), and
    # the mult-adds are a count, not "(Units.MEGABYTES)"
    convs = sum(isinstance(module, torch.nn.Conv2d) for module in CustResNet().modules())
    assert text.output.count("[3, 3]") == convs == 8
    assert "Total mult-adds (M): 379.27" in text.output and "Units." not in text.output
    as_json = runner.invoke(app, ["summary", "--json", "--batch-size", "4"])
    assert as_json.exit_code == 0, as_json.output
    record = json.loads(as_json.output)
    assert record["total_params"] == 6_573_130 and record["input_size"] == [4, 3, 32, 32]
    assert record["receptive_field"] == 81
