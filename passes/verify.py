"""Verification: check a merged model against the footprint model, the budget and the example
input (any failure is pleas_fx's own: an InternalError naming the pass and node); apply
permutations allowed by a GroupSpec; count parameters. Used by merge(), the tests and tools."""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from pleas_fx.core.errors import InternalError, first_line
from pleas_fx.core.fxutil import ShapeRecorder, getattr_path
from pleas_fx.core.ir import GroupPlan, GroupSpec, axis_map
from pleas_fx.passes.within_axes import realign_b


def random_permutations(spec: GroupSpec, seed: int = 0) -> dict[int, np.ndarray]:
    """A random permutation per mergeable group, and per live within group a (units, w)
    array: a random order of the entries of every unit of its parent."""
    rng = np.random.default_rng(seed)
    perms = {g.id: rng.permutation(g.size) for g in spec.mergeable()}
    for g in spec.mergeable():
        for w in spec.within_groups(g.id):
            perms[w.id] = np.stack([rng.permutation(w.size) for _ in range(g.size)])
    return perms


def permute_model(gm: fx.GraphModule, spec: GroupSpec, perms: dict[int, np.ndarray]) -> fx.GraphModule:
    """A copy of `gm` whose every parameter and buffer axis is permuted by its groups'
    permutations (new unit u = old unit perms[g][u]; within entries of a unit reordered by the
    row of perms[w] of the old unit). Sound groups leave outputs unchanged."""
    out = copy.deepcopy(gm)
    plans = {}
    for g, p in perms.items():
        if g in spec.groups and spec.groups[g].parent is None:
            within = {w.id: perms[w.id] for w in spec.within_groups(g) if w.id in perms}
            plans[g] = GroupPlan(len(p), p, p, within=within or None)
    frozen = spec.fixed() | {g for g in spec.groups if g not in plans}
    with torch.no_grad():
        for name, layouts in spec.param_layouts.items():
            tensor = getattr_path(out, name)
            if not torch.is_tensor(tensor):
                continue
            new = realign_b(tensor, spec, layouts, plans)
            for axis, lay in enumerate(layouts):
                if all(s.group in frozen for s in lay) or (name, axis) in spec.broadcast_axes:
                    continue  # (a broadcast entry is every feature's: it does not move)
                idx = torch.as_tensor(axis_map(lay, plans, frozen).idx_b, device=tensor.device)
                new = new.index_select(axis, idx)
            tensor.copy_(new)
    return out


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected| over (nested) tensor outputs."""
    a, e = flat_tensors(actual), flat_tensors(expected)
    num = max(float((x.detach().double() - y.detach().double()).abs().max()) for x, y in zip(a, e))
    den = max(float(y.detach().double().abs().max()) for y in e)
    return num / max(den, 1e-30)


def flat_tensors(value) -> list[torch.Tensor]:
    """The tensors of a (nested tuple, list or dict) model output, in order."""
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in flat_tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flat_tensors(v)]
    return []


def count_parameters(module: torch.nn.Module) -> int:
    """Stored parameters (dense numel; buffers such as BatchNorm statistics are not counted)."""
    return sum(p.numel() for p in module.parameters())


def structural_parameters(spec: GroupSpec, plans: dict[int, GroupPlan], names: list[str]) -> int:
    """Parameters of a merged model that are not structurally zero, from the expanded plans:
    an entry counts if one model has a feature on every axis of it (entries fed by A on all
    axes, plus those fed by B on all axes, minus those fed by both on all axes)."""
    frozen = spec.fixed()
    total = 0
    for name in names:
        on_a = on_b = on_both = 1
        for lay in spec.param_layouts[name]:
            m = axis_map(lay, plans, frozen)
            has_a, has_b = m.idx_a >= 0, m.idx_b >= 0
            if not m.pairwise:  # ZipIt!-style: a merged feature fed by two features of one model
                has_a = has_a | (m.idx_a2 >= 0)
                has_b = has_b | (m.idx_b2 >= 0)
            on_a *= int(has_a.sum())
            on_b *= int(has_b.sum())
            on_both *= int((has_a & has_b).sum())
        total += on_a + on_b - on_both
    return total


# a fake-tensor shape propagation costs about this much per graph node (CPU, torch 2.x)
FAKE_SECONDS_PER_NODE = 2e-3


def fake_check_pays(forward_seconds: float, gm: fx.GraphModule) -> bool:
    """Whether `check_graph` should propagate fake tensors: when a real forward of one source on
    the example input (`forward_seconds`; a merged model costs up to 4x that) takes longer than
    a fake propagation of its graph. Tiny models check faster on real values."""
    return forward_seconds > FAKE_SECONDS_PER_NODE * len(gm.graph.nodes)


def check_graph(merged: fx.GraphModule, example_args: tuple, pass_name: str = "widen", fake: bool = False) -> None:
    """Shape-propagate the merged graph on the example input; a failure is pleas_fx's own.

    With `fake` the propagation runs on fake tensors (shapes and dtypes, no arithmetic): on real
    values the check of a budget-2 model costs a forward pass of both sources over the example
    batch, and a budget sweep checks every budget twice. Where fake propagation fails (an op
    without a fake kernel, a value read in Python), the real example input decides."""
    if fake and _propagate(merged, example_args, fake=True) is None:
        return
    prop = _propagate(merged, example_args, fake=False)
    if prop is not None:
        exc, node = prop
        where = f"node {node.name} ({node.format_node()})" if node is not None else "the merged graph"
        raise InternalError(pass_name, where, f"the merged graph does not run on example_input: "
                                              f"{type(exc).__name__}: {first_line(exc)}") from exc


def _propagate(merged: fx.GraphModule, example_args: tuple, fake: bool) -> tuple[Exception, fx.Node | None] | None:
    """Run `ShapeRecorder` (node meta "tensor_meta" recorded); the error and the node it stopped
    at, or None when it ran."""
    prop = ShapeRecorder(merged)
    try:
        with torch.no_grad():
            if not fake:
                prop.run(*example_args)
                return None
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                prop.run(*[mode.from_tensor(a) if torch.is_tensor(a) else a for a in example_args])
    except Exception as exc:  # noqa: BLE001 -- any failure: the caller decides whose it is
        return exc, prop.current
    return None


def verify_merged(merged: fx.GraphModule, example_args: tuple, footprint, spec: GroupSpec,
                  plans: dict[int, GroupPlan], widths: dict[int, int], budget: float,
                  expected_stored: int | None = None, fake: bool = False) -> int:
    """Check the merged model against the footprint model, the budget and the example input;
    returns its parameter count (entries not structurally zero). `expected_stored`: what the
    merged model must store (`sum(p.numel() for p in merged.parameters())`): the structural
    count of the emitted model plus any structurally zero entries it holds densely."""
    counted = structural_parameters(spec, plans, footprint.parameter_names)
    stored = count_parameters(merged)
    if expected_stored is not None and stored != expected_stored:
        raise InternalError("verify", "the merged parameters",
                            f"the merged model stores {stored} parameters, the emission should store {expected_stored}")
    predicted = footprint.count(widths)
    pairwise = all(p.pairwise for p in plans.values())
    if counted > predicted or (pairwise and counted != predicted):
        raise InternalError("verify", "the merged parameters",
                            f"the merged model has {counted} parameters, the footprint model says {predicted}")
    if counted > budget * footprint.base + 1e-6:
        raise InternalError("verify", "the merged parameters",
                            f"{counted} parameters exceed budget {budget} x {footprint.base}")
    for name, t in merged.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InternalError("fill", name, "the merged tensor is not finite")
    check_graph(merged, example_args, fake=fake)
    return counted
