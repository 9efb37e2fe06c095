"""Group inference pass: which tensor and parameter axes must share a permutation.

Every axis gets a layout over union-find variables (passes/infer_context.py); each node's op
spec (passes/ops/) links the axes its op couples. Fail-closed: a node whose op no spec knows
freezes every axis it touches, with the reason recorded, so no unknown op is ever silently
permuted through. The pass reads the graph and returns a GroupSpec; it never changes the module.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx

from pleas_fx.core.freeze import FreezeReason
from pleas_fx.core.fxutil import getattr_path, node_shape, op_name
from pleas_fx.core.ir import Group, GroupSpec, Layout, ParamAxis, Segment, Site, layout_numel
from pleas_fx.passes.infer_context import InferenceContext, freeze_unknown, tensor_layouts
from pleas_fx.passes.layout_ops import TupleLayouts
from pleas_fx.passes.ops import describe_op, lookup_op, overridden_forward

log = logging.getLogger(__name__)


def layout_mismatch(value: Any, shape: Any) -> str | None:
    """Why a handler's output layouts cannot describe an output of `shape` (rank or sizes), or
    None when they can."""
    if shape is None:
        return None if value is None else "layouts for a non-tensor output"
    if isinstance(shape, list):
        if not isinstance(value, list) or len(value) != len(shape):
            return f"{len(shape)} outputs, layouts for {len(value) if isinstance(value, list) else 'one'}"
        return next((p for v, s in zip(value, shape) if (p := layout_mismatch(v, s)) is not None), None)
    if not isinstance(value, list) or isinstance(value, TupleLayouts) or len(value) != len(shape):
        return f"rank {len(shape)}, layouts of rank {len(value) if isinstance(value, list) else None}"
    sizes = [layout_numel(lay) for lay in value]
    return None if sizes == list(shape) else f"sizes {list(shape)}, layouts of sizes {sizes}"


def _unknown_reason(node: fx.Node, gm: fx.GraphModule) -> FreezeReason:
    """Why a node no spec knows is frozen: no handler, or a subclass overriding forward."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        parent = overridden_forward(module)
        if parent is not None:
            return FreezeReason("no handler", f"no handler for module {type(module).__name__} (it overrides the "
                                              f"forward of {parent.__name__}, whose spec it does not inherit)",
                                node.name)
    op = describe_op(node, gm)
    if node.op == "call_module":
        op = f"module {type(gm.get_submodule(node.target)).__name__}"
    return FreezeReason("no handler", f"no handler for {op}", node.name)


def infer_groups(gm: fx.GraphModule) -> GroupSpec:
    """Run every node's handler over a shape-propagated graph and collect the groups."""
    ctx = InferenceContext(gm)
    frozen_reasons: list[FreezeReason] = []
    for node in gm.graph.nodes:
        ctx.start_node(node)
        if node.op == "placeholder":
            out = ctx.fresh_like(ctx.shape(), FreezeReason("network input", where=node.name))
        elif node.op == "output":
            ctx.freeze([ctx.layouts(a) for a in node.all_input_nodes], FreezeReason("network output"))
            out = None
        elif node.op == "get_attr":
            value = getattr_path(gm, node.target)
            if torch.is_tensor(value):
                known = ctx.param_layouts.get(ctx.canonical(node.target))
                # size-1 axes of a parameter only broadcast (an op that uses it as a per-feature
                # vector re-declares them: InferenceContext.param)
                fresh = [ctx.fresh(n, "size-1" if n == 1 else None) for n in value.shape]
                out = known or ctx.param(node.target, fresh)
                out = list(out)
            else:
                out = None
        else:
            spec = lookup_op(node, gm)
            if spec is None:
                reason = _unknown_reason(node, gm)
                out = freeze_unknown(ctx, node, reason)
                if any(ctx.is_tensor(a) for a in node.all_input_nodes):
                    frozen_reasons.append(reason)
            else:
                out = ctx.rewritten(spec.infer(ctx, node))
                problem = layout_mismatch(out, ctx.shape())
                if problem is not None:
                    reason = FreezeReason("handler mismatch", f"the op's handler returned layouts that do not match "
                                                              f"its output ({problem}); frozen", node.name,
                                          describe_op(node, gm))
                    log.info("%s", reason)
                    out = freeze_unknown(ctx, node, reason)
                    frozen_reasons.append(reason)
        ctx.values[node.name] = ctx.rewritten(out)

    # Parameters never read by the graph keep their shape: freeze them.
    for name, tensor in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in ctx.param_layouts:
            ctx.param(name, [ctx.fresh(n, FreezeReason("unused")) for n in tensor.shape])
    _freeze_constant_inputs(ctx, gm)
    return _collect(ctx, gm, frozen_reasons)


