"""Shape ops: flatten, reshape/view (with the refinement of a group split into units x
entries, e.g. heads x head_dim), permute/transpose, squeeze/unsqueeze, expand/repeat, roll.

Widening rewrites the size constants of reshape/view/expand/unflatten for the merged widths.
"""
from __future__ import annotations

import operator
from math import prod

import torch
import torch.fx as fx
import torch.nn as nn

from pleas_fx.core.ir import Layout, Segment
from pleas_fx.passes.layout_ops import align_reshape, flatten_layout, unflatten_layout
from pleas_fx.passes.ops.common import arg, set_arg, unknown
from pleas_fx.passes.ops.registry import OpSpec, register_op


def flatten(ctx, node):
    x = ctx.layouts(node.args[0])
    if node.op == "call_module":
        m = ctx.module()
        start, end = m.start_dim, m.end_dim
    else:
        start, end = arg(node, 1, "start_dim", 0), arg(node, 2, "end_dim", -1)
    n = len(x)
    if n == 0:
        return ctx.fresh_like(ctx.shape(), "size-1")
    start, end = start % n, end % n
    sizes = list(ctx.shape(node.args[0]))
    merged = flatten_axes(ctx, x[start:end + 1], sizes[start:end + 1])
    return [*x[:start], merged, *x[end + 1:]]


def flatten_axes(ctx, layouts, sizes) -> Layout:
    """The layout of consecutive axes flattened into one (frozen if it cannot be expressed)."""
    lay = flatten_layout(layouts, sizes, ctx.is_frozen, ctx.is_within_of)
    if lay is None:
        reason = ctx.reason("constant", "flatten of the positions of a constant table") if _buffer_positions(ctx, layouts) \
            else ctx.reason("reshape", "flatten of several permutable axes")
        ctx.freeze(list(layouts), reason)
        return ctx.fresh(prod(sizes), reason)
    return lay if lay else ctx.fresh(prod(sizes), "spatial")


def _buffer_positions(ctx, layouts) -> bool:
    """Whether every permutable axis among `layouts` is so far an axis of buffers only (no
    parameter, no network input): the positions of a constant table (Swin v2's relative
    coordinates, mapped by a small MLP and then flattened), not learned features."""
    buffers = {ctx.canonical(n) for n, _ in ctx.gm.named_buffers()}
    roots = {ctx.uf.find(s.group) for lay in layouts if not ctx.is_frozen(lay) for s in lay}
    owners = {r: set() for r in roots}
    for name, lays in ctx.param_layouts.items():
        for lay in lays:
            for s in lay:
                if ctx.uf.find(s.group) in owners:
                    owners[ctx.uf.find(s.group)].add(name)
    return bool(roots) and all(names and names <= buffers for names in owners.values())


