"""Exact explicit attention, chunked over queries: the kernel choice for head dims
that no fused SDPA kernel takes (d > 256 on Hopper: no flash or cuDNN kernel).

    torch.ops.helix.chunked_attention(q, k, v, mask, is_causal, scale, chunk_bytes, min_head_dim)
        = SDPA(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)     (eval: no dropout)
    torch.ops.helix.chunked_attend(scores, v, mask, is_causal, scale, chunk_bytes)
        = torch.ops.helix.attend(scores, v, mask, is_causal, scale)           (kernels.py)

Both loop over blocks of query rows. Per block: scale * Q_c K^T as one GEMM
(baddbmm, the scale in its epilogue), the mask, softmax, P_c V into the
output rows of the block. Only one block of scores is alive at a time
(`chunk_bytes` of them, e.g. 32 MiB, inside the 50 MB L2 of an H100), so the
softmax and the PV GEMM read the scores they just wrote from L2 instead of
HBM. The arithmetic is the explicit matmul -> softmax -> matmul of the math
backend, in the inputs' dtype with fp32 accumulation (softmax accumulates in
fp32 for fp16/bf16 inputs).

`min_head_dim`: when q's head dim is <= it, the op calls SDPA itself (the
fused kernel). passes/kernel_choice.py sets it to 0 where it knows the head
dim from the graph's shapes (the rewrite is then unconditional) and to the
threshold where the graph carries no shapes (the choice is made at run time).

GQA (fewer kv heads than query heads) repeats k and v over their query heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Scores alive at once per block, in bytes (a block of query rows of all
# batch x head rows). 32 MiB fits the H100's 50 MB L2; calibrate sweeps it.
DEFAULT_CHUNK_BYTES = 32 * 2 ** 20
# Query rows per block are a multiple of this (GEMM tile height), unless the
# whole query length is smaller.
ROW_QUANTUM = 128


def chunk_rows(rows_per_query: int, s_k: int, itemsize: int, s_q: int, chunk_bytes: int) -> int:
    """Query rows per block so that rows_per_query * rows * s_k * itemsize <= chunk_bytes
    (at least ROW_QUANTUM rows; a multiple of it; at most s_q)."""
    per_row = max(1, rows_per_query * s_k * itemsize)
    rows = max(ROW_QUANTUM, (chunk_bytes // per_row) // ROW_QUANTUM * ROW_QUANTUM)
    return int(min(rows, s_q))


def _mask_rows(mask: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    if mask is None or mask.dim() < 2 or mask.shape[-2] == 1:
        return mask
    return mask[..., start:stop, :]


def _apply_mask(s: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, start: int,
                s_k: int) -> torch.Tensor:
    if is_causal:
        # top-left aligned lower triangle: query row i keeps keys j <= i
        rows = torch.arange(start, start + s.shape[-2], device=s.device).unsqueeze(-1)
        cols = torch.arange(s_k, device=s.device)
        s = s.masked_fill(cols > rows, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
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
    rows = chunk_rows(bh, s_k, q.element_size(), s_q, chunk_bytes)
    for start in range(0, s_q, rows):
        stop = min(start + rows, s_q)
        s = torch.baddbmm(q3.new_empty(()).expand(bh, stop - start, s_k), q3[:, start:stop], kt,
                          beta=0.0, alpha=scale)
        m = _mask_rows(mask, start, stop)
        if m is not None:
            m = m.expand(*lead, stop - start, s_k).reshape(bh, stop - start, s_k)
        s = _apply_mask(s, m, is_causal, start, s_k)
        torch.bmm(torch.softmax(s, dim=-1), v3, out=out[:, start:stop])
    return out.reshape(*lead, s_q, d_v)


@torch.library.custom_op("helix::chunked_attention", mutates_args=())
def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      is_causal: bool, scale: float | None, chunk_bytes: int,
                      min_head_dim: int) -> torch.Tensor:
    if q.shape[-1] <= min_head_dim:
        gqa = q.dim() >= 3 and k.dim() >= 3 and q.shape[-3] != k.shape[-3]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              scale=scale, enable_gqa=gqa)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return _explicit(q, k, v, mask, is_causal, scale, chunk_bytes)


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
    rows = chunk_rows(bh, s_k, scores.element_size(), s_q, chunk_bytes)
    for start in range(0, s_q, rows):
        stop = min(start + rows, s_q)
        s = s3[:, start:stop] * scale
        m = _mask_rows(mask, start, stop)
        if m is not None:
            m = m.expand(*lead, stop - start, s_k).reshape(bh, stop - start, s_k)
        s = _apply_mask(s, m, is_causal, start, s_k)
        torch.bmm(torch.softmax(s, dim=-1).to(v3.dtype), v3, out=out[:, start:stop])
    return out.reshape(*lead, s_q, d_v)


@chunked_attend.register_fake
def _(scores, v, mask, is_causal, scale, chunk_bytes):
    return scores.new_empty((*scores.shape[:-1], v.shape[-1]))
