"""shard_rules: the per-op-family placement rules of the shard pass (passes/shard.py).

One rule per op family, in the table `RULES` (op -> rule). A rule gets the Localizer and the
node, emits the node's local computation on every active rank (with any collective it needs)
and records the output's placement; it returns None when it does not apply, and the op then
runs on replicated inputs (Localizer.fallback), listed in the program's replicated_ops.

Invariant: every rule's local graphs, run together, compute the node's value, held by each
rank as its placement says.
"""

from __future__ import annotations

import math
import operator

import numpy as np
import sympy
import torch
import torch.fx as fx

from helix_compiler.errors import ShardingError

from .graph_utils import SDPA_ARGS, aten, constant_value, norm_dim, sdpa_args, shape, val
from .layout import as_slice, factor, layout_key, lists_of, make_split, merge, positions, same

helix = torch.ops.helix


# ---- rules ---------------------------------------------------------------------------------
RULES: dict = {}


def rule(*targets):
    def deco(fn):
        for t in targets:
            RULES[t] = fn
        return fn
    return deco


def _one(x) -> bool:
    """A size known to be 1 (export specializes sizes 0 and 1, so a symbol is never 1)."""
    return isinstance(x, int) and x == 1


def _sym(x):
    return x.node.expr if isinstance(x, torch.SymInt) else sympy.Integer(int(x))


def _align(lz, node: fx.Node, operands, out_ndim: int):
    """Elementwise alignment: the split of each output dim, and per-rank operand nodes sliced to it."""
    out_splits = []
    for k in range(out_ndim):
        cands = []
        for a in operands:
            nd = len(shape(a))
            ka = k - (out_ndim - nd)
            if ka >= 0 and not _one(shape(a)[ka]) and lz.L(a)[ka] is not None:
                cands.append(lz.L(a)[ka])
        if not cands:
            out_splits.append(None)
            continue
        target = min(cands, key=lambda s: sum(len(x) for x in s.lists))
        out_splits.append(target)
    locals_ = {a: [lz.local(r, a) for r in range(lz.N)] for a in operands}
    for a in operands:
        nd = len(shape(a))
        for k in range(out_ndim):
            ka = k - (out_ndim - nd)
            t = out_splits[k]
            if ka < 0 or _one(shape(a)[ka]) or t is None or same(lz.L(a)[ka], t):
                continue
            locals_[a] = [lz.select(r, a, locals_[a][r], ka, lz.L(a)[ka], t.lists[r]) for r in range(lz.N)]
    return tuple(out_splits), locals_


POINTWISE = [
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar,
    aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.div.Tensor_mode,
    aten.neg.default, aten.exp.default, aten.log.default, aten.gelu.default, aten.relu.default,
    aten.silu.default, aten.tanh.default, aten.sigmoid.default, aten.pow.Tensor_Scalar,
    aten.pow.Tensor_Tensor, aten.pow.Scalar, aten.rsqrt.default, aten.sqrt.default,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self, aten.where.ScalarOther,
    aten.where.ScalarSelf, aten.dropout.default, aten.to.dtype, aten.to.dtype_layout,
    aten.to.device, aten._to_copy.default, aten.type_as.default, aten.clone.default,
    aten.contiguous.default, aten.alias.default, aten.detach.default, aten.erf.default,
    aten.abs.default, aten.reciprocal.default, aten.sin.default, aten.cos.default,
    aten.eq.Tensor, aten.eq.Scalar, aten.ne.Tensor, aten.ne.Scalar, aten.lt.Tensor,
    aten.lt.Scalar, aten.le.Tensor, aten.le.Scalar, aten.gt.Tensor, aten.gt.Scalar,
    aten.ge.Tensor, aten.ge.Scalar, aten.logical_not.default, aten.logical_and.default,
    aten.logical_or.default, aten.__and__.Tensor, aten.__or__.Tensor, aten.bitwise_not.default,
    aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.clamp.default, aten.maximum.default,
    aten.minimum.default, aten.softplus.default, aten.mish.default, aten.hardtanh.default,
    aten.leaky_relu.default, aten.elu.default, aten.log1p.default, aten.expm1.default,
    aten.square.default, aten.sign.default, aten.floor.default, aten.round.default,
    aten.lift_fresh_copy.default, aten.gelu_.default,
    aten.relu_.default, aten.silu_.default, aten.tanh_.default, aten.div_.Tensor, aten.div_.Scalar,
    aten.mul_.Tensor, aten.mul_.Scalar, aten.add_.Tensor, aten.add_.Scalar, aten.sub_.Tensor,
    aten.masked_fill_.Scalar, aten.masked_fill_.Tensor,
    aten.max.other, aten.min.other, aten.clamp_min.default, aten.clamp_max.default,
]


@rule(*POINTWISE)
def _pointwise(lz, node):
    operands = [a for a in node.all_input_nodes if isinstance(val(a), torch.Tensor)]
    if not any(lz.is_split(a) for a in operands):
        lz.copy(node, None)
        return True
    out_splits, locals_ = _align(lz, node, operands, len(shape(node)))
    lz.copy(node, out_splits, args_for=lambda r: lz.local_args(r, node, locals_)[0],
            kwargs_for=lambda r: lz.local_args(r, node, locals_)[1])
    return True


@rule(aten._assert_tensor_metadata.default, aten.sym_size.int, aten.sym_numel.default,
      aten.embedding.default, aten.arange.default, aten.arange.start, aten.arange.start_step,
      aten.ones.default, aten.zeros.default, aten.full.default, aten.empty.memory_format,
      aten.scalar_tensor.default)
