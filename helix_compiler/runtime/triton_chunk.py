"""The s > 1 chunk core as a split-KV (flash-decoding) Triton kernel returning (out, lse).

    chunk_attention_triton(q, k, v, bias, scale) -> (out, lse)

    q (B, H, T, d); k (B, H_kv, C, d); v (B, H_kv, C, d_v); H = g H_kv: query head h reads kv
    head h // g (Hugging Face's repeat_kv order); bias None or a float tensor that broadcasts
    to (B, H, T, C).

    x   = (q @ k^T) * scale + floor(bias)                        # fp32, (B, H, T, C)
    out = softmax(x) @ v                                         # (B, H, T, d_v), v's dtype
    lse = max_c x + log sum_c exp(x - max_c x)                   # fp32, (B, H, T)

The same semantics as the explicit math of the chunk core (`chunk_attention_math`; its copy
`chunk_attention_reference` below is the reference of tests/test_triton_chunk.py and of
benchmarks/gpu_triton_chunk.py): floor raises a finite bias below -1e30 (Hugging Face's
finfo(fp32).min mask) to -1e30 and keeps -inf, so a fully padded row has every score
equal (q k is lost below the ulp of 1e30): a uniform softmax and a finite lse; a row whose
every score is -inf (no visible key) gives out = 0 and lse = -inf.

Flash-decoding (Tri Dao et al., 2023), two kernels:

  stage 1, grid (B H_kv, row blocks, S):  the g query heads of a kv head are folded into its
      g T query rows, so K and V are read once, un-repeated; a program takes BLOCK_M of those
      rows and split i's range of keys [i K_s, (i + 1) K_s) in blocks of BLOCK_N, online
      softmax in fp32, and writes its partial (acc_i, m_i, l_i): acc_i = sum_c exp(x_c - m_i) v_c
      (not divided), m_i = max_c x_c, l_i = sum_c exp(x_c - m_i); a split whose scores are all
      -inf leaves m_i = -inf, l_i = 0, acc_i = 0 (the exps are taken against 0 there, never
      -inf - -inf).
  stage 2, grid (B H_kv g T):  M = max_i m_i, L = sum_i l_i exp(m_i - M),
      out = sum_i acc_i exp(m_i - M) / L, lse = M + log L; a dead row (M = -inf): out 0,
      lse -inf.

S (the number of splits) fills the GPU: about _PROGRAMS_PER_SM programs per multiprocessor,
each split at least _MIN_KEYS_PER_SPLIT keys, a multiple of BLOCK_N. At C = 131072, B = 1,
H_kv = 1 on an H200 (132 SMs) that is 128 splits of 1024 keys: each program reads 512 KiB of K
and V (fp16, d = 128), and the workspace (S, g T, d_v) fp32 is 512 KiB, under 1% of the 67 MB
of cache read.

fp32 inputs multiply in full fp32 (`input_precision="ieee"`, no TF32), so they match the
explicit math to ~1e-6; fp16 / bf16 take the tensor cores with fp32 accumulation, the
probabilities cast to v's dtype before P @ V (as flash attention does).

CUDA only, fp16 / bf16 / fp32, d and d_v up to 256, any strides (K and V are the cache: never
copied; the bias is passed as `bias.expand(B, H, T, C)`, stride 0 on its broadcast dims). With
TRITON_INTERPRET=1 (set before triton is imported) CPU tensors run in Triton's interpreter, for
tests. `import triton` is optional: without it this module imports and `fits` says False.
"""


import torch

from helix_compiler.errors import HelixError
from helix_compiler.runtime.triton_inputs import placement_refusal

try:
    import triton
    import triton.language as tl
