"""The public entry point: merge() composes the compiler passes."""
from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx

from pleas_fx.data import checked_batches, generated_batches
from pleas_fx.errors import BudgetError, DataError, PleasError
from pleas_fx.ir import GroupPlan, GroupSpec
from pleas_fx.procedural import procedural_batches
from passes import methods as methods_
from passes.allocate import AllocationOptions, Footprint, WidthAllocator
from passes.fill import fill, plan_least_squares
from passes.infer_groups import infer_groups
from passes.statistics import Statistics, collect_statistics
from passes.trace import embedding_vocab, getattr_path, model_inputs, propagate_shapes, trace_pair
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


GENERATORS = {"gaussian": generated_batches, "procedural": procedural_batches}
HEADS = ("shared", "separate")


def merge(
    model_a: torch.nn.Module,
    model_b: torch.nn.Module,
    example_input: Any,
    budget: float | Sequence[float],
    data: Iterable | str | Callable | None = None,
    *,
    method: str = "pleas",
    heads: str = "shared",
    repair: bool | None = None,
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
        example_input: a tensor, a tuple of tensors, or a dict of tensors by input name (e.g.
            input_ids and attention_mask; left-out inputs take their defaults) the models
            accept; fixes shapes. Integer inputs (token ids) are never averaged or permuted.
        budget: in [1, 2]; 1 merges every feature pair, 2 keeps both models whole (the
            ensemble). A list of budgets returns one merged model per budget from a single
            statistics pass.
        data: calibration data: an iterable of batches (a tensor, or a tuple/list whose first
            element is the input); or generated inputs shaped like example_input (PLeaS-free):
            "procedural" (structured random images: smooth fields, gratings, stripes, blobs;
            pleas_fx/procedural.py), "gaussian" (white noise), or a function
            `fn(example_args, n_batches, seed) -> list of batches`. None: the data-free mode,
            weight matching and least-squares statistics from Gaussian inputs.
        method: "pleas" (default), or a baseline built from the same passes (passes/methods.py):
            "average" (plain weight averaging), "rebasin_weight" (Git Re-Basin weight matching,
            permuted weights averaged), "permute" (activation matching, permuted weights
            averaged), "zipit" (ZipIt!: features merged within and across models), "regmean"
            (RegMean least squares, no permutations). At a budget above 1 every method keeps
            its worst-matched features apart, with widths from the same allocator.
        heads: "shared" (one output: the label spaces are the same, the heads are averaged) or
            "separate" (different label spaces: everything up to the last weight layer is merged,
            each model keeps its own head on the merged features, and the merged model returns
            the tuple (out_A, out_B); the budget counts one head, the second head is extra and
            reported in meta["pleas_fx"]["extra_head_parameters"]).
        repair: reset every BatchNorm's running statistics on the calibration data after
            merging (REPAIR-style). None: on for the baselines that need it (all but pleas),
            when data is given.
        matching: for method="pleas": "activation" (default with data) or "weight" (Git
            Re-Basin, no data).
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
    how = methods_.get_method(method)
    if heads not in HEADS:
        raise PleasError(f"heads must be one of {HEADS}, got {heads!r}")
    if repair is not None and not isinstance(repair, bool):
        raise PleasError(f"repair must be True, False or None, got {repair!r}")
    user_data = data is not None and not isinstance(data, str) and not callable(data)
    if isinstance(data, str) and data not in GENERATORS:
        raise DataError(f"data must be an iterable of batches, a function, or one of {tuple(GENERATORS)}; got {data!r}")
    matching = methods_.resolve_matching(how, matching, data is not None)
    do_repair = (how.repair and data is not None) if repair is None else repair
    if matching in ("activation", "zipit") and data is None:
        log.info("no data given: activation matching runs on generated inputs")
    timer = _Timer()
    with timer("trace"):
        pair = trace_pair(model_a, model_b, example_input)
    gm_a, gm_b, example_args = pair.gm_a, pair.gm_b, pair.example_args
    inputs = model_inputs(gm_a)
    with timer("infer_groups"):
        spec = infer_groups(gm_a)
    head = _separate_head(spec, gm_a) if heads == "separate" else None
    if how.solve == "mapped":
        probes, notes = [], []
    else:
        probes, notes = plan_least_squares(gm_a, spec, max_ls_dim)

    if not user_data:
        n_gen = max_batches or generated_batches_count
        if callable(data):
            batches: Iterable = list(data(example_args, n_gen, seed))
            if not batches:
                raise DataError("the data function returned no batches")
            batches = list(checked_batches(batches, example_args, None, inputs))
        else:
            batches = GENERATORS[data or "gaussian"](example_args, n_gen, seed=seed, vocab=embedding_vocab(gm_a))
        total = len(batches)
    else:
        batches = checked_batches(data, example_args, max_batches, inputs)
        total = max_batches if max_batches is not None else (len(data) if hasattr(data, "__len__") else None)
        if do_repair:  # read twice: statistics, then BatchNorm repair
            batches = list(batches)
    sites = [s for g in spec.mergeable() for s in g.sites] if methods_.needs_sites(matching, data is not None) else []
    with timer("statistics"):
        if probes or sites:
            stats = collect_statistics(gm_a, gm_b, batches, probes, sites, dtype=stats_dtype,
                                       progress=progress, total=total, positions=positions, seed=seed,
                                       full_sites=matching == "zipit")
        else:
            stats = Statistics()
    with timer("matching"):
        match = methods_.match(matching, spec, stats, gm_a, gm_b, seed=seed)

    parameter_names = [n for n, _ in gm_a.named_parameters()]
    footprint = Footprint(spec, parameter_names)

    def assemble(w: dict[int, int], plans: dict[int, GroupPlan], t: _Timer) -> tuple[fx.GraphModule, list[str]]:
        spec_w, w_w, plans_w = spec, w, plans
        if head is not None:
            spec_w, gid, size = head[:3]
            w_w, plans_w = {**w, gid: 2 * size}, {**plans, gid: GroupPlan.apart(size)}
        with t("widen"):
            m = widen(gm_a, spec_w, w_w)
        with t("fill"):
            fill_notes = fill(m, gm_a, gm_b, spec_w, plans_w, probes, stats, ridge=ridge, solve=how.solve)
        if head is not None:
            _split_output(m, head)
        return m, fill_notes

    def build(w: dict[int, int]) -> fx.GraphModule:  # a merged model at widths w, for proxy="loo"
        return assemble(w, methods_.plans_for(spec, match, w), _Timer())[0].eval()

    allocator = WidthAllocator(spec, match.pair_cost, footprint, gm_a, allocation_options, build)
    results = []
    for b in budgets:
        t_budget = _Timer(timer)
        with t_budget("allocate"):
            widths = allocator.widths(b)
            plans = methods_.plans_for(spec, match, widths)
        merged, fill_notes = assemble(widths, plans, t_budget)
        if do_repair:
            with t_budget("repair"):
                methods_.repair_batchnorm(merged, batches)
        with t_budget("verify"):
            params = _verify(merged, example_args, footprint, spec, plans, widths,
                             b if budget_metric == "params" else 2.0)
        merged.eval()
        merged.meta["pleas_fx"] = _report(spec, widths, plans, match, footprint, b, merged, stats, params,
                                          notes + fill_notes, dict(t_budget), matching)
        merged.meta["pleas_fx"].update({
            "method": how.name, "solve": how.solve, "heads": heads, "repair": do_repair,
            "data": "user" if user_data else (data if isinstance(data, str) else
                                              "function" if callable(data) else "gaussian"),
            "extra_head_parameters": head[3] if head else 0,
        })
        merged.meta["pleas_fx"]["allocation"] = allocator.report()
        results.append(merged)
    return results if isinstance(budget, (list, tuple)) else results[0]


def _separate_head(spec: GroupSpec, gm: fx.GraphModule):
    """For heads="separate": (spec with the output group unfrozen, its id, its size, the
    parameters of the second head). The output must be one tensor whose only grouped axis is a
    group frozen only because it is the network output."""
    import copy
    import dataclasses

    out = next(n for n in gm.graph.nodes if n.op == "output")
    value = out.args[0]
    if not isinstance(value, fx.Node):
        raise PleasError("heads='separate' needs a model that returns a single tensor")
    layouts = spec.node_layouts.get(value.name)
    if not layouts or (layouts and isinstance(layouts[0], list)):
        raise PleasError("heads='separate' needs a model that returns a single tensor")
    candidates = []
    for axis, lay in enumerate(layouts):
        if len(lay) == 1 and lay[0].inner == lay[0].outer == 1 and lay[0].size > 1:
            g = spec.groups[lay[0].group]
            if g.frozen and g.reasons == ["network output"] and any(p.role == "out" for p in g.params):
                candidates.append((axis, g))
    if len(candidates) != 1:
        raise PleasError("heads='separate': cannot find the output's class axis (one axis of the output, "
                         "of at least 2 classes, fed by a weight layer and frozen only as the network output)")
    axis, g = candidates[0]
    spec_h = copy.copy(spec)
    spec_h.groups = dict(spec.groups)
    spec_h.groups[g.id] = dataclasses.replace(g, frozen=False, reasons=[])
    extra = 0
    for name in {p.name for p in g.params}:
        t = getattr_path(gm, name)
        if isinstance(t, torch.nn.Parameter):
            extra += t.numel()
    return spec_h, g.id, g.size, extra, axis


def _split_output(merged: fx.GraphModule, head) -> None:
    """Make the merged model return (out_A, out_B): the widened class axis is A's classes then B's."""
    _, _, size, _, axis = head
    graph = merged.graph
    out = next(n for n in graph.nodes if n.op == "output")
    value = out.args[0]
    with graph.inserting_before(out):
        part_a = graph.call_function(torch.narrow, (value, axis, 0, size))
        part_b = graph.call_function(torch.narrow, (value, axis, size, size))
    out.args = ((part_a, part_b),)
    merged.recompile()


def _verify(merged: fx.GraphModule, example_args: tuple, footprint: Footprint, spec, plans, widths,
            budget: float) -> int:
    """Check the merged model against the footprint model, the budget and the example input;
    returns its parameter count (entries not structurally zero)."""
    counted = structural_parameters(spec, plans, footprint.parameter_names)
    predicted = footprint.count(widths)
    pairwise = all(p.pairwise for p in plans.values())
    if counted > predicted or (pairwise and counted != predicted):
        raise RuntimeError(f"internal error: merged model has {counted} parameters, footprint model says {predicted}")
    if counted > budget * footprint.base + 1e-6:
        raise RuntimeError(f"internal error: {counted} parameters exceed budget {budget} x {footprint.base}")
    for name, t in merged.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise RuntimeError(f"internal error: merged tensor {name} is not finite")
    with torch.no_grad():
        propagate_shapes(merged, example_args)
    return counted


def _report(spec: GroupSpec, widths, plans, match, footprint: Footprint, budget, merged, stats, params: int,
            notes, timings, matching) -> dict:
    groups = []
    for g in spec.mergeable():
        groups.append({
            "id": g.id, "size": g.size, "width": widths[g.id], "merged_pairs": plans[g.id].merged_pairs,
            "params": sorted({p.name for p in g.params}), "sites": len(g.sites),
            "mean_pair_cost": float(match.pair_cost[g.id].mean()) if g.size else 0.0,
        })
    return {
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
