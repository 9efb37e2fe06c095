"""Frozen hidden units (an analysis of the GroupSpec): which groups are hidden features a merge
could act on but cannot (frozen for a limitation, not for structure), how many units that is,
and which ops are responsible. merge() warns with it; the inspect report counts it the same way."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pleas_fx.core.fxutil import getattr_path
from pleas_fx.core.ir import Group, GroupSpec


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


def is_hidden(group: Group, non_float: frozenset[str] | set[str] = frozenset()) -> bool:
    """Whether a group is hidden units a merge could act on: it carries at least one axis
    of a floating-point parameter or buffer (an integer tensor such as an attention's
    relative-position index, named in `non_float`, is never a feature) and, if frozen, no
    structural reason saying it could never be permuted (network input/output, batch, spatial,
    kernel, ...: FreezeReason.structural). A frozen axis that touches no parameter (e.g. the
    spatial axes after an op without a handler) is not one."""
    if not any(p.name not in non_float for p in group.params):
        return False
    return not group.frozen or not any(r.structural for r in group.reasons)


@dataclass
class FrozenSummary:
    """Hidden units of a model: how many are mergeable, how many frozen, and the reasons (the
    first reason of each frozen group, location stripped) with the units each froze."""

    mergeable_units: int = 0
    frozen_units: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def hidden_units(self) -> int:
        return self.mergeable_units + self.frozen_units

    @property
    def frozen_share(self) -> float:
        return self.frozen_units / self.hidden_units if self.hidden_units else 0.0

    def to_dict(self) -> dict:
        return {"frozen_units": self.frozen_units, "hidden_units": self.hidden_units,
                "frozen_share": round(self.frozen_share, 6), "by_reason": dict(self.by_reason)}

    def sentence(self) -> str:
        top = sorted(self.by_reason.items(), key=lambda kv: (-kv[1], kv[0]))
        ops = "; ".join(f"{reason} ({units} units)" for reason, units in top[:3])
        more = f"; and {len(top) - 3} more" if len(top) > 3 else ""
        return (f"{self.frozen_units} of {self.hidden_units} hidden units ({100 * self.frozen_share:.1f}%) are frozen: "
                f"{ops}{more}")


def frozen_summary(spec: GroupSpec, gm: torch.nn.Module) -> FrozenSummary:
    """Count the hidden units of `spec` (groups that carry units, within groups excluded)."""
    non_float = non_float_tensors(gm, spec)
    out = FrozenSummary()
    for g in spec.groups.values():
        if g.parent is not None or not is_hidden(g, non_float):
            continue
        if not g.frozen:
            out.mergeable_units += g.size
        else:
            out.frozen_units += g.size
            reason = g.reasons[0].summary if g.reasons else "frozen"
            out.by_reason[reason] = out.by_reason.get(reason, 0) + g.size
    return out
