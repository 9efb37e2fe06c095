"""The default merge's quality features: merged-input least squares (passes/merged_inputs.py),
BatchNorm statistics that are what the merged network computes, per-model LayerNorm over a
widened stream (passes/layernorm.py), and the official code's recipe as a baseline."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import nets
import pleas_fx
from pleas_fx.apps.demo import DigitResNet
from pleas_fx.passes.merged_inputs import weight_levels
from pleas_fx.passes.methods import repair_batchnorm
from pleas_fx.passes.trace import propagate_shapes, trace_model
from pleas_fx.passes.verify import relative_error
from pleas_fx.passes.weights import plan_weights
from tools.digit_models import DigitViT


def _merge(a, b, x, budget, data, **kw):
    return pleas_fx.merge(a, b, x, budget, data, progress=False, **kw)


def test_levels_follow_the_longest_path_of_solved_layers():
    model = DigitResNet(width=4).eval()
    gm = trace_model(model, "model")
    propagate_shapes(gm, (torch.randn(2, 1, 28, 28),))
    levels = [[w.node for w in level] for level in weight_levels(gm, plan_weights(gm, 10_000).solved)]
    assert levels == [["conv1"], ["layer1_conv1"], ["layer1_conv2"], ["layer2_conv1", "layer2_shortcut_0"],
                      ["layer2_conv2"], ["fc"]]


def _folded_norms(model, x) -> set[str]:
    """Module paths of the BatchNorms folded into a solved layer (the least-squares target)."""
    gm = trace_model(model, "model")
    propagate_shapes(gm, (x,))
    nodes = {n.name: n for n in gm.graph.nodes}
    return {nodes[w.norm.node].target for w in plan_weights(gm, 10_000).solved if w.norm is not None}


@nets.hypothesis_settings(6)
@given(cfg=nets.net_configs(only_mergeable=True), seed=st.integers(0, 10_000), budget=st.sampled_from([1.0, 1.5]))
def test_merged_input_least_squares_writes_the_merged_networks_own_batchnorm_statistics(cfg, seed, budget):
    """Resetting the statistics of a BatchNorm folded into a solved layer on the calibration
    data (repair) changes nothing: merged-input least squares wrote the merged network's own."""
    a, b = (nets.randomize_norms(nets.build(cfg, s).eval(), s) for s in (seed, seed + 1))
    x, _ = nets.example_and_data(cfg, seed)
    data = nets.batches(x.shape[1:], 3, seed, batch_size=64)
    merged = _merge(a, b, x, budget, data)
    folded = _folded_norms(a, x)
    norms = {n: m for n, m in merged.named_modules() if isinstance(m, nn.BatchNorm2d) and n in folded}
    if not norms:
        return
    repaired = copy.deepcopy(merged)
    repair_batchnorm(repaired, [(d,) for d in data])
    fixed = dict(repaired.named_modules())
    for name, bn in norms.items():
        scale = float(bn.running_var.abs().max()) + 1e-6
        assert torch.allclose(bn.running_mean, fixed[name].running_mean, atol=1e-3 * scale ** 0.5 + 1e-5), name
        # the reset averages per-batch unbiased variances: equal up to the between-batch spread
        assert torch.allclose(bn.running_var, fixed[name].running_var, rtol=0.05, atol=1e-4 * scale), name


@pytest.fixture(scope="module")
def vit_pair():
    torch.manual_seed(0)
    a, b = DigitViT(8, depth=2).eval(), DigitViT(8, depth=2).eval()
    for m in (a, b):  # not at initialisation: LayerNorm affines and weights away from their defaults
        for p in m.parameters():
            p.data.add_(0.2 * torch.randn_like(p))
    x = torch.randn(6, 1, 14, 14)
    return a, b, x, [torch.randn(40, 1, 14, 14) for _ in range(2)]


def test_per_model_layernorm_makes_budget_two_of_a_pre_norm_vit_the_ensemble(vit_pair, tmp_path):
    a, b, x, data = vit_pair
    expected = nets.ensemble(a, b, x)
    shared, per_model = (_merge(a, b, x, [1.0, 1.5, 2.0], data, layernorm=ln) for ln in ("shared", "per_model"))
    errors = [relative_error(nets.run(m, x), expected) for m in per_model]
    assert errors[2] < 1e-4, errors
    assert relative_error(nets.run(shared[2], x), expected) > 1e-3  # one LayerNorm over both models mixes them
    assert errors[0] >= errors[1] >= errors[2]  # more budget, closer to the ensemble
    # every feature merged at budget 1: the plain LayerNorm is exact, nothing is rewritten
    assert relative_error(nets.run(per_model[0], x), nets.run(shared[0], x)) < 1e-5
    path = tmp_path / "vit.pt"
    pleas_fx.save(per_model[1], str(path))  # only torch functions and buffers: saves and loads
    assert relative_error(nets.run(pleas_fx.load(str(path)), x), nets.run(per_model[1], x)) < 1e-6


