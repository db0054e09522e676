"""The suite's narrow CustResNet: TEST_WIDTH, and as a script, `fastcifar ARGS` built with it.

The in-process tests get it from conftest.py; tests that start their own processes (torchrun's
ranks) run this file instead of `-m fastcifar`, so they train the same network as the rest."""

TEST_WIDTH = 16  # a quarter of CustResNet's 64: ~1/16 of its FLOPs


# Seconds each train step is held (unset: none): a test that must signal the ranks within a few
# steps paces them, since narrow steps take hundredths of a second.
STEP_SECONDS = "NARROW_CUSTRESNET_STEP_SECONDS"


def pace_steps(seconds: float) -> None:
    """Hold each train step `seconds` longer (timing only: the maths is untouched)."""
    import time

    import fastcifar.training

    step = fastcifar.training.Run.train_step

    def paced(self, *arguments) -> None:
        step(self, *arguments)
        time.sleep(seconds)

    fastcifar.training.Run.train_step = paced


# "RANK:STEP" (unset: none): that torchrun rank runs out of memory once it has taken STEP steps,
# as an allocation refused on one machine of a job would.
OUT_OF_MEMORY_AT = "NARROW_CUSTRESNET_OUT_OF_MEMORY_AT"


def run_out_of_memory_at(rank: int, steps: int) -> None:
    """Make rank `rank`'s train step raise MemoryError once `steps` steps are done."""
    import os

    import fastcifar.training

    step = fastcifar.training.Run.train_step
    this_rank = int(os.environ.get("RANK", "0"))

    def refused(self, *arguments) -> None:
        if this_rank == rank and self.steps >= steps:
            raise MemoryError
        step(self, *arguments)

    fastcifar.training.Run.train_step = refused


if __name__ == "__main__":
    import os
    import sys
    from pathlib import Path

    # The checkout this file is in, first, as `python -m fastcifar` from its root would have it.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import fastcifar.model

    fastcifar.model.CUSTRESNET_WIDTH = TEST_WIDTH
    if os.environ.get(STEP_SECONDS):
        pace_steps(float(os.environ[STEP_SECONDS]))
    if os.environ.get(OUT_OF_MEMORY_AT):
        run_out_of_memory_at(*map(int, os.environ[OUT_OF_MEMORY_AT].split(":")))
    from fastcifar.cli import entry

    sys.argv[0] = "fastcifar"
    entry()
