"""Channel shuffles absorbed into the layers around them (passes/lower_shuffle.py): the rewritten
graph computes the same function with no shuffle left, ShuffleNet v2 merges with nothing frozen
and budget 2 is the ensemble (impossible while a shuffle tied its pieces' permutations), and a
shuffle whose output reaches an op the pass does not rewrite is left as it was."""
from __future__ import annotations

import logging
import operator

import pytest
import torch
import torch.nn as nn
import torchvision
from hypothesis import given
from hypothesis import strategies as st

import nets
import pleas_fx
from pleas_fx.inspection import describe_groups
from pleas_fx.passes.trace import propagate_shapes, trace_model
from pleas_fx.passes.verify import relative_error


def shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.size()
    return torch.transpose(x.view(b, groups, c // groups, h, w), 1, 2).contiguous().view(b, -1, h, w)


def branch(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1, groups=cout), nn.BatchNorm2d(cout),
                         nn.Conv2d(cout, cout, 1), nn.ReLU())


class Unit(nn.Module):
    """`pieces` branches (the first may be the identity on a split of the input) concatenated and
    shuffled with `groups` (ShuffleNet v2: 2 pieces, split, groups 2; v1-like: 3 branches, groups 3)."""

    def __init__(self, c: int, pieces: int, split: bool, groups: int):
        super().__init__()
        self.pieces, self.split, self.groups = pieces, split, groups
        cin = c // pieces if split else c
        self.branches = nn.ModuleList(branch(cin, c // pieces) for _ in range(pieces - split))

    def forward(self, x):
        if self.split:
            parts = x.chunk(self.pieces, dim=1)
            out = torch.cat([parts[0]] + [f(parts[i + 1]) for i, f in enumerate(self.branches)], 1)
        else:
            out = torch.cat([f(x) for f in self.branches], 1)
        return shuffle(out, self.groups)


class Net(nn.Module):
    def __init__(self, cfg: dict, residual_tail: bool = False):
        super().__init__()
        c = cfg["channels"]
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.units = nn.Sequential(*[Unit(c, *u) for u in cfg["units"]])
        self.residual_tail = residual_tail
        self.head = nn.Conv2d(c, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        y = self.units(x)
        if self.residual_tail:  # a shuffled value read by an add: not rewritten
            y = y + x
        return self.fc(self.head(y).mean((2, 3)))


@st.composite
def configs(draw):
    pieces = draw(st.sampled_from([2, 3]))
    c = pieces * draw(st.integers(2, 5)) * (2 if pieces == 2 else 1)
    units = []
    for _ in range(draw(st.integers(1, 4))):
        groups = draw(st.sampled_from([g for g in (2, 3, 4, pieces) if c % g == 0]))
        units.append((pieces, draw(st.booleans()), groups))
    return {"channels": c, "units": units}


def build(cfg: dict, seed: int, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return nets.randomize_norms(Net(cfg, **kw), seed).eval()


def data(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(3, 3, 8, 8, generator=gen), [torch.randn(4, 3, 8, 8, generator=gen) for _ in range(2)]


def traced(model: nn.Module, x: torch.Tensor):
    gm = trace_model(model, "model")
    propagate_shapes(gm, (x,))
    return gm


@nets.hypothesis_settings(20)
@given(cfg=configs(), seed=st.integers(0, 10_000))
def test_absorbed_graph_computes_the_same_function_without_shuffles(cfg, seed):
    model = build(cfg, seed)
    x, _ = data(seed)
    before = nets.snapshot(model)
    gm = traced(model, x)
    assert not any(n.target is torch.transpose for n in gm.graph.nodes)
    assert relative_error(gm(x), model(x)) < 1e-5
    nets.assert_same_snapshot(before, nets.snapshot(model))  # the permuted weights are the copy's


@nets.hypothesis_settings(10)
@given(cfg=configs(), seed=st.integers(0, 10_000))
def test_shuffled_nets_merge_with_nothing_frozen(cfg, seed):
    a, b = build(cfg, seed), build(cfg, seed + 1)
    x, batches = data(seed)
    report = describe_groups(a, x, check=True)
    assert report.frozen_hidden_units == 0, report.frozen_by_reason
    assert report.check.max_deviation < 1e-5, report.check
    nets.assert_self_merge_and_budget_two(a, b, x, batches, seed)
    partial = pleas_fx.merge(a, b, x, 1.4, batches, progress=False)
    r = partial.meta["pleas_fx"]
    assert r["parameters"] <= 1.4 * r["parameters_one_model"] + 1e-6


def test_a_shuffle_read_by_another_op_is_left_as_it_was():
    cfg = {"channels": 8, "units": [(2, True, 2), (2, True, 2)]}
    a, b = build(cfg, 0, residual_tail=True), build(cfg, 1, residual_tail=True)
    x, batches = data(0)
    gm = traced(a, x)
    assert sum(n.target is torch.transpose for n in gm.graph.nodes) == 2
    assert relative_error(gm(x), a(x)) < 1e-6
    merged = pleas_fx.merge(a, b, x, 1.0, batches, progress=False)  # the shuffle's units, as before
    assert torch.isfinite(nets.run(merged, x)).all()


def test_chunks_of_permuted_values_become_splits_and_concats():
    """Deep in a ShuffleNet v2 stage every chunk reads a permuted value: each half is the runs
    of its channels, one split of the value they were computed in and a concat."""
    cfg = {"channels": 12, "units": [(2, False, 2)] + [(2, True, 2)] * 3}
    gm = traced(build(cfg, 0), data(0)[0])
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.split in ops and torch.cat in ops
    assert not any(n.op == "call_method" and n.target == "chunk" for n in gm.graph.nodes)
    assert all(isinstance(n.args[1], int) for n in gm.graph.nodes if n.target is operator.getitem)


def test_shufflenet_v2_is_merged_with_nothing_frozen_and_budget_two_is_the_ensemble():
    def make(seed):
        torch.manual_seed(seed)
        return nets.randomize_norms(torchvision.models.shufflenet_v2_x0_5(num_classes=10), seed).eval()

    a, b = make(0), make(1)
    before = nets.snapshot(a)
    gen = torch.Generator().manual_seed(3)
    x, batches = torch.randn(3, 3, 32, 32, generator=gen), [torch.randn(4, 3, 32, 32, generator=gen) for _ in range(2)]
    report = describe_groups(a, x, check=True)
    assert report.frozen_hidden_units == 0, report.frozen_by_reason
    assert report.check.passed, report.check
    two = pleas_fx.merge(a, b, x, 2.0, batches, progress=False, max_ls_dim=1200)
    assert relative_error(nets.run(two, x), nets.ensemble(a, b, x)) < 1e-4
    nets.assert_same_snapshot(before, nets.snapshot(a))


def test_a_model_merges_with_a_graph_whose_shuffles_are_absorbed_already():
    """model_b a GraphModule from pleas_fx (a merged model, or a permuted copy of the traced A),
    model_a the original with its shuffles: the shuffles are absorbed before the architectures are
    compared, so they match; a model of another architecture is still refused."""
    cfg = {"channels": 8, "units": [(2, False, 2), (2, True, 2)]}
    a = build(cfg, 0)
    x, batches = data(0)
    gm, _, permuted, _ = nets.permuted_copy(a, x, 1)
    merged = pleas_fx.merge(a, permuted, x, 1.0, batches, progress=False)
    assert relative_error(nets.run(merged, x), a(x)) < 1e-4
    other = build({"channels": 8, "units": [(2, False, 2)]}, 0)
    with pytest.raises(pleas_fx.ArchitectureMismatchError):
        pleas_fx.merge(other, permuted, x, 1.0, batches, progress=False)


class Shuffle1d(nn.Module):
    """A 1-d ShuffleNet v2 unit (Conv1d, BatchNorm1d, max pooling after the shuffle)."""

    def __init__(self, c: int):
        super().__init__()
        h = c // 2
        self.stem = nn.Conv1d(2, c, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv1d(h, h, 1), nn.BatchNorm1d(h), nn.ReLU(),
                                    nn.Conv1d(h, h, 3, padding=1, groups=h), nn.BatchNorm1d(h), nn.Conv1d(h, h, 1))
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x1, x2 = self.stem(x).chunk(2, dim=1)
        y = torch.cat((x1, self.branch(x2)), 1)
        b, c, n = y.size()
        y = y.view(b, 2, c // 2, n).transpose(1, 2).reshape(b, c, n)
        return self.head(torch.relu(nn.functional.max_pool1d(y, 2)).amax(2))


def test_one_dimensional_shuffles_are_absorbed_down_to_the_linear_head():
    def make(seed):
        torch.manual_seed(seed)
        return nets.randomize_norms(Shuffle1d(8), seed).eval()

    a, b = make(0), make(1)
    gen = torch.Generator().manual_seed(0)
    x, batches = torch.randn(3, 2, 12, generator=gen), [torch.randn(4, 2, 12, generator=gen) for _ in range(2)]
    gm = traced(a, x)
    assert not any(n.target in (torch.transpose, "transpose") for n in gm.graph.nodes)
    assert relative_error(gm(x), a(x)) < 1e-6
    nets.assert_self_merge_and_budget_two(a, b, x, batches, 0)


class PermuteShuffle(nn.Module):
    """The shuffle written with reshape, permute and flatten."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        y = torch.cat((self.a(x), torch.relu(self.b(x))), 1)
        b, c, h, w = y.shape
        y = y.reshape(b, 2, c // 2, h, w).permute(0, 2, 1, 3, 4).flatten(1, 2)
        return self.head(y * 0.5).mean((2, 3))  # (scalar arithmetic keeps the permutation)


def test_a_shuffle_written_with_permute_is_absorbed():
    torch.manual_seed(0)
    a, b = PermuteShuffle().eval(), PermuteShuffle().eval()
    x, batches = data(0)
    gm = traced(a, x)
    assert not any(n.op == "call_method" and n.target == "permute" for n in gm.graph.nodes)
    assert relative_error(gm(x), a(x)) < 1e-6
    nets.assert_self_merge_and_budget_two(a, b, x, batches, 0)


class TiedAfterShuffle(PermuteShuffle):
    """The convolution after the shuffle shares its weight with another one: permuting it would
    change the other, so the shuffle is left as it was."""

    def __init__(self):
        super().__init__()
        self.twin = nn.Conv2d(8, 5, 1)
        self.twin.weight = self.head.weight

    def forward(self, x):
        return super().forward(x) + self.twin(torch.cat((self.a(x), self.b(x)), 1)).mean((2, 3))


def traced_as_it_was(model_class, caplog):
    """(model, example input, traced graph) of a model whose shuffle the pass must leave alone:
    left up front (no warning: not caught by the check on the copy), the same function."""
    torch.manual_seed(0)
    model = model_class().eval()
    x, _ = data(0)
    with caplog.at_level(logging.WARNING, logger="pleas_fx"):
        gm = traced(model, x)
    assert not caplog.records
    assert relative_error(gm(x), model(x)) < 1e-6
    return model, x, gm


def test_a_layer_whose_weight_is_tied_elsewhere_does_not_absorb(caplog):
    _, _, gm = traced_as_it_was(TiedAfterShuffle, caplog)
    assert any(n.op == "call_method" and n.target == "permute" for n in gm.graph.nodes)


class ElementwiseAfterShuffle(nn.Module):
    """After the shuffle: an ELU module, `1 - y`, a clamp and a cast, each channel by channel
    (passes/ops/elementwise.py's ops), then a convolution that absorbs the permutation."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.act = nn.ELU()
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        y = shuffle(torch.cat((self.a(x), self.b(x)), 1), 2)
        y = (1 - self.act(y)).clamp(min=-2.0).float()
        return self.head(y).mean((2, 3))


def test_elementwise_ops_after_a_shuffle_keep_its_permutation():
    torch.manual_seed(0)
    a, b = ElementwiseAfterShuffle().eval(), ElementwiseAfterShuffle().eval()
    x, batches = data(0)
    gm = traced(a, x)
    assert not any(n.target in (torch.transpose, "transpose") for n in gm.graph.nodes)
    assert relative_error(gm(x), a(x)) < 1e-6
    assert describe_groups(a, x).frozen_hidden_units == 0
    nets.assert_self_merge_and_budget_two(a, b, x, batches, 0)


class InPlaceAfterShuffle(nn.Module):
    """An in-place ReLU on the shuffled value, whose unshuffled input is also read by an add: in
    the absorbed graph the ReLU would write that input, so it is not rewritten there."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
        self.relu = nn.ReLU(inplace=True)
        self.head, self.side = nn.Conv2d(8, 5, 1), nn.Conv2d(8, 5, 1)

    def forward(self, x):
        z = torch.cat((self.a(x), self.b(x)), 1)
        y = self.relu(shuffle(z, 2))
        return (self.head(y) + self.side(z)).mean((2, 3))


def test_an_in_place_op_on_a_shuffle_does_not_write_its_unshuffled_input(caplog):
    _, _, gm = traced_as_it_was(InPlaceAfterShuffle, caplog)
    assert any(n.target is torch.transpose for n in gm.graph.nodes)
