"""Statistics pass: one streamed pass of the calibration data through both source models.

The two traced graphs run node by node in lockstep; values are freed after their last use,
so no activation outlives the node that needs it. Two kinds of probes accumulate running sums
in float64 (each chunk's product is taken in the activations' precision, at least float32):

- least-squares probes (one per solved weight node): second moments S = E[s s^T] of the
  stacked, bias-augmented input s = [x_A; x_B; 1] (im2col patches for a convolution, summed
  exactly over every output position by passes/patch_moments.py). Every budget's
  least-squares solve is linear algebra on S alone.
- matching sites (one per activation axis of a mergeable group): E[z_A z_B^T], E[z_A^2],
  E[z_B^2] over every other axis treated as samples.

With merged-input least squares (`refined_samples` set) a least-squares probe is *deferred*
when the refinement's own rows are enough for any budget's re-solve: that layer is then solved
from the merged network's measured inputs alone (passes/merged_inputs.py) and its stacked source
moments, the dominant cost of this pass, are never formed. Only the probes the refinement cannot
replace stay: layers with too few refinement rows (its fallback).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.fx as fx

from pleas_fx.core.errors import DataError
from pleas_fx.core.ir import Site, WeightNode
from pleas_fx.core.progress import progress_bar
from pleas_fx.passes.distributed import all_reduce_sums, shard_total, sharded, world
from pleas_fx.passes.merged_inputs import MIN_ROWS_PER_INPUT
from pleas_fx.passes.moments import SecondMoments, accumulate_rows
from pleas_fx.passes.patch_moments import conv_patch_sums
from pleas_fx.passes.patch_plan import node_output_size, node_pads, patches_at
from pleas_fx.passes.positions import (AUTO, SITE_ROWS_PER_ENTRY, batch_samples, conv_positions, draw, generator,
                                       per_sample, total_samples)

log = logging.getLogger(__name__)

GRAM_CHUNK_ROWS = 8192  # rows per low-precision product before the float64 sum


@dataclass
class SiteMoments:
    cross: torch.Tensor  # sum z_A z_B^T
    sq_a: torch.Tensor
    sq_b: torch.Tensor
    count: int = 0
    # with full=True (ZipIt! matching): sums z_A z_A^T, z_B z_B^T, z_A, z_B; otherwise None
    aa: torch.Tensor | None = None
    bb: torch.Tensor | None = None
    sum_a: torch.Tensor | None = None
    sum_b: torch.Tensor | None = None


@dataclass
class Statistics:
    least_squares: dict[str, SecondMoments] = field(default_factory=dict)
    sites: dict[tuple, SiteMoments] = field(default_factory=dict)  # keyed by Site.key
    batches: int = 0
    samples: int = 0
    cache: dict = field(default_factory=dict)  # budget-independent products, reused by every fill
    deferred: set = field(default_factory=set)  # probes left to merged-input least squares (node names)

    def source_mean(self, node: str) -> torch.Tensor | None:
        """E[s s^T] of a least-squares probe (None: not collected). The last one is kept, so the
        budgets solved one after the other at a layer form it once (a d^2 pass over the sums)."""
        last = self.cache.get("source_mean")
        if last is not None and last[0] == node:
            return last[1]
        sums = self.least_squares.get(node)
        if sums is None:
            return None
        self.cache["source_mean"] = None  # the previous one is freed before the next is formed
        mean = sums.mean()
        self.cache["source_mean"] = (node, mean)
        return mean


def accumulate_inputs(acc: SecondMoments, node: WeightNode, xa: torch.Tensor, xb: torch.Tensor,
                      positions: int | None = None, gen: torch.Generator | None = None) -> None:
    """Add a weight node's inputs in A and B, as its weights see them, to its running sums:
    the rows of a Linear's input, or a convolution's im2col patches. Convolutions use every
    output position, summed exactly without im2col (passes/patch_moments.py); with `positions`
    set, that many output positions per sample are drawn from `gen` instead (the same ones in
    A and B) and gathered."""
    if node.kind == "linear":
        fa, fb = xa.reshape(-1, xa.shape[-1]), xb.reshape(-1, xb.shape[-1])
        for start in range(0, fa.shape[0], GRAM_CHUNK_ROWS):
            accumulate_rows(acc, fa[start:start + GRAM_CHUNK_ROWS].T, fb[start:start + GRAM_CHUNK_ROWS].T)
        return
    if xa.dim() == 3:  # conv1d: a conv2d of height 1
        xa, xb = xa.unsqueeze(2), xb.unsqueeze(2)
    pads = node_pads(node)
    out_h, out_w = node_output_size(node, xa)
    if positions is None or positions >= out_h * out_w:
        conv_patch_sums(xa, xb, node.kernel, node.stride, pads, node.dilation, out=acc)
        return
    step = max(1, GRAM_CHUNK_ROWS // positions)
    for start in range(0, xa.shape[0], step):
        idx = draw(gen, out_h * out_w, positions, xa.device)
        ca, cb = (patches_at(node, x[start:start + step], pads, idx, out_w) for x in (xa, xb))
        accumulate_rows(acc, ca.transpose(0, 1).reshape(ca.shape[1], -1), cb.transpose(0, 1).reshape(cb.shape[1], -1))


def _accumulate_site(acc: SiteMoments, za: torch.Tensor, zb: torch.Tensor, axis: int, dtype,
                     keep: float = 1.0, gen: torch.Generator | None = None) -> None:
    """Add E[z_A z_B^T] and the squares, every axis but ``axis`` taken as samples: products of
    (features, rows) chunks, GRAM_CHUNK_ROWS rows at a time. ``keep`` < 1: only that share of
    the positions after the axis (of the rows before it, when none follow) is read, drawn from
    ``gen``, the same in A and B."""
    work = torch.promote_types(torch.promote_types(za.dtype, zb.dtype), torch.float32)
    axis = axis % za.dim()
    d = za.shape[axis]
    lead, rest = math.prod(za.shape[:axis]), math.prod(za.shape[axis + 1:])
    a, b = za.reshape(lead, d, rest), zb.reshape(lead, d, rest)
    if keep < 1.0:
        along = 2 if rest > 1 else 0
        idx = draw(gen, a.shape[along], math.ceil(keep * a.shape[along]), a.device)
        a, b = a.index_select(along, idx), b.index_select(along, idx)
    step = max(1, GRAM_CHUNK_ROWS // max(a.shape[2], 1))
    for start in range(0, a.shape[0], step):  # (features, rows) chunks: one copy of a few thousand rows
        ca, cb = (z[start:start + step].transpose(0, 1).reshape(d, -1).to(work) for z in (a, b))
        acc.cross += (ca @ cb.T).to(dtype)
        acc.sq_a += (ca * ca).sum(1).to(dtype)
        acc.sq_b += (cb * cb).sum(1).to(dtype)
        if acc.aa is not None:
            acc.aa += (ca @ ca.T).to(dtype)
            acc.bb += (cb @ cb.T).to(dtype)
            acc.sum_a += ca.sum(1).to(dtype)
            acc.sum_b += cb.sum(1).to(dtype)
        acc.count += ca.shape[1]


class _Lockstep(fx.Interpreter):
    """Runs model A's graph on one batch while running model B's graph node by node beside it
    (the same architecture), and feeds the probes: before a least-squares node, its input in
    both models; after a site's node, its output in both. B's values are freed after their
    last use, as fx.Interpreter frees A's."""

    def __init__(self, gm_a: fx.GraphModule, gm_b: fx.GraphModule, collector: "_Collector"):
        super().__init__(gm_a)
        self.partner = fx.Interpreter(gm_b)
        self.partner_nodes = {na: nb for na, nb in zip(gm_a.graph.nodes, gm_b.graph.nodes)}
        self.collector = collector

    def run(self, *args):
        self.partner.env = {}
        self.partner.args_iter = iter(args)
        return super().run(*args)

    def run_node(self, n: fx.Node):
        nb = self.partner_nodes[n]
        probe = self.collector.weights.get(n.name)
        if probe is not None:
            x = n.args[0]
            self.collector.weight_inputs(probe, self.env[x], self.partner.env[self.partner_nodes[x]])
        out = super().run_node(n)
        if n.op != "output":
            self.partner.env[nb] = self.partner.run_node(nb)
            for site in self.collector.sites.get(n.name, ()):
                self.collector.site_values(site, out, self.partner.env[nb])
            for dead in self.partner.user_to_last_uses.get(nb, ()):
                del self.partner.env[dead]
        return out


