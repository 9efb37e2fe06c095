"""What a saved model may call, and the resolution of saved names: the allow-list of functions
(torch tensor functions, operator, getattr, torch.fx-wrapped torch/torchvision functions,
pleas_fx's own shifted-window steps of a lowered Swin attention, pleas_fx.core.windows) and
of submodule classes (torch.nn layers, and pleas_fx's own block layers, pleas_fx.core.layers). Saving maps objects to names, loading names back to
objects, and refuses anything else: this is what keeps load() from running foreign code."""
from __future__ import annotations

import functools
import operator
from typing import Any

import torch
import torch.nn as nn

from pleas_fx.core.errors import PleasError
from pleas_fx.core.layers import BLOCK_LAYERS
from pleas_fx.core.windows import WINDOW_FUNCTIONS
from pleas_fx.io.errors import SaveError


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
    for fn in WINDOW_FUNCTIONS:  # a lowered Swin attention's token moves (passes/lower_windows.py)
        add(f"pleas_fx.core.windows.{fn.__name__}", fn)
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


# ------------------------------------------------------------------- allow-listed classes
_BLOCK_LAYERS = {f"pleas_fx.core.layers.{cls.__name__}": cls for cls in BLOCK_LAYERS}


def _module_class(cls: type) -> str:
    if cls is nn.Module:
        return "torch.nn.Module"
    if cls in BLOCK_LAYERS:  # the merged model's block layers (pleas_fx.core.layers)
        return f"pleas_fx.core.layers.{cls.__name__}"
    if cls.__module__.startswith("torch.nn.modules.") and getattr(nn, cls.__name__, None) is cls:
        return f"torch.nn.{cls.__name__}"
    raise SaveError(
        f"cannot save: submodule class {cls.__module__}.{cls.__qualname__} is not a torch.nn module class "
        "(only torch.nn layers can be rebuilt without the model's own code)"
    )


def _resolve_class(name: str, where: str) -> type:
    if name in _BLOCK_LAYERS:
        return _BLOCK_LAYERS[name]
    prefix = "torch.nn."
    attr = name[len(prefix):] if name.startswith(prefix) else ""
    cls = getattr(nn, attr, None) if attr and "." not in attr else None
    if name == "torch.nn.Module":
        return nn.Module
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__.startswith("torch.nn.modules.")):
        raise PleasError(f"refusing to load: {where} has class {name!r}, which is not a torch.nn module class")
    return cls
