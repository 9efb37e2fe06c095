"""Lowering pass: channel shuffles absorbed into the layers around them.

A channel shuffle (`view(B, g, C/g, ...)`, `transpose(1, 2)`, `view(B, C, ...)`: ShuffleNet; or
reshape, permute(0, 2, 1, ...), flatten(1, 2)) is a fixed permutation of the channels. In the
group inference it interleaves its g pieces channel by channel, which ties their permutations
together and, deep in a ShuffleNet v2 stage, makes budget 2 impossible: no layout of a network
of twice the width holds two copies (docs/DESIGN.md).
The permutation does not have to be computed at all: every value downstream of a shuffle is kept
in the order its producer computed it (the *actual* order), with `perm` recording where each of
the source model's channels sits (source channel i = actual channel perm[i]):

- a shuffle becomes nothing (perm composed with the shuffle's),
- a chunk or split of a permuted value takes, for each piece, the actual channels of its source
  channels in increasing order: a split at run boundaries and a concat of the runs,
- a concat concatenates the actual values (perms offset),
- elementwise ops of one tensor (passes/ops/elementwise.py's list; in place only where that
  would write no value read in source order), pooling, reductions over later axes, BatchNorm and
  depthwise convolutions keep the perm (their per-channel parameters are permuted to follow it),
- a convolution (groups=1; 1-d to 3-d) or a Linear layer on (B, C) absorbs it: its weight's
  input channels are permuted, its output is in source order again.

The result computes exactly the same function with slices, concats and layers only, which the
group inference handles with independent permutations per piece. Both models of a pair get the
same rewrite (it depends on the graph only). A graph in which some permuted value reaches any
other op is left as it is (the shuffle then ties its pieces' permutations, as before).
"""
from __future__ import annotations

import copy
import logging
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from pleas_fx.core.errors import InternalError
from pleas_fx.core.fxutil import mutates, node_shape
from pleas_fx.passes.ops.elementwise import ELEMENTWISE_FUNCTIONS, ELEMENTWISE_METHODS, ELEMENTWISE_MODULES
from pleas_fx.passes.verify import flat_tensors, relative_error

log = logging.getLogger(__name__)

_VIEWS = {"view", "reshape"}
_ELEMENTWISE_FUNCTION_SET = set(ELEMENTWISE_FUNCTIONS)
_ELEMENTWISE_METHOD_SET = set(ELEMENTWISE_METHODS)
_SHAPE_ONLY_METHODS = {"size", "dim"}
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_POOLING_MODULES = (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
                    nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd)
_POOLING_FUNCTIONS = {getattr(F, f"{kind}{d}d") for d in (1, 2, 3)
                      for kind in ("adaptive_avg_pool", "adaptive_max_pool", "avg_pool", "max_pool")}
_REDUCTIONS = {"mean", "sum", "amax", "amin"}


class _Unsupported(Exception):
    """A permuted value meets an op this pass does not rewrite: the graph is left as it is."""


def _is_call(node: fx.Node, names: set[str]) -> bool:
    if node.op == "call_method":
        return node.target in names
    return node.op == "call_function" and getattr(node.target, "__name__", None) in names and \
        getattr(node.target, "__module__", "") in ("torch", "torch.functional", None)


