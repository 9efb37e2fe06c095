"""pleas_fx: merge two same-architecture networks with permutations and least squares
(PLeaS, CVPR 2025), as a graph-rewriting compiler on torch.fx."""
import logging

from pleas_fx.api import merge
from pleas_fx.errors import (
    ArchitectureMismatchError,
    BudgetError,
    DataError,
    PleasError,
    TraceError,
    WeightError,
)
from passes.registry import register_handler

logging.getLogger("pleas_fx").addHandler(logging.NullHandler())

__all__ = [
    "merge", "register_handler", "PleasError", "TraceError", "ArchitectureMismatchError",
    "BudgetError", "DataError", "WeightError",
]
__version__ = "0.1.0"
