"""Node arguments, constructor arguments and constants as JSON values, and back: plain JSON
for numbers, strings and lists, one-key tagged dicts for tuples, slices, dtypes, devices,
references to other nodes and the like. Decoding builds only these values (a dtype, memory
format or layout must be one of torch's), never other objects named by the file."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from pleas_fx.core.errors import PleasError
from pleas_fx.io.errors import SaveError


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
