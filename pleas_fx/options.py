"""merge()'s options, validated in one place before any work is done."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from pleas_fx.core.errors import BudgetError, DataError, PleasError
from pleas_fx.passes.allocate import AllocationOptions
from pleas_fx.passes.compact import EMITS
from pleas_fx.passes.heads import HEADS
from pleas_fx.passes.methods import FROZEN_POLICIES, Method, get_method, resolve_matching
from pleas_fx.passes.positions import AUTO

GENERATED = ("gaussian", "procedural")
LAYERNORMS = ("per_model", "shared")  # LayerNorm over a widened axis: each model's features apart, or one
LEAST_SQUARES = ("merged", "source")  # merged-input least squares (default), or the paper's source-input model


def check_budgets(budget: Any) -> list[float]:
    """The budget(s) as a non-empty list of numbers in [1, 2]."""
    budgets = list(budget) if isinstance(budget, (list, tuple)) else [budget]
    if not budgets:
        raise BudgetError("budget list is empty")
    for b in budgets:
        if not isinstance(b, (int, float)) or isinstance(b, bool) or not math.isfinite(b) or not 1.0 <= b <= 2.0:
            raise BudgetError(
                f"budget must be a number in [1, 2] (the merged model's parameters relative to one "
                f"source model), got {b!r}"
            )
    return [float(b) for b in budgets]


@dataclass
class MergeOptions:
    """Every merge() keyword, validated (see merge() for their meaning), plus what follows
    from them: the method's definition, the matching and repair actually used."""

    budgets: list[float]
    many: bool  # merge() was given a list of budgets: it returns a list
    method: Method
    matching: str
    heads: str
    repair: bool
    data: Iterable | str | Callable | None
    max_batches: int | None
    generated_batches_count: int
    ridge: float
    max_ls_dim: int
    stats_dtype: torch.dtype
    positions: int | str | None
    progress: bool | None
    seed: int
    allocation: AllocationOptions
    frozen: str = "model_a"
    least_squares: str = "merged"
    layernorm: str = "per_model"
    emit: str = "compact"
    distill: int = 0
    distill_lr: float = 3e-4
    mixup: bool = True

    @classmethod
    def validated(cls, budget: float | Sequence[float], data: Any, *, method: str = "pleas", heads: str = "shared",
                  repair: bool | None = None, matching: str | None = None, max_batches: int | None = None,
                  generated_batches_count: int = 8, ridge: float = 1e-4, max_ls_dim: int = 10_000,
                  stats_dtype: torch.dtype = torch.float64, positions: int | str | None = AUTO,
                  progress: bool | None = None, seed: int = 0, allocation: str = "highs",
                  budget_metric: str = "params", width_grid: int | Sequence[float] = 8,
                  allocation_time_limit: float = 10.0, proxy: str = "cost",
                  evaluate: Callable[[torch.nn.Module], float] | None = None,
                  frozen: str | None = None, least_squares: str = "merged",
                  layernorm: str = "per_model", emit: str = "compact", distill: int = 0,
                  distill_lr: float = 3e-4, mixup: bool = True) -> "MergeOptions":
        budgets = check_budgets(budget)
        allocation_options = AllocationOptions(allocation, budget_metric, width_grid, allocation_time_limit, proxy,
                                               evaluate)
        how = get_method(method)
        if heads not in HEADS:
            raise PleasError(f"heads must be one of {HEADS}, got {heads!r}")
        if repair is not None and not isinstance(repair, bool):
            raise PleasError(f"repair must be True, False or None, got {repair!r}")
        if isinstance(data, str) and data not in GENERATED:
            raise DataError(f"data must be an iterable of batches, a function, or one of {GENERATED}; got {data!r}")
        if frozen is None:  # the better policy for the least squares in use (tools/bench_frozen.py)
            frozen = "average" if least_squares == "merged" and how.solve == "least_squares" else "model_a"
        if frozen not in FROZEN_POLICIES:
            raise PleasError(f"frozen must be one of {FROZEN_POLICIES}, got {frozen!r}")
        if least_squares not in LEAST_SQUARES:
            raise PleasError(f"least_squares must be one of {LEAST_SQUARES}, got {least_squares!r}")
        if layernorm not in LAYERNORMS:
            raise PleasError(f"layernorm must be one of {LAYERNORMS}, got {layernorm!r}")
        if emit not in EMITS:
            raise PleasError(f"emit must be one of {EMITS}, got {emit!r}")
        if not isinstance(mixup, bool):
            raise PleasError(f"mixup must be True or False, got {mixup!r}")
        if progress is not None and not isinstance(progress, bool):
            raise PleasError(f"progress must be True, False or None (a bar only on a terminal), got {progress!r}")
        for name, value, low in (("max_batches", max_batches, 1), ("generated_batches_count", generated_batches_count, 1),
                                 ("max_ls_dim", max_ls_dim, 1),
                                 ("positions", None if positions == AUTO else positions, 1)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                also = ' or "auto"' if name == "positions" else ""
                raise PleasError(f"{name} must be a positive integer{also}, got {value!r}")
        if not isinstance(ridge, (int, float)) or isinstance(ridge, bool) or not (math.isfinite(ridge) and ridge >= 0):
            raise PleasError(f"ridge must be a finite number >= 0, got {ridge!r}")
        if not isinstance(distill, int) or isinstance(distill, bool) or distill < 0:
            raise PleasError(f"distill must be an integer >= 0 (epochs; 0: off), got {distill!r}")
        if (not isinstance(distill_lr, (int, float)) or isinstance(distill_lr, bool)
                or not (math.isfinite(distill_lr) and distill_lr > 0)):
            raise PleasError(f"distill_lr must be a finite number > 0, got {distill_lr!r}")
        return cls(
            budgets=budgets, many=isinstance(budget, (list, tuple)), method=how,
            matching=resolve_matching(how, matching, data is not None), heads=heads,
            repair=(how.repair and data is not None) if repair is None else repair, data=data,
            max_batches=max_batches, generated_batches_count=generated_batches_count, ridge=float(ridge),
            max_ls_dim=max_ls_dim, stats_dtype=stats_dtype, positions=positions, progress=progress, seed=seed,
            allocation=allocation_options, frozen=frozen, least_squares=least_squares,
            layernorm=layernorm, emit=emit, distill=distill, distill_lr=float(distill_lr), mixup=mixup,
        )

    @property
    def merged_inputs(self) -> bool:
        """Whether weight nodes are re-solved on the merged network's own inputs."""
        return self.least_squares == "merged" and self.method.solve == "least_squares"

    @property
    def user_data(self) -> bool:
        """Whether `data` is the user's own batches (not generated)."""
        return self.data is not None and not isinstance(self.data, str) and not callable(self.data)

    @property
    def data_kind(self) -> str:
        if self.user_data:
            return "user"
        return self.data if isinstance(self.data, str) else "function" if callable(self.data) else "gaussian"
