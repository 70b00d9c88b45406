r"""Cost model (DESIGN.md section 5): predicted time and memory of one plan.

Per rank, for one forward step over the whole batch of B sequences, run as
M = ceil(B / b) micro-batches of b whole sequences:

    t_op    = max(FLOPs / (P_dtype * eta_op),  bytes / (BW * eta_mem))      op_s
    t_coll  = alpha + c * (p-1)/p * X / beta           c = 2 all-reduce,     collective_s
                                                        c = 1 all-gather / reduce-scatter
    step    = sum_micro (sum_ops t_op + sum_colls t_coll)                    cost_plan
              (no overlap of compute and communication is assumed)
    tokens/s = B * S / step

with P_dtype the GPU's dense matmul peak, eta_op the profile's efficiency of
the op class (matmul by size, fused attention by backend and head dim,
softmax, elementwise), BW the HBM bandwidth. A group inside one node uses the
NVLink alpha and bus bandwidth. A group of g ranks per node on k > 1 nodes is
hierarchical: an intra-node phase on NVLink and an inter-node phase that
moves X/g per rank over the node's min(g, R) NIC rails; NCCL pipelines the
phases in chunks, so the slower one bounds the time (`hier_*` formulas).

Per attention site on rank (i, j), h = H/n heads, h_kv = max(H_kv/n, 1):

    q, k, v projections   2 b S D (h + 2 h_kv) d/m FLOPs                     _attention_terms
    heads (m = 1)         fused SDPA kernel where one exists for d, else
                          explicit QK^T -> softmax -> PV, whichever is faster
    score-reduce (m > 1)  QK^T over d/m; all-reduce b h S_q S_k scores over
                          the m-group; softmax; PV over d/m
    qk-gather (m > 1)     all-gather Q, K along d over the m-group
                          (X = b (h S_q + h_kv S_k) d); full QK^T (repeated m
                          times in the group; fused kernel when d <= 256); PV
    output projection     2 b S_q h d/m D FLOPs, all-reduce b S_q D over all N
    norm + residual       E b S_q D elements read or written (replicated)

MLP over all N ranks (F/N columns each, the largest shard when F % N != 0):
up / gate 2 b T D f u, down 2 b T f D FLOPs, all-reduce b T D over all N.

Memory per rank: w * parameters + b * (activation bytes of one sequence)
<= phi * device memory; the largest such b is the micro-batch (`micro_batch`).

Megatron TP x PP baseline (`cost_baseline`): heads and MLP over tp ranks
(two all-reduces of b S D per layer), layers over pp stages, each stage
boundary a point-to-point send per micro-batch, and the pipeline bubble
(pp - 1) / (M + pp - 1) of the step.

`formulas()` returns every formula above as a sympy expression; the numbers
are computed from those very expressions (`_ev`).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import gc
import itertools
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import sympy
from sympy import Max, Min, ceiling, floor

from .cluster import ClusterSpec, normalize_dtype
from ..errors import PlanError
from ..runtime.mesh import Mesh
from ..runtime.collectives import NO_COPY_ALL_REDUCE_MIN_BYTES
from ..runtime.kernels import fused_takes
from .profile import DEFAULT_PROFILE, MEMORY_OPS, OPS, ComputeProfile
from .sites import AttentionSite, MlpSite, ModelSummary

# --- settings -----------------------------------------------------------------
# Share of device memory a plan may fill: the rest is the CUDA context, the
# allocator's fragmentation and kernel workspaces.
MEMORY_USABLE_FRACTION = 0.9
# Score-sized tensors alive at once in a materialized core: scores and probs.
SCORE_COPIES = 2
# Elements of b*S*D read or written per block by its norm (read, write), the
# bias add after the output / MLP all-reduce (read, write: the bias is added
# once, after the reduction) and the residual add (read two, write one). 7, as
# the rank graphs run it; helix calibrate times exactly this tail (H100, torch
# 2.11: the profiler split of a rank put 2.4 ms per sequence in elementwise ops
# where 5 passes predicted 1.3).
ELEMENTWISE_PASSES_PER_BLOCK = 7
# Bytes per (row, head) a fused kernel keeps: the fp32 log-sum-exp.
LSE_BYTES = 4
# Megatron sends 1/tp of a stage's output from each TP rank and all-gathers it
# on the next stage (scatter-gather); False: every rank sends the whole tensor.
PP_SCATTER_GATHER = True

VARIANTS = ("heads", "score-reduce", "qk-gather")

# --- formulas -------------------------------------------------------------------
_S = sympy.symbols(
    "b B S S_q S_k T H H_kv d D F u m n N w o c_kv g_qk x_s C L E phi Mem "
    "FLOPs Q P eta BW eta_mem X p alpha beta g k R alpha_nv alpha_net B_nv B_nic "
    "t_c t_x t_b t_stage M p_pp A P_r W_r W_n W_q W_kv F_r P_s",
    positive=True)
(b, B, S, S_q, S_k, T, H, H_kv, d, D, F, u, m, n, N, w, o, c_kv, g_qk, x_s, C, L, E, phi, Mem,
 FLOPs, Q, P, eta, BW, eta_mem, X, p, alpha, beta, g, k, R, alpha_nv, alpha_net, B_nv, B_nic,
 t_c, t_x, t_b, t_stage, M, p_pp, A, P_r, W_r, W_n, W_q, W_kv, F_r, P_s) = _S
_h = H / n                    # query heads per rank
_h_kv = Max(H_kv / n, 1)      # kv heads per rank (replicated when n > H_kv)
_f = ceiling(F / N)           # MLP columns of the largest shard


def _ring(c):
    return alpha + c * (p - 1) / p * X / beta


def _hier(c):
    return alpha_nv + alpha_net + Max(c * (g - 1) / g * X / B_nv,
                                      c * (k - 1) / k * X / (B_nic * Min(g, R)))


_FORMULAS: dict[str, sympy.Expr] = {
    # time of one op and one collective
    "op_time": Max(FLOPs / (P * eta), Q / (BW * eta_mem)),
    "ring_all_reduce": _ring(2),
    "ring_all_gather": _ring(1),
    "hier_all_reduce": _hier(2),
    "hier_all_gather": _hier(1),
    "p2p_send": alpha + X / beta,
    # attention site, per micro-batch of b sequences, per rank
    "q_proj_flops": 2 * b * S_q * D * _h * d / m,
    "q_proj_bytes": w * (b * S_q * D + D * _h * d / m + b * S_q * _h * d / m),
    "kv_proj_flops": 2 * 2 * b * S_k * D * _h_kv * d / m,
    "kv_proj_bytes": 2 * w * (b * S_k * D + D * _h_kv * d / m + b * S_k * _h_kv * d / m),
    "qk_flops_partial": 2 * b * _h * S_q * S_k * d / m,
    "qk_bytes_partial": w * b * ((_h * S_q + _h_kv * S_k) * d / m + _h * S_q * S_k),
    "qk_flops_full": 2 * b * _h * S_q * S_k * d,
    "qk_bytes_full": w * b * ((_h * S_q + _h_kv * S_k) * d + _h * S_q * S_k),
    "softmax_bytes": 2 * w * b * _h * S_q * S_k,
    # an explicit core's other passes over the scores (kernels.py / kernels_chunked.py): the
    # scale of all-reduced scores (2: read, write), a mask or causal fill (2)
    "score_passes_bytes": P_s * w * b * _h * S_q * S_k,
    "pv_flops": 2 * b * _h * S_q * S_k * d / m,
    "pv_bytes": w * b * (_h * S_q * S_k + (_h_kv * S_k + _h * S_q) * d / m),
    "fused_core_flops": 2 * b * _h * S_q * S_k * (d + d / m),
    "fused_core_bytes": w * b * ((_h * S_q + _h_kv * S_k) * d + (_h_kv * S_k + _h * S_q) * d / m),
    "o_proj_flops": 2 * b * S_q * _h * d / m * D,
    "o_proj_bytes": w * (b * S_q * _h * d / m + _h * d / m * D + b * S_q * D),
    "block_elementwise_bytes": E * w * b * S_q * D,
    # ops read from the graph (passes/workload.py), per micro-batch, per rank (of a stage):
    # W_* bytes and F_r FLOPs per sequence of the whole model, over p_pp stages
    "graph_replicated_bytes": b * W_r / p_pp,
    "graph_norm_bytes": b * W_n / p_pp,
    "graph_replicated_flops": b * F_r / p_pp,
    "graph_head_bytes": b * (W_q / (n * m) + W_kv * Max(H_kv / n, 1) / (H_kv * m)) / p_pp,
    "score_reduce_bytes": w * b * _h * S_q * S_k,
    "qk_gather_bytes": w * b * (_h * S_q + _h_kv * S_k) * d,
    "qk_norm_bytes": 4 * b * (_h * S_q + _h_kv * S_k),        # fp32 partial sums of squares
    "attn_out_bytes": w * b * S_q * D,                          # all-reduced over N ranks
    # sequence-parallel norms with more than one sequence in the micro-batch: funcol's
    # reduce-scatter along the sequence chunks and concatenates X first, its all-gather
    # concatenates the gathered chunks after (each reads and writes X); b = 1 is copy-free
    "sp_copy_bytes": 4 * w * b * S_q * D,
    "attn_gather_bytes": w * b * S_q * H * d,                   # no output projection: gathered
    # MLP, per micro-batch, per rank (T tokens per sequence)
    "mlp_up_flops": 2 * b * T * D * _f * u,
    "mlp_up_bytes": w * (b * T * D + u * D * _f + u * b * T * _f),
    "mlp_act_bytes": w * b * T * _f * (u + 1),
    "mlp_down_flops": 2 * b * T * _f * D,
    "mlp_down_bytes": w * (b * T * _f + _f * D + b * T * D),
    "mlp_out_bytes": w * b * T * D,
    # memory per rank
    "attn_params": D * _h * d / m + 2 * D * _h_kv * d / m + o * _h * d / m * D,
    "mlp_params": (u + 1) * D * _f,
    "attn_activation": w * (S_q * D + c_kv * S_k * D + (_h * S_q + 2 * _h_kv * S_k) * d / m
                            + g_qk * (_h * S_q + _h_kv * S_k) * d + _h * S_q * d / m + S_q * D)
    + x_s * C * w * _h * S_q * S_k + (1 - x_s) * L * _h * S_q,
    "mlp_activation": w * T * (2 * D + (u + 1) * _f),
    "residual_activation": w * S * D,
    "micro_batch": floor((phi * Mem - w * P_r) / A),
    # the step
    "micro_batches": ceiling(B / b),
    "step": t_c + t_x + t_b,                     # no overlap; t_b = 0 for helix
    "pipeline_step": (M + p_pp - 1) * t_stage,
    "bubble_fraction": (p_pp - 1) / (M + p_pp - 1),
    "tokens_per_s": B * S / (t_c + t_x + t_b),
}
# Settings enter the formulas as symbols; these are their values.
_SETTINGS = {"phi": MEMORY_USABLE_FRACTION, "C": SCORE_COPIES, "E": ELEMENTWISE_PASSES_PER_BLOCK,
             "L": LSE_BYTES}


def formulas() -> dict[str, sympy.Expr]:
    """Every formula the cost model evaluates, by name (symbols: docs/cost_model.md)."""
    return dict(_FORMULAS)


@functools.cache
def _compiled(name: str):
    expr = _FORMULAS[name]
    args = sorted(expr.free_symbols, key=lambda s: s.name)
    return tuple(a.name for a in args), sympy.lambdify(args, expr, modules=[_ARRAY_AWARE, "math"])


# Max / Min / ceiling / floor as "math" prints them (max(), min(), math.ceil, math.floor), and
# elementwise when an argument is an array: the plan search evaluates a term over every
# micro-batch size at once (cost._grid_seconds); the scalar path computes what it always did.
def _vmax(*xs):
    for x in xs:
        if type(x) is np.ndarray:
            return functools.reduce(np.maximum, xs)
    return max(xs)


def _vmin(*xs):
    for x in xs:
        if type(x) is np.ndarray:
            return functools.reduce(np.minimum, xs)
    return min(xs)


def _vceil(x):
    return np.ceil(x) if type(x) is np.ndarray else math.ceil(x)


def _vfloor(x):
    return np.floor(x) if type(x) is np.ndarray else math.floor(x)


_ARRAY_AWARE = {"Max": _vmax, "Min": _vmin, "ceiling": _vceil, "floor": _vfloor}


def _ev(name: str, env: dict) -> float:
    try:
        return _EVALUATORS[name](env)
    except KeyError:
        if name in _EVALUATORS:
            raise
    _EVALUATORS[name] = _evaluator(name)
    return _EVALUATORS[name](env)


_EVALUATORS: dict = {}    # name -> env -> float: the compiled formula, its arguments read inline


def _evaluator(name: str):
    """`_compiled(name)` called with its arguments read from env (a setting when env has none
    of that name), written out once per formula: the search evaluates ~20k of them."""
    names, fn = _compiled(name)
    args = ", ".join(f"(env[{a!r}] if {a!r} in env else S[{a!r}])" if a in _SETTINGS
                     else f"env[{a!r}]" for a in names)
    scope = {"fn": fn, "S": _SETTINGS}
    scope["ndarray"] = np.ndarray
    exec(f"def ev(env):\n    r = fn({args})\n"
         f"    return r if r.__class__ is ndarray else float(r)\n", scope)   # noqa: S102
    return scope["ev"]


# Identity-keyed caches of values derived from a summary (replicas, stages, shapes) hold at most
# this many entries: a search over 4096 devices asks for 13 replica batches x 7 stage counts of
# an 80-layer model, and an entry is a few tuples of shared sites.
DERIVED_CACHE_SIZE = 4096


def _identity_memo(cache: dict, obj, key, make, limit: int = DERIVED_CACHE_SIZE):
    """make(), memoized on the object `obj` itself and `key`: keyed by id(obj), a hit checked by
    identity (a recycled id never hits), the cache cleared when it outgrows `limit`. The plan
    search's derived values (a summary's replicas and stages, a tuple's shapes) hang off
    frozen objects that the search passes around unchanged."""
    hit = cache.get((id(obj), key))
    if hit is not None and hit[0] is obj:
        return hit[1]
    out = make()
    if len(cache) > limit:
        cache.clear()
    cache[(id(obj), key)] = (obj, out)
    return out

# The plan search prices a term over every micro-batch size in one call on arrays
# (_grid_seconds); False: one scalar call per size (the same figures, to float rounding).
VECTOR_TERMS = True

# --- the search memo --------------------------------------------------------------------
# A plan search (plan.make_plan) prices hundreds of (dp, pp, m, n) candidates whose terms
# repeat: one site shape at one micro-batch on one layout costs the same in every candidate
# that has them. Inside `search_scope()` the term memo (_TERMS), the layouts and the machines
# live across the public calls of the search; outside it every public call starts empty, as
# before. Keys are values, or ids of objects the memo keeps alive (_ALIVE) until the scope
# ends. False: no scope memo (every candidate priced alone; the reference the equality test
# compares against).
SEARCH_MEMO = True
# The cyclic garbage collector is paused for the search (reference counting still frees
# everything the search drops): a search allocates ~10^5 small objects, and each full collection
# walks every object of the process (sympy and torch included). Measured on the 2-core CPU:
# the paper model at 4096 devices 134 -> 105 ms, the 80-layer model 270 -> 260 ms.
SEARCH_GC_PAUSE = True
_SCOPE = [0]                 # depth of nested search_scope()s
_ALIVE: dict = {}            # id -> object, for ids used in memo keys
_LAYOUTS: dict = {}
_MACHINES: dict = {}


@contextlib.contextmanager
def search_scope():
    """Memoize terms, layouts and machines across the cost calls inside (one plan search)."""
    if not SEARCH_MEMO:
        yield
        return
    outer = _SCOPE[0] == 0
    if outer:
        _clear_memo()
    collect = outer and SEARCH_GC_PAUSE and gc.isenabled()
    if collect:
        gc.disable()
    _SCOPE[0] += 1
    try:
        yield
    finally:
        _SCOPE[0] -= 1
        if outer:
            _clear_memo()
        if collect:
            gc.enable()


def _clear_memo() -> None:
    for memo in (_TERMS, _ALIVE, _LAYOUTS, _MACHINES, _LAYSIG, _SPLITS):
        memo.clear()


def _fresh_terms() -> None:
    """Start a public call: the term memo is emptied unless a search scope holds it."""
    if _SCOPE[0] == 0:
        _clear_memo()


def _alive(*objs) -> None:
    if _SCOPE[0]:
        for x in objs:
            _ALIVE[id(x)] = x


def _machine(cluster: ClusterSpec, profile: ComputeProfile | None) -> _Machine:
    profile = profile or DEFAULT_PROFILE
    if _SCOPE[0] == 0:
        return _Machine(cluster, profile)
    key = (cluster, id(profile))
    hit = _MACHINES.get(key)
    if hit is None or hit.profile is not profile:
        hit = _MACHINES[key] = _Machine(cluster, profile)
        _alive(profile)
    return hit


# --- records ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class SiteCost:
    """Predicted time of one attention site or MLP over the whole step."""

    index: int
    variant: str                       # "heads" | "score-reduce" | "qk-gather" | "mlp"
    backend: str = ""                  # attention core: a fused SDPA backend or "explicit"
    compute_ms: float
    comm_ms: float
    terms: tuple[tuple[str, float], ...] = ()   # (term, ms), compute then communication

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS + ("mlp", "graph"):
            raise PlanError(f"SiteCost {self.index}: unknown variant {self.variant!r}; "
                            f"expected one of {VARIANTS + ('mlp', 'graph')}")


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanCost:
    """Predicted step of one plan (helix m x n, or a baseline) on one cluster."""

    name: str                          # "m=2 x n=8", "TP=8 x PP=2"
    devices: int
    compute_ms: float                  # per rank, whole batch
    comm_ms: float
    bubble_ms: float                   # pipeline bubble; 0 for helix
    step_ms: float                     # compute + comm + bubble: no overlap assumed
    tokens_per_s: float
    comm_ms_per_token: float           # comm_ms / (B * S)
    memory_bytes_per_rank: int         # at the chosen micro-batch
    param_elements_per_rank: int       # the largest rank's (it holds the row-parallel biases)
    micro_batch: int                   # sequences per micro-batch
    micro_batches: int
    sites: tuple[SiteCost, ...] = ()
    mlps: tuple[SiteCost, ...] = ()
    graph: tuple[SiteCost, ...] = ()   # ops read from the graph (norms, residuals, rotary, masks)
    notes: tuple[str, ...] = ()
    overlap_chunks: int = 1            # k: each micro-batch cut in k interleaved chunks
    exposed_comm_ms: float | None = None   # communication not hidden by compute (None: comm_ms)
    sequence_parallel: bool = False    # norms / residuals on 1/N of the tokens (RS + AG)

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(s.variant for s in self.sites)


# --- the machine ----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Machine:
    cluster: ClusterSpec
    profile: ComputeProfile
    # the profile's answers (efficiency by size, peaks by dtype) as asked: a search asks the
    # same few thousand times
    seen: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def matmul_s(self, flops: float, nbytes: float, dtype: str) -> float:
        if type(flops) is np.ndarray:     # one size bucket per element
            eta_ = np.array([self.matmul_efficiency(float(f), dtype) for f in flops])
        else:
            eta_ = self.matmul_efficiency(flops, dtype)
        return self._op(flops, nbytes, eta_, dtype)

    def matmul_efficiency(self, flops: float, dtype: str) -> float:
        key = ("mm", flops, dtype)
        eta_ = self.seen.get(key)
        if eta_ is None:
            eta_ = self.seen[key] = self.profile.matmul_efficiency(flops, dtype)
        return eta_

    def score_gemm_s(self, op: str, flops: float, nbytes: float, head_dim: int,
                     dtype: str) -> float:
        """An explicit core's QK^T or PV at its measured rate (the matmul rows without one)."""
        eta_ = self._asked("score_gemm_efficiency", op, head_dim, dtype)
        if eta_ is None:
            return self.matmul_s(flops, nbytes, dtype)
        return self._op(flops, nbytes, eta_, dtype)

    def attention_s(self, backend: str, flops: float, nbytes: float, head_dim: int,
                    dtype: str, mask: str = "none", value_dim: int | None = None) -> float | None:
        eta_ = self._asked("attention_efficiency", backend, head_dim, dtype, mask, value_dim)
        return None if eta_ is None else self._op(flops, nbytes, eta_, dtype)

    def _asked(self, method: str, *args):
        """profile.<method>(*args), once per arguments."""
        key = (method, *args)
        if key not in self.seen:
            self.seen[key] = getattr(self.profile, method)(*args)
        return self.seen[key]

    def bandwidth_efficiency(self, op: str, cols: int | None = None) -> float:
        return self._asked("bandwidth_efficiency", op, cols)

    def memory_s(self, nbytes: float, efficiency: float) -> float:
        return self._op(0.0, nbytes, 1.0, "fp32", efficiency)

    def _op(self, flops, nbytes, eta_, dtype, eta_mem_=None) -> float:
        peak = self.seen.get(dtype)
        if peak is None:
            peak = self.seen[dtype] = self.cluster.peak_flops(dtype)
        return _ev("op_time", {
            "FLOPs": flops, "Q": nbytes, "P": peak, "eta": eta_,
            "BW": self.cluster.memory_bandwidth,
            "eta_mem": self.profile.elementwise_efficiency if eta_mem_ is None else eta_mem_})

    def collective_s(self, kind: str, nbytes: float, groups) -> float:
        """The slowest of `groups` (rank tuples) running `kind` on `nbytes` at once."""
        times = [_collective_shape_s(kind, nbytes, size, *span, self.cluster)
                 for size, span in _group_shapes(tuple(groups), self.cluster)]
        return _vmax(*times) if times else 0.0


