"""Normalisations: BatchNorm (per channel; folded into the weight node before it, or merged
in affine form; module or F.batch_norm), InstanceNorm (per channel), LayerNorm (over the last
axes; RMSNorm likewise), GroupNorm (channel blocks: units with a within group, like attention heads).

A norm that mixes several features of a widened axis in a way no structure expresses
(LayerNorm over several axes) freezes that axis with the reason.
"""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from pleas_fx.core.ir import NormNode
from pleas_fx.passes.ops.common import arg, is_attr, set_arg
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
    """F.layer_norm(input, normalized_shape, weight, bias, eps)."""
    return _functional_last_axes_norm(ctx, node, "layer_norm", ((2, "weight"), (3, "bias")))


def rmsnorm_function(ctx, node):
    """F.rms_norm(input, normalized_shape, weight, eps): LayerNorm's structure, no bias."""
    return _functional_last_axes_norm(ctx, node, "rms_norm", ((2, "weight"),))


def _functional_last_axes_norm(ctx, node, what, params):
    x = ctx.layouts(arg(node, 0, "input"))
    shape = arg(node, 1, "normalized_shape")
    k = len(shape) if isinstance(shape, (list, tuple)) else 1
    _normalised_axes(ctx, x, k, what)
    if k == 1:
        _link_channel_params(ctx, node, x[-1], params)
        return list(x)
    for i, name in params:
        p = arg(node, i, name)
        if ctx.is_tensor(p):
            for a, b in zip(ctx.layouts(p), x[-k:]):
                ctx.unify(a, b)
    return list(x)


def layernorm_function_rewrite(node: fx.Node, r) -> None:
    shape_arg = arg(node, 1, "normalized_shape")
    k = len(shape_arg) if isinstance(shape_arg, (list, tuple)) else 1
    set_arg(node, 1, "normalized_shape", tuple(r.new[-k:]))


def group_units(ctx, layout, groups: int, what: str):
    """A channel axis normalised in `groups` blocks of C / groups channels (GroupNorm): its
    group becomes `groups` units of C / groups entries, with a within group permuting each
    unit's entries (the statistics of a block do not depend on the order of its channels).
    Whole blocks are then merged or kept apart, like attention heads. Frozen (with the
    reason) where the axis already has another structure."""
    if ctx.is_frozen(layout):
        return
    channels = sum(s.numel for s in layout)
    if groups < 1 or channels % groups:
        ctx.freeze(layout, ctx.reason("normalisation", f"{what} over {groups} groups of {channels} channels"))
        return
    per = channels // groups
    if per == 1:  # one channel per group: per-channel
        return
    if groups == 1:  # one block of all channels: its statistics ignore their order (like LayerNorm)
        return
    seg = layout[0] if len(layout) == 1 else None
    if seg is not None and seg.outer == 1 and seg.size == groups and seg.inner == per:
        return  # already blocks of this size (a second norm on the same stream)
    if seg is not None and seg.outer == seg.inner == 1 and seg.within is None and not ctx.has_within(seg.group):
        ctx.refine(seg.group, 1, groups, per, ctx.uf.new_within(per, seg.group))
        return
    ctx.freeze(layout, ctx.reason("normalisation", f"{what} normalises channel blocks of an axis of another structure"))


def groupnorm(ctx, node):
    x = ctx.layouts(node.args[0])
    group_units(ctx, x[1], ctx.module().num_groups, "GroupNorm")
    x = ctx.rewritten(x)
    for name in ctx.module_params():
        ctx.param(name, [x[1]])
    return list(x)


def groupnorm_resize(module: nn.GroupNorm, input_shape) -> None:
    per = module.num_channels // module.num_groups
    module.num_channels = module.weight.shape[0] if module.weight is not None else input_shape[1]
    module.num_groups = module.num_channels // per


def groupnorm_function(ctx, node):
    x = ctx.layouts(arg(node, 0, "input"))
    group_units(ctx, x[1], arg(node, 1, "num_groups"), "group_norm")
    x = ctx.rewritten(x)
    _link_channel_params(ctx, node, x[1], ((2, "weight"), (3, "bias")))
    return list(x)


def groupnorm_function_rewrite(node: fx.Node, r) -> None:
    groups = arg(node, 1, "num_groups")
    if r.new[1] != r.old[1]:
        set_arg(node, 1, "num_groups", r.new[1] // (r.old[1] // groups))


def _link_channel_params(ctx, node, channel, positions) -> None:
    """Per-channel tensors passed to a functional norm (parameters or buffers) share its channel axis."""
    for i, name in positions:
        p = arg(node, i, name)
        if is_attr(p) and p.target in ctx.param_layouts:
            ctx.param(p.target, [channel])
        elif ctx.is_tensor(p):
            ctx.unify(ctx.layouts(p)[0], channel)


# --------------------------------------------------------------------------- per-channel norms
def per_channel_module(ctx, node):
    """InstanceNorm (affine or not, with or without running statistics): every statistic and
    parameter belongs to one channel."""
    x = ctx.layouts(node.args[0])
    channel = x[1] if len(x) > 1 else x[0]
    for name, t in ctx.module_params().items():
        ctx.param(name, [channel] if t.dim() == 1 else [])
    return list(x)


def batchnorm_function(ctx, node):
    """F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)."""
    x = ctx.layouts(arg(node, 0, "input"))
    channel = x[1] if len(x) > 1 else x[0]
    _link_channel_params(ctx, node, channel, ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")))
    return list(x)


def batchnorm_function_norm(node: fx.Node, gm: fx.GraphModule) -> NormNode | None:
    """F.batch_norm in inference mode with parameter running statistics (timm's BatchNormAct2d
    traced through): a foldable normalisation."""
    mean, var, w, b = (arg(node, i, n) for i, n in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")))
    if arg(node, 5, "training", False) is not False or not (is_attr(mean) and is_attr(var)):
        return None
    if (w is not None and not is_attr(w)) or (b is not None and not is_attr(b)):
        return None
    return NormNode(node.name, mean.target, var.target, w.target if w is not None else None,
                    b.target if b is not None else None, float(arg(node, 7, "eps", 1e-5)))


def instancenorm_function(ctx, node):
    """F.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)."""
    x = ctx.layouts(arg(node, 0, "input"))
    _link_channel_params(ctx, node, x[1], ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")))
    return list(x)


register_op(*BATCHNORMS, spec=OpSpec(infer=batchnorm, resize=batchnorm_resize, norm=batchnorm_norm))
register_op(nn.LayerNorm, spec=OpSpec(infer=layernorm_module, resize=layernorm_resize))
register_op(F.layer_norm, spec=OpSpec(infer=layernorm_function, rewrite=layernorm_function_rewrite))
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    register_op(nn.RMSNorm, spec=OpSpec(infer=layernorm_module, resize=layernorm_resize))
    register_op(F.rms_norm, spec=OpSpec(infer=rmsnorm_function, rewrite=layernorm_function_rewrite))
register_op(nn.GroupNorm, spec=OpSpec(infer=groupnorm, resize=groupnorm_resize))
register_op(F.group_norm, spec=OpSpec(infer=groupnorm_function, rewrite=groupnorm_function_rewrite))
register_op(F.batch_norm, spec=OpSpec(infer=batchnorm_function, norm=batchnorm_function_norm))
register_op(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, spec=OpSpec(infer=per_channel_module,
                                                                                 resize=batchnorm_resize))
register_op(F.instance_norm, spec=OpSpec(infer=instancenorm_function))
