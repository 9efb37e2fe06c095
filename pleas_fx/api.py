"""The public entry point: merge() composes the compiler passes."""
from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx

from pleas_fx.data import as_args, checked_batches, generated_batches
from pleas_fx.errors import BudgetError, PleasError
from pleas_fx.ir import GroupPlan, GroupSpec
from passes.allocate import AllocationOptions, Footprint, WidthAllocator
from passes.fill import fill, plan_least_squares
from passes.infer_groups import infer_groups
from passes.matching import activation_matching, weight_matching
from passes.statistics import collect_statistics
from passes.trace import propagate_shapes, trace_pair
from passes.verify import count_parameters, structural_parameters
from passes.widen import widen

log = logging.getLogger("pleas_fx")


class _Timer(dict):
    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self[phase] = self.get(phase, 0.0) + time.perf_counter() - start


def _check_budget(budget: Any) -> list[float]:
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


def merge(
    model_a: torch.nn.Module,
    model_b: torch.nn.Module,
    example_input: Any,
    budget: float | Sequence[float],
    data: Iterable | None = None,
    *,
    matching: str | None = None,
    max_batches: int | None = None,
    generated_batches_count: int = 8,
    ridge: float = 1e-4,
    max_ls_dim: int = 10_000,
    stats_dtype: torch.dtype = torch.float64,
    positions: int | None = 256,
    progress: bool = True,
    seed: int = 0,
    allocation: str = "highs",
    budget_metric: str = "params",
    width_grid: int | Sequence[float] = 8,
    allocation_time_limit: float = 10.0,
    proxy: str = "cost",
    evaluate: Callable[[torch.nn.Module], float] | None = None,
) -> fx.GraphModule | list[fx.GraphModule]:
    """Merge two same-architecture models into one of `budget` x one model's parameters.

    Args:
        model_a, model_b: the source models (never modified).
        example_input: a tensor (or tuple of tensors) the models accept; fixes shapes.
        budget: in [1, 2]; 1 merges every feature pair, 2 keeps both models whole (the
            ensemble). A list of budgets returns one merged model per budget from a single
            statistics pass.
        data: iterable of calibration batches (a tensor, or a tuple/list whose first
            element is the input). None selects the data-free mode: weight matching and
            least-squares statistics from generated inputs shaped like example_input.
        matching: "activation" (default with data) or "weight" (Git Re-Basin, no data).
        max_batches: use at most this many batches of `data`.
        ridge: least-squares ridge, relative to the mean input second moment, pulling
            towards the permute-and-average weights.
        max_ls_dim: weight nodes whose stacked input is larger are mapped, not solved.
        stats_dtype: dtype of the running statistics sums (float64; products are taken in
            the activations' precision, a few thousand rows at a time).
        positions: for convolutions, least-squares statistics use at most this many randomly
            drawn output positions per sample (None: all of them). Their cost is positions x
            (2 x patch size)^2 per sample, the dominant cost on large feature maps; a few
            hundred positions per sample over a few hundred samples estimate the moments
            well (on the README demo, 64, 256 and all 784 positions give the same accuracy
            to 0.3 points at 1/3 and 2/3 of the time).
        progress: tqdm progress bar for the data pass.
        allocation: "highs" (default) chooses every group's width by a MIP solved with HiGHS
            (passes/allocate.py); "uniform" keeps the same share of every group apart.
        budget_metric: "params" (structural parameters) or "flops" (multiply-accumulates of
            Linear/conv layers on example_input); the budget is relative to one model's.
        width_grid: the MIP's width levels: n gives fractions 0, 1/n, ..., 1 of a group kept
            apart (or a list of fractions); leftover budget is then spent one feature at a time.
        allocation_time_limit: seconds HiGHS may spend per budget (best solution found is used).
        proxy: what the allocation maximises: "cost" (least matching cost of the merged pairs)
            or "loo" (the paper's leave-one-out proxy: needs `evaluate`).
        evaluate: for proxy="loo", evaluate(model) -> float, higher is better (e.g. accuracy on
            held-out data); called on len(groups) + 1 merged models.

    Returns:
        An eval-mode torch.fx.GraphModule on example_input's device (or a list, one per
        budget), with a report in `merged.meta["pleas_fx"]`.
    """
    budgets = _check_budget(budget)
    allocation_options = AllocationOptions(allocation, budget_metric, width_grid, allocation_time_limit, proxy, evaluate)
    matching = matching or ("activation" if data is not None else "weight")
    if matching not in ("activation", "weight"):
        raise PleasError(f"matching must be 'activation' or 'weight', got {matching!r}")
    if matching == "activation" and data is None:
        log.info("no data given: activation matching runs on generated inputs")
    timer = _Timer()
    example_args = as_args(example_input)

    with timer("trace"):
        pair = trace_pair(model_a, model_b, example_args)
    gm_a, gm_b = pair.gm_a, pair.gm_b
    with timer("infer_groups"):
        spec = infer_groups(gm_a)
    probes, notes = plan_least_squares(gm_a, spec, max_ls_dim)

    if data is None:
        batches: Iterable = generated_batches(example_args, max_batches or generated_batches_count, seed=seed)
        total = len(batches)
    else:
        batches = checked_batches(data, example_args, max_batches)
        total = max_batches if max_batches is not None else (len(data) if hasattr(data, "__len__") else None)
    sites = [s for g in spec.mergeable() for s in g.sites] if matching == "activation" else []
    with timer("statistics"):
        stats = collect_statistics(gm_a, gm_b, batches, probes, sites, dtype=stats_dtype,
                                   progress=progress, total=total, positions=positions, seed=seed)
    with timer("matching"):
        if matching == "activation":
            match = activation_matching(spec, stats)
        else:
            match = weight_matching(spec, gm_a, gm_b, seed=seed)

    parameter_names = [n for n, _ in gm_a.named_parameters()]
    footprint = Footprint(spec, parameter_names)

    def build(w: dict[int, int]) -> fx.GraphModule:  # a merged model at widths w, for proxy="loo"
        p = {g.id: GroupPlan.from_matching(match.perm[g.id], match.pair_cost[g.id], 2 * g.size - w[g.id])
             for g in spec.mergeable()}
        m = widen(gm_a, spec, w)
        fill(m, gm_a, gm_b, spec, p, probes, stats, ridge=ridge)
        return m.eval()

    allocator = WidthAllocator(spec, match.pair_cost, footprint, gm_a, allocation_options, build)
    results = []
    for b in budgets:
        t_budget = _Timer(timer)
        with t_budget("allocate"):
            widths = allocator.widths(b)
            plans = {
                g.id: GroupPlan.from_matching(match.perm[g.id], match.pair_cost[g.id], 2 * g.size - widths[g.id])
                for g in spec.mergeable()
            }
        with t_budget("widen"):
            merged = widen(gm_a, spec, widths)
        with t_budget("fill"):
            fill_notes = fill(merged, gm_a, gm_b, spec, plans, probes, stats, ridge=ridge)
        with t_budget("verify"):
            _verify(merged, example_args, footprint, spec, plans, widths, b if budget_metric == "params" else 2.0)
        merged.eval()
        merged.meta["pleas_fx"] = _report(spec, widths, plans, match, footprint, b, merged, stats,
                                          notes + fill_notes, dict(t_budget), matching)
        merged.meta["pleas_fx"]["allocation"] = allocator.report()
        results.append(merged)
    return results if isinstance(budget, (list, tuple)) else results[0]