def reshape(ctx, node):
    x = ctx.layouts(node.args[0])
    in_sizes, out_sizes = list(ctx.shape(node.args[0])), list(ctx.shape())
    out: list[Layout | None] = [None] * len(out_sizes)
    blocks = align_reshape(in_sizes, out_sizes)
    if blocks is None:
        return unknown(ctx, node, "reshape", "reshape", f"{in_sizes} -> {out_sizes}")
    kept = _singleton_heads(ctx, x, in_sizes, out_sizes, blocks, out)
    x = ctx.rewritten(x)
    for i, n in enumerate(in_sizes):  # dropped size-1 axes
        if n == 1 and i not in kept and not ctx.is_frozen(x[i]):
            ctx.freeze(x[i], ctx.reason("reshape", "reshape drops this axis"))
    for ins, outs in blocks:
        if len(ins) == 1 and len(outs) == 1 and out[outs[0]] is not None:
            continue  # (a single head's entries: _singleton_heads)
        if len(ins) == 1 and len(outs) == 1:
            out[outs[0]] = x[ins[0]]
        elif len(outs) == 1:
            out[outs[0]] = flatten_axes(ctx, [x[i] for i in ins], [in_sizes[i] for i in ins])
        elif len(ins) == 1:
            span = list(range(outs[0], outs[-1] + 1))  # with the size-1 axes in between (one head)
            sizes = [out_sizes[j] for j in span]
            parts = unflatten_layout(x[ins[0]], sizes, ctx.is_frozen, ctx.within_size)
            withins = [s.within for s in x[ins[0]] if s.within is not None and ctx.within_size(s.within)]
            if parts is None and withins:  # head_dim split further (e.g. rotary halves): units stay
                ctx.freeze([(Segment(w, 1),) for w in withins],
                           ctx.reason("within", "reshape splits within-unit entries"))
                parts = unflatten_layout(x[ins[0]], sizes, ctx.is_frozen, ctx.within_size)
            if parts is None and len(x[ins[0]]) > 1:  # a concat viewed as (pieces, entries): a channel shuffle
                parts = _stack_pieces(ctx, x[ins[0]], sizes)
                x = ctx.rewritten(x)
            if parts is None and _refine_for_split(ctx, x[ins[0]], sizes):
                x = ctx.layouts(node.args[0])
                parts = unflatten_layout(x[ins[0]], sizes, ctx.is_frozen, ctx.within_size)
            if parts is None:
                ctx.freeze(x[ins[0]], ctx.reason("reshape", "reshape splits a permutable axis",
                                                 f"{in_sizes} -> {out_sizes}"))
                parts = [None] * len(span)
            for j, lay in zip(span, parts):
                out[j] = lay
        else:
            ctx.freeze([x[i] for i in ins], ctx.reason("reshape", "reshape regroups axes", f"{in_sizes} -> {out_sizes}"))
    return [lay if lay is not None else ctx.fresh(n, "size-1" if n == 1 else "spatial")
            for lay, n in zip(out, out_sizes)]


def _trailing_ones(sizes: list[int]) -> int:
    """How many size-1 axes end `sizes`."""
    return next((k for k, n in enumerate(reversed(sizes)) if n != 1), len(sizes))


def _singleton_heads(ctx, x, in_sizes, out_sizes, blocks, out) -> set[int]:
    """A single attention head: a size-1 axis next to the entries axis that it holds the one unit of
    (align_reshape leaves size-1 axes out). (B, N, C) -> (B, N, 1, C) as the last two axes (batch
    and tokens before them) makes the channels one unit with a within group (heads x head_dim with
    one head: whole heads are widened, each head's entries permuted) when every other axis is
    unchanged (a window grid view such as (B, 7, 7, C) -> (B, 7, 1, 7, 1, C) is not a head);
    (.., 1, C) -> (.., C) flattens the unit with its
    entries, (.., 1, C) -> (.., 1, C) keeps both; a trailing size-1 axis stays one. Fills `out`;
    returns the input size-1 axes kept."""
    kept: set[int] = set()
    if in_sizes and out_sizes and in_sizes[-1] == out_sizes[-1] == 1 and not ctx.is_frozen(x[-1]):
        # a trailing size-1 axis stays (one head of a position-bias table: (.., 1) -> (-1, 1)), at its
        # place in the trailing run of size-1 axes: axes appended after it are new ((B, 1) -> (B, 1, 1, 1),
        # a one-channel gate broadcast over a map, keeps the channel on axis 1)
        run_in, run_out = _trailing_ones(in_sizes), _trailing_ones(out_sizes)
        at = len(out_sizes) - run_out + run_in - 1 if run_out > run_in else len(out_sizes) - 1
        out[at] = x[-1]
        kept.add(len(in_sizes) - 1)
    for ins, outs in blocks:
        if len(ins) != 1 or len(outs) != 1:
            continue
        i, j = ins[0], outs[0]
        unit_in = i > 0 and in_sizes[i - 1] == 1 and not ctx.is_frozen(x[i - 1]) and ctx.is_within_of(x[i], x[i - 1][0].group)
        unit_out = j > 0 and out_sizes[j - 1] == 1
        if unit_in and unit_out:
            out[j - 1], out[j] = x[i - 1], x[i]
        elif unit_in:
            out[j] = flatten_axes(ctx, [x[i - 1], x[i]], [1, in_sizes[i]])
        elif (unit_out and i == len(in_sizes) - 1 and j == len(out_sizes) - 1 >= 3 and in_sizes[i - 1] != 1
              and list(out_sizes[:-2]) == list(in_sizes[:-1])  # only the head axis inserted (not a grid view)
              and len(x[i]) == 1 and x[i][0].inner == x[i][0].outer == 1 and not ctx.is_frozen(x[i])
              and _refine_for_split(ctx, x[i], [1, in_sizes[i]])):
            parts = unflatten_layout(ctx.rewritten(x[i]), [1, in_sizes[i]], ctx.is_frozen, ctx.within_size)
            if parts is not None and None not in parts:
                out[j - 1], out[j] = parts
            continue
        else:
            continue
        kept.add(i - 1)
    return kept


