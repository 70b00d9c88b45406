"""Frozen records of what `find_attention` and `find_mlp` see in a graph.

Vocabulary (DESIGN.md): H query heads, H_kv key/value heads, d head dim,
D hidden size, B batch, S_q / S_k query / key length, F MLP hidden size.
Node fields hold FX node names of the captured ATen graph; weight fields hold
parameter names (dotted, as in the user's module's state_dict).
"""

from __future__ import annotations

from dataclasses import dataclass, field

CORES = ("sdpa", "explicit")
ROTARY_STYLES = ("half", "interleaved")


@dataclass(frozen=True, slots=True, kw_only=True)
class Rotary:
    """Rotary embedding on q and k: `dims` (r) of the d head dims are rotated.

    style "half": dim t pairs with t + r/2 (rotate_half, LLaMA / NeoX);
    style "interleaved": dim 2t pairs with 2t + 1 (GPT-J).
    """

    dims: int
    style: str = "half"

    def __post_init__(self) -> None:
        if self.style not in ROTARY_STYLES:
            raise ValueError(f"Rotary.style must be one of {ROTARY_STYLES}, got {self.style!r}")
        if self.dims <= 0 or self.dims % 2:
            raise ValueError(f"Rotary.dims must be a positive even number, got {self.dims}")


@dataclass(frozen=True, slots=True, kw_only=True)
class AttentionSite:
    """One multi-head attention subgraph of the captured graph."""

    index: int
    q_proj: str
    k_proj: str
    v_proj: str
    o_proj: str | None
    q_weight: str
    k_weight: str
    v_weight: str
    o_weight: str | None
    fused_qkv: bool
    num_heads: int          # H
    num_kv_heads: int       # H_kv
    head_dim: int           # d
    embed_dim: int          # D: input features of the q projection
    core: str               # "sdpa" | "explicit"
    core_nodes: tuple[str, ...]
    mask: str | None = None
    is_causal: bool = False
    # the mask is built from sizes alone and is SDPA's causal mask at the example sizes: the
    # program runs the core with is_causal and builds no mask (passes/size_masks.py)
    mask_causal: bool = False
    head_bias: bool = False  # a mask/bias with a head axis (ALiBi, relative position bias)
    rotary: Rotary | None = None
    qk_norm: tuple[str, ...] = ()
    cross: bool = False      # K/V computed from another input than Q
    batch: int = 1           # B of the example inputs
    q_len: int = 1           # S_q
    kv_len: int = 1          # S_k
    dtype: str = "float32"
    # MLA (DeepSeek-V2/V3): the last k_shared_dims dims of every key head come from one
    # projection all heads read alike (the decoupled rope key k_pe of kv_a_proj_with_mqa),
    # which every rank runs whole; the rest of k from a per-head projection (kv_b_proj)
    k_shared_proj: str | None = None
    k_shared_dims: int = 0
    v_head_dim: int = 0      # d_v of the value heads; 0 when not recorded (then d)
    # an output gate: core output * sigmoid(gate) before o_proj, the gate's features column
    # sharded like the heads they gate (Qwen3-Next packs them into q_proj)
    gate_proj: str | None = None

    def __post_init__(self) -> None:
        if self.core not in CORES:
            raise ValueError(f"AttentionSite.core must be one of {CORES}, got {self.core!r}")
        if self.num_heads <= 0 or self.num_kv_heads <= 0 or self.head_dim <= 0:
            raise ValueError(
                f"AttentionSite {self.index}: H={self.num_heads}, H_kv={self.num_kv_heads}, "
                f"d={self.head_dim} must all be positive")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"AttentionSite {self.index}: H={self.num_heads} is not a multiple of "
                f"H_kv={self.num_kv_heads}")


@dataclass(frozen=True, slots=True, kw_only=True)
class MlpSite:
    """A Linear -> activation -> Linear pair (gated: two up projections)."""

    index: int
    up: tuple[str, ...]      # column-sharded linears (gate and up for gated MLPs)
    down: str                # row-sharded linear
    up_weights: tuple[str, ...]
    down_weight: str
    hidden: int              # D
    ffn: int                 # F
    gated: bool = False
    tokens: int = 1          # B * S of the example inputs
    dtype: str = "float32"


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """Per sequence, the work outside projections, attention cores and MLP interiors
    (passes/workload.py reads it from the graph, op by op as eager PyTorch runs it)."""

    replicated_bytes: float = 0.0   # pointwise ops every rank runs whole (residual adds, casts)
    replicated_norm_bytes: float = 0.0  # norms and row reductions every rank runs whole
    # of those two, what runs before the first all-reduced block output (an attention's output
    # projection or an MLP's down projection): sequence-parallel norms leave it whole (the
    # input's first norm, the embedding), as the sequence is split only from there on
    leading_replicated_bytes: float = 0.0
    leading_norm_bytes: float = 0.0
    q_head_bytes: float = 0.0       # on query-head tensors: divides over n * m ranks
    kv_head_bytes: float = 0.0      # on key/value-head tensors: over min(n, H_kv) * m ranks
    mask_bytes: float = 0.0         # building a materialized (.., S_q, S_k) attention mask
    replicated_flops: float = 0.0   # matmuls outside sites and MLPs (an LM head)
    ops: int = 0                    # kernels counted


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSummary:
    """What the solver and the cost model need to know about a captured model."""

    sites: tuple[AttentionSite, ...]
    mlps: tuple[MlpSite, ...]
    param_elements: int          # all parameters of the model
    replicated_elements: int     # parameters outside attention sites and MLPs (norms, embeddings, heads)
    dtype_bytes: int = 4
    batch: int = 1               # B of the example inputs
    seq_len: int = 1             # S of the example inputs (tokens per sequence)
    name: str = "model"
    # None for a summary written by hand: the cost model then prices a block's norm and
    # residual by cost.ELEMENTWISE_PASSES_PER_BLOCK (and says so in the plan's notes)
    workload: Workload | None = None
    extra: dict = field(default_factory=dict, compare=False, hash=False)
