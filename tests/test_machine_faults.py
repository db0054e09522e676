"""Machine faults end a run in one line and lose nothing: a full disk or an unwritable folder
at each of a run's writes, out of memory, a dying loader, a beton changed under a run, and
convert on a full disk. Faults are simulated at the one place every write goes through
(`atomic._commit`), so no root or small filesystem is needed; a report path that cannot be
written is a file standing where its folder should be."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import fastcifar.atomic as atomic_module
from fastcifar.checkpoint import load_checkpoint, save_checkpoint
from fastcifar.cli import app
from fastcifar.config import ConvertConfig
from fastcifar.data.convert import METADATA, TEST_BETON, TRAIN_BETON, convert
from fastcifar.errors import MACHINE_FAULT_EXIT, WriteFailed
from fastcifar.weights_file import save_weights_file

runner = CliRunner()
NON_ESSENTIAL = ("best.safetensors", "training_curves.png")


def train_arguments(data: Path, folder: Path) -> list[str]:
    """A 2-epoch tiny run (2 steps of 24 images an epoch) with a test pass after each epoch
    (a best-weights save when it improves): 12 or 13 writes, each failed once below."""
    return ["train", "--recipe", "fast", "--epochs", "2", "--batch-size", "24",
            "--train-subset", "48", "--data",
            str(data), "--precision", "fp32", "--device", "cpu", "--workers", "1", "--no-tta",
            "--eval-from-epoch", "1", "--seed", "3", "--out", str(folder / "runs"), "--weights",
            str(folder / "w")]


def fail_at_write(monkeypatch, number: int, code: int = errno.ENOSPC) -> list[Path]:
    """Make the `number`-th write (1-based) fail with `code` once its temporary file is
    written; returns the list of files written or attempted, in order."""
    attempted: list[Path] = []
    real_commit = atomic_module._commit

    def commit(temporary: Path, final: Path) -> None:
        attempted.append(final)
        if len(attempted) == number:
            assert temporary.stat().st_size > 0  # a half-written file exists at this point
            raise OSError(code, os.strerror(code))
        real_commit(temporary, final)

    monkeypatch.setattr(atomic_module, "_commit", commit)
    return attempted


def kind(name: str) -> str:
    """A written file's name without its run folder's time stamp."""
    return name.split("-s3-")[-1]


def epoch_rows(run_dir: Path) -> list[tuple]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return [(row["epoch"], row["train_loss"], row["test_accuracy"]) for row in metrics["epochs"]]


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def no_temporary_files(folder: Path) -> bool:
    return not [path for path in folder.rglob("*") if path.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def reference_run(tiny_dataset, tmp_path_factory) -> tuple[list[str], list[tuple]]:
    """The writes of an uninterrupted run (file names, in order) and its epoch rows."""
    folder = tmp_path_factory.mktemp("reference")
    patch = pytest.MonkeyPatch()
    attempted = fail_at_write(patch, number=0)
    try:
        result = runner.invoke(app, train_arguments(tiny_dataset, folder))
    finally:
        patch.undo()
    assert result.exit_code == 0, result.output
    (run_dir,) = (folder / "runs").iterdir()
    return [kind(path.name) for path in attempted], epoch_rows(run_dir)


def test_the_reference_run_makes_every_kind_of_write(reference_run):
    names = [kind(name) for name in reference_run[0]]
    for expected in ("run.json", "last.pt", "metrics.json", "best.safetensors",
                     "final.safetensors", "training_curves.png"):
        assert expected in names, (expected, names)


@pytest.mark.slow
@pytest.mark.parametrize("number", range(1, 14))
def test_disk_full_at_any_write_of_a_run_loses_nothing(tiny_dataset, tmp_path, monkeypatch,
                                                       reference_run, number):
    names, expected_rows = reference_run
    if number > len(names):
        pytest.skip(f"the run makes {len(names)} writes")
    failing = names[number - 1]
    attempted = fail_at_write(monkeypatch, number)
    result = runner.invoke(app, train_arguments(tiny_dataset, tmp_path))
    monkeypatch.undo()
    assert kind(attempted[number - 1].name) == failing
    assert no_temporary_files(tmp_path)
    (run_dir,) = (tmp_path / "runs").iterdir()
    if failing.endswith(NON_ESSENTIAL):  # a warning; the run goes on to its end
        assert result.exit_code == 0, result.output
        assert f"could not write {attempted[number - 1]}: No space left on device" in (
            result.stderr) and "training goes on" in result.stderr
        assert epoch_rows(run_dir) == expected_rows
        return
    assert result.exit_code == MACHINE_FAULT_EXIT, result.output
    (line,) = error_lines(result)
    assert f"could not write {attempted[number - 1]}: No space left on device" in line
    assert "Traceback" not in result.output
    checkpoint = run_dir / "last.pt"
    if not checkpoint.exists():
        assert "no checkpoint was written yet" in line
        return
    epochs_done = load_checkpoint(checkpoint)["epoch"]  # the last intact one loads
    assert f"--resume {checkpoint}" in line and f"(saved after epoch {epochs_done})" in line
    resumed = runner.invoke(app, [*train_arguments(tiny_dataset, tmp_path), "--resume",
                                  str(checkpoint)])
    assert resumed.exit_code == 0, resumed.output
    assert epoch_rows(run_dir) == expected_rows  # as if nothing had happened


def test_a_full_disk_at_an_epochs_metrics_leaves_its_checkpoint_unwritten_too(
        tiny_dataset, tmp_path, monkeypatch, reference_run):
    # An epoch's end writes last.pt and the metrics as one set: the fault at epoch 2's metrics
    # leaves epoch 1's checkpoint and metrics, and the line points to that checkpoint.
    names, _ = reference_run
    number = [index for index, name in enumerate(names, 1) if name == "metrics.json"][1]
    assert names[number - 2] == "last.pt"  # the set's first file was written just before
    fail_at_write(monkeypatch, number)
    result = runner.invoke(app, train_arguments(tiny_dataset, tmp_path))
    monkeypatch.undo()
    assert result.exit_code == MACHINE_FAULT_EXIT, result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1
    assert [row[0] for row in epoch_rows(run_dir)] == [1]
    (line,) = error_lines(result)
    assert "(saved after epoch 1)" in line
    assert no_temporary_files(tmp_path)


def test_a_full_disk_at_the_final_weights_leaves_the_final_metrics_unwritten(
        tiny_dataset, tmp_path, monkeypatch, reference_run):
    # The run's end writes the metrics once more and the final weights as one set.
    names, _ = reference_run
    number = names.index("final.safetensors") + 1
    queued_metrics = []
    real_commit = atomic_module._commit
    attempted = fail_at_write(monkeypatch, number)
    fail_at_final = atomic_module._commit

    def commit(temporary: Path, final: Path) -> None:
        if final.name.endswith("final.safetensors"):  # the set's metrics wait to be renamed
            queued_metrics.extend(path.name for path in (tmp_path / "runs").glob("*/.metrics.*"))
        fail_at_final(temporary, final)

    monkeypatch.setattr(atomic_module, "_commit", commit)
    result = runner.invoke(app, train_arguments(tiny_dataset, tmp_path))
    monkeypatch.setattr(atomic_module, "_commit", real_commit)
    assert kind(attempted[-1].name) == "final.safetensors"
    assert result.exit_code == MACHINE_FAULT_EXIT, result.output
    assert sorted(name.split(".")[1] for name in queued_metrics) == ["metrics", "metrics"]
    assert no_temporary_files(tmp_path)


@pytest.mark.slow
def test_a_run_folder_that_becomes_unwritable_mid_run_ends_in_one_line(tiny_dataset, tmp_path,
                                                                       monkeypatch,
                                                                       reference_run):
    from fastcifar.progress import TableCallbacks

    real_on_epoch = TableCallbacks.on_epoch

    def take_the_folder_away(self, stats):  # after epoch 1 the run folder becomes a file
        real_on_epoch(self, stats)
        if stats.epoch == 1:
            (run_dir,) = (tmp_path / "runs").iterdir()
            shutil.move(run_dir, tmp_path / "saved")
            run_dir.write_text("not a folder")

    monkeypatch.setattr(TableCallbacks, "on_epoch", take_the_folder_away)
    result = runner.invoke(app, train_arguments(tiny_dataset, tmp_path))
    assert result.exit_code == MACHINE_FAULT_EXIT, result.output
    (line,) = error_lines(result)
    assert "its folder cannot be written" in line and "last.pt" in line
    assert no_temporary_files(tmp_path / "saved")
    assert load_checkpoint(tmp_path / "saved" / "last.pt")["epoch"] == 1


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS, errno.EIO])
def test_every_errno_of_an_essential_write_names_its_cause(tiny_dataset, tmp_path, monkeypatch,
                                                           code):
    fail_at_write(monkeypatch, 1, code)  # run.json, before any checkpoint
    result = runner.invoke(app, train_arguments(tiny_dataset, tmp_path))
    assert result.exit_code == MACHINE_FAULT_EXIT
    (line,) = error_lines(result)
    assert f"run.json: {os.strerror(code)}" in line and "no checkpoint was written yet" in line


def test_out_of_memory_ends_the_run_in_one_line_with_the_checkpoint_intact(
        tiny_dataset, tmp_path, monkeypatch, reference_run):
    from fastcifar.training import Run

    real_step = Run.train_step

    def step(self, images, labels, sums):
        if self.steps == 3:  # inside epoch 2 (2 steps per epoch)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        real_step(self, images, labels, sums)

    monkeypatch.setattr(Run, "train_step", step)
    result = runner.invoke(app, train_arguments(tiny_dataset, tmp_path))
    monkeypatch.undo()
    assert result.exit_code == MACHINE_FAULT_EXIT, result.output
    (line,) = error_lines(result)
    assert "out of memory on cpu at --batch-size 24" in line and "--batch-size 12" in line
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert f"--resume {run_dir / 'last.pt'}" in line
    resumed = runner.invoke(app, [*train_arguments(tiny_dataset, tmp_path), "--resume",
                                  str(run_dir / "last.pt")])
    assert resumed.exit_code == 0, resumed.output
    assert epoch_rows(run_dir) == reference_run[1]


@pytest.mark.parametrize("arguments", [["summary", "--batch-size", "8"],
                                       ["summary", "--json", "--batch-size", "8"]])
def test_out_of_memory_outside_training_ends_in_one_line(monkeypatch, arguments):
    # The allocator's RuntimeError, wrapped by torchinfo's own, gave a 66-line traceback.
    import fastcifar.model

    real_forward = fastcifar.model.CustResNet.forward

    def forward(self, images):
        if len(images) == 8:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                               "allocate memory: you tried to allocate 1099511627776 bytes.")
        return real_forward(self, images)

    monkeypatch.setattr(fastcifar.model.CustResNet, "forward", forward)
    result = runner.invoke(app, arguments)
    assert result.exit_code == MACHINE_FAULT_EXIT, result.output
    (line,) = error_lines(result)
    assert "out of memory: try a smaller --batch-size" in line


# The CLI in a child process whose FFCV pipeline for the train or the test images (DYING_SPLIT)
# raises at its DYING_AT_BATCH-th batch: a loader that dies must end the command, never leave it
# waiting (the timeouts below would catch a hang).
DYING_LOADER = textwrap.dedent("""
    import os, sys
    from ffcv.loader.epoch_iterator import EpochIterator
    real = EpochIterator.run_pipeline
    train, at = os.environ["DYING_SPLIT"] == "train", int(os.environ["DYING_AT_BATCH"])
    calls = []
    def run_pipeline(self, *args):
        if self.loader.drop_last == train:  # only the train loader drops a last short batch
            calls.append(1)
            if len(calls) == at:
                raise ValueError("record 17 cannot be decoded")
        return real(self, *args)
    EpochIterator.run_pipeline = run_pipeline
    from fastcifar.cli import app
    sys.argv = ["fastcifar", *sys.argv[1:]]
    app()
