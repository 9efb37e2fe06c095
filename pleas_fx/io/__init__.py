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
  ``torch.nn.Module``) or one of pleas_fx's block layers (``pleas_fx.core.layers.BlockLinear``,
  ``BlockConv``: a merged layer's structural blocks); its constructor arguments are plain JSON
  values;
* the fx graph is rebuilt node by node with ``torch.fx.Graph.create_node``. A
  ``call_function`` target must be in an allow-list: the tensor functions of ``torch``,
  ``torch.nn.functional``, ``torch.linalg``, ``torch.fft`` and ``torch.special`` (those
  ``torch.overrides`` reports as tensor operations), the ``operator`` module's arithmetic,
  comparison and indexing functions, ``getattr`` and ``torch._assert``, and the
  ``torch.fx.wrap``-ped functions of torch and torchvision (such as
  ``torchvision.ops.stochastic_depth``), and pleas_fx's shifted-window steps
  (``pleas_fx.core.windows``: a lowered Swin attention's padding, shift and windows). ``call_method`` and ``getattr`` names must be public
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

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from pleas_fx.core.errors import PleasError, WeightError
from pleas_fx.io.errors import SaveError
from pleas_fx.io.files import (
    CODE_FILE,
    FORMAT,
    GRAPH_FILE,
    REPORT_FILE,
    WEIGHTS_FILE,
    _code_file_text,
    _read_json,
    _umask,
    _write_graph_json,
    _write_json,
    make_temp_dir,
    publish_dir,
)
from pleas_fx.io.graph import _build_graph, _check_shapes, _first_lines, _graph_module, _run_on_meta, _serialise

log = logging.getLogger("pleas_fx")

__all__ = ["save", "load", "SaveError", "FORMAT"]


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
