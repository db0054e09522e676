"""Atomic file output: write `name.tmp…`, fsync, rename, so a crash never leaves a half file."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fastcifar.errors import FastCifarError


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success fsync and rename it into place."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(handle)
    except OSError as error:
        raise FastCifarError(f"cannot write to {final.parent}: {error.strerror}") from error
    temporary = Path(name)
    try:
        yield temporary
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        os.chmod(temporary, _new_file_mode())
        os.replace(temporary, final)
        _fsync_directory(final.parent)
    except OSError as error:
        raise FastCifarError(f"could not write {final}: {error.strerror or error}") from error
    finally:
        temporary.unlink(missing_ok=True)


def _new_file_mode() -> int:
    """0o666 less the process umask: what open() gives a new file."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_directory(folder: Path) -> None:
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def write_json(path: Path, data: object) -> None:
    """Write JSON atomically (indented, UTF-8)."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
