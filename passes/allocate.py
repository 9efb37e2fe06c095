"""Width allocation: how many features each group keeps apart, under a parameter budget.

Footprint = structural parameters: a merged feature is shared by both models, an unmerged one
belongs to A or to B, and weights between A-only and B-only features are structurally zero
(the least-squares fill keeps them zero). A tensor whose axes have s_i shared and u_i
per-side entries therefore holds prod(s_i + u_i) * 2 - prod(s_i) parameters: one model's
count when everything is merged, exactly two models' when nothing is. Frozen axes are shared.
Uniform allocation gives every group the same share of unmerged features, the largest share
whose footprint stays within the budget.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

from pleas_fx.errors import BudgetError
from pleas_fx.ir import GroupSpec, Layout


@dataclass
class Footprint:
    """Parameter count of the merged model as a function of group widths."""

    spec: GroupSpec
    parameter_names: list[str]

    def __post_init__(self) -> None:
        self.frozen = {g.id for g in self.spec.groups.values() if g.frozen}
        self.base = self.count({g.id: g.size for g in self.spec.mergeable()})

    def _axis(self, layout: Layout, widths: dict[int, int]) -> tuple[int, int]:
        """(shared entries, entries per side) of an axis at these widths."""
        shared = side = 0
        for seg in layout:
            rep = seg.inner * seg.outer
            if seg.group in self.frozen:
                shared += seg.size * rep
            else:
                unmerged = widths[seg.group] - seg.size
                shared += (seg.size - unmerged) * rep
                side += unmerged * rep
        return shared, side

    def count(self, widths: dict[int, int]) -> int:
        total = 0
        for name in self.parameter_names:
            axes = [self._axis(lay, widths) for lay in self.spec.param_layouts[name]]
            total += 2 * prod(s + u for s, u in axes) - prod(s for s, _ in axes)
        return total


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
