"""The linear algebra of the fill pass, free of torch.fx: mapping tensors through a merge
(W = M_out blkdiag(W_A, W_B) U_in) and the per-layer least-squares solves.

A layer's solve reads only the second moments S = E[s s^T] of its stacked input
s = [x_A; x_B; 1] (float64), the two source layers (with any folded normalisation), and the
axis maps of its input and output. Merged input entries are ordered [shared | A-only |
B-only] (then the constant), so the structurally zero blocks (A-only outputs reading B-only
inputs and the reverse) are never written.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pleas_fx.core.ir import AxisMap

SOLVES = ("least_squares", "regmean", "mapped", "adam")
GRAM_CHUNK_BYTES = 4 * 2**20  # rows of M S gathered at a time by `StackedMerge.gram`


# --------------------------------------------------------------------------- mapping through M
def _index(t: torch.Tensor, axis: int, idx: np.ndarray) -> torch.Tensor:
    return t.index_select(axis, torch.as_tensor(np.maximum(idx, 0), device=t.device))


def _along(w: np.ndarray, axis: int, ndim: int, like: torch.Tensor) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return torch.as_tensor(w, dtype=like.dtype, device=like.device).reshape(shape)


def zip_tensors(ta: torch.Tensor, tb: torch.Tensor, maps: list[AxisMap], roles: list[str],
                dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Merge two tensors axis by axis: M (average merged features) on the first feature axis,
    U (copy) on every other non-frozen axis; all-frozen tensors are averaged. This is the
    mapped weight W = M_out blkdiag(W_A, W_B) U_in, axis by axis; a ZipIt!-style map (two
    sources of one model in a merged feature) sums that side's terms. Computed in `dtype`
    (activations merged as targets stay in their own precision)."""
    ta, tb = ta.to(dtype), tb.to(dtype)
    primary = next((i for i, (m, r) in enumerate(zip(maps, roles)) if r == "out" and not m.frozen), None)
    if primary is None:
        primary = next((i for i, r in enumerate(roles) if r == "out"), None)
    out = None
    for side, t in ((0, ta), (1, tb)):
        for axis, m in enumerate(maps):
            terms = m.terms(side)
            if axis != primary and m.frozen:
                t = _index(t, axis, terms[0][0])
                continue
            parts = [_index(t, axis, idx) * _along(w_m if axis == primary else w_u, axis, t.dim(), t)
                     for idx, w_m, w_u in terms]
            t = parts[0] if len(parts) == 1 else sum(parts[1:], parts[0])
        if primary is None:
            t = 0.5 * t
        out = t if out is None else out + t
    return out


