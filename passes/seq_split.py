"""seq_split: one rank graph's attention over a static KV cache, on chunk k of s chunks of the
cache's positions (flash-decoding across ranks; docs/decode.md).

Input: rank (i, j)'s module of an m x n decode program, its cache slices whole along the
positions (B, H_kv/n, S_max, d/m). Output: rank (i, j, k)'s module, whose cache slices hold
positions [start_k, end_k) only, with

* each cache write `index_copy_(cache, dim, position, new)` made owner-only: the chunk's
  positions that `position` names take the new rows, every other position keeps its value
  (`where` over the chunk, then `copy_`), so only the owner of a position writes it;
* every tensor the scores meet that runs over all S_max positions (the mask) narrowed to the
  chunk, and S_max in the literal sizes of a view of the cache (HF's repeat_kv) made C;
* each `softmax(scores) @ v` over the cache replaced by the chunk's partial attention and an
  exact log-sum-exp combine over the s-group ("seq") with one collective:

      m_k = max(max_t score_t, finfo.min);  e_t = exp(score_t - m_k)      # (B, H/n, T, 1)
      l_k = sum_t e_t
      o_k = sum_t e_t v_t                                                 # (B, H/n, T, d_v)
      [m | l] = all_gather_seq([m_k | l_k])                               # (s, B, H/n, T, 2)
      M = max_k m_k;  L = sum_k l_k exp(m_k - M)
      partial_k = o_k exp(m_k - M) / L          # sum_k partial_k = softmax(scores) @ v

  (m_k and l_k travel apart, not as lse_k = m_k + log l_k: under a finfo.min mask a fully
  padded row has m_k = finfo.min, and finfo.min + log l_k rounds to finfo.min in fp32, which
  would weigh each chunk 1 instead of l_k / L.) A chunk whose row is all -inf (a -inf mask,
  causal in prefill) has m_k clamped to finfo.min: e = 0, l_k = 0, its weight 0, not NaN.
  Under `_safe_softmax` (an SDPA core written out by passes/explicit_cache_cores.py) a row
  -inf in every chunk has L = 0, divided as 1: the row is 0, as SDPA gives it.
  With chunks of equal size (S_max % s == 0), a plain core (its softmax reads (q @ k^T)
  [* or / a number] [+ mask | masked_fill(-inf)], each node read by the next only:
  `_fusable`) runs instead as helix.chunk_attention(q, k, v, bias, scale) -> (o_k, lse_k)
  (runtime/chunk_core.py: a fused kernel on CUDA) and the combine gathers lse only:
  M = max(max_k lse_k, finfo.min), w_k = exp(lse_k - M), partial_k = o_k w_k / sum_k w_k.
  Exact there: a fully padded row's lse_k is the same in every chunk (log C_k lost, C_k
  equal), so w_k = 1 each gives the uniform mean; unequal chunks keep the explicit core.
  Each core's kernel ("fused" / "explicit", and why) is in its `CombineSite`.
  The sum over k is then folded into the output projection: where every op from partial_k to
  a sum all-reduce over the m n ranks of the chunk ("all"; "head" when m = 1, "dim" when
  n = 1) is linear in it (`_LINEAR`), that all-reduce is widened to the whole mesh ("mesh"),
  which sums over the chunks too, and a bias added on the way (the o_proj bias of the one
  rank per group that holds input feature 0) is kept on chunk 0 only; elsewhere (no such
  all-reduce, as m = n = 1, or a non-linear op on the way) one all_reduce sum over "seq" of
  partial_k is inserted. Each core's form is recorded (`CombineSite`, in the module's
  meta["seq_combine"]; DecodeProgram.combine_notes);
* any other buffer the graph writes in place (HF's position counter) a copy of this module's.

A fused core (SDPA, helix.chunked_attention, helix.attend) must have been written out by
passes/explicit_cache_cores.py first (compile_decoder runs it when s > 1).

Refused (HelixError naming the node): a fused core or any op other than a view, a pointwise
op, a matmul, a collective or the softmax -> matmul core between the cache and the core's
output (a reduction over positions would need its own combine), a cache returned as an output,
or a head dim equal to S_max (the positions dim could not be told apart).

Invariant: the s m n modules, run together with "seq" and "mesh" collectives, compute what
the m x n rank modules computed, call after call.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from helix_compiler.errors import HelixError
from helix_compiler.runtime import chunk_core as _cc  # noqa: F401  (registers helix.chunk_attention)
from helix_compiler.runtime import collectives as _c  # noqa: F401  (registers torch.ops.helix)
from helix_compiler.runtime.mesh import Mesh

from .find_attention import CACHE_WRITE_OPS
from .explicit_cache_cores import CORES
from .graph_utils import MATMUL_OPS, MOVEMENT_OPS, SDPA_OPS, SOFTMAX_OPS, aten, fake_shapes
from .shard import written_attrs
from .shard_rules import POINTWISE

__all__ = ["CACHE_WRITE_OPS", "CombineSite", "cache_writes", "chunk_axes", "chunk_bounds",
           "split_sequence"]

helix = torch.ops.helix
# ops allowed between a cache write and its core's output: they keep positions apart
_KEEPS_POSITIONS = set(POINTWISE) | MOVEMENT_OPS | MATMUL_OPS | {
    helix.all_reduce.default, helix.all_gather.default, aten.index_select.default, operator.getitem}


def cache_writes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Attribute name -> the in-place cache write (index_copy_) of each buffer `gm` writes."""
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in CACHE_WRITE_OPS \
                and isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr":
            out[str(node.args[0].target)] = node
    return out


