"""The op registry: everything pleas_fx knows about one op, registered once.

An `OpSpec` gathers what every pass needs to know about an op:

- `infer(ctx, node)` (group inference): links the axes the op couples and returns the layouts
  of the node's output (one per dim; a list of those for tuple outputs; None for non-tensors).
- `resize(module, input_shape)` (widen, module ops): re-derive the module's width attributes
  (in_channels, out_features, num_features, normalized_shape, ...) from its resized tensors.
- `rewrite(node, resizing)` (widen): rewrite shape constants in the node's arguments (reshape
  sizes, split sections, slice bounds, layer_norm shapes) for the merged widths (`Resizing`).
- `weight(node, gm) -> WeightNode | None` (fill, statistics, footprint): the weight tensor the
  node applies to its input and how the fill pass writes it (solved by least squares, or
  mapped, with the reason); multiply-accumulates are counted from it.
- `norm(node, gm) -> NormNode | None` (fill): a per-channel affine normalisation with running
  statistics, folded into a weight node directly before it.
- `compact(node, gm) -> BlockEmit | None` (compact): how the weight node is emitted as a block
  layer storing only its structural blocks (pleas_fx.core.layers), or None to keep it dense.

Specs are keyed by module class, by function object, or by tensor-method name. A module class
is looked up along its MRO, but a subclass that overrides `forward` does not inherit its
parent's spec (it computes something else). Users add ops with `register_op`:

    pleas_fx.register_op(MyGatedLayer, spec=OpSpec(infer=my_gated_layer, resize=...))

or, for inference alone, with the decorator `register_handler`:

    @pleas_fx.register_handler(MyGatedLayer)
    def my_gated_layer(ctx, node):
        x = ctx.layouts(node.args[0])
        ...
        return output_layouts
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from pleas_fx.core.ir import NormNode, WeightNode

Handler = Callable[[Any, fx.Node], Any]


@dataclass(frozen=True)
class Resizing:
    """What the widen pass tells an op's `rewrite` about one node: its output shape before and
    after the merge, whether the merge changes the size of an axis of any tensor node, and where
    an entry offset of a tensor node's axis (at a segment boundary) lands in the merged model."""

    old: Any
    new: Any
    resized: Callable[[fx.Node, int], bool]
    new_offset: Callable[[fx.Node, int, int], "int | None"]


@dataclass(frozen=True)
class BlockEmit:
    """How the compact pass (passes/compact.py) emits a weight node as a block layer
    (pleas_fx.core.layers): the node's input, its weight and bias by qualified name, and for a
    convolution its geometry (None: a linear layer)."""

    input: fx.Node
    weight: str
    bias: str | None
    conv: dict | None = None  # kernel_size, stride, padding, dilation


@dataclass(frozen=True)
class OpSpec:
    """What every pass knows about one op (see the module docstring); only `infer` is required."""

    infer: Handler
    resize: Callable[[torch.nn.Module, Any], None] | None = None
    # module ops: whether a module is kept whole when tracing (default: always); False traces
    # through it (e.g. a norm-act module whose activation pleas_fx does not know as a module)
    whole: Callable[[torch.nn.Module], bool] | None = None
    rewrite: Callable[[fx.Node, Resizing], None] | None = None
    weight: Callable[[fx.Node, fx.GraphModule], WeightNode | None] | None = None
    norm: Callable[[fx.Node, fx.GraphModule], NormNode | None] | None = None
    # compact emission: the block layer this weight node becomes (None: kept as it is)
    compact: Callable[[fx.Node, fx.GraphModule], BlockEmit | None] | None = None


_MODULE_SPECS: dict[type, OpSpec] = {}
_FUNCTION_SPECS: dict[Any, OpSpec] = {}
_METHOD_SPECS: dict[str, OpSpec] = {}


def register_op(*keys: Any, spec: OpSpec) -> OpSpec:
    """Register `spec` for module classes, functions, or method names (plain strings name
    tensor methods, e.g. "view"). Later registrations win."""
    if not isinstance(spec, OpSpec):
        raise TypeError(f"register_op needs an OpSpec, got {type(spec).__name__}")
    for key in keys:
        if isinstance(key, str):
            _METHOD_SPECS[key] = spec
        elif isinstance(key, type) and issubclass(key, torch.nn.Module):
            _MODULE_SPECS[key] = spec
        else:
            _FUNCTION_SPECS[key] = spec
    return spec


def register_handler(*keys: Any) -> Callable[[Handler | OpSpec], Handler | OpSpec]:
    """Decorator: register an inference handler (an OpSpec with `infer` only) or a whole
    OpSpec for the given keys. Returns what it decorates."""

    def decorate(item: Handler | OpSpec) -> Handler | OpSpec:
        register_op(*keys, spec=item if isinstance(item, OpSpec) else OpSpec(infer=item))
        return item

    return decorate


def module_spec(module: torch.nn.Module) -> OpSpec | None:
    """The spec of a module's class, looked up along its MRO up to the first class that
    defines `forward` (a subclass that overrides forward computes something else)."""
    for cls in type(module).__mro__:
        if cls in _MODULE_SPECS:
            return _MODULE_SPECS[cls]
        if "forward" in cls.__dict__:
            return None
    return None


def lookup_op(node: fx.Node, gm: fx.GraphModule) -> OpSpec | None:
    """The spec for `node`, or None when no spec knows its op."""
    if node.op == "call_module":
        return module_spec(gm.get_submodule(node.target))
    if node.op == "call_function":
        try:
            return _FUNCTION_SPECS.get(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        return _METHOD_SPECS.get(node.target)
    return None


def overridden_forward(module: torch.nn.Module) -> type | None:
    """The registered ancestor whose spec `module` does not inherit because its class (or one
    in between) overrides forward; None when there is none or the module has a spec."""
    if module_spec(module) is not None:
        return None
    return next((cls for cls in type(module).__mro__[1:] if cls in _MODULE_SPECS), None)


def describe_op(node: fx.Node, gm: fx.GraphModule) -> str:
    """A short human name of the op a node runs, for reports and errors."""
    if node.op == "call_module":
        return f"module {type(gm.get_submodule(node.target)).__name__} ({node.target})"
    if node.op == "call_function":
        mod = getattr(node.target, "__module__", "") or ""
        return f"function {mod + '.' if mod else ''}{getattr(node.target, '__name__', node.target)}"
    if node.op == "call_method":
        return f"method Tensor.{node.target}"
    return node.op
