"""pleas_fx: merge two same-architecture networks with permutations and least squares
(PLeaS, CVPR 2025), as a graph-rewriting compiler on torch.fx."""
import logging

from pleas_fx.errors import (
    ArchitectureMismatchError,
    BudgetError,
    DataError,
    PleasError,
    TraceError,
    WeightError,
)

logging.getLogger("pleas_fx").addHandler(logging.NullHandler())

__all__ = [
    "merge", "register_handler", "PleasError", "TraceError", "ArchitectureMismatchError",
    "BudgetError", "DataError", "WeightError",
]
__version__ = "0.1.0"

_LAZY = {"merge": ("pleas_fx.api", "merge"), "register_handler": ("passes.registry", "register_handler"),
         "save": ("pleas_fx.io", "save"), "load": ("pleas_fx.io", "load")}


def __getattr__(name):
    # Resolved on first use: the passes import pleas_fx's IR and errors, so importing them
    # eagerly here would make `import passes.x` before `import pleas_fx` circular.
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'pleas_fx' has no attribute {name!r}")
