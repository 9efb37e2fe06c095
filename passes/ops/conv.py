"""Convolutions (nn.Conv1d/2d/3d and F.conv1d/2d/3d with parameter weights).

Inference: a groups=1 convolution maps its input channels (contracted, role "in") to fresh
output channels; a depthwise convolution keeps its channel group; in other grouped convolutions
the conv groups are units shared by the input and output channels, with within groups for
each unit's input and output entries. Fill: groups=1 1-D and 2-D convolutions with zero padding are solved
by least squares over im2col patches (grouped ones conv group by conv group); depthwise
kernels are mapped per channel; the rest are mapped with a note. Multiply-accumulates: weight entries x output positions.
Compact emission: a groups=1 1-D or 2-D convolution with zero padding becomes a BlockConv
(pleas_fx.core.layers); depthwise and grouped convolutions have no structurally zero block
(their weights are already block-diagonal by conv group) and stay as they are.
"""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from pleas_fx.core.fxutil import getattr_path
from pleas_fx.core.ir import Segment, WeightNode
from pleas_fx.passes.ops.common import arg, freeze_mixed_positions, is_attr, set_arg, unknown
from pleas_fx.passes.ops.registry import BlockEmit, OpSpec, register_op

CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}


def _conv(ctx, x_node, groups, c_in, c_out, kernel, weight, bias):
    x = ctx.layouts(x_node)
    out_shape = ctx.shape()
    freeze_mixed_positions(ctx, x[2:], "a convolution mixes the positions of this axis")
    spatial = [ctx.fresh(n, "spatial") for n in out_shape[2:]]
    kernel_axes = [ctx.fresh(k, "kernel") for k in kernel]
    if groups == 1:
        out_ch = ctx.fresh(c_out)
        ctx.param(weight, [out_ch, x[1], *kernel_axes], ["out", "in"] + ["out"] * len(kernel_axes))
    elif groups == c_in == c_out:  # depthwise: each channel convolved on its own
        out_ch = x[1]
        ctx.param(weight, [out_ch, ctx.fresh(1, "size-1"), *kernel_axes])
    else:
        out_ch = _grouped(ctx, x, groups, c_in, c_out, weight, kernel_axes)
    if bias is not None:
        ctx.param(bias, [out_ch])
    return [x[0], out_ch, *spatial]