def chunk_bounds(positions: int, s: int) -> list[tuple[int, int]]:
    """[start, end) of each of s contiguous chunks; the first positions % s are one longer."""
    if not 1 <= s <= positions:
        raise HelixError(f"seq_split: s={s} chunks of a cache of {positions} positions; s must be in "
                         f"[1, {positions}]")
    base, extra = divmod(positions, s)
    out, start = [], 0
    for k in range(s):
        end = start + base + (k < extra)
        out.append((start, end))
        start = end
    return out


def chunk_axes(m: int, n: int) -> set[str]:
    """The axis names a rank graph of an m x n split uses for all the ranks of its chunk
    ("head" spans them when m = 1, "dim" when n = 1)."""
    out = {"all"}
    if m == 1:
        out.add("head")
    if n == 1:
        out.add("dim")
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class CombineSite:
    """How one core's chunks are summed: "folded" into the sum all-reduce(s) after it, widened
    to the whole mesh, or "unfolded" (an all_reduce sum over "seq" of the partial output)."""

    core: str            # the core's output node in the rank graph (its softmax @ v)
    form: str            # "folded" | "unfolded"
    detail: str          # folded: the widened all-reduces; unfolded: why not folded
    # the chunk core: "fused" (helix.chunk_attention, combined by its lse) or "explicit"
    # (softmax(scores) @ v written out, combined by (m_k, l_k)); kernel_detail: why explicit
    kernel: str = "explicit"
    kernel_detail: str = ""

    def __post_init__(self) -> None:
        if self.form not in ("folded", "unfolded"):
            raise HelixError(f"CombineSite {self.core}: form {self.form!r}; expected 'folded' or "
                             f"'unfolded'")
        if self.kernel not in ("fused", "explicit"):
            raise HelixError(f"CombineSite {self.core}: kernel {self.kernel!r}; expected 'fused' or "
                             f"'explicit'")

    def __str__(self) -> str:
        return f"{self.core}: {self.form} ({self.detail}); {self.kernel} core ({self.kernel_detail})"


