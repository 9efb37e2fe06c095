"""Built-in group-inference handlers for the common torch ops.

Each handler returns the layouts of its node's output and links the axes its op couples.
Anything an op could do to a widened axis that is not expressed here is frozen with a reason.
"""
from __future__ import annotations

import operator
from math import prod

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from pleas_fx.ir import Layout, Segment
from passes.layout_ops import TupleLayouts, align_reshape, flatten_layout, slice_layout, unflatten_layout
from passes.registry import register_handler

try:  # torchvision wraps stochastic_depth as an fx leaf function
    from torchvision.ops import stochastic_depth as _tv_stochastic_depth
except Exception:  # pragma: no cover - torchvision is a dependency
    _tv_stochastic_depth = None


def _tensor_args(ctx, node: fx.Node) -> list[fx.Node]:
    flat: list = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: flat.append(n))
    return [a for a in flat if ctx.is_tensor(a)]


# --------------------------------------------------------------------------- elementwise
def broadcast(ctx, node: fx.Node, operands=None):
    """Elementwise op with numpy broadcasting: axes that meet at full size are unified."""
    operands = _tensor_args(ctx, node) if operands is None else operands
    out_shape = ctx.shape()
    if out_shape is None or isinstance(out_shape, list):
        return _unknown(ctx, node, "elementwise op with a non-tensor result")
    out: list[Layout | None] = [None] * len(out_shape)
    for arg in operands:
        lays, shp = ctx.layouts(arg), ctx.shape(arg)
        for i in range(1, len(shp) + 1):
            if i > len(out_shape) or (shp[-i] == 1 and out_shape[-i] != 1):
                continue
            lay = lays[-i]
            out[-i] = lay if out[-i] is None else ctx.unify(out[-i], lay)
    return [lay if lay is not None else ctx.fresh(n, "size-1" if n == 1 else "constant")
            for lay, n in zip(out, out_shape)]


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
]
if _tv_stochastic_depth is not None:
    ELEMENTWISE_FUNCTIONS.append(_tv_stochastic_depth)
ELEMENTWISE_METHODS = [
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "exp", "log", "sqrt", "rsqrt", "abs", "neg",
    "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "square", "pow", "add", "add_", "sub",
    "sub_", "mul", "mul_", "div", "div_", "contiguous", "float", "double", "half", "bfloat16",
    "to", "type", "type_as", "clone", "detach", "requires_grad_", "masked_fill", "erf", "sin", "cos",
]


@register_handler(*ELEMENTWISE_MODULES, *ELEMENTWISE_FUNCTIONS, *ELEMENTWISE_METHODS)
def elementwise(ctx, node):
    tensors = _tensor_args(ctx, node)
    if not tensors:
        return None if ctx.shape() is None else ctx.fresh_like(ctx.shape(), "constant")
    return broadcast(ctx, node, tensors)


@register_handler(nn.PReLU)
def prelu(ctx, node):
    x = ctx.layouts(node.args[0])
    weight = f"{node.target}.weight"
    n = ctx.module().num_parameters
    ctx.param(weight, [x[1] if n > 1 else ctx.fresh(1, "size-1")])
    return list(x)


def _unknown(ctx, node, reason):
    for arg in node.all_input_nodes:
        ctx.freeze(ctx.layouts(arg), reason)
    return ctx.fresh_like(ctx.shape(), reason)


