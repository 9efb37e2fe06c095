"""Widening pass: a new GraphModule with the merged widths.

Starting from a deep copy of model A's traced graph, every parameter and buffer gets its
merged shape (values are set by the fill pass), module attributes that state widths
(in_channels, out_features, num_features, normalized_shape, ...) are updated, and shape
constants in the graph (view/reshape/expand sizes, layer_norm shapes, split sections) are
rewritten. The source graph module is not modified.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from pleas_fx.ir import GroupSpec, merged_axis_size
from passes.trace import getattr_path, node_shape

SHAPE_METHODS = {"view", "reshape", "expand", "new_zeros", "new_ones", "new_empty", "new_full"}


def _new_sizes(value, widths, frozen):
    if value is None:
        return None
    if value and isinstance(value[0], list):
        return [_new_sizes(v, widths, frozen) for v in value]
    return [merged_axis_size(lay, widths, frozen) for lay in value]


def _replace_tensor(root: nn.Module, name: str, new: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(new, requires_grad=old.requires_grad)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = new
    else:
        setattr(owner, leaf, new)


def _fix_module(mod: nn.Module, in_shape, was_depthwise: bool) -> None:
    """Make a module's width attributes agree with its (resized) tensors."""
    if isinstance(mod, nn.modules.conv._ConvNd):
        mod.out_channels = mod.weight.shape[0]
        if was_depthwise:
            mod.groups = mod.in_channels = mod.out_channels
        else:
            mod.in_channels = mod.weight.shape[1] * mod.groups
    elif isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = mod.weight.shape
    elif isinstance(mod, nn.modules.batchnorm._NormBase):
        ref = mod.running_mean if mod.running_mean is not None else mod.weight
        if ref is not None:
            mod.num_features = ref.shape[0]
    elif isinstance(mod, nn.LayerNorm) and in_shape is not None:
        k = len(mod.normalized_shape)
        mod.normalized_shape = tuple(in_shape[-k:])
    elif isinstance(mod, nn.GroupNorm) and mod.weight is not None:
        mod.num_channels = mod.weight.shape[0]
    elif isinstance(mod, nn.Embedding):
        mod.embedding_dim = mod.weight.shape[1]
    elif isinstance(mod, nn.PReLU):
        mod.num_parameters = mod.weight.numel()


def _rewrite_sizes(args: tuple, old: list[int], new: list[int]) -> tuple:
    """Replace integer sizes equal to the old dim size by the new one, position by position.

    A size computed in the graph (``B, N, C = x.shape; y.reshape(B, N, C)``) is replaced by the
    constant new size where the axis was widened: a widened axis holds features, whose count is
    fixed by the model, and C may read another group's width (heads x head_dim is not the
    residual width once the two are merged differently)."""
    packed = len(args) == 1 and isinstance(args[0], (list, tuple))
    sizes = list(args[0]) if packed else list(args)
    if len(sizes) != len(old):
        return args
    out = [n if (isinstance(s, int) and s == o and s != -1) or (isinstance(s, fx.Node) and o != n) else s
           for s, o, n in zip(sizes, old, new)]
    return (type(args[0])(out),) if packed else tuple(out)


def widen(gm: fx.GraphModule, spec: GroupSpec, widths: dict[int, int]) -> fx.GraphModule:
    frozen = spec.fixed()
    merged = copy.deepcopy(gm)
    depthwise = {
        n.target for n in gm.graph.nodes if n.op == "call_module"
        and isinstance(m := gm.get_submodule(n.target), nn.modules.conv._ConvNd)
        and m.groups > 1 and m.groups == m.in_channels == m.out_channels
    }
    with torch.no_grad():
        for name, layouts in spec.param_layouts.items():
            tensor = getattr_path(merged, name)
            if not torch.is_tensor(tensor):
                continue
            shape = [merged_axis_size(lay, widths, frozen) for lay in layouts]
            if list(tensor.shape) != shape:
                _replace_tensor(merged, name, torch.zeros(shape, dtype=tensor.dtype, device=tensor.device))

    new_shapes = {n: _new_sizes(v, widths, frozen) for n, v in spec.node_layouts.items()}
    for node in merged.graph.nodes:
        if node.op == "call_module":
            arg = node.args[0] if node.args else None
            in_shape = new_shapes.get(arg.name) if isinstance(arg, fx.Node) else None
            _fix_module(merged.get_submodule(node.target), in_shape, node.target in depthwise)
            continue
        old, new = node_shape(node), new_shapes.get(node.name)
        if old is None or new is None:
            continue
        is_shape_call = (node.op == "call_method" and node.target in SHAPE_METHODS) or (
            node.op == "call_function" and node.target in (torch.reshape,))
        if is_shape_call and not isinstance(old, list):
            node.args = (node.args[0], *_rewrite_sizes(node.args[1:], list(old), new))
        elif node.op == "call_function" and node.target is F.layer_norm:
            shape_arg = node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"]
            k = len(shape_arg) if isinstance(shape_arg, (list, tuple)) else 1
            new_shape = tuple(new[-k:])
            if len(node.args) > 1:
                node.args = (node.args[0], new_shape, *node.args[2:])
            else:
                node.kwargs = {**node.kwargs, "normalized_shape": new_shape}
        elif node.target in ("chunk", torch.chunk) and isinstance(old, list):
            # widened segments need not stay equal: chunk becomes split with explicit sizes
            dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
            node.target = "split" if node.op == "call_method" else torch.split
            node.args, node.kwargs = (node.args[0], [piece[dim] for piece in new], dim), {}
        elif (node.op in ("call_method", "call_function") and getattr(node.target, "__name__", node.target) == "split"
              and isinstance(old, list) and len(node.args) > 1 and isinstance(node.args[1], (list, tuple))):
            dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
            node.args = (node.args[0], [piece[dim] for piece in new], *node.args[2:])
    merged.recompile()
    return merged
