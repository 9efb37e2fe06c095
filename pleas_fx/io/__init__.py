"""Saving and loading merged models: a folder of readable code, JSON and safetensors.

``save(model, path)`` writes a folder::

    path/
      model.py             the generated forward code (as GraphModule.code shows it); for reading
      graph.json           the module tree (class and constructor arguments of every submodule),
                           the fx graph (one record per node) and every tensor's name and shape
      weights.safetensors  every parameter and buffer (safetensors: no pickle anywhere)
      report.json          the merge report, merged.meta["pleas_fx"] ({} for other models)

``load(path)`` rebuilds the model without the source models' classes and without executing
anything from the folder:

* every submodule is constructed from graph.json, and only if its class is a ``torch.nn``
  module class (``torch.nn.Conv2d``, ``torch.nn.BatchNorm2d``, ...; containers become plain
  ``torch.nn.Module``); its constructor arguments are plain JSON values;
* the fx graph is rebuilt node by node with ``torch.fx.Graph.create_node``. A
  ``call_function`` target must be in an allow-list: the tensor functions of ``torch``,
  ``torch.nn.functional``, ``torch.linalg``, ``torch.fft`` and ``torch.special`` (those
  ``torch.overrides`` reports as tensor operations), the ``operator`` module's arithmetic,
  comparison and indexing functions, ``getattr`` and ``torch._assert``, and the
  ``torch.fx.wrap``-ped functions of torch and torchvision (such as
  ``torchvision.ops.stochastic_depth``). ``call_method`` and ``getattr`` names must be public
  (no leading underscore), ``call_method`` names must be ``torch.Tensor`` methods, input names
  must be Python identifiers, and constants are plain JSON values (numbers, strings, tuples,
  slices, dtypes, devices);
* the weights are read from weights.safetensors. A tensor whose shape does not match what the
  graph.json modules need (or is missing, or extra) is refused with a ``WeightError`` naming it;
  then the graph is run once on meta tensors of the saved input shapes and every node's
  output shape is compared with the saved one;
* ``torch.fx`` then generates the forward method's Python source from the rebuilt graph and
  executes it, as for every GraphModule. **That generated code is what loading executes**; it
  is the code saved in model.py (load warns if model.py differs from it; model.py itself is
  never read or executed).

The loaded GraphModule computes the same outputs as the saved one, bit for bit, on the same
device and with the same torch version.
"""
from __future__ import annotations

import functools
import inspect
import json
import keyword
import logging
import math
import operator
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from pleas_fx.core.errors import PleasError, WeightError

log = logging.getLogger("pleas_fx")

__all__ = ["save", "load", "SaveError", "FORMAT"]

FORMAT = "pleas_fx.saved_model/1"
CODE_FILE, GRAPH_FILE, WEIGHTS_FILE, REPORT_FILE = "model.py", "graph.json", "weights.safetensors", "report.json"
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class SaveError(PleasError):
    """The model cannot be written in the saved-model format (a class or function outside the
    allow-list, a constructor argument that cannot be recovered, ...)."""


# ------------------------------------------------------------------ allow-listed functions
_OPERATOR_FUNCS = (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "neg", "pos", "abs", "invert",
    "and_", "or_", "xor", "lshift", "rshift", "not_", "truth", "eq", "ne", "lt", "le", "gt", "ge",
    "getitem", "contains", "is_", "is_not", "index",
    "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul", "iand", "ior", "ixor",
)


@functools.lru_cache(maxsize=None)
def _function_table() -> tuple[dict[str, Any], dict[int, str]]:
    """(name -> function, id(function) -> name) for every function a saved graph may call."""
    by_name: dict[str, Any] = {}

    def add(name: str, fn: Any) -> None:
        by_name.setdefault(name, fn)

    for namespace, funcs in torch.overrides.get_overridable_functions().items():
        ns = getattr(namespace, "__name__", None)
        if not isinstance(namespace, type(torch)) or not ns or not ns.startswith("torch"):
            continue  # Tensor methods and properties are call_method / getattr, not functions
        for fn in funcs:
            if getattr(fn, "__name__", None):
                add(f"{ns}.{fn.__name__}", fn)
    for name in _OPERATOR_FUNCS:
        add(f"operator.{name}", getattr(operator, name))
    add("builtins.getattr", getattr)
    add("torch._assert", torch._assert)
    # functions registered with torch.fx.wrap: leaves of symbolic tracing
    try:
        from torch.fx import _symbolic_trace as st

        for (_, fname), glob in list(getattr(st, "_wrapped_fns_to_patch", {}).items()):
            module = glob.get("__name__", "")
            fn = glob.get(fname)
            if callable(fn) and module.split(".")[0] in ("torch", "torchvision"):
                add(f"{module}.{fname}", fn)
    except Exception:  # pragma: no cover - private API of torch.fx
        pass
    by_id: dict[int, str] = {}
    for name, fn in by_name.items():
        by_id.setdefault(id(fn), name)
    return by_name, by_id


