"""Baselines built from the same passes (passes/methods.py), checked against their definitions:
plain averaging, Git Re-Basin / Permute (average of the permuted weights), RegMean (its closed
form), ZipIt! (ensemble at budget 2, identity on a self-merge, M_out blkdiag(W_A, W_B) U_in with
within-model merges), heads="separate", REPAIR-style BatchNorm reset, procedural data."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import nets
import pleas_fx
from pleas_fx.errors import DataError, PleasError
from pleas_fx.core.ir import GroupPlan, Segment, axis_map
from pleas_fx.core.procedural import procedural_batches
from pleas_fx.passes.infer_groups import infer_groups
from pleas_fx.passes.matching import activation_matching, weight_matching, zipit_matching
from pleas_fx.passes.statistics import collect_statistics
from pleas_fx.passes.trace import propagate_shapes, trace_model
from pleas_fx.passes.verify import permute_model, relative_error

seeds = st.integers(0, 10_000)


def _merge(a, b, x, budget, data, **kw):
    return pleas_fx.merge(a, b, x, budget, data, progress=False, **kw)


def _traced(a, b, x):
    gm_a, gm_b = trace_model(a, "a"), trace_model(b, "b")
    propagate_shapes(gm_a, (x,))
    propagate_shapes(gm_b, (x,))
    return gm_a, gm_b, infer_groups(gm_a)


def _float_state(module) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in module.state_dict().items() if v.is_floating_point()}


def _assert_states_close(actual: dict, expected: dict, tol: float = 1e-6) -> None:
    assert actual.keys() == expected.keys()
    for k in expected:
        assert actual[k].shape == expected[k].shape, k
        err = float((actual[k] - expected[k]).abs().max()) if actual[k].numel() else 0.0
        assert err <= tol * max(1.0, float(expected[k].abs().max())), (k, err)


class TwoLayer(nn.Module):
    def __init__(self, d_in=5, hidden=8, d_out=3, act=nn.Tanh, bn=False):
        super().__init__()
        layers = [nn.Linear(d_in, hidden)] + ([nn.BatchNorm1d(hidden)] if bn else []) + [act(), nn.Linear(hidden, d_out)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def _pair(seed, **kw):
    torch.manual_seed(seed)
    a = nets.randomize_norms(TwoLayer(**kw), seed).eval()
    torch.manual_seed(seed + 1)
    b = nets.randomize_norms(TwoLayer(**kw), seed + 1).eval()
    return a, b


# --------------------------------------------------------------------------- averaging
@nets.hypothesis_settings(10)
@given(cfg=nets.net_configs(), seed=seeds)
def test_average_at_budget_one_is_the_mean_of_every_tensor(cfg, seed):
    a, b = nets.build(cfg, seed).eval(), nets.build(cfg, seed + 1).eval()
    x, data = nets.example_and_data(cfg, seed)
    merged = _merge(a, b, x, 1.0, data, method="average", repair=False)
    sa, sb = _float_state(a), _float_state(b)
    _assert_states_close(_float_state(merged), {k: 0.5 * (sa[k] + sb[k]) for k in sa})
    assert merged.meta["pleas_fx"]["method"] == "average"


# --------------------------------------------------------------------------- Git Re-Basin / Permute
@nets.hypothesis_settings(10)
@given(cfg=nets.net_configs(only_mergeable=True), seed=seeds, method=st.sampled_from(["permute", "rebasin_weight"]))
def test_permute_at_budget_one_is_the_average_of_the_permuted_weights(cfg, seed, method):
    a, b = nets.build(cfg, seed).eval(), nets.build(cfg, seed + 1).eval()
    x, data = nets.example_and_data(cfg, seed)
    gm_a, gm_b, spec = _traced(a, b, x)
    if method == "permute":
        sites = [s for g in spec.mergeable() for s in g.sites]
        stats = collect_statistics(gm_a, gm_b, [(t,) for t in data], [], sites, progress=False)
        perm = activation_matching(spec, stats).perm
    else:
        perm = weight_matching(spec, gm_a, gm_b).perm
    permuted_b = permute_model(gm_b, spec, perm)
    merged = _merge(a, b, x, 1.0, data, method=method, repair=False)
    sa, sb = _float_state(gm_a), _float_state(permuted_b)
    _assert_states_close(_float_state(merged), {k: 0.5 * (sa[k] + sb[k]) for k in sa})


def test_permute_above_budget_one_keeps_the_worst_matched_pairs_apart_and_averages_the_rest():
    a, b = _pair(3, hidden=10)
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))
    data = [x[i:i + 16] for i in range(0, 64, 16)]
    gm_a, gm_b, spec = _traced(a, b, x)
    (g,) = spec.mergeable()
    stats = collect_statistics(gm_a, gm_b, [(t,) for t in data], [], g.sites, progress=False)
    m = activation_matching(spec, stats)
    merged = _merge(a, b, x, 1.5, data, method="permute", repair=False, allocation="uniform")
    w = merged.get_submodule("net.0").weight.detach().double()
    kept = w.shape[0] - g.size
    assert 0 < kept < g.size
    order = np.argsort(m.pair_cost[g.id], kind="stable")
    wa, wb = a.net[0].weight.detach().double(), b.net[0].weight.detach().double()
    merged_a = np.sort(order[:g.size - kept])
    expected_rows = 0.5 * (wa[merged_a] + wb[m.perm[g.id][merged_a]])
    # merged features are ordered [A-only | merged | B-only]
    worst = np.sort(order[g.size - kept:])
    assert torch.allclose(w[:kept], wa[worst], atol=1e-6)
    assert torch.allclose(w[kept:kept + len(merged_a)], expected_rows, atol=1e-6)
    assert torch.allclose(w[kept + len(merged_a):], wb[np.sort(m.perm[g.id][worst])], atol=1e-6)


# --------------------------------------------------------------------------- RegMean
@nets.hypothesis_settings(6)
@given(seed=seeds, hidden=st.integers(2, 9))
def test_regmean_at_budget_one_is_its_closed_form(seed, hidden):
    """W = (W_A G_A + W_B G_B)(G_A + G_B)^-1 per Linear, G_s the (bias-augmented) Gram of
    model s's own inputs to that layer."""
    a, b = _pair(seed, hidden=hidden)
    x = torch.randn(256, 5, generator=torch.Generator().manual_seed(seed))
    data = [x[i:i + 64] for i in range(0, 256, 64)]
    merged = _merge(a, b, x[:8], 1.0, data, method="regmean", ridge=0.0)
    aug = lambda t: torch.cat([t.double(), torch.ones(t.shape[0], 1, dtype=torch.float64)], 1)
    with torch.no_grad():
        inputs = {0: (x, x), 2: (a.net[1](a.net[0](x)), b.net[1](b.net[0](x)))}
    merged_layer = {0: merged.get_submodule("net.0"), 2: merged.get_submodule("net.2")}
    for layer, (xa, xb) in inputs.items():
        ga, gb = aug(xa).T @ aug(xa), aug(xb).T @ aug(xb)
        wa = torch.cat([a.net[layer].weight, a.net[layer].bias[:, None]], 1).detach().double()
        wb = torch.cat([b.net[layer].weight, b.net[layer].bias[:, None]], 1).detach().double()
        expected = torch.linalg.solve(ga + gb, (wa @ ga + wb @ gb).T).T
        got = torch.cat([merged_layer[layer].weight, merged_layer[layer].bias[:, None]], 1).detach().double()
        assert torch.allclose(got, expected, atol=1e-5 * float(expected.abs().max())), layer
    # the second layer's Grams differ, so RegMean is not plain averaging there
    avg = 0.5 * (a.net[2].weight + b.net[2].weight).detach().double()
    assert (merged.get_submodule("net.2").weight.detach().double() - avg).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["regmean", "zipit"])