def _stack_pieces(ctx, layout: Layout, sizes: list[int]) -> list[Layout | None] | None:
    """An axis of several segments viewed as (g, n / g) (a channel shuffle's first step, ShuffleNet's
    concat of two branches viewed as (2, C/2)): cut it into the g pieces of n / g entries and link
    the pieces (their common refinement), so that the new n / g axis carries the one layout every
    piece shares and the g axis, which picks the piece, is frozen. Every permutation left permutes
    all pieces alike: a subgroup of the old ones. None (nothing linked) where it does not apply."""
    live = [i for i, n in enumerate(sizes) if n != 1]
    if len(live) != 2 or ctx.is_frozen(layout):
        return None
    g, n = sizes[live[0]], sizes[live[1]]
    cut = ctx.split_at(layout, [k * n for k in range(1, g)])
    if cut is None:
        return None
    pieces, offset, current = [], 0, []
    for seg in cut:
        current.append(seg)
        offset += seg.numel
        if offset % n == 0:
            pieces.append(tuple(current))
            current = []
    if len(pieces) != g or current:
        return None
    joined = pieces[0]
    for piece in pieces[1:]:
        joined = ctx.unify(ctx.rewritten(joined), ctx.rewritten(piece))
    joined = ctx.rewritten(joined)
    if ctx.is_frozen(joined):
        return None
    out: list[Layout | None] = [None] * len(sizes)
    out[live[1]] = joined
    return out


def _refine_for_split(ctx, layout: Layout, sizes: list[int]) -> bool:
    """A permutable group split into several axes (a fused qkv output viewed as 3 x heads x
    head_dim, channels viewed as groups x channels-per-group): coarsen the group so its units
    are the entries of one of the new axes, each carrying the axes after it. The unit axis is
    the last but one (heads in (3, heads, head_dim), also when heads == 1, and in (heads,
    head_dim)). The entries of each unit (head_dim) get a within group of their own: per unit,
    they may be permuted too, as long as every op that meets them allows it (checked when the
    groups are collected)."""
    if len(layout) != 1 or ctx.is_frozen(layout):
        return False
    seg = layout[0]
    if ctx.has_within(seg.group):
        return False
    if len(sizes) < 2 or prod(sizes) != seg.numel:
        return False
    # the new axes must cut the group's own units: repetitions (outer/inner) stay outside
    cum = [1]
    for n in sizes:
        cum.append(cum[-1] * n)
    unit_axis = len(sizes) - 2
    before, after = cum[unit_axis], prod(sizes[unit_axis + 1:])
    if before % seg.outer or after % seg.inner:
        return False
    outer, inner = before // seg.outer, after // seg.inner
    if outer * sizes[unit_axis] * inner != seg.size:
        return False
    within = ctx.uf.new_within(inner, seg.group) if seg.inner == 1 and inner > 1 else None
    ctx.refine(seg.group, outer, sizes[unit_axis], inner, within)
    return True


