"""The terminal the commands print to, and how an error ends a command: one red line and a
non-zero exit (a traceback only with --debug)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import typer
from rich.console import Console
from rich.text import Text

from fastcifar.errors import FastCifarError, MachineFault, is_out_of_memory

# soft_wrap: a long line is one line, wrapped by the terminal if at all, so a path in it can be
# copied whole; without it a log file or a pipe got a line break at column 80, mid-path.
# markup=False: printed text is never read as Rich markup, so a path or a pip extra in square
# brackets ('fastcifar[export]') is printed whole (Rich dropped such a "tag" before).
console = Console(stderr=False, highlight=False, soft_wrap=True, markup=False)
warnings_console = Console(stderr=True, highlight=False, soft_wrap=True,  # off stdout (--json)
                           markup=False)
_debug = {"on": False}

Result = TypeVar("Result")


def show_tracebacks(on: bool) -> None:
    """--debug: let errors raise with their traceback instead of the one-line exit."""
    _debug["on"] = on


def print_problem(kind: str, message: object) -> None:
    """One line on stderr: `kind` ("error", "warning", "interrupted") coloured, then the
    message as plain text."""
    style = "yellow" if kind == "warning" else "red"
    warnings_console.print(Text.assemble((f"{kind}:", style), f" {message}"))


def fail(error: FastCifarError) -> None:
    """Print the one-line message on stderr (a traceback only with --debug) and exit non-zero:
    1 for a user error, 74 for a machine fault (errors.MACHINE_FAULT_EXIT)."""
    if _debug["on"]:
        raise error
    print_problem("error", error)
    raise typer.Exit(getattr(error, "exit_code", 1))


def run_command(function: Callable[..., Result], *args, **kwargs) -> Result:
    """Call a library function, turning FastCifarError into the one-line exit."""
    try:
        return function(*args, **kwargs)
    except FastCifarError as error:
        fail(error)
    except (MemoryError, RuntimeError) as error:  # train says more (run_faults.py)
        if not is_out_of_memory(error):
            raise
        fail(MachineFault("out of memory: try a smaller --batch-size, or free memory"))
    except KeyboardInterrupt:  # a second Ctrl-C: stop now; checkpoints are written atomically
        if _debug["on"]:
            raise
        print_problem("interrupted", "stopped at once; the last saved checkpoint is intact")
        raise typer.Exit(130) from None
