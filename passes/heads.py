"""Separate heads (different label spaces): the output's class group is kept apart at every
budget, so the merged model computes both heads on the merged features, and its output is
split into (out_A, out_B). With shared heads nothing changes: the output group stays frozen
and the logits are the ensemble average."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.fx as fx

from pleas_fx.core.errors import PleasError
from pleas_fx.core.fxutil import getattr_path
from pleas_fx.core.ir import GroupPlan, GroupSpec

HEADS = ("shared", "separate")


@dataclass
class SeparateHeads:
    """The output group kept apart: `spec` is the GroupSpec with that group unfrozen."""

    spec: GroupSpec
    group: int
    size: int
    extra_parameters: int  # the second head's parameters (the budget counts one head)
    axis: int  # the output's class axis

    def widths(self, widths: dict[int, int]) -> dict[int, int]:
        return {**widths, self.group: 2 * self.size}

    def plans(self, plans: dict[int, GroupPlan]) -> dict[int, GroupPlan]:
        return {**plans, self.group: GroupPlan.apart(self.size)}

    def split_output(self, merged: fx.GraphModule) -> None:
        """Make the merged model return (out_A, out_B): the widened class axis is A's classes then B's."""
        graph = merged.graph
        out = next(n for n in graph.nodes if n.op == "output")
        value = out.args[0]
        with graph.inserting_before(out):
            part_a = graph.call_function(torch.narrow, (value, self.axis, 0, self.size))
            part_b = graph.call_function(torch.narrow, (value, self.axis, self.size, self.size))
        out.args = ((part_a, part_b),)
        merged.recompile()


def separate_heads(spec: GroupSpec, gm: fx.GraphModule) -> SeparateHeads:
    """The output must be one tensor whose only grouped axis is a group frozen only because it
    is the network output."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    value = out.args[0]
    layouts = spec.node_layouts.get(value.name) if isinstance(value, fx.Node) else None
    if not layouts or isinstance(layouts[0], list):
        raise PleasError("heads='separate' needs a model that returns a single tensor")
    candidates = []
    for axis, lay in enumerate(layouts):
        if len(lay) == 1 and lay[0].inner == lay[0].outer == 1 and lay[0].size > 1:
            g = spec.groups[lay[0].group]
            if g.frozen and [r.kind for r in g.reasons] == ["network output"] and any(p.role == "out" for p in g.params):
                candidates.append((axis, g))
    if len(candidates) != 1:
        raise PleasError("heads='separate': cannot find the output's class axis (one axis of the output, "
                         "of at least 2 classes, fed by a weight layer and frozen only as the network output)")
    axis, g = candidates[0]
    spec_h = copy.copy(spec)
    spec_h.groups = dict(spec.groups)
    spec_h.groups[g.id] = dataclasses.replace(g, frozen=False, reasons=[])
    extra = sum(t.numel() for t in (getattr_path(gm, name) for name in {p.name for p in g.params})
                if isinstance(t, torch.nn.Parameter))
    return SeparateHeads(spec_h, g.id, g.size, extra, axis)
