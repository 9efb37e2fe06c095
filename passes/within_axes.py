"""Parameter axes of within entries whose units sit on another axis of the same tensor.

A grouped convolution's weight (out, in per group, k, k) holds on axis 1 the input entries of
one conv group, and the group (the unit) is given by the row on axis 0: the within permutation
that axis 1 takes depends on the row. An axis map (pleas_fx.core.ir.axis_map) is one axis and
cannot say that, so such axes are mapped as fixed (identity) axes after B's tensor is realigned
here, row by row, by the within permutation of B's unit in that row. Model A's entries are never
reordered (plans reorder only B's within entries).
"""
from __future__ import annotations

import numpy as np
import torch

from pleas_fx.core.ir import GroupPlan, GroupSpec, Layout


def dependent_axes(spec: GroupSpec, layouts: list[Layout]) -> list[tuple[int, int, int]]:
    """(within axis, unit axis, within group) for every axis of a parameter that is one whole
    live within group whose parent's units are on exactly one other axis."""
    out = []
    for axis, lay in enumerate(layouts):
        if len(lay) != 1 or lay[0].inner != 1 or lay[0].outer != 1:
            continue
        g = spec.groups.get(lay[0].group)
        if g is None or g.parent is None or g.parent < 0 or g.frozen:
            continue
        units = [i for i, other in enumerate(layouts) if i != axis and any(s.group == g.parent for s in other)]
        if len(units) == 1:
            out.append((axis, units[0], g.id))
    return out


def _row_orders(layout: Layout, parent: int, sigma: np.ndarray) -> np.ndarray:
    """Per entry of the unit axis, the order of the within entries (sigma's row of its unit;
    identity on entries of other groups)."""
    w = sigma.shape[1]
    offset, rows = 0, []
    for seg in layout:
        if seg.group == parent:
            units = (np.arange(seg.numel) // seg.inner) % seg.size
            rows.append(sigma[units])
        else:
            rows.append(np.broadcast_to(np.arange(w), (seg.numel, w)))
        offset += seg.numel
    return np.concatenate(rows) if rows else np.zeros((0, w), dtype=np.int64)


def realign_b(tensor: torch.Tensor, spec: GroupSpec, layouts: list[Layout], plans: dict[int, GroupPlan]) -> torch.Tensor:
    """B's `tensor` with every dependent within axis reordered per unit by the plans' within
    permutations (the tensor itself where there is none)."""
    for axis, unit_axis, w in dependent_axes(spec, layouts):
        parent = spec.groups[w].parent
        plan = plans.get(parent)
        sigma = plan.within.get(w) if plan is not None and plan.within else None
        if sigma is None:
            continue
        orders = torch.as_tensor(_row_orders(layouts[unit_axis], parent, np.asarray(sigma, dtype=np.int64)),
                                 device=tensor.device)
        t = tensor.movedim((unit_axis, axis), (0, 1))
        idx = orders.reshape(*orders.shape, *[1] * (t.dim() - 2)).expand_as(t)
        tensor = torch.gather(t, 1, idx).movedim((0, 1), (unit_axis, axis))
    return tensor