def _shape_free(lz, node):
    """Ops whose output does not depend on split dims of their inputs (or have none)."""
    if node.target is aten.sym_size.int and lz.L(node.args[0])[node.args[1]] is not None:
        return None
    if node.target is aten.embedding.default and lz.is_split(node.args[1]):
        return None
    lz.copy(node, None)
    return True


@rule(operator.getitem)
def _getitem(lz, node):
    src, i = node.args
    lay = lz.lay.get(src)
    lz.copy(node, lay[i] if isinstance(lay, list) else None)
    return True


def _int_shape(node):
    try:
        return [int(s) for s in shape(node)]
    except Exception:
        return None


def _view_layout(ins, outs, in_l, ranks: int, where: str):
    """The layout of a view from `in_l` (dims `ins`) to dims `outs`, or None: a split dim
    merged with a symbolic one (replicate, listed in the plan)."""
    out_l = [None] * len(outs)
    i = j = 0
    while i < len(ins) or j < len(outs):
        gi, gj = [i], [j]
        pi = ins[i] if i < len(ins) else sympy.Integer(1)
        pj = outs[j] if j < len(outs) else sympy.Integer(1)
        i, j = i + 1, j + 1
        while sympy.expand(pi - pj) != 0:
            # grow the side whose product divides the other's (B*S vs B: grow the B side)
            _, den = sympy.fraction(sympy.cancel(pi / pj))
            grow_i = den != 1
            if grow_i and i < len(ins):
                pi *= ins[i]
                gi.append(i)
                i += 1
            elif j < len(outs):
                pj *= outs[j]
                gj.append(j)
                j += 1
            else:
                return None
        gi = [k for k in gi if k < len(ins)]
        gj = [k for k in gj if k < len(outs)]
        splits = [in_l[k] for k in gi]
        if any(s is not None for s in splits):
            sizes_in, sizes_out = [ins[k] for k in gi], [outs[k] for k in gj]
            if not all(v.is_Integer for v in sizes_in + sizes_out):
                return None  # a split dim merged with a symbolic one: replicate (listed in the plan)
            merged = merge(splits, [int(v) for v in sizes_in], ranks)
            for k, s in zip(gj, factor(merged, [int(v) for v in sizes_out], ranks, where)):
                out_l[k] = s
    return tuple(out_l)


@rule(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unflatten.int,
      aten.flatten.using_ints)
def _view(lz, node):
    x = node.args[0]
    if not lz.is_split(x):
        lz.copy(node, None)
        return True
    ins, outs = [_sym(v) for v in shape(x)], [_sym(v) for v in shape(node)]
    in_l = lz.L(x)
    # The output layout depends only on the input layout and the two shapes: computed once
    # per distinct (layout, shapes) and replayed (80 identical layers: 7 views each, every
    # one a sympy walk and a merge / factor over all ranks)
    key = ("view", tuple(layout_key(s) for s in in_l), tuple(ins), tuple(outs))
    if key not in lz.memo:
        lz.memo[key] = _view_layout(ins, outs, in_l, lz.N, node.name)
    out_l = lz.memo[key]
    if out_l is None:
        return None
    sizes_arg = node.args[1] if node.target in (aten.view.default, aten.reshape.default,
                                                aten._unsafe_view.default) else None

    if node.target is aten.flatten.using_ints:  # local dims flatten to the local size
        lz.copy(node, out_l)
        return True
    if node.target is aten.unflatten.int:
        dim = norm_dim(node.args[1], len(ins))
        new = range(dim, dim + len(node.args[2]))
        lz.copy(node, out_l, args_for=lambda r: (
            lz.local(r, x), dim,
            [len(out_l[k].lists[r]) if out_l[k] is not None else lz.local(r, a)
             for k, a in zip(new, node.args[2])]))
        return True

    def args_for(r):
        if sizes_arg is not None and len(sizes_arg) == len(outs):
            sizes = [len(s.lists[r]) if s is not None else lz.local(r, a) for s, a in zip(out_l, sizes_arg)]
        else:  # unflatten / flatten: static sizes, one symbolic size inferred
            sizes = [len(s.lists[r]) if s is not None else (int(n) if n.is_Integer else -1)
                     for s, n in zip(out_l, outs)]
        return (lz.local(r, x), sizes)
    for r in range(lz.N):
        lz.env[r][node] = lz.emit(r, aten.reshape.default, args_for(r), name=node.name)
    lz.lay[node] = out_l
    return True


@rule(aten.repeat_interleave.self_int)
def _repeat_interleave(lz, node):
    """GQA's kv-head repeat: element l becomes l*rep + t, t < rep (consecutive copies)."""
    x, rep = node.args[0], node.args[1]
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if dim is None or not isinstance(rep, int) or len(node.args) > 3 or "output_size" in node.kwargs:
        return None
    dim = norm_dim(dim, len(shape(x)))
    s = lz.L(x)[dim] if lz.is_split(x) else None
    if s is None:
        lz.copy(node, lz.L(x) if lz.is_split(x) else None)
        return True
    lay = list(lz.L(x))
    lay[dim] = make_split(s.size * rep, [(li[:, None] * rep + np.arange(rep)[None, :]).reshape(-1)
                                         for li in s.lists])
    lz.copy(node, tuple(lay))
    return True


