r"""Decode planner (issue 15, item 2): time per output token of a GQA decoder on N devices.

A decode step takes one new token for each of B sequences (the concurrency) whose
KV cache holds C positions (the context). A plan is dp x (s, m, n), dp s m n = N: dp
replicas (data parallel over the sequences: each replica serves B / dp of them on N / dp
ranks, the whole model on every replica), each split (s, m, n). The formulas below are one
replica's, with B its own sequences and N its own ranks; tokens/s counts all replicas'.
Per rank, per step, with the split (s, m, n), s m n = N: n head groups, m head-dim slices, s chunks of the cache's
positions (flash-decoding across GPUs); h = H/n query heads and
h_kv = max(H_kv/n, 1) kv heads per rank (n > H_kv: each kv head copied n/H_kv
times, as tensor parallelism copies them):

    KV cache per rank     2 L B (C/s) h_kv (d/m) w                          kv_cache_rank
                          = 2 L B C H_kv d w / N exactly when n <= H_kv     kv_cache_model
    weights per rank      L w (D (h + 2 h_kv) d/m + (h d/m) D               weights_rank
                               + (u + 1) D ceil(F/N)) + w R
    t_op                  max(FLOPs / (P eta), bytes / (BW eta_mem))        op_time
    compute per layer     q/k/v/o GEMVs (2 B params FLOPs, w params bytes)  attn_weight_*
                          + attention core over the cache slice            core_* / kv_read_*
                          + MLP GEMVs                                      mlp_weight_*
                          + kernels x t_kernel (a CUDA-graphed step's       kernel_time
                            floor: launch, ramp and tail of each kernel)
                          + explicit core (m > 1, or s > 1 with unequal    explicit_rows_time
                            chunks or score-reduce; else s > 1 runs the
                            fused helix.chunk_attention): t_row per K
                            row (B h_kv C/s rows of d/m: the cache read
                            un-repeated, GQA's g query heads of a kv head
                            folded into the query rows, passes/gqa_fold.py),
                            qk-gather also t_gather per row and slice       gather_rows_time
    communication per layer (alpha-beta, cost.collective_s):
      m > 1 score-reduce  all-reduce of 4 B h (C/s) fp32 scores, m-group    score_reduce_bytes
      m > 1 qk-gather     all-gather of w B (h + h_kv C/s) d, m-group       qk_gather_bytes
      s > 1 combine       all-gather of each chunk's row max and sum,       combine_gather_bytes
                          4 B h 2 s fp32 gathered, s-group (fused chunk
                          core: its row lse, 4 B h s)                       combine_lse_gather_bytes
        m n = 1 only      all-reduce of the rescaled partial output,        combine_unfolded_bytes
                          w B h d/m, s-group (no output all-reduce to
                          fold the sum over chunks into)
      output projection   all-reduce of w B D over the m n ranks of a chunk out_bytes
                          (s = 1), over all N (s > 1: it sums the chunks'
                          partial outputs too)
      MLP                 all-reduce of w B D over all N                    out_bytes
    TPOT                  L (compute + comm per layer) + replicated reads   tpot
    tokens/s              dp B / TPOT (every replica's)                     tokens_per_s

This prices what compile_decoder builds (helix_compiler/decode.py): the s ranks of
head group i, dim slice j hold the same q/k/v/o weight slices (1/(m n) of
attention's) and compute the new token's q, k, v and the output projection alike
(only the rank owning position C writes k, v); with s > 1 the core is explicit
(passes/explicit_cache_cores.py) and passes/seq_split.py combines it by one
all-gather of (max, sum) per row (or, with equal chunks and no score all-reduce,
runs it as the fused helix.chunk_attention combined by one all-gather of lse per
row: `built_fused_chunk`, FUSED_COMBINE_KERNELS) and folds the sum over chunks into the output
projection's all-reduce, widened to the mesh; passes/mesh_mlp.py shards each MLP
over all N ranks. Ranks are laid out as runtime/mesh.Mesh lays them out, rank =
(i m + j) s + k: the s-group contiguous. A plan fits when weights + cache +
workspace <= phi x device memory (or the --memory-cap); the decode objective is
the smallest TPOT among the plans that fit. The replicated reads are the LM head
and the norms (R_read, `DecodeShape.replicated_read_params`), not the embedding,
of which a step reads B rows.

`formulas()` returns every formula above as a sympy expression; the numbers are
computed from those very expressions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field

import sympy
from sympy import Max, ceiling

from .cluster import ClusterSpec, normalize_dtype
from .cost import MEMORY_USABLE_FRACTION, collective_s, group_span
from .cost import formulas as _cost_formulas
from ..errors import PlanError
from .profile import DEFAULT_PROFILE, ComputeProfile
from ..runtime.mesh import Mesh
from .sites import ModelSummary

# --- settings -----------------------------------------------------------------
# Bytes of one score or log-sum-exp on the wire: score-reduce sums partial dot products of
# d/m dims, and the flash-decoding combine rescales by exp(lse_i - lse); both in fp32 so the
# partial sums keep the precision of an unsplit core.
SCORE_BYTES = 4
# Passes over the (B, h, C/s) scores of an explicit decode core (score-reduce, qk-gather):
# QK^T writes them, softmax reads and writes, PV reads. A fused decode kernel (m = 1) keeps
# them on chip: 0 passes.
EXPLICIT_SCORE_PASSES = 4
# Score-sized fp32 tensors alive at once in an explicit core (scores and probabilities).
SCORE_COPIES = 2
VARIANTS = ("heads", "score-reduce", "qk-gather")
# Kernels one decode layer launches (benchmarks/gpu_decode.py `_step`, counted as ATen ops that
# are not views): q and kv GEMVs, the k and v writes, o GEMV, residual add, the rms_norm (5),
# gate-up GEMV, silu, mul, down GEMV, residual add = 16, plus the core: 1 fused kernel (m = 1);
# 7 for an explicit core (QK^T, fp32 cast, scale, log-sum-exp, softmax, cast back, PV);
# qk-gather adds the repeat of q and one copy per slice of the gathered K (m).
KERNELS_PER_LAYER = {"heads": 17, "score-reduce": 23, "qk-gather": 24}
# s > 1 (passes/seq_split.py's combine, as benchmarks/gpu_decode.py `_chunk_core` runs it,
# counted as ATen ops that are not views): the explicit core's log-sum-exp and softmax (2)
# become the chunk's max, its clamp to finfo.min, sub, exp and sum (5): +3; after PV, the
# cat of (max, sum), then M (max), exp(m_k - M) (sub, exp), L (mul, sum), the chunk's scale
# (div), its cast to the output's dtype and the rescale (mul): +9. (The fp32 graph has no
# cast: 11; an SDPA-written core's guard of an all -inf row, eq and masked_fill, not counted.)
COMBINE_KERNELS = 12
# s > 1 with equal chunks (context % s == 0) and no score all-reduce (m = 1, qk-gather): the
# built core is the fused helix.chunk_attention (`built_fused_chunk`), priced as a fused core
# (no score passes, no K rows; its split-KV kernel is the 1 of "heads") plus, as
# benchmarks/gpu_decode.py `_fused_chunk_core` runs it, counted as ATen ops that are not views:
# the Triton kernel's second stage (combining its key splits) = 1; the combine's M (amax,
# clamp), exp(lse_k - M) (sub, exp), their sum, the chunk's weight (div), its cast to the
# output's dtype and the rescale (mul) = 8. (An SDPA-written core's guard of a row -inf in every
# chunk, eq and masked_fill, not counted, as in COMBINE_KERNELS.) Until 2026-12-02 (torch's
# memory-efficient kernel) the op added a bias copy, an lse cut and a dead-row guard: 12.
FUSED_COMBINE_KERNELS = 9
# Seconds per kernel of a CUDA-graphed decode step beyond its roofline time (launch, ramp and
# tail of a small kernel), and per K row (one sequence, kv head and position, d/m wide) of an
# explicit core (its two batched matmuls over d/m-wide rows run at ~5 rows per ns whatever
# d/m), and per row and slice of qk-gather's K assembly (m strided copies): least squares on
# the 147 rows of benchmarks/results/decode_h200.json (H200, LLaMA-70B shape, B 8, C 32k-128k;
# `python benchmarks/gpu_decode.py --reassemble FILE` refits them from a new run's rows).
KERNEL_S = 3.05e-6
EXPLICIT_ROW_S = 0.180e-9
GATHER_ROW_S = 0.044e-9
# LLaMA-3-70B: 80 layers, 64 heads, 8 kv heads, d 128, D 8192, SwiGLU F 28672, vocab 128256
# (untied embeddings and LM head, which Helix holds whole on every rank), fp16.
LLAMA70B_VOCAB = 128256

# --- formulas -------------------------------------------------------------------
_SYMS = sympy.symbols("B C L H H_kv d D F u w s m n N R P_sc K t_k t_row t_g", positive=True)
B, C, L, H, H_kv, d, D, F, u, w, s, m, n, N, R, P_sc, K, t_k, t_row, t_g = _SYMS
_h = H / n
_h_kv = Max(H_kv / n, 1)
_f = ceiling(F / N)

_FORMULAS: dict[str, sympy.Expr] = {
    "op_time": _cost_formulas()["op_time"],
    "kv_copies": Max(n / H_kv, 1),
    "kv_cache_model": 2 * L * B * C * H_kv * d * w,
    "kv_cache_rank": 2 * L * B * (C / s) * _h_kv * (d / m) * w,
    # per layer, per rank
    "attn_weight_params": D * (_h + 2 * _h_kv) * d / m + (_h * d / m) * D,
    # the output projection over all N instead (NVIDIA's Helix after an all-to-all; what the
    # first decode_h200.json run measured): cost_decode(o_proj="N")
    "attn_weight_params_o_all": D * (_h + 2 * _h_kv) * d / m + (H * d / N) * D,
    "mlp_weight_params": (u + 1) * D * _f,
    "weights_rank": L * w * (D * (_h + 2 * _h_kv) * d / m + (_h * d / m) * D + (u + 1) * D * _f)
    + w * R,
    "kernel_time": K * t_k,
    "explicit_rows_time": t_row * B * _h_kv * C / s,
    "gather_rows_time": t_g * m * B * _h_kv * C / s,
    "gemv_flops": 2 * B * P_sc,            # P_sc: the parameters a GEMV reads, here
    "gemv_bytes": w * P_sc + 2 * w * B * D,
    "kv_read_bytes": 2 * B * (C / s) * _h_kv * (d / m) * w,
    # qk-gather: the gathered K (full d) written by the gather and read by QK^T, V over d/m
    "kv_read_gather_bytes": B * (C / s) * _h_kv * (2 * d + d / m) * w,
    "score_bytes": SCORE_BYTES * B * _h * C / s,
    "core_flops_partial": 4 * B * _h * (C / s) * d / m,
    "core_flops_gather": 2 * B * _h * (C / s) * (d + d / m),
    "score_reduce_bytes": SCORE_BYTES * B * _h * C / s,
    "qk_gather_bytes": w * B * (_h + _h_kv * C / s) * d,
    # each chunk's row max and sum, fp32 (SCORE_BYTES), gathered from the s ranks
    "combine_gather_bytes": SCORE_BYTES * 2 * B * _h * s,
    # the fused chunk core's combine: each chunk's row lse only
    "combine_lse_gather_bytes": SCORE_BYTES * B * _h * s,
    "combine_unfolded_bytes": w * B * _h * d / m,
    "out_bytes": w * B * D,
}
_T = sympy.symbols("t_layer t_rep", positive=True)
_FORMULAS["tpot"] = L * _T[0] + _T[1]
_FORMULAS["tokens_per_s"] = B / (L * _T[0] + _T[1])


def formulas() -> dict[str, sympy.Expr]:
    """Every formula the decode planner evaluates, by name (docs/cost_model.md, "Decode")."""
    return dict(_FORMULAS)


@functools.cache
def _compiled(name: str):
    expr = _FORMULAS[name]
    args = sorted(expr.free_symbols, key=lambda x: x.name)
    return tuple(a.name for a in args), sympy.lambdify(args, expr, modules="math")


def _ev(name: str, env: dict) -> float:
    names, fn = _compiled(name)
    return float(fn(*(env[a] for a in names)))


# --- records ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class DecodeShape:
    """A decoder as the decode planner sees it: L identical GQA layers and an MLP each."""

    name: str
    layers: int          # L
    hidden: int          # D
    heads: int           # H
    kv_heads: int        # H_kv
    head_dim: int        # d
    ffn: int             # F (0: no MLP)
    up_projections: int = 2        # u: 2 for a gated (SwiGLU) MLP
    dtype: str = "fp16"
    replicated_params: int = 0     # R: elements every rank holds (embedding, LM head, norms)
    replicated_read_params: int | None = None   # R_read: of those, read whole each step (LM
    #                                             head, norms); None: all R (an upper bound)

    def __post_init__(self) -> None:
        for key in ("layers", "hidden", "heads", "kv_heads", "head_dim"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                raise PlanError(f"DecodeShape {self.name!r}: {key} must be a positive integer, "
                                f"got {getattr(self, key)!r}")
        if self.replicated_read_params is not None and not \
                0 <= self.replicated_read_params <= self.replicated_params:
            raise PlanError(f"DecodeShape {self.name!r}: replicated_read_params="
                            f"{self.replicated_read_params} must be in [0, replicated_params="
                            f"{self.replicated_params}]")
        if self.ffn < 0 or self.replicated_params < 0 or self.up_projections < 1:
            raise PlanError(f"DecodeShape {self.name!r}: ffn={self.ffn}, up_projections="
                            f"{self.up_projections}, replicated_params={self.replicated_params} "
                            f"must be >= 0, >= 1, >= 0")
        if self.heads % self.kv_heads:
            raise PlanError(f"DecodeShape {self.name!r}: H={self.heads} heads is not a multiple "
                            f"of H_kv={self.kv_heads} kv heads; give a GQA shape")
        object.__setattr__(self, "dtype", normalize_dtype(self.dtype))

    @property
    def read_params(self) -> int:
        """R_read: the replicated elements one decode step reads whole."""
        return self.replicated_params if self.replicated_read_params is None \
            else self.replicated_read_params

    @property
    def dtype_bytes(self) -> int:
        return {"fp16": 2, "bf16": 2, "fp32": 4}[self.dtype]


def llama70b_shape() -> DecodeShape:
    """The default shape of `helix plan --decode`: LLaMA-3-70B's."""
    return DecodeShape(name="llama-70b-like", layers=80, hidden=8192, heads=64, kv_heads=8,
                       head_dim=128, ffn=28672, dtype="fp16",
                       replicated_params=2 * LLAMA70B_VOCAB * 8192 + (2 * 80 + 1) * 8192,
                       replicated_read_params=LLAMA70B_VOCAB * 8192 + (2 * 80 + 1) * 8192)


