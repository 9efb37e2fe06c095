"""Elementwise ops (activations, arithmetic, comparisons and logic, dropout, casts) and PReLU: axes that meet at
full size under broadcasting share their permutation."""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from pleas_fx.core.ir import layout_numel
from pleas_fx.passes.ops.common import arg, broadcast, is_attr, tensor_args, unknown
from pleas_fx.passes.ops.registry import OpSpec, register_op

try:  # torchvision wraps stochastic_depth as an fx leaf function
    from torchvision.ops import stochastic_depth as _tv_stochastic_depth
except Exception:  # pragma: no cover - torchvision is a dependency
    _tv_stochastic_depth = None

ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Mish, nn.Hardtanh, nn.LogSigmoid,
    nn.Softsign, nn.Tanhshrink, nn.Threshold, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Softshrink, nn.Hardshrink,
)
ELEMENTWISE_FUNCTIONS = [
    F.relu, F.relu6, F.gelu, F.silu, F.sigmoid, F.tanh, F.hardswish, F.hardsigmoid, F.leaky_relu,
    F.elu, F.selu, F.celu, F.softplus, F.mish, F.hardtanh, F.logsigmoid, F.dropout, F.dropout1d,
    F.dropout2d, F.dropout3d, F.alpha_dropout, F.relu_, F.threshold,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.abs,
    torch.neg, torch.erf, torch.clamp, torch.clip, torch.square, torch.sin, torch.cos, torch.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.maximum, torch.minimum,
    torch.where, torch.lerp, torch.addcmul,
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    operator.iadd, operator.isub, operator.imul, operator.itruediv,
    # comparisons and logic: masks computed feature by feature (x > 0, ~mask, a & b)
    torch.gt, torch.ge, torch.lt, torch.le, torch.eq, torch.ne, torch.greater, torch.greater_equal, torch.less,
    torch.less_equal, torch.not_equal, torch.logical_and, torch.logical_or, torch.logical_xor, torch.logical_not,
    torch.bitwise_not, torch.isnan, torch.isinf, torch.isfinite, torch.sign,
    operator.gt, operator.ge, operator.lt, operator.le, operator.eq, operator.ne, operator.and_, operator.or_,
    operator.xor, operator.invert,
]
if _tv_stochastic_depth is not None:
    ELEMENTWISE_FUNCTIONS.append(_tv_stochastic_depth)
ELEMENTWISE_METHODS = [
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "exp", "log", "sqrt", "rsqrt", "abs", "neg",
    "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "square", "pow", "add", "add_", "sub",
    "sub_", "mul", "mul_", "div", "div_", "contiguous", "float", "double", "half", "bfloat16",
    "to", "type", "type_as", "clone", "detach", "requires_grad_", "masked_fill", "erf", "sin", "cos",
    "gt", "ge", "lt", "le", "eq", "ne", "greater", "less", "logical_and", "logical_or", "logical_xor", "logical_not",
    "bitwise_not", "isnan", "isinf", "isfinite", "sign", "bool", "long", "int",
]


def elementwise(ctx, node):
    tensors = tensor_args(ctx, node)
    if not tensors:
        return None if ctx.shape() is None else ctx.fresh_like(ctx.shape(), "constant")
    return broadcast(ctx, node, tensors)


register_op(*ELEMENTWISE_MODULES, *ELEMENTWISE_FUNCTIONS, *ELEMENTWISE_METHODS, spec=OpSpec(infer=elementwise))


def prelu(ctx, node):
    """One slope per channel, or one slope shared by every channel (declared as a broadcast,
    then re-declared per channel: features kept apart keep their own model's slope)."""
    x = ctx.layouts(node.args[0])
    channel = x[1] if len(x) > 1 else x[0]
    name = f"{node.target}.weight"
    if ctx.module().num_parameters == 1 and layout_numel(channel) != 1:
        ctx.param(name, [ctx.fresh(1, "size-1")])
    ctx.param(name, [channel])
    return list(x)


def prelu_resize(module: nn.PReLU, input_shape) -> None:
    module.num_parameters = module.weight.numel()


def prelu_function(ctx, node):
    """F.prelu(input, weight): the weight's entries are the channels' slopes (or one shared)."""
    x, w = ctx.layouts(arg(node, 0, "input")), arg(node, 1, "weight")
    if not is_attr(w):
        return unknown(ctx, node, "computed weight", "prelu with a computed weight")
    ctx.param(w.target, [x[1] if len(x) > 1 else x[0]])
    return list(x)


register_op(nn.PReLU, spec=OpSpec(infer=prelu, resize=prelu_resize))
register_op(F.prelu, spec=OpSpec(infer=prelu_function))