@rule(aten.index.Tensor)
def _index(lz, node):
    """x[..., idx, ...] with one constant 1-D index (Falcon's key = qkv[:, :, [-2]])."""
    x, indices = node.args[0], list(node.args[1])
    if not lz.is_split(x):
        lz.copy(node, None)
        return True
    used = [k for k, i in enumerate(indices) if i is not None]
    if len(used) != 1:
        return None
    dim = used[0]
    idx = constant_value(indices[dim])
    if idx is None or idx.dim() != 1 or any(s is not None for s in lz.L(indices[dim])):
        return None
    lay = list(lz.L(x))
    s = lay[dim]
    if s is None:
        lz.copy(node, tuple(lay))
        return True
    size = shape(x)[dim]
    want = np.asarray([int(i) % size for i in idx.tolist()])
    if not all(np.isin(want, li).all() for li in s.lists):
        return None  # a rank lacks an indexed element: gather instead
    pos = [positions(li, want, node.name) for li in s.lists]
    lay[dim] = None

    def args_for(r):
        new = [lz.local(r, i) if i is not None else None for i in indices]
        new[dim] = lz.attr_index(r, pos[r])
        return (lz.local(r, x), new)
    lz.copy(node, tuple(lay), args_for=args_for)
    return True


@rule(aten.index_copy_.default, aten.index_copy.default)
def _cache_write(lz, node):
    """index_copy_(cache, dim, position, new): a static KV cache buffer (B, H_kv, S_max, d)
    written at `cache_position`. The rank's cache is its own copy of the buffer sliced like
    `new` (the kv heads and head dims the rank's k / v projection makes; copies of a kv head
    only where n > H_kv), so the write stays local and the rank keeps its slice across calls.
    After the write, the buffer node itself means the rank's slice (HF's StaticCache reads it
    again). Refused: a cache that is not a buffer, or a write split along the position dim."""
    cache, dim, pos, new = node.args[:4]
    nd = len(shape(node))
    dim = norm_dim(dim, nd)
    if not isinstance(cache, fx.Node) or cache.op != "get_attr" or lz.is_split(pos) or lz.is_split(cache):
        return None
    ln = lz.L(new)
    if ln[dim] is not None:
        return None
    lay = tuple(ln[k] if k != dim and not _one(shape(new)[k]) else None for k in range(nd))
    for r in range(lz.N):
        sels = tuple((k, s.lists[r]) for k, s in enumerate(lay) if s is not None)
        own = lz.attr(r, cache, sels, private=True)
        if own is None:
            lz.env[r][node] = None
            continue
        lz._attr_cache[r][(cache.target, (), True)] = own    # later reads of the buffer: the slice
        lz.env[r][node] = lz.emit(r, node.target, (own, dim, lz.local(r, pos), lz.local(r, new)),
                                  name=node.name)
    lz.lay[node] = lay
    lz.lay[cache] = lay
    return True


@rule(aten.transpose.int, aten.permute.default, aten.t.default, aten.numpy_T.default)
def _permute(lz, node):
    lay = list(lz.L(node.args[0]))
    nd = len(lay)
    if node.target in (aten.t.default, aten.numpy_T.default):
        perm = list(range(nd))[::-1]
    elif node.target is aten.transpose.int:
        a, b = norm_dim(node.args[1], nd), norm_dim(node.args[2], nd)
        perm = list(range(nd))
        perm[a], perm[b] = perm[b], perm[a]
    else:
        perm = [norm_dim(p, nd) for p in node.args[1]]
    lz.copy(node, tuple(lay[p] for p in perm))
    return True


@rule(aten.unsqueeze.default)
def _unsqueeze(lz, node):
    lay = list(lz.L(node.args[0]))
    lay.insert(norm_dim(node.args[1], len(lay) + 1), None)
    lz.copy(node, tuple(lay))
    return True