def _grouped(ctx, x, groups, c_in, c_out, weight, kernel_axes):
    """A grouped convolution: its `groups` conv groups are permutation units shared by the input
    and output channels (unit u of the output reads only unit u of the input), each unit's input
    and output entries permuted by within groups of their own, unit by unit. The weight's
    per-group input axis holds the input within entries (their units on the output axis).
    Frozen where the input channels cannot take that structure."""
    cin_g, cout_g = c_in // groups, c_out // groups
    lay = x[1]
    if (len(lay) == 1 and not ctx.is_frozen(lay) and lay[0].outer == 1 and lay[0].within is None
            and lay[0].inner > cin_g and lay[0].inner % cin_g == 0):
        # coarser units than conv groups (after a channel shuffle): each unit holds whole conv
        # groups, whose entries keep their order
        seg = lay[0]
        out_ch = (Segment(seg.group, seg.size, seg.inner // cin_g * cout_g),)
        ctx.param(weight, [out_ch, ctx.fresh(cin_g, "constant"), *kernel_axes],
                  ["out", "in"] + ["out"] * len(kernel_axes))
        return out_ch
    # every segment of the input channels (one group, or a concat's pieces) becomes whole conv
    # groups as units, each unit's entries with a within group
    template = []
    for seg in lay:
        if seg.numel % cin_g:
            break
        units = ctx.uf.new(seg.numel // cin_g)
        within = ctx.uf.new_within(cin_g, units) if cin_g > 1 and len(lay) == 1 else None  # (several pieces:
        template.append(Segment(units, seg.numel // cin_g, cin_g, 1, within))  # one weight axis can't follow them)
    in_ch = ctx.unify(lay, tuple(template)) if len(template) == len(lay) and not ctx.is_frozen(lay) else lay
    in_ch = ctx.rewritten(in_ch)
    if ctx.is_frozen(in_ch) or any((s.inner, s.outer) != (cin_g, 1) for s in in_ch):
        reason = ctx.reason("grouped conv", f"grouped convolution (groups={groups}) on channels of another structure")
        ctx.freeze(in_ch, reason)
        out_ch = ctx.fresh(c_out, reason)
        ctx.param(weight, [out_ch, ctx.fresh(cin_g, reason), *kernel_axes])
        return out_ch
    w_out: dict[int, int | None] = {}
    for seg in in_ch:  # a within group for the output entries where matching can see them: the
        # output is one segment (several: each conv group's outputs keep their order)
        w_out[ctx.uf.find(seg.group)] = ctx.uf.new_within(cout_g, seg.group) if cout_g > 1 and len(in_ch) == 1 else None
    out_ch = tuple(Segment(s.group, s.size, cout_g, 1, w_out[ctx.uf.find(s.group)]) for s in in_ch)
    in_axis = ctx.fresh(1, "size-1")
    if cin_g > 1:  # the weight's per-group input entries: every input within group (several: frozen)
        in_axis = (Segment(in_ch[0].within, cin_g),) if in_ch[0].within is not None else ctx.fresh(cin_g, "constant")
        for seg in in_ch[1:]:
            other = (Segment(seg.within, cin_g),) if seg.within is not None else ctx.fresh(cin_g, "constant")
            in_axis = ctx.unify(in_axis, other)
    ctx.param(weight, [out_ch, in_axis, *kernel_axes], ["out", "in"] + ["out"] * len(kernel_axes))
    return out_ch


def conv_module(ctx, node):
    m = ctx.module()
    bias = f"{node.target}.bias" if m.bias is not None else None
    return _conv(ctx, node.args[0], m.groups, m.in_channels, m.out_channels, m.kernel_size,
                 f"{node.target}.weight", bias)


def conv_function(ctx, node):
    x, w, b = arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")
    groups = arg(node, 6, "groups", 1)
    if not is_attr(w) or not isinstance(groups, int):
        return unknown(ctx, node, "computed weight", "convolution with a computed weight")
    wshape = ctx.shape(w)
    return _conv(ctx, x, groups, wshape[1] * groups, wshape[0], tuple(wshape[2:]), w.target,
                 b.target if is_attr(b) else None)


def conv_module_resize(module: nn.modules.conv._ConvNd, input_shape) -> None:
    """Width attributes from the resized weight: a grouped convolution keeps its channels per
    conv group and gains or loses whole conv groups (a depthwise conv stays depthwise)."""
    per_group = module.out_channels // module.groups
    module.out_channels = module.weight.shape[0]
    if module.groups > 1:
        module.groups = module.out_channels // per_group
    module.in_channels = module.weight.shape[1] * module.groups


def conv_function_rewrite(node: fx.Node, r) -> None:
    """A functional grouped convolution keeps its channels per conv group: groups follows the
    (merged) output channel count."""
    groups = arg(node, 6, "groups", 1)
    if isinstance(groups, int) and groups > 1 and r.new[1] != r.old[1]:
        set_arg(node, 6, "groups", r.new[1] // (r.old[1] // groups))


def _tuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _conv_weight(node, weight_name, bias_name, weight, groups, stride, padding, dilation, padding_mode, dims):
    """The WeightNode of a convolution: solved (groups=1, 1-D/2-D, zero padding), depthwise, or mapped."""
    c_out, c_in_per_group = weight.shape[0], weight.shape[1]
    kernel = tuple(weight.shape[2:])
    if groups > 1 and c_in_per_group == 1 and groups == c_out:
        return WeightNode(node.name, weight_name, bias_name, "depthwise")
    mapped = lambda why: WeightNode(node.name, weight_name, bias_name, "mapped", note=why)
    if dims == 3:
        return mapped("3-D convolution is mapped, not solved")
    if padding_mode != "zeros":
        return mapped(f"padding mode {padding_mode!r} is mapped, not solved")
    dilation = _tuple(dilation, dims)
    if padding == "same":
        if any(k % 2 == 0 for k in kernel):
            return mapped("'same' padding with an even kernel is mapped, not solved")
        padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
    elif padding == "valid":
        padding = (0,) * dims
    padding, stride = _tuple(padding, dims), _tuple(stride, dims)
    if dims == 1:  # a 1-D convolution is a 2-D one of height 1
        kernel, stride, padding, dilation = (1, *kernel), (1, *stride), (0, *padding), (1, *dilation)
    kind = "conv" if groups == 1 else "grouped"  # grouped: solved conv group by conv group
    return WeightNode(node.name, weight_name, bias_name, kind, kernel, stride, padding, dilation)


def conv_module_weight(node: fx.Node, gm: fx.GraphModule) -> WeightNode:
    m = gm.get_submodule(node.target)
    bias = f"{node.target}.bias" if m.bias is not None else None
    dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[next(c for c in type(m).__mro__ if c in CONV_MODULES)]
    return _conv_weight(node, f"{node.target}.weight", bias, m.weight, m.groups, m.stride, m.padding,
                        m.dilation, m.padding_mode, dims)


def conv_function_weight(node: fx.Node, gm: fx.GraphModule) -> WeightNode | None:
    w, b = arg(node, 1, "weight"), arg(node, 2, "bias")
    if not is_attr(w):
        return None
    weight = getattr_path(gm, w.target)
    if b is not None and not is_attr(b):
        return WeightNode(node.name, w.target, None, "mapped", note="convolution with a computed bias is mapped")
    return _conv_weight(node, w.target, b.target if b is not None else None, weight, arg(node, 6, "groups", 1),
                        arg(node, 3, "stride", 1), arg(node, 4, "padding", 0), arg(node, 5, "dilation", 1),
                        "zeros", CONV_FUNCTIONS[node.target])


def _conv_emit(x, weight_name, bias_name, weight, groups, stride, padding, dilation, padding_mode, dims):
    if groups != 1 or dims not in (1, 2) or padding_mode != "zeros" or not isinstance(x, fx.Node):
        return None
    geometry = {"kernel_size": tuple(weight.shape[2:]), "stride": _tuple(stride, dims), "dilation": _tuple(dilation, dims),
                "padding": padding if isinstance(padding, str) else _tuple(padding, dims)}
    return BlockEmit(x, weight_name, bias_name, geometry)


def conv_module_compact(node: fx.Node, gm: fx.GraphModule) -> BlockEmit | None:
    m = gm.get_submodule(node.target)
    if len(node.args) != 1 or node.kwargs:
        return None
    dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[next(c for c in type(m).__mro__ if c in CONV_MODULES)]
    return _conv_emit(node.args[0], f"{node.target}.weight", f"{node.target}.bias" if m.bias is not None else None,
                      m.weight, m.groups, m.stride, m.padding, m.dilation, m.padding_mode, dims)


def conv_function_compact(node: fx.Node, gm: fx.GraphModule) -> BlockEmit | None:
    w, b = arg(node, 1, "weight"), arg(node, 2, "bias")
    if not is_attr(w) or (b is not None and not is_attr(b)):
        return None
    groups = arg(node, 6, "groups", 1)
    return _conv_emit(arg(node, 0, "input"), w.target, b.target if b is not None else None, getattr_path(gm, w.target),
                      groups, arg(node, 3, "stride", 1), arg(node, 4, "padding", 0), arg(node, 5, "dilation", 1),
                      "zeros", CONV_FUNCTIONS[node.target])


register_op(*CONV_MODULES, spec=OpSpec(infer=conv_module, resize=conv_module_resize, weight=conv_module_weight,
                                       compact=conv_module_compact))
register_op(*CONV_FUNCTIONS, spec=OpSpec(infer=conv_function, rewrite=conv_function_rewrite,
                                         weight=conv_function_weight, compact=conv_function_compact))
