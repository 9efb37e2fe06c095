"""Width allocation (passes/allocate.py, passes/allocate_highs.py): the footprint model, the
HiGHS grid MIP with greedy completion, budgets honoured, and merge()'s allocation options."""
from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pleas_fx
from pleas_fx.errors import BudgetError, PleasError
from pleas_fx.core.ir import Group, GroupPlan, GroupSpec, Segment
from pleas_fx.passes.allocate import allocate_widths, cost_losses, greedy_fill, grid_fractions, uniform_widths
from pleas_fx.passes.footprint import Footprint, measure_macs
from pleas_fx.passes.allocate_highs import grid_levels, solve_grid_mip
from pleas_fx.passes.infer_groups import infer_groups
from pleas_fx.passes.trace import propagate_shapes, trace_model
from pleas_fx.passes.verify import structural_parameters

torch.set_num_threads(1)
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


# --------------------------------------------------------------------------- helpers
def _spec_of(model: nn.Module, example: torch.Tensor):
    gm = trace_model(model, "model")
    propagate_shapes(gm, (example,))
    spec = infer_groups(gm)
    return gm, spec, [n for n, _ in gm.named_parameters()]


def _random_costs(spec: GroupSpec, seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {g.id: rng.gamma(2.0, 1.0, g.size) * rng.uniform(0.2, 3.0) for g in spec.mergeable()}


def _objective(losses, fp: Footprint, widths) -> float:
    u = fp.unmerged(widths)
    return float(sum(losses[g][u[g]] for g in u))


class RandomNet(nn.Module):
    """A small CNN from a list of blocks: plain conv, residual block, two-branch concat,
    strided conv; then global pooling, an optional hidden Linear, and a head."""

    def __init__(self, blocks, hidden: int, classes: int = 5):
        super().__init__()
        self.kinds = [k for k, _ in blocks]
        self.blocks = nn.ModuleList()
        ch = 3
        for kind, w in blocks:
            if kind == "res":
                self.blocks.append(nn.ModuleList([nn.Conv2d(ch, w, 3, padding=1, bias=False), nn.BatchNorm2d(w),
                                                  nn.Conv2d(w, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch)]))
            elif kind == "cat":
                self.blocks.append(nn.ModuleList([nn.Conv2d(ch, w, 1), nn.Conv2d(ch, w + 1, 3, padding=1)]))
                ch = 2 * w + 1
            else:
                stride = 2 if kind == "down" else 1
                self.blocks.append(nn.ModuleList([nn.Conv2d(ch, w, 3, stride=stride, padding=1, bias=False),
                                                  nn.BatchNorm2d(w)]))
                ch = w
        self.hidden = nn.Linear(ch, hidden) if hidden else None
        self.head = nn.Linear(hidden or ch, classes)

    def forward(self, x):
        for kind, mods in zip(self.kinds, self.blocks):
            if kind == "res":
                y = torch.relu(mods[1](mods[0](x)))
                x = torch.relu(x + mods[3](mods[2](y)))
            elif kind == "cat":
                x = torch.relu(torch.cat([mods[0](x), mods[1](x)], dim=1))
            else:
                x = torch.relu(mods[1](mods[0](x)))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        if self.hidden is not None:
            x = torch.relu(self.hidden(x))
        return self.head(x)


BLOCK = st.tuples(st.sampled_from(["conv", "res", "cat", "down"]), st.integers(2, 7))
NETS = st.tuples(st.lists(BLOCK, min_size=1, max_size=4), st.sampled_from([0, 4, 6]))


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter and norm statistic random and non-zero (so structural zeros are the only zeros)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + 0.05)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model.eval()


# synthetic specs: arbitrary layouts, concat segments, a group on two axes, 3-grouped-axis tensors
@st.composite
def synthetic_specs(draw):
    n = draw(st.integers(1, 4))
    sizes = draw(st.lists(st.integers(1, 6), min_size=n, max_size=n))
    groups = {i: Group(i, s) for i, s in enumerate(sizes)}
    groups[n] = Group(n, draw(st.integers(1, 4)), frozen=True)
    layouts = {}
    for t in range(draw(st.integers(1, 5))):
        axes = []
        for _ in range(draw(st.integers(1, 3))):
            segs = tuple(Segment(gid, groups[gid].size, draw(st.integers(1, 2)), draw(st.integers(1, 2)))
                         for gid in draw(st.lists(st.integers(0, n), min_size=1, max_size=3)))
            axes.append(segs)
        layouts[f"p{t}"] = axes
    spec = GroupSpec(groups, layouts, {k: ["out"] * len(v) for k, v in layouts.items()}, {}, [])
    return spec, list(layouts)


