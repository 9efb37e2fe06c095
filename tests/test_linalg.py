"""The per-layer solve's algebra (passes/linalg.py): the structured ridge solve keeps the
structural zero blocks, and the outputs' mean and variance it reports -- taken from the normal
equations instead of an m x d^2 product -- equal W G W^T's on random problems."""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

import nets
from pleas_fx.core.ir import AxisMap
from pleas_fx.passes.linalg import _solution, solve_structured


def _out_map(both: int, only_a: int, only_b: int) -> AxisMap:
    n = both + only_a + only_b
    idx_a = np.array([i if i < both + only_a else -1 for i in range(n)])
    idx_b = np.array([i if i < both or i >= both + only_a else -1 for i in range(n)])
    return AxisMap(idx_a, idx_b, False)


@nets.hypothesis_settings(40)
@given(n_s=st.integers(1, 6), n_a=st.integers(0, 5), n_b=st.integers(0, 5), rows=st.tuples(*[st.integers(0, 4)] * 3),
       rank=st.integers(1, 20), seed=st.integers(0, 10_000))
def test_reported_mean_and_variance_equal_the_explicit_products(n_s, n_a, n_b, rows, rank, seed):
    if sum(rows) == 0:
        rows = (1, 0, 0)
    gen = torch.Generator().manual_seed(seed)
    d = n_s + n_a + n_b
    X = torch.randn(rank, d, generator=gen, dtype=torch.float64)  # possibly rank-deficient inputs
    X[:, n_s - 1] = 1.0  # the constant input, last of the shared block
    G = X.T @ X / rank
    m = sum(rows)
    R = torch.randn(m, d, generator=gen, dtype=torch.float64)
    W0 = torch.randn(m, d, generator=gen, dtype=torch.float64)
    reg = torch.ones(d, dtype=torch.float64)
    reg[n_s - 1] = 0.0
    out_map = _out_map(*rows)
    W, ok, WG = solve_structured(G, R, W0, reg, n_s, n_a, out_map, 1e-3)
    assert ok
    a_only, b_only = slice(rows[0], rows[0] + rows[1]), slice(rows[0] + rows[1], m)
    assert torch.all(W[a_only, n_s + n_a:] == 0) and torch.all(W[b_only, n_s:n_s + n_a] == 0)  # structural zeros
    order = torch.arange(d)
    order[n_s - 1] = d  # the constant's index is the input size (n_in = d - 1 ... placed in the shared block)
    got = _solution(W, G, order, d, True, ok, WG)
    want = _solution(W, G, order, d, True, ok, None)
    torch.testing.assert_close(got.mean, want.mean, rtol=1e-7, atol=1e-8 * float(G.abs().max()))
    torch.testing.assert_close(got.var, want.var, rtol=1e-6, atol=1e-7 * float(G.abs().max()) * float(W.abs().max()) ** 2)


