"""The inspect command: show the permutation groups pleas_fx infers for a model.

    pleas-fx inspect resnet18 --input-shape 1,3,64,64 --check
    python tools/inspect_groups.py my_pkg.models:build_net --input-shape 2,16 --json report.json
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
from typing import Any, Sequence

import torch

from pleas_fx.apps.checkpoints import build_model
from pleas_fx.apps.output import error, say
from pleas_fx.core.errors import one_line
from pleas_fx.inspection import DEFAULT_TOLERANCE, check_groups, report_from_spec, shape_propagate
from pleas_fx.passes.infer_groups import infer_groups
from pleas_fx.passes.trace import trace_model


def _parse_shape(text: str) -> list[int]:
    try:
        shape = [int(x) for x in re.split(r"[,x ]+", text.strip()) if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"input shape must be integers like 1,3,64,64, got {text!r}")
    if not shape or any(n <= 0 for n in shape):
        raise argparse.ArgumentTypeError(f"input shape must be positive integers like 1,3,64,64, got {text!r}")
    return shape


def _parse_kw(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--kw takes KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key.strip(), value


def build_parser(prog: str = "inspect_groups") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Show the permutation groups pleas_fx infers for a model: what a merge would "
                    "merge, and which hidden axes it must leave frozen, and why.",
    )
    p.add_argument("model", metavar="MODEL",
                   help="a torchvision or timm model name, or package.module:factory for your own model")
    p.add_argument("--input-shape", action="append", type=_parse_shape, metavar="SHAPE",
                   help="example input shape, e.g. 1,3,64,64 (default 1,3,224,224); repeat for several inputs")
    p.add_argument("--input-dtype", default="float32", choices=["float32", "float64", "long"],
                   help="dtype of the generated example input (long: token ids in [0, 10))")
    p.add_argument("--num-classes", type=int, default=None, help="passed to the model constructor")
    p.add_argument("--kw", action="append", type=_parse_kw, default=[], metavar="KEY=VALUE",
                   help="extra keyword argument for the model constructor (Python literal), repeatable")
    p.add_argument("--source", default="auto", choices=["auto", "torchvision", "timm", "factory"],
                   help="where MODEL comes from (auto: factory if it contains ':', else torchvision, else timm)")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="write the report as JSON to PATH ('-': print JSON instead of the text)")
    p.add_argument("--check", action="store_true",
                   help="self-test: permute every group at random and report the max output deviation")
    p.add_argument("--seeds", type=int, default=1, help="random permutations tried by --check")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="max relative deviation --check accepts")
    p.add_argument("--check-dtype", default="auto", choices=["auto", "float32", "float64"],
                   help="precision of --check (auto: float64 up to 100M parameters, else float32)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    return p


def load_model(spec: str, source: str = "auto", num_classes: int | None = None, **kwargs: Any) -> torch.nn.Module:
    """Build a model with random weights (never downloads any): a torchvision name, a timm
    name, or `package.module:factory` (pleas_fx.apps.checkpoints.build_model)."""
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return build_model(spec, kwargs, source)


def _example_inputs(shapes: list[list[int]], dtype: str) -> tuple:
    gen = torch.Generator().manual_seed(0)
    if dtype == "long":
        return tuple(torch.randint(0, 10, s, generator=gen) for s in shapes)
    dt = torch.float64 if dtype == "float64" else torch.float32
    return tuple(torch.randn(s, generator=gen, dtype=dt) for s in shapes)


def main(argv: Sequence[str] | None = None, prog: str = "inspect_groups") -> int:
    """The inspect tool. Returns the exit code: 0 fine, 1 --check failed, 2 the model could
    not be built, traced or analysed (one line on stderr)."""
    args = build_parser(prog).parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = args.input_shape or [[1, 3, 224, 224]]

    def fail(stage: str, exc: BaseException) -> int:
        if args.traceback:
            raise exc
        error(f"{prog}: error: {args.model}: {stage}: {one_line(exc, 600)}")
        return 2

    try:
        model = load_model(args.model, args.source, args.num_classes, **dict(args.kw))
        model.eval()
    except Exception as exc:
        return fail("cannot build the model", exc)
    n_params = sum(p.numel() for p in model.parameters())
    inputs = _example_inputs(shapes, args.input_dtype)
    try:
        gm = trace_model(model, args.model)
        del model
        shape_propagate(gm, inputs)
    except Exception as exc:
        return fail("cannot trace", exc)
    try:
        spec = infer_groups(gm)
        report = report_from_spec(spec, args.model, shapes, gm)
    except Exception as exc:
        return fail("group inference failed", exc)
    if args.check:
        dtype = {"float32": torch.float32, "float64": torch.float64}.get(args.check_dtype)
        if dtype is None:
            dtype = torch.float64 if n_params <= 100_000_000 else torch.float32
        try:
            report.check = check_groups(gm, spec, inputs, seeds=args.seeds, tolerance=args.tolerance,
                                        dtype=dtype, inplace=True)
        except Exception as exc:
            return fail("--check failed to run", exc)
    if args.json == "-":
        say(report.to_json())
    else:
        say(str(report))
        if args.json:
            with open(args.json, "w") as fh:
                fh.write(report.to_json() + "\n")
    return 1 if report.check is not None and not report.check.passed else 0


if __name__ == "__main__":  # python -m pleas_fx.apps.inspect_command
    sys.exit(main())
