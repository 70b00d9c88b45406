"""find_attention: every multi-head attention site of an ATen graph.

An attention *core* is written in one of two spellings, each recognized once:

* SDPA: ``aten.scaled_dot_product_attention`` (torch.nn.functional, HF "sdpa",
  nn.TransformerEncoderLayer's fast path).
* explicit: ``matmul(q, k^T) -> [scale | mask | bias | to]* -> softmax ->
  [dropout | to]* -> matmul(p, v)`` (nanoGPT, HF "eager", nn.MultiheadAttention
  with need_weights, which uses bmm on (B*H, S, d)).

From the core's q, k and v the pass walks back to the projections that made
them (``aten.linear`` or GPT-2 Conv1D's ``aten.addmm``; one fused projection
may serve all three), and forward from the output to the output projection.
Head structure is read by *provenance*, not by names or layouts: the path from a
projection to the core is run on a tensor whose feature f holds the value f,
element movement (view, transpose, split, unbind, cat, expand ...) is executed
and every other op passes its path operand through.  At the core, each row of
q's last dim then lists the projection features of one head, in head order,
whichever of [3, H, d], [H, 3, d], (B, H, S, d) or (B*H, S, d) the model used.

Invariant: the graph is not modified; each AttentionSite names nodes of it.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from helix_compiler.planning.sites import AttentionSite, Rotary

from .graph_utils import (
    MATMUL_OPS, MOVEMENT_OPS, constant_value, PASS_THROUGH_OPS, SDPA_OPS, SOFTMAX_OPS, aten, example_size, is_projection,
    is_tensor_node, norm_dim, real_users, proj_input, proj_weight_node, shape, tensor_inputs, val,
)
from .graph_utils import ROW_MAX_OPS

# Ops allowed between the QK^T matmul and the softmax (scale, mask, bias, casts; tanh for
# logit softcapping, Gemma 2's c * tanh(scores / c)).
SCORE_OPS = {
    aten.div.Tensor, aten.div.Scalar, aten.mul.Tensor, aten.mul.Scalar, aten.add.Tensor,
    aten.sub.Tensor, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self,
    aten.where.ScalarOther, aten.where.ScalarSelf, aten.div_.Tensor, aten.div_.Scalar,
    aten.mul_.Tensor, aten.add_.Tensor, aten.masked_fill_.Scalar, aten.masked_fill_.Tensor,
    aten.tanh.default, aten.tanh_.default,
    # a floor under the scores: XGLM's torch.max(scores, tensor(finfo.min))
    aten.max.other, aten.maximum.default, aten.clamp_min.default,
} | PASS_THROUGH_OPS
# Reshapes between the scores and the softmax: (B*H, S, S) <-> (B, H, S, S) (BLOOM).
SCORE_VIEW_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
# QK^T spellings: matmul / bmm, and baddbmm(bias, q, k^T) with an additive bias (BLOOM's ALiBi).
QK_OPS = MATMUL_OPS | {aten.baddbmm.default}
# Complex views on the rotary path (DeepSeek-V2's apply_rotary_emb: view_as_complex ->
# complex multiply -> view_as_real): tags move through them like any view.
COMPLEX_VIEWS = {aten.view_as_complex.default, aten.view_as_real.default}
# Scalings of k^T before the QK^T matmul (DeBERTa divides k^T by sqrt(3 d)).
KT_SCALE_OPS = {aten.div.Tensor, aten.div.Scalar, aten.mul.Tensor, aten.mul.Scalar}
# In-place writes of new keys / values into a static KV cache at `cache_position`
# (index_copy_(cache, dim, position, new), the hand-written cache of
# helix_compiler/models/decoder_cache.py; HF's StaticCache uses index_copy_ too): every cache
# position holds the features of the same (head, dim) as the new rows, so the written cache
# carries the new rows' tags broadcast along the position dim.
CACHE_WRITE_OPS = {aten.index_copy_.default, aten.index_copy.default}
# Reductions over the head dim between projection and core: a per-head q/k norm.
NORM_OPS = {aten.mean.dim, aten.var.correction, aten.var_mean.correction, aten.layer_norm.default,
            aten.rms_norm.default, aten.native_layer_norm.default, aten.sum.dim_IntList}


@dataclass(frozen=True, slots=True)
class Core:
    kind: str                 # "sdpa" | "explicit"
    q: fx.Node
    k: fx.Node                # for explicit cores: k before its transpose
    v: fx.Node
    out: fx.Node
    nodes: tuple[fx.Node, ...]
    mask: fx.Node | None
    is_causal: bool
    biases: tuple = ()        # every tensor added to / masking the scores


@dataclass(frozen=True, slots=True)
class Provenance:
    """Where each element of a core input came from in its projection's output."""

    proj: fx.Node
    heads: np.ndarray         # (heads at the core, d): projection feature per (head, dim)
    path: tuple[fx.Node, ...]
    # dims of every head that come from `shared`, one projection all heads read alike (MLA's
    # decoupled rope key k_pe); heads[:, shared_dims] holds shared's features offset by
    # proj's feature count
    shared: fx.Node | None = None
    shared_dims: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class SiteMatch:
    """An AttentionSite plus the provenance the sharder needs (not serialized)."""

    site: AttentionSite
    core: Core
    q: Provenance
    k: Provenance
    v: Provenance
    kv_of_q: tuple[int, ...]  # kv feature-group used by each q head
    k_groups: np.ndarray      # (H_kv, d): projection features of each kv head of k
    v_groups: np.ndarray      # (H_kv, d_v)
    # an output gate (attn_output * sigmoid(gate) before o_proj, Qwen3-Next): the features
    # of `gate_proj` that gate core output (head h, value dim e), shape (H, d_v)
    gate_proj: fx.Node | None = None
    gate: np.ndarray | None = None


