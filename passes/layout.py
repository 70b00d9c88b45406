"""Placements as index lists: which global elements of each tensor dim a rank holds.

A `Split` of a tensor dim of global size `size` gives every rank the global
indices it holds along that dim, in local order.  Replicate is `None`;
DTensor's Shard(dim) is the special case of contiguous, equal lists.  Index
lists compose exactly through views (`merge` / `factor`), slices, splits and
concatenations, which is what lets one mechanism shard [3, H, d] fused QKV,
(B*H, S, d) batched heads, rotary pairs that a permutation keeps together and
kv heads replicated over groups, with no per-model code.

Invariant: every function here is pure; a list is never mutated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from helix_compiler.errors import ShardingError
from helix_compiler.runtime.mesh import Mesh


@dataclass(frozen=True, eq=False, slots=True)
class Split:
    size: int
    lists: tuple  # one np.ndarray of global indices per rank

    def __repr__(self) -> str:
        return f"Split({self.size}, rank0={self.lists[0].tolist()[:8]}{'...' if len(self.lists[0]) > 8 else ''})"

    def local_len(self, rank: int) -> int:
        return len(self.lists[rank])

    def same(self, other: "Split | None") -> bool:
        if other is None or other.size != self.size:
            return False
        return self is other or all(np.array_equal(a, b) for a, b in zip(self.lists, other.lists))


def make_split(size: int, lists) -> Split | None:
    """A Split, or None when every rank holds the whole dim in order."""
    lists = tuple(np.asarray(x, dtype=np.int64) for x in lists)
    full = np.arange(size)
    if all(len(x) == size and np.array_equal(x, full) for x in lists):
        return None
    return Split(size=int(size), lists=lists)


def layout_key(split: Split | None):
    """A hashable key equal for two splits iff they hold the same lists (a memo key: layers
    built alike give equal splits, not the same objects)."""
    if split is None:
        return None
    return (split.size, tuple(len(x) for x in split.lists), b"".join(x.tobytes() for x in split.lists))


def lists_of(split: Split | None, size: int, ranks: int) -> tuple:
    if split is None:
        full = np.arange(size)
        return tuple(full for _ in range(ranks))
    return split.lists


def same(a: Split | None, b: Split | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.same(b)


def merge(splits, sizes, ranks: int) -> Split | None:
    """The split of the row-major flattening of dims with these splits and sizes."""
    if all(s is None for s in splits):
        return None
    per_rank = []
    for r in range(ranks):
        idx = np.zeros(1, dtype=np.int64)
        for s, size in zip(splits, sizes):
            li = lists_of(s, size, ranks)[r]
            idx = (idx[:, None] * size + li[None, :]).reshape(-1)
        per_rank.append(idx)
    return make_split(int(np.prod(sizes)), per_rank)


_FACTOR_CACHE: dict = {}


def _first_seen(c: np.ndarray, size: int) -> np.ndarray:
    """The distinct values of `c` in order of first appearance, in O(len(c) + size)."""
    first = np.full(size, len(c), dtype=np.int64)
    np.minimum.at(first, c, np.arange(len(c)))
    present = np.nonzero(first < len(c))[0]
    return present[np.argsort(first[present], kind="stable")]


def _factor_one(li: np.ndarray, sizes: tuple):
    key = (li.tobytes(), sizes)
    hit = _FACTOR_CACHE.get(key)
    if hit is None:
        coords = np.unravel_index(li, sizes) if len(sizes) > 1 else (li,)
        dims = [_first_seen(c, size) for c, size in zip(coords, sizes)]
        rebuilt = np.zeros(1, dtype=np.int64)
        for d_list, size in zip(dims, sizes):
            rebuilt = (rebuilt[:, None] * size + d_list[None, :]).reshape(-1)
        hit = dims if np.array_equal(rebuilt, li) else None
        if len(_FACTOR_CACHE) > 100_000:
            _FACTOR_CACHE.clear()
        _FACTOR_CACHE[key] = hit
    return hit


def factor(split: Split | None, sizes, ranks: int, where: str) -> list:
    """Split one flattened dim into dims of `sizes`; each rank's list must be a row-major product."""
    if split is None:
        return [None] * len(sizes)
    sizes = tuple(int(s) for s in sizes)
    per_dim = [[] for _ in sizes]
    for r in range(ranks):
        dims = _factor_one(split.lists[r], sizes)
        if dims is None:
            raise ShardingError(
                f"node {where}: the elements rank {r} holds of a dim of size {split.size} do not form "
                f"a row-major block of shape {list(sizes)}; this reshape cannot be sharded exactly")
        for k, d_list in enumerate(dims):
            per_dim[k].append(d_list)
    return [make_split(size, lists) for size, lists in zip(sizes, per_dim)]


def varying_axes(split: Split, mesh: Mesh) -> str | None:
    """The mesh axes along which ranks hold different parts of this dim."""
    def varies(axes: str) -> bool:
        for g in mesh.groups(axes):
            first = split.lists[g[0]]
            if any(not np.array_equal(split.lists[r], first) for r in g[1:]):
                return True
        return False
    on_head, on_dim = varies("head"), varies("dim")
    if on_head and on_dim:
        return "all"
    if on_head:
        return "head"
    if on_dim:
        return "dim"
    return None


def check_partition(split: Split, mesh: Mesh, axes: str, where: str, replicas: bool = False) -> int:
    """A sum over this dim's holders is exact only if each group holds every index exactly once.

    With `replicas`, also when each group holds every index the same number of times c (a kv
    head replicated over the n / H_kv q-head groups that share it): the group's sum is then c
    times the sum, and the caller divides by c.  Returns c (1 for a partition)."""
    count = None
    for g in mesh.groups(axes):
        allidx = np.concatenate([split.lists[r] for r in g])
        held = np.bincount(allidx, minlength=split.size) if len(allidx) else np.zeros(split.size, int)
        c = int(held.min()) if split.size else 0
        even = len(held) == split.size and c >= 1 and bool((held == c).all())
        if not even or (c > 1 and not replicas) or (count is not None and c != count):
            many = (f"; each group holds every element {c} times, which only a sum, a mean or a "
                    f"norm's statistics divide out" if even and c > 1 and not replicas else "")
            raise ShardingError(
                f"node {where}: ranks {list(g)} do not hold each of the {split.size} elements of the "
                f"contracted dim exactly once, so a sum over them would not be exact{many}")
        count = c
    return count or 1


def positions(src: np.ndarray, want: np.ndarray, where: str) -> np.ndarray:
    """Local positions in `src` of the global indices `want`."""
    order = {int(g): p for p, g in enumerate(src)}
    try:
        return np.array([order[int(g)] for g in want], dtype=np.int64)
    except KeyError as e:
        raise ShardingError(
            f"node {where}: a rank needs element {e.args[0]} of a dim it does not hold") from None


def as_slice(pos: np.ndarray):
    """(start, stop, step) when `pos` is an arithmetic progression, else None."""
    if len(pos) == 0:
        return None
    if len(pos) == 1:
        return int(pos[0]), int(pos[0]) + 1, 1
    step = int(pos[1] - pos[0])
    if step <= 0 or not np.array_equal(np.diff(pos), np.full(len(pos) - 1, step)):
        return None
    return int(pos[0]), int(pos[-1]) + 1, step
