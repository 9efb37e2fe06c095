"""Adaptive positions (passes/positions.py): how many rows each moment reads, draws that do not
depend on sharding, site moments on drawn rows, and the merge invariants with the default."""
from __future__ import annotations

import math

import pytest
import torch

import pleas_fx
from pleas_fx.passes import positions as pos
from pleas_fx.passes.statistics import SiteMoments, _accumulate_site
from pleas_fx.passes.verify import relative_error
from tests import nets


def test_auto_reads_just_enough_positions_per_sample():
    # max(32,768, 32 x 288) rows over 512 samples: 64 of a 28x28 map's 784 positions
    assert pos.per_sample(pos.AUTO, 288, 512, 784) == 64
    assert pos.per_sample(pos.AUTO, 2304, 512, 784) == math.ceil(32 * 2304 / 512) == 144  # the entries decide
    assert pos.per_sample(pos.AUTO, 1152, 512, 49) is None  # a 7x7 map has fewer: every position
    assert pos.per_sample(pos.AUTO, 288, 512, 784, pos.SITE_ROWS_PER_ENTRY) == 64
    assert pos.per_sample(pos.AUTO, 288, None, 784) is None  # samples unknown (lazy data): exact
    assert pos.per_sample(None, 288, 512, 784) is None
    assert pos.per_sample(7, 288, 512, 784) == 7 and pos.per_sample(900, 288, 512, 784) is None


def test_draws_depend_on_the_batch_and_layer_not_on_the_order_of_calls():
    first = pos.draw(pos.generator(0, 3, "conv1"), 100, 10, "cpu")
    pos.draw(pos.generator(0, 2, "conv1"), 100, 10, "cpu")  # another batch in between
    again = pos.draw(pos.generator(0, 3, "conv1"), 100, 10, "cpu")
    assert torch.equal(first, again) and first.unique().numel() == 10 and bool((first.diff() > 0).all())
    assert not torch.equal(first, pos.draw(pos.generator(0, 3, "conv2"), 100, 10, "cpu"))
    assert not torch.equal(first, pos.draw(pos.generator(1, 3, "conv1"), 100, 10, "cpu"))


@pytest.mark.parametrize("shape,axis", [((5, 6, 7, 9), 1), ((4, 11, 6), -1), ((3, 2, 6, 10), 2)])
@pytest.mark.parametrize("keep", [1.0, 0.4])
def test_site_moments_equal_dense_float64_products_on_the_rows_read(shape, axis, keep):
    gen = torch.Generator().manual_seed(0)
    za, zb = torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen) + 1.0
    d = za.shape[axis]
    acc = SiteMoments(torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64),
                      torch.zeros(d, dtype=torch.float64))
    _accumulate_site(acc, za, zb, axis, torch.float64, keep, pos.generator(0, 0, "site"))
    ax = axis % za.dim()
    lead, rest = math.prod(za.shape[:ax]), math.prod(za.shape[ax + 1:])
    a, b = za.reshape(lead, d, rest).double(), zb.reshape(lead, d, rest).double()
    if keep < 1.0:  # the same draw: positions after the axis, or rows before it when none follow
        along = 2 if rest > 1 else 0
        idx = pos.draw(pos.generator(0, 0, "site"), a.shape[along], math.ceil(keep * a.shape[along]), "cpu")
        a, b = a.index_select(along, idx), b.index_select(along, idx)
    ra, rb = a.transpose(0, 1).reshape(d, -1), b.transpose(0, 1).reshape(d, -1)
    assert acc.count == ra.shape[1] < (lead * rest if keep < 1.0 else lead * rest + 1)
    assert torch.allclose(acc.cross, ra @ rb.T, rtol=1e-5, atol=1e-4)
    assert torch.allclose(acc.sq_a, (ra * ra).sum(1), rtol=1e-5) and torch.allclose(acc.sq_b, (rb * rb).sum(1), rtol=1e-5)


