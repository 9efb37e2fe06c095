"""Width allocation policies: how many features each group keeps apart, under a budget on
the footprint (passes/footprint.py).

Allocations (all return widths d_g + u_g for every mergeable group):
- uniform: every group keeps the same share of its features apart, the largest share whose
  footprint stays within the budget;
- highs: minimise a proxy loss subject to footprint <= budget x one model, as a MIP over a grid
  of width levels (passes/allocate_highs.py), then spend the leftover budget greedily one unit at
  a time, always checked with the exact count.

Proxies are per-group loss curves `loss[g][u]` (length d_g + 1), minimised in sum:
- "cost" (default): the matching costs of the pairs that stay merged. Keeping u features apart
  merges the d - u cheapest pairs; loss[g][u] = (sum of those pair costs) / d_g. Dividing by d_g
  makes each group's loss its mean per-feature normalised cost (a relative error of the group's
  activations), so wide groups do not dominate merely by having more pairs.
- "loo": the paper's proxy (PLeaS appendix A.3): evaluate(model) on the fully merged model and
  on leave-one-out configurations where one group is kept apart, fit a linear accuracy model
  acc ~ acc_0 + sum_g beta_g u_g / d_g, and minimise -sum_g beta_g u_g / d_g (a vanishing
  multiple of the cost proxy breaks ties).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch.fx as fx

from pleas_fx.core.errors import BudgetError, InternalError, PleasError
from pleas_fx.core.ir import GroupSpec
from pleas_fx.passes.allocate_highs import solve_grid_mip
from pleas_fx.passes.footprint import Footprint

log = logging.getLogger(__name__)

METRICS = ("params", "flops")
ALLOCATIONS = ("highs", "uniform")
PROXIES = ("cost", "loo")


# --------------------------------------------------------------------------- uniform
def uniform_widths(spec: GroupSpec, footprint: Footprint, budget: float) -> dict[int, int]:
    """Widths d + floor(t*d) for the largest t in [0, 1] with footprint <= budget * one model."""
    groups = spec.mergeable()
    limit = budget * footprint.base

    def widths(t: float) -> dict[int, int]:
        return {g.id: g.size + int(t * g.size + 1e-9) for g in groups}

    if footprint.count(widths(0.0)) > limit * (1 + 1e-12):
        raise BudgetError(f"budget {budget} is below the size of one model")
    if footprint.count(widths(1.0)) <= limit:
        return widths(1.0)
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if footprint.count(widths(mid)) <= limit:
            lo = mid
        else:
            hi = mid
    return widths(lo)


# --------------------------------------------------------------------------- proxies
def cost_losses(spec: GroupSpec, pair_cost: dict[int, np.ndarray], normalise: str = "size") -> dict[int, np.ndarray]:
    """loss[g][u] = summed cost of the d - u cheapest pairs (the ones merged when u features stay
    apart), divided by d_g (normalise="size") or not ("none")."""
    out = {}
    for g in spec.mergeable():
        c = np.sort(np.clip(np.asarray(pair_cost[g.id], dtype=np.float64), 0.0, None))
        merged_cost = np.concatenate([[0.0], np.cumsum(c)])  # merged_cost[k]: k cheapest pairs
        loss = merged_cost[::-1].copy()  # loss[u] = merged_cost[d - u]
        out[g.id] = loss / max(g.size, 1) if normalise == "size" else loss
    return out


def loo_losses(spec: GroupSpec, build: Callable[[dict[int, int]], Any], evaluate: Callable[[Any], float],
               pair_cost: dict[int, np.ndarray] | None = None, levels: Sequence[float] = (1.0,),
               ) -> tuple[dict[int, np.ndarray], dict]:
    """The paper's leave-one-out proxy. evaluate(build(widths)) is called on the fully merged
    model and, for every group g and level f, on the model where g keeps round(f d_g) features
    apart and every other group is fully merged. beta_g is the least-squares slope (through the
    origin) of the accuracy gain against f; loss[g][u] = -beta_g u / d_g."""
    groups = [g for g in spec.mergeable() if g.size > 0]
    merged = {g.id: g.size for g in spec.mergeable()}
    t0 = time.perf_counter()
    acc0 = float(evaluate(build(dict(merged))))
    evaluations = [{"widths": "merged", "value": acc0}]
    betas = {}
    for g in groups:
        fs, gains = [], []
        for f in levels:
            u = int(round(f * g.size))
            if u <= 0:
                continue
            widths = dict(merged)
            widths[g.id] = g.size + u
            acc = float(evaluate(build(widths)))
            evaluations.append({"group": g.id, "unmerged": u, "value": acc})
            fs.append(u / g.size)
            gains.append(acc - acc0)
        fs_, gains_ = np.asarray(fs), np.asarray(gains)
        betas[g.id] = float(fs_ @ gains_ / (fs_ @ fs_)) if len(fs) else 0.0
    ties = cost_losses(spec, pair_cost) if pair_cost is not None else None
    scale = max([abs(b) for b in betas.values()] + [1e-12])
    out = {}
    for g in spec.mergeable():
        u = np.arange(g.size + 1, dtype=np.float64)
        loss = -betas.get(g.id, 0.0) * u / max(g.size, 1)
        if ties is not None:  # tie-breaker for groups the evaluations cannot tell apart
            loss = loss + 1e-6 * scale * ties[g.id] / max(float(ties[g.id][0]), 1e-30)
        out[g.id] = loss
    info = {"base_value": acc0, "betas": betas, "evaluations": len(evaluations),
            "seconds": time.perf_counter() - t0, "levels": list(levels)}
    return out, info


# --------------------------------------------------------------------------- greedy steps
def greedy_fill(footprint: Footprint, losses: dict[int, np.ndarray], u: dict[int, int], limit: float) -> int:
    """Spend budget one unit at a time on the group with the best loss decrease per footprint
    increase, while the exact footprint stays <= limit. Modifies `u`; returns the steps taken."""
    current = footprint.count_unmerged(u)
    sizes = footprint.sizes
    cache: dict[int, int] = {}

    def delta(g: int) -> int:
        if g not in cache:
            cache[g] = footprint.delta(u, g, +1)
        return cache[g]

    steps = 0
    while True:
        best, best_score = None, -math.inf
        for g, d in sizes.items():
            if u[g] >= d:
                continue
            gain = float(losses[g][u[g]] - losses[g][u[g] + 1])
            if gain <= 0:
                continue
            dlt = delta(g)
            if current + dlt > limit:
                continue
            score = math.inf if dlt <= 0 else gain / dlt
            if score > best_score or (score == best_score and best is not None and gain > best[1]):
                best, best_score = (g, gain), score
        if best is None:
            return steps
        g = best[0]
        current += delta(g)
        u[g] += 1
        steps += 1
        for h in footprint.neighbours.get(g, ()) + [g]:
            cache.pop(h, None)


def greedy_repair(footprint: Footprint, losses: dict[int, np.ndarray], u: dict[int, int], limit: float) -> int:
    """Remove unmerged units (least loss increase per footprint saved) until footprint <= limit."""
    current = footprint.count_unmerged(u)
    steps = 0
    while current > limit:
        best, best_score = None, math.inf
        for g in footprint.sizes:
            if u[g] <= 0:
                continue
            saved = -footprint.delta(u, g, -1)
            if saved <= 0:
                continue
            score = float(losses[g][u[g] - 1] - losses[g][u[g]]) / saved
            if score < best_score:
                best, best_score = g, score
        if best is None:
            raise InternalError("allocate", "greedy repair", "cannot reduce the footprint below the budget")
        current -= -footprint.delta(u, best, -1)
        u[best] -= 1
        steps += 1
    return steps


# --------------------------------------------------------------------------- allocation
def grid_fractions(width_grid: int | Sequence[float]) -> list[float]:
    """Fractions of a group kept apart that the MIP may choose: an integer n gives 0, 1/n, ..., 1."""
    if isinstance(width_grid, (int, np.integer)) and not isinstance(width_grid, bool):
        if width_grid < 1:
            raise PleasError(f"width_grid must be a positive integer or a list of fractions, got {width_grid!r}")
        fracs = [i / int(width_grid) for i in range(int(width_grid) + 1)]
    else:
        try:
            fracs = sorted({float(f) for f in width_grid})
        except TypeError:
            raise PleasError(f"width_grid must be a positive integer or a list of fractions, got {width_grid!r}") from None
        if not fracs or any(not 0.0 <= f <= 1.0 for f in fracs):
            raise PleasError(f"width_grid fractions must lie in [0, 1], got {width_grid!r}")
    return sorted(set(fracs) | {0.0, 1.0})


def check_feasible(footprint: Footprint, budget: float) -> float:
    """The footprint limit for `budget`; BudgetError if even the fully merged model exceeds it."""
    limit = budget * footprint.base
    smallest = footprint.count_unmerged({g: 0 for g in footprint.sizes})
    if smallest > limit * (1 + 1e-12):
        raise BudgetError(
            f"budget {budget} x one model's {footprint.metric} ({limit:.6g}) cannot be met: merging every "
            f"mergeable feature pair still leaves {smallest} ({smallest / max(footprint.base, 1):.4f} x one "
            f"model), the part that frozen groups force")
    return limit


def allocate_widths(spec: GroupSpec, footprint: Footprint, losses: dict[int, np.ndarray], budget: float,
                    width_grid: int | Sequence[float] = 8, time_limit: float = 10.0) -> tuple[dict[int, int], dict]:
    """HiGHS allocation: grid MIP, then exact greedy repair and fill. Returns (widths, info)."""
    limit = check_feasible(footprint, budget)
    t0 = time.perf_counter()
    fracs = grid_fractions(width_grid)
    start = footprint.unmerged(uniform_widths(spec, footprint, budget))
    sol = solve_grid_mip(footprint, losses, limit, fracs, time_limit, start=start, mip_rel_gap=1e-3)
    if sol.u is None:
        log.warning("HiGHS found no grid allocation (%s); starting the greedy steps from the uniform one",
                    sol.status)
    u = dict(sol.u) if sol.u is not None else start
    repaired = greedy_repair(footprint, losses, u, limit)
    filled = greedy_fill(footprint, losses, u, limit)
    info = {
        "mip_status": sol.status, "mip_objective": sol.objective, "mip_gap": sol.gap,
        "mip_seconds": sol.seconds, "mip_columns": sol.columns, "mip_rows": sol.rows,
        "mip_exact_on_grid": sol.exact, "grid": fracs, "repair_steps": repaired, "greedy_steps": filled,
        "objective": float(sum(losses[g][u[g]] for g in u)), "seconds": time.perf_counter() - t0,
    }
    return footprint.widths(u), info


@dataclass
class AllocationOptions:
    """merge()'s allocation keywords, validated up front (before any data pass)."""

    allocation: str = "highs"
    budget_metric: str = "params"
    width_grid: int | Sequence[float] = 8
    time_limit: float = 10.0
    proxy: str = "cost"
    evaluate: Callable[[Any], float] | None = None

    def __post_init__(self) -> None:
        if self.allocation not in ALLOCATIONS:
            raise PleasError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.budget_metric not in METRICS:
            raise PleasError(f"budget_metric must be one of {METRICS}, got {self.budget_metric!r}")
        if self.proxy not in PROXIES:
            raise PleasError(f"proxy must be one of {PROXIES}, got {self.proxy!r}")
        if self.proxy == "loo" and not callable(self.evaluate):
            raise PleasError("proxy='loo' needs evaluate=callable(model) -> float (higher is better)")
        if self.proxy == "loo" and self.allocation == "uniform":
            raise PleasError("proxy='loo' only affects allocation='highs'; uniform allocation uses no proxy")
        if not isinstance(self.time_limit, (int, float)) or isinstance(self.time_limit, bool) or not self.time_limit > 0:
            raise PleasError(f"allocation_time_limit must be a positive number of seconds, got {self.time_limit!r}")
        grid_fractions(self.width_grid)


