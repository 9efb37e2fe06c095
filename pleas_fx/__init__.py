"""pleas_fx: merge two same-architecture networks with permutations and least squares
(PLeaS, CVPR 2025), as a graph-rewriting compiler on torch.fx.

Layers, each importing only the ones before it: pleas_fx.core (IR, errors, input binding)
-> pleas_fx.passes (the compiler passes and the op registry) -> pleas_fx.api, pleas_fx.io,
pleas_fx.inspection (the public functions) -> pleas_fx.apps (command line, demo, loaders).
"""
import logging

from pleas_fx import errors  # noqa: F401  (pleas_fx.errors: the public error classes)
from pleas_fx.errors import (ArchitectureMismatchError, BudgetError, DataError, InternalError, PleasError,
                             TraceError, WeightError)
from pleas_fx.passes.ops import OpSpec, register_handler, register_op
from pleas_fx.api import merge
from pleas_fx.io import load, save

logging.getLogger("pleas_fx").addHandler(logging.NullHandler())

__all__ = [
    "merge", "save", "load", "register_op", "register_handler", "OpSpec", "PleasError", "TraceError",
    "ArchitectureMismatchError", "BudgetError", "DataError", "WeightError", "InternalError",
]
__version__ = "0.1.0"
