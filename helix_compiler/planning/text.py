"""Small text helpers shared by messages."""

from __future__ import annotations


def ranges(ix) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8" (sorted first)."""
    ix = sorted(ix)
    if not ix:
        return ""
    runs, start = [], ix[0]
    for a, b in zip(ix, ix[1:] + [None]):
        if b != a + 1:
            runs.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(runs)


def split_name(dp: int, m: int, n: int, pp: int = 1) -> str:
    """A split's one spelling: 'm=2 x n=8' (one replica, one stage), 'dp=2 x m=1 x n=8' (data
    replicas), 'dp=1 x pp=2 x m=1 x n=8' (pipeline stages)."""
    if pp != 1:
        return f"dp={dp} x pp={pp} x m={m} x n={n}"
    return f"m={m} x n={n}" if dp == 1 else f"dp={dp} x m={m} x n={n}"


def split_key(dp: int, pp: int, m: int, n: int) -> tuple[int, ...]:
    """A split as a tuple: (dp, m, n) when pp = 1 (today's key), else (dp, pp, m, n)."""
    return (dp, m, n) if pp == 1 else (dp, pp, m, n)


def key_name(key: tuple[int, ...]) -> str:
    """split_name of a split_key (or of an (m, n) pair)."""
    if len(key) == 2:
        return split_name(1, *key)
    if len(key) == 3:
        return split_name(*key)
    dp, pp, m, n = key
    return split_name(dp, m, n, pp)
