"""Statistics pass: one streamed pass of the calibration data through both source models.

The two traced graphs run node by node in lockstep; values are freed after their last use,
so no activation outlives the node that needs it. Two kinds of probes accumulate running sums
in float64 (each chunk's product is taken in the activations' precision, at least float32):

- least-squares probes (one per weight node): second moments S = E[s s^T] of the stacked,
  bias-augmented input s = [x_A; x_B; 1] (im2col patches for a convolution). Every budget's
  least-squares solve is linear algebra on S alone.
- matching sites (one per activation axis of a mergeable group): E[z_A z_B^T], E[z_A^2],
  E[z_B^2] over every other axis treated as samples.
"""
from __future__ import annotations

import itertools
import logging
import math
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
GRAM_CHUNK_ROWS = 8192  # rows per low-precision product before the float64 sum


@dataclass
class SecondMoments:
    """Running sums for E[s s^T] of the stacked input s = [x_A; x_B; 1], kept as blocks.

    Only the blocks A^T A, A^T B, B^T B and the column sums are accumulated (B^T A is the
    transpose of A^T B): three products instead of four. Each chunk's product is computed in
    the activations' precision and added to float64 running sums (``dtype``).
    """

    dim_a: int
    dim_b: int
    aa: torch.Tensor
    ab: torch.Tensor
    bb: torch.Tensor
    sum_a: torch.Tensor
    sum_b: torch.Tensor
    count: int = 0

    @classmethod
    def zeros(cls, dim_a: int, dim_b: int, dtype: torch.dtype, device) -> "SecondMoments":
        z = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)
        return cls(dim_a, dim_b, z(dim_a, dim_a), z(dim_a, dim_b), z(dim_b, dim_b), z(dim_a), z(dim_b))

    @property
    def dim(self) -> int:
        return self.dim_a + self.dim_b + 1

    def mean(self) -> torch.Tensor:
        """E[s s^T] as one (dim_a + dim_b + 1)-square matrix, bias last."""
        da, db, n = self.dim_a, self.dim_b, max(self.count, 1)
        out = torch.empty(self.dim, self.dim, dtype=self.aa.dtype, device=self.aa.device)
        out[:da, :da] = 0.5 * (self.aa + self.aa.T)  # exactly symmetric, whatever the BLAS did
        out[:da, da:da + db] = self.ab
        out[da:da + db, :da] = self.ab.T
        out[da:da + db, da:da + db] = 0.5 * (self.bb + self.bb.T)
        out[:da, -1] = out[-1, :da] = self.sum_a
        out[da:da + db, -1] = out[-1, da:da + db] = self.sum_b
        out[-1, -1] = self.count
        return out / n


@dataclass
class SiteMoments:
    cross: torch.Tensor  # sum z_A z_B^T
    sq_a: torch.Tensor
    sq_b: torch.Tensor
    count: int = 0
    # with full=True (ZipIt! matching): sums z_A z_A^T, z_B z_B^T, z_A, z_B; otherwise None
    aa: torch.Tensor | None = None
    bb: torch.Tensor | None = None
    sum_a: torch.Tensor | None = None
    sum_b: torch.Tensor | None = None


@dataclass
class Statistics:
    least_squares: dict[str, SecondMoments] = field(default_factory=dict)
    sites: dict[tuple, SiteMoments] = field(default_factory=dict)  # keyed by Site.key
    batches: int = 0
    samples: int = 0
    cache: dict = field(default_factory=dict)  # budget-independent products, reused by every fill


