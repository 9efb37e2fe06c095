"""Product structures (units x within-unit entries) in CNNs: grouped convolutions (conv groups
are units, each with its own order of input and output entries) and channel shuffles.

Property tests on random networks of grouped bottlenecks (various groups and widths, with
squeeze-excitation gates, depthwise convolutions with a channel multiplier, functional grouped
convolutions) and ShuffleNet-style units: every inferred group (within groups included)
permutes soundly, a self-merge recovers A, budget 2 is the ensemble; and the torchvision
architectures built on them are merged, not frozen.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from hypothesis import given
from hypothesis import strategies as st

import nets
import pleas_fx
from pleas_fx.inspection import describe_groups
from pleas_fx.passes.verify import relative_error


class Grouped(nn.Module):
    """1x1 conv -> BN -> ReLU -> grouped 3x3 conv -> BN -> ReLU [-> SE gate] -> 1x1 conv, residual."""

    def __init__(self, c, groups, per_in, per_out, se, functional, concat=False):
        super().__init__()
        mid, out = groups * per_in, groups * per_out
        self.c1 = nn.Sequential(nn.Conv2d(c, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU())
        # concat: the grouped conv reads two branches' channels, cut at a conv-group boundary
        first = groups // 2 * per_in
        self.c1b = nn.Sequential(nn.Conv2d(c, mid - first, 3, padding=1), nn.ReLU()) if concat else None
        self.first = first
        self.functional, self.groups = functional, groups
        self.c2 = nn.Conv2d(mid, out, 3, padding=1, groups=groups, bias=True)
        self.bn2 = nn.BatchNorm2d(out)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(out, 3, 1), nn.ReLU(), nn.Conv2d(3, out, 1),
                                nn.Sigmoid()) if se else None
        self.c3 = nn.Sequential(nn.Conv2d(out, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        y = self.c1(x)
        if self.c1b is not None:
            y = torch.cat([y[:, :self.first], self.c1b(x)], 1)
        if self.functional:
            y = F.conv2d(y, self.c2.weight, self.c2.bias, 1, 1, 1, self.groups)
        else:
            y = self.c2(y)
        y = F.relu(self.bn2(y))
        if self.se is not None:
            y = y * self.se(y)
        return F.relu(x + self.c3(y))


class ShuffleUnit(nn.Module):
    """ShuffleNet v2 unit: split the channels in two, transform one half (1x1, depthwise 3x3,
    1x1), concatenate, shuffle (view as (g, C/g), transpose, flatten)."""

    def __init__(self, c, g, downsample):
        super().__init__()
        half = c // 2
        self.g, self.downsample = g, downsample
        cin = c if downsample else half
        self.branch = nn.Sequential(nn.Conv2d(cin, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
                                    nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False), nn.BatchNorm2d(half),
                                    nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU())
        self.side = nn.Sequential(nn.Conv2d(c, half, 1), nn.ReLU()) if downsample else None

    def forward(self, x):
        if self.downsample:
            out = torch.cat((self.side(x), self.branch(x)), 1)
        else:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch(x2)), 1)
        b, c, h, w = out.size()
        out = out.view(b, self.g, c // self.g, h, w)
        return torch.transpose(out, 1, 2).contiguous().view(b, -1, h, w)


class ProductNet(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c = cfg["stem"]
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        blocks = []
        for kind, kw in cfg["blocks"]:
            if kind == "grouped":
                blocks.append(Grouped(c, **kw))
            elif kind == "shuffle":
                blocks.append(ShuffleUnit(c, 2, kw["downsample"]))
            elif kind == "multiplier":  # depthwise with a channel multiplier: units of one input entry
                blocks += [nn.Conv2d(c, c * kw["m"], 3, padding=1, groups=c), nn.BatchNorm2d(c * kw["m"]), nn.ReLU(),
                           nn.Conv2d(c * kw["m"], c, 1)]
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, cfg["classes"])

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


@st.composite
def product_configs(draw):
    blocks = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.integers(0, 5))
        if kind == 5:
            blocks.append(("shuffle", {"downsample": draw(st.booleans())}))
        elif kind == 0:
            blocks.append(("multiplier", {"m": draw(st.integers(2, 3))}))
        else:
            blocks.append(("grouped", {"groups": draw(st.integers(2, 4)), "per_in": draw(st.integers(1, 3)),
                                       "per_out": draw(st.integers(1, 3)), "se": draw(st.booleans()),
                                       "functional": draw(st.booleans()), "concat": draw(st.booleans())}))
    stem = draw(st.integers(2, 5))
    if any(k == "shuffle" for k, _ in blocks):
        stem = 2 * draw(st.integers(2, 4))  # halves of whole units, however the shuffles coarsen them
    return {"stem": stem, "blocks": blocks, "classes": draw(st.integers(2, 4))}


def _build(cfg, seed):
    torch.manual_seed(seed)
    return nets.randomize_norms(ProductNet(cfg), seed).eval()


def _data(seed, size=8):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(3, 3, size, size, generator=gen), [torch.randn(4, 3, size, size, generator=gen) for _ in range(2)]


@nets.hypothesis_settings(15)
@given(cfg=product_configs(), seed=st.integers(0, 10_000))
def test_product_groups_are_sound_and_unfrozen(cfg, seed):
    a = _build(cfg, seed)
    x, _ = _data(seed)
    report = describe_groups(a, x, check=True)
    assert report.frozen_hidden_units == 0, report.frozen_by_reason
    assert report.check.max_deviation < 1e-5, report.check
    gm, spec, permuted, perms = nets.permuted_copy(a, x, seed)
    assert any(g.parent is not None and not g.frozen for g in spec.groups.values()) or all(
        (kw.get("per_in", 1) == 1 and kw.get("per_out", 1) == 1) or kw.get("concat")
        for k, kw in cfg["blocks"] if k == "grouped")
    # (a grouped conv fed by a concat cut at conv-group boundaries takes whole conv groups with
    # their entries in a fixed order: no within group there; soundness is checked above and below)
    assert relative_error(nets.run(permuted, x), nets.run(a, x)) < 1e-5


@nets.hypothesis_settings(10)
@given(cfg=product_configs(), seed=st.integers(0, 10_000))
def test_product_self_merge_and_budget_two(cfg, seed):
    a, b = _build(cfg, seed), _build(cfg, seed + 1)
    x, data = _data(seed)
    nets.assert_self_merge_and_budget_two(a, b, x, data, seed)
    partial = pleas_fx.merge(a, b, x, 1.4, data, progress=False)  # whole conv groups kept apart
    r = partial.meta["pleas_fx"]
    assert r["parameters"] <= 1.4 * r["parameters_one_model"] + 1e-6
    assert torch.isfinite(nets.run(partial, x)).all()


@nets.hypothesis_settings(6)
@given(half=st.sampled_from([3, 5, 6, 7]), depth=st.integers(2, 4), seed=st.integers(0, 10_000))
def test_deep_channel_shuffles_are_absorbed_and_budget_two_is_the_ensemble(half, depth, seed):
    """Deep in a ShuffleNet v2 stage the chunks cut what repeated shuffles would make units of 2,
    4, ... channels (a network of twice the width could not then hold both models). The shuffles
    are absorbed into the layers around them (passes/lower_shuffle.py): nothing is frozen, a
    self-merge recovers A and budget 2 is the ensemble; partial merges keep their budget."""
    cfg = {"stem": 2 * half, "classes": 3,
           "blocks": [("shuffle", {"downsample": True})] + [("shuffle", {"downsample": False})] * depth}
    a, b = _build(cfg, seed), _build(cfg, seed + 1)
    x, data = _data(seed)
    report = describe_groups(a, x, check=True)
    assert report.check.max_deviation < 1e-5, report.check
    assert report.frozen_hidden_units == 0, report.frozen_by_reason
    nets.assert_self_merge_and_budget_two(a, b, x, data, seed)
    merged = pleas_fx.merge(a, b, x, 1.4, data, progress=False)
    r = merged.meta["pleas_fx"]
    assert r["parameters"] <= 1.4 * r["parameters_one_model"] + 1e-6
    assert torch.isfinite(nets.run(merged, x)).all()


# --------------------------------------------------------------------------- torchvision
TORCHVISION = ["resnext_small", "regnet_x_400mf", "regnet_y_400mf", "shufflenet_v2_x0_5"]


@functools.lru_cache(maxsize=2)
def _tv(name, seed):
    torch.manual_seed(seed)
    if name == "resnext_small":  # torchvision's ResNeXt blocks, one per stage (CI time)
        from torchvision.models.resnet import Bottleneck, ResNet
        model = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, groups=8, width_per_group=4)
    else:
        model = torchvision.models.get_model(name, weights=None, num_classes=10)
    return nets.randomize_norms(model, seed).eval()


def test_resnext50_is_sound_and_unfrozen():
    report = describe_groups(torchvision.models.resnext50_32x4d(), torch.randn(1, 3, 16, 16), check=True)
    assert report.frozen_hidden_units == 0, report.frozen_by_reason
    assert report.check.passed, report.check


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_product_models_are_merged(name):
    a, b = _tv(name, 0), _tv(name, 1)
    x, data = _data(3, size=16)
    report = describe_groups(a, x, check=True)
    assert report.frozen_hidden_units <= 0.1 * (report.frozen_hidden_units + report.mergeable_units)
    assert report.check.passed, report.check
    gm, _, permuted, _ = nets.permuted_copy(a, x, 1)
    one = pleas_fx.merge(gm, permuted, x, 1.0, data, progress=False, max_ls_dim=1200)
    assert relative_error(nets.run(one, x), nets.run(a, x)) < 1e-4
    if report.frozen_hidden_units == 0:  # frozen units are averaged even at budget 2
        two = pleas_fx.merge(a, b, x, 2.0, data, progress=False, max_ls_dim=1200)
        assert relative_error(nets.run(two, x), nets.ensemble(a, b, x)) < 1e-4


def test_merged_grouped_and_shuffled_models_save_and_load(tmp_path):
    """Widened conv groups (the `groups` attribute grew) and a functional grouped conv's
    rewritten groups argument survive save/load."""
    from pleas_fx.io import load, save

    cfg = {"stem": 8, "classes": 3, "blocks": [
        ("grouped", {"groups": 2, "per_in": 2, "per_out": 3, "se": True, "functional": True, "concat": False}),
        ("shuffle", {"downsample": False}),
        ("grouped", {"groups": 4, "per_in": 1, "per_out": 2, "se": False, "functional": False, "concat": True})]}
    a, b = _build(cfg, 0), _build(cfg, 1)
    x, data = _data(0)
    for m in pleas_fx.merge(a, b, x, [1.5, 2.0], data, progress=False):
        assert m.meta["pleas_fx"]["frozen"] == []
        assert any(mod.groups > 2 for mod in m.modules() if isinstance(mod, nn.Conv2d) and mod.groups > 1)
        loaded = load(save(m, tmp_path / f"m{len(list(tmp_path.iterdir()))}"))
        with torch.no_grad():
            assert torch.equal(loaded(x), m(x))


class PositionBias(nn.Module):
    """A per-head relative position bias looked up from a table by an index buffer (MaxViT, Swin),
    added to per-head scores computed by a linear layer."""

    def __init__(self, c=6, heads=3, n=4):
        super().__init__()
        self.table = nn.Parameter(torch.randn((2 * n - 1), heads))
        idx = torch.arange(n)[:, None] - torch.arange(n)[None, :] + n - 1
        self.register_buffer("index", idx)
        self.scores, self.out, self.n = nn.Linear(c, heads), nn.Linear(heads, 2), n

    def forward(self, x):  # x: (B, n, c)
        bias = self.table[self.index.view(-1)].view(self.n, self.n, -1).mean(1)  # (n, heads)
        return self.out(F.relu(self.scores(x) + bias))


def test_relative_position_table_lookup_keeps_the_heads_axis():
    model = PositionBias().eval()
    x = torch.randn(2, 4, 6)
    report = describe_groups(model, x, check=True)
    assert report.frozen_hidden_units == 0, report.frozen_by_reason
    assert report.check.max_deviation < 1e-12, report.check
    assert any(p.name == "table" and p.axis == 1 for g in report.groups for p in g.params)
