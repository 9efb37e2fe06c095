"""Merged-input statistics: the inputs the merged network itself feeds each solved layer.

PLeaS solves every layer against the *model* of its merged input, x~ = M_in [x_A; x_B]: the
sources' activations, merged. The merged network does not compute that: from the second layer
on, its input carries every earlier layer's residual error, and the errors compound with depth.
Merged-input least squares (beyond the paper) solves layer l against the input x~ the merged
network actually feeds it, once every layer before l is filled; its BatchNorm statistics, derived
from the same moments, are then exactly what the merged network computes on the calibration data.

The solved layers are grouped into *levels* (on model A's graph): a layer's level is the largest
number of solved layers on a path from the network input to it, so a layer depends only on
layers of lower levels. Level by level, each calibration batch advances both sources and every
merged model being refined (one per budget: all budgets run in lockstep, the sources once) up
to the level, and for each layer of the level the running sums of

- E[x~ x~^T] of the merged input alone (im2col patches for a convolution), and
- E[y~ x~^T], y~ = M_out [y_A; y_B] the layer's merged *target* (the source layers' outputs,
  a following BatchNorm folded), and E[y~^2],

are accumulated in float64 (passes/merged_sums.py). This is all the solve reads (passes/linalg.py
`MergedInputs`). With `positions="auto"` a level reads just the leading batches its layers need
(`level_batches`: a few for the large maps of early layers, all for the small late ones), and
each convolution just enough drawn positions per sample (passes/positions.py). A *data-limited*
level (a layer with fewer than TOP_UP_ROWS_PER_INPUT rows per entry of its widest merged input
from the leading samples: a Linear layer on flattened features) reads on into more samples
(`top_up_samples`): the calibration batches past the leading ones, then mixup copies
(passes/mixup.py).

Activations between levels (passes/level_runner.py): each batch keeps the values still needed
after the level (the *frontier*) in every network, so the next level runs only the nodes between
the two levels instead of the whole prefix from the input; batches whose frontiers would exceed
`cache_bytes` in total are run again from the input (a batch first read at a later level runs
from the input up to it, once). A merged graph in which an in-place op mutates a value that
another node also reads is run in graph order from the input at every level (no frontier). A
merged model's kept-apart prefix is not run: its values are zipped from the sources' (the first
batch checks them), and a model is not advanced at a level where it refines nothing.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.fx as fx

from pleas_fx.core.fxutil import getattr_path, node_shape
from pleas_fx.core.ir import WeightNode
from pleas_fx.passes.distributed import all_reduce_sums, sharded, world
from pleas_fx.passes.level_runner import (KeptApartPrefix, LevelRunner, State, held_bytes, ready_levels,
                                         release_captured, unsafe)
from pleas_fx.passes.merged_sums import GroupedSums, Rows, Sums, accumulate, accumulate_grouped, row_count
from pleas_fx.passes.positions import AUTO, LS_ROWS_PER_ENTRY, MIN_ROWS, batch_samples, generator

log = logging.getLogger(__name__)

# merged-input moments read the leading calibration batches up to this many samples (a few
# hundred images give every conv layer thousands of rows; the benchmarks calibrate on 500)
MERGED_INPUT_SAMPLES = 512
# activations kept between levels (all networks, all batches); beyond it batches are re-run
CACHE_BYTES = 2 * 2**30
# the re-solve needs at least this many rows (samples x positions) per merged input entry; with
# fewer, its measured Gram is rank-deficient and would fit rounding noise: the source-input
# solution is kept (and the statistics pass keeps that layer's source moments for it). 1.5, not
# 2: the source-input solution such a layer keeps is fitted to the same samples over twice the
# entries (the stacked [x_A; x_B]); re-solving the digit VGG's first Linear layer (500 rows, 289
# merged entries at budget 1) gains 0.6-1.2 points at budget 1. Not 1: near one row per entry a
# least-squares fit interpolates its rows (the worst generalisation), and resnet18's 7x7
# convolutions on 128 images (1.36 rows per entry) would cost its sweep 50% more time
MIN_ROWS_PER_INPUT = 1.5
# with AUTO positions, every level's moments read at least this many samples (level_batches)
MIN_LEVEL_SAMPLES = 128
# a level is data-limited where its leading samples give a layer fewer rows than this per entry of
# its widest merged input (2 x its per-model input entries + 1): the level then reads more samples,
# up to this many rows per entry (`top_up_samples`; passes/mixup.py). 2 lies between the digit
# VGG's first Linear layer (0.87 rows per entry: better with the top-up) and the classifiers at
# 4-8 (the VGG's last layer: no gain; the ResNet's: -1 point on the rotated pair)
TOP_UP_ROWS_PER_INPUT = 2.0
# a data-limited level reads at most this many times the leading samples
TOP_UP_MAX_FACTOR = 2


def leading_batches(batches: Iterable, samples: int = MERGED_INPUT_SAMPLES) -> list:
    """The first calibration batches holding at least `samples` samples (all when fewer)."""
    out, seen = [], 0
    for batch in batches:
        out.append(batch)
        seen += batch_samples(batch)
        if seen >= samples:
            break
    return out


def refined_samples(batches: Iterable) -> int:
    """The samples merged-input least squares reads: those of `leading_batches`."""
    return sum(batch_samples(b) for b in leading_batches(batches))


def weight_levels(gm: fx.GraphModule, nodes: list[WeightNode]) -> list[list[WeightNode]]:
    """The solved weight nodes grouped by level, in graph order within a level: level k holds
    the nodes with k solved nodes on their longest path from the input."""
    by_name = {w.node: w for w in nodes}
    renamed = gm.meta.get("block_nodes", {})  # compact emission's block-layer call -> the weight node it replaced
    depth: dict[fx.Node, int] = {}
    levels: dict[int, list[WeightNode]] = {}
    for node in gm.graph.nodes:
        d = max((depth[i] for i in node.all_input_nodes), default=0)
        w = by_name.get(renamed.get(node.name, node.name))
        if w is not None:
            levels.setdefault(d, []).append(w)
            d += 1
        depth[node] = d
    return [levels[k] for k in sorted(levels)]


def _rows_and_entries(w: WeightNode, gm_a: fx.GraphModule, nodes: dict) -> tuple[int, int] | None:
    """(rows per sample of layer w's moments at every output position, its per-model input
    entries per output), from the shapes of model A's graph; None where they are unknown."""
    shape = node_shape(nodes[w.node]) if w.node in nodes else None
    try:
        dim = getattr_path(gm_a, w.weight)[0].numel()
    except (AttributeError, IndexError, TypeError):
        return None
    if not isinstance(shape, torch.Size) or len(shape) < 2:
        return None
    per = math.prod(shape[2:]) if w.kind != "linear" else math.prod(shape[1:-1])
    return max(per, 1), dim


