"""Statistics pass: one streamed pass of the calibration data through both source models.

The two traced graphs run node by node in lockstep; values are freed after their last use,
so no activation outlives the node that needs it. Two kinds of probes accumulate, in float64:

- least-squares probes (one per weight node): second moments S = E[s s^T] of the stacked,
  bias-augmented input s = [x_A; x_B; 1] (im2col patches for a convolution). Every budget's
  least-squares solve is linear algebra on S alone.
- matching sites (one per activation axis of a mergeable group): E[z_A z_B^T], E[z_A^2],
  E[z_B^2] over every other axis treated as samples.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm.auto import tqdm

from pleas_fx.ir import LeastSquaresNode, Site
from passes.trace import getattr_path

log = logging.getLogger(__name__)

CHUNK_BYTES = 256 * 2**20


@dataclass
class SecondMoments:
    """Running E[s s^T] of stacked inputs (sum and count until finalised)."""

    dim: int
    total: torch.Tensor
    count: int = 0

    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)


@dataclass
class SiteMoments:
    cross: torch.Tensor  # sum z_A z_B^T
    sq_a: torch.Tensor
    sq_b: torch.Tensor
    count: int = 0


@dataclass
class Statistics:
    least_squares: dict[str, SecondMoments] = field(default_factory=dict)
    sites: dict[tuple[str, int], SiteMoments] = field(default_factory=dict)
    batches: int = 0
    samples: int = 0
    cache: dict = field(default_factory=dict)  # budget-independent products, reused by every fill


def _patches(node: LeastSquaresNode, x: torch.Tensor) -> torch.Tensor:
    """Rows of the weight node's input as its weight sees them (im2col for convolutions)."""
    if node.kind == "linear":
        return x.reshape(-1, x.shape[-1])
    if x.dim() == 3:  # conv1d: treat as conv2d of height 1
        x = x.unsqueeze(2)
    cols = F.unfold(x, node.kernel, dilation=node.dilation, padding=node.padding, stride=node.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _accumulate_gram(acc: SecondMoments, xa: torch.Tensor, xb: torch.Tensor, dtype) -> None:
    rows = xa.shape[0]
    step = max(1, CHUNK_BYTES // (acc.dim * 8))
    for start in range(0, rows, step):
        a, b = xa[start:start + step].to(dtype), xb[start:start + step].to(dtype)
        ones = torch.ones(a.shape[0], 1, dtype=dtype, device=a.device)
        s = torch.cat([a, b, ones], dim=1)
        acc.total.addmm_(s.T, s)
    acc.count += rows


def _accumulate_site(acc: SiteMoments, za: torch.Tensor, zb: torch.Tensor, axis: int, dtype) -> None:
    a = za.movedim(axis, -1).reshape(-1, za.shape[axis]).to(dtype)
    b = zb.movedim(axis, -1).reshape(-1, zb.shape[axis]).to(dtype)
    acc.cross.addmm_(a.T, b)
    acc.sq_a += (a * a).sum(0)
    acc.sq_b += (b * b).sum(0)
    acc.count += a.shape[0]


def _execute(gm: fx.GraphModule, node: fx.Node, env: dict[str, Any]) -> Any:
    args = fx.node.map_arg(node.args, lambda n: env[n.name])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n.name])
    if node.op == "get_attr":
        return getattr_path(gm, node.target)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    raise RuntimeError(f"cannot execute node {node.name} ({node.op})")


def collect_statistics(
    gm_a: fx.GraphModule,
    gm_b: fx.GraphModule,
    batches: Iterable[tuple],
    ls_nodes: list[LeastSquaresNode],
    sites: list[Site],
    *,
    dtype: torch.dtype = torch.float64,
    progress: bool = True,
    total: int | None = None,
) -> Statistics:
    """Run every batch through both models once and accumulate the probes' moments."""
    stats = Statistics()
    nodes_a, nodes_b = list(gm_a.graph.nodes), list(gm_b.graph.nodes)
    ls_by_node = {n.node: n for n in ls_nodes}
    sites_by_node: dict[str, list[int]] = {}
    for site in sites:
        sites_by_node.setdefault(site.node, []).append(site.axis)
    last_use: dict[str, int] = {}
    for i, node in enumerate(nodes_a):
        for inp in node.all_input_nodes:
            last_use[inp.name] = i
    device = next((p.device for p in gm_a.parameters()), torch.device("cpu"))

    with torch.no_grad():
        for args in tqdm(batches, total=total, disable=not progress, desc="pleas_fx statistics", unit="batch"):
            env_a: dict[str, Any] = {}
            env_b: dict[str, Any] = {}
            placeholder = 0
            for i, (na, nb) in enumerate(zip(nodes_a, nodes_b)):
                if na.op == "placeholder":
                    env_a[na.name] = env_b[nb.name] = args[placeholder]
                    placeholder += 1
                    continue
                if na.op == "output":
                    break
                probe = ls_by_node.get(na.name)
                if probe is not None:
                    xa = _patches(probe, env_a[na.args[0].name])
                    xb = _patches(probe, env_b[nb.args[0].name])
                    acc = stats.least_squares.get(na.name)
                    if acc is None:
                        dim = 2 * xa.shape[1] + 1
                        acc = stats.least_squares[na.name] = SecondMoments(
                            dim, torch.zeros(dim, dim, dtype=dtype, device=device))
                    _accumulate_gram(acc, xa, xb, dtype)
                env_a[na.name] = _execute(gm_a, na, env_a)
                env_b[nb.name] = _execute(gm_b, nb, env_b)
                for axis in sites_by_node.get(na.name, ()):
                    za, zb = env_a[na.name], env_b[nb.name]
                    acc_s = stats.sites.get((na.name, axis))
                    if acc_s is None:
                        d = za.shape[axis]
                        zeros = lambda *s: torch.zeros(*s, dtype=dtype, device=device)
                        acc_s = stats.sites[(na.name, axis)] = SiteMoments(zeros(d, d), zeros(d), zeros(d))
                    _accumulate_site(acc_s, za, zb, axis, dtype)
                for inp in na.all_input_nodes:
                    if last_use.get(inp.name) == i:
                        env_a.pop(inp.name, None)
                        env_b.pop(inp.name, None)
            stats.batches += 1
            stats.samples += int(args[0].shape[0]) if torch.is_tensor(args[0]) else 0
    log.info("statistics: %d batches, %d samples, %d least-squares probes, %d matching sites",
             stats.batches, stats.samples, len(stats.least_squares), len(stats.sites))
    return stats
