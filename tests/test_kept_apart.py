"""Kept-apart values (passes/kept_apart.py): where every group a value depends on keeps all its
features apart, the merged network computes exactly the values it computes at budget 2 (the
ensemble's), whatever other groups merge; merged-input least squares skips those layers."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.fx as fx
from hypothesis import given
from hypothesis import strategies as st

import nets
import pleas_fx
from pleas_fx.passes import level_runner
from pleas_fx.core.ir import GroupPlan
from pleas_fx.passes.fill import fill
from pleas_fx.passes.infer_groups import infer_groups
from pleas_fx.passes.kept_apart import ActivationZip, kept_apart_layers, kept_apart_values
from pleas_fx.passes.trace import propagate_shapes, trace_model
from pleas_fx.passes.verify import relative_error
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


@contextmanager
def _prefixes(monkeypatch, on: bool = True):
    """Record every merged model's KeptApartPrefix; with on=False, turn each off at its start."""
    made = []
    original = level_runner.KeptApartPrefix.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.on = self.on and on
        made.append(self)

    with monkeypatch.context() as m:
        m.setattr(level_runner.KeptApartPrefix, "__init__", init)
        yield made


def _merge_outputs(monkeypatch, a, b, x, data, budgets, on: bool):
    """(Without the data-limited levels' mixup copies: on these 24 samples they make layers
    re-solved from 1.5-2 rows per entry, whose solves amplify the float32 rounding by which a
    zipped value may differ from a computed one beyond the comparison's tolerance.)"""
    with _prefixes(monkeypatch, on) as made:
        merged = pleas_fx.merge(a, b, x, budgets, data, progress=False, mixup=False)
    with torch.no_grad():
        return [m(x) for m in merged], made


@nets.hypothesis_settings(12)
@given(cfg=nets.net_configs(min_width=2), seed=st.integers(0, 10_000))
def test_a_merge_zipping_its_kept_apart_prefix_equals_one_that_runs_it(cfg, seed):
    """Merged-input least squares does not run a model's kept-apart prefix but zips its values
    from the sources': the merged models are the same as when it runs the prefix."""
    monkeypatch = pytest.MonkeyPatch()  # (function-scoped fixtures do not reset between hypothesis examples)
    a, b = nets.build(cfg, seed).eval(), nets.build(cfg, seed + 1).eval()
    x, data = nets.example_and_data(cfg, seed, n_batches=3, batch_size=8)
    zipped, _ = _merge_outputs(monkeypatch, a, b, x, data, [1.3, 1.7], on=True)
    run, _ = _merge_outputs(monkeypatch, a, b, x, data, [1.3, 1.7], on=False)
    for got, want in zip(zipped, run):
        assert relative_error(got, want) < 1e-5


def test_the_kept_apart_prefix_is_not_run_and_gives_the_same_model(monkeypatch):
    """A budget that keeps the first stage of a ResNet apart: its merged model's prefix is skipped
    (none of its convolutions run on batches after the first), the result unchanged."""
    a, b, data = nets.digit_resnet_pair(4, 4, 16)
    x = data[0][:4]
    runs: dict[int, int] = {}
    original = level_runner.LevelRunner.run_node

    def counting(self, n):
        runs[id(self.module)] = runs.get(id(self.module), 0) + 1
        return original(self, n)

    monkeypatch.setattr(level_runner.LevelRunner, "run_node", counting)
    zipped, made = _merge_outputs(monkeypatch, a, b, x, data, [1.0, 1.8], on=True)
    ran_zipped = dict(runs)
    runs.clear()
    run, _ = _merge_outputs(monkeypatch, a, b, x, data, [1.0, 1.8], on=False)
    skipping = [p for p in made if p.on and p.skipped]
    assert skipping, "budget 1.8 keeps no prefix apart: the test needs one"
    assert all(p.boundary for p in skipping)
    assert sum(ran_zipped.values()) < sum(runs.values())
    for got, want in zip(zipped, run):
        assert relative_error(got, want) < 1e-5


def test_a_zip_that_differs_from_the_merged_values_turns_the_prefix_off(monkeypatch):
    """The first batch runs the prefix and checks every zipped value: a wrong zip is caught, the
    prefix is run for every batch instead, and the merged model is the one without it."""
    a, b, data = nets.digit_resnet_pair(4, 4, 16)
    x = data[0][:4]
    want, _ = _merge_outputs(monkeypatch, a, b, x, data, [1.8], on=False)
    with monkeypatch.context() as m:
        m.setattr(ActivationZip, "__call__", lambda self, name, va, vb: torch.zeros(1))
        got, made = _merge_outputs(monkeypatch, a, b, x, data, [1.8], on=True)
    assert made and not any(p.on for p in made)
    assert relative_error(got[0], want[0]) < 1e-6


@nets.hypothesis_settings(10)
@given(cfg=nets.net_configs(min_width=2), seed=st.integers(0, 10_000))
def test_kept_apart_layers_filled_without_a_solve_equal_their_least_squares(cfg, seed):
    """A layer between kept-apart values is written from its mapped weight and its sources' output
    moments (linalg.kept_apart_solution), with no Gram and no factorisation: the same weights and
    the same BatchNorm statistics as the least-squares solve it replaces (budget 2: every layer)."""
    from pleas_fx.passes import fill as fill_pass
    monkeypatch = pytest.MonkeyPatch()  # (function-scoped fixtures do not reset between hypothesis examples)
    a, b = (nets.randomize_norms(nets.build(cfg, s).eval(), s) for s in (seed, seed + 1))
    x, data = nets.example_and_data(cfg, seed, n_batches=3, batch_size=8)
    fast = pleas_fx.merge(a, b, x, 2.0, data, progress=False)
    with monkeypatch.context() as m:
        m.setattr(fill_pass, "kept_apart_layers", lambda *args, **kwargs: set())
        solved = pleas_fx.merge(a, b, x, 2.0, data, progress=False)
    got, want = fast.state_dict(), solved.state_dict()
    assert got.keys() == want.keys()
    for name, value in want.items():
        if value.is_floating_point():
            scale = float(value.abs().max()) + 1e-6
            assert torch.allclose(got[name], value, rtol=1e-4, atol=1e-5 * scale), name
    with torch.no_grad():
        assert relative_error(fast(x), solved(x)) < 1e-5
