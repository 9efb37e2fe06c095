"""Matrix products and attention (matmul, einsum, scaled dot-product attention): a contraction
of a weight with an activation is a weight layer (the weight's axis takes role "in"); a
contraction of two activations freezes the contracted axis, except q . k over head_dim with
heads on a batch axis of both, where each head's q and k entries may be permuted alike (a
within group)."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from pleas_fx.core.ir import Layout
from pleas_fx.passes.ops.common import arg, feature_axes_of_weight, is_attr, only_broadcast, unknown
from pleas_fx.passes.ops.registry import OpSpec, register_op


def matmul(ctx, node):
    a, b = node.args[0], node.args[1]
    la, lb = ctx.layouts(a), ctx.layouts(b)
    if la is None or lb is None or len(la) < 2 or len(lb) < 2:
        return unknown(ctx, node, "contraction", "matmul of vectors")
    out_shape = ctx.shape()
    batch_a, batch_b = la[:-2], lb[:-2]
    nb = len(out_shape) - 2
    batch = []
    for i in range(1, nb + 1):
        cands = [lay[-i] for lay, shp in ((batch_a, ctx.shape(a)[:-2]), (batch_b, ctx.shape(b)[:-2]))
                 if len(lay) >= i and shp[-i] == out_shape[-2 - i]]
        acc = cands[0] if cands else ctx.fresh(out_shape[-2 - i], "size-1")
        for c in cands[1:]:
            acc = ctx.unify(acc, c)
        batch.insert(0, acc)
    # a weight of one row or column: its size-1 matrix axes are feature axes (the other axis of a
    # computed operand may be tokens: only a parameter's own is a feature axis for sure)
    lb = feature_axes_of_weight(ctx, lb, {len(lb) - 2: la[-1], **({len(lb) - 1: None} if is_attr(b) else {})})
    la = feature_axes_of_weight(ctx, la, {len(la) - 1: lb[-2], **({len(la) - 2: None} if is_attr(a) else {})})
    params = [x for x in (a, b) if is_attr(x)]
    per_unit = not params and _within_contraction(ctx, la[-1], lb[-2], la[:-2], lb[:-2])
    contracted = ctx.unify(la[-1], lb[-2])
    if not params and not per_unit and not ctx.is_frozen(contracted):  # (key tokens: positions already)
        ctx.freeze(contracted, ctx.reason("contraction", "contraction of two activations"))
    if is_attr(b):
        ctx.set_role(b, len(lb) - 2, "in")
    if is_attr(a):
        ctx.set_role(a, len(la) - 1, "in")
    return [*batch, la[-2], lb[-1]]


def _within_contraction(ctx, x: Layout, y: Layout, batch_x, batch_y) -> bool:
    """q . k over head_dim with heads as a batch axis of both operands: permuting each head's
    entries alike in q and k leaves every product unchanged, so the contracted axes share a
    within group instead of being frozen. Needs both to be whole within axes of one group
    whose units sit on a batch axis of both operands."""
    wx, wy = ctx.within(x), ctx.within(y)
    if wx is None or wy is None:
        return False
    parent = ctx.uf.parent_of(wx)
    if parent is None or parent != ctx.uf.parent_of(wy):
        return False
    on_batch = lambda lays: any(len(lay) == 1 and ctx.uf.find(lay[0].group) == parent for lay in lays)
    return on_batch(batch_x) and on_batch(batch_y)


def einsum(ctx, node):
    """torch.einsum on explicit subscripts (MaxViT's "B G H I D, B G H J D -> B G H I J"): the
    axes of one letter share a permutation (size-1 axes only broadcast); a letter in the output
    keeps it; a letter summed over is a contraction (with a parameter: the weight's axis takes
    role "in"; between activations: frozen, unless q . k over head_dim as in matmul). A letter
    repeated in one operand (a diagonal, "bii->bi") reads entries (i, i): its axes share one
    permutation, since P X P^T has P's diagonal order; summed in one operand only (a trace, or a
    sum over an axis) it is frozen; "..." stands for letters of their own (`_explicit_subscripts`)."""
    equation, operands = node.args[0], list(node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(equation, str) or any(ctx.layouts(o) is None for o in operands):
        return unknown(ctx, node, "contraction", "einsum", repr(equation))
    explicit = _explicit_subscripts(equation, [len(ctx.shape(o)) for o in operands])
    if explicit is None:
        return unknown(ctx, node, "contraction", "einsum", repr(equation))
    subs, rhs = explicit
    lays = [ctx.layouts(o) for o in operands]
    shapes = [list(ctx.shape(o)) for o in operands]
    if len(subs) != len(operands) or any(len(sub) != len(lay) for sub, lay in zip(subs, lays)):
        return unknown(ctx, node, "contraction", "einsum", equation)
    axes = {c: [(i, d) for i, sub in enumerate(subs) for d, e in enumerate(sub) if e == c]
            for c in dict.fromkeys("".join(subs))}
    for i, o in enumerate(operands):  # a weight's letters of size 1 everywhere: feature axes
        if is_attr(o):
            ones = {d: next((lays[k][e] for k, e in axes[c] if k != i and not only_broadcast(ctx, lays[k][e])), None)
                    for d, c in enumerate(subs[i]) if max(shapes[k][e] for k, e in axes[c]) == 1
                    and (c in rhs or len({k for k, _ in axes[c]}) > 1)}
            lays[i] = feature_axes_of_weight(ctx, lays[i], ones)
    joined = {}
    for c, where in axes.items():
        n = max(shapes[i][d] for i, d in where)
        full = [lays[i][d] for i, d in where if shapes[i][d] == n]  # (size 1 against n > 1: broadcast)
        live = [lay for lay in full if not only_broadcast(ctx, lay)] or full
        acc = live[0]
        for lay in live[1:]:
            acc = ctx.unify(acc, lay)
        joined[c] = acc
        if c in rhs:
            continue
        params = [operands[i] for i, _ in where if is_attr(operands[i])]
        for i, d in where:
            ctx.set_role(operands[i], d, "in")
        operands_with = {i for i, _ in where}
        if len(where) == 2 and len(operands_with) == 2 and not params and not ctx.is_frozen(acc):
            (i, di), (j, dj) = where
            rest = lambda k, dk: [lays[k][e] for e in range(len(lays[k])) if e != dk and subs[k][e] in rhs]
            if _within_contraction(ctx, lays[i][di], lays[j][dj], rest(i, di), rest(j, dj)):
                continue
        if (len(operands_with) == 1 or not params) and not ctx.is_frozen(acc):
            ctx.freeze(acc, ctx.reason("contraction", "einsum contraction of activations" if len(operands_with) > 1
                                       else "einsum sum over an axis"))
    return [ctx.rewritten(joined[c]) for c in rhs]


def _explicit_subscripts(equation: str, ranks: list[int]) -> tuple[list[str], str] | None:
    """An einsum equation with "..." replaced by unused letters (broadcast from the right, as
    torch does) and the implicit output made explicit: (operand subscripts, output subscripts);
    None where it does not parse."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    subs = lhs.split(",")
    if len(subs) != len(ranks) or any(s.count("...") > 1 or "." in s.replace("...", "") for s in subs + [rhs]):
        return None
    free = [c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq]
    spans = [rank - (len(s) - 3) if "..." in s else 0 for s, rank in zip(subs, ranks)]
    width = max(spans, default=0)
    if min(spans, default=0) < 0 or width > len(free):
        return None
    letters = "".join(free[:width])
    subs = [s.replace("...", letters[width - k:]) for s, k in zip(subs, spans)]
    joined = "".join(subs)
    if arrow:
        rhs = rhs.replace("...", letters)
    else:  # torch's implicit output: the broadcast letters, then the letters used once, sorted
        rhs = letters + "".join(sorted(c for c in set(joined) if c not in letters and joined.count(c) == 1))
    return subs, rhs


