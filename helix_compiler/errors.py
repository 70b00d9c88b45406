"""One exception root for everything Helix refuses.

`HelixError` is a `ValueError`: almost every refusal is about the input (a
model, a device count, a plan file). Messages name the object, the rule that
was broken, the actual values and what to try next.
"""

from __future__ import annotations


class HelixError(ValueError):
    """A request Helix cannot carry out exactly; the message says what to try."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, for chaining a cause into a one-line error."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:limit]}"


class CaptureError(HelixError):
    """torch.export could not capture the model."""


class PlanError(HelixError):
    """No feasible partition, or a forced plan that is infeasible."""


class ShardingError(HelixError):
    """A node the passes cannot shard exactly; the message names the node."""


class OverlapError(HelixError):
    """overlap=k > 1: a batch k does not divide, or an op that mixes batch rows (named)."""


class UnpartitionedError(HelixError):
    """strict=True (--strict): an attention core no site owns would run replicated."""


class HelixWarning(UserWarning):
    """Something Helix does exactly but not as the plan prices it (an attention core that
    every rank runs whole); `warnings.simplefilter("error", HelixWarning)` or strict=True
    turns it into a refusal."""