def _k_from_transposed(kt: fx.Node) -> fx.Node | None:
    """k from k^T: the explicit spellings transpose the last two dims of k."""
    if kt.target == aten.transpose.int:
        nd = len(shape(kt))
        if {norm_dim(kt.args[1], nd), norm_dim(kt.args[2], nd)} == {nd - 2, nd - 1}:
            return kt.args[0]
    if kt.target == aten.permute.default:
        perm = list(kt.args[1])
        nd = len(perm)
        if perm[:-2] == list(range(nd - 2)) and perm[-2:] == [nd - 1, nd - 2]:
            return kt.args[0]
    if kt.target == aten.t.default:
        return kt.args[0]
    if kt.target in KT_SCALE_OPS and isinstance(kt.args[0], fx.Node) and _scalar(kt.args[1]):
        return _k_from_transposed(kt.args[0])   # (k^T) / c: the scale is the score's
    return None


def _scalar(x) -> bool:
    """A Python number or a 0-dim tensor node."""
    return not isinstance(x, fx.Node) or (is_tensor_node(x) and len(shape(x)) == 0)


def _row_max_of(o: fx.Node, x: fx.Node) -> list[fx.Node] | None:
    """The nodes computing `o` as x's max over the last dim, kept (a stable softmax's shift
    ``x - x.max(-1, keepdim=True).values``: a function of the scores, not a bias), or None."""
    chain = []
    while isinstance(o, fx.Node) and o.target in PASS_THROUGH_OPS:
        chain.append(o)
        o = o.args[0]
    if isinstance(o, fx.Node) and o.target is operator.getitem and o.args[1] == 0:
        chain.append(o)
        o = o.args[0]
    if not (isinstance(o, fx.Node) and o.target in ROW_MAX_OPS and o.args[0] is x):
        return None
    nd = len(shape(x))
    dims = o.args[1] if len(o.args) > 1 else o.kwargs.get("dim")
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    keep = o.args[2] if len(o.args) > 2 else o.kwargs.get("keepdim", False)
    if not keep or [norm_dim(int(k), nd) for k in dims] != [nd - 1]:
        return None
    return [o, *reversed(chain)]


def _logit_columns(cat: fx.Node):
    """A cat of extra logit columns onto the scores along the last dim (attention sinks,
    GPT-OSS's per-head (B, H, S_q, 1) column): (the scores operand, its column range
    [lo, hi) at the example sizes, the extra columns), or None."""
    tensors = list(cat.args[0])
    nd = len(shape(cat))
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if len(tensors) < 2 or not all(is_tensor_node(t) for t in tensors) or norm_dim(dim, nd) != nd - 1:
        return None
    widths = [example_size(shape(t)[-1]) for t in tensors]
    k = max(range(len(tensors)), key=lambda i: widths[i])  # the scores: the widest operand
    lo = sum(widths[:k])
    return tensors[k], (lo, lo + widths[k]), tuple(t for i, t in enumerate(tensors) if i != k)


