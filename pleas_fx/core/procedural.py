"""Procedural calibration images for PLeaS-free (no data from the training domains).

`procedural_batches` draws inputs shaped like example_input from a small family of
structured random images: smooth random fields (low-resolution noise upsampled), oriented
sinusoidal gratings, square-wave stripes and Gaussian blobs, mixed two at a time with random
weights. Every sample is normalised per channel to mean 0 and standard deviation 1, like the
usual normalised inputs. Unlike white Gaussian noise these images have spatial structure (edges,
blobs, low frequencies), so the activations of convolutional networks look more like those on
real images. 4-D inputs (N, C, H, W) get 2-D images, 3-D inputs (N, C, L) and 2-D inputs (N, D)
get 1-D signals of the same kinds; integer inputs are drawn uniformly from the example's range.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KINDS = ("smooth", "grating", "stripes", "blobs")


def _coords(shape: tuple[int, ...]) -> list[torch.Tensor]:
    axes = [torch.linspace(0.0, 1.0, n) for n in shape]
    return list(torch.meshgrid(*axes, indexing="ij")) if len(axes) > 1 else axes


def _pattern(kind: str, channels: int, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """One (channels, *shape) pattern of the given kind (shape has 1 or 2 spatial dims)."""
    rand = lambda *s: torch.rand(*s, generator=gen)
    if kind == "smooth":
        low = tuple(int(torch.randint(2, max(3, min(9, n // 2 + 2)), (1,), generator=gen)) for n in shape)
        noise = torch.randn(1, channels, *low, generator=gen)
        mode = "bilinear" if len(shape) == 2 else "linear"
        return F.interpolate(noise, size=shape, mode=mode, align_corners=False)[0]
    coords = _coords(shape)
    if kind in ("grating", "stripes"):
        theta = 2 * math.pi * float(rand(1))
        direction = [math.cos(theta), math.sin(theta)][: len(shape)]
        cycles = 1.0 + float(rand(1)) * max(1.0, max(shape) / 4.0)
        proj = sum(d * c for d, c in zip(direction, coords))
        phase = 2 * math.pi * rand(channels)
        wave = torch.sin(2 * math.pi * cycles * proj[None] + phase.reshape(-1, *[1] * len(shape)))
        return torch.sign(wave) if kind == "stripes" else wave
    # blobs: a few Gaussian bumps with random centres, widths and signed per-channel amplitudes
    out = torch.zeros(channels, *shape)
    for _ in range(int(torch.randint(1, 6, (1,), generator=gen))):
        centre = rand(len(shape))
        width = 0.05 + 0.25 * float(rand(1))
        dist2 = sum((c - float(m)) ** 2 for c, m in zip(coords, centre))
        amp = torch.randn(channels, generator=gen).reshape(-1, *[1] * len(shape))
        out = out + amp * torch.exp(-dist2 / (2 * width**2))[None]
    return out


def procedural_image(channels: int, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A (channels, *shape) sample: two random patterns mixed, normalised per channel."""
    k1, k2 = (KINDS[int(i)] for i in torch.randint(0, len(KINDS), (2,), generator=gen))
    w = torch.rand(2, generator=gen)
    x = w[0] * _pattern(k1, channels, shape, gen) + w[1] * _pattern(k2, channels, shape, gen)
    x = x + 0.05 * torch.randn(x.shape, generator=gen)  # a little texture; never constant
    flat = x.reshape(channels, -1)
    if flat.shape[1] < 2:  # a single position per channel: no structure to draw
        return torch.randn(channels, *shape, generator=gen)
    x = (flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True, correction=0).clamp_min(1e-6)
    return x.reshape(channels, *shape)


def procedural_batches(example_args: tuple, batches: int, batch_size: int = 32, seed: int = 0,
                       vocab: dict[int, int] | None = None) -> list[tuple]:
    """`batches` batches of procedural inputs shaped like `example_args` (see the module doc)."""
    from pleas_fx.core.inputs import batches_like

    def floating(shape: tuple, gen: torch.Generator) -> torch.Tensor:
        n = shape[0]
        if len(shape) == 4:
            return torch.stack([procedural_image(shape[1], tuple(shape[2:]), gen) for _ in range(n)])
        if len(shape) == 3:
            return torch.stack([procedural_image(shape[1], (shape[2],), gen) for _ in range(n)])
        if len(shape) == 2:
            return torch.stack([procedural_image(1, (shape[1],), gen)[0] for _ in range(n)])
        return torch.randn(shape, generator=gen)

    return batches_like(example_args, batches, batch_size, seed, floating, vocab)
