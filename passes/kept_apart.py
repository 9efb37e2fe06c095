"""Which values of a merged network are exactly the two sources' own, kept apart.

Where every group a value depends on merges no feature pair (all its features kept apart, as at
budget 2), the merged network computes exactly the ensemble's features up to that value: A's
features from A's, B's from B's. A weight layer whose input and output are such values is
filled exactly by mapping (block-diagonal weights, per-channel normalisation copied), so
merged-input least squares has nothing to correct there and skips its moments (at budget 1.5 the
early, cheap-in-parameters stages of a CNN are often kept apart). Analysis only: nothing mutated.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from pleas_fx.core.fxutil import getattr_path
from pleas_fx.core.ir import GroupPlan, GroupSpec, Segment, WeightNode, axis_map


def _segments(layouts) -> list[Segment]:
    return [s for s in tree_leaves(layouts, is_leaf=lambda v: isinstance(v, Segment)) if isinstance(s, Segment)]


def _state_names(gm: fx.GraphModule, n: fx.Node) -> list[str]:
    """The parameters and buffers a node reads (qualified names)."""
    if n.op == "get_attr":
        return [n.target]
    if n.op == "call_module":
        module = gm.get_submodule(n.target)
        return [f"{n.target}.{k}" for k, _ in list(module.named_parameters()) + list(module.named_buffers())]
    return []


def kept_apart_values(gm_a: fx.GraphModule, gm_b: fx.GraphModule, spec: GroupSpec, plans: dict[int, GroupPlan]
                      ) -> set[str]:
    """Names of the nodes of model A's graph whose merged value is exactly the sources' values kept
    apart. The network inputs are; so is a node whose inputs are and that averages nothing: every
    group on its output is either a group whose plan merges no pair (a within group counts as its
    parent) or a structural axis (batch, spatial, ...), and every parameter or buffer it reads is
    the same in A and B or copied from one side entry by entry (some axis carrying features is
    kept apart along its whole length; a frozen or output axis alone averages)."""

    def apart(seg: Segment) -> bool:
        for gid in [seg.group] + ([seg.within] if seg.within is not None else []):
            g = spec.groups.get(gid)
            plan = plans.get(g.parent if g is not None and g.parent is not None else gid)
            if plan is None or plan.merged_pairs:
                return False
        return True

    def fine(seg: Segment) -> bool:
        g = spec.groups.get(seg.group)
        structural = g is not None and g.frozen and g.parent is None and all(r.structural for r in g.reasons)
        return structural or apart(seg)

    def copied(name: str) -> bool:
        va, vb = getattr_path(gm_a, name), getattr_path(gm_b, name)
        if not torch.is_tensor(va) or not va.is_floating_point() or (va.shape == vb.shape and torch.equal(va, vb)):
            return True  # integer buffers are A's; equal values are the same whatever the plan
        key = spec.aliases.get(name, name)
        layouts, roles = spec.param_layouts.get(key), spec.param_roles.get(key)
        if not layouts or not all(fine(s) for lay in layouts for s in lay):
            return False
        return any(role == "out" and lay and all(apart(s) for s in lay) for lay, role in zip(layouts, roles))

    exact: set[str] = set()
    for n in gm_a.graph.nodes:
        if n.op == "placeholder":
            exact.add(n.name)
        elif (n.op != "output" and all(i.name in exact for i in n.all_input_nodes)
              and all(fine(s) for s in _segments(spec.node_layouts.get(n.name)))
              and all(copied(name) for name in _state_names(gm_a, n))):
            exact.add(n.name)
    return exact


def kept_apart_layers(gm_a: fx.GraphModule, gm_b: fx.GraphModule, spec: GroupSpec, plans: dict[int, GroupPlan],
                      nodes: list[WeightNode], exact: set[str] | None = None) -> set[str]:
    """The weight nodes whose input and output values are kept apart (`exact`: the
    `kept_apart_values`, computed when None)."""
    exact = kept_apart_values(gm_a, gm_b, spec, plans) if exact is None else exact
    graph = {n.name: n for n in gm_a.graph.nodes}
    out = set()
    for w in nodes:
        n = graph.get(w.node)
        if n is not None and n.name in exact and n.args and isinstance(n.args[0], fx.Node) and n.args[0].name in exact:
            out.add(w.node)
    return out


class ActivationZip:
    """Builds a kept-apart value of the merged network from the two sources' values of that node:
    along its one feature axis, each merged feature takes its source's feature (a structural
    axis is the same in both and stays as it is). Values with no feature axis, several, a within
    group, or several sources per feature are not zippable."""

    def __init__(self, spec: GroupSpec, plans: dict[int, GroupPlan]):
        self.spec, self.plans, self.frozen = spec, plans, spec.fixed()
        self.maps: dict[str, tuple | None] = {}
        self.gathers: dict[tuple[str, torch.device, torch.dtype], tuple] = {}

    def _map(self, name: str):
        if name not in self.maps:
            layouts = self.spec.node_layouts.get(name)
            found = None
            if isinstance(layouts, list) and all(isinstance(lay, tuple) and all(isinstance(s, Segment) for s in lay)
                                                 for lay in layouts):
                feature = [i for i, lay in enumerate(layouts) if not all(s.group in self.frozen for s in lay)]
                if len(feature) == 1 and all(s.within is None for s in layouts[feature[0]]):
                    amap = axis_map(layouts[feature[0]], self.plans, self.frozen)
                    if amap.pairwise:
                        found = (feature[0], amap)
            self.maps[name] = found
        return self.maps[name]

    def zippable(self, name: str) -> bool:
        return self._map(name) is not None

    def __call__(self, name: str, va: torch.Tensor, vb: torch.Tensor) -> torch.Tensor:
        key = (name, va.device, va.dtype)
        if key not in self.gathers:
            axis, amap = self._map(name)
            shape = [1] * va.dim()
            shape[axis] = -1
            parts = []
            for idx, w in zip((amap.idx_a, amap.idx_b), amap.weights()):
                parts.append((torch.as_tensor(idx.clip(0), device=va.device),
                              torch.as_tensor(w, dtype=va.dtype, device=va.device).reshape(shape)))
            self.gathers[key] = (axis, parts)
        axis, ((ia, wa), (ib, wb)) = self.gathers[key]
        return va.index_select(axis, ia) * wa + vb.index_select(axis, ib) * wb