_GROUP_CACHE: dict = {}


def _group_shapes(groups: tuple, cluster: ClusterSpec) -> tuple:
    """The distinct (size, node span (g, k)) of `groups`: groups of one shape cost the same."""
    if not groups:
        return ()
    key = (len(groups), groups[0], groups[-1], cluster.nodes, cluster.gpus_per_node)
    hit = _GROUP_CACHE.get(key)
    if hit is None:
        seen = {}
        for grp in groups:
            seen.setdefault((len(grp), group_span(grp, cluster)), grp)
        hit = _GROUP_CACHE[key] = tuple(seen)
        if len(_GROUP_CACHE) > 4096:
            _GROUP_CACHE.clear()
            _GROUP_CACHE[key] = hit
    return hit


_LAYSIG: dict = {}


def _lay_key(lay: _Layout, cluster: ClusterSpec) -> int:
    """What a layout's costs depend on: m, n, the shards and its groups' distinct (size, span);
    replicas at other offsets whose groups span nodes alike share it (the term memo's key)."""
    return _lay_keys(lay, cluster)[0]


def _lay_out_key(lay: _Layout, cluster: ClusterSpec) -> int:
    """What an MLP's cost depends on of a layout: its shards and output groups' shapes."""
    return _lay_keys(lay, cluster)[1]


def _lay_keys(lay: _Layout, cluster: ClusterSpec) -> tuple[int, int]:
    # interned (`_intern`): memo keys hold two ints, not the groups' nested shapes
    hit = _LAYSIG.get(id(lay)) if _SCOPE[0] else None
    if hit is None or hit[0] is not lay or hit[1] is not cluster:
        out = _group_shapes(lay.out_groups, cluster)
        hit = (lay, cluster, (_intern((lay.m, lay.n, lay.shards,
                                       _group_shapes(lay.m_groups, cluster), out)),
                              _intern(("out", lay.shards, out))))
        if _SCOPE[0]:
            _alive(lay)
            _LAYSIG[id(lay)] = hit
    return hit[2]


