"""Per-model LayerNorm: a transformation of the widened graph for LayerNorms (and RMSNorms) over
a widened axis.

A LayerNorm normalises over its last axis. When that axis is the widened residual stream of a
pre-norm transformer, the merged stream holds features of both models (merged pairs, and
features kept apart), and one LayerNorm over all of them mixes the two models' statistics: at
budget 2 the merged network is then not the ensemble. This pass replaces each such LayerNorm
(module or functional, one normalised axis, not frozen, with some features kept apart) by

    n_A = layer_norm(x~[pos_A]),  n_B = layer_norm(x~[pos_B])     (no affine)
    y   = M [n_A; n_B] * weight + bias

where x~[pos_A] gathers the merged entry holding each of A's features (U_A, a copy), so each
model's features are normalised by that model's own statistics and merged back through M
(1/2 on merged pairs, 1 on kept features); `weight` and `bias` are the LayerNorm's own merged
affine parameters (M [w_A; w_B], filled as before), so the stored parameters are unchanged.
At budget 2 this is exactly each model's LayerNorm side by side; with every feature merged it
equals the plain LayerNorm, so such nodes are left as they are. The index and weight vectors
are buffers of a plain nn.Module, and the new nodes call only torch functions, so the merged
model saves and loads like any other.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from pleas_fx.core.ir import GroupPlan, GroupSpec, Segment, axis_map

log = logging.getLogger(__name__)


RMS_MODULES = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
RMS_FUNCTIONS = (F.rms_norm,) if hasattr(F, "rms_norm") else ()


def _layernorm(node: fx.Node, gm: fx.GraphModule):
    """(input node, eps, weight name, bias name, normalising function) of a one-axis LayerNorm
    or RMSNorm node, else None."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if not (isinstance(mod, (nn.LayerNorm,) + RMS_MODULES) and len(mod.normalized_shape) == 1
                and len(node.args) == 1 and not node.kwargs):
            return None
        has = mod.elementwise_affine
        if isinstance(mod, nn.LayerNorm):
            return (node.args[0], float(mod.eps), f"{node.target}.weight" if has else None,
                    f"{node.target}.bias" if has and mod.bias is not None else None, F.layer_norm)
        eps = mod.eps if mod.eps is not None else torch.finfo(torch.float32).eps
        return node.args[0], float(eps), f"{node.target}.weight" if has else None, None, F.rms_norm
    if node.op == "call_function" and (node.target is F.layer_norm or node.target in RMS_FUNCTIONS):
        layer = node.target is F.layer_norm
        names_ = ("input", "normalized_shape", "weight", "bias", "eps") if layer else \
            ("input", "normalized_shape", "weight", "eps")
        args = dict(zip(names_, node.args), **node.kwargs)
        shape = args.get("normalized_shape")
        if not isinstance(shape, (list, tuple)) or len(shape) != 1:
            return None
        weight, bias = args.get("weight"), args.get("bias")
        eps = args.get("eps")
        if eps is None:
            eps = 1e-5 if layer else torch.finfo(torch.float32).eps
        names = []
        for t in (weight, bias):
            if t is None:
                names.append(None)
            elif isinstance(t, fx.Node) and t.op == "get_attr":
                names.append(t.target)
            else:
                return None
        return args.get("input"), float(eps), names[0], names[1], node.target
    return None


def per_model_layernorms(merged: fx.GraphModule, spec: GroupSpec, plans: dict[int, GroupPlan]) -> int:
    """Rewrite `merged` in place (see the module docstring); returns the number of LayerNorms
    replaced."""
    frozen = spec.fixed()
    count = 0
    holder = None
    for node in list(merged.graph.nodes):
        found = _layernorm(node, merged)
        layouts = spec.node_layouts.get(node.name)
        if found is None or not layouts or not isinstance(layouts, list) or not layouts[-1]:
            continue
        layout = layouts[-1]
        if not isinstance(layout, (list, tuple)) or not all(isinstance(seg, Segment) for seg in layout):
            continue
        if any(seg.group in frozen for seg in layout):
            continue
        amap = axis_map(layout, plans, frozen)
        if not amap.pairwise or amap.size == max(int(amap.idx_a.max()) + 1, int(amap.idx_b.max()) + 1):
            continue  # ZipIt!-style plan, or every feature merged: the plain LayerNorm is exact
        x, eps, weight, bias, norm = found
        if holder is None:
            holder = nn.Module()
            merged.add_module("pleas_fx_layernorms", holder)
        name = f"ln{count}"
        holder.add_module(name, _buffers(amap, x.meta.get("tensor_meta"), merged, weight))
        _rewrite(merged, node, x, eps, weight, bias, f"pleas_fx_layernorms.{name}", norm)
        count += 1
    if count:
        merged.graph.lint()
        merged.recompile()
        log.info("per-model LayerNorm: %d LayerNorm(s) over a widened axis normalise each model's features apart",
                 count)
    return count


def _buffers(amap, meta, merged: fx.GraphModule, weight: str | None) -> nn.Module:
    w_a, w_b = amap.weights()
    d_a, d_b = int(amap.idx_a.max()) + 1, int(amap.idx_b.max()) + 1
    pos_a, pos_b = np.zeros(d_a, dtype=np.int64), np.zeros(d_b, dtype=np.int64)
    ea, eb = np.flatnonzero(amap.idx_a >= 0), np.flatnonzero(amap.idx_b >= 0)
    pos_a[amap.idx_a[ea]], pos_b[amap.idx_b[eb]] = ea, eb
    ref = next(iter(merged.parameters()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    m = nn.Module()
    for key, value, dt in (("pos_a", pos_a, torch.int64), ("pos_b", pos_b, torch.int64),
                           ("src_a", np.maximum(amap.idx_a, 0), torch.int64),
                           ("src_b", np.maximum(amap.idx_b, 0), torch.int64),
                           ("w_a", w_a, dtype), ("w_b", w_b, dtype)):
        m.register_buffer(key, torch.as_tensor(value, dtype=dt, device=device))
    return m


def _rewrite(gm: fx.GraphModule, node: fx.Node, x: fx.Node, eps: float, weight, bias, prefix: str, norm) -> None:
    g = gm.graph
    with g.inserting_before(node):
        get = {k: g.get_attr(f"{prefix}.{k}") for k in ("pos_a", "pos_b", "src_a", "src_b", "w_a", "w_b")}
        sides = []
        for s in ("a", "b"):
            xs = g.call_function(torch.index_select, (x, -1, get[f"pos_{s}"]))
            size = int(getattr(gm.get_submodule(prefix), f"pos_{s}").numel())
            ns = g.call_function(norm, (xs, (size,), None, None, eps) if norm is F.layer_norm else
                                 (xs, (size,), None, eps))
            back = g.call_function(torch.index_select, (ns, -1, get[f"src_{s}"]))
            sides.append(g.call_function(torch.mul, (back, get[f"w_{s}"])))
        y = g.call_function(torch.add, (sides[0], sides[1]))
        if weight is not None:
            y = g.call_function(torch.mul, (y, g.get_attr(weight)))
        if bias is not None:
            y = g.call_function(torch.add, (y, g.get_attr(bias)))
    node.replace_all_uses_with(y)
    g.erase_node(node)
