"""Communication-compute overlap: a rank graph's batch cut into k chunks, interleaved so that
chunk i's all-reduce runs while chunk i + 1 computes.

The rank graph is copied k times; copy c reads rows [c B/k, (c + 1) B/k) of every input whose
dim 0 is the batch (`batch_inputs`) and shares everything else (weights, rotary tables, masks
without a batch dim, and any node that reads none of the batch). Each batch-row all-reduce
becomes `helix::all_reduce_start` (the reduction is issued, its result is a handle tensor)
and `helix::wait` (before the first use), and the copies are ordered by stage, then chunk:

    stage s of chunk 0, start_s(0), stage s of chunk 1, start_s(1), ..., wait_s(0),
    stage s + 1 of chunk 0, start_{s+1}(0), wait_s(1), stage s + 1 of chunk 1, ...

where a node's stage is the number of all-reduces on its longest path from the inputs. So
all-reduce s of chunk c is in flight while stage s of chunks c + 1 .. k - 1 computes (and on
NCCL it runs on the communicator's stream). The outputs whose dim 0 is the batch are the
chunks' outputs concatenated along dim 0.

This is exact only when no op mixes batch rows: every node that reads a batch tensor must
give a tensor whose dim 0 is still the batch, and must not reduce, scan, sort or gather along
dim 0 (`MIXES_ROWS`). Both are checked on the example inputs (a fake-tensor run) and a graph
that breaks them is refused with an OverlapError naming the op; so is a batch that k does not
divide, at compile time for the example and at run time (`chunk_rows`) for any other.

Invariant: with k = 1 the graph is not modified; with k > 1 the graph computes what it
computed (each chunk is the graph on its rows; the outputs are the rows joined again).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from helix_compiler.errors import OverlapError
from helix_compiler.runtime.serialize import register_function

A = torch.ops.aten
HELIX = torch.ops.helix


def chunk_rows(x: torch.Tensor, k: int) -> int:
    """Rows per chunk of a batch of x.shape[0] rows cut into k chunks (run-time check)."""
    rows = x.shape[0]
    if rows % k:
        raise OverlapError(f"overlap: a batch of {rows} rows does not cut into k={k} equal "
                           f"chunks; feed a batch that is a multiple of {k}, or compile with "
                           f"overlap=1")
    return rows // k


register_function("helix.chunk_rows", chunk_rows)


def _dim_arg(i: int, default: int | None = None) -> Callable:
    def rule(node: fx.Node, ndim: int, batched: set) -> bool:
        d = node.args[i] if len(node.args) > i else node.kwargs.get("dim", default)
        ds = d if isinstance(d, (list, tuple)) else [d]
        return any(isinstance(x, int) and x % max(ndim, 1) == 0 for x in ds)
    return rule


def _index_dim0(node: fx.Node, ndim: int, batched: set) -> bool:
    # x[rows, ...] with rows built from the batch's own sizes (HF masks index with
    # arange(B)) stays in the chunk; rows from a constant or shared tensor pick across it
    idx = node.args[1] if len(node.args) > 1 else []
    return bool(idx) and idx[0] is not None and idx[0] not in batched


# Ops that keep dim 0's size but combine its rows, when they act along dim 0: op -> rule
# (node, ndim of the input, the chunked nodes) -> True when it does. Shape-changing mixes (sum over dim 0, cat
# along it, a (B*H, ...) reshape) are caught by the dim-0 check instead.
MIXES_ROWS: dict = {
    A._softmax.default: _dim_arg(1), A.softmax.int: _dim_arg(1),
    A._log_softmax.default: _dim_arg(1), A.log_softmax.int: _dim_arg(1),
    A.cumsum.default: _dim_arg(1), A.cumprod.default: _dim_arg(1),
    A.flip.default: _dim_arg(1), A.roll.default: _dim_arg(2),
    A.sort.default: _dim_arg(1, -1), A.argsort.default: _dim_arg(1, -1),
    A.index_select.default: _dim_arg(1), A.gather.default: _dim_arg(1),
    A.scatter.src: _dim_arg(1), A.scatter_add.default: _dim_arg(1),
    A.index.Tensor: _index_dim0,
}

# Size arguments that a static capture writes as numbers: (op, argument index) whose first
# entry is the batch; a chunk copy gets the chunk's rows there.
SIZE_ARGS = {A.view.default: 1, A.reshape.default: 1, A._unsafe_view.default: 1,
             A.expand.default: 1, A.new_zeros.default: 1, A.new_ones.default: 1,
             A.new_empty.default: 1, A.new_full.default: 1}


def _fake_values(gm: fx.GraphModule, leaves: Sequence) -> dict:
    """node -> its value on fake copies of the example inputs (placeholders in order)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    values: dict = {}

    class Record(fx.Interpreter):
        def run_node(self, n):
            try:
                out = super().run_node(n)
            except Exception as e:
                raise OverlapError(f"overlap: node {n.name} ({n.target}) fails on the example "
                                   f"inputs: {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                                   f"compile with overlap=1") from e
            values[n] = out
            return out

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fakes = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in leaves]
        Record(gm).run(*fakes)
    return values