# --------------------------------------------------------------------------- footprint model
@settings(max_examples=60, **SETTINGS)
@given(synthetic_specs(), st.integers(0, 2**31 - 1))
def test_polynomial_equals_exact_count_or_bounds_it(spec_names, seed):
    spec, names = spec_names
    fp = Footprint(spec, names)
    poly = fp.polynomial()
    rng = np.random.default_rng(seed)
    for _ in range(5):
        u = {g: int(rng.integers(0, d + 1)) for g, d in fp.sizes.items()}
        exact = fp.count_unmerged(u)
        if poly.exact:
            assert poly(u) == exact
        else:
            assert poly(u) >= exact
    # the structural count from expanded plans agrees with the footprint model
    u = {g: int(rng.integers(0, d + 1)) for g, d in fp.sizes.items()}
    plans = {g: GroupPlan.from_matching(np.arange(d), rng.random(d), d - u[g]) for g, d in fp.sizes.items()}
    assert structural_parameters(spec, plans, names) == fp.count_unmerged(u)


def test_polynomial_bound_used_for_three_grouped_axes():
    groups = {0: Group(0, 3), 1: Group(1, 2), 2: Group(2, 4)}
    layouts = {"w": [(Segment(0, 3),), (Segment(1, 2),), (Segment(2, 4),)]}
    spec = GroupSpec(groups, layouts, {"w": ["out"] * 3}, {}, [])
    fp = Footprint(spec, ["w"])
    poly = fp.polynomial()
    assert not poly.exact
    for u in itertools.product(range(4), range(3), range(5)):
        uu = dict(zip((0, 1, 2), u))
        assert poly(uu) >= fp.count_unmerged(uu)
    assert poly({0: 0, 1: 0, 2: 0}) == fp.base == 24 and fp.count({0: 6, 1: 4, 2: 8}) == 48


