"""The attention tail after a score all-reduce (score-reduce variant), as one visible op.

`torch.ops.helix.attend(scores, v, mask, is_causal, scale)` computes
softmax(scale * scores + mask) @ v with SDPA's mask semantics (a bool mask
marks positions to keep, a float mask is added; is_causal keeps the
top-left-aligned lower triangle).
"""

from __future__ import annotations

import torch


@torch.library.custom_op("helix::attend", mutates_args=())
def attend(scores: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
           scale: float) -> torch.Tensor:
    s = scores * scale                 # a fresh tensor: the fills below may work in place
    if is_causal:
        L, S = s.shape[-2], s.shape[-1]
        keep = torch.ones(L, S, dtype=torch.bool, device=s.device).tril()
        s.masked_fill_(~keep, float("-inf"))
    if mask is not None:
        if mask.dtype != torch.bool:
            s = s + mask
        elif broadcasts_to(mask.shape, s.shape):
            s.masked_fill_(~mask, float("-inf"))
        else:                           # a mask that widens the scores: out of place
            s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def broadcasts_to(small, big) -> bool:
    """Whether a tensor of shape `small` broadcasts to `big` without growing `big`."""
    if len(small) > len(big):
        return False
    return all(a in (1, b) for a, b in zip(reversed(small), reversed(big)))


@attend.register_fake
def _(scores, v, mask, is_causal, scale):
    return scores.new_empty((*scores.shape[:-1], v.shape[-1]))