def _function_name(fn: Any, where: str) -> str:
    _, by_id = _function_table()
    name = by_id.get(id(fn))
    if name is None and getattr(fn, "__module__", "").startswith("torchvision"):
        _function_table.cache_clear()  # a torchvision wrap registered after the table was built
        name = _function_table()[1].get(id(fn))
    if name is None:
        qual = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
        raise SaveError(
            f"cannot save: {where} calls {qual}, which is not in the allow-list of functions a saved "
            "model may call (torch tensor functions, torch.nn.functional, operator, getattr, "
            "torch.fx-wrapped torch/torchvision functions)"
        )
    return name


def _resolve_function(name: str, where: str) -> Any:
    by_name, _ = _function_table()
    if name not in by_name and name.startswith("torchvision."):
        try:
            import torchvision  # noqa: F401  (registers its torch.fx.wrap functions)
        except ImportError as exc:
            raise PleasError(f"{where} calls {name}, which needs torchvision: {exc}") from exc
        _function_table.cache_clear()
        by_name, _ = _function_table()
    if name not in by_name:
        raise PleasError(f"refusing to load: {where} calls {name!r}, which is not in the allow-list of functions")
    return by_name[name]


# ---------------------------------------------------------------- values <-> JSON
def _encode(value: Any, where: str) -> Any:
    """A node argument or constructor argument as JSON. Tagged objects are one-key dicts."""
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, complex):
        return {"complex": [_encode(value.real, where), _encode(value.imag, where)]}
    if isinstance(value, torch.Size):
        return {"size": list(value)}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, where) for v in value]}
    if isinstance(value, list):
        return [_encode(v, where) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise SaveError(f"cannot save: {where} has a dict argument with non-string keys")
        return {"dict": {k: _encode(v, where) for k, v in value.items()}}
    if isinstance(value, slice):
        return {"slice": [_encode(value.start, where), _encode(value.stop, where), _encode(value.step, where)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    raise SaveError(f"cannot save: {where} has an argument of type {type(value).__name__} ({value!r:.80})")


def _torch_attr(name: str, kind: type, where: str) -> Any:
    value = getattr(torch, name, None)
    if not isinstance(value, kind):
        raise PleasError(f"refusing to load: {where} names an unknown torch {kind.__name__} {name!r}")
    return value


def _decode(value: Any, nodes: dict[str, fx.Node] | None, where: str) -> Any:
    if isinstance(value, list):
        return [_decode(v, nodes, where) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) != 1:
        raise PleasError(f"refusing to load: {where} has a malformed value {value!r:.80}")
    (tag, body), = value.items()
    if tag == "node":
        if nodes is None or body not in nodes:
            raise PleasError(f"refusing to load: {where} refers to an unknown node {body!r}")
        return nodes[body]
    if tag == "tuple":
        return tuple(_decode(v, nodes, where) for v in body)
    if tag == "dict":
        return {k: _decode(v, nodes, where) for k, v in body.items()}
    if tag == "float":
        return float(body)
    if tag == "complex":
        return complex(_decode(body[0], nodes, where), _decode(body[1], nodes, where))
    if tag == "size":
        return torch.Size(body)
    if tag == "slice":
        return slice(*(_decode(v, nodes, where) for v in body))
    if tag == "ellipsis":
        return Ellipsis
    if tag == "dtype":
        return _torch_attr(body, torch.dtype, where)
    if tag == "device":
        return torch.device(body)
    if tag == "memory_format":
        return _torch_attr(body, torch.memory_format, where)
    if tag == "layout":
        return _torch_attr(body, torch.layout, where)
    raise PleasError(f"refusing to load: {where} has a value of unknown kind {tag!r}")


# ------------------------------------------------------------------------- modules
def _module_class(cls: type) -> str:
    if cls is nn.Module:
        return "torch.nn.Module"
    if cls.__module__.startswith("torch.nn.modules.") and getattr(nn, cls.__name__, None) is cls:
        return f"torch.nn.{cls.__name__}"
    raise SaveError(
        f"cannot save: submodule class {cls.__module__}.{cls.__qualname__} is not a torch.nn module class "
        "(only torch.nn layers can be rebuilt without the model's own code)"
    )


def _resolve_class(name: str, where: str) -> type:
    prefix = "torch.nn."
    attr = name[len(prefix):] if name.startswith(prefix) else ""
    cls = getattr(nn, attr, None) if attr and "." not in attr else None
    if name == "torch.nn.Module":
        return nn.Module
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__.startswith("torch.nn.modules.")):
        raise PleasError(f"refusing to load: {where} has class {name!r}, which is not a torch.nn module class")
    return cls


# constructor arguments that are not stored under their own name
_SPECIAL_ARGS = {
    nn.MultiheadAttention: lambda m: {"bias": m.in_proj_bias is not None, "add_bias_kv": m.bias_k is not None},
}


def _constructor_args(mod: nn.Module, where: str) -> dict[str, Any]:
    """Constructor arguments of a torch.nn layer, read back from its attributes."""
    special = _SPECIAL_ARGS.get(type(mod), lambda m: {})(mod)
    args: dict[str, Any] = {}
    params = list(inspect.signature(type(mod).__init__).parameters.values())[1:]
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("device", "dtype"):
            continue
        if p.name in special:
            args[p.name] = special[p.name]
        elif p.name in mod._parameters or p.name in mod._buffers:  # bias=True/False
            slots = mod._parameters if p.name in mod._parameters else mod._buffers
            args[p.name] = slots[p.name] is not None
        elif not p.name.startswith("_") and p.name in vars(mod):
            args[p.name] = vars(mod)[p.name]
        elif p.default is p.empty:
            raise SaveError(f"cannot save: {where} ({type(mod).__name__}) has no attribute for its constructor argument {p.name!r}")
    return args


def _public_state(mod: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(mod).items() if not k.startswith("_") and k != "training"}


def _tensor_slots(mod: nn.Module) -> dict[str, Any]:
    slots = {f"parameter {k}": (None if v is None else tuple(v.shape)) for k, v in mod._parameters.items()}
    slots.update({f"buffer {k}": (None if v is None else tuple(v.shape)) for k, v in mod._buffers.items()})
    return slots


def _same(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False


def _construct(cls: type, args: dict[str, Any], where: str) -> nn.Module:
    try:
        with torch.device("meta"):
            return cls(**args)
    except Exception as exc:
        raise PleasError(f"{where}: {cls.__name__}(**{args}) failed: {type(exc).__name__}: {exc}") from exc


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _layer_records(name: str, mod: nn.Module) -> dict[str, dict[str, Any]]:
    """Records of a torch.nn layer (and of the submodules its constructor builds), after
    checking that the constructor arguments read back rebuild it exactly."""
    where = f"submodule {name!r}"
    cls = type(mod)
    class_name = _module_class(cls)
    args = _constructor_args(mod, where)
    encoded = json.loads(json.dumps(_encode(args, where)))
    rebuilt = _construct(cls, _decode(encoded, None, where), where)
    want_tree = dict(mod.named_modules(remove_duplicate=False))
    got_tree = dict(rebuilt.named_modules(remove_duplicate=False))
    if list(want_tree) != list(got_tree) or any(type(want_tree[k]) is not type(got_tree[k]) for k in want_tree):
        raise SaveError(f"cannot save: {where} ({cls.__name__}) has submodules its constructor does not build "
                        f"from {args}: {list(want_tree)[1:]} vs {list(got_tree)[1:]}")
    for sub, orig in want_tree.items():
        copy_ = got_tree[sub]
        label = f"{where}{'.' + sub if sub else ''} ({type(orig).__name__})"
        want, got = _public_state(orig), _public_state(copy_)
        for key in sorted(set(want) | set(got)):
            if key not in want or key not in got or not _same(want[key], got[key]):
                raise SaveError(
                    f"cannot save: {label} cannot be rebuilt from the constructor arguments {args}: attribute "
                    f"{key!r} is {want.get(key, '<missing>')!r}, rebuilt {got.get(key, '<missing>')!r}"
                )
        if _tensor_slots(orig) != _tensor_slots(copy_):
            raise SaveError(f"cannot save: {label} cannot be rebuilt from {args}: its tensors "
                            f"{_tensor_slots(orig)} differ from the rebuilt {_tensor_slots(copy_)}")
    records = {name: {"class": class_name, "args": encoded, "training": mod.training}}
    for sub, child in mod.named_modules(remove_duplicate=False):
        if sub:
            records[f"{name}.{sub}"] = {"class": _class_path(type(child)), "built_by": name, "training": child.training}
    return records


def _module_records(gm: fx.GraphModule, called: set[str]) -> dict[str, dict[str, Any]]:
    records: dict[str, dict[str, Any]] = {}
    for name, mod in gm.named_modules(remove_duplicate=False):
        if not name or name in records:
            continue
        if type(mod) is nn.Module or (isinstance(mod, _CONTAINERS) and name not in called):
            records[name] = {"class": "torch.nn.Module", "training": mod.training}
        elif isinstance(mod, _CONTAINERS):
            records[name] = {"class": _module_class(type(mod)), "training": mod.training}
        else:
            records.update(_layer_records(name, mod))
    return records


# ---------------------------------------------------------------------------- graph
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


class _ShapeRecorder(fx.Interpreter):
    """Runs a graph (on meta tensors) and records every node's output shape."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.shapes[n.name] = _value_shape(result)
        return result


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


# ------------------------------------------------------------------------------ save
def _code_file_text(class_name: str, code: str) -> str:
    """model.py: the generated forward code, as a method of a class named like the model."""
    header = (
        f"# Generated by torch.fx for a model saved by pleas_fx ({FORMAT}).\n"
        "# pleas_fx.load() rebuilds the fx graph from graph.json (allow-listed torch.nn modules and\n"
        "# torch functions only), and torch.fx executes the forward code it generates from that graph:\n"
        "# the code below. This file is for reading; load() never executes it.\n"
        "import torch\n\n\n"
        f"class {class_name}(torch.nn.Module):\n"
    )
    body = "\n".join(("    " + line) if line.strip() else "" for line in code.strip("\n").splitlines())
    return header + body + "\n"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp_dir(final: Path, suffix: str = ".partial") -> Path:
    """A new folder next to `final` (same file system, so a rename publishes it), with the
    permissions a plain mkdir would give (mkdtemp's are owner-only)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=suffix, dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename the finished folder `tmp` to `final`, replacing an existing `final` as a whole."""
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
        os.replace(final, old / "previous")
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old / "previous", final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    return str(obj)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, default=_json_default, allow_nan=True) + "\n")


def _write_graph_json(path: Path, doc: dict[str, Any]) -> None:
    """graph.json with one line per module, tensor and node, to be read by people too."""
    def one(v: Any) -> str:
        return json.dumps(v, separators=(", ", ": "), allow_nan=True)

    lines = ["{"]
    items = list(doc.items())
    for i, (key, value) in enumerate(items):
        comma = "," if i < len(items) - 1 else ""
        if isinstance(value, dict) and value and key in ("modules", "tensors"):
            inner = [f"  {one(k)}: {one(v)}" for k, v in value.items()]
            lines.append(f" {one(key)}: {{\n " + ",\n ".join(inner) + f"\n }}{comma}")
        elif isinstance(value, list) and value and key == "graph":
            lines.append(f" {one(key)}: [\n  " + ",\n  ".join(one(v) for v in value) + f"\n ]{comma}")
        else:
            lines.append(f" {one(key)}: {one(value)}{comma}")
    lines.append("}")
    path.write_text("\n".join(lines) + "\n")


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


def save(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False, example_input: Any = None) -> Path:
    """Write `model` (a merged GraphModule, or any torch.fx-traceable module) to the folder `path`.

    The folder holds model.py (the generated code, for reading), graph.json (module tree and
    fx graph), weights.safetensors and report.json (merged.meta["pleas_fx"]). It is written
    into a temporary folder next to `path` and renamed at the end, so `path` is never left
    half-written. An existing non-empty `path` is replaced only with `overwrite=True`.
    `example_input` (optional) records input and node shapes for models that have none.

    Raises SaveError when a submodule or a function is outside what load() may rebuild.
    Returns the folder's path.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty (pass overwrite=True to replace it)")
    doc, weights, generated, report = _serialise(model, example_input)

    # the code load() will execute: regenerated from the serialised graph, byte for byte
    graph = _build_graph(doc["graph"], set(doc["modules"]), set(doc["tensors"]))
    code = graph.python_code(root_module="self").src
    if code != generated:
        log.warning("the code regenerated from the saved graph differs from the model's own code; "
                    "model.py holds the regenerated code, which is what load() runs")

    if doc["inputs"] and all(isinstance(i, dict) for i in doc["inputs"]):
        try:
            shapes = _run_on_meta(doc, weights, "the model")
        except NotImplementedError as exc:  # an op without a meta kernel: no shape records
            log.debug("no shape records: %s", exc)
            shapes = None
        except Exception as exc:
            if example_input is not None:
                raise SaveError(f"cannot save: the model fails on example_input: {_first_lines(exc)}") from exc
            log.debug("no shape records (stale shape metadata?): %s", exc)
            shapes = None
        for rec, shape in zip(doc["graph"], shapes or []):
            if shape is not None:
                rec["output"] = shape
    else:
        shapes = None
    if shapes is None:
        doc["inputs"] = None

    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(path)
    try:
        (tmp / CODE_FILE).write_text(_code_file_text(doc["class_name"], code))
        _write_graph_json(tmp / GRAPH_FILE, doc)
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "pleas_fx": FORMAT})
        os.chmod(tmp / WEIGHTS_FILE, 0o666 & ~_umask())
        _write_json(tmp / REPORT_FILE, report)
        publish_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# ------------------------------------------------------------------------------ load
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PleasError(f"{path.parent} is not a saved pleas_fx model: {path.name} is missing") from None
    except json.JSONDecodeError as exc:
        raise PleasError(f"{path} is not valid JSON: {exc}") from None


def _set_tensor(root: nn.Module, name: str, tensor: torch.Tensor, rec: dict[str, Any]) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    if rec["kind"] == "parameter":
        if not isinstance(tensor, nn.Parameter):
            tensor = nn.Parameter(tensor, requires_grad=bool(rec.get("requires_grad", True)))
        owner._parameters[leaf] = tensor
    else:
        persistent = rec.get("persistent", True)
        if leaf in owner._buffers:
            owner._buffers[leaf] = tensor
            if not persistent:
                owner._non_persistent_buffers_set.add(leaf)
        else:
            owner.register_buffer(leaf, tensor, persistent=persistent)


def _shape_str(shape: Any) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def _build_modules(doc: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> nn.Module:
    """The module tree of graph.json with `tensors` in place; checks every tensor against the
    shape its module needs."""
    root = nn.Module()
    built: dict[str, nn.Module] = {"": root}
    for name, rec in doc["modules"].items():
        where = f"submodule {name!r}"
        if not isinstance(rec, dict):
            raise PleasError(f"refusing to load: {where} has a malformed record")
        parent, _, leaf = name.rpartition(".")
        if "built_by" in rec:  # built by its layer's constructor
            mod = built.get(name)
            if mod is None or _class_path(type(mod)) != rec.get("class") or not name.startswith(f"{rec['built_by']}."):
                raise PleasError(f"refusing to load: {where} ({rec.get('class')}) is not what the constructor "
                                 f"of {rec['built_by']!r} builds")
            mod.training = bool(rec.get("training", False))
            continue
        cls = _resolve_class(rec.get("class", ""), where)
        args = _decode(rec.get("args", {"dict": {}}), None, where)
        if not isinstance(args, dict):
            raise PleasError(f"refusing to load: {where} has malformed constructor arguments")
        mod = nn.Module() if cls is nn.Module else _construct(cls, args, where)
        mod.train(bool(rec.get("training", False)))
        if parent not in built or parent in doc["modules"] and "built_by" in doc["modules"][parent]:
            raise PleasError(f"refusing to load: {where} comes before its parent {parent!r} in graph.json")
        built[parent].add_module(leaf, mod)
        for sub, child in mod.named_modules(remove_duplicate=False):
            built[f"{name}.{sub}" if sub else name] = child
    root.train(bool(doc.get("training", False)))

    records = doc["tensors"]
    for name, rec in records.items():
        if "alias_of" in rec:
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = built.get(owner_name)
        if owner is None:
            raise PleasError(f"refusing to load: tensor {name!r} belongs to an undefined submodule {owner_name!r}")
        t = tensors[name]
        slot = owner._parameters.get(leaf) if leaf in owner._parameters else owner._buffers.get(leaf)
        needed = tuple(slot.shape) if slot is not None else tuple(rec["shape"])
        if tuple(t.shape) != needed:
            what = (f"module {owner_name!r} ({type(owner).__name__}{'(' + owner.extra_repr() + ')'})"
                    if slot is not None else "graph.json")
            raise WeightError(
                f"weights do not match the model code: {source} has {name} with shape {_shape_str(t.shape)}, "
                f"but {what} needs {_shape_str(needed)}"
            )
        if str(t.dtype).removeprefix("torch.") != rec["dtype"]:
            raise WeightError(f"weights do not match graph.json: {source} has {name} as {t.dtype}, graph.json says {rec['dtype']}")
        _set_tensor(root, name, t, rec)
    for name, rec in records.items():
        if "alias_of" in rec:
            target = rec["alias_of"]
            if target not in tensors:
                raise PleasError(f"refusing to load: tensor {name!r} is an alias of the unknown tensor {target!r}")
            _set_tensor(root, name, root.get_parameter(target) if records[target]["kind"] == "parameter"
                        else root.get_buffer(target), rec)
    # every tensor slot of a rebuilt layer must have been filled from the file
    for mod_name, mod in built.items():
        for kind, slots in (("parameter", mod._parameters), ("buffer", mod._buffers)):
            for leaf, t in slots.items():
                if t is not None and (f"{mod_name}.{leaf}" if mod_name else leaf) not in records:
                    full = f"{mod_name}.{leaf}" if mod_name else leaf
                    raise WeightError(f"weights do not match the model code: {kind} {full} of module "
                                      f"{mod_name!r} ({type(mod).__name__}) is missing from {source}")
    return root


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


def load(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> fx.GraphModule:
    """Rebuild the GraphModule saved in the folder `path` (see this module's docstring for
    what is executed). Needs neither the source models' classes nor pleas_fx's passes.

    The result is in the mode it was saved in (eval for merged models), on `map_location`,
    with the merge report in `gm.meta["pleas_fx"]`.

    Raises WeightError when weights.safetensors does not fit the code (naming the tensor),
    PleasError when the folder is not a saved model or names something outside the allow-list.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no saved model at {path}: not a folder")
    doc = _read_json(path / GRAPH_FILE)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise PleasError(f"{path / GRAPH_FILE} is not a {FORMAT} file (format: "
                         f"{doc.get('format') if isinstance(doc, dict) else None!r})")
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise PleasError(f"{path} is not a saved pleas_fx model: {WEIGHTS_FILE} is missing")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights_path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightError(f"cannot read {weights_path}: {exc}") from exc
    # fresh, aligned storage: tensors viewing the file's buffer can be misaligned, and CPU
    # kernels may then take a different (not bit-identical) code path
    tensors = {k: v.clone() for k, v in tensors.items()}
    source = str(weights_path)
    expected = {k for k, r in doc["tensors"].items() if "alias_of" not in r}
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
        raise WeightError(f"weights do not match the model code: {source}: {'; '.join(parts)}")

    gm = _graph_module(doc, tensors, source)
    _check_shapes(doc, tensors, source)
    code_file = path / CODE_FILE
    if code_file.is_file() and code_file.read_text() != _code_file_text(gm.__class__.__name__, gm.code):
        log.warning("%s differs from the code regenerated from graph.json; the regenerated code is what "
                    "runs (model.py is documentation only)", code_file)
    report_file = path / REPORT_FILE
    if report_file.is_file():
        report = _read_json(report_file)
        if report:
            gm.meta["pleas_fx"] = report
    return gm
