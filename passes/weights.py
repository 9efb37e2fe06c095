"""Weight planning (an analysis pass): every node that applies a weight to its input, read from
the op specs, with the normalisation folded into it and whether least squares solves it.

A weight node is solved (kind "linear" / "conv") unless its weight is used by several nodes,
its stacked input exceeds `max_ls_dim`, or its spec says it is mapped (kind "mapped", with a
note). An eval-mode BatchNorm that is the only user of a solved or depthwise node's output
is folded into it (the least-squares target is the normalised feature); other norms are
merged on their own. Everything the plan leaves out is mapped through the group plans.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

import torch.fx as fx

from pleas_fx.core.fxutil import getattr_path, node_shape
from pleas_fx.core.ir import NormNode, WeightNode
from pleas_fx.passes.ops import lookup_op


@dataclass
class WeightPlan:
    """The weight nodes of a model in graph order, the norms not folded into one, and notes
    on every weight that is mapped rather than solved."""

    nodes: list[WeightNode] = field(default_factory=list)
    norms: list[NormNode] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def solved(self) -> list[WeightNode]:
        return [w for w in self.nodes if w.solved]


def weight_nodes(gm: fx.GraphModule) -> list[WeightNode]:
    """Every node whose op spec names a weight it applies (without folding or solve decisions)."""
    out = []
    for node in gm.graph.nodes:
        spec = lookup_op(node, gm)
        if spec is not None and spec.weight is not None:
            w = spec.weight(node, gm)
            if w is not None:
                out.append(w)
    return out


def norm_nodes(gm: fx.GraphModule) -> dict[str, NormNode]:
    """Every eval-mode normalisation with running statistics, by node name."""
    out = {}
    for node in gm.graph.nodes:
        spec = lookup_op(node, gm)
        if spec is not None and spec.norm is not None:
            n = spec.norm(node, gm)
            if n is not None:
                out[node.name] = n
    return out


def tensor_uses(gm: fx.GraphModule, aliases: dict[str, str]) -> Counter:
    """How many graph nodes read each tensor (by its first name, tied tensors counted together):
    module calls read their module's own tensors, get_attr nodes the one they name."""
    uses: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            for n, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
                if t is not None:
                    qualified = f"{node.target}.{n}"
                    uses[aliases.get(qualified, qualified)] += 1
        elif node.op == "get_attr":
            uses[aliases.get(node.target, node.target)] += 1
    return uses


def plan_weights(gm: fx.GraphModule, max_ls_dim: int, aliases: dict[str, str] | None = None) -> WeightPlan:
    """The weight plan of `gm` (shape-propagated traced model A); see the module docstring.
    `aliases`: a tied tensor's other names -> its first (GroupSpec.aliases)."""
    aliases = aliases or {}
    nodes = {n.name: n for n in gm.graph.nodes}
    norms = norm_nodes(gm)
    found = [dataclasses.replace(w, weight=aliases.get(w.weight, w.weight),
                                 bias=aliases.get(w.bias, w.bias) if w.bias else None) for w in weight_nodes(gm)]
    uses = tensor_uses(gm, aliases)
    plan = WeightPlan()
    folded: set[str] = set()
    for w in found:
        if w.solved and uses[w.weight] > 1:
            w = dataclasses.replace(w, kind="mapped", note="weight used by more than one node (a module called "
                                                          "twice, or tied weights) is mapped, not solved")
        if w.solved:
            din = _input_features(gm, w)
            if 2 * din + 1 > max_ls_dim:
                w = dataclasses.replace(w, kind="mapped", note=f"{2 * din + 1} stacked inputs exceed "
                                                               f"max_ls_dim={max_ls_dim}; mapped, not solved")
        if w.solved or w.kind == "depthwise":
            norm = _following_norm(nodes[w.node], norms)
            if norm is not None and norm.affine and norm.node not in folded:
                w = dataclasses.replace(w, norm=norm)
                folded.add(norm.node)
        if w.note:
            plan.notes.append(f"{w.node} ({w.weight}): {w.note}")
        plan.nodes.append(w)
    plan.norms = [n for name, n in norms.items() if name not in folded]
    return plan


def _following_norm(node: fx.Node, norms: dict[str, NormNode]) -> NormNode | None:
    users = list(node.users)
    if len(users) == 1 and users[0].name in norms and users[0].args and users[0].args[0] is node:
        return norms[users[0].name]
    return None


def _input_features(gm: fx.GraphModule, w: WeightNode) -> int:
    """Entries of one stacked-input side: in_features, or in_channels x kernel taps."""
    weight = getattr_path(gm, w.weight)
    if w.kind == "grouped":  # the whole input's patches are measured; each conv group reads its own
        node = next(n for n in gm.graph.nodes if n.name == w.node)
        return int(node_shape(node.args[0])[1]) * w.taps
    return int(weight.shape[1]) * w.taps if w.kind == "conv" else int(weight.shape[1])