@nets.hypothesis_settings(8)
@given(cfg=nets.net_configs(only_mergeable=True), seed=seeds)
def test_regmean_and_zipit_at_budget_two_are_the_ensemble(method, cfg, seed):
    a, b = nets.build(cfg, seed).eval(), nets.build(cfg, seed + 1).eval()
    x, data = nets.example_and_data(cfg, seed)
    merged = _merge(a, b, x, 2.0, data, method=method, repair=False)
    assert relative_error(nets.run(merged, x), nets.ensemble(a, b, x)) < 1e-4


# --------------------------------------------------------------------------- ZipIt!
@nets.hypothesis_settings(8)
@given(seed=seeds, hidden=st.lists(st.integers(2, 7), min_size=1, max_size=3), bn=st.booleans())
def test_zipit_self_merge_with_a_permuted_copy_is_the_identity(seed, hidden, bn):
    """Every feature of A correlates perfectly with its copy in B (tanh: no dead features), so
    ZipIt! pairs them across the models and the mapped weights are A's."""
    cfg = {"kind": "mlp", "in": 4, "out": 3,
           "hidden": [{"width": w, "act": "tanh", "bn": bn, "bias": True} for w in hidden]}
    a = nets.build(cfg, seed).eval()
    x, data = nets.example_and_data(cfg, seed, n_batches=4, batch_size=16)
    _, _, b, perms = nets.permuted_copy(a, x, seed + 1)
    merged = _merge(a, b, x, 1.0, data, method="zipit", repair=False)
    assert relative_error(nets.run(merged, x), nets.run(a, x)) < 1e-5


