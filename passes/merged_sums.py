"""Running sums of merged-input least squares (passes/merged_inputs.py), one layer of one merged
model at a time: E[x~ x~^T] of the merged input (im2col patches for a convolution: exact by
passes/patch_moments.py with one map, or at drawn output positions, passes/positions.py),
E[y~ x~^T] against the merged target y~ (for a convolution at every position: the weight
gradient of a convolution with output gradient y~, one backward convolution, or from the
im2col patches where they are small) and E[y~^2],
summed in float64. A grouped convolution keeps one set per conv group, over its own inputs."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pleas_fx.core.ir import WeightNode
from pleas_fx.passes.linalg import MergedInputs
from pleas_fx.passes.moments import SecondMoments, accumulate_rows
from pleas_fx.passes.patch_moments import conv_patch_sums
from pleas_fx.passes.patch_plan import node_output_size, node_pads, patches_at
from pleas_fx.passes.positions import conv_positions, draw

CHUNK_ROWS = 8192  # rows per low-precision product before the float64 sum
UNFOLD_BYTES = 2**22  # a batch's im2col patches up to this size: E[y~ x~^T] from them (`_target_cross`)


@dataclass
class Sums:
    """Running sums for one layer of one merged model: x~ (gram), y~ x~^T (cross), y~, y~^2."""

    gram: SecondMoments
    cross: torch.Tensor
    sum_y: torch.Tensor
    sq_y: torch.Tensor

    def mean(self) -> MergedInputs:
        n = max(self.gram.count, 1)
        m = self.gram.dim_a
        cross = torch.cat([self.cross, self.sum_y[:, None]], 1) / n  # E[y~ [x~; 1]^T]
        return MergedInputs(self.gram.mean()[: m + 1, : m + 1], cross, self.sq_y / n)


@dataclass
class GroupedSums:
    """Running sums of a grouped convolution, one `Sums` per merged conv group over that group's
    own input channels (the layer's input Gram is block-diagonal: only its diagonal blocks)."""

    parts: list[Sums]

    @property
    def gram(self) -> SecondMoments:  # rows and input width, the same in every conv group
        return self.parts[0].gram

    def mean(self) -> list[MergedInputs]:
        return [p.mean() for p in self.parts]


def accumulate_grouped(acc: GroupedSums | None, w: WeightNode, xm: torch.Tensor, y: torch.Tensor, per_in: int,
                        rows: "Rows", dtype) -> GroupedSums:
    """`_accumulate` for a grouped convolution: conv group f of the merged layer reads input
    channels [f per_in, (f + 1) per_in) and writes its share of the output channels."""
    groups = xm.shape[1] // per_in
    per_out = y.shape[1] // groups
    parts = acc.parts if acc is not None else [None] * groups
    for f in range(groups):
        parts[f] = accumulate(parts[f], w, xm[:, f * per_in:(f + 1) * per_in], y[:, f * per_out:(f + 1) * per_out],
                               rows, dtype)
    return GroupedSums(parts)


@dataclass
class Rows:
    """Which output positions a batch's convolution moments read: `positions` (None, a count per
    sample or AUTO over `samples` samples; passes/positions.py), drawn from `gen`."""

    positions: int | str | None
    samples: int
    gen: torch.Generator


def _target_cross(xm: torch.Tensor, y: torch.Tensor, w: WeightNode, pads) -> torch.Tensor:
    """sum over samples and positions of y~ x~^T for a convolution, every position: from the
    im2col patches where they are small (UNFOLD_BYTES), else as the weight gradient of a
    convolution with output gradient y~ (one backward convolution, no patches). Small maps take
    the patches also because torch's weight-gradient kernel corrupted the heap on a net of
    one-channel maps (fuzz seed 7062 at budgets 1.3 / 1.7 / 2; not reproduced outside it)."""
    (pt, pb), (pl, pr) = pads
    xp = F.pad(xm, (pl, pr, pt, pb)) if (pt, pl) != (pb, pr) else xm
    padding = (pt, pl) if (pt, pl) == (pb, pr) else 0
    taps = xm.shape[1] * w.kernel[0] * w.kernel[1]
    if xm.shape[0] * taps * y.shape[2] * y.shape[3] * xm.element_size() <= UNFOLD_BYTES:
        cols = F.unfold(xp, w.kernel, dilation=w.dilation, padding=padding, stride=w.stride)  # (N, taps, L)
        return torch.einsum("nol,ncl->oc", y.flatten(2), cols)
    grad = torch.nn.grad.conv2d_weight(xp, (y.shape[1], xm.shape[1], *w.kernel), y, w.stride, padding, w.dilation)
    return grad.reshape(grad.shape[0], -1)


def row_count(w: WeightNode, xm: torch.Tensor, rows: Rows, per_in: int | None = None) -> tuple[int, int]:
    """(rows per sample, input entries per row) that `accumulate` (`accumulate_grouped` with
    `per_in` input channels per conv group) reads from a batch with merged input `xm`."""
    if w.kind == "linear":
        return math.prod(xm.shape[1:-1]), xm.shape[-1]
    x = xm.unsqueeze(2) if xm.dim() == 3 else xm
    x = x[:, :per_in] if per_in is not None else x
    dim = x.shape[1] * w.taps
    positions = conv_positions(rows.positions, w, x, dim, rows.samples)
    if positions is None:
        out_h, out_w = node_output_size(w, x)
        positions = out_h * out_w
    return positions, dim


def accumulate(acc: Sums | None, w: WeightNode, xm: torch.Tensor, y: torch.Tensor, rows: Rows, dtype) -> Sums:
    """Add one batch: xm the merged input, y the merged target (channels on axis 1 for a
    convolution, last for a linear layer)."""
    work = torch.promote_types(xm.dtype, torch.float32)
    xm, y = xm.to(work), y.to(work)
    if w.kind == "linear":
        fm, fy = xm.reshape(-1, xm.shape[-1]), y.reshape(-1, y.shape[-1])
    else:
        if xm.dim() == 3:  # conv1d: a conv2d of height 1
            xm, y = xm.unsqueeze(2), y.unsqueeze(2)
        fm = None
    if acc is None:
        m = xm.shape[-1] if w.kind == "linear" else xm.shape[1] * w.taps
        c_out = y.shape[-1] if w.kind == "linear" else y.shape[1]
        z = lambda *s: torch.zeros(*s, dtype=dtype, device=xm.device)
        acc = Sums(SecondMoments.zeros(m, 0, dtype, xm.device), z(c_out, m), z(c_out), z(c_out))
    if fm is not None:
        for start in range(0, fm.shape[0], CHUNK_ROWS):
            a, b = fm[start:start + CHUNK_ROWS], fy[start:start + CHUNK_ROWS]
            accumulate_rows(acc.gram, a.T, a.new_zeros(0, a.shape[0]))
            acc.cross += (b.T @ a).to(dtype)
            acc.sum_y += b.sum(0).to(dtype)
            acc.sq_y += (b * b).sum(0).to(dtype)
        return acc
    pads = node_pads(w)
    out_h, out_w = node_output_size(w, xm)
    positions = conv_positions(rows.positions, w, xm, acc.gram.dim_a, rows.samples)
    if positions is None:
        acc.sum_y += y.sum((0, 2, 3)).to(dtype)
        acc.sq_y += (y * y).sum((0, 2, 3)).to(dtype)
        conv_patch_sums(xm, None, w.kernel, w.stride, pads, w.dilation, out=acc.gram)
        acc.cross += _target_cross(xm, y, w, pads).to(dtype)  # F.unfold's order: channel, then taps
        return acc
    step = max(1, CHUNK_ROWS // positions)
    for start in range(0, xm.shape[0], step):
        idx = draw(rows.gen, out_h * out_w, positions, xm.device)
        pm = patches_at(w, xm[start:start + step], pads, idx, out_w)  # (n, D, P)
        py = y[start:start + step].flatten(2)[:, :, idx]  # (n, c_out, P)
        a, b = pm.transpose(0, 1).reshape(pm.shape[1], -1), py.transpose(0, 1).reshape(py.shape[1], -1)
        accumulate_rows(acc.gram, a, a.new_zeros(0, a.shape[1]))
        acc.cross += (b @ a.T).to(dtype)
        acc.sum_y += b.sum(1).to(dtype)
        acc.sq_y += (b * b).sum(1).to(dtype)
    return acc