def test_auto_positions_sample_large_maps_and_keep_the_invariants():
    """300 samples of 12x12 maps: more rows than the auto rule wants, so both the matching sites
    and the least-squares moments read drawn positions; budget 2 is still the ensemble, a
    self-merge still the identity, and budget 1.3 within a few percent of the exact moments'."""
    cfg = {"kind": "cnn", "in_channels": 3, "size": 12, "head": "gap", "classes": 4, "hidden": 6,
           "blocks": [("conv", {"cout": 6, "k": 3, "stride": 1, "bn": True, "act": "relu"}),
                      ("residual", {"mid": 5, "cout": 6, "bn": True, "functional_add": True})]}
    a, b = nets.build(cfg, 0).eval(), nets.build(cfg, 1).eval()
    x, data = nets.example_and_data(cfg, 0, n_batches=6, batch_size=50)
    assert pos.per_sample(pos.AUTO, 6 * 9, 300, 144) < 144 and pos.per_sample(pos.AUTO, 6, 300, 144, 16) < 144
    merged = pleas_fx.merge(a, b, x, 2.0, data=data, progress=False)
    assert relative_error(nets.run(merged, x), nets.ensemble(a, b, x)) < 1e-4
    _, _, permuted, _ = nets.permuted_copy(a, x, 3)
    merged = pleas_fx.merge(a, permuted, x, 1.0, data=data, progress=False)
    assert relative_error(nets.run(merged, x), nets.run(a, x)) < 1e-4
    exact = pleas_fx.merge(a, b, x, 1.3, data=data, positions=None, progress=False)
    auto = pleas_fx.merge(a, b, x, 1.3, data=data, progress=False)
    assert 0 < relative_error(nets.run(auto, x), nets.run(exact, x)) < 0.05


def test_positions_must_be_a_positive_count_none_or_auto():
    a = torch.nn.Linear(3, 3)
    with pytest.raises(pleas_fx.PleasError, match='positions must be a positive integer or "auto"'):
        pleas_fx.merge(a, a, torch.randn(2, 3), 1.0, [torch.randn(4, 3)], positions="all")


class _Pyramid(torch.nn.Module):
    """A 3x3 conv on a 64x64 map, one on 8x8 after pooling, a linear head."""

    def __init__(self):
        super().__init__()
        self.early, self.late = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(4, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x):
        x = torch.nn.functional.max_pool2d(torch.relu(self.early(x)), 8)
        return self.head(torch.relu(self.late(x)).mean((2, 3)))


@pytest.mark.parametrize("world_size", [1, 2])
def test_early_levels_of_large_maps_read_fewer_batches(world_size):
    from pleas_fx.passes.merged_inputs import MIN_LEVEL_SAMPLES, level_batches, weight_levels
    from pleas_fx.passes.trace import propagate_shapes, trace_model
    from pleas_fx.passes.weights import plan_weights

    gm = trace_model(_Pyramid().eval(), "model")
    propagate_shapes(gm, (torch.randn(2, 3, 64, 64),))
    levels = weight_levels(gm, plan_weights(gm, 10_000).solved)
    assert [[w.node for w in level] for level in levels] == [["early"], ["late"], ["head"]]
    batches = [torch.randn(10, 3, 64, 64)] * 60  # (contents unused)
    # early: max(128, 32,768 rows / 4,096 positions) samples; late: 32,768 / 64 = 512; head: 1 row each
    got = [level_batches(level, gm, batches, pos.AUTO, world_size) for level in levels]
    assert got == [MIN_LEVEL_SAMPLES // 10 + 1, 52, 60]
    assert [level_batches(level, gm, batches[:1], pos.AUTO, world_size) for level in levels] == [1, 1, 1]
    assert all(level_batches(level, gm, batches, p, world_size) == 60 for level in levels for p in (None, 5))


def test_every_position_is_read_exactly_when_that_is_no_dearer():
    from pleas_fx.passes.patch_plan import exact_is_cheaper

    for shape in [(128, 32, 28, 28), (32, 64, 56, 56), (8, 16, 7, 7)]:
        area = (shape[2]) * (shape[3])
        assert exact_is_cheaper(shape, 3, 1, 1, 1, area)  # all positions: the exact sums are never dearer
    assert not exact_is_cheaper((32, 64, 56, 56), 3, 1, 1, 1, 64)  # 64 of 3,136: drawn