def test_zipit_merges_within_a_model_and_maps_through_m_and_u():
    """B's hidden units 0 and 1 compute almost the same feature: ZipIt! merges them with each
    other, and every weight is M_out blkdiag(W_A, W_B) U_in for the plan, built here densely."""
    a, b = _pair(5, hidden=6)
    with torch.no_grad():
        b.net[0].weight[1] = 1.001 * b.net[0].weight[0]
        b.net[0].bias[1] = 1.001 * b.net[0].bias[0]
    x = torch.randn(128, 5, generator=torch.Generator().manual_seed(1))
    data = [x[i:i + 32] for i in range(0, 128, 32)]
    gm_a, gm_b, spec = _traced(a, b, x)
    (g,) = spec.mergeable()
    stats = collect_statistics(gm_a, gm_b, [(t,) for t in data], [], g.sites, progress=False, full_sites=True)
    m = zipit_matching(spec, stats)
    plan = GroupPlan.from_zip(g.size, m.pairs[g.id], g.size)
    assert not plan.pairwise and plan.width == g.size
    assert any(sorted(p) == [g.size, g.size + 1] for p in m.pairs[g.id].tolist())  # B0 with B1
    merged = _merge(a, b, x, 1.0, data, method="zipit", repair=False)
    # dense M (width x 2d) and U (2d x width) from the plan
    d, width = g.size, plan.width
    M, U = torch.zeros(width, 2 * d, dtype=torch.float64), torch.zeros(2 * d, width, dtype=torch.float64)
    for f in range(width):
        src = [s for s in (plan.src_a[f], plan.src_a2[f]) if s >= 0] + \
              [d + s for s in (plan.src_b[f], plan.src_b2[f]) if s >= 0]
        for s in src:
            M[f, s] = 1.0 / len(src)
            U[s, f] = 1.0
    # the input axis is the frozen network input: row f is the mean of its sources' rows
    w1 = M @ torch.cat([a.net[0].weight, b.net[0].weight]).double()
    assert torch.allclose(merged.get_submodule("net.0").weight.double(), w1, atol=1e-6)
    b1 = M @ torch.cat([a.net[0].bias, b.net[0].bias]).double()
    assert torch.allclose(merged.get_submodule("net.0").bias.double(), b1, atol=1e-6)
    blk = torch.block_diag(a.net[2].weight.double(), b.net[2].weight.double())  # (2 out, 2d)
    w2 = 0.5 * (blk @ U)[:3] + 0.5 * (blk @ U)[3:]  # frozen output axis: averaged
    assert torch.allclose(merged.get_submodule("net.2").weight.double(), w2.detach(), atol=1e-6)
    # budget honoured: the structural count of a ZipIt! plan is at most the footprint
    assert merged.meta["pleas_fx"]["parameters"] <= merged.meta["pleas_fx"]["parameters_one_model"]


