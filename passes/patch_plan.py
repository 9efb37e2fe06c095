"""The plan of the exact convolution-patch moments (passes/patch_moments.py): per axis, the
polyphase decomposition of every tap, the tap pairs sharing phases and shift (combos), their
windows cut into segments, and a cost model that picks between correlation and unfolding."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pleas_fx.core.ir import WeightNode

CHUNK_BYTES = 64 * 2**20

# Cost model for method="auto": seconds = multiply-adds / MACS + torch calls * CALL + bytes / BYTES.
# CPU figures measured on the development machine (MKL, float32, 1 thread); the CUDA figures are
# rough, unmeasured guesses (kernel launch plus Python per call dominates there).
_SPEED = {"cpu": (2.5e10, 1.0e-5, 5e9), "cuda": (2.5e13, 1.5e-5, 2e12)}


def conv_output_size(size: int, kernel: int, stride: int, pad_before: int, pad_after: int,
                     dilation: int) -> int:
    """Output positions along one axis (<= 0 when the kernel does not fit)."""
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(e) for e in v)
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {v}")
    return v


def _paddings(padding, kernel, dilation) -> tuple[tuple[int, int], tuple[int, int]]:
    """Per axis (before, after) zero padding, from an int, an (h, w) pair, ((top, bottom), (left, right)),
    "valid" or "same"."""
    if padding == "valid":
        return (0, 0), (0, 0)
    if not isinstance(padding, (int, str)) and all(isinstance(p, (tuple, list)) for p in padding):
        (pt, pb), (pl, pr) = padding
        return (int(pt), int(pb)), (int(pl), int(pr))
    if padding == "same":  # as torch's convolutions: an odd extra row/column goes after
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return tuple((t // 2, t - t // 2) for t in total)
    ph, pw = _pair(padding, "padding")
    return (ph, ph), (pw, pw)


@dataclass
class Combo:
    """Tap pairs of one axis sharing phases (r1, r2) and shift delta."""

    cuts: list[int]  # segment end points (u, on the first phase map)
    covered: list[bool]  # segment j = [cuts[j], cuts[j+1]) lies in some pair's window
    pairs: list[tuple[int, int, int, int]]  # (i1, i2, first segment, end segment)

    def segments(self):
        """(index, start, stop) of the covered segments."""
        return [(j, a, b) for j, (a, b) in enumerate(zip(self.cuts, self.cuts[1:])) if self.covered[j]]


@dataclass
class Axis:
    out: int  # output positions
    lengths: list[int]  # phase map lengths, per phase r
    taps: list[tuple[int, int, int]]  # per tap: (phase, window start, window stop)
    combos: dict[tuple[int, int, int], Combo]  # (r1, r2, delta) -> its pairs


def plan_axis(size: int, k: int, s: int, pad: tuple[int, int], d: int) -> Axis:
    out = conv_output_size(size, k, s, pad[0], pad[1], d)
    lengths = [max(0, -(-(size - r) // s)) for r in range(s)]
    phase = [divmod(i * d - pad[0], s) for i in range(k)]  # (a, r): offset i*d - pad = a*s + r
    taps = [(r, max(a, 0), min(a + out, lengths[r])) for a, r in phase]
    windows: dict[tuple[int, int, int], list] = {}
    for i1, (a1, r1) in enumerate(phase):
        for i2, (a2, r2) in enumerate(phase):
            delta = a2 - a1
            lo = max(a1, 0, -delta)  # output positions whose reads both fall inside the map
            hi = min(a1 + out, lengths[r1], lengths[r2] - delta)
            if lo < hi:  # (an empty window is an all-padding block: 0)
                windows.setdefault((r1, r2, delta), []).append((i1, i2, lo, hi))
    combos = {}
    for key, ws in windows.items():
        cuts = sorted({p for w in ws for p in w[2:]})
        covered = [any(lo <= a and b <= hi for *_, lo, hi in ws) for a, b in zip(cuts, cuts[1:])]
        pairs = [(i1, i2, cuts.index(lo), cuts.index(hi)) for i1, i2, lo, hi in ws]
        combos[key] = Combo(cuts, covered, pairs)
    return Axis(out, lengths, taps, combos)


def mirror(key: tuple[int, int, int]) -> tuple[int, int, int]:
    r1, r2, delta = key
    return (r2, r1, -delta)


def geometry(shape, kernel, stride, padding, dilation):
    n, c, h, w = shape
    kernel, stride, dilation = _pair(kernel, "kernel"), _pair(stride, "stride"), _pair(dilation, "dilation")
    if min(kernel + stride + dilation) < 1:
        raise ValueError("kernel, stride and dilation must be positive")
    pads = _paddings(padding, kernel, dilation)
    if min(min(p) for p in pads) < 0:
        raise ValueError("padding must be non-negative")
    ay = plan_axis(h, kernel[0], stride[0], pads[0], dilation[0])
    ax = plan_axis(w, kernel[1], stride[1], pads[1], dilation[1])
    if ay.out < 1 or ax.out < 1:
        raise ValueError(f"no output position: map {h}x{w}, kernel {kernel}, dilation {dilation}, padding {pads}")
    return kernel, stride, pads, dilation, ay, ax


def estimate_seconds(shape, kernel, stride=1, padding=0, dilation=1, *, device="cpu",
                     chunk_bytes: int = CHUNK_BYTES, itemsize: int = 4) -> dict[str, float]:
    """Rough cost of both methods for maps of ``shape`` (N, C, H, W): {"correlation": s, "unfold": s}.

    Multiply-adds, torch calls (Python and dispatch overhead) and memory traffic, weighted by
    per-device constants (``_SPEED``); used by ``method="auto"``, good to a factor of ~2.
    """
    kernel, stride, _, _, ay, ax = geometry(shape, kernel, stride, padding, dilation)
    n, c, h, w = shape
    macs_per_s, call_s, bytes_per_s = _SPEED["cpu" if torch.device(device).type == "cpu" else "cuda"]
    dim, length = c * kernel[0] * kernel[1], ay.out * ax.out
    out_bytes = 3 * dim * dim * 8

    # correlation: per-axis totals multiply into the 2-D plan; half of it is computed (mirrors)
    def totals(axis):
        segs = [cb.segments() for cb in axis.combos.values()]
        return (sum(b - a for sg in segs for _, a, b in sg), sum(len(sg) for sg in segs),
                sum(len(cb.pairs) for cb in axis.combos.values()))
    (area_y, cells_y, pairs_y), (area_x, cells_x, pairs_x) = totals(ay), totals(ax)
    chunks = -(-n // max(1, chunk_bytes // max(1, h * w * 2 * c * itemsize)))
    macs = 0.5 * area_y * area_x * n * (2 * c) ** 2
    calls = chunks * (0.5 * (area_y * cells_x + 3 * cells_y * cells_x) + 4 * pairs_y * pairs_x)
    traffic = chunks * (out_bytes * 2 + 4 * n * h * w * c * itemsize) + 3 * out_bytes
    correlation = macs / macs_per_s + calls * call_s + traffic / bytes_per_s

    # unfold: three products of (D, rows) chunks
    per_sample = 2 * dim * length * itemsize
    chunks = -(-n // max(1, chunk_bytes // per_sample))
    macs = 3 * dim * dim * n * length
    traffic = 4 * n * dim * length * itemsize + chunks * out_bytes * 2
    unfold = macs / macs_per_s + chunks * 12 * call_s + traffic / bytes_per_s
    return {"correlation": correlation, "unfold": unfold}


def node_pads(node: WeightNode) -> tuple[tuple[int, int], tuple[int, int]]:
    """A convolution node's (before, after) zero padding per spatial axis."""
    return tuple(p if isinstance(p, tuple) else (p, p) for p in node.padding)


