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
  exact combine over the s-group ("seq"):

      M = all_reduce_max(max_t score_t)                     # (B, H/n, T, 1)
      e_t = exp(score_t - M)
      [o | l] = all_reduce_sum([sum_t e_t v_t | sum_t e_t])  # (B, H/n, T, d_v + 1)
      out = o / l

  a chunk with every position masked (finfo.min) weighs exp(finfo.min - M) = 0; under
  `_safe_softmax` (an SDPA core written out by passes/explicit_cache_cores.py) a row with
  every position -inf in every chunk gives 0, as SDPA does;
* any other buffer the graph writes in place (HF's position counter) a copy of this module's.

A fused core (SDPA, helix.chunked_attention, helix.attend) must have been written out by
passes/explicit_cache_cores.py first (compile_decoder runs it when s > 1).

Refused (HelixError naming the node): a fused core or any op other than a view, a pointwise
op, a matmul, a collective or the softmax -> matmul core between the cache and the core's
output (a reduction over positions would need its own combine), a cache returned as an output,
or a head dim equal to S_max (the positions dim could not be told apart).

Invariant: the s modules of (i, j), run together with "seq" collectives, compute what the
m x n rank module computed, call after call.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from helix_compiler.errors import HelixError
from helix_compiler.runtime import collectives as _c  # noqa: F401  (registers torch.ops.helix)

from .find_attention import CACHE_WRITE_OPS
from .explicit_cache_cores import CORES
from .graph_utils import MATMUL_OPS, MOVEMENT_OPS, SDPA_OPS, SOFTMAX_OPS, aten, fake_shapes
from .shard import written_attrs
from .shard_rules import POINTWISE

__all__ = ["CACHE_WRITE_OPS", "cache_writes", "chunk_bounds", "split_sequence"]

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


def _val(node):
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def split_sequence(gm: fx.GraphModule, args: tuple, start: int, end: int,
                   caches: dict[str, torch.Tensor]) -> fx.GraphModule:
    """Rank (i, j, k)'s module from rank (i, j)'s `gm` (left as it is): chunk [start, end) of
    the cache positions; `caches` maps each written buffer's attribute name to the chunk tensor
    the new module holds (shared with the other program of the same rank)."""
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
    for name, w in writes.items():
        _owner_write(graph, w, start, end)
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
    for sm in [n for n in graph.nodes if n in downstream and n.target in SOFTMAX_OPS]:
        _combine(graph, sm)
    graph.eliminate_dead_code()
    graph.lint()
    out.recompile()
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


def _owner_write(graph: fx.Graph, w: fx.Node, start: int, end: int) -> None:
    """index_copy_(cache, dim, pos, new) on the chunk: positions of [start, end) that `pos`
    names take `new`'s rows, the others keep their value."""
    cache, dim, pos, new = w.args[:4]
    nd = _val(w).dim()
    dim = dim % nd
    C = end - start
    with graph.inserting_before(w):
        here = graph.call_function(aten.arange.start, (start, end),
                                   {"dtype": torch.int64, "device": _val(w).device})
        hit = graph.call_function(aten.eq.Tensor, (graph.call_function(aten.unsqueeze.default, (pos, 1)),
                                                   graph.call_function(aten.unsqueeze.default, (here, 0))))
        written = graph.call_function(aten.any.dim, (hit, 0))                               # (C,)
        src = graph.call_function(aten.argmax.default, (
            graph.call_function(aten._to_copy.default, (hit,), {"dtype": torch.int64}), 0))  # (C,)
        rows = graph.call_function(aten.index_select.default, (new, dim, src))            # new's rows per position
        shape = [1] * nd
        shape[dim] = C
        at = graph.call_function(aten.view.default, (written, shape))
        merged = graph.call_function(aten.where.self, (at, rows, cache))
        copied = graph.call_function(aten.copy_.default, (cache, merged))
    w.replace_all_uses_with(copied)
    graph.erase_node(w)


def _combine(graph: fx.Graph, sm: fx.Node) -> None:
    """softmax(x) @ v over this chunk -> the exact attention over all chunks."""
    (pv,) = sm.users
    x, v = sm.args[0], pv.args[1]
    safe = sm.target is aten._safe_softmax.default
    dv = int(_val(pv).shape[-1])
    with graph.inserting_before(pv):
        mx = graph.call_function(aten.amax.default, (x, [-1], True))
        top = graph.call_function(helix.all_reduce.default, (mx, "seq", "max"))          # (B, H/n, T, 1)
        if safe:
            # a row with no visible key in any chunk (M = -inf): shift by 0, so e = 0, l = 0
            top = graph.call_function(aten.masked_fill.Scalar, (
                top, graph.call_function(aten.eq.Scalar, (top, float("-inf"))), 0.0))
        e = graph.call_function(aten.exp.default, (graph.call_function(aten.sub.Tensor, (x, top)),))
        l_ = graph.call_function(aten.sum.dim_IntList, (e, [-1], True))
        o = graph.call_function(pv.target, (e, v))                                         # (B, H/n, T, d_v)
        tot = graph.call_function(helix.all_reduce.default,
                                  (graph.call_function(aten.cat.default, ([o, l_], -1)), "seq", "sum"))
        num = graph.call_function(aten.slice.Tensor, (tot, -1, 0, dv))
        den = graph.call_function(aten.slice.Tensor, (tot, -1, dv, dv + 1))
        if safe:
            # ... and o = 0: the row gives 0, as _safe_softmax (SDPA) gives it unsharded
            den = graph.call_function(aten.masked_fill.Scalar, (
                den, graph.call_function(aten.eq.Scalar, (den, 0.0)), 1.0))
        res = graph.call_function(aten.div.Tensor, (num, den))
    pv.replace_all_uses_with(res)
    graph.erase_node(pv)
    graph.erase_node(sm)
