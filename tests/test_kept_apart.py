"""Kept-apart values (passes/kept_apart.py): where every group a value depends on keeps all its
features apart, the merged network computes exactly the values it computes at budget 2 (the
ensemble's), whatever other groups merge; merged-input least squares skips those layers."""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
from hypothesis import given
from hypothesis import strategies as st

import nets
from pleas_fx.core.ir import GroupPlan
from pleas_fx.passes.fill import fill
from pleas_fx.passes.infer_groups import infer_groups
from pleas_fx.passes.kept_apart import kept_apart_layers, kept_apart_values
from pleas_fx.passes.trace import propagate_shapes, trace_model
from pleas_fx.passes.weights import plan_weights
from pleas_fx.passes.widen import widen


def _values(gm: fx.GraphModule, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every node's tensor value on x."""
    out = {}

    class Capture(fx.Interpreter):
        def run_node(self, n):
            v = super().run_node(n)
            if torch.is_tensor(v):
                out[n.name] = v.detach().clone()
            return v

    with torch.no_grad():
        Capture(gm).run(x)
    return out


def _merged(gm_a, gm_b, spec, plans):
    merged = widen(gm_a, spec, {g: p.width for g, p in plans.items()})
    fill(merged, gm_a, gm_b, spec, plans, plan_weights(gm_a, 10_000), None, solve="mapped")
    return merged.eval()


@nets.hypothesis_settings(25)
@given(cfg=nets.net_configs(min_width=2, only_mergeable=True), seed=st.integers(0, 10_000), data=st.data())
def test_kept_apart_values_equal_the_budget_two_values(cfg, seed, data):
    a, b = nets.build(cfg, seed).eval(), nets.build(cfg, seed + 1).eval()
    x, _ = nets.example_and_data(cfg, seed)
    gm_a, gm_b = trace_model(a, "a"), trace_model(b, "b")
    propagate_shapes(gm_a, (x,))
    propagate_shapes(gm_b, (x,))
    spec = infer_groups(gm_a)
    groups = spec.mergeable()
    apart = {g.id: GroupPlan.apart(g.size) for g in groups}
    plans = dict(apart)
    for g in groups:  # some groups merge some pairs (identity matching), the others stay apart
        merges = data.draw(st.sampled_from([0, g.size, 1]), label=f"merges of group {g.id}")
        if merges:
            plans[g.id] = GroupPlan.from_matching(np.arange(g.size), np.zeros(g.size), merges)
    exact = kept_apart_values(gm_a, gm_b, spec, plans)
    everything = kept_apart_values(gm_a, gm_b, spec, apart)
    assert exact <= everything
    ours, budget_two = _values(_merged(gm_a, gm_b, spec, plans), x), _values(_merged(gm_a, gm_b, spec, apart), x)
    checked = 0
    for name in exact & ours.keys():
        assert ours[name].shape == budget_two[name].shape, name
        torch.testing.assert_close(ours[name], budget_two[name], rtol=1e-5, atol=1e-6, msg=name)
        checked += 1
    # with nothing merged, every node up to the head is kept apart; the first weight layer whose
    # output group merges a pair is not
    first = next(n for n in gm_a.graph.nodes if n.op == "call_module" and any(True for _ in
                                                                                gm_a.get_submodule(n.target).parameters()))
    assert first.name in everything
    assert checked == len(exact & ours.keys()) and "output" not in everything


def _mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 5), torch.nn.ReLU(),
                               torch.nn.Linear(5, 3)).eval()


def test_only_layers_with_both_sides_kept_apart_are_skipped():
    a, b = _mlp(0), _mlp(1)
    x = torch.randn(3, 4)
    gm_a, gm_b = trace_model(a, "a"), trace_model(b, "b")
    propagate_shapes(gm_a, (x,))
    propagate_shapes(gm_b, (x,))
    spec = infer_groups(gm_a)
    first, second = sorted(spec.mergeable(), key=lambda g: g.size, reverse=True)  # widths 6 and 5
    weights = [w for w in plan_weights(gm_a, 10_000).nodes if w.solved]
    layer = lambda plans: kept_apart_layers(gm_a, gm_b, spec, plans, weights)
    apart = {first.id: GroupPlan.apart(6), second.id: GroupPlan.apart(5)}
    assert layer(apart) == {"_0", "_2"}  # the head averages the two models' logits: never kept apart
    merge_second = {**apart, second.id: GroupPlan.from_matching(np.arange(5), np.zeros(5), 1)}
    assert layer(merge_second) == {"_0"}
    merge_first = {**apart, first.id: GroupPlan.from_matching(np.arange(6), np.zeros(6), 1)}
    assert layer(merge_first) == set()  # a merged input: everything after it is the merged network's own
    # a parameter that differs between the models on a structural axis (a norm on the network
    # input) is averaged: nothing after it is kept apart
    norm = lambda s: torch.nn.Sequential(torch.nn.BatchNorm1d(4), _mlp(s)).eval()
    na, nb = nets.randomize_norms(norm(0), 0), nets.randomize_norms(norm(1), 1)
    ga, gb = trace_model(na, "a"), trace_model(nb, "b")
    propagate_shapes(ga, (x,))
    propagate_shapes(gb, (x,))
    spec_n = infer_groups(ga)
    plans_n = {g.id: GroupPlan.apart(g.size) for g in spec_n.mergeable()}
    assert kept_apart_layers(ga, gb, spec_n, plans_n, [w for w in plan_weights(ga, 10_000).nodes if w.solved]) == set()
