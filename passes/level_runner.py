"""Running graphs level by level, batch by batch: the forwards of merged-input least squares
(passes/merged_inputs.py).

A `LevelRunner` advances one graph on one batch up to a level: it runs every node whose solved
layers are final (`ready_levels`) and keeps, in the batch's `State`, just the values later nodes
still read (the frontier). A merged model's kept-apart prefix (`KeptApartPrefix`: the nodes whose
merged value is the two sources' own values, passes/kept_apart.py) is not run at all: the
values read past it are zipped from the sources' values, which the source runners capture as
they compute them. The first batch of each merged model runs the prefix and checks the zips; a
zip that differs from what the merged model computes turns the prefix off for that model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from pleas_fx.core.errors import InternalError
from pleas_fx.core.fxutil import mutates

log = logging.getLogger(__name__)

# a zipped prefix value may differ from the merged model's own by float rounding only
ZIP_TOLERANCE = 1e-4


def _mutated_values(gm: fx.GraphModule) -> set[fx.Node]:
    return {n.args[0] for n in gm.graph.nodes if n.args and isinstance(n.args[0], fx.Node) and mutates(gm, n)}


def unsafe(gm: fx.GraphModule) -> bool:
    """Whether running nodes out of graph order could change a result: an in-place op writes a
    value that another node also reads."""
    return any(len(v.users) > 1 for v in _mutated_values(gm))


def ready_levels(gm: fx.GraphModule, level_of: dict[str, int], offset: int) -> dict[fx.Node, int]:
    """Per node, the first level at which it may run: 1 + (level of the latest solved layer it
    depends on, itself included) - offset (offset 1 for the sources, whose layers are final)."""
    renamed = gm.meta.get("block_nodes", {})
    ready: dict[fx.Node, int] = {}
    for n in gm.graph.nodes:
        r = max((ready[i] for i in n.all_input_nodes), default=0)
        own = level_of.get(renamed.get(n.name, n.name))
        ready[n] = max(r, own + 1 - offset) if own is not None else r
    return ready


@dataclass
class State:
    """One batch in one network: the values still needed, the nodes run, their users left, and
    (a source) the values captured for the merged models' kept-apart prefixes."""

    env: dict
    done: set
    left: dict
    captured: dict = field(default_factory=dict)


def held_bytes(states: list[State | None]) -> int:
    """Bytes of the tensors the states hold (shared storages once)."""
    seen, total = set(), 0
    for s in states:
        values = list(s.env.values()) + list(s.captured.values()) if s is not None else []
        for t in tree_leaves(values):
            if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
    return total


class KeptApartPrefix:
    """The nodes of one merged model not run because their values are the sources' own kept
    apart (`exact`: names on model A's graph, passes/kept_apart.py; the layers in `measured`, which
    the model refines, excepted). `boundary[n]`: the A name of
    a skipped node some run node reads, zipped from the sources' values by `zip_value(name, v_a,
    v_b)`; `zippable(name)` says which values the zip can build (a skipped node that is not is
    run, and so are the nodes before it)."""

    def __init__(self, merged: fx.GraphModule, exact: set[str], zippable: Callable[[str], bool],
                 zip_value: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor], b_names: dict[str, str],
                 measured: set[str] = frozenset()):
        renamed = merged.meta.get("block_nodes", {})  # block-layer call -> the weight node it replaced
        a_name = {n: renamed.get(n.name, n.name) for n in merged.graph.nodes}
        skipped = {n for n in merged.graph.nodes if n.op not in ("placeholder", "output") and a_name[n] in exact
                   and a_name[n] not in measured}  # a layer the model refines runs (its input is read there)
        while True:
            boundary = {n for n in skipped if any(u not in skipped for u in n.users)}
            bad = {n for n in boundary if not zippable(a_name[n])}
            if not bad:
                break
            skipped -= bad | {m for m in skipped if _feeds(m, bad)}  # they run, and what they read
        self.skipped = skipped
        self.boundary = {n: a_name[n] for n in boundary}
        self.zip_value, self.b_names = zip_value, b_names
        self.on = bool(skipped)

    def source_names(self) -> tuple[set[str], set[str]]:
        """The values the sources capture: the boundary's names on A's and on B's graph."""
        names = set(self.boundary.values())
        return names, {self.b_names.get(n, n) for n in names}

    def zipped(self, name: str, sources: tuple[State, State]) -> torch.Tensor:
        return self.zip_value(name, sources[0].captured[name], sources[1].captured[self.b_names.get(name, name)])

    def check(self, n: fx.Node, value, sources: tuple[State, State]) -> None:
        """Compare a boundary value the merged model computed with its zip; turn off on a mismatch."""
        z = self.zipped(self.boundary[n], sources)
        ok = torch.is_tensor(value) and z.shape == value.shape and bool(
            (z - value).abs().max() <= ZIP_TOLERANCE * value.abs().max().clamp_min(1e-12))
        if not ok:
            log.debug("kept-apart prefix off: %s differs from its sources' zip", n.name)
            self.on = False


