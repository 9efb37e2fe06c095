"""Lowering pass for torchvision's Swin: its torch.fx leaf functions rewritten as ops the group
inference understands.

torchvision wraps three functions as fx leaves (opaque calls): `shifted_window_attention`
(windows, q/k/v projection, heads, relative position bias, shift mask, output projection, all in
one call), `_get_relative_position_bias` (a table lookup) and `_patch_merging_pad` (four spatial
copies concatenated on channels). Every axis they touch would be frozen. Each call is rewritten
as the same computation (eval mode: no dropout) in plain ops:

    xw = window_partition(x, window_size, shift_size)        # pleas_fx.core.windows: tokens only
    q, k, v = F.linear(xw, qkv_weight, qkv_bias).split([E] * 3, -1), each viewed as
              (B', heads, N, head_dim)
    attn = (q * head_dim ** -0.5) @ k^T                        # v1
    attn = normalize(q) @ normalize(k)^T * clamp(logit_scale, max=log 100).exp()   # v2
    attn = softmax(window_shift_mask(attn + position_bias, x, ...), -1)
    y = window_merge(F.linear((attn @ v).transpose(1, 2).reshape(B', N, -1), proj_weight, proj_bias), x, ...)

so heads permute as units, the entries of each head with q and k (and with v and the output
projection), and widths are free of the input's channel count (torchvision's function assumes
qkv and proj widths equal to it). Swin v2 zeroes the key part of the qkv bias inside the
function: the traced (private) copy's key bias is zeroed instead, so the plain linear computes
the same; a merged model's key bias is then an ordinary fitted parameter.
"""
from __future__ import annotations

import inspect
import logging
import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from pleas_fx.core.fxutil import getattr_path
from pleas_fx.core.windows import window_merge, window_partition, window_shift_mask

log = logging.getLogger(__name__)

_MODULE = "torchvision.models.swin_transformer"


def _is(node: fx.Node, name: str) -> bool:
    return node.op == "call_function" and getattr(node.target, "__module__", None) == _MODULE \
        and getattr(node.target, "__name__", None) == name


def _bound(node: fx.Node) -> dict:
    sig = inspect.signature(node.target)
    bound = sig.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _why_not(gm: fx.GraphModule, a: dict) -> str | None:
    if a["training"] and (a["attention_dropout"] or a["dropout"]):
        return "dropout in training mode"
    for name in ("qkv_weight", "proj_weight", "qkv_bias", "proj_bias", "logit_scale"):
        value = a[name]
        if value is not None and not (isinstance(value, fx.Node) and value.op == "get_attr"):
            return f"{name} is computed, not a parameter"
    w = getattr_path(gm, a["qkv_weight"].target)
    if w.dim() != 2 or w.shape[0] != 3 * w.shape[1] or w.shape[1] % a["num_heads"]:
        return f"qkv weight of shape {tuple(w.shape)} for {a['num_heads']} heads"
    return None


def _attention(graph: fx.Graph, gm: fx.GraphModule, a: dict) -> fx.Node:
    x, ws, shift, heads = a["input"], list(a["window_size"]), list(a["shift_size"]), a["num_heads"]
    width = getattr_path(gm, a["qkv_weight"].target).shape[1]
    head_dim = width // heads
    xw = graph.call_function(window_partition, (x, ws, shift))
    batch, tokens = graph.call_method("size", (xw, 0)), graph.call_method("size", (xw, 1))
    qkv = graph.call_function(F.linear, (xw, a["qkv_weight"], a["qkv_bias"]))
    parts = graph.call_method("split", (qkv, [width] * 3, -1))
    q, k, v = (graph.call_method("permute", (graph.call_method("reshape", (
        graph.call_function(operator.getitem, (parts, i)), batch, tokens, heads, head_dim)), 0, 2, 1, 3))
        for i in range(3))
    if a["logit_scale"] is not None:  # v2: cosine attention with a per-head learnt temperature
        q = graph.call_function(F.normalize, (q,), {"dim": -1})
        k = graph.call_function(F.normalize, (k,), {"dim": -1})
        attn = graph.call_function(operator.matmul, (q, graph.call_method("transpose", (k, -2, -1))))
        scale = graph.call_function(torch.clamp, (a["logit_scale"],), {"max": math.log(100.0)})
        attn = graph.call_function(operator.mul, (attn, graph.call_method("exp", (scale,))))
    else:
        q = graph.call_function(operator.mul, (q, head_dim ** -0.5))
        attn = graph.call_function(operator.matmul, (q, graph.call_method("transpose", (k, -2, -1))))
    attn = graph.call_function(operator.add, (attn, a["relative_position_bias"]))
    if sum(shift) > 0:
        attn = graph.call_function(window_shift_mask, (attn, x, ws, shift))
    attn = graph.call_function(F.softmax, (attn,), {"dim": -1})
    y = graph.call_method("transpose", (graph.call_function(operator.matmul, (attn, v)), 1, 2))
    y = graph.call_method("reshape", (y, batch, tokens, -1))
    y = graph.call_function(F.linear, (y, a["proj_weight"], a["proj_bias"]))
    return graph.call_function(window_merge, (y, x, ws, shift))