def _val(node):
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def split_sequence(gm: fx.GraphModule, args: tuple, k: int, mesh: Mesh,
                   caches: dict[str, torch.Tensor], fuse: bool = True) -> fx.GraphModule:
    """Rank (i, j, k)'s module from rank (i, j)'s `gm` (left as it is) of `mesh` (n x m x s):
    chunk k of the cache positions (`chunk_bounds`); `caches` maps each written buffer's
    attribute name to the chunk tensor the new module holds (shared with the other program of
    the same rank). With `fuse`, each core `_fusable` proves plain runs as helix.chunk_attention
    with the lse combine. The module's meta["seq_combine"] holds each core's `CombineSite`."""
    if not 0 <= k < mesh.s:
        raise HelixError(f"seq_split: chunk k={k} of s={mesh.s}; k must be in [0, {mesh.s})")
    g = fx.Graph()
    g._codegen = gm.graph._codegen
    g.output(g.graph_copy(gm.graph, {}))
    root = torch.nn.Module()
    for name, t in gm.named_buffers():
        root.register_buffer(name, t)
    out = fx.GraphModule(root, g, class_name=type(gm).__name__)
    fake_shapes(out, args)
    writes = cache_writes(out)
    if not writes:
        raise HelixError("seq_split: the rank graph writes no KV cache buffer (index_copy_ into a "
                         "buffer); only a static-cache decoder's cache can be split along positions")
    sizes = {int(_val(w).shape[w.args[1]]) for w in writes.values()}
    if len(sizes) != 1:
        raise HelixError(f"seq_split: the cache buffers have different position counts {sorted(sizes)}; "
                         f"the sequence split needs one S_max")
    S = sizes.pop()
    start, end = chunk_bounds(S, mesh.s)[k]
    graph = out.graph
    downstream = _downstream(graph, writes.values())
    for node in list(graph.nodes):
        if node in downstream and node.op != "output":
            _check_keeps_positions(node)
        elif node in downstream:
            raise HelixError(f"seq_split: the graph returns a value read from the KV cache "
                             f"({[a.name for a in node.all_input_nodes if a in downstream]}), which "
                             f"each chunk holds only in part")
    for w in writes.values():
        if int(_val(w).shape[-1]) == S and w.args[1] % _val(w).dim() != _val(w).dim() - 1:
            raise HelixError(f"seq_split: cache {w.args[0].target} has head dim {S} = S_max; the "
                             f"positions dim cannot be told apart; build the cache with another S_max")
    order = {n: i for i, n in enumerate(graph.nodes)}
    shared: dict = {}        # (pos, start, end) -> the write's index nodes, made once for all
    for name, w in sorted(writes.items(), key=lambda kv: order[kv[1]]):
        _owner_write(graph, w, start, end, shared)
        setattr(out, name, caches[name])
    for name in written_attrs(out) - set(writes):
        # another tensor written in place (HF's position counter): this module's own, as each
        # (i, j) module's is its own; the s modules run concurrently
        setattr(out, name, getattr(gm, name).clone())
    for node in [n for n in graph.nodes if n in downstream]:
        for a in node.all_input_nodes:
            va, vn = _val(a), _val(node)
            if a not in downstream and va is not None and vn is not None and va.dim() and vn.dim() \
                    and int(va.shape[-1]) == S and int(vn.shape[-1]) == S and a.op != "get_attr":
                with graph.inserting_before(node):
                    part = graph.call_function(aten.slice.Tensor, (a, -1, start, end))
                node.replace_input_with(a, part)
    for node in [n for n in graph.nodes if n in downstream and n.target in _SIZED]:
        _chunk_sizes(node, S, end - start)
    bounds = chunk_bounds(S, mesh.s)
    equal = None if len({b - a for a, b in bounds}) == 1 else (
        f"chunks of unequal size ({S} positions over s={mesh.s}: "
        f"{sorted({b - a for a, b in bounds})}); a fully padded row's lse would weigh them equally")
    sites = tuple(_combine(graph, sm, k, mesh, downstream,
                           equal if fuse else "fuse=False: the explicit core asked for")
                  for sm in [n for n in graph.nodes if n in downstream and n.target in SOFTMAX_OPS])
    graph.eliminate_dead_code()
    graph.lint()
    out.recompile()
    out.meta["seq_combine"] = sites
    return out


