"""The command line end to end on tiny data, and its one-line errors."""

from __future__ import annotations

from typer.testing import CliRunner

from fastcifar.cli import app

runner = CliRunner()


def test_convert_then_train_end_to_end(tiny_imagefolder, tmp_path):
    data = tmp_path / "data"
    result = runner.invoke(app, ["convert", "--source", str(tiny_imagefolder), "--out", str(data)])
    assert result.exit_code == 0, result.output
    assert "written" in result.output
    again = runner.invoke(app, ["convert", "--source", str(tiny_imagefolder), "--out", str(data)])
    assert "up to date" in again.output
    result = runner.invoke(app, [
        "train", "--epochs", "2", "--batch-size", "24", "--data", str(data), "--max-lr", "0.05",
        "--precision", "fp32", "--workers", "1", "--out", str(tmp_path / "runs"),
        "--weights", str(tmp_path / "weights"), "--cutout", "4"])
    assert result.exit_code == 0, result.output
    assert "test acc" in result.output
    closing = result.output.strip().splitlines()[-1]  # the final figure first, then the best
    assert closing.startswith("final test accuracy ")
    assert closing.index("final test accuracy") < closing.index("best test pass")
    assert "(chosen on the test set" in closing
    assert list((tmp_path / "weights").glob("*-best.safetensors"))
    assert list((tmp_path / "weights").glob("*-final.safetensors"))


def test_train_without_betons_says_run_convert_first(tmp_path):
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "none")])
    assert result.exit_code == 1
    assert "run `fastcifar convert` first" in result.output
    assert "Traceback" not in result.output


def test_convert_missing_source_is_one_line_error(tmp_path):
    result = runner.invoke(app, ["convert", "--source", str(tmp_path / "nope.tar.gz")])
    assert result.exit_code == 1
    assert "source not found" in result.output and "Traceback" not in result.output


def test_nonsense_options_exit_non_zero(tiny_dataset, tmp_path):
    negative = runner.invoke(app, ["train", "--epochs", "-3", "--data", str(tiny_dataset)])
    assert negative.exit_code == 1 and "epochs must be positive" in negative.output
    device = runner.invoke(app, ["train", "--device", "tpu", "--data", str(tiny_dataset)])
    assert device.exit_code == 2  # Typer rejects the unknown choice
    batch = runner.invoke(app, ["train", "--batch-size", "4096", "--data", str(tiny_dataset),
                                "--out", str(tmp_path)])
    assert batch.exit_code == 1 and "batch size 4096" in batch.output
