"""The inspect report: what the compiler inferred for a model, in a form a user can read
before trusting a merge. One entry per mergeable permutation group (its size, structure,
parameter axes and activation sites), the hidden axes that were frozen with the op and reason
that froze them, and a summary. `str(report)` is the text the inspect command prints;
`to_json()`/`from_json()` round-trip exactly."""
from __future__ import annotations

import json
import textwrap
from dataclasses import asdict, dataclass, field

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
    """Why a frozen group is frozen: `reason` is the sentence without its location (the same
    for every node of that kind and op), `where` the fx node whose op froze it ("" when the
    reason names none), `kind` its FreezeReason kind."""

    where: str
    reason: str
    kind: str = ""


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
                    out.append(f"    reason: {r.reason}" + (f"  [at {r.where}]" if r.where else ""))
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