@rule(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def _squeeze(lz, node):
    xs = shape(node.args[0])
    lay = lz.L(node.args[0])
    if node.target is aten.squeeze.default:
        dims = [k for k, s in enumerate(xs) if _one(s)]
    elif node.target is aten.squeeze.dim:
        dims = [norm_dim(node.args[1], len(xs))]
    else:
        dims = [norm_dim(d, len(xs)) for d in node.args[1]]
    dims = [k for k in dims if _one(xs[k])]
    lz.copy(node, tuple(s for k, s in enumerate(lay) if k not in dims))
    return True


@rule(aten.expand.default, aten.broadcast_to.default)   # broadcast_to(x, size) = expand(x, size)
def _expand(lz, node):
    x = node.args[0]
    if not lz.is_split(x):
        lz.copy(node, None)
        return True
    lay, sizes = lz.L(x), list(node.args[1])
    off = len(sizes) - len(lay)
    out_l = tuple([None] * off + [s for s in lay])

    def args_for(r):
        new = [len(s.lists[r]) if s is not None else lz.local(r, a) for s, a in zip(out_l, sizes)]
        return (lz.local(r, x), new)
    lz.copy(node, out_l, args_for=args_for)
    return True


def _slice_bounds(size, start, end, step):
    start = 0 if start is None else start
    end = size if end is None else end
    start, end = (start + size if start < 0 else start), (end + size if end < 0 else end)
    return max(0, min(start, size)), max(0, min(end, size)), step


@rule(aten.slice.Tensor, aten.narrow.default)
def _slice(lz, node):
    x = node.args[0]
    xs = shape(x)
    dim = norm_dim(node.args[1] if len(node.args) > 1 else 0, len(xs))
    s = lz.L(x)[dim] if lz.is_split(x) else None
    if s is None:
        lz.copy(node, lz.L(x) if lz.is_split(x) else None)
        return True
    if node.target is aten.narrow.default:
        start, end, step = node.args[2], node.args[2] + node.args[3], 1
    else:
        rest = list(node.args[2:5])
        rest += [None, None, 1][len(rest):]
        start, end, step = _slice_bounds(xs[dim], rest[0], rest[1], rest[2] or 1)
    sel = np.arange(start, end, step)
    lists, locs = [], []
    for r in range(lz.N):
        li = s.lists[r]
        mask = np.isin(li, sel)
        pos = np.nonzero(mask)[0]
        sl = as_slice(pos) if len(pos) else (0, 0, 1)
        if sl is None:
            raise ShardingError(f"node {node.name}: rank {r} holds the sliced elements of dim {dim} "
                                f"at scattered positions; this slice cannot be made local")
        lists.append((li[pos] - start) // step)
        locs.append(sl)
    new = list(lz.L(x))
    new[dim] = make_split(len(sel), lists)
    # narrow(x, dim, start, length) becomes the local slice; emitted as aten.slice itself (an
    # inactive rank has no node to retarget: emit returns None for it)
    for r in range(lz.N):
        lz.env[r][node] = lz.emit(r, aten.slice.Tensor, (lz.local(r, x), dim, *locs[r]), name=node.name)
    lz.lay[node] = tuple(new)
    return True


@rule(aten.select.int)
def _select(lz, node):
    x, dim, idx = node.args
    nd = len(shape(x))
    dim = norm_dim(dim, nd)
    s = lz.L(x)[dim]
    idx = idx + shape(x)[dim] if idx < 0 else idx
    if s is None:
        lz.copy(node, tuple(l for k, l in enumerate(lz.L(x)) if k != dim) if lz.is_split(x) else None)
        return True
    if not all(idx in li for li in s.lists):
        return None
    pos = [int(np.nonzero(li == idx)[0][0]) for li in s.lists]
    lz.copy(node, tuple(l for k, l in enumerate(lz.L(x)) if k != dim),
            args_for=lambda r: (lz.local(r, x), dim, pos[r]))
    return True


@rule(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int)
def _split(lz, node):
    x = node.args[0]
    xs = shape(x)
    if node.target is aten.unbind.int:
        dim = norm_dim(node.args[1] if len(node.args) > 1 else 0, len(xs))
        if lz.L(x)[dim] is not None:
            return None
        rest = tuple(l for k, l in enumerate(lz.L(x)) if k != dim)
        lz.copy(node, [rest] * xs[dim])
        return True
    dim = norm_dim(node.args[2] if len(node.args) > 2 else 0, len(xs))
    outs = val(node)
    s = lz.L(x)[dim]
    if s is None:
        lz.copy(node, [lz.L(x)] * len(outs) if lz.is_split(x) else [None] * len(outs))
        return True
    sizes = [int(o.shape[dim]) for o in outs]
    bounds = np.cumsum([0] + sizes)
    per_out = [[] for _ in sizes]
    local_sizes = []
    for r in range(lz.N):
        li = s.lists[r]
        which = np.searchsorted(bounds, li, side="right") - 1
        if np.any(np.diff(which) < 0):
            raise ShardingError(f"node {node.name}: rank {r}'s elements of dim {dim} are not in "
                                f"chunk order; this split cannot be made local")
        local_sizes.append([int((which == c).sum()) for c in range(len(sizes))])
        for c in range(len(sizes)):
            per_out[c].append(li[which == c] - bounds[c])
    lays = []
    for c, size in enumerate(sizes):
        lay = list(lz.L(x))
        lay[dim] = make_split(size, per_out[c])
        lays.append(tuple(lay))
    for r in range(lz.N):
        lz.env[r][node] = lz.emit(r, aten.split_with_sizes.default,
                                  (lz.local(r, x), local_sizes[r], dim), name=node.name)
    lz.lay[node] = lays
    return True


def _legacy_empty(t) -> bool:
    """A 1-d tensor of size 0, which torch.cat ignores next to tensors of any rank."""
    size = shape(t)
    return len(size) == 1 and isinstance(size[0], int) and size[0] == 0


@rule(aten.cat.default, aten.stack.default)
def _cat(lz, node):
    tensors = list(node.args[0])
    if not any(lz.is_split(t) for t in tensors):
        lz.copy(node, None)
        return True
    out_nd = len(shape(node))
    if node.target is aten.cat.default and out_nd > 1:
        # torch.cat skips 1-d empty tensors whatever the other inputs' rank (legacy): XLM /
        # FlauBERT cat their always-present, empty kv cache tensor(()) onto k and v
        tensors = [t for t in tensors if not _legacy_empty(t)]
    dim = norm_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), out_nd)
    stack = node.target is aten.stack.default
    in_nd = out_nd - 1 if stack else out_nd
    # align the other dims as elementwise ops do
    lay = []
    locals_ = {t: [lz.local(r, t) for r in range(lz.N)] for t in tensors}
    for k in range(in_nd):
        if not stack and k == dim:
            lay.append(None)
            continue
        cands = [lz.L(t)[k] for t in tensors if lz.L(t)[k] is not None]
        target = min(cands, key=lambda s: sum(len(x) for x in s.lists)) if cands else None
        lay.append(target)
        if target is None:
            continue
        for t in tensors:
            if not same(lz.L(t)[k], target):
                locals_[t] = [lz.select(r, t, locals_[t][r], k, lz.L(t)[k], target.lists[r])
                              for r in range(lz.N)]
    if stack:
        lay.insert(dim, None)
    else:
        sizes = [shape(t)[dim] for t in tensors]
        if any(lz.L(t)[dim] is not None for t in tensors):
            lists, off = [[] for _ in range(lz.N)], 0
            for t, size in zip(tensors, sizes):
                for r, li in enumerate(lists_of(lz.L(t)[dim], size, lz.N)):
                    lists[r].append(li + off)
                off += size
            lay[dim] = make_split(off, [np.concatenate(x) for x in lists])
    lz.copy(node, tuple(lay), args_for=lambda r: ([locals_[t][r] for t in tensors], *node.args[1:]))
    return True