def _drops_columns(node: fx.Node, softmax: fx.Node, keep: tuple[int, int]) -> bool:
    """`node` slices the softmax's last dim down to the score columns `keep` (sinks dropped)."""
    if node.target is not aten.slice.Tensor:
        return False
    nd = len(shape(node.args[0]))
    if norm_dim(node.args[1] if len(node.args) > 1 else 0, nd) != nd - 1:
        return False
    size = example_size(shape(softmax)[-1])
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else size
    step = node.args[4] if len(node.args) > 4 else 1
    start, end = (example_size(start), example_size(end))
    start, end = (start + size if start < 0 else start), (end + size if end < 0 else end)
    return step == 1 and (max(0, start), min(end, size)) == keep


def _explicit_core(softmax: fx.Node) -> Core | None:
    """matmul -> score ops -> softmax -> pass-through -> matmul, from the softmax.

    Between the scores and the softmax: scale, masks, biases, casts, softcapping (tanh), the
    stable-softmax shift by the row max, and logit columns cat onto the scores (attention
    sinks), which a slice after the softmax must then drop again before P @ V."""
    nodes, mask, biases, keep = [softmax], None, [], None
    x = softmax.args[0]
    while isinstance(x, fx.Node) and (x.target in SCORE_OPS or x.target in SCORE_VIEW_OPS
                                      or x.target is aten.cat.default):
        nodes.append(x)
        if x.target in SCORE_VIEW_OPS:
            x = x.args[0]
            continue
        if x.target is aten.cat.default:
            cols = _logit_columns(x)
            if cols is None or keep is not None:
                return None
            x, keep, extra = cols
            biases.extend(extra)
            continue
        main = [a for a in tensor_inputs(x) if shape(a) == shape(x) and a.target not in ()]
        others = [a for a in tensor_inputs(x) if a not in main[:1]]
        if not main:
            return None
        for o in others:
            shift = _row_max_of(o, main[0])
            if shift is not None:
                nodes.extend(reversed(shift))  # `nodes` runs backwards from the softmax
                continue
            if len(shape(o)) >= 2:
                biases.append(o)
                if mask is None:
                    mask = o
        x = main[0]
    if not (isinstance(x, fx.Node) and x.target in QK_OPS):
        return None
    qk = x
    if qk.target is aten.baddbmm.default:
        biases.append(qk.args[0])
        q_arg, kt_arg = qk.args[1], qk.args[2]
    else:
        q_arg, kt_arg = qk.args[0], qk.args[1]
    k = _k_from_transposed(kt_arg)
    if k is None:
        return None
    p = softmax
    while len(real_users(p)) == 1 and (real_users(p)[0].target in PASS_THROUGH_OPS
                                       or real_users(p)[0].target in SCORE_VIEW_OPS
                                       or (keep is not None and _drops_columns(real_users(p)[0], softmax, keep))):
        if real_users(p)[0].target is aten.slice.Tensor:
            keep = None  # the extra columns are dropped
        p = real_users(p)[0]
        nodes.append(p)
    if keep is not None:
        return None  # extra logit columns reach P @ V: not attention over the keys alone
    pv = [u for u in real_users(p) if u.target in MATMUL_OPS and u.args[0] is p]
    if len(pv) != 1:
        return None
    return Core(kind="explicit", q=q_arg, k=k, v=pv[0].args[1], out=pv[0],
                nodes=(qk, *reversed(nodes), pv[0]), mask=mask, is_causal=False, biases=tuple(biases))


def _sdpa_core(node: fx.Node) -> Core:
    args = list(node.args) + [None] * 8
    mask = args[3] if args[3] is not None else node.kwargs.get("attn_mask")
    causal = args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
    return Core(kind="sdpa", q=args[0], k=args[1], v=args[2], out=node, nodes=(node,),
                mask=mask if isinstance(mask, fx.Node) else None, is_causal=bool(causal))


def find_cores(gm: fx.GraphModule) -> list[Core]:
    cores = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in SDPA_OPS:
            cores.append(_sdpa_core(node))
        elif node.target in SOFTMAX_OPS:
            core = _explicit_core(node)
            if core is not None:
                cores.append(core)
    return cores