# view ops whose sizes are literals of the graph: over the cache, S_max among them means C
_SIZED = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
          aten.broadcast_to.default}


def _chunk_sizes(node: fx.Node, S: int, C: int) -> None:
    """A view of the cache with S_max in its sizes (HF's repeat_kv: expand to (B, H_kv, g,
    S_max, d), reshape to (B, H, S_max, d)) takes the chunk's C positions instead."""
    sizes = list(node.args[1])
    at = [i for i, x in enumerate(sizes) if x == S]
    if len(at) > 1:
        raise HelixError(f"seq_split: view {node.name} of the KV cache has sizes {sizes} with S_max={S} "
                         f"at dims {at}; the positions dim cannot be told apart; build the cache "
                         f"with another S_max")
    if at:
        sizes[at[0]] = C
        node.update_arg(1, sizes)


def _downstream(graph: fx.Graph, writes) -> set:
    """Nodes that read a cache buffer or its writes, up to each core's output (the matmul of
    its softmax with the values, which the combine makes whole)."""
    seen = set(writes) | {w.args[0] for w in writes}
    stop = set()
    for node in graph.nodes:
        if node not in seen and any(a in seen and a not in stop for a in node.all_input_nodes):
            seen.add(node)
            if _is_core_out(node):
                stop.add(node)
    return seen


def _is_core_out(node: fx.Node) -> bool:
    return node.target in MATMUL_OPS and isinstance(node.args[0], fx.Node) \
        and node.args[0].target in SOFTMAX_OPS


def _check_keeps_positions(node: fx.Node) -> None:
    if node.op != "call_function" or node.target in CACHE_WRITE_OPS or node.target in SOFTMAX_OPS \
            or node.target in _KEEPS_POSITIONS or node.target is aten.copy_.default:
        if node.target in SOFTMAX_OPS:
            users = list(node.users)
            if len(users) != 1 or users[0].target not in MATMUL_OPS or users[0].args[0] is not node:
                raise HelixError(f"seq_split: softmax {node.name} over the cache is read by "
                                 f"{[u.name for u in users]}, not by one matmul with its values; the "
                                 f"sequence split combines softmax(scores) @ v only")
        return
    what = "an SDPA core" if node.target in SDPA_OPS else f"op {node.target}"
    fused = " (a fused core: run passes/explicit_cache_cores.py first, as compile_decoder does)" \
        if node.target in CORES else ""
    raise HelixError(f"seq_split: node {node.name} ({what}) reads the KV cache; the sequence split "
                     f"handles views, pointwise ops, matmuls and softmax(scores) @ v{fused}; write "
                     f"the attention explicitly, or use s=1")