_ARITHMETIC = {operator.floordiv, operator.mul, operator.add, operator.sub, operator.truediv, operator.mod,
               operator.neg, int}


def _reads_resized_axis(value, resized, seen=None) -> bool:
    """Whether a size computed in the graph (x.shape[i], x.size(i), len(x), and integer
    arithmetic on those) reads an axis whose size the merge changes. Unknown ways of computing
    a size count as reading one (the size is then replaced by a constant)."""
    if not isinstance(value, fx.Node):
        return False
    seen = set() if seen is None else seen
    if value in seen:
        return False
    seen.add(value)
    if value.op == "call_method" and value.target == "size" and len(value.args) > 1:
        return resized(value.args[0], value.args[1])
    if value.op == "call_function" and value.target is len:
        return resized(value.args[0], 0)
    if value.op == "call_function" and value.target is operator.getitem and isinstance(value.args[1], int):
        whole = value.args[0]  # x.shape[i] or x.size()[i]
        shape_of = whole.op == "call_function" and whole.target is getattr and whole.args[1] == "shape"
        size_of = whole.op == "call_method" and whole.target == "size" and len(whole.args) == 1
        if isinstance(whole, fx.Node) and (shape_of or size_of):
            return resized(whole.args[0], value.args[1])
        return True
    if value.op == "call_function" and value.target in _ARITHMETIC:
        return any(_reads_resized_axis(a, resized, seen) for a in value.args)
    return True


def rewrite_sizes(sizes: list, old: list[int], new: list[int], resized) -> list:
    """The sizes of a reshape/view/expand for the merged widths, position by position: a
    constant equal to the old size of a resized axis takes the new size, and so does a size
    computed in the graph (``B, N, C = x.shape; y.reshape(B, N, C // heads)``) where the axis
    is resized or the computation reads a resized axis (C may read another group's width:
    heads x head_dim is not the residual width once the two are merged differently). Sizes
    computed from axes the merge leaves alone (batch, tokens) stay computed."""
    if len(sizes) != len(old):
        return sizes
    out = []
    for s, o, n in zip(sizes, old, new):
        if isinstance(s, int) and s == o and s != -1 and o != n:
            s = n
        elif isinstance(s, fx.Node) and (o != n or _reads_resized_axis(s, resized)):
            s = n
        out.append(s)
    return out


def reshape_rewrite(node: fx.Node, r) -> None:
    """view/reshape/expand sizes for the merged widths."""
    old, new, resized = r.old, r.new, r.resized
    if isinstance(old, list):
        return
    if node.op == "call_method" and node.target in ("view", "reshape", "expand"):
        rest = node.args[1:]
        packed = len(rest) == 1 and isinstance(rest[0], (list, tuple))
        sizes = rewrite_sizes(list(rest[0] if packed else rest), list(old), new, resized)
        node.args = (node.args[0], type(rest[0])(sizes)) if packed else (node.args[0], *sizes)
    elif node.op == "call_function" and node.target is torch.reshape:
        shape = arg(node, 1, "shape")
        set_arg(node, 1, "shape", type(shape)(rewrite_sizes(list(shape), list(old), new, resized)))


def unflatten_rewrite(node: fx.Node, r) -> None:
    """unflatten(dim, sizes): the new sizes of the unflattened axes."""
    dim, sizes = arg(node, 1, "dim"), arg(node, 2, "sizes")
    if not isinstance(dim, int) or not isinstance(sizes, (list, tuple)):
        return
    dim %= len(r.old) - len(sizes) + 1
    set_arg(node, 2, "sizes", type(sizes)(r.new[dim:dim + len(sizes)]))