def _verify(merged: fx.GraphModule, example_args: tuple, footprint: Footprint, spec, plans, widths,
            budget: float) -> None:
    counted = structural_parameters(spec, plans, footprint.parameter_names)
    predicted = footprint.count(widths)
    if counted != predicted:
        raise RuntimeError(f"internal error: merged model has {counted} parameters, footprint model says {predicted}")
    if counted > budget * footprint.base + 1e-6:
        raise RuntimeError(f"internal error: {counted} parameters exceed budget {budget} x {footprint.base}")
    for name, t in merged.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise RuntimeError(f"internal error: merged tensor {name} is not finite")
    with torch.no_grad():
        propagate_shapes(merged, example_args)


def _report(spec: GroupSpec, widths, plans, match, footprint: Footprint, budget, merged, stats, notes,
            timings, matching) -> dict:
    groups = []
    for g in spec.mergeable():
        groups.append({
            "id": g.id, "size": g.size, "width": widths[g.id], "merged_pairs": plans[g.id].merged_pairs,
            "params": sorted({p.name for p in g.params}), "sites": len(g.sites),
            "mean_pair_cost": float(match.pair_cost[g.id].mean()) if g.size else 0.0,
        })
    params = structural_parameters(spec, plans, footprint.parameter_names)
    return {
        "method": "pleas",
        "matching": matching,
        "requested_budget": budget,
        "achieved_budget": params / footprint.base,
        "parameters": params,
        "parameters_one_model": footprint.base,
        "dense_parameters": count_parameters(merged),
        "groups": groups,
        "frozen": [{"where": w, "reason": r} for w, r in spec.frozen_reasons],
        "unmatched_groups": match.unmatched_groups,
        "notes": notes,
        "statistics": {"batches": stats.batches, "samples": stats.samples,
                       "least_squares_nodes": len(stats.least_squares), "matching_sites": len(stats.sites)},
        "timings": {k: round(v, 4) for k, v in timings.items()},
    }
