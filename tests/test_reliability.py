"""Failure handling end to end: signals through the CLI, concurrent converts, failed writes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fastcifar.config import ConvertConfig
from fastcifar.data import convert as convert_module
from fastcifar.data.convert import METADATA, TEST_BETON, TRAIN_BETON, convert
from fastcifar.data.loaders import read_metadata
from fastcifar.errors import FastCifarError


@pytest.mark.slow
@pytest.mark.parametrize(("signal_number", "exit_code"), [(signal.SIGINT, 130),
                                                          (signal.SIGTERM, 143)])
def test_signal_stops_training_saves_and_exits_with_the_signal_code(tiny_dataset, tmp_path,
                                                                    signal_number, exit_code):
    command = [sys.executable, "-m", "fastcifar", "train", "--epochs", "50", "--batch-size", "24",
               "--train-subset", "48", "--precision", "fp32", "--workers", "1",
               "--data", str(tiny_dataset),
               "--out", str(tmp_path / "runs"), "--weights", str(tmp_path / "weights")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output = []
    for line in process.stdout:  # wait for the first epoch row, then interrupt
        output.append(line)
        if line.strip().startswith("1 "):
            process.send_signal(signal_number)
            break
    output.append(process.stdout.read())
    assert process.wait(timeout=120) == exit_code, "".join(output)
    text = "".join(output)
    (checkpoint,) = (tmp_path / "runs").glob("*/last.pt")
    assert f"--resume {checkpoint}" in text and "Traceback" not in text
    assert checkpoint.stat().st_size > 1_000_000


def test_two_concurrent_converts_leave_one_valid_result(tiny_imagefolder, tmp_path):
    results, errors = [], []

    def run() -> None:
        try:
            results.append(convert(ConvertConfig(source=tiny_imagefolder, out_dir=tmp_path)))
        except Exception as error:  # surfaced by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(result.skipped for result in results) == [False, True]
    assert read_metadata(tmp_path).train_count == 120
    assert not list(tmp_path.glob("*.tmp"))


def _failing_on_the_test_beton(monkeypatch) -> None:
    """The disk fills up while the second beton is written."""
    real_write = convert_module._write_beton

    def write_then_fail(split, path, workers):
        if TEST_BETON in path.name:  # the temporary file beside it
            raise FastCifarError(f"could not write {path}: No space left on device")
        real_write(split, path, workers)

    monkeypatch.setattr(convert_module, "_write_beton", write_then_fail)


def test_failed_write_leaves_no_metadata_and_no_partial_beton(tiny_imagefolder, tmp_path,
                                                               monkeypatch):
    _failing_on_the_test_beton(monkeypatch)
    with pytest.raises(FastCifarError, match="No space left"):
        convert(ConvertConfig(source=tiny_imagefolder, out_dir=tmp_path))
    assert sorted(path.name for path in tmp_path.iterdir()) == [".convert.lock"]
    with pytest.raises(FastCifarError, match="run `fastcifar convert` first"):
        read_metadata(tmp_path)
    monkeypatch.undo()
    assert not convert(ConvertConfig(source=tiny_imagefolder, out_dir=tmp_path)).skipped
    assert (tmp_path / TRAIN_BETON).exists()


def test_a_failed_forced_conversion_keeps_the_earlier_one_whole(tiny_imagefolder, tmp_path,
                                                                 monkeypatch):
    convert(ConvertConfig(source=tiny_imagefolder, out_dir=tmp_path))
    before = {name: (tmp_path / name).read_bytes() for name in (TRAIN_BETON, TEST_BETON, METADATA)}
    _failing_on_the_test_beton(monkeypatch)
    with pytest.raises(FastCifarError, match="No space left"):
        convert(ConvertConfig(source=tiny_imagefolder, out_dir=tmp_path, force=True))
    # The new train beton was whole, but it never replaced the old one alone.
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert not list(tmp_path.glob("*.tmp")) and read_metadata(tmp_path).train_count == 120


def _dying_writers(monkeypatch, death: str, code: int | None = None) -> None:
    """Make FFCV's writer processes (forked: they inherit these patches) die one way, with
    exit code `code` (3 or 4 unless given)."""
    if death in ("at once", "holding a page"):  # before claiming a page, or after record 0
        # of its chunk claimed page 0: the worker of the next chunk then waits to write its
        # own page after that one, forever, until it is stopped
        real_item = convert_module._SplitDataset.__getitem__
        first_fatal = 1 if death == "holding a page" else 0
        exit_code = 3 if code is None else code
        monkeypatch.setattr(convert_module._SplitDataset, "__getitem__",
                            lambda self, index: os._exit(exit_code) if first_fatal <= index < 1000
                            else real_item(self, index))
    if death == "after its records":  # each worker dies flushing its last page, once the
        # progress loop has seen every record counted and waits for the page lists
        from ffcv.memory_allocator import MemoryAllocator

        def dying_flush(self, *error) -> None:
            time.sleep(0.5)
            os._exit(4 if code is None else code)

        monkeypatch.setattr(MemoryAllocator, "__exit__", dying_flush)


@pytest.mark.parametrize("thread", ["main", "another"])
@pytest.mark.parametrize("death", ["exception", "at once", "holding a page",
                                   "after its records"])
def test_a_beton_writer_process_that_dies_ends_the_write_in_one_line(tmp_path, monkeypatch,
                                                                     death, thread):
    # FFCV's writer polled its workers' progress forever once one had died: of an exception
    # (an IndexError, as more labels than images gave), or at once (a full disk's SIGBUS);
    # and it read their page lists forever when one died flushing its last page. A
    # conversion in another thread than the main one is watched the same way.
    import multiprocessing

    import ffcv.writer
    import numpy as np

    from fastcifar.data.sources import Split
    from fastcifar.errors import MachineFault

    images = 4 if death == "exception" else 2000  # two chunks of 1000 records
    split = Split(np.zeros((images, 32, 32, 3), np.uint8), np.zeros(images * 2, np.int64)
                  if death == "exception" else np.zeros(images, np.int64))
    _dying_writers(monkeypatch, death)
    before = set(multiprocessing.active_children())
    raised: list[BaseException] = []

    def write() -> None:
        try:
            convert_module._write_beton(split, tmp_path / "x.beton", 3)
        except BaseException as error:
            raised.append(error)

    writer = threading.Thread(target=write, daemon=True)
    if thread == "main":
        with _failing_if_the_write_hangs():
            write()
    else:
        writer.start()
        writer.join(180)
        assert not writer.is_alive(), "the write still waited for its dead worker after 180 s"
    assert len(raised) == 1 and isinstance(raised[0], MachineFault), raised
    code = {"exception": 1, "after its records": 4}.get(death, 3)
    assert str(raised[0]).startswith(f"a beton writer process died (exit code {code})")
    assert set(multiprocessing.active_children()) <= before  # no worker left waiting
    assert (ffcv.writer.Process, ffcv.writer.Queue) == (multiprocessing.Process,
                                                        multiprocessing.Queue)
    assert ffcv.writer.sleep is time.sleep


@pytest.mark.parametrize("death", ["at once", "holding a page", "after its records"])
def test_a_beton_writer_process_that_exits_0_early_ends_the_write_in_one_line(tmp_path,
                                                                              monkeypatch, death):
    # Exit code 0 is no death to look for: a worker that exits 0 before its records are
    # counted leaves the progress poll short for good ("at once"; "holding a page" leaves the
    # next worker waiting for its page as well), and one that exits 0 before sending its page
    # list leaves the read of the lists waiting ("after its records").
    import multiprocessing

    import numpy as np

    from fastcifar.data.sources import Split
    from fastcifar.errors import MachineFault

    _dying_writers(monkeypatch, death, code=0)
    before = set(multiprocessing.active_children())
    split = Split(np.zeros((2000, 32, 32, 3), np.uint8), np.zeros(2000, np.int64))
    with _failing_if_the_write_hangs(), pytest.raises(
            MachineFault, match=r"^a beton writer process stopped before finishing its work "
                                r"\(exit code 0\)"):
        convert_module._write_beton(split, tmp_path / "x.beton", 3)
    assert set(multiprocessing.active_children()) <= before


@contextlib.contextmanager
def _failing_if_the_write_hangs(seconds: int = 180):
    """A write in the main thread still waiting after `seconds` fails the test (SIGALRM)
    instead of holding the suite."""
    def hung(signal_number, frame):
        raise AssertionError(f"the write still waited for its writers after {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_convert_whose_writer_died_holding_a_page_exits(tmp_path):
    # With a writer dead and the others stopped, nothing read the work queue: its feeder
    # thread, with 20 chunks still to send, held the process at exit after the error line.
    script = f"""
