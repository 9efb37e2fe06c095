"""Why an axis is frozen (not permuted, not widened): a typed reason shared by inference,
the merge report and the inspect report.

A reason has a `kind` (what froze it), a `detail` (the sentence, the same for every node of
that kind and op), `context` (specifics such as shapes) and where it happened (`where`: the
fx node, `op`: the op it runs). Structural kinds describe axes no merge could
ever permute (network input and output, batch, spatial, kernel, size-1 axes, vocabularies,
constants, parameters the graph never reads); every other kind is a limitation worth
reporting. `str(reason)` is the sentence users read.
"""
from __future__ import annotations

from dataclasses import dataclass

# kinds of axes no merge could ever permute: not limitations of pleas_fx
STRUCTURAL_KINDS = frozenset({
    "network input", "network output", "batch", "spatial", "kernel", "size-1", "vocabulary", "constant",
    "unused",
})

# sentence used for a kind when the reason has no detail of its own
_TEXT = {
    "unused": "not used by the traced graph",
    "no handler": "no handler",
}


@dataclass(frozen=True, order=True)
class FreezeReason:
    """Why a group is frozen: `kind` (e.g. "no handler", "reduction", "mixed structure",
    "spatial"), the node and op where it happened, and a human detail."""

    kind: str
    detail: str = ""
    where: str = ""
    op: str = ""
    context: str = ""

    @property
    def structural(self) -> bool:
        """True for axes no merge could permute (network input/output, batch, spatial, ...)."""
        return self.kind in STRUCTURAL_KINDS

    @property
    def summary(self) -> str:
        """The reason without its location, for aggregating over a model."""
        return self.detail or _TEXT.get(self.kind, self.kind)

    def __str__(self) -> str:
        text = self.summary + (f" ({self.context})" if self.context else "")
        if self.where:
            text += f" at {self.where}" + (f" ({self.op})" if self.op else "")
        return text

    def to_dict(self) -> dict:
        return {"kind": self.kind, "detail": self.detail, "where": self.where, "op": self.op, "context": self.context}

    @classmethod
    def from_dict(cls, d: dict) -> "FreezeReason":
        return cls(d["kind"], d.get("detail", ""), d.get("where", ""), d.get("op", ""), d.get("context", ""))


def as_reason(reason: "FreezeReason | str") -> FreezeReason:
    """A FreezeReason from a reason or a string (a structural kind, or free text from a
    user's handler)."""
    if isinstance(reason, FreezeReason):
        return reason
    if reason in STRUCTURAL_KINDS:
        return FreezeReason(reason)
    return FreezeReason("other", str(reason))
