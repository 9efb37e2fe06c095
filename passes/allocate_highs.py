"""The grid MIP of width allocation, solved with HiGHS (highspy).

Every mergeable group g chooses one level u_g from its grid L_g = {round(f d_g) : f in fractions}
(binary x_gl, sum_l x_gl = 1). The footprint polynomial (passes/allocate.py) is made linear on
the grid exactly:

- linear and squared terms: u_g = sum_l L_gl x_gl and u_g^2 = sum_l L_gl^2 x_gl (one-hot x);
- a product u_g u_h of two groups becomes sum_lm L_gl L_hm z_ghlm with z_gh >= 0 a |L_g| x |L_h|
  table whose row sums are x_g and column sums x_h. For one-hot x_g, x_h the only such table is
  the outer product, so the linearisation is exact at every integer point (and its LP relaxation,
  the transportation polytope, is much tighter than plain McCormick inequalities).

minimise sum_g loss_g(u_g)  s.t.  footprint(u) <= limit (in units of one model's footprint).
Tensors with three or more grouped axes enter through a sound upper bound (Polynomial.exact is
then False); the caller always checks the result with the exact count and repairs greedily.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from pleas_fx.passes.footprint import Footprint


@dataclass
class GridSolution:
    u: dict[int, int] | None  # None: no feasible grid point found in time
    status: str
    objective: float | None
    gap: float | None
    seconds: float
    columns: int
    rows: int
    exact: bool


def _silent_highs(highspy):
    """A Highs instance with its output off. HiGHS writes its banner to the process's stdout
    (file descriptor 1, from C) when the first instance is made, before any option can be set:
    descriptor 1 points to /dev/null meanwhile, so the library writes nothing to stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            h = highspy.Highs()
            h.setOptionValue("output_flag", False)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    return h


def grid_levels(size: int, fractions: list[float]) -> list[int]:
    return sorted({int(round(f * size)) for f in fractions} | {0, size})


