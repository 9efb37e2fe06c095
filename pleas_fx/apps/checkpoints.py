"""Models by name and checkpoints from files, for the command line.

A model is named as a torchvision model (``resnet18``), a timm model (``convnext_atto``), or a
factory ``package.module:function`` called with keyword arguments only. A checkpoint is a
state dict saved with ``torch.save`` (.pt, .pth, .bin; read with ``weights_only=True``, so no
pickled code runs) or a ``.safetensors`` file.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any, Mapping

import torch

from pleas_fx.core.errors import PleasError

log = logging.getLogger("pleas_fx")

__all__ = ["ModelError", "CheckpointError", "build_model", "read_checkpoint", "load_checkpoint"]

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")


class ModelError(PleasError):
    """The model name does not name a model that can be built."""


class CheckpointError(PleasError):
    """A checkpoint cannot be read, or does not fit the model."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def build_model(spec: str, kwargs: Mapping[str, Any] | None = None, source: str = "auto") -> torch.nn.Module:
    """Build the model named by `spec` with `kwargs` (randomly initialised; no weights are downloaded).

    `spec` is ``package.module:factory`` (the factory is called with ``**kwargs``; a module
    instance there is taken as it is), else a torchvision model name
    (``torchvision.models.get_model(spec, weights=None, **kwargs)``), else a timm model name
    (``timm.create_model(spec, pretrained=False, **kwargs)``). `source` ("auto", "factory",
    "torchvision" or "timm") restricts where the name is looked up.
    """
    kwargs = dict(kwargs or {})
    if source == "factory" or (source == "auto" and ":" in spec):
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise ModelError(f"model {spec!r}: expected package.module:factory")
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError as exc:
            raise ModelError(f"model {spec!r}: cannot import {module_name!r}: {_first_line(exc)}") from exc
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise ModelError(f"model {spec!r}: {module_name} has no attribute {attr!r}")
            obj = getattr(obj, part)
        source = spec
        if isinstance(obj, torch.nn.Module):
            model = obj
        elif not callable(obj):
            raise ModelError(f"model {spec!r}: {attr} is not callable")
        else:
            try:
                model = obj(**kwargs)
            except Exception as exc:
                raise ModelError(f"model {spec!r}: {attr}(**{kwargs}) failed: {_first_line(exc)}") from exc
    else:
        model, source = _named_model(spec, kwargs, source)
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"model {spec!r}: {source} returned a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def _named_model(name: str, kwargs: dict[str, Any], source: str = "auto") -> tuple[torch.nn.Module, str]:
    torchvision = timm = None
    if source in ("auto", "torchvision"):
        try:
            import torchvision
        except ImportError:
            pass
    if torchvision is not None and name in torchvision.models.list_models():
        try:
            return torchvision.models.get_model(name, weights=None, **kwargs), f"torchvision.models.{name}"
        except Exception as exc:
            raise ModelError(f"model {name!r}: torchvision.models.{name}(**{kwargs}) failed: {_first_line(exc)}") from exc
    if source in ("auto", "timm"):
        try:
            import timm
        except ImportError:
            pass
    if timm is not None and timm.is_model(name):
        try:
            return timm.create_model(name, pretrained=False, **kwargs), f"timm model {name}"
        except Exception as exc:
            raise ModelError(f"model {name!r}: timm.create_model({name!r}, **{kwargs}) failed: {_first_line(exc)}") from exc
    where = {"torchvision": "a torchvision model name", "timm": "a timm model name"}.get(
        source, f"a torchvision{'' if torchvision else ' (not installed)'} or timm{'' if timm else ' (not installed)'} "
                "model name, nor package.module:factory")
    raise ModelError(f"unknown model {name!r}: not {where}")


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch.save file (weights_only=True).

    A dict that wraps the state dict under one of the usual keys ("state_dict", "model", ...)
    is unwrapped."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path), device="cpu")
        except Exception as exc:
            raise CheckpointError(f"cannot read checkpoint {path} as safetensors: {_first_line(exc)}") from exc
    elif suffix in TORCH_SUFFIXES:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            hint = " (a pickled model object is refused: save model.state_dict() instead)" if "weights_only" in str(exc).lower() or "weights only" in str(exc).lower() else ""
            raise CheckpointError(f"cannot read checkpoint {path} with torch.load(weights_only=True): "
                                  f"{_first_line(exc)}{hint}") from exc
    else:
        raise CheckpointError(f"checkpoint {path}: unknown format {suffix or '(no suffix)'!r}; "
                              f"use .safetensors or a torch.save state dict ({', '.join(TORCH_SUFFIXES)})")
    for _ in range(3):  # unwrap {"state_dict": {...}, "epoch": ...}
        if isinstance(state, Mapping) and not any(torch.is_tensor(v) for v in state.values()):
            inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
            if inner is None:
                break
            state = inner
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    bad = [k for k, v in state.items() if not torch.is_tensor(v)]
    if bad or not state:
        raise CheckpointError(f"checkpoint {path} is not a state dict of tensors"
                              + (f": {bad[0]!r} is a {type(state[bad[0]]).__name__}" if bad else " (it is empty)"))
    return dict(state)


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _listed(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_checkpoint(model: torch.nn.Module, path: str | Path, *, label: str = "checkpoint",
                    model_name: str | None = None) -> torch.nn.Module:
    """Load the checkpoint at `path` into `model` (strictly), or raise CheckpointError naming
    the first few missing, unexpected and wrongly shaped keys."""
    state = read_checkpoint(path)
    expected = model.state_dict()
    if (not any(k in expected for k in state) and all(k.startswith("module.") for k in state)):
        state = {k[len("module."):]: v for k, v in state.items()}  # saved from DataParallel
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("shape mismatches: " + ", ".join(
                f"{k} is {_shape(state[k])} in the checkpoint, {_shape(expected[k])} in the model" for k in wrong[:3])
                + (f" (+{len(wrong) - 3} more)" if len(wrong) > 3 else ""))
        if missing:
            parts.append(f"missing keys: {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listed(unexpected)}")
        raise CheckpointError(f"{label} {path} does not fit model {model_name or type(model).__name__}: " + "; ".join(parts))
    try:
        model.load_state_dict(state, strict=True)
    except Exception as exc:
        raise CheckpointError(f"{label} {path} does not fit model {model_name or type(model).__name__}: {_first_line(exc)}") from exc
    return model.eval()