class StackedMerge:
    """M_in from the stacked input [A entries; B entries; 1] (2*din + 1) to the merged entries
    listed in `order` (index in_map.size stands for the constant), applied to an axis of a
    tensor as two weighted gathers (each merged entry reads at most one A and one B entry):
    row gathers of contiguous rows, never a transposed copy."""

    def __init__(self, in_map: AxisMap, din: int, order: np.ndarray, device):
        w_a, w_b = in_map.weights()
        is_const = order == in_map.size
        e = np.where(is_const, 0, order)
        has_a, has_b = ~is_const & (in_map.idx_a[e] >= 0), ~is_const & (in_map.idx_b[e] >= 0)
        idx_a = np.where(is_const, 2 * din, np.where(has_a, in_map.idx_a[e], 0))
        idx_b = np.where(has_b, din + in_map.idx_b[e], 0)
        self.idx = [torch.as_tensor(i, device=device) for i in (idx_a, idx_b)]
        self.w = [np.where(is_const, 1.0, np.where(has_a, w_a[e], 0.0)), np.where(has_b, w_b[e], 0.0)]

    def apply(self, t: torch.Tensor, axis: int) -> torch.Tensor:
        """t with `axis` (size 2*din + 1) mapped through M_in (size len(order))."""
        out = None
        for idx, w in zip(self.idx, self.w):
            part = t.index_select(axis, idx) * _along(w, axis, t.dim(), t)
            out = part if out is None else out.add_(part)
        return out

    def gram(self, S: torch.Tensor, chunk_bytes: int = GRAM_CHUNK_BYTES) -> torch.Tensor:
        """M S M^T: second moments of the modelled merged inputs, a few rows at a time (each
        chunk of M S stays in cache while its row of blocks of the result is gathered: one
        read of S's rows instead of several passes over d^2 intermediates)."""
        k = len(self.w[0])
        w = [torch.as_tensor(x, dtype=S.dtype, device=S.device) for x in self.w]
        out = torch.empty(k, k, dtype=S.dtype, device=S.device)
        step = max(1, chunk_bytes // (S.shape[1] * S.element_size()))
        for start in range(0, k, step):
            rows = slice(start, start + step)
            t = S.index_select(0, self.idx[0][rows]).mul_(w[0][rows, None])
            t.add_(S.index_select(0, self.idx[1][rows]).mul_(w[1][rows, None]))
            block = out[rows]
            block.copy_(t.index_select(1, self.idx[0])).mul_(w[0][None, :])
            block.add_(t.index_select(1, self.idx[1]).mul_(w[1][None, :]))
        return out


# --------------------------------------------------------------------------- least squares
@dataclass
class LayerSolution:
    """A merged layer x~ -> weight x~ + bias (bias None without a constant input), and the
    predicted mean and variance of its outputs over the calibration inputs."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    mean: torch.Tensor
    var: torch.Tensor
    fallback: bool = False  # the solve was ill-conditioned: the mapped weights were used


def mapped_weight(sources, in_map: AxisMap, out_map: AxisMap) -> torch.Tensor:
    """W0 = M_out blkdiag([W_A b_A], [W_B b_B]) U_in: the permute-and-average weight of the
    bias-augmented source layers `sources` = (W_A, b_A, W_B, b_B), columns in input order, the
    constant last."""
    wa, ba, wb, bb = sources
    din = wa.shape[1]
    maps0 = [out_map, AxisMap(np.append(in_map.idx_a, din), np.append(in_map.idx_b, din), in_map.frozen)]
    return zip_tensors(torch.cat([wa, ba[:, None]], 1), torch.cat([wb, bb[:, None]], 1), maps0, ["out", "in"])


def kept_apart_solution(targets, sources, in_map: AxisMap, out_map: AxisMap, has_bias: bool) -> "LayerSolution":
    """A layer whose input and output features are all kept apart (passes/kept_apart.py): each
    output row is its source's row on its source's inputs, the mapped weight W0, which fits the
    targets exactly (so it is the least-squares solution); each output's mean and variance are
    its source output's, from `targets` = E[y_s s^T] (`source_targets`): no Gram, no factor."""
    wa, ba, wb, bb = sources
    din = wa.shape[1]
    W0 = mapped_weight(sources, in_map, out_map)
    moments = []
    for y, w, b, own in ((targets[0], wa, ba, slice(0, din)), (targets[1], wb, bb, slice(din, 2 * din))):
        mean = y[:, 2 * din]  # E[y]; E[y^2] = w E[x_own y] + b E[y]
        moments.append((mean, (y[:, own] * w).sum(1) + b * mean - mean**2))
    (mean_a, var_a), (mean_b, var_b) = moments
    mean = zip_tensors(mean_a, mean_b, [out_map], ["out"])
    var = zip_tensors(var_a, var_b, [out_map], ["out"])
    n_in = in_map.size
    return LayerSolution(W0[:, :n_in], W0[:, n_in] if has_bias else None, mean, var)


def source_targets(S: torch.Tensor, wa, ba, wb, bb) -> tuple[torch.Tensor, torch.Tensor]:
    """E[y_s s^T] for each source layer s (rows: that layer's outputs), from S = E[s s^T]."""
    din = wa.shape[1]
    ya = torch.addr(wa @ S[:din], ba, S[2 * din])
    yb = torch.addr(wb @ S[din:2 * din], bb, S[2 * din])
    return ya, yb


@dataclass
class MergedInputs:
    """What merged-input least squares reads for one layer, measured on the merged network:
    `gram` = E[x~ x~^T] of its input x~ (bias-augmented, constant last: n_in + 1 square),
    `target_cross` = E[y~ x~^T] with the layer's merged target y~ = M_out [y_A; y_B] (the source
    layers' outputs on the same samples; (m_out, n_in + 1)), and `target_sq` = E[y~^2] per row."""

    gram: torch.Tensor
    target_cross: torch.Tensor
    target_sq: torch.Tensor


KEEP_SOURCE_RESIDUAL = 1e-4  # relative residual below which the source-input solution is kept
CANDIDATE_MARGIN = 1e-2  # the residual bound's slack for rounding (relative to the threshold)


def factor(G: torch.Tensor, reg: torch.Tensor, ridge: float) -> tuple[torch.Tensor | None, float]:
    """Cholesky factor of G + lam*diag(reg), lam scale-aware (ridge x the mean input second
    moment), raised tenfold until the factorisation succeeds; (None, lam) if it never does."""
    diag = torch.diagonal(G)[reg > 0]
    scale = float(diag.mean()) if diag.numel() else 1.0
    lam = ridge * max(scale, 1e-12)
    for _ in range(8):
        A = G.clone()
        A.diagonal().add_(lam * reg)
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            return L, lam
        lam *= 10.0
    return None, lam


def solve_layer(S: torch.Tensor | None, targets: tuple[torch.Tensor, torch.Tensor] | None, sources, in_map: AxisMap,
                out_map: AxisMap, has_bias: bool, ridge: float, method: str = "least_squares",
                merged: "MergedInputs | None" = None) -> LayerSolution:
    """The merged layer W = argmin E||W M_in s - M_out [y_A; y_B]||^2 + lam ||W - W0||^2
    (method "least_squares"), or RegMean's objective ("regmean"), with A-only rows reading only
    [shared | A-only] inputs and B-only rows only [shared | B-only]. `sources` = (wa, ba, wb, bb),
    (out, in) matrices and bias vectors in float64; `targets` = source_targets(S, *sources).
    W0 = M_out blkdiag(W_A, W_B) U_in, the permute-and-average weight, is the ridge's anchor and
    the fallback where the factorisation fails.

    `merged` (method "least_squares" only): the merged network's own inputs x~ at this layer
    (merged-input least squares): W = argmin E||W x~ - M_out [y_A; y_B]||^2 + lam ||W - W0||^2,
    with E[x~ x~^T] and E[[y_A; y_B] x~^T] measured on the merged network whose earlier layers are
    already filled, instead of the model x~ = M_in s. `S` None (the statistics pass deferred this
    layer's source moments to the refinement): solved on `merged` alone, the rows that W0 already
    fits kept (see `_merged_solve`)."""
    wa, ba, wb, bb = sources
    din = wa.shape[1]
    n_in = in_map.size
    in_a = np.append(in_map.idx_a >= 0, True)[: n_in + has_bias]
    in_b = np.append(in_map.idx_b >= 0, True)[: n_in + has_bias]
    blocks = [np.flatnonzero(in_a & in_b), np.flatnonzero(in_a & ~in_b), np.flatnonzero(~in_a & in_b)]
    order = np.concatenate(blocks)
    n_s, n_a = len(blocks[0]), len(blocks[1])
    order_t = torch.as_tensor(order, device=wa.device)
    W0 = mapped_weight(sources, in_map, out_map).index_select(1, order_t)
    reg = torch.ones(len(order), dtype=W0.dtype, device=W0.device)
    reg[order_t == n_in] = 0.0  # the bias (constant input) is not regularised
    if S is None:  # no source moments (deferred to the refinement): the measured inputs alone
        G, W_ord, ok, WG = _merged_solve(merged, out_map, order_t, W0, W0, reg, n_s, n_a, ridge)
        return _solution(W_ord, G, order_t, n_in, has_bias, ok, WG)
    ya, yb = targets
    M = StackedMerge(in_map, din, order, S.device)
    G = M.gram(S)  # M S M^T: second moments of the modelled merged inputs
    WG = None
    if method == "regmean":
        W_ord, ok = solve_regmean(S, ya, yb, in_map, out_map, order, din, W0, reg, n_s, n_a, ridge)
    elif method == "adam":
        R0 = zip_tensors(ya, yb, [out_map], ["out"])
        W_ord, ok = solve_adam(G, M.apply(R0, 1), W0, n_s, n_a, out_map), True
    else:
        R0 = zip_tensors(ya, yb, [out_map], ["out"])  # (m_out, D): target rows mapped through M_out
        R = M.apply(R0, 1)  # E[target x~^T]
        W_ord, ok, WG = solve_structured(G, R, W0, reg, n_s, n_a, out_map, ridge)
        if merged is not None:
            G, W_ord, ok, WG = _merged_solve(merged, out_map, order_t, W_ord, W0, reg, n_s, n_a, ridge)
    return _solution(W_ord, G, order_t, n_in, has_bias, ok, WG)


def _solution(W_ord, G, order_t, n_in: int, has_bias: bool, ok: bool, WG: torch.Tensor | None = None
              ) -> LayerSolution:
    """The layer in input order, with its outputs' mean and variance under the Gram G. `WG`:
    W_ord G wherever W_ord is nonzero (from the normal equations, `solve_structured`); None: the
    product is taken here (m d^2, the cost of a second solve)."""
    W = torch.zeros(W_ord.shape[0], n_in + has_bias, dtype=W_ord.dtype, device=W_ord.device)
    W[:, order_t] = W_ord
    if WG is None:
        WG = W_ord @ G
    mean = WG[:, int(torch.nonzero(order_t == n_in)[0])] if has_bias else torch.zeros(W.shape[0], dtype=W.dtype,
                                                                                      device=W.device)
    var = (WG * W_ord).sum(1) - mean**2
    return LayerSolution(W[:, :n_in], W[:, n_in] if has_bias else None, mean, var, fallback=not ok)


def _merged_solve(merged: MergedInputs, out_map: AxisMap, order_t, W_src, W0, reg, n_s: int, n_a: int,
                  ridge: float):
    """Merged-input least squares: (E[x~ x~^T], W, ok, W E[x~ x~^T] or None), W solved on the
    measured inputs. Rows that the candidate `W_src` (the source-input solution, or W0 where the
    source moments were not collected) already fits on the measured inputs to a relative
    residual below KEEP_SOURCE_RESIDUAL keep it: there the merged inputs equal the modelled ones
    (budget 2, a self-merge: both candidates are exact) up to rounding, which the solve would
    only amplify."""
    k = len(order_t)
    if torch.equal(order_t, torch.arange(k, device=order_t.device)):  # every input shared: no gather
        G, R = merged.gram[:k, :k], merged.target_cross[:, :k]
    else:
        G, R = merged.gram[order_t][:, order_t], merged.target_cross.index_select(1, order_t)  # R: E[target x~^T]
    W, ok, WG = solve_structured(G, R, W0, reg, n_s, n_a, out_map, ridge)
    t2 = merged.target_sq  # E[target^2] per row
    limit = KEEP_SOURCE_RESIDUAL * t2.clamp_min(1e-30)
    rows = torch.arange(W.shape[0], device=W.device)
    if WG is not None:
        rows = rows[_source_residual_bound(W, WG, W_src, R, t2) <= limit * (1 + CANDIDATE_MARGIN)]
    if len(rows):
        w_src = W_src[rows]
        src_G = w_src @ G
        fits = (src_G * w_src).sum(1) - 2 * (w_src * R[rows]).sum(1) + t2[rows] <= limit[rows]
        W[rows[fits]] = w_src[fits]
        if WG is not None:
            WG[rows[fits]] = src_G[fits]
    return G, W, ok, WG


def _source_residual_bound(W, WG, W_src, R, t2):
    """Per row, a lower bound on the candidate's residual E||W_src x~ - t||^2 from the solution's,
    with no m d^2 product: for D = W_src - W, res(W_src) = res(W) + 2 D (W G - R)^T + D G D^T,
    G is a Gram (D G D^T >= 0), and W G is `WG` wherever W or D is nonzero (both are zero on a
    row's structurally zero columns). Rows whose bound exceeds the threshold cannot keep the
    candidate, so its exact residual is taken only for the others (at budget 1 few or none; at
    budget 2 and in a self-merge all)."""
    res = (WG * W).sum(1) - 2 * (W * R).sum(1) + t2
    return res + 2 * ((WG - R) * (W_src - W)).sum(1)


def solve_structured(G, R, W0, reg, n_s: int, n_a: int, out_map: AxisMap, ridge: float):
    """Ridge least squares W (G + lam) = R + lam W0 with columns ordered [shared | A-only |
    B-only], solved per row block so that A-only outputs read only inputs A has and B-only
    outputs only inputs B has: the cross blocks stay exactly zero. One Cholesky factor L
    serves all three blocks: its leading block factors [shared | A-only], and
    [shared | B-only] needs only the Schur complement of the B-only block. Returns (W, ok, WG),
    WG = W G on every column a row reads (by the normal equations, W (G + lam reg) = rhs: no
    m d^2 product; not on the others, where W is 0); (W0, False, None) where the factorisation
    fails."""
    L, lam = factor(G, reg, ridge)
    if L is None:
        return W0, False, None
    rhs = R + lam * W0 * reg[None, :]
    out_a, out_b = out_map.idx_a >= 0, out_map.idx_b >= 0
    W = torch.zeros_like(W0)
    both, only_a, only_b = (np.flatnonzero(m) for m in (out_a & out_b, out_a & ~out_b, ~out_a & out_b))
    if len(both):
        r = torch.as_tensor(both, device=W.device)
        W[r] = torch.cholesky_solve(rhs[r].T, L).T
    if len(only_a):
        r, k = torch.as_tensor(only_a, device=W.device), n_s + n_a
        W[r, :k] = torch.cholesky_solve(rhs[r, :k].T, L[:k, :k]).T
    if len(only_b):
        r = torch.as_tensor(only_b, device=W.device)
        keep = torch.cat([torch.arange(n_s), torch.arange(n_s + n_a, G.shape[0])]).to(W.device)
        l_bs = L[n_s + n_a:, :n_s]
        schur = G[n_s + n_a:, n_s + n_a:].clone()
        schur.diagonal().add_(lam * reg[n_s + n_a:])
        l_bb = torch.linalg.cholesky(schur - l_bs @ l_bs.T)
        top = torch.cat([L[:n_s, :n_s], torch.zeros(n_s, l_bb.shape[0], dtype=L.dtype, device=L.device)], 1)
        l_b = torch.cat([top, torch.cat([l_bs, l_bb], 1)], 0)
        W[r[:, None], keep[None, :]] = torch.cholesky_solve(rhs[r][:, keep].T, l_b).T
    WG = rhs - lam * W * reg[None, :]  # right on the columns each row solved for (elsewhere W is 0)
    return W, True, WG


def solve_adam(G, R, W0, n_s: int, n_a: int, out_map: AxisMap, steps: int = 400, lr: float = 5e-4):
    """The official PLeaS code's solver, as a baseline: the same layer-wise objective
    E||W x~ - t||^2 (x~ = M_in s) minimised by Adam (lr `lr`, cosine decay to 0, `steps` steps)
    from the permute-and-average weight W0, with the structurally zero blocks masked. The
    gradient is the exact one from the moments, 2 (W G - R) / (rows), i.e. the expectation of
    the official code's minibatch gradient. Early stopping keeps W near W0."""
    out_a, out_b = out_map.idx_a >= 0, out_map.idx_b >= 0
    mask = torch.ones_like(W0)
    mask[torch.as_tensor(out_a & ~out_b, device=W0.device), n_s + n_a:] = 0.0
    mask[torch.as_tensor(~out_a & out_b, device=W0.device), n_s:n_s + n_a] = 0.0
    W = (W0 * mask).float().clone().requires_grad_(True)
    opt = torch.optim.Adam([W], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    Gf, Rf, maskf = G.float(), R.float(), mask.float()
    for _ in range(steps):
        opt.zero_grad()
        W.grad = 2.0 * (W.detach() @ Gf - Rf) * maskf / max(W.shape[0], 1)
        opt.step()
        sched.step()
    return W.detach().double() * mask


def solve_regmean(S, ya, yb, in_map: AxisMap, out_map: AxisMap, order: np.ndarray, din: int,
                  W0, reg, n_s: int, n_a: int, ridge: float):
    """RegMean (Jin et al., ICLR 2023) on the merged axes: W = argmin sum_s E||W x~_s - y_s||^2
    (+ ridge towards W0) over the rows that model s feeds, where x~_s is the merged input as
    model s sees it: its own feature at every entry it feeds, the other model's feature at an
    entry only the other model feeds. At identity plans and budget 1 this is RegMean's
    W = (W_A G_A + W_B G_B)(G_A + G_B)^-1 with G_s = E[x_s x_s^T] (bias-augmented); at budget 2
    it returns the ensemble. Rows of a feature kept for one model read only that model's
    inputs, with that model's objective alone. Returns (W, ok)."""
    n_in = in_map.size
    const = order == n_in
    e = np.where(const, 0, order)
    ia, ib = in_map.idx_a[e], in_map.idx_b[e]
    own_a = np.where(ia >= 0, ia, din + ib)
    own_b = np.where(ib >= 0, din + ib, ia)
    sel = [torch.as_tensor(np.where(const, 2 * din, own), device=S.device) for own in (own_a, own_b)]
    grams = [S[s][:, s] for s in sel]  # E[x~_s x~_s^T]
    rhs_src = [y[:, s] for y, s in zip((ya, yb), sel)]  # E[y_s x~_s^T]
    W = torch.zeros_like(W0)
    ok = True
    has_a, has_b = out_map.idx_a >= 0, out_map.idx_b >= 0
    for rows, cols, gram, parts in (
        (has_a & has_b, np.arange(len(order)), grams[0] + grams[1], ((0, out_map.idx_a), (1, out_map.idx_b))),
        (has_a & ~has_b, np.arange(n_s + n_a), grams[0], ((0, out_map.idx_a),)),
        (~has_a & has_b, np.concatenate([np.arange(n_s), np.arange(n_s + n_a, len(order))]), grams[1],
         ((1, out_map.idx_b),)),
    ):
        r = np.flatnonzero(rows)
        if not len(r):
            continue
        c = torch.as_tensor(cols, device=W.device)
        r_t = torch.as_tensor(r, device=W.device)
        L, lam = factor(gram[c][:, c], reg[c], ridge)
        if L is None:
            W[r_t[:, None], c[None, :]] = W0[r_t][:, c]
            ok = False
            continue
        rhs = sum(rhs_src[side][torch.as_tensor(idx[r], device=W.device)][:, c] for side, idx in parts)
        rhs = rhs + lam * W0[r_t][:, c] * reg[c][None, :]
        W[r_t[:, None], c[None, :]] = torch.cholesky_solve(rhs.T, L).T
    return W, ok


def safe_inverse(scale: torch.Tensor) -> torch.Tensor:
    """1 / scale, with 1 where scale is zero or the inverse not finite."""
    inv = 1.0 / scale
    return torch.where(torch.isfinite(inv) & (scale.abs() > 1e-12), inv, torch.ones_like(inv))
