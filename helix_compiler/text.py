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
