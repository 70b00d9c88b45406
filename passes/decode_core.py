"""split_kv_cores: each SDPA core of a decode step that reads the KV cache with one query
position runs as helix.chunk_attention over the whole cache (one job: flash-decoding's split
of the keys for an s = 1 step; docs/decode.md, "s = 1: the split-KV core, opt-in").

A decode step's core has one query row per sequence and head. SDPA's fused kernels spread
their work over query rows and heads, so a rank with few sequences and one kv head leaves
most of the GPU idle while it reads the cache. Measured on an H200: a replica of TP=8 at one
sequence (LLaMA-70B shape, 32k positions) spent 22 us a layer in cuDNN's flash kernel on a
16.8 MB cache slice, 0.76 TB/s (results/decode_compiled_h200_tp8_k12_inductor.json's kernel
profile). helix.chunk_attention (runtime/chunk_core.py) splits the keys over the SMs and
combines the splits exactly (runtime/triton_chunk.py; the explicit math off CUDA). Measured,
its kernel was slower still (30 us a layer there, 165 against cuDNN's 68 at 128k:
docs/BENCHMARKS.md, "The split-KV core at s = 1") while it was handed repeat_kv's stride-0
views, i.e. read the cache once per query head. Reading the cache itself, it is the faster core
of a TP=8 rank at one and two sequences, the slower one of a TP=64 rank at 8 and 16 (ninth
session), so compile_decoder runs it by default (`auto`) only on cores of that winning shape.

Rewritten, for `aten.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal, scale,
enable_gqa)` downstream of a cache write with q of length 1:

    bias = where(mask, 0, -inf)      (a bool mask: True keeps)
         | mask                      (a float mask, added)
         | None
    out  = helix.chunk_attention(q, k, v, bias, scale or 1/sqrt(q's d))[0]

SDPA's semantics: enable_gqa's kv head h serves query heads h g .. h g + g - 1, as
chunk_attention reads them, and a row with no visible key gives 0, as SDPA's fused kernels
give it. A core is kept as it is, with the reason in the returned sites, where it has
dropout, is_causal (a one-position query under SDPA's top-left causal mask sees key 0 only:
no decode step means that), more than one query position, query heads that are not a
multiple of its kv heads (or differ without enable_gqa), or a mask of another dtype.

Invariant: the returned module computes what `gm` computed (to the rounding of another
kernel), call after call; it shares `gm`'s buffers, the cache slices included.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from helix_compiler.runtime import chunk_core as _cc  # noqa: F401  (registers helix.chunk_attention)

from .explicit_cache_cores import _reads_cache
from .gqa_fold import Repeat, repeat_of, repeat_source
from .graph_utils import aten, sdpa_args, shared_copy

__all__ = ["DecodeCoreSite", "split_kv_cores"]

helix = torch.ops.helix
SDPA = aten.scaled_dot_product_attention.default


@dataclass(frozen=True, slots=True)
class DecodeCoreSite:
    """One SDPA core of a decode step: rewritten to helix.chunk_attention, or kept and why."""

    node: str
    rewritten: bool
    why: str = ""
    unrepeated: int = 1      # g > 1: K and V passed un-repeated, g query heads per kv head

    def __str__(self) -> str:
        if not self.rewritten:
            return f"{self.node}: kept as SDPA ({self.why})"
        read = f", K and V read un-repeated (g={self.unrepeated})" if self.unrepeated > 1 else ""
        return f"{self.node}: helix.chunk_attention (split-KV{read})"


def _val(node):
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _refusal(a: dict) -> str | None:
    """Why this SDPA call stays as it is, or None where chunk_attention takes it."""
    q, k, v, mask = (_val(a[x]) for x in ("query", "key", "value", "attn_mask"))
    if q is None or k is None or v is None or (a["attn_mask"] is not None and mask is None):
        return "its operands' shapes are unknown"
    if not (isinstance(a["dropout_p"], (int, float)) and a["dropout_p"] == 0):
        return f"dropout_p={a['dropout_p']}"
    if a["is_causal"] is not False:
        return "is_causal (a one-position query would see key 0 only)"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"q, k, v of {q.dim()}, {k.dim()}, {v.dim()} dims, not 4"
    if q.shape[-2] != 1:
        return f"{q.shape[-2]} query positions, not 1"
    H, Hkv = q.shape[1], k.shape[1]
    if H % Hkv or (H != Hkv and not a["enable_gqa"]):
        return f"{H} query heads over {Hkv} kv heads"
    if mask is not None and mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        return f"a {mask.dtype} mask"
    return None


def _unrepeated(key: fx.Node, value: fx.Node, core: fx.Node) -> tuple[fx.Node, fx.Node, int]:
    """(K, V, g): SDPA's key and value where they are not repeats of the cache in repeat_kv's
    order (g = 1); else the caches they repeat (or those caches' kv heads that a rank's slice
    of the repeated heads reads, viewed before `core`) and g, both repeated alike."""
    rk, rv = (r if isinstance(r, Repeat) else None for r in map(repeat_of, (key, value)))
    if rk is None or rv is None or rk.g != rv.g or rk.kv != rv.kv or rk.g < 2:
        return key, value, 1
    return repeat_source(core.graph, rk, core), repeat_source(core.graph, rv, core), rk.g


# compile_decoder's default (split_kv_core=None): the split-KV core only where it was measured
# faster (H200, torch 2.11, LLaMA-70B shape, compile_decoder's ranks under torch.compile;
# docs/BENCHMARKS.md, "The split-KV core, timed reading the cache un-repeated"): a TP=8 rank
# (g = 8 query heads per kv head) at 1 and 2 sequences, 32k-128k: 0.64-0.93x the SDPA core's
# time per output token; a TP=64 rank (g = 1) at 8 and 16 sequences: 1.0-1.44x (slower).
AUTO_MIN_GROUP = 2        # query heads per kv head read un-repeated, at least
AUTO_MAX_BATCH = 2        # sequences per rank, at most


def split_kv_cores(gm: fx.GraphModule, example_args: tuple, auto: bool = False
                   ) -> tuple[fx.GraphModule, tuple[DecodeCoreSite, ...]]:
    """A copy of the decode-step module `gm` (sharing its parameters and buffers) whose
    one-position SDPA cores over the cache run as helix.chunk_attention, and one site per SDPA
    core downstream of a cache write. `auto`: only the cores of the measured winning shape
    (AUTO_MIN_GROUP, AUTO_MAX_BATCH); the others are kept, and their sites say why."""
    out = shared_copy(gm, example_args)
    graph = out.graph
    cached = _reads_cache(graph)
    sites, biases = [], {}          # a bool mask -> its additive bias, made once for every core
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not SDPA or node not in cached:
            continue
        a = sdpa_args(node)
        why = _refusal(a)
        if why is not None:
            sites.append(DecodeCoreSite(node.name, False, why))
            continue
        q, mask = _val(a["query"]), _val(a["attn_mask"])
        key, value, g = _unrepeated(a["key"], a["value"], node)
        if auto and (g < AUTO_MIN_GROUP or q.shape[0] > AUTO_MAX_BATCH):
            sites.append(DecodeCoreSite(node.name, False, (
                f"auto: {q.shape[0]} sequence(s), g={g} query heads per kv head; the split-KV "
                f"core is chosen at g >= {AUTO_MIN_GROUP} and <= {AUTO_MAX_BATCH} sequences, "
                f"where it was measured faster (split_kv_core=True forces it)")))
            continue
        scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
        call = graph.call_function
        bias = a["attn_mask"]
        if mask is not None and mask.dtype == torch.bool:
            if bias not in biases:
                with graph.inserting_after(bias):
                    biases[bias] = call(aten.where.Scalar, (bias, 0.0, float("-inf")))
            bias = biases[bias]
        # HF's repeat_kv hands SDPA (B, H, C, d) views of the (B, H_kv, C, d) cache (stride 0
        # over the g copies of a head): the kernel takes the cache itself (_unrepeated, above),
        # with the g query heads of a kv head in its rows, so it reads K and V once, not once
        # per query head
        with graph.inserting_before(node):
            pair = call(helix.chunk_attention.default, (a["query"], key, value, bias, float(scale)))
            o = call(operator.getitem, (pair, 0))
        node.replace_all_uses_with(o)
        graph.erase_node(node)
        sites.append(DecodeCoreSite(node.name, True, unrepeated=g))
    graph.eliminate_dead_code()       # the repeats SDPA read, now unused (as gqa_fold drops them)
    graph.lint()
    out.recompile()
    return out, tuple(sites)
