"""Fill pass: the merged model's weights.

- Weight nodes (Linear, groups=1 convolutions) solve, in closed form from the statistics,
  W = argmin E||W M_in [x_A; x_B; 1] - M_out [y_A; y_B]||^2 + lam ||W - W0||^2, where y is the
  node's output after an eval-mode BatchNorm that directly follows it (folded into the
  target) and W0 = M_out blkdiag(W_A, W_B) U_in is the permute-and-average weight. Pulling the
  ridge towards W0 rather than 0 keeps the solution exact wherever W0 already is exact (budget 2,
  self-merge) and falls back to it in directions the data never excited.
- Depthwise convolutions and other per-channel parameters are mapped through M (BatchNorm
  folded first), every other tensor through M on its feature axes and U on contracted axes.

`plan_least_squares` decides which nodes are solved; `fill` writes the values into a widened
module (from passes/widen.py) for one set of group plans.
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from pleas_fx.errors import PleasError
from pleas_fx.ir import AxisMap, GroupPlan, GroupSpec, LeastSquaresNode, axis_map
from passes.statistics import Statistics
from passes.trace import getattr_path

log = logging.getLogger(__name__)

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _following_batchnorm(gm: fx.GraphModule, node: fx.Node) -> str | None:
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_module":
        mod = gm.get_submodule(users[0].target)
        if isinstance(mod, BATCHNORMS) and mod.track_running_stats and mod.affine and users[0].args[0] is node:
            return users[0].target
    return None


def _pair(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def plan_least_squares(gm: fx.GraphModule, spec: GroupSpec, max_dim: int) -> tuple[list[LeastSquaresNode], list[str]]:
    """The weight nodes solved by least squares, and notes on the ones that are not."""
    nodes, notes = [], []
    seen_modules: set[str] = set()
    calls = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.Linear):
            probe = LeastSquaresNode(node.name, node.target, "linear", norm=_following_batchnorm(gm, node))
            in_dim = mod.in_features
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d)) and mod.groups == 1:
            if mod.padding_mode != "zeros" or isinstance(mod.padding, str) and mod.padding != "valid":
                if mod.padding != "same" or mod.padding_mode != "zeros":
                    notes.append(f"{node.target}: padding mode {mod.padding_mode!r} is mapped, not solved")
                    continue
            n = 1 if isinstance(mod, nn.Conv1d) else 2
            kernel = _pair(mod.kernel_size, n)
            dilation = _pair(mod.dilation, n)
            if mod.padding == "same":
                padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))
                if any(k % 2 == 0 for k in kernel):
                    notes.append(f"{node.target}: 'same' padding with an even kernel is mapped, not solved")
                    continue
            elif mod.padding == "valid":
                padding = (0,) * n
            else:
                padding = _pair(mod.padding, n)
            stride = _pair(mod.stride, n)
            if n == 1:
                kernel, stride, padding, dilation = (1, *kernel), (1, *stride), (0, *padding), (1, *dilation)
            probe = LeastSquaresNode(node.name, node.target, "conv", kernel, stride, padding, dilation,
                                     _following_batchnorm(gm, node))
            in_dim = mod.in_channels * probe.taps
        else:
            continue
        if calls[node.target] > 1 or node.target in seen_modules:
            notes.append(f"{node.target}: module called more than once is mapped, not solved")
            continue
        if 2 * in_dim + 1 > max_dim:
            notes.append(f"{node.target}: {2 * in_dim + 1} stacked inputs exceed max_ls_dim={max_dim}; mapped, not solved")
            continue
        seen_modules.add(node.target)
        nodes.append(probe)
    return nodes, notes


# --------------------------------------------------------------------------- mapping through M
def _index(t: torch.Tensor, axis: int, idx: np.ndarray) -> torch.Tensor:
    return t.index_select(axis, torch.as_tensor(np.maximum(idx, 0), device=t.device))


def _along(w: np.ndarray, axis: int, ndim: int, like: torch.Tensor) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return torch.as_tensor(w, dtype=like.dtype, device=like.device).reshape(shape)


def zip_tensors(ta: torch.Tensor, tb: torch.Tensor, maps: list[AxisMap], roles: list[str]) -> torch.Tensor:
    """Merge two tensors axis by axis: M (average merged features) on the first feature axis,
    U (copy) on every other non-frozen axis; all-frozen tensors are averaged. This is the
    mapped weight W = M_out blkdiag(W_A, W_B) U_in, axis by axis; a ZipIt!-style map (two
    sources of one model in a merged feature) sums that side's terms."""
    ta, tb = ta.double(), tb.double()
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


