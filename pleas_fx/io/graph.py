"""The fx graph of a saved model: graph.json's document (module, tensor and node records, input
and output shapes) built from a model, the fx graph and the GraphModule rebuilt from it, and the
check that runs the rebuilt graph on meta tensors and compares every node's output shape with
the saved one."""
from __future__ import annotations

import keyword
import logging
import re
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from pleas_fx.core.errors import PleasError, WeightError
from pleas_fx.io.allowlist import _function_name, _resolve_function
from pleas_fx.io.codec import _decode, _encode, _torch_attr
from pleas_fx.io.errors import SaveError
from pleas_fx.io.files import FORMAT
from pleas_fx.io.modules import _build_modules, _module_records

log = logging.getLogger("pleas_fx")


# ---------------------------------------------------------------------------- records
def _meta_shape(meta: Any) -> Any:
    if meta is None:
        return None
    if hasattr(meta, "shape") and hasattr(meta, "dtype"):
        return {"shape": list(meta.shape), "dtype": str(meta.dtype).removeprefix("torch.")}
    if isinstance(meta, (list, tuple)):
        return [_meta_shape(m) for m in meta]
    if isinstance(meta, dict):
        return None
    return None


def _value_shape(value: Any) -> Any:
    """{"shape", "dtype"} of a tensor, a list of those for a tuple or list, else None."""
    if torch.is_tensor(value):
        return {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, (list, tuple)):
        return [_value_shape(v) for v in value]
    return None


def _node_record(gm: fx.GraphModule, node: fx.Node) -> dict[str, Any]:
    where = f"node {node.name!r}"
    rec: dict[str, Any] = {"name": node.name, "op": node.op}
    if node.op == "call_function":
        rec["target"] = _function_name(node.target, where)
    elif node.op == "call_method":
        if not isinstance(node.target, str) or node.target.startswith("_") or not hasattr(torch.Tensor, node.target):
            raise SaveError(f"cannot save: {where} calls method {node.target!r}, which is not a public torch.Tensor method")
        rec["target"] = node.target
    elif node.op in ("call_module", "get_attr", "placeholder", "output"):
        rec["target"] = node.target
    else:
        raise SaveError(f"cannot save: {where} has op {node.op!r}")
    if node.op == "get_attr":
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        if not torch.is_tensor(obj):
            raise SaveError(f"cannot save: {where} reads attribute {node.target!r} of type {type(obj).__name__}, not a tensor")
    if node.target is getattr and len(node.args) > 1 and (not isinstance(node.args[1], str) or node.args[1].startswith("_")):
        raise SaveError(f"cannot save: {where} reads a private attribute {node.args[1]!r}")
    rec["args"] = _encode(tuple(node.args), where)["tuple"]
    rec["kwargs"] = _encode(dict(node.kwargs), where)["dict"]
    if node.type is torch.Tensor:  # annotations: only torch.Tensor, as a class or as a string
        rec["type"] = "torch.Tensor"
    elif node.type == "torch.Tensor":
        rec["type"] = "'torch.Tensor'"
    return rec


def _as_graph_module(model: nn.Module) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule):
        return model
    if not isinstance(model, nn.Module):
        raise SaveError(f"cannot save a {type(model).__name__}: save() takes a torch.nn.Module")
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:
        raise SaveError(f"cannot save: {type(model).__name__} could not be traced by torch.fx: {type(exc).__name__}: {exc}") from exc


