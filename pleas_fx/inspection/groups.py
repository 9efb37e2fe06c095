"""Building the inspect report from a model, and the group-soundness self-test.

`describe_groups(model, example_input)` traces a model, runs group inference and returns a
GroupReport (pleas_fx/inspection/report.py). `check_groups` randomly permutes every group of a
model and measures how far its output moves (it should not move at all).
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
import torch.fx as fx

from pleas_fx.core.errors import TraceError, first_line
from pleas_fx.core.inputs import as_args
from pleas_fx.core.ir import GroupSpec, Layout
from pleas_fx.inspection.report import (
    DEFAULT_TOLERANCE, CheckResult, FrozenEntry, FrozenReason, GroupEntry, GroupReport, ParamEntry, SiteEntry,
    WithinEntry,
)
from pleas_fx.passes.infer_context import tensor_layouts
from pleas_fx.passes.frozen import is_hidden, non_float_tensors
from pleas_fx.passes.infer_groups import infer_groups
from pleas_fx.passes.trace import propagate_shapes, trace_model
from pleas_fx.passes.verify import permute_model, random_permutations, relative_error


def _segment_text(layout: Layout, gid: int) -> str:
    parts, offset = [], 0
    for i, seg in enumerate(layout):
        if seg.group == gid:
            bits = []
            if len(layout) > 1:
                bits.append(f"segment {i + 1}/{len(layout)} [{offset}:{offset + seg.numel}]")
            if seg.inner > 1:
                bits.append(f"inner={seg.inner}")
            if seg.outer > 1:
                bits.append(f"outer={seg.outer}")
            parts.append(", ".join(bits) or "plain")
        offset += seg.numel
    return "; ".join(parts)


def _structure(size: int, layouts: list[Layout], gid: int) -> str:
    inners, outers, concat, entries = set(), set(), False, set()
    for lay in layouts:
        for seg in lay:
            if seg.group == gid:
                concat |= len(lay) > 1
                if seg.within is not None and seg.outer == 1:
                    entries.add(seg.inner)  # units with their own entries (heads, conv groups)
                elif seg.inner > 1:
                    inners.add(seg.inner)
                if seg.outer > 1:
                    outers.add(seg.outer)
    tags = []
    if outers:
        tags.append(f"heads x head_dim ({'|'.join(map(str, sorted(outers)))} x {size})")
    if entries:
        tags.append(f"units x entries ({size} x {'|'.join(map(str, sorted(entries)))})")
    if inners:
        tags.append(f"flatten block (inner={'|'.join(map(str, sorted(inners)))})")
    if concat:
        tags.append("concat segment")
    return " + ".join(tags) or "plain"


def report_from_spec(spec: GroupSpec, model: str = "model", input_shapes: Sequence[Sequence[int]] = (),
                     gm: torch.nn.Module | None = None) -> GroupReport:
    """The GroupReport of an already inferred GroupSpec (`gm`, the traced module, tells
    integer buffers apart: their axes are not counted as hidden units)."""
    non_float = non_float_tensors(gm, spec) if gm is not None else set()
    # Where every group appears on activations, in graph order.
    appearances: dict[int, list[tuple[str, int, Layout]]] = {}
    for node, value in spec.node_layouts.items():
        for lays in tensor_layouts(value):
            for axis, lay in enumerate(lays):
                for seg in lay:
                    appearances.setdefault(seg.group, []).append((node, axis, lay))
    first = {gid: i for i, gid in enumerate(appearances)}
    order = sorted(spec.groups.values(), key=lambda g: (first.get(g.id, len(first)), g.id))
    groups, frozen, by_reason = [], [], {}
    n_structural = 0
    for g in order:
        if g.parent is not None:  # a within group: reported with the group whose units it lives in
            continue
        layouts = [p.layout for p in g.params] + [lay for _, _, lay in appearances.get(g.id, [])]
        structure = _structure(g.size, layouts, g.id)
        params = [ParamEntry(p.name, p.axis, p.role, _segment_text(p.layout, g.id)) for p in g.params]
        if not g.frozen:  # every mergeable group is listed (counted as hidden units too)
            within = [WithinEntry(w.id, w.size, w.frozen, [str(r) for r in w.reasons],
                                  [SiteEntry(s.node, s.axis) for s in g.sites if s.within == w.id])
                      for w in spec.groups.values() if w.parent == g.id]
            groups.append(GroupEntry(g.id, g.size, structure, params,
                                     [SiteEntry(s.node, s.axis) for s in g.sites if s.within is None], within))
        elif not is_hidden(g, non_float):
            n_structural += 1
        else:
            nodes = list(dict.fromkeys(f"{n}[{a}]" for n, a, _ in appearances.get(g.id, [])))
            reasons = [FrozenReason(r.where, r.summary, r.kind) for r in g.reasons]
            frozen.append(FrozenEntry(g.id, g.size, structure, reasons, params, nodes))
            kind = g.reasons[0].summary if g.reasons else "frozen"
            by_reason[kind] = by_reason.get(kind, 0) + g.size
    mergeable = sum(g.size for g in groups)
    frozen_units = sum(f.size for f in frozen)
    hidden = mergeable + frozen_units
    return GroupReport(
        model=model,
        input_shapes=[[int(n) for n in s] for s in input_shapes],
        groups=groups,
        frozen=frozen,
        n_groups=len(groups),
        mergeable_units=mergeable,
        frozen_hidden_units=frozen_units,
        share_mergeable=mergeable / hidden if hidden else 0.0,
        n_structural_groups=n_structural,
        frozen_by_reason=by_reason,
    )


def shape_propagate(gm: fx.GraphModule, args: tuple) -> None:
    """propagate_shapes, the error naming the input's shape, the failing node and the root cause."""
    try:
        propagate_shapes(gm, args)
    except TraceError as exc:
        root: BaseException = exc
        while root.__cause__ is not None:
            root = root.__cause__
        shapes = ", ".join("x".join(map(str, a.shape)) for a in args if torch.is_tensor(a))
        at = f" at node {exc.node}" if exc.node else ""
        first = " ".join((first_line(root) or type(root).__name__).split())
        raise TraceError(
            f"running the traced model on an input of shape {shapes} failed{at}: "
            f"{type(root).__name__}: {first if len(first) <= 600 else first[:597] + '...'}"
        ) from exc


