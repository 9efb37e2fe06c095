"""Pooling, resizing and padding: channels (and batch) pass through, spatial axes are new;
padding a feature axis freezes it (padding it by nothing does not)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pleas_fx.passes.ops.common import arg, freeze_mixed_positions, unknown
from pleas_fx.passes.ops.registry import OpSpec, register_op

POOL_MODULES = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3, nn.LPPool1d: 1, nn.LPPool2d: 2, nn.Upsample: None,
    nn.UpsamplingNearest2d: 2, nn.UpsamplingBilinear2d: 2,
}
POOL_FUNCTIONS = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3, F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3, F.lp_pool2d: 2, F.interpolate: None,
    torch.max_pool2d: 2, torch.avg_pool1d: 1, torch.adaptive_avg_pool1d: 1,
}


def pooling(ctx, node):
    """Channels (and batch) pass through; the last k spatial axes are new."""
    x = ctx.layouts(node.args[0])
    out_shape = ctx.shape()
    if isinstance(out_shape, list):  # return_indices=True
        return unknown(ctx, node, "other", "pooling that returns indices")
    if node.op == "call_module":
        k = POOL_MODULES.get(next(c for c in type(ctx.module()).__mro__ if c in POOL_MODULES))
    else:
        k = POOL_FUNCTIONS.get(node.target)
    k = k if k is not None else len(out_shape) - 2
    if len(x) != len(out_shape) or k >= len(x):
        return unknown(ctx, node, "other", "pooling of unexpected rank")
    freeze_mixed_positions(ctx, x[len(x) - k:], "pooling or resizing mixes the positions of this axis")
    return [*x[: len(x) - k], *[ctx.fresh(n, "spatial") for n in out_shape[len(x) - k:]]]


def pad(ctx, node):
    """Padded axes are new positions (a padded feature axis is frozen); an axis padded by a
    literal 0 on both sides (the channels of a channels-last map padded spatially) passes through."""
    x = ctx.layouts(node.args[0])
    widths = arg(node, 1, "pad")
    k = len(widths) // 2
    out_shape = ctx.shape()
    reason = ctx.reason("padding", "padding of this axis")
    out = list(x[: len(x) - k])
    for i, lay in enumerate(x[len(x) - k:]):  # widths run from the last axis backwards
        before, after = widths[2 * (k - 1 - i)], widths[2 * (k - 1 - i) + 1]
        if type(before) is int and type(after) is int and before == after == 0:
            out.append(lay)
            continue
        if not ctx.is_frozen(lay):
            ctx.freeze(lay, reason)
        out.append(ctx.fresh(out_shape[len(out)], "spatial"))
    return out


register_op(*POOL_MODULES, *POOL_FUNCTIONS, spec=OpSpec(infer=pooling))
register_op(F.pad, spec=OpSpec(infer=pad))
