"""Running second moments of two models' stacked inputs, the statistic every least-squares
solve reads: for s = [x_A; x_B; 1], the blocks A^T A, A^T B, B^T B and the column sums (B^T A
is the transpose of A^T B: three products instead of four), summed in float64 over rows."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SecondMoments:
    """Sums over rows (samples, positions) of a a^T, a b^T, b b^T, a and b for two models' inputs
    a (dim_a entries) and b (dim_b entries); `count` rows."""

    aa: torch.Tensor
    ab: torch.Tensor
    bb: torch.Tensor
    sum_a: torch.Tensor
    sum_b: torch.Tensor
    count: int = 0

    @classmethod
    def zeros(cls, dim_a: int, dim_b: int | None = None, dtype: torch.dtype = torch.float64,
              device=None) -> "SecondMoments":
        dim_b = dim_a if dim_b is None else dim_b
        z = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)
        return cls(z(dim_a, dim_a), z(dim_a, dim_b), z(dim_b, dim_b), z(dim_a), z(dim_b))

    @property
    def dim_a(self) -> int:
        return self.aa.shape[0]

    @property
    def dim_b(self) -> int:
        return self.bb.shape[0]

    @property
    def dim(self) -> int:
        return self.dim_a + self.dim_b + 1

    def add_(self, other: "SecondMoments") -> "SecondMoments":
        """Add `other` into these sums in place; returns self."""
        self.aa += other.aa
        self.ab += other.ab
        self.bb += other.bb
        self.sum_a += other.sum_a
        self.sum_b += other.sum_b
        self.count += other.count
        return self

    def mean(self) -> torch.Tensor:
        """E[s s^T] as one (dim_a + dim_b + 1)-square matrix, bias last."""
        da, db, n = self.dim_a, self.dim_b, max(self.count, 1)
        out = torch.empty(self.dim, self.dim, dtype=self.aa.dtype, device=self.aa.device)
        for block, sums in ((out[:da, :da], self.aa), (out[da:da + db, da:da + db], self.bb)):
            torch.add(sums, sums.T, out=block)  # exactly symmetric, whatever the BLAS did
            block.mul_(0.5 / n)  # (in place: these blocks are most of the matrix, often 100s of MB)
        out[:da, da:da + db] = self.ab / n
        out[da:da + db, :da] = out[:da, da:da + db].T
        out[:da, -1] = out[-1, :da] = self.sum_a / n
        out[da:da + db, -1] = out[-1, da:da + db] = self.sum_b / n
        out[-1, -1] = self.count / n
        return out


def accumulate_rows(acc: SecondMoments, a: torch.Tensor, b: torch.Tensor) -> None:
    """Add one chunk of rows, given as (features, rows) matrices of both models. The products
    run in the activations' precision (at least float32; float64 if they are) and are summed
    into the running sums' dtype (float64 by default)."""
    work = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    a, b = a.to(work), b.to(work)
    dtype = acc.aa.dtype
    acc.aa += (a @ a.T).to(dtype)
    acc.ab += (a @ b.T).to(dtype)
    acc.bb += (b @ b.T).to(dtype)
    acc.sum_a += a.sum(1).to(dtype)
    acc.sum_b += b.sum(1).to(dtype)
    acc.count += a.shape[1]