class WidthAllocator:
    """Chooses the widths for each budget of one merge; the proxy is computed once.

    `footprint` is the parameter footprint merge() already has; with budget_metric="flops" a
    MAC footprint is built from `gm` (shape-propagated). `build(widths) -> model` is needed for
    proxy="loo" only."""

    def __init__(self, spec: GroupSpec, pair_cost: dict[int, np.ndarray], footprint: Footprint,
                 gm: fx.GraphModule, options: AllocationOptions,
                 build: Callable[[dict[int, int]], Any] | None = None) -> None:
        self.spec, self.pair_cost, self.options, self.build = spec, pair_cost, options, build
        if options.budget_metric == "params":
            self.footprint = footprint
        else:
            self.footprint = Footprint.flops(gm, spec, footprint.parameter_names)
            if self.footprint.base <= 0:
                raise BudgetError("budget_metric='flops' needs at least one Linear or convolution on the "
                                  "example input's path")
        self._losses: dict[int, np.ndarray] | None = None
        self.proxy_info: dict = {}
        self.last: dict = {}

    def losses(self) -> dict[int, np.ndarray]:
        if self._losses is None:
            if self.options.proxy == "cost":
                self._losses = cost_losses(self.spec, self.pair_cost)
            else:
                if self.build is None:
                    raise PleasError("proxy='loo' needs a model builder")
                self._losses, self.proxy_info = loo_losses(self.spec, self.build, self.options.evaluate,
                                                           self.pair_cost)
        return self._losses

    def widths(self, budget: float) -> dict[int, int]:
        fp, opts = self.footprint, self.options
        t0 = time.perf_counter()
        if opts.allocation == "uniform":
            check_feasible(fp, budget)
            widths, info = uniform_widths(self.spec, fp, budget), {}
        else:
            widths, info = allocate_widths(self.spec, fp, self.losses(), budget, opts.width_grid, opts.time_limit)
        achieved = fp.count(widths)
        if achieved > budget * fp.base * (1 + 1e-12):
            raise InternalError("allocate", f"budget {budget}", f"allocation {achieved} exceeds budget x {fp.base}")
        self.last = {
            "method": opts.allocation, "proxy": opts.proxy if opts.allocation == "highs" else None,
            "metric": opts.budget_metric, "requested_budget": budget,
            "achieved_budget": achieved / fp.base, "footprint": achieved, "footprint_one_model": fp.base,
            "widths": {g: widths[g] for g in fp.sizes}, "sizes": dict(fp.sizes),
            "unmerged_fraction": {g: (widths[g] - d) / d if d else 0.0 for g, d in fp.sizes.items()},
            "seconds": time.perf_counter() - t0, **info,
        }
        if opts.proxy == "loo" and self.proxy_info:
            self.last["loo"] = self.proxy_info
        return widths

    def report(self) -> dict:
        return dict(self.last)