def _freeze_constant_inputs(ctx: InferenceContext, gm: fx.GraphModule) -> None:
    """A buffer axis that no computed tensor carries is a constant input contracted straight into
    a weight (Swin v2's relative coordinates fed to its position-bias MLP): no activation measures
    it and every model holds the same constant, so it is frozen (structural), like a network input."""
    computed = set()
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "get_attr", "output"):
            for lays in tensor_layouts(ctx.values.get(node.name)):
                computed.update(ctx.uf.find(seg.group) for lay in lays for seg in lay)
    for name, tensor in gm.named_buffers():
        if not tensor.is_floating_point() or ctx.canonical(name) not in ctx.param_layouts:
            continue
        for lay in ctx.param_layouts[ctx.canonical(name)]:
            for seg in lay:
                root = ctx.uf.find(seg.group)
                if root not in computed and not ctx.uf.frozen[root]:
                    ctx.uf.freeze(root, FreezeReason("constant", "a buffer axis no computed tensor carries", name))


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
    why: dict[int, FreezeReason] = {}
    for w in roots:
        p = uf.parent_of(w)
        if p is None:
            why[w] = FreezeReason("within", "within entries linked to units of different groups")
        elif uf.frozen[p]:
            why[w] = FreezeReason("within", "the units it lives in are frozen")
    node_values = [(n, lays) for n, value in node_layouts.items() for lays in tensor_layouts(value)]
    param_values = list(param_layouts.items())
    for kind, values in (("parameter", param_values), ("tensor", node_values)):
        for name, lays in values:
            for axis, lay in enumerate(lays):
                for seg in lay:
                    if seg.within is not None and seg.within in roots and seg.group != uf.parent_of(seg.within):
                        why.setdefault(seg.within, FreezeReason("within", f"{kind} {name} holds it inside other units"))
                    if seg.group not in roots or seg.group in why:
                        continue
                    parent = uf.parent_of(seg.group)
                    unit_axes = [i for i, other in enumerate(lays) if any(s.group == parent for s in other)]
                    if kind == "parameter" and not (len(unit_axes) == 1 and unit_axes[0] != axis and len(lay) == 1
                                                    and seg.inner == seg.outer == 1):
                        # an axis of within entries follows the units of one other axis (a grouped
                        # conv's per-group input entries, their units on the output axis)
                        why[seg.group] = FreezeReason("within", f"parameter {name} holds within entries without one axis of their units")
                    elif kind == "tensor" and (len(unit_axes) != 1 or unit_axes[0] == axis):
                        why[seg.group] = FreezeReason("within", f"tensor {name} holds within entries without one axis of their units")
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


SEGMENT_SITES = 4  # segment sites per group seen only inside axes of several segments


def _unseen(groups: dict[int, Group]) -> set[int]:
    """Mergeable top-level groups that have no activation site yet."""
    return {g.id for g in groups.values() if not g.sites and not g.frozen and g.parent is None}


def _output_axes(gm: fx.GraphModule, node_layouts: dict[str, Any], unseen: set[int]):
    """(node, axis, layout) of every tensor output axis, while `unseen` is not empty."""
    for node in gm.graph.nodes:
        value = node_layouts.get(node.name)
        if not unseen or node.op in ("placeholder", "get_attr", "output") or not value or isinstance(value[0], list):
            continue
        for axis, lay in enumerate(value):
            yield node, axis, lay


def _add_segment_sites(gm: fx.GraphModule, groups: dict[int, Group], node_layouts: dict[str, Any]) -> None:
    """A mergeable group that is never a whole axis (only a piece of concats, splits, slices
    made of several segments) gets sites on those pieces, so matching sees it."""
    unseen = _unseen(groups)
    for node, axis, lay in _output_axes(gm, node_layouts, unseen):
        offset = 0
        for seg in lay:
            g = groups[seg.group]
            if seg.group in unseen and len(lay) > 1 and seg.inner == seg.outer == 1 and seg.within is None:
                g.sites.append(Site(node.name, axis, start=offset, size=seg.size))
                if len(g.sites) >= SEGMENT_SITES:
                    unseen.discard(seg.group)
            offset += seg.numel


ENTRY_SITE_MAX = 4096  # entries of a units x entries site (its moments are that size squared)


def _add_entry_sites(gm: fx.GraphModule, groups: dict[int, Group], node_layouts: dict[str, Any]) -> None:
    """A mergeable group still without a site, seen as one segment of units with a few entries
    each in a fixed order (conv groups after a channel shuffle or a concat), gets sites there."""
    unseen = _unseen(groups)
    for node, axis, lay in _output_axes(gm, node_layouts, unseen):
        seg = lay[0] if len(lay) == 1 else None
        if (seg is not None and seg.group in unseen and seg.within is None and seg.outer == 1 and seg.inner > 1
                and seg.numel <= ENTRY_SITE_MAX):
            groups[seg.group].sites.append(Site(node.name, axis, entries=True))
            if len(groups[seg.group].sites) >= SEGMENT_SITES:
                unseen.discard(seg.group)


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
    _add_segment_sites(gm, groups, node_layouts)
    _add_entry_sites(gm, groups, node_layouts)
    # Frozen reasons worth reporting: limitations, not axes that can never be permuted.
    limitations = list(dict.fromkeys(frozen_reasons))
    for g in groups.values():
        if g.frozen:
            for r in g.reasons:
                if not r.structural and r not in limitations:
                    limitations.append(r)
    return GroupSpec(groups, param_layouts, {n: list(r) for n, r in ctx.param_roles.items()}, node_layouts, limitations,
                     dict(ctx.aliases), set(ctx.broadcast_axes))
