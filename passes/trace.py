"""Trace pass: torch.fx traces of both models, checked to be the same architecture, with
every node's output shape from shape propagation of the example input.

The models are deep-copied before tracing (symbolic_trace shares submodules with the
model it traces), so nothing downstream can touch the user's models.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from pleas_fx.core.errors import ArchitectureMismatchError, DataError, TraceError, WeightError, first_line
from pleas_fx.core.fxutil import ShapeRecorder, getattr_path
from pleas_fx.core.inputs import REQUIRED, as_args
from pleas_fx.passes.lower import lower_multihead_attention, split_fused_qkv
from pleas_fx.passes.lower_shuffle import absorb_channel_shuffles, has_shuffle_pattern
from pleas_fx.passes.lower_windows import lower_swin
from pleas_fx.passes.ops import module_spec


@dataclass
class TracedPair:
    gm_a: fx.GraphModule
    gm_b: fx.GraphModule
    example_args: tuple
    forward_seconds: float = 0.0  # model A's shape propagation on example_input (a real forward)


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with every module whose class has an op spec kept as one op (a leaf):
    pleas_fx knows what it computes (timm's BatchNormAct2d, Conv2dSame, a user's registered
    layer), so it need not be traced through. `extra_leaves`: more leaf classes (timm's own
    no-trace list, for the retry after a failed trace)."""

    def __init__(self, extra_leaves: tuple = (), autowrap: tuple = ()):
        super().__init__(autowrap_functions=autowrap)
        self.extra_leaves = extra_leaves

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if isinstance(m, self.extra_leaves):
            return True
        spec = module_spec(m)
        if spec is not None and not isinstance(m, torch.nn.Sequential) and (spec.whole is None or spec.whole(m)):
            return True
        return super().is_leaf_module(m, qualname)


def _timm_no_trace() -> tuple[tuple, tuple]:
    """timm's own lists of modules and functions to keep whole when tracing (empty without timm)."""
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except Exception:  # timm missing or too old
        return (), ()
    return tuple(get_notrace_modules()), tuple(get_notrace_functions())


def _symbolic_trace(model: torch.nn.Module) -> fx.GraphModule:
    """Trace with op-spec leaves; if that fails, once more with timm's no-trace modules and
    functions kept whole too (opaque ops are then frozen, rather than the model refused)."""
    try:
        return fx.GraphModule(model, _Tracer().trace(model), model.__class__.__name__)
    except Exception as first:
        modules, functions = _timm_no_trace()
        if not modules and not functions:
            raise
        try:
            return fx.GraphModule(model, _Tracer(modules, functions).trace(model), model.__class__.__name__)
        except Exception:
            raise first from None


def trace_model(model: torch.nn.Module, label: str) -> fx.GraphModule:
    """A traced, eval-mode deep copy of `model` (traced in eval mode: code that branches on
    `self.training` takes its inference path), with opaque attention modules lowered to
    primitive ops (passes/lower.py) and torchvision's Swin functions too (passes/lower_windows.py)."""
    if isinstance(model, fx.GraphModule):
        gm = copy.deepcopy(model)
    else:
        if not isinstance(model, torch.nn.Module):
            raise TraceError(f"{label} is a {type(model).__name__}, not a torch.nn.Module")
        try:
            gm = _symbolic_trace(copy.deepcopy(model).eval())
        except Exception as exc:  # torch.fx raises many kinds here
            raise TraceError(
                f"{label} ({type(model).__name__}) could not be traced by torch.fx: "
                f"{type(exc).__name__}: {exc}. Data-dependent Python control flow is the usual "
                "cause; make that code a leaf module or rewrite it without branching on tensors."
            ) from exc
    return lower_swin(split_fused_qkv(lower_multihead_attention(gm))).eval()


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"call_module {node.target} = {gm.get_submodule(node.target)!r}"
    target = getattr(node.target, "__name__", node.target)
    return f"{node.op} {target}"


def _signature(gm: fx.GraphModule, node: fx.Node) -> Any:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return (node.op, type(mod), repr(mod))
    if node.op == "get_attr":
        value = getattr_path(gm, node.target)
        return (node.op, node.target, tuple(value.shape) if torch.is_tensor(value) else type(value))
    return (node.op, node.target)


def check_same_architecture(gm_a: fx.GraphModule, gm_b: fx.GraphModule) -> None:
    """Raise ArchitectureMismatchError naming the first differing node or parameter."""
    nodes_a, nodes_b = list(gm_a.graph.nodes), list(gm_b.graph.nodes)
    for na, nb in zip(nodes_a, nodes_b):
        if _signature(gm_a, na) != _signature(gm_b, nb) or na.name != nb.name:
            raise ArchitectureMismatchError(
                f"model_a and model_b differ at node '{na.name}': "
                f"{_describe(gm_a, na)}  vs  {_describe(gm_b, nb)}"
            )
    if len(nodes_a) != len(nodes_b):
        longer, which = (nodes_a, "model_a") if len(nodes_a) > len(nodes_b) else (nodes_b, "model_b")
        extra = longer[min(len(nodes_a), len(nodes_b))]
        raise ArchitectureMismatchError(
            f"model_a has {len(nodes_a)} graph nodes and model_b {len(nodes_b)}; "
            f"{which} continues with '{extra.name}'"
        )
    params_a = {n: tuple(p.shape) for n, p in gm_a.state_dict().items()}
    params_b = {n: tuple(p.shape) for n, p in gm_b.state_dict().items()}
    for name in params_a.keys() | params_b.keys():
        if params_a.get(name) != params_b.get(name):
            raise ArchitectureMismatchError(
                f"parameter '{name}' has shape {params_a.get(name)} in model_a "
                f"and {params_b.get(name)} in model_b"
            )


