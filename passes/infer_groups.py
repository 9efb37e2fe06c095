"""Group inference pass: which tensor and parameter axes must share a permutation.

Every axis gets a layout over union-find variables; each node's handler (passes/registry.py)
links the axes its op couples. Fail-closed: a node without a handler freezes every axis it
touches, with the reason recorded, so no unknown op is ever silently permuted through.
The pass reads the graph and returns a GroupSpec; it never changes the module.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx

from pleas_fx.ir import Group, GroupSpec, Layout, ParamAxis, Segment, Site
from passes import handlers as _standard_handlers  # noqa: F401  (registers the built-in handlers)
from passes.layout_ops import TupleLayouts
from passes.registry import describe_op, lookup_handler
from passes.trace import getattr_path, node_shape

log = logging.getLogger(__name__)

# Reasons that describe an axis no merge could ever permute (not a limitation of pleas_fx).
STRUCTURAL = ("network input", "network output", "batch", "spatial", "kernel", "size-1", "vocabulary", "constant")


class UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.frozen: list[bool] = []
        self.reasons: dict[int, list[str]] = {}
        self.parents: dict[int, list[int]] = {}  # within variable -> the variables it permutes inside

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        self.frozen.append(False)
        return len(self.parent) - 1

    def find(self, v: int) -> int:
        root = v
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[v] != root:
            self.parent[v], v = root, self.parent[v]
        return root

    def freeze(self, v: int, reason: str) -> None:
        r = self.find(v)
        if not self.frozen[r] or reason not in self.reasons.get(r, []):
            self.reasons.setdefault(r, []).append(reason)
        self.frozen[r] = True

    def union(self, a: int, b: int) -> bool:
        """Merge the classes of a and b; False (nothing merged) if their sizes differ."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return True
        if self.size[ra] != self.size[rb]:
            return False
        self.parent[rb] = ra
        self.frozen[ra] = self.frozen[ra] or self.frozen[rb]
        self.reasons.setdefault(ra, []).extend(self.reasons.pop(rb, []))
        if rb in self.parents:
            self.parents.setdefault(ra, []).extend(self.parents.pop(rb))
        return True

    def new_within(self, size: int, parent: int) -> int:
        """A within variable: permutes the entries of each unit of `parent`, unit by unit."""
        v = self.new(size)
        self.parents[v] = [parent]
        return v

    def parent_of(self, v: int) -> int | None:
        """The (resolved) group a within variable permutes inside; None for other variables
        or when it was linked to within axes of different groups."""
        found = {self.find(p) for p in self.parents.get(self.find(v), ())}
        return found.pop() if len(found) == 1 else None