def _owner_write(graph: fx.Graph, w: fx.Node, start: int, end: int, shared: dict) -> None:
    """index_copy_(cache, dim, pos, new) on the chunk [start, end): the tokens of `pos` whose
    positions the chunk holds are written, the others are not, touching len(pos) positions of
    the chunk (a decode step: one), never all of them:

        local = pos - start;  owned = 0 <= local < C                          # (T,)
        src   = t where owned[t], else the first owned token (0 if none)      # (T,)
        idx   = clamp(local[src], 0, C - 1)
        rows  = new[src] if any(owned) else cache[idx]                        # along dim
        cache.index_copy_(dim, idx, rows)

    A token the chunk does not hold writes what its stand-in (the first owned token) writes, at
    the same index, or, when the chunk holds none, puts back the value it read: every index is
    written with one value however many tokens name it. (Before: a where over the whole chunk
    and a copy of it, about 6 x the chunk's bytes per cache buffer and step: 0.47 ms a layer
    against 0.10 for the hand-written step at 128k positions, B = 8, on the H200.)

    src, idx and any(owned) depend on `pos` and the chunk only: they are made once per position
    node, before its first write (the writes come in graph order), and read by every write of
    it (`shared`): a layer's K and V, and every layer where the model passes one position
    tensor (HF's StaticCache makes one a layer). A decode step's one token (pos of static length 1) needs no stand-in: idx =
    clamp(pos - start, 0, C - 1), owned = idx == pos - start, 3 small kernels for the index
    instead of 13."""
    cache, dim, pos, new = w.args[:4]
    nd = _val(w).dim()
    dim = dim % nd
    C = end - start
    call = graph.call_function
    T = _val(pos).shape[0] if _val(pos) is not None and _val(pos).dim() == 1 else None
    if type(T) is int and T == 1 and (pos, start, end) not in shared:   # static, not a symbol
        # one token (a decode step): no other token can name its index, so no stand-in;
        # 3 small kernels a position node instead of 13
        with graph.inserting_before(w):
            local = call(aten.sub.Tensor, (pos, start))
            idx = call(aten.clamp.default, (local, 0, C - 1))
            shared[(pos, start, end)] = (None, idx, call(aten.eq.Tensor, (idx, local)))
    if (pos, start, end) not in shared:
        with graph.inserting_before(w):
            local = call(aten.sub.Tensor, (pos, start))                                   # (T,)
            owned = call(aten.bitwise_and.Tensor, (call(aten.ge.Scalar, (local, 0)),
                                                   call(aten.lt.Scalar, (local, C))))
            first = call(aten.argmax.default, (call(aten._to_copy.default, (owned,),
                                                    {"dtype": torch.int64}),))
            token = call(aten.sub.Tensor, (call(aten.cumsum.default,
                                                (call(aten.ones_like.default, (pos,)), 0)), 1))
            src = call(aten.where.self, (owned, token, first))                            # (T,)
            idx = call(aten.clamp.default, (call(aten.index_select.default, (local, 0, src)), 0, C - 1))
            shared[(pos, start, end)] = (src, idx, call(aten.any.default, (owned,)))
    src, idx, any_owned = shared[(pos, start, end)]
    with graph.inserting_before(w):
        taken = new if src is None else call(aten.index_select.default, (new, dim, src))
        if src is None:     # owned is (1,): broadcast it along dim
            shape = [1] * nd
            shape[dim] = 1
            any_owned = call(aten.view.default, (any_owned, shape))
        rows = call(aten.where.self, (any_owned, taken,
                                      call(aten.index_select.default, (cache, dim, idx))))
        written = call(w.target, (cache, dim, idx, rows))     # index_copy_ or index_copy, as written
    w.replace_all_uses_with(written)
    graph.erase_node(w)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Plain:
    """A chunk core softmax((q @ k^T) * scale + bias) @ v, its parts in the graph."""

    q: fx.Node
    k: fx.Node
    scale: float
    bias: tuple          # (("add", mask) | ("fill", cond)), each added to the scores


