"""Errors raised for input pleas_fx cannot merge. Each says what is wrong and where."""


class PleasError(Exception):
    """Base class of every error pleas_fx raises on purpose."""


class TraceError(PleasError):
    """A model could not be traced by torch.fx (data-dependent control flow, ...)."""


class ArchitectureMismatchError(PleasError):
    """The two models do not have the same architecture."""


class BudgetError(PleasError, ValueError):
    """The budget is outside [1, 2] or cannot be met."""


class DataError(PleasError, ValueError):
    """Calibration data or example input of the wrong kind or shape."""


class WeightError(PleasError, ValueError):
    """A model's parameters are unusable (non-finite values, ...)."""


def one_line(exc: BaseException, limit: int | None = None) -> str:
    """An exception's message on one line (whitespace collapsed), at most `limit` characters;
    the exception's type name when it has no message. For command-line error reports."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if limit is None or len(text) <= limit else text[:limit - 3] + "..."