@dataclass(frozen=True, slots=True, kw_only=True)
class DecodeCost:
    """One split's predicted decode step, per rank."""

    s: int
    m: int
    n: int
    variant: str                   # "heads" (m = 1), "score-reduce" or "qk-gather"
    tp: bool                       # the tensor-parallel row (dp = s = m = 1, n = N)
    kv_copies: int                 # copies of each kv head (1: none)
    kv_bytes_per_rank: int
    weight_bytes_per_rank: int
    workspace_bytes: int           # transient: one layer's scores (explicit cores), gathered K
    memory_bytes_per_rank: int
    memory_limit_bytes: int
    comm_bytes_per_step: int       # per rank, all layers: the tensors its collectives take
    compute_ms: float
    comm_ms: float
    tpot_ms: float                 # time per output token (one step: a token for each sequence)
    tokens_per_s: float
    terms: tuple[tuple[str, float], ...] = ()    # (term, ms per step)
    dp: int = 1                    # replicas, each serving B / dp sequences on N / dp ranks

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS or (self.variant == "heads") != (self.m == 1):
            raise PlanError(f"DecodeCost s={self.s} x m={self.m} x n={self.n}: variant "
                            f"{self.variant!r}; m = 1 takes 'heads', m > 1 'score-reduce' or "
                            f"'qk-gather'")

    @property
    def name(self) -> str:
        base = f"s={self.s} x m={self.m} x n={self.n}"
        if self.s == 1 and self.m == 1:     # tensor parallelism, in one or more replicas
            base = f"TP={self.n} ({base})"
        elif self.m > 1:
            base = f"{base} {self.variant}"
        return base if self.dp == 1 else f"dp={self.dp} x {base}"

    @property
    def devices(self) -> int:
        return self.dp * self.s * self.m * self.n

    @property
    def fits(self) -> bool:
        return self.memory_bytes_per_rank <= self.memory_limit_bytes

    @property
    def excluded(self) -> str | None:
        """Which limit excludes the plan, or None."""
        if self.fits:
            return None
        return (f"needs {_gb(self.memory_bytes_per_rank)} per rank (KV {_gb(self.kv_bytes_per_rank)}"
                f" + weights {_gb(self.weight_bytes_per_rank)} + workspace "
                f"{_gb(self.workspace_bytes)}) > {_gb(self.memory_limit_bytes)} limit")


