"""Every file the project writes goes through here: write `.name.….tmp` beside the target,
fsync, rename. A crash or a full disk never leaves a half file, and any OSError (ENOSPC,
EACCES, EROFS, EIO, a folder gone) becomes one WriteFailed naming the file and the cause."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fastcifar.errors import WriteFailed


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success fsync and rename it into place.

    The body writes the temporary file with Python's own file objects (not a library's
    C-level writer), so that a failed write surfaces here as an OSError."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(handle)
    except OSError as error:
        raise WriteFailed(final, f"its folder cannot be written ({_cause(error)})") from None
    temporary = Path(name)
    try:
        yield temporary
        _commit(temporary, final)
    except OSError as error:
        raise WriteFailed(final, _cause(error)) from None
    finally:
        temporary.unlink(missing_ok=True)


def _commit(temporary: Path, final: Path) -> None:
    """fsync the written file, give it the usual mode and rename it over `final`. (Tests make
    this raise ENOSPC or EACCES to stand for a machine fault at any write.)"""
    with open(temporary, "rb+") as written:
        os.fsync(written.fileno())
    # mkstemp makes the file private (0600); give it the mode a plain open() would.
    os.chmod(temporary, _new_file_mode())
    os.replace(temporary, final)
    _fsync_directory(final.parent)


def _cause(error: OSError) -> str:
    return error.strerror or str(error)


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


def write_text(path: Path, text: str) -> None:
    """Write text atomically (UTF-8)."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_texts(files: dict[Path, str]) -> None:
    """Write several text files as a set: every one is written before any is renamed into
    place, so a failed write (a full disk) leaves none of them new."""
    with contextlib.ExitStack() as stack:
        for path, text in files.items():
            stack.enter_context(atomic_path(path)).write_text(text, encoding="utf-8")


def write_bytes(path: Path, data: bytes) -> None:
    """Write bytes atomically."""
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        handle.write(data)
