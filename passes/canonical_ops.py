"""canonical_ops: other spellings of a transpose, a permute or an expand become that op.

torch.export's pre-dispatch graph keeps composite aliases as they were written:
`x.swapaxes(1, 2)`, `k.mT`, `x.movedim(1, 2)`, `torch.broadcast_to(k, q.shape)`.  The
passes after this one (fold_params, find_attention, the shard rules, the workload) know
transpose.int, permute and expand; this pass rewrites each alias, in place, to the op it
stands for, so every pass sees one spelling.

Rules (one row per alias: the canonical target and its arguments from the node's):

    swapaxes(x, a, b), swapdims(x, a, b)  ->  transpose.int(x, a, b)
    mT(x)                                  ->  transpose.int(x, -2, -1)
    adjoint(x), x real                     ->  transpose.int(x, -2, -1)
    movedim.int(x, src, dst)               ->  permute(x, perm)
    broadcast_to(x, size)                  ->  expand(x, size)

Invariant: every node computes what it computed (same value, same meta["val"]); only its
target and arguments change.  Returns the number of nodes rewritten.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .graph_utils import aten, norm_dim, val


def _movedim(node):
    x, src, dst = node.args[:3]
    nd = len(val(x).shape)
    src, dst = norm_dim(src, nd), norm_dim(dst, nd)
    perm = [k for k in range(nd) if k != src]
    perm.insert(dst, src)
    return aten.permute.default, (x, perm)


def _adjoint(node):
    x = node.args[0]
    if val(x).is_complex():   # adjoint conjugates complex tensors: not a plain transpose
        return None
    return aten.transpose.int, (x, -2, -1)


RULES = {
    aten.swapaxes.default: lambda n: (aten.transpose.int, tuple(n.args[:3])),
    aten.swapdims.default: lambda n: (aten.transpose.int, tuple(n.args[:3])),
    aten.mT.default: lambda n: (aten.transpose.int, (n.args[0], -2, -1)),
    aten.adjoint.default: _adjoint,
    aten.movedim.int: _movedim,
    aten.broadcast_to.default: lambda n: (aten.expand.default, tuple(n.args[:2])),
}


def canonical_ops(gm: fx.GraphModule) -> int:
    rewritten = 0
    for node in gm.graph.nodes:
        rule = RULES.get(node.target) if node.op == "call_function" else None
        if rule is None or node.kwargs or not isinstance(val(node.args[0]), torch.Tensor):
            continue
        new = rule(node)
        if new is None:
            continue
        node.target, node.args = new
        rewritten += 1
    if rewritten:
        gm.recompile()
    return rewritten
