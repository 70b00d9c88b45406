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

On CUDA, where Triton is importable (it ships with torch's CUDA wheels; the project does
not depend on it), it runs a split-KV (flash-decoding) Triton kernel
(runtime/triton_chunk.py): the g query heads of a kv head are folded into its rows, so K
and V are read once, un-repeated, the chunk's keys are split over the GPU's SMs, and the
splits' (acc, max, sum) are combined by a second kernel. Elsewhere (the CPU, or no Triton)
it runs the explicit math above (`chunk_attention_math`). torch's memory-efficient SDPA
kernel was tried here first and reverted: it does not split the keys of a query row (5.5 ms
per chunk core at C = 131072 on an H200) and gave a finite lse for a row with no visible key.
"""

from __future__ import annotations

import torch

from helix_compiler.errors import HelixError

from . import triton_chunk

_BIAS_FLOOR = -1e30


def _floor(bias: torch.Tensor) -> torch.Tensor:
    """`bias` with finite values below _BIAS_FLOOR raised to it, -inf kept (the Triton kernel
    applies the same floor as it loads the bias)."""
    if torch.finfo(bias.dtype).min >= _BIAS_FLOOR:
        return bias                     # fp16's finfo.min (-65504) is far above the floor
    return torch.where(bias == float("-inf"), bias, bias.clamp_min(_BIAS_FLOOR))


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


@torch.library.custom_op("helix::chunk_attention", mutates_args=())
def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    # CUDA tensors only: under TRITON_INTERPRET=1 (set by the kernel's tests) fits() holds on the
    # CPU too, and a model run on the CPU keeps the math, as kernels_chunked's op does
    if q.is_cuda and triton_chunk.fits(q, k, v, bias):
        _check(q, k, v)
        return triton_chunk.chunk_attention_triton(q, k, v, bias, scale)   # floors the bias itself
    return chunk_attention_math(q, k, v, bias, scale)


@chunk_attention.register_fake
def _(q, k, v, bias, scale):
    _check(q, k, v)
    return (q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=v.dtype),
            q.new_empty(q.shape[:-1], dtype=torch.float32))