def test_zip_plan_partial_budget_merges_only_the_first_pairs():
    pairs = np.array([[0, 3], [1, 2], [4, 5]])  # d = 3: A0-B0, A1-A2, B1-B2
    plan = GroupPlan.from_zip(3, pairs, 2)
    assert plan.width == 4 and plan.merged_pairs == 2
    def sources(f):
        a = [int(s) for s in (plan.src_a[f], plan.src_a2[f]) if s >= 0]
        return tuple(sorted(a + [3 + int(s) for s in (plan.src_b[f], plan.src_b2[f]) if s >= 0]))

    feeds = sorted(sources(f) for f in range(plan.width))
    assert feeds == [(0, 3), (1, 2), (4,), (5,)]
    amap = axis_map((Segment(7, 3),), {7: plan}, set())
    assert not amap.pairwise
    w_m = sum(w for _, w, _ in amap.terms(0)) + sum(w for _, w, _ in amap.terms(1))
    assert np.allclose(w_m, 1.0)  # every merged feature is an average of its sources


# --------------------------------------------------------------------------- separate heads
@nets.hypothesis_settings(10)
@given(cfg=nets.net_configs(only_mergeable=True).filter(lambda c: c.get("classes", c.get("out")) >= 2), seed=seeds,
       method=st.sampled_from(["pleas", "permute", "zipit", "regmean"]))
def test_separate_heads_at_budget_two_return_both_models_outputs(cfg, seed, method):
    a, b = nets.build(cfg, seed).eval(), nets.build(cfg, seed + 1).eval()
    x, data = nets.example_and_data(cfg, seed)
    merged = _merge(a, b, x, 2.0, data, method=method, heads="separate", repair=False)
    out = nets.run(merged, x)
    assert isinstance(out, tuple) and len(out) == 2
    assert relative_error(out[0], nets.run(a, x)) < 1e-4
    assert relative_error(out[1], nets.run(b, x)) < 1e-4
    assert merged.meta["pleas_fx"]["heads"] == "separate"


def test_separate_heads_at_budget_one_share_the_body_and_keep_both_heads():
    a, b = _pair(7, hidden=6)
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(2))
    data = [x[i:i + 16] for i in range(0, 64, 16)]
    merged = _merge(a, b, x[:4], 1.0, data, method="permute", heads="separate", repair=False)
    out_a, out_b = nets.run(merged, x)
    assert out_a.shape == out_b.shape == (64, 3)
    assert merged.get_submodule("net.0").weight.shape == (6, 5)  # body at one model's width
    assert merged.get_submodule("net.2").weight.shape == (6, 6)  # two heads of 3 classes
    # A's head is A's head on the (permuted) merged features: identical when B = permuted A
    _, _, b_perm, _ = nets.permuted_copy(a, x[:4], 3)
    same = _merge(a, b_perm, x[:4], 1.0, data, method="permute", heads="separate", repair=False)
    oa, ob = nets.run(same, x)
    assert relative_error(oa, nets.run(a, x)) < 1e-5 and relative_error(ob, nets.run(a, x)) < 1e-5
    assert merged.meta["pleas_fx"]["extra_head_parameters"] == 6 * 3 + 3


def test_separate_heads_need_a_single_output():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x):
            h = self.fc1(x)
            return self.fc2(h), h

    x = torch.randn(8, 4)
    with pytest.raises(PleasError, match="single tensor"):
        _merge(Two(), Two(), x, 1.0, [x], heads="separate")


