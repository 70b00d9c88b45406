"""The attention tail after a score all-reduce (score-reduce variant), as one visible op.

`torch.ops.helix.attend(scores, v, mask, is_causal, scale)` computes
softmax(scale * scores + mask) @ v with SDPA's mask semantics (a bool mask
marks positions to keep, a float mask is added; is_causal keeps the
top-left-aligned lower triangle; with both, a key is visible where both keep it).

A query row with no visible key (every score -inf after the mask: a left-padded
row's first queries under a causal mask, a fully padded row, padding that fills a
sliding window) gives 0, as SDPA does since torch 2.5 (its math path's
`aten._safe_softmax`, and its fused CPU kernel), not the NaN of a plain softmax:
`masked_softmax` below; `softmax_v`, which the attention tails and the chunked kernels
(kernels_chunked.py) run, zeroes those rows in P @ V's output instead. A
float mask of large finite negatives (Hugging Face's finfo.min) is not -inf: such
a row stays a uniform softmax, as in SDPA and in the model.
"""

from __future__ import annotations

import torch

# --- settings: which head dims SDPA's fused kernels take -------------------------
# Largest head dim of the fused SDPA kernels (FlashAttention-2/3 and cuDNN) on Hopper:
# no flash or cuDNN kernel ran at d = 512 on H100 (torch 2.11); the memory-efficient
# kernel has no limit. The one copy of this number: the cost model's kernel table
# (profile.KERNEL_MAX_HEAD_DIM), the kernel-choice pass (passes/kernel_choice.py) and
# the chunked op's run-time check (kernels_chunked.py) read it from here.
FUSED_MAX_HEAD_DIM = 256
# The fused kernels load head dims in multiples of this (16 bytes of fp16): with q's or v's
# head dim not a multiple (a qk-gather V of d/m = 4), SDPA runs its math path.
FUSED_ALIGN = 8


def fused_takes(backend: str, d_qk: int, d_v: int) -> bool:
    """Whether SDPA's `backend` runs q/k of head dim d_qk with v of head dim d_v: both
    multiples of FUSED_ALIGN; flash needs them equal (a qk-gather core has V at d/m)."""
    if d_qk % FUSED_ALIGN or d_v % FUSED_ALIGN:
        return False
    return d_qk == d_v if backend == "flash" else True


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
    return softmax_v(s, v, may_die=mask is not None)


def softmax_v(s: torch.Tensor, v: torch.Tensor, *, may_die: bool = True,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """masked_softmax(s) @ v (3-d: into `out` with torch.bmm where given), with the rows that
    have no visible key zeroed in the output (rows x d_v) rather than in the probabilities
    (rows x keys): their softmax is NaN, so is their row of P @ V, and masked_fill_ sets it
    to 0. Rows holding a NaN score stay NaN, as in masked_softmax.

    may_die=False skips the row max and the fill: the caller knows no row is all -inf (no
    mask: a causal row sees at least key 0). Scores that overflow to -inf on every key of a
    row would then give NaN, not 0; there the output is not finite either way. At the paper's
    core (16 heads x 10^8 fp16 scores a layer) the fill over the probabilities and the row
    max were about 600 MB of memory traffic a head."""
    p = torch.softmax(s, dim=-1)
    if p.dtype != v.dtype:
        p = p.to(v.dtype)
    o = torch.bmm(p, v, out=out) if out is not None else p @ v
    if may_die and s.shape[-1]:
        o.masked_fill_(s.amax(dim=-1, keepdim=True) == float("-inf"), 0.0)
    return o


def masked_softmax(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """softmax(s) over `dim`, with 0 in every row whose scores are all -inf (no visible key).

    `aten._safe_softmax`'s semantics (rows holding a NaN stay NaN), without its two
    full-size temporaries (an s == -inf mask and a torch.where copy): the dead rows are
    found from the row max (one read of `s`, a row-sized result) and zeroed in place."""
    if s.shape[dim] == 0:                                      # no keys at all: nothing to zero
        return torch.softmax(s, dim=dim)
    dead = s.amax(dim=dim, keepdim=True) == float("-inf")      # (..., rows, 1)
    return torch.softmax(s, dim=dim).masked_fill_(dead, 0.0)


def broadcasts_to(small, big) -> bool:
    """Whether a tensor of shape `small` broadcasts to `big` without growing `big`."""
    if len(small) > len(big):
        return False
    return all(a in (1, b) for a, b in zip(reversed(small), reversed(big)))


@attend.register_fake
def _(scores, v, mask, is_causal, scale):
    return scores.new_empty((*scores.shape[:-1], v.shape[-1]))