def _fusable(sm: fx.Node, pv: fx.Node, downstream: set) -> _Plain | str:
    """The core's parts when its softmax reads (q @ k^T) [* or / a number] [+ masks, or
    masked_fill(-inf)], each node read by the next only, over the last dim; else why not."""
    x = sm.args[0]
    dim = sm.args[1] if len(sm.args) > 1 else sm.kwargs.get("dim")
    vx = _val(x)
    if vx is None or vx.dim() != 4 or dim is None or dim % 4 != 3:
        return f"softmax {sm.name} is not over the last dim of 4-d scores"
    dtype = sm.kwargs.get("dtype") or (sm.args[2] if sm.target is not aten._softmax.default
                                       and len(sm.args) > 2 else None)
    if dtype not in (None, vx.dtype) or (sm.target is aten._softmax.default and sm.args[2]
                                         and vx.dtype != torch.float32):
        return f"softmax {sm.name} casts its {vx.dtype} scores"
    if pv.target is not aten.matmul.default or _val(pv.args[1]) is None or _val(pv.args[1]).dim() != 4:
        return f"{pv.name} ({pv.target}) is not a 4-d matmul with the values"
    bias, node = [], x
    while isinstance(node, fx.Node) and node.target in (aten.add.Tensor, aten.masked_fill.Scalar):
        if len(node.users) != 1:
            return f"{node.name} on the scores is read by {len(node.users)} nodes"
        if node.target is aten.masked_fill.Scalar:
            if node.args[2] != float("-inf"):
                return f"{node.name} fills the scores with {node.args[2]}, not -inf"
            bias.append(("fill", node.args[1]))
            nxt = node.args[0]
        else:
            a, b = node.args[:2]
            chain = [y for y in (a, b) if isinstance(y, fx.Node) and y in downstream]
            other = b if chain == [a] else a
            if len(chain) != 1 or len(node.args) > 2 or node.kwargs or not isinstance(other, fx.Node):
                return f"{node.name} adds to the scores something other than one mask tensor"
            bias.append(("add", other))
            nxt = chain[0]
        if _val(nxt) is None or tuple(_val(nxt).shape) != tuple(_val(node).shape):
            return f"{node.name} widens the scores {list(_val(nxt).shape) if _val(nxt) is not None else '?'}"
        node = nxt
    scale = 1.0
    if isinstance(node, fx.Node) and node.target in (aten.mul.Tensor, aten.div.Tensor) \
            and isinstance(node.args[1], (int, float)) and len(node.users) == 1:
        scale = float(node.args[1]) if node.target is aten.mul.Tensor else 1.0 / float(node.args[1])
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.target is aten.matmul.default and len(node.users) == 1):
        return f"the scores of {sm.name} are not q @ k^T (times a number) plus masks"
    q, kt = node.args
    if not (isinstance(kt, fx.Node) and kt.target is aten.transpose.int
            and {d % 4 for d in kt.args[1:3]} == {2, 3} and _val(q) is not None and _val(q).dim() == 4
            and q not in downstream and kt.args[0] in downstream):
        return f"{node.name} is not q @ k^T of a 4-d q and the cache's k"
    return _Plain(q=q, k=kt.args[0], scale=scale, bias=tuple(bias))


def _combine(graph: fx.Graph, sm: fx.Node, k: int, mesh: Mesh, downstream: set,
             no_fuse: str | None) -> CombineSite:
    """softmax(x) @ v over chunk k -> this chunk's share of the exact attention over all
    chunks, summed by the output projection's widened all-reduce or by one over "seq"."""
    (pv,) = sm.users
    plain = no_fuse or _fusable(sm, pv, downstream)
    if isinstance(plain, _Plain):
        partial = _fused(graph, sm, pv, plain, k, mesh)
        kernel = ("fused", f"helix.chunk_attention, lse combine, scale={plain.scale:.6g}, "
                           f"{len(plain.bias)} mask(s) as its bias")
    else:
        partial = _explicit(graph, sm, pv, k, mesh)
        kernel = ("explicit", plain)
    site = _sum_chunks(graph, partial, pv.name, k, mesh)
    return CombineSite(core=site.core, form=site.form, detail=site.detail, kernel=kernel[0],
                       kernel_detail=kernel[1])


