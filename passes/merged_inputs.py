"""Merged-input statistics: the inputs the merged network itself feeds each solved layer.

PLeaS solves every layer against the *model* of its merged input, x~ = M_in [x_A; x_B]: the
sources' activations, merged. The merged network does not compute that: from the second layer
on, its input carries every earlier layer's residual error, and the errors compound with depth.
Merged-input least squares (beyond the paper) solves layer l against the input x~ the merged
network actually feeds it, once every layer before l is filled; its BatchNorm statistics, derived
from the same moments, are then exactly what the merged network computes on the calibration data.

The solved layers are grouped into *levels*: a layer's level is the largest number of solved
layers on a path from the network input to it, so a layer depends only on layers of lower
levels. Level by level, every calibration batch runs through the merged network and both
sources up to the level's last layer; for each layer of the level the running sums
E[x~ x~^T] and E[s x~^T] (s = [x_A; x_B; 1], im2col patches for a convolution, exact by
passes/patch_moments.py or at `positions` drawn output positions) are accumulated in float64.
Memory is one level's moments and one batch's activations; time is about (number of levels) x
(one pass through three networks), for every budget.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F

from pleas_fx.core.ir import WeightNode
from pleas_fx.passes.distributed import all_reduce_sums, sharded, world
from pleas_fx.passes.moments import SecondMoments, accumulate_rows
from pleas_fx.passes.patch_moments import conv_patch_sums
from pleas_fx.passes.patch_plan import conv_output_size, patches_at

CHUNK_ROWS = 8192
# merged-input moments read the leading calibration batches up to this many samples: each depth
# level re-runs three networks over them, and a few hundred images give every conv layer
# thousands of rows (the benchmarks calibrate on 500 images)
MERGED_INPUT_SAMPLES = 512


def _samples(batch) -> int:
    if torch.is_tensor(batch):
        return int(batch.shape[0]) if batch.dim() else 1
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        n = _samples(item)
        if n:
            return n
    return 0


def leading_batches(batches: Iterable, samples: int = MERGED_INPUT_SAMPLES) -> list:
    """The first calibration batches holding at least `samples` samples (all when fewer)."""
    out, seen = [], 0
    for batch in batches:
        out.append(batch)
        seen += _samples(batch)
        if seen >= samples:
            break
    return out


def weight_levels(gm: fx.GraphModule, nodes: list[WeightNode]) -> list[list[WeightNode]]:
    """The solved weight nodes grouped by level, in graph order within a level: level k holds
    the nodes with k solved nodes on their longest path from the input."""
    by_name = {w.node: w for w in nodes}
    renamed = gm.meta.get("block_nodes", {})  # compact emission's block-layer call -> the weight node it replaced
    depth: dict[fx.Node, int] = {}
    levels: dict[int, list[WeightNode]] = {}
    for node in gm.graph.nodes:
        d = max((depth[i] for i in node.all_input_nodes), default=0)
        w = by_name.get(renamed.get(node.name, node.name))
        if w is not None:
            levels.setdefault(d, []).append(w)
            d += 1
        depth[node] = d
    return [levels[k] for k in sorted(levels)]


class _Stop(Exception):
    pass


class _Capture(fx.Interpreter):
    """Runs a graph until every node in `wanted` has been reached, keeping the first argument
    (the input) of each."""

    def __init__(self, gm: fx.GraphModule, wanted: dict[str, str]):
        super().__init__(gm)
        self.wanted = wanted  # this graph's node name -> the name to report it under
        self.seen: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        if n.name in self.wanted:
            self.seen[self.wanted[n.name]] = self.env[n.args[0]]
            if len(self.seen) == len(self.wanted):
                raise _Stop
        return super().run_node(n)

    def inputs(self, args: tuple) -> dict[str, torch.Tensor]:
        self.seen = {}
        try:
            self.run(*args)
        except _Stop:
            pass
        finally:
            self.env = {}
        return self.seen


def _accumulate(acc: SecondMoments | None, w: WeightNode, xm: torch.Tensor, xa: torch.Tensor, xb: torch.Tensor,
                positions: int | None, gen: torch.Generator, dtype) -> SecondMoments:
    """Add one batch: a = x~ (the merged input, `dim_a` entries), b = s = [x_A; x_B] (2 x the
    source input)."""
    if w.kind == "linear":
        fm = xm.reshape(-1, xm.shape[-1])
        fs = torch.cat([xa, xb], -1).reshape(-1, 2 * xa.shape[-1])
        if acc is None:
            acc = SecondMoments.zeros(fm.shape[1], fs.shape[1], dtype, xm.device)
        for start in range(0, fm.shape[0], CHUNK_ROWS):
            accumulate_rows(acc, fm[start:start + CHUNK_ROWS].T, fs[start:start + CHUNK_ROWS].T)
        return acc
    if xm.dim() == 3:  # conv1d: a conv2d of height 1
        xm, xa, xb = xm.unsqueeze(2), xa.unsqueeze(2), xb.unsqueeze(2)
    xs = torch.cat([xa, xb], 1)
    pads = tuple(p if isinstance(p, tuple) else (p, p) for p in w.padding)
    out_h, out_w = (conv_output_size(xm.shape[2 + i], w.kernel[i], w.stride[i], *pads[i], w.dilation[i])
                    for i in range(2))
    taps, cm, cs = w.taps, xm.shape[1], xs.shape[1]
    if acc is None:
        acc = SecondMoments.zeros(cm * taps, cs * taps, dtype, xm.device)
    if positions is None or positions >= out_h * out_w:
        # one shape for both maps: the merged map padded with zero channels to the sources' 2C
        # (m <= 2C), so the exact patch-moment routine applies; the zero rows are dropped
        padded = F.pad(xm, (0, 0, 0, 0, 0, cs - cm)) if cs > cm else xm
        part = conv_patch_sums(padded, xs, w.kernel, w.stride, pads, w.dilation, out_dtype=dtype)
        k = cm * taps
        acc.aa += part.aa[:k, :k]
        acc.ab += part.ab[:k]
        acc.bb += part.bb
        acc.sum_a += part.sum_a[:k]
        acc.sum_b += part.sum_b
        acc.count += part.count
        return acc
    step = max(1, CHUNK_ROWS // positions)
    for start in range(0, xm.shape[0], step):
        idx = torch.randperm(out_h * out_w, generator=gen)[:positions].to(xm.device)
        pm, ps = (patches_at(w, x[start:start + step], pads, idx, out_w) for x in (xm, xs))
        accumulate_rows(acc, pm.transpose(0, 1).reshape(pm.shape[1], -1), ps.transpose(0, 1).reshape(ps.shape[1], -1))
    return acc


def split_moments(acc: SecondMoments) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(E[x~ x~^T], E[s x~^T], E[s s^T]) from the running sums, bias-augmented (constant last):
    (m + 1) square, (2 din + 1, m + 1) and (2 din + 1) square."""
    full = acc.mean()
    m = acc.dim_a
    rows_m = torch.cat([torch.arange(m), torch.tensor([full.shape[0] - 1])]).to(full.device)
    rows_s = torch.arange(m, full.shape[0], device=full.device)
    return full[rows_m][:, rows_m], full[rows_s][:, rows_m], full[rows_s][:, rows_s]


