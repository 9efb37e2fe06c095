"""One-unit feature groups (a single channel, hidden unit or head): told apart from size-1 axes
that only broadcast, so they merge like any group, or, where they cannot widen, are frozen with
a reason the merge reports (a "size-1" freeze is structural: not counted, never reported).
Invariants 1-3 of DESIGN.md on the nets that once got this wrong (fuzz seeds 8129, 9644)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nets
from pleas_fx.passes.verify import permute_model, random_permutations, relative_error

_merge, _spec = nets.quiet_merge, nets.traced_spec


class Masked(nn.Module):
    """Channel masks computed feature by feature: a leaky ReLU written with torch.where and a
    comparison, an inverted mask, a logical and, masked_fill."""

    def __init__(self, cout=5):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, cout, 3, padding=1), nn.Conv2d(cout, 4, 1)
        self.bn = nn.BatchNorm2d(cout)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.bn(self.conv1(x))
        y = torch.where(y > 0, y, 0.1 * y)
        small = ~(y.abs() >= 0.5)
        y = y.masked_fill(torch.logical_and(small, y.lt(0)), 0.0)
        return self.fc(F.relu(self.conv2(y)).mean((2, 3)))


@pytest.mark.parametrize("cout", [5, 1])
def test_comparisons_and_logic_are_elementwise(cout):
    """Masks from comparisons (>, >=, lt, ~, logical_and) keep the features' permutation: nothing
    is frozen (one output channel included), the groups are sound, self-merge recovers the model
    and budget 2 is the ensemble."""
    a, b = (nets.randomize_norms(Masked(cout), s).eval() for s in (0, 1))
    torch.manual_seed(1)
    b.load_state_dict({k: v + 0.3 * torch.randn_like(v) if v.is_floating_point() and "running" not in k else v
                       for k, v in b.state_dict().items()})
    x, data = torch.randn(2, 3, 6, 6), nets.batches((3, 6, 6), 2, seed=3)
    gm, spec = _spec(a, x)
    assert spec.frozen_reasons == []
    assert any(g.size == cout for g in spec.mergeable())
    permuted = permute_model(gm, spec, random_permutations(spec, 5))
    assert relative_error(nets.run(permuted, x), nets.run(a, x)) < 1e-5
    nets.assert_self_merge_and_budget_two(a, b, x, data, seed=4)


class ThinMatrix(nn.Module):
    """A hidden layer of `hidden` units read by a product with a weight M of shape (hidden, cols),
    a buffer or a parameter: x @ M, torch.mm or einsum. M's size-1 axes are feature axes, not
    broadcasts (fuzz seed 9644: x @ M with M of shape (1, 1))."""

    def __init__(self, hidden: int, cols: int, form: str, buffer: bool = False):
        super().__init__()
        self.form = form
        self.fc1, self.fc2 = nn.Linear(5, hidden), nn.Linear(cols, 3)
        m = torch.randn(hidden, cols) + 1.0
        if buffer:
            self.register_buffer("m", m)
        else:
            self.m = nn.Parameter(m)

    def forward(self, x):
        h = F.gelu(self.fc1(x))
        if self.form == "einsum":
            return self.fc2(torch.einsum("bi,ij->bj", h, self.m))
        if self.form == "linear_t":  # the weight transposed in the graph
            return self.fc2(F.linear(h, self.m.T))
        if self.form == "linear":  # F.linear with M as (out, in): M of shape (cols, hidden)
            return self.fc2(F.linear(h, self.m.reshape(self.m.shape[1], self.m.shape[0])))
        return self.fc2(torch.mm(h, self.m) if self.form == "mm" else h @ self.m)


@pytest.mark.parametrize("hidden,cols,form,buffer", [(1, 1, "matmul", True), (1, 4, "matmul", False),
                                                     (3, 1, "matmul", False), (1, 1, "einsum", False),
                                                     (3, 1, "einsum", False), (1, 4, "mm", False),
                                                     (3, 1, "linear_t", False), (1, 4, "linear_t", False),
                                                     (3, 1, "linear", True), (3, 1, "linear_t", True), (3, 4, "linear_t", True)])
def test_a_weight_of_one_row_or_column_is_a_layer(hidden, cols, form, buffer):
    """x @ M, torch.mm, einsum or F.linear (M transposed or viewed in the graph included) with a
    weight of one row or column: the one-unit hidden groups are
    live (not frozen as broadcast "size-1" axes, which no report counts), the groups are sound,
    a self-merge recovers the model and budget 2 is the ensemble."""
    a, b = (nets.randomize_norms(ThinMatrix(hidden, cols, form, buffer), s).eval() for s in (0, 1))
    torch.manual_seed(1)
    b.load_state_dict({k: v + 0.3 * torch.randn_like(v) for k, v in b.state_dict().items()})
    x, data = torch.randn(4, 5), nets.batches((5,), 2, seed=3)
    gm, spec = _spec(a, x)
    for name, axis in (("fc1.weight", 0), ("fc2.weight", 1)):  # the hidden units and the product's columns
        group = spec.groups[spec.param_layouts[name][axis][0].group]
        assert not group.frozen, (name, group.reasons)
    assert spec.frozen_reasons == []
    permuted = permute_model(gm, spec, random_permutations(spec, 5))
    assert relative_error(nets.run(permuted, x), nets.run(a, x)) < 1e-5
    nets.assert_self_merge_and_budget_two(a, b, x, data, seed=4)


def test_a_weight_whose_one_entry_axis_is_made_in_the_graph_is_frozen_and_reported():
    """F.linear with a (k, 1) parameter reshaped to (1, k): the weight's one output is an axis
    the reshape makes, which cannot widen; the output unit is frozen with a reason the merge
    reports (it was taken for a broadcast, averaged at budget 2 without a word)."""
    a, b = (ThinMatrix(3, 1, "linear").eval() for _ in range(2))
    x, data = torch.randn(4, 5), nets.batches((5,), 2, seed=3)
    gm, spec = _spec(a, x)
    made = spec.groups[spec.param_layouts["fc2.weight"][1][0].group]
    assert made.frozen and "reshape" in [r.kind for r in made.reasons], made.reasons
    assert not spec.groups[spec.param_layouts["fc1.weight"][0][0].group].frozen  # the hidden units stay live
    merged = _merge(a, b, x, 2.0, data)
    assert merged.meta["pleas_fx"]["frozen_hidden"]["frozen_units"] == 1
    assert any("one-entry axis" in f["reason"] for f in merged.meta["pleas_fx"]["frozen"])


class OneUnitTimesRow(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 1), nn.Linear(4, 3)
        self.row = nn.Parameter(torch.randn(1, 4))

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)) * self.row)  # one hidden unit broadcast over 4 columns


def test_a_one_unit_group_broadcast_over_a_larger_axis_is_frozen_and_reported():
    """Widened, the one hidden unit would no longer broadcast over the row (the merged graph did
    not run: an internal error); it is frozen instead, with a reason the merge reports."""
    a, b = (OneUnitTimesRow().eval() for _ in range(2))
    x, data = torch.randn(4, 5), nets.batches((5,), 2, seed=3)
    gm, spec = _spec(a, x)
    hidden = spec.groups[spec.param_layouts["fc1.weight"][0][0].group]
    assert hidden.frozen and [r.kind for r in hidden.reasons] == ["broadcast"]
    merged = _merge(a, b, x, 2.0, data)
    assert merged.meta["pleas_fx"]["frozen_hidden"]["frozen_units"] == 1
    assert any("broadcast" in f["reason"] for f in merged.meta["pleas_fx"]["frozen"])


class OneChannelSorted(nn.Module):
    """A one-channel convolution whose output meets, elementwise, the output of an op with no
    handler (sort along the positions): the channel is frozen."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 1, 3, padding=1), nn.Conv2d(1, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.conv1(x)
        y = y + torch.sort(y, dim=-1)[0]
        return self.fc(F.relu(self.conv2(y)).mean((2, 3)))


def test_a_one_channel_group_frozen_by_an_unknown_op_is_reported():
    """The size-1 channel axis of an unknown op's output only broadcasts: meeting the frozen
    one-channel group, it must not make that group look structural. The group counts as a frozen
    hidden unit, so the merge reports it (budget 2 cannot be the ensemble there)."""
    torch.manual_seed(0)
    a, b = OneChannelSorted().eval(), OneChannelSorted().eval()
    x, data = torch.randn(2, 3, 6, 6), nets.batches((3, 6, 6), 2, seed=3)
    gm, spec = _spec(a, x)
    group = spec.param_layouts["conv1.weight"][0][0].group
    frozen = spec.groups[group]
    assert frozen.frozen and not any(r.structural for r in frozen.reasons), frozen.reasons
    merged = _merge(a, b, x, 2.0, data)
    assert merged.meta["pleas_fx"]["frozen_hidden"]["frozen_units"] >= 1
    assert any("sort" in f["reason"] for f in merged.meta["pleas_fx"]["frozen"])
