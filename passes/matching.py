"""Matching pass: for every mergeable group, a permutation of B's features onto A's and
the cost of each matched pair (used to choose which pairs to merge under a budget).

Activation matching reads the statistics pass; weight matching (Git Re-Basin's
coordinate descent) reads only the two models' weights and needs no data.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
from scipy.optimize import linear_sum_assignment

from pleas_fx.core.errors import PleasError
from pleas_fx.core.ir import GroupPlan, GroupSpec, ParamAxis, axis_map
from pleas_fx.passes.statistics import Statistics
from pleas_fx.core.fxutil import getattr_path, param_value

log = logging.getLogger(__name__)


@dataclass
class Matching:
    """perm[g][i] = B feature matched to A feature i; pair_cost[g][i] its normalised cost.

    ZipIt! matching also fills `pairs[g]`: (size, 2) features of the stacked space [A; B]
    (B's feature j is size + j), in the greedy order they are merged; `pair_cost[g]` is then
    the cost of each of those pairs, and `perm` is unused.

    `within[g][w]` (activation matching): for group g's within group w, a (size, w size) array;
    row j reorders the entries of B's unit j to line up with the A unit it is matched to."""

    perm: dict[int, np.ndarray]
    pair_cost: dict[int, np.ndarray]
    method: str
    unmatched_groups: list[int]
    pairs: dict[int, np.ndarray] | None = None
    within: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)


@dataclass
class GroupCost:
    """A group's unit-pair cost matrix and, per within group, for every unit pair (i, j) the
    order of B unit j's entries that best matches A unit i (`order[w][i, j]`)."""

    cost: np.ndarray
    order: dict[int, np.ndarray] = field(default_factory=dict)


def _site_cost(stats: Statistics, site) -> np.ndarray | None:
    """E[(z_A,i - z_B,j)^2] / mean second moment at one site; None if unmeasured or non-finite."""
    m = stats.sites.get(site.key)
    if m is None or m.count == 0:
        return None
    sq_a, sq_b = (m.sq_a / m.count).cpu().numpy(), (m.sq_b / m.count).cpu().numpy()
    cross = (m.cross / m.count).cpu().numpy()
    with np.errstate(over="ignore", invalid="ignore"):
        c = sq_a[:, None] + sq_b[None, :] - 2.0 * cross
        scale = 0.5 * (sq_a.mean() + sq_b.mean())
    if not (np.isfinite(c).all() and np.isfinite(scale)):
        # e.g. attention scores holding a mask's finfo.min: no information, skip the site
        log.debug("matching site %s has non-finite moments; skipped", site.key)
        return None
    return c / max(scale, 1e-30)


def dropped_sites(spec: GroupSpec, stats: Statistics) -> list[str]:
    """The measured activation sites whose moments are not finite ("node[axis]"): matching
    leaves them out (e.g. attention scores holding a mask's most negative float)."""
    out = []
    for g in spec.mergeable():
        for site in g.sites:
            m = stats.sites.get(site.key)
            if m is not None and m.count and not all(bool(torch.isfinite(t).all()) for t in (m.cross, m.sq_a, m.sq_b)):
                out.append(f"{site.node}[{site.axis}]")
    return list(dict.fromkeys(out))


