"""`python -m fastcifar` (also what torchrun runs with `-m fastcifar`)."""

from fastcifar.cli import entry

entry()
