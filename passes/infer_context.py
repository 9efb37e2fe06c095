"""The state group inference works on: a union-find over axis variables, and the context
every op's `infer` handler receives (layouts of the node's inputs, shapes, and ways to link,
refine, partition and freeze axes). Freezing records a typed reason (pleas_fx.core.freeze)."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from pleas_fx.core.freeze import FreezeReason
from pleas_fx.core.fxutil import node_shape
from pleas_fx.core.ir import Layout, Segment, layout_numel
from pleas_fx.passes.layout_ops import TupleLayouts, boundaries, first_cut, slice_pieces
from pleas_fx.passes.ops.registry import describe_op
from pleas_fx.passes.union_find import UnionFind


class InferenceContext:
    """What a handler sees: layouts of the node's inputs, shapes, and ways to link axes."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.uf = UnionFind()
        self.values: dict[str, Any] = {}
        self.param_layouts: dict[str, list[Layout]] = {}
        self.param_roles: dict[str, list[str]] = {}
        self.node: fx.Node | None = None
        self._rewrites: list = []  # refinements and splits made while inferring the current node
        self.aliases = _aliases(gm)  # a tied tensor's other names -> its first name
        self.broadcast_axes: set[tuple[str, int]] = set()  # (parameter, axis): one entry per feature

    # -- reading
    def layouts(self, arg: Any) -> Any:
        """Layouts of an argument: list per dim for a tensor node, None for non-tensors."""
        return self.values.get(arg.name) if isinstance(arg, fx.Node) else None

    def is_tensor(self, arg: Any) -> bool:
        lay = self.layouts(arg)
        return lay is not None and not isinstance(lay, TupleLayouts)

    def shape(self, arg: Any = None) -> Any:
        """Output shape of `arg` (default: the current node)."""
        return node_shape(self.node if arg is None else arg)

    def module(self, node: fx.Node | None = None) -> torch.nn.Module:
        return self.gm.get_submodule((node or self.node).target)

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """Positional-or-keyword argument of the current node."""
        node = self.node
        if len(node.args) > index:
            return node.args[index]
        return node.kwargs.get(name, default)

    def is_frozen(self, layout: Layout) -> bool:
        return all(self.uf.frozen[self.uf.find(s.group)] for s in layout)

    def where(self) -> str:
        return f"{self.node.name} ({describe_op(self.node, self.gm)})"

    def reason(self, kind: str, detail: str = "", context: str = "") -> FreezeReason:
        """A freeze reason of `kind` at the current node (`context`: specifics such as shapes)."""
        return FreezeReason(kind, detail, self.node.name, describe_op(self.node, self.gm), context)

    # -- making and linking axes
    def fresh(self, size: int, frozen_reason: FreezeReason | str | None = None) -> Layout:
        var = self.uf.new(size)
        if frozen_reason:
            self.uf.freeze(var, frozen_reason)
        return (Segment(var, int(size)),)

    def fresh_like(self, shape: Any, frozen_reason: FreezeReason | str) -> Any:
        """Frozen layouts for a value of `shape` (torch.Size, list of those, or None)."""
        if shape is None:
            return None
        if isinstance(shape, list):
            return TupleLayouts(self.fresh_like(s, frozen_reason) for s in shape)
        return [self.fresh(n, frozen_reason if n != 1 else "size-1") for n in shape]

    def freeze(self, layout: Any, reason: FreezeReason | str) -> None:
        """Freeze every group in a layout (or nested lists of layouts)."""
        if layout is None:
            return
        if isinstance(layout, list):
            for item in layout:
                self.freeze(item, reason)
            return
        for seg in layout:
            self.uf.freeze(seg.group, reason)

    def within(self, layout: Layout) -> int | None:
        """The live within group of a one-segment layout that is a whole within axis (a head's
        head_dim entries), else None."""
        if len(layout) != 1 or layout[0].inner != 1 or layout[0].outer != 1 or layout[0].within is not None:
            return None
        v = layout[0].group
        if self.uf.find(v) not in self.uf.parents or self.uf.frozen[self.uf.find(v)]:
            return None
        return v

    def within_size(self, w: int) -> int | None:
        """Size of within group `w`, None once it is frozen."""
        root = self.uf.find(w)
        return None if self.uf.frozen[root] else self.uf.size[root]

    def is_within_of(self, layout: Layout, group: int) -> bool:
        """Whether `layout` is a whole live within axis of `group`'s units."""
        w = self.within(layout)
        return w is not None and self.uf.parent_of(w) == self.uf.find(group)

    def unify(self, a: Layout, b: Layout) -> Layout:
        """Make two axes share their permutation; freeze both if their structure differs."""
        same = len(a) == len(b) and all(
            (x.size, x.inner, x.outer) == (y.size, y.inner, y.outer) for x, y in zip(a, b)
        )
        if same and all(self.uf.union(x.group, y.group) for x, y in zip(a, b)):
            for x, y in zip(a, b):
                self._unify_within(x, y)
            return a
        if not self.is_frozen(a) and not self.is_frozen(b):
            refined = self._common_refinement(a, b)
            if refined is not None:
                return refined
        frozen_side = a if self.is_frozen(a) else b if self.is_frozen(b) else None
        if frozen_side is not None and len(frozen_side):
            # meeting an axis that is frozen anyway (tokens meeting a position embedding):
            # the other side inherits why that axis is frozen
            reason = self.uf.reasons.get(self.uf.find(frozen_side[0].group), [FreezeReason("constant")])[0]
        else:
            reason = self.reason("mixed structure", "axes of different structure meet")
        self.freeze(a, reason)
        self.freeze(b, reason)
        return a if len(a) else b

    def _common_refinement(self, a: Layout, b: Layout) -> Layout | None:
        """Two axes of different structure meet (a plain group and a concat's segments, segments
        cut differently, a plain group and a flatten block): split and coarsen their groups into
        the common refinement (partition groups at every segment boundary of either side, then
        refine a plain piece into the other side's units x entries), and link the pieces. The
        permutations left are a subgroup of both sides', so earlier conclusions stay sound.
        Returns the linked layout, or None where no common refinement exists (nothing changed
        then, apart from sound splits)."""
        if layout_numel(a) != layout_numel(b):
            return None
        a = self.split_at(a, boundaries(b))
        b = a and self.split_at(b, boundaries(a))
        a = b and self.rewritten(a)
        if a is None or len(a) != len(b):
            return None
        for x, y in zip(a, b):
            if (x.size, x.inner, x.outer) != (y.size, y.inner, y.outer):
                plain, other = (x, y) if x.inner == x.outer == 1 else (y, x) if y.inner == y.outer == 1 else (None, None)
                if plain is None or other.outer != 1 or plain.size != other.size * other.inner or plain.within is not None \
                        or self.has_within(plain.group) or self.uf.find(plain.group) == self.uf.find(other.group):
                    return None
                w = other.within and self.uf.find(other.within)
                within = self.uf.new_within(self.uf.size[w], plain.group) if w is not None and not self.uf.frozen[w] else None
                self.refine(plain.group, 1, other.size, other.inner, within)
                a, b = self.rewritten(a), self.rewritten(b)
        for x, y in zip(a, b):
            if not self.uf.union(x.group, y.group):
                return None
            self._unify_within(x, y)
        return a

    def split_at(self, layout: Layout, offsets, cut_units: bool = False) -> Layout | None:
        """`layout` with a segment boundary at every offset in `offsets` (0 < offset < numel),
        partitioning the groups the offsets cut (a split into pieces, a slice, a concat of other
        sizes meeting it): the rewritten layout, or None where an offset falls inside a unit or
        a group cannot be partitioned (repeated, with a within group, frozen). `cut_units` (a
        split's own pieces): an offset inside a unit of an unrepeated group partitions that unit
        off and freezes it (a widened unit's pieces would not be contiguous), not the group; the
        caller slices the frozen segment (`slice`)."""
        skip = (lambda seg: self.uf.frozen[self.uf.find(seg.group)]) if cut_units else None
        for _ in range(2 * layout_numel(layout) + 2):  # each step adds a segment boundary or freezes a unit
            cut = first_cut(layout, offsets, skip)
            if cut is None:
                return layout
            seg, sizes, c = cut
            if not sizes and cut_units and seg.outer == 1:
                u = c // seg.inner
                sizes = [n for n in (u, 1, seg.size - u - 1) if n]
                if len(sizes) > 1 and not self.partition(seg.group, sizes):
                    return None
                self.uf.freeze(self.rewritten((seg,))[1 if u else 0].group, self.reason(
                    "slicing", "a split cuts through a unit (a channel shuffle's units of several channels)",
                    f"offset {c} of a unit of {seg.inner} entries"))
            elif not self.partition(seg.group, sizes):
                return None
            layout = self.rewritten(layout)
        return None

    def slice(self, layout: Layout, start: int, stop: int) -> Layout | None:
        """Entries [start, stop) of `layout` after `split_at(..., cut_units=True)`: whole segments,
        and the entries of a frozen segment the range cuts as a frozen axis of their own (for the
        same reason); None where the range cuts a permutable segment."""
        def piece(seg: Segment, n: int) -> Layout | None:
            root = self.uf.find(seg.group)
            if not self.uf.frozen[root]:
                return None
            return self.fresh(n, (self.uf.reasons.get(root) or [FreezeReason("constant")])[0])
        return slice_pieces(layout, start, stop, piece)

    def _unify_within(self, x: Segment, y: Segment) -> None:
        """Two segments of one group meet: their within groups must permute alike."""
        if x.within is None and y.within is None:
            return
        if x.within is not None and y.within is not None and self.uf.union(x.within, y.within):
            return
        for w in (x.within, y.within):
            if w is not None:
                self.uf.freeze(w, self.reason("within", "within-unit entries meet an axis without that structure"))

    def _rewrite_layouts(self, rewrite) -> None:
        """Apply `rewrite` (layout -> layout) to every layout recorded so far."""
        def rewrite_value(value: Any) -> Any:
            if value is None:
                return None
            if isinstance(value, TupleLayouts):
                return TupleLayouts(rewrite_value(v) for v in value)
            return [rewrite(lay) for lay in value]

        self.values = {name: rewrite_value(v) for name, v in self.values.items()}
        self.param_layouts = {name: [rewrite(lay) for lay in lays] for name, lays in self.param_layouts.items()}
        self._rewrites.append(rewrite)

    def rewritten(self, value: Any) -> Any:
        """A layout (or a node value: lists, tuples of lists) with every refinement and split made
        while inferring the current node applied: layouts a handler still holds may predate them."""
        if value is None:
            return None
        if isinstance(value, tuple):
            for rewrite in self._rewrites:
                value = rewrite(value)
            return value
        out = [self.rewritten(v) for v in value]
        return TupleLayouts(out) if isinstance(value, TupleLayouts) else out

    def start_node(self, node: fx.Node) -> None:
        self.node = node
        self._rewrites = []

    def refine(self, group: int, outer: int, units: int, inner: int, within: int | None = None) -> None:
        """Coarsen a group of n = outer * units * inner features to `units` blocks of `inner`
        consecutive features, the block structure repeated `outer` times (e.g. a fused qkv axis
        of 3 x heads x head_dim becomes `heads` units). Only permutations that move whole blocks,
        the same way in every repetition, remain allowed: a subset of the old ones, so every
        earlier conclusion stays sound. Every layout recorded so far is rewritten. `within`: a
        within variable that permutes each block's entries (checked when groups are collected).
        A group whose segments already carry a within group is not refined again."""
        root = self.uf.find(group)
        if self.uf.size[root] != outer * units * inner:
            raise ValueError(f"cannot refine a group of {self.uf.size[root]} into {outer} x {units} x {inner}")
        if self.has_within(group):
            raise ValueError("cannot refine a group whose units already have a within group")

        before = self.uf.size[root]

        def rewrite(layout: Layout) -> Layout:  # idempotent: refined segments have `units` units
            return tuple(Segment(s.group, units, s.inner * inner, s.outer * outer, within)
                         if self.uf.find(s.group) == root and s.size == before else s for s in layout)

        self._rewrite_layouts(rewrite)
        self.uf.size[root] = units

    def partition(self, group: int, sizes: list[int]) -> bool:
        """Split a group of n units into independent groups of `sizes` consecutive units (a fused
        qkv output split into q, k and v). Every permutation allowed afterwards permutes inside
        the pieces: a subset of the old ones, so earlier conclusions stay sound. Only groups
        whose every segment is unrepeated (outer 1) and without a within group; False otherwise."""
        root = self.uf.find(group)
        if sum(sizes) != self.uf.size[root] or self.uf.frozen[root] or self.has_within(group):
            return False
        if any(s.outer != 1 for lay in self._recorded_layouts() for s in lay if self.uf.find(s.group) == root):
            return False
        pieces = [self.uf.new(n) for n in sizes]

        def rewrite(layout: Layout) -> Layout:
            out = []
            for s in layout:
                if self.uf.find(s.group) == root:
                    out.extend(Segment(p, n, s.inner) for p, n in zip(pieces, sizes))
                else:
                    out.append(s)
            return tuple(out)

        self._rewrite_layouts(rewrite)
        return True

    def has_within(self, group: int) -> bool:
        """Whether any recorded segment of `group` carries a within group."""
        root = self.uf.find(group)
        return any(s.within is not None and self.uf.find(s.group) == root
                   for lay in self._recorded_layouts() for s in lay)

    def _recorded_layouts(self):
        """Every axis layout recorded so far: node values (tuple elements included) and parameters."""
        for value in self.values.values():
            for tensor in tensor_layouts(value):
                yield from tensor
        for lays in self.param_layouts.values():
            yield from lays

    def param(self, name: str, layouts: list[Layout], roles: list[str] | None = None) -> list[Layout]:
        """Declare a parameter's (or buffer's) axes; a second declaration unifies with the first
        (a tied tensor is declared under its first name). A size-1 axis first declared as a mere
        broadcast is re-declared instead: as a one-entry feature axis, or, when the new layout is
        longer, as one entry per feature of it (a shared slope or scale: `broadcast_axes`)."""
        name = self.canonical(name)
        roles = roles or ["out"] * len(layouts)
        if name in self.param_layouts:
            old = self.param_layouts[name]
            merged = []
            for axis, (o, n) in enumerate(zip(old, layouts)):
                if self.broadcast_axis(o):
                    merged.append(n)
                    if layout_numel(n) != 1:
                        self.broadcast_axes.add((name, axis))
                else:
                    merged.append(self.unify(o, n))
            layouts = merged
            roles = [("in" if "in" in (r0, r1) else "out") for r0, r1 in zip(self.param_roles[name], roles)]
        self.param_layouts[name] = list(layouts)
        self.param_roles[name] = list(roles)
        return layouts

    def canonical(self, name: str) -> str:
        """The name a tensor is declared under (the first of a tied tensor's names)."""
        return self.aliases.get(name, name)

    def broadcast_axis(self, layout: Layout) -> bool:
        """A parameter's size-1 axis as get_attr first declared it (frozen: it could only
        broadcast) and never linked since: an op that then uses the parameter as a per-feature
        vector (a one-channel norm's statistics) re-declares the axis instead of linking it."""
        if len(layout) != 1 or layout[0].size != 1:
            return False
        root = self.uf.find(layout[0].group)
        return self.uf.members[root] == 1 and [r.kind for r in self.uf.reasons.get(root, [])] == ["size-1"]

    def set_role(self, arg: Any, axis: int, role: str) -> None:
        """Mark an axis of a get_attr argument as contracted ("in") or feature ("out")."""
        if isinstance(arg, fx.Node) and arg.op == "get_attr" and self.canonical(arg.target) in self.param_roles:
            self.param_roles[self.canonical(arg.target)][axis] = role

    def module_params(self, node: fx.Node | None = None) -> dict[str, torch.Tensor]:
        """Qualified name -> tensor for the direct parameters and buffers of a module node."""
        node = node or self.node
        mod = self.module(node)
        items = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
        return {f"{node.target}.{n}": t for n, t in items if t is not None}


def tensor_layouts(value: Any):
    """The per-axis layout lists of every tensor in a node value (a list of layouts; for tuple
    outputs a TupleLayouts, or once resolved a list, of such values; None for non-tensors)."""
    if value is None:
        return
    if all(isinstance(v, tuple) for v in value):
        yield value
        return
    for item in value:
        yield from tensor_layouts(item)


def freeze_unknown(ctx: InferenceContext, node: fx.Node, reason: FreezeReason | str) -> Any:
    """The fail-closed fallback: freeze every input axis, module parameter and output axis."""
    for arg in node.all_input_nodes:
        ctx.freeze(ctx.layouts(arg), reason)
    if node.op == "call_module":
        for name, tensor in ctx.module_params(node).items():
            ctx.param(name, [ctx.fresh(n, reason) for n in tensor.shape])
    return ctx.fresh_like(ctx.shape(), reason)


def _aliases(gm: fx.GraphModule) -> dict[str, str]:
    """Every other name of a tensor registered under several names (tied weights) -> its first."""
    first: dict[int, str] = {}
    out = {}
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if t is None:
            continue
        if id(t) in first and first[id(t)] != name:
            out[name] = first[id(t)]
        first.setdefault(id(t), name)
    return out
