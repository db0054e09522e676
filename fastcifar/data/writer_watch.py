"""FFCV's beton writer, watched: its waits for its worker processes end, as one MachineFault,
when a worker dies or stops early, instead of waiting forever."""

from __future__ import annotations

import contextlib
import ctypes
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

class _RecordedProcess(multiprocessing.Process):
    """FFCV's writer process, recorded for the watch as it starts; it marks its work done in
    shared memory when FFCV's worker function returns, so an exit 0 before that is seen."""

    def start(self) -> None:
        self.work_done = multiprocessing.RawValue(ctypes.c_bool, False)
        _watched_workers.append(self)
        super().start()

    def run(self) -> None:
        super().run()
        self.work_done.value = True


def _raise_on_a_writer_death() -> None:
    """One MachineFault once a watched writer process has exited with an error, or with exit
    code 0 before its work was done (its records or its page list never come then)."""
    codes = [code for code in (worker.exitcode for worker in _watched_workers) if code]
    if codes:
        raise MachineFault(f"a beton writer process died (exit code {codes[0]}): the disk may be "
                           "full; nothing was replaced")
    if any(worker.exitcode == 0 and not worker.work_done.value for worker in _watched_workers):
        raise MachineFault("a beton writer process stopped before finishing its work (exit "
                           "code 0); nothing was replaced")


def _watched_sleep(seconds: float) -> None:
    """The writer's progress poll, which looks at the workers first."""
    _raise_on_a_writer_death()
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
            try:
                return super().get(timeout=WRITER_WATCH_SECONDS)
            except Empty:
                _raise_on_a_writer_death()


@contextlib.contextmanager
def writer_deaths_raise() -> Iterator[None]:
    """FFCV's writer waits forever for a worker process that died (a full disk's SIGBUS, a
    record it could not read). Its two waits, the progress poll and the read of the workers'
    page lists, look at the workers' exit codes in whatever thread converts, and a death ends
    the write as one MachineFault; the other workers are then stopped, and the work queue's
    feeder thread is let go (no worker reads it, and exit would wait for it). Writes in two
    threads at once take turns. A worker that exits 0 before its work is done ends it too."""
    import ffcv.writer

    with _WRITER_WATCH:
        _watched_workers.clear()
        _watched_queues.clear()
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
        if process.pid is None:  # its start failed: nothing to stop
            continue
        process.join(2)
        if process.is_alive():
            process.kill()
            process.join()