def _within_unit_costs(cost: np.ndarray, units: int, align: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """From an entry-level cost (units*w x units*w, unit-major), the per-unit-pair cost (mean
    over the w entries) with each pair's entries aligned by a linear assignment (align=True),
    or entry r with entry r (align=False). Returns (units x units costs, order or None)."""
    w = cost.shape[0] // units
    blocks = cost.reshape(units, w, units, w).transpose(0, 2, 1, 3)  # (i, j, r, s)
    if not align:
        return np.trace(blocks, axis1=2, axis2=3) / w, None
    unit_cost = np.empty((units, units))
    order = np.empty((units, units, w), dtype=np.int64)
    for i in range(units):
        for j in range(units):
            rows, cols = linear_sum_assignment(blocks[i, j])
            order[i, j, rows] = cols
            unit_cost[i, j] = blocks[i, j][rows, cols].sum() / w
    return unit_cost, order


def activation_costs(spec: GroupSpec, stats: Statistics, align: bool = True) -> dict[int, GroupCost | None]:
    """Per group, the cost matrix C[i, j] = E[(z_A,i - z_B,j)^2] (normalised by the mean second
    moment) averaged over its measured activation sites; None where no site was measured.

    Units with within groups (attention heads) are compared entry by entry at their within
    sites: the cost of heads (i, j) is the mean entry cost after the best alignment of j's
    entries to i's (align=True; plain averaging uses align=False: entry r with entry r).
    Units-only sites on tensors that also hold the entries (`Site.unaligned`) are then left out."""
    out: dict[int, GroupCost | None] = {}
    for g in spec.mergeable():
        within_sites = [s for s in g.sites if s.within is not None]
        total, used, order = np.zeros((g.size, g.size)), 0, {}
        for site in g.sites:
            if site.within is None and not (site.unaligned and within_sites):
                c = _site_cost(stats, site)
                if c is not None and site.entries:  # units x entries: entry r with entry r
                    c = _within_unit_costs(c, g.size, align=False)[0]
                if c is not None:
                    total += c
                    used += 1
        for w in dict.fromkeys(s.within for s in within_sites):
            costs = [c for s in within_sites if s.within == w and (c := _site_cost(stats, s)) is not None]
            if not costs:
                continue
            unit_cost, w_order = _within_unit_costs(sum(costs) / len(costs), g.size, align)
            total += len(costs) * unit_cost
            used += len(costs)
            if w_order is not None:
                order[w] = w_order
        out[g.id] = GroupCost(total / used, order) if used else None
    return out


TIE_BREAK = 1e-6  # weight of the weight signatures against the activation costs


def weight_signature_costs(spec: GroupSpec, gm_a: fx.GraphModule, gm_b: fx.GraphModule, group) -> np.ndarray | None:
    """Per unit pair (i of A, j of B), the normalised squared distance between the units'
    sorted weight entries over every parameter axis of the group. Sorting makes it blind to
    how the other axes are permuted, so in a permuted copy the true pairs score 0; it tells
    apart units the calibration data never does (units dead on every sample)."""
    sig_a, sig_b = [], []
    for member in group.params:
        ta = param_value(gm_a, spec, member.name)
        if not (torch.is_tensor(ta) and ta.is_floating_point() and ta.numel()):
            continue
        tb = param_value(gm_b, spec, member.name)
        sig_a.append(_unit_matrix(ta.detach().double(), member, group.id).sort(1).values)
        sig_b.append(_unit_matrix(tb.detach().double(), member, group.id).sort(1).values)
    if not sig_a:
        return None
    a, b = torch.cat(sig_a, 1), torch.cat(sig_b, 1)
    d = torch.cdist(a, b) ** 2
    return (d / max(float(0.5 * ((a * a).sum(1).mean() + (b * b).sum(1).mean())), 1e-30)).cpu().numpy()


def activation_matching(spec: GroupSpec, stats: Statistics, gm_a: fx.GraphModule | None = None,
                        gm_b: fx.GraphModule | None = None) -> Matching:
    """Linear assignment on summed E[(z_A,i - z_B,j)^2] over each group's activation sites;
    within groups take the entry order of each matched unit pair. With the models given, ties
    (units the data cannot tell apart) are broken by the units' weight signatures."""
    perm, pair_cost, unmatched, within = {}, {}, [], {}
    costs = activation_costs(spec, stats)
    for g in spec.mergeable():
        gc = costs[g.id]
        if gc is None:
            unmatched.append(g.id)
            perm[g.id], pair_cost[g.id] = np.arange(g.size), np.zeros(g.size)
            continue
        cost = gc.cost
        signature = weight_signature_costs(spec, gm_a, gm_b, g) if gm_a is not None else None
        if signature is not None:
            cost = cost + TIE_BREAK * max(float(np.abs(cost).mean()), 1e-12) * signature
        rows, cols = linear_sum_assignment(cost)
        perm[g.id] = cols[np.argsort(rows)]
        pair_cost[g.id] = gc.cost[np.arange(g.size), perm[g.id]]
        if gc.order:
            within[g.id] = {}
            for w, order in gc.order.items():
                sigma = np.empty((g.size, order.shape[2]), dtype=np.int64)
                sigma[perm[g.id]] = order[np.arange(g.size), perm[g.id]]
                within[g.id][w] = sigma
    if unmatched:
        log.warning("no activation site measured for %d group(s); they are matched at identity", len(unmatched))
    return Matching(perm, pair_cost, "activation", unmatched, within=within)


def identity_matching(spec: GroupSpec, stats: Statistics | None, gm_a: fx.GraphModule,
                      gm_b: fx.GraphModule) -> Matching:
    """No permutation: feature i of A goes with feature i of B (plain averaging, RegMean).
    The pair costs (which pairs a budget above 1 keeps apart) are activation costs where sites
    were measured, else weight distances."""
    costs = activation_costs(spec, stats, align=False) if stats is not None and stats.sites else {}
    fallback = None
    perm, pair_cost, unmatched = {}, {}, []
    for g in spec.mergeable():
        perm[g.id] = np.arange(g.size)
        if costs.get(g.id) is not None:
            pair_cost[g.id] = np.diagonal(costs[g.id].cost).copy()
            continue
        if fallback is None:
            fallback = weight_matching(spec, gm_a, gm_b, max_iter=0)
        pair_cost[g.id] = fallback.pair_cost[g.id]
        if g.id in fallback.unmatched_groups:
            unmatched.append(g.id)
    return Matching(perm, pair_cost, "identity", unmatched)


def zipit_correlations(spec: GroupSpec, stats: Statistics) -> dict[int, np.ndarray | None]:
    """Per group, the (2d, 2d) correlation matrix of the stacked features [z_A; z_B], averaged
    over its activation sites (needs statistics collected with full_sites=True). A feature
    that never varies correlates 0 with everything."""
    out = {}
    for g in spec.mergeable():
        corr, used = np.zeros((2 * g.size, 2 * g.size)), 0
        for site in g.sites:
            m = stats.sites.get(site.key)
            if m is None or m.count == 0 or site.within is not None or site.entries:  # unit features only
                continue
            if m.aa is None:
                raise PleasError("ZipIt! matching needs within-model site moments (collect_statistics(full_sites=True))")
            n = m.count
            mean = torch.cat([m.sum_a, m.sum_b]) / n
            second = torch.cat([torch.cat([m.aa, m.cross], 1), torch.cat([m.cross.T, m.bb], 1)], 0) / n
            cov = (second - torch.outer(mean, mean)).cpu().double().numpy()
            var = np.clip(np.diagonal(cov), 0.0, None)
            std = np.sqrt(var)
            live = std > 1e-6 * max(float(std.max()), 1e-30)
            inv = np.where(live, 1.0 / np.where(live, std, 1.0), 0.0)
            corr += cov * inv[:, None] * inv[None, :]
            used += 1
        out[g.id] = corr / used if used else None
    return out


def zipit_matching(spec: GroupSpec, stats: Statistics) -> Matching:
    """ZipIt! (Stoica et al., ICLR 2024) feature matching: on the correlation matrix of the
    stacked features of A and B, repeatedly pair the two most correlated features not yet
    paired, within a model or across the two, until every feature is paired. The first k pairs
    of that greedy order are the merges of a group of width 2d - k; the cost of a pair is
    1 - its correlation (plus 1e-6, so that a budget is always spent)."""
    perm, pair_cost, pairs, unmatched = {}, {}, {}, []
    corrs = zipit_correlations(spec, stats)
    for g in spec.mergeable():
        d = g.size
        perm[g.id] = np.arange(d)
        corr = corrs[g.id]
        if corr is None:  # nothing measured: pair A's feature i with B's feature i
            unmatched.append(g.id)
            pairs[g.id] = np.stack([np.arange(d), d + np.arange(d)], 1)
            pair_cost[g.id] = np.ones(d)
            continue
        iu, ju = np.triu_indices(2 * d, k=1)
        order = np.argsort(-corr[iu, ju], kind="stable")
        used = np.zeros(2 * d, dtype=bool)
        chosen, cost = [], []
        for t in order:
            i, j = iu[t], ju[t]
            if used[i] or used[j]:
                continue
            used[i] = used[j] = True
            chosen.append((i, j))
            cost.append(max(1.0 - corr[i, j], 0.0) + 1e-6)  # > 0: keeping a pair apart always gains
            if len(chosen) == d:
                break
        pairs[g.id] = np.asarray(chosen, dtype=np.int64).reshape(-1, 2)
        pair_cost[g.id] = np.asarray(cost)
    if unmatched:
        log.warning("no activation site measured for %d group(s); ZipIt! pairs them at identity", len(unmatched))
    return Matching(perm, pair_cost, "zipit", unmatched, pairs)


def _unit_matrix(tensor: torch.Tensor, member: ParamAxis, group: int) -> torch.Tensor:
    """The entries of `member`'s axis that belong to `group`, as a (units, rest) matrix (every
    segment of the group on the axis, e.g. the q, k and v pieces of a fused projection)."""
    offset, blocks = 0, []
    for seg in member.layout:
        if seg.group == group:
            block = tensor.narrow(member.axis, offset, seg.numel).movedim(member.axis, 0)
            block = block.reshape(seg.outer, seg.size, seg.inner, *block.shape[1:])
            blocks.append(block.transpose(0, 1).reshape(seg.size, -1))
        offset += seg.numel
    if not blocks:
        raise KeyError(group)
    return torch.cat(blocks, 1)


def weight_matching(spec: GroupSpec, gm_a: fx.GraphModule, gm_b: fx.GraphModule,
                    max_iter: int = 50, seed: int = 0) -> Matching:
    """Coordinate descent over groups: each step solves one group's assignment on the
    weights adjacent to it, B's other axes permuted by the current permutations."""
    rng = np.random.default_rng(seed)
    groups = spec.mergeable()
    perm = {g.id: np.arange(g.size) for g in groups}
    frozen = spec.fixed()
    members = {g.id: [m for m in g.params if m.layout] for g in groups}
    tensors_a = {n: param_value(gm_a, spec, n).detach().double() for n in spec.param_layouts
                 if torch.is_tensor(getattr_path(gm_a, n)) and getattr_path(gm_a, n).is_floating_point()}
    tensors_b = {n: param_value(gm_b, spec, n).detach().double() for n in tensors_a}

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

    it = -1
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