# --------------------------------------------------------------------------- REPAIR
def test_repair_resets_batchnorm_statistics_to_the_calibration_data():
    a, b = _pair(11, hidden=7, bn=True)
    x = torch.randn(96, 5, generator=torch.Generator().manual_seed(4))
    data = [x[i:i + 32] for i in range(0, 96, 32)]
    plain = _merge(a, b, x[:4], 1.0, data, method="permute", repair=False)
    fixed = _merge(a, b, x[:4], 1.0, data, method="permute")
    assert fixed.meta["pleas_fx"]["repair"] and not plain.meta["pleas_fx"]["repair"]
    assert torch.equal(plain.get_submodule("net.0").weight, fixed.get_submodule("net.0").weight)  # weights untouched
    with torch.no_grad():
        h = [fixed.get_submodule("net.0")(t) for t in data]  # the BatchNorm's inputs, batch by batch
    mean = torch.cat(h).mean(0)
    var = torch.stack([t.var(0, unbiased=True) for t in h]).mean(0)  # cumulative average of batch variances
    bn = fixed.get_submodule("net.1")
    assert torch.allclose(bn.running_mean, mean, atol=1e-5)
    assert torch.allclose(bn.running_var, var, rtol=1e-4)
    assert (plain.get_submodule("net.1").running_mean - mean).abs().max() > 1e-2  # not already true without repair
    assert not fixed.training


def test_repair_defaults_on_for_baselines_and_off_for_pleas():
    a, b = _pair(1)
    x = torch.randn(32, 5)
    data = [x[:16], x[16:]]
    for method, expected in (("pleas", False), ("average", True), ("regmean", True)):
        assert _merge(a, b, x[:4], 1.0, data, method=method).meta["pleas_fx"]["repair"] is expected
    assert _merge(a, b, x[:4], 1.0, None, method="average").meta["pleas_fx"]["repair"] is False  # no data


# --------------------------------------------------------------------------- bad input
def test_bad_method_options_raise_clear_errors():
    a, b = _pair(1)
    x = torch.randn(8, 5)
    with pytest.raises(PleasError, match="unknown method 'git'"):
        _merge(a, b, x, 1.0, [x], method="git")
    with pytest.raises(PleasError, match="heads"):
        _merge(a, b, x, 1.0, [x], heads="both")
    with pytest.raises(PleasError, match="activation matching by definition"):
        _merge(a, b, x, 1.0, [x], method="permute", matching="weight")
    with pytest.raises(DataError, match="procedural"):
        _merge(a, b, x, 1.0, "imagenet")


# --------------------------------------------------------------------------- procedural data
def test_procedural_images_are_normalised_structured_and_deterministic():
    example = (torch.zeros(2, 3, 16, 16),)
    (x,), = procedural_batches(example, 1, batch_size=24, seed=5)
    assert x.shape == (24, 3, 16, 16) and torch.isfinite(x).all()
    flat = x.reshape(24, 3, -1)
    assert torch.allclose(flat.mean(-1), torch.zeros(24, 3), atol=1e-4)
    assert torch.allclose(flat.std(-1, unbiased=False), torch.ones(24, 3), atol=1e-3)
    # spatially smooth: neighbouring pixels correlate (white noise would give ~0)
    corr = (x[..., 1:] * x[..., :-1]).mean() / (x * x).mean()
    assert corr > 0.5
    (y,), = procedural_batches(example, 1, batch_size=24, seed=5)
    assert torch.equal(x, y)
    (z,), = procedural_batches(example, 1, batch_size=24, seed=6)
    assert not torch.equal(x, z)


def test_pleas_free_with_procedural_or_function_data():
    cfg = {"kind": "cnn", "in_channels": 3, "size": 8, "head": "gap", "classes": 3, "hidden": 4, "blocks": [
        ("conv", {"cout": 5, "k": 3, "stride": 1, "bn": True, "act": "relu"}),
        ("conv", {"cout": 6, "k": 3, "stride": 2, "bn": True, "act": "relu"})]}
    a, b = nets.build(cfg, 0).eval(), nets.build(cfg, 1).eval()
    x = torch.randn(2, 3, 8, 8)
    merged = _merge(a, b, x, [1.2, 2.0], "procedural", max_batches=2)
    assert merged[0].meta["pleas_fx"]["data"] == "procedural"
    assert merged[0].meta["pleas_fx"]["matching"] == "activation"
    assert relative_error(nets.run(merged[1], x), nets.ensemble(a, b, x)) < 1e-4
    calls = []

    def fn(example_args, n, seed):
        calls.append(n)
        return [torch.randn(8, 3, 8, 8) for _ in range(n)]

    merged = _merge(a, b, x, 1.0, fn, max_batches=3)
    assert calls == [3] and merged.meta["pleas_fx"]["data"] == "function"
