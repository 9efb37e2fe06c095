"""Fill pass: the merged model's weights, written into a widened module (passes/widen.py, made
compact by passes/compact.py) for one set of group plans. Every value is computed dense and
written by `pleas_fx.core.layers.write_tensor`, which stores a block layer's blocks directly.

- Solved weight nodes (the weight plan, passes/weights.py) get, in closed form from the
  statistics, W = argmin E||W M_in [x_A; x_B; 1] - M_out [y_A; y_B]||^2 + lam ||W - W0||^2, where
  y is the node's output after an eval-mode normalisation that directly follows it (folded into
  the target) and W0 = M_out blkdiag(W_A, W_B) U_in is the permute-and-average weight. Pulling
  the ridge towards W0 rather than 0 keeps the solution exact wherever W0 already is exact
  (budget 2, self-merge) and falls back to it in directions the data never excited. The algebra
  is in passes/linalg.py.
- Depthwise kernels and other per-channel parameters are mapped through M (a following norm
  folded first); every other tensor through M on its feature axes and U on contracted axes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from pleas_fx.core.errors import InternalError, PleasError
from pleas_fx.core.fxutil import getattr_path, node_shape, param_value
from pleas_fx.core.ir import AxisMap, GroupPlan, GroupSpec, NormNode, WeightNode, axis_map
from pleas_fx.core.layers import tensor_shape, write_tensor
from pleas_fx.passes.grouped_solve import solve_grouped
from pleas_fx.passes.kept_apart import ActivationZip, kept_apart_layers, kept_apart_values
from pleas_fx.passes.linalg import (SOLVES, kept_apart_solution, safe_inverse, solve_layer, source_targets,
                                   zip_tensors)
from pleas_fx.passes.lower_windows import ZERO_KEY_BIAS, zero_key_bias
from pleas_fx.passes.merged_inputs import MIN_ROWS_PER_INPUT, Job, refine, weight_levels
from pleas_fx.passes.positions import AUTO
from pleas_fx.passes.statistics import Statistics
from pleas_fx.passes.weights import WeightPlan
from pleas_fx.passes.within_axes import realign_b

log = logging.getLogger(__name__)


class _Filler:
    def __init__(self, merged, gm_a, gm_b, spec, plans, stats, ridge, solve="least_squares", nodes=()):
        self.merged, self.gm_a, self.gm_b, self.spec = merged, gm_a, gm_b, spec
        self.plans, self.stats, self.ridge, self.solve = plans, stats, ridge, solve
        self.frozen = spec.fixed()
        self.done: set[str] = set()
        self.notes: list[str] = []
        # the nodes whose merged values are the sources' own kept apart, and the weight nodes
        # between such values (passes/kept_apart.py): filled exactly by their mapped weights
        self.exact_values = kept_apart_values(gm_a, gm_b, spec, plans) if solve == "least_squares" else set()
        self.kept_apart = kept_apart_layers(gm_a, gm_b, spec, plans, list(nodes), self.exact_values)

    def amap(self, name: str, axis: int, inner: int = 1) -> AxisMap:
        return axis_map(self.spec.param_layouts[name][axis], self.plans, self.frozen, inner)

    def source(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return param_value(self.gm_a, self.spec, name).detach(), param_value(self.gm_b, self.spec, name).detach()

    def write(self, name: str, value: torch.Tensor) -> None:
        """Write a dense merged value: into the tensor, or into a block layer's blocks."""
        write_tensor(self.merged, name, value)
        self.done.add(name)

    def zip_param(self, name: str) -> torch.Tensor:
        ta, tb = self.source(name)
        tb = realign_b(tb, self.spec, self.spec.param_layouts[name], self.plans)
        maps = [axis_map(lay, self.plans, self.frozen) for lay in self.spec.param_layouts[name]]
        return zip_tensors(ta, tb, maps, self.spec.param_roles[name])

    def zip_values(self, va: torch.Tensor, vb: torch.Tensor, amap: AxisMap) -> torch.Tensor:
        return zip_tensors(va.double(), vb.double(), [amap], ["out"])

    # -- normalisation helpers
    def norm_affine(self, norm: NormNode) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """Per side: (scale, shift) of the eval-mode normalisation as y = scale * x + shift."""
        out = []
        for gm in (self.gm_a, self.gm_b):
            var, mean = (getattr_path(gm, n).detach().double() for n in (norm.running_var, norm.running_mean))
            w = getattr_path(gm, norm.weight).detach().double() if norm.weight else torch.ones_like(var)
            b = getattr_path(gm, norm.bias).detach().double() if norm.bias else torch.zeros_like(var)
            scale = w / torch.sqrt(var + norm.eps)
            out.append((scale, b - scale * mean))
        return out[0], out[1]

    def write_weight_norm(self, norm: NormNode, weight_name: str, bias_name: str | None, a_w, a_b, r, mean, var):
        """Write the merged affine map x -> a_w x + a_b as a weight (r * a_w) followed by the
        normalisation with running statistics (mean, var); the pair computes exactly
        a_w x + a_b in eval mode."""
        if not norm.affine:
            raise InternalError("fill", norm.node, "a normalisation without affine parameters cannot be folded")
        var = var.clamp_min(0)
        shape = tensor_shape(self.merged, weight_name)
        self.write(weight_name, (r.reshape(-1, *[1] * (a_w.dim() - 1)) * a_w).reshape(shape))
        if bias_name is not None:
            self.write(bias_name, torch.zeros_like(a_b))
        self.write(norm.running_mean, mean)
        self.write(norm.running_var, var)
        self.write(norm.weight, torch.sqrt(var + norm.eps) / r)
        self.write(norm.bias, a_b + mean / r)

    # -- least squares
    def least_squares(self, w: WeightNode, measured=None) -> None:
        """Solve one weight node; `measured`: the merged network's own input sums at it
        (passes/merged_inputs.py), for merged-input least squares."""
        enough = measured is not None and measured.gram.count >= MIN_ROWS_PER_INPUT * (measured.gram.dim_a + 1)
        if not enough and w.weight in self.done and w.node in self.stats.least_squares:
            return  # too few merged-input rows: the fill's source-input solution stands
        wa, wb = (t.double().reshape(t.shape[0], -1) for t in self.source(w.weight))
        zeros = torch.zeros(wa.shape[0], dtype=wa.dtype, device=wa.device)
        ba, bb = (t.double() for t in self.source(w.bias)) if w.bias else (zeros, zeros)
        norm = w.norm
        if norm:
            (sa, ha), (sb, hb) = self.norm_affine(norm)
            wa, wb = sa[:, None] * wa, sb[:, None] * wb
            ba, bb = sa * ba + ha, sb * bb + hb
        has_bias = w.bias is not None or norm is not None
        out_map = self.amap(w.weight, 0)
        in_map = self.amap(w.weight, 1, inner=w.taps) if w.kind != "grouped" else self.input_map(w)
        if not (out_map.pairwise and in_map.pairwise):
            raise PleasError(f"{w.node}: least squares needs plans that merge features of A with "
                             f"features of B only (ZipIt!-style plans are filled with solve='mapped')")
        S = self.stats.source_mean(w.node)
        if S is None and not enough:  # deferred by the statistics pass: measured inputs only (statistics.py)
            self.notes.append(f"{w.node}: too few merged-input rows and no source moments; used the mapped weights")
            return
        key = ("source_targets", w.node)  # budget-independent: cached across budgets
        if S is not None and key not in self.stats.cache and w.kind != "grouped":
            self.stats.cache[key] = source_targets(S, wa, ba, wb, bb)
        method = self.solve if self.solve in ("regmean", "adam") else "least_squares"
        merged = measured.mean() if enough else None  # the merged network's own inputs (per conv group if grouped)
        if w.node in self.kept_apart and S is not None and w.kind != "grouped" and method == "least_squares":
            sol = kept_apart_solution(self.stats.cache[key], (wa, ba, wb, bb), in_map, out_map, has_bias)
        elif w.kind == "grouped":  # conv group by conv group
            per_in = getattr_path(self.gm_a, w.weight).shape[1] * w.taps
            sol = solve_grouped(S, (wa, ba, wb, bb), in_map, out_map, per_in, self.per_out(w), has_bias,
                                self.ridge, "regmean" if method == "regmean" else "least_squares", merged=merged)
        else:
            sol = solve_layer(S, self.stats.cache.get(key), (wa, ba, wb, bb), in_map, out_map, has_bias, self.ridge,
                              method, merged=merged)
        if sol.fallback:
            self.notes.append(f"{w.node}: least squares ill-conditioned; used the mapped weights")
        if w.bias in self.gm_a.meta.get(ZERO_KEY_BIAS, ()):  # Swin v2: the key third stays exactly zero
            zero_key_bias(sol.bias)
        shape = tensor_shape(self.merged, w.weight)
        if norm:
            (sa, _), (sb, _) = self.norm_affine(norm)
            r = self.zip_values(safe_inverse(sa), safe_inverse(sb), out_map)
            self.write_weight_norm(norm, w.weight, w.bias, sol.weight, sol.bias, r, r * (sol.mean - sol.bias),
                                   r * r * sol.var)
        else:
            self.write(w.weight, sol.weight.reshape(shape))
            if w.bias:
                self.write(w.bias, sol.bias)

    def merged_target(self, w: WeightNode, ya: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """The merged target M_out [y_A; y_B] of a weight node from the source layers' outputs
        (a following normalisation folded in), channels on axis 1 (convolution) or last."""
        axis = -1 if w.kind == "linear" else 1
        out_map = self.amap(w.weight, 0)
        work = torch.promote_types(ya.dtype, torch.float32)  # the sums' products run in it anyway
        ya, yb = ya.movedim(axis, 0).to(work), yb.movedim(axis, 0).to(work)
        if w.norm:
            (sa, ha), (sb, hb) = self.norm_affine(w.norm)
            view = (-1,) + (1,) * (ya.dim() - 1)
            ya = ya * sa.to(ya.dtype).reshape(view) + ha.to(ya.dtype).reshape(view)
            yb = yb * sb.to(yb.dtype).reshape(view) + hb.to(yb.dtype).reshape(view)
        return zip_tensors(ya, yb, [out_map], ["out"], dtype=work).movedim(0, axis)

    def input_map(self, w: WeightNode) -> AxisMap:
        """A grouped conv's input channels (im2col order: each channel's taps in a row)."""
        node = next(n for n in self.gm_a.graph.nodes if n.name == w.node)
        return axis_map(self.spec.node_layouts[node.args[0].name][1], self.plans, self.frozen, w.taps)

    def per_out(self, w: WeightNode) -> int:
        """Output channels per conv group of a grouped conv."""
        node = next(n for n in self.gm_a.graph.nodes if n.name == w.node)
        weight = getattr_path(self.gm_a, w.weight)
        return weight.shape[0] * weight.shape[1] // node_shape(node.args[0])[1]

    # -- per-channel nodes
    def depthwise(self, w: WeightNode) -> None:
        amap = self.amap(w.weight, 0)
        ka, kb = (t.double() for t in self.source(w.weight))
        zeros = torch.zeros(ka.shape[0], dtype=ka.dtype, device=ka.device)
        ba, bb = (t.double() for t in self.source(w.bias)) if w.bias else (zeros, zeros)
        if w.norm is None:
            self.write(w.weight, self.zip_values(ka, kb, amap))
            if w.bias:
                self.write(w.bias, self.zip_values(ba, bb, amap))
            return
        (sa, ha), (sb, hb) = self.norm_affine(w.norm)
        view = (-1,) + (1,) * (ka.dim() - 1)
        kernel = self.zip_values(sa.reshape(view) * ka, sb.reshape(view) * kb, amap)
        shift = self.zip_values(sa * ba + ha, sb * bb + hb, amap)
        r = self.zip_values(safe_inverse(sa), safe_inverse(sb), amap)
        mean, var = self.zip_param(w.norm.running_mean), self.zip_param(w.norm.running_var)
        self.write_weight_norm(w.norm, w.weight, w.bias, kernel, shift, r, mean, var)

    def norm(self, norm: NormNode) -> None:
        """A normalisation not folded into a weight node: merge its affine form, keep averaged
        running statistics."""
        amap = self.amap(norm.running_mean, 0)
        (sa, ha), (sb, hb) = self.norm_affine(norm)
        scale, shift = self.zip_values(sa, sb, amap), self.zip_values(ha, hb, amap)
        mean, var = self.zip_param(norm.running_mean), self.zip_param(norm.running_var)
        self.write(norm.running_mean, mean)
        self.write(norm.running_var, var)
        if norm.affine:
            self.write(norm.weight, scale * torch.sqrt(var + norm.eps))
            self.write(norm.bias, shift + scale * mean)


def fill(merged: fx.GraphModule, gm_a: fx.GraphModule, gm_b: fx.GraphModule, spec: GroupSpec,
         plans: dict[int, GroupPlan], weights: WeightPlan, stats: Statistics | None,
         ridge: float = 1e-4, solve: str = "least_squares", merged_inputs: MergedInputOptions | None = None
         ) -> list[str]:
    """Write every parameter and buffer of the widened `merged`; returns notes on fallbacks.

    `solve`: "least_squares" (PLeaS: weight nodes solved on the merged inputs and targets),
    "regmean" (weight nodes solved by RegMean's objective, each model on its own inputs), or
    "mapped" (no solve: every parameter *and buffer* is mapped through the plans, W = M_out
    blkdiag(W_A, W_B) U_in, BatchNorm statistics included, the path oversized layers take
    anyway; with identity plans at budget 1 this is plain weight averaging).

    `merged_inputs` (solve "least_squares"): after the fill above, re-solve every solved node
    level by level against the inputs the merged network itself feeds it
    (passes/merged_inputs.py)."""
    return fill_models([(merged, spec, plans)], gm_a, gm_b, weights, stats, ridge, solve, merged_inputs)[0]


def fill_models(models: list[tuple[fx.GraphModule, GroupSpec, dict[int, GroupPlan]]], gm_a: fx.GraphModule,
                gm_b: fx.GraphModule, weights: WeightPlan, stats: Statistics | None, ridge: float = 1e-4,
                solve: str = "least_squares", merged_inputs: MergedInputOptions | None = None,
                exact: list[bool] | None = None) -> list[list[str]]:
    """`fill` for several merged models (one per budget) of the same pair: each is filled from the
    statistics, then merged-input least squares refines all of them in lockstep, one pass of the
    sources per level for every model. `exact[i]`: model i merges no feature pair and freezes no
    hidden unit (budget 2), so its layers' inputs are exactly the modelled M_in [x_A; x_B] and
    it is not refined (the refinement would keep every row of the source-input solution).
    Returns each model's notes."""
    if solve not in SOLVES:
        raise PleasError(f"solve must be one of {SOLVES}, got {solve!r}")
    fillers = [_Filler(merged, gm_a, gm_b, spec, plans, stats, ridge, solve, weights.nodes)
               for merged, spec, plans in models]
    with torch.no_grad():
        _fill_all(fillers, weights, solve)
        if merged_inputs is not None and solve == "least_squares" and stats is not None:
            solved = [w for w in weights.nodes if w.solved and (w.node in stats.least_squares or w.node in stats.deferred)]
            refined = [f for i, f in enumerate(fillers) if not (exact and exact[i])]
            if refined:
                note = refine([_job(f, solved) for f in refined], gm_a, gm_b, weight_levels(gm_a, solved),
                              merged_inputs.batches, positions=merged_inputs.positions, seed=merged_inputs.seed,
                              dtype=merged_inputs.dtype, top_up=merged_inputs.top_up)
                if note is not None:
                    for f in refined:
                        f.notes.append(note)
    if stats is not None:
        stats.cache.pop("source_mean", None)  # (a d^2 matrix: not kept past the fill)
    return [f.notes for f in fillers]


def _job(f: _Filler, solved: list[WeightNode]) -> Job:
    """One model's merged-input refinement: its kept-apart layers are not re-solved, and its
    kept-apart values are zipped from the sources' instead of computed (passes/kept_apart.py)."""
    zip_value = ActivationZip(f.spec, f.plans)
    return Job(f.merged, f.merged_target, f.least_squares, frozenset(f.kept_apart & {w.node for w in solved}),
               frozenset(f.exact_values), zip_value.zippable, zip_value)


def _fill_all(fillers: list[_Filler], weights: WeightPlan, solve: str) -> None:
    """Write every tensor of every model: layer by layer across the models (one layer's source
    moments are formed once for all budgets, `Statistics.source_mean`), then each model's norms
    and mapped tensors."""
    unfolded = [list(weights.norms) for _ in fillers]
    if solve != "mapped":
        for w in weights.nodes:
            for f, norms in zip(fillers, unfolded):
                if w.solved and f.stats is not None and w.node in f.stats.least_squares:
                    f.least_squares(w)
                elif w.kind == "depthwise" and w.weight not in f.done:
                    f.depthwise(w)
                elif w.norm is not None:
                    norms.append(w.norm)
    for f, norms in zip(fillers, unfolded):
        if solve != "mapped":
            for norm in norms:
                if norm.running_mean not in f.done:
                    f.norm(norm)
        for name in f.spec.param_layouts:
            if name in f.done:
                continue
            value = getattr_path(f.gm_a, name)
            if not torch.is_tensor(value):
                continue
            if not value.is_floating_point():  # integer buffers (counters, indices) are A's
                if tuple(value.shape) == tensor_shape(f.merged, name):
                    f.write(name, value.clone())
                continue
            f.write(name, f.zip_param(name))


@dataclass
class MergedInputOptions:
    """Merged-input least squares: the calibration batches (read at every level), conv
    positions per sample (None: exact, a count, or AUTO: passes/positions.py), the random seed of
    drawn positions, the sums' dtype, and `top_up(n)`: batches of at least n more samples for the
    data-limited levels (passes/mixup.py; None: none)."""

    batches: list
    positions: int | str | None = AUTO
    seed: int = 0
    dtype: torch.dtype = torch.float64
    top_up: Callable[[int], list] | None = None