def _feeds(n: fx.Node, nodes: set[fx.Node]) -> bool:
    """Whether some node of `nodes` reads n's value, directly or through other nodes."""
    seen, todo = set(), list(n.users)
    while todo:
        m = todo.pop()
        if m in nodes:
            return True
        if m not in seen:
            seen.add(m)
            todo.extend(m.users)
    return False


def release_captured(sources: tuple[State, State], b_names: dict[str, str],
                     merged: list[tuple[KeptApartPrefix, State | None]]) -> None:
    """Drop the values the sources captured that no merged model still to run will zip
    (`merged`: each such model's prefix and its state on the same batch)."""
    for name in list(sources[0].captured):
        if not any(p.on and (s is None or any(a == name and n not in s.done for n, a in p.boundary.items()))
                   for p, s in merged):
            sources[0].captured.pop(name)
            sources[1].captured.pop(b_names.get(name, name), None)


class LevelRunner(fx.Interpreter):
    """Advances one graph, batch by batch, level by level. `ready[n]`: the first level at which
    node n may run (every solved layer it depends on final). In `ordered` mode nodes run in graph
    order from the input at every level (no frontier is kept). `capture`: node names whose
    values a source keeps for the merged models' prefixes."""

    def __init__(self, gm: fx.GraphModule, ready: dict[fx.Node, int], ordered: bool = False,
                 capture: set[str] | None = None):
        super().__init__(gm)
        self.ready, self.ordered = ready, ordered
        self.nodes = [n for n in gm.graph.nodes if n.op != "output"]
        self.mutated = _mutated_values(gm)
        self.capture = capture or set()

    def _fresh(self, args) -> State:
        self.args_iter = iter(args)
        return State({}, set(), {n: len(n.users) for n in self.nodes})

    def _taken(self, state: State, n: fx.Node) -> None:
        """Count n's reads of its inputs; drop the values nothing will read again."""
        if not n.users:
            self.env.pop(n, None)
        for i in n.all_input_nodes:
            state.left[i] -= 1
            if state.left[i] == 0:
                self.env.pop(i, None)

    def advance(self, state: State | None, args, level: int, inputs: dict[str, str], outputs: dict[str, str],
                prefix: KeptApartPrefix | None = None, sources: tuple[State, State] | None = None,
                check: bool = False) -> tuple[State | None, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Run every node ready at `level` (not run yet); returns the new state and the first
        argument of the nodes in `inputs` / the value of the nodes in `outputs` (graph name ->
        reported name). With a `prefix` (and the sources' states) its skipped nodes are not run
        and its boundary values are zipped; with `check` they are run and their zips compared."""
        if state is None or self.ordered:
            state = self._fresh(args)
        self.env = state.env
        got_in, got_out = {}, {}
        wanted = len(inputs) + len(outputs)
        zipping = prefix is not None and prefix.on and not self.ordered
        try:
            for n in self.nodes:
                if n in state.done:
                    continue
                if self.ordered:
                    if n.name in inputs:
                        got_in[inputs[n.name]] = self._keep(n.args[0])
                        if len(got_in) + len(got_out) == wanted:
                            break
                elif self.ready[n] > level:
                    continue
                if zipping and not check and n in prefix.skipped:
                    if n in prefix.boundary:
                        self.env[n] = prefix.zipped(prefix.boundary[n], sources)
                    state.done.add(n)
                    self._taken(state, n)
                    continue
                self.env[n] = self.run_node(n)
                state.done.add(n)
                if zipping and check and n in prefix.boundary:
                    prefix.check(n, self.env[n], sources)
                if n.name in self.capture:
                    state.captured[n.name] = self._keep(n)
                if n.name in outputs:
                    got_out[outputs[n.name]] = self._keep(n)
                    if self.ordered and len(got_in) + len(got_out) == wanted:
                        break
                self._taken(state, n)
            if not self.ordered:
                for name, report in inputs.items():
                    got_in[report] = self._keep(self.graph_node(name).args[0])
        finally:
            self.env = {}
        if len(got_in) + len(got_out) != wanted:
            raise InternalError("merged-input least squares", next(iter({**inputs, **outputs})),
                                "a layer's input or output was not reached at its level")
        return (None if self.ordered else state), got_in, got_out

    def graph_node(self, name: str) -> fx.Node:
        if not hasattr(self, "_by_name"):
            self._by_name = {n.name: n for n in self.nodes}
        return self._by_name[name]

    def _keep(self, n: fx.Node) -> torch.Tensor:
        v = self.env[n]
        return v.clone() if n in self.mutated else v  # a later in-place op would change it
