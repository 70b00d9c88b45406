"""explicit_cache_cores: each fused attention core that reads a static KV cache, written out as
softmax(scores) @ v (one job: give passes/seq_split.py the core it splits; docs/decode.md).

seq_split cuts a rank graph's cache into s chunks of positions and combines each chunk's
`softmax(scores) @ v` exactly over the "seq" axis; a fused core (SDPA, Helix's chunked kernel,
the score-reduce tail) hides its softmax. Before the split, each fused core downstream of a
cache write becomes, with SDPA's semantics (torch 2.13, eval: dropout_p = 0):

    s = (q @ k^T) * scale                         # (B, H, T, S_max); scale None: 1/sqrt(q's d)
    s = s.masked_fill(~tril(ones(T, S_max)), -inf)          # is_causal: top-left aligned
    s = s + mask            (float mask)                      # or
    s = s.masked_fill(~mask, -inf)   (bool mask: True keeps)
    out = _safe_softmax(s, -1) @ v                # a row with no visible key gives 0, as SDPA

k and v are repeat_interleave'd over the heads dim by H / H_kv when enable_gqa; the score-reduce
tail `attend(scores, v, mask, is_causal, scale)` starts from its all-reduced scores. The core
ops and where their arguments sit are the rules table `CORES` (op -> rule, None: not a core).

An explicit core over the cache (Hugging Face's eager attention) keeps its ops; only the
no-ops between its softmax and its matmul (a cast to the dtype it has, dropout in eval mode,
dtype assertions) are dropped, so that seq_split sees softmax(scores) @ v.

Only cores that read the cache are rewritten (a core over the prompt alone keeps its kernel),
and only when the caller splits positions (compile_decoder with s > 1); an s = 1 program never
runs this pass. Refused (HelixError naming the node): dropout_p other than 0, and an is_causal
decided at run time (passes/size_masks.py's probe).

Invariant: the returned module computes what `gm` computed, call after call (it shares `gm`'s
buffers, cache slices included; `gm` itself is left as it is).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

import helix_compiler.runtime.kernels_chunked  # noqa: F401  (registers torch.ops.helix.chunked_*)
from helix_compiler.errors import HelixError
from helix_compiler.runtime import kernels  # noqa: F401  (registers torch.ops.helix.attend)

from .find_attention import CACHE_WRITE_OPS
from .graph_utils import SOFTMAX_OPS, aten, fake_shapes, sdpa_args

__all__ = ["CORES", "Core", "explicit_cache_cores"]

helix = torch.ops.helix


@dataclass(frozen=True, slots=True, kw_only=True)
class Core:
    """A fused core's operands: q and k (or the unscaled scores q k^T), v, the mask, is_causal,
    the scale (None: 1/sqrt(q's head dim)) and whether k / v repeat over the query heads."""

    q: fx.Node | None
    k: fx.Node | None
    scores: fx.Node | None
    v: fx.Node
    mask: fx.Node | None
    is_causal: object           # bool, or a Node (decided at run time: refused)
    scale: float | None
    gqa: bool = False
    dropout_p: object = 0.0


def _kw(node: fx.Node) -> dict:
    return node.normalized_arguments(node.graph.owning_module, normalize_to_only_use_kwargs=True).kwargs


def _sdpa(node):
    # aten.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, *,
    # scale, enable_gqa): the core of HF's attn_implementation="sdpa" and of StaticCache exports
    a = sdpa_args(node)
    return Core(q=a["query"], k=a["key"], scores=None, v=a["value"], mask=a["attn_mask"],
                is_causal=a["is_causal"], scale=a["scale"], gqa=bool(a["enable_gqa"]),
                dropout_p=a["dropout_p"])


def _chunked_attention(node):
    # helix.chunked_attention(q, k, v, mask, is_causal, scale, chunk_bytes, min_head_dim):
    # passes/kernel_choice.py's SDPA where no fused kernel takes the head dim
    a = _kw(node)
    return Core(q=a["q"], k=a["k"], scores=None, v=a["v"], mask=a["mask"], is_causal=a["is_causal"],
                scale=a["scale"])


def _attend(node):
    # helix.attend / helix.chunked_attend(scores, v, mask, is_causal, scale[, chunk_bytes]): the
    # score-reduce tail after the scores' all-reduce over the m-group (m > 1)
    a = _kw(node)
    return Core(q=None, k=None, scores=a["scores"], v=a["v"], mask=a["mask"],
                is_causal=a["is_causal"], scale=a["scale"])


CORES = {
    aten.scaled_dot_product_attention.default: _sdpa,
    helix.chunked_attention.default: _chunked_attention,
    helix.attend.default: _attend,
    helix.chunked_attend.default: _attend,
}


def _reads_cache(graph: fx.Graph) -> set:
    """Nodes computed from a KV cache buffer (index_copy_ into a get_attr) or its write."""
    seen = set()
    for node in graph.nodes:
        written = node.op == "get_attr" and any(
            u.target in CACHE_WRITE_OPS and u.args[0] is node for u in node.users)
        if written or any(a in seen for a in node.all_input_nodes):
            seen.add(node)
    return seen


def _val(node):
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _emit(graph: fx.Graph, node: fx.Node, core: Core) -> fx.Node:
    """The explicit core of `core`, inserted before `node`; its output node."""
    if not (isinstance(core.dropout_p, (int, float)) and core.dropout_p == 0):
        raise HelixError(f"explicit_cache_cores: attention core {node.name} reads the KV cache with "
                         f"dropout_p={core.dropout_p}; a decode step runs in eval mode (dropout_p=0): "
                         f"call model.eval() before compiling")
    if isinstance(core.is_causal, fx.Node):
        raise HelixError(f"explicit_cache_cores: attention core {node.name} reads the KV cache with "
                         f"is_causal decided at run time ({core.is_causal.name}); the sequence split "
                         f"needs the mask as a tensor: build the mask from cache positions, or use s=1")
    call = graph.call_function
    k, v = core.k, core.v
    if core.gqa:
        # SDPA's enable_gqa: kv head h serves query heads h g .. h g + g - 1 (repeat_interleave)
        g = int(_val(core.q).shape[-3]) // int(_val(k).shape[-3])
        k = call(aten.repeat_interleave.self_int, (k, g, -3))
        v = call(aten.repeat_interleave.self_int, (v, g, -3))
    if core.scores is None:
        scores = call(aten.matmul.default, (core.q, call(aten.transpose.int, (k, -2, -1))))
    else:
        scores = core.scores
    scale = core.scale
    if scale is None:
        scale = 1.0 / math.sqrt(int(_val(core.q).shape[-1]))
    s = call(aten.mul.Tensor, (scores, scale))                                  # (B, H, T, S_max)
    if core.is_causal:
        # SDPA's is_causal keeps key j <= query row i over the scores' own (T, S_max), top-left
        # aligned (a one-token step sees key 0 only, as SDPA does); seq_split narrows it
        if core.scores is None:
            like, T, S = _val(core.q), int(_val(core.q).shape[-2]), int(_val(core.k).shape[-2])
        else:
            like = _val(core.scores)
            T, S = int(like.shape[-2]), int(like.shape[-1])
        ones = call(aten.ones.default, ([T, S],), {"dtype": torch.bool, "device": like.device})
        hidden = call(aten.logical_not.default, (call(aten.tril.default, (ones,)),))
        s = call(aten.masked_fill.Scalar, (s, hidden, float("-inf")))
    if core.mask is not None:
        mv = _val(core.mask)
        if mv is not None and mv.dtype == torch.bool:
            s = call(aten.masked_fill.Scalar, (s, call(aten.logical_not.default, (core.mask,)), float("-inf")))
        else:
            s = call(aten.add.Tensor, (s, core.mask))
    p = call(aten._safe_softmax.default, (s, -1))
    return call(aten.matmul.default, (p, v))                                   # (B, H, T, d_v)


def _is_identity(node: fx.Node) -> bool:
    """A no-op between a softmax and its matmul: a cast to the dtype it has, dropout in eval."""
    x = node.args[0] if node.args else None
    if node.target is aten.to.dtype:
        return _val(x) is not None and node.args[1] == _val(x).dtype and len(node.args) == 2 \
            and not node.kwargs
    if node.target is aten.dropout.default:
        return node.args[1] == 0 or node.args[2] is False
    return False


def _identities(graph: fx.Graph, reads: set) -> list:
    """Each no-op (`_is_identity`) and dtype assertion a softmax over the cache passes through
    on its way to its matmul: Hugging Face's eager core (transformers
    models/llama/modeling_llama.py eager_attention_forward: softmax(..., dtype=float32)
    .to(query.dtype), then dropout(p, training=False))."""
    out = []
    for sm in [n for n in graph.nodes if n in reads and n.target in SOFTMAX_OPS]:
        x = sm
        while True:
            users = [u for u in x.users if u.target is not aten._assert_tensor_metadata.default]
            out += [u for u in x.users if u not in users]
            if len(users) != 1 or not _is_identity(users[0]):
                break
            x = users[0]
            out.append(x)
    return out


def explicit_cache_cores(gm: fx.GraphModule, args: tuple) -> fx.GraphModule:
    """`gm` with every fused core that reads a KV cache written out explicitly, and every no-op
    between an explicit core's softmax and its matmul dropped (a new module sharing `gm`'s
    buffers), or `gm` itself when there is neither. `args`: example inputs, for the shapes
    (q's heads and head dim)."""
    cores = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in CORES]
    reads = _reads_cache(gm.graph)
    if not any(n in reads for n in cores) and not _identities(gm.graph, reads):
        return gm
    g = fx.Graph()
    g._codegen = gm.graph._codegen
    g.output(g.graph_copy(gm.graph, {}))
    out = fx.GraphModule(gm, g, class_name=type(gm).__name__)   # gm's attributes, shared
    fake_shapes(out, args)
    reads = _reads_cache(out.graph)
    for node in [n for n in out.graph.nodes if n.op == "call_function" and n.target in CORES and n in reads]:
        with out.graph.inserting_before(node):
            res = _emit(out.graph, node, CORES[node.target](node))
        node.replace_all_uses_with(res)
        out.graph.erase_node(node)
    for node in reversed(_identities(out.graph, _reads_cache(out.graph))):
        if node.target is not aten._assert_tensor_metadata.default:
            node.replace_all_uses_with(node.args[0])
        out.graph.erase_node(node)
    out.graph.lint()
    out.recompile()
    return out
