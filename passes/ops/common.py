"""Helpers shared by the op specs: tensor arguments, argument normalisation, the fail-closed
fallback, and numpy-style broadcasting of elementwise ops."""
from __future__ import annotations

from typing import Any

import torch.fx as fx

from pleas_fx.core.ir import Layout


def tensor_args(ctx, node: fx.Node) -> list[fx.Node]:
    """Every argument of `node` (nested ones included) that is a single tensor."""
    flat: list = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: flat.append(n))
    return [a for a in flat if ctx.is_tensor(a)]


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument `name` (at position `index`) of a node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def set_arg(node: fx.Node, index: int, name: str, value: Any) -> None:
    """Set positional-or-keyword argument `name` (at position `index`) of a node, where it is given."""
    if len(node.args) > index:
        node.args = (*node.args[:index], value, *node.args[index + 1:])
    else:
        node.kwargs = {**node.kwargs, name: value}


def is_attr(value: Any) -> bool:
    """Whether an argument is a parameter or buffer read by a get_attr node."""
    return isinstance(value, fx.Node) and value.op == "get_attr"


def unknown(ctx, node: fx.Node, kind: str, detail: str, context: str = ""):
    """Freeze every input axis of a node the spec cannot map, and return frozen output layouts."""
    reason = ctx.reason(kind, detail, context)
    for a in node.all_input_nodes:
        ctx.freeze(ctx.layouts(a), reason)
    return ctx.fresh_like(ctx.shape(), reason)


def freeze_mixed_positions(ctx, layouts, detail: str) -> None:
    """Axes an op treats as positions (a convolution's, a pooling's spatial axes) mix their
    entries: any group that reached them (a weight multiplied along the width) is frozen."""
    for lay in layouts:
        if not ctx.is_frozen(lay):
            ctx.freeze(lay, ctx.reason("spatial mixing", detail))


def broadcast(ctx, node: fx.Node, operands=None):
    """Elementwise op with numpy broadcasting: axes that meet at full size are unified."""
    operands = tensor_args(ctx, node) if operands is None else operands
    out_shape = ctx.shape()
    if out_shape is None or isinstance(out_shape, list):
        return unknown(ctx, node, "other", "elementwise op with a non-tensor result")
    out: list[Layout | None] = [None] * len(out_shape)
    # output axes of size 1 where some operand has a one-unit group (live or frozen for a reason of its
    # own): operands whose size-1 axis only broadcasts are not linked to it there, or the group would
    # take "size-1" as a structural reason and no longer count as hidden units
    real_one = {i for a in operands for i in range(1, len(ctx.shape(a)) + 1)
                if i <= len(out_shape) and out_shape[-i] == 1 and not only_broadcast(ctx, ctx.layouts(a)[-i])}
    for a in operands:
        lays, shp = ctx.layouts(a), ctx.shape(a)
        for i in range(1, len(shp) + 1):
            if i > len(out_shape):
                continue
            if shp[-i] == 1 and out_shape[-i] != 1:
                if not only_broadcast(ctx, lays[-i]) and not ctx.is_frozen(lays[-i]):
                    # a one-unit feature group broadcast over a larger axis: widened, it would no
                    # longer broadcast (h * m, h of one hidden unit, m a row of n)
                    ctx.freeze(lays[-i], ctx.reason("broadcast", "one feature broadcast over a larger axis"))
                continue
            if i in real_one and only_broadcast(ctx, lays[-i]):
                continue  # a size-1 axis that only broadcasts meets a one-unit group (a single head)
            lay = lays[-i]
            out[-i] = lay if out[-i] is None else ctx.unify(out[-i], lay)
    for a in operands:  # a parameter with one entry broadcast over a feature axis: one entry per feature
        if is_attr(a):
            shp = ctx.shape(a)
            for i in range(1, len(shp) + 1):
                if shp[-i] == 1 and i <= len(out_shape) and out[-i] is not None and not ctx.is_frozen(out[-i]) \
                        and (out_shape[-i] != 1 or only_broadcast(ctx, ctx.layouts(a)[-i])):
                    layouts = list(ctx.param_layouts.get(ctx.canonical(a.target), ctx.layouts(a)))
                    layouts[len(shp) - i] = out[-i]
                    ctx.param(a.target, layouts)
    return [lay if lay is not None else ctx.fresh(n, "size-1" if n == 1 else "constant")
            for lay, n in zip(out, out_shape)]


def only_broadcast(ctx, layout: Layout) -> bool:
    """A size-1 axis frozen only because it has one entry (it can only broadcast)."""
    if len(layout) != 1 or layout[0].size * layout[0].inner * layout[0].outer != 1:
        return False
    root = ctx.uf.find(layout[0].group)
    return ctx.uf.frozen[root] and {r.kind for r in ctx.uf.reasons.get(root, [])} == {"size-1"}


def feature_axes_of_weight(ctx, lays: list, partners: dict, weight: bool = False) -> list:
    """A weight's axes that get_attr declared as mere broadcasts (size 1, never linked) but that
    a contraction reads as feature axes (a weight of one row or one column: x @ W with W of
    shape (k, 1), einsum "bi,ij->bj" with i of size 1, F.linear with a weight of one output),
    re-declared on the parameter that owns them, also when the weight reaches the op through a
    transpose or view (the axis is the parameter's own): axis d becomes `partners[d]` (the
    activation axis it meets) or, None, a one-entry feature axis of its own. Otherwise a one-unit
    hidden group meeting it would be taken for a broadcast ("size-1": not counted as a hidden
    unit, averaged at budget 2 without a word). `weight`: `lays` is certainly a weight's (F.linear's);
    a one-entry axis no parameter owns (made by a reshape or unsqueeze in the graph) cannot widen
    and is frozen with a reason the merge reports. Returns the layouts, re-declared."""
    lays = list(lays)
    for d, partner in partners.items():
        lay = lays[d]
        if not ctx.broadcast_axis(lay):
            continue
        owners = [(name, axis) for name, declared in ctx.param_layouts.items()
                  for axis, own in enumerate(declared) if len(own) == 1 and own[0].group == lay[0].group]
        new = partner if partner is not None else ctx.fresh(1) if owners else None
        for name, axis in owners:
            declared = list(ctx.param_layouts[name])
            declared[axis] = new
            ctx.param(name, declared)
        if owners:
            lays[d] = new
        elif weight:  # (a fresh axis: the broadcast one would keep "size-1", a structural reason)
            lays[d] = ctx.fresh(1, ctx.reason("reshape", "a weight's one-entry axis made in the graph (reshape, "
                                                         "unsqueeze) cannot widen"))
    return lays
