"""The statistics pass: blocked moments equal a dense float64 Gram, gathered patches equal
F.unfold, and sub-sampled positions keep the merge invariants."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import pleas_fx
from pleas_fx.passes.moments import SecondMoments
from pleas_fx.passes.patch_plan import patches_at
from pleas_fx.passes.statistics import accumulate_inputs
from pleas_fx.passes.verify import relative_error
from tests import nets


@nets.hypothesis_settings(40)
@given(st.integers(1, 5), st.integers(1, 3), st.integers(1, 2), st.integers(0, 2), st.integers(1, 2),
       st.integers(5, 12), st.integers(5, 12), st.integers(0, 10_000))
def test_gathered_patches_equal_unfold(kh, kw, stride, padding, dilation, h, w, seed):
    if h + 2 * padding < dilation * (kh - 1) + 1 or w + 2 * padding < dilation * (kw - 1) + 1:
        return
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, h, w, generator=gen)
    node = SimpleNamespace(kernel=(kh, kw), stride=(stride, stride), padding=(padding, padding),
                           dilation=(dilation, dilation))
    full = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    out_w = (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    idx = torch.randperm(full.shape[2], generator=gen)[: max(1, full.shape[2] // 2)]
    pads = ((padding, padding), (padding, padding))
    assert torch.equal(patches_at(node, x, pads, idx, out_w), full[:, :, idx])


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_blocked_moments_equal_the_dense_float64_gram(kind):
    gen = torch.Generator().manual_seed(0)
    if kind == "linear":
        node = SimpleNamespace(kind="linear")
        xa, xb = torch.randn(3, 9000, 5, generator=gen), torch.randn(3, 9000, 7, generator=gen) + 2.0
        rows_a, rows_b = xa.reshape(-1, 5), xb.reshape(-1, 7)
    else:
        node = SimpleNamespace(kind="conv", kernel=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1))
        xa, xb = torch.randn(40, 3, 15, 15, generator=gen), torch.randn(40, 3, 15, 15, generator=gen) * 3
        rows_a = F.unfold(xa, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 27)
        rows_b = F.unfold(xb, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 27)
    s = torch.cat([rows_a, rows_b, torch.ones(rows_a.shape[0], 1)], 1).double()
    dense = s.T @ s / s.shape[0]
    acc = SecondMoments.zeros(rows_a.shape[1], rows_b.shape[1], torch.float64, "cpu")
    accumulate_inputs(acc, node, xa, xb)
    assert acc.count == s.shape[0]
    assert torch.allclose(acc.mean(), dense, rtol=1e-5, atol=1e-5)
    assert torch.equal(acc.mean(), acc.mean().T)


def test_sampled_positions_are_shared_by_both_models_and_counted():
    node = SimpleNamespace(kind="conv", kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1))
    x = torch.randn(10, 2, 9, 9)
    acc = SecondMoments.zeros(18, 18, torch.float64, "cpu")
    accumulate_inputs(acc, node, x, x, 7, torch.Generator().manual_seed(0))
    assert acc.count == 10 * 7
    assert torch.allclose(acc.aa, acc.ab) and torch.allclose(acc.ab, acc.bb)  # same rows in A and B


def test_sub_sampled_positions_keep_the_invariants():
    """Budget 2 is the ensemble and self-merge is the identity whatever rows the moments use."""
    cfg = {"kind": "cnn", "in_channels": 3, "size": 12, "head": "gap", "classes": 4, "hidden": 6,
           "blocks": [("conv", {"cout": 6, "k": 3, "stride": 1, "bn": True, "act": "relu"}),
                      ("residual", {"mid": 5, "cout": 6, "bn": True, "functional_add": True})]}
    a, b = nets.build(cfg, 0).eval(), nets.build(cfg, 1).eval()
    x, data = nets.example_and_data(cfg, 0, n_batches=3, batch_size=6)
    merged = pleas_fx.merge(a, b, x, 2.0, data=data, positions=5, progress=False)
    assert relative_error(nets.run(merged, x), nets.ensemble(a, b, x)) < 1e-4
    _, _, permuted, _ = nets.permuted_copy(a, x, 3)
    merged = pleas_fx.merge(a, permuted, x, 1.0, data=data, positions=5, progress=False)
    assert relative_error(nets.run(merged, x), nets.run(a, x)) < 1e-4
    # and sub-sampling changes the statistics (the option is not ignored) without changing shapes
    full = pleas_fx.merge(a, b, x, 1.3, data=data, positions=None, progress=False)
    sampled = pleas_fx.merge(a, b, x, 1.3, data=data, positions=5, progress=False)
    assert [p.shape for p in full.parameters()] == [p.shape for p in sampled.parameters()]
    assert any(not torch.equal(p, q) for p, q in zip(full.parameters(), sampled.parameters()))


class _Deferrable(nn.Module):
    """A conv (many rows per sample), a grouped conv and a linear head (one row per sample)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.grouped(torch.relu(self.conv(x)))).mean((2, 3)))


