"""FFCV runs each epoch's pipeline in a thread (`EpochIterator`); when that thread dies (a
kernel error, a beton that cannot be read) FFCV's `__next__` waits for a batch forever. These
guards turn a dead loader into one LoaderFailed line, and a beton whose size changed under a
run into another."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from fastcifar.errors import MachineFault, first_line


class LoaderFailed(MachineFault):
    """The data loader stopped before the epoch's last batch."""


# Exceptions that ended loader threads, by thread; filled by the threading hook below.
_thread_failures: dict[threading.Thread, BaseException] = {}
_hook_lock = threading.Lock()
_previous_hook = None
POLL_SECONDS = 0.2  # how often a wait for a batch checks that the loader thread still lives


def _is_loader_thread(thread: threading.Thread | None) -> bool:
    return thread is not None and any(kind.__name__ == "EpochIterator"
                                      for kind in type(thread).__mro__)


def _remember_loader_failure(args: threading.ExceptHookArgs) -> None:
    """threading.excepthook: keep an FFCV loader thread's exception (no traceback printed);
    any other thread's goes to the previous hook."""
    if _is_loader_thread(args.thread):
        _thread_failures[args.thread] = args.exc_value
        return
    _previous_hook(args)


def _install_hook() -> None:
    global _previous_hook
    with _hook_lock:
        if _previous_hook is None:
            _previous_hook = threading.excepthook
            threading.excepthook = _remember_loader_failure


def guarded_batches(loader: Iterable, what: str) -> Iterator:
    """The batches of one pass over `loader`; LoaderFailed (naming `what`) when its worker
    thread dies first. The hook is in place before FFCV starts the thread (`iter` does).
    Loaders without a worker thread (the device-resident ones) pass through."""
    _install_hook()
    iterator = iter(loader)
    queue = getattr(iterator, "output_queue", None)
    if not _is_loader_thread(iterator) or queue is None:
        yield from iterator
        return
    while True:
        while queue.empty():
            if not iterator.is_alive() and queue.empty():
                raise _failure(iterator, what)
            with queue.not_empty:
                queue.not_empty.wait(POLL_SECONDS)
        try:
            batch = next(iterator)
        except StopIteration:
            return
        yield batch


def _failure(thread: threading.Thread, what: str) -> LoaderFailed:
    error = _thread_failures.pop(thread, None)
    if error is None:
        return LoaderFailed(f"the {what} loader stopped without an error")
    reason = first_line(error)
    return LoaderFailed(f"the {what} loader stopped: {type(error).__name__}"
                        + (f": {reason}" if reason != type(error).__name__ else ""))


def check_unchanged(path: Path, size: int) -> None:
    """LoaderFailed when the beton at `path` no longer has the size it was opened with
    (truncated or replaced while a run reads it)."""
    try:
        now = os.stat(path).st_size
    except OSError as error:
        raise LoaderFailed(f"cannot read {path}: {error.strerror}") from None
    if now != size:
        raise LoaderFailed(f"{path} changed while training ({now:,} bytes, {size:,} when the "
                           "run opened it): rerun `fastcifar convert --force`")
