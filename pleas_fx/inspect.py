"""What the compiler inferred, in a form a user can read before trusting a merge.

`describe_groups(model, example_input)` traces a model, runs group inference and returns a
`GroupReport`: one entry per mergeable permutation group (its size, structure, parameter axes
and activation sites), the hidden axes that were frozen with the op and reason that froze them,
and a summary. `str(report)` is the text the `inspect` tool prints; `to_json()`/`from_json()`
round-trip exactly. `check_groups` is the group-soundness self-test: randomly permute every
group of a model and measure how far its output moves (it should not move at all).

Command line (also `pleas-fx inspect ...`, which dispatches to `main`):

    python tools/inspect_groups.py resnet18 --input-shape 1,3,64,64 --check
    python tools/inspect_groups.py my_pkg.models:build_net --input-shape 2,16 --json report.json
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import io
import json
import re
import sys
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx

from pleas_fx.data import as_args
from pleas_fx.errors import PleasError, TraceError, one_line
from pleas_fx.ir import Group, GroupSpec, Layout
from passes.infer_groups import STRUCTURAL, infer_groups, tensor_layouts
from passes.trace import getattr_path, propagate_shapes, trace_model
from passes.verify import permute_model, random_permutations, relative_error

# Frozen groups whose reasons include one of these could never be permuted by any merge
# (network input/output, batch, spatial, kernel, ... axes, and parameters the graph never
# reads); they are not hidden units. Every other frozen group is a limitation worth reporting.
STRUCTURAL_REASONS = tuple(STRUCTURAL) + ("not used by the traced graph",)

DEFAULT_TOLERANCE = 1e-4


# --------------------------------------------------------------------------- the report
@dataclass
class ParamEntry:
    """One parameter (or buffer) axis in a group: `segment` says where the group sits on it
    ("plain", or e.g. "segment 2/3 [64:128]", "inner=16")."""

    name: str
    axis: int
    role: str
    segment: str


@dataclass
class SiteEntry:
    """An activation whose axis is exactly this group (where activation matching measures)."""

    node: str
    axis: int


@dataclass
class WithinEntry:
    """A within group of a mergeable group: `size` entries inside every unit (a head's
    head_dim), permuted unit by unit (live), or kept in place (frozen, with the reason)."""

    id: int
    size: int
    frozen: bool
    reasons: list[str] = field(default_factory=list)
    sites: list[SiteEntry] = field(default_factory=list)  # where unit x entry costs are measured


@dataclass
class GroupEntry:
    id: int
    size: int
    structure: str
    params: list[ParamEntry] = field(default_factory=list)
    sites: list[SiteEntry] = field(default_factory=list)
    within: list[WithinEntry] = field(default_factory=list)


@dataclass
class FrozenReason:
    where: str  # fx node whose op froze the axis ("" when the reason does not name one)
    reason: str


@dataclass
class FrozenEntry:
    """A frozen group of hidden units: kept at identity (plain averaging) by every merge."""

    id: int
    size: int
    structure: str
    reasons: list[FrozenReason] = field(default_factory=list)
    params: list[ParamEntry] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)  # activations "node[axis]" carrying the group


@dataclass
class CheckResult:
    """Group-soundness self-test: max relative output deviation over `seeds` random
    permutations of every mergeable group (BatchNorm statistics and constant-initialised
    parameters randomised first, so that a wrong group shows)."""

    max_deviation: float
    tolerance: float
    seeds: int
    dtype: str
    passed: bool


@dataclass
class GroupReport:
    model: str
    input_shapes: list[list[int]]
    groups: list[GroupEntry]
    frozen: list[FrozenEntry]
    n_groups: int  # mergeable groups
    mergeable_units: int
    frozen_hidden_units: int
    share_mergeable: float  # mergeable / (mergeable + frozen hidden)
    n_structural_groups: int  # frozen groups that are not hidden units (not listed)
    frozen_by_reason: dict[str, int]  # reason (location stripped) -> hidden units it froze first
    check: CheckResult | None = None

    # -- JSON
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict) -> "GroupReport":
        params = lambda items: [ParamEntry(**p) for p in items]
        return cls(
            model=d["model"],
            input_shapes=[list(s) for s in d["input_shapes"]],
            groups=[
                GroupEntry(g["id"], g["size"], g["structure"], params(g["params"]), [SiteEntry(**s) for s in g["sites"]],
                           [WithinEntry(w["id"], w["size"], w["frozen"], list(w["reasons"]),
                                        [SiteEntry(**s) for s in w["sites"]]) for w in g.get("within", [])])
                for g in d["groups"]
            ],
            frozen=[
                FrozenEntry(f["id"], f["size"], f["structure"], [FrozenReason(**r) for r in f["reasons"]],
                            params(f["params"]), list(f["nodes"]))
                for f in d["frozen"]
            ],
            n_groups=d["n_groups"],
            mergeable_units=d["mergeable_units"],
            frozen_hidden_units=d["frozen_hidden_units"],
            share_mergeable=d["share_mergeable"],
            n_structural_groups=d["n_structural_groups"],
            frozen_by_reason=dict(d["frozen_by_reason"]),
            check=CheckResult(**d["check"]) if d.get("check") is not None else None,
        )

    @classmethod
    def from_json(cls, text: str) -> "GroupReport":
        return cls.from_dict(json.loads(text))

    # -- text
    def summary_lines(self) -> list[str]:
        hidden = self.mergeable_units + self.frozen_hidden_units
        lines = [
            f"summary: {self.n_groups} mergeable groups, {self.mergeable_units} of {hidden} hidden units "
            f"mergeable ({100 * self.share_mergeable:.1f}%), {len(self.frozen)} frozen hidden groups "
            f"({self.frozen_hidden_units} units), {self.n_structural_groups} structural groups not shown"
        ]
        for reason, units in sorted(self.frozen_by_reason.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  frozen {units} units: {reason}")
        if self.check is not None:
            c = self.check
            verdict = "PASS" if c.passed else "FAIL"
            lines.append(
                f"check: max relative deviation {c.max_deviation:.3e} over {c.seeds} random permutation(s) "
                f"of every group ({c.dtype}; tolerance {c.tolerance:g}): {verdict}"
            )
        return lines

    def __str__(self) -> str:
        shapes = ", ".join("x".join(map(str, s)) for s in self.input_shapes)
        out = [f"{self.model}  input {shapes}", ""]
        out.append(f"mergeable groups ({self.n_groups}):")
        for g in self.groups:
            out.append(f"  group {g.id}  size {g.size}  {g.structure}")
            out.extend(_wrapped("params", [_param_text(p) for p in g.params]))
            out.extend(_wrapped("sites", [f"{s.node}[{s.axis}]" for s in g.sites]))
            for w in g.within:
                state = "FROZEN: " + "; ".join(w.reasons) if w.frozen else "permuted unit by unit"
                out.append(f"    within group {w.id}  {w.size} entries per unit  {state}")
                out.extend(_wrapped("  sites", [f"{s.node}[{s.axis}]" for s in w.sites]))
        if self.frozen:
            out.append("")
            out.append(f"frozen hidden groups ({len(self.frozen)}):")
            for f in self.frozen:
                out.append(f"  group {f.id}  size {f.size}  {f.structure}  FROZEN")
                for r in f.reasons:
                    named = f" at {r.where} (" in r.reason
                    out.append(f"    reason: {r.reason}" + (f"  [at {r.where}]" if r.where and not named else ""))
                out.extend(_wrapped("params", [_param_text(p) for p in f.params]))
                if not f.params:
                    out.extend(_wrapped("nodes", f.nodes))
        out.append("")
        out.extend(self.summary_lines())
        return "\n".join(out)


def _param_text(p: ParamEntry) -> str:
    notes = [n for n in ("in" if p.role == "in" else "", "" if p.segment == "plain" else p.segment) if n]
    return f"{p.name}[{p.axis}]" + (f" ({'; '.join(notes)})" if notes else "")


def _wrapped(label: str, items: list[str], width: int = 110) -> list[str]:
    if not items:
        return [f"    {label}: -"]
    return textwrap.wrap(", ".join(items), width=width, initial_indent=f"    {label}: ",
                         subsequent_indent=" " * (len(label) + 6), break_on_hyphens=False,
                         break_long_words=False)


# --------------------------------------------------------------------------- building it
def is_hidden(group: Group, non_float: frozenset[str] | set[str] = frozenset()) -> bool:
    """Whether a group is hidden units a merge could act on: it carries at least one axis
    of a floating-point parameter or buffer (an integer tensor such as an attention's
    relative-position index, named in `non_float`, is never a feature) and, if frozen, no
    reason saying it could never be permuted (network input/output, batch, spatial, kernel,
    ... see STRUCTURAL_REASONS). A frozen axis that touches no parameter (e.g. the spatial
    axes after an op without a handler) is not one."""
    if not any(p.name not in non_float for p in group.params):
        return False
    return not group.frozen or not any(r.startswith(STRUCTURAL_REASONS) for r in group.reasons)


def reason_kind(reason: str) -> str:
    """A frozen reason without its location, for aggregating over a model."""
    kind = re.sub(r" at [A-Za-z_]\w* \(.*\)$", "", reason)
    kind = re.sub(r"^(no handler for module \w+) \(.*\)$", r"\1", kind)
    kind = re.sub(r" \(\[[^\]]*\] -> \[[^\]]*\]\)", "", kind)
    kind = re.sub(r" \[[\d, ]*\] -> \[[\d, ]*\]", "", kind)
    return kind


def _where(reason: str, reported: dict[str, str]) -> str:
    if reason in reported:
        return reported[reason]
    match = re.search(r" at ([A-Za-z_]\w*) \([^()]*(\([^()]*\))?[^()]*\)$", reason)
    return match.group(1) if match else ""


def _segment_text(layout: Layout, gid: int) -> str:
    parts, offset = [], 0
    for i, seg in enumerate(layout):
        if seg.group == gid:
            bits = []
            if len(layout) > 1:
                bits.append(f"segment {i + 1}/{len(layout)} [{offset}:{offset + seg.numel}]")
            if seg.inner > 1:
                bits.append(f"inner={seg.inner}")
            if seg.outer > 1:
                bits.append(f"outer={seg.outer}")
            parts.append(", ".join(bits) or "plain")
        offset += seg.numel
    return "; ".join(parts)


def _structure(size: int, layouts: list[Layout], gid: int) -> str:
    inners, outers, concat = set(), set(), False
    for lay in layouts:
        for seg in lay:
            if seg.group == gid:
                concat |= len(lay) > 1
                if seg.inner > 1:
                    inners.add(seg.inner)
                if seg.outer > 1:
                    outers.add(seg.outer)
    tags = []
    if outers:
        tags.append(f"heads x head_dim ({'|'.join(map(str, sorted(outers)))} x {size})")
    if inners:
        tags.append(f"flatten block (inner={'|'.join(map(str, sorted(inners)))})")
    if concat:
        tags.append("concat segment")
    return " + ".join(tags) or "plain"


def non_float_tensors(gm: torch.nn.Module, spec: GroupSpec) -> set[str]:
    """Names in `spec.param_layouts` whose tensor in `gm` is not floating point."""
    out = set()
    for name in spec.param_layouts:
        try:
            value = getattr_path(gm, name)
        except AttributeError:
            continue
        if torch.is_tensor(value) and not value.is_floating_point():
            out.add(name)
    return out


def report_from_spec(spec: GroupSpec, model: str = "model", input_shapes: Sequence[Sequence[int]] = (),
                     gm: torch.nn.Module | None = None) -> GroupReport:
    """The GroupReport of an already inferred GroupSpec (`gm`, the traced module, tells
    integer buffers apart: their axes are not counted as hidden units)."""
    non_float = non_float_tensors(gm, spec) if gm is not None else set()
    # Where every group appears on activations, in graph order.
    appearances: dict[int, list[tuple[str, int, Layout]]] = {}
    for node, value in spec.node_layouts.items():
        for lays in tensor_layouts(value):
            for axis, lay in enumerate(lays):
                for seg in lay:
                    appearances.setdefault(seg.group, []).append((node, axis, lay))
    first = {gid: i for i, gid in enumerate(appearances)}
    order = sorted(spec.groups.values(), key=lambda g: (first.get(g.id, len(first)), g.id))
    reported = {}
    for where, reason in spec.frozen_reasons:
        if not where.startswith("group "):
            reported.setdefault(reason, where)

    groups, frozen, by_reason = [], [], {}
    n_structural = 0
    for g in order:
        if g.parent is not None:  # a within group: reported with the group whose units it lives in
            continue
        layouts = [p.layout for p in g.params] + [lay for _, _, lay in appearances.get(g.id, [])]
        structure = _structure(g.size, layouts, g.id)
        params = [ParamEntry(p.name, p.axis, p.role, _segment_text(p.layout, g.id)) for p in g.params]
        if not g.frozen:  # every mergeable group is listed (counted as hidden units too)
            within = [WithinEntry(w.id, w.size, w.frozen, list(w.reasons),
                                  [SiteEntry(s.node, s.axis) for s in g.sites if s.within == w.id])
                      for w in spec.groups.values() if w.parent == g.id]
            groups.append(GroupEntry(g.id, g.size, structure, params,
                                     [SiteEntry(s.node, s.axis) for s in g.sites if s.within is None], within))
        elif not is_hidden(g, non_float):
            n_structural += 1
        else:
            nodes = list(dict.fromkeys(f"{n}[{a}]" for n, a, _ in appearances.get(g.id, [])))
            reasons = [FrozenReason(_where(r, reported), r) for r in g.reasons]
            frozen.append(FrozenEntry(g.id, g.size, structure, reasons, params, nodes))
            kind = reason_kind(g.reasons[0]) if g.reasons else "frozen"
            by_reason[kind] = by_reason.get(kind, 0) + g.size
    mergeable = sum(g.size for g in groups)
    frozen_units = sum(f.size for f in frozen)
    hidden = mergeable + frozen_units
    return GroupReport(
        model=model,
        input_shapes=[[int(n) for n in s] for s in input_shapes],
        groups=groups,
        frozen=frozen,
        n_groups=len(groups),
        mergeable_units=mergeable,
        frozen_hidden_units=frozen_units,
        share_mergeable=mergeable / hidden if hidden else 0.0,
        n_structural_groups=n_structural,
        frozen_by_reason=by_reason,
    )


def shape_propagate(gm: fx.GraphModule, args: tuple) -> None:
    """propagate_shapes, with torch's ShapeProp traceback kept off stderr and the error
    reduced to the failing node and the root cause."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            propagate_shapes(gm, args)
    except TraceError as exc:
        root: BaseException = exc
        while root.__cause__ is not None:
            root = root.__cause__
        node = re.search(r"node=%(\S+)", str(exc))
        shapes = ", ".join("x".join(map(str, a.shape)) for a in args if torch.is_tensor(a))
        at = f" at node {node.group(1)}" if node else ""
        raise TraceError(
            f"running the traced model on an input of shape {shapes} failed{at}: "
            f"{type(root).__name__}: {one_line(root, 600)}"
        ) from exc