def _fused(graph: fx.Graph, sm: fx.Node, pv: fx.Node, plain: _Plain, k: int, mesh: Mesh) -> fx.Node:
    """The chunk's (o_k, lse_k) from helix.chunk_attention; one all-gather of lse over "seq":

        M = max(max_k lse_k, finfo.min);  w_k = exp(lse_k - M);  partial_k = o_k w_k / sum_k w_k

    exact when the chunks are of equal size (docs/decode.md, "The fused chunk core")."""
    call = graph.call_function
    safe = sm.target is aten._safe_softmax.default
    with graph.inserting_before(pv):
        bias = None
        for kind, t in plain.bias:
            part = t if kind == "add" else call(aten.where.Scalar, (t, float("-inf"), 0.0))
            bias = part if bias is None else call(aten.add.Tensor, (bias, part))
        out = call(helix.chunk_attention.default, (plain.q, plain.k, pv.args[1], bias, plain.scale))
        o = call(operator.getitem, (out, 0))                                    # (B, H/n, T, d_v)
        lse = call(operator.getitem, (out, 1))                                  # (B, H/n, T) fp32
        stats = call(aten.unsqueeze.default, (call(aten.unsqueeze.default, (lse, -1)), 0))
        every = call(helix.all_gather.default, (stats, "seq", 0, [1] * mesh.s))  # (s, B, H/n, T, 1)
        # a row -inf in every chunk (lse_k = -inf): M clamped to finfo.min, so w = 0, not NaN
        top = call(aten.clamp.default, (call(aten.amax.default, (every, [0], True)),
                                        torch.finfo(torch.float32).min))
        w = call(aten.exp.default, (call(aten.sub.Tensor, (every, top)),))
        total = call(aten.sum.dim_IntList, (w, [0], False))
        if safe:   # that row: 0 / 1 = 0, as SDPA; a plain softmax: 0 / 0 = NaN, as unsharded
            total = call(aten.masked_fill.Scalar, (total, call(aten.eq.Scalar, (total, 0.0)), 1.0))
        share = call(aten.div.Tensor, (call(aten.select.int, (w, 0, k)), total))    # fp32
        want = _val(pv).dtype if _val(pv) is not None else None
        if want is not None and want != torch.float32:
            # in the output's dtype, as the core it replaces (fp16 o x fp32 share would promote
            # the rest of the layer to fp32)
            share = call(aten._to_copy.default, (share,), {"dtype": want})
        partial = call(aten.mul.Tensor, (o, share))
    pv.replace_all_uses_with(partial)
    graph.erase_node(pv)
    graph.erase_node(sm)
    return partial


def _explicit(graph: fx.Graph, sm: fx.Node, pv: fx.Node, k: int, mesh: Mesh) -> fx.Node:
    """The chunk's partial output by the written-out core, combined by (m_k, l_k)."""
    x, v = sm.args[0], pv.args[1]
    safe = sm.target is aten._safe_softmax.default
    call = graph.call_function
    with graph.inserting_before(pv):
        # a chunk with no visible key (a -inf mask; causal in prefill) has its max clamped to
        # finfo.min: e = exp(-inf - finfo.min) = 0, l_k = 0, its share exp(finfo.min - M) = 0,
        # where shifting by -inf would give exp(-inf + inf) = NaN
        low = torch.finfo(_val(x).dtype).min
        mk = call(aten.clamp.default, (call(aten.amax.default, (x, [-1], True)), low))  # (B, H/n, T, 1)
        e = call(aten.exp.default, (call(aten.sub.Tensor, (x, mk)),))
        lk = call(aten.sum.dim_IntList, (e, [-1], True))
        o = call(pv.target, (e, v))                                             # (B, H/n, T, d_v)
        stats = call(aten.unsqueeze.default, (call(aten.cat.default, ([mk, lk], -1)), 0))
        every = call(helix.all_gather.default, (stats, "seq", 0, [1] * mesh.s))  # (s, B, H/n, T, 2)
        ms = call(aten.slice.Tensor, (every, -1, 0, 1))
        ls = call(aten.slice.Tensor, (every, -1, 1, 2))
        top = call(aten.amax.default, (ms, [0], True))                         # M: (1, B, H/n, T, 1)
        w = call(aten.exp.default, (call(aten.sub.Tensor, (ms, top)),))       # exp(m_k - M), every k
        total = call(aten.sum.dim_IntList, (call(aten.mul.Tensor, (ls, w)), [0], False))  # L
        if safe:   # a row -inf in every chunk: L = 0, divided as 1, so the row is 0 on every
            #        rank, as SDPA gives it (a plain softmax gives NaN, as unsharded)
            total = call(aten.masked_fill.Scalar, (total, call(aten.eq.Scalar, (total, 0.0)), 1.0))
        # this chunk's exp(m_k - M): the gathered copy of its own m_k, bit for bit
        scale = call(aten.div.Tensor, (call(aten.select.int, (w, 0, k)), total))
        partial = call(aten.mul.Tensor, (o, scale))
    pv.replace_all_uses_with(partial)
    graph.erase_node(pv)
    graph.erase_node(sm)
    return partial