@pytest.mark.parametrize("blocks,hidden", [
    ([("conv", 4), ("res", 3), ("down", 5)], 6),
    ([("cat", 3), ("conv", 4), ("res", 2)], 0),
    ([("down", 3), ("cat", 2), ("res", 4)], 4),
])
def test_footprint_matches_emitted_graphmodule(blocks, hidden):
    """Parameters: non-zero entries of the merged module (random non-zero source weights, no
    bias in front of a BatchNorm, which the fill folds away); MACs: measured on the merged module."""
    torch.manual_seed(0)
    a = _randomise(RandomNet(blocks, hidden), 1)
    b = _randomise(RandomNet(blocks, hidden), 2)
    x = torch.randn(24, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    data = [x[:12], x[12:]]
    example = x[:2]
    gm, spec, names = _spec_of(a, example)
    fp, macs = Footprint(spec, names), Footprint.flops(gm, spec, names)
    for metric in ("params", "flops"):
        merged = pleas_fx.merge(a, b, example, [1.0, 1.13, 1.37, 1.71, 2.0], data=data, progress=False,
                                budget_metric=metric)
        for m in merged:
            rep = m.meta["pleas_fx"]["allocation"]
            widths = {int(g): w for g, w in rep["widths"].items()}
            nonzero = sum(int(torch.count_nonzero(p)) for p in m.parameters())
            assert nonzero == fp.count(widths) == m.meta["pleas_fx"]["parameters"]
            assert measure_macs(m, (example,)) == macs.count(widths)
            assert rep["footprint"] == (fp if metric == "params" else macs).count(widths)
            assert rep["achieved_budget"] <= rep["requested_budget"] + 1e-12


def test_mac_weights_agree_with_torch_flop_counter():
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode

    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    gm, spec, names = _spec_of(model, x)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        gm(x)
    macs = Footprint.flops(gm, spec, names)
    assert macs.base == counter.get_total_flops() // 2 == measure_macs(gm, (x,), structural=False)


# --------------------------------------------------------------------------- the solver
@settings(max_examples=25, **SETTINGS)
@given(synthetic_specs(), st.floats(1.0, 2.0), st.integers(0, 1000))
def test_mip_is_optimal_on_the_grid(spec_names, budget, seed):
    """Brute force over every grid point: the linearised MIP finds the best feasible one."""
    spec, names = spec_names
    fp = Footprint(spec, names)
    losses = cost_losses(spec, _random_costs(spec, seed))
    fracs = grid_fractions(3)
    limit = budget * fp.base
    sol = solve_grid_mip(fp, losses, limit, fracs, time_limit=10, mip_rel_gap=0.0)
    levels = {g: grid_levels(d, fracs) for g, d in fp.sizes.items()}
    best = min(
        sum(losses[g][v] for g, v in zip(levels, point))
        for point in itertools.product(*levels.values())
        if fp.polynomial()(dict(zip(levels, point))) <= limit * (1 + 1e-12)
    )
    assert sol.u is not None
    assert sum(losses[g][sol.u[g]] for g in sol.u) == pytest.approx(best, rel=1e-6, abs=1e-9)
    if fp.polynomial().exact:
        assert fp.count_unmerged(sol.u) <= limit * (1 + 1e-9)


@settings(max_examples=40, **SETTINGS)
@given(synthetic_specs(), st.floats(1.0, 2.0), st.integers(0, 1000))
def test_budget_honoured_on_synthetic_specs(spec_names, budget, seed):
    spec, names = spec_names
    fp = Footprint(spec, names)
    losses = cost_losses(spec, _random_costs(spec, seed))
    widths, _ = allocate_widths(spec, fp, losses, budget, width_grid=4, time_limit=5)
    assert fp.count(widths) <= budget * fp.base
    assert all(d <= widths[g] <= 2 * d for g, d in fp.sizes.items())


@settings(max_examples=30, **SETTINGS)
@given(NETS, st.floats(1.0, 2.0), st.integers(0, 1000), st.sampled_from(["params", "flops"]))
def test_budget_honoured_on_random_networks(net, budget, seed, metric):
    blocks, hidden = net
    x = torch.randn(2, 3, 8, 8)
    gm, spec, names = _spec_of(RandomNet(blocks, hidden), x)
    fp = Footprint(spec, names) if metric == "params" else Footprint.flops(gm, spec, names)
    losses = cost_losses(spec, _random_costs(spec, seed))
    widths, info = allocate_widths(spec, fp, losses, budget, time_limit=5)
    u = fp.unmerged(widths)
    limit = budget * fp.base
    assert fp.count(widths) <= limit
    assert all(0 <= u[g] <= d for g, d in fp.sizes.items())
    # the greedy completion leaves no single unit with a positive gain that would still fit
    for g, d in fp.sizes.items():
        if u[g] < d and losses[g][u[g] + 1] < losses[g][u[g]]:
            assert fp.count_unmerged({**u, g: u[g] + 1}) > limit
    # at least as good on the proxy as the uniform allocation rounded onto the grid
    start = fp.unmerged(uniform_widths(spec, fp, budget))
    levels = {g: grid_levels(d, grid_fractions(8)) for g, d in fp.sizes.items()}
    snapped = {g: max(v for v in levels[g] if v <= start[g]) for g in fp.sizes}
    assert info["objective"] <= sum(losses[g][snapped[g]] for g in snapped) + 1e-9


@functools.lru_cache(maxsize=None)
def _torchvision_spec(name: str):
    import torchvision

    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    return _spec_of(model, torch.randn(1, 3, 32, 32))


def _check_torchvision_budget(name, budget, seed, metric="params"):
    gm, spec, names = _torchvision_spec(name)
    fp = Footprint(spec, names) if metric == "params" else Footprint.flops(gm, spec, names)
    losses = cost_losses(spec, _random_costs(spec, seed))
    widths, _ = allocate_widths(spec, fp, losses, budget, time_limit=2)
    assert fp.count(widths) <= budget * fp.base
    assert fp.count(widths) >= (budget - 0.02) * fp.base  # the budget is (nearly) spent


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5"])
@settings(max_examples=4, **SETTINGS)
@given(budget=st.floats(1.0, 2.0), seed=st.integers(0, 1000), metric=st.sampled_from(["params", "flops"]))
def test_budget_honoured_on_torchvision_models(name, budget, seed, metric):
    _check_torchvision_budget(name, budget, seed, metric)


@settings(max_examples=2, **SETTINGS)
@given(budget=st.floats(1.0, 2.0), seed=st.integers(0, 1000))
def test_budget_honoured_on_densenet_concat_segments(budget, seed):
    """densenet121: every dense-block conv reads a concat of up to 25 groups (~640 group pairs)."""
    _check_torchvision_budget("densenet121", budget, seed)


def test_budget_one_and_two_are_merged_and_separate():
    gm, spec, names = _torchvision_spec("resnet18")
    fp = Footprint(spec, names)
    losses = cost_losses(spec, _random_costs(spec, 0))
    assert allocate_widths(spec, fp, losses, 1.0)[0] == {g: d for g, d in fp.sizes.items()}
    assert allocate_widths(spec, fp, losses, 2.0)[0] == {g: 2 * d for g, d in fp.sizes.items()}


def test_infeasible_budget_raises_clear_error():
    gm, spec, names = _torchvision_spec("resnet18")
    fp = Footprint(spec, names)
    losses = cost_losses(spec, _random_costs(spec, 0))
    with pytest.raises(BudgetError, match="cannot be met.*frozen groups"):
        allocate_widths(spec, fp, losses, 0.9)


def test_cost_proxy_keeps_expensive_pairs_apart():
    groups = {0: Group(0, 4)}
    spec = GroupSpec(groups, {"w": [(Segment(0, 4),)]}, {"w": ["out"]}, {}, [])
    losses = cost_losses(spec, {0: np.array([3.0, 0.0, 1.0, 2.0])})
    assert losses[0].tolist() == [1.5, 0.75, 0.25, 0.0, 0.0]  # merge the 4 - u cheapest, / d


# --------------------------------------------------------------------------- merge() options
def _pair_and_data():
    torch.manual_seed(0)
    blocks = [("conv", 4), ("res", 3), ("down", 5)]
    a, b = _randomise(RandomNet(blocks, 6), 1), _randomise(RandomNet(blocks, 6), 2)
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    return a, b, x


def test_merge_budget_two_is_the_ensemble_with_highs():
    a, b, x = _pair_and_data()
    m1, m2 = pleas_fx.merge(a, b, x[:2], [1.0, 2.0], data=[x[:16], x[16:]], progress=False)
    rep1, rep2 = m1.meta["pleas_fx"]["allocation"], m2.meta["pleas_fx"]["allocation"]
    assert rep1["method"] == "highs"
    assert all(w == rep1["sizes"][g] for g, w in rep1["widths"].items())
    assert all(w == 2 * rep2["sizes"][g] for g, w in rep2["widths"].items())
    with torch.no_grad():
        expected = 0.5 * (a(x) + b(x))
        assert torch.allclose(m2(x), expected, atol=1e-4, rtol=1e-4)


def test_merge_report_and_uniform_option():
    a, b, x = _pair_and_data()
    data = [x[:16], x[16:]]
    hi = pleas_fx.merge(a, b, x[:2], 1.3, data=data, progress=False)
    un = pleas_fx.merge(a, b, x[:2], 1.3, data=data, progress=False, allocation="uniform")
    for m in (hi, un):
        rep = m.meta["pleas_fx"]
        alloc = rep["allocation"]
        assert {g["id"] for g in rep["groups"]} == set(alloc["widths"])
        assert all(g["width"] == alloc["widths"][g["id"]] for g in rep["groups"])
        assert alloc["achieved_budget"] == rep["achieved_budget"] <= 1.3
    gm, spec, names = _spec_of(a, x[:2])
    fp = Footprint(spec, names)
    assert un.meta["pleas_fx"]["allocation"]["widths"] == uniform_widths(spec, fp, 1.3)
    assert hi.meta["pleas_fx"]["allocation"]["mip_status"] == "Optimal"


def test_merge_loo_proxy_calls_evaluate():
    a, b, x = _pair_and_data()
    calls = []

    def evaluate(model):
        calls.append(model)
        with torch.no_grad():
            return -float((model(x) - 0.5 * (a(x) + b(x))).pow(2).mean())

    merged = pleas_fx.merge(a, b, x[:2], [1.2, 1.5], data=[x[:16], x[16:]], progress=False,
                            proxy="loo", evaluate=evaluate)
    n_groups = len(merged[0].meta["pleas_fx"]["groups"])
    assert len(calls) == n_groups + 1  # fully merged + one per group, shared by both budgets
    for m in merged:
        rep = m.meta["pleas_fx"]["allocation"]
        assert rep["proxy"] == "loo" and len(rep["loo"]["betas"]) == n_groups
        assert rep["achieved_budget"] <= rep["requested_budget"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(allocation="greedy"), "allocation must be"),
    (dict(budget_metric="latency"), "budget_metric must be"),
    (dict(proxy="loo"), "needs evaluate"),
    (dict(proxy="accuracy"), "proxy must be"),
    (dict(width_grid=0), "width_grid"),
    (dict(width_grid=[0.5, 1.5]), "width_grid"),
    (dict(allocation_time_limit=0), "allocation_time_limit"),
])
def test_merge_rejects_bad_allocation_options_before_any_work(kwargs, match):
    class Untraceable(nn.Module):  # tracing would fail: the options must be checked first
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(PleasError, match=match):
        pleas_fx.merge(Untraceable(), Untraceable(), torch.randn(2, 3), 1.2, **kwargs)