class _Collector:
    """The probes of one statistics pass and their running sums. `positions`: None (every
    position), a count per sample, or AUTO (passes/positions.py, over `samples` samples)."""

    def __init__(self, weights: list[WeightNode], sites: list[Site], dtype, positions, seed: int, device, full_sites,
                 samples: int | None = None, refined_samples: int | None = None):
        self.weights = {w.node: w for w in weights}
        self.refined_samples, self.samples = refined_samples, samples
        self.batch_samples = 0  # samples of the batch being run
        self.batch_index = 0  # its index in the calibration data (all ranks')
        self.sites: dict[str, list[Site]] = {}
        for site in sites:
            self.sites.setdefault(site.node, []).append(site)
        self.dtype, self.positions, self.seed, self.device, self.full_sites = dtype, positions, seed, device, full_sites
        self.stats = Statistics()

    def weight_inputs(self, probe: WeightNode, xa: torch.Tensor, xb: torch.Tensor) -> None:
        if probe.node in self.stats.deferred:
            return
        acc = self.stats.least_squares.get(probe.node)
        dim = xa.shape[-1] if probe.kind == "linear" else xa.shape[1] * probe.taps
        if acc is None:
            if self._defer(probe, xa, dim):
                self.stats.deferred.add(probe.node)
                return
            acc = self.stats.least_squares[probe.node] = SecondMoments.zeros(dim, dim, self.dtype, self.device)
        count = None if probe.kind == "linear" else conv_positions(self.positions, probe, _as_2d(xa), 2 * dim + 1,
                                                                      self.samples)
        accumulate_inputs(acc, probe, xa, xb, count, generator(self.seed, self.batch_index, probe.node))

    def _defer(self, probe: WeightNode, xa: torch.Tensor, dim: int) -> bool:
        """Whether merged-input least squares will re-solve this layer from its own rows at every
        budget: the refinement's samples give at least MIN_ROWS_PER_INPUT rows per entry of the
        widest merged input (2 dim + 1; for a grouped conv the whole input's, more than any one
        conv group reads), with the positions it will draw. Rows per sample from this batch."""
        if self.refined_samples is None or self.batch_samples <= 0:
            return False
        if probe.kind == "linear":
            per = xa.numel() // max(xa.shape[-1], 1) / self.batch_samples
        else:
            per = math.prod(node_output_size(probe, _as_2d(xa))) * xa.shape[0] / self.batch_samples
            drawn = per_sample(self.positions, 2 * dim, self.refined_samples, math.ceil(per))
            per = per if drawn is None else min(per, drawn)
        return per * self.refined_samples >= MIN_ROWS_PER_INPUT * (2 * dim + 1)

    def site_values(self, site: Site, za: torch.Tensor, zb: torch.Tensor) -> None:
        axis = site.axis
        if site.start is not None:  # one segment of the axis
            za, zb = za.narrow(axis, site.start, site.size), zb.narrow(axis, site.start, site.size)
        if site.within_axis is not None:  # units x within entries, as one axis
            za, zb = (z.movedim((site.axis, site.within_axis), (-2, -1)).flatten(-2) for z in (za, zb))
            axis = -1
        d = za.shape[axis]
        acc = self.stats.sites.get(site.key)
        if acc is None:
            zeros = lambda *s: torch.zeros(*s, dtype=self.dtype, device=self.device)
            acc = self.stats.sites[site.key] = SiteMoments(zeros(d, d), zeros(d), zeros(d))
            if self.full_sites:
                acc.aa, acc.bb, acc.sum_a, acc.sum_b = zeros(d, d), zeros(d, d), zeros(d), zeros(d)
        keep = 1.0  # share of the rows read: with AUTO, positions per sample drawn as for a conv moment
        if self.positions == AUTO and self.batch_samples > 0:
            rows = za.numel() // max(d, 1) / self.batch_samples  # rows per sample
            drawn = per_sample(AUTO, d, self.samples, math.ceil(rows), SITE_ROWS_PER_ENTRY)
            keep = 1.0 if drawn is None else drawn / rows
        _accumulate_site(acc, za, zb, axis, self.dtype, keep, generator(self.seed, self.batch_index, repr(site.key)))


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    """A conv1d input (N, C, W) as a conv2d's of height 1."""
    return x.unsqueeze(2) if x.dim() == 3 else x