def top_up_samples(level: list[WeightNode], gm_a: fx.GraphModule, samples: int) -> int:
    """The samples a data-limited level reads (0 for a level that is not): enough for
    TOP_UP_ROWS_PER_INPUT rows per entry of each layer's widest merged input where `samples`
    (the leading samples) give fewer, at most TOP_UP_MAX_FACTOR x `samples`. A layer that even
    that many samples would not give MIN_ROWS_PER_INPUT rows per entry of its narrowest merged
    input (budget 1: it is not re-solved) asks for none (a 2,048-feature classifier on 512
    images)."""
    nodes = {n.name: n for n in gm_a.graph.nodes}
    want, most = 0, TOP_UP_MAX_FACTOR * samples
    for w in level:
        got = _rows_and_entries(w, gm_a, nodes)
        if got is None:
            continue
        per, dim = got
        if per * samples < TOP_UP_ROWS_PER_INPUT * (2 * dim + 1) and per * most >= MIN_ROWS_PER_INPUT * (dim + 1):
            want = max(want, math.ceil(TOP_UP_ROWS_PER_INPUT * (2 * dim + 1) / per))
    return min(want, most)


def level_batches(level: list[WeightNode], gm_a: fx.GraphModule, batches: list, positions, world_size: int = 1,
                  leading: int | None = None) -> int:
    """How many of `batches` a level's moments read. Of the `leading` first ones (None: all):
    with AUTO positions, just enough samples for each layer's rows (passes/positions.py) at
    every output position of the widest merged input (2 x its per-model input entries; from the
    shapes of model A's graph), at least MIN_LEVEL_SAMPLES and one batch per process: the early
    levels of an image network, where each sample gives thousands of positions, read a few
    batches, so the frontiers kept between levels stay small and no batch is run again from the
    input. Otherwise every leading batch. A data-limited level (`top_up_samples`) reads on past
    the leading batches, into the top-up ones."""
    leading = len(batches) if leading is None else min(leading, len(batches))
    nodes = {n.name: n for n in gm_a.graph.nodes}
    need = MIN_LEVEL_SAMPLES if positions == AUTO else math.inf
    for w in level:
        got = _rows_and_entries(w, gm_a, nodes)
        if got is None:
            need = math.inf
        else:
            need = max(need, math.ceil(max(MIN_ROWS, LS_ROWS_PER_ENTRY * 2 * got[1]) / got[0]))
    used, seen = 0, 0
    while used < leading and (seen < need or used < world_size):
        seen += batch_samples(batches[used])
        used += 1
    more = top_up_samples(level, gm_a, sum(batch_samples(b) for b in batches[:leading]))
    while used < len(batches) and seen < more:
        seen += batch_samples(batches[used])
        used += 1
    return used


