"""Linear layers (nn.Linear, F.linear with a parameter weight) and embeddings.

Inference: a Linear maps its last input axis (contracted, role "in") to fresh output
features; an embedding table maps a frozen vocabulary to fresh features. Fill: linear weights
are solved by least squares; embedding tables are mapped. MACs: weight entries x rows.
Compact emission: a linear layer becomes a BlockLinear (pleas_fx.core.layers).
"""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from pleas_fx.core.ir import WeightNode
from pleas_fx.passes.ops.common import arg, feature_axes_of_weight, is_attr
from pleas_fx.passes.ops.registry import BlockEmit, OpSpec, register_op


def linear_module(ctx, node):
    m = ctx.module()
    x = ctx.layouts(node.args[0])
    out = ctx.fresh(m.out_features)
    ctx.param(f"{node.target}.weight", [out, x[-1]], ["out", "in"])
    if m.bias is not None:
        ctx.param(f"{node.target}.bias", [out])
    return [*x[:-1], out]


def linear_function(ctx, node):
    x, w, b = arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")
    xl, wl = ctx.layouts(x), ctx.layouts(w)
    wl = feature_axes_of_weight(ctx, wl, {1: xl[-1], 0: None}, weight=True)  # a weight of one output or input
    ctx.unify(wl[1], xl[-1])
    ctx.set_role(w, 1, "in")
    if is_attr(b) and b.target in ctx.param_layouts:
        ctx.param(b.target, [wl[0]])
    elif b is not None and ctx.is_tensor(b):
        ctx.unify(ctx.layouts(b)[0], wl[0])
    return [*xl[:-1], wl[0]]


def linear_resize(module: nn.Linear, input_shape) -> None:
    module.out_features, module.in_features = module.weight.shape


def linear_module_weight(node: fx.Node, gm: fx.GraphModule) -> WeightNode:
    m = gm.get_submodule(node.target)
    return WeightNode(node.name, f"{node.target}.weight", f"{node.target}.bias" if m.bias is not None else None,
                      "linear")


def linear_function_weight(node: fx.Node, gm: fx.GraphModule) -> WeightNode | None:
    w, b = arg(node, 1, "weight"), arg(node, 2, "bias")
    if not is_attr(w):
        return None
    if b is not None and not is_attr(b):
        return WeightNode(node.name, w.target, None, "mapped", note="linear with a computed bias is mapped")
    return WeightNode(node.name, w.target, b.target if b is not None else None, "linear")


def linear_module_compact(node: fx.Node, gm: fx.GraphModule) -> BlockEmit | None:
    m = gm.get_submodule(node.target)
    if len(node.args) != 1 or node.kwargs:
        return None
    return BlockEmit(node.args[0], f"{node.target}.weight", f"{node.target}.bias" if m.bias is not None else None)


def linear_function_compact(node: fx.Node, gm: fx.GraphModule) -> BlockEmit | None:
    w, b = arg(node, 1, "weight"), arg(node, 2, "bias")
    if not is_attr(w) or (b is not None and not is_attr(b)):
        return None
    return BlockEmit(arg(node, 0, "input"), w.target, b.target if b is not None else None)


def _freeze_if_max_norm(ctx, features, max_norm) -> None:
    """max_norm renormalises each looked-up row over its features: a norm over the widened axis."""
    if max_norm is not None:
        ctx.freeze([features], ctx.reason("reduction", "embedding max_norm renormalises rows over the features"))


def embedding(ctx, node):
    m = ctx.module()
    ids = ctx.layouts(node.args[0])
    ctx.freeze(ids, "network input")
    out = ctx.fresh(m.embedding_dim)
    _freeze_if_max_norm(ctx, out, m.max_norm)
    ctx.param(f"{node.target}.weight", [ctx.fresh(m.num_embeddings, "vocabulary"), out])
    return [*ids, out]


def embedding_function(ctx, node):
    """F.embedding(ids, weight, ...): the table's rows are a frozen vocabulary, its columns the
    output features. max_norm renormalises each row over its features (a norm over the
    widened axis): frozen."""
    ids, w = ctx.layouts(arg(node, 0, "input")), arg(node, 1, "weight")
    wl = ctx.layouts(w)
    ctx.freeze(ids, "network input")
    ctx.freeze([wl[0]], "vocabulary")
    _freeze_if_max_norm(ctx, wl[1], arg(node, 3, "max_norm"))
    return [*ids, wl[1]]


def embedding_resize(module: nn.Embedding, input_shape) -> None:
    module.embedding_dim = module.weight.shape[1]


register_op(nn.Linear, spec=OpSpec(infer=linear_module, resize=linear_resize, weight=linear_module_weight,
                                   compact=linear_module_compact))
register_op(F.linear, spec=OpSpec(infer=linear_function, weight=linear_function_weight, compact=linear_function_compact))
register_op(nn.Embedding, spec=OpSpec(infer=embedding, resize=embedding_resize))
register_op(F.embedding, spec=OpSpec(infer=embedding_function))
