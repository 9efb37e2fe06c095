"""Matching pass: for every mergeable group, a permutation of B's features onto A's and
the cost of each matched pair (used to choose which pairs to merge under a budget).

Activation matching reads the statistics pass; weight matching (Git Re-Basin's
coordinate descent) reads only the two models' weights and needs no data.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
from scipy.optimize import linear_sum_assignment

from pleas_fx.ir import GroupPlan, GroupSpec, ParamAxis, axis_map
from passes.statistics import Statistics
from passes.trace import getattr_path

log = logging.getLogger(__name__)


@dataclass
class Matching:
    """perm[g][i] = B feature matched to A feature i; pair_cost[g][i] its normalised cost."""

    perm: dict[int, np.ndarray]
    pair_cost: dict[int, np.ndarray]
    method: str
    unmatched_groups: list[int]


def activation_matching(spec: GroupSpec, stats: Statistics) -> Matching:
    """Linear assignment on summed E[(z_A,i - z_B,j)^2] over each group's activation sites."""
    perm, pair_cost, unmatched = {}, {}, []
    for g in spec.mergeable():
        cost = np.zeros((g.size, g.size))
        used = 0
        for site in g.sites:
            m = stats.sites.get((site.node, site.axis))
            if m is None or m.count == 0:
                continue
            sq_a, sq_b = (m.sq_a / m.count).cpu().numpy(), (m.sq_b / m.count).cpu().numpy()
            cross = (m.cross / m.count).cpu().numpy()
            c = sq_a[:, None] + sq_b[None, :] - 2.0 * cross
            scale = 0.5 * (sq_a.mean() + sq_b.mean())
            cost += c / max(scale, 1e-30)
            used += 1
        if used == 0:
            unmatched.append(g.id)
            perm[g.id], pair_cost[g.id] = np.arange(g.size), np.zeros(g.size)
            continue
        cost /= used
        rows, cols = linear_sum_assignment(cost)
        perm[g.id] = cols[np.argsort(rows)]
        pair_cost[g.id] = cost[np.arange(g.size), perm[g.id]]
    if unmatched:
        log.warning("no activation site measured for %d group(s); they are matched at identity", len(unmatched))
    return Matching(perm, pair_cost, "activation", unmatched)


def _unit_matrix(tensor: torch.Tensor, member: ParamAxis, group: int) -> torch.Tensor:
    """The entries of `member`'s axis that belong to `group`, as a (units, rest) matrix."""
    offset = 0
    for seg in member.layout:
        if seg.group == group:
            block = tensor.narrow(member.axis, offset, seg.numel).movedim(member.axis, 0)
            block = block.reshape(seg.outer, seg.size, seg.inner, *block.shape[1:])
            return block.transpose(0, 1).reshape(seg.size, -1)
        offset += seg.numel
    raise KeyError(group)


def weight_matching(spec: GroupSpec, gm_a: fx.GraphModule, gm_b: fx.GraphModule,
                    max_iter: int = 50, seed: int = 0) -> Matching:
    """Coordinate descent over groups: each step solves one group's assignment on the
    weights adjacent to it, B's other axes permuted by the current permutations."""
    rng = np.random.default_rng(seed)
    groups = spec.mergeable()
    perm = {g.id: np.arange(g.size) for g in groups}
    frozen = {g.id for g in spec.groups.values() if g.frozen}
    members = {g.id: [m for m in g.params if m.layout] for g in groups}
    tensors_a = {n: getattr_path(gm_a, n).detach().double() for n in spec.param_layouts
                 if torch.is_tensor(getattr_path(gm_a, n)) and getattr_path(gm_a, n).is_floating_point()}
    tensors_b = {n: getattr_path(gm_b, n).detach().double() for n in tensors_a}

    def permuted_b(name: str, skip_axis: int) -> torch.Tensor:
        t = tensors_b[name]
        plans = {g: GroupPlan(len(p), p, p) for g, p in perm.items()}
        for axis, lay in enumerate(spec.param_layouts[name]):
            if axis == skip_axis or all(s.group in frozen for s in lay):
                continue
            t = t.index_select(axis, torch.as_tensor(axis_map(lay, plans, frozen).idx_a, device=t.device))
        return t

    def similarity(gid: int) -> torch.Tensor:
        sim = None
        for m in members[gid]:
            if m.name not in tensors_a:
                continue
            a = _unit_matrix(tensors_a[m.name], m, gid)
            b = _unit_matrix(permuted_b(m.name, m.axis), m, gid)
            sim = a @ b.T if sim is None else sim + a @ b.T
        return sim

    for it in range(max_iter):
        improved = False
        for idx in rng.permutation(len(groups)):
            g = groups[idx]
            sim = similarity(g.id)
            if sim is None:
                continue
            s = sim.cpu().numpy()
            rows, cols = linear_sum_assignment(s, maximize=True)
            new = cols[np.argsort(rows)]
            old_score = s[np.arange(g.size), perm[g.id]].sum()
            new_score = s[np.arange(g.size), new].sum()
            if new_score > old_score + 1e-9 * max(abs(old_score), 1.0):
                perm[g.id] = new
                improved = True
        if not improved:
            break
    log.info("weight matching converged after %d sweep(s)", it + 1)

    pair_cost, unmatched = {}, []
    for g in groups:
        if not any(m.name in tensors_a for m in members[g.id]):
            unmatched.append(g.id)
            pair_cost[g.id] = np.zeros(g.size)
            continue
        cost = np.zeros(g.size)
        scale = 0.0
        for m in members[g.id]:
            if m.name not in tensors_a:
                continue
            a = _unit_matrix(tensors_a[m.name], m, g.id)
            b = _unit_matrix(permuted_b(m.name, m.axis), m, g.id)[torch.as_tensor(perm[g.id])]
            cost += ((a - b) ** 2).sum(1).cpu().numpy()
            scale += float(0.5 * ((a ** 2).sum(1).mean() + (b ** 2).sum(1).mean()))
        pair_cost[g.id] = cost / max(scale, 1e-30)
    return Matching(perm, pair_cost, "weight", unmatched)
