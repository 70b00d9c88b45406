"""How Helix compares a result with its reference: one relative error for the whole tree
(tests, `helix run`'s check, the benchmarks' numerics, `helix calibrate`'s kernel errors)."""

from __future__ import annotations

import torch


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| (Frobenius norms in float64); the absolute error when
    `want` is all zeros. NaN or inf anywhere in `got` gives NaN or inf, never a pass."""
    got, want = got.detach().double(), want.detach().double()
    diff = torch.linalg.vector_norm(got - want).item()
    scale = torch.linalg.vector_norm(want).item()
    return diff / scale if scale > 0 else diff
