"""Data parallelism: dp replicas of one m x n program, each fed its shard of the batch.

Rank r = ((d * n) + i) * m + j: replica d in [0, dp) holds ranks [d m n, (d + 1) m n), and
inside it the head group i and dim slice j of mesh.py, so the chattiest group (the m-group)
and then the replica's n-groups stay inside a node. A forward pass sends nothing between
replicas: every collective of a rank graph ("dim", "head", "all") means its own replica.

Replica d runs the m x n program's rank modules on the contiguous batch rows
[d B/dp, (d + 1) B/dp): the modules are the very objects of local ranks 0..m n - 1 (weights
are not copied per replica). A HelixProgram whose plan has dp > 1 does this itself
(program.py: `rank_module(r)` is local rank r % (m n)'s module, `simulate` shards the batch
with `shard_inputs`, `gather` is `gather_replicas`); this module holds the batch logic.
`gather_replicas` concatenates the replicas' outputs back into the whole batch, so a caller
compares with the unsharded model.

Invariant: replica d's ranks each return what the unsharded model returns for the rows of
shard d.
"""

from __future__ import annotations

import torch
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree

from .errors import HelixError


def _batch_leaves(gm, args: tuple, kwargs: dict) -> tuple[set, int, object]:
    """ids of the input tensors whose dim 0 is the batch, the batch size B and the first
    input's captured dim 0. An input's dim 0 is the batch when it is B and was captured as B
    was: a symbol (export may give ids and attention_mask different symbols for one batch),
    or, in a static capture, the same number; a dim 0 fixed at capture while B is symbolic
    is no batch dim."""

    info = getattr(gm.graph._codegen, "pytree_info", None)
    leaves = (fx_pytree.tree_flatten_spec((args, kwargs), info.in_spec) if info is not None
              else pytree.tree_leaves((args, kwargs)))
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    vals = [h.meta.get("val") for h in holders] if len(holders) == len(leaves) else [None] * len(leaves)
    tensors = [(x, v) for x, v in zip(leaves, vals) if isinstance(x, torch.Tensor) and x.dim() >= 1]
    if not tensors:
        raise HelixError("data parallelism splits the batch dim of the inputs, but no input is "
                         "a tensor with a batch dim; pass the batch as a tensor argument")
    first, first_val = tensors[0]
    want = first_val.shape[0] if isinstance(first_val, torch.Tensor) else first.shape[0]
    ids = set()
    for x, v in tensors:
        dim0 = v.shape[0] if isinstance(v, torch.Tensor) else x.shape[0]
        same_kind = isinstance(dim0, int) == isinstance(want, int)
        if same_kind and x.shape[0] == first.shape[0]:
            ids.add(id(x))
    return ids, first.shape[0], want


def batch_positions(gm, args: tuple, kwargs: dict) -> tuple[list, set[int]]:
    """The inputs as the graph's placeholders take them (flattened), and the positions of
    those whose dim 0 is the batch (the overlap pass cuts those into chunks)."""

    info = getattr(gm.graph._codegen, "pytree_info", None)
    leaves = (fx_pytree.tree_flatten_spec((args, kwargs), info.in_spec) if info is not None
              else pytree.tree_leaves((args, kwargs)))
    ids = _batch_leaves(gm, args, kwargs)[0]
    return list(leaves), {i for i, x in enumerate(leaves) if id(x) in ids}


def shard_inputs(gm, args: tuple, kwargs: dict, dp: int) -> list[tuple[tuple, dict]]:
    """dp (args, kwargs): batch rows [d B/dp, (d + 1) B/dp) of every batch input."""
    ids, batch, captured = _batch_leaves(gm, args, kwargs)
    if batch % dp:
        raise HelixError(f"batch of {batch} sequences does not split into dp={dp} equal shards; "
                         f"feed a batch that is a multiple of {dp}")
    if dp > 1 and isinstance(captured, int):
        raise HelixError(f"dp={dp} feeds each replica {batch // dp} of the {batch} sequences, but "
                         f"the program was captured with a static batch of {captured}; compile "
                         f"with dynamic=True (the default)")
    size = batch // dp

    def part(d):
        return pytree.tree_map(lambda x: x.narrow(0, d * size, size)
                               if isinstance(x, torch.Tensor) and id(x) in ids else x,
                               (args, kwargs))

    return [part(d) for d in range(dp)]


def gather_replicas(outputs: list, dp: int, replica_devices: int):
    """Replica d's output (its first rank's) for d in [0, dp), concatenated along dim 0 of
    every tensor leaf: the output of the whole batch. Other leaves must agree."""
    if len(outputs) != dp * replica_devices:
        raise HelixError(f"gather_replicas needs {dp} x {replica_devices} rank outputs, got "
                         f"{len(outputs)}")
    firsts = [outputs[d * replica_devices] for d in range(dp)]
    flat = [pytree.tree_flatten(o) for o in firsts]
    spec = flat[0][1]
    if any(s != spec for _, s in flat):
        raise HelixError("the replicas returned outputs of different structures; they run one "
                         "program, so this is a Helix bug")
    merged = []
    for k, leaves in enumerate(zip(*(f[0] for f in flat))):
        if isinstance(leaves[0], torch.Tensor):
            if leaves[0].dim() == 0:
                raise HelixError(f"output leaf {k} is a scalar tensor: it has no batch dim to "
                                 f"gather the {dp} replicas along")
            merged.append(torch.cat(leaves, dim=0))
        elif all(x == leaves[0] for x in leaves):
            merged.append(leaves[0])
        else:
            raise HelixError(f"output leaf {k} differs between replicas ({leaves!r}) and is "
                             f"not a tensor to concatenate")
    return pytree.tree_unflatten(merged, spec)
