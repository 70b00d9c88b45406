"""The s > 1 chunk core as one op returning (out, lse): `torch.ops.helix.chunk_attention`.

    helix.chunk_attention(q, k, v, bias, scale) -> (out, lse)

    q (B, H, T, d); k (B, H_kv, C, d); v (B, H_kv, C, d_v); H a multiple of H_kv: query head h
    reads kv head h // (H / H_kv) (Hugging Face's repeat_kv order); bias None or a float tensor
    that broadcasts to (B, H, T, C).

    x   = (q @ k^T) * scale + bias                               # fp32, (B, H, T, C)
    out = softmax(x) @ v                                         # (B, H, T, d_v), v's dtype
    lse = max_c x + log sum_c exp(x - max_c x)                   # fp32, (B, H, T)

A finite bias below -1e30 (Hugging Face's finfo(fp32).min mask) is taken as -1e30
(`_floor`): a kernel that scales its scores by log2(e) before exp2 would overflow finfo.min
to -inf and take a fully padded row for one with no visible key. Nothing else changes: a
masked score still weighs exp(-1e30 - max) = 0, and a fully padded row still has every score
equal (q k is lost below the ulp of 1e30, as below finfo.min), so its softmax is uniform
and its lse the same -1e30 in every chunk of equal size.

A row whose every score is -inf (no visible key) gives out = 0 and lse = -inf, as
`aten._safe_softmax` and the fused SDPA kernels give it. passes/seq_split.py combines the s
chunks' (out, lse) exactly when the chunks are of equal size (docs/decode.md, "The fused chunk
core").

On CUDA (fp16 / bf16 / fp32, head dims multiples of 8) it runs torch's memory-efficient SDPA
kernel with its log-sum-exp (`aten._scaled_dot_product_efficient_attention(...,
compute_log_sumexp=True)`; the only torch kernel taking an arbitrary additive bias that returns
(out, lse); its lse is padded to a multiple of 32 query rows, cut here); GQA folds the g query
heads of a kv head into its query rows (as passes/gqa_fold.py does), so K and V are read
un-repeated. Elsewhere it runs the explicit math above (`chunk_attention_math`).
"""

from __future__ import annotations

import torch

from helix_compiler.errors import HelixError

# the memory-efficient kernel loads head dims and the bias's rows in multiples of this
_ALIGN = 8
_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


_BIAS_FLOOR = -1e30


def _floor(bias: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`bias` with finite values below _BIAS_FLOOR (or `dtype`'s finfo.min, where higher: an
    fp32 mask going into an fp16 kernel) raised to it, -inf kept."""
    low = max(_BIAS_FLOOR, torch.finfo(dtype or bias.dtype).min)
    if torch.finfo(bias.dtype).min >= low:
        return bias                     # fp16's finfo.min (-65504) is far above the floor
    return torch.where(bias == float("-inf"), bias, bias.clamp_min(low))


def _check(q, k, v) -> int:
    """g = H / H_kv, after checking the shapes."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[0] != k.shape[0] \
            or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1] or k.shape[1] == 0 \
            or q.shape[1] % k.shape[1]:
        raise HelixError(f"chunk_attention: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}; "
                         f"expected q (B, H, T, d), k (B, H_kv, C, d), v (B, H_kv, C, d_v) with H a "
                         f"multiple of H_kv")
    return q.shape[1] // k.shape[1]


def chunk_attention_math(q, k, v, bias, scale):
    """(out, lse) by the explicit math, in fp32, K and V read un-repeated (the g query heads
    of a kv head folded into its rows)."""
    g = _check(q, k, v)
    B, H, T, d = q.shape
    Hkv = k.shape[1]
    qf = q.float().reshape(B, Hkv, g * T, d)
    x = (qf @ k.float().transpose(-2, -1)).view(B, H, T, -1) * scale
    if bias is not None:
        x = x + _floor(bias.float())
    m = x.amax(-1, keepdim=True)                                  # (B, H, T, 1)
    dead = m == float("-inf")                                     # no visible key
    m = m.masked_fill(dead, 0.0)
    e = torch.exp(x - m)
    l = e.sum(-1, keepdim=True)
    o = (e.reshape(B, Hkv, g * T, -1) @ v.float()).view(B, H, T, -1)
    out = o / l.masked_fill(dead, 1.0)                            # a dead row: e = 0, out 0
    lse = (m + torch.log(l)).squeeze(-1)                          # a dead row: log 0 = -inf
    return out.to(v.dtype), lse


def _fused_takes(q, k, v) -> bool:
    return q.is_cuda and q.dtype in _CUDA_DTYPES and q.dtype == k.dtype == v.dtype \
        and q.shape[-1] % _ALIGN == 0 and v.shape[-1] % _ALIGN == 0


def _chunk_attention_cuda(q, k, v, bias, scale):
    g = _check(q, k, v)
    B, H, T, d = q.shape
    Hkv, C = k.shape[1], k.shape[2]
    qf = q.reshape(B, Hkv, g * T, d)                              # a view for a decode step
    attn_bias = None
    if bias is not None:
        # the kernel takes the bias in q's dtype, (B, H_kv, g T, C), rows aligned to 8 elements
        full = torch.empty((B, Hkv, g * T, -(-C // _ALIGN) * _ALIGN), dtype=q.dtype,
                           device=q.device)[..., :C]
        full.view(B, H, T, C).copy_(_floor(bias, q.dtype).expand(B, H, T, C))
        attn_bias = full
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        qf, k, v, attn_bias, True, 0.0, False, scale=scale)
    lse = lse[..., :g * T].reshape(B, H, T).float()               # padded to 32 query rows
    out = out.view(B, H, T, -1).masked_fill((lse == float("-inf")).unsqueeze(-1), 0.0)
    return out, lse


@torch.library.custom_op("helix::chunk_attention", mutates_args=())
def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    if _fused_takes(q, k, v):
        return _chunk_attention_cuda(q, k, v, bias, scale)
    return chunk_attention_math(q, k, v, bias, scale)


@chunk_attention.register_fake
def _(q, k, v, bias, scale):
    _check(q, k, v)
    return (q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=v.dtype),
            q.new_empty(q.shape[:-1], dtype=torch.float32))