def _input_chunks(node: LeastSquaresNode, xa: torch.Tensor, xb: torch.Tensor, positions: int | None,
                  gen: torch.Generator | None):
    """The weight node's inputs in A and B as its weights see them, as aligned chunks of shape
    (features, rows): rows of a Linear's input, or a convolution's im2col patches.

    Convolutions are unfolded a few samples at a time (bounded memory); with ``positions`` set,
    that many output positions per sample are drawn at random (the same ones in A and B).
    """
    if node.kind == "linear":
        fa, fb = xa.reshape(-1, xa.shape[-1]), xb.reshape(-1, xb.shape[-1])
        for start in range(0, fa.shape[0], GRAM_CHUNK_ROWS):
            yield fa[start:start + GRAM_CHUNK_ROWS].T, fb[start:start + GRAM_CHUNK_ROWS].T
        return
    if xa.dim() == 3:  # conv1d: treat as conv2d of height 1
        xa, xb = xa.unsqueeze(2), xb.unsqueeze(2)
    unfold = lambda x: F.unfold(x, node.kernel, dilation=node.dilation, padding=node.padding, stride=node.stride)
    out_h, out_w = (_conv_out(xa.shape[2 + i], node.kernel[i], node.stride[i], node.padding[i], node.dilation[i])
                    for i in range(2))
    length = out_h * out_w
    sampled = positions is not None and positions < length
    step = max(1, GRAM_CHUNK_ROWS // (positions if sampled else length))
    for start in range(0, xa.shape[0], step):
        if sampled:
            idx = torch.randperm(length, generator=gen)[:positions].to(xa.device)
            ca, cb = (_patches_at(node, x[start:start + step], idx, out_w) for x in (xa, xb))
        else:
            ca, cb = unfold(xa[start:start + step]), unfold(xb[start:start + step])  # (n, features, L)
        yield ca.transpose(0, 1).reshape(ca.shape[1], -1), cb.transpose(0, 1).reshape(cb.shape[1], -1)


def _conv_out(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _patches_at(node: LeastSquaresNode, x: torch.Tensor, idx: torch.Tensor, out_w: int) -> torch.Tensor:
    """im2col columns at the output positions ``idx`` only: (n, C*kh*kw, len(idx)), ordered as
    F.unfold orders them, gathered without unfolding the whole map."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = node.kernel, node.stride, node.padding, node.dilation
    xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    oy, ox = idx // out_w, idx % out_w
    ky = torch.arange(kh, device=x.device).repeat_interleave(kw)
    kx = torch.arange(kw, device=x.device).repeat(kh)
    rows = oy[None, :] * sh + ky[:, None] * dh  # (kh*kw, P)
    cols = ox[None, :] * sw + kx[:, None] * dw
    patches = xp[:, :, rows, cols]  # (n, C, kh*kw, P)
    return patches.reshape(x.shape[0], -1, idx.numel())


def _accumulate_gram(acc: SecondMoments, chunks, dtype) -> None:
    """Add a batch's input chunks (features, rows) to the running sums.

    Products run in the activations' own precision (at least float32; float64 if the
    activations are), one chunk of a few thousand rows at a time, and are summed into
    ``dtype`` (float64 by default) across chunks.
    """
    for a, b in chunks:
        work = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
        a, b = a.to(work), b.to(work)
        acc.aa += (a @ a.T).to(dtype)
        acc.ab += (a @ b.T).to(dtype)
        acc.bb += (b @ b.T).to(dtype)
        acc.sum_a += a.sum(1).to(dtype)
        acc.sum_b += b.sum(1).to(dtype)
        acc.count += a.shape[1]


def _accumulate_site(acc: SiteMoments, za: torch.Tensor, zb: torch.Tensor, axis: int, dtype) -> None:
    """Add E[z_A z_B^T] and the squares, every axis but ``axis`` taken as samples."""
    work = torch.promote_types(torch.promote_types(za.dtype, zb.dtype), torch.float32)
    d = za.shape[axis]
    a = za.movedim(axis, 0).reshape(d, -1).to(work)  # (features, samples); one copy at most
    b = zb.movedim(axis, 0).reshape(d, -1).to(work)
    for start in range(0, a.shape[1], GRAM_CHUNK_ROWS):
        ca, cb = a[:, start:start + GRAM_CHUNK_ROWS], b[:, start:start + GRAM_CHUNK_ROWS]
        acc.cross += (ca @ cb.T).to(dtype)
        acc.sq_a += (ca * ca).sum(1).to(dtype)
        acc.sq_b += (cb * cb).sum(1).to(dtype)
        if acc.aa is not None:
            acc.aa += (ca @ ca.T).to(dtype)
            acc.bb += (cb @ cb.T).to(dtype)
            acc.sum_a += ca.sum(1).to(dtype)
            acc.sum_b += cb.sum(1).to(dtype)
    acc.count += a.shape[1]


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
    positions: int | None = None,
    seed: int = 0,
    full_sites: bool = False,
) -> Statistics:
    """Run every batch through both models once and accumulate the probes' moments.

    ``positions``: for convolutions, use at most this many randomly drawn output positions
    per sample (drawn anew for each chunk of samples) in the least-squares moments (None: all). The cost of those moments
    grows with positions x (2 x input patch size)^2, which dominates on large feature maps.
    ``full_sites``: also accumulate each site's within-model moments and sums (ZipIt! matching).
    """
    gen = torch.Generator().manual_seed(seed)
    stats = Statistics()
    nodes_a, nodes_b = list(gm_a.graph.nodes), list(gm_b.graph.nodes)
    ls_by_node = {n.node: n for n in ls_nodes}
    sites_by_node: dict[str, list[Site]] = {}
    for site in sites:
        sites_by_node.setdefault(site.node, []).append(site)
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
                    if placeholder < len(args):
                        env_a[na.name] = env_b[nb.name] = args[placeholder]
                    elif na.args:  # an optional argument the batches leave out: its default
                        env_a[na.name] = env_b[nb.name] = na.args[0]
                    else:
                        raise ValueError(f"the batches give {len(args)} inputs; the model needs {na.name!r} too")
                    placeholder += 1
                    continue
                if na.op == "output":
                    break
                probe = ls_by_node.get(na.name)
                if probe is not None:
                    chunks = _input_chunks(probe, env_a[na.args[0].name], env_b[nb.args[0].name],
                                           positions, gen)
                    first = next(chunks)
                    acc = stats.least_squares.get(na.name)
                    if acc is None:
                        acc = stats.least_squares[na.name] = SecondMoments.zeros(
                            first[0].shape[0], first[1].shape[0], dtype, device)
                    _accumulate_gram(acc, itertools.chain([first], chunks), dtype)
                env_a[na.name] = _execute(gm_a, na, env_a)
                env_b[nb.name] = _execute(gm_b, nb, env_b)
                for site in sites_by_node.get(na.name, ()):
                    za, zb = env_a[na.name], env_b[nb.name]
                    axis = site.axis
                    if site.within_axis is not None:  # units x within entries, as one axis
                        za, zb = (z.movedim((site.axis, site.within_axis), (-2, -1)).flatten(-2) for z in (za, zb))
                        axis = -1
                    acc_s = stats.sites.get(site.key)
                    if acc_s is None:
                        d = za.shape[axis]
                        zeros = lambda *s: torch.zeros(*s, dtype=dtype, device=device)
                        acc_s = stats.sites[site.key] = SiteMoments(zeros(d, d), zeros(d), zeros(d))
                        if full_sites:
                            acc_s.aa, acc_s.bb, acc_s.sum_a, acc_s.sum_b = zeros(d, d), zeros(d, d), zeros(d), zeros(d)
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
