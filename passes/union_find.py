"""The union-find of group inference: axis variables (a size, frozen or not, the reasons it was
frozen), merged when two axes must share a permutation; within variables remember the unit
variables they permute inside."""
from __future__ import annotations

from pleas_fx.core.freeze import FreezeReason, as_reason


class UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.frozen: list[bool] = []
        self.reasons: dict[int, list[FreezeReason]] = {}
        self.parents: dict[int, list[int]] = {}  # within variable -> the variables it permutes inside
        self.members: list[int] = []  # per root: how many variables its class holds

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        self.frozen.append(False)
        self.members.append(1)
        return len(self.parent) - 1

    def find(self, v: int) -> int:
        root = v
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[v] != root:
            self.parent[v], v = root, self.parent[v]
        return root

    def freeze(self, v: int, reason: FreezeReason | str) -> None:
        reason = as_reason(reason)
        r = self.find(v)
        if not self.frozen[r] or reason not in self.reasons.get(r, []):
            self.reasons.setdefault(r, []).append(reason)
        self.frozen[r] = True

    def union(self, a: int, b: int) -> bool:
        """Merge the classes of a and b; False (nothing merged) if their sizes differ."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return True
        if self.size[ra] != self.size[rb]:
            return False
        self.parent[rb] = ra
        self.members[ra] += self.members[rb]
        self.frozen[ra] = self.frozen[ra] or self.frozen[rb]
        self.reasons.setdefault(ra, []).extend(self.reasons.pop(rb, []))
        if rb in self.parents:
            self.parents.setdefault(ra, []).extend(self.parents.pop(rb))
        return True

    def new_within(self, size: int, parent: int) -> int:
        """A within variable: permutes the entries of each unit of `parent`, unit by unit."""
        v = self.new(size)
        self.parents[v] = [parent]
        return v

    def parent_of(self, v: int) -> int | None:
        """The (resolved) group a within variable permutes inside; None for other variables
        or when it was linked to within axes of different groups."""
        found = {self.find(p) for p in self.parents.get(self.find(v), ())}
        return found.pop() if len(found) == 1 else None