def _sum_chunks(graph: fx.Graph, partial: fx.Node, core: str, k: int, mesh: Mesh) -> CombineSite:
    """sum_k partial_k: folded into the output projection's all-reduce, or one over "seq"."""
    call = graph.call_function
    path, reduces, why = ([], [], "m = n = 1: no output-projection all-reduce to fold the sum "
                          "into") if mesh.m * mesh.n == 1 else _fold_path(partial, chunk_axes(mesh.m, mesh.n))
    if why is None:
        for red in reduces:
            red.update_arg(1, "mesh")
        dropped = []
        if k:   # a bias on the way rides in chunk 0's partial only: the mesh sum holds it once
            for node in path:
                if node.target is aten.linear.default and len(node.args) > 2 and node.args[2] is not None:
                    node.args = (node.args[0], node.args[1], None)
                    dropped.append(node.name)
        detail = (f"all_reduce {', '.join(r.name for r in reduces)} widened to 'mesh'"
                  + (f"; bias of {', '.join(dropped)} on chunk 0 only" if dropped else ""))
        return CombineSite(core=core, form="folded", detail=detail)
    with graph.inserting_after(partial):
        summed = call(helix.all_reduce.default, (partial, "seq", "sum"))
    partial.replace_all_uses_with(summed, delete_user_cb=lambda u: u is not summed)
    return CombineSite(core=core, form="unfolded",
                       detail=f"one more all_reduce, {summed.name} over 'seq': {why}")


# Ops linear in their first argument (a view of it, or a matmul / linear by a tensor that does
# not depend on it): sum_k op(partial_k) = op(sum_k partial_k). A linear's bias is handled by
# _combine (chunk 0 only); cat / stack are linear when every tensor they join is.
_LINEAR = (MOVEMENT_OPS - {aten.cat.default, aten.stack.default}) | MATMUL_OPS | {
    aten.mm.default, aten.linear.default, aten.mul.Tensor, aten.mul.Scalar, aten.div.Scalar,
    aten.neg.default}


def _is_linear(node: fx.Node, inside: set) -> bool:
    """`node` is linear in the one tensor of `inside` it reads (its only such argument)."""
    if node.op != "call_function":
        return False
    if node.target in (aten.cat.default, aten.stack.default):
        return all(isinstance(a, fx.Node) and a in inside for a in node.args[0])
    if node.target not in _LINEAR or any(isinstance(a, fx.Node) and a in inside
                                         for a in node.kwargs.values()):
        return False
    at = [i for i, a in enumerate(node.args) if isinstance(a, fx.Node) and a in inside]
    nested = any(isinstance(a, (list, tuple)) and any(isinstance(b, fx.Node) and b in inside for b in a)
                 for a in node.args)
    # a product by a tensor that does not depend on partial_k: either side; else the first
    two_sided = node.target in MATMUL_OPS or node.target in (aten.mm.default, aten.mul.Tensor)
    return not nested and (at == [0] or (two_sided and at == [1]))


def _fold_path(partial: fx.Node, axes: set) -> tuple[list, list, str | None]:
    """(the nodes from `partial` to its sum all-reduces over the chunk's ranks, those
    all-reduces, None) when every use of `partial` reaches them through linear ops only;
    else ([], [], why not)."""
    inside, reduces, todo = {partial}, [], [partial]
    while todo:
        for u in todo.pop().users:
            if u in inside or u in reduces:
                continue
            if u.target is helix.all_reduce.default and u.args[2] == "sum" and u.args[1] in axes:
                reduces.append(u)
            else:
                inside.add(u)
                todo.append(u)
    for u in partial.graph.nodes:
        if u in inside and u is not partial and not _is_linear(u, inside):
            return [], [], (f"{u.name} ({u.target}) on its way to the output projection's "
                            f"all-reduce is not linear in it")
    if not reduces:
        return [], [], "no sum all-reduce over the ranks of its chunk follows it (m = n = 1)"
    return [u for u in partial.graph.nodes if u in inside and u is not partial], reduces, None
