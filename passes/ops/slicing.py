"""Concatenation, stacking, splitting and indexing: a concat makes an axis a sequence of
segments from several groups; a split or slice keeps the segments it selects, partitioning
first every group it cuts into pieces (at unit boundaries); anything else is frozen.

Widening turns `chunk` into `split` with explicit sizes (widened pieces need not stay equal)
and rewrites split sections.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from pleas_fx.core.fxutil import node_shape
from pleas_fx.passes.layout_ops import TupleLayouts, slice_layout
from pleas_fx.passes.ops.common import arg, is_attr, set_arg, unknown
from pleas_fx.passes.ops.registry import OpSpec, register_op


def cat(ctx, node):
    tensors = arg(node, 0, "tensors")
    dim = arg(node, 1, "dim", 0)
    lays = [ctx.layouts(t) for t in tensors]
    if any(lay is None for lay in lays):
        return unknown(ctx, node, "other", "cat of non-tensors")
    n = len(lays[0])
    dim %= n
    out = []
    for i in range(n):
        if i == dim:
            out.append(tuple(seg for lay in lays for seg in lay[i]))
        else:
            acc = lays[0][i]
            for lay in lays[1:]:
                acc = ctx.unify(acc, lay[i])
            out.append(acc)
    return out


def stack(ctx, node):
    tensors = arg(node, 0, "tensors")
    dim = arg(node, 1, "dim", 0)
    lays = [ctx.layouts(t) for t in tensors]
    out = list(lays[0])
    for lay in lays[1:]:
        out = [ctx.unify(a, b) for a, b in zip(out, lay)]
    dim %= len(out) + 1
    return out[:dim] + [ctx.fresh(len(lays), "constant")] + out[dim:]


def split(ctx, node):
    """Pieces along an axis; a piece boundary inside a permutable group freezes it."""
    x = ctx.layouts(node.args[0])
    shapes = ctx.shape()
    method = node.target if isinstance(node.target, str) else node.target.__name__
    dim = arg(node, 2 if method != "unbind" else 1, "dim", 0)
    dim %= len(x)
    pieces = []
    if method != "unbind" and not ctx.is_frozen(x[dim]):  # pieces cut a group: split it into pieces first
        ends = [sum(shp[dim] for shp in shapes[:i + 1]) for i in range(len(shapes))]
        if ctx.split_at(x[dim], ends, cut_units=True) is not None:
            x = ctx.rewritten(x)
    start = 0
    for shp in shapes:
        if method == "unbind":
            piece = x[:dim] + x[dim + 1:]
            if not ctx.is_frozen(x[dim]):
                ctx.freeze(x[dim], ctx.reason("slicing", "unbind of this axis"))
            pieces.append(list(piece))
            continue
        stop = start + shp[dim]
        sub = ctx.slice(x[dim], start, stop)
        if sub is None:
            ctx.freeze(x[dim], ctx.reason("slicing", "split inside a permutable group"))
            sub = ctx.fresh(shp[dim], "constant")
        pieces.append([*x[:dim], sub, *x[dim + 1:]])
        start = stop
    return TupleLayouts(pieces)


def split_rewrite(node: fx.Node, r) -> None:
    """Split sections (and chunk, which becomes a split: widened pieces need not stay equal)."""
    if not isinstance(r.old, list):
        return
    name = node.target if isinstance(node.target, str) else node.target.__name__
    dim = arg(node, 2, "dim", 0)
    if name == "chunk":
        node.target = "split" if node.op == "call_method" else torch.split
        node.args, node.kwargs = (node.args[0], [piece[dim] for piece in r.new], dim), {}
    elif name == "split" and isinstance(arg(node, 1, "split_size_or_sections"), (list, tuple)):
        set_arg(node, 1, "split_size_or_sections", [piece[dim] for piece in r.new])


def getitem_rewrite(node: fx.Node, r) -> None:
    """Slice bounds on a tensor axis move to where the selected segments are in the merged
    model (a slice selects whole segments: inference partitioned what it cut)."""
    src, index = node.args
    in_shape = node_shape(src) if isinstance(src, fx.Node) else None
    if in_shape is None or isinstance(in_shape, list) or isinstance(r.old, list):
        return  # tuple indexing, or a tensor indexed into a tuple
    items = index if isinstance(index, tuple) else (index,)
    n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
    out, dim = [], 0
    for item in items:
        if item is Ellipsis:
            dim += len(in_shape) - n_real
        elif item is not None:
            if isinstance(item, slice) and item.step in (None, 1) and r.resized(src, dim):
                start, stop, _ = item.indices(in_shape[dim])
                new_start, new_stop = r.new_offset(src, dim, start), r.new_offset(src, dim, stop)
                if new_start is not None and new_stop is not None:
                    item = slice(new_start, new_stop, item.step)
            dim += 1
        out.append(item)
    node.args = (src, tuple(out) if isinstance(index, tuple) else out[0])


def getitem(ctx, node):
    src, index = node.args
    value = ctx.layouts(src)
    if value is None:
        return None
    if isinstance(value, TupleLayouts):
        if isinstance(index, int):
            return value[index]
        return unknown(ctx, node, "indexing", "tuple indexing", repr(index))
    return _index_tensor(ctx, node, value, index)


def _lookup(ctx, node, x, index):
    """table[idx] with an integer index tensor into a table's rows (a relative position bias
    table, or one computed by a small MLP as in Swin v2): the rows are looked up like an
    embedding's vocabulary (structural, not features, for a parameter; a computed table's
    permutable rows are frozen); the table's other axes (heads) keep their groups."""
    meta = index.meta.get("tensor_meta") if isinstance(index, fx.Node) else None
    if meta is None or not hasattr(meta, "dtype") or meta.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        return None
    if not ctx.is_frozen(x[0]):
        ctx.freeze(x[0], ctx.reason("vocabulary", "rows of a table looked up by an index tensor") if is_attr(node.args[0])
                   else ctx.reason("indexing", "rows of a computed table looked up by an index tensor"))
    ctx.freeze(ctx.layouts(index), ctx.reason("constant", "an index tensor's entries"))
    return [ctx.fresh(n, "constant") for n in ctx.shape(index)] + list(x[1:])