def shuffle_chain(node: fx.Node, shapes: dict[str, torch.Size]) -> tuple[list[fx.Node], int] | None:
    """The nodes of a channel shuffle starting at `node` (view as (B, g, C/g, ...), transpose of
    axes 1 and 2 or the same permute, optionally contiguous, view back to the input's shape, or
    flatten) and g; None if `node` does not start one. `shapes`: node name -> output shape."""
    if not (_is_call(node, _VIEWS) and node.args and isinstance(node.args[0], fx.Node)):
        return None
    sin, sout = shapes.get(node.args[0].name), shapes.get(node.name)
    if not isinstance(sin, torch.Size) or not isinstance(sout, torch.Size) or len(sin) < 3:
        return None
    if len(sout) != len(sin) + 1 or sout[0] != sin[0] or sout[1] * sout[2] != sin[1] or sout[3:] != sin[2:] \
            or min(sout[1], sout[2]) < 2:
        return None
    chain, cur = [node], node
    for step in ("transpose", "contiguous", "view"):
        if len(cur.users) != 1:
            return None
        nxt = next(iter(cur.users))
        if step == "transpose" and not (nxt.args and nxt.args[0] is cur and _swaps_axes_1_2(nxt, len(sout))):
            return None
        elif step == "contiguous" and not _is_call(nxt, {"contiguous"}):
            continue
        elif step == "view" and not (_is_call(nxt, _VIEWS | {"flatten"}) and shapes.get(nxt.name) == sin):
            return None
        chain.append(nxt)
        cur = nxt
    return chain, sout[1]


def _swaps_axes_1_2(node: fx.Node, ndim: int) -> bool:
    """Whether `node` is transpose(x, 1, 2) or x.permute(0, 2, 1, 3, ...) of an `ndim`-axis x."""
    if _is_call(node, {"transpose"}):
        dims = list(node.args[1:]) + [node.kwargs[k] for k in ("dim0", "dim1") if k in node.kwargs]
        return all(isinstance(d, int) for d in dims) and sorted(d % ndim for d in dims) == [1, 2]
    if _is_call(node, {"permute"}):
        dims = node.args[1:] if len(node.args) > 2 else (node.args[1] if len(node.args) == 2 else node.kwargs.get("dims"))
        return isinstance(dims, (list, tuple)) and list(dims) == [0, 2, 1] + list(range(3, ndim))
    return False


def has_shuffle_pattern(gm: fx.GraphModule) -> bool:
    """Whether `gm` may hold a channel shuffle (a transpose of axes 1 and 2 of a view or reshape):
    the cheap test, before shapes are known."""
    return any(_is_call(n, {"transpose", "permute"}) and n.args and isinstance(n.args[0], fx.Node)
               and _is_call(n.args[0], _VIEWS) for n in gm.graph.nodes)


def _shuffle_order(channels: int, groups: int) -> torch.Tensor:
    """sigma: output channel i of the shuffle is input channel sigma[i]."""
    n = channels // groups
    return torch.arange(channels).reshape(groups, n).T.reshape(-1)