# --------------------------------------------------------------------------- weight layers
@register_handler(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv_module(ctx, node):
    m = ctx.module()
    weight = f"{node.target}.weight"
    bias = f"{node.target}.bias" if m.bias is not None else None
    return _conv(ctx, node, node.args[0], m.groups, m.in_channels, m.out_channels, m.kernel_size, weight, bias)


@register_handler(F.conv1d, F.conv2d, F.conv3d)
def conv_function(ctx, node):
    x, w, b = ctx.arg(0, "input"), ctx.arg(1, "weight"), ctx.arg(2, "bias")
    groups = ctx.arg(6, "groups", 1)
    wl = ctx.layouts(w)
    if not (isinstance(w, fx.Node) and w.op == "get_attr") or not isinstance(groups, int):
        return _unknown(ctx, node, "convolution with a computed weight")
    wshape = ctx.shape(w)
    out = _conv(ctx, node, x, groups, wshape[1] * groups, wshape[0], tuple(wshape[2:]), w.target,
                b.target if isinstance(b, fx.Node) and b.op == "get_attr" else None)
    del wl
    return out


def _conv(ctx, node, x_node, groups, c_in, c_out, kernel, weight, bias):
    x = ctx.layouts(x_node)
    out_shape = ctx.shape()
    spatial = [ctx.fresh(n, "spatial") for n in out_shape[2:]]
    kernel_axes = [ctx.fresh(k, "kernel") for k in kernel]
    if groups == 1:
        out_ch = ctx.fresh(c_out)
        ctx.param(weight, [out_ch, x[1], *kernel_axes], ["out", "in"] + ["out"] * len(kernel_axes))
    elif groups == c_in == c_out:  # depthwise: each channel convolved on its own
        out_ch = x[1]
        ctx.param(weight, [out_ch, ctx.fresh(1, "size-1"), *kernel_axes])
    else:
        reason = f"grouped convolution (groups={groups}) at {ctx.where()}"
        ctx.freeze(x[1], reason)
        out_ch = ctx.fresh(c_out, reason)
        ctx.param(weight, [out_ch, ctx.fresh(c_in // groups, reason), *kernel_axes])
    if bias is not None:
        ctx.param(bias, [out_ch])
    return [x[0], out_ch, *spatial]


@register_handler(nn.Linear)
def linear_module(ctx, node):
    m = ctx.module()
    x = ctx.layouts(node.args[0])
    out = ctx.fresh(m.out_features)
    ctx.param(f"{node.target}.weight", [out, x[-1]], ["out", "in"])
    if m.bias is not None:
        ctx.param(f"{node.target}.bias", [out])
    return [*x[:-1], out]


@register_handler(F.linear)
def linear_function(ctx, node):
    x, w, b = ctx.arg(0, "input"), ctx.arg(1, "weight"), ctx.arg(2, "bias")
    xl, wl = ctx.layouts(x), ctx.layouts(w)
    ctx.unify(wl[1], xl[-1])
    ctx.set_role(w, 1, "in")
    if b is not None and ctx.is_tensor(b):
        ctx.unify(ctx.layouts(b)[0], wl[0])
    return [*xl[:-1], wl[0]]


@register_handler(nn.Embedding)
def embedding_module(ctx, node):
    m = ctx.module()
    ids = ctx.layouts(node.args[0])
    ctx.freeze(ids, "network input")
    out = ctx.fresh(m.embedding_dim)
    ctx.param(f"{node.target}.weight", [ctx.fresh(m.num_embeddings, "vocabulary"), out])
    return [*ids, out]


# --------------------------------------------------------------------------- normalisation
@register_handler(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
def batchnorm(ctx, node):
    x = ctx.layouts(node.args[0])
    channel = x[1] if len(x) > 1 else x[0]
    for name, t in ctx.module_params().items():
        ctx.param(name, [channel] if t.dim() == 1 else [])
    return list(x)


@register_handler(nn.LayerNorm)
def layernorm_module(ctx, node):
    x = ctx.layouts(node.args[0])
    k = len(ctx.module().normalized_shape)
    _normalised_axes(ctx, x, k, "LayerNorm")
    for name, t in ctx.module_params().items():
        ctx.param(name, list(x[-k:]))
    return list(x)


def _normalised_axes(ctx, x, k, what):
    if k > 1:
        ctx.freeze(list(x[-k:]), f"{what} normalises over {k} axes at {ctx.where()}")


@register_handler(F.layer_norm)
def layernorm_function(ctx, node):
    x = ctx.layouts(ctx.arg(0, "input"))
    shape = ctx.arg(1, "normalized_shape")
    k = len(shape) if isinstance(shape, (list, tuple)) else 1
    _normalised_axes(ctx, x, k, "layer_norm")
    for i, name in ((2, "weight"), (3, "bias")):
        p = ctx.arg(i, name)
        if ctx.is_tensor(p):
            for a, b in zip(ctx.layouts(p), x[-k:]):
                ctx.unify(a, b)
    return list(x)


@register_handler(nn.GroupNorm)
def groupnorm_module(ctx, node):
    x = ctx.layouts(node.args[0])
    m = ctx.module()
    if m.num_groups == 1:
        reason = f"GroupNorm with one group normalises across all channels at {ctx.where()}"
    else:
        reason = f"GroupNorm (groups={m.num_groups}) normalises channel blocks together at {ctx.where()}"
    ctx.freeze(x[1], reason)
    for name in ctx.module_params():
        ctx.param(name, [x[1]])
    return list(x)


# --------------------------------------------------------------------------- pooling and resizing
POOL_MODULES = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3, nn.LPPool1d: 1, nn.LPPool2d: 2, nn.Upsample: None,
    nn.UpsamplingNearest2d: 2, nn.UpsamplingBilinear2d: 2, nn.PixelShuffle: None,
}
POOL_FUNCTIONS = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3, F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3, F.lp_pool2d: 2, F.interpolate: None,
    torch.max_pool2d: 2, torch.avg_pool1d: 1, torch.adaptive_avg_pool1d: 1,
}


@register_handler(*[m for m in POOL_MODULES if m is not nn.PixelShuffle], *POOL_FUNCTIONS)
def pooling(ctx, node):
    """Channels (and batch) pass through; the last k spatial axes are new."""
    x = ctx.layouts(node.args[0])
    out_shape = ctx.shape()
    if isinstance(out_shape, list):  # return_indices=True
        return _unknown(ctx, node, f"pooling that returns indices at {ctx.where()}")
    if node.op == "call_module":
        k = POOL_MODULES.get(type(ctx.module()))
    else:
        k = POOL_FUNCTIONS.get(node.target)
    k = k if k is not None else len(out_shape) - 2
    if len(x) != len(out_shape) or k >= len(x):
        return _unknown(ctx, node, f"pooling of unexpected rank at {ctx.where()}")
    return [*x[: len(x) - k], *[ctx.fresh(n, "spatial") for n in out_shape[len(x) - k:]]]


@register_handler(F.pad)
def pad(ctx, node):
    x = ctx.layouts(node.args[0])
    widths = ctx.arg(1, "pad")
    k = len(widths) // 2
    out_shape = ctx.shape()
    padded = list(x[len(x) - k:])
    reason = f"padding of this axis at {ctx.where()}"
    for lay in padded:
        if not ctx.is_frozen(lay):
            ctx.freeze(lay, reason)
    return [*x[: len(x) - k], *[ctx.fresh(n, "spatial") for n in out_shape[len(x) - k:]]]


# --------------------------------------------------------------------------- softmax and reductions
@register_handler(nn.Softmax, nn.LogSoftmax, nn.Softmin, F.softmax, F.log_softmax, torch.softmax,
                  torch.log_softmax, "softmax", "log_softmax")
def softmax(ctx, node):
    x = ctx.layouts(node.args[0])
    if node.op == "call_module":
        dim = ctx.module().dim
    else:
        dim = ctx.arg(1, "dim")
    if dim is None:
        ctx.freeze(x, f"softmax without dim at {ctx.where()}")
    else:
        ctx.freeze(x[dim], f"softmax normalises across this axis at {ctx.where()}")
    return list(x)


REDUCTIONS = [torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp,
              torch.norm, "mean", "sum", "amax", "amin", "std", "var", "logsumexp", "norm"]


@register_handler(*REDUCTIONS)
def reduction(ctx, node):
    """Reducing over an axis mixes its features: such an axis is frozen."""
    x = ctx.layouts(node.args[0])
    dim = ctx.arg(1, "dim")
    if dim is None and node.target in ("norm", torch.norm):
        dim = ctx.arg(2, "dim")
    keepdim = node.kwargs.get("keepdim", len(node.args) > 2 and node.args[2] is True)
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        dims = list(range(len(x)))
    else:
        dims = [dim] if isinstance(dim, int) else list(dim)
        dims = [d % len(x) for d in dims]
    for d in dims:
        if not ctx.is_frozen(x[d]):
            ctx.freeze(x[d], f"reduction over this axis at {ctx.where()}")
    out_shape = ctx.shape()
    if keepdim:
        return [ctx.fresh(1, "size-1") if i in dims else x[i] for i in range(len(x))]
    kept = [x[i] for i in range(len(x)) if i not in dims]
    return kept if len(kept) == len(out_shape) else ctx.fresh_like(out_shape, "constant")


# --------------------------------------------------------------------------- shape ops
@register_handler(torch.flatten, "flatten", nn.Flatten)
def flatten(ctx, node):
    x = ctx.layouts(node.args[0])
    if node.op == "call_module":
        m = ctx.module()
        start, end = m.start_dim, m.end_dim
    else:
        start, end = ctx.arg(1, "start_dim", 0), ctx.arg(2, "end_dim", -1)
    n = len(x)
    if n == 0:
        return ctx.fresh_like(ctx.shape(), "size-1")
    start, end = start % n, end % n
    sizes = list(ctx.shape(node.args[0]))
    merged = _flatten(ctx, x[start:end + 1], sizes[start:end + 1])
    return [*x[:start], merged, *x[end + 1:]]


def _flatten(ctx, layouts, sizes) -> Layout:
    lay = flatten_layout(layouts, sizes, ctx.is_frozen, ctx.is_within_of)
    if lay is None:
        reason = f"flatten of several permutable axes at {ctx.where()}"
        ctx.freeze(list(layouts), reason)
        return ctx.fresh(prod(sizes), reason)
    return lay if lay else ctx.fresh(prod(sizes), "spatial")


@register_handler("view", "reshape", torch.reshape, "unflatten", torch.unflatten, nn.Unflatten, "view_as", "reshape_as")
def reshape(ctx, node):
    x = ctx.layouts(node.args[0])
    in_sizes, out_sizes = list(ctx.shape(node.args[0])), list(ctx.shape())
    out: list[Layout | None] = [None] * len(out_sizes)
    blocks = align_reshape(in_sizes, out_sizes)
    if blocks is None:
        return _unknown(ctx, node, f"reshape {in_sizes} -> {out_sizes} at {ctx.where()}")
    for i, n in enumerate(in_sizes):  # dropped size-1 axes
        if n == 1 and not ctx.is_frozen(x[i]):
            ctx.freeze(x[i], f"reshape drops this axis at {ctx.where()}")
    for ins, outs in blocks:
        if len(ins) == 1 and len(outs) == 1:
            out[outs[0]] = x[ins[0]]
        elif len(outs) == 1:
            out[outs[0]] = _flatten(ctx, [x[i] for i in ins], [in_sizes[i] for i in ins])
        elif len(ins) == 1:
            span = list(range(outs[0], outs[-1] + 1))  # with the size-1 axes in between (one head)
            sizes = [out_sizes[j] for j in span]
            parts = unflatten_layout(x[ins[0]], sizes, ctx.is_frozen, ctx.within_size)
            withins = [s.within for s in x[ins[0]] if s.within is not None and ctx.within_size(s.within)]
            if parts is None and withins:  # head_dim split further (e.g. rotary halves): units stay
                ctx.freeze([(Segment(w, 1),) for w in withins], f"reshape splits within-unit entries at {ctx.where()}")
                parts = unflatten_layout(x[ins[0]], sizes, ctx.is_frozen, ctx.within_size)
            if parts is None and _refine_for_split(ctx, x[ins[0]], sizes):
                x = ctx.layouts(node.args[0])
                parts = unflatten_layout(x[ins[0]], sizes, ctx.is_frozen, ctx.within_size)
            if parts is None:
                ctx.freeze(x[ins[0]], f"reshape splits a permutable axis ({in_sizes} -> {out_sizes}) at {ctx.where()}")
                parts = [None] * len(span)
            for j, lay in zip(span, parts):
                out[j] = lay
        else:
            ctx.freeze([x[i] for i in ins], f"reshape regroups axes ({in_sizes} -> {out_sizes}) at {ctx.where()}")
    return [lay if lay is not None else ctx.fresh(n, "size-1" if n == 1 else "spatial")
            for lay, n in zip(out, out_sizes)]


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


@register_handler("permute", torch.permute)
def permute(ctx, node):
    x = ctx.layouts(node.args[0])
    dims = node.args[1:] if node.op == "call_method" else [ctx.arg(1, "dims")]
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    if node.op == "call_method" and not dims:
        dims = node.kwargs.get("dims")
    return [x[d % len(x)] for d in dims]


@register_handler("transpose", torch.transpose, "swapaxes", torch.swapaxes)
def transpose(ctx, node):
    x = list(ctx.layouts(node.args[0]))
    a, b = ctx.arg(1, "dim0") % len(x), ctx.arg(2, "dim1") % len(x)
    x[a], x[b] = x[b], x[a]
    return x


@register_handler("t", torch.t)
def t(ctx, node):
    return list(reversed(ctx.layouts(node.args[0])))


@register_handler("unsqueeze", torch.unsqueeze)
def unsqueeze(ctx, node):
    x = list(ctx.layouts(node.args[0]))
    dim = ctx.arg(1, "dim")
    dim = dim % (len(x) + 1)
    return x[:dim] + [ctx.fresh(1, "size-1")] + x[dim:]


@register_handler("squeeze", torch.squeeze)
def squeeze(ctx, node):
    x = ctx.layouts(node.args[0])
    in_shape, out_shape = list(ctx.shape(node.args[0])), list(ctx.shape())
    dim = ctx.arg(1, "dim")
    if dim is None:
        dims = [i for i, n in enumerate(in_shape) if n == 1]
    else:
        dims = [d % len(x) for d in (dim if isinstance(dim, (list, tuple)) else [dim]) if in_shape[d] == 1]
    kept = [x[i] for i in range(len(x)) if i not in dims]
    return kept if len(kept) == len(out_shape) else _unknown(ctx, node, f"squeeze at {ctx.where()}")


@register_handler("expand", "expand_as", "repeat", "tile", torch.tile)
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
                ctx.freeze(x[i], f"repetition of this axis at {ctx.where()}")
            out.append(ctx.fresh(out_shape[lead + i], "constant"))
    return out


@register_handler(torch.cat, torch.concat, torch.concatenate)
def cat(ctx, node):
    tensors = ctx.arg(0, "tensors")
    dim = ctx.arg(1, "dim", 0)
    lays = [ctx.layouts(t) for t in tensors]
    if any(lay is None for lay in lays):
        return _unknown(ctx, node, f"cat of non-tensors at {ctx.where()}")
    n = len(lays[0])
    dim %= n
    out = []
    for i in range(n):
        if i == dim:
            out.append(tuple(seg for lay in lays for seg in lay[i]))
        else:
            acc = lays[0][i]
            for lay in lays[1:]:
                acc = ctx.unify(acc, lay[i])
            out.append(acc)
    return out


@register_handler(torch.stack)
def stack(ctx, node):
    tensors = ctx.arg(0, "tensors")
    dim = ctx.arg(1, "dim", 0)
    lays = [ctx.layouts(t) for t in tensors]
    out = list(lays[0])
    for lay in lays[1:]:
        out = [ctx.unify(a, b) for a, b in zip(out, lay)]
    dim %= len(out) + 1
    return out[:dim] + [ctx.fresh(len(lays), "constant")] + out[dim:]


@register_handler("split", torch.split, "chunk", torch.chunk, "unbind", torch.unbind, "tensor_split", torch.tensor_split)
def split(ctx, node):
    """Pieces along an axis; a piece boundary inside a permutable group freezes it."""
    x = ctx.layouts(node.args[0])
    shapes = ctx.shape()
    method = node.target if isinstance(node.target, str) else node.target.__name__
    default_dim = 0
    dim = ctx.arg(2 if method not in ("unbind",) else 1, "dim", default_dim)
    dim %= len(x)
    pieces = []
    start = 0
    for shp in shapes:
        if method == "unbind":
            piece = x[:dim] + x[dim + 1:]
            if not ctx.is_frozen(x[dim]):
                ctx.freeze(x[dim], f"unbind of this axis at {ctx.where()}")
            pieces.append(list(piece))
            continue
        stop = start + shp[dim]
        sub = slice_layout(x[dim], start, stop)
        if sub is None and start == 0 and _partition_for_split(ctx, x[dim], [s[dim] for s in shapes]):
            x = ctx.layouts(node.args[0])
            sub = slice_layout(x[dim], start, stop)
        if sub is None:
            ctx.freeze(x[dim], f"split inside a permutable group at {ctx.where()}")
            sub = ctx.fresh(shp[dim], "constant")
        pieces.append([*x[:dim], sub, *x[dim + 1:]])
        start = stop
    return TupleLayouts(pieces)


def _partition_for_split(ctx, layout: Layout, pieces: list[int]) -> bool:
    """A split cutting one permutable group (a fused qkv output into q, k and v): make each
    piece a group of its own, so the split falls on segment boundaries."""
    if len(layout) != 1 or ctx.is_frozen(layout) or len(pieces) < 2:
        return False
    seg = layout[0]
    if seg.outer != 1 or any(n % seg.inner for n in pieces):
        return False
    return ctx.partition(seg.group, [n // seg.inner for n in pieces])


@register_handler(operator.getitem)
def getitem(ctx, node):
    src, index = node.args
    value = ctx.layouts(src)
    if value is None:
        return None
    if isinstance(value, TupleLayouts):
        if isinstance(index, int):
            return value[index]
        return _unknown(ctx, node, f"tuple indexing with {index!r} at {ctx.where()}")
    return _index_tensor(ctx, node, value, index)


def _index_tensor(ctx, node, x, index):
    index = index if isinstance(index, tuple) else (index,)
    in_shape = list(ctx.shape(node.args[0]))
    n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
    out, dim = [], 0
    for item in index:
        if item is Ellipsis:
            skip = len(x) - n_real
            out.extend(x[dim:dim + skip])
            dim += skip
        elif item is None:
            out.append(ctx.fresh(1, "size-1"))
        elif isinstance(item, int):
            if not ctx.is_frozen(x[dim]):
                ctx.freeze(x[dim], f"indexing a single entry of this axis at {ctx.where()}")
            dim += 1
        elif isinstance(item, slice) and all(v is None or isinstance(v, int) for v in (item.start, item.stop, item.step)):
            start, stop, step = item.indices(in_shape[dim])
            if (start, stop, step) == (0, in_shape[dim], 1):
                out.append(x[dim])
            else:
                sub = slice_layout(x[dim], start, stop) if step == 1 else None
                if sub is None:
                    ctx.freeze(x[dim], f"slicing inside a permutable group at {ctx.where()}")
                    sub = ctx.fresh(len(range(start, stop, step)), "constant")
                out.append(sub)
            dim += 1
        else:
            return _unknown(ctx, node, f"advanced indexing at {ctx.where()}")
    out.extend(x[dim:])
    if len(out) != len(ctx.shape()):
        return _unknown(ctx, node, f"indexing at {ctx.where()}")
    return out


@register_handler(operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm")
def matmul(ctx, node):
    a, b = node.args[0], node.args[1]
    la, lb = ctx.layouts(a), ctx.layouts(b)
    if la is None or lb is None or len(la) < 2 or len(lb) < 2:
        return _unknown(ctx, node, f"matmul of vectors at {ctx.where()}")
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
    params = [x for x in (a, b) if isinstance(x, fx.Node) and x.op == "get_attr"]
    per_unit = not params and _within_contraction(ctx, la[-1], lb[-2], la[:-2], lb[:-2])
    contracted = ctx.unify(la[-1], lb[-2])
    if not params and not per_unit:
        ctx.freeze(contracted, f"contraction of two activations at {ctx.where()}")
    if isinstance(b, fx.Node) and b.op == "get_attr":
        ctx.set_role(b, len(lb) - 2, "in")
    if isinstance(a, fx.Node) and a.op == "get_attr":
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


@register_handler(F.scaled_dot_product_attention)
def scaled_dot_product_attention(ctx, node):
    """softmax(q k^T * scale + mask) v over (..., tokens, head_dim) tensors: the leading (batch,
    heads) axes of q, k, v and the output share permutations; q's and k's feature axis and the
    key-token axis are contracted between activations (frozen); the output's last axis is v's."""
    q, k, v = (ctx.layouts(ctx.arg(i, name)) for i, name in enumerate(("query", "key", "value")))
    if any(lay is None for lay in (q, k, v)) or len(q) != len(k) or len(k) != len(v):
        return _unknown(ctx, node, f"attention on tensors of different ranks at {ctx.where()}")
    mask = ctx.arg(3, "attn_mask")
    if isinstance(mask, fx.Node):
        ctx.freeze(ctx.layouts(mask), f"attention mask at {ctx.where()}")
    lead = [ctx.unify(ctx.unify(a, b), c) for a, b, c in zip(q[:-2], k[:-2], v[:-2])]
    contracted = [(q[-1], "query features"), (k[-1], "key features")]
    if _within_contraction(ctx, q[-1], k[-1], q[:-2], k[:-2]):
        ctx.unify(q[-1], k[-1])  # each head's q and k entries permute alike
        contracted = []
    for lay, why in (*contracted, (k[-2], "key tokens"), (v[-2], "value tokens")):
        if not ctx.is_frozen(lay):
            ctx.freeze(lay, f"{why} contracted between activations at {ctx.where()}")
    return [*lead, q[-2], v[-1]]


# --------------------------------------------------------------------------- non-tensor plumbing
@register_handler("size", "dim", "numel", getattr, len, operator.floordiv, operator.mod)
def metadata(ctx, node):
    """Shape queries and integer arithmetic: no tensor axes involved."""
    if node.target is getattr and ctx.is_tensor(node.args[0]) and node.args[1] in ("T", "mT"):
        return list(reversed(ctx.layouts(node.args[0])))
    if ctx.shape() is not None and not isinstance(ctx.shape(), list):
        return _unknown(ctx, node, f"{node.target} returning a tensor at {ctx.where()}")
    return None
