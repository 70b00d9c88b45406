"""The two-level device mesh: n head groups x m dim slices (DESIGN.md section 2).

Rank r = i * m + j: head group i in [0, n), dim slice j in [0, m).  Ranks with
the same i form an *m-group* (contiguous ids, so it sits inside a node); ranks
with the same j form an *n-group*.  Collectives name their group by the mesh
axes they span: "dim" (the m-group), "head" (the n-group) or "all".

A decode mesh may add s > 1 chunks of the KV cache's positions (docs/decode.md):
rank r = (i * m + j) * s + k, chunk k in [0, s). "seq" is the s-group (same i, j:
contiguous ids); "dim", "head" and "all" then span the ranks of one chunk k, so an
m x n rank graph keeps its meaning on each chunk. "mesh" spans every rank of the mesh (the
decode MLP sharded over all N = s m n ranks, passes/mesh_mlp.py); it is "all" when s = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import HelixError

AXES = ("head", "dim", "all", "seq", "mesh")


@dataclass(frozen=True, slots=True, kw_only=True)
class Mesh:
    n: int  # head groups
    m: int  # slices of each head's dim
    s: int = 1  # chunks of the KV cache's positions (decode only)

    def __post_init__(self) -> None:
        if self.n < 1 or self.m < 1 or self.s < 1:
            raise HelixError(f"Mesh needs n >= 1 head groups and m >= 1 dim slices, got n={self.n}, "
                             f"m={self.m}; pass a split (m, n) of positive integers")

    @property
    def size(self) -> int:
        return self.n * self.m * self.s

    def coords(self, rank: int) -> tuple[int, int]:
        """(head group i, dim slice j) of `rank`; its cache chunk is `chunk(rank)`."""
        return divmod(rank // self.s, self.m)

    def chunk(self, rank: int) -> int:
        return rank % self.s

    def group(self, rank: int, axes: str) -> tuple[int, ...]:
        """The ranks that share a collective over `axes` with `rank`, in group order."""
        i, j = self.coords(rank)
        k, s = self.chunk(rank), self.s
        if axes == "dim":
            return tuple((i * self.m + jj) * s + k for jj in range(self.m))
        if axes == "head":
            return tuple((ii * self.m + j) * s + k for ii in range(self.n))
        if axes == "all":
            return tuple(range(k, self.size, s))
        if axes == "seq":
            return tuple(range(rank - k, rank - k + s))
        if axes == "mesh":
            return tuple(range(self.size))
        raise HelixError(f"Mesh: unknown mesh axes {axes!r}; expected one of {AXES}")

    def groups(self, axes: str) -> list[tuple[int, ...]]:
        """Every group over `axes`, each once, in rank order of its first member."""
        if self.s > 1 or axes == "seq":
            seen: dict = {}
            for r in range(self.size):
                seen.setdefault(self.group(r, axes), None)
            return list(seen)
        if axes == "dim":
            return [tuple(range(i * self.m, (i + 1) * self.m)) for i in range(self.n)]
        if axes == "head":
            return [tuple(range(j, self.size, self.m)) for j in range(self.m)]
        if axes in ("all", "mesh"):
            return [tuple(range(self.size))]
        raise HelixError(f"Mesh: unknown mesh axes {axes!r}; expected one of {AXES}")