@nets.hypothesis_settings(40)
@given(din=st.integers(1, 7), data=st.data(), seed=st.integers(0, 10_000))
def test_stacked_merge_gathers_equal_the_dense_merge_matrix(din, data, seed):
    """M_in applied by gathers (StackedMerge) equals the dense M_in built entry by entry, with
    merged pairs, one-side entries, a share other than 1/2 and the constant in any order."""
    from pleas_fx.passes.linalg import StackedMerge

    perm_b = data.draw(st.permutations(range(din)))
    merged = data.draw(st.integers(0, din))
    # [merged pairs | A only | B only]
    idx_a = np.array(list(range(din)) + [-1] * (din - merged))
    idx_b = np.array(list(perm_b[:merged]) + [-1] * (din - merged) + list(perm_b[merged:]))
    share = data.draw(st.sampled_from([None, 0.3]))
    in_map = AxisMap(idx_a, idx_b, False, share_a=None if share is None else np.full(len(idx_a), share))
    n_in = in_map.size
    order = np.array(data.draw(st.permutations(range(n_in + 1))))
    dense = np.zeros((len(order), 2 * din + 1))
    w_a, w_b = in_map.weights()
    for r, e in enumerate(order):
        if e == n_in:
            dense[r, 2 * din] = 1.0
            continue
        if idx_a[e] >= 0:
            dense[r, idx_a[e]] += w_a[e]
        if idx_b[e] >= 0:
            dense[r, din + idx_b[e]] += w_b[e]
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(2 * din + 1, 5, generator=gen, dtype=torch.float64)
    S = X @ X.T
    M = torch.as_tensor(dense)
    m = StackedMerge(in_map, din, order, S.device)
    for chunk_bytes in (1, 2**20):  # one row of M S at a time, or all
        torch.testing.assert_close(m.gram(S, chunk_bytes), M @ S @ M.T, rtol=1e-12, atol=1e-12)
    R0 = torch.randn(3, 2 * din + 1, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(m.apply(R0, 1), R0 @ M.T, rtol=1e-12, atol=1e-12)


@nets.hypothesis_settings(40)
@given(n_s=st.integers(1, 6), n_a=st.integers(0, 5), n_b=st.integers(0, 5), rows=st.tuples(*[st.integers(0, 4)] * 3),
       samples=st.integers(2, 30), exact=st.integers(0, 12), seed=st.integers(0, 10_000))
def test_the_source_rows_kept_are_those_a_full_residual_keeps(n_s, n_a, n_b, rows, samples, exact, seed):
    """The merged-input solve keeps the candidate (source-input) rows that fit the measured inputs;
    it takes their exact residual only where a bound from the solution's allows it, and keeps
    exactly the rows the full m x d^2 residual keeps."""
    from pleas_fx.passes.linalg import KEEP_SOURCE_RESIDUAL, MergedInputs, _merged_solve
    if sum(rows) == 0:
        rows = (1, 0, 0)
    gen = torch.Generator().manual_seed(seed)
    d, m = n_s + n_a + n_b, sum(rows)
    X = torch.randn(samples, d, generator=gen, dtype=torch.float64)
    X[:, n_s - 1] = 1.0
    out_map = _out_map(*rows)
    mask = torch.ones(m, d, dtype=torch.float64)  # the structural zeros
    mask[rows[0]:rows[0] + rows[1], n_s + n_a:] = 0
    mask[rows[0] + rows[1]:, n_s:n_s + n_a] = 0
    W_true = torch.randn(m, d, generator=gen, dtype=torch.float64) * mask
    fit = torch.rand(m, generator=gen) < exact / 12  # rows the candidate fits exactly
    T = X @ W_true.T + (~fit).double() * torch.randn(samples, m, generator=gen, dtype=torch.float64)
    W_src = torch.where(fit[:, None], W_true, W_true + 0.1 * torch.randn(m, d, generator=gen, dtype=torch.float64) * mask)
    W0 = torch.randn(m, d, generator=gen, dtype=torch.float64) * mask
    reg = torch.ones(d, dtype=torch.float64)
    reg[n_s - 1] = 0.0
    merged = MergedInputs(X.T @ X / samples, T.T @ X / samples, (T * T).mean(0))
    order = torch.arange(d)
    G, W, ok, WG = _merged_solve(merged, out_map, order, W_src, W0, reg, n_s, n_a, 1e-3)
    W_ref, ok_ref, WG_ref = solve_structured(G, merged.target_cross, W0, reg, n_s, n_a, out_map, 1e-3)
    src_G = W_src @ G
    res = (src_G * W_src).sum(1) - 2 * (W_src * merged.target_cross).sum(1) + merged.target_sq
    keep = res <= KEEP_SOURCE_RESIDUAL * merged.target_sq.clamp_min(1e-30)
    W_ref[keep] = W_src[keep]
    assert ok == ok_ref and torch.equal(W, W_ref)
    if WG is not None:
        WG_ref[keep] = src_G[keep]
        torch.testing.assert_close(WG, WG_ref, rtol=1e-12, atol=1e-12 * float(src_G.abs().max()))
    assert bool(keep[fit].all())  # an exact candidate is always kept