except ImportError:        # the project does not depend on triton; fits() is False without it
    triton = tl = None

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256          # d and d_v: one BLOCK_D of next_power_of_2(d) columns in registers
_PROGRAMS_PER_SM = 1         # stage 1 programs per multiprocessor the split count aims at
# measured on an H200 (benchmarks/results/triton_chunk_h200_sweep.json, fastest of BLOCK_N,
# warps, stages per point): fp16, C = 131072, g = 8, d = 128, B = 1 / 2 / 4: 1 program per SM
# 28 / 43 / 73 us, 2 per SM 30 / 44 / 73 us, 1/2 per SM 39 / 69 / 114 us; an earlier run of
# 4 per SM at 4 warps took 49 / 61 / 92 us; 8 warps and 3 stages were the fastest for 16-bit
_MIN_KEYS_PER_SPLIT = 256    # below this a split's fixed cost (q load, partial write) dominates
_MAX_BLOCK_M = 64            # query rows (g T folded) per program
_COMBINE_ELEMENTS = 8192     # stage 2 loads (splits x d_v) tiles of this many fp32 at most
_TILE_BYTES = 32 * 1024      # a K or V tile of one pipeline stage
_INTERPRET_SMS = 4           # stands in for the multiprocessor count in the interpreter


def refusal(q, k, v, bias) -> str | None:
    """Why the kernel does not take this call, or None where it does."""
    if triton is None:
        return "triton is not importable"
    ts = {"q": q, "k": k, "v": v} | ({} if bias is None else {"bias": bias})
    why = placement_refusal(ts, _DTYPES, any_rank="bias")
    if why is not None:
        return why
    B, H, T, d = q.shape
    if k.shape[0] != B or k.shape[:3] != v.shape[:3] or k.shape[-1] != d or k.shape[1] == 0 \
            or H % k.shape[1]:
        return (f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}; expected q (B, H, T, d), "
                f"k (B, H_kv, C, d), v (B, H_kv, C, d_v) with H a multiple of H_kv")
    if max(d, v.shape[-1]) > _MAX_HEAD_DIM:
        return f"head dims d = {d}, d_v = {v.shape[-1]}; the kernel takes each up to {_MAX_HEAD_DIM}"
    if min(B, H, T, k.shape[2], d, v.shape[-1]) == 0:
        return f"an empty dim in q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}"
    if bias is not None:
        if not bias.dtype.is_floating_point:
            return f"bias is {bias.dtype}, not a float additive mask"
        try:
            torch.broadcast_shapes(bias.shape, (B, H, T, k.shape[2]))
            bias.expand(B, H, T, k.shape[2])
        except RuntimeError:
            return f"bias {list(bias.shape)} does not broadcast to (B, H, T, C) = {[B, H, T, k.shape[2]]}"
    return None


def fits(q, k, v, bias) -> bool:
    """Whether `chunk_attention_triton` takes this call (CUDA, or the CPU under
    TRITON_INTERPRET=1; fp16 / bf16 / fp32; d, d_v <= 256; triton importable)."""
    return refusal(q, k, v, bias) is None


