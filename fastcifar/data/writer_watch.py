"""FFCV's beton writer, watched: its waits for its worker processes end, as one MachineFault,
when a worker dies or stops early, instead of waiting forever."""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.queues
import os
import threading
import time
from collections.abc import Iterator
from queue import Empty

from fastcifar.errors import MachineFault

WRITER_WATCH_SECONDS = 0.2  # how often a wait for the page lists looks at the writers
_WRITER_WATCH = threading.Lock()  # one watched write per process: the watch patches ffcv.writer
_watched_workers: list[multiprocessing.Process] = []  # the watched write's, under the lock
_watched_queues: list[multiprocessing.queues.Queue] = []
_polls_after_the_exits = 0  # progress polls in a row that found every writer exited


class _RecordedProcess(multiprocessing.Process):
    """FFCV's writer process, recorded for the watch as it starts."""

    def start(self) -> None:
        _watched_workers.append(self)
        super().start()


def _raise_on_a_writer_death() -> None:
    """One MachineFault once a watched writer process has exited with an error."""
    codes = [code for code in (worker.exitcode for worker in _watched_workers) if code]
    if codes:
        raise MachineFault(f"a beton writer process died (exit code {codes[0]}): the disk may be "
                           "full; nothing was replaced")


def _all_writers_exited() -> bool:
    """Whether every watched writer process has exited (whatever its exit code)."""
    return bool(_watched_workers) and all(worker.exitcode is not None
                                          for worker in _watched_workers)


def _stopped_early() -> MachineFault:
    return MachineFault("a beton writer process stopped before finishing its records (exit "
                        "code 0); nothing was replaced")


def _watched_sleep(seconds: float) -> None:
    """The writer's progress poll, which looks at the workers first. A third poll after all of
    them exited read a count that can no longer grow (the second one's read came after the
    exits): a worker that exited 0 early left records uncounted."""
    global _polls_after_the_exits
    _raise_on_a_writer_death()
    _polls_after_the_exits = _polls_after_the_exits + 1 if _all_writers_exited() else 0
    if _polls_after_the_exits >= 3:
        raise _stopped_early()
    time.sleep(seconds)


class _WatchedQueue(multiprocessing.queues.Queue):
    """FFCV's queues; a blocking read in the converting process (of the workers' page lists)
    looks at the workers between short waits. Its forked workers read as before."""

    def __init__(self, maxsize: int = 0) -> None:
        super().__init__(maxsize, ctx=multiprocessing.get_context())
        self._watching = os.getpid()
        _watched_queues.append(self)

    def get(self, block: bool = True, timeout: float | None = None) -> object:
        if getattr(self, "_watching", None) != os.getpid() or not block or timeout is not None:
            return super().get(block, timeout)
        while True:
            exited = _all_writers_exited()  # before the wait: their lists were sent by then
            try:
                return super().get(timeout=WRITER_WATCH_SECONDS)
            except Empty:
                _raise_on_a_writer_death()
                if exited:  # one exited 0 without sending its page list
                    raise _stopped_early() from None


@contextlib.contextmanager
def writer_deaths_raise() -> Iterator[None]:
    """FFCV's writer waits forever for a worker process that died (a full disk's SIGBUS, a
    record it could not read). Its two waits, the progress poll and the read of the workers'
    page lists, look at the workers' exit codes in whatever thread converts, and a death ends
    the write as one MachineFault; the other workers are then stopped, and the work queue's
    feeder thread is let go (no worker reads it, and exit would wait for it). Writes in two
    threads at once take turns. A worker that exits 0 before its work is done ends it too."""
    global _polls_after_the_exits
    import ffcv.writer

    with _WRITER_WATCH:
        _watched_workers.clear()
        _watched_queues.clear()
        _polls_after_the_exits = 0
        real = ffcv.writer.Process, ffcv.writer.sleep, ffcv.writer.Queue
        ffcv.writer.Process, ffcv.writer.sleep, ffcv.writer.Queue = (
            _RecordedProcess, _watched_sleep, _WatchedQueue)
        try:
            yield
        except BaseException:
            for queue in _watched_queues:
                queue.cancel_join_thread()
                queue.close()
            raise
        finally:
            ffcv.writer.Process, ffcv.writer.sleep, ffcv.writer.Queue = real
            _stop_processes(_watched_workers)
            _watched_workers.clear()
            _watched_queues.clear()


def _stop_processes(processes: list[multiprocessing.Process]) -> None:
    """Terminate, then kill, the writer processes still running: after one died the others
    wait for its page forever, and the interpreter would wait for them at exit."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(2)
        if process.is_alive():
            process.kill()
            process.join()
