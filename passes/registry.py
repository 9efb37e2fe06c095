"""The op-handler registry of group inference.

A handler says which axes of an op's inputs, outputs and parameters must share a
permutation. Handlers are keyed by module class (looked up along the MRO, so a subclass
inherits its parent's handler unless it registers its own), by function object, or by
tensor-method name. Users add handlers for their own layers with `register_handler`:

    @pleas_fx.register_handler(MyGatedLayer)
    def my_gated_layer(ctx, node):
        x = ctx.layouts(node.args[0])
        ...
        return output_layouts

A handler receives the InferenceContext (passes/infer_groups.py) and the fx node, and
returns the layouts of the node's output (one per dim; a list of those for tuple
outputs; None for non-tensor outputs).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx

Handler = Callable[[Any, fx.Node], Any]

_MODULE_HANDLERS: dict[type, Handler] = {}
_FUNCTION_HANDLERS: dict[Any, Handler] = {}
_METHOD_HANDLERS: dict[str, Handler] = {}


def register_handler(*keys: Any) -> Callable[[Handler], Handler]:
    """Register the decorated function for module classes, functions, or method names
    (plain strings name tensor methods, e.g. "view"). Later registrations win."""

    def decorate(fn: Handler) -> Handler:
        for key in keys:
            if isinstance(key, str):
                _METHOD_HANDLERS[key] = fn
            elif isinstance(key, type) and issubclass(key, torch.nn.Module):
                _MODULE_HANDLERS[key] = fn
            else:
                _FUNCTION_HANDLERS[key] = fn
        return fn

    return decorate


def lookup_handler(node: fx.Node, gm: fx.GraphModule) -> Handler | None:
    """The handler for `node`, or None when no handler knows its op."""
    if node.op == "call_module":
        for cls in type(gm.get_submodule(node.target)).__mro__:
            if cls in _MODULE_HANDLERS:
                return _MODULE_HANDLERS[cls]
        return None
    if node.op == "call_function":
        try:
            return _FUNCTION_HANDLERS.get(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        return _METHOD_HANDLERS.get(node.target)
    return None


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
