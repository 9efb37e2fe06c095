"""Softmax, reductions and F.normalize: an axis whose features are mixed (normalised together
or reduced over) is frozen, except a head's entries under F.normalize; the others pass through."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pleas_fx.passes.ops.common import arg
from pleas_fx.passes.ops.registry import OpSpec, register_op


def softmax(ctx, node):
    x = ctx.layouts(node.args[0])
    dim = ctx.module().dim if node.op == "call_module" else arg(node, 1, "dim")
    if dim is None:
        ctx.freeze(x, ctx.reason("softmax", "softmax without dim"))
    elif not ctx.is_frozen(x[dim]):  # attention scores over key tokens: positions, frozen already
        ctx.freeze(x[dim], ctx.reason("softmax", "softmax normalises across this axis"))
    return list(x)


def normalize(ctx, node):
    """F.normalize(x, p, dim): divides by a norm over one axis, which is invariant under
    permutations of that axis but not under widening it. A head's entries (a live within axis:
    cosine attention normalises q and k per head) keep their group, since widening adds whole
    heads and never entries; any other permutable axis is frozen."""
    x = ctx.layouts(node.args[0])
    dim = arg(node, 2, "dim", 1) % len(x)
    if ctx.within(x[dim]) is None and not ctx.is_frozen(x[dim]):
        ctx.freeze(x[dim], ctx.reason("normalisation", "normalize divides by a norm over this axis"))
    return list(x)


# the arguments after the input, by position, of each reduction (method and torch function alike)
SIGNATURES = {
    "mean": ("dim", "keepdim"), "sum": ("dim", "keepdim"), "amax": ("dim", "keepdim"), "amin": ("dim", "keepdim"),
    "logsumexp": ("dim", "keepdim"), "std": ("dim", "unbiased", "keepdim"), "var": ("dim", "unbiased", "keepdim"),
    "norm": ("p", "dim", "keepdim"),
}
REDUCTIONS = [torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp, torch.norm,
              *SIGNATURES]


def reduction(ctx, node):
    """Reducing over an axis mixes its features: such an axis is frozen. Arguments are bound by
    each op's own signature (x.norm(2, 1) reduces dim 1; x.std(1, True) keeps no dim)."""
    x = ctx.layouts(node.args[0])
    name = node.target if isinstance(node.target, str) else node.target.__name__
    bound = dict(zip(SIGNATURES[name], node.args[1:]))
    bound.update(node.kwargs)
    dim, keepdim = bound.get("dim"), bool(bound.get("keepdim", False))
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        dims = list(range(len(x)))
    else:
        dims = [d % len(x) for d in ([dim] if isinstance(dim, int) else dim)]
    for d in dims:
        if not ctx.is_frozen(x[d]):
            ctx.freeze(x[d], ctx.reason("reduction", "reduction over this axis"))
    out_shape = ctx.shape()
    if keepdim:
        return [ctx.fresh(1, "size-1") if i in dims else x[i] for i in range(len(x))]
    kept = [x[i] for i in range(len(x)) if i not in dims]
    return kept if len(kept) == len(out_shape) else ctx.fresh_like(out_shape, "constant")


register_op(nn.Softmax, nn.LogSoftmax, nn.Softmin, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax,
            "softmax", "log_softmax", spec=OpSpec(infer=softmax))
register_op(*REDUCTIONS, spec=OpSpec(infer=reduction))
register_op(F.normalize, spec=OpSpec(infer=normalize))