def _walk_back_to_projection(start: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """Projections reached walking back from `start` without crossing one; and the nodes passed."""
    found, seen, order, stack = [], set(), [], [start]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if is_projection(node):
            found.append(node)
            continue
        order.append(node)
        if node.op != "call_function":
            continue
        stack.extend(tensor_inputs(node))
    return found, order


_SAME_VALUES = {aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default}
_RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}


def _reshape_tags(t: torch.Tensor, size) -> torch.Tensor:
    """t.reshape(size), keeping stride 0 along each dim of t that is stride 0 (a batch or
    position dim the tags are broadcast over) and maps to one dim of the result: reshape
    copies an expanded tensor whose dims it merges (repeat_kv's (B, H_kv, g, S, d) ->
    (B, H, S, d): B H S d tags, 4.3 GB per layer at S = 131072), and the copy is the same
    along those dims anyway."""
    size = list(size)
    if -1 in size:
        known = math.prod(x for x in size if x != -1)
        size[size.index(-1)] = t.numel() // known if known else 0
    keep = []                                    # (dim of t, dim of the result, its size)
    pre_t, pre_s = [1], [1]
    for x in t.shape:
        pre_t.append(pre_t[-1] * x)
    for x in size:
        pre_s.append(pre_s[-1] * x)
    for k, n in enumerate(t.shape):
        if n > 1 and t.stride(k) == 0:
            for j, m in enumerate(size):
                if m == n and pre_s[j] == pre_t[k]:
                    keep.append((k, j, n))
                    break
    if not keep:
        return t.reshape(size)
    small, out = t, list(size)
    for k, j, _ in keep:
        small = small.narrow(k, 0, 1)
        out[j] = 1
    return small.reshape(out).expand(*size)


def _first_of_distinct(rows: np.ndarray) -> list[int]:
    """Indices of the first occurrence of each distinct row, in order (np.unique(axis=0)
    sorts a structured view: 1-2 ms a call, 0.3 s over the 240 traces of an 80-layer model)."""
    rows = np.ascontiguousarray(rows)
    first: dict[bytes, int] = {}
    for i, row in enumerate(rows):
        first.setdefault(row.tobytes(), i)
    return list(first.values())