@pytest.mark.parametrize("refined", [None, 3, 64])
def test_source_moments_are_deferred_only_where_the_refinement_replaces_them(refined):
    """With merged-input least squares reading `refined` samples, a layer whose refinement rows
    cover any budget's widest merged input (2 x 2 dim + 1 entries; a grouped conv's whole input)
    is left to it; a layer with too few rows keeps its source moments."""
    from pleas_fx.passes.statistics import collect_statistics
    from pleas_fx.passes.trace import propagate_shapes, trace_model
    from pleas_fx.passes.weights import plan_weights

    x = torch.randn(8, 3, 6, 6)
    gms = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        gm = trace_model(_Deferrable().eval(), "model")
        propagate_shapes(gm, (x,))
        gms.append(gm)
    solved = plan_weights(gms[0], 10_000).solved
    stats = collect_statistics(*gms, [(x[:4],), (x[4:],)], solved, [], progress=False, refined_samples=refined)
    # MIN_ROWS_PER_INPUT (1.5) rows per entry: conv: 36 rows per sample, 1.5 (2 x 27 + 1) = 82.5
    # needed; grouped: 1.5 (2 x 36 + 1) = 109.5; head: 1 row per sample, 1.5 (2 x 4 + 1) = 13.5
    deferred = {None: set(), 3: {"conv"}, 64: {"conv", "grouped", "head"}}[refined]
    assert stats.deferred == deferred
    assert set(stats.least_squares) == {w.node for w in solved} - deferred


def test_deferred_source_moments_keep_the_invariants_and_the_merge():
    """Layers solved from the refinement's rows alone (no source moments) keep budget 2 = the
    ensemble and self-merge = the identity, and give the merge of the source-moment path up to
    the rows the two keep differently."""
    import pleas_fx.api as api

    cfg = {"kind": "cnn", "in_channels": 3, "size": 12, "head": "gap", "classes": 4, "hidden": 6,
           "blocks": [("conv", {"cout": 6, "k": 3, "stride": 1, "bn": True, "act": "relu"}),
                      ("residual", {"mid": 5, "cout": 6, "bn": True, "functional_add": True})]}
    a, b = nets.build(cfg, 0).eval(), nets.build(cfg, 1).eval()
    x, data = nets.example_and_data(cfg, 0, n_batches=3, batch_size=6)
    merged = pleas_fx.merge(a, b, x, [1.0, 1.5, 2.0], data=data, progress=False)
    assert merged[0].meta["pleas_fx"]["statistics"]["source_moments_deferred"] > 0
    assert relative_error(nets.run(merged[2], x), nets.ensemble(a, b, x)) < 1e-4
    _, _, permuted, _ = nets.permuted_copy(a, x, 3)
    self_merged = pleas_fx.merge(a, permuted, x, 1.0, data=data, progress=False)
    assert self_merged.meta["pleas_fx"]["statistics"]["source_moments_deferred"] > 0
    assert relative_error(nets.run(self_merged, x), nets.run(a, x)) < 1e-4
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api, "refined_samples", lambda batches: None)
        full = pleas_fx.merge(a, b, x, [1.0, 1.5], data=data, progress=False)
    assert full[0].meta["pleas_fx"]["statistics"]["source_moments_deferred"] == 0
    for got, want in zip(merged, full):
        assert relative_error(nets.run(got, x), nets.run(want, x)) < 1e-3


def test_deferred_grouped_convolutions_keep_the_invariants():
    """A grouped conv solved from the refinement's rows alone, conv group by conv group, keeps
    budget 2 = the ensemble and self-merge = the identity."""
    torch.manual_seed(0)
    a, b = _Deferrable().eval(), _Deferrable().eval()
    x, data = torch.randn(4, 3, 6, 6), [torch.randn(16, 3, 6, 6) for _ in range(4)]
    merged = pleas_fx.merge(a, b, x, [1.0, 2.0], data=data, progress=False)
    assert merged[0].meta["pleas_fx"]["statistics"]["source_moments_deferred"] == 3  # conv, grouped, head
    assert relative_error(nets.run(merged[1], x), nets.ensemble(a, b, x)) < 1e-4
    _, _, permuted, _ = nets.permuted_copy(a, x, 3)
    self_merged = pleas_fx.merge(a, permuted, x, 1.0, data=data, progress=False)
    assert relative_error(nets.run(self_merged, x), nets.run(a, x)) < 1e-4