""")


@pytest.mark.slow
def test_a_dying_loader_ends_the_run_in_one_line_and_keeps_the_checkpoint(tiny_dataset,
                                                                           tmp_path):
    finished = subprocess.run([sys.executable, "-c", DYING_LOADER,
                               *train_arguments(tiny_dataset, tmp_path)[0:]],
                              env={**os.environ, "DYING_SPLIT": "train", "DYING_AT_BATCH": "3"},
                              capture_output=True, text=True, timeout=300)  # in epoch 2
    assert finished.returncode == MACHINE_FAULT_EXIT, finished.stdout + finished.stderr
    lines = [line for line in finished.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in finished.stderr, finished.stderr
    assert ("the train loader stopped: ValueError: record 17 cannot be decoded" in lines[0]
            and "(saved after epoch 1)" in lines[0])
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1


@pytest.mark.full_width  # the child process builds CustResNet at its real width
def test_a_dying_test_loader_ends_evaluate_in_one_line(tiny_dataset, tmp_path):
    from test_evaluate import write_tiny_weights

    weights = write_tiny_weights(tmp_path / "tiny.safetensors", tiny_dataset)
    finished = subprocess.run([sys.executable, "-c", DYING_LOADER, "evaluate", str(weights),
                               "--data", str(tiny_dataset), "--out", str(tmp_path / "out"),
                               "--device", "cpu"],
                              env={**os.environ, "DYING_SPLIT": "test", "DYING_AT_BATCH": "1"},
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == MACHINE_FAULT_EXIT, finished.stdout + finished.stderr
    lines = [line for line in finished.stderr.splitlines() if line.strip()]
    assert lines == ["error: the test loader stopped: ValueError: record 17 cannot be decoded"]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_beton_truncated_during_a_run_ends_it_in_one_line(tiny_dataset, tmp_path,
                                                            monkeypatch):
    from fastcifar.progress import TableCallbacks

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    real_on_epoch = TableCallbacks.on_epoch

    def truncate_after_epoch_one(self, stats):
        real_on_epoch(self, stats)
        if stats.epoch == 1:
            os.truncate(data / TRAIN_BETON, 4096)

    monkeypatch.setattr(TableCallbacks, "on_epoch", truncate_after_epoch_one)
    result = runner.invoke(app, train_arguments(data, tmp_path))
    assert result.exit_code == MACHINE_FAULT_EXIT, result.output
    (line,) = error_lines(result)
    assert f"{data / TRAIN_BETON} changed while training" in line and "--resume" in line


def test_weights_and_checkpoint_writers_report_a_failed_write_as_write_failed(tmp_path,
                                                                              monkeypatch):
    """The bytes go through Python's file objects, so ENOSPC mid-write is an OSError (not
    safetensors' or torch's own error) and leaves no file."""
    import builtins

    real_open = builtins.open

    class FullDisk:
        def __init__(self, handle) -> None:
            self.handle, self.written = handle, 0

        def write(self, data) -> int:
            self.written += len(data)
            if self.written > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.handle.close()

    def open_full(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        return FullDisk(handle) if "w" in mode and str(path).endswith(".tmp") else handle

    monkeypatch.setattr(builtins, "open", open_full)
    state = {"weight": torch.randn(64, 64)}
    metadata = {"class_names": ["a"], "mean": [0.0] * 3, "std": [1.0] * 3, "logit_scale": 1.0,
                "tta": "none"}
    with pytest.raises(WriteFailed, match="w.safetensors: No space left on device"):
        save_weights_file(tmp_path / "w.safetensors", state, metadata)
    with pytest.raises(WriteFailed, match="last.pt: No space left on device"):
        save_checkpoint(tmp_path / "last.pt", state)
    assert list(tmp_path.iterdir()) == []


def test_convert_on_a_full_disk_refuses_before_writing_and_keeps_the_old_betons(
        tiny_imagefolder, tmp_path, monkeypatch):
    out = tmp_path / "data"
    convert(ConvertConfig(source=tiny_imagefolder, out_dir=out))
    before = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(
        10**9, 10**9 - 20_000_000, 20_000_000))  # 20 MB free: too little for 4 writers' pages
    result = runner.invoke(app, ["convert", "--source", str(tiny_imagefolder), "--out",
                                 str(out), "--force"])
    assert result.exit_code == MACHINE_FAULT_EXIT, result.output
    (line,) = error_lines(result)
    assert f"not enough space in {out}" in line and "20 MB are free" in line
    assert {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()} == before


@pytest.mark.parametrize("failing", [TRAIN_BETON, TEST_BETON, METADATA])
def test_convert_disk_full_at_each_write_leaves_no_partial_output(tiny_imagefolder, tmp_path,
                                                                  monkeypatch, failing):
    order = [TRAIN_BETON, TEST_BETON, METADATA]
    fail_at_write(monkeypatch, order.index(failing) + 1)
    result = runner.invoke(app, ["convert", "--source", str(tiny_imagefolder), "--out",
                                 str(tmp_path)])
    assert result.exit_code == MACHINE_FAULT_EXIT, result.output
    (line,) = error_lines(result)
    assert f"could not write {tmp_path / failing}: No space left on device" in line
    assert not (tmp_path / METADATA).exists() and no_temporary_files(tmp_path)


def test_a_benchmark_report_on_a_full_disk_ends_in_one_line(tiny_dataset, tmp_path,
                                                            monkeypatch):
    fail_at_write(monkeypatch, 1)
    report = tmp_path / "loader.json"
    # The FFCV-against-resident comparison: the three-pipeline one would spend ~45 s compiling
    # FFCV's own augmentations (numba, every time) before the same write.
    result = runner.invoke(app, ["benchmark", "loader", "--data", str(tiny_dataset),
                                 "--batch-size", "24", "--passes", "1", "--compare-on-device",
                                 "--device", "cpu", "--workers", "1", "--max-batches", "2",
                                 "--json", str(report)])
    assert result.exit_code == MACHINE_FAULT_EXIT, result.output
    (line,) = error_lines(result)
    assert "could not write" in line and "No space left on device" in line
    assert no_temporary_files(tmp_path)


@pytest.mark.parametrize("fault_at", ["write", "fsync"])
def test_a_set_of_files_on_a_full_disk_leaves_none_of_them_new(tmp_path, monkeypatch, fault_at):
    """write_texts writes and fsyncs every file before renaming any: a fault keeps the old set."""
    old = {tmp_path / "median.json": "old json", tmp_path / "median.md": "old table"}
    atomic_module.write_texts(old)
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    real_write_text, real_make_durable = Path.write_text, atomic_module._make_durable

    def write_text(self: Path, text: str, *args, **kwargs) -> int:
        if fault_at == "write" and self.name.startswith(".median.md."):
            raise full
        return real_write_text(self, text, *args, **kwargs)

    def make_durable(temporary: Path) -> None:
        # The set's second file: the first is written and fsynced by then.
        if fault_at == "fsync" and temporary.name.startswith(".median.md."):
            raise full
        real_make_durable(temporary)

    monkeypatch.setattr(Path, "write_text", write_text)
    monkeypatch.setattr(atomic_module, "_make_durable", make_durable)
    with pytest.raises(WriteFailed, match="No space left on device"):
        atomic_module.write_texts({path: "new" for path in old})
    assert {path: path.read_text() for path in old} == old
    assert no_temporary_files(tmp_path)


def test_a_file_set_renames_nothing_until_its_block_ends(tmp_path):
    old = {tmp_path / "report.json": "old json", tmp_path / "plot.png": "old plot"}
    atomic_module.write_texts(old)
    with pytest.raises(RuntimeError), atomic_module.file_set():  # not only OSError
        atomic_module.write_text(tmp_path / "report.json", "new json")
        atomic_module.write_bytes(tmp_path / "plot.png", b"new plot")
        assert (tmp_path / "report.json").read_text() == "old json"  # written, not in place
        raise RuntimeError("the set's last step failed")
    assert {path: path.read_text() for path in old} == old and no_temporary_files(tmp_path)
    with atomic_module.file_set():
        with atomic_module.file_set():  # a set inside a set joins it
            atomic_module.write_text(tmp_path / "report.json", "new json")
        assert (tmp_path / "report.json").read_text() == "old json"
        atomic_module.write_bytes(tmp_path / "plot.png", b"new plot")
    assert [(tmp_path / name).read_text() for name in ("report.json", "plot.png")] == [
        "new json", "new plot"]
    atomic_module.write_text(tmp_path / "after.txt", "at once")  # the set is over
    assert (tmp_path / "after.txt").read_text() == "at once" and no_temporary_files(tmp_path)


def test_a_rename_that_fails_inside_a_file_set_names_its_file_and_leaves_no_temporary(
        tmp_path, monkeypatch):
    real_put_in_place = atomic_module._put_in_place

    def put_in_place(temporary: Path, final: Path) -> None:
        if final.name == "b.txt":  # the folder taken away between two renames, say
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        real_put_in_place(temporary, final)

    monkeypatch.setattr(atomic_module, "_put_in_place", put_in_place)
    with pytest.raises(WriteFailed, match=r"b\.txt: Invalid cross-device link"):
        with atomic_module.file_set():
            for name in ("a.txt", "b.txt", "c.txt"):
                atomic_module.write_text(tmp_path / name, name)
    # The one way a set splits (the docstring says so): the files before the failure are new.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.txt"]


def _output_set_arguments(command: str, data: Path, weights: Path, out: Path) -> list[str]:
    if command == "evaluate":
        return ["evaluate", str(weights), "--data", str(data), "--out", str(out),
                "--workers", "1"]
    if command == "lr-find":
        return ["lr-find", "--iters", "12", "--batch-size", "24", "--precision", "fp32",
                "--workers", "1", "--data", str(data), "--out", str(out)]
    return ["show-augment", "--count", "8", "--data", str(data), "--out", str(out)]


@pytest.mark.parametrize(("command", "files"), [("evaluate", 3), ("lr-find", 3),
                                                ("show-augment", 2)])
def test_a_command_whose_last_file_meets_a_full_disk_leaves_none_of_its_files_new(
        tiny_dataset, tmp_path, monkeypatch, command, files):
    from test_evaluate import write_tiny_weights

    weights = write_tiny_weights(tmp_path / "tiny.safetensors", tiny_dataset)
    out = tmp_path / "out"
    arguments = _output_set_arguments(command, tiny_dataset, weights, out)
    first = runner.invoke(app, arguments)
    assert first.exit_code == 0, first.output
    def files_there() -> dict[str, tuple[int, bytes]]:  # a file renamed in has a new inode
        return {path.name: (path.stat().st_ino, path.read_bytes()) for path in out.iterdir()}

    before = files_there()
    assert len(before) == files
    attempted = fail_at_write(monkeypatch, files)  # the set's last file
    again = runner.invoke(app, arguments)
    assert len(attempted) == files and again.exit_code == MACHINE_FAULT_EXIT, again.output
    (line,) = error_lines(again)
    assert f"could not write {attempted[-1]}: No space left on device" in line
    assert files_there() == before
    assert no_temporary_files(tmp_path)


def test_check_can_write_refuses_what_could_not_be_written_and_leaves_nothing(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    (tmp_path / "a-folder").mkdir()
    with pytest.raises(WriteFailed, match=r"its folder cannot be written \(Not a directory\)"):
        atomic_module.check_can_write(tmp_path / "fine.json", blocker / "report.json")
    with pytest.raises(WriteFailed, match=r"a-folder: it is a folder \(Is a directory\)"):
        atomic_module.check_can_write(tmp_path / "a-folder")
    # a path whose folders do not exist yet can be written: they are made, then taken away
    atomic_module.check_can_write(tmp_path / "new" / "deeper" / "fine.json")
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["a-file", "a-folder"]


@pytest.mark.parametrize("command", [
    ["benchmark", "time-to-accuracy", "--epochs", "1", "--runs", "1", "--precision", "fp32",
     "--device", "cpu"],
    ["benchmark", "loader", "--batch-size", "24", "--passes", "1", "--no-jit-startup"],
])
def test_a_benchmark_whose_report_cannot_be_written_stops_before_it_runs(
        command, tiny_dataset, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.chdir(tmp_path)  # a run folder, were one made, would land here
    result = runner.invoke(app, [*command, "--data", str(tiny_dataset), "--workers", "1",
                                 "--json", str(blocker / "report.json")])
    assert result.exit_code == MACHINE_FAULT_EXIT, result.output
    (line,) = error_lines(result)
    assert f"could not write {blocker / 'report.json'}: its folder cannot be written" in line
    # nothing measured: no progress or result line, no run folder
    assert [text for text in result.output.splitlines() if text.strip()] == [line]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-file"]


BENCHMARK_SCRIPTS = {  # script: the arguments it needs besides --json
    "muon_step": [], "onnx_cost": [], "precision_timing": [], "recipe_sweep": [],
    "run_cost": [], "step_throughput": [], "throughput_decomposition": [],
    "tta_variants": ["never-read.pt"],
}


def load_benchmark_script(script: str, monkeypatch) -> tuple[Path, types.ModuleType]:
    """(path, module) of benchmarks/SCRIPT.py, loaded as its own module."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{script}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{script}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return path, module


