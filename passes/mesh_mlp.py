"""mesh_mlp: the MLPs of one rank graph of a sequence-split decode program, sharded over every
rank of the n x m x s mesh (NVIDIA's Helix: attention replicated over the s cache chunks, the
FFN over all N = s m n GPUs; docs/decode.md).

Input: rank (i, j, k)'s module as passes/seq_split.py leaves it: its MLPs hold rank (i, j)'s
F/(m n) columns of the up (and gate) projections and rows of the down projection, the same on
all s ranks of (i, j), and the down projection's partial sum is all-reduced over the m x n
ranks of chunk k ("all"; "head" when m = 1, "dim" when n = 1; no collective when m n = 1).
Output: the same module with, per MLP,

    up / gate weight   rows    [lo_k, hi_k) of its F/(m n)       # (F/N, D)
    down weight        columns [lo_k, hi_k)                      # (D, F/N)
    all_reduce(down(x), "mesh", "sum")                           # over all N ranks

(lo_k, hi_k: chunk k of s, passes/seq_split.chunk_bounds). The MLP's input is the same on every
rank (the residual stream after the output projection's all-reduce), so the N partial sums add
up to the MLP's output exactly. A down projection with a bias adds it after the all-reduce.

Refused (HelixError naming the MLP): a projection that is not an aten.linear of a weight
attribute, an MLP narrower than s columns on a rank, a down projection whose partial sum is not
all-reduced over the whole m x n chunk (the MLP would then be replicated inside the chunk).

Invariant: the N rank modules, run together, compute what the s = 1 rank modules computed; each
rank holds 1/s of its (i, j) MLP weights.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from helix_compiler.errors import HelixError
from helix_compiler.runtime import collectives as _c  # noqa: F401  (registers torch.ops.helix)

from .graph_utils import aten
from .seq_split import chunk_axes, chunk_bounds

__all__ = ["mlp_attrs", "mlp_over_mesh"]

helix = torch.ops.helix


def _linear_of(gm: fx.GraphModule, attr: str, what: str) -> fx.Node:
    """The one aten.linear whose weight is the get_attr of `attr`."""
    gets = [n for n in gm.graph.nodes if n.op == "get_attr" and str(n.target) == attr]
    users = [u for g in gets for u in g.users]
    if len(users) != 1 or users[0].target is not aten.linear.default or users[0].args[1] is not gets[0]:
        raise HelixError(f"mesh_mlp: {what} weight {attr} is read by "
                         f"{[f'{u.name} ({u.target})' for u in users] or 'nothing'}, not by one "
                         f"aten.linear; the MLP cannot be sharded over the cache chunks (use s=1)")
    return users[0]


def _narrow(gm: fx.GraphModule, node, dim: int, lo: int, hi: int, memo: dict) -> None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        t = getattr(gm, str(node.target))
        key = (id(t), dim, lo, hi)
        if key not in memo:      # (t, its slice): t kept alive so that its id stays its own
            memo[key] = (t, t.narrow(dim, lo, hi - lo).clone())   # only the slice is held
        setattr(gm, str(node.target), memo[key][1])


def mlp_attrs(mlps, shards: dict) -> list[tuple[str, tuple[str, ...], str]]:
    """(label, up / gate weight attributes, down weight attribute) of each MlpSite in a rank
    module whose `shards` (HelixProgram.rank_shards) map attributes to stored names."""
    by_source = {src[0]: attr for attr, src in shards.items()}
    out = []
    for mlp in mlps:
        names = (*mlp.up_weights, mlp.down_weight)
        missing = [w for w in names if w not in by_source]
        if missing:
            raise HelixError(f"mesh_mlp: MLP {mlp.index}'s weights {missing} are not attributes "
                             f"of the rank module; the MLP cannot be sharded over the cache chunks "
                             f"(use s=1)")
        out.append((f"MLP {mlp.index} (F={mlp.ffn})", tuple(by_source[w] for w in mlp.up_weights),
                    by_source[mlp.down_weight]))
    return out


def mlp_over_mesh(gm: fx.GraphModule, mlps, k: int, s: int, m: int, n: int,
                  memo: dict | None = None) -> fx.GraphModule:
    """Rank (i, j, k)'s `gm` (changed in place and returned) with each MLP of `mlps` (from
    `mlp_attrs`) sharded over all s m n ranks. `memo` (a dict shared by calls): modules that
    shared a weight share its slice too (compile_decoder's prefill and step)."""
    graph = gm.graph
    memo = {} if memo is None else memo
    for label, up_attrs, down_attr in mlps:
        ups = [_linear_of(gm, w, f"{label} up") for w in up_attrs]
        down = _linear_of(gm, down_attr, f"{label} down")
        f_local = int(getattr(gm, down_attr).shape[1])
        if f_local < s:
            raise HelixError(f"mesh_mlp: {label} has {f_local} columns on rank (i, j) "
                             f"(over m={m} x n={n}), fewer than the s={s} cache chunks "
                             f"it would be cut into; use a smaller s or a wider MLP")
        users = list(down.users)
        reduced = len(users) == 1 and users[0].target is helix.all_reduce.default \
            and users[0].args[2] == "sum"
        if reduced and users[0].args[1] not in chunk_axes(m, n):
            raise HelixError(f"mesh_mlp: {label}'s down projection {down.name} is "
                             f"all-reduced over {users[0].args[1]!r}, not all m={m} x n={n} ranks "
                             f"of its chunk; it is not sharded over the chunk, so it cannot be "
                             f"sharded over the mesh (use s=1)")
        if not reduced and m * n > 1:
            raise HelixError(f"mesh_mlp: {label}'s down projection {down.name} has no "
                             f"all-reduce (users {[u.name for u in users]}): the MLP runs "
                             f"replicated on the m={m} x n={n} ranks; use s=1")
        lo, hi = chunk_bounds(f_local, s)[k]
        for up in ups:
            _narrow(gm, up.args[1], 0, lo, hi, memo)
            if len(up.args) > 2:
                _narrow(gm, up.args[2], 0, lo, hi, memo)
        _narrow(gm, down.args[1], 1, lo, hi, memo)
        bias = down.args[2] if len(down.args) > 2 else None
        if bias is not None:
            down.args = (down.args[0], down.args[1], None)
        if reduced:
            total = users[0]
            total.args = (down, "mesh", "sum")
        else:
            with graph.inserting_after(down):
                total = graph.call_function(helix.all_reduce.default, (down, "mesh", "sum"))
            down.replace_all_uses_with(total, delete_user_cb=lambda u: u is not total)
        if bias is not None:
            with graph.inserting_after(total):
                biased = graph.call_function(aten.add.Tensor, (total, bias))
            total.replace_all_uses_with(biased, delete_user_cb=lambda u: u is not biased)
    graph.lint()
    gm.recompile()
    return gm
