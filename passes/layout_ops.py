"""Layout algebra for shape ops: how flatten, unflatten, reshape and slicing move the
permutation groups of an axis. Every function returns None where the mapping cannot be
expressed soundly; the caller then freezes the axes involved."""
from __future__ import annotations

from math import prod
from typing import Callable, Sequence

from pleas_fx.core.ir import Layout, Segment, layout_numel

IsFrozen = Callable[[Layout], bool]
# size of a live within group, None if it is frozen
WithinSize = Callable[[int], "int | None"]
# whether a layout is a whole live within axis of the given group's units
IsWithinOf = Callable[[Layout, int], bool]


class TupleLayouts(list):
    """Layouts of a tuple-valued node: one entry (list of layouts, or None) per element."""


def flatten_layout(layouts: Sequence[Layout], sizes: Sequence[int], is_frozen: IsFrozen,
                   is_within_of: IsWithinOf | None = None) -> Layout | None:
    """Layout of the axis obtained by flattening consecutive axes (row-major).

    Frozen axes become repetition (inner/outer) of the one permutable axis. Two permutable
    axes can be described only as units followed by their within entries (heads x head_dim:
    one segment carrying the within group); otherwise None. All frozen: an empty layout
    (the caller makes a frozen axis)."""
    live = [i for i, lay in enumerate(layouts) if not is_frozen(lay)]
    if not live:
        return ()
    if len(live) == 2 and is_within_of is not None and live[1] == live[0] + 1:
        k = live[0]
        units, entries = layouts[k], layouts[k + 1]
        if (len(units) == 1 and units[0].inner == units[0].outer == 1 and units[0].within is None
                and is_within_of(entries, units[0].group)):
            before, after = prod(sizes[:k]), prod(sizes[k + 2:])
            seg = units[0]
            return (Segment(seg.group, seg.size, entries[0].size * after, before, entries[0].group),)
    if len(live) > 1:
        return None
    k = live[0]
    before, after = prod(sizes[:k]), prod(sizes[k + 1:])
    segs = layouts[k]
    if before > 1 and len(segs) > 1:
        return None
    return tuple(Segment(s.group, s.size, s.inner * after, s.outer * before, s.within) for s in segs)


def unflatten_layout(layout: Layout, out_sizes: Sequence[int], is_frozen: IsFrozen,
                     within_size: WithinSize | None = None) -> list[Layout | None] | None:
    """Split one axis into `out_sizes`: the permutable units must land on exactly one of
    the new axes (the others are pure repetition), and a live within group's entries on the
    axis right after it. Returns per-output-axis layouts, None for axes the caller must make
    frozen, or None when impossible."""
    if is_frozen(layout):
        return [None] * len(out_sizes)
    if len(layout) != 1:
        return None
    seg = layout[0]
    cum = [1]
    for n in out_sizes:
        cum.append(cum[-1] * n)
    w = within_size(seg.within) if (seg.within is not None and within_size is not None) else None
    if w is not None:
        for t in range(len(out_sizes) - 1):
            if (cum[t] == seg.outer and out_sizes[t] == seg.size and out_sizes[t + 1] == w
                    and cum[t + 2] * (seg.inner // w) == cum[-1] and seg.inner % w == 0):
                return [(Segment(seg.group, seg.size),) if i == t else (Segment(seg.within, w),) if i == t + 1
                        else None for i in range(len(out_sizes))]
        return None
    for t in range(len(out_sizes)):
        if cum[t] == seg.outer and out_sizes[t] == seg.size and cum[t + 1] * seg.inner == cum[-1]:
            return [((Segment(seg.group, seg.size),) if i == t else None) for i in range(len(out_sizes))]
    return None


def align_reshape(in_sizes: Sequence[int], out_sizes: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Pair up blocks of input and output axes whose sizes multiply to the same number
    (axes of size 1 are left out: the caller handles them). None if impossible."""
    ins = [i for i, n in enumerate(in_sizes) if n != 1]
    outs = [j for j, n in enumerate(out_sizes) if n != 1]
    blocks: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(ins) and j < len(outs):
        bi, bj = [ins[i]], [outs[j]]
        pi, pj = in_sizes[ins[i]], out_sizes[outs[j]]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(ins):
                bi.append(ins[i]); pi *= in_sizes[ins[i]]; i += 1
            elif pj < pi and j < len(outs):
                bj.append(outs[j]); pj *= out_sizes[outs[j]]; j += 1
            else:
                return None
        blocks.append((bi, bj))
    if i != len(ins) or j != len(outs):
        return None
    return blocks


def slice_layout(layout: Layout, start: int, stop: int) -> Layout | None:
    """Sub-layout of entries [start, stop) if the range falls on segment boundaries."""
    out, offset = [], 0
    for seg in layout:
        end = offset + seg.numel
        if start <= offset and end <= stop:
            out.append(seg)
        elif end > start and offset < stop:  # the range cuts through this segment
            return None
        offset = end
    return tuple(out) if layout_numel(tuple(out)) == stop - start else None


def boundaries(layout: Layout) -> list[int]:
    """Offsets where the segments of `layout` end (the last one, its size, included)."""
    out, offset = [], 0
    for seg in layout:
        offset += seg.numel
        out.append(offset)
    return out


def first_cut(layout: Layout, offsets, skip: Callable[[Segment], bool] | None = None
              ) -> tuple[Segment, list[int], int] | None:
    """The first segment of `layout` that an offset falls strictly inside, the unit counts of its
    two pieces and the offset inside the segment; None when every offset is a segment boundary
    (or inside a segment that `skip` accepts). An offset inside a unit, or inside a repeated
    segment, gives no pieces: the partition then fails."""
    offset = 0
    for seg in layout:
        inside = sorted(c for c in offsets if offset < c < offset + seg.numel)
        if inside and not (skip is not None and skip(seg)):
            c = inside[0] - offset
            if seg.outer != 1 or c % seg.inner:
                return seg, [], c
            return seg, [c // seg.inner, seg.size - c // seg.inner], c
        offset += seg.numel
    return None


def slice_pieces(layout: Layout, start: int, stop: int, piece: Callable[[Segment, int], Layout]) -> Layout | None:
    """Sub-layout of entries [start, stop): whole segments, and for a segment the range cuts
    `piece(segment, n)` (a frozen segment's n entries); None where `piece` returns None."""
    out, offset = [], 0
    for seg in layout:
        end = offset + seg.numel
        if start <= offset and end <= stop:
            out.append(seg)
        elif end > start and offset < stop:
            sub = piece(seg, min(end, stop) - max(offset, start))
            if sub is None:
                return None
            out.extend(sub)
        offset = end
    return tuple(out)
