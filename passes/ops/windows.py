"""Shifted-window steps of a lowered Swin attention (pleas_fx.core.windows): they move tokens
(padding, cyclic shift, window partition, the shift mask) and never touch the channel or heads
axis, which pass through unchanged. The token axes they produce are positions (structural);
a permutable axis reaching a token position is frozen. Sizes are read at run time: nothing to
rewrite when widening."""
from __future__ import annotations

from pleas_fx.core.windows import window_merge, window_partition, window_shift_mask
from pleas_fx.passes.ops.common import arg, freeze_mixed_positions, unknown
from pleas_fx.passes.ops.registry import OpSpec, register_op


def _channels_last(ctx, node, x, detail):
    """Freeze the token axes of x (all but the last), return fresh positions + x's channel axis."""
    if x is None:
        return unknown(ctx, node, "other", "window op on a non-tensor")
    freeze_mixed_positions(ctx, x[:-1], detail)
    out = ctx.shape()
    return [ctx.fresh(n, "spatial") for n in out[:-1]] + [x[-1]]


def partition(ctx, node):
    """(B, H, W, C) -> (B * windows, Wh * Ww, C): C passes through."""
    return _channels_last(ctx, node, ctx.layouts(arg(node, 0, "x")), "window partition moves these positions")


def merge(ctx, node):
    """(B * windows, Wh * Ww, C) -> (B, H, W, C) (the shape of the second argument, read only)."""
    return _channels_last(ctx, node, ctx.layouts(arg(node, 0, "y")), "window merge moves these positions")


def shift_mask(ctx, node):
    """Scores (B * windows, heads, N, N) plus a mask over windows and token pairs: heads pass
    through; the window and token axes are positions."""
    attn = ctx.layouts(arg(node, 0, "attn"))
    if attn is None or len(attn) != 4:
        return unknown(ctx, node, "other", "shift mask on scores of unexpected rank")
    freeze_mixed_positions(ctx, [attn[0], attn[2], attn[3]], "the shift mask varies along this axis")
    return list(attn)


register_op(window_partition, spec=OpSpec(infer=partition))
register_op(window_merge, spec=OpSpec(infer=merge))
register_op(window_shift_mask, spec=OpSpec(infer=shift_mask))
