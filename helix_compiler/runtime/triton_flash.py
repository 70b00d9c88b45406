"""The attention core at head dims no fused SDPA kernel takes (d up to 512), as one flash-attention
Triton kernel: the CUDA path of `torch.ops.helix.chunked_attention` (kernels_chunked.py).

    flash_attention_triton(q, k, v, mask, is_causal, scale) -> out

    q (B, H, T, d); k (B, H_kv, S, d); v (B, H_kv, S, d_v); H = g H_kv: query head h reads kv
    head h // g (Hugging Face's repeat_kv order, the explicit path's repeat_interleave); mask None,
    bool (True = attend) or float (added), broadcasting to (B, H, T, S); is_causal: SDPA's
    top-left-aligned lower triangle (query row i sees keys j <= i).

    x   = (q @ k^T) * scale + mask                       # fp32, (B, H, T, S); -inf where hidden
    out = softmax(x) @ v                                 # (B, H, T, d_v), v's dtype

The semantics of the explicit chunked path (`kernels_chunked._explicit`, `kernels.softmax_v`):
a row with no visible key (every score -inf) gives 0, never NaN; a fully padded row of Hugging
Face's finfo(fp32).min mask has every score equal (q k is lost below the ulp of 3.4e38), so its
softmax is uniform, as SDPA's math gives. The scores stay in natural-log units (`tl.exp`, not
exp2 of pre-scaled scores) so that finfo.min is never scaled past -inf: no floor is needed, unlike
triton_chunk's. One difference: with 16-bit inputs the explicit path rounds the scores to the
inputs' dtype before the mask is added and softmax runs; here scores stay fp32 (as in the fused
SDPA kernels), so a fully padded row under a finfo(fp16).min mask is softmax(q k scale) here and
nearly uniform there (both are garbage rows that a model never reads).

Flash attention 2 (Tri Dao, 2023), forward only: a program takes BLOCK_M query rows of one
(b, h) and the keys in blocks of BLOCK_N, online softmax in fp32 (running max m_i, running sum
l_i, accumulator acc = sum exp(x - m_i) v, rescaled by exp(m_old - m_new) when the max grows),
out = acc / l_i at the end (a dead row: 0 / 1). The probabilities are cast to v's dtype before
P @ V (as flash attention does); fp32 inputs multiply in full fp32 (`input_precision="ieee"`,
no TF32), so they match the explicit math to ~1e-6. Under is_causal a row block stops at its
last row's key: half the work.

d = 512 is the hard part: a BLOCK_M x 512 fp32 accumulator is 128 KiB at BLOCK_M = 64, half of
an SM's register file. `FlashConfig.dv_split` splits d_v over the grid: each of dv_split
programs of a row block recomputes Q K^T (the full d) and accumulates its d_v / dv_split
columns, so the accumulator shrinks by dv_split at the price of (dv_split - 1) more Q K^T
(useful work 4 B H T S d; done work 2 B H T S d (dv_split + 1)). The dv_split programs of a row
block are adjacent in launch order, so they read the same K and V tiles from L2. `CONFIGS` is
the table benchmarks/gpu_triton_flash.py sweeps on the GPU; `DEFAULT_CONFIG` (16-bit) and
`FP32_CONFIG` are what the op runs.

CUDA only, fp16 / bf16 / fp32, d and d_v multiples of 16 up to 512, any strides (the mask is
passed as `mask.expand(B, H, T, S)`: stride 0 on its broadcast dims; a bool mask is read as
bytes). With TRITON_INTERPRET=1 (set before triton is imported) CPU tensors run in Triton's
interpreter, for tests. `import triton` is optional: without it this module imports and `fits`
says False.
"""

from __future__ import annotations

import dataclasses

import torch

from helix_compiler.errors import HelixError
from helix_compiler.runtime.triton_inputs import placement_refusal

try:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources   # a config too big for the GPU
except ImportError:        # the project does not depend on triton; fits() is False without it
    triton = tl = None
    OutOfResources = ()    # catches nothing

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 512           # d and d_v: one BLOCK_D of next_power_of_2(d) columns per Q K^T
HEAD_DIM_QUANTUM = 16        # tl.dot's smallest K extent; d and d_v are multiples of it


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class FlashConfig:
    """One launch configuration: query rows and keys per tile, warps, software-pipeline stages,
    and the number of programs d_v is split over (each recomputes Q K^T for its slice)."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    dv_split: int = 1

    def __post_init__(self):
        for name in ("block_m", "block_n", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise HelixError(f"FlashConfig: {name} = {v} is not a power of 2; "
                                 f"use e.g. 16, 32, 64")
        if min(self.block_m, self.block_n) < 16:
            raise HelixError(f"FlashConfig: block_m = {self.block_m}, block_n = {self.block_n}; "
                             f"tl.dot needs tiles of at least 16, use 16 or more")
        if self.num_stages < 1:
            raise HelixError(f"FlashConfig: num_stages = {self.num_stages}; use 1 or more")
        if self.dv_split not in (1, 2, 4):
            raise HelixError(f"FlashConfig: dv_split = {self.dv_split}; use 1, 2 or 4")

    @property
    def name(self) -> str:
        return (f"m{self.block_m}_n{self.block_n}_w{self.num_warps}_s{self.num_stages}"
                f"_dv{self.dv_split}")


# The table benchmarks/gpu_triton_flash.py sweeps at d = 512, fp16, on an H200 (per SM: 228 KiB
# of shared memory, 64 Ki 32-bit registers, at most 255 a thread). Shared memory, if Q stays
# there (wgmma reads its A operand from it) and each pipeline stage holds a K and a V tile:
#     2 bytes x (BLOCK_M x 512 + num_stages x BLOCK_N x (512 + 512 / dv_split))
# (the KiB column); every entry is under 228 KiB, the last dv_split 2 one only just. The fp32
# accumulator BLOCK_M x 512 / dv_split over 32 num_warps threads (the regs column: 64 x 512 over
# 8 warps is 128 a thread, 16 warps may hold at most 128 each). A config that does not compile
# is a row with its error in the benchmark.
CONFIGS = (                                                                 # KiB  regs
    # dv_split 1: Q K^T once (work done = useful work); the accumulator is the pressure
    FlashConfig(block_m=64, block_n=32, num_warps=8, num_stages=2, dv_split=1),    # 192  128
    FlashConfig(block_m=64, block_n=32, num_warps=16, num_stages=2, dv_split=1),   # 192   64
    FlashConfig(block_m=64, block_n=16, num_warps=8, num_stages=3, dv_split=1),    # 160  128
    FlashConfig(block_m=64, block_n=64, num_warps=8, num_stages=1, dv_split=1),    # 192  128
    FlashConfig(block_m=64, block_n=64, num_warps=16, num_stages=1, dv_split=1),   # 192   64
    # dv_split 2: 1.5x the work, a 256-column accumulator (flash attention's d = 256 shape)
    FlashConfig(block_m=64, block_n=32, num_warps=4, num_stages=2, dv_split=2),    # 160  128
    FlashConfig(block_m=64, block_n=32, num_warps=8, num_stages=2, dv_split=2),    # 160   64
    FlashConfig(block_m=64, block_n=32, num_warps=8, num_stages=3, dv_split=2),    # 208   64
    FlashConfig(block_m=64, block_n=64, num_warps=8, num_stages=1, dv_split=2),    # 160   64
    FlashConfig(block_m=128, block_n=32, num_warps=8, num_stages=1, dv_split=2),   # 176  128
    FlashConfig(block_m=128, block_n=16, num_warps=8, num_stages=2, dv_split=2),   # 176  128
    FlashConfig(block_m=128, block_n=32, num_warps=16, num_stages=2, dv_split=2),  # 224   64
    # dv_split 4: 2.5x the work, a 128-column accumulator (flash attention's d = 128 shape)
    FlashConfig(block_m=128, block_n=32, num_warps=8, num_stages=2, dv_split=4),   # 208   64
    FlashConfig(block_m=128, block_n=16, num_warps=8, num_stages=3, dv_split=4),   # 188   64
    FlashConfig(block_m=128, block_n=64, num_warps=8, num_stages=1, dv_split=4),   # 208   64
    FlashConfig(block_m=64, block_n=32, num_warps=4, num_stages=3, dv_split=4),    # 184   64
)
# What the op runs for fp16 / bf16: the fastest causal config of the H200 sweep
# (benchmarks/results/triton_flash_h200.json, d = 512, T = S = 10000, 16 heads: 7.8 ms causal,
# 18.8 ms dense; the fastest dense config, 64 x 64 dv_split 1, takes 16.8 dense and 9.7 causal).
# The op runs the kernel for causal cores only (kernels_chunked._use_triton: measured faster there).
DEFAULT_CONFIG = CONFIGS[9]
# fp32 (ieee dots, 4-byte tiles): small tiles, the accumulator split in two; 80 KiB as above.
FP32_CONFIG = FlashConfig(block_m=16, block_n=16, num_warps=4, num_stages=1, dv_split=2)


def refusal(q, k, v, mask) -> str | None:
    """Why the kernel does not take this call, or None where it does."""
    if triton is None:
        return "triton is not importable"
    ts = {"q": q, "k": k, "v": v} | ({} if mask is None else {"mask": mask})
    why = placement_refusal(ts, _DTYPES, any_rank="mask")
    if why is not None:
        return why
    B, H, T, d = q.shape
    if k.shape[0] not in (1, B) or k.shape[:3] != v.shape[:3] or k.shape[-1] != d \
            or k.shape[1] == 0 or H % k.shape[1]:
        return (f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}; "
                f"expected q (B, H, T, d), k (B, H_kv, S, d), v (B, H_kv, S, d_v) "
                f"with H a multiple of H_kv")
    dv = v.shape[-1]
    if max(d, dv) > MAX_HEAD_DIM or d % HEAD_DIM_QUANTUM or dv % HEAD_DIM_QUANTUM:
        return (f"head dims d = {d}, d_v = {dv}; the kernel takes multiples of {HEAD_DIM_QUANTUM} "
                f"up to {MAX_HEAD_DIM}")
    if min(B, H, T, k.shape[2]) == 0:
        return f"an empty dim in q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}"
    if mask is not None:
        if not (mask.dtype == torch.bool or mask.dtype.is_floating_point):
            return f"mask is {mask.dtype}, neither bool (True = attend) nor a float additive mask"
        try:
            mask.expand(B, H, T, k.shape[2])
        except RuntimeError:
            return (f"mask {list(mask.shape)} does not broadcast to (B, H, T, S) = "
                    f"{[B, H, T, k.shape[2]]}")
    return None


def fits(q, k, v, mask) -> bool:
    """Whether `flash_attention_triton` takes this call (CUDA, or the CPU under
    TRITON_INTERPRET=1; fp16 / bf16 / fp32; d, d_v multiples of 16 up to 512; triton importable)."""
    return refusal(q, k, v, mask) is None


def default_config(dtype: torch.dtype) -> FlashConfig:
    return FP32_CONFIG if dtype == torch.float32 else DEFAULT_CONFIG


def flash_attention_triton(q, k, v, mask, is_causal: bool, scale: float, *,
                           config: FlashConfig | None = None) -> torch.Tensor:
    """softmax(q k^T scale + mask) @ v by the flash kernel; `config` overrides the default
    launch configuration (tests, benchmarks)."""
    why = refusal(q, k, v, mask)
    if why is not None:
        raise HelixError(f"flash_attention_triton: {why}; the explicit chunked path "
                         f"(kernels_chunked, USE_TRITON = False) takes these inputs")
    cfg = config or default_config(q.dtype)
    B, H, T, d = q.shape
    Hkv, S, dv = k.shape[1], k.shape[2], v.shape[-1]
    k, v = k.expand(B, Hkv, S, d), v.expand(B, Hkv, S, dv)        # a batch-1 K / V: stride 0
    BLOCK_D = triton.next_power_of_2(d)
    BLOCK_DV = max(16, triton.next_power_of_2(triton.cdiv(dv, cfg.dv_split)))
    n_dv = triton.cdiv(dv, BLOCK_DV)                               # <= dv_split programs per rows
    BLOCK_M = min(cfg.block_m, max(16, triton.next_power_of_2(T)))   # T = 1: one 16-row tile
    out = torch.empty((B, H, T, dv), dtype=v.dtype, device=q.device)
    if mask is None:
        mask_arg, mask_strides, kind = q, (0, 0, 0, 0), 0          # never read
    else:
        mask_arg = mask.expand(B, H, T, S)                         # stride 0 on broadcast dims
        mask_strides = mask_arg.stride()
        kind = 1 if mask.dtype == torch.bool else 2
        if kind == 1:
            mask_arg = mask_arg.view(torch.uint8)                  # bytes: 1 = attend
    precision = "ieee" if q.dtype == torch.float32 else "tf32"    # tf32 ignored for 16-bit inputs
    grid = (triton.cdiv(T, BLOCK_M) * n_dv, B * H)
    device_guard = torch.cuda.device(q.device) if q.is_cuda else _NoGuard()
    with device_guard:
        _flash_kernel[grid](
            q, k, v, mask_arg, out,
            T, S, H // Hkv, H, d, dv, float(scale),
            *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
            MASK_KIND=kind, IS_CAUSAL=bool(is_causal), PRECISION=precision,
            BLOCK_M=BLOCK_M, BLOCK_N=cfg.block_n, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
            N_DV=n_dv, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


class _NoGuard:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if triton is not None:

    @triton.jit
    def _flash_kernel(Q, K, V, MASK, OUT,
                      T, S, G, H, D, DV, scale,
                      sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                      smb, smh, smt, sms, sob, soh, sot, sod,
                      MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, N_DV: tl.constexpr):
        pid_m = tl.program_id(0) // N_DV               # block of query rows
        pid_v = tl.program_id(0) % N_DV                # slice of d_v: adjacent, same K / V tiles
        pid_bh = tl.program_id(1)                      # b H + query head
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        hk = h // G                                    # its kv head
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < T
        rows64 = rows.to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
        d_ok = offs_d < D
        v_ok = offs_v < DV

        q = tl.load(Q + b * sqb + h * sqh + rows64[:, None] * sqt + offs_d[None, :] * sqd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)        # (BLOCK_M, BLOCK_D)
        k_base = K + b * skb + hk * skh
        v_base = V + b * svb + hk * svh
        mask_rows = MASK + b * smb + h * smh + rows64[:, None] * smt

        hi = S
        if IS_CAUSAL:                                  # keys past the block's last row: hidden
            hi = tl.minimum(S, (pid_m + 1) * BLOCK_M)
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        for start in range(0, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < S
            n64 = offs_n.to(tl.int64)
            kt = tl.load(k_base + n64[None, :] * sks + offs_d[:, None] * skd,
                         mask=n_ok[None, :] & d_ok[:, None], other=0.0)      # (BLOCK_D, BLOCK_N)
            x = tl.dot(q, kt, input_precision=PRECISION) * scale             # fp32, natural log
            if MASK_KIND == 1:
                keep = tl.load(mask_rows + n64[None, :] * sms,
                               mask=row_ok[:, None] & n_ok[None, :], other=1)
                x = tl.where(keep != 0, x, float("-inf"))
            if MASK_KIND == 2:
                x += tl.load(mask_rows + n64[None, :] * sms,
                             mask=row_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
            if IS_CAUSAL:                              # top-left aligned: key j <= row i
                x = tl.where(offs_n[None, :] <= rows[:, None], x, float("-inf"))
            x = tl.where(n_ok[None, :], x, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(x, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)              # no -inf - -inf
            p = tl.exp(x - m_ref[:, None])             # finfo.min - max stays finite or -inf: 0
            alpha = tl.exp(m_i - m_ref)
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(v_base + n64[:, None] * svs + offs_v[None, :] * svd,
                         mask=n_ok[:, None] & v_ok[None, :], other=0.0)      # (BLOCK_N, BLOCK_DV)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
            m_i = m_new

        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]                 # a dead row: 0 / 1
        tl.store(OUT + b * sob + h * soh + rows64[:, None] * sot + offs_v[None, :] * sod,
                 out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & v_ok[None, :])