def permute(ctx, node):
    x = ctx.layouts(node.args[0])
    dims = node.args[1:] if node.op == "call_method" else [arg(node, 1, "dims")]
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    if node.op == "call_method" and not dims:
        dims = node.kwargs.get("dims")
    return [x[d % len(x)] for d in dims]


def transpose(ctx, node):
    x = list(ctx.layouts(node.args[0]))
    a, b = arg(node, 1, "dim0") % len(x), arg(node, 2, "dim1") % len(x)
    x[a], x[b] = x[b], x[a]
    return x


def t(ctx, node):
    return list(reversed(ctx.layouts(node.args[0])))


def unsqueeze(ctx, node):
    x = list(ctx.layouts(node.args[0]))
    dim = arg(node, 1, "dim") % (len(x) + 1)
    return x[:dim] + [ctx.fresh(1, "size-1")] + x[dim:]


def squeeze(ctx, node):
    x = ctx.layouts(node.args[0])
    in_shape, out_shape = list(ctx.shape(node.args[0])), list(ctx.shape())
    dim = arg(node, 1, "dim")
    if dim is None:
        dims = [i for i, n in enumerate(in_shape) if n == 1]
    else:
        dims = [d % len(x) for d in (dim if isinstance(dim, (list, tuple)) else [dim]) if in_shape[d] == 1]
    kept = [x[i] for i in range(len(x)) if i not in dims]
    return kept if len(kept) == len(out_shape) else unknown(ctx, node, "other", "squeeze")


def roll(ctx, node):
    """torch.roll(x, shifts, dims): rolled axes are positions moved cyclically (a permutable axis
    rolled is frozen); the other axes pass through. Without dims the flattened tensor rolls."""
    x = ctx.layouts(node.args[0])
    dims = arg(node, 2, "dims")
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        return unknown(ctx, node, "other", "roll of the flattened tensor")
    for d in (dims if isinstance(dims, (list, tuple)) else [dims]):
        if not ctx.is_frozen(x[d % len(x)]):
            ctx.freeze(x[d % len(x)], ctx.reason("spatial mixing", "roll moves the entries of this axis"))
    return list(x)


def expand(ctx, node):
    x = ctx.layouts(node.args[0])
    in_shape, out_shape = list(ctx.shape(node.args[0])), list(ctx.shape())
    lead = len(out_shape) - len(in_shape)
    out = [ctx.fresh(n, "constant") for n in out_shape[:lead]]
    for i, n in enumerate(in_shape):
        if n == out_shape[lead + i]:
            out.append(x[i])
        else:
            if not ctx.is_frozen(x[i]):
                ctx.freeze(x[i], ctx.reason("repetition", "repetition of this axis"))
            out.append(ctx.fresh(out_shape[lead + i], "constant"))
    return out


register_op(torch.flatten, "flatten", nn.Flatten, spec=OpSpec(infer=flatten))
register_op("view", "reshape", torch.reshape, "view_as", "reshape_as", nn.Unflatten,
            spec=OpSpec(infer=reshape, rewrite=reshape_rewrite))
register_op("unflatten", torch.unflatten, spec=OpSpec(infer=reshape, rewrite=unflatten_rewrite))
register_op("permute", torch.permute, spec=OpSpec(infer=permute))
register_op("transpose", torch.transpose, "swapaxes", torch.swapaxes, spec=OpSpec(infer=transpose))
register_op("t", torch.t, spec=OpSpec(infer=t))
register_op("unsqueeze", torch.unsqueeze, spec=OpSpec(infer=unsqueeze))
register_op("squeeze", torch.squeeze, spec=OpSpec(infer=squeeze))
register_op("expand", spec=OpSpec(infer=expand, rewrite=reshape_rewrite))
register_op(torch.roll, "roll", spec=OpSpec(infer=roll))
register_op("expand_as", "repeat", "tile", torch.tile, spec=OpSpec(infer=expand))