def _stacked_merge_matrix(in_map: AxisMap, din: int, order: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """M_in as a sparse CSR matrix from the stacked input [A entries; B entries; 1] (2*din + 1)
    to the merged entries listed in `order` (index in_map.size stands for the constant)."""
    w_a, w_b = in_map.weights()
    n_in = in_map.size
    is_const = order == n_in
    e = np.where(is_const, 0, order)
    rows = np.arange(len(order))
    use_a = ~is_const & (in_map.idx_a[e] >= 0)
    use_b = ~is_const & (in_map.idx_b[e] >= 0)
    r = np.concatenate([rows[use_a], rows[use_b], rows[is_const]])
    c = np.concatenate([in_map.idx_a[e][use_a], din + in_map.idx_b[e][use_b], np.full(is_const.sum(), 2 * din)])
    v = np.concatenate([w_a[e][use_a], w_b[e][use_b], np.ones(is_const.sum())])
    coo = torch.sparse_coo_tensor(torch.as_tensor(np.stack([r, c])), torch.as_tensor(v, dtype=like.dtype),
                                  (len(order), 2 * din + 1), check_invariants=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return coo.coalesce().to_sparse_csr().to(like.device)


class _Filler:
    def __init__(self, merged, gm_a, gm_b, spec, plans, stats, ridge, solve="least_squares"):
        self.merged, self.gm_a, self.gm_b, self.spec = merged, gm_a, gm_b, spec
        self.plans, self.stats, self.ridge, self.solve = plans, stats, ridge, solve
        self.frozen = spec.fixed()
        self.done: set[str] = set()
        self.notes: list[str] = []

    def amap(self, name: str, axis: int, inner: int = 1) -> AxisMap:
        return axis_map(self.spec.param_layouts[name][axis], self.plans, self.frozen, inner)

    def source(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr_path(self.gm_a, name).detach(), getattr_path(self.gm_b, name).detach()

    def write(self, name: str, value: torch.Tensor) -> None:
        target = getattr_path(self.merged, name)
        if tuple(value.shape) != tuple(target.shape):
            raise RuntimeError(f"internal error: {name} filled with shape {tuple(value.shape)}, expected {tuple(target.shape)}")
        target.data.copy_(value.to(target.dtype))
        self.done.add(name)

    def zip_param(self, name: str) -> torch.Tensor:
        ta, tb = self.source(name)
        layouts = self.spec.param_layouts[name]
        maps = [axis_map(lay, self.plans, self.frozen) for lay in layouts]
        return zip_tensors(ta, tb, maps, self.spec.param_roles[name])

    def zip_values(self, va: torch.Tensor, vb: torch.Tensor, amap: AxisMap) -> torch.Tensor:
        return zip_tensors(va.double(), vb.double(), [amap], ["out"])

    # -- BatchNorm helpers
    def bn_affine(self, bn: str) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """Per side: (scale, shift) of the eval-mode BatchNorm as y = scale * x + shift."""
        out = []
        for gm in (self.gm_a, self.gm_b):
            m = gm.get_submodule(bn)
            var, mean = m.running_var.double(), m.running_mean.double()
            w = m.weight.detach().double() if m.weight is not None else torch.ones_like(var)
            b = m.bias.detach().double() if m.bias is not None else torch.zeros_like(var)
            scale = w / torch.sqrt(var + m.eps)
            out.append((scale, b - scale * mean))
        return out[0], out[1]

    def write_conv_bn(self, bn: str, weight_name: str, bias_name: str | None, a_w, a_b, r, mean, var) -> None:
        """Write the merged affine map x -> a_w x + a_b as conv (weight r*a_w) + BatchNorm with
        running statistics (mean, var); the pair computes exactly a_w x + a_b in eval mode."""
        m = self.merged.get_submodule(bn)
        var = var.clamp_min(0)
        shape = getattr_path(self.merged, weight_name).shape
        self.write(weight_name, (r.reshape(-1, *[1] * (a_w.dim() - 1)) * a_w).reshape(shape))
        if bias_name is not None:
            self.write(bias_name, torch.zeros_like(a_b))
        gamma = torch.sqrt(var + m.eps) / r
        if m.weight is None or m.bias is None:  # no affine to absorb the map: keep statistics exact
            raise RuntimeError(f"BatchNorm {bn} without affine parameters cannot be folded")
        self.write(f"{bn}.running_mean", mean)
        self.write(f"{bn}.running_var", var)
        self.write(f"{bn}.weight", gamma)
        self.write(f"{bn}.bias", a_b + mean / r)

    @staticmethod
    def safe_inverse(scale: torch.Tensor) -> torch.Tensor:
        inv = 1.0 / scale
        return torch.where(torch.isfinite(inv) & (scale.abs() > 1e-12), inv, torch.ones_like(inv))

    # -- least squares
    def least_squares(self, probe: LeastSquaresNode) -> None:
        wname = f"{probe.module}.weight"
        bname = f"{probe.module}.bias" if getattr(self.gm_a.get_submodule(probe.module), "bias", None) is not None else None
        wa, wb = (t.double().reshape(t.shape[0], -1) for t in self.source(wname))
        ba, bb = self.source(bname) if bname else (torch.zeros(wa.shape[0], dtype=wa.dtype),) * 2
        ba, bb = ba.double().to(wa.device), bb.double().to(wa.device)
        norm = probe.norm
        if norm:
            (sa, ha), (sb, hb) = self.bn_affine(norm)
            wa, wb = sa[:, None] * wa, sb[:, None] * wb
            ba, bb = sa * ba + ha, sb * bb + hb
        has_bias = bname is not None or norm is not None

        out_map = self.amap(wname, 0)
        in_map = self.amap(wname, 1, inner=probe.taps)
        if not (out_map.pairwise and in_map.pairwise):
            raise PleasError(f"{probe.module}: least squares needs plans that merge features of A with "
                             f"features of B only (ZipIt!-style plans are filled with solve='mapped')")
        S = self.stats.least_squares[probe.node].mean()
        din = wa.shape[1]
        # E[y_s s^T] for each side (rows: that side's folded outputs); budget-independent, cached.
        key = ("source_targets", probe.node)
        if key not in self.stats.cache:
            ya = torch.addr(wa @ S[:din], ba, S[2 * din])
            yb = torch.addr(wb @ S[din:2 * din], bb, S[2 * din])
            self.stats.cache[key] = (ya, yb)
        ya, yb = self.stats.cache[key]
        R0 = self.zip_values(ya, yb, out_map)  # (m_out, D): rows mapped through M_out

        # Merged input entries (+ the constant, when there is a bias), ordered [shared | A-only | B-only].
        n_in = in_map.size
        in_a = np.append(in_map.idx_a >= 0, True)[: n_in + has_bias]
        in_b = np.append(in_map.idx_b >= 0, True)[: n_in + has_bias]
        blocks = [np.flatnonzero(in_a & in_b), np.flatnonzero(in_a & ~in_b), np.flatnonzero(~in_a & in_b)]
        order = np.concatenate(blocks)
        M = _stacked_merge_matrix(in_map, din, order, S)
        G = (M @ (M @ S).T.contiguous()).T  # M S M^T: second moments of the merged inputs
        R = (M @ R0.T.contiguous()).T  # E[target x~^T]
        maps0 = [out_map, AxisMap(np.append(in_map.idx_a, din), np.append(in_map.idx_b, din), in_map.frozen)]
        W0 = zip_tensors(torch.cat([wa, ba[:, None]], 1), torch.cat([wb, bb[:, None]], 1), maps0, ["out", "in"])
        order_t = torch.as_tensor(order, device=W0.device)
        reg = torch.ones(len(order), dtype=G.dtype, device=G.device)
        reg[order_t == n_in] = 0.0  # the bias (constant input) is not regularised
        if self.solve == "regmean":
            W_ord = self._solve_regmean(S, ya, yb, in_map, out_map, order, din, W0.index_select(1, order_t), reg,
                                        len(blocks[0]), len(blocks[1]), probe.module)
        else:
            W_ord = self._solve_structured(G, R, W0.index_select(1, order_t), reg, len(blocks[0]), len(blocks[1]),
                                           out_map, probe.module)
        W = torch.zeros(W_ord.shape[0], n_in + has_bias, dtype=W_ord.dtype, device=W_ord.device)
        W[:, order_t] = W_ord
        a_w = W[:, :n_in]
        a_b = W[:, n_in] if has_bias else None
        shape = getattr_path(self.merged, wname).shape
        if norm:
            (sa, _), (sb, _) = self.bn_affine(norm)
            r = self.zip_values(self.safe_inverse(sa), self.safe_inverse(sb), out_map)
            const = int(torch.nonzero(order_t == n_in)[0])
            mean_out = W_ord @ G[:, const]  # E[a_w x~ + a_b]
            var_out = ((W_ord @ G) * W_ord).sum(1) - mean_out**2
            mean_lin = mean_out - a_b
            self.write_conv_bn(norm, wname, bname, a_w, a_b, r, r * mean_lin, r * r * var_out)
        else:
            self.write(wname, a_w.reshape(shape))
            if bname:
                self.write(bname, a_b)

    def _solve_structured(self, G, R, W0, reg, n_s: int, n_a: int, out_map: AxisMap, where: str):
        """Ridge least squares W (G + lam) = R + lam W0 with columns ordered [shared | A-only |
        B-only], solved per row block so that A-only outputs read only inputs A has and B-only
        outputs only inputs B has: the cross blocks stay exactly zero. One Cholesky factor L
        serves all three blocks: its leading block factors [shared | A-only], and
        [shared | B-only] needs only the Schur complement of the B-only block."""
        L, lam = self._factor(G, reg, where)
        if L is None:
            return W0
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
        return W

    def _solve_regmean(self, S, ya, yb, in_map: AxisMap, out_map: AxisMap, order: np.ndarray, din: int,
                       W0, reg, n_s: int, n_a: int, where: str):
        """RegMean (Jin et al., ICLR 2023) on the merged axes: W = argmin sum_s E||W x~_s - y_s||^2
        (+ ridge towards W0) over the rows that model s feeds, where x~_s is the merged input as
        model s sees it: its own feature at every entry it feeds, the other model's feature at an
        entry only the other model feeds. At identity plans and budget 1 this is RegMean's
        W = (W_A G_A + W_B G_B)(G_A + G_B)^-1 with G_s = E[x_s x_s^T] (bias-augmented); at budget 2
        it returns the ensemble. Rows of a feature kept for one model read only that model's
        inputs, with that model's objective alone."""
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
            L, lam = self._factor(gram[c][:, c], reg[c], where)
            if L is None:
                W[r_t[:, None], c[None, :]] = W0[r_t][:, c]
                continue
            rhs = sum(rhs_src[side][torch.as_tensor(idx[r], device=W.device)][:, c] for side, idx in parts)
            rhs = rhs + lam * W0[r_t][:, c] * reg[c][None, :]
            W[r_t[:, None], c[None, :]] = torch.cholesky_solve(rhs.T, L).T
        return W

    def _factor(self, G, reg, where):
        """Cholesky factor of G + lam*diag(reg), lam scale-aware (relative to the mean input
        second moment), raised tenfold until the factorisation succeeds."""
        diag = torch.diagonal(G)[reg > 0]
        scale = float(diag.mean()) if diag.numel() else 1.0
        lam = self.ridge * max(scale, 1e-12)
        for _ in range(8):
            A = G.clone()
            A.diagonal().add_(lam * reg)
            L, info = torch.linalg.cholesky_ex(A)
            if int(info) == 0:
                return L, lam
            lam *= 10.0
        self.notes.append(f"{where}: least squares ill-conditioned; used the mapped weights")
        return None, lam

    # -- per-channel nodes
    def depthwise(self, conv: str, bn: str | None) -> None:
        wname, bname = f"{conv}.weight", f"{conv}.bias"
        has_bias = getattr(self.gm_a.get_submodule(conv), "bias", None) is not None
        amap = self.amap(wname, 0)
        ka, kb = (t.double() for t in self.source(wname))
        ba, bb = self.source(bname) if has_bias else (torch.zeros(ka.shape[0], dtype=ka.dtype, device=ka.device),) * 2
        ba, bb = ba.double(), bb.double()
        if bn is None:
            self.write(wname, self.zip_values(ka, kb, amap))
            if has_bias:
                self.write(bname, self.zip_values(ba, bb, amap))
            return
        (sa, ha), (sb, hb) = self.bn_affine(bn)
        view = (-1,) + (1,) * (ka.dim() - 1)
        kernel = self.zip_values(sa.reshape(view) * ka, sb.reshape(view) * kb, amap)
        shift = self.zip_values(sa * ba + ha, sb * bb + hb, amap)
        r = self.zip_values(self.safe_inverse(sa), self.safe_inverse(sb), amap)
        mean = self.zip_param(f"{bn}.running_mean")
        var = self.zip_param(f"{bn}.running_var")
        self.write_conv_bn(bn, wname, bname if has_bias else None, kernel, shift, r, mean, var)

    def batchnorm(self, bn: str) -> None:
        """A BatchNorm not folded into a weight node: merge its affine form, keep averaged stats."""
        m = self.merged.get_submodule(bn)
        amap = self.amap(f"{bn}.running_mean", 0)
        (sa, ha), (sb, hb) = self.bn_affine(bn)
        scale, shift = self.zip_values(sa, sb, amap), self.zip_values(ha, hb, amap)
        mean, var = self.zip_param(f"{bn}.running_mean"), self.zip_param(f"{bn}.running_var")
        self.write(f"{bn}.running_mean", mean)
        self.write(f"{bn}.running_var", var)
        if m.weight is not None:
            self.write(f"{bn}.weight", scale * torch.sqrt(var + m.eps))
            self.write(f"{bn}.bias", shift + scale * mean)


SOLVES = ("least_squares", "regmean", "mapped")


def fill(merged: fx.GraphModule, gm_a: fx.GraphModule, gm_b: fx.GraphModule, spec: GroupSpec,
         plans: dict[int, GroupPlan], probes: list[LeastSquaresNode], stats: Statistics | None,
         ridge: float = 1e-4, solve: str = "least_squares") -> list[str]:
    """Write every parameter and buffer of the widened `merged`; returns notes on fallbacks.

    `solve`: "least_squares" (PLeaS: weight nodes solved on the merged inputs and targets),
    "regmean" (weight nodes solved by RegMean's objective, each model on its own inputs), or
    "mapped" (no solve: every parameter *and buffer* is mapped through the plans, W = M_out
    blkdiag(W_A, W_B) U_in, BatchNorm statistics included, the path oversized layers take
    anyway; with identity plans at budget 1 this is plain weight averaging)."""
    if solve not in SOLVES:
        raise PleasError(f"solve must be one of {SOLVES}, got {solve!r}")
    f = _Filler(merged, gm_a, gm_b, spec, plans, stats, ridge, solve)
    with torch.no_grad():
        folded = set()
        for probe in probes if solve != "mapped" else ():
            if stats is not None and probe.node in stats.least_squares:
                f.least_squares(probe)
                if probe.norm:
                    folded.add(probe.norm)
        for node in gm_a.graph.nodes if solve != "mapped" else ():
            if node.op != "call_module":
                continue
            mod = gm_a.get_submodule(node.target)
            if (isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1
                    and mod.groups == mod.in_channels == mod.out_channels and f"{node.target}.weight" not in f.done):
                bn = _following_batchnorm(gm_a, node)
                f.depthwise(node.target, bn)
                if bn:
                    folded.add(bn)
            elif isinstance(mod, BATCHNORMS) and mod.track_running_stats and node.target not in folded \
                    and f"{node.target}.running_mean" not in f.done:
                f.batchnorm(node.target)
        for name in spec.param_layouts:
            if name in f.done:
                continue
            value = getattr_path(gm_a, name)
            if not torch.is_tensor(value):
                continue
            if not value.is_floating_point():  # integer buffers (counters, indices) are A's
                if value.shape == getattr_path(merged, name).shape:
                    f.write(name, value.clone())
                continue
            f.write(name, f.zip_param(name))
    return f.notes