@dataclass(frozen=True, slots=True, kw_only=True)
class DecodePlan:
    """Every split's decode cost at (context, concurrency) and the one chosen."""

    shape: DecodeShape
    context: int                     # C
    concurrency: int                 # B
    devices: int                     # N
    cluster: str
    memory_limit_bytes: int
    kv_bytes_model: int              # the whole model's cache
    candidates: tuple[DecodeCost, ...]
    chosen: DecodeCost
    tp: DecodeCost | None            # TP over all N devices (dp = 1)
    tp_reason: str | None            # why there is no TP row (divisibility), else None
    replicated_tp: DecodeCost | None = None   # the fastest dp x TP=N/dp (dp > 1) that fits
    reason: str                      # why `chosen` won
    notes: tuple[str, ...] = field(default=())
    # the bandwidth floor (plan_decode's `floor`): its fastest plan that fits, and that plan's
    # TPOT over TP's floor TPOT; None where there is no TP row or for a floor-priced plan
    floor_best: DecodeCost | None = None
    floor_ratio: float | None = None

    def to_dict(self) -> dict:
        def row(c: DecodeCost) -> dict:
            return {"name": c.name, "dp": c.dp, "s": c.s, "m": c.m, "n": c.n, "variant": c.variant,
                    "tp": c.tp, "kv_copies": c.kv_copies, "kv_bytes_per_rank": c.kv_bytes_per_rank,
                    "weight_bytes_per_rank": c.weight_bytes_per_rank,
                    "workspace_bytes": c.workspace_bytes,
                    "memory_bytes_per_rank": c.memory_bytes_per_rank, "fits": c.fits,
                    "excluded": c.excluded, "comm_bytes_per_step": c.comm_bytes_per_step,
                    "compute_ms": c.compute_ms, "comm_ms": c.comm_ms, "tpot_ms": c.tpot_ms,
                    "tokens_per_s": c.tokens_per_s, "terms": [list(t) for t in c.terms]}
        sh = self.shape
        return {"shape": {k: getattr(sh, k) for k in sh.__dataclass_fields__},
                "context": self.context, "concurrency": self.concurrency,
                "devices": self.devices, "cluster": self.cluster,
                "memory_limit_bytes": self.memory_limit_bytes,
                "kv_bytes_model": self.kv_bytes_model, "chosen": self.chosen.name,
                "reason": self.reason, "tp": self.tp.name if self.tp else None,
                "replicated_tp": self.replicated_tp.name if self.replicated_tp else None,
                "tp_reason": self.tp_reason, "notes": list(self.notes),
                "floor_best": self.floor_best.name if self.floor_best else None,
                "floor_ratio": self.floor_ratio,
                "candidates": [row(c) for c in self.candidates]}


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB"