@torch.no_grad()
def merged_input_moments(merged: fx.GraphModule, gm_a: fx.GraphModule, gm_b: fx.GraphModule,
                         batches: Iterable[tuple], level: list[WeightNode], *, positions: int | None = None,
                         seed: int = 0, dtype: torch.dtype = torch.float64) -> dict[str, SecondMoments]:
    """Running sums of [x~; s] for every node of one level over `batches` (this rank's share
    under torch.distributed, then all-reduced): per node, a = x~ the merged network's input,
    b = s = [x_A; x_B] the sources'."""
    wanted = {w.node: w.node for w in level}
    renamed = {old: new for new, old in merged.meta.get("block_nodes", {}).items()}
    b_names = {na.name: nb.name for na, nb in zip(gm_a.graph.nodes, gm_b.graph.nodes)}  # same architecture
    runs = [_Capture(merged, {renamed.get(n, n): n for n in wanted}), _Capture(gm_a, wanted),
            _Capture(gm_b, {b_names[n]: n for n in wanted})]
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, SecondMoments] = {}
    for args in sharded(batches):
        xm, xa, xb = (r.inputs(args) for r in runs)
        for w in level:
            out[w.node] = _accumulate(out.get(w.node), w, xm[w.node], xa[w.node], xb[w.node], positions, gen, dtype)
    if world()[1] > 1:
        moments = [out[w.node] for w in level if w.node in out]
        tensors = [t for m in moments for t in (m.aa, m.ab, m.bb, m.sum_a, m.sum_b)]
        for m, c in zip(moments, all_reduce_sums(tensors, [m.count for m in moments])):
            m.count = c
    return out