def collect_statistics(
    gm_a: fx.GraphModule,
    gm_b: fx.GraphModule,
    batches: Iterable[tuple],
    weights: list[WeightNode],
    sites: list[Site],
    *,
    dtype: torch.dtype = torch.float64,
    progress: bool | None = None,
    total: int | None = None,
    positions: int | str | None = None,
    seed: int = 0,
    full_sites: bool = False,
    refined_samples: int | None = None,
) -> Statistics:
    """Run every batch through both models once and accumulate the probes' moments.

    ``weights``: the solved weight nodes (second moments of their stacked inputs).
    ``positions``: for convolutions, use at most this many randomly drawn output positions
    per sample (drawn anew for each chunk of samples) in the least-squares moments (None: all,
    exactly); AUTO: as many as each moment needs (passes/positions.py), at the matching sites
    too, when the batches are a list (their samples known; otherwise every position).
    ``full_sites``: also accumulate each site's within-model moments and sums (ZipIt! matching).
    ``refined_samples``: the samples merged-input least squares will read (None: no refinement):
    probes it can replace are deferred to it (`Statistics.deferred`, module docstring).
    ``progress``: a tqdm bar (None: only when stderr is a terminal).
    """
    device = next((p.device for p in gm_a.parameters()), torch.device("cpu"))
    collector = _Collector(weights, sites, dtype, positions, seed, device, full_sites, total_samples(batches),
                           refined_samples)
    lockstep = _Lockstep(gm_a, gm_b, collector)
    stats = collector.stats
    rank, size = world()
    with torch.no_grad():
        for i, args in enumerate(progress_bar(sharded(batches), progress, total=shard_total(total),
                                              desc="pleas_fx statistics", unit="batch")):
            collector.batch_samples, collector.batch_index = batch_samples(args), rank + i * size
            lockstep.run(*args)
            stats.batches += 1
            stats.samples += collector.batch_samples
    if size > 1:
        _all_reduce(stats, rank)
    log.info("statistics: %d batches, %d samples, %d least-squares probes, %d matching sites",
             stats.batches, stats.samples, len(stats.least_squares), len(stats.sites))
    return stats


def _all_reduce(stats: Statistics, rank: int) -> None:
    """Sum every rank's running sums (each rank read its share of the batches)."""
    if stats.batches == 0:
        raise DataError(f"rank {rank} got no calibration batch: give at least one batch per process")
    moments = list(stats.least_squares.values()) + list(stats.sites.values())
    tensors = [t for m in stats.least_squares.values() for t in (m.aa, m.ab, m.bb, m.sum_a, m.sum_b)]
    tensors += [t for m in stats.sites.values() for t in (m.cross, m.sq_a, m.sq_b, m.aa, m.bb, m.sum_a, m.sum_b)
                if t is not None]
    counts = all_reduce_sums(tensors, [m.count for m in moments] + [stats.batches, stats.samples])
    for m, c in zip(moments, counts):
        m.count = c
    stats.batches, stats.samples = counts[-2], counts[-1]
