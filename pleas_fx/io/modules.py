"""The module tree of a saved model: graph.json's record of every submodule (its torch.nn class
and the constructor arguments read back from it, checked to rebuild it exactly) and, on load,
the tree rebuilt from those records with the saved tensors put in place, each checked against
the shape its module needs."""
from __future__ import annotations

import inspect
import json
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from pleas_fx.core.errors import PleasError, WeightError
from pleas_fx.core.layers import BLOCK_LAYERS
from pleas_fx.io.allowlist import _module_class, _resolve_class
from pleas_fx.io.codec import _decode, _encode
from pleas_fx.io.errors import SaveError

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


# ------------------------------------------------------------------------- records
# constructor arguments that are not stored under their own name
_SPECIAL_ARGS = {
    nn.MultiheadAttention: lambda m: {"bias": m.in_proj_bias is not None, "add_bias_kv": m.bias_k is not None},
    **{cls: (lambda m: {"bias": any(getattr(m, f"bias_{k}") is not None for k in "asb")}) for cls in BLOCK_LAYERS},
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


# ----------------------------------------------------------------------- rebuilding
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