def _serialise(model: nn.Module, example_input: Any = None) -> tuple[dict, dict[str, torch.Tensor], str, Any]:
    gm = _as_graph_module(model)
    if type(gm.graph._codegen) is not fx.graph.CodeGen:
        raise SaveError("cannot save: the graph uses a custom code generator (pytree inputs/outputs); "
                        "trace the model without concrete_args")
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    modules = _module_records(gm, called)
    for target in called:
        if target not in modules:
            raise SaveError(f"cannot save: the graph calls submodule {target!r}, which the model does not have")
        if modules[target]["class"] == "torch.nn.Module":
            raise SaveError(f"cannot save: the graph calls submodule {target!r} of class "
                            f"{type(gm.get_submodule(target)).__name__}, which cannot be rebuilt")

    tensors: dict[str, dict[str, Any]] = {}
    weights: dict[str, torch.Tensor] = {}
    first_name: dict[int, str] = {}
    storages: set[tuple[int, int]] = set()
    entries = [(n, t, "parameter") for n, t in gm.named_parameters(remove_duplicate=False)]
    entries += [(n, t, "buffer") for n, t in gm.named_buffers(remove_duplicate=False)]
    for name, t, kind in entries:
        owner_name, _, leaf = name.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        rec: dict[str, Any] = {"kind": kind, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        if kind == "parameter":
            rec["requires_grad"] = bool(t.requires_grad)
        else:
            rec["persistent"] = leaf not in owner._non_persistent_buffers_set
        if id(t) in first_name:
            rec["alias_of"] = first_name[id(t)]
        else:
            first_name[id(t)] = name
            data = t.detach()
            if data.device.type != "cpu":
                data = data.cpu()
            key = (data.untyped_storage().data_ptr(), data.device.index or 0) if data.numel() else None
            if not data.is_contiguous() or (key is not None and key in storages):
                data = data.contiguous().clone()
            elif key is not None:
                storages.add(key)
            weights[name] = data
        tensors[name] = rec

    nodes = [_node_record(gm, n) for n in gm.graph.nodes]
    if example_input is not None:
        args = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
        if not all(torch.is_tensor(a) for a in args):
            raise SaveError("example_input must be a tensor or a tuple of tensors")
        inputs = [_value_shape(a) for a in args]
    else:  # shapes recorded by an earlier shape propagation (merge() leaves them on its result)
        inputs = [_meta_shape(n.meta.get("tensor_meta")) for n in gm.graph.nodes if n.op == "placeholder"]
    doc = {
        "format": FORMAT,
        "torch_version": torch.__version__,
        "class_name": type(gm).__name__,
        "training": gm.training,
        "modules": modules,
        "tensors": tensors,
        "inputs": inputs if all(isinstance(i, dict) for i in inputs) else None,
        "graph": nodes,
    }
    report = gm.meta.get("pleas_fx", {}) if hasattr(gm, "meta") else {}
    return doc, weights, gm.code, report


# ------------------------------------------------------------------------- rebuilding
def _build_graph(records: list[dict[str, Any]], module_names: set[str], tensor_names: set[str]) -> fx.Graph:
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for rec in records:
        name, op, target = rec.get("name"), rec.get("op"), rec.get("target")
        where = f"node {name!r}"
        if not isinstance(name, str) or not isinstance(target, str):
            raise PleasError(f"refusing to load: malformed node record {rec!r:.120}")
        if op == "call_function":
            target = _resolve_function(target, where)
        elif op == "call_method":
            if target.startswith("_") or not hasattr(torch.Tensor, target):
                raise PleasError(f"refusing to load: {where} calls method {target!r}, not a public torch.Tensor method")
        elif op == "call_module":
            if target not in module_names:
                raise PleasError(f"refusing to load: {where} calls submodule {target!r}, which graph.json does not define")
        elif op == "get_attr":
            if target not in tensor_names:
                raise PleasError(f"refusing to load: {where} reads {target!r}, which is not a saved tensor")
        elif op == "placeholder":  # the target becomes a parameter name in the generated code
            if not re.fullmatch(r"\*{0,2}[A-Za-z_][A-Za-z0-9_]*", target) or keyword.iskeyword(target.lstrip("*")):
                raise PleasError(f"refusing to load: {where} has an input named {target!r}, not a Python identifier")
        elif op != "output":
            raise PleasError(f"refusing to load: {where} has op {op!r}")
        args = tuple(_decode(rec.get("args", []), nodes, where))
        kwargs = _decode({"dict": rec.get("kwargs", {})}, nodes, where)
        if target is getattr and len(args) > 1 and (not isinstance(args[1], str) or args[1].startswith("_")):
            raise PleasError(f"refusing to load: {where} reads a private attribute {args[1]!r}")
        type_expr = {"torch.Tensor": torch.Tensor, "'torch.Tensor'": "torch.Tensor"}.get(rec.get("type"))
        node = graph.create_node(op, target, args, kwargs, name=name, type_expr=type_expr)
        if node.name != name:
            raise PleasError(f"refusing to load: duplicate node name {name!r} in graph.json")
        nodes[name] = node
    graph.lint()
    return graph


def _graph_module(doc: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> fx.GraphModule:
    root = _build_modules(doc, tensors, source)
    graph = _build_graph(doc["graph"], set(doc["modules"]), set(doc["tensors"]))
    class_name = doc.get("class_name") or "GraphModule"
    if not str(class_name).isidentifier():
        class_name = "GraphModule"
    gm = fx.GraphModule(root, graph, class_name)
    # GraphModule copies only what the graph references, into fresh containers: put the whole
    # rebuilt tree in place (same objects), so the state dict is exactly the saved one
    for name, child in root._modules.items():
        gm._modules[name] = child
    for name, p in root._parameters.items():
        gm._parameters[name] = p
    for name, b in root._buffers.items():
        gm._buffers[name] = b
    gm._non_persistent_buffers_set |= root._non_persistent_buffers_set
    gm.train(bool(doc.get("training", False)))
    for name, mod in gm.named_modules():
        rec = doc["modules"].get(name)
        if rec is not None:
            mod.training = bool(rec.get("training", False))
    return gm


# ------------------------------------------------------------------------- shape check
class _ShapeRecorder(fx.Interpreter):
    """Runs a graph (on meta tensors) and records every node's output shape."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.shapes[n.name] = _value_shape(result)
        return result


def _first_lines(exc: BaseException, n: int = 3) -> str:
    return " ".join(line.strip() for line in str(exc).strip().splitlines()[:n] if line.strip())


def _run_on_meta(doc: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> list[Any]:
    """Every node's output shape when the graph runs on meta tensors of the saved input shapes."""
    meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in tensors.items()}
    gm = _graph_module(doc, meta, source)
    args = [torch.zeros(i["shape"], dtype=_torch_attr(i["dtype"], torch.dtype, "input"), device="meta")
            for i in doc["inputs"]]
    recorder = _ShapeRecorder(gm)
    with torch.no_grad():
        recorder.run(*args)
    return [recorder.shapes.get(rec["name"]) for rec in doc["graph"]]


def _check_shapes(doc: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> None:
    """Run the graph on meta tensors of the saved input shapes; compare every node's output
    shape with the saved one."""
    inputs = doc.get("inputs")
    if not inputs or not all(isinstance(i, dict) for i in inputs):
        return
    try:
        shapes = _run_on_meta(doc, tensors, source)
    except NotImplementedError as exc:  # an op without a meta kernel: skip this check
        log.debug("shape check skipped: %s", exc)
        return
    except PleasError:
        raise
    except Exception as exc:
        raise WeightError(f"weights do not match the model code: running the graph on inputs of the saved "
                          f"shapes fails: {_first_lines(exc)}") from exc
    for rec, got in zip(doc["graph"], shapes):
        want = rec.get("output")
        if want is not None and got is not None and want != got:
            raise WeightError(f"weights do not match the model code: node {rec['name']!r} gives {got}, saved {want}")