@pytest.mark.parametrize("script", sorted(BENCHMARK_SCRIPTS))
def test_a_benchmark_script_whose_report_cannot_be_written_stops_before_it_runs(
        script, tmp_path, monkeypatch, capsys):
    """Each script checks its --json (and .md) up front: one line and exit 74, not a traceback
    after minutes or hours of measuring."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path, module = load_benchmark_script(script, monkeypatch)
    checked = []  # the up-front check must be what stops it, before any measuring

    def check(*paths: Path) -> None:
        checked.append(paths[0])
        atomic_module.check_can_write(*paths)

    monkeypatch.setattr(module, "check_can_write", check)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(path), *BENCHMARK_SCRIPTS[script],
                                      "--json", str(blocker / "report.json")])
    with pytest.raises(SystemExit) as stopped:
        module.main()
    assert stopped.value.code == MACHINE_FAULT_EXIT and checked == [blocker / "report.json"]
    output = capsys.readouterr()
    assert output.out == ""  # no result line: nothing was measured
    (line,) = output.err.strip().splitlines()
    assert line == (f"error: could not write {blocker / 'report.json'}: its folder cannot be "
                    f"written ({os.strerror(errno.ENOTDIR)})")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-file"]


@pytest.mark.parametrize("script, arguments, message", [
    ("onnx_cost", ["--data", "no-data", "--json", "report.json"],
     "error: no converted dataset in no-data: run `fastcifar convert` first (or pass --data)"),
    ("ship_weights", ["not-weights.safetensors", "shipped.safetensors"],
     "error: not-weights.safetensors is not a fastcifar weights file"),
])
def test_bad_input_deep_inside_a_benchmark_script_is_one_line_not_a_traceback(
        script, arguments, message, tmp_path, monkeypatch, capsys):
    """A FastCifarError anywhere in a script's main() (here after its report check: data that
    was never converted, a file that is not weights) ends it with its line and exit 1."""
    (tmp_path / "not-weights.safetensors").write_text("a text file, not tensors")
    path, module = load_benchmark_script(script, monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(path), *arguments])
    with pytest.raises(SystemExit) as stopped:
        module.main()
    assert stopped.value.code == 1
    output = capsys.readouterr()
    (line,) = output.err.strip().splitlines()
    assert line.startswith(message), line
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["not-weights.safetensors"]


def test_an_interrupted_run_inside_a_benchmark_script_does_not_point_at_a_resume_it_lacks(
        tmp_path, capsys):
    """The CLI says `--resume CHECKPOINT`; a script (no --resume) says to run it again."""
    from fastcifar.epoch_state import TrainingInterrupted
    from fastcifar.errors import script_exit

    checkpoint = tmp_path / "run" / "last.pt"

    @script_exit()
    def main() -> int:
        raise TrainingInterrupted(15, checkpoint)

    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 143
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"error: interrupted; checkpoint saved to {checkpoint}: this script does not "
                    f"resume its runs, so run it again (the run's options are in "
                    f"{tmp_path / 'run' / 'run.json'})")
    assert "--resume" in str(TrainingInterrupted(15, checkpoint))  # the CLI's message keeps it