def _provenance(proj: fx.Node, target: fx.Node, shared: fx.Node | None = None) -> Provenance | None:
    """Run the path proj -> target on index tags; rows of the result's last dim are heads.

    With `shared`, a second projection tagged after proj's features: the dims of target
    whose tags all come from it are `shared_dims` (None when a dim mixes the two)."""
    # nodes on some path from proj to target, in graph order
    _, back = _walk_back_to_projection(target)
    back_set = set(back)
    on_path, reach = [], {proj} if shared is None else {proj, shared}
    # fx nodes compare by graph position: the path's nodes in graph order without a walk over
    # the whole graph (which made finding attention quadratic in the layer count)
    for node in sorted(back_set):
        if any(a in reach for a in node.all_input_nodes):
            reach.add(node)
            on_path.append(node)
    if target is not proj and target not in reach:
        return None
    feats = int(shape(proj)[-1])
    # Tags are expanded (stride 0) over the leading dims, so a 1024 x 10000 x 8192 projection
    # costs nothing; dims that stay stride 0 are dropped before the rows are read.
    tags = {proj: torch.arange(feats, dtype=torch.float32).expand(*hinted(shape(proj)))}  # exact < 2^24
    if shared is not None:
        sf = int(shape(shared)[-1])
        tags[shared] = torch.arange(feats, feats + sf, dtype=torch.float32).expand(*hinted(shape(shared)))

    def concrete(a):
        if isinstance(a, fx.Node):
            if a in tags:
                return tags[a]
            c = constant_value(a)
            if c is not None:  # an index constant: its real values
                return c
            v = val(a)
            if isinstance(v, torch.Tensor):
                return torch.tensor(-1.0, dtype=torch.float32).expand(*hinted(v.shape))
            return hint(v)
        if isinstance(a, (list, tuple)):
            return type(a)(concrete(x) for x in a)
        return hint(a)

    for node in on_path:
        if node.target in CACHE_WRITE_OPS:
            tags[node] = _cache_tags(node, tags)
            if tags[node] is None:
                return None
        elif node.target in _SAME_VALUES and isinstance(tags.get(node.args[0]), torch.Tensor):
            # the same tags: a copy of an expanded tensor (repeat_kv's clone of a static cache
            # of 128k positions) would materialize it
            tags[node] = tags[node.args[0]]
        elif node.target in _RESHAPES and isinstance(tags.get(node.args[0]), torch.Tensor):
            try:
                tags[node] = _reshape_tags(tags[node.args[0]], concrete(node.args[1]))
            except Exception:
                return None
        elif node.target in MOVEMENT_OPS or node.target in COMPLEX_VIEWS:
            op = aten.reshape.default if node.target in (aten.view.default, aten._unsafe_view.default) \
                else node.target
            if node.target is aten.view_as_complex.default:
                op = lambda x: torch.view_as_complex(x.contiguous())  # noqa: E731 (needs stride 1, 2)
            try:
                tags[node] = op(*concrete(node.args), **concrete(dict(node.kwargs)))
            except Exception:
                return None
        else:
            path_in = [a for a in node.all_input_nodes if isinstance(tags.get(a), torch.Tensor)]
            same = [a for a in path_in if tuple(tags[a].shape) == tuple(hinted(shape(node)))]
            # a reduction (a per-head norm's mean) carries no provenance: its consumer takes
            # its path operand's tags
            tags[node] = tags[same[0]] if same else None
    t = tags.get(target)
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(hinted(shape(target))):
        return None
    d = t.shape[-1]
    # Drop dims along which every slice is the same (batch, sequence; stride 0 or copied by a
    # reshape such as GQA's repeat_kv): what is left are the head dims.
    # Tags depend on the head and the dim only, so a dim is a batch / sequence dim when its
    # first, second and last slices agree (a GQA repeat differs between its first and last).
    for k in reversed(range(t.dim() - 1)):
        n = t.shape[k]
        if t.stride(k) == 0 or n == 1 or (torch.equal(t.select(k, 0), t.select(k, 1))
                                          and torch.equal(t.select(k, 0), t.select(k, n - 1))):
            t = t.select(k, 0)
    rows = t.reshape(-1, d).numpy().astype(np.int64)
    heads = rows[_first_of_distinct(rows)]  # distinct rows in order of first appearance: core head order
    if (heads < 0).any():
        return None
    if shared is None:
        return Provenance(proj=proj, heads=heads, path=tuple(on_path))
    from_shared = heads >= feats
    cols = from_shared.all(axis=0)
    if not cols.any() or (from_shared.any(axis=0) != cols).any():
        return None
    return Provenance(proj=proj, heads=heads, path=tuple(on_path), shared=shared,
                      shared_dims=tuple(int(c) for c in np.nonzero(cols)[0]))


def _cache_tags(node: fx.Node, tags: dict) -> torch.Tensor | None:
    """index_copy_(cache, dim, position, new): new's tags broadcast over the cache's position
    dim; None unless new comes from the projection and the cache's other dims match it."""
    cache, dim, _, new = node.args[:4]
    t = tags.get(new)
    if not isinstance(t, torch.Tensor) or not isinstance(cache, fx.Node) or cache in tags:
        return None
    out = hinted(shape(node))
    dim = norm_dim(dim, len(out))
    if t.dim() != len(out) or any(t.shape[k] != out[k] for k in range(len(out)) if k != dim):
        return None
    return t.narrow(dim, 0, 1).expand(*out)


# Symbolic sizes (batch, sequence) are evaluated at small values for the provenance run: the
# tags do not depend on them, and a 4096-token sequence would cost gigabytes per site.
_SMALL: dict = {}
# expr -> its small value, while _SMALL is set (sympy's subs costs ~30 us; the same few
# expressions -- batch, sequence, their products -- come back thousands of times at 80 layers)
_SMALL_VALUES: dict = {}


def hint(x):
    """A concrete value for a size: symbols at their small provenance value, else the example's."""
    if isinstance(x, torch.SymInt):
        expr = x.node.expr
        if _SMALL:
            got = _SMALL_VALUES.get(expr)
            if got is None and expr.free_symbols <= _SMALL.keys():
                got = _SMALL_VALUES[expr] = int(expr.subs(_SMALL))
            if got is not None:
                return got
        return int(x.node.hint)
    return x


