"""The exceptions users see: a one-line message they can act on, and an exit code that tells a
script whether to fix its input (1) or the machine (74)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

# sysexits' EX_IOERR: the machine failed (disk full, folder gone, loader died, out of memory).
MACHINE_FAULT_EXIT = 74


class FastCifarError(Exception):
    """A problem the user can fix (bad input, missing data, bad option); printed without traceback."""

    exit_code = 1
    script_message: str | None = None  # what benchmarks/ scripts print, where it differs


def require(condition: bool, message: str) -> None:
    """Raise FastCifarError(message) unless `condition`: the settings' checks in one line each."""
    if not condition:
        raise FastCifarError(message)


class MachineFault(FastCifarError):
    """The machine failed under a valid command: a write, a read or memory. Exit 74."""

    exit_code = MACHINE_FAULT_EXIT


def is_out_of_memory(error: BaseException | None) -> bool:
    """A failed allocation: MemoryError, torch's OutOfMemoryError (CUDA), or the RuntimeError
    torch raises when the CPU allocator is refused, also when another error wraps it (as
    torchinfo's does)."""
    while error is not None:
        if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError" or (
                isinstance(error, RuntimeError)
                and ("out of memory" in str(error) or "can't allocate memory" in str(error))):
            return True
        error = error.__cause__ or error.__context__
    return False


def first_line(error: BaseException) -> str:
    """An exception's first line (its type's name when it has no text): a library's message
    cut to fit inside one of ours."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class WriteFailed(MachineFault):
    """A file could not be written; `path` names it and `cause` says why (strerror)."""

    def __init__(self, path: Path, cause: str) -> None:
        self.path, self.cause = Path(path), cause
        super().__init__(f"could not write {path}: {cause}")


@contextlib.contextmanager
def script_exit() -> Iterator[None]:
    """For the scripts under benchmarks/ (the CLI has terminal.run_command), as a decorator on
    their main(): a FastCifarError anywhere inside (bad input, a failed write) ends the process
    with its one line on stderr and its exit code, not a traceback."""
    try:
        yield
    except FastCifarError as error:
        print(f"error: {error.script_message or error}", file=sys.stderr)
        raise SystemExit(error.exit_code) from None
