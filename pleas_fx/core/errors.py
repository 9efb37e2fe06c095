"""Errors pleas_fx raises. User errors say what is wrong with the input and where;
InternalError says which pass of pleas_fx failed on which node (a bug to report)."""


class PleasError(Exception):
    """Base class of every error pleas_fx raises on purpose."""


class TraceError(PleasError):
    """A model could not be traced by torch.fx (data-dependent control flow, ...), or its traced
    graph failed to run on the example input (`node`: the name of the node that failed)."""

    def __init__(self, message: str = "", node: str | None = None):
        super().__init__(message)
        self.node = node


class ArchitectureMismatchError(PleasError):
    """The two models do not have the same architecture."""


class BudgetError(PleasError, ValueError):
    """The budget is outside [1, 2] or cannot be met."""


class DataError(PleasError, ValueError):
    """Calibration data or example input of the wrong kind or shape."""


class WeightError(PleasError, ValueError):
    """A model's parameters are unusable (non-finite values, ...)."""


class InternalError(PleasError):
    """pleas_fx itself failed (a bug, not a problem of the user's model): names the pass and
    the node or tensor where it happened."""

    def __init__(self, pass_name: str, where: str, message: str):
        self.pass_name, self.where, self.detail = pass_name, where, message
        super().__init__(
            f"internal error in pleas_fx's {pass_name} pass at {where}: {message}. This is a bug in "
            f"pleas_fx, not a problem with your model; please report it with the model's definition "
            f"and the merge() call"
        )


def one_line(exc: BaseException, limit: int | None = None) -> str:
    """An exception's message on one line (whitespace collapsed), at most `limit` characters;
    the exception's type name when it has no message. For command-line error reports."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if limit is None or len(text) <= limit else text[:limit - 3] + "..."


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message ("" without one): torch.fx appends lines of its
    own (the node being executed) to errors raised inside a graph."""
    text = str(exc)
    return text.splitlines()[0] if text else ""

