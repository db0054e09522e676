"""Every file the project writes goes through here: write `.name.….tmp` beside the target,
fsync, rename. A crash or a full disk never leaves a half file, and any OSError (ENOSPC,
EACCES, EROFS, EIO, a folder gone) becomes one WriteFailed naming the file and the cause."""

from __future__ import annotations

import contextlib
import contextvars
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fastcifar.errors import WriteFailed

# The (temporary, final) pairs of the file set being written, if any (see file_set).
_PENDING_SET: contextvars.ContextVar[list[tuple[Path, Path]] | None] = contextvars.ContextVar(
    "pending file set", default=None)


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success fsync and rename it into place (inside
    a `file_set`, when the whole set is written).

    The body writes the temporary file with Python's own file objects (not a library's
    C-level writer), so that a failed write surfaces here as an OSError."""
    with _temporary_beside(Path(final)) as temporary:
        yield temporary
        _commit(temporary, Path(final))


@contextlib.contextmanager
def file_set() -> Iterator[None]:
    """Write the files of the block as one set: each is written and fsynced as it comes, and
    none is renamed into place until all are, so a full disk or any error inside the block
    leaves none of them new. (Only a rename failing between two renames, say the folder taken
    away, could split the set.) A set inside a set joins it; a write from another thread is
    not part of it."""
    if _PENDING_SET.get() is not None:
        yield
        return
    pending: list[tuple[Path, Path]] = []
    token = _PENDING_SET.set(pending)
    try:
        yield
        _PENDING_SET.reset(token)
        for temporary, final in pending:
            try:
                _put_in_place(temporary, final)
            except OSError as error:
                raise WriteFailed(final, _cause(error)) from None
    finally:
        if _PENDING_SET.get() is pending:
            _PENDING_SET.reset(token)
        for temporary, _ in pending:  # those renamed into place are gone already
            temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def _temporary_beside(final: Path) -> Iterator[Path]:
    """A fresh temporary file beside `final`, removed at the end unless renamed or queued in
    a file set; an OSError inside becomes a WriteFailed naming `final`."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(handle)
    except FileExistsError:  # a file stands where a folder of the path should be
        raise WriteFailed(final, "its folder cannot be written "
                          f"({os.strerror(errno.ENOTDIR)})") from None
    except OSError as error:
        raise WriteFailed(final, f"its folder cannot be written ({_cause(error)})") from None
    temporary = Path(name)
    try:
        yield temporary
    except OSError as error:
        raise WriteFailed(final, _cause(error)) from None
    finally:
        if not any(temporary == queued for queued, _ in _PENDING_SET.get() or ()):
            temporary.unlink(missing_ok=True)


def _commit(temporary: Path, final: Path) -> None:
    """fsync the written file, give it the usual mode and rename it over `final`: now, or with
    the rest of its file set. (Tests make this raise ENOSPC or EACCES to stand for a machine
    fault at any write.)"""
    _make_durable(temporary)
    pending = _PENDING_SET.get()
    if pending is None:
        _put_in_place(temporary, final)
    else:
        pending.append((temporary, final))


def _make_durable(temporary: Path) -> None:
    """fsync the written file and give it the mode a plain open() would (mkstemp's is 0600)."""
    with open(temporary, "rb+") as written:
        os.fsync(written.fileno())
    os.chmod(temporary, _new_file_mode())


def _put_in_place(temporary: Path, final: Path) -> None:
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


def check_can_write(*paths: Path) -> None:
    """Raise WriteFailed now if any of `paths` could not be written later (a folder in its place,
    a file in the way of its folder, a folder that cannot be made or written to), so that a long
    job finds out before it runs rather than after. Leaves nothing behind: a trial file beside
    each path, and the folders made for it, are removed."""
    for path in map(Path, paths):
        if path.is_dir():
            raise WriteFailed(path, f"it is a folder ({os.strerror(errno.EISDIR)})")
        made = [folder for folder in path.parents if not folder.exists()]  # deepest first
        try:
            with _temporary_beside(path):
                pass
        finally:
            for folder in made:
                with contextlib.suppress(OSError):  # not empty: another writer's by now
                    folder.rmdir()


def write_json(path: Path, data: object) -> None:
    """Write JSON atomically (indented, UTF-8)."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def write_text(path: Path, text: str) -> None:
    """Write text atomically (UTF-8)."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_texts(files: dict[Path, str]) -> None:
    """Write several text files as a set (`file_set`): a fault leaves none of them new."""
    with file_set():
        for path, text in files.items():
            write_text(path, text)


def write_bytes(path: Path, data: bytes) -> None:
    """Write bytes atomically."""
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        handle.write(data)
