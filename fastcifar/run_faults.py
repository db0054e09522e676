"""How a training run meets a machine fault.

Essential writes (the checkpoint `last.pt`, `run.json`, `metrics.json`, the final weights) end
the run at once; so do out of memory, a dead loader and, under torchrun, another rank's end.
Each ends with one line that names the cause, the last intact checkpoint and the `--resume`
that continues. Non-essential writes (the best-weights copy, the plots) print one warning and
the run goes on."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from fastcifar.distributed import Distributed, lost_rank_cause
from fastcifar.errors import MachineFault, WriteFailed, is_out_of_memory
from fastcifar.terminal import print_problem


class RunFaults:
    """Tracks the last checkpoint known intact and words the line a fault ends the run with."""

    def __init__(self, checkpoint: Path | None, epochs_done: int, batch_size: int,
                 device: torch.device, distributed: Distributed) -> None:
        self.checkpoint, self.epochs_done = checkpoint, epochs_done
        self.batch_size, self.device, self.distributed = batch_size, device, distributed

    def checkpoint_saved(self, path: Path, epochs_done: int) -> None:
        """`path` was written completely: it is now what a fault points the user to."""
        self.checkpoint, self.epochs_done = path, epochs_done

    def how_to_continue(self) -> str:
        if self.checkpoint is None:
            return "no checkpoint was written yet: start the run again once this is fixed"
        return (f"the last intact checkpoint is {self.checkpoint} (saved after epoch "
                f"{self.epochs_done}): continue with the same options plus "
                f"`--resume {self.checkpoint}`")

    def optional_write(self, what: str, write: Callable[[], object]) -> bool:
        """Run a non-essential write; on a write fault print one warning and return False."""
        try:
            write()
        except WriteFailed as error:
            print_problem("warning", f"{error}; {what} skipped, training goes on")
            return False
        return True

    @contextlib.contextmanager
    def end_in_one_line(self) -> Iterator[None]:
        """Turn a machine fault inside the block into one MachineFault line that says how to
        continue from the last intact checkpoint."""
        try:
            yield
        except MachineFault as error:
            raise MachineFault(f"{error}; {self.how_to_continue()}") from error
        except (MemoryError, RuntimeError) as error:
            if is_out_of_memory(error):
                raise self._out_of_memory() from error
            cause = lost_rank_cause(error, self.distributed)
            if cause is None:
                raise
            # One line on each rank left, not a screen-long traceback from the collective.
            raise MachineFault(f"rank {self.distributed.rank} stopped because another rank of "
                               f"the job ended ({cause}): torchrun's summary names it; "
                               f"{self.how_to_continue()}") from error

    def _out_of_memory(self) -> MachineFault:
        # A checkpoint resumes only at its own batch size: a smaller one is a new run.
        smaller = max(1, self.batch_size // 2)
        return MachineFault(f"out of memory on {self.device.type} at --batch-size "
                            f"{self.batch_size}: start a new run with --batch-size {smaller}, "
                            f"or free memory; {self.how_to_continue()}")
