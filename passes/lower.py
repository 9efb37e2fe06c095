"""Lowering pass: opaque leaf modules rewritten as primitive ops the group inference understands.

nn.MultiheadAttention is a leaf for torch.fx (its forward branches on tensors), so every axis
it touches would be frozen. Self-attention calls of it (query, key and value the same tensor,
no masks, packed in-projection) are rewritten as

    qkv = in_proj(x)                                   # an nn.Linear holding in_proj_weight/bias
    q, k, v = (t.reshape(B, T, heads, head_dim).permute(0, 2, 1, 3) for t in qkv.split([E] * 3, -1))
    y = scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, heads * head_dim)
    out = out_proj(y)

which computes the same function (eval mode: no attention dropout) with widths free of
embed_dim, so heads can be permuted as units and kept apart when widened, and q, k and v each
reshaped on their own, so the entries of each head can be permuted too (q with k, v with the
output projection). The rewritten module replaces the attention module in the traced copy:
its parameters are `in_proj.weight`, `in_proj.bias` and `out_proj.*` under the attention's
name. Other calls are left as they are (their axes stay frozen, with the reason reported).

`split_fused_qkv` rewrites the fused timm form `qkv.reshape(B, T, 3, heads, head_dim)
.permute(2, 0, 3, 1, 4)` followed by `unbind(0)` (or indexing 0, 1, 2) the same way.
"""
from __future__ import annotations

import logging
import operator
from collections import Counter

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)


class LoweredMultiheadAttention(nn.Module):
    """Parameters of a lowered nn.MultiheadAttention; its computation lives in the graph."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.num_heads, self.head_dim, self.batch_first = mha.num_heads, mha.head_dim, mha.batch_first
        self.in_proj = nn.Linear(mha.embed_dim, 3 * mha.embed_dim, bias=mha.in_proj_bias is not None,
                                 device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        self.in_proj.weight = mha.in_proj_weight
        if mha.in_proj_bias is not None:
            self.in_proj.bias = mha.in_proj_bias
        self.out_proj = mha.out_proj


def _call_args(node: fx.Node) -> dict:
    names = ["query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal"]
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def _why_not(mha: nn.MultiheadAttention, node: fx.Node) -> str | None:
    args = _call_args(node)
    if not (args.get("query") is args.get("key") is args.get("value")):
        return "query, key and value are not the same tensor"
    for mask in ("key_padding_mask", "attn_mask"):
        if args.get(mask) is not None:
            return f"{mask} is given"
    if args.get("is_causal"):
        return "is_causal is set"
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        return "separate q/k/v projections, bias_k/bias_v or add_zero_attn"
    for user in node.users:
        if not (user.target is operator.getitem and user.args[1] in (0, 1)):
            return "its output is used other than as (output, weights)"
        if user.args[1] == 1 and user.users:
            return "its attention weights are used"
    return None


def _to_heads(graph: fx.Graph, t: fx.Node, batch, tokens, heads: int, head_dim: int, batch_first: bool) -> fx.Node:
    """(B, T, E) or (T, B, E) -> (B, heads, T, head_dim)."""
    if batch_first:
        t = graph.call_method("reshape", (t, batch, tokens, heads, head_dim))
        return graph.call_method("permute", (t, 0, 2, 1, 3))
    t = graph.call_method("reshape", (t, tokens, batch, heads, head_dim))
    return graph.call_method("permute", (t, 1, 2, 0, 3))


def lower_multihead_attention(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over the same (private, traced) root with every lowerable
    nn.MultiheadAttention call rewritten as primitive ops; see the module docstring."""
    graph = fx.Graph()
    env: dict = {}
    graph.output(graph.graph_copy(gm.graph, env))
    targets = {}
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.MultiheadAttention):
            continue
        mha = gm.get_submodule(node.target)
        why = _why_not(mha, node)
        if why is not None:
            log.info("%s: nn.MultiheadAttention left opaque (%s); its axes stay frozen", node.target, why)
            continue
        if calls[node.target] > 1:
            log.info("%s: nn.MultiheadAttention called more than once left opaque", node.target)
            continue
        targets[node.target] = mha
        x = _call_args(node)["query"]
        heads, head_dim, embed = mha.num_heads, mha.head_dim, mha.embed_dim
        with graph.inserting_before(node):
            batch = graph.call_method("size", (x, 0 if mha.batch_first else 1))
            tokens = graph.call_method("size", (x, 1 if mha.batch_first else 0))
            qkv = graph.call_module(f"{node.target}.in_proj", (x,))
            parts = graph.call_method("split", (qkv, [embed] * 3, -1))
            q, k, v = (_to_heads(graph, graph.call_function(operator.getitem, (parts, i)), batch, tokens, heads,
                                 head_dim, mha.batch_first) for i in range(3))
            y = graph.call_function(F.scaled_dot_product_attention, (q, k, v))  # (B, heads, T, head_dim)
            if mha.batch_first:
                y = graph.call_method("transpose", (y, 1, 2))
                y = graph.call_method("reshape", (y, batch, tokens, embed))
            else:
                y = graph.call_method("permute", (y, 2, 0, 1, 3))
                y = graph.call_method("reshape", (y, tokens, batch, embed))
            out = graph.call_module(f"{node.target}.out_proj", (y,))
        for user in list(node.users):
            if user.args[1] == 0:
                user.replace_all_uses_with(out)
            graph.erase_node(user)
        graph.erase_node(node)
    if not targets:
        return gm
    for target, mha in targets.items():
        owner, _, leaf = target.rpartition(".")
        setattr(gm.get_submodule(owner) if owner else gm, leaf, LoweredMultiheadAttention(mha))
    lowered = fx.GraphModule(gm, graph, class_name=gm.__class__.__name__)
    lowered.graph.lint()
    log.info("lowered %d nn.MultiheadAttention call(s) to primitive ops", len(targets))
    return lowered.train(gm.training)