def scaled_dot_product_attention(ctx, node):
    """softmax(q k^T * scale + mask) v over (..., tokens, head_dim) tensors: the leading (batch,
    heads) axes of q, k, v and the output share permutations; q's and k's feature axis and the
    key-token axis are contracted between activations (frozen); the output's last axis is v's."""
    q, k, v = (ctx.layouts(arg(node, i, name)) for i, name in enumerate(("query", "key", "value")))
    if any(lay is None for lay in (q, k, v)) or len(q) != len(k) or len(k) != len(v):
        return unknown(ctx, node, "contraction", "attention on tensors of different ranks")
    mask = arg(node, 3, "attn_mask")
    if isinstance(mask, fx.Node):
        ctx.freeze(ctx.layouts(mask), ctx.reason("contraction", "attention mask"))
    lead = [ctx.unify(ctx.unify(a, b), c) for a, b, c in zip(q[:-2], k[:-2], v[:-2])]
    contracted = [(q[-1], "query features"), (k[-1], "key features")]
    if _within_contraction(ctx, q[-1], k[-1], q[:-2], k[:-2]):
        ctx.unify(q[-1], k[-1])  # each head's q and k entries permute alike
        contracted = []
    for lay, why in (*contracted, (k[-2], "key tokens"), (v[-2], "value tokens")):
        if not ctx.is_frozen(lay):
            ctx.freeze(lay, ctx.reason("contraction", f"{why} contracted between activations"))
    return [*lead, q[-2], v[-1]]


register_op(operator.matmul, torch.matmul, torch.mm, torch.bmm, "matmul", "mm", "bmm", spec=OpSpec(infer=matmul))
register_op(torch.einsum, spec=OpSpec(infer=einsum))
register_op(F.scaled_dot_product_attention, spec=OpSpec(infer=scaled_dot_product_attention))
