"""The public error classes (defined in pleas_fx.core.errors)."""
from pleas_fx.core.errors import (  # noqa: F401
    ArchitectureMismatchError,
    BudgetError,
    DataError,
    InternalError,
    PleasError,
    TraceError,
    WeightError,
    one_line,
)

__all__ = ["ArchitectureMismatchError", "BudgetError", "DataError", "InternalError", "PleasError", "TraceError",
           "WeightError", "one_line"]