def _pieces(node: fx.Node, channels: int, ndim: int) -> list[tuple[int, int]] | None:
    """The channel ranges of a chunk or split along axis 1 of an `ndim`-axis value, or None if
    `node` is not one."""
    if not _is_call(node, {"chunk", "split"}):
        return None
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if dim not in (1, 1 - ndim):
        return None
    what = node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks", node.kwargs.get("split_size_or_sections"))
    if _is_call(node, {"chunk"}):
        if not isinstance(what, int) or what < 1:
            return None
        size = -(-channels // what)
        sizes = [min(size, channels - s) for s in range(0, channels, size)]
    elif isinstance(what, int) and what >= 1:
        sizes = [min(what, channels - s) for s in range(0, channels, what)]
    elif isinstance(what, (list, tuple)) and all(isinstance(s, int) for s in what):
        sizes = list(what)
    else:
        return None
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    return [(s, s + n) for s, n in zip(starts, sizes)]


def _runs(indices: torch.Tensor) -> list[tuple[int, int]]:
    """Maximal ranges [a, b) of consecutive values in sorted `indices`."""
    values = indices.tolist()
    runs, start = [], values[0]
    for prev, cur in zip(values, values[1:]):
        if cur != prev + 1:
            runs.append((start, prev + 1))
            start = cur
    runs.append((start, values[-1] + 1))
    return runs


class _Absorber:
    """One pass over the graph in order, rewriting it in place (on a copy: see absorb_channel_shuffles)."""

    def __init__(self, gm: fx.GraphModule, shapes: dict[str, torch.Size]):
        self.gm, self.graph, self.shapes = gm, gm.graph, shapes
        self.perm: dict[fx.Node, torch.Tensor] = {}  # source value -> its source channels' actual places
        self.actual: dict[fx.Node, fx.Node] = {}  # source value -> the node computing it in actual order
        self.dead: dict[fx.Node, None] = {}  # replaced nodes, erased at the end (in order)
        calls = [n.target for n in self.graph.nodes if n.op == "call_module"]
        self.called_once = {t for t in calls if calls.count(t) == 1}
        # tensors another module or a get_attr node also holds: permuting them would change that use
        owners: dict[int, int] = {}
        for _, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
            owners[t.data_ptr()] = owners.get(t.data_ptr(), 0) + 1
        self.shared = {p for p, n in owners.items() if n > 1}
        self.read_as_attr = {n.target for n in self.graph.nodes if n.op == "get_attr"}

    def run(self) -> int:
        shuffles = 0
        for node in list(self.graph.nodes):
            if node in self.dead:
                continue
            chain = shuffle_chain(node, self.shapes)
            if chain is not None:
                self._shuffle(*chain)
                shuffles += 1
            elif any(i in self.perm for i in node.all_input_nodes):
                self._consumer(node)
        feeders, erased, dead = [], set(), list(self.dead)
        while dead:  # replaced nodes, readers first
            free = [n for n in dead if not n.users]
            if not free:
                raise _Unsupported(f"{dead[0].name} is still read")
            for node in free:
                feeders.extend(node.all_input_nodes)
                self.graph.erase_node(node)
                erased.add(node)
            dead = [n for n in dead if n not in erased]
        while feeders:  # the size arithmetic that fed the shuffles' views, now unread
            node = feeders.pop()
            if node not in erased and not node.users and (
                    _is_call(node, _SHAPE_ONLY_METHODS) or node.target in (operator.getitem, operator.floordiv,
                                                                           operator.mul, getattr)):
                feeders.extend(node.all_input_nodes)
                self.graph.erase_node(node)
                erased.add(node)
        self.gm.recompile()
        return shuffles

    def _set(self, node: fx.Node, perm: torch.Tensor, actual: fx.Node) -> None:
        if torch.equal(perm, torch.arange(len(perm))):  # back in source order
            if actual is not node:
                node.replace_all_uses_with(actual)
                self.dead[node] = None
        else:
            self.perm[node], self.actual[node] = perm, actual

    def _shuffle(self, chain: list[fx.Node], groups: int) -> None:
        x, out = chain[0].args[0], chain[-1]
        sigma = _shuffle_order(self.shapes[x.name][1], groups)
        perm = self.perm[x][sigma] if x in self.perm else sigma
        self.dead.update(dict.fromkeys(chain))
        self._set(out, perm, self.actual.get(x, x))

    def _consumer(self, node: fx.Node) -> None:
        x = next(i for i in node.all_input_nodes if i in self.perm)
        perm, actual = self.perm[x], self.actual[x]
        if _is_call(node, _SHAPE_ONLY_METHODS) or (node.op == "call_function" and node.target is getattr):
            node.replace_input_with(x, actual)
            return
        if _is_call(node, {"cat", "concat", "concatenate"}):
            return self._cat(node)
        pieces = _pieces(node, len(perm), len(self.shapes[x.name]))
        if pieces is not None and node.args[0] is x:
            return self._split(node, x, pieces)
        if self._elementwise_of(node, x):  # an activation, x * 0.5, 1 - x, a cast: channel by channel
            return self._keep_perm(node, x)
        if sum(i in self.perm for i in node.all_input_nodes) != 1 or node.args[0] is not x:
            raise _Unsupported(node.name)
        if self._keeps_channels(node, x):  # per-channel pooling, a reduction or flatten of other axes
            return self._keep_perm(node, x)
        if node.op != "call_module":
            raise _Unsupported(node.name)
        module = self.gm.get_submodule(node.target)
        if not self._private(node.target, module):  # its parameters serve another use too
            raise _Unsupported(node.name)
        if isinstance(module, _CONVS) and module.groups == 1:
            self._permute(module.weight, perm, 1)
            node.replace_input_with(x, actual)
        elif isinstance(module, nn.Linear) and len(self.shapes[x.name]) == 2:
            self._permute(module.weight, perm, 1)
            node.replace_input_with(x, actual)
        elif isinstance(module, _CONVS) and module.groups == module.in_channels == module.out_channels:
            for t in (module.weight, module.bias):  # depthwise: per channel, the perm kept
                if t is not None:
                    self._permute(t, perm, 0)
            self._keep_perm(node, x)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            for t in (module.weight, module.bias, module.running_mean, module.running_var):
                if t is not None:
                    self._permute(t, perm, 0)
            self._keep_perm(node, x)
        else:
            raise _Unsupported(node.name)

    def _keep_perm(self, node: fx.Node, x: fx.Node) -> None:
        """`node` reads x's actual-order value, and its output keeps x's permutation."""
        node.replace_input_with(x, self.actual[x])
        self.perm[node], self.actual[node] = self.perm[x], node

    def _elementwise_of(self, node: fx.Node, x: fx.Node) -> bool:
        """Whether `node` is an elementwise op (passes/ops/elementwise.py) whose one graph input is
        `x`, every other argument a Python value: it maps each channel on its own, so its output
        keeps x's permutation. In place only where x's actual-order value is x's own node (the
        shuffle's input, say, is also read in its own order)."""
        if node.all_input_nodes != [x]:
            return False
        if mutates(self.gm, node) and self.actual[x] is not x:  # it would write a value read unpermuted too
            return False
        if node.op == "call_module":
            return isinstance(self.gm.get_submodule(node.target), ELEMENTWISE_MODULES)
        if node.op == "call_method":
            return node.target in _ELEMENTWISE_METHOD_SET
        return node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTION_SET

    def _private(self, target: str, module: nn.Module) -> bool:
        """Whether only this call reads `module`'s tensors (called once, nothing tied or read as an
        attribute), so that permuting them changes nothing else."""
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        return target in self.called_once and not any(t.data_ptr() in self.shared for t in tensors) and \
            not any(a == target or a.startswith(target + ".") for a in self.read_as_attr)

    def _keeps_channels(self, node: fx.Node, x: fx.Node) -> bool:
        """Whether `node` maps a value to one whose axis 1 is the same channels, each computed from
        its own channel alone: pooling, a reduction over axes after 1, a flatten of size-1 axes
        after it (a pooled map to (B, C))."""
        sin, sout = self.shapes.get(x.name), self.shapes.get(node.name)
        if not isinstance(sin, torch.Size) or not isinstance(sout, torch.Size) or len(sout) < 2 or sout[:2] != sin[:2]:
            return False
        if node.op == "call_module":
            return isinstance(self.gm.get_submodule(node.target), _POOLING_MODULES + (nn.Flatten,))
        if node.op == "call_function" and node.target in _POOLING_FUNCTIONS:
            return True
        if _is_call(node, _REDUCTIONS):
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = [dims] if isinstance(dims, int) else dims
            return isinstance(dims, (list, tuple)) and all(isinstance(d, int) and d % len(sin) >= 2 for d in dims)
        return _is_call(node, {"flatten"})  # shapes equal on axes 0 and 1: only later axes flattened

    @staticmethod
    @torch.no_grad()
    def _permute(t: torch.Tensor, perm: torch.Tensor, axis: int) -> None:
        """Entry i along `axis` moves to perm[i]."""
        moved = torch.empty_like(t)
        moved.index_copy_(axis, perm.to(t.device), t)
        t.copy_(moved)

    def _cat(self, node: fx.Node) -> None:
        tensors = node.args[0] if node.args else node.kwargs["tensors"]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if dim not in (1, 1 - len(self.shapes[node.name])) or not isinstance(tensors, (list, tuple)) or \
                not all(isinstance(t, fx.Node) and t.name in self.shapes for t in tensors):
            raise _Unsupported(node.name)
        perms, offset = [], 0
        for t in tensors:
            c = self.shapes[t.name][1]
            perms.append((self.perm[t] if t in self.perm else torch.arange(c)) + offset)
            offset += c
        actual = [self.actual.get(t, t) for t in tensors]
        if node.args:
            node.update_arg(0, actual)
        else:
            node.update_kwarg("tensors", actual)
        self._set(node, torch.cat(perms), node)

    def _split(self, node: fx.Node, x: fx.Node, pieces: list[tuple[int, int]]) -> None:
        """Each piece's actual channels, in increasing order: runs of one split of the actual value."""
        perm, actual = self.perm[x], self.actual[x]
        users = {}
        for user in node.users:
            if not (user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int)):
                raise _Unsupported(user.name)
            users.setdefault(user.args[1] % len(pieces), []).append(user)
        wanted = {k: perm[a:b].sort().values for k, (a, b) in enumerate(pieces) if k in users}
        cuts = sorted({0, len(perm)} | {e for idx in wanted.values() for run in _runs(idx) for e in run})
        with self.graph.inserting_before(node):
            parts = self.graph.call_function(torch.split, (actual, [b - a for a, b in zip(cuts, cuts[1:])], 1))
            for k, idx in wanted.items():
                items = [self.graph.call_function(operator.getitem, (parts, cuts.index(a))) for a, _ in _runs(idx)]
                value = items[0] if len(items) == 1 else self.graph.call_function(torch.cat, (items, 1))
                rank = torch.empty(len(perm), dtype=torch.long)
                rank[idx] = torch.arange(len(idx))
                for user in users[k]:
                    self._set(user, rank[perm[pieces[k][0]:pieces[k][1]]], value)
                    self.dead[user] = None
        self.dead[node] = None


