"""Least squares for a grouped convolution, conv group by conv group.

Merged conv group f reads only its own input entries, the merged unit f of the input channels,
which average (or copy) A's conv group a and B's conv group b that feed it. Its weight block is
the solve of passes/linalg.solve_layer restricted to those entries: the second moments of the
stacked patches of A's group a and B's group b (and the constant), the two source blocks, and
the input and output maps of unit f re-indexed into that block. Both axis layouts must list
whole units in order (per-unit entries contiguous, no repetition), as a grouped convolution's
channel axes do.
"""
from __future__ import annotations

import numpy as np
import torch

from pleas_fx.core.ir import AxisMap
from pleas_fx.passes.linalg import LayerSolution, MergedInputs, source_targets, solve_layer


def _rows(m: AxisMap, rows: slice, offset_a: int, offset_b: int) -> AxisMap:
    """Entries `rows` of an axis map, A / B indices shifted by the unit's offsets."""
    shift = lambda idx, off: np.where(idx[rows] >= 0, idx[rows] - off, -1)
    share = None if m.share_a is None else m.share_a[rows]
    return AxisMap(shift(m.idx_a, offset_a), shift(m.idx_b, offset_b), m.frozen, share_a=share)


def _unit(idx: np.ndarray, per: int) -> int:
    """The source unit feeding merged entries `idx` (-1 where none does)."""
    fed = idx[idx >= 0]
    return int(fed[0]) // per if len(fed) else -1


def solve_grouped(S: torch.Tensor, sources, in_map: AxisMap, out_map: AxisMap, per_in: int, per_out: int,
                  has_bias: bool, ridge: float, method: str = "least_squares",
                  merged: list[MergedInputs] | None = None) -> LayerSolution:
    """The merged grouped layer (rows: merged output entries; columns: the per_in input entries
    of each row's own conv group), solved block by block. `S` = E[s s^T] over the stacked
    patches s = [x_A; x_B; 1] of the whole input (din = S.shape[0] // 2 entries a side, unit
    u's entries at [u * per_in, (u + 1) * per_in)); `sources` = (wa, ba, wb, bb) with weight
    rows (out, per_in). `merged[f]`: merged conv group f's own measured inputs (merged-input
    least squares, passes/merged_inputs.py), over its per_in entries in the merged order; with
    `S` None (source moments deferred) each conv group is solved on them alone."""
    wa, ba, wb, bb = sources
    din = None if S is None else (S.shape[0] - 1) // 2
    units = out_map.size // per_out
    if in_map.size != units * per_in:
        raise ValueError(f"{in_map.size} merged input entries for {units} conv groups of {per_in}")
    parts = []
    fallback = False
    for f in range(units):
        out_rows, in_rows = slice(f * per_out, (f + 1) * per_out), slice(f * per_in, (f + 1) * per_in)
        ua, ub = _unit(out_map.idx_a[out_rows], per_out), _unit(out_map.idx_b[out_rows], per_out)
        ia, ib = max(ua, 0), max(ub, 0)  # an absent side's block is read by no map entry
        ra = slice(ia * per_out, (ia + 1) * per_out)
        rb = slice(ib * per_out, (ib + 1) * per_out)
        src = (wa[ra], ba[ra], wb[rb], bb[rb])
        S_f = targets = None  # source moments deferred to the refinement: `merged` alone
        if S is not None:
            sel = torch.cat([torch.arange(ia * per_in, (ia + 1) * per_in),
                             din + torch.arange(ib * per_in, (ib + 1) * per_in), torch.tensor([2 * din])]).to(S.device)
            S_f = S[sel][:, sel]
            targets = source_targets(S_f, *src)
        sol = solve_layer(S_f, targets, src, _rows(in_map, in_rows, ia * per_in, ib * per_in),
                          _rows(out_map, out_rows, ia * per_out, ib * per_out), has_bias, ridge, method,
                          merged=None if merged is None else merged[f])
        fallback = fallback or sol.fallback
        parts.append(sol)
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=wa.dtype, device=wa.device)
    weight = torch.cat([p.weight for p in parts]) if parts else torch.zeros(0, per_in, dtype=wa.dtype, device=wa.device)
    bias = cat([p.bias for p in parts]) if has_bias else None
    return LayerSolution(weight, bias, cat([p.mean for p in parts]), cat([p.var for p in parts]), fallback)
