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
