"""Collectives as visible graph ops, carried out by whichever backend runs the rank.

Rank graphs call `torch.ops.helix.all_reduce(x, axes, op)` and
`torch.ops.helix.all_gather(x, axes, dim, sizes)` where `axes` names the mesh
group ("dim" = m-group, "head" = n-group, "all").  They are torch library ops so
that they print by name in a rank module's code, survive save/load as code and
trace through torch.export.  What they do depends on the backend bound to the
running thread:

* `SimulatedBackend`: all N rank modules run in one process, one thread each;
  a collective waits for its group and computes the result from the N inputs
  (summing in group order, so every rank gets bit-identical results).
* `DistributedBackend`: torch.distributed functional collectives over the
  sub-groups of a DeviceMesh ("data", "head", "dim"[, "seq"]), NCCL or gloo; with dp
  data replicas (data.py) "head", "dim" and "all" mean the groups inside the
  caller's replica (rank = ((d * n) + i) * m + j); with s > 1 cache chunks "seq" is
  the chunk group and the others span one chunk (runtime/mesh.py).
"""

from __future__ import annotations

import threading

import torch

from ..errors import HelixError
from .mesh import Mesh

_local = threading.local()


def bind(backend) -> None:
    """Bind a backend to the calling thread (None unbinds)."""
    _local.backend = backend


def _backend():
    b = getattr(_local, "backend", None)
    if b is None:
        raise HelixError(
            "a Helix rank module ran outside a Helix runtime, so its collectives have no group; "
            "run it through HelixProgram.simulate(), `helix run`, or in each torchrun process call "
            "collectives.bind(collectives.DistributedBackend(Mesh(n=plan.n, m=plan.m), device_type)) first")
    return b


# The ops are registered through torch.library.Library (a schema, a CompositeExplicitAutograd
# kernel, a fake kernel), not torch.library.custom_op: the same ops by name and schema, but a
# call of helix.all_reduce costs 8.5 us of host time instead of 20.7 (custom_op's Python
# wrapper; this project's CPU, benchmarks/cpu_op_dispatch.py, results/cpu_op_dispatch.json and
# cpu_op_dispatch_library.json), and a decode step makes two collective calls a layer. Every
# kernel returns a new tensor (no alias of x).
_lib = torch.library.Library("helix", "FRAGMENT")


def _op(schema: str, kernel, fake):
    """Define helix::<schema>, its kernel and its fake kernel; the op's packet. The schema
    promises a fresh output: a backend's result that shares x's storage (a group of one, say)
    is copied (custom_op checked the same)."""
    name = schema.split("(", 1)[0]

    def fresh(x, *args):
        out = kernel(x, *args)
        if out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            out = out.clone()
        return out

    _lib.define(schema)
    _lib.impl(name, fresh, "CompositeExplicitAutograd")
    torch.library.register_fake(f"helix::{name}", fake, lib=_lib)
    return getattr(torch.ops.helix, name)


def _like(x, *_):
    return torch.empty_like(x)


def _gathered(x, axes, dim, sizes):
    shape = list(x.shape)
    shape[dim] = sum(sizes)
    return x.new_empty(shape)


def _scattered(x, axes, dim, sizes):
    shape = list(x.shape)
    shape[dim] = max(sizes)
    return x.new_empty(shape)


# the sum (or max) over the group `axes`
all_reduce = _op("all_reduce(Tensor x, str axes, str op) -> Tensor",
                 lambda x, axes, op: _backend().all_reduce(x, axes, op), _like)
# the group's tensors concatenated along `dim`, `sizes` the ranks' chunks in group order
all_gather = _op("all_gather(Tensor x, str axes, int dim, int[] sizes) -> Tensor",
                 lambda x, axes, dim, sizes: _backend().all_gather(x, axes, dim, sizes),
                 _gathered)
# the sum over the group, of which this rank keeps its chunk along `dim`: `sizes` are the
# chunks of the group's ranks in group order
reduce_scatter = _op("reduce_scatter(Tensor x, str axes, int dim, int[] sizes) -> Tensor",
                     lambda x, axes, dim, sizes: _backend().reduce_scatter(x, axes, dim, sizes),
                     _scattered)