def node_output_size(node: WeightNode, x: torch.Tensor) -> tuple[int, int]:
    """A convolution node's output height and width for its 2-D input x (N, C, H, W)."""
    pads = node_pads(node)
    return tuple(conv_output_size(x.shape[2 + i], node.kernel[i], node.stride[i], *pads[i], node.dilation[i])
                 for i in range(2))


def exact_is_cheaper(shape, kernel, stride, padding, dilation, positions: int, *, device="cpu") -> bool:
    """Whether every output position, summed exactly (the cheaper of correlation and unfolding),
    costs no more than `positions` drawn positions per sample, gathered and multiplied as
    im2col patches (the unfolding's cost for that share of the positions)."""
    cost = estimate_seconds(shape, kernel, stride, padding, dilation, device=device)
    _, _, _, _, ay, ax = geometry(shape, kernel, stride, padding, dilation)
    return min(cost.values()) * (ay.out * ax.out) <= cost["unfold"] * positions


def patches_at(node: WeightNode, x: torch.Tensor, pads, idx: torch.Tensor, out_w: int) -> torch.Tensor:
    """im2col columns at the output positions ``idx`` only: (n, C*kh*kw, len(idx)), ordered as
    F.unfold orders them, gathered without unfolding the whole map. `pads`: ((top, bottom),
    (left, right)) zero padding."""
    (kh, kw), (sh, sw), (dh, dw) = node.kernel, node.stride, node.dilation
    (pt, pb), (pl, pr) = pads
    xp = F.pad(x, (pl, pr, pt, pb)) if pt or pb or pl or pr else x
    oy, ox = idx // out_w, idx % out_w
    ky = torch.arange(kh, device=x.device).repeat_interleave(kw)
    kx = torch.arange(kw, device=x.device).repeat(kh)
    rows = oy[None, :] * sh + ky[:, None] * dh  # (kh*kw, P)
    cols = ox[None, :] * sw + kx[:, None] * dw
    patches = xp[:, :, rows, cols]  # (n, C, kh*kw, P)
    return patches.reshape(x.shape[0], -1, idx.numel())
