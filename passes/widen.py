"""Widening pass: a new GraphModule with the merged widths.

Starting from a deep copy of model A's traced graph, every parameter and buffer gets its
merged shape (values are set by the fill pass); each op's spec (passes/ops/) re-derives its
module's width attributes (`resize`: in_channels, out_features, num_features, ...) and rewrites
the shape constants in its arguments (`rewrite`: view/reshape/expand sizes, layer_norm shapes,
split sections). The source graph module is not modified.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

from pleas_fx.core.fxutil import getattr_path, node_shape
from pleas_fx.core.ir import GroupSpec, merged_axis_size
from pleas_fx.passes.ops import Resizing, lookup_op


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
        owner._parameters[leaf] = new if isinstance(new, nn.Parameter) else nn.Parameter(new, requires_grad=old.requires_grad)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = new
    else:
        setattr(owner, leaf, new)


def widen(gm: fx.GraphModule, spec: GroupSpec, widths: dict[int, int]) -> fx.GraphModule:
    """A widened copy of `gm` (tensors zero-filled) for the group widths `widths`."""
    frozen = spec.fixed()
    merged = copy.deepcopy(gm)
    with torch.no_grad():
        for name, layouts in spec.param_layouts.items():
            tensor = getattr_path(merged, name)
            if not torch.is_tensor(tensor):
                continue
            shape = [merged_axis_size(lay, widths, frozen) for lay in layouts]
            if list(tensor.shape) != shape:
                _replace_tensor(merged, name, torch.zeros(shape, dtype=tensor.dtype, device=tensor.device))
        for alias, name in spec.aliases.items():  # tied tensors stay tied
            _replace_tensor(merged, alias, getattr_path(merged, name))

    new_shapes = {n: _new_sizes(v, widths, frozen) for n, v in spec.node_layouts.items()}

    def resized(tensor: fx.Node, axis: int) -> bool:
        """Whether the merge changes the size of `tensor`'s axis (unknown: assumed so)."""
        old, new = node_shape(tensor), new_shapes.get(tensor.name)
        if not isinstance(axis, int) or old is None or new is None or isinstance(old, list) or not -len(old) <= axis < len(old):
            return True
        return old[axis] != new[axis]

    def new_offset(tensor: fx.Node, axis: int, offset: int) -> int | None:
        """Where entry `offset` of `tensor`'s axis (a segment boundary) is in the merged model."""
        value = spec.node_layouts.get(tensor.name)
        if not value or isinstance(value[0], list) or not -len(value) <= axis < len(value):
            return None
        old_at, new_at = 0, 0
        for seg in value[axis]:
            if old_at == offset:
                return new_at
            old_at += seg.numel
            new_at += merged_axis_size((seg,), widths, frozen)
        return new_at if old_at == offset else None
    done_modules: set[str] = set()
    for node in merged.graph.nodes:
        op = lookup_op(node, merged)
        if op is None:
            continue
        if node.op == "call_module":
            if op.resize is not None and node.target not in done_modules:
                arg = node.args[0] if node.args else None
                in_shape = new_shapes.get(arg.name) if isinstance(arg, fx.Node) else None
                op.resize(merged.get_submodule(node.target), in_shape)
                done_modules.add(node.target)
            continue
        old, new = node_shape(node), new_shapes.get(node.name)
        if op.rewrite is not None and old is not None and new is not None:
            op.rewrite(node, Resizing(old, new, resized, new_offset))
    merged.recompile()
    return merged
