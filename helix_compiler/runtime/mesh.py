"""The two-level device mesh: n head groups x m dim slices (DESIGN.md section 2).

Rank r = i * m + j: head group i in [0, n), dim slice j in [0, m).  Ranks with
the same i form an *m-group* (contiguous ids, so it sits inside a node); ranks
with the same j form an *n-group*.  Collectives name their group by the mesh
axes they span: "dim" (the m-group), "head" (the n-group) or "all".
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import HelixError

AXES = ("head", "dim", "all")


@dataclass(frozen=True, slots=True, kw_only=True)
class Mesh:
    n: int  # head groups
    m: int  # slices of each head's dim

    def __post_init__(self) -> None:
        if self.n < 1 or self.m < 1:
            raise HelixError(f"Mesh needs n >= 1 head groups and m >= 1 dim slices, got n={self.n}, "
                             f"m={self.m}; pass a split (m, n) of positive integers")

    @property
    def size(self) -> int:
        return self.n * self.m

    def coords(self, rank: int) -> tuple[int, int]:
        return divmod(rank, self.m)

    def group(self, rank: int, axes: str) -> tuple[int, ...]:
        """The ranks that share a collective over `axes` with `rank`, in group order."""
        i, j = self.coords(rank)
        if axes == "dim":
            return tuple(i * self.m + jj for jj in range(self.m))
        if axes == "head":
            return tuple(ii * self.m + j for ii in range(self.n))
        if axes == "all":
            return tuple(range(self.size))
        raise HelixError(f"Mesh: unknown mesh axes {axes!r}; expected one of {AXES}")

    def groups(self, axes: str) -> list[tuple[int, ...]]:
        """Every group over `axes`, each once, in rank order of its first member."""
        if axes == "dim":
            return [tuple(range(i * self.m, (i + 1) * self.m)) for i in range(self.n)]
        if axes == "head":
            return [tuple(range(j, self.size, self.m)) for j in range(self.m)]
        if axes == "all":
            return [tuple(range(self.size))]
        raise HelixError(f"Mesh: unknown mesh axes {axes!r}; expected one of {AXES}")