# --- the space ----------------------------------------------------------------------
def split_reason(shape: DecodeShape, context: int, s_: int, m_: int, n_: int) -> str | None:
    """Why (s, m, n) is not a decode split of `shape` at `context`, or None."""
    H_, Hkv, d_ = shape.heads, shape.kv_heads, shape.head_dim
    if H_ % n_:
        return f"n={n_} does not divide H={H_}"
    if (n_ <= Hkv and Hkv % n_) or (n_ > Hkv and n_ % Hkv):
        return f"n={n_} neither divides H_kv={Hkv} nor is a multiple of it"
    if d_ % m_:
        return f"m={m_} does not divide d={d_}"
    if context % s_:
        return f"s={s_} does not divide the context C={context}"
    return None


def decode_splits(shape: DecodeShape, context: int, devices: int) -> list[tuple[int, int, int]]:
    """Every (s, m, n) with s m n = devices that `split_reason` accepts."""
    out = []
    for n_ in _divisors(devices):
        for m_ in _divisors(devices // n_):
            s_ = devices // (n_ * m_)
            if split_reason(shape, context, s_, m_, n_) is None:
                out.append((s_, m_, n_))
    return sorted(out, key=lambda t: (t[2], t[1], t[0]))


def _divisors(k: int) -> list[int]:
    return [i for i in range(1, k + 1) if k % i == 0]


def _groups(s_: int, m_: int, n_: int, dp: int = 1) -> dict[str, list[tuple[int, ...]]]:
    """The groups of the mesh compile_decoder builds (rank = (i m + j) s + k: the s-group
    contiguous) in every replica (replica b: ranks b s m n ...): m-groups, s-groups, the m n
    ranks of each chunk, the whole replica."""
    mesh = Mesh(n=n_, m=m_, s=s_)
    return {key: [tuple(b * mesh.size + r for r in g) for b in range(dp) for g in mesh.groups(axis)]
            for key, axis in (("m", "dim"), ("s", "seq"), ("chunk", "all"), ("mesh", "mesh"))}


def _collective(kind: str, nbytes: float, groups, cluster: ClusterSpec) -> float:
    """The slowest of the groups (one per node span) running `kind` at once."""
    seen = {}
    for g in groups:
        seen.setdefault((len(g), group_span(g, cluster)), g)
    return max((collective_s(kind, nbytes, g, cluster) for g in seen.values()), default=0.0)


def built_fused_chunk(context: int, s_: int, variant: str) -> bool:
    """Whether compile_decoder's s > 1 step runs its chunk core fused (helix.chunk_attention,
    passes/seq_split.py): chunks of equal size and scores that are one q @ k^T (not
    score-reduce's all-reduce of partial scores)."""
    return s_ > 1 and context % s_ == 0 and variant != "score-reduce"


def cost_decode(shape: DecodeShape, context: int, concurrency: int, split: tuple[int, int, int],
                cluster: ClusterSpec, profile: ComputeProfile | None = None,
                variant: str | None = None, *, o_proj: str = "mesh", dp: int = 1,
                chunk_core: str | None = None, floor: bool = False) -> DecodeCost:
    """Predicted decode step of `split` = (s, m, n) in each of `dp` replicas (replica b on
    ranks b s m n ... (b + 1) s m n - 1, serving concurrency / dp sequences); `variant` for
    m > 1 ("score-reduce", default, or "qk-gather"); `o_proj`: "mesh", the output
    projection as built (its weights replicated over the s-group; with s > 1 its all-reduce
    spans the mesh and sums the chunks' partial outputs), or "N" (its weights sharded over
    the replica's N ranks as well); `chunk_core` ("fused" or "explicit"): the s > 1 core
    priced as that (a saved run's rows), None: as compile_decoder builds it (`built_fused_chunk`).
    `floor`: the step's bandwidth floor instead, every op at the cluster's peak FLOP/s and HBM
    bandwidth (efficiency 1) and no per-kernel, per-row or score-pass cost; communication as
    modeled (plan_decode's `floor`, `DecodePlan.floor_ratio`)."""
    if chunk_core not in (None, "fused", "explicit"):
        raise PlanError(f"cost_decode: chunk_core must be None (as built), 'fused' or 'explicit', "
                        f"got {chunk_core!r}")
    if o_proj not in ("mesh", "N"):
        raise PlanError(f"cost_decode: o_proj must be 'mesh' (as compile_decoder builds it) or "
                        f"'N', got {o_proj!r}")
    if isinstance(dp, bool) or not isinstance(dp, int) or dp < 1 or concurrency % dp:
        raise PlanError(f"decode plan dp={dp!r}: the replicas split the {concurrency} concurrent "
                        f"sequences evenly; give a dp that divides {concurrency}")
    s_, m_, n_ = split
    N_ = s_ * m_ * n_
    why = split_reason(shape, context, s_, m_, n_)
    if why is not None:
        alts = decode_splits(shape, context, N_)
        hint = (f"try one of {alts}" if alts else
                f"no (s, m, n) of {N_} devices fits this shape: try a power-of-two device count")
        raise PlanError(f"decode split s={s_} x m={m_} x n={n_} of {shape.name!r}: {why}; {hint}")
    if dp * N_ > cluster.devices:
        raise PlanError(f"decode plan dp={dp} x s={s_} x m={m_} x n={n_} needs {dp * N_} GPUs but "
                        f"cluster {cluster.name!r} has {cluster.devices}; try a larger cluster file")
    B_all, concurrency = concurrency, concurrency // dp
    if m_ == 1:
        variant = "heads"
    elif variant is None:
        variant = "score-reduce"
    elif variant not in ("score-reduce", "qk-gather"):
        raise PlanError(f"decode variant must be 'score-reduce' or 'qk-gather' for m > 1, "
                        f"got {variant!r}")
    profile = profile or DEFAULT_PROFILE
    env = {"B": concurrency, "C": context, "L": shape.layers, "H": shape.heads,
           "H_kv": shape.kv_heads, "d": shape.head_dim, "D": shape.hidden, "F": shape.ffn,
           "u": shape.up_projections, "w": shape.dtype_bytes, "s": s_, "m": m_, "n": n_, "N": N_,
           "R": shape.replicated_params}
    dt = shape.dtype
    eta_mem = 1.0 if floor else profile.elementwise_efficiency

    def op(flops: float, nbytes: float) -> float:
        eta = profile.matmul_efficiency(flops, dt) if flops and not floor else 1.0
        return _ev("op_time", {"FLOPs": flops, "Q": nbytes, "P": cluster.peak_flops(dt),
                               "eta": eta, "BW": cluster.memory_bandwidth, "eta_mem": eta_mem})

    def gemv(params: float) -> float:
        return op(_ev("gemv_flops", {**env, "P_sc": params}),
                  _ev("gemv_bytes", {**env, "P_sc": params}))

    fused_chunk = s_ > 1 and (built_fused_chunk(context, s_, variant) if chunk_core is None
                              else chunk_core == "fused")
    # s > 1: the core is written out (seq_split), unless it runs as helix.chunk_attention
    explicit = (variant != "heads" or s_ > 1) and not fused_chunk
    gather = variant == "qk-gather"
    score_rw = EXPLICIT_SCORE_PASSES * _ev("score_bytes", env) if explicit and not floor else 0.0
    core = op(_ev("core_flops_gather" if gather else "core_flops_partial", env),
              _ev("kv_read_gather_bytes" if gather else "kv_read_bytes", env) + score_rw)
    attn_params = "attn_weight_params" if o_proj == "mesh" else "attn_weight_params_o_all"
    layer = [("q/k/v/o GEMVs", "compute", gemv(_ev(attn_params, env))),
             ("attention over the cache slice", "compute", core)]
    if shape.ffn:
        layer.append(("MLP GEMVs", "compute", gemv(_ev("mlp_weight_params", env))))
    base = "score-reduce" if explicit and variant == "heads" else variant   # an explicit core
    if fused_chunk:   # one fused kernel, as "heads"; the op's extras and the lse combine
        base = "heads"
    kernels = KERNELS_PER_LAYER[base] + (m_ if gather else 0) + (
        (FUSED_COMBINE_KERNELS if fused_chunk else COMBINE_KERNELS) if s_ > 1 else 0)
    if not floor:
        layer.append((f"{kernels} kernels x {KERNEL_S * 1e6:.2f} us", "compute",
                      _ev("kernel_time", {"K": kernels, "t_k": KERNEL_S})))
    if explicit and not floor:
        layer.append(("explicit core: K rows", "compute",
                      _ev("explicit_rows_time", {**env, "t_row": EXPLICIT_ROW_S})))
    if gather and not floor:
        layer.append(("qk-gather: K assembly", "compute",
                      _ev("gather_rows_time", {**env, "t_g": GATHER_ROW_S})))
    grp = _groups(s_, m_, n_, dp)
    comm_bytes = 0.0

    def coll(name: str, kind: str, formula: str, group: str) -> None:
        nonlocal comm_bytes
        x = _ev(formula, env)
        comm_bytes += x
        layer.append((name, "comm", _collective(kind, x, grp[group], cluster)))

    if m_ > 1 and not gather:
        coll("score all-reduce (m-group)", "all_reduce", "score_reduce_bytes", "m")
    if gather:
        coll("q, K-cache all-gather (m-group)", "all_gather", "qk_gather_bytes", "m")
    if s_ > 1:
        if fused_chunk:
            coll("row lse all-gather (s-group)", "all_gather", "combine_lse_gather_bytes", "s")
        else:
            coll("row max and sum all-gather (s-group)", "all_gather", "combine_gather_bytes", "s")
    if s_ > 1 and m_ * n_ == 1:   # nothing to fold the sum over chunks into (seq_split)
        coll("partial-output all-reduce (s-group)", "all_reduce", "combine_unfolded_bytes", "s")
    else:   # s > 1: over the mesh, summing the chunks' partial outputs too
        coll("output all-reduce", "all_reduce", "out_bytes",
             "mesh" if s_ > 1 or o_proj == "N" else "chunk")
    if shape.ffn:
        coll("MLP all-reduce", "all_reduce", "out_bytes", "mesh")
    t_layer = sum(t for _, _, t in layer)
    t_rep = gemv(shape.read_params) if shape.read_params else 0.0
    L_ = shape.layers
    terms = [(name, t * L_ * 1e3) for name, _, t in layer]
    if t_rep:
        terms.append(("replicated weights read whole (LM head, norms)", t_rep * 1e3))
    tpot = _ev("tpot", {"L": L_, "t_layer": t_layer, "t_rep": t_rep})
    kv = math.ceil(_ev("kv_cache_rank", env))
    weights = math.ceil(_ev("weights_rank", env))
    workspace = 0
    if explicit:
        workspace += math.ceil(SCORE_COPIES * _ev("score_bytes", env))
    if gather:
        workspace += math.ceil(shape.dtype_bytes * concurrency * (context // s_)
                               * max(shape.kv_heads // n_, 1) * shape.head_dim)
    limit = int(MEMORY_USABLE_FRACTION * cluster.memory_bytes)
    return DecodeCost(
        s=s_, m=m_, n=n_, dp=dp, variant=variant, tp=(dp == 1 and s_ == 1 and m_ == 1),
        kv_copies=int(_ev("kv_copies", env)), kv_bytes_per_rank=kv,
        weight_bytes_per_rank=weights, workspace_bytes=workspace,
        memory_bytes_per_rank=kv + weights + workspace, memory_limit_bytes=limit,
        comm_bytes_per_step=math.ceil(comm_bytes * L_),
        compute_ms=sum(t for _, k, t in layer if k == "compute") * L_ * 1e3 + t_rep * 1e3,
        comm_ms=sum(t for _, k, t in layer if k == "comm") * L_ * 1e3,
        tpot_ms=tpot * 1e3, tokens_per_s=_ev("tokens_per_s", {"B": B_all, "L": L_,
                                                              "t_layer": t_layer, "t_rep": t_rep}),
        terms=tuple(terms))


def plan_decode(shape: DecodeShape, context: int, concurrency: int, devices: int,
                cluster: ClusterSpec, profile: ComputeProfile | None = None,
                memory_cap_gib: float | None = None, dp: int | None = None,
                floor: bool = False) -> DecodePlan:
    """Cost every decode plan dp x (s, m, n) of `devices` (dp: every divisor of `devices`
    that divides `concurrency`, or only `dp` when given; both m > 1 variants) and choose the
    smallest TPOT among those that fit; ties go to fewer kv copies, then fewer replicas,
    smaller s, smaller m. Replicas are data parallelism over the sequences, the plan a
    person serving B sequences on N GPUs tries first (N / dp GPUs per replica, often one
    node): the table prints the fastest of them beside TP over all N. `floor`: every plan
    priced at its bandwidth floor (cost_decode's `floor`); else the plan also carries that
    floor's best plan and its ratio to TP's floor (`floor_best`, `floor_ratio`): how far any
    split could beat TP here if every kernel ran at HBM bandwidth, the rest communication."""
    for what, value in (("context", context), ("concurrency", concurrency),
                        ("devices", devices)):
        if not isinstance(value, int) or value <= 0:
            raise PlanError(f"decode plan of {shape.name!r}: {what} must be a positive integer, "
                            f"got {value!r}")
    if devices > cluster.devices:
        raise PlanError(f"decode plan on {devices} devices: cluster {cluster.name!r} has "
                        f"{cluster.devices}; try a larger cluster file or fewer devices")
    notes = []
    if memory_cap_gib is not None:   # as make_plan's cap: the GPU's memory lowered, phi applies
        if isinstance(memory_cap_gib, bool) or not isinstance(memory_cap_gib, (int, float)) \
                or not memory_cap_gib > 0:
            raise PlanError(f"memory_cap_gib must be a positive number of GiB per rank, got "
                            f"{memory_cap_gib!r}; try 40")
        cap = int(memory_cap_gib * 2 ** 30)
        if cap < cluster.memory_bytes:
            cluster = dataclasses.replace(cluster, memory_bytes=cap)
            notes.append(f"memory cap {memory_cap_gib:g} GiB per rank: each plan must fit "
                         f"{MEMORY_USABLE_FRACTION:g} of it")
    if dp is None:
        dps = [k for k in _divisors(devices) if concurrency % k == 0]
    elif isinstance(dp, bool) or not isinstance(dp, int) or dp < 1 or devices % dp \
            or concurrency % dp:
        raise PlanError(f"decode plan dp={dp!r}: the replicas must split the {devices} devices "
                        f"and the {concurrency} concurrent sequences evenly; give a dp that "
                        f"divides both (1: no replicas)")
    else:
        dps = [dp]
    rows = []
    for k in dps:
        for sp in decode_splits(shape, context, devices // k):
            for v in ((None,) if sp[1] == 1 else ("score-reduce", "qk-gather")):
                rows.append(cost_decode(shape, context, concurrency, sp, cluster, profile, v,
                                        dp=k, floor=floor))
    if not rows:
        raise PlanError(f"decode plan of {shape.name!r} on {devices} devices: no split (s, m, n) "
                        f"with dp*s*m*n={devices} has n dividing H={shape.heads} and H_kv="
                        f"{shape.kv_heads} (or a multiple of H_kv), m dividing d="
                        f"{shape.head_dim} and s dividing C={context}; try a power-of-two "
                        f"device count or context")
    tp = next((r for r in rows if r.tp), None)
    tp_reason = None if tp else (
        f"TP={devices}: {split_reason(shape, context, 1, 1, devices)}")
    fit = [r for r in rows if r.fits]
    if not fit:
        least = min(rows, key=lambda r: r.memory_bytes_per_rank)
        raise PlanError(f"decode plan of {shape.name!r} at C={context}, B={concurrency} on "
                        f"{devices} devices: no split fits; the smallest, {least.name}, "
                        f"{least.excluded}; try more devices, a shorter context or fewer "
                        f"concurrent sequences")
    chosen = min(fit, key=lambda r: (r.tpot_ms, r.kv_copies, r.dp, r.s, r.m))
    replicated_tp = min((r for r in fit if r.dp > 1 and r.s == 1 and r.m == 1),
                        key=lambda r: r.tpot_ms, default=None)
    reason = _reason(chosen, tp, rows, tp_reason, replicated_tp)
    kv_model = math.ceil(_ev("kv_cache_model", {
        "L": shape.layers, "B": concurrency, "C": context, "H_kv": shape.kv_heads,
        "d": shape.head_dim, "w": shape.dtype_bytes}))
    floor_best = floor_ratio = None
    if tp is not None and not floor:
        low = plan_decode(shape, context, concurrency, devices, cluster, profile, dp=dp,
                          floor=True)
        floor_best, floor_ratio = low.chosen, low.chosen.tpot_ms / low.tp.tpot_ms
        notes.append(
            f"bandwidth floor (every op at peak HBM bandwidth and FLOP/s, no per-kernel cost, "
            f"communication as modeled): {floor_best.name} at {floor_best.tpot_ms:.2f} ms "
            f"({floor_best.comm_ms:.2f} communication), {floor_ratio:.2f}x TP's "
            f"{low.tp.tpot_ms:.2f} ms ({low.tp.comm_ms:.2f}): the least ratio any split reaches here")
    notes += ["norm, residual and core kernels are priced by count (KERNELS_PER_LAYER x "
              f"{KERNEL_S * 1e6:.2f} us, fitted on an H200); rotary and the embedding lookup "
              "are left out (B x D elements each); the q/k/v/o of the new token run on every "
              "rank of its s-group, the MLP over all N ranks of a replica",
              "no overlap of compute and communication is assumed"]
    return DecodePlan(shape=shape, context=context, concurrency=concurrency, devices=devices,
                      cluster=cluster.name, memory_limit_bytes=chosen.memory_limit_bytes,
                      kv_bytes_model=kv_model, candidates=tuple(rows), chosen=chosen, tp=tp,
                      tp_reason=tp_reason, replicated_tp=replicated_tp, reason=reason,
                      notes=tuple(notes), floor_best=floor_best, floor_ratio=floor_ratio)


def _reason(chosen: DecodeCost, tp: DecodeCost | None, rows, tp_reason: str | None,
            replicated_tp: DecodeCost | None = None) -> str:
    runner_up = min((r for r in rows if r.fits and r is not chosen), key=lambda r: r.tpot_ms,
                    default=None)
    parts = [f"{chosen.name} has the smallest predicted TPOT that fits, {chosen.tpot_ms:.2f} ms"]
    if runner_up is not None:
        parts.append(f"next {runner_up.name} at {runner_up.tpot_ms:.2f} ms")
    if tp is None:
        parts.append(f"there is no TP row ({tp_reason})")
    elif tp is chosen:
        parts.append("tensor parallelism itself is the best split here")
    else:
        ratio = chosen.tpot_ms / tp.tpot_ms
        fits = "" if tp.fits else f"; TP does not fit: {tp.excluded}"
        parts.append(f"{ratio:.2f}x TP's {tp.tpot_ms:.2f} ms: each rank reads "
                     f"{_gb(chosen.kv_bytes_per_rank)} of cache (copies x{chosen.kv_copies}) "
                     f"where TP reads {_gb(tp.kv_bytes_per_rank)} (copies x{tp.kv_copies}){fits}")
    if chosen.dp > 1:
        per = chosen.devices // chosen.dp
        parts.append(f"{chosen.dp} replicas of 1 rank: no collective" if per == 1 else
                     f"{chosen.dp} replicas of {per} ranks: collectives over {per} ranks "
                     f"instead of {chosen.devices}")
    if replicated_tp is not None and replicated_tp is not chosen:
        parts.append(f"{chosen.tpot_ms / replicated_tp.tpot_ms:.2f}x the fastest replicated TP, "
                     f"{replicated_tp.name} at {replicated_tp.tpot_ms:.2f} ms")
    return "; ".join(parts)


# --- the shape of a captured model ------------------------------------------------
def shape_from_summary(summary: ModelSummary, dtype: str | None = None) -> DecodeShape:
    """The decode shape of a captured model: its attention sites must agree on (H, H_kv, d, D)."""
    if not summary.sites:
        raise PlanError(f"model {summary.name!r} has no attention site, so it has no KV cache to "
                        f"plan a decode for; check that it is a decoder with attention")
    shapes = {(x.num_heads, x.num_kv_heads, x.head_dim, x.embed_dim) for x in summary.sites}
    if len(shapes) > 1:
        raise PlanError(f"model {summary.name!r}: its attention sites differ in (H, H_kv, d, D): "
                        f"{sorted(shapes)}; the decode planner takes L identical layers")
    (H_, Hkv, d_, D_), = shapes
    ffns = {(x.ffn, len(x.up_weights)) for x in summary.mlps}
    if len(ffns) > 1:
        raise PlanError(f"model {summary.name!r}: its MLPs differ in (F, up projections): "
                        f"{sorted(ffns)}; the decode planner takes L identical layers")
    F_, u_ = next(iter(ffns)) if ffns else (0, 1)
    if dtype is None:
        dtype = {2: "fp16", 4: "fp32"}.get(summary.dtype_bytes, "fp16")
    return DecodeShape(name=summary.name, layers=len(summary.sites), hidden=D_, heads=H_,
                       kv_heads=Hkv, head_dim=d_, ffn=F_, up_projections=u_, dtype=dtype,
                       replicated_params=summary.replicated_elements)


# --- the table ----------------------------------------------------------------------
def format_decode_table(plan: DecodePlan) -> str:
    sh = plan.shape
    lines = [f"decode plan: {sh.name} (L={sh.layers}, H={sh.heads}, H_kv={sh.kv_heads}, "
             f"d={sh.head_dim}, D={sh.hidden}, F={sh.ffn}, {sh.dtype}) at context "
             f"C={plan.context}, concurrency B={plan.concurrency}, on {plan.devices} devices "
             f"of {plan.cluster}",
             f"KV cache of the model: {_gb(plan.kv_bytes_model)}; memory limit per rank "
             f"{_gb(plan.memory_limit_bytes)}",
             ""]
    tp_kv = (f"{_gb(plan.tp.kv_bytes_per_rank)} (x{plan.tp.kv_copies})" if plan.tp
             else "n/a")
    head = (f"{'plan':<34} {'KV/rank':>9} {'copies':>6} {'TP KV/rank':>16} {'weights':>8} "
            f"{'comm/step':>10} {'comm ms':>8} {'TPOT ms':>9} {'tokens/s':>10}  status")
    lines += [head, "-" * len(head)]
    for r in plan.candidates:
        status = "chosen" if r is plan.chosen else ("fits" if r.fits else
                                                    f"excluded: {r.excluded}")
        lines.append(f"{r.name:<34} {_gb(r.kv_bytes_per_rank):>9} {'x' + str(r.kv_copies):>6} "
                     f"{tp_kv:>16} {_gb(r.weight_bytes_per_rank):>8} "
                     f"{r.comm_bytes_per_step / 1e6:>8.1f}MB {r.comm_ms:>8.2f} "
                     f"{r.tpot_ms:>9.2f} {r.tokens_per_s:>10.0f}  {status}")
    lines += ["", f"chosen: {plan.chosen.name}", f"why: {plan.reason}"]
    lines += [f"note: {x}" for x in plan.notes]
    return "\n".join(lines)