# A sum all-reduce of at least this many bytes runs as reduce-scatter + all-gather
# (`no_copy_all_reduce`): one more launch latency (~20 us on NVLink), one full copy of x less
# (torch.distributed's all-reduce is in place, so funcol clones x first: 0.1 ms per 160 MB
# on an H100). Below it the clone is cheaper than the second latency.
NO_COPY_ALL_REDUCE_MIN_BYTES = 1 << 20


def no_copy_all_reduce(x: torch.Tensor, op: str, group_size: int) -> bool:
    """Whether DistributedBackend reduces x without copying it (the split path): a sum, at
    least NO_COPY_ALL_REDUCE_MIN_BYTES, and x's elements divide evenly over the group."""
    return (op == "sum" and group_size > 1 and x.numel() % group_size == 0
            and x.numel() * x.element_size() >= NO_COPY_ALL_REDUCE_MIN_BYTES)


# The asynchronous all-reduce of the overlap pass (passes/overlap.py): `all_reduce_start`
# issues the reduction and returns its result tensor at once (the handle: on NCCL it is
# written on the communicator's stream), `wait` blocks until that tensor holds the sum and
# returns it, so everything between the two in the graph runs while the reduction does.
# `wait` aliases its input (schema Tensor(a) -> Tensor(a), as _c10d_functional.wait_tensor).
all_reduce_start = _op("all_reduce_start(Tensor x, str axes, str op) -> Tensor",
                       lambda x, axes, op: _backend().all_reduce_start(x, axes, op), _like)


_lib.define("wait(Tensor(a) x) -> Tensor(a)")


def _wait(x: torch.Tensor) -> torch.Tensor:
    b = getattr(_local, "backend", None)
    return x if b is None else b.wait(x)


_lib.impl("wait", _wait, "CompositeExplicitAutograd")


class _Aborted(HelixError):
    pass


class SimulatedBackend:
    """All ranks in one process: one thread per rank, collectives meet at a rendezvous."""

    def __init__(self, mesh: Mesh, timeout_s: float = 300.0):
        self.mesh = mesh
        self.timeout_s = timeout_s
        self._cv = threading.Condition()
        self._slots: dict = {}
        self._seq: dict = {}
        self.failed: BaseException | None = None

    def for_rank(self, rank: int) -> "_RankView":
        return _RankView(self, rank)

    def abort(self, err: BaseException) -> None:
        with self._cv:
            if self.failed is None:
                self.failed = err
            self._cv.notify_all()

    def _exchange(self, rank: int, axes: str, kind: str, x: torch.Tensor, combine):
        group = self.mesh.group(rank, axes)
        with self._cv:
            seq = self._seq.get((rank, axes), 0)
            self._seq[(rank, axes)] = seq + 1
            key = (group, kind, seq)
            slot = self._slots.setdefault(key, {"inputs": {}, "result": None, "taken": 0})
            slot["inputs"][rank] = x
            if len(slot["inputs"]) == len(group):
                slot["result"] = combine([slot["inputs"][r] for r in group])
                self._cv.notify_all()
            ok = self._cv.wait_for(lambda: slot["result"] is not None or self.failed is not None,
                                   timeout=self.timeout_s)
            if self.failed is not None and slot["result"] is None:
                raise _Aborted(f"rank {rank}: another rank failed before collective {kind} over {axes}")
            if not ok:
                raise HelixError(f"rank {rank}: collective {kind} over {axes} timed out after "
                                 f"{self.timeout_s:.0f} s; a rank of group {list(group)} never arrived")
            result = slot["result"]
            slot["taken"] += 1
            if slot["taken"] == len(group):
                del self._slots[key]
        return result


class _RankView:
    def __init__(self, sim: SimulatedBackend, rank: int):
        self.sim, self.rank = sim, rank

    def all_reduce(self, x, axes, op):
        def combine(xs):
            out = xs[0].clone()
            for y in xs[1:]:
                if op == "sum":
                    out = out + y
                elif op == "max":
                    out = torch.maximum(out, y)
                else:
                    raise HelixError(f"unknown reduce op {op!r}; expected 'sum' or 'max'")
            return out
        return self.sim._exchange(self.rank, axes, "all_reduce", x, combine).clone()

    def all_reduce_start(self, x, axes, op):
        # one process: the exchange is the collective, so it completes here and wait is free
        return self.all_reduce(x, axes, op)

    def wait(self, x):
        return x

    def all_gather(self, x, axes, dim, sizes):
        return self.sim._exchange(self.rank, axes, f"all_gather{dim}", x,
                                  lambda xs: torch.cat(xs, dim=dim)).clone()

    def reduce_scatter(self, x, axes, dim, sizes):
        pos = self.sim.mesh.group(self.rank, axes).index(self.rank)
        return self.all_reduce(x, axes, "sum").narrow(dim, sum(sizes[:pos]), sizes[pos]).clone()


