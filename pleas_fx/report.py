"""The merge report (merged.meta["pleas_fx"]) and the phase timer of merge()."""
from __future__ import annotations

import time
from contextlib import contextmanager

from pleas_fx.core.ir import GroupPlan, GroupSpec
from pleas_fx.passes.matching import Matching
from pleas_fx.passes.statistics import Statistics
from pleas_fx.passes.verify import count_parameters


class Timer(dict):
    """Seconds per phase: `with timer("fill"): ...` adds to timer["fill"]."""

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self[phase] = self.get(phase, 0.0) + time.perf_counter() - start


def merge_report(*, spec: GroupSpec, widths: dict[int, int], plans: dict[int, GroupPlan], match: Matching,
                 budget: float, parameters: int, parameters_one_model: int, merged, stats: Statistics,
                 notes: list[str], timings: dict[str, float]) -> dict:
    """What one merged model is: its budget, groups and widths, what was frozen and why, the
    weights mapped rather than solved, the data seen, and the seconds each phase took."""
    groups = []
    for g in spec.mergeable():
        groups.append({
            "id": g.id, "size": g.size, "width": widths[g.id], "merged_pairs": plans[g.id].merged_pairs,
            "params": sorted({p.name for p in g.params}), "sites": len(g.sites),
            "mean_pair_cost": float(match.pair_cost[g.id].mean()) if g.size else 0.0,
        })
    return {
        "matching": match.method,
        "requested_budget": budget,
        "achieved_budget": parameters / parameters_one_model,
        "parameters": parameters,
        "parameters_one_model": parameters_one_model,
        "stored_parameters": count_parameters(merged),
        "groups": groups,
        "frozen": [{"where": r.where, "reason": str(r), "kind": r.kind} for r in spec.frozen_reasons],
        "unmatched_groups": match.unmatched_groups,
        "notes": notes,
        "statistics": {"batches": stats.batches, "samples": stats.samples,
                       "least_squares_nodes": len(stats.least_squares) + len(stats.deferred),
                       "source_moments_deferred": len(stats.deferred), "matching_sites": len(stats.sites)},
        "timings": {k: round(v, 4) for k, v in timings.items()},
    }