@dataclass
class Job:
    """One merged model to refine: `target(w, y_a, y_b)` maps the source layers' outputs to the
    merged target y~; `solve(w, moments)` re-solves layer w on its measured inputs."""

    merged: fx.GraphModule
    target: Callable[[WeightNode, torch.Tensor, torch.Tensor], torch.Tensor]
    solve: Callable[[WeightNode, "Sums | GroupedSums"], None]
    # layers whose input and output features are all kept apart (passes/kept_apart.py): filled
    # exactly already, not refined
    kept_apart: frozenset = frozenset()
    # the values (names on A's graph) the merged model computes as the sources' own kept apart,
    # with `zip_value(name, v_a, v_b)` building such a value where `zippable(name)`: its prefix is
    # not run (passes/level_runner.py KeptApartPrefix)
    exact: frozenset = frozenset()
    zippable: Callable[[str], bool] | None = None
    zip_value: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor] | None = None


@torch.no_grad()
def refine(jobs: list[Job], gm_a: fx.GraphModule, gm_b: fx.GraphModule, levels: list[list[WeightNode]],
           batches: list, *, positions: int | str | None = AUTO, seed: int = 0, dtype: torch.dtype = torch.float64,
           cache_bytes: int | None = None, top_up: Callable[[int], list] | None = None) -> str | None:
    """Merged-input least squares for every job, level by level (`levels`: weight_levels of model
    A's graph), all jobs in lockstep over `batches` (this rank's share under torch.distributed,
    the sums all-reduced). `positions`: the conv positions each layer's moments read (None: all;
    passes/positions.py). `cache_bytes`: the frontier budget (None: CACHE_BYTES). `top_up(n)`:
    at least n more samples' batches for the data-limited levels (`top_up_samples`;
    passes/mixup.py `top_up_batches`), None: none. Returns a note on the top-up read (None:
    none)."""
    cache_bytes = CACHE_BYTES if cache_bytes is None else cache_bytes
    todos = [[[w for w in level if w.node not in job.kept_apart] for job in jobs] for level in levels]
    leading, lead_samples = len(batches), sum(batch_samples(b) for b in batches)
    # per refined layer (in level order), the samples it would read as a level of its own: a
    # level's top-up is its layers' largest
    wants = {w.node: top_up_samples([w], gm_a, lead_samples) for todo in todos for t in todo for w in t}
    want = max(wants.values(), default=0)
    note = None
    if top_up is not None and want > lead_samples:
        extra = top_up(want - lead_samples)
        limited = [name for name, n in wants.items() if n]
        note = (f"merged-input least squares: the data-limited levels ({', '.join(limited)}) read "
                f"{sum(batch_samples(b) for b in extra)} more samples (fewer than {TOP_UP_ROWS_PER_INPUT:g} rows "
                f"per merged input entry in the leading {lead_samples})")
        log.info("%s", note)
        batches = list(batches) + extra
    level_of = {w.node: k for k, level in enumerate(levels) for w in level}
    b_names = {na.name: nb.name for na, nb in zip(gm_a.graph.nodes, gm_b.graph.nodes)}  # same architecture
    for job in jobs:
        job.merged.eval()
    runners = [LevelRunner(job.merged, ready_levels(job.merged, level_of, 0), ordered=unsafe(job.merged))
               for job in jobs]
    ordered_sources = unsafe(gm_a) or unsafe(gm_b)
    measured = [{w.node for level in levels for w in level if w.node not in job.kept_apart} for job in jobs]
    prefixes = [KeptApartPrefix(job.merged, set(job.exact), job.zippable, job.zip_value, b_names, measured[j])
                if job.exact and job.zip_value is not None and not ordered_sources and not run.ordered else None
                for j, (job, run) in enumerate(zip(jobs, runners))]
    capture = [set().union(*[p.source_names()[side] for p in prefixes if p is not None]) for side in (0, 1)]
    sources = [LevelRunner(gm, ready_levels(gm, {b_names.get(n, n) if gm is gm_b else n: k for n, k in level_of.items()}, 1),
                           ordered=unsafe(gm), capture=capture[side]) for side, gm in enumerate((gm_a, gm_b))]
    renamed = [{old: new for new, old in job.merged.meta.get("block_nodes", {}).items()} for job in jobs]
    per_in = {w.node: int(getattr_path(gm_a, w.weight).shape[1]) for level in levels for w in level
              if w.kind == "grouped"}  # input channels per conv group
    rank, world_size = world()
    mine = list(sharded(batches))
    states: list[list[State | None]] = [[None] * (2 + len(jobs)) for _ in mine]
    for k, level in enumerate(levels):
        todo = todos[k]
        if not any(todo):  # every model keeps this level apart: its values are reached at a later level
            log.debug("merged-input least squares, level %d: kept apart in every model, skipped", k)
            continue
        names = {w.node: w.node for w in level}
        sums: list[dict[str, Sums]] = [{} for _ in jobs]
        needed = {w.node for job_todo in todo for w in job_todo}
        used = level_batches([w for w in level if w.node in needed], gm_a, batches, positions, world_size,
                             leading)
        samples = sum(batch_samples(b) for b in batches[:used])
        mine_used = sum(rank + i * world_size < used for i in range(len(mine)))
        kept = held_bytes([s for st in states[mine_used:] for s in st])  # held by batches this level skips
        log.debug("merged-input least squares, level %d (%s): %d of %d batches, %d run from the input, %.2f GiB "
                  "held", k, ", ".join(w.node for w in level), used, len(batches),
                  sum(st[0] is None for st in states[:mine_used]), kept / 2**30)
        later = [any(t[j] for t in todos[k + 1:]) for j in range(len(jobs))]  # models refined again after k
        for i, args in enumerate(mine[:mine_used]):  # (the others join a later level, from their state)
            st = states[i]
            st[0], _, ya = sources[0].advance(st[0], args, k, {}, names)
            st[1], _, yb = sources[1].advance(st[1], args, k, {}, {b_names[n]: n for n in names})
            for j, (job, run, prefix) in enumerate(zip(jobs, runners, prefixes)):
                if not todo[j]:  # nothing to measure here: the model runs up to its next refined level then
                    continue
                was_on = prefix is not None and prefix.on
                reads = {renamed[j].get(w.node, w.node): w.node for w in todo[j]}  # the inputs of its refined layers
                st[2 + j], xm, _ = run.advance(st[2 + j], args, k, reads, {}, prefix, (st[0], st[1]), check=i == 0)
                if was_on and not prefix.on:  # batches that skipped the prefix run again from the input
                    for other in states[1:]:
                        other[2 + j] = None
                for w in todo[j]:
                    rows = Rows(positions, samples, generator(seed, rank + i * world_size, w.node))
                    if w.node not in sums[j]:  # too few rows for a re-solve: not measured (the fill stands)
                        per_sample, dim = row_count(w, xm[w.node], rows, per_in.get(w.node))
                        if per_sample * samples < MIN_ROWS_PER_INPUT * (dim + 1):
                            sums[j][w.node] = None
                    if w.node in sums[j] and sums[j][w.node] is None:
                        continue
                    target, prev = job.target(w, ya[w.node], yb[w.node]), sums[j].get(w.node)
                    if w.kind == "grouped":
                        sums[j][w.node] = accumulate_grouped(prev, w, xm[w.node], target, per_in[w.node], rows, dtype)
                    else:
                        sums[j][w.node] = accumulate(prev, w, xm[w.node], target, rows, dtype)
            if st[0] is not None and st[1] is not None:
                release_captured((st[0], st[1]), b_names, [(p, st[2 + j]) for j, p in enumerate(prefixes)
                                                           if p is not None and later[j]])
            held = held_bytes(st)
            if kept + held > cache_bytes:
                states[i] = [None] * len(st)  # run again from the input at the next level
            else:
                kept += held
        if world_size > 1:
            flat = [p for per_job, job_todo in zip(sums, todo) for s in (per_job[w.node] for w in job_todo)
                    if s is not None for p in (s.parts if isinstance(s, GroupedSums) else [s])]
            tensors = [t for s in flat for t in (s.gram.aa, s.gram.sum_a, s.cross, s.sum_y, s.sq_y)]
            for s, c in zip(flat, all_reduce_sums(tensors, [s.gram.count for s in flat])):
                s.gram.count = c
        for w in level:  # layer by layer across the jobs: its source moments are formed once
            for job, per_job in zip(jobs, sums):
                if w.node in per_job:
                    job.solve(w, per_job[w.node])
    return note