def _num_splits(C: int, programs: int, block_n: int, device: torch.device) -> int:
    """Splits of the C keys so that stage 1 has about _PROGRAMS_PER_SM programs per
    multiprocessor (`programs` = B H_kv row blocks without splitting), each split at least
    _MIN_KEYS_PER_SPLIT keys."""
    sms = _INTERPRET_SMS if device.type == "cpu" else \
        torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, -(-_PROGRAMS_PER_SM * sms // programs))
    return max(1, min(want, C // _MIN_KEYS_PER_SPLIT, -(-C // block_n)))


def _block_n(block_d: int, element_size: int) -> int:
    # a K tile and a V tile of BLOCK_N x BLOCK_D per pipeline stage in shared memory (228 KiB on
    # an H100 / H200), each held to _TILE_BYTES: 128 keys of fp16 d = 128, 64 of fp32 or of fp16
    # d = 256, 32 of fp32 d = 256
    return max(16, min(128, _TILE_BYTES // (block_d * element_size)))


def chunk_attention_triton(q, k, v, bias, scale, *, num_splits: int | None = None,
                           block_n: int | None = None, num_warps: int | None = None,
                           num_stages: int | None = None):
    """(out, lse) of the chunk core by the split-KV kernel; the keywords override the choices
    of stage 1 (tests, benchmarks)."""
    why = refusal(q, k, v, bias)
    if why is not None:
        raise HelixError(f"chunk_attention_triton: {why}; call chunk_attention_math for these inputs")
    B, H, T, d = q.shape
    Hkv, C, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = H // Hkv
    GT = g * T
    BLOCK_D = max(16, triton.next_power_of_2(d))
    BLOCK_DV = max(16, triton.next_power_of_2(dv))
    BLOCK_M = min(_MAX_BLOCK_M, max(16, triton.next_power_of_2(GT)))
    BLOCK_N = block_n or _block_n(max(BLOCK_D, BLOCK_DV), q.element_size())
    row_blocks = triton.cdiv(GT, BLOCK_M)
    S = num_splits or _num_splits(C, B * Hkv * row_blocks, BLOCK_N, q.device)
    if not 1 <= S <= C:
        raise HelixError(f"chunk_attention_triton: num_splits = {S} for C = {C} keys; "
                         f"use 1 to {C}")
    keys_per_split = triton.cdiv(C, S)
    keys_per_split = triton.cdiv(keys_per_split, BLOCK_N) * BLOCK_N if num_splits is None \
        else keys_per_split
    S = triton.cdiv(C, keys_per_split)                            # no empty split

    acc = torch.empty((B * Hkv, S, GT, dv), dtype=torch.float32, device=q.device)
    m = torch.empty((B * Hkv, S, GT), dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    out = torch.empty((B, H, T, dv), dtype=v.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    if bias is None:
        bias_arg, bias_strides = q, (0, 0, 0, 0)                   # never read
    else:
        bias_arg = bias.expand(B, H, T, C)                        # stride 0 on broadcast dims
        bias_strides = bias_arg.stride()
    precision = "ieee" if q.dtype == torch.float32 else "tf32"    # tf32 ignored for 16-bit inputs
    big = max(BLOCK_D, BLOCK_DV) > 128 or q.dtype == torch.float32
    block_s = max(16, min(triton.next_power_of_2(S), _COMBINE_ELEMENTS // BLOCK_DV))
    device_guard = torch.cuda.device(q.device) if q.is_cuda else _NoGuard()
    with device_guard:
        _split_kernel[(B * Hkv, row_blocks, S)](
            q, k, v, bias_arg, acc, m, l,
            T, g, Hkv, C, GT, keys_per_split, S, float(scale), d, dv,
            *q.stride(), *k.stride(), *v.stride(), *bias_strides,
            HAS_BIAS=bias is not None, PRECISION=precision,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
            num_warps=num_warps or (4 if q.dtype == torch.float32 else 8),
            num_stages=num_stages or (2 if big else 3))
        _combine_kernel[(B * Hkv * GT,)](
            acc, m, l, out, lse, T, g, Hkv, GT, S, dv,
            *out.stride(), *lse.stride(),
            BLOCK_S=block_s, BLOCK_DV=BLOCK_DV, num_warps=4)
    return out, lse


class _NoGuard:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if triton is not None:

    @triton.jit
    def _split_kernel(Q, K, V, BIAS, ACC, M, L,
                      T, G, HKV, C, GT, KEYS_PER_SPLIT, NUM_SPLITS, scale, D, DV,
                      sqb, sqh, sqt, sqd, skb, skh, skc, skd, svb, svh, svc, svd,
                      sbb, sbh, sbt, sbc,
                      HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
        pid_bh = tl.program_id(0)                      # b H_kv + kv head
        pid_m = tl.program_id(1)                       # block of the g T folded query rows
        pid_s = tl.program_id(2)                       # split of the keys
        b = (pid_bh // HKV).to(tl.int64)
        hk = (pid_bh % HKV).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < GT
        h = hk * G + (rows // T).to(tl.int64)          # query head: kv head hk's g heads
        t = (rows % T).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        d_ok = offs_d < D
        dv_ok = offs_dv < DV

        q = tl.load(Q + b * sqb + h[:, None] * sqh + t[:, None] * sqt + offs_d[None, :] * sqd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)        # (BLOCK_M, BLOCK_D)
        k_base = K + b * skb + hk * skh
        v_base = V + b * svb + hk * svh
        bias_rows = BIAS + b * sbb + h[:, None] * sbh + t[:, None] * sbt

        lo = pid_s * KEYS_PER_SPLIT
        hi = tl.minimum(lo + KEYS_PER_SPLIT, C)
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < hi
            n64 = offs_n.to(tl.int64)
            kt = tl.load(k_base + n64[None, :] * skc + offs_d[:, None] * skd,
                         mask=n_ok[None, :] & d_ok[:, None], other=0.0)      # (BLOCK_D, BLOCK_N)
            x = tl.dot(q, kt, input_precision=PRECISION) * scale             # fp32
            if HAS_BIAS:
                bias = tl.load(bias_rows + n64[None, :] * sbc,
                               mask=row_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
                # finfo(fp32).min -> -1e30, -inf kept (chunk_core's _floor)
                x += tl.where(bias == float("-inf"), bias, tl.maximum(bias, -1e30))
            x = tl.where(n_ok[None, :], x, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(x, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)              # no -inf - -inf
            p = tl.exp(x - m_ref[:, None])
            alpha = tl.exp(m_i - m_ref)
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(v_base + n64[:, None] * svc + offs_dv[None, :] * svd,
                         mask=n_ok[:, None] & dv_ok[None, :], other=0.0)     # (BLOCK_N, BLOCK_DV)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
            m_i = m_new

        # workspace (B H_kv, S, g T[, d_v])
        part = (pid_bh.to(tl.int64) * NUM_SPLITS + pid_s) * GT + rows
        tl.store(M + part, m_i, mask=row_ok)
        tl.store(L + part, l_i, mask=row_ok)
        tl.store(ACC + part[:, None] * DV + offs_dv[None, :], acc,
                 mask=row_ok[:, None] & dv_ok[None, :])

    @triton.jit
    def _combine_kernel(ACC, M, L, OUT, LSE, T, G, HKV, GT, NUM_SPLITS, DV,
                        sob, soh, sot, sod, slb, slh, slt,
                        BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr):
        pid = tl.program_id(0)                         # one folded query row of one kv head
        bh = (pid // GT).to(tl.int64)
        r = pid % GT
        offs_s = tl.arange(0, BLOCK_S)
        offs_dv = tl.arange(0, BLOCK_DV)
        dv_ok = offs_dv < DV
        first = bh * NUM_SPLITS * GT + r               # (bh, split 0, r)

        m_vec = tl.zeros([BLOCK_S], dtype=tl.float32) - float("inf")
        for s0 in range(0, NUM_SPLITS, BLOCK_S):
            s = s0 + offs_s
            m_vec = tl.maximum(m_vec, tl.load(M + first + s * GT, mask=s < NUM_SPLITS,
                                              other=float("-inf")))
        m_max = tl.max(m_vec, 0)
        dead = m_max == float("-inf")                  # no split saw a visible key
        m_ref = tl.where(dead, 0.0, m_max)

        l_vec = tl.zeros([BLOCK_S], dtype=tl.float32)
        o = tl.zeros([BLOCK_S, BLOCK_DV], dtype=tl.float32)
        for s0 in range(0, NUM_SPLITS, BLOCK_S):
            s = s0 + offs_s
            s_ok = s < NUM_SPLITS
            idx = first + s * GT
            w = tl.exp(tl.load(M + idx, mask=s_ok, other=float("-inf")) - m_ref)   # 0 for m_i -inf
            l_vec += tl.load(L + idx, mask=s_ok, other=0.0) * w
            a = tl.load(ACC + idx[:, None] * DV + offs_dv[None, :],
                        mask=s_ok[:, None] & dv_ok[None, :], other=0.0)
            o += a * w[:, None]
        l_sum = tl.sum(l_vec, 0)
        out = tl.sum(o, 0) / tl.where(dead, 1.0, l_sum)                    # a dead row: 0 / 1
        lse = tl.where(dead, float("-inf"), m_ref + tl.log(tl.where(dead, 1.0, l_sum)))

        b = bh // HKV
        h = (bh % HKV) * G + r // T
        t = r % T
        tl.store(OUT + b * sob + h * soh + t * sot + offs_dv * sod,
                 out.to(OUT.dtype.element_ty), mask=dv_ok)
        tl.store(LSE + b * slb + h * slh + t * slt, lse)
