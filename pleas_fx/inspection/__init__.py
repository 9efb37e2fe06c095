"""What the compiler inferred, in a form a user can read before trusting a merge: the
GroupReport (report.py) and how it is built from a model, with the group-soundness
self-test (groups.py)."""
from pleas_fx.inspection.groups import (
    check_groups, describe_groups, is_hidden, non_float_tensors, randomise_constants, report_from_spec,
    shape_propagate, trace_and_infer,
)
from pleas_fx.inspection.report import (
    DEFAULT_TOLERANCE, CheckResult, FrozenEntry, FrozenReason, GroupEntry, GroupReport, ParamEntry, SiteEntry,
    WithinEntry,
)

__all__ = [
    "CheckResult", "DEFAULT_TOLERANCE", "FrozenEntry", "FrozenReason", "GroupEntry", "GroupReport", "ParamEntry",
    "SiteEntry", "WithinEntry", "check_groups", "describe_groups", "is_hidden", "non_float_tensors",
    "randomise_constants", "report_from_spec", "shape_propagate", "trace_and_infer",
]
