"""The footprint model of width allocation: the merged model's size as a function of the
group widths (an analysis of the GroupSpec; nothing here chooses widths).

Footprint = structural parameters: a merged feature is shared by both models, an unmerged one
belongs to A or to B, and weights between A-only and B-only features are structurally zero
(the least-squares fill keeps them zero). A tensor whose axes have s_i shared and u_i
per-side entries therefore holds prod(s_i + u_i) * 2 - prod(s_i) parameters: one model's
count when everything is merged, exactly two models' when nothing is. Frozen axes are shared.
Since s_i + u_i is axis i's size in one model (A_i), a tensor costs 2 prod(A_i) - prod(s_i),
and s_i = A_i - sum_g c_ig u_g is linear in the groups' unmerged counts u_g = width_g - d_g:
the footprint is a polynomial in the u_g, bilinear for the usual weights with two grouped axes.

With budget_metric="flops" each tensor is weighted by the output positions of the weight nodes
that use it (multiply-accumulates = structural weight entries x output positions, for a forward
pass over example_input; see `mac_weights`); biases, norms, elementwise ops, pooling and
embedding lookups count zero.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

import torch
import torch.fx as fx

from pleas_fx.core.errors import PleasError
from pleas_fx.core.fxutil import ShapeRecorder, getattr_path
from pleas_fx.core.ir import GroupSpec, Layout
from pleas_fx.core.layers import BLOCK_LAYERS
from pleas_fx.passes.weights import weight_nodes


@dataclass
class _Tensor:
    name: str
    weight: int  # multiplier: 1 for parameters, output positions for MACs
    axes: list[tuple[int, dict[int, int]]]  # per axis: (size in one model, {group: entries per unit})

    @property
    def full(self) -> int:
        return prod(a for a, _ in self.axes)

    def count(self, u: dict[int, int]) -> int:
        shared = 1
        for a, coef in self.axes:
            shared *= a - sum(c * u[g] for g, c in coef.items())
        return self.weight * (2 * self.full - shared)


@dataclass
class Polynomial:
    """footprint(u) = const + sum_g lin[g] u_g + sum_(g<=h) quad[(g, h)] u_g u_h (integers).

    `exact` is False when some tensor had three or more grouped axes; its shared product is then
    bounded below (see `Footprint.polynomial`), so the polynomial is an upper bound of the
    footprint (sound for a budget constraint) that is exact at u = 0."""

    const: int = 0
    lin: dict[int, int] = field(default_factory=dict)
    quad: dict[tuple[int, int], int] = field(default_factory=dict)
    exact: bool = True

    def add_lin(self, g: int, v: int) -> None:
        if v:
            self.lin[g] = self.lin.get(g, 0) + v

    def add_quad(self, g: int, h: int, v: int) -> None:
        if v:
            key = (g, h) if g <= h else (h, g)
            self.quad[key] = self.quad.get(key, 0) + v

    def __call__(self, u: dict[int, int]) -> int:
        return (self.const + sum(v * u[g] for g, v in self.lin.items())
                + sum(v * u[g] * u[h] for (g, h), v in self.quad.items()))


@dataclass
class Footprint:
    """Size of the merged model as a function of the group widths.

    By default every parameter in `parameter_names` counts its structural entries (metric
    "params"). `weights` (name -> integer multiplier; names missing from it count zero) turns
    this into other linear measures, e.g. multiply-accumulates (`Footprint.flops`)."""

    spec: GroupSpec
    parameter_names: list[str]
    weights: dict[str, int] | None = None
    metric: str = "params"

    def __post_init__(self) -> None:
        self.frozen = self.spec.fixed()
        self.sizes = {g.id: g.size for g in self.spec.mergeable()}
        self.tensors: list[_Tensor] = []
        self.by_group: dict[int, list[int]] = {g: [] for g in self.sizes}
        for name in self.parameter_names:
            weight = 1 if self.weights is None else int(self.weights.get(name, 0))
            if weight == 0:
                continue
            axes = [self._axis(lay) for lay in self.spec.param_layouts[name]]
            idx = len(self.tensors)
            self.tensors.append(_Tensor(name, weight, axes))
            for g in sorted({g for _, coef in axes for g in coef}):
                self.by_group[g].append(idx)
        self.neighbours = {g: sorted({h for t in ts for _, coef in self.tensors[t].axes for h in coef})
                           for g, ts in self.by_group.items()}
        self.base = self.count({g: d for g, d in self.sizes.items()})

    @classmethod
    def flops(cls, gm: fx.GraphModule, spec: GroupSpec, parameter_names: list[str] | None = None) -> "Footprint":
        """Multiply-accumulates of a forward pass over the example input `gm` was shape-propagated
        with (see `mac_weights`)."""
        names = parameter_names if parameter_names is not None else [n for n, _ in gm.named_parameters()]
        return cls(spec, names, mac_weights(gm), "flops")

    def _axis(self, layout: Layout) -> tuple[int, dict[int, int]]:
        full, coef = 0, {}
        for seg in layout:
            rep = seg.inner * seg.outer
            full += seg.size * rep
            if seg.group not in self.frozen and rep and seg.size:
                coef[seg.group] = coef.get(seg.group, 0) + rep
        return full, coef

    # -- exact counts
    def unmerged(self, widths: dict[int, int]) -> dict[int, int]:
        return {g: widths[g] - d for g, d in self.sizes.items()}

    def widths(self, u: dict[int, int]) -> dict[int, int]:
        return {g: d + u[g] for g, d in self.sizes.items()}

    def count(self, widths: dict[int, int]) -> int:
        """Exact footprint at these widths (width of group g in [d_g, 2 d_g])."""
        return self.count_unmerged(self.unmerged(widths))

    def count_unmerged(self, u: dict[int, int]) -> int:
        return sum(t.count(u) for t in self.tensors)

    def delta(self, u: dict[int, int], g: int, step: int) -> int:
        """Exact change of the footprint when u_g changes by `step`."""
        tensors = [self.tensors[i] for i in self.by_group[g]]
        before = sum(t.count(u) for t in tensors)
        u[g] += step
        try:
            after = sum(t.count(u) for t in tensors)
        finally:
            u[g] -= step
        return after - before

    # -- the polynomial (for the MIP)
    def polynomial(self) -> Polynomial:
        """footprint = sum_t w_t (2 prod_i A_i - prod_i s_i) with s_i = A_i - sum_g c_ig u_g, expanded."""
        poly = Polynomial()
        for t in self.tensors:
            grouped = [i for i, (_, coef) in enumerate(t.axes) if coef]
            fixed = prod(a for i, (a, _) in enumerate(t.axes) if i not in grouped)
            poly.const += t.weight * t.full
            if not grouped:
                continue
            if len(grouped) == 1:
                (_, c1) = t.axes[grouped[0]]
                for g, c in c1.items():  # -w fixed (a1 - c1.u): the -w full part cancels in const
                    poly.add_lin(g, t.weight * fixed * c)
                continue
            k = t.weight * fixed
            if len(grouped) > 2:
                # sound bound: with p_i = s_i / A_i in [0, 1], prod_i p_i >= p_1 p_2 - sum_(i>2) (1 - p_i),
                # exact whenever at most two of the axes are widened; the two most variable axes stay exact
                poly.exact = False
                span = lambda i: sum(c * self.sizes[g] for g, c in t.axes[i][1].items()) / max(t.axes[i][0], 1)
                grouped.sort(key=span, reverse=True)
                for i in grouped[2:]:
                    a, coef = t.axes[i]
                    k *= a
                    for g, c in coef.items():  # + w full (1 - p_i) = w (full / A_i) c.u
                        poly.add_lin(g, t.weight * (t.full // a) * c)
            (a1, c1), (a2, c2) = t.axes[grouped[0]], t.axes[grouped[1]]
            # -k (a1 - c1.u)(a2 - c2.u) = -k a1 a2 + k a1 c2.u + k a2 c1.u - k (c1.u)(c2.u)
            # (k a1 a2 = w full, so the constant part cancels against the const added above)
            for g, c in c2.items():
                poly.add_lin(g, k * a1 * c)
            for g, c in c1.items():
                poly.add_lin(g, k * a2 * c)
            for g, cg in c1.items():
                for h, ch in c2.items():
                    poly.add_quad(g, h, -k * cg * ch)
        return poly


def mac_weights(gm: fx.GraphModule) -> dict[str, int]:
    """Parameter name -> output positions summed over the weight nodes that use it.

    A weight node is any node whose op spec names its weight (passes/weights.py). Its multiply-accumulates are (weight entries) x (output positions), the
    positions being the output's element count divided by the weight's output-feature count
    (spatial positions x batch for a conv, tokens x batch for a linear). Needs node.meta
    from shape propagation."""
    weights: dict[str, int] = {}
    nodes = {n.name: n for n in gm.graph.nodes}
    for w in weight_nodes(gm):
        meta = nodes[w.node].meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            raise PleasError(f"no propagated shape for weight node {w.node}; run shape propagation first")
        weight = getattr_path(gm, w.weight)
        weights[w.weight] = weights.get(w.weight, 0) + prod(meta.shape) // max(weight.shape[0], 1)
    return weights


def measure_macs(gm: fx.GraphModule, example_args: tuple, structural: bool = True) -> int:
    """Multiply-accumulates of `gm`'s weight nodes and block layers on `example_args`, counted on
    the module itself: non-zero weight entries (structural=True) or all stored entries, times
    output positions."""
    with torch.no_grad():
        ShapeRecorder(gm).run(*example_args)
    total = 0
    nodes = {n.name: n for n in gm.graph.nodes}
    for w in weight_nodes(gm):
        weight = getattr_path(gm, w.weight)
        entries = int(torch.count_nonzero(weight)) if structural else weight.numel()
        total += entries * (prod(nodes[w.node].meta["tensor_meta"].shape) // max(weight.shape[0], 1))
    for node in gm.graph.nodes:  # block layers (compact emission): every stored block entry
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(mod, BLOCK_LAYERS):
            blocks = [p for p in (mod.weight_a, mod.weight_s, mod.weight_b) if p is not None]
            entries = sum(int(torch.count_nonzero(p)) if structural else p.numel() for p in blocks)
            total += entries * (prod(node.meta["tensor_meta"].shape) // max(mod.out_features, 1))
    return total