class InferenceContext:
    """What a handler sees: layouts of the node's inputs, shapes, and ways to link axes."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.uf = UnionFind()
        self.values: dict[str, Any] = {}
        self.param_layouts: dict[str, list[Layout]] = {}
        self.param_roles: dict[str, list[str]] = {}
        self.node: fx.Node | None = None

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

    # -- making and linking axes
    def fresh(self, size: int, frozen_reason: str | None = None) -> Layout:
        var = self.uf.new(size)
        if frozen_reason:
            self.uf.freeze(var, frozen_reason)
        return (Segment(var, int(size)),)

    def fresh_like(self, shape: Any, frozen_reason: str) -> Any:
        """Frozen layouts for a value of `shape` (torch.Size, list of those, or None)."""
        if shape is None:
            return None
        if isinstance(shape, list):
            return TupleLayouts(self.fresh_like(s, frozen_reason) for s in shape)
        return [self.fresh(n, frozen_reason if n != 1 else "size-1") for n in shape]

    def freeze(self, layout: Any, reason: str) -> None:
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
        frozen_side = a if self.is_frozen(a) else b if self.is_frozen(b) else None
        if frozen_side is not None and len(frozen_side):
            # meeting an axis that is frozen anyway (tokens meeting a position embedding):
            # the other side inherits why that axis is frozen
            reason = self.uf.reasons.get(self.uf.find(frozen_side[0].group), ["constant"])[0]
        else:
            reason = f"axes of different structure meet at {self.where()}"
        self.freeze(a, reason)
        self.freeze(b, reason)
        return a if len(a) else b

    def _unify_within(self, x: Segment, y: Segment) -> None:
        """Two segments of one group meet: their within groups must permute alike."""
        if x.within is None and y.within is None:
            return
        if x.within is not None and y.within is not None and self.uf.union(x.within, y.within):
            return
        for w in (x.within, y.within):
            if w is not None:
                self.uf.freeze(w, f"within-unit entries meet an axis without that structure at {self.where()}")

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

        def rewrite(layout: Layout) -> Layout:
            return tuple(Segment(s.group, units, s.inner * inner, s.outer * outer, within)
                         if self.uf.find(s.group) == root else s for s in layout)

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
        """Declare a parameter's (or buffer's) axes; a second declaration unifies with the first."""
        roles = roles or ["out"] * len(layouts)
        if name in self.param_layouts:
            old = self.param_layouts[name]
            layouts = [self.unify(o, n) for o, n in zip(old, layouts)]
            roles = [("in" if "in" in (r0, r1) else "out") for r0, r1 in zip(self.param_roles[name], roles)]
        self.param_layouts[name] = list(layouts)
        self.param_roles[name] = list(roles)
        return layouts

    def set_role(self, arg: Any, axis: int, role: str) -> None:
        """Mark an axis of a get_attr argument as contracted ("in") or feature ("out")."""
        if isinstance(arg, fx.Node) and arg.op == "get_attr" and arg.target in self.param_roles:
            self.param_roles[arg.target][axis] = role

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


def freeze_unknown(ctx: InferenceContext, node: fx.Node, reason: str) -> Any:
    """The fail-closed fallback: freeze every input axis, module parameter and output axis."""
    for arg in node.all_input_nodes:
        ctx.freeze(ctx.layouts(arg), reason)
    if node.op == "call_module":
        for name, tensor in ctx.module_params(node).items():
            ctx.param(name, [ctx.fresh(n, reason) for n in tensor.shape])
    return ctx.fresh_like(ctx.shape(), reason)


def infer_groups(gm: fx.GraphModule) -> GroupSpec:
    """Run every node's handler over a shape-propagated graph and collect the groups."""
    ctx = InferenceContext(gm)
    frozen_reasons: list[tuple[str, str]] = []
    for node in gm.graph.nodes:
        ctx.node = node
        if node.op == "placeholder":
            out = ctx.fresh_like(ctx.shape(), "network input")
        elif node.op == "output":
            ctx.freeze([ctx.layouts(a) for a in node.all_input_nodes], "network output")
            out = None
        elif node.op == "get_attr":
            value = getattr_path(gm, node.target)
            if torch.is_tensor(value):
                known = ctx.param_layouts.get(node.target)
                # size-1 axes of a parameter only broadcast: never a feature axis
                fresh = [ctx.fresh(n, "size-1" if n == 1 else None) for n in value.shape]
                out = known or ctx.param(node.target, fresh)
                out = list(out)
            else:
                out = None
        else:
            handler = lookup_handler(node, gm)
            if handler is None:
                reason = f"no handler for {describe_op(node, gm)}"
                out = freeze_unknown(ctx, node, reason)
                if any(ctx.is_tensor(a) for a in node.all_input_nodes):
                    frozen_reasons.append((node.name, reason))
            else:
                out = handler(ctx, node)
        ctx.values[node.name] = out

    # Parameters never read by the graph keep their shape: freeze them.
    for name, tensor in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in ctx.param_layouts:
            ctx.param(name, [ctx.fresh(n, "not used by the traced graph") for n in tensor.shape])
    return _collect(ctx, gm, frozen_reasons)


def _resolve(ctx: InferenceContext, layout: Layout) -> Layout:
    find = ctx.uf.find
    return tuple(Segment(find(s.group), s.size, s.inner, s.outer, None if s.within is None else find(s.within))
                 for s in layout)


def _resolve_value(ctx: InferenceContext, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, TupleLayouts):
        return [_resolve_value(ctx, v) for v in value]
    return [_resolve(ctx, lay) for lay in value]


def _check_within(ctx: InferenceContext, param_layouts: dict[str, list[Layout]], node_layouts: dict[str, Any]) -> None:
    """Freeze every within group whose permutations could not be applied unit by unit: linked
    to units of two different groups, units frozen, on a parameter axis without its units, or
    on a tensor axis whose units are not on exactly one other axis of the same tensor. Reads
    the resolved layouts."""
    uf, find = ctx.uf, ctx.uf.find
    roots = {find(v) for v in list(uf.parents)}
    why: dict[int, str] = {}
    for w in roots:
        p = uf.parent_of(w)
        if p is None:
            why[w] = "within entries linked to units of different groups"
        elif uf.frozen[p]:
            why[w] = "the units it lives in are frozen"
    node_values = [(n, lays) for n, value in node_layouts.items() for lays in tensor_layouts(value)]
    param_values = list(param_layouts.items())
    for kind, values in (("parameter", param_values), ("tensor", node_values)):
        for name, lays in values:
            for axis, lay in enumerate(lays):
                for seg in lay:
                    if seg.within is not None and seg.within in roots and seg.group != uf.parent_of(seg.within):
                        why.setdefault(seg.within, f"{kind} {name} holds it inside other units")
                    if seg.group not in roots or seg.group in why:
                        continue
                    parent = uf.parent_of(seg.group)
                    unit_axes = [i for i, other in enumerate(lays) if any(s.group == parent for s in other)]
                    if kind == "parameter":  # a weight axis map is one axis: it cannot follow the units
                        why[seg.group] = f"parameter {name} holds within entries on an axis of their own"
                    elif len(unit_axes) != 1 or unit_axes[0] == axis:
                        why[seg.group] = f"tensor {name} holds within entries without one axis of their units"
    for w, reason in why.items():
        uf.freeze(w, reason)