@rule(aten.linear.default, aten.addmm.default)
def _linear(lz, node):
    addmm = node.target is aten.addmm.default
    x, w = (node.args[1], node.args[2]) if addmm else (node.args[0], node.args[1])
    b = node.args[0] if addmm else (node.args[2] if len(node.args) > 2 else node.kwargs.get("bias"))
    if not (isinstance(w, fx.Node) and w.op == "get_attr") or (isinstance(b, fx.Node) and b.op != "get_attr"):
        return _matmul_general(lz, node) if not addmm else None
    if lz.is_split(w) or (b is not None and lz.is_split(b)):
        return None
    in_dim, out_dim = (0, 1) if addmm else (1, 0)
    xl = lz.L(x)
    sx = xl[-1] if xl else None
    seed = lz.seeds.get(node.name)
    if sx is None and seed is None:
        lz.copy(node, tuple(xl[:-1]) + (None,) if lz.is_split(x) else None)
        return True
    if sx is None:  # column parallel: this rank computes the seeded output features
        out = make_split(int(val(w).shape[out_dim]), seed)
        xs = [lz.local(r, x) for r in range(lz.N)]
        if lz.sequence_parallel and any(s is not None for s in xl[:-1]):
            # a sequence-split residual stream: every rank needs all tokens for its features
            xs, xl = lz.gathered(x), (None,) * len(xl)
        for r in range(lz.N):
            wl = lz.attr(r, w, ((out_dim, seed[r]),))
            bl = lz.attr(r, b, ((0, seed[r]),)) if b is not None else None
            args = (bl, xs[r], wl) if addmm else (xs[r], wl, bl)
            lz.env[r][node] = lz.emit(r, node.target, args, name=node.name)
        lz.lay[node] = tuple(xl[:-1]) + (out,)
        return True
    # row parallel: a partial sum over the split input features, reduced once. The bias rides
    # in the partial of the one rank per reduction group that holds input feature 0 (the group
    # partitions the features: all_reduce checks it), in the GEMM's epilogue: the sum then
    # holds it once, with no pass over the output after the reduction.
    parts = []
    for r in range(lz.N):
        wl = lz.attr(r, w, ((in_dim, sx.lists[r]),))
        xr = lz.local(r, x)
        if b is not None and bool((np.asarray(sx.lists[r]) == 0).any()):
            bl = lz.attr(r, b)
            parts.append(lz.emit(r, aten.addmm.default, (bl, xr, wl)) if addmm
                         else lz.emit(r, aten.linear.default, (xr, wl, bl)))
        else:
            parts.append(lz.emit(r, aten.mm.default, (xr, wl)) if addmm
                         else lz.emit(r, aten.linear.default, (xr, wl)))
    lay = tuple(xl[:-1]) + (None,)
    # sequence parallel: reduce-scatter, each rank keeping a chunk of the sequence (the norms
    # and residual adds that follow run on 1/g of the tokens); else all-reduce
    scattered = lz.reduce_scatter(node, parts, sx, lay)
    reduced, lay = scattered if scattered is not None else (lz.all_reduce(node, parts, sx), lay)
    for r in range(lz.N):
        lz.env[r][node] = reduced[r]
    lz.lay[node] = lay
    return True


@rule(aten.matmul.default, aten.bmm.default, aten.mm.default)
def _matmul_general(lz, node):
    a, b = node.args[0], node.args[1]
    seed = lz.seeds.get(node.name)
    if seed is not None and isinstance(b, fx.Node) and b.op == "get_attr" and len(shape(b)) == 2 \
            and lz.L(a)[-1] is None:
        # x @ W, W (in, out) a parameter: column parallel like a seeded linear
        out = make_split(int(shape(b)[1]), seed)
        for r in range(lz.N):
            lz.env[r][node] = lz.emit(r, node.target, (lz.local(r, a), lz.attr(r, b, ((1, seed[r]),))),
                                      name=node.name)
        lz.lay[node] = tuple(lz.L(a)[:-1]) + (out,)
        return True
    if not (lz.is_split(a) or lz.is_split(b)):
        lz.copy(node, None)
        return True
    got = _contract(lz, node, a, b, node.target)
    if got is None:
        return None
    lz.env_set(node, got[0])
    lz.lay[node] = got[1]
    return True