def absorb_channel_shuffles(gm: fx.GraphModule, example_args: tuple, twins: tuple = ()) -> int:
    """Absorb every channel shuffle of `gm` and of its `twins` (graphs with the same nodes: the
    other model of a pair), in place (module docstring); returns how many per graph (0: no
    shuffle, or the rewrite does not apply and the graphs are left as they are). `gm` carries
    shapes. The rewrite is tried on a copy first and checked against `gm` on `example_args`: a
    difference (a bug of this pass) leaves the graphs as they are, with a warning."""
    shapes = {n.name: shape for n in gm.graph.nodes if isinstance(shape := node_shape(n), torch.Size)}
    if not any(shuffle_chain(n, shapes) for n in gm.graph.nodes):
        return 0
    trial = copy.deepcopy(gm)
    try:
        count = _Absorber(trial, shapes).run()
    except _Unsupported as exc:
        log.debug("channel shuffles left as they are: a permuted value reaches %s", exc)
        return 0
    with torch.no_grad():
        same = _same_outputs(gm(*example_args), trial(*example_args))
    if not same:
        log.warning("pleas_fx internal check: absorbing the channel shuffles of %s changed its output; the shuffles "
                    "are kept (their pieces then share one permutation). Please report this.", type(gm).__name__)
        return 0
    for g in (gm, *twins):
        try:
            _Absorber(g, shapes).run()
        except _Unsupported as exc:  # it ran on the copy: the same rewrite cannot fail here
            raise InternalError("absorb channel shuffles", str(exc), "the rewrite failed on a graph after "
                                "succeeding on its copy") from exc
    log.debug("%d channel shuffle(s) absorbed into the layers around them", count)
    return count


def _same_outputs(before, after) -> bool:
    """Every output tensor within 1e-4 of its own largest entry (the rewrite only reorders sums)."""
    a, b = flat_tensors(before), flat_tensors(after)
    return len(a) == len(b) and all(p.shape == q.shape and (p.numel() == 0 or relative_error(q, p) <= 1e-4)
                                    for p, q in zip(a, b))