def check_tensors(model: torch.nn.Module, label: str) -> None:
    """Refuse, naming the tensor, a model whose parameters or buffers cannot be merged: on the
    meta device (no values), sparse, quantized, or complex; then any non-finite value."""
    if not isinstance(model, torch.nn.Module):
        return  # trace_model names the problem
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in tensors:
        if t is None:
            continue
        what = f"{label}'s tensor '{name}'"
        if t.is_meta:
            raise WeightError(f"{what} is on the meta device (it has no values): load the weights first, e.g. "
                              f"model.to_empty(device='cpu') then model.load_state_dict(...)")
        if t.layout != torch.strided:
            raise WeightError(f"{what} is a sparse tensor ({t.layout}): pleas_fx merges dense tensors; "
                              f"convert it with .to_dense()")
        if t.is_quantized:
            raise WeightError(f"{what} is quantized ({t.dtype}): merge the float models, then quantize the merged one")
        if t.is_complex():
            raise WeightError(f"{what} is complex ({t.dtype}): pleas_fx merges real-valued networks")
    for name, t in tensors:
        if t is not None and t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise WeightError(f"{label} has {bad} non-finite values in '{name}'")


def propagate_shapes(gm: fx.GraphModule, example_args: tuple, twins: tuple = ()) -> None:
    """Annotate node.meta['tensor_meta'] for every node (a run on the example input), then absorb
    the channel shuffles, which needs the shapes, in gm and its `twins` (the other model of a
    pair: the same nodes; passes/lower_shuffle.py), and annotate the rewritten graph."""
    _record_shapes(gm, example_args)
    if absorb_channel_shuffles(gm, example_args, twins):
        _record_shapes(gm, example_args)


def _record_shapes(gm: fx.GraphModule, example_args: tuple) -> None:
    prop = ShapeRecorder(gm)
    with torch.no_grad():
        try:
            prop.run(*example_args)
        except Exception as exc:
            node = prop.current.name if prop.current is not None else None
            at = f" at node {node}" if node is not None else ""
            raise TraceError(f"running the traced model on example_input failed{at}: {type(exc).__name__}: "
                             f"{first_line(exc)}", node=node) from exc


def model_inputs(gm: fx.GraphModule) -> list[tuple[str, Any]]:
    """The traced model's inputs in order: (name, default or data.REQUIRED)."""
    return [(n.target, n.args[0] if n.args else REQUIRED) for n in gm.graph.nodes if n.op == "placeholder"]


def embedding_vocab(gm: fx.GraphModule) -> dict[int, int]:
    """Vocabulary size of every model input read directly by an nn.Embedding (position among
    the inputs -> num_embeddings): the range of token ids for generated data."""
    position = {n.name: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    vocab: dict[int, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.args and isinstance(node.args[0], fx.Node) \
                and node.args[0].name in position and isinstance(gm.get_submodule(node.target), torch.nn.Embedding):
            i = position[node.args[0].name]
            vocab[i] = min(vocab.get(i, 1 << 62), gm.get_submodule(node.target).num_embeddings)
    return vocab


def trace_pair(model_a, model_b, example_input: Any) -> TracedPair:
    """Trace both models, check them, and bind example_input (a tensor, tuple, or dict by input
    name) to the traced inputs."""
    check_tensors(model_a, "model_a")
    check_tensors(model_b, "model_b")
    gm_a, gm_b = trace_model(model_a, "model_a"), trace_model(model_b, "model_b")
    try:
        check_same_architecture(gm_a, gm_b)
        mismatch = None
    except ArchitectureMismatchError as exc:  # unless one is a graph whose shuffles are absorbed already
        if not (has_shuffle_pattern(gm_a) or has_shuffle_pattern(gm_b)):
            raise
        mismatch = exc
    example_args = as_args(example_input, model_inputs(gm_a))
    for i, a in enumerate(example_args):
        if torch.is_tensor(a) and (a.is_meta or a.layout != torch.strided):
            raise DataError(f"example_input {i} is a {'meta' if a.is_meta else 'sparse'} tensor: pass real, dense "
                            f"values (they fix shapes and run the models once)")
    device = next((a.device for a in example_args if torch.is_tensor(a)), torch.device("cpu"))
    gm_a.to(device)
    gm_b.to(device)
    start = time.perf_counter()
    propagate_shapes(gm_a, example_args, twins=(gm_b,) if mismatch is None else ())
    seconds = time.perf_counter() - start
    if mismatch is not None:  # e.g. model_b a merged model (its shuffles absorbed), model_a not
        try:
            propagate_shapes(gm_b, example_args)
            check_same_architecture(gm_a, gm_b)
        except (TraceError, ArchitectureMismatchError):
            raise mismatch from None
    return TracedPair(gm_a, gm_b, example_args, seconds)