def _contract(lz, node, a, b, op):
    """a @ b on every rank: (per-rank local results, output layout), or None (no rule).

    A contraction over a split dim is a partial sum, reduced at once (score-reduce), or its
    operands are gathered first (qk-gather, or differently split operands)."""
    sa, sb = shape(a), shape(b)
    if len(sa) < 2 or len(sb) < 2:
        return None
    la, lb = lz.L(a), lz.L(b)
    out_nd = len(shape(node))
    # batch dims broadcast like elementwise dims
    batch = []
    locals_ = {a: [lz.local(r, a) for r in range(lz.N)], b: [lz.local(r, b) for r in range(lz.N)]}
    for k in range(out_nd - 2):
        cands = []
        for t, lt in ((a, la), (b, lb)):
            kt = k - (out_nd - len(shape(t)))
            if kt >= 0 and not _one(shape(t)[kt]) and lt[kt] is not None:
                cands.append(lt[kt])
        target = min(cands, key=lambda s: sum(len(x) for x in s.lists)) if cands else None
        batch.append(target)
        if target is None:
            continue
        for t, lt in ((a, la), (b, lb)):
            kt = k - (out_nd - len(shape(t)))
            if kt >= 0 and not _one(shape(t)[kt]) and not same(lt[kt], target):
                locals_[t] = [lz.select(r, t, locals_[t][r], kt, lt[kt], target.lists[r]) for r in range(lz.N)]
    ka, kb = la[-1], lb[-2]
    nd_a, nd_b = len(sa), len(sb)
    if ka is None and kb is not None:
        locals_[a] = [lz.select(r, a, locals_[a][r], nd_a - 1, None, kb.lists[r]) for r in range(lz.N)]
        ka = kb
    elif kb is None and ka is not None:
        locals_[b] = [lz.select(r, b, locals_[b][r], nd_b - 2, None, ka.lists[r]) for r in range(lz.N)]
        kb = ka
    out_lay = tuple(batch) + (la[-2], lb[-1])
    if ka is None:
        return [lz.emit(r, op, (locals_[a][r], locals_[b][r])) for r in range(lz.N)], out_lay
    variant = lz.variants.get(node.name, "score-reduce")
    if not same(ka, kb) or variant == "qk-gather":
        # gather the contracted dim on both sides: every rank holds it whole, in the same order
        if not same(ka, kb):
            lz.replicated.append((node.name, "matmul over differently split dims"))
        alike = same(ka, kb)    # the same permutation on both sides: no reorder needed
        ga = lz.gather_dim(a, locals_[a], nd_a - 1, ka, ordered=not alike)
        gb = lz.gather_dim(b, locals_[b], nd_b - 2, kb, ordered=not alike)
        return [lz.emit(r, op, (ga[r], gb[r])) for r in range(lz.N)], out_lay
    parts = [lz.emit(r, op, (locals_[a][r], locals_[b][r])) for r in range(lz.N)]
    return lz.all_reduce(node, parts, ka), out_lay


@rule(aten.baddbmm.default)
def _baddbmm(lz, node):
    """beta * bias + alpha * (a @ b) (BLOOM's ALiBi scores): the product as any contraction,
    the bias, sliced to the product's layout, added once after any reduction."""
    bias, a, b = node.args[:3]
    beta = node.args[3] if len(node.args) > 3 else node.kwargs.get("beta", 1)
    alpha = node.args[4] if len(node.args) > 4 else node.kwargs.get("alpha", 1)
    if not any(lz.is_split(t) for t in (bias, a, b)):
        lz.copy(node, None)
        return True
    got = _contract(lz, node, a, b, aten.bmm.default)
    if got is None:
        return None
    prods, out_lay = got
    nd = len(out_lay)
    bl = [lz.local(r, bias) for r in range(lz.N)]
    for k, s in enumerate(out_lay):
        kb = k - (nd - len(shape(bias)))
        if s is None or kb < 0 or _one(shape(bias)[kb]) or same(lz.L(bias)[kb], s):
            continue
        bl = [lz.select(r, bias, bl[r], kb, lz.L(bias)[kb], s.lists[r]) for r in range(lz.N)]
    out = []
    for r in range(lz.N):
        p = lz.emit(r, aten.mul.Tensor, (prods[r], alpha)) if alpha != 1 else prods[r]
        c = lz.emit(r, aten.mul.Tensor, (bl[r], beta)) if beta != 1 else bl[r]
        out.append(lz.emit(r, aten.add.Tensor, (p, c)) if r in lz.active else None)
    lz.env_set(node, out)
    lz.lay[node] = out_lay
    return True


@rule(aten.softmax.int, aten._softmax.default, aten._safe_softmax.default, aten.log_softmax.int,
      aten._log_softmax.default)
def _softmax(lz, node):
    x = node.args[0]
    dim = norm_dim(node.args[1], len(shape(x)))
    if lz.is_split(x) and lz.L(x)[dim] is not None:
        return None
    lz.copy(node, lz.L(x) if lz.is_split(x) else None)
    return True