def _batch_nodes(gm: fx.GraphModule, batch_inputs: set[int], values: dict, rows: int) -> set:
    """The nodes each chunk computes for itself: those reading a batch input, directly or not.
    A node reading a batch *tensor* must give a tensor whose dim 0 is still the batch and must
    not mix rows (else OverlapError)."""
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    batched = {holders[i] for i in batch_inputs}
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method", "call_module"):
            continue
        ins = [a for a in n.all_input_nodes if a in batched]
        if not ins:
            continue
        batched.add(n)
        reads_rows = [a for a in ins if isinstance(values.get(a), torch.Tensor)
                      and values[a].dim() >= 1 and values[a].shape[0] == rows]
        if not reads_rows:
            continue   # reads only sizes of batch tensors: each chunk recomputes it from its own
        out = values.get(n)
        tensors = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if n.target is operator.getitem or not tensors:
            continue
        if any(t.dim() == 0 or t.shape[0] != rows for t in tensors):
            shapes = [tuple(t.shape) for t in tensors]
            raise OverlapError(f"overlap: op {n.name} ({n.target}) mixes batch rows: it reads "
                               f"{reads_rows[0].name} (dim 0 = the batch, {rows} rows) and gives "
                               f"{shapes[0] if len(shapes) == 1 else shapes}, whose dim 0 is not "
                               f"the batch; chunks of rows cannot run it apart, compile with "
                               f"overlap=1")
        rule = MIXES_ROWS.get(n.target)
        if rule is not None and rule(n, values[reads_rows[0]].dim(), batched):
            raise OverlapError(f"overlap: op {n.name} ({n.target}) mixes batch rows: it acts "
                               f"along dim 0 (the batch) of {reads_rows[0].name}; chunks of "
                               f"rows cannot run it apart, compile with overlap=1")
    return batched


def _is_async(n: fx.Node, batched: set) -> bool:
    return n in batched and n.op == "call_function" and n.target is HELIX.all_reduce.default


def _stages(gm: fx.GraphModule, batched: set) -> dict:
    """node -> the stage its value is ready in: all-reduces on its longest path from the inputs."""
    ready: dict = {}
    for n in gm.graph.nodes:
        s = max((ready[a] for a in n.all_input_nodes), default=0)
        ready[n] = s + 1 if _is_async(n, batched) else s
    return ready


def overlap(gm: fx.GraphModule, k: int, batch_inputs: set[int], leaves: Sequence) -> fx.GraphModule:
    """gm with its batch cut into k interleaved chunks (module docstring). batch_inputs: the
    positions of the placeholders whose dim 0 is the batch; leaves: example inputs, one per
    placeholder (for the row checks)."""
    if k == 1:
        return gm
    if not batch_inputs:
        raise OverlapError(f"overlap: k={k} cuts the batch, but no input of the rank graph has "
                           f"the batch as dim 0; compile with overlap=1")
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    rows = leaves[min(batch_inputs)].shape[0]
    if rows % k:
        raise OverlapError(f"overlap: the example batch of {rows} rows does not cut into k={k} "
                           f"equal chunks; use an overlap k that divides {rows}")
    values = _fake_values(gm, leaves)
    batched = _batch_nodes(gm, batch_inputs, values, rows)
    ready = _stages(gm, batched)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}

    g = fx.Graph()
    shared: dict = {}
    env = [dict() for _ in range(k)]
    for n in holders:
        shared[n] = g.node_copy(n)
    for i in sorted(batch_inputs):      # rows per chunk (checked at run time), then the chunks
        size = g.call_function(chunk_rows, (shared[holders[i]], k))
        parts = g.call_function(A.split.Tensor, (shared[holders[i]], size, 0))
        for c in range(k):
            env[c][holders[i]] = g.call_function(operator.getitem, (parts, c))

    # (stage, chunk, graph order): shared nodes first in their stage, a wait opens the next
    # stage of its chunk; edges go forward in this order (stages never fall along an edge)
    work = []
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        start = ready[n] - 1 if _is_async(n, batched) else ready[n]
        if n in batched:
            for c in range(k):
                work.append(((start, c, order[n], 0), n, c))
                if _is_async(n, batched):
                    work.append(((ready[n], c, order[n], 1), n, c))
        else:
            work.append(((start, -1, order[n], 0), n, None))
    for _, n, c in sorted(work, key=lambda w: w[0]):
        if c is None:
            shared[n] = g.node_copy(n, lambda a: shared[a])
            continue
        lookup = env[c]
        if n in lookup:             # the wait of an issued all-reduce
            lookup[n] = g.call_function(HELIX.wait.default, (lookup[n],))
            continue
        new = g.node_copy(n, lambda a: lookup[a] if a in lookup else shared[a])
        if _is_async(n, batched):
            new.target = HELIX.all_reduce_start.default
        _static_sizes(new, rows, k)
        lookup[n] = new

    out_node = next(n for n in gm.graph.nodes if n.op == "output")

    def join(a):
        if not isinstance(a, fx.Node):
            return a
        if a not in batched:
            return shared[a]
        if not isinstance(values.get(a), torch.Tensor):
            raise OverlapError(f"overlap: output {a.name} depends on the batch but is not a "
                               f"tensor ({type(values.get(a)).__name__}); chunks cannot be joined, "
                               f"compile with overlap=1")
        return g.call_function(A.cat.default, ([env[c][a] for c in range(k)], 0))

    g.output(pytree.tree_map(join, out_node.args[0]))
    g._codegen = gm.graph._codegen
    gm.graph = g
    gm.recompile()
    _fake_values(gm, leaves)       # the chunked graph runs on the example (sizes agree)
    return gm


def _static_sizes(node: fx.Node, rows: int, k: int) -> None:
    """A static capture writes the batch as a number in size arguments: the chunk's rows."""
    i = SIZE_ARGS.get(node.target)
    if i is None or len(node.args) <= i:
        return
    size = node.args[i]
    if isinstance(size, (list, tuple)) and size and isinstance(size[0], int) and size[0] == rows:
        args = list(node.args)
        args[i] = [rows // k, *size[1:]]
        node.args = tuple(args)
