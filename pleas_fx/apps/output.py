"""The commands' own output: a command's result on standard output, its error line on standard
error. Library modules (pleas_fx.core, passes, pleas_fx.api) log through `logging` and write
to neither; the commands write only through these two functions."""
from __future__ import annotations

import sys


def say(*lines: str) -> None:
    """Write a command's result, one line each (no argument: an empty line)."""
    sys.stdout.write("".join(f"{line}\n" for line in lines) if lines else "\n")


def error(message: str) -> None:
    """Write a command's error line to standard error."""
    sys.stderr.write(f"{message}\n")
