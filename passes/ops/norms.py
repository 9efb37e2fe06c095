"""Normalisations: BatchNorm (per channel; folded into the weight node before it, or merged
in affine form), LayerNorm (over the last axes), GroupNorm (channel blocks together).

A norm that mixes several features of a widened axis (LayerNorm over several axes, GroupNorm)
freezes that axis with the reason.
"""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from pleas_fx.core.ir import NormNode
from pleas_fx.passes.ops.common import arg
from pleas_fx.passes.ops.registry import OpSpec, register_op

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batchnorm(ctx, node):
    x = ctx.layouts(node.args[0])
    channel = x[1] if len(x) > 1 else x[0]
    for name, t in ctx.module_params().items():
        ctx.param(name, [channel] if t.dim() == 1 else [])
    return list(x)


def batchnorm_resize(module: nn.modules.batchnorm._NormBase, input_shape) -> None:
    ref = module.running_mean if module.running_mean is not None else module.weight
    if ref is not None:
        module.num_features = ref.shape[0]


def batchnorm_norm(node: fx.Node, gm: fx.GraphModule) -> NormNode | None:
    """An eval-mode BatchNorm normalises with its running statistics (None without them)."""
    m = gm.get_submodule(node.target)
    if not m.track_running_stats or m.running_mean is None:
        return None
    t = node.target
    return NormNode(node.name, f"{t}.running_mean", f"{t}.running_var",
                    f"{t}.weight" if m.weight is not None else None, f"{t}.bias" if m.bias is not None else None,
                    float(m.eps))


def _normalised_axes(ctx, x, k, what):
    if k > 1:
        ctx.freeze(list(x[-k:]), ctx.reason("normalisation", f"{what} normalises over {k} axes"))


def layernorm_module(ctx, node):
    x = ctx.layouts(node.args[0])
    k = len(ctx.module().normalized_shape)
    _normalised_axes(ctx, x, k, "LayerNorm")
    for name, t in ctx.module_params().items():
        ctx.param(name, list(x[-k:]))
    return list(x)


def layernorm_resize(module: nn.LayerNorm, input_shape) -> None:
    if input_shape is not None:
        module.normalized_shape = tuple(input_shape[-len(module.normalized_shape):])


def layernorm_function(ctx, node):
    x = ctx.layouts(arg(node, 0, "input"))
    shape = arg(node, 1, "normalized_shape")
    k = len(shape) if isinstance(shape, (list, tuple)) else 1
    _normalised_axes(ctx, x, k, "layer_norm")
    for i, name in ((2, "weight"), (3, "bias")):
        p = arg(node, i, name)
        if ctx.is_tensor(p):
            for a, b in zip(ctx.layouts(p), x[-k:]):
                ctx.unify(a, b)
    return list(x)


def layernorm_function_rewrite(node: fx.Node, old, new, features) -> None:
    shape_arg = arg(node, 1, "normalized_shape")
    k = len(shape_arg) if isinstance(shape_arg, (list, tuple)) else 1
    new_shape = tuple(new[-k:])
    if len(node.args) > 1:
        node.args = (node.args[0], new_shape, *node.args[2:])
    else:
        node.kwargs = {**node.kwargs, "normalized_shape": new_shape}


def groupnorm(ctx, node):
    x = ctx.layouts(node.args[0])
    m = ctx.module()
    if m.num_groups == 1:
        reason = ctx.reason("normalisation", "GroupNorm with one group normalises across all channels")
    else:
        reason = ctx.reason("normalisation", f"GroupNorm (groups={m.num_groups}) normalises channel blocks together")
    ctx.freeze(x[1], reason)
    for name in ctx.module_params():
        ctx.param(name, [x[1]])
    return list(x)


def groupnorm_resize(module: nn.GroupNorm, input_shape) -> None:
    if module.weight is not None:
        module.num_channels = module.weight.shape[0]


register_op(*BATCHNORMS, spec=OpSpec(infer=batchnorm, resize=batchnorm_resize, norm=batchnorm_norm))
register_op(nn.LayerNorm, spec=OpSpec(infer=layernorm_module, resize=layernorm_resize))
register_op(F.layer_norm, spec=OpSpec(infer=layernorm_function, rewrite=layernorm_function_rewrite))
register_op(nn.GroupNorm, spec=OpSpec(infer=groupnorm, resize=groupnorm_resize))