def solve_grid_mip(footprint: Footprint, losses: dict[int, np.ndarray], limit: float, fractions: list[float],
                   time_limit: float = 10.0, start: dict[int, int] | None = None,
                   formulation: str = "table", mip_rel_gap: float = 1e-4) -> GridSolution:
    import highspy

    t0 = time.perf_counter()
    poly = footprint.polynomial()
    scale = float(max(footprint.base, 1))
    groups = [g for g, d in footprint.sizes.items() if d > 0]
    levels = {g: grid_levels(footprint.sizes[g], fractions) for g in groups}

    cost: list[float] = []
    upper: list[float] = []
    integer: list[bool] = []
    budget_row: dict[int, float] = {}
    rows: list[tuple[dict[int, float], float, float]] = []  # (coefficients, lower, upper)

    def column(c: float, is_int: bool) -> int:
        cost.append(float(c))
        upper.append(1.0)
        integer.append(is_int)
        return len(cost) - 1

    x: dict[int, list[int]] = {}
    for g in groups:
        lin, sq = poly.lin.get(g, 0), poly.quad.get((g, g), 0)
        x[g] = []
        for lev in levels[g]:
            j = column(losses[g][lev], True)
            x[g].append(j)
            f = (lin * lev + sq * lev * lev) / scale
            if f:
                budget_row[j] = f
        rows.append(({j: 1.0 for j in x[g]}, 1.0, 1.0))

    z: dict[tuple[int, int], np.ndarray] = {}
    for (g, h), q in poly.quad.items():
        if g == h or g not in x or h not in x:
            continue
        if formulation == "table":
            lg, lh = levels[g], levels[h]
            table = np.empty((len(lg), len(lh)), dtype=np.int64)
            for a, la in enumerate(lg):
                for b, lb in enumerate(lh):
                    j = column(0.0, False)
                    table[a, b] = j
                    f = q * la * lb / scale
                    if f:
                        budget_row[j] = f
            for a in range(len(lg)):
                rows.append(({**{int(j): 1.0 for j in table[a]}, x[g][a]: -1.0}, 0.0, 0.0))
            for b in range(len(lh)):
                rows.append(({**{int(j): 1.0 for j in table[:, b]}, x[h][b]: -1.0}, 0.0, 0.0))
            z[(g, h)] = table
        else:
            if len(levels[g]) > len(levels[h]):
                g, h = h, g
            # y_a = x_ga * u_h: 0 <= y_a <= d_h x_ga and sum_a y_a = u_h (exact for one-hot x_g)
            dh = float(footprint.sizes[h])
            cols = []
            for a, la in enumerate(levels[g]):
                j = column(0.0, False)
                upper[j] = dh
                cols.append(j)
                f = q * la / scale
                if f:
                    budget_row[j] = f
                rows.append(({j: 1.0, x[g][a]: -dh}, -highspy.kHighsInf, 0.0))
            rows.append(({**{j: 1.0 for j in cols}, **{x[h][b]: -float(lb) for b, lb in enumerate(levels[h])}}, 0.0, 0.0))
            z[(g, h)] = np.asarray(cols)
    # round-off is caught by the caller's exact check and greedy repair
    rhs = (limit - poly.const) / scale
    rows.append((budget_row, -highspy.kHighsInf, rhs))

    lp = highspy.HighsLp()
    lp.num_col_ = len(cost)
    lp.num_row_ = len(rows)
    lp.col_cost_ = np.asarray(cost)
    lp.col_lower_ = np.zeros(len(cost))
    lp.col_upper_ = np.asarray(upper)
    lp.row_lower_ = np.asarray([r[1] for r in rows])
    lp.row_upper_ = np.asarray([r[2] for r in rows])
    starts, index, value = [0], [], []
    for coefs, _, _ in rows:
        for j, v in coefs.items():
            index.append(j)
            value.append(v)
        starts.append(len(index))
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.start_ = np.asarray(starts, dtype=np.int32)
    lp.a_matrix_.index_ = np.asarray(index, dtype=np.int32)
    lp.a_matrix_.value_ = np.asarray(value, dtype=np.float64)
    lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous for i in integer]

    h = _silent_highs(highspy)
    h.setOptionValue("time_limit", float(time_limit))
    h.setOptionValue("random_seed", 0)
    h.setOptionValue("mip_rel_gap", float(mip_rel_gap))
    h.setOptionValue("mip_feasibility_tolerance", 1e-9)
    h.setOptionValue("primal_feasibility_tolerance", 1e-9)
    h.passModel(lp)
    if start is not None:
        _set_start(h, highspy, len(cost), x, z, levels, start)
    h.run()
    status = h.modelStatusToString(h.getModelStatus())
    info = h.getInfo()
    values = np.asarray(h.getSolution().col_value) if info.primal_solution_status == 2 else None
    u = None
    if values is not None and len(values) == len(cost):
        u = {g: 0 for g in footprint.sizes}
        for g in groups:
            u[g] = levels[g][int(np.argmax(values[x[g]]))]
    return GridSolution(
        u=u, status=status, objective=float(info.objective_function_value) if u is not None else None,
        gap=float(info.mip_gap) if u is not None else None, seconds=time.perf_counter() - t0,
        columns=len(cost), rows=len(rows), exact=poly.exact)


def _set_start(h, highspy, ncol, x, z, levels, start) -> None:
    """Warm start: `start` (feasible, e.g. the uniform allocation) rounded down onto the grid,
    which keeps it feasible because the footprint grows with every u_g."""
    sol = np.zeros(ncol)
    pick = {}
    for g, cols in x.items():
        a = max(i for i, lev in enumerate(levels[g]) if lev <= start.get(g, 0))
        pick[g] = a
        sol[cols[a]] = 1.0
    for (g, hh), table in z.items():
        if table.ndim == 2:
            sol[table[pick[g], pick[hh]]] = 1.0
        else:
            sol[table[pick[g]]] = levels[hh][pick[hh]]
    s = highspy.HighsSolution()
    s.col_value = list(sol)
    s.value_valid = True
    h.setSolution(s)
