"""Options several commands share, declared once, and the --help panels they sit in."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from fastcifar.command_config import TTA_MODES
from fastcifar.config import DEFAULT_RECIPE, RECIPES, Device, Precision

# The --help panels; the train options' panels are their option groups (train_options).
DATA, OPTIMISATION, AUGMENTATION, SYSTEM = "Data", "Optimisation", "Augmentation", "System"
REGULARISATION, NETWORK, EVALUATION = "Regularisation", "Network", "Evaluation"

# Options several commands share, declared once.
DataOption = Annotated[Path, typer.Option(help="Folder with the converted betons.",
                                          rich_help_panel=DATA)]
TrainSubsetOption = Annotated[int | None, typer.Option(help="Use the first N train images.",
                                                       rich_help_panel=DATA)]
TestSubsetOption = Annotated[int | None, typer.Option(help="Use the first N test images.",
                                                      rich_help_panel=DATA)]
DeviceOption = Annotated[Device, typer.Option(help="auto picks CUDA, then MPS, then CPU.",
                                              rich_help_panel=SYSTEM)]
PrecisionOption = Annotated[Precision, typer.Option(
    help="auto: bf16 on bf16-capable CUDA, else fp16 with a grad scaler; fp32 on MPS; on the "
    "CPU train times fp32 and bf16 on its first batch and keeps the faster, or trains fp32 "
    "untimed in a run of under 16 steps or on a CPU without bf16 in hardware (lr-find and "
    "evaluate use fp32 there).",
    rich_help_panel=SYSTEM)]
WorkersOption = Annotated[int, typer.Option(help="Loader threads, 0 = one per core.",
                                            rich_help_panel=SYSTEM)]


# The --recipe choices: config.RECIPES' names, so a recipe added there is a choice here.
RecipeName = StrEnum("RecipeName", {name: name for name in RECIPES})
DEFAULT_RECIPE_NAME = RecipeName(DEFAULT_RECIPE)
# The --tta choices of train, evaluate and export: command_config.TTA_MODES.
TTAMode = StrEnum("TTAMode", {name: name for name in TTA_MODES})


OPTIMIZER_HELP = ("adam or sgd (default: the recipe's). adam trains every parameter with Adam, "
                  "so on a Muon recipe it turns Muon off.")
