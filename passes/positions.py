"""How many rows a moment reads: every output position of a convolution (exact), a fixed number
per sample, or -- `positions="auto"`, the default -- just enough rows for the statistic it feeds.

A d-entry second moment estimated from R independent rows has relative errors ~ sqrt(d / R):
beyond a few dozen rows per entry more rows change a solve or a matching by less than the
calibration sample itself does, while the cost grows with every row (R d^2). Large early maps
(56x56 in an ImageNet ResNet: 3,136 positions per image) give 100-1000x more rows than that; the
auto rule draws only

    positions per sample = ceil(max(minimum, rows_per_entry x d) / samples)

of them (every position when the map has no more), so the cost of every layer's moments is
bounded by ~rows_per_entry x d^3 whatever the resolution. Least-squares moments (d: the solved
input's entries) keep at least 32 rows per entry; matching sites (d: one model's features at the
site) 16, with 32,768 rows at least for both.

Draws are reproducible and independent of sharding: each (batch, layer) pair seeds its own
generator from the merge's seed, the batch's index in the calibration data and the layer's
name, so a torchrun merge reads the same rows as a single-process one.
"""
from __future__ import annotations

import math
import zlib
from typing import Iterable

import torch
from torch.utils._pytree import tree_leaves, tree_map

from pleas_fx.core.ir import WeightNode
from pleas_fx.passes.patch_plan import exact_is_cheaper, node_output_size, node_pads

AUTO = "auto"
LS_ROWS_PER_ENTRY = 32  # least-squares moments: rows per entry of the solved input
SITE_ROWS_PER_ENTRY = 16  # matching sites: rows per feature of one model
MIN_ROWS = 32_768  # at least this many rows (all there are, when fewer)


def per_sample(option: int | str | None, dim: int, samples: int | None, available: int,
               rows_per_entry: int = LS_ROWS_PER_ENTRY) -> int | None:
    """Positions to draw per sample for a `dim`-entry moment over `samples` samples with
    `available` positions each; None: every position (exact). `option`: None (exact), a fixed
    count, or AUTO (unknown `samples`, as for data read lazily: exact)."""
    if option is None or (option == AUTO and not samples):
        return None
    count = option if option != AUTO else math.ceil(max(MIN_ROWS, rows_per_entry * dim) / samples)
    return None if count >= available else max(1, int(count))


def conv_positions(option: int | str | None, node: WeightNode, x: torch.Tensor, dim: int, samples: int | None,
                   rows_per_entry: int = LS_ROWS_PER_ENTRY) -> int | None:
    """Positions per sample a convolution's input moment reads on the (N, C, H, W) input `x`
    (`per_sample` for its `dim`-entry moment), or None: every position, summed exactly -- also
    wherever that costs no more than the drawn ones (passes/patch_plan.py `exact_is_cheaper`).
    The one decision of the statistics pass and of merged-input least squares."""
    out_h, out_w = node_output_size(node, x)
    count = per_sample(option, dim, samples, out_h * out_w, rows_per_entry)
    if count is None or exact_is_cheaper(x.shape, node.kernel, node.stride, node_pads(node), node.dilation, count,
                                         device=x.device):
        return None
    return count


def generator(seed: int, batch_index: int, key: str) -> torch.Generator:
    """The draws of one batch at one layer (or site): the same on every rank and in every run."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{batch_index}:{key}".encode()))


def draw(gen: torch.Generator, available: int, count: int, device) -> torch.Tensor:
    """`count` distinct positions of `available`, sorted (contiguous reads)."""
    return torch.randperm(available, generator=gen)[:count].sort().values.to(device)


def batch_samples(batch) -> int:
    """Samples in a batch: the leading size of its first tensor."""
    if torch.is_tensor(batch):
        return int(batch.shape[0]) if batch.dim() else 1
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        n = batch_samples(item)
        if n:
            return n
    return 0


def _per_sample(value, samples: int) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == samples


def per_sample_tensors(batch) -> list[torch.Tensor]:
    """A batch's tensors that hold one entry per sample (leading size = `batch_samples`)."""
    n = batch_samples(batch)
    return [t for t in tree_leaves(batch) if _per_sample(t, n)]


def map_samples(batch, fn):
    """The batch with `fn` applied to every tensor that holds one entry per sample (slicing,
    mixing samples); anything else passed whole."""
    n = batch_samples(batch)
    return tree_map(lambda t: fn(t) if _per_sample(t, n) else t, batch)


def total_samples(batches: Iterable) -> int | None:
    """Samples in calibration batches held in a list or tuple (None when read lazily)."""
    if not isinstance(batches, (list, tuple)):
        return None
    return sum(batch_samples(b) for b in batches)
