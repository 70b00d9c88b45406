"""Exact explicit attention, chunked over queries: the kernel choice for head dims
that no fused SDPA kernel takes (d > 256 on Hopper: no flash or cuDNN kernel).

    torch.ops.helix.chunked_attention(q, k, v, mask, is_causal, scale, chunk_bytes, min_head_dim)
        = SDPA(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)     (eval: no dropout)
    torch.ops.helix.chunked_attend(scores, v, mask, is_causal, scale, chunk_bytes)
        = torch.ops.helix.attend(scores, v, mask, is_causal, scale)           (kernels.py)

Both loop over blocks of query rows. Per block: scale * Q_c K^T as one GEMM
(baddbmm, the scale in its epilogue), the mask, softmax, P_c V into the
output rows of the block. On CUDA in fp16 / bf16 the softmax is a Triton program per row
that overwrites the block's scores with their probabilities (runtime/triton_softmax.py:
measured 2.10 ms against torch.softmax's 3.98 for the paper's 16 heads of 10^8 scores, H200);
elsewhere torch.softmax. A block is a group of whole heads, or rows of one
head when a head's scores exceed `chunk_bytes`: at most `chunk_bytes` of
scores are alive at a time (256 MiB: one 10k x 10k fp16 head). The arithmetic is the explicit matmul -> softmax -> matmul of the math
backend, in the inputs' dtype with fp32 accumulation (softmax accumulates in
fp32 for fp16/bf16 inputs).

`min_head_dim`: when q's head dim is <= it (and q's and v's head dims are
multiples of 8), the op calls SDPA itself (the fused kernel). passes/kernel_choice.py sets it to 0 where it knows the head
dim from the graph's shapes (the rewrite is then unconditional) and to the
threshold where the graph carries no shapes (the choice is made at run time).

GQA (fewer kv heads than query heads) repeats k and v over their query heads.

Fully masked rows: a query row with no visible key (mask and is_causal together
leave every score -inf) gives 0, as SDPA does (kernels.softmax_v, the
helper helix.attend uses; docs/numerics.md), never NaN.

On CUDA, for a causal core in fp16 / bf16 where Triton is importable and
`triton_flash.fits` holds (4-D q, k, v of one dtype, head dims multiples of 16 up
to 512), chunked_attention runs a flash-attention Triton kernel instead of the
blocks above (runtime/triton_flash.py: online softmax over key tiles, no scores
in memory, the same function). Only there, because only there it was measured
faster (H200, d = 512, T = S = 10000, 16 heads, results/triton_flash_h200.json):
causal 7.8 ms against the blocks' 20.5 (the kernel skips the hidden half); without
is_causal its best configuration takes 16.8 ms against the blocks' 14.4 (cuBLAS
GEMMs at d = 512 beat a Triton tile that a 512-column fp32 accumulator keeps
small), and fp32 was not timed. `USE_TRITON = False` (or HELIX_FLASH_TRITON=0 in the
environment at import) keeps the explicit path, e.g. to time one against the
other; the CPU always runs the explicit path. chunked_attend (the scores are
its input) always runs the explicit blocks.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import torch.nn.functional as F

from . import triton_flash, triton_softmax
from .kernels import FUSED_ALIGN, broadcasts_to, softmax_v

# Whether chunked_attention runs the flash Triton kernel on CUDA where it fits (True unless
# HELIX_FLASH_TRITON=0 at import); False keeps the explicit blocks (benchmarks time both).
USE_TRITON = os.environ.get("HELIX_FLASH_TRITON", "1") != "0"
# The dtypes the kernel was timed faster than the blocks in (fp32: not timed).
_TRITON_DTYPES = (torch.float16, torch.bfloat16)

# Scores alive at once per block, in bytes. Measured on H100 (torch 2.11, d=512,
# S=10000): larger blocks are faster (4 MiB 3.98 ms per head, 32 MiB 0.75, 256 MiB
# 0.60): the L2 reuse that small blocks offer does not pay for their launches and
# short GEMMs. 256 MiB holds one whole 10000 x 10000 fp16 head.
DEFAULT_CHUNK_BYTES = 256 * 2 ** 20
# Query rows per block are a multiple of this (GEMM tile height), unless the
# whole query length is smaller.
ROW_QUANTUM = 128


def blocks(bh: int, s_q: int, s_k: int, itemsize: int, chunk_bytes: int):
    """(h0, h1, r0, r1) blocks of heads x query rows whose scores fit chunk_bytes:
    whole heads (as many as fit, at least one) when one head fits, else row blocks
    of one head (a multiple of ROW_QUANTUM rows, at least ROW_QUANTUM)."""
    row_bytes = max(1, s_k * itemsize)
    rows = chunk_bytes // row_bytes
    if rows >= s_q:
        g, rows = max(1, chunk_bytes // (s_q * row_bytes)), s_q
    else:
        g, rows = 1, max(ROW_QUANTUM, rows // ROW_QUANTUM * ROW_QUANTUM)
    for h0 in range(0, bh, g):
        for r0 in range(0, s_q, rows):
            yield h0, min(h0 + g, bh), r0, min(r0 + rows, s_q)


def _block_mask(mask, lead, bh, h0, h1, r0, r1, s_k):
    """The mask rows [r0, r1) of flattened heads [h0, h1), broadcastable to (h1-h0, r1-r0, s_k)."""
    if mask is None:
        return None
    m = mask
    if m.dim() >= 2 and m.shape[-2] != 1:
        m = m[..., r0:r1, :]
    n_lead = m.dim() - 2
    if n_lead <= 0 or all(x == 1 for x in m.shape[:n_lead]):
        return m.reshape(m.shape[-2:])                  # the same for every head
    m = m.expand(*lead, m.shape[-2], s_k).reshape(bh, m.shape[-2], s_k)
    return m[h0:h1]


def _apply_mask(s: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, start: int,
                s_k: int) -> torch.Tensor:
    """`s` is a fresh block of scores: bool fills work in place (no clone pass)."""
    if is_causal:
        # top-left aligned lower triangle: query row i keeps keys j <= i
        rows = torch.arange(start, start + s.shape[-2], device=s.device).unsqueeze(-1)
        cols = torch.arange(s_k, device=s.device)
        s.masked_fill_(cols > rows, float("-inf"))
    if mask is not None:
        if mask.dtype != torch.bool:
            s = s + mask
        elif broadcasts_to(mask.shape, s.shape):
            s.masked_fill_(~mask, float("-inf"))
        else:
            s = s.masked_fill(~mask, float("-inf"))
    return s


def _explicit(q, k, v, mask, is_causal: bool, scale: float, chunk_bytes: int) -> torch.Tensor:
    *lead, s_q, d = q.shape
    s_k, d_v = k.shape[-2], v.shape[-1]
    h, h_kv = (q.shape[-3], k.shape[-3]) if q.dim() >= 3 else (1, 1)
    if h != h_kv:                                  # GQA: each kv head serves h / h_kv query heads
        k = k.repeat_interleave(h // h_kv, dim=-3)
        v = v.repeat_interleave(h // h_kv, dim=-3)
    lead = tuple(lead)
    bh = math.prod(lead) if lead else 1
    q3 = q.reshape(bh, s_q, d)
    kt = k.expand(*lead, s_k, d).reshape(bh, s_k, d).transpose(1, 2)   # (bh, d, s_k)
    v3 = v.expand(*lead, s_k, d_v).reshape(bh, s_k, d_v)
    out = q.new_empty(bh, s_q, d_v)
    for h0, h1, r0, r1 in blocks(bh, s_q, s_k, q.element_size(), chunk_bytes):
        s = torch.baddbmm(q3.new_empty(()).expand(h1 - h0, r1 - r0, s_k), q3[h0:h1, r0:r1],
                          kt[h0:h1], beta=0.0, alpha=scale)
        s = _apply_mask(s, _block_mask(mask, lead, bh, h0, h1, r0, r1, s_k), is_causal, r0, s_k)
        _softmax_v(s, v3[h0:h1], may_die=mask is not None, out=out[h0:h1, r0:r1])
    return out.reshape(*lead, s_q, d_v)


def _softmax_v(s: torch.Tensor, v: torch.Tensor, *, may_die: bool, out: torch.Tensor) -> None:
    """softmax_v(s, v) into `out` for a block of scores `s` that the caller owns (fresh from
    Q K^T or a scaling): on CUDA in 16 bits, the Triton row softmax over s in place
    (runtime/triton_softmax.py: one read and one write of the scores; rows with no visible key
    come out 0 there, so nothing is filled after P V); else kernels.softmax_v."""
    if s.dtype == v.dtype and triton_softmax.fits(s):
        torch.bmm(triton_softmax.softmax_(s), v, out=out)
    else:
        softmax_v(s, v, may_die=may_die, out=out)


@torch.library.custom_op("helix::chunked_attention", mutates_args=())
def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      is_causal: bool, scale: float | None, chunk_bytes: int,
                      min_head_dim: int) -> torch.Tensor:
    if q.shape[-1] <= min_head_dim and q.shape[-1] % FUSED_ALIGN == 0 \
            and v.shape[-1] % FUSED_ALIGN == 0:   # a fused kernel takes these head dims
        gqa = q.dim() >= 3 and k.dim() >= 3 and q.shape[-3] != k.shape[-3]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              scale=scale, enable_gqa=gqa)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if _use_triton(q, k, v, mask, is_causal):
        try:
            return triton_flash.flash_attention_triton(q, k, v, mask, is_causal, scale)
        except triton_flash.OutOfResources as e:   # the config is too big for this GPU: said
            warnings.warn(f"helix.chunked_attention: the flash Triton kernel's config "
                          f"{triton_flash.default_config(q.dtype).name} does not fit "
                          f"{torch.cuda.get_device_name(q.device)} ({e}); running the explicit "
                          f"blocks; set triton_flash.DEFAULT_CONFIG to a smaller entry of "
                          f"triton_flash.CONFIGS", stacklevel=2)
    return _explicit(q, k, v, mask, is_causal, scale, chunk_bytes)


def _use_triton(q, k, v, mask, is_causal) -> bool:
    """The flash kernel where it was measured faster than the blocks: a causal core of 16-bit CUDA
    tensors it takes, while USE_TRITON holds (never on the CPU, not even under TRITON_INTERPRET=1:
    the CPU runs the explicit blocks as before)."""
    return (USE_TRITON and bool(is_causal) and q.is_cuda and q.dtype in _TRITON_DTYPES
            and triton_flash.fits(q, k, v, mask))


@chunked_attention.register_fake
def _(q, k, v, mask, is_causal, scale, chunk_bytes, min_head_dim):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("helix::chunked_attend", mutates_args=())
def chunked_attend(scores: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   is_causal: bool, scale: float, chunk_bytes: int) -> torch.Tensor:
    *lead, s_q, s_k = scores.shape
    lead = tuple(lead)
    h, h_kv = (scores.shape[-3], v.shape[-3]) if scores.dim() >= 3 and v.dim() >= 3 else (1, 1)
    if h != h_kv:
        v = v.repeat_interleave(h // h_kv, dim=-3)
    d_v = v.shape[-1]
    bh = math.prod(lead) if lead else 1
    s3 = scores.reshape(bh, s_q, s_k)
    v3 = v.expand(*lead, s_k, d_v).reshape(bh, s_k, d_v)
    out = v.new_empty(bh, s_q, d_v)
    for h0, h1, r0, r1 in blocks(bh, s_q, s_k, scores.element_size(), chunk_bytes):
        s = s3[h0:h1, r0:r1] * scale
        s = _apply_mask(s, _block_mask(mask, lead, bh, h0, h1, r0, r1, s_k), is_causal, r0, s_k)
        _softmax_v(s, v3[h0:h1], may_die=mask is not None, out=out[h0:h1, r0:r1])
    return out.reshape(*lead, s_q, d_v)


@chunked_attend.register_fake
def _(scores, v, mask, is_causal, scale, chunk_bytes):
    return scores.new_empty((*scores.shape[:-1], v.shape[-1]))
