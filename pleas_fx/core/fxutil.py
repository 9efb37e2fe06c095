"""Small torch.fx helpers every layer uses: reading a qualified attribute, a node's shape,
recording shapes, whether a node writes its input in place."""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata


def getattr_path(root: torch.nn.Module, target: str) -> Any:
    """The attribute `target` ("layer1.0.conv1.weight") of `root`."""
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def node_shape(node: fx.Node) -> Any:
    """torch.Size of a node's tensor output (from shape propagation), a list of those for tuple
    outputs, else None."""
    meta = node.meta.get("tensor_meta")

    def convert(m):
        if isinstance(m, TensorMetadata):
            return m.shape
        if isinstance(m, (list, tuple)):
            return [convert(x) for x in m]
        return None

    return convert(meta)


INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                     operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor}


def mutates(gm: fx.GraphModule, n: fx.Node) -> bool:
    """Whether `n` may write into its first argument in place."""
    if n.kwargs.get("inplace") is True:
        return True
    if n.op == "call_module":
        return getattr(gm.get_submodule(n.target), "inplace", False) is True
    if n.op == "call_function":
        name = getattr(n.target, "__name__", "")
        return n.target in INPLACE_FUNCTIONS or (name.endswith("_") and not name.startswith("_"))
    return n.op == "call_method" and n.target.endswith("_") and not n.target.startswith("_")


def op_name(node: fx.Node) -> str:
    """The bare name of a function or method node's target ("reshape", "cat", "add")."""
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def param_value(root: torch.nn.Module, spec, name: str) -> torch.Tensor:
    """A parameter or buffer of `root` as the GroupSpec `spec` lays it out: one-entry axes that
    broadcast over a feature axis (spec.broadcast_axes) expanded to that axis's size."""
    value = getattr_path(root, name)
    for axis in sorted(a for n, a in spec.broadcast_axes if n == name):
        size = sum(s.numel for s in spec.param_layouts[name][axis])
        value = value.expand(*[size if i == axis else -1 for i in range(value.dim())])
    return value


class ShapeRecorder(fx.Interpreter):
    """Runs a graph and records each node's output shapes in node.meta["tensor_meta"], as
    torch's ShapeProp does, without its printing a traceback to stderr when a node fails;
    `current` is the node being run (the failing one after an error)."""

    current: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        result = super().run_node(n)
        found = False

        def meta(value):
            nonlocal found
            if isinstance(value, torch.Tensor):
                found = True
                return _extract_tensor_metadata(value)
            return value

        recorded = map_aggregate(result, meta)
        if found:
            n.meta["tensor_meta"] = recorded
        return result
