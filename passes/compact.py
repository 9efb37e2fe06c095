"""Compact emission (a transformation pass): a new GraphModule in which every weight layer with
structurally zero blocks is a block layer (pleas_fx.core.layers) storing only its blocks.

For a widened model and its group plans, each weight node whose op spec can emit it compactly
(`OpSpec.compact`) is classified along its input and output axes: entries only A feeds, entries
both feed, entries only B feeds (`structural_classes`). If some output of one model reads an input
only the other model has, the layer holds zeros there: it is replaced by a BlockLinear /
BlockConv whose blocks are sized from the plans (their values are written by the fill pass,
through `pleas_fx.core.layers.write_tensor`). A module keeps its qualified name; a functional
weight node becomes a call of a new submodule `<weight>_block`, and the tensors it absorbed are
recorded in `meta["block_tensors"]` so the fill pass finds them by their old names. Layers
without a zero block (a network's first and last layers, depthwise and grouped convolutions,
everything at budget 1) and tensors tied or used by several nodes stay as they are; the latter
are reported. The source graph module is not modified.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx

from pleas_fx.core.fxutil import getattr_path
from pleas_fx.core.ir import AxisMap, GroupPlan, GroupSpec, axis_map
from pleas_fx.core.layers import BlockConv, BlockLinear
from pleas_fx.passes.ops import lookup_op
from pleas_fx.passes.weights import tensor_uses

EMITS = ("compact", "dense")


@dataclass
class CompactResult:
    """The compact graph module, the weight nodes made block layers, and notes on tensors that
    keep structurally zero entries (tied or shared weights, ops without a block form)."""

    gm: fx.GraphModule
    blocks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def structural_classes(amap: AxisMap) -> np.ndarray:
    """Per merged entry of an axis: 0 = only A feeds it, 1 = both, 2 = only B."""
    has_a, has_b = amap.idx_a >= 0, amap.idx_b >= 0
    if not amap.pairwise:
        has_a = has_a | (amap.idx_a2 >= 0)
        has_b = has_b | (amap.idx_b2 >= 0)
    return np.where(has_a & has_b, 1, np.where(has_a, 0, 2))


def _ordering(classes: np.ndarray) -> tuple[tuple[int, int, int], np.ndarray, bool]:
    """Block sizes [A-only, shared, B-only], the merged entries in that order, and whether the
    entries are in that order already."""
    order = np.argsort(classes, kind="stable")
    sizes = tuple(int((classes == c).sum()) for c in range(3))
    return sizes, order, bool((order == np.arange(len(order))).all())


def zero_entries(spec: GroupSpec, plans: dict[int, GroupPlan], name: str) -> int:
    """Structurally zero entries of a merged tensor stored densely (0 for one grouped axis)."""
    frozen = spec.fixed()
    layouts = spec.param_layouts[name]
    total, on_a, on_b, on_both = 1, 1, 1, 1
    for lay in layouts:
        cls = structural_classes(axis_map(lay, plans, frozen))
        total *= len(cls)
        on_a *= int((cls <= 1).sum())
        on_b *= int((cls >= 1).sum())
        on_both *= int((cls == 1).sum())
    return total - (on_a + on_b - on_both)


def _block_layer(emit, in_cls: np.ndarray, out_cls: np.ndarray, weight: torch.Tensor):
    in_blocks, in_order, in_sorted = _ordering(in_cls)
    out_blocks, out_order, out_sorted = _ordering(out_cls)
    kw = dict(bias=emit.bias is not None, in_order=not in_sorted, out_order=not out_sorted)
    if emit.conv is None:
        layer = BlockLinear(in_blocks, out_blocks, **kw)
    else:
        layer = BlockConv(in_blocks, out_blocks, **emit.conv, **kw)
    layer = layer.to(device=weight.device, dtype=weight.dtype)
    if layer.in_order is not None:
        layer.in_order.copy_(torch.as_tensor(in_order))
    if layer.out_order is not None:
        layer.out_order.copy_(torch.as_tensor(np.argsort(out_order)))
    return layer.requires_grad_(weight.requires_grad)


def _has_zero_block(in_cls: np.ndarray, out_cls: np.ndarray) -> bool:
    return bool(((out_cls == 0).any() and (in_cls == 2).any()) or ((out_cls == 2).any() and (in_cls == 0).any()))


def _free_name(gm: fx.GraphModule, owner: str, leaf: str) -> str:
    base = f"{owner + '.' if owner else ''}{leaf}_block"
    name, i = base, 1
    while True:
        try:
            gm.get_submodule(name)
        except AttributeError:
            return name
        name, i = f"{base}{i}", i + 1


def _drop_tensor(gm: fx.GraphModule, name: str) -> None:
    owner, _, leaf = name.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    for slots in (mod._parameters, mod._buffers):
        slots.pop(leaf, None)
    if hasattr(mod, leaf) and torch.is_tensor(getattr(mod, leaf)):
        delattr(mod, leaf)


def compact(gm: fx.GraphModule, spec: GroupSpec, plans: dict[int, GroupPlan]) -> CompactResult:
    """A copy of the widened `gm` with block layers wherever a weight layer has structurally zero
    blocks under `plans` (see the module docstring)."""
    out = copy.deepcopy(gm)
    frozen = spec.fixed()
    uses = tensor_uses(out, spec.aliases)
    tied = set(spec.aliases) | set(spec.aliases.values())
    moved: dict[str, tuple[str, str]] = {}
    renamed: dict[str, str] = {}
    result = CompactResult(out)
    for node in list(out.graph.nodes):
        op = lookup_op(node, out)
        emit = op.compact(node, out) if op is not None and op.compact is not None else None
        if emit is None or emit.weight not in spec.param_layouts:
            continue
        layouts = spec.param_layouts[emit.weight]
        if len(layouts) < 2 or any(not all(s.group in frozen for s in lay) for lay in layouts[2:]):
            continue  # kernel axes are never widened
        in_cls, out_cls = (structural_classes(axis_map(layouts[i], plans, frozen)) for i in (1, 0))
        if not _has_zero_block(in_cls, out_cls):
            continue
        names = [n for n in (emit.weight, emit.bias) if n is not None]
        if not all(isinstance(getattr_path(out, n), torch.nn.Parameter) for n in names):
            continue  # a buffer or constant used as a weight stays one (a block layer holds parameters)
        if any(n in tied or uses[n] > 1 for n in names):
            result.notes.append(f"{node.name}: {emit.weight} is tied or shared; stored densely with its zero blocks")
            continue
        weight = getattr_path(out, emit.weight)
        layer = _block_layer(emit, in_cls, out_cls, weight)
        if node.op == "call_module":
            owner, _, leaf = node.target.rpartition(".")
            setattr(out.get_submodule(owner) if owner else out, leaf, layer)
        else:
            owner, _, leaf = emit.weight.rpartition(".")
            target = _free_name(out, owner, leaf)
            out.add_submodule(target, layer)
            with out.graph.inserting_before(node):
                call = out.graph.call_module(target, (emit.input,))
            call.meta = dict(node.meta)
            renamed[call.name] = node.name
            node.replace_all_uses_with(call)
            attrs = [a for a in node.all_input_nodes if a.op == "get_attr"]
            out.graph.erase_node(node)
            for a in attrs:
                if not a.users:
                    out.graph.erase_node(a)
            for n, leaf_name in zip(names, ("weight", "bias")):
                _drop_tensor(out, n)
                moved[n] = (target, leaf_name)
        result.blocks.append(node.name)
    out.meta["block_tensors"] = moved
    out.meta["block_nodes"] = renamed  # block-layer call -> the functional node it replaced
    out.graph.lint()
    out.recompile()
    return result


def stored_zeros(gm: fx.GraphModule, spec: GroupSpec, plans: dict[int, GroupPlan]) -> int:
    """Structurally zero entries `gm` stores: those of every merged tensor still held densely
    (all of them for a dense emission; tied or shared weights for a compact one)."""
    moved = gm.meta.get("block_tensors", {})
    total = 0
    for name, layouts in spec.param_layouts.items():
        if len(layouts) < 2 or name in moved or name in spec.aliases:
            continue
        owner, _, leaf = name.rpartition(".")
        try:
            mod = gm.get_submodule(owner) if owner else gm
        except AttributeError:
            continue
        if isinstance(mod, (BlockLinear, BlockConv)) or not isinstance(mod._parameters.get(leaf), torch.nn.Parameter):
            continue
        total += zero_entries(spec, plans, name)
    return total