import os, numpy as np
from fastcifar.data import convert as convert_module
from fastcifar.data.sources import Split
from fastcifar.errors import MachineFault
real_item = convert_module._SplitDataset.__getitem__  # as _dying_writers(..., "holding a page")
convert_module._SplitDataset.__getitem__ = (lambda self, index: os._exit(3)
                                            if 1 <= index < 1000 else real_item(self, index))
split = Split(np.zeros((20_000, 32, 32, 3), np.uint8), np.zeros(20_000, np.int64))
try:
    convert_module._write_beton(split, {str(tmp_path / "x.beton")!r}, 3)
except MachineFault as error:
    print("error:", error)
"""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("error: a beton writer process died (exit code 3)")
    assert "Traceback" not in result.stderr, result.stderr
    assert time.monotonic() - started < 60


def test_atomic_writer_removes_its_temporary_file_on_failure(tmp_path):
    from fastcifar.atomic import atomic_path

    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out.json") as temporary:
        temporary.write_text("half")
        raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_atomic_writer_gives_the_file_the_usual_mode(tmp_path):
    from fastcifar.atomic import write_json

    umask = os.umask(0o022)
    try:
        write_json(tmp_path / "out.json", {"a": 1})
    finally:
        os.umask(umask)
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == 0o644


def test_resume_auto_finds_the_newest_checkpoint(tmp_path):
    from fastcifar.checkpoint import resume_checkpoint

    # The newest by time sorts neither first nor last by name.
    for name in ("a-older", "m-newest", "z-oldest"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "last.pt").write_bytes(b"x")
    for name, seconds_ago in (("a-older", 100), ("m-newest", 10), ("z-oldest", 1000)):
        stamp = time.time() - seconds_ago
        os.utime(tmp_path / name / "last.pt", (stamp, stamp))
    assert resume_checkpoint("auto", tmp_path).parent.name == "m-newest"
    assert resume_checkpoint("runs/x/last.pt", tmp_path) == Path("runs/x/last.pt")
    assert resume_checkpoint(None, tmp_path) is None
    with pytest.raises(FastCifarError, match="no checkpoint"):
        resume_checkpoint("auto", tmp_path / "missing")


def test_metadata_is_written_last_and_records_the_beton_sizes(tiny_imagefolder, tmp_path,
                                                              monkeypatch):
    """The metadata is what makes a folder complete: it is committed after both betons."""
    import fastcifar.atomic

    committed = []
    real_commit = fastcifar.atomic._commit

    def commit(temporary, final):
        real_commit(temporary, final)
        committed.append((final.name, {path.name for path in tmp_path.iterdir()}))

    monkeypatch.setattr(fastcifar.atomic, "_commit", commit)
    convert(ConvertConfig(source=tiny_imagefolder, out_dir=tmp_path))
    assert [name for name, _ in committed] == [TRAIN_BETON, TEST_BETON, METADATA]
    assert METADATA not in committed[1][1]  # absent until both betons were in place
    metadata = json.loads((tmp_path / METADATA).read_text())
    for entry in metadata["betons"].values():
        assert (tmp_path / entry["file"]).stat().st_size == entry["bytes"]