def _small_sizes(gm: fx.GraphModule) -> dict:
    out = {}
    for node in gm.graph.nodes:
        v = node.meta.get("val")
        if node.op == "placeholder" and isinstance(v, torch.Tensor):
            for size in v.shape:
                if isinstance(size, torch.SymInt):
                    for sym in size.node.expr.free_symbols:
                        out[sym] = min(int(size.node.hint), 4)
    return out


def hinted(sizes) -> list:
    return [hint(s) for s in sizes]


def _head_order(rows: np.ndarray, full: np.ndarray) -> list[int]:
    """For each row of `full` (core head order, duplicates allowed), its index among distinct rows."""
    keys = [r.tobytes() for r in rows]
    return [keys.index(r.tobytes()) for r in full]


def _core_rows(proj: fx.Node, target: fx.Node, prov: Provenance) -> np.ndarray:
    """All head rows at the core in head order, repeats kept (GQA repeat_kv gives H rows for k)."""
    return prov.heads


def _rotary(q: Provenance, d: int) -> Rotary | None:
    """Slices of the head dim on the q path reveal rotary embedding (DESIGN.md section 2).

    Only slices of a last dim no longer than d count: a fused QKV split of (B, S, 3D) is not rotary.
    Rotate-half (LLaMA, NeoX) cuts the span at r/2 (and at r when partial). Pairs (2t, 2t + 1)
    are spelled as step-2 slices ``x[..., 0::2]`` / ``x[..., 1::2]`` (GPT-J, Cohere) or as a
    complex view of the last dim (``view_as_complex``: Meta's LLaMA, Llama 4): the rotated span
    is then the slice's source length, or twice the complex view's length.
    """
    bounds, pairs = set(), set()
    for node in q.path:
        if node.target == aten.slice.Tensor:
            src = shape(node.args[0])
            dim = norm_dim(node.args[1] if len(node.args) > 1 else 0, len(src))
            if dim != len(src) - 1 or hint(src[-1]) > d:
                continue
            size = src[-1]
            start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
            end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else size
            step = node.args[4] if len(node.args) > 4 else 1
            if step == 2:  # start 0 or 1 picks the pair member, not a bound
                pairs.add(int(size))
                continue
            for b in (start, min(end, size)):
                if 0 < b < size:
                    bounds.add(int(b))
        elif node.target is aten.view_as_complex.default:
            src = shape(node.args[0])  # (..., r/2, 2) real pairs as r/2 complex numbers
            if len(src) >= 2 and 2 * hint(src[-2]) <= d:
                pairs.add(2 * int(src[-2]))
        elif node.target in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default):
            src = shape(node.args[0])
            dim = norm_dim(node.args[2] if len(node.args) > 2 else 0, len(src))
            if dim != len(src) - 1 or hint(src[-1]) > d:
                continue
            sizes = node.args[1]
            if node.target is aten.chunk.default:  # chunks of ceil(size / chunks) (GPT-OSS)
                sizes = -(-src[-1] // sizes)
            sizes = [sizes] * (src[-1] // sizes) if isinstance(sizes, int) else list(sizes)
            acc = 0
            for s in sizes[:-1]:
                acc += s
                bounds.add(int(acc))
    if pairs:
        return Rotary(dims=max(pairs), style="interleaved")
    if not bounds:
        return None
    r = max(bounds) if len(bounds) >= 2 else 2 * min(bounds)
    return Rotary(dims=min(r, d), style="half")


def _qk_norms(prov: Provenance) -> tuple[str, ...]:
    out = []
    for node in prov.path:
        if node.target in NORM_OPS:
            out.append(node.name)
    return tuple(out)


def _output_projection(out: fx.Node, through: tuple = ()) -> fx.Node | None:
    """The projection the core output reaches through views and casts (and `through`)."""
    frontier = [out]
    seen = set()
    while frontier:
        node = frontier.pop()
        for u in node.users:
            if u in seen:
                continue
            seen.add(u)
            if is_projection(u) and proj_input(u) is node:
                return u
            if u.target in MOVEMENT_OPS or u.target in PASS_THROUGH_OPS or u in through:
                frontier.append(u)
    return None


# The core output's way to an output gate: (B, H, S, d_v) -> transpose(1, 2) -> reshape to
# (B, S, H * d_v), so position h * d_v + e of the gate multiplies head h, value dim e.
_TO_TOKENS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
              aten.contiguous.default, aten.clone.default}


def _output_gate(core: Core, H: int, dv: int) -> tuple[fx.Node, fx.Node] | None:
    """(the product, its gate operand) of `out * gate` between the core and the output
    projection (HF Qwen3-Next: attn_output * sigmoid(gate), gate packed into q_proj)."""
    node, moved = core.out, False
    while len(real_users(node)) == 1:
        u = real_users(node)[0]
        if u.target is aten.mul.Tensor and moved and len(shape(node)) == 3:
            gate = u.args[1] if u.args[0] is node else u.args[0]
            if isinstance(gate, fx.Node) and shape(gate) == shape(node) and shape(node)[-1] == H * dv:
                return u, gate
            return None
        if u.target is aten.transpose.int and not moved:
            nd = len(shape(node))
            if nd != 4 or {norm_dim(u.args[1], 4), norm_dim(u.args[2], 4)} != {1, 2}:
                return None
            moved = True
        elif u.target is aten.permute.default and not moved:
            if [norm_dim(p, 4) for p in u.args[1]] != [0, 2, 1, 3]:
                return None
            moved = True
        elif u.target not in _TO_TOKENS and u.target not in PASS_THROUGH_OPS:
            return None
        node = u
    return None


def _trace(core: Core, role: str, x: fx.Node) -> tuple[Provenance | None, str | None]:
    """x's provenance: one projection, or one per-head projection plus one read alike by
    every head (MLA's k = cat(k_nope from kv_b_proj, k_pe from kv_a_proj_with_mqa))."""
    found, _ = _walk_back_to_projection(x)
    where = f"attention core at node {core.out.name}"
    if len(found) == 1:
        p = _provenance(found[0], x)
        return p, None if p is not None else (f"{where}: could not trace {role} from {found[0].name} "
                                              f"through the graph")
    if len(found) == 2:
        for per_head, shared in (found, found[::-1]):
            p = _provenance(per_head, x, shared=shared)
            if p is not None:
                sd = list(p.shared_dims)
                if (p.heads[:, sd] == p.heads[:1, sd]).all():
                    return p, None
        return None, (f"{where}: {role} comes from 2 projections ({[f.name for f in found]}), but not "
                      f"as one per-head projection plus one whose features every head reads alike "
                      f"(MLA's shared rope key); Helix cannot tell which features make which head")
    return None, (f"{where}: {role} comes from {len(found)} projections ({[f.name for f in found]}), "
                  f"expected 1 (or 1 per-head plus 1 shared by all heads)")


def _latent_source(proj: fx.Node) -> fx.Node:
    """The input a projection reads, seen through one low-rank latent projection (MLA's
    q_a_proj / kv_a_proj_with_mqa, and the norm on its output)."""
    x = proj_input(proj)
    found, _ = _walk_back_to_projection(x)
    if len(found) == 1 and int(shape(found[0])[-1]) < int(shape(proj_input(found[0]))[-1]):
        return proj_input(found[0])
    return x


def _weight_name(proj: fx.Node) -> str:
    return str(proj_weight_node(proj).target)


def _match(core: Core, index: int) -> tuple[SiteMatch | None, str | None]:
    provs, projs = {}, {}
    for role, x in (("q", core.q), ("k", core.k), ("v", core.v)):
        p, why = _trace(core, role, x)
        if p is None:
            return None, why
        provs[role], projs[role] = p, p.proj
    q, k, v = provs["q"], provs["k"], provs["v"]
    if q.shared is not None or v.shared is not None:
        return None, (f"attention core at node {core.out.name}: {'q' if q.shared is not None else 'v'} "
                      f"has dims shared by all heads (from {(q.shared or v.shared).name}); Helix shards "
                      f"such a shared part only in k (MLA's rope key)")
    d, dv = q.heads.shape[1], v.heads.shape[1]
    H = q.heads.shape[0]
    if k.heads.shape[1] != d:
        return None, f"attention core at node {core.out.name}: q and k head dims differ ({d} vs {k.heads.shape[1]})"
    # kv groups in order of first appearance at the core
    k_groups = [k.heads[i] for i in _first_of_distinct(k.heads)]
    v_groups = [v.heads[i] for i in _first_of_distinct(v.heads)]
    H_kv = len(k_groups)
    if len(v_groups) != H_kv or H % H_kv:
        return None, (f"attention core at node {core.out.name}: {H} query heads, {H_kv} key heads "
                      f"and {len(v_groups)} value heads do not form multi-head or grouped-query attention")
    # which kv group each q head uses: by position at the core (repeated) or GQA broadcast
    if k.heads.shape[0] == H:
        kv_of_q = tuple(next(g for g, kg in enumerate(k_groups) if (kg == row).all()) for row in k.heads)
    else:
        kv_of_q = tuple(h // (H // H_kv) for h in range(H))
    qv = val(core.q)
    q_len = example_size(qv.shape[-2]) if qv.dim() >= 2 else 1
    kv_len = example_size(val(core.k).shape[-2])
    numel = int(np.prod([example_size(x) for x in qv.shape]))
    batch = max(1, numel // max(1, H * d * q_len))
    gated = _output_gate(core, H, dv)
    gate_proj = gate = None
    if gated is not None:
        gp, why = _trace(core, "the output gate", gated[1])
        if gp is None or gp.shared is not None or gp.heads.shape != (1, H * dv):
            return None, (f"attention core at node {core.out.name}: output gate {gated[0].name} multiplies "
                          f"the core output by {gated[1].name}, whose features Helix cannot assign to "
                          f"heads ({why or f'traced shape {gp.heads.shape}, expected (1, {H * dv})'})")
        gate_proj, gate = gp.proj, gp.heads.reshape(H, dv)
    o = _output_projection(core.out, through=(gated[0],) if gated else ())
    fused = projs["q"] is projs["k"] or projs["q"] is projs["v"]
    head_bias = False
    for b in (*core.biases, core.mask):
        bs = shape(b) if b is not None else ()
        # dim -3 of the scores carries the heads ((B, H, S, S), or (B*H, S, S) as BLOOM has them)
        if len(bs) >= 3 and not (isinstance(bs[-3], int) and bs[-3] == 1):
            head_bias = True
    site = AttentionSite(
        index=index, q_proj=projs["q"].name, k_proj=projs["k"].name, v_proj=projs["v"].name,
        o_proj=o.name if o is not None else None, q_weight=_weight_name(projs["q"]),
        k_weight=_weight_name(projs["k"]), v_weight=_weight_name(projs["v"]),
        o_weight=_weight_name(o) if o is not None else None, fused_qkv=fused,
        num_heads=H, num_kv_heads=H_kv, head_dim=d, embed_dim=int(shape(proj_input(projs["q"]))[-1]),
        core=core.kind, core_nodes=tuple(n.name for n in core.nodes),
        mask=core.mask.name if core.mask is not None else None, is_causal=core.is_causal,
        # a shared rope key (MLA) is rotated outside the head dims Helix splits: no Rotary
        head_bias=head_bias, rotary=_rotary(q, d) if not k.shared_dims else None,
        qk_norm=_qk_norms(q) + _qk_norms(k),
        cross=_latent_source(projs["q"]) is not _latent_source(projs["k"]),
        k_shared_proj=k.shared.name if k.shared is not None else None, k_shared_dims=len(k.shared_dims),
        v_head_dim=dv, gate_proj=gate_proj.name if gate_proj is not None else None,
        batch=batch, q_len=q_len, kv_len=kv_len, dtype=str(qv.dtype).replace("torch.", ""),
    )
    return SiteMatch(site=site, core=core, q=q, k=k, v=v, kv_of_q=kv_of_q,
                     k_groups=np.stack(k_groups), v_groups=np.stack(v_groups),
                     gate_proj=gate_proj, gate=gate), None


def find_attention(gm: fx.GraphModule) -> tuple[list[SiteMatch], list[str]]:
    """Every attention site of `gm` in graph order, and a note for each core left unsharded."""
    matches, skipped = [], []
    _SMALL.clear()
    _SMALL_VALUES.clear()
    _SMALL.update(_small_sizes(gm))
    try:
        cores = find_cores(gm)
        for core in cores:
            m, why = _match(core, len(matches))
            if m is None:
                skipped.append(why)
            else:
                matches.append(m)
    finally:
        _SMALL.clear()
        _SMALL_VALUES.clear()
    return matches, skipped

