"""slice_copies: a fresh buffer filled by copies into slices of it becomes one cat.

torch.export's pre-dispatch graph keeps in-place copies. DeepSeek-V2/V3 (HF
DeepseekV2Attention.expand_kv) build the key this way:

    key = kv.new_empty(B, H, S, d_nope + d_rope)     # (B, H, S, d)
    key[..., :d_nope].copy_(k_nope)                   # per-head part, from kv_b_proj
    key[..., d_nope:].copy_(k_rope)                   # shared part, expanded to H heads

The key's values reach the attention core only through the mutations, which no pass
follows (the walk back from `key` would find `kv`, the shape donor). This pass rewrites
such a buffer as `cat([k_nope, k_rope], -1)` when it is safe: the buffer is an empty
allocation, its only writers are `copy_` into step-1 slices of one dim that tile the dim
exactly, each source already has its slice's shape and dtype, and every other use comes
after the last copy. Anything else is left as it is.

Invariant: the graph computes what it computed (every read of the buffer sees the same
values); the rewritten graph has no mutation of the buffer.
"""

from __future__ import annotations

import torch.fx as fx

from .graph_utils import aten, norm_dim, shape, val

EMPTY_OPS = {aten.new_empty.default, aten.empty.memory_format, aten.empty_like.default}
_END = 2 ** 62   # slice(start, None) exports as end = 2**63 - 1


def _as_cat(buf: fx.Node, order: dict) -> tuple[list, list, int] | None:
    """(copies sorted by slice start, other users, dim) when `buf` is tiled by slice copies."""
    writes, reads = [], []
    for u in buf.users:
        copy = next(iter(u.users)) if len(u.users) == 1 else None
        if (u.target is aten.slice.Tensor and u.args[0] is buf and copy is not None
                and copy.target is aten.copy_.default and copy.args[0] is u and not copy.users):
            writes.append((u, copy))
        else:
            reads.append(u)
    if len(writes) < 2:
        return None
    nd = len(shape(buf))
    dims = {norm_dim(s.args[1] if len(s.args) > 1 else 0, nd) for s, _ in writes}
    if len(dims) != 1:
        return None
    dim = dims.pop()
    size = shape(buf)[dim]
    if not isinstance(size, int):
        return None
    spans = []
    for s, c in writes:
        start = s.args[2] if len(s.args) > 2 and s.args[2] is not None else 0
        end = s.args[3] if len(s.args) > 3 and s.args[3] is not None else size
        step = s.args[4] if len(s.args) > 4 else 1
        if not all(isinstance(x, int) for x in (start, end, step)) or step != 1:
            return None
        end = size if end >= _END else end
        src = c.args[1]
        if not isinstance(src, fx.Node) or tuple(shape(src)) != tuple(shape(s)) \
                or val(src).dtype != val(buf).dtype:
            return None
        spans.append((start, end, c))
    spans.sort(key=lambda x: x[0])
    if spans[0][0] != 0 or spans[-1][1] != size or any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
        return None
    last_copy = max(order[c] for *_, c in spans)
    if any(order[r] < last_copy for r in reads):
        return None
    return [c for *_, c in spans], reads, dim


def slice_copies(gm: fx.GraphModule) -> int:
    """Rewrite every buffer tiled by slice copies as a cat of the copies' sources; the count."""
    order = {n: k for k, n in enumerate(gm.graph.nodes)}
    done = 0
    for buf in list(gm.graph.nodes):
        if buf.op != "call_function" or buf.target not in EMPTY_OPS:
            continue
        got = _as_cat(buf, order)
        if got is None:
            continue
        copies, reads, dim = got
        with gm.graph.inserting_after(max(copies, key=order.get)):
            cat = gm.graph.call_function(aten.cat.default, ([c.args[1] for c in copies], dim))
        cat.meta = dict(buf.meta)
        for r in reads:
            r.replace_input_with(buf, cat)
        for c in copies:
            s = c.args[0]
            gm.graph.erase_node(c)
            gm.graph.erase_node(s)
        gm.graph.erase_node(buf)
        done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return done