@rule(aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.sum.default, aten.mean.default)
def _reduce(lz, node):
    x = node.args[0]
    nd = len(shape(x))
    if node.target in (aten.sum.default, aten.mean.default):
        dims, keep = list(range(nd)), False
    else:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = list(range(nd)) if dims is None or dims == [] else [norm_dim(d, nd) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        keep = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
    lay = lz.L(x)
    if not lz.is_split(x):
        lz.copy(node, None)
        return True
    out_lay = tuple(None if k in dims else s for k, s in enumerate(lay) if keep or k not in dims)
    split_red = [k for k in dims if lay[k] is not None]
    if not split_red:
        lz.copy(node, out_lay)
        return True
    if len(split_red) > 1:
        return None
    s = lay[split_red[0]]
    op = "max" if node.target is aten.amax.default else "sum"
    mean = node.target in (aten.mean.dim, aten.mean.default)
    parts = []
    for r in range(lz.N):
        xr = lz.local(r, x)
        if node.target is aten.amax.default:
            p = lz.emit(r, aten.amax.default, (xr, dims, keep))
        else:
            p = lz.emit(r, aten.sum.dim_IntList, (xr, dims, keep), dict(node.kwargs))
            if mean:
                total = int(np.prod([shape(x)[k] for k in dims]))
                p = lz.emit(r, aten.div.Tensor, (p, total))
        parts.append(p)
    reduced = lz.all_reduce(node, parts, s, op, replicas=True)
    for r in range(lz.N):
        lz.env[r][node] = reduced[r]
    lz.lay[node] = out_lay
    return True


@rule(aten.layer_norm.default, aten.rms_norm.default)
def _norm(lz, node):
    x = node.args[0]
    k = len(node.args[1])
    lay = lz.L(x)
    if not lz.is_split(x) or all(s is None for s in lay[-k:]):
        lz.copy(node, lay if lz.is_split(x) else None)
        return True
    if k != 1:
        return None
    s = lay[-1]
    d = shape(x)[-1]
    rms = node.target is aten.rms_norm.default
    w = node.args[2] if len(node.args) > 2 else None
    bias = None if rms else (node.args[3] if len(node.args) > 3 else None)
    eps = node.args[3 if rms else 4] if len(node.args) > (3 if rms else 4) else (None if rms else 1e-5)
    if eps is None:
        eps = torch.finfo(val(x).dtype).eps
    # the per-row sums run over the m-group: a partial sum of d/m elements on each rank
    def partial_mean(y_locals):
        parts = [lz.emit(r, aten.div.Tensor, (lz.emit(r, aten.sum.dim_IntList, (y_locals[r], [-1], True)), d))
                 for r in range(lz.N)]
        return lz.all_reduce(node, parts, s, replicas=True)
    xs = [lz.local(r, x) for r in range(lz.N)]
    if rms:
        centered = xs
    else:
        mean = partial_mean(xs)
        centered = [lz.emit(r, aten.sub.Tensor, (xs[r], mean[r])) for r in range(lz.N)]
    var = partial_mean([lz.emit(r, aten.mul.Tensor, (centered[r], centered[r])) for r in range(lz.N)])
    for r in range(lz.N):
        inv = lz.emit(r, aten.rsqrt.default, (lz.emit(r, aten.add.Tensor, (var[r], eps)),))
        y = lz.emit(r, aten.mul.Tensor, (centered[r], inv))
        if isinstance(w, fx.Node):
            y = lz.emit(r, aten.mul.Tensor, (y, lz.select(r, w, lz.local(r, w), 0, None, s.lists[r])))
        if isinstance(bias, fx.Node):
            y = lz.emit(r, aten.add.Tensor, (y, lz.select(r, bias, lz.local(r, bias), 0, None, s.lists[r])))
        lz.env[r][node] = y
    lz.lay[node] = lay
    return True


@rule(aten.scaled_dot_product_attention.default)
def _sdpa(lz, node):
    args = sdpa_args(node)
    q, k, v = args["query"], args["key"], args["value"]
    mask = args.get("attn_mask")
    if not any(lz.is_split(t) for t in (q, k, v)):
        lz.copy(node, None)
        return True
    lq, lk, lv = lz.L(q), lz.L(k), lz.L(v)
    if len(lq) < 3 or any(s is not None for s in (lq[-2], lk[-2], lv[-2])):
        return None
    H, Hk = shape(q)[-3], shape(k)[-3]
    hq = lq[-3]
    locals_ = {t: [lz.local(r, t) for r in range(lz.N)] for t in (q, k, v)}
    gqa = bool(args.get("enable_gqa", False)) and Hk != H
    for t, lt in ((k, lk), (v, lv)):
        if hq is None:
            continue
        if not gqa:
            if _one(shape(t)[-3]):
                continue  # one kv head broadcast over the query heads (MQA without enable_gqa)
            if not same(lt[-3], hq):
                locals_[t] = [lz.select(r, t, locals_[t][r], len(shape(t)) - 3, lt[-3], hq.lists[r])
                              for r in range(lz.N)]
            continue
        group = H // Hk
        for r in range(lz.N):
            qh = hq.lists[r]
            kh = lists_of(lt[-3], Hk, lz.N)[r]
            want = np.unique(qh // group)
            if len(qh) % len(want) or not all(qh[p] // group == want[p // (len(qh) // len(want))] for p in range(len(qh))):
                raise ShardingError(f"node {node.name}: rank {r}'s query heads {qh.tolist()} do not map "
                                    f"onto whole key/value heads; choose n dividing H_kv or a multiple of it")
            if not np.array_equal(kh, want):
                locals_[t][r] = lz.select(r, t, locals_[t][r], len(shape(t)) - 3, lt[-3], want)
    # the mask: slice a head axis to the rank's heads
    mask_locals = None
    if isinstance(mask, fx.Node):
        mask_locals = [lz.local(r, mask) for r in range(lz.N)]
        ms = shape(mask)
        if len(ms) >= 3 and ms[-3] != 1 and hq is not None:
            mask_locals = [lz.select(r, mask, mask_locals[r], len(ms) - 3, lz.L(mask)[-3], hq.lists[r])
                           for r in range(lz.N)]
        if lz.is_split(mask) and any(s is not None for i, s in enumerate(lz.L(mask)) if i != len(ms) - 3):
            return None
    dq, dk = lq[-1], lk[-1]
    out_lay = tuple(lq[:-3]) + (hq, None, lv[-1])
    if dq is None and dk is None:
        def args_for(r):
            a = [locals_[q][r], locals_[k][r], locals_[v][r]]
            return tuple(a) + tuple(mask_locals[r] if n == "attn_mask" and mask_locals else lz.local(r, x)
                                    for n, x in zip(SDPA_ARGS[3:], node.args[3:]))
        kw = lambda r: {n: (mask_locals[r] if n == "attn_mask" and mask_locals else lz.local(r, x))
                        for n, x in node.kwargs.items()}
        lz.copy(node, out_lay, args_for=args_for, kwargs_for=kw)
        return True
    if not same(dq, dk):
        return None
    d = shape(q)[-1]
    scale = args.get("scale")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    variant = lz.variants.get(node.name, "score-reduce")
    if variant == "qk-gather":
        # Q and K are split alike (same(dq, dk)): gathered in the group's order, both carry the
        # same permutation of d, which Q K^T sums over
        gq = lz.gather_dim(q, locals_[q], len(shape(q)) - 1, dq, ordered=False)
        gk = lz.gather_dim(k, locals_[k], len(shape(k)) - 1, dk, ordered=False)
        for r in range(lz.N):
            kw = {"attn_mask": mask_locals[r] if mask_locals else None,
                  "is_causal": bool(args.get("is_causal", False)), "scale": scale,
                  "enable_gqa": gqa}
            lz.env[r][node] = lz.emit(r, aten.scaled_dot_product_attention.default,
                                      (gq[r], gk[r], locals_[v][r]), kw, name=node.name)
        lz.lay[node] = out_lay
        return True
    # score-reduce: partial Q K^T over d/m, all-reduced in the m-group, then the softmax tail
    parts = []
    for r in range(lz.N):
        kr, vr = locals_[k][r], locals_[v][r]
        if gqa:
            rep = (len(hq.lists[r]) if hq is not None else H) // val_len(lz, k, r, lk)
            if rep > 1:
                kr = lz.emit(r, aten.repeat_interleave.self_int, (kr, rep, len(shape(k)) - 3))
                locals_[v][r] = lz.emit(r, aten.repeat_interleave.self_int, (vr, rep, len(shape(v)) - 3))
        kt = lz.emit(r, aten.transpose.int, (kr, -2, -1))
        parts.append(lz.emit(r, aten.matmul.default, (locals_[q][r], kt)))
    scores = lz.all_reduce(node, parts, dq)
    for r in range(lz.N):
        lz.env[r][node] = lz.emit(
            r, helix.attend.default,
            (scores[r], locals_[v][r], mask_locals[r] if mask_locals else None,
             bool(args.get("is_causal", False)), float(scale)), name=node.name)
    lz.lay[node] = out_lay
    return True


def val_len(lz, node, r, lay):
    s = lay[-3]
    return len(s.lists[r]) if s is not None else shape(node)[-3]


@rule(aten.view_as_complex.default, aten.view_as_real.default)
def _complex_view(lz, node):
    """(..., k, 2) real <-> (..., k) complex (DeepSeek-V2's rotary): the pair dim stays whole,
    every other dim keeps its placement."""
    x = node.args[0]
    if not lz.is_split(x):
        lz.copy(node, None)
        return True
    lay = lz.L(x)
    if node.target is aten.view_as_complex.default:
        if lay[-1] is not None:
            return None
        lz.copy(node, tuple(lay[:-1]))
    else:
        lz.copy(node, tuple(lay) + (None,))
    return True


@rule(aten.gather.default)
def _gather(lz, node):
    """torch.gather(x, dim, index) along a dim x holds whole (DeBERTa's c2p / p2c terms
    gathered by relative position): the index, an unsplit tensor of the output's shape, is
    sliced to x's placement on the other dims, as an elementwise operand would be."""
    x, index = node.args[0], node.args[2]
    dim = norm_dim(node.args[1], len(shape(x)))
    if not lz.is_split(x):
        if lz.is_split(index):
            return None
        lz.copy(node, None)
        return True
    lay = lz.L(x)
    if lay[dim] is not None or lz.is_split(index) or len(shape(index)) != len(lay) \
            or node.kwargs.get("sparse_grad") or len(node.args) > 3:
        return None
    idx = [lz.local(r, index) for r in range(lz.N)]
    for k, s in enumerate(lay):
        if s is None or _one(shape(index)[k]):
            continue
        if shape(index)[k] != shape(x)[k]:
            return None   # the index covers part of a split dim: which rows a rank needs is unclear
        idx = [lz.select(r, index, idx[r], k, None, s.lists[r]) for r in range(lz.N)]
    lz.copy(node, tuple(lay), args_for=lambda r: (lz.local(r, x), node.args[1], idx[r]))
    return True


@rule(aten.max.dim, aten.min.dim)
def _max_dim(lz, node):
    """(values, indices) of a max / min over one dim (a stable softmax's row max): local when
    the reduced dim is whole on every rank; over a split dim the indices would be local ones,
    so the op then runs on gathered inputs (listed in replicated_ops)."""
    x = node.args[0]
    if not lz.is_split(x):
        lz.copy(node, [None, None])
        return True
    nd = len(shape(x))
    dim = norm_dim(node.args[1], nd)
    keep = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
    lay = lz.L(x)
    if lay[dim] is not None:
        return None
    out = tuple(None if k == dim else s for k, s in enumerate(lay) if keep or k != dim)
    lz.copy(node, [out, out])
    return True
