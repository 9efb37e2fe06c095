"""Exact second moments of two models' convolution patches, without im2col.

For feature maps ``xa``, ``xb`` of shape (N, C, H, W) and a convolution geometry, let
``pa = F.unfold(xa, kernel, dilation, padding, stride)`` (N, D, L) with D = C*kh*kw in
F.unfold's order (entry ``c*kh*kw + i*kw + j``), and ``pb`` likewise. `conv_patch_sums`
returns, summed over all samples and all L output positions::

    aa = sum pa pa^T   ab = sum pa pb^T   bb = sum pb pb^T   (D x D)
    sum_a = sum pa     sum_b = sum pb     (D)                count = N * L

equal to the unfold computation up to float rounding, usually at a fraction of its cost.

Algorithm ("correlation")
-------------------------
Tap (i, j) at output position (oy, ox) reads x[oy*sy + i*dy - py, ox*sx + j*dx - px] (zero
outside the map). Per axis, write the tap's offset as ``i*d - pad = a*s + r`` with
0 <= r < s: the tap reads the *phase map* Z_r[u] = x[u*s + r] at u = o + a (polyphase
decomposition; for stride 1 there is one phase, the map itself). The block of tap pair
(t1, t2) is therefore a correlation of two phase maps at the shift delta = a2 - a1,
sum_u Z_r1[u] Z_r2[u + delta]^T, over a *window* of u: [a1, a1 + Lo) clipped to where both reads
fall inside the map (zero padding contributes nothing, so it is never materialised).

Tap pairs with the same (r1, r2, delta) on both axes -- a *combo* -- correlate the same two
phase maps at the same shift and differ only in their windows, which are all nearly the whole
map. Per combo, the windows' end points cut each axis into segments; the Gram of every
(row segment, column segment) cell is computed once, and a pair's block is the sum of the cells
inside its window. The border strips where windows differ thus become their own thin cells,
added exactly: nothing is subtracted, and every map position enters a combo's product once.
The reversed pair (t2, t1) has the mirrored combo (r2, r1, -delta) and the transposed block, so
only one combo of each mirrored couple is computed. The two models are stacked along channels
(2C), so one product per cell yields the aa, ab, ba and bb blocks (ba at a combo is ab at its
mirror, transposed); on the diagonal (t1 = t2) ba is skipped.

Cost: a k x k stride-1 convolution needs ((2k-1)^2 + 1)/2 combos (13 for 3x3) of at most the map
area times (2C)^2 multiply-adds each, against 3 (k^2 C)^2 per output position for the three
unfold products (aa, ab, bb): ~4.7x fewer for a padded 3x3, ~21x for 7x7. Stride s shares less
(a 3x3 stride-2 convolution keeps 34 combos of the 81 pairs, ~1.8x), and a 1x1 convolution is
one channel Gram of the phase map its stride samples. Every cell costs a few
small products (one per row of the cell), so kernels with many taps over few channels (a
stride-k "patchify" convolution, a 7x7 first layer on RGB) are cheaper unfolded:
``method="auto"`` estimates both costs and picks the cheaper (see `estimate_seconds` (passes/patch_plan.py)).

Memory and precision: maps are copied channels-last, (H, W, n, 2C), a chunk of samples at a
time (``chunk_bytes``), so each row of a cell is one contiguous matrix and no other copy is made;
aa, ab, bb accumulate in place in the output (reordered in place between layouts, a small
block at a time); the cells of one combo at a time are kept, (2C)^2 each: below the output's
size (a 3x3 with padding 1 has at most 9 cells, 36 C^2 against the output's 243 C^2; 25
unpadded). Products run in the activations' own precision (at least float32; float64 for
float64 inputs), accumulating over one cell of one chunk; a window's cells are added, and the
running sums kept, in ``out_dtype`` (float64).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pleas_fx.passes.moments import SecondMoments, accumulate_rows
from pleas_fx.passes.patch_plan import CHUNK_BYTES, Axis, estimate_seconds, geometry, mirror

__all__ = ["conv_patch_sums"]


def _cell_gram(za: torch.Tensor, zb: torch.Tensor, sym: bool, c: int) -> torch.Tensor:
    """sum over rows, columns, samples of za[..., :, None] * zb[..., None, :], (2C, 2C).

    ``za``, ``zb``: (rows, cols, n, 2C) views of channels-last maps (each row contiguous); the
    products accumulate in their dtype. With ``sym`` (za is zb) the lower-left block (the
    transpose of the upper-right) is left 0.
    """
    rows, cols, n, c2 = za.shape
    if za.is_contiguous() and zb.is_contiguous():  # whole map rows (or one row): one product
        a, b = za.reshape(1, -1, c2), zb.reshape(1, -1, c2)
    else:  # one product per row, each a contiguous matrix (views, no copy)
        a, b = za.reshape(rows, cols * n, c2), zb.reshape(rows, cols * n, c2)
    acc = torch.empty(c2, c2, dtype=za.dtype, device=za.device)
    beta = 0  # the first product overwrites
    for ra, rb in zip(a, b):
        if sym:
            torch.addmm(acc[:c], ra[:, :c].T, ra, beta=beta, out=acc[:c])
            torch.addmm(acc[c:, c:], ra[:, c:].T, ra[:, c:], beta=beta, out=acc[c:, c:])
        else:
            torch.addmm(acc, ra.T, rb, beta=beta, out=acc)
        beta = 1
    if sym:
        acc[c:, :c] = 0
    return acc


def _swap_inner(m: torch.Tensor, c: int, taps: int, to_blocks: bool, block_bytes: int = 2**19) -> None:
    """Reorder a (C*K, C*K) matrix in place between F.unfold's order (c1, t1, c2, t2) and the
    accumulation order (c1, t1, t2, c2): each row's (C, K) part is transposed, a few rows at a
    time through a small copy."""
    if taps == 1 or c == 1 or m.numel() == 0:
        return
    rows = m.view(c * taps, c * taps)
    step = max(1, block_bytes // (rows.shape[1] * m.element_size()))
    for r0 in range(0, rows.shape[0], step):
        part = rows[r0:r0 + step]
        tmp = part.clone()
        if to_blocks:
            part.view(-1, taps, c).copy_(tmp.view(-1, c, taps).transpose(1, 2))
        else:
            part.view(-1, c, taps).copy_(tmp.view(-1, taps, c).transpose(1, 2))


def _correlation(out: SecondMoments, xa: torch.Tensor, xb: torch.Tensor, kernel, stride, ay: Axis, ax: Axis,
                 chunk_bytes: int) -> None:
    """Add the sums into ``out``, whose aa, ab, bb are in the order (c1, t1, t2, c2). ``xb``
    None: one map, only aa and sum_a."""
    n_total, c, h, w = xa.shape
    two = xb is not None
    kw, taps, c2, device = kernel[1], kernel[0] * kernel[1], (2 if two else 1) * c, xa.device
    work = torch.promote_types(torch.promote_types(xa.dtype, xb.dtype if two else xa.dtype), torch.float32)
    item = torch.empty((), dtype=work).element_size()
    acc_dtype = out.aa.dtype
    blocks = [m.view(c, taps, taps, c) for m in ((out.aa, out.ab, out.bb) if two else (out.aa,))]

    plan = []  # 2-D combos to compute: one of each mirrored couple
    for ky, cy in ay.combos.items():
        for kx, cx in ax.combos.items():
            mirrored = (mirror(ky), mirror(kx))
            if (ky, kx) <= mirrored:
                plan.append((ky, cy.segments(), cy.pairs, kx, cx.segments(), cx.pairs, (ky, kx) == mirrored))
    phases = sorted({(p[0][0], p[3][0]) for p in plan} | {(p[0][1], p[3][1]) for p in plan})
    map_sum = torch.zeros(c2, h, w, dtype=acc_dtype, device=device)  # per-position sums over samples

    per_sample = max(1, sum(ay.lengths[ry] * ax.lengths[rx] for ry, rx in phases) * c2 * item)
    step = max(1, chunk_bytes // per_sample)
    sy, sx = stride
    for n0 in range(0, n_total, step):
        ca = xa[n0:n0 + step]
        cb = xb[n0:n0 + step] if two else None
        maps = {}
        for ry, rx in phases:  # channels-last phase maps (rows, cols, n, 2C), both models stacked
            z = torch.empty(ay.lengths[ry], ax.lengths[rx], ca.shape[0], c2, dtype=work, device=device)
            z[..., :c].copy_(ca[:, :, ry::sy, rx::sx].permute(2, 3, 0, 1))
            if two:
                z[..., c:].copy_(cb[:, :, ry::sy, rx::sx].permute(2, 3, 0, 1))
            maps[ry, rx] = z
        map_sum[:c] += ca.sum(0, dtype=work).to(acc_dtype)
        if two:
            map_sum[c:] += cb.sum(0, dtype=work).to(acc_dtype)
        for ky, segs_y, pairs_y, kx, segs_x, pairs_x, sym in plan:
            za, zb = maps[ky[0], kx[0]], maps[ky[1], kx[1]]
            dy, dx = ky[2], kx[2]
            cells = {(jy, jx): _cell_gram(za[y0:y1, x0:x1], zb[y0 + dy:y1 + dy, x0 + dx:x1 + dx], sym, c)
                     for jy, y0, y1 in segs_y for jx, x0, x1 in segs_x}
            for i1y, i2y, jy0, jy1 in pairs_y:
                for i1x, i2x, jx0, jx1 in pairs_x:
                    inside = [cells[jy, jx] for jy in range(jy0, jy1) for jx in range(jx0, jx1)]
                    g = inside[0]  # the pair's block: its window's cells, summed in acc_dtype
                    if len(inside) > 1:
                        g = g.to(acc_dtype, copy=True)
                        for cell in inside[1:]:
                            g += cell
                    t1, t2 = i1y * kw + i1x, i2y * kw + i2x
                    blocks[0][:, t1, t2] += g[:c, :c]
                    if not sym:  # the reversed pair (t2, t1): the transposed block
                        blocks[0][:, t2, t1] += g[:c, :c].T
                    if two:
                        blocks[1][:, t1, t2] += g[:c, c:]
                        blocks[2][:, t1, t2] += g[c:, c:]
                        if not sym:
                            blocks[1][:, t2, t1] += g[c:, :c].T
                            blocks[2][:, t2, t1] += g[c:, c:].T
        del maps

    sums = out.sum_a.view(c, taps), out.sum_b.view(-1, taps)
    for iy, (ry, y0, y1) in enumerate(ay.taps):
        for ix, (rx, x0, x1) in enumerate(ax.taps):
            if y0 < y1 and x0 < x1:  # the tap's window, on its phase map
                s = map_sum[:, ry::sy, rx::sx][:, y0:y1, x0:x1].sum((1, 2))
                sums[0][:, iy * kw + ix] += s[:c]
                if two:
                    sums[1][:, iy * kw + ix] += s[c:]


def _unfold(out: SecondMoments, xa: torch.Tensor, xb: torch.Tensor, kernel, stride, pads, dilation,
            length: int, chunk_bytes: int) -> None:
    """Add the sums into ``out`` (F.unfold's order) by unfolding a chunk of samples at a time."""
    work = torch.promote_types(torch.promote_types(xa.dtype, (xb if xb is not None else xa).dtype), torch.float32)
    dim = out.aa.shape[0]
    (pt, pb), (pl, pr) = pads
    symmetric = pt == pb and pl == pr
    step = max(1, chunk_bytes // (2 * dim * length * torch.empty((), dtype=work).element_size()))
    for n0 in range(0, xa.shape[0], step):
        ca = xa[n0:n0 + step].to(work)
        cb = xb[n0:n0 + step].to(work) if xb is not None else None
        if not symmetric:
            ca = F.pad(ca, (pl, pr, pt, pb))
            cb = F.pad(cb, (pl, pr, pt, pb)) if cb is not None else None
        unfold = lambda x: F.unfold(x, kernel, dilation=dilation, padding=(pt, pl) if symmetric else 0,
                                    stride=stride).transpose(0, 1).reshape(dim, -1)
        count = out.count
        pa = unfold(ca)  # (D, rows) each
        accumulate_rows(out, pa, unfold(cb) if cb is not None else pa.new_zeros(0, pa.shape[1]))
        out.count = count  # conv_patch_sums counts the positions once, whatever the method


@torch.no_grad()
def conv_patch_sums(xa: torch.Tensor, xb: torch.Tensor | None, kernel, stride=1, padding=0, dilation=1, *,
                    out: SecondMoments | None = None, out_dtype: torch.dtype = torch.float64,
                    method: str = "auto", chunk_bytes: int = CHUNK_BYTES) -> SecondMoments:
    """Second moments of the im2col patches of ``xa`` and ``xb`` (see the module docstring).

    Args:
        xa, xb: feature maps of one shape (N, C, H, W), on any device; a 1-D convolution's input
            is passed as (N, C, 1, W) with kernel (1, k). ``xb`` None: one map's patch moments
            only (aa and sum_a; the sums' b part has 0 entries), at about a quarter of the cost.
        kernel, stride, dilation: int or (h, w) pair, as for ``F.unfold``.
        padding: zero padding: int or (h, w) pair (both sides), ((top, bottom), (left, right)),
            or ``"valid"`` / ``"same"`` (torch's convention: an odd total puts the extra
            row/column after). Other padding modes (reflect, circular) must be applied to the
            inputs beforehand.
        out: running sums (D = C*kh*kw) to add this batch into, in place; a new
            :class:`SecondMoments` of ``out_dtype`` if None.
        method: ``"correlation"`` (the module docstring's algorithm), ``"unfold"`` (im2col and
            three products, a chunk at a time), or ``"auto"``: the cheaper by
            :func:`estimate_seconds`. All give the same sums up to rounding.
        chunk_bytes: bound on the per-chunk working copy of the maps (channels-last maps, or
            the unfolded patches; at least one sample); larger chunks mean larger products.

    Returns the sums (``out`` if given), on the inputs' device.
    """
    if xa.dim() != 4 or (xb is not None and xa.shape != xb.shape):
        raise ValueError(f"expected two (N, C, H, W) maps of one shape, got {tuple(xa.shape)}, "
                         f"{None if xb is None else tuple(xb.shape)}")
    kernel, stride, pads, dilation, ay, ax = geometry(xa.shape, kernel, stride, padding, dilation)
    dim, taps = xa.shape[1] * kernel[0] * kernel[1], kernel[0] * kernel[1]
    fresh = out is None
    dim_b = dim if xb is not None else 0
    if fresh:
        out = SecondMoments.zeros(dim, dim_b, out_dtype, xa.device)
    elif out.aa.shape != (dim, dim) or out.dim_b != dim_b:
        raise ValueError(f"out has dimension {out.aa.shape[0]}, patches have {dim}")
    if method == "auto":
        work = torch.promote_types(torch.promote_types(xa.dtype, (xb if xb is not None else xa).dtype), torch.float32)
        cost = estimate_seconds(xa.shape, kernel, stride, pads, dilation, device=xa.device, chunk_bytes=chunk_bytes,
                                itemsize=torch.empty((), dtype=work).element_size())
        method = min(cost, key=cost.get)
    if method == "unfold":
        _unfold(out, xa, xb, kernel, stride, pads, dilation, ay.out * ax.out, chunk_bytes)
    elif method == "correlation":
        c = xa.shape[1]
        if not fresh:  # existing sums: to the accumulation order (zeros are in any order)
            for m in (out.aa, out.ab, out.bb):
                _swap_inner(m, c, taps, to_blocks=True)
        try:
            _correlation(out, xa, xb, kernel, stride, ay, ax, chunk_bytes)
        finally:
            for m in (out.aa, out.ab, out.bb):
                _swap_inner(m, c, taps, to_blocks=False)
    else:
        raise ValueError(f"unknown method {method!r}")
    out.count += xa.shape[0] * ay.out * ax.out
    return out
