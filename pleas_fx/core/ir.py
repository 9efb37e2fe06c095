"""The intermediate representation shared by every pass.

A *layout* describes how one tensor axis is built from permutation groups: a sequence
of contiguous *segments*; inside a segment, axis index = offset + o*(size*inner) + u*inner + r
for unit u of the group, inner position r and outer repetition o. A plain channel axis is one
segment (inner = outer = 1); flattening NCHW gives inner = H*W; a concat gives several segments.

A segment may also carry a *within* group: the `inner` entries of each unit are then permuted
by a permutation of their own, one per unit (attention: the head_dim entries of each head,
q and k sharing one such group, v and the output projection another). Within groups never
change a width; their permutations live in the parent group's plan (`GroupPlan.within`).

A *group plan* says, for one group, which features of A and B become which merged feature.
Everything a transformation pass needs is computed from layouts and plans by the helpers
at the end of this module, so passes never talk to each other directly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pleas_fx.core.freeze import FreezeReason


# --------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class Segment:
    """`size` permutable units of group `group`, each `inner` contiguous entries, the whole
    block repeated `outer` times. `within`: a group permuting blocks of each unit's inner
    entries (inner = within size x block), separately for every unit; None: no such group."""

    group: int
    size: int
    inner: int = 1
    outer: int = 1
    within: int | None = None

    @property
    def numel(self) -> int:
        return self.size * self.inner * self.outer


Layout = tuple[Segment, ...]


def layout_numel(layout: Layout) -> int:
    return sum(s.numel for s in layout)


@dataclass(frozen=True)
class ParamAxis:
    """One axis of a parameter or buffer (`name` is its qualified name in the model).

    role "out": the axis carries features (merged entries average the two sides);
    role "in": the axis is contracted with an input activation (entries are copied)."""

    name: str
    axis: int
    layout: Layout
    role: str = "out"


@dataclass(frozen=True)
class Site:
    """An activation (fx node output) whose axis `axis` is exactly one plain segment of a group:
    where activation matching measures the features.

    A site with `within` set measures a group's units together with their within-group entries
    (d units x w entries, unit-major): either `axis` is one segment of the group carrying
    `within` (inner = w), or `axis` holds the units and `within_axis` the w entries. A site with
    `start` set measures entries [start, start + size) of the axis: one plain segment of an axis
    made of several (a concat's piece), for groups seen nowhere else."""

    node: str
    axis: int
    within: int | None = None
    within_axis: int | None = None
    # a units-only site on a tensor also holding the units' within entries: matching that aligns entries leaves it out
    unaligned: bool = False
    start: int | None = None
    size: int | None = None
    entries: bool = False  # the axis is units x entries in a fixed order (no within group): unit costs compare r with r

    @property
    def key(self) -> tuple:
        """The key of this site's moments in the statistics."""
        if self.start is not None:
            return (self.node, self.axis, "segment", self.start)
        return (self.node, self.axis) if self.within_axis is None else (self.node, self.axis, self.within_axis)


@dataclass
class Group:
    """A permutation group: `size` features that must be permuted together."""

    id: int
    size: int
    frozen: bool = False
    reasons: list[FreezeReason] = field(default_factory=list)
    params: list[ParamAxis] = field(default_factory=list)
    sites: list[Site] = field(default_factory=list)
    parent: int | None = None  # a within group: the group whose units it permutes inside


@dataclass
class GroupSpec:
    """Result of group inference: every group, the layout of every parameter axis and of
    every node output axis (`node_layouts[name]` is a list of layouts per dim, or a list of
    such lists for tuple outputs, or None for non-tensors).

    Parameters are named once: a tensor shared by several modules (tied weights) appears
    under its first name, and `aliases` maps its other names to that one. `broadcast_axes`
    lists (parameter, axis) where the tensor has one entry broadcast over a feature axis (a
    PReLU's shared slope, a scalar gate): the layout is that feature axis, and the merged model
    stores the entry per feature, so features kept apart keep their own model's value."""

    groups: dict[int, Group]
    param_layouts: dict[str, list[Layout]]
    param_roles: dict[str, list[str]]
    node_layouts: dict[str, Any]
    frozen_reasons: list[FreezeReason]  # limitations (not structural axes), in graph order
    aliases: dict[str, str] = field(default_factory=dict)
    broadcast_axes: set[tuple[str, int]] = field(default_factory=set)

    def mergeable(self) -> list[Group]:
        """Groups whose width a merge chooses (within groups never change a width)."""
        return [g for g in self.groups.values() if not g.frozen and g.parent is None]

    def within_groups(self, parent: int) -> list[Group]:
        """The live within groups of group `parent` (e.g. a heads group's q/k and v/proj groups)."""
        return [g for g in self.groups.values() if g.parent == parent and not g.frozen]

    def fixed(self) -> set[int]:
        """Groups that keep their size in every merge: frozen groups and within groups."""
        return {g.id for g in self.groups.values() if g.frozen or g.parent is not None}


# --------------------------------------------------------------------------- merge plans
@dataclass
class GroupPlan:
    """Which A and B features form each merged feature of one group.

    `src_a[f]` / `src_b[f]` is the A / B feature feeding merged feature f, or -1. Merged
    features where both are set average the two sides; the others copy one side.

    ZipIt!-style plans may also merge two features *of the same model*: `src_a2[f]` /
    `src_b2[f]` is then a second A / B feature of merged feature f (-1 where there is none;
    None: no such merges, the usual case). A merged feature averages all its sources (weight
    1/n each in M); every source feature is copied back from it (weight 1 in U). Every
    feature of A and of B feeds exactly one merged feature."""

    size: int
    src_a: np.ndarray
    src_b: np.ndarray
    src_a2: np.ndarray | None = None
    src_b2: np.ndarray | None = None
    # within group id -> (size, w) array: B's unit j enters the merged model with its within
    # entries reordered, merged entry r reading B's entry within[W][j, r] (absent: identity)
    within: dict[int, np.ndarray] | None = None
    # A's weight in the average of a merged pair (None: 1/2); 1 takes A's feature (a frozen
    # axis whose features cannot be aligned: least squares downstream fits both models' targets)
    share_a: float | None = None

    @property
    def width(self) -> int:
        return int(self.src_a.shape[0])

    @property
    def pairwise(self) -> bool:
        """True when every merged feature has at most one source in each model."""
        return not any(s is not None and bool((s >= 0).any()) for s in (self.src_a2, self.src_b2))

    @property
    def merged_pairs(self) -> int:
        """Number of merges (merged features with two sources): 2 * size - width."""
        n = (self.src_a >= 0).astype(int) + (self.src_b >= 0)
        for s in (self.src_a2, self.src_b2):
            if s is not None:
                n = n + (s >= 0)
        return int(np.sum(n >= 2))

    @staticmethod
    def identity(size: int, share_a: float | None = None) -> "GroupPlan":
        """Frozen group: feature i of A averaged with feature i of B (A's weight `share_a`)."""
        idx = np.arange(size)
        return GroupPlan(size, idx, idx.copy(), share_a=share_a)

    @staticmethod
    def apart(size: int) -> "GroupPlan":
        """Nothing merged: A's features, then B's (width 2 * size)."""
        idx, none = np.arange(size), np.full(size, -1)
        return GroupPlan(size, np.concatenate([idx, none]), np.concatenate([none, idx]))

    @staticmethod
    def from_matching(perm: np.ndarray, costs: np.ndarray, merged: int) -> "GroupPlan":
        """`perm[i]` = B feature matched to A feature i, `costs[i]` its cost; the `merged`
        cheapest pairs are averaged, the others kept apart: [A-only | merged | B-only] (core/layers.py)."""
        d = len(perm)
        merged = int(np.clip(merged, 0, d))
        order = np.argsort(costs, kind="stable")
        merged_a = np.sort(order[:merged])
        kept_a = np.sort(order[merged:])
        kept_b = np.sort(perm[kept_a])
        absent = lambda n: np.full(n, -1, dtype=np.int64)
        src_a = np.concatenate([kept_a, merged_a, absent(len(kept_b))])
        src_b = np.concatenate([absent(len(kept_a)), perm[merged_a], kept_b])
        return GroupPlan(d, src_a.astype(np.int64), src_b.astype(np.int64))

    @staticmethod
    def from_zip(size: int, pairs: np.ndarray, merged: int) -> "GroupPlan":
        """ZipIt!: `pairs` (k, 2) are features of the stacked space [A; B] (index < size: A's
        feature, else B's feature index - size), in the order they would be merged; the first
        `merged` pairs become merged features, every other feature is kept alone."""
        merged = int(np.clip(merged, 0, len(pairs)))
        used = np.zeros(2 * size, dtype=bool)
        rows = []
        for p, q in np.asarray(pairs, dtype=np.int64)[:merged]:
            if used[p] or used[q] or p == q:
                raise ValueError(f"zip pairs reuse a feature: ({p}, {q})")
            used[p] = used[q] = True
            rows.append((p, q))
        rows += [(s, -1) for s in np.flatnonzero(~used)]
        cols = np.full((len(rows), 4), -1, dtype=np.int64)  # src_a, src_b, src_a2, src_b2
        for f, members in enumerate(rows):
            for s in members:
                if s < 0:
                    continue
                side = 0 if s < size else 1
                col = side if cols[f, side] < 0 else side + 2
                cols[f, col] = s - side * size
        plan = GroupPlan(size, cols[:, 0], cols[:, 1], cols[:, 2], cols[:, 3])
        return plan if not plan.pairwise else GroupPlan(size, cols[:, 0], cols[:, 1])


@dataclass
class AxisMap:
    """A merge plan expanded onto one tensor axis: merged entry e reads A entry `idx_a[e]`
    and B entry `idx_b[e]` (index -1: absent), and for ZipIt!-style plans a second A / B
    entry `idx_a2[e]` / `idx_b2[e]` (None: no entry has one)."""

    idx_a: np.ndarray
    idx_b: np.ndarray
    frozen: bool
    idx_a2: np.ndarray | None = None
    idx_b2: np.ndarray | None = None
    share_a: np.ndarray | None = None  # per entry: A's weight where both sides feed it (None: 1/2)

    @property
    def size(self) -> int:
        return int(self.idx_a.shape[0])

    @property
    def pairwise(self) -> bool:
        return self.idx_a2 is None and self.idx_b2 is None

    def _sources(self) -> np.ndarray:
        n = (self.idx_a >= 0).astype(np.float64) + (self.idx_b >= 0)
        for s in (self.idx_a2, self.idx_b2):
            if s is not None:
                n = n + (s >= 0)
        return np.maximum(n, 1.0)

    def weights(self) -> tuple[np.ndarray, np.ndarray]:
        """The averaging weights (rows of M): 1/2 for merged pairs, 1 for a kept feature
        (for ZipIt!-style maps: the first source of each side; see `terms`)."""
        n = self._sources()
        w_a, w_b = (self.idx_a >= 0) / n, (self.idx_b >= 0) / n
        if self.share_a is not None:
            both = (self.idx_a >= 0) & (self.idx_b >= 0)
            w_a, w_b = np.where(both, self.share_a, w_a), np.where(both, 1.0 - self.share_a, w_b)
        return w_a, w_b

    def presence(self) -> tuple[np.ndarray, np.ndarray]:
        """Which side feeds each merged entry (rows of U transposed: copies, weight 1)."""
        return (self.idx_a >= 0).astype(np.float64), (self.idx_b >= 0).astype(np.float64)

    def terms(self, side: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """For side 0 (A) or 1 (B): every (index, M weight, U weight) source array of that side."""
        n = self._sources()
        out = []
        for k, idx in enumerate((self.idx_a, self.idx_a2) if side == 0 else (self.idx_b, self.idx_b2)):
            if idx is not None:
                has = (idx >= 0).astype(np.float64)
                out.append((idx, self.weights()[side] if k == 0 and self.pairwise else has / n, has))
        return out


def axis_map(layout: Layout, plans: dict[int, GroupPlan], frozen: set[int], inner: int = 1) -> AxisMap:
    """Expand the group plans onto an axis with `layout` (each entry further split into
    `inner` consecutive sub-entries, e.g. a conv kernel's k*k taps in im2col order)."""
    parts: list[list[np.ndarray]] = [[], [], [], []]
    shares: list[np.ndarray] = []
    offset = 0
    second = False
    for seg in layout:
        if seg.group in frozen:  # a frozen group may have a plan (A's features taken), else identity
            plan = plans.get(seg.group) or GroupPlan.identity(seg.size)
        else:
            plan = plans[seg.group]
        sub = seg.inner * inner
        o = np.arange(seg.outer)[:, None, None] * (seg.size * sub)
        r = np.arange(sub)[None, None, :]

        sigma = None
        if seg.within is not None and seg.group not in frozen and plan.within and seg.within in plan.within:
            sigma = np.asarray(plan.within[seg.within], dtype=np.int64)

        def expand(src: np.ndarray | None, reorder: np.ndarray | None = None) -> np.ndarray:
            if src is None:
                src = np.full(plan.width, -1, dtype=np.int64)
            rr = r if reorder is None else _reordered(reorder, src, sub)
            idx = offset + o + src[None, :, None] * sub + rr
            return np.where(src[None, :, None] >= 0, idx, -1).reshape(-1)

        for k, src in enumerate((plan.src_a, plan.src_b, plan.src_a2, plan.src_b2)):
            parts[k].append(expand(src, sigma if k == 1 else None))
        shares.append(np.full(parts[0][-1].shape, 0.5 if plan.share_a is None else plan.share_a))
        second = second or not plan.pairwise
        offset += seg.numel * inner
    is_frozen = all(seg.group in frozen for seg in layout)
    cat = lambda p: (np.concatenate(p) if p else np.zeros(0, dtype=np.int64)).astype(np.int64)
    share = np.concatenate(shares) if shares and any((s != 0.5).any() for s in shares) else None
    if not second:
        return AxisMap(cat(parts[0]), cat(parts[1]), is_frozen, share_a=share)
    return AxisMap(cat(parts[0]), cat(parts[1]), is_frozen, cat(parts[2]), cat(parts[3]))


def _reordered(sigma: np.ndarray, src: np.ndarray, sub: int) -> np.ndarray:
    """Inner offsets (1, units, sub) of B's units `src` after their within permutation `sigma`
    (units x w; each of the w blocks holds sub // w consecutive entries)."""
    w = sigma.shape[1]
    if sub % w:
        raise ValueError(f"a within permutation of {w} blocks does not divide {sub} inner entries")
    block = sub // w
    r = np.arange(sub)
    rows = sigma[np.maximum(src, 0)]  # (units, w)
    return (rows[:, r // block] * block + r % block)[None, :, :]


def merged_axis_size(layout: Layout, widths: dict[int, int], frozen: set[int]) -> int:
    """Size of an axis once every non-frozen group g has width `widths[g]`."""
    return sum(
        (seg.size if seg.group in frozen else widths[seg.group]) * seg.inner * seg.outer
        for seg in layout
    )


# --------------------------------------------------------------------------- weight nodes
@dataclass(frozen=True)
class NormNode:
    """A per-channel affine normalisation with running statistics (an eval-mode BatchNorm,
    as a module or as F.batch_norm): y = (x - mean) / sqrt(var + eps) * weight + bias.
    Tensors are qualified names in the model; `weight`/`bias` None when it has no affine."""

    node: str
    running_mean: str
    running_var: str
    weight: str | None
    bias: str | None
    eps: float

    @property
    def affine(self) -> bool:
        return self.weight is not None and self.bias is not None


@dataclass(frozen=True)
class WeightNode:
    """A node that applies a weight tensor to its input activation (`node.args[0]`), and how
    the fill pass writes it.

    kind "linear" (the last input axis contracted), "conv" (groups=1, 1-D as height-1 2-D) or
    "grouped" (a grouped conv, each conv group solved on its own entries): solved by least squares
    from the stacked-input second moments. "depthwise": a per-channel kernel, mapped through the plans. "mapped": any other
    weight, mapped through the plans; `note` says why it is not solved. `norm`: the eval-mode
    normalisation directly after it, folded into the least-squares target."""

    node: str
    weight: str
    bias: str | None
    kind: str
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple = ()  # per axis: an int (both sides), or (before, after)
    dilation: tuple[int, ...] = ()
    note: str | None = None
    norm: NormNode | None = None

    @property
    def solved(self) -> bool:
        return self.kind in ("linear", "conv", "grouped")

    @property
    def taps(self) -> int:
        out = 1
        for k in self.kernel:
            out *= k
        return out