# ops whose output holds the same numbers as their input, rearranged (or scaled by a constant)
_REARRANGING = {"view", "reshape", "permute", "transpose", "contiguous", "flatten", "unflatten", "clone",
                "to", "float", "mul", "div", "truediv", "getitem"}


def _drop_repeated_within_sites(gm: fx.GraphModule, groups: dict[int, Group]) -> None:
    """A within site measures a d*w x d*w moment matrix, the most expensive statistic: keep
    one per value, dropping sites on ops that only rearrange (or scale by a constant) a tensor
    measured already for the same within group (q after a permute, k after a transpose)."""
    nodes = {n.name: n for n in gm.graph.nodes}

    def op_name(node: fx.Node) -> str:
        return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")

    for g in groups.values():
        measured = {(s.node, s.within) for s in g.sites if s.within is not None}
        kept = []
        for site in g.sites:
            node = nodes.get(site.node)
            if site.within is not None and node is not None and op_name(node) in _REARRANGING:
                tensors = [a for a in node.all_input_nodes if isinstance(node_shape(a), torch.Size)]
                if len(tensors) == 1 and tensors[0] is node.args[0] and (tensors[0].name, site.within) in measured:
                    continue
            kept.append(site)
        g.sites[:] = kept


def _collect(ctx: InferenceContext, gm: fx.GraphModule, frozen_reasons) -> GroupSpec:
    param_layouts = {n: [_resolve(ctx, lay) for lay in lays] for n, lays in ctx.param_layouts.items()}
    node_layouts = {name: _resolve_value(ctx, v) for name, v in ctx.values.items()}
    _check_within(ctx, param_layouts, node_layouts)
    uf = ctx.uf
    groups: dict[int, Group] = {}
    within_roots = {uf.find(v) for v in uf.parents}

    def group(root: int) -> Group:
        if root not in groups:
            groups[root] = Group(root, uf.size[root], uf.frozen[root], list(dict.fromkeys(uf.reasons.get(root, []))),
                                 parent=uf.parent_of(root) if root in within_roots else None)
            if root in within_roots and groups[root].parent is None:
                groups[root].parent = -1  # linked to several groups' units (frozen)
        return groups[root]

    for name, lays in param_layouts.items():
        for axis, lay in enumerate(lays):
            for gid in dict.fromkeys(seg.group for seg in lay):  # once per axis, however many segments
                group(gid).params.append(ParamAxis(name, axis, lay, ctx.param_roles[name][axis]))

    def register(value: Any) -> None:
        for item in value or ():
            if isinstance(item, list) or item is None:
                register(item)
            else:
                for seg in item:
                    group(seg.group)
                    if seg.within is not None:
                        group(seg.within)

    for value in node_layouts.values():
        register(value)
    for node in gm.graph.nodes:
        value = node_layouts.get(node.name)
        if node.op in ("placeholder", "get_attr", "output") or not value or isinstance(ctx.values[node.name], TupleLayouts):
            continue
        for axis, lay in enumerate(value):
            if len(lay) != 1 or groups[lay[0].group].frozen or groups[lay[0].group].parent is not None:
                continue
            seg = lay[0]
            owner = groups[seg.group]
            if seg.inner == seg.outer == 1:
                entries = []
                for w_axis, w_lay in enumerate(value):  # the units' within entries on another axis
                    w = groups.get(w_lay[0].group) if len(w_lay) == 1 else None
                    if (w is not None and w.parent == seg.group and not w.frozen
                            and w_lay[0].inner == w_lay[0].outer == 1):
                        entries.append(Site(node.name, axis, w.id, w_axis))
                owner.sites.append(Site(node.name, axis, unaligned=bool(entries)))
                owner.sites.extend(entries)
            elif (seg.within is not None and seg.outer == 1 and not groups[seg.within].frozen
                  and seg.inner == groups[seg.within].size):
                owner.sites.append(Site(node.name, axis, seg.within))
    _drop_repeated_within_sites(gm, groups)
    # Frozen reasons worth reporting: limitations, not axes that can never be permuted.
    limitations = [(w, r) for w, r in frozen_reasons]
    for g in groups.values():
        if g.frozen:
            for r in g.reasons:
                if not r.startswith(STRUCTURAL) and all(r != x for _, x in limitations):
                    limitations.append((f"group {g.id}", r))
    return GroupSpec(groups, param_layouts, {n: list(r) for n, r in ctx.param_roles.items()}, node_layouts, limitations)