def trace_and_infer(model: torch.nn.Module, example_input: Any, label: str = "model") -> tuple[fx.GraphModule, GroupSpec]:
    """Trace (a deep copy of) `model`, propagate shapes, infer groups."""
    args = as_args(example_input)
    gm = trace_model(model, label)
    shape_propagate(gm, args)
    return gm, infer_groups(gm)


def describe_groups(model: torch.nn.Module, example_input: Any, *, name: str | None = None,
                    check: bool = False, seeds: int = 1, tolerance: float = DEFAULT_TOLERANCE,
                    check_dtype: torch.dtype = torch.float64) -> GroupReport:
    """The group specification pleas_fx infers for `model`, as a printable GroupReport.

    `model` is never modified. With `check=True` the group-soundness self-test is run too
    (see check_groups) and its result stored in `report.check`."""
    args = as_args(example_input)
    gm, spec = trace_and_infer(model, args, name or type(model).__name__)
    report = report_from_spec(spec, name or type(model).__name__, [list(a.shape) for a in args], gm)
    if check:
        report.check = check_groups(gm, spec, args, seeds=seeds, tolerance=tolerance, dtype=check_dtype, inplace=True)
    return report


# --------------------------------------------------------------------------- the self-test
def randomise_constants(module: torch.nn.Module, seed: int = 0) -> None:
    """Give BatchNorm running statistics, and every parameter whose entries are all equal
    (norm affines, zero biases, layer scales), distinct random values: permuting a
    constant vector changes nothing, so a wrong group would go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._NormBase) and mod.track_running_stats:
                if mod.running_mean is not None:
                    mean = 0.1 * torch.randn(mod.running_mean.shape, generator=gen, dtype=torch.float64)
                    mod.running_mean.copy_(mean)
                if mod.running_var is not None:
                    var = 0.5 + torch.rand(mod.running_var.shape, generator=gen, dtype=torch.float64)
                    mod.running_var.copy_(var)
        for p in module.parameters():
            if p.is_floating_point() and p.numel() > 1 and bool((p == p.reshape(-1)[0]).all()):
                value = float(p.reshape(-1)[0])
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
                p.copy_(value * (1 + 0.2 * noise) if value != 0 else 0.1 * noise)


def check_groups(gm: fx.GraphModule, spec: GroupSpec, example_input: Any, *, seeds: int = 1,
                 tolerance: float = DEFAULT_TOLERANCE, dtype: torch.dtype = torch.float64,
                 inplace: bool = False) -> CheckResult:
    """Apply `seeds` random permutations of every mergeable group to the weights of `gm`
    and return the max relative deviation of its output (sound groups: rounding only).
    `inplace=True` converts and randomises `gm` itself instead of a copy (saves memory)."""
    work = gm if inplace else copy.deepcopy(gm)
    work.to(dtype)
    randomise_constants(work, seed=12345)
    args = tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in as_args(example_input))
    worst = 0.0
    with torch.no_grad():
        reference = work(*args)
        for seed in range(seeds):
            permuted = permute_model(work, spec, random_permutations(spec, seed))
            worst = max(worst, relative_error(permuted(*args), reference))
            del permuted
    name = str(dtype).replace("torch.", "")
    return CheckResult(worst, tolerance, seeds, name, bool(worst <= tolerance))