def test_merged_input_least_squares_is_closer_to_the_ensemble_on_a_deep_vit(vit_pair):
    a, b, x, data = vit_pair
    expected = nets.ensemble(a, b, x)
    err = {ls: relative_error(nets.run(_merge(a, b, x, 1.0, data, least_squares=ls), x), expected)
           for ls in ("merged", "source")}
    assert err["merged"] < 0.5 * err["source"], err


@pytest.fixture(scope="module")
def digit_pair():
    return nets.trained_digit_pair()


def _accuracy(model, test):
    xt, yt = test
    with torch.no_grad():
        return 100.0 * float((model(xt).argmax(1) == yt).float().mean())


def test_default_merge_beats_averaging_and_the_previous_default_on_a_trained_pair(digit_pair):
    (a, b), calib, test = digit_pair
    x = calib[0][0][:4]
    default = _accuracy(_merge(a, b, x, 1.0, calib), test)
    previous = _accuracy(_merge(a, b, x, 1.0, calib, least_squares="source"), test)
    averaged = _accuracy(_merge(a, b, x, 1.0, calib, method="average"), test)
    assert default >= averaged + 10, (default, averaged)
    assert default >= previous, (default, previous)


def test_official_recipe_baseline_runs_from_the_same_passes(digit_pair):
    (a, b), calib, test = digit_pair
    x = calib[0][0][:4]
    merged = _merge(a, b, x, 1.0, calib, method="pleas_adam")
    report = merged.meta["pleas_fx"]
    assert report["solve"] == "adam" and report["repair"] is True
    averaged = _accuracy(_merge(a, b, x, 1.0, calib, method="permute"), test)
    assert _accuracy(merged, test) >= averaged - 2  # Adam from the permuted average, early stopped


def test_bad_quality_options_raise_clear_errors():
    m = nn.Linear(3, 2)
    with pytest.raises(pleas_fx.PleasError, match="least_squares"):
        _merge(m, m, torch.randn(2, 3), 1.0, None, least_squares="exact")
    with pytest.raises(pleas_fx.PleasError, match="layernorm"):
        _merge(m, m, torch.randn(2, 3), 1.0, None, layernorm="none")


class _PreNormBlocks(nn.Module):
    """Two pre-norm residual blocks normalised by an RMSNorm module, F.rms_norm and F.layer_norm."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.inp, self.out = nn.Linear(5, d), nn.Linear(d, 3)
        self.norm = nn.RMSNorm(d)
        self.f1, self.f2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.scale = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.f2(torch.nn.functional.gelu(self.f1(self.norm(h))))
        h = h + self.f2(torch.nn.functional.gelu(self.f1(torch.nn.functional.rms_norm(h, (h.shape[-1],), self.scale))))
        return self.out(torch.nn.functional.layer_norm(h, (h.shape[-1],)))


@pytest.mark.skipif(not hasattr(nn, "RMSNorm"), reason="torch < 2.4")
def test_per_model_rmsnorm_and_functional_norms_make_budget_two_the_ensemble():
    torch.manual_seed(0)
    a, b = _PreNormBlocks().eval(), _PreNormBlocks().eval()
    for m in (a, b):
        for p in m.parameters():
            p.data.add_(0.2 * torch.randn_like(p))
    x, data = torch.randn(7, 5), [torch.randn(64, 5) for _ in range(2)]
    expected = nets.ensemble(a, b, x)
    merged = _merge(a, b, x, 2.0, data)
    assert relative_error(nets.run(merged, x), expected) < 1e-4
    assert relative_error(nets.run(_merge(a, b, x, 2.0, data, layernorm="shared"), x), expected) > 1e-3


def test_budgets_filled_in_lockstep_equal_separate_merges(digit_pair, monkeypatch):
    """A budget list refines every budget's merged model in one lockstep pass per level; each
    equals the model of a merge at that budget alone, and keeping activations between levels
    (the frontier) changes nothing against re-running every level from the input."""
    from pleas_fx.passes import merged_inputs

    (a, b), calib, test = digit_pair
    x, xt = calib[0][0][:4], test[0][:200]
    together = _merge(a, b, x, [1.0, 1.5], calib)
    monkeypatch.setattr(merged_inputs, "CACHE_BYTES", 0)
    for budget, merged in zip([1.0, 1.5], together):
        alone = _merge(a, b, x, budget, calib)
        with torch.no_grad():
            want, got = alone(xt), merged(xt)
        assert relative_error(got, want) < 1e-6, budget


def test_in_place_ops_on_shared_values_run_in_graph_order():
    """A merged graph where an in-place op writes a value another node reads is never run out of
    order (level_runner.unsafe); a plain ResNet block with in-place ReLUs after BatchNorm is."""
    from pleas_fx.passes.level_runner import unsafe as _unsafe

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.relu = nn.Conv2d(1, 4, 3), nn.Conv2d(1, 4, 3), nn.ReLU(inplace=True)

        def forward(self, x):
            y = self.c1(x)
            return self.c2(self.relu(x)) + y

    assert _unsafe(trace_model(Shared(), "model"))
    assert not _unsafe(trace_model(DigitResNet(width=4), "model"))
