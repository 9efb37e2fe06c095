"""Data-limited layers of merged-input least squares read more samples (passes/mixup.py): the
calibration batches past the leading ones, then mixup copies; never for inputs that cannot be
mixed, never touching the user's data, and the invariants (self-merge exact) kept."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

import pleas_fx
from pleas_fx.core.errors import PleasError
from pleas_fx.passes import merged_inputs
from pleas_fx.passes.merged_inputs import level_batches, top_up_samples, weight_levels
from pleas_fx.passes.mixup import MIX_MAX, mixup_batches, top_up_batches
from pleas_fx.passes.trace import trace_pair
from pleas_fx.passes.weights import plan_weights
from pleas_fx.passes.verify import relative_error


class ConvFlatten(nn.Module):
    """A conv on 8x8 maps (64 rows per sample for 9 entries) and a Linear on the flattened
    maps (one row per sample for 4 x 64 entries): only the Linear layer is data-limited."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 64, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _pair():
    torch.manual_seed(0)
    return ConvFlatten().eval(), ConvFlatten().eval()


def test_mixup_mixes_two_samples_of_a_batch_convexly():
    """Each mixed sample is (1 - lam) x_i + lam x_j with lam <= MIX_MAX: on one-hot rows, two
    entries summing to 1, the larger >= 1 - MIX_MAX; other inputs pass through."""
    x = torch.eye(16)
    flag = torch.tensor(3.0)  # no batch axis: passed as is
    out = mixup_batches([(x, flag, None)], 40, seed=1)
    assert [len(b[0]) for b in out] == [16, 16, 8]  # cycling, the last copy cut short
    for mixed, f, none in out:
        assert f is flag and none is None
        assert torch.allclose(mixed.sum(1), torch.ones(len(mixed)))
        assert bool((mixed.max(1).values >= 1 - MIX_MAX - 1e-6).all())
        assert bool(((mixed > 0).sum(1) <= 2).all())
    assert not torch.equal(out[0][0], x)


def test_mixup_is_reproducible_and_leaves_the_data_alone():
    x = torch.randn(8, 3)
    kept = x.clone()
    one, two = mixup_batches([(x,)], 8, seed=5), mixup_batches([(x,)], 8, seed=5)
    assert torch.equal(one[0][0], two[0][0])
    assert not torch.equal(one[0][0], mixup_batches([(x,)], 8, seed=6)[0][0])
    assert torch.equal(x, kept)


@pytest.mark.parametrize("batch", [
    (torch.randint(0, 9, (8, 5)),),  # token ids
    (torch.randn(8, 5), torch.ones(8, 5, dtype=torch.bool)),  # a mask beside the data
    (torch.randn(1, 5),),  # one sample: nothing to mix with
])
def test_inputs_that_cannot_be_mixed_get_no_copies(batch):
    assert mixup_batches([batch], 16) == []


def test_top_up_takes_the_calibration_batches_past_the_leading_ones_first():
    leading = [(torch.randn(4, 2),)]
    rest = [(torch.randn(4, 2),), (torch.randn(4, 2),)]
    got = top_up_batches(rest, leading, 3)
    assert len(got) == 1 and torch.equal(got[0][0], rest[0][0][:3])
    got = top_up_batches(rest, leading, 10)
    assert got[:2] == rest and len(got) == 3 and got[2][0].shape == (2, 2)


def test_only_data_limited_levels_read_past_the_leading_batches():
    """The conv (64 rows per sample for 2 x 9 + 1 entries) reads the leading batches; the Linear
    layer (one row per sample for 2 x 256 + 1 entries) wants 2 rows per entry, at most twice the
    leading samples, and none where even that would stay below the 1.5 x (256 + 1) rows of a
    re-solve at budget 1 (it would buy nothing)."""
    a, b = _pair()
    gm = trace_pair(a, b, torch.randn(2, 1, 8, 8)).gm_a
    levels = weight_levels(gm, plan_weights(gm, 10_000).solved)
    assert [[w.node for w in level] for level in levels] == [["conv"], ["fc"]]
    assert [top_up_samples(levels[1], gm, n) for n in (22, 192, 200, 600, 2000)] == [0, 0, 400, 1026, 0]
    assert top_up_samples(levels[0], gm, 200) == 0
    batches = [(torch.randn(50, 1, 8, 8),) for _ in range(12)]
    for positions in ("auto", None):
        assert [level_batches(level, gm, batches, positions, leading=4) for level in levels] == [4, 8]


def _measured_rows(monkeypatch, mixup: bool, data) -> dict[str, int]:
    a, b = _pair()
    rows: dict[str, int] = {}
    original = merged_inputs.accumulate

    def spy(prev, w, xm, *args):
        rows[w.node] = rows.get(w.node, 0) + xm.shape[0]
        return original(prev, w, xm, *args)

    monkeypatch.setattr(merged_inputs, "accumulate", spy)
    merged = pleas_fx.merge(a, b, data[0][:2], 1.0, data, progress=False, mixup=mixup)
    rows["notes"] = [n for n in merged.meta["pleas_fx"]["notes"] if "data-limited" in n]
    return rows


def test_the_data_limited_layer_is_re_solved_from_mixup_copies(monkeypatch, caplog):
    """200 images: the Linear layer (257 merged entries at budget 1) has too few rows for a
    re-solve (1.5 x 257) without the top-up, and 400 with it; the conv reads the 200. The
    top-up is logged and noted in the merge report."""
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(50, 1, 8, 8, generator=g) for _ in range(4)]
    kept = [x.clone() for x in data]
    with caplog.at_level(logging.INFO, logger="pleas_fx.passes.merged_inputs"):
        rows = _measured_rows(monkeypatch, True, data)
    note = "merged-input least squares: the data-limited levels (fc) read 200 more samples"
    assert rows == {"conv": 200, "fc": 400, "notes": [note + " (fewer than 2 rows per merged input entry in the "
                                                       "leading 200)"]}
    assert note in caplog.text  # logged and in the report's notes
    assert all(torch.equal(x, k) for x, k in zip(data, kept))
    assert _measured_rows(monkeypatch, False, data) == {"conv": 200, "notes": []}


def test_a_self_merge_with_the_top_up_recovers_model_a():
    """Mixed inputs are still inputs: a model merged with a permuted copy of itself is itself."""
    a, _ = _pair()
    b = ConvFlatten().eval()
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        b.conv.weight.copy_(a.conv.weight[perm])
        b.conv.bias.copy_(a.conv.bias[perm])
        b.fc.weight.copy_(a.fc.weight.view(3, 4, 64)[:, perm].reshape(3, 256))
        b.fc.bias.copy_(a.fc.bias)
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(50, 1, 8, 8, generator=g) for _ in range(4)]
    merged = pleas_fx.merge(a, b, data[0][:2], 1.0, data, progress=False)
    x = torch.randn(64, 1, 8, 8, generator=g)
    with torch.no_grad():
        assert relative_error(merged(x), a(x)) < 1e-4


def test_mixup_must_be_a_bool():
    a, b = _pair()
    with pytest.raises(PleasError, match="mixup must be True or False"):
        pleas_fx.merge(a, b, torch.randn(2, 1, 8, 8), 1.0, [torch.randn(4, 1, 8, 8)], mixup="yes")
