"""Tied embeddings: a transformation of the widened graph for an embedding matrix that is also
the output head (weight tying, `head.weight = embed.weight`).

The merged matrix must serve two uses that want different entries. As the head (its feature
axis contracted), a feature kept apart must enter at half weight, so that the logits average
the two models (the mapped head M [W_A, W_B] U: 1/2 each). As the embedding (its feature axis
the output), a kept-apart feature must be the model's own row, at full weight. The fill writes
the tied matrix for the head (the contracted role wins, passes/infer_context.py), so at budget 2
the embedding would feed each model's blocks half of its own input and the merged model would
not be the ensemble.

This pass multiplies each such embedding's output by a per-feature vector: the ratio of the
embedding's coefficient to the head's on every merged feature (2 on features kept apart, 1 on
merged pairs), read from the same axis maps the fill uses. The merged model stores one number
per merged feature more (a buffer); with every feature merged the vector is all ones and the
graph is left as it is. Layers downstream are solved on the inputs this graph feeds them.
"""
from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from pleas_fx.core.fxutil import getattr_path
from pleas_fx.core.ir import GroupPlan, GroupSpec, axis_map, layout_numel
from pleas_fx.passes.linalg import zip_tensors
from pleas_fx.passes.ops.common import arg, is_attr

log = logging.getLogger(__name__)

HOLDER = "pleas_fx_tied"


def _embedding_weight(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """The weight name of an embedding lookup node (module or F.embedding), else None."""
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Embedding):
        return f"{node.target}.weight"
    if node.op == "call_function" and node.target is F.embedding:
        weight = arg(node, 1, "weight")
        if is_attr(weight):
            return weight.target
    return None


def _output_scale(name: str, spec: GroupSpec, plans: dict[int, GroupPlan], like: torch.Tensor) -> torch.Tensor | None:
    """Per merged feature: the embedding's coefficient over the head's (None: all ones)."""
    frozen = spec.fixed()
    layouts = spec.param_layouts[name]
    maps = [axis_map(lay, plans, frozen) for lay in layouts]
    ones = torch.ones([layout_numel(lay) for lay in layouts], dtype=torch.float64)  # the source shape
    as_head = zip_tensors(ones, ones, maps, spec.param_roles[name])
    as_embedding = zip_tensors(ones, ones, maps, [spec.param_roles[name][0], "out"])
    scale = (as_embedding / as_head)[0]
    if torch.allclose(scale, torch.ones_like(scale)):
        return None
    return scale.to(dtype=like.dtype, device=like.device)


def scale_tied_embeddings(merged: fx.GraphModule, spec: GroupSpec, plans: dict[int, GroupPlan]) -> int:
    """Rewrite `merged` in place (see the module docstring); returns the number of embeddings
    rescaled."""
    count = 0
    for node in list(merged.graph.nodes):
        name = _embedding_weight(node, merged)
        if name is None:
            continue
        name = spec.aliases.get(name, name)
        roles = spec.param_roles.get(name)
        if roles is None or len(roles) != 2 or roles[1] != "in" or spec.param_layouts[name][1] == ():
            continue  # not tied to a head (the feature axis is contracted only where it is)
        scale = _output_scale(name, spec, plans, getattr_path(merged, name))
        if scale is None:
            continue
        if not hasattr(merged, HOLDER):
            merged.add_module(HOLDER, nn.Module())
        holder = merged.get_submodule(HOLDER)
        buffer = f"scale{count}"
        holder.register_buffer(buffer, scale)
        with merged.graph.inserting_after(node):
            attr = merged.graph.get_attr(f"{HOLDER}.{buffer}")
        with merged.graph.inserting_after(attr):
            scaled = merged.graph.call_function(operator.mul, (node, attr))
        node.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
        scaled.meta = dict(node.meta)
        count += 1
    if count:
        merged.graph.lint()
        merged.recompile()
        log.info("tied embeddings: %d embedding(s) shared with an output head rescaled per feature "
                 "(features kept apart enter the head at half weight, the blocks at full)", count)
    return count