def group_span(ranks, cluster: ClusterSpec) -> tuple[int, int]:
    """(g, k): most ranks of the group on one node, nodes the group touches."""
    if len(ranks) > 64:  # the same count, vectorized, for 4096-rank groups
        counts = np.bincount(np.asarray(ranks) // cluster.gpus_per_node)
        counts = counts[counts > 0]
        return int(counts.max()), int(len(counts))
    per_node = Counter(cluster.node_of(r) for r in ranks)
    return max(per_node.values()), len(per_node)


def collective_s(kind: str, nbytes: float, ranks, cluster: ClusterSpec) -> float:
    """Seconds of one `kind` ("all_reduce" | "all_gather" | "reduce_scatter") over
    `ranks`; `nbytes` is the full tensor (the gathered one for all-gather)."""
    if kind not in ("all_reduce", "all_gather", "reduce_scatter"):
        raise PlanError(f"unknown collective {kind!r}; the cost model knows all_reduce, "
                        f"all_gather, reduce_scatter")
    ranks = tuple(ranks)
    if len(ranks) == 1 or nbytes == 0:
        return 0.0
    return _collective_shape_s(kind, nbytes, len(ranks), *group_span(ranks, cluster), cluster)


def _collective_shape_s(kind: str, nbytes: float, size: int, g_: int, k_: int,
                        cluster: ClusterSpec) -> float:
    """collective_s of a group of `size` ranks, at most g_ of them on one node, on k_ nodes."""
    if size == 1 or (type(nbytes) is not np.ndarray and nbytes == 0):
        return 0.0
    if type(nbytes) is np.ndarray and not nbytes.all():   # sizes of 0 bytes cost nothing
        return np.where(nbytes == 0, 0.0, _collective_shape_s(kind, np.where(
            nbytes == 0, 1.0, nbytes), size, g_, k_, cluster))
    what = "all_reduce" if kind == "all_reduce" else "all_gather"   # RS costs as AG
    # a large sum all-reduce runs as reduce-scatter + all-gather (no local copy of x,
    # runtime/collectives.py): the same bytes, one launch latency more
    split = kind == "all_reduce" and nbytes >= NO_COPY_ALL_REDUCE_MIN_BYTES
    if k_ == 1:
        return _ev(f"ring_{what}", {"alpha": cluster.nvlink_alpha, "p": size, "X": nbytes,
                                    "beta": cluster.nvlink_busbw}) + split * cluster.nvlink_alpha
    return split * (cluster.nvlink_alpha + cluster.network_alpha) + _ev(f"hier_{what}", {
        "alpha_nv": cluster.nvlink_alpha, "alpha_net": cluster.network_alpha, "g": g_, "k": k_,
        "X": nbytes, "B_nv": cluster.nvlink_busbw, "B_nic": cluster.nic_bandwidth,
        "R": cluster.nics_per_node})


def p2p_s(nbytes: float, src: int, dst: int, senders_per_node: int, cluster: ClusterSpec) -> float:
    """One send of `nbytes` from rank `src` to `dst` while `senders_per_node`
    ranks of the node send at once (they share the node's NIC rails)."""
    if cluster.node_of(src) == cluster.node_of(dst):
        return _ev("p2p_send", {"alpha": cluster.nvlink_alpha, "X": nbytes,
                                "beta": cluster.nvlink_busbw})
    rail = cluster.nic_bandwidth * min(1.0, cluster.nics_per_node / senders_per_node)
    return _ev("p2p_send", {"alpha": cluster.network_alpha, "X": nbytes, "beta": rail})


# --- one micro-batch ------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Layout:
    """Who shares what: m-groups (score / Q,K collectives) and output groups."""

    m: int
    n: int
    shards: int                        # ranks sharing the output projection and MLPs
    m_groups: tuple[tuple[int, ...], ...] = ()
    out_groups: tuple[tuple[int, ...], ...] = ()


def _helix_layout(m: int, n: int, dp: int = 1, node: int | None = None) -> _Layout:
    """Groups of the replicas: replica r holds ranks [r m n, (r + 1) m n), so each of its
    m-groups and output groups is the first replica's shifted by r m n (rank = ((r n) + i) m + j;
    the chattiest, the m-group, contiguous and inside a node, then the n-groups). A group's
    node span is unchanged by a shift of whole nodes (`node` GPUs each), so only replicas at
    distinct offsets r m n mod `node` are listed: they have every group shape there is."""
    size = m * n
    offsets = {}
    for r in range(dp):
        at = (r * size) % node if node else r
        if at in offsets:   # r size mod node repeats with period node / gcd(size, node)
            break
        offsets[at] = r
    key = (m, n, tuple(offsets.values()))
    if _SCOPE[0] and key in _LAYOUTS:       # a layout is its offsets (search memo)
        return _LAYOUTS[key]
    mesh = Mesh(n=n, m=m)
    shift = lambda groups: tuple(tuple(x + r * size for x in g)   # noqa: E731
                                 for r in offsets.values() for g in groups)
    lay = _Layout(m, n, size, shift(mesh.groups("dim")), shift(mesh.groups("all")))
    if _SCOPE[0]:
        _LAYOUTS[key] = lay
    return lay


def _site_env(site: AttentionSite, w: int, b: int, lay: _Layout) -> dict:
    return {"b": b, "S_q": site.q_len, "S_k": site.kv_len, "H": site.num_heads,
            "H_kv": site.num_kv_heads, "d": site.head_dim, "D": site.embed_dim, "m": lay.m,
            "n": lay.n, "w": w, "o": 1 if site.o_proj else 0, "c_kv": 1 if site.cross else 0}


def _mlp_env(mlp: MlpSite, summary: ModelSummary, b: int, shards: int) -> dict:
    return {"b": b, "T": _tokens_per_sequence(mlp, summary), "D": mlp.hidden, "F": mlp.ffn,
            "u": len(mlp.up_weights), "N": shards, "w": summary.dtype_bytes}


def _tokens_per_sequence(mlp: MlpSite, summary: ModelSummary) -> int:
    if summary.batch > 0 and mlp.tokens >= summary.batch and mlp.tokens % summary.batch == 0:
        return mlp.tokens // summary.batch
    return summary.seq_len


def _site_options(site: AttentionSite, lay: _Layout, mach: _Machine,
                  variant: str | None, backend: str | None = None) -> list[tuple[str, str]]:
    # it reads the site's shape, m and the profile: in a search scope, once per such key
    if not _SCOPE[0]:
        return _site_options_uncached(site, lay, mach, variant, backend)
    key = ("opt", _shape_key(site), lay.m, id(mach), variant, backend)
    hit = _TERMS.get(key)
    if hit is None:
        _alive(mach)
        hit = _TERMS[key] = _site_options_uncached(site, lay, mach, variant, backend)
    return list(hit)


def _site_options_uncached(site: AttentionSite, lay: _Layout, mach: _Machine,
                           variant: str | None, backend: str | None = None
                           ) -> list[tuple[str, str]]:
    """(variant, core backend) pairs a site may take: score-reduce is always an
    explicit core; heads and qk-gather may use any fused kernel the profile has for d.
    `backend` ("explicit" or a fused one) keeps only the pairs with that core, where the
    site has one (what a graph that runs that core costs); a site with none keeps all."""
    if lay.m == 1:
        variants = ("heads",)
    elif variant is not None:
        variants = (variant,)
    else:
        variants = ("score-reduce", "qk-gather")
    mask = mask_kind(site)
    fused = [bk for bk in ("flash", "cudnn", "efficient")
             if mach._asked("attention_efficiency", bk, site.head_dim, site.dtype, mask)
             is not None]
    options = [(v, bk) for v in variants
               for bk in (("explicit",) if v == "score-reduce" else
                          ("explicit", *[bk for bk in fused
                                         if fused_takes(bk, site.head_dim, _value_dim(site, v, lay))]))]
    if backend is None:
        return options
    return [o for o in options if o[0] == "score-reduce" or o[1] == backend] or options


def _value_dim(site: AttentionSite, variant: str, lay: _Layout) -> int:
    """V's head dim at the core: d/m in both m > 1 variants."""
    return site.head_dim if variant == "heads" else site.head_dim // lay.m


def mask_kind(site: AttentionSite) -> str:
    """"tensor" (a mask or bias the core reads), "causal" (is_causal), or "none"."""
    if site.head_bias or (site.mask is not None and not site.mask_causal):
        return "tensor"
    return "causal" if site.is_causal or site.mask_causal else "none"


def _attention_terms_uncached(site, w, variant, backend, b, lay, mach,
                              blockwise: bool = True) -> list[tuple[str, str, float]]:
    """[(term, "compute" | "comm", seconds)] of one micro-batch of b sequences."""
    env = _site_env(site, w, b, lay)
    dt = site.dtype
    terms = [("q/k/v projections", "compute",
              mach.matmul_s(_ev("q_proj_flops", env), _ev("q_proj_bytes", env), dt)
              + mach.matmul_s(_ev("kv_proj_flops", env), _ev("kv_proj_bytes", env), dt))]
    if variant == "qk-gather":
        terms.append(("Q,K all-gather (m-group)", "comm",
                      mach.collective_s("all_gather", _ev("qk_gather_bytes", env), lay.m_groups)))
        # the gathered chunks are stacked along d (functional all_gather_tensor's cat): a copy
        terms.append(("Q,K reassembly after the gather", "compute",
                      mach.memory_s(2 * _ev("qk_gather_bytes", env),
                                    mach.bandwidth_efficiency("pointwise"))))
    if backend != "explicit":
        t = mach.attention_s(backend, _ev("fused_core_flops", env), _ev("fused_core_bytes", env),
                             site.head_dim, dt, mask_kind(site), _value_dim(site, variant, lay))
        terms.append((f"attention core ({backend})", "compute", t))
    else:
        qk = "partial" if variant == "score-reduce" else "full"   # d/m or all d in QK^T
        d_qk = site.head_dim // lay.m if qk == "partial" else site.head_dim
        terms.append(("QK^T over d/m" if qk == "partial" else "QK^T", "compute",
                      mach.score_gemm_s("qk_gemm", _ev(f"qk_flops_{qk}", env),
                                        _ev(f"qk_bytes_{qk}", env), d_qk, dt)))
        if variant == "score-reduce":
            terms.append(("score all-reduce (m-group)", "comm",
                          mach.collective_s("all_reduce", _ev("score_reduce_bytes", env),
                                            lay.m_groups)))
        prof, cols = mach, site.kv_len
        if variant == "score-reduce":    # the all-reduced scores, scaled: read, write
            terms.append(("scale of scores", "compute",
                          mach.memory_s(_ev("score_passes_bytes", {**env, "P_s": 2}),
                                        prof.bandwidth_efficiency("pointwise", cols))))
        if mask_kind(site) != "none":    # masked_fill_ in place: read, write
            terms.append(("mask over scores", "compute",
                          mach.memory_s(_ev("score_passes_bytes", {**env, "P_s": 2}),
                                        prof.bandwidth_efficiency("mask_fill", cols))))
        soft = "softmax" if mask_kind(site) == "none" else "masked_softmax"
        terms += [("softmax", "compute",
                   mach.memory_s(_ev("softmax_bytes", env), prof.bandwidth_efficiency(soft, cols))),
                  ("PV", "compute", mach.score_gemm_s("pv_gemm", _ev("pv_flops", env),
                                                      _ev("pv_bytes", env),
                                                      _value_dim(site, variant, lay), dt))]
    if site.qk_norm and lay.m > 1:
        terms.append(("q/k norm all-reduce (m-group)", "comm",
                      mach.collective_s("all_reduce", _ev("qk_norm_bytes", env), lay.m_groups)))
    if site.o_proj:
        terms += [("output projection", "compute",
                   mach.matmul_s(_ev("o_proj_flops", env), _ev("o_proj_bytes", env), dt)),
                  ("output all-reduce", "comm",
                   mach.collective_s("all_reduce", _ev("attn_out_bytes", env), lay.out_groups))]
    else:
        terms.append(("output all-gather", "comm",
                      mach.collective_s("all_gather", _ev("attn_gather_bytes", env),
                                        lay.out_groups)))
    if blockwise:   # no graph to read the elementwise ops from (a hand-written summary)
        terms.append(("norm + residual", "compute",
                      mach.memory_s(_ev("block_elementwise_bytes", env),
                                    mach.profile.elementwise_efficiency)))
    return terms


def _mlp_terms_uncached(mlp, summary, b, lay, mach) -> list[tuple[str, str, float]]:
    env = _mlp_env(mlp, summary, b, lay.shards)
    dt = mlp.dtype
    ew = mach.profile.elementwise_efficiency
    tail = [] if summary.workload is not None else [
        ("norm + residual", "compute",
         mach.memory_s(_ev("block_elementwise_bytes", {**env, "S_q": env["T"]}), ew))]
    return [
        ("up projection", "compute",
         mach.matmul_s(_ev("mlp_up_flops", env), _ev("mlp_up_bytes", env), dt)),
        ("activation", "compute", mach.memory_s(_ev("mlp_act_bytes", env),
                                                mach.bandwidth_efficiency("pointwise"))),
        ("down projection", "compute",
         mach.matmul_s(_ev("mlp_down_flops", env), _ev("mlp_down_bytes", env), dt)),
        ("MLP all-reduce", "comm",
         mach.collective_s("all_reduce", _ev("mlp_out_bytes", env), lay.out_groups)),
    ] + tail


# --- memory -----------------------------------------------------------------------
_SHAPES: dict = {}   # (id(items), key) -> (items, result): a summary's tuples are reused


def _by_shape(items, key) -> list[tuple[object, int]]:
    """(one item, how many) per distinct key: 80 identical layers are counted, not summed."""
    if not isinstance(items, tuple):      # a list may change: not memoized
        return _by_shape_uncached(items, key)
    return _identity_memo(_SHAPES, items, key, lambda: _by_shape_uncached(items, key))


def _by_shape_uncached(items, key) -> list[tuple[object, int]]:
    reps: dict = {}
    for x in items:
        k = key(x)
        reps[k] = (reps[k][0], reps[k][1] + 1) if k in reps else (x, 1)
    return list(reps.values())


def _mlp_shape(x: MlpSite) -> tuple:
    return (x.hidden, x.ffn, len(x.up_weights))


def _mlp_tokens_shape(x: MlpSite) -> tuple:
    return (x.hidden, x.ffn, len(x.up_weights), x.tokens)


def _full_weights(summary: ModelSummary) -> int:
    """Elements of every attention and MLP weight, unsharded (once per tuple of sites and
    of MLPs: a search asks for it per candidate)."""
    key = (id(summary.sites), id(summary.mlps), "weights")
    hit = _SHAPES.get(key)
    if hit is not None and hit[0] is summary.sites and hit[1] is summary.mlps:
        return hit[2]
    out = _full_weights_uncached(summary)
    if isinstance(summary.sites, tuple) and isinstance(summary.mlps, tuple):
        if len(_SHAPES) > DERIVED_CACHE_SIZE:
            _SHAPES.clear()
        _SHAPES[key] = (summary.sites, summary.mlps, out)
    return out


def _full_weights_uncached(summary: ModelSummary) -> int:
    one = _Layout(1, 1, 1)
    return (sum(c * round(_ev("attn_params", _site_env(s, 1, 1, one)))
                for s, c in _by_shape(summary.sites, _shape_key))
            + sum(c * round(_ev("mlp_params", _mlp_env(x, summary, 1, 1)))
                  for x, c in _by_shape(summary.mlps, _mlp_shape)))


def _params_per_rank(summary: ModelSummary, sites, mlps, lay: _Layout) -> int:
    """Replicated parameters whole, `sites` as rank (i, j) holds them, `mlps`
    over `lay.shards` ranks; parameters no site explains (biases) over the shards too."""
    other = max(0, summary.param_elements - summary.replicated_elements - _full_weights(summary))
    return (summary.replicated_elements + math.ceil(other / lay.shards)
            + sum(c * math.ceil(_ev("attn_params", _site_env(s, 1, 1, lay)))
                  for s, c in _by_shape(sites, _shape_key))
            + sum(c * math.ceil(_ev("mlp_params", _mlp_env(x, summary, 1, lay.shards)))
                  for x, c in _by_shape(mlps, _mlp_shape)))


def _site_activation(site, w: int, variant: str, backend: str, lay: _Layout) -> float:
    if _SCOPE[0]:      # a search prices it once per shape, core and (m, n)
        key = ("act", _shape_key(site), w, variant, backend, lay.m, lay.n)
        hit = _TERMS.get(key)
        if hit is None:
            hit = _TERMS[key] = _site_activation_uncached(site, w, variant, backend, lay)
        return hit
    return _site_activation_uncached(site, w, variant, backend, lay)


def _site_activation_uncached(site, w: int, variant: str, backend: str, lay: _Layout) -> float:
    env = {**_site_env(site, w, 1, lay), "g_qk": 1 if variant == "qk-gather" else 0,
           "x_s": 1 if backend == "explicit" else 0}
    return _ev("attn_activation", env)


def _activation_per_sequence(summary, site_peaks, mlps, lay: _Layout) -> float:
    """Residual stream + the largest block: blocks run one after another."""
    peaks = list(site_peaks) + [_ev("mlp_activation", _mlp_env(x, summary, 1, lay.shards))
                                for x, _ in _by_shape(mlps, _mlp_tokens_shape)]
    residual = _ev("residual_activation", {"w": summary.dtype_bytes, "S": summary.seq_len,
                                           "D": _hidden(summary)})
    return residual + max(peaks, default=0.0)


def _hidden(summary: ModelSummary) -> int:
    """D of the residual stream."""
    if summary.sites:
        return summary.sites[0].embed_dim
    return summary.mlps[0].hidden if summary.mlps else 0


def _micro_batch(summary, params: int, act: float, cluster: ClusterSpec) -> int:
    """Largest whole number of sequences that fits, at most B; 0 when none does."""
    fit = _ev("micro_batch", {"Mem": cluster.memory_bytes, "w": summary.dtype_bytes,
                              "P_r": params, "A": max(act, 1.0)})
    return int(max(0, min(fit, summary.batch)))


def _memory_reason(summary, params: int, act: float, cluster: ClusterSpec) -> str:
    gib = 2 ** 30
    p_bytes = params * summary.dtype_bytes
    return (f"memory: one sequence needs {(p_bytes + act) / gib:.2f} GiB per rank (parameters "
            f"{p_bytes / gib:.2f} GiB + activations {act / gib:.2f} GiB) > "
            f"{MEMORY_USABLE_FRACTION * cluster.memory_bytes / gib:.2f} GiB usable of "
            f"{cluster.memory_bytes / gib:.2f} GiB per {cluster.gpu}")


def memory_reason(summary: ModelSummary, m: int, n: int, cluster: ClusterSpec,
                  profile: ComputeProfile | None = None) -> str | None:
    """None when a one-sequence micro-batch of helix m x n fits on every rank
    (each site in its least-memory variant and core), else a sentence why not."""
    _fresh_terms()
    mach = _machine(cluster, profile)
    lay = _Layout(m, n, m * n)   # memory reads m, n and the shards, never the groups
    w = summary.dtype_bytes
    reps, idx = _unique(summary.sites)
    rep_peaks = [min(_site_activation(s, w, v, bk, lay) for v, bk in _site_options(s, lay, mach, None))
                 for s in reps]
    peaks = [rep_peaks[k] for k in idx]
    params = _params_per_rank(summary, summary.sites, summary.mlps, lay)
    act = _activation_per_sequence(summary, peaks, summary.mlps, lay)
    return None if _micro_batch(summary, params, act, cluster) >= 1 else _memory_reason(
        summary, params, act, cluster)


# --- plans ------------------------------------------------------------------------
def _seconds(terms, kind: str | None = None) -> float:
    return sum(t for _, k, t in terms if kind is None or k == kind)


_SPLITS: dict = {}     # id(terms) -> (terms, (compute s, comm s)): memoized term lists' sums


def _split_seconds(terms) -> tuple[float, float]:
    """(_seconds(terms, "compute"), _seconds(terms, "comm")); a term list the search memo keeps
    is summed once."""
    hit = _SPLITS.get(id(terms)) if _SCOPE[0] else None
    if hit is not None and hit[0] is terms:
        return hit[1]
    out = (_seconds(terms, "compute"), _seconds(terms, "comm"))
    if _SCOPE[0]:
        _SPLITS[id(terms)] = (terms, out)
    return out


def _choose_cores(summary, cluster, sites, params: int, lay: _Layout, mach: _Machine,
                  variant: str | None, backend: str | None = None) -> list[tuple[str, str]]:
    """Per site the (variant, backend) fastest for one sequence among those whose
    one-sequence micro-batch fits; the least-memory one when none fits."""
    w = summary.dtype_bytes
    chosen = []
    for site in sites:
        options = _site_options(site, lay, mach, variant, backend)
        act = {o: _site_activation(site, w, *o, lay) for o in options}
        # the fastest option that fits: the first of the ranking that fits (min() over the
        # fitting ones, ties to the earlier, is the first fitting one of the stable sort)
        for o in _ranked_options(site, w, options, lay, mach, summary.workload is None):
            if _micro_batch(summary, params, _activation_per_sequence(summary, [act[o]], (), lay),
                            cluster) >= 1:
                chosen.append(o)
                break
        else:
            chosen.append(min(options, key=act.__getitem__))
    return chosen


def _ranked_options(site, w, options, lay, mach, blockwise) -> list[tuple[str, str]]:
    """`options` sorted by the seconds of a one-sequence micro-batch, then VARIANTS order
    (stable); in a search once per site shape, layout, machine and options."""
    key = ("rank", _shape_key(site), w, tuple(options), _lay_key(lay, mach.cluster), id(mach),
           blockwise)
    hit = _TERMS.get(key) if _SCOPE[0] else None
    if hit is None:
        hit = sorted(options, key=lambda o: (
            _seconds(_attention_terms(site, w, *o, 1, lay, mach, blockwise)),
            VARIANTS.index(o[0])))
        if _SCOPE[0]:
            _alive(mach)
            _TERMS[key] = hit
    return hit


# Terms of one site / MLP depend only on its shape: memoized for the duration of one public
# call (lay and mach live as long), so 80 identical layers cost as one.
_TERMS: dict = {}


def _attention_key(site, w, variant, backend, size, lay, mach, blockwise=True) -> tuple:
    return ("a", _shape_key(site), w, variant, backend, size, _lay_key(lay, mach.cluster),
            id(mach), blockwise)


def _attention_terms(site, w, variant, backend, size, lay, mach, blockwise=True):
    key = _attention_key(site, w, variant, backend, size, lay, mach, blockwise)
    if key not in _TERMS:
        _alive(mach)
        _TERMS[key] = _attention_terms_uncached(site, w, variant, backend, size, lay, mach,
                                                blockwise)
    return _TERMS[key]


def _graph_terms(summary, size, lay, mach, pp: int = 1) -> list[tuple[str, str, float]]:
    """Terms of the ops read from the graph (summary.workload), one micro-batch of `size`."""
    wl = summary.workload
    if wl is None or size == 0:
        return []
    key = _graph_key(summary, size, lay, mach, pp)
    if key in _TERMS:
        return _TERMS[key]
    _alive(mach)
    terms = _TERMS[key] = _graph_terms_uncached(summary, size, lay, mach, pp)
    return terms


def _graph_key(summary, size, lay, mach, pp: int) -> tuple:
    # the graph's terms read its workload, kv heads and dtype: equal for every replica's summary
    site = summary.sites[0] if summary.sites else None
    dt = site.dtype if site else (summary.mlps[0].dtype if summary.mlps else "float32")
    return ("g", summary.workload, site.num_kv_heads if site else 1, dt, size, lay.m, lay.n,
            id(mach), pp)


def _graph_terms_uncached(summary, size, lay, mach, pp: int) -> list[tuple[str, str, float]]:
    """_graph_terms of a summary with a workload; `size` one micro-batch or an array of them."""
    wl = summary.workload
    site = summary.sites[0] if summary.sites else None
    dt = site.dtype if site else (summary.mlps[0].dtype if summary.mlps else "float32")
    env = {"b": size, "W_r": wl.replicated_bytes + wl.mask_bytes, "F_r": wl.replicated_flops,
           "W_n": wl.replicated_norm_bytes, "W_q": wl.q_head_bytes, "W_kv": wl.kv_head_bytes,
           "n": lay.n, "m": lay.m, "H_kv": site.num_kv_heads if site else 1, "p_pp": pp}
    ew = mach.bandwidth_efficiency("pointwise")
    terms = [("replicated ops (residuals, casts, mask)", "compute",
              mach.memory_s(_ev("graph_replicated_bytes", env), ew)),
             ("replicated norms and reductions", "compute",
              mach.memory_s(_ev("graph_norm_bytes", env),
                            mach.bandwidth_efficiency("norm")))]
    if wl.replicated_flops:
        terms.append(("replicated matmuls (outside sites and MLPs)", "compute",
                      mach.matmul_s(_ev("graph_replicated_flops", env), 0.0, dt)))
    if wl.q_head_bytes or wl.kv_head_bytes:
        terms.append(("head-path ops (rotary, repeat_kv, copies)", "compute",
                      mach.memory_s(_ev("graph_head_bytes", env), ew)))
    return terms


def _mlp_key(mlp, summary, lay, mach, size=None) -> tuple:
    # what _mlp_terms_uncached reads of the summary: tokens per sequence, w, and whether a
    # graph workload prices the norms
    return ("m", mlp.hidden, mlp.ffn, len(mlp.up_weights), mlp.dtype,
            _tokens_per_sequence(mlp, summary), summary.dtype_bytes, summary.workload is None,
            size, _lay_out_key(lay, mach.cluster), id(mach))


def _mlp_terms(mlp, summary, size, lay, mach):
    key = _mlp_key(mlp, summary, lay, mach, size)
    if key not in _TERMS:
        _alive(mach)
        _TERMS[key] = _mlp_terms_uncached(mlp, summary, size, lay, mach)
    return _TERMS[key]


_SHAPE_KEYS: dict = {}    # (id(site), None) -> (site, key): a site is frozen, its key computed once


def _shape_key(site: AttentionSite) -> int:
    """What the cost of a site depends on: every field but its index and node names (the
    tuple `_shape_key_uncached`, interned: equal shapes, equal ints)."""
    # an int: memo keys hash it for free
    return _identity_memo(_SHAPE_KEYS, site, None, lambda: _intern(_shape_key_uncached(site)),
                          limit=65536)


def _shape_key_uncached(site: AttentionSite) -> tuple:
    return (site.num_heads, site.num_kv_heads, site.head_dim, site.embed_dim, site.core,
            site.o_proj is not None,
            site.mask is not None, site.is_causal, site.mask_causal, site.head_bias, site.rotary, bool(site.qk_norm),
            site.cross, site.batch, site.q_len, site.kv_len, site.dtype,
            site.k_shared_dims)        # solver._site_reasons reads it


def _unique(sites) -> tuple[list, list[int]]:
    """Sites of distinct shape, and for each site the position of its shape: the 80 layers of
    a LLaMA-70B cost as one, so the plan search stays in milliseconds."""
    if not isinstance(sites, tuple):
        return _unique_uncached(sites)
    return _identity_memo(_SHAPES, sites, "unique", lambda: _unique_uncached(sites))


def _unique_uncached(sites) -> tuple[list, list[int]]:
    reps, where, idx = [], {}, []
    for s in sites:
        key = _shape_key(s)
        if key not in where:
            where[key] = len(reps)
            reps.append(s)
        idx.append(where[key])
    return reps, idx


def _micro_batches(batch: int, b: int) -> list[tuple[int, int]]:
    """[(sequences, how many micro-batches of that size)]: B // b of b, one of B % b."""
    counts = [(b, batch // b)]
    return counts + [(batch % b, 1)] if batch % b else counts


def _aggregate(index: int, variant: str, backend: str, per_micro) -> SiteCost:
    """SiteCost over the step from [(count, terms of one micro-batch)]; in a search scope
    one object per distinct (index, variant, backend, per_micro): candidates share them."""
    if not _SCOPE[0]:
        return _aggregate_uncached(index, variant, backend, per_micro)
    key = ("agg", index, variant, backend, tuple((c, id(t)) for c, t in per_micro))
    hit = _TERMS.get(key)
    if hit is None:
        _alive(*(t for _, t in per_micro))
        hit = _TERMS[key] = _aggregate_uncached(index, variant, backend, per_micro)
    return hit


def _at_index(sc: SiteCost, index: int) -> SiteCost:
    """`sc` for the site (or MLP) `index`: the cost of one shape, placed at each of its sites;
    in a search scope one object per (cost, index)."""
    if sc.index == index:
        return sc
    key = ("at", id(sc), index)
    hit = _TERMS.get(key) if _SCOPE[0] else None
    if hit is None:
        hit = SiteCost(index=index, variant=sc.variant, backend=sc.backend,
                       compute_ms=sc.compute_ms, comm_ms=sc.comm_ms, terms=sc.terms)
        if _SCOPE[0]:
            _alive(sc)
            _TERMS[key] = hit
    return hit


def row_records(cost: PlanCost) -> PlanCost:
    """A records=False cost as a candidate row keeps it: one SiteCost per distinct site (and
    MLP) shape, at the index of its first site; every figure as priced."""
    return dataclasses.replace(cost, sites=tuple({id(x): x for x in cost.sites}.values()),
                               mlps=tuple({id(x): x for x in cost.mlps}.values()))


def _aggregate_uncached(index: int, variant: str, backend: str, per_micro) -> SiteCost:
    ms: dict[tuple[str, str], float] = {}
    for count, terms in per_micro:
        for name, kind, t in terms:
            ms[(name, kind)] = ms.get((name, kind), 0.0) + count * t * 1e3
    ordered = sorted(ms.items(), key=lambda kv: kv[0][1] == "comm")   # compute first, stable
    return SiteCost(index=index, variant=variant, backend=backend,
                    compute_ms=sum(v for (_, k), v in ms.items() if k == "compute"),
                    comm_ms=sum(v for (_, k), v in ms.items() if k == "comm"),
                    terms=tuple((name, v) for (name, _), v in ordered))


def _check_devices(name: str, devices: int, cluster: ClusterSpec) -> None:
    if devices > cluster.devices:
        raise PlanError(f"{name} needs {devices} GPUs but cluster {cluster.name!r} has "
                        f"{cluster.devices} ({cluster.nodes} node{'s' if cluster.nodes != 1 else ''} x {cluster.gpus_per_node}); "
                        f"try a larger cluster file or fewer devices")


def _finish(name, summary, devices, compute_s, comm_s, bubble_s, params, act, b, sites, mlps,
            notes=(), graph=(), global_batch: int | None = None) -> PlanCost:
    """`summary` is one replica's (batch B/dp); tokens/s counts `global_batch` (B) over the
    replica's step, since the dp replicas run their shards at once."""
    if summary.workload is None:
        notes = (*notes, f"no graph behind this summary: norms and residual adds priced as "
                         f"{ELEMENTWISE_PASSES_PER_BLOCK} passes over b*S*D per block")
    global_batch = summary.batch if global_batch is None else global_batch
    tokens = global_batch * summary.seq_len
    if compute_s + comm_s + bubble_s <= 0:  # nothing the model covers: no sites, no MLPs
        notes = (*notes, "no attention site or MLP to cost: the step time covers none of the "
                         "model's work, so tokens/s is not predicted")
        return PlanCost(
            name=name, devices=devices, compute_ms=0.0, comm_ms=0.0, bubble_ms=0.0, step_ms=0.0,
            tokens_per_s=float("nan"), comm_ms_per_token=0.0,
            memory_bytes_per_rank=math.ceil(params * summary.dtype_bytes), param_elements_per_rank=params,
            micro_batch=b, micro_batches=int(_ev("micro_batches", {"B": summary.batch, "b": b})),
            sites=tuple(sites), mlps=tuple(mlps), graph=tuple(graph), notes=tuple(notes))
    return PlanCost(
        name=name, devices=devices, compute_ms=compute_s * 1e3, comm_ms=comm_s * 1e3,
        bubble_ms=bubble_s * 1e3, step_ms=_ev("step", {"t_c": compute_s, "t_x": comm_s,
                                                       "t_b": bubble_s}) * 1e3,
        tokens_per_s=_ev("tokens_per_s", {"B": global_batch, "S": summary.seq_len,
                                          "t_c": compute_s, "t_x": comm_s, "t_b": bubble_s}),
        comm_ms_per_token=comm_s * 1e3 / tokens,
        memory_bytes_per_rank=math.ceil(params * summary.dtype_bytes + b * act),
        param_elements_per_rank=params, micro_batch=b,
        micro_batches=int(_ev("micro_batches", {"B": summary.batch, "b": b})),
        sites=tuple(sites), mlps=tuple(mlps), graph=tuple(graph), notes=tuple(notes))


_REPLICAS: dict = {}


def replica_summary(summary: ModelSummary, dp: int) -> ModelSummary:
    """What one of dp data replicas runs: the same model on B/dp sequences (T tokens each)."""
    if dp == 1:
        return summary
    return _identity_memo(_REPLICAS, summary, dp, lambda: _replica_summary(summary, dp))


def _replica_summary(summary: ModelSummary, dp: int) -> ModelSummary:
    if summary.batch % dp:
        raise PlanError(f"dp={dp}: the global batch B={summary.batch} does not split into {dp} "
                        f"equal shards; try a dp that divides {summary.batch}")
    local = summary.batch // dp
    mlps = tuple(dataclasses.replace(x, tokens=x.tokens // dp)
                 if x.tokens >= summary.batch and x.tokens % summary.batch == 0 else x
                 for x in summary.mlps)
    return dataclasses.replace(summary, batch=local, mlps=mlps)


def cost_plan(summary: ModelSummary, m: int, n: int, cluster: ClusterSpec,
              profile: ComputeProfile | None = None, variant: str | None = None,
              backend: str | None = None, dp: int = 1, pp: int = 1,
              micro_batches: int | None = None, *, records: bool = True) -> PlanCost:
    """Predicted step of helix m x n, or of dp replicas of it. `variant` forces "score-reduce"
    or "qk-gather" on every site when m > 1; otherwise each site takes the faster.
    `backend` prices every core that can take it with that core ("explicit", "flash",
    "cudnn", "efficient"; score-reduce is always explicit) instead of the fastest one.

    dp > 1: each replica is the m x n program on its B/dp sequences, priced exactly as an
    m x n plan of that batch (a forward pass sends nothing between replicas); its groups lie
    at ranks shifted by a replica's m n, so a collective costs what its node span says; the
    step is one replica's (they run at once) and tokens/s counts all B sequences.

    pp > 1: pp pipeline stages of the m x n program, priced by `cost_pipeline_plan` (its
    micro-batch chosen there, or `micro_batches` of them per replica).

    records=False (a candidate row of the plan search): the same figures, but `sites` and
    `mlps` hold each site's shape cost as its first site of that shape indexes it (the
    search keeps one per distinct shape, `row_records`; with pp > 1 they hold just those, as
    a pipeline is not overlapped); the chosen plan is priced again with records=True."""
    if pp > 1:
        return cost_pipeline_plan(summary, m, n, cluster, profile, variant, backend, dp=dp,
                                  pp=pp, micro_batches=micro_batches, records=records)
    _fresh_terms()
    if variant not in (None, "score-reduce", "qk-gather"):
        raise PlanError(f"variant must be 'score-reduce' or 'qk-gather' (or None to choose), "
                        f"got {variant!r}")
    name = f"m={m} x n={n}" if dp == 1 else f"dp={dp} x m={m} x n={n}"
    _check_devices(name, dp * m * n, cluster)
    global_batch, summary = summary.batch, replica_summary(summary, dp)
    mach = _machine(cluster, profile)
    lay = _helix_layout(m, n, dp, cluster.gpus_per_node)
    w = summary.dtype_bytes
    params = _params_per_rank(summary, summary.sites, summary.mlps, lay)
    reps, idx = _unique(summary.sites)
    rep_cores = _choose_cores(summary, cluster, reps, params, lay, mach, variant, backend)
    rep_act = [_site_activation(s, w, *c, lay) for s, c in zip(reps, rep_cores)]
    act = _activation_per_sequence(summary, [rep_act[k] for k in idx], summary.mlps, lay)
    b = _micro_batch(summary, params, act, cluster)
    if b < 1:
        raise PlanError(f"{name}: {_memory_reason(summary, params, act, cluster)}; "
                        f"try more devices or another split")
    counts = _micro_batches(summary.batch, b)
    blockwise = summary.workload is None
    rep_costs = [_aggregate(s.index, v, bk, [(c, _attention_terms(s, w, v, bk, size, lay, mach,
                                                                  blockwise))
                                             for size, c in counts])
                 for s, (v, bk) in zip(reps, rep_cores)]
    sites = [_at_index(rep_costs[k], s.index) if records else rep_costs[k]
             for s, k in zip(summary.sites, idx)]
    mlp_costs: dict = {}      # MLPs of one shape aggregate once (80 layers of a large model)
    for x in summary.mlps:
        key = (x.hidden, x.ffn, x.gated, x.tokens, x.dtype, len(x.up_weights))
        if key not in mlp_costs:
            mlp_costs[key] = _aggregate(x.index, "mlp", "", [
                (c, _mlp_terms(x, summary, size, lay, mach)) for size, c in counts])
    mlps = [mlp_costs[(x.hidden, x.ffn, x.gated, x.tokens, x.dtype, len(x.up_weights))]
            for x in summary.mlps]
    mlps = [_at_index(sc, x.index) for sc, x in zip(mlps, summary.mlps)] if records else mlps
    graph = _graph_cost(summary, counts, lay, mach)
    compute = sum(s.compute_ms for s in sites + mlps + graph) / 1e3
    comm = sum(s.comm_ms for s in sites + mlps + graph) / 1e3
    return _finish(name, summary, dp * m * n, compute, comm, 0.0, params, act, b, sites, mlps,
                   graph=graph, global_batch=global_batch)


def _graph_cost(summary, counts, lay, mach, pp: int = 1) -> list[SiteCost]:
    if summary.workload is None:
        return []
    return [_aggregate(-1, "graph", "", [(c, _graph_terms(summary, size, lay, mach, pp))
                                         for size, c in counts])]


def _tp_reason(site: AttentionSite, tp: int) -> str | None:
    if site.num_heads % tp:
        return f"H={site.num_heads} heads not divisible by TP={tp}"
    kv = site.num_kv_heads
    if (tp <= kv and kv % tp) or (tp > kv and tp % kv):
        return f"H_kv={kv} kv heads cannot be split or replicated evenly over TP={tp}"
    return None


def cost_baseline(summary: ModelSummary, tp: int, pp: int, cluster: ClusterSpec,
                  profile: ComputeProfile | None = None, backend: str | None = None) -> PlanCost:
    """Predicted step of Megatron TP x PP: heads and MLP columns over tp ranks,
    layers over pp stages (stage s on ranks [s*tp, (s+1)*tp)). `backend` as in cost_plan."""
    _fresh_terms()
    name = f"TP={tp} x PP={pp}" if pp > 1 else f"TP={tp}"
    _check_devices(name, tp * pp, cluster)
    for site in summary.sites:
        if (why := _tp_reason(site, tp)) is not None:
            raise PlanError(f"{name}: {why} (site {site.index}); try a TP that divides H")
    layers = max(len(summary.sites), len(summary.mlps))
    if pp > max(layers, 1):
        raise PlanError(f"{name}: PP={pp} stages need at least {pp} layers, the model has "
                        f"{layers}; try PP <= {max(layers, 1)}")
    mach, w = _machine(cluster, profile), summary.dtype_bytes
    stages = []
    for s in range(pp):
        lay = _Layout(1, tp, tp, (), (tuple(range(s * tp, (s + 1) * tp)),))
        _alive(lay)      # its id keys the term memo
        sites = [x for i, x in enumerate(summary.sites) if i * pp // len(summary.sites) == s]
        mlps = [x for i, x in enumerate(summary.mlps) if i * pp // len(summary.mlps) == s]
        params = _params_per_rank(summary, sites, mlps, lay)
        cores = _choose_cores(summary, cluster, sites, params, lay, mach, None, backend)
        act = _activation_per_sequence(
            summary, [_site_activation(x, w, *c, lay) for x, c in zip(sites, cores)], mlps, lay)
        stages.append((s, lay, sites, mlps, cores, params, act))
    b = min(_micro_batch(summary, params, act, cluster) for *_, params, act in stages)
    if b < 1:
        worst = max(stages, key=lambda st: st[5] * w + st[6])
        raise PlanError(f"{name}: {_memory_reason(summary, worst[5], worst[6], cluster)}; "
                        f"try more devices")
    counts = _micro_batches(summary.batch, b)

    def recv_terms(s: int, size: int) -> list[tuple[str, str, float]]:
        if s == 0:
            return []
        act_bytes = w * size * summary.seq_len * _hidden(summary)
        part = act_bytes / tp if PP_SCATTER_GATHER else act_bytes
        senders = min(tp, cluster.gpus_per_node)
        t = p2p_s(part, (s - 1) * tp, s * tp, senders, cluster)
        if PP_SCATTER_GATHER:
            t += collective_s("all_gather", act_bytes, range(s * tp, (s + 1) * tp), cluster)
        return [("stage-boundary send", "comm", t)]

    blockwise = summary.workload is None
    site_costs, mlp_costs, graph_costs, per_stage = [], [], [], []
    for s, lay, sites, mlps, cores, params, act in stages:
        sc = [_aggregate(x.index, v, bk, [(c, _attention_terms(x, w, v, bk, size, lay, mach,
                                                               blockwise))
                                          for size, c in counts])
              for x, (v, bk) in zip(sites, cores)]
        mc = [_aggregate(x.index, "mlp", "", [(c, _mlp_terms(x, summary, size, lay, mach))
                                              for size, c in counts]) for x in mlps]
        gc = _graph_cost(summary, counts, lay, mach, pp)     # a stage's share of the graph's ops
        send = sum(c * _seconds(recv_terms(s, size)) for size, c in counts)
        compute = sum(x.compute_ms for x in sc + mc + gc) / 1e3
        comm = sum(x.comm_ms for x in sc + mc + gc) / 1e3 + send
        one = sum(_seconds(_attention_terms(x, w, *core, b, lay, mach, blockwise))
                  for x, core in zip(sites, cores)) + sum(
            _seconds(_mlp_terms(x, summary, b, lay, mach)) for x in mlps) + _seconds(
            recv_terms(s, b)) + _seconds(_graph_terms(summary, b, lay, mach, pp))
        site_costs += sc
        mlp_costs += mc
        graph_costs = gc
        per_stage.append((compute + comm, compute, comm, send, one, params, act))
    _, compute, comm, send, t_stage, params, act = max(per_stage)
    m_count = int(_ev("micro_batches", {"B": summary.batch, "b": b}))
    bubble = _ev("bubble_fraction", {"M": m_count, "p_pp": pp}) * _ev(
        "pipeline_step", {"M": m_count, "p_pp": pp, "t_stage": t_stage})
    sends = f" (stage-boundary sends {send * 1e3:.1f} ms)" if pp > 1 else ""
    notes = [f"slowest stage: compute {compute * 1e3:.1f} ms + comm {comm * 1e3:.1f} ms"
             f"{sends} over {m_count} micro-batches"]
    return _finish(name, summary, tp * pp, compute, comm, bubble, params, act, b,
                   site_costs, mlp_costs, notes, graph=graph_costs)


# --- communication-compute overlap and sequence-parallel norms --------------------------------
# Batch chunks the planner tries for the overlap pass (passes/overlap.py); each must divide
# the micro-batch.
OVERLAP_CHUNKS = (1, 2, 4, 8)


def overlapped_step(chunk_compute_ms: float, chunk_async_ms: float, collectives: int, k: int,
                    chunk_sync_ms: float = 0.0) -> tuple[float, float]:
    """(step ms, exposed communication ms) of one micro-batch cut into k chunks, priced as it
    runs: two streams, compute and communication. A chunk's compute is cut by its L =
    `collectives` all-reduces into L + 1 equal segments of c = chunk_compute_ms / (L + 1); each
    all-reduce takes x = chunk_async_ms / L. Segment s of chunk i starts when the compute
    stream is free and all-reduce s - 1 of chunk i is done; all-reduce s of chunk i starts when
    segment s of chunk i is done and the communication stream is free (passes/overlap.py's
    order: stage, then chunk). For k >= 2 this comes to

        step = max(k (L + 1) c,  c + k L x + c)

    the larger of compute and communication over the chunks, plus, when communication is the
    longer, the exposed head (chunk 0's first segment, before any all-reduce can start) and
    tail (the last chunk's last segment, after its last all-reduce); for k = 1 it is
    compute + communication (nothing to overlap with). Collectives the overlap
    pass leaves synchronous (all-gathers) add chunk_sync_ms per chunk, exposed."""
    if k < 1 or collectives < 0:
        raise PlanError(f"overlapped_step: k={k} chunks and {collectives} collectives must be "
                        f">= 1 and >= 0")
    L = collectives
    c = chunk_compute_ms / (L + 1)
    x = chunk_async_ms / L if L else 0.0
    compute_free = comm_free = 0.0
    done = [0.0] * k                 # when chunk i's last issued all-reduce ends
    # `b if b > a else a` is max(a, b) (the first of equals), without a call: the search runs
    # this loop (L + 1) k times per overlap option
    for s in range(L + 1):
        last = s == L
        for i in range(k):
            d = done[i]
            compute_free = (d if d > compute_free else compute_free) + c
            if not last:
                comm_free = done[i] = (compute_free if compute_free > comm_free
                                       else comm_free) + x
    step = max(compute_free, max(done)) + k * chunk_sync_ms
    return step, step - k * chunk_compute_ms


def overlapped_step_closed(chunk_compute_ms: float, chunk_async_ms: float, collectives: int,
                           k: int, chunk_sync_ms: float = 0.0) -> tuple[float, float]:
    """`overlapped_step` by its closed form (its docstring), in O(1): what the plan search
    prices k >= 2 with (the simulation runs (L + 1) k steps, 1288 for 80 layers at k = 8).
    Equal to the simulation within float rounding (tests/test_plan_search.py: 1e-12)."""
    if k < 2:
        return overlapped_step(chunk_compute_ms, chunk_async_ms, collectives, k, chunk_sync_ms)
    L = collectives
    c = chunk_compute_ms / (L + 1)
    x = chunk_async_ms / L if L else 0.0
    step = max(k * (L + 1) * c, c + k * L * x + c) + k * chunk_sync_ms
    return step, step - k * chunk_compute_ms


def _async_terms(costs) -> tuple[float, float, int]:
    """(all-reduce ms, other collective ms, all-reduces) of SiteCosts: the overlap pass issues
    every batch-row all-reduce asynchronously and leaves all-gathers synchronous."""
    async_ms = sync_ms = 0.0
    count = 0
    distinct = {id(sc): sc for sc in costs}      # 80 layers of one shape share their SiteCost
    for i, times in Counter(map(id, costs)).items():
        asyncs, syncs = _collective_terms(distinct[i])
        async_ms += times * sum(asyncs)
        sync_ms += times * sum(syncs)
        count += times * len(asyncs)
    return async_ms, sync_ms, count


def _collective_terms(sc: SiteCost) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(all-reduce ms, all-gather / reduce-scatter ms) of one SiteCost's terms, in order; in a
    search once per SiteCost (80 layers share one)."""
    hit = _TERMS.get(("coll", id(sc))) if _SCOPE[0] else None
    if hit is not None and hit[0] is sc:
        return hit[1]
    out = (tuple(ms for name, ms in sc.terms if "all-reduce" in name),
           tuple(ms for name, ms in sc.terms
                 if "all-reduce" not in name and ("all-gather" in name
                                                  or "reduce-scatter" in name)))
    if _SCOPE[0]:
        _TERMS[("coll", id(sc))] = (sc, out)
    return out


def overlap_cost(summary: ModelSummary, base: PlanCost, k: int, m: int, n: int,
                 cluster: ClusterSpec, profile: ComputeProfile | None = None,
                 variant: str | None = None, backend: str | None = None,
                 dp: int = 1) -> PlanCost | None:
    """`base` (cost_plan's m x n, dp) with every micro-batch of b cut into k chunks of b / k:
    each chunk's ops priced at b / k sequences (smaller GEMMs at the profile's efficiency for
    that size), its all-reduces overlapped with the other chunks' compute (`overlapped_step`).
    The micro-batch is the largest b <= base's (the memory limit) that k divides and that
    divides the replica batch evenly (9 fit, k = 2, B/dp = 1024: b = 8); None when there is
    none."""
    if k == 1:
        return dataclasses.replace(base, overlap_chunks=1, exposed_comm_ms=base.comm_ms)
    local = summary.batch // dp
    fits = [x for x in range(k, base.micro_batch + 1, k) if local % x == 0]
    if summary.batch % dp or not fits:
        return None
    b = fits[-1]
    chunk = cost_plan(replica_summary(summary, local * k // b), m, n, cluster, profile,
                      variant, backend, dp=dp, records=False)   # one replica's batch = b / k
    async_ms, sync_ms, count = _async_terms(chunk.sites + chunk.mlps)
    if count == 0:
        return None
    micro, _ = overlapped_step_closed(chunk.compute_ms, async_ms, count, k, sync_ms)
    M = local // b
    step_ms = M * micro
    compute_ms, comm_ms = M * k * chunk.compute_ms, M * k * chunk.comm_ms
    tokens = summary.batch * summary.seq_len
    return dataclasses.replace(
        base, compute_ms=compute_ms, comm_ms=comm_ms, step_ms=step_ms,
        tokens_per_s=tokens / (step_ms / 1e3), exposed_comm_ms=max(step_ms - compute_ms, 0.0),
        overlap_chunks=k, micro_batch=b, micro_batches=M,
        notes=base.notes + (f"overlap k={k}: each micro-batch of {b} runs as {k} chunks of "
                            f"{b // k}; {count} all-reduces per chunk overlap the next chunk's "
                            f"compute; exposed communication {max(step_ms - compute_ms, 0.0):.3f} ms of "
                            f"{comm_ms:.3f}",))


def sequence_parallel_cost(summary: ModelSummary, base: PlanCost, m: int, n: int,
                           cluster: ClusterSpec, dp: int = 1,
                           profile: ComputeProfile | None = None) -> PlanCost | None:
    """`base` with sequence-parallel norms: the residual stream between blocks split along the
    sequence over the N = m n ranks of a replica, so the replicated norm / residual work
    (graph terms) after the first block output runs on 1/N of the tokens (what precedes it,
    Workload.leading_*, stays whole: the first norm), and each output / MLP all-reduce of X becomes a
    reduce-scatter plus an all-gather of X (in the ring model the same bytes, one more alpha).
    With more than one sequence per micro-batch the real path (runtime/collectives.py's
    DistributedBackend, through funcol) also copies X twice per block on the compute side
    (sp_copy_bytes: reduce-scatter's chunk-and-concatenate, all-gather's concatenate); with
    one it scatters and gathers views. None when there is nothing to save (N = 1, or no graph
    workload to price)."""
    N = m * n
    if N == 1 or not base.graph:
        return None
    # what runs before the first all-reduced block output stays whole (Workload.leading_*)
    wl = summary.workload
    kept = {"replicated ops": wl.leading_replicated_bytes / wl.replicated_bytes
            if wl and wl.replicated_bytes else 0.0,
            "replicated norms": wl.leading_norm_bytes / wl.replicated_norm_bytes
            if wl and wl.replicated_norm_bytes else 0.0}
    saved_ms = sum(ms * (1.0 - frac) for sc in base.graph for name, ms in sc.terms
                   for prefix, frac in kept.items() if name.startswith(prefix)) * (N - 1) / N
    lay = _helix_layout(m, n, dp, cluster.gpus_per_node)
    mach = _Machine(cluster, profile or DEFAULT_PROFILE)
    alpha_ms = mach.collective_s("all_gather", 1.0, lay.out_groups) * 1e3
    # the blocks whose all-reduce of X becomes RS + AG, counted from the summary (a search's
    # rows keep one SiteCost per site shape, not one per layer): every site with an output
    # projection, every MLP
    reduced = [s for s in summary.sites if s.o_proj]
    blocks = len(reduced) + len(summary.mlps)
    extra_ms = blocks * base.micro_batches * alpha_ms
    copy_ms = 0.0
    b = base.micro_batch
    if b > 1:
        w = summary.dtype_bytes
        per_mb = sum(_ev("sp_copy_bytes", {"w": w, "b": b, "S_q": s.q_len, "D": s.embed_dim})
                     for s in reduced)
        per_mb += sum(_ev("sp_copy_bytes", {"w": w, "b": b, "D": x.hidden,
                                            "S_q": _tokens_per_sequence(x, summary)})
                      for x in summary.mlps)
        copy_ms = base.micro_batches * mach.memory_s(
            per_mb, mach.profile.elementwise_efficiency) * 1e3
    compute_ms = base.compute_ms - saved_ms + copy_ms
    comm_ms = base.comm_ms + extra_ms
    step_ms = compute_ms + comm_ms + base.bubble_ms
    copies = (f"; {copy_ms:.3f} ms of funcol's copies of X ({b} sequences per micro-batch: "
              f"reduce-scatter and all-gather along the sequence chunk and concatenate)"
              if copy_ms else "")
    return dataclasses.replace(
        base, compute_ms=compute_ms, comm_ms=comm_ms, step_ms=step_ms,
        tokens_per_s=summary.batch * summary.seq_len / (step_ms / 1e3),
        exposed_comm_ms=comm_ms, sequence_parallel=True,
        notes=base.notes + (f"sequence-parallel norms: {saved_ms:.3f} ms of replicated norm / "
                            f"residual work saved, {blocks} all-reduces per micro-batch become "
                            f"reduce-scatter + all-gather (+{extra_ms:.3f} ms of latency)"
                            f"{copies}",))

# --- a lower bound of a split's step (the plan search's branch and bound) ---------------
def peak_efficiency(profile: ComputeProfile | None = None) -> dict[str, float]:
    """The largest efficiency each kind of op of the profile can be priced at (the plan
    search's lower bound): "matmul", the largest of its matmul rates (any size bucket, any
    dtype: matmul_efficiency answers with one of them); "score", an explicit core's QK^T and
    PV (its qk_gemm / pv_gemm rates, or the matmul ones it falls back to); "fused", a fused
    attention kernel (its attention rates; 0 when it has none); "memory", the largest share of
    HBM bandwidth any memory-bound op gets (softmax / elementwise figures, MEMORY_OPS rates);
    "elementwise" and "pointwise", the exact figures the blockwise norm + residual and the
    MLP activation are priced at."""
    profile = profile or DEFAULT_PROFILE

    def top(ops) -> float:
        return max((profile.efficiency(r) for r in profile.rates if r.op in ops), default=0.0)

    return {"matmul": top(("matmul",)), "score": max(top(("qk_gemm", "pv_gemm")), top(("matmul",))),
            "fused": top(("attention",)),
            "memory": max([profile.softmax_efficiency, profile.elementwise_efficiency]
                          + [r.gb_s / profile.hbm_gb_s for r in profile.rates
                             if r.op in MEMORY_OPS]),
            "elementwise": profile.elementwise_efficiency,
            "pointwise": profile.bandwidth_efficiency("pointwise")}


def _sequence_seconds_bound(summary: ModelSummary, sites, mlps, m: int, n: int,
                            cluster: ClusterSpec, eta: dict[str, float], memo: dict) -> float:
    """Seconds of one sequence on one rank of m x n that no core choice or schedule undercuts
    (every op is priced max(FLOPs / (P eta), bytes / (BW eta_mem)) >= either part):
    - projections and MLP GEMMs: FLOPs at the dtype's peak times eta["matmul"];
    - per site the cheapest core: fused (heads / qk-gather, QK^T and PV over all d at
      eta["fused"]), explicit over all d (at eta["score"], plus the softmax's read and write of
      the scores at eta["memory"]) or, m > 1, score-reduce (QK^T and PV over d/m, plus the
      softmax);
    - without a graph workload, the blockwise norm + residual of each site and MLP and the MLP
      activation, at the very efficiencies cost_plan prices them at (bytes linear in b).
    Terms it leaves out (communication, copies, masks, the graph's ops) only add. A site or MLP
    shape is bounded once per (m, n) (`memo`)."""
    lay, total, w = _Layout(m, n, m * n), 0.0, summary.dtype_bytes
    bw = cluster.memory_bandwidth
    blockwise = summary.workload is None
    for s, c in _by_shape(tuple(sites), _shape_key):
        key = ("site", _shape_key(s), w, blockwise, m, n)
        if key in memo:
            total += c * memo[key]
            continue
        env = _site_env(s, w, 1, lay)
        peak = cluster.peak_flops(s.dtype)
        t = (_ev("q_proj_flops", env) + _ev("kv_proj_flops", env)
             + (_ev("o_proj_flops", env) if s.o_proj else 0.0)) / (peak * eta["matmul"])
        full = _ev("qk_flops_full", env) + _ev("pv_flops", env)
        soft = _ev("softmax_bytes", env) / (bw * eta["memory"])
        cores = [full / (peak * eta["score"]) + soft]
        if eta["fused"] > 0:
            cores.append(full / (peak * eta["fused"]))
        if m > 1:
            cores.append((_ev("qk_flops_partial", env) + _ev("pv_flops", env))
                         / (peak * eta["score"]) + soft)
        t += min(cores)
        if blockwise:
            t += _ev("block_elementwise_bytes", env) / (bw * eta["elementwise"])
        memo[key] = t
        total += c * t
    for x, c in _by_shape(tuple(mlps), _mlp_tokens_shape):
        key = ("mlp", _mlp_shape(x), x.dtype, _tokens_per_sequence(x, summary), w, blockwise,
               m, n)
        if key in memo:
            total += c * memo[key]
            continue
        env = _mlp_env(x, summary, 1, m * n)
        t = (_ev("mlp_up_flops", env) + _ev("mlp_down_flops", env)) / (
            cluster.peak_flops(x.dtype) * eta["matmul"])
        t += _ev("mlp_act_bytes", env) / (bw * eta["pointwise"])
        if blockwise:
            t += _ev("block_elementwise_bytes", {**env, "S_q": env["T"]}) / (
                bw * eta["elementwise"])
        memo[key] = t
        total += c * t
    return total


def step_lower_bound_ms(summary: ModelSummary, dp: int, pp: int, m: int, n: int,
                        cluster: ClusterSpec, eta: dict[str, float],
                        memo: dict | None = None) -> float:
    """A step no schedule of dp x pp x m x n can beat (ms; docs/cost_model.md "The search"):
    the replica's B/dp sequences at `_sequence_seconds_bound` each, no communication; with
    pp > 1 the slowest stage's, times (B/dp + pp - 1): a pipeline step is (M + pp - 1) t_stage
    with t_stage >= b x that stage's seconds per sequence and M b = B/dp, b >= 1. Overlap k
    (the compute of all chunks is under the step) and sequence-parallel norms (they save only
    the graph's replicated ops, which it leaves out) stay above it. `eta`: peak_efficiency.
    Deflated by 1e-9 so that float rounding never lifts it above a priced step."""
    memo = {} if memo is None else memo
    key = ("split", m, n, pp)
    if key not in memo:
        if pp == 1:
            memo[key] = _sequence_seconds_bound(summary, summary.sites, summary.mlps, m, n,
                                                cluster, eta, memo)
        else:     # stages of one shape (stage_shapes) bound alike: each shape once
            worst = 0.0
            for part, shape in zip(stage_summaries(summary, pp), stage_shapes(summary, pp)):
                if ("stage", m, n, shape) not in memo:
                    memo[("stage", m, n, shape)] = _sequence_seconds_bound(
                        part, part.sites, part.mlps, m, n, cluster, eta, memo)
                worst = max(worst, memo[("stage", m, n, shape)])
            memo[key] = worst
    local = summary.batch // dp
    return (local + pp - 1) * memo[key] * 1e3 * (1 - 1e-9)


# --- Helix plans with pipeline stages ------------------------------------------------
def stage_of(index: int, count: int, pp: int) -> int:
    """The stage of the index-th of `count` blocks (sites, or MLPs) over pp stages: contiguous
    runs, the earlier stages the shorter when pp does not divide count (as cost_baseline)."""
    return index * pp // count


_STAGES: dict = {}


def stage_summaries(summary: ModelSummary, pp: int) -> tuple[ModelSummary, ...]:
    """What each of pp stages holds: its contiguous run of sites and MLPs, every replicated
    parameter (norms, embeddings, heads: counted on every stage, an over-estimate) and a
    1/pp share of the parameters no site or MLP explains."""
    return _identity_memo(_STAGES, summary, pp, lambda: _stage_summaries(summary, pp))


def stage_shapes(summary: ModelSummary, pp: int) -> tuple[tuple, ...]:
    """Per stage what its cost depends on: its sites' shapes, its MLPs' shapes and tokens per
    sequence, its parameters (stages of one shape cost alike), as an int (`_intern`)."""
    return _identity_memo(_STAGES, summary, (pp, "shapes"), lambda: tuple(
        _intern((tuple(_shape_key(x) for x in part.sites),
                 tuple((_mlp_shape(x), _tokens_per_sequence(x, part)) for x in part.mlps),
                 part.param_elements, part.replicated_elements))
        for part in stage_summaries(summary, pp)))


_INTERNED: dict = {}
_INTERN_NEXT = itertools.count()


def _intern(key: tuple) -> int:
    """A small int standing for `key` (equal keys, equal ints; never reused): a stage's shape
    is a tuple of its 80 sites' keys, hashed once here instead of at every lookup."""
    hit = _INTERNED.get(key)
    if hit is None:
        if len(_INTERNED) > DERIVED_CACHE_SIZE:
            _INTERNED.clear()
        hit = _INTERNED[key] = next(_INTERN_NEXT)
    return hit


def _stage_setup(part: ModelSummary, shape: tuple, cluster: ClusterSpec, lay: _Layout,
                 mach: _Machine, variant: str | None, backend: str | None):
    """(reps, idx, cores, MLP reps, params per rank, activation per sequence) of one stage;
    in a search scope its cores, params and activation are priced once per stage shape and
    layout, whichever replica count asks (they do not depend on the batch)."""
    reps, idx = _unique_uncached(part.sites)
    mlp_reps = _by_shape_uncached(part.mlps, _mlp_tokens_shape)
    key = ("stage", shape, _lay_key(lay, cluster), id(mach), variant, backend,
           part.dtype_bytes, part.seq_len, part.workload is None, tuple(x.index for x in reps))
    hit = _TERMS.get(key) if _SCOPE[0] else None
    if hit is None:
        w = part.dtype_bytes
        params = _params_per_rank(part, part.sites, part.mlps, lay)
        rep_cores = _choose_cores(part, cluster, reps, params, lay, mach, variant, backend)
        act = _activation_per_sequence(
            part, [_site_activation(x, w, *c, lay) for x, c in zip(reps, rep_cores)],
            part.mlps, lay)
        hit = (rep_cores, params, act)
        if _SCOPE[0]:
            _alive(mach)
            _TERMS[key] = hit
    rep_cores, params, act = hit
    return reps, idx, rep_cores, mlp_reps, params, act


def _stage_summaries(summary: ModelSummary, pp: int) -> tuple[ModelSummary, ...]:
    other = max(0, summary.param_elements - summary.replicated_elements - _full_weights(summary))
    out = []
    site_runs, mlp_runs = [[] for _ in range(pp)], [[] for _ in range(pp)]
    for i, x in enumerate(summary.sites):
        site_runs[stage_of(i, len(summary.sites), pp)].append(x)
    for i, x in enumerate(summary.mlps):
        mlp_runs[stage_of(i, len(summary.mlps), pp)].append(x)
    weights: dict = {}       # stages of one shape hold the same weights: summed once
    for p in range(pp):
        sites, mlps = tuple(site_runs[p]), tuple(mlp_runs[p])
        shape = (tuple(map(_shape_key, sites)), tuple(map(_mlp_shape, mlps)))
        if shape not in weights:
            weights[shape] = _full_weights(dataclasses.replace(summary, sites=sites, mlps=mlps))
        out.append(dataclasses.replace(summary, sites=sites, mlps=mlps,
                                       param_elements=summary.replicated_elements
                                       + weights[shape] + math.ceil(other / pp)))
    return tuple(out)


def stage_memory_reason(summary: ModelSummary, m: int, n: int, pp: int, cluster: ClusterSpec,
                        profile: ComputeProfile | None = None) -> str | None:
    """None when a one-sequence micro-batch of every stage of pp x m x n fits, else why not
    (the first stage that does not, named)."""
    seen: dict = {}      # stages of one shape (80 layers over 64 stages: 2 shapes) checked once
    for p, (part, shape) in enumerate(zip(stage_summaries(summary, pp),
                                          stage_shapes(summary, pp))):
        if shape not in seen:
            seen[shape] = memory_reason(part, m, n, cluster, profile)
        if seen[shape] is not None:
            return f"{seen[shape]} (stage {p} of pp={pp})"
    return None


@functools.lru_cache(maxsize=4096)
def _divisors(x: int) -> tuple[int, ...]:
    return tuple(int(v) for v in sympy.divisors(x)) if x > 0 else (1,)


def _grid_seconds(key, grid: tuple, need: int, terms_of, vector_of=None,
                  memo_key=None) -> tuple[np.ndarray, np.ndarray]:
    """(compute, comm) seconds of the terms `terms_of(b)` for each b of grid[:need] (the global
    batch's divisors, ascending) as two arrays; in a search the arrays of one key are kept and
    grown to the larger b a later candidate fits. `vector_of(bs)`: the same terms for an array
    of sizes at once, stored per size under `memo_key(b)` (the key `terms_of` memoizes under),
    for the sizes not priced yet: each size is priced once, by whichever path comes first."""
    hit = _TERMS.get(key)
    have = 0 if hit is None else len(hit[0])
    if have >= need:
        return hit[0][:need], hit[1][:need]
    if vector_of is not None and memo_key is None:    # no scalar memo: the arrays only
        terms = vector_of(np.array(grid[have:need], dtype=float))
        ones = np.ones(need - have)
        comp = ones * _seconds(terms, "compute")
        comm = ones * _seconds(terms, "comm")
        if hit is not None:
            comp, comm = np.concatenate((hit[0], comp)), np.concatenate((hit[1], comm))
        hit = _TERMS[key] = (comp, comm)
        return hit[0][:need], hit[1][:need]
    if vector_of is not None:
        missing = [b for b in grid[have:need] if memo_key(b) not in _TERMS]
        if missing:
            terms = vector_of(np.array(missing, dtype=float))   # float: no int64 overflow
            for i, b in enumerate(missing):
                _TERMS[memo_key(b)] = [(name, kind, float(t[i]) if type(t) is np.ndarray else t)
                                       for name, kind, t in terms]
    new = [_split_seconds(terms_of(b)) for b in grid[have:need]]
    comp = np.array([x[0] for x in new], dtype=float)
    comm = np.array([x[1] for x in new], dtype=float)
    if hit is not None:
        comp, comm = np.concatenate((hit[0], comp)), np.concatenate((hit[1], comm))
    hit = _TERMS[key] = (comp, comm)
    return hit[0][:need], hit[1][:need]


def _pipeline_sizes(summary, global_batch, pp, m, n, lay, mach, cluster, fit, sizes, firsts,
                    crosses, recv_terms, spans, counted, w, blockwise):
    """cost_pipeline_plan's micro-batch search with every size priced at once: per stage class
    (shape, receive) its per-micro-batch seconds over the sizes as arrays, summed in the order
    the scalar `one` sums them (so the figures are the scalar path's), the slowest class per size,
    (M + pp - 1) t_stage, and the fastest step (ties: the larger b). Returns (b, step seconds,
    slowest stage, steps of `sizes`)."""
    grid = _divisors(global_batch)
    need = bisect.bisect_right(grid, fit)
    sel = np.searchsorted(np.array(grid[:need]), sizes)
    lk, mid = _lay_key(lay, cluster), id(mach)
    _alive(mach)
    bodies: dict = {}
    rows, firsts_p = [], []
    for st in firsts.values():
        p, reps, idx, cores, mlp_reps = st[0], *st[2:6]
        if id(reps) not in bodies:
            if id(idx) not in counted:
                counted[id(idx)] = Counter(idx)
            counts = counted[id(idx)]
            parts = []
            for k, (x, (v, bk)) in enumerate(zip(reps, cores)):
                parts.append((counts[k], _grid_seconds(
                    ("ga", _shape_key(x), w, v, bk, grid, lk, mid, blockwise), grid, need,
                    lambda b, x=x, v=v, bk=bk: _attention_terms(x, w, v, bk, b, lay, mach,
                                                                blockwise),
                    (lambda bs, x=x, v=v, bk=bk: _attention_terms_uncached(
                        x, w, v, bk, bs, lay, mach, blockwise)) if VECTOR_TERMS else None,
                    lambda b, x=x, v=v, bk=bk: _attention_key(x, w, v, bk, b, lay, mach,
                                                              blockwise))))
            for x, c in mlp_reps:
                parts.append((c, _grid_seconds(
                    ("gm", _mlp_key(x, summary, lay, mach), grid),
                    grid, need, lambda b, x=x: _mlp_terms(x, summary, b, lay, mach),
                    (lambda bs, x=x: _mlp_terms_uncached(x, summary, bs, lay, mach))
                    if VECTOR_TERMS else None,
                    lambda b, x=x: _mlp_key(x, summary, lay, mach, b))))
            parts.append((1, _grid_seconds(
                ("gg", _graph_key(summary, None, lay, mach, pp), grid),
                grid, need, lambda b: _graph_terms(summary, b, lay, mach, pp),
                (lambda bs: _graph_terms_uncached(summary, bs, lay, mach, pp))
                if VECTOR_TERMS and summary.workload is not None else None,
                lambda b: _graph_key(summary, b, lay, mach, pp))))
            comp = comm = 0
            for c, (a, x) in parts:
                comp = comp + c * a
                comm = comm + c * x
            bodies[id(reps)] = (comp, comm)
        comp, comm = bodies[id(reps)]
        if p == 0:
            rc, rx = 0, 0
        else:
            recv_arr = _grid_seconds(
                ("gr", mid, m * n, crosses(p), _span_of(spans, p, m * n, cluster),
                 PP_SCATTER_GATHER, summary.seq_len, _hidden(summary), w, grid), grid, need,
                lambda b, p=p: recv_terms(p, b),
                (lambda bs, p=p: recv_terms(p, bs)) if VECTOR_TERMS else None)
            rc, rx = recv_arr
        rows.append(((comp + rc) + (comm + rx))[sel])     # one(): (compute, comm), summed
        firsts_p.append(p)
    t = np.vstack(rows)
    slow = np.argmax(t, axis=0)               # the first of equal stages, as max() picks
    t_stage = t[slow, np.arange(len(sizes))]
    steps = (summary.batch // np.array(sizes) + pp - 1) * t_stage   # (M + pp - 1) t_stage
    best = steps.min()
    j = max(i for i in range(len(sizes)) if steps[i] == best)     # ties: the larger b
    return sizes[j], float(steps[j]), firsts_p[slow[j]], [float(x) for x in steps]


def _span_of(spans: dict, p: int, size: int, cluster: ClusterSpec) -> tuple[int, int]:
    if p not in spans:
        spans[p] = range_span(p * size, size, cluster.gpus_per_node)
    return spans[p]


def range_span(start: int, size: int, node: int) -> tuple[int, int]:
    """group_span of the contiguous ranks [start, start + size) on nodes of `node` GPUs,
    counted: (most ranks on one node, nodes touched)."""
    first, last = start // node, (start + size - 1) // node
    if first == last:
        return size, 1
    inner = node if last - first > 1 else 0          # whole nodes between the two ends
    return max(node - start % node, (start + size - 1) % node + 1, inner), last - first + 1


def cost_pipeline_plan(summary: ModelSummary, m: int, n: int, cluster: ClusterSpec,
                       profile: ComputeProfile | None = None, variant: str | None = None,
                       backend: str | None = None, *, dp: int = 1, pp: int,
                       micro_batches: int | None = None, records: bool = True) -> PlanCost:
    """Predicted step of dp replicas of pp stages of helix m x n (cost_plan with pp > 1).

    Stage p of replica d holds ranks [(d pp + p) m n, (d pp + p + 1) m n) and the blocks
    `stage_of` gives it, each split m x n as cost_plan splits it; between stages each of the
    m n ranks sends its 1/(m n) of the hidden state (b S D) to its counterpart (p2p_send)
    and the next stage all-gathers it over its m n ranks, as Megatron's scatter-gather and
    cost_baseline (the whole b S D from each rank when m n does not divide D). Per micro-batch
    a stage takes t_stage (its sites, MLPs, its 1/pp of the graph's ops, its receive); the
    step is (M + pp - 1) t_stage of the slowest stage: M t_stage of work plus the bubble
    (pp - 1) t_stage, as cost_baseline. The micro-batch b is searched over the divisors of
    the replica batch B/dp that fit in memory (all M = B/(dp b) micro-batches whole): more
    micro-batches shrink the bubble, smaller ones run smaller GEMMs; the fastest step wins
    (ties: the larger b). `micro_batches` forces M."""
    _fresh_terms()
    if variant not in (None, "score-reduce", "qk-gather"):
        raise PlanError(f"variant must be 'score-reduce' or 'qk-gather' (or None to choose), "
                        f"got {variant!r}")
    name = f"dp={dp} x pp={pp} x m={m} x n={n}"
    _check_devices(name, dp * pp * m * n, cluster)
    layers = max(len(summary.sites), len(summary.mlps))
    if pp > max(layers, 1):
        raise PlanError(f"{name}: pp={pp} stages need at least {pp} blocks, model "
                        f"{summary.name!r} has {layers}; try pp <= {max(layers, 1)}")
    global_batch, summary = summary.batch, replica_summary(summary, dp)
    mach = _machine(cluster, profile)
    lay = _helix_layout(m, n, dp * pp, cluster.gpus_per_node)    # every stage's groups
    w, blockwise = summary.dtype_bytes, summary.workload is None
    stages, by_shape = [], {}
    shapes = stage_shapes(summary, pp)
    for p, (part, shape) in enumerate(zip(stage_summaries(summary, pp), shapes)):
        # stages of one shape (80 layers over 4 stages) are costed once
        if shape not in by_shape:
            by_shape[shape] = _stage_setup(part, shape, cluster, lay, mach, variant, backend)
        stages.append((p, part, *by_shape[shape]))
    fit = min(_micro_batch(summary, st[-2], st[-1], cluster) for st in by_shape.values())
    if fit < 1:
        worst = max(stages, key=lambda st: st[-2] * w + st[-1])
        raise PlanError(f"{name}: {_memory_reason(summary, worst[-2], worst[-1], cluster)} "
                        f"(stage {worst[0]}); try more stages or devices")
    local = summary.batch
    if micro_batches is not None:
        if local % micro_batches:
            raise PlanError(f"{name}: M={micro_batches} micro-batches need the replica batch "
                            f"B/dp={local} to split evenly; try M in "
                            f"{', '.join(map(str, _divisors(local)))}")
        sizes = [local // micro_batches]
        if sizes[0] > fit:
            raise PlanError(f"{name}: M={micro_batches} micro-batches of {sizes[0]} sequences, "
                            f"but at most {fit} fit per rank; try M >= {math.ceil(local / fit)}")
    else:
        sizes = [b for b in _divisors(local) if b <= fit]
    hop = min(m * n, cluster.gpus_per_node)     # ranks of a node sending at once

    # stages.py splits the hidden state over the stage's m n ranks along D (its only static
    # dim) when m n divides D: scatter-gather, priced as cost_baseline prices it
    scatter = PP_SCATTER_GATHER and _hidden(summary) % (m * n) == 0

    hidden = _hidden(summary)
    spans: dict = {}        # stage p -> node span of its m n ranks (the all-gather's group)

    def recv_terms(p: int, size: int) -> list[tuple[str, str, float]]:
        if p == 0:
            return []
        nbytes = w * size * summary.seq_len * hidden
        src, dst = (p - 1) * m * n, p * m * n
        if not scatter:
            return [("stage-boundary send", "comm", p2p_s(nbytes, src, dst, hop, cluster))]
        t = p2p_s(nbytes / (m * n), src, dst, hop, cluster)
        # collective_s("all_gather", nbytes, range(dst, dst + m n)), its span computed once
        t += _collective_shape_s("all_gather", nbytes, m * n, *_span_of(spans, p, m * n, cluster),
                                 cluster)
        return [("stage-boundary send", "comm", t)]

    counted: dict = {}      # id(idx) -> how many sites of each rep a stage holds

    bodies: dict = {}       # (id(reps), b) -> a stage's sites, MLPs and graph share

    def body(reps, idx, cores, mlp_reps, b) -> tuple[float, float]:
        """(compute, comm) seconds of one micro-batch of b on a stage of this shape, its
        receive aside (stages of one shape share it, whatever their receive)."""
        key = (id(reps), b)
        if key in bodies:
            return bodies[key]
        per_rep = [_attention_terms(x, w, *c, b, lay, mach, blockwise) for x, c in zip(reps, cores)]
        if id(idx) not in counted:
            counted[id(idx)] = Counter(idx)
        counts = counted[id(idx)]
        terms = [(counts[k], t) for k, t in enumerate(per_rep)]
        terms += [(c, _mlp_terms(x, summary, b, lay, mach)) for x, c in mlp_reps]
        terms.append((1, _graph_terms(summary, b, lay, mach, pp)))
        sums = [(c, _split_seconds(t)) for c, t in terms]
        out = bodies[key] = (sum(c * x[0] for c, x in sums), sum(c * x[1] for c, x in sums))
        return out

    def one(p, reps, idx, cores, mlp_reps, b) -> tuple[float, float]:
        """(compute, comm) seconds of one micro-batch of b on stage p: its body, then its
        receive (the order the terms were summed in before the body was shared)."""
        compute, comm = body(reps, idx, cores, mlp_reps, b)
        recv = _split_seconds(recv_terms(p, b))
        return compute + recv[0], comm + recv[1]

    def crosses(p: int) -> bool:
        """Whether stage p's receive comes from another node (a slower send)."""
        return p > 0 and cluster.node_of((p - 1) * m * n) != cluster.node_of(p * m * n)

    memo: dict = {}
    firsts: dict = {}
    for st in stages:      # stages of one memo key price alike: the first of each stands for all
        firsts.setdefault((id(st[2]), st[0] > 0, crosses(st[0])), st)

    def one_memo(st, b):
        # stages of one shape share their reps' list; their receives cost alike when they
        # cross (or stay inside) a node alike
        key = (id(st[2]), st[0] > 0, crosses(st[0]), b)
        if key not in memo:
            memo[key] = one(st[0], *st[2:6], b)
        return memo[key]

    def price(b: int):
        """(step seconds, slowest stage's (compute, comm) seconds of a micro-batch, stage)."""
        rows = []
        for st in firsts.values():
            per = one_memo(st, b)
            rows.append((sum(per), per, st[0]))
        t_stage, per_micro, p_slow = max(rows, key=lambda r: r[0])
        return _ev("pipeline_step", {"M": local // b, "p_pp": pp, "t_stage": t_stage}), \
            per_micro, p_slow

    if _SCOPE[0]:     # a search: every size at once, over arrays the whole search shares
        b, step, p_slow, steps = _pipeline_sizes(
            summary, global_batch, pp, m, n, lay, mach, cluster, fit, sizes, firsts, crosses,
            recv_terms, spans, counted, w, blockwise)
        priced = {x: (t,) for x, t in zip(sizes, steps)}
    else:
        priced = {b: price(b) for b in sizes}
        b = min(priced, key=lambda x: (priced[x][0], -x))
        step, _, p_slow = priced[b]
    count = local // b
    # the chosen b's records: every site and MLP over its stage's M micro-batches
    sites, mlps, agg, mlp_keys = [], [], {}, {}
    if not records:     # a row: one SiteCost per distinct shape (row_records), in site order
        seen: set = set()
        for p, part, reps, idx, cores, mlp_reps, params, act in stages:
            if id(reps) in seen:    # a stage of a shape already listed adds no new cost
                continue
            seen.add(id(reps))
            sites += [_aggregate(x.index, v, bk, [(count, _attention_terms(
                x, w, v, bk, b, lay, mach, blockwise))]) for x, (v, bk) in zip(reps, cores)]
            for x, _ in mlp_reps:
                key = ("mlp", _mlp_tokens_shape(x))
                if key not in agg:
                    agg[key] = _aggregate(x.index, "mlp", "", [(count, _mlp_terms(
                        x, part, b, lay, mach))])
                mlps.append(agg[key])
        sites = list({id(x): x for x in sites}.values())
        mlps = list({id(x): x for x in mlps}.values())
    for (p, part, reps, idx, cores, mlp_reps, params, act), shape in zip(
            stages if records else (), shapes):
        if id(reps) not in agg:
            agg[id(reps)] = [_aggregate(x.index, v, bk, [(count, _attention_terms(
                x, w, v, bk, b, lay, mach, blockwise))]) for x, (v, bk) in zip(reps, cores)]
        rep_costs = agg[id(reps)]
        sites += [_at_index(rep_costs[k], x.index) for x, k in zip(part.sites, idx)]
        if shape not in mlp_keys:     # stages of one shape hold MLPs of the same shapes
            mlp_keys[shape] = [("mlp", _mlp_tokens_shape(x)) for x in part.mlps]
        for x, key in zip(part.mlps, mlp_keys[shape]):
            if key not in agg:
                agg[key] = _aggregate(x.index, "mlp", "", [(count, _mlp_terms(x, part, b, lay,
                                                                              mach))])
            mlps.append(_at_index(agg[key], x.index))
    gc = _graph_cost(summary, [(b, count)], lay, mach, pp)
    slow = stages[p_slow]
    compute_1, comm_1 = one(p_slow, *slow[2:6], b)
    compute, comm = count * compute_1, count * comm_1
    send = count * _seconds(recv_terms(p_slow, b))
    params, act = slow[-2], slow[-1]
    bubble = _ev("bubble_fraction", {"M": count, "p_pp": pp}) * step
    tried = ", ".join(f"b={x}: {priced[x][0] * 1e3:,.1f} ms" for x in sorted(priced))
    notes = [f"pp={pp}: M={count} micro-batches of b={b} sequences per replica (the fastest "
             f"step of {tried}); bubble (pp-1)/(M+pp-1) = {pp - 1}/{count + pp - 1}",
             f"slowest stage {p_slow}: compute {compute * 1e3:.1f} ms + comm {comm * 1e3:.1f} ms"
             + (f" (stage-boundary sends {send * 1e3:.1f} ms)" if send else "")
             + f" over {count} micro-batches"]
    if m == 1 and all(s.num_kv_heads == s.num_heads for s in summary.sites):
        notes.append(f"m=1 x n={n} x pp={pp} is the Megatron TP={n} x PP={pp} partition "
                     f"(heads and MLP columns over {n} ranks per stage)")
    return _finish(name, summary, dp * pp * m * n, compute, comm, bubble, params, act, b,
                   sites, mlps, notes, graph=gc, global_batch=global_batch)
