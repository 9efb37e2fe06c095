"""timm's layers that pleas_fx keeps whole when tracing (timm marks them not to be traced, or
they cannot be): BatchNormAct2d and its variants (a BatchNorm, then an elementwise activation:
per channel, folded into the convolution before it; traced through, as F.batch_norm and the
activation's ops, when its activation is a module pleas_fx does not know), Conv2dSame (a convolution with
TensorFlow-style "same" padding, solved with that exact padding), the weight-standardised
convolutions (channels as a convolution's, weights mapped), and the "same"-padded pools.
Nothing is registered when timm is not installed."""
from __future__ import annotations

import math

import torch.fx as fx

from pleas_fx.core.ir import NormNode, WeightNode
from pleas_fx.passes.ops.common import unknown
from pleas_fx.passes.ops.conv import conv_module, conv_module_resize, conv_module_weight
from pleas_fx.passes.ops.elementwise import elementwise
from pleas_fx.passes.ops.norms import batchnorm, batchnorm_norm, batchnorm_resize
from pleas_fx.passes.ops.pooling import pooling
from pleas_fx.passes.ops.registry import OpSpec, module_spec, register_op

try:
    from timm.layers import norm_act as _norm_act
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame
    from timm.layers.std_conv import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
except Exception:  # timm missing, or a version without these layers
    _norm_act = None


def _elementwise_tail(module) -> bool:
    """Whether the activation (and dropout) a norm-act module applies after the norm act on
    each entry alone (known elementwise ops, or identity)."""
    for name in ("drop", "act"):
        part = getattr(module, name, None)
        spec = module_spec(part) if part is not None else None
        if part is not None and (spec is None or spec.infer is not elementwise):
            return False
    return True


def norm_act(ctx, node):
    """BatchNorm then an elementwise activation: per channel."""
    if not _elementwise_tail(ctx.module()):
        return unknown(ctx, node, "no handler", f"no handler for the activation of {type(ctx.module()).__name__}")
    return batchnorm(ctx, node)


def norm_act_norm(node: fx.Node, gm: fx.GraphModule) -> NormNode | None:
    return batchnorm_norm(node, gm) if _elementwise_tail(gm.get_submodule(node.target)) else None


def _same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """timm's pad_same: total max((ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0), the odd entry after."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def conv_same_weight(node: fx.Node, gm: fx.GraphModule) -> WeightNode:
    """A Conv2dSame is solved with the padding it computes for the example input's size."""
    w = conv_module_weight(node, gm)
    if w.kind not in ("conv", "grouped"):
        return w
    shape = node.args[0].meta["tensor_meta"].shape
    pads = tuple(_same_pads(shape[2 + i], w.kernel[i], w.stride[i], w.dilation[i]) for i in range(2))
    return WeightNode(w.node, w.weight, w.bias, w.kind, w.kernel, w.stride, pads, w.dilation)


def std_conv_weight(node: fx.Node, gm: fx.GraphModule) -> WeightNode:
    w = conv_module_weight(node, gm)
    if w.kind == "depthwise":
        return w
    return WeightNode(w.node, w.weight, w.bias, "mapped",
                      note="weight-standardised convolution is mapped, not solved")


if _norm_act is not None:
    _norm_acts = [getattr(_norm_act, n) for n in ("BatchNormAct2d", "SyncBatchNormAct") if hasattr(_norm_act, n)]
    register_op(*_norm_acts, spec=OpSpec(infer=norm_act, resize=batchnorm_resize, norm=norm_act_norm,
                                         whole=_elementwise_tail))
    register_op(Conv2dSame, spec=OpSpec(infer=conv_module, resize=conv_module_resize, weight=conv_same_weight))
    register_op(StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame,
                spec=OpSpec(infer=conv_module, resize=conv_module_resize, weight=std_conv_weight))
    register_op(MaxPool2dSame, AvgPool2dSame, spec=OpSpec(infer=pooling))