def _position_bias(graph: fx.Graph, a: dict) -> fx.Node:
    n = a["window_size"][0] * a["window_size"][1]
    bias = graph.call_function(operator.getitem, (a["relative_position_bias_table"], a["relative_position_index"]))
    bias = graph.call_method("permute", (graph.call_method("view", (bias, n, n, -1)), 2, 0, 1))
    return graph.call_method("unsqueeze", (graph.call_method("contiguous", (bias,)), 0))


def _patch_merging_pad(graph: fx.Graph, a: dict) -> fx.Node:
    x = a["x"]
    odd_h = graph.call_function(operator.mod, (graph.call_method("size", (x, -3)), 2))
    odd_w = graph.call_function(operator.mod, (graph.call_method("size", (x, -2)), 2))
    x = graph.call_function(F.pad, (x, (0, 0, 0, odd_w, 0, odd_h)))
    quarters = [graph.call_function(operator.getitem, (x, (Ellipsis, slice(h, None, 2), slice(w, None, 2),
                                                           slice(None, None, None))))
                for h, w in ((0, 0), (1, 0), (0, 1), (1, 1))]
    return graph.call_function(torch.cat, (quarters, -1))


# gm.meta key: the qkv biases whose key third is zero in every Swin v2 model (the function zeroes
# it at run time), so a merged model's stays exactly zero too (passes/fill.py): a fitted value
# would be rounding, ~1e-16, and on the zero-padded tokens of a window larger than the map,
# F.normalize (eps 1e-12) would turn those keys from 0 into vectors the real queries attend to
ZERO_KEY_BIAS = "swin_v2_zero_key_bias"


def zero_key_bias(bias: torch.Tensor) -> None:
    """Zero, in place, the key third of a Swin v2 qkv bias (laid out [q | k | v])."""
    third = bias.shape[0] // 3
    bias[third:2 * third] = 0


def lower_swin(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` with torchvision's Swin leaf functions rewritten as plain ops (module docstring);
    unchanged when there is none. Modifies the traced (private) copy in place: the graph, and the
    key part of a Swin v2 qkv bias (zeroed, as the function zeroes it at run time)."""
    changed = 0
    for node in list(gm.graph.nodes):
        if _is(node, "shifted_window_attention"):
            a = _bound(node)
            why = _why_not(gm, a)
            if why is not None:
                log.info("%s: shifted_window_attention left opaque (%s); its axes stay frozen", node.name, why)
                continue
            if a["logit_scale"] is not None and a["qkv_bias"] is not None:
                with torch.no_grad():
                    zero_key_bias(getattr_path(gm, a["qkv_bias"].target))
                gm.meta.setdefault(ZERO_KEY_BIAS, set()).add(a["qkv_bias"].target)
            build = lambda: _attention(gm.graph, gm, a)
        elif _is(node, "_get_relative_position_bias"):
            a = _bound(node)
            build = lambda: _position_bias(gm.graph, a)
        elif _is(node, "_patch_merging_pad"):
            a = _bound(node)
            build = lambda: _patch_merging_pad(gm.graph, a)
        else:
            continue
        with gm.graph.inserting_before(node):
            out = build()
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        changed += 1
    if changed:
        gm.graph.lint()
        gm.recompile()
        log.info("lowered %d torchvision Swin call(s) to primitive ops", changed)
    return gm