def _index_tensor(ctx, node, x, index):
    if not isinstance(index, tuple) and (out := _lookup(ctx, node, x, index)) is not None:
        return out
    index = index if isinstance(index, tuple) else (index,)
    in_shape = list(ctx.shape(node.args[0]))
    n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
    out, dim = [], 0
    for item in index:
        if item is Ellipsis:
            skip = len(x) - n_real
            out.extend(x[dim:dim + skip])
            dim += skip
        elif item is None:
            out.append(ctx.fresh(1, "size-1"))
        elif isinstance(item, int):
            if not ctx.is_frozen(x[dim]):
                ctx.freeze(x[dim], ctx.reason("indexing", "indexing a single entry of this axis"))
            dim += 1
        elif isinstance(item, slice) and all(v is None or isinstance(v, int) for v in (item.start, item.stop, item.step)):
            start, stop, step = item.indices(in_shape[dim])
            if (start, stop, step) == (0, in_shape[dim], 1):
                out.append(x[dim])
            else:
                if step == 1 and not ctx.is_frozen(x[dim]) and ctx.split_at(x[dim], [start, stop]) is not None:
                    x = ctx.rewritten(x)
                sub = slice_layout(x[dim], start, stop) if step == 1 else None
                if sub is None and not ctx.is_frozen(x[dim]):
                    ctx.freeze(x[dim], ctx.reason("slicing", "slicing inside a permutable group"))
                if sub is None:
                    sub = ctx.fresh(len(range(start, stop, step)), "constant")
                out.append(sub)
            dim += 1
        elif isinstance(item, slice) and all(v is None or isinstance(v, (int, fx.Node)) for v in (item.start, item.stop, item.step)):
            # bounds computed in the graph (x[:, :H, :W] after padding): positions, not features
            if not ctx.is_frozen(x[dim]):
                ctx.freeze(x[dim], ctx.reason("slicing", "slicing by a bound computed at run time"))
            out.append(ctx.fresh(ctx.shape()[len(out)], "spatial"))
            dim += 1
        else:
            return unknown(ctx, node, "indexing", "advanced indexing")
    out.extend(x[dim:])
    if len(out) != len(ctx.shape()):
        return unknown(ctx, node, "indexing", "indexing")
    return out


register_op(torch.cat, torch.concat, torch.concatenate, spec=OpSpec(infer=cat))
register_op(torch.stack, spec=OpSpec(infer=stack))
register_op("split", torch.split, "chunk", torch.chunk, "unbind", torch.unbind, "tensor_split", torch.tensor_split,
            spec=OpSpec(infer=split, rewrite=split_rewrite))
register_op(operator.getitem, spec=OpSpec(infer=getitem, rewrite=getitem_rewrite))