def _sizes(node: fx.Node) -> list | None:
    args = list(node.args[1:])
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        args = list(args[0])
    return args or None


def _pieces(node: fx.Node) -> list[fx.Node] | None:
    """The getitem users 0, 1, 2 of a (B... ) tensor indexed on dim 0, or of its unbind(0)."""
    users = list(node.users)
    if len(users) == 1 and users[0].op in ("call_method", "call_function") and \
            getattr(users[0].target, "__name__", users[0].target) == "unbind":
        unbind = users[0]
        dim = unbind.args[1] if len(unbind.args) > 1 else unbind.kwargs.get("dim", 0)
        if dim != 0:
            return None
        users = list(unbind.users)
    if not users or not all(u.target is operator.getitem and u.args[1] in (0, 1, 2) for u in users):
        return None
    return users


def split_fused_qkv(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite `qkv.reshape(B, T, 3, H, d).permute(2, 0, 3, 1, 4)` then unbind(0) / [0], [1], [2]
    as three pieces `qkv.split([H*d] * 3, -1)`, each `.reshape(B, T, H, d).permute(0, 2, 1, 3)`:
    the same values, but q, k and v on their own, so each can get its own within-head group."""
    changed = 0
    for node in list(gm.graph.nodes):
        if not (node.op == "call_method" and node.target in ("reshape", "view")):
            continue
        sizes = _sizes(node)
        if sizes is None or len(sizes) != 5 or sizes[2] != 3 or not all(isinstance(n, int) for n in sizes[3:]):
            continue
        users = list(node.users)
        if len(users) != 1 or not (users[0].op == "call_method" and users[0].target == "permute"):
            continue
        perm = _sizes(users[0])
        if perm != [2, 0, 3, 1, 4]:
            continue
        pieces = _pieces(users[0])
        if pieces is None:
            continue
        qkv, (b, t, _, heads, head_dim) = node.args[0], sizes
        graph = gm.graph
        with graph.inserting_before(pieces[0]):
            if heads > 0 and head_dim > 0:
                split = graph.call_method("split", (qkv, [heads * head_dim] * 3, -1))
            else:  # reshape(B, T, 3, heads, -1) (timm's Swin): three equal pieces
                split = graph.call_method("chunk", (qkv, 3, -1))
            heads_of = [_to_heads(graph, graph.call_function(operator.getitem, (split, i)), b, t, heads, head_dim, True)
                        for i in range(3)]
        for piece in pieces:
            piece.replace_all_uses_with(heads_of[piece.args[1]])
        for piece in pieces:
            graph.erase_node(piece)
        for dead in (u for u in list(users[0].users)):  # the unbind, if any
            graph.erase_node(dead)
        graph.erase_node(users[0])
        graph.erase_node(node)
        changed += 1
    if changed:
        gm.graph.lint()
        gm.recompile()
        log.info("split %d fused qkv reshape(s) into separate q, k and v", changed)
    return gm
