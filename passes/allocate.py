"""Width allocation: how many features each group keeps apart, under a budget.

Footprint = structural parameters: a merged feature is shared by both models, an unmerged one
belongs to A or to B, and weights between A-only and B-only features are structurally zero
(the least-squares fill keeps them zero). A tensor whose axes have s_i shared and u_i
per-side entries therefore holds prod(s_i + u_i) * 2 - prod(s_i) parameters: one model's
count when everything is merged, exactly two models' when nothing is. Frozen axes are shared.
Since s_i + u_i is axis i's size in one model (A_i), a tensor costs 2 prod(A_i) - prod(s_i),
and s_i = A_i - sum_g c_ig u_g is linear in the groups' unmerged counts u_g = width_g - d_g:
the footprint is a polynomial in the u_g, bilinear for the usual weights with two grouped axes.

With budget_metric="flops" each tensor is weighted by the output positions of the weight nodes
that use it (multiply-accumulates = structural weight entries x output positions, for a forward
pass over example_input; see `mac_weights`); biases, norms, elementwise ops, pooling and
embedding lookups count zero.

Allocations (all return widths d_g + u_g for every mergeable group):
- uniform: every group keeps the same share of its features apart, the largest share whose
  footprint stays within the budget (the original behaviour);
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
from dataclasses import dataclass, field
from math import prod
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from pleas_fx.errors import BudgetError, PleasError
from pleas_fx.ir import GroupSpec, Layout

log = logging.getLogger(__name__)

METRICS = ("params", "flops")
ALLOCATIONS = ("highs", "uniform")
PROXIES = ("cost", "loo")


# --------------------------------------------------------------------------- footprint
@dataclass
class _Tensor:
    name: str
    weight: int  # multiplier: 1 for parameters, output positions for MACs
    axes: list[tuple[int, dict[int, int]]]  # per axis: (size in one model, {group: entries per unit})

    @property
    def full(self) -> int:
        return prod(a for a, _ in self.axes)

    def count(self, u: dict[int, int]) -> int:
        shared = 1
        for a, coef in self.axes:
            shared *= a - sum(c * u[g] for g, c in coef.items())
        return self.weight * (2 * self.full - shared)


@dataclass
class Polynomial:
    """footprint(u) = const + sum_g lin[g] u_g + sum_(g<=h) quad[(g, h)] u_g u_h (integers).

    `exact` is False when some tensor had three or more grouped axes; its shared product is then
    bounded below (see `Footprint.polynomial`), so the polynomial is an upper bound of the
    footprint (sound for a budget constraint) that is exact at u = 0."""

    const: int = 0
    lin: dict[int, int] = field(default_factory=dict)
    quad: dict[tuple[int, int], int] = field(default_factory=dict)
    exact: bool = True

    def add_lin(self, g: int, v: int) -> None:
        if v:
            self.lin[g] = self.lin.get(g, 0) + v

    def add_quad(self, g: int, h: int, v: int) -> None:
        if v:
            key = (g, h) if g <= h else (h, g)
            self.quad[key] = self.quad.get(key, 0) + v

    def __call__(self, u: dict[int, int]) -> int:
        return (self.const + sum(v * u[g] for g, v in self.lin.items())
                + sum(v * u[g] * u[h] for (g, h), v in self.quad.items()))


@dataclass
class Footprint:
    """Size of the merged model as a function of the group widths.

    By default every parameter in `parameter_names` counts its structural entries (metric
    "params"). `weights` (name -> integer multiplier; names missing from it count zero) turns
    this into other linear measures, e.g. multiply-accumulates (`Footprint.flops`)."""

    spec: GroupSpec
    parameter_names: list[str]
    weights: dict[str, int] | None = None
    metric: str = "params"

    def __post_init__(self) -> None:
        self.frozen = self.spec.fixed()
        self.sizes = {g.id: g.size for g in self.spec.mergeable()}
        self.tensors: list[_Tensor] = []
        self.by_group: dict[int, list[int]] = {g: [] for g in self.sizes}
        for name in self.parameter_names:
            weight = 1 if self.weights is None else int(self.weights.get(name, 0))
            if weight == 0:
                continue
            axes = [self._axis(lay) for lay in self.spec.param_layouts[name]]
            idx = len(self.tensors)
            self.tensors.append(_Tensor(name, weight, axes))
            for g in sorted({g for _, coef in axes for g in coef}):
                self.by_group[g].append(idx)
        self.neighbours = {g: sorted({h for t in ts for _, coef in self.tensors[t].axes for h in coef})
                           for g, ts in self.by_group.items()}
        self.base = self.count({g: d for g, d in self.sizes.items()})

    @classmethod
    def flops(cls, gm: fx.GraphModule, spec: GroupSpec, parameter_names: list[str] | None = None) -> "Footprint":
        """Multiply-accumulates of a forward pass over the example input `gm` was shape-propagated
        with (see `mac_weights`)."""
        names = parameter_names if parameter_names is not None else [n for n, _ in gm.named_parameters()]
        return cls(spec, names, mac_weights(gm), "flops")

    def _axis(self, layout: Layout) -> tuple[int, dict[int, int]]:
        full, coef = 0, {}
        for seg in layout:
            rep = seg.inner * seg.outer
            full += seg.size * rep
            if seg.group not in self.frozen and rep and seg.size:
                coef[seg.group] = coef.get(seg.group, 0) + rep
        return full, coef

    # -- exact counts
    def unmerged(self, widths: dict[int, int]) -> dict[int, int]:
        return {g: widths[g] - d for g, d in self.sizes.items()}

    def widths(self, u: dict[int, int]) -> dict[int, int]:
        return {g: d + u[g] for g, d in self.sizes.items()}

    def count(self, widths: dict[int, int]) -> int:
        """Exact footprint at these widths (width of group g in [d_g, 2 d_g])."""
        return self.count_unmerged(self.unmerged(widths))

    def count_unmerged(self, u: dict[int, int]) -> int:
        return sum(t.count(u) for t in self.tensors)

    def delta(self, u: dict[int, int], g: int, step: int) -> int:
        """Exact change of the footprint when u_g changes by `step`."""
        tensors = [self.tensors[i] for i in self.by_group[g]]
        before = sum(t.count(u) for t in tensors)
        u[g] += step
        try:
            after = sum(t.count(u) for t in tensors)
        finally:
            u[g] -= step
        return after - before

    # -- the polynomial (for the MIP)
    def polynomial(self) -> Polynomial:
        """footprint = sum_t w_t (2 prod_i A_i - prod_i s_i) with s_i = A_i - sum_g c_ig u_g, expanded."""
        poly = Polynomial()
        for t in self.tensors:
            grouped = [i for i, (_, coef) in enumerate(t.axes) if coef]
            fixed = prod(a for i, (a, _) in enumerate(t.axes) if i not in grouped)
            poly.const += t.weight * t.full
            if not grouped:
                continue
            if len(grouped) == 1:
                (_, c1) = t.axes[grouped[0]]
                for g, c in c1.items():  # -w fixed (a1 - c1.u): the -w full part cancels in const
                    poly.add_lin(g, t.weight * fixed * c)
                continue
            k = t.weight * fixed
            if len(grouped) > 2:
                # sound bound: with p_i = s_i / A_i in [0, 1], prod_i p_i >= p_1 p_2 - sum_(i>2) (1 - p_i),
                # exact whenever at most two of the axes are widened; the two most variable axes stay exact
                poly.exact = False
                span = lambda i: sum(c * self.sizes[g] for g, c in t.axes[i][1].items()) / max(t.axes[i][0], 1)
                grouped.sort(key=span, reverse=True)
                for i in grouped[2:]:
                    a, coef = t.axes[i]
                    k *= a
                    for g, c in coef.items():  # + w full (1 - p_i) = w (full / A_i) c.u
                        poly.add_lin(g, t.weight * (t.full // a) * c)
            (a1, c1), (a2, c2) = t.axes[grouped[0]], t.axes[grouped[1]]
            # -k (a1 - c1.u)(a2 - c2.u) = -k a1 a2 + k a1 c2.u + k a2 c1.u - k (c1.u)(c2.u)
            # (k a1 a2 = w full, so the constant part cancels against the const added above)
            for g, c in c2.items():
                poly.add_lin(g, k * a1 * c)
            for g, c in c1.items():
                poly.add_lin(g, k * a2 * c)
            for g, cg in c1.items():
                for h, ch in c2.items():
                    poly.add_quad(g, h, -k * cg * ch)
        return poly


def mac_weights(gm: fx.GraphModule) -> dict[str, int]:
    """Parameter name -> output positions summed over the weight nodes that use it.

    A weight node is a Linear or convolution module call, or F.linear / F.conv*d with a
    get_attr weight. Its multiply-accumulates are (weight entries) x (output positions), the
    positions being the output's element count divided by the weight's output-feature count
    (spatial positions x batch for a conv, tokens x batch for a linear). Needs node.meta
    from shape propagation."""
    weights: dict[str, int] = {}
    for node, name, weight in _weight_nodes(gm):
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise PleasError(f"no propagated shape for weight node {node.name}; run shape propagation first")
        positions = prod(meta.shape) // max(weight.shape[0], 1)
        weights[name] = weights.get(name, 0) + positions
    return weights


def _weight_nodes(gm: fx.GraphModule):
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    functions = (F.linear, F.conv1d, F.conv2d, F.conv3d)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, (nn.Linear, *convs)) and isinstance(getattr(mod, "weight", None), torch.Tensor):
                yield node, f"{node.target}.weight", mod.weight
        elif node.op == "call_function" and node.target in functions:
            w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            if isinstance(w, fx.Node) and w.op == "get_attr":
                obj: Any = gm
                for part in w.target.split("."):
                    obj = getattr(obj, part)
                if isinstance(obj, torch.Tensor):
                    yield node, w.target, obj


def measure_macs(gm: fx.GraphModule, example_args: tuple, structural: bool = True) -> int:
    """Multiply-accumulates of `gm`'s weight nodes on `example_args`, counted on the module
    itself: non-zero weight entries (structural=True) or all entries, times output positions."""
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad():
        ShapeProp(gm).propagate(*example_args)
    total = 0
    for node, _, weight in _weight_nodes(gm):
        entries = int(torch.count_nonzero(weight)) if structural else weight.numel()
        total += entries * (prod(node.meta["tensor_meta"].shape) // max(weight.shape[0], 1))
    return total


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
            raise BudgetError("internal error: cannot reduce the footprint below the budget")
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
    from passes.allocate_highs import solve_grid_mip

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
            raise RuntimeError(f"internal error: allocation {achieved} exceeds budget {budget} x {fp.base}")
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
