"""More calibration samples for the data-limited layers of merged-input least squares.

A layer whose calibration samples give only a row or two per entry of its merged input (a
Linear layer on flattened or pooled features reads one row per sample) nearly interpolates its
rows, and its solve generalises poorly. Such a level of the refinement (passes/merged_inputs.py
`top_up_samples`) reads more samples: first the calibration batches past the leading ones, then
*mixup* copies of the leading batches -- per sample a convex mix (1 - lam) x_i + lam x_j of two
samples of one batch, lam ~ U[0, MIX_MAX], every floating-point input mixed alike. No labels are
needed: the least-squares targets are the sources' own activations on the mixed inputs.

Measured on tools/bench_methods.py's digit VGG pairs (3 scenarios, 3 seeds; the first Linear
layer reads 500 rows for 577 entries of its widest merged input): see docs/DESIGN.md and the
README. Classifiers with 4-8 rows per entry gained nothing with copies (the VGG's last layer) or
lost up to 1 point (the digit ResNet's on the rotated pair: mixed inputs lie off the data),
hence the threshold of passes/merged_inputs.py `TOP_UP_ROWS_PER_INPUT`. Inputs that cannot be
mixed (integer token ids, masks) get no copies."""
from __future__ import annotations

import zlib

import torch

from pleas_fx.passes.positions import batch_samples, map_samples, per_sample_tensors

MIX_MAX = 0.4  # the partner sample's largest weight: a mixed sample stays mostly one sample


def _mixable(batch) -> bool:
    """Every tensor with the batch's leading size is floating point, and there are two samples."""
    batched = per_sample_tensors(batch)
    return batch_samples(batch) >= 2 and bool(batched) and all(t.is_floating_point() for t in batched)


def _mixed(batch, gen: torch.Generator):
    n = batch_samples(batch)
    partner = torch.randperm(n, generator=gen)
    lam = torch.rand(n, generator=gen, dtype=torch.float64) * MIX_MAX

    def mix(t: torch.Tensor) -> torch.Tensor:
        w = lam.to(t.device, t.dtype).view(n, *[1] * (t.dim() - 1))
        return (1 - w) * t + w * t[partner.to(t.device)]

    return map_samples(batch, mix)


def _head(batch, n: int):
    """The first n samples of a batch."""
    return batch if n >= batch_samples(batch) else map_samples(batch, lambda t: t[:n])


def mixup_batches(batches: list, samples: int, seed: int = 0) -> list:
    """Mixup copies of `batches` (argument tuples), cycling through them, holding `samples`
    samples (the last copy cut short); [] when some batch cannot be mixed (its inputs are not all
    data). Reproducible from `seed` (the same on every rank)."""
    if not batches or not all(_mixable(b) for b in batches):
        return []
    out, seen, k = [], 0, 0
    while seen < samples:
        gen = torch.Generator().manual_seed(zlib.crc32(f"mixup:{seed}:{k}".encode()))
        out.append(_head(_mixed(batches[k % len(batches)], gen), samples - seen))
        seen += batch_samples(out[-1])
        k += 1
    return out


def top_up_batches(rest: list, leading: list, samples: int, seed: int = 0) -> list:
    """`samples` more samples for the data-limited levels (fewer where there are none to mix):
    the calibration batches past the leading ones (`rest`) first, then mixup copies of the
    `leading` batches; the last batch cut short."""
    out, seen = [], 0
    for batch in rest:
        if seen >= samples:
            break
        out.append(_head(batch, samples - seen))
        seen += batch_samples(out[-1])
    if seen < samples:
        out += mixup_batches(leading, samples - seen, seed)
    return out