def _funcol_reduce_scatter(funcol):
    """reduce_scatter_single (torch >= 2.12, where reduce_scatter_tensor is deprecated) or
    reduce_scatter_tensor (2.11): the same arguments."""
    return getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor


def _funcol_all_gather(funcol):
    """all_gather_single or all_gather_tensor, as `_funcol_reduce_scatter`."""
    return getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


class DistributedBackend:
    """torch.distributed functional collectives on the sub-groups of a ("data", "head", "dim")
    DeviceMesh: `mesh` is one replica's (n, m), `dp` the replicas (world = dp * n * m). With
    pp > 1 pipeline stages the mesh is ("data", "pipe", "head", "dim") (world = dp pp n m,
    rank ((d pp + p) n + i) m + j), "all" means the rank's stage of its replica and
    `pipe_group` is its "pipe" group (stages.run_pipeline_rank). A decode mesh with s > 1
    cache chunks (runtime/mesh.py) adds a last "seq" dim: rank (((d pp + p) n + i) m + j) s + k,
    "seq" is the s contiguous ranks of (i, j), "head", "dim" and "all" span the ranks of one
    chunk k and "mesh" every rank of the replica's stage, exactly as Mesh.group defines them."""

    def __init__(self, mesh: Mesh, device_type: str, dp: int = 1, pp: int = 1):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        world = dist.get_world_size()
        if world != dp * pp * mesh.size and mesh.s > 1:
            stages = f" x pp={pp}" if pp > 1 else ""
            raise HelixError(f"DistributedBackend: dp={dp}{stages} x n={mesh.n} x m={mesh.m} x "
                             f"s={mesh.s} = {dp * pp * mesh.size} ranks, but the process group has "
                             f"{world}; launch dp * pp * s * m * n processes (torchrun "
                             f"--nproc-per-node {dp * pp * mesh.size}, helix generate --devices "
                             f"{dp * pp * mesh.size})")
        if world != dp * pp * mesh.size and pp == 1:
            raise HelixError(f"DistributedBackend: dp={dp} x n={mesh.n} x m={mesh.m} = "
                             f"{dp * mesh.size} ranks, but the process group has {world}; "
                             f"launch dp * m * n processes (helix run --devices {dp * mesh.size})")
        if world != dp * pp * mesh.size:
            raise HelixError(f"DistributedBackend: dp={dp} x pp={pp} x n={mesh.n} x m={mesh.m} = "
                             f"{dp * pp * mesh.size} ranks, but the process group has {world}; "
                             f"launch dp * pp * m * n processes")
        self.mesh, self.dp, self.pp = mesh, dp, pp
        shape, names = [dp], ["data"]
        if pp > 1:
            shape, names = shape + [pp], names + ["pipe"]
        shape, names = shape + [mesh.n, mesh.m], names + ["head", "dim"]
        if mesh.s > 1:
            shape, names = shape + [mesh.s], names + ["seq"]
        self.device_mesh = init_device_mesh(device_type, tuple(shape), mesh_dim_names=tuple(names))
        self.pipe_group = self.device_mesh.get_group("pipe") if pp > 1 else None
        if dp * pp * mesh.s == 1:
            everyone = dist.group.WORLD
        else:   # every rank creates every (replica, stage, chunk)'s group, in the same order
            everyone, _ = dist.new_subgroups_by_enumeration(
                [[b * mesh.size + r for r in mesh.group(k, "all")]
                 for b in range(dp * pp) for k in range(mesh.s)])
        self.groups = {"head": self.device_mesh.get_group("head"),
                       "dim": self.device_mesh.get_group("dim"),
                       "all": everyone}
        if mesh.s == 1:
            self.groups["mesh"] = everyone
        else:   # "seq" of (i, j); "mesh": every rank of the replica's stage (passes/mesh_mlp.py)
            self.groups["seq"] = self.device_mesh.get_group("seq")
            self.groups["mesh"] = dist.group.WORLD if dp * pp == 1 else dist.new_subgroups_by_enumeration(
                [list(range(b * mesh.size, (b + 1) * mesh.size)) for b in range(dp * pp)])[0]

    def all_reduce(self, x, axes, op):
        import torch.distributed._functional_collectives as funcol

        group = self.groups[axes]
        if no_copy_all_reduce(x, op, group.size()):
            # a reduce-scatter then an all-gather, each into a fresh buffer: the ring
            # all-reduce's own two phases, without the local copy of x that funcol's in-place
            # all_reduce starts with (a full pass over x at HBM speed)
            flat = x.contiguous().view(-1)
            part = _funcol_reduce_scatter(funcol)(flat, "sum", 0, group)
            part = funcol.wait_tensor(part) if hasattr(funcol, "wait_tensor") else part
            out = _funcol_all_gather(funcol)(part, 0, group)
            out = funcol.wait_tensor(out) if hasattr(funcol, "wait_tensor") else out
            return out.view(x.shape)
        out = funcol.all_reduce(x.contiguous(), {"sum": "sum", "max": "max"}[op], group)
        return funcol.wait_tensor(out) if hasattr(funcol, "wait_tensor") else out

    def all_reduce_start(self, x, axes, op):
        # the native functional op returns at once; its work is registered under the output
        # tensor, which `wait` (wait_tensor) waits on at the first use
        return torch.ops._c10d_functional.all_reduce(x.contiguous(), {"sum": "sum", "max": "max"}[op],
                                                     self.groups[axes].group_name)

    def wait(self, x):
        return torch.ops._c10d_functional.wait_tensor(x)

    def reduce_scatter(self, x, axes, dim, sizes):
        import torch.distributed._functional_collectives as funcol

        group = self.groups[axes]
        pos = torch.distributed.get_rank(group)
        if len(set(sizes)) == 1:
            dim = dim % x.dim()
            lead = x.shape[:dim]
            x = x.contiguous()
            if all(size == 1 for size in lead):
                # the chunks along dim are contiguous and in order (a batch of one sequence,
                # scattered along the sequence): scattered along dim 0 of a view, so funcol
                # does not chunk and concatenate x first (a full copy of x on the compute side)
                out = _funcol_reduce_scatter(funcol)(x.view(x.shape[dim:]), "sum", 0, group)
                out = funcol.wait_tensor(out) if hasattr(funcol, "wait_tensor") else out
                return out.view(*lead, *out.shape)
            out = _funcol_reduce_scatter(funcol)(x, "sum", dim, group)
            return funcol.wait_tensor(out) if hasattr(funcol, "wait_tensor") else out
        # uneven chunks: the whole sum, then this rank's chunk
        return self.all_reduce(x, axes, "sum").narrow(dim, sum(sizes[:pos]), sizes[pos])

    def all_gather(self, x, axes, dim, sizes):
        import torch.distributed._functional_collectives as funcol

        group = self.groups[axes]
        big = max(sizes)
        dim = dim % x.dim()
        if all(s == big for s in sizes) and all(x.shape[i] == 1 for i in range(dim)):
            # every dim before `dim` is 1: the gathered tensor is the group's chunks one after
            # another, so NCCL writes it in place (no concatenating copy)
            flat = x.contiguous().reshape(x.shape[dim:])
            out = _funcol_all_gather(funcol)(flat, gather_dim=0, group=group)
            out = funcol.wait_tensor(out) if hasattr(funcol, "wait_tensor") else out
            return out.reshape(*x.shape[:dim], big * len(sizes), *x.shape[dim + 1:])
        if x.shape[dim] != big:  # uneven shards travel padded
            pad = list(x.shape)
            pad[dim] = big - x.shape[dim]
            x = torch.cat([x, x.new_zeros(pad)], dim=dim)
        out = _funcol_all_gather(funcol)(x.contiguous(), gather_dim=dim, group=group)
        out = funcol.wait_tensor(out) if hasattr(funcol, "wait_tensor") else out
        if any(s != big for s in sizes):
            parts = torch.split(out, big, dim=dim)
            out = torch.cat([p.narrow(dim, 0, s) for p, s in zip(parts, sizes)], dim=dim)
        return out