def trace_and_infer(model: torch.nn.Module, example_input: Any, label: str = "model") -> tuple[fx.GraphModule, GroupSpec]:
    """Trace (a deep copy of) `model`, propagate shapes, infer groups."""
    args = as_args(example_input)
    gm = trace_model(model, label)
    shape_propagate(gm, args)
    return gm, infer_groups(gm)


def describe_groups(model: torch.nn.Module, example_input: Any, *, name: str | None = None,
                    check: bool = False, seeds: int = 1, tolerance: float = DEFAULT_TOLERANCE,
                    check_dtype: torch.dtype = torch.float64) -> GroupReport:
    """The group specification pleas_fx infers for `model`, as a printable GroupReport.

    `model` is never modified. With `check=True` the group-soundness self-test is run too
    (see check_groups) and its result stored in `report.check`."""
    args = as_args(example_input)
    gm, spec = trace_and_infer(model, args, name or type(model).__name__)
    report = report_from_spec(spec, name or type(model).__name__, [list(a.shape) for a in args], gm)
    if check:
        report.check = check_groups(gm, spec, args, seeds=seeds, tolerance=tolerance, dtype=check_dtype, inplace=True)
    return report


# --------------------------------------------------------------------------- the self-test
def randomise_constants(module: torch.nn.Module, seed: int = 0) -> None:
    """Give BatchNorm running statistics, and every parameter whose entries are all equal
    (norm affines, zero biases, layer scales), distinct random values: permuting a
    constant vector changes nothing, so a wrong group would go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._NormBase) and mod.track_running_stats:
                if mod.running_mean is not None:
                    mean = 0.1 * torch.randn(mod.running_mean.shape, generator=gen, dtype=torch.float64)
                    mod.running_mean.copy_(mean)
                if mod.running_var is not None:
                    var = 0.5 + torch.rand(mod.running_var.shape, generator=gen, dtype=torch.float64)
                    mod.running_var.copy_(var)
        for p in module.parameters():
            if p.is_floating_point() and p.numel() > 1 and bool((p == p.reshape(-1)[0]).all()):
                value = float(p.reshape(-1)[0])
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
                p.copy_(value * (1 + 0.2 * noise) if value != 0 else 0.1 * noise)


def check_groups(gm: fx.GraphModule, spec: GroupSpec, example_input: Any, *, seeds: int = 1,
                 tolerance: float = DEFAULT_TOLERANCE, dtype: torch.dtype = torch.float64,
                 inplace: bool = False) -> CheckResult:
    """Apply `seeds` random permutations of every mergeable group to the weights of `gm`
    and return the max relative deviation of its output (sound groups: rounding only).
    `inplace=True` converts and randomises `gm` itself instead of a copy (saves memory)."""
    work = gm if inplace else copy.deepcopy(gm)
    work.to(dtype)
    randomise_constants(work, seed=12345)
    args = tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in as_args(example_input))
    worst = 0.0
    with torch.no_grad():
        reference = work(*args)
        for seed in range(seeds):
            permuted = permute_model(work, spec, random_permutations(spec, seed))
            worst = max(worst, relative_error(permuted(*args), reference))
            del permuted
    name = str(dtype).replace("torch.", "")
    return CheckResult(worst, tolerance, seeds, name, bool(worst <= tolerance))


# --------------------------------------------------------------------------- the command line
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
    name, or `package.module:factory` (pleas_fx.checkpoints.build_model)."""
    from pleas_fx.checkpoints import build_model

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
        print(f"{prog}: error: {args.model}: {stage}: {one_line(exc, 600)}", file=sys.stderr)
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
        print(report.to_json())
    else:
        print(report)
        if args.json:
            with open(args.json, "w") as fh:
                fh.write(report.to_json() + "\n")
    return 1 if report.check is not None and not report.check.passed else 0


if __name__ == "__main__":  # python -m pleas_fx.inspect
    sys.exit(main())
