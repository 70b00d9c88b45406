"""fold_params: views of parameters become parameters of their own (one job: name weight views).

Some modules slice or transpose a weight inside forward: nn.MultiheadAttention's
cross-attention projects k and v with `in_proj_weight.split([E, 2E])[1]`, Falcon
multiplies by `weight.T`.  This pass replaces each such chain (t, transpose, permute,
split / chunk + getitem, slice, narrow over get_attr nodes) by one get_attr of a derived
tensor, so the projection is seen as a projection and its slices are taken at compile
time like any weight.  Each derived tensor records how it is made from its base
parameter (`ParamView`), so a rank's slices of it can be read from a checkpoint of the
base.

Invariant: the graph computes what it computed; derived tensors equal the chains they
replace (they are views of the same storage).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from .graph_utils import aten, norm_dim, shape


@dataclass(frozen=True)
class ParamView:
    """derived[..., i_k, ...] = base[..., index[perm[k]][i_k] at dim perm[k], ...]."""

    base: str
    perm: tuple            # derived dim k is base dim perm[k]
    index: tuple           # per base dim: np.ndarray of base indices kept, or None (all)

    def to_base(self, sels) -> tuple:
        """Selections on derived dims -> selections on base dims (every restricted dim listed)."""
        picked = {self.perm[d]: np.asarray(idx) for d, idx in sels}
        out = []
        for b, kept in enumerate(self.index):
            if b in picked:
                out.append((b, picked[b] if kept is None else kept[picked[b]]))
            elif kept is not None:
                out.append((b, kept))
        return tuple(out)


def _base_view(name: str, t: torch.Tensor) -> ParamView:
    return ParamView(base=name, perm=tuple(range(t.dim())), index=(None,) * t.dim())


def _restrict(v: ParamView, dim: int, keep: np.ndarray, size: int) -> ParamView:
    b = v.perm[dim]
    cur = v.index[b]
    new = keep if cur is None else cur[keep]
    index = list(v.index)
    index[b] = None if (cur is None and len(keep) == size and np.array_equal(keep, np.arange(size))) else new
    return ParamView(base=v.base, perm=v.perm, index=tuple(index))


def fold_params(gm: fx.GraphModule, params: dict) -> dict:
    """Rewrite parameter-view chains in place; returns {derived name: ParamView}."""
    views: dict = {}
    pv: dict = {}  # node -> (tensor, ParamView) or list of them (split)
    for node in gm.graph.nodes:
        if node.op == "get_attr" and str(node.target) in params:
            t = params[str(node.target)]
            if isinstance(t, torch.Tensor):
                pv[node] = (t, _base_view(str(node.target), t))
            continue
        if node.op != "call_function" or not node.args or node.args[0] not in pv:
            continue
        src = pv[node.args[0]]
        try:
            out = _apply(node, src)
        except Exception:
            out = None
        if out is not None:
            pv[node] = out
    count = 0
    for node in list(gm.graph.nodes):
        entry = pv.get(node)
        if node.op != "call_function" or not isinstance(entry, tuple):
            continue
        if all(u in pv for u in node.users):  # folded into a later node instead
            continue
        tensor, view = entry
        name = f"_helix_view_{count}"
        count += 1
        gm.register_buffer(name, tensor.detach(), persistent=False)
        params[name] = tensor.detach()
        views[name] = view
        with gm.graph.inserting_before(node):
            new = gm.graph.get_attr(name)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
    # recompiling an 80-layer graph's code costs ~0.2-1 s: only when something changed
    if gm.graph.eliminate_dead_code() or count:
        gm.recompile()
    return views


def _apply(node: fx.Node, src):
    t, v = src if isinstance(src, tuple) else (None, None)
    op = node.target
    if op is operator.getitem and isinstance(src, list):
        return src[node.args[1]]
    if t is None:
        return None
    nd = t.dim()
    if op in (aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default):
        if op in (aten.t.default, aten.numpy_T.default):  # weight.T is numpy_T
            perm = list(range(nd))[::-1]
        elif op is aten.transpose.int:
            a, b = norm_dim(node.args[1], nd), norm_dim(node.args[2], nd)
            perm = list(range(nd))
            perm[a], perm[b] = perm[b], perm[a]
        else:
            perm = [norm_dim(p, nd) for p in node.args[1]]
        return (t.permute(perm), ParamView(base=v.base, perm=tuple(v.perm[p] for p in perm), index=v.index))
    if op in (aten.slice.Tensor, aten.narrow.default):
        dim = norm_dim(node.args[1] if len(node.args) > 1 else 0, nd)
        size = t.shape[dim]
        if op is aten.narrow.default:
            start, end, step = node.args[2], node.args[2] + node.args[3], 1
        else:
            rest = list(node.args[2:5]) + [None, None, 1][len(node.args[2:5]):]
            start, end, step = rest[0] or 0, size if rest[1] is None else min(rest[1], size), rest[2] or 1
        keep = np.arange(size)[start:end:step]
        return (t[(slice(None),) * dim + (slice(start, end, step),)], _restrict(v, dim, keep, size))
    if op in (aten.split.Tensor, aten.split_with_sizes.default):
        dim = norm_dim(node.args[2] if len(node.args) > 2 else 0, nd)
        parts = torch.split(t, node.args[1], dim)
        out, off = [], 0
        for p in parts:
            keep = np.arange(off, off + p.shape[dim])
            out.append((p, _restrict(v, dim, keep, t.shape[dim])))
            off += p.shape[dim]
        return out
    return None
