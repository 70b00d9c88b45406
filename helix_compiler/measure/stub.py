"""Compute-only collectives for timing one rank: the right shapes, no transfer (the
benchmarks add the cost model's communication time instead)."""

from __future__ import annotations

import contextlib

import torch

from helix_compiler.runtime import collectives
from helix_compiler.runtime.mesh import Mesh


class StubCollectives:
    """A collectives backend (helix_compiler.runtime.collectives.bind) that moves nothing.

    Every local copy that DistributedBackend makes on the GPU is made here too, so that a
    timed rank pays what the real path pays: all_reduce copies x (funcol's all_reduce clones
    its input before NCCL reduces in place) unless the real path takes the split, copy-free
    route (collectives.no_copy_all_reduce: NCCL writes fresh buffers, nothing local);
    reduce_scatter hands back rank 0's chunk (the benches time rank 0); all_gather the
    concatenation, or in place where NCCL would gather in place. `mesh` (rank 0's m x n
    mesh) gives each collective's group size, which the split decision reads; without one
    every group is taken to be 16 ranks (the paper's)."""

    def __init__(self, mesh: Mesh | None = None):
        self._gathered: dict = {}   # (shape, dtype, device) -> the in-place gather's buffer
        self._sizes: dict = {}      # axes -> group size
        self.mesh = mesh

    def _group_size(self, axes: str) -> int:
        # looked up once per axes, as the real backend holds its groups (a timed rank pays the
        # real path's host work, not the mesh's arithmetic on every call)
        if axes not in self._sizes:
            self._sizes[axes] = 16 if self.mesh is None else len(self.mesh.group(0, axes))
        return self._sizes[axes]

    def all_reduce(self, x, axes, op):
        if collectives.no_copy_all_reduce(x, op, self._group_size(axes)):
            return torch.empty_like(x)
        return x.clone(memory_format=torch.contiguous_format)

    def all_reduce_start(self, x, axes, op):
        # the real path's asynchronous all-reduce (_c10d_functional.all_reduce) copies x into
        # its output before NCCL reduces it in place
        return x.clone(memory_format=torch.contiguous_format)

    def wait(self, x):
        return x

    def reduce_scatter(self, x, axes, dim, sizes):
        dim = dim % x.dim()
        if len(set(sizes)) > 1:      # the real path: a whole all-reduce, then its chunk
            return self.all_reduce(x, axes, "sum").narrow(dim, 0, sizes[0])
        x = x.contiguous()
        if dim != 0 and any(size != 1 for size in x.shape[:dim]):
            # funcol's reduce-scatter along dim > 0 chunks x and concatenates the chunks
            # along dim 0 before NCCL runs: a full copy of x on the compute side (with only
            # size-1 dims before dim, DistributedBackend scatters a view along dim 0: no copy)
            torch.cat(torch.chunk(x, len(sizes), dim=dim))
        shape = list(x.shape)
        shape[dim % x.dim()] = sizes[0]
        return x.new_empty(shape)

    def all_gather(self, x, axes, dim, sizes):
        dim = dim % x.dim()
        if len(set(sizes)) == 1 and all(x.shape[i] == 1 for i in range(dim)):
            # DistributedBackend gathers such a tensor in place (NCCL writes the chunks one
            # after another): no copy on the GPU's compute side. A buffer of finite random
            # values, made once per shape, stands for what NCCL would have written.
            shape = list(x.shape)
            shape[dim] = sum(sizes)
            key = (tuple(shape), x.dtype, x.device)
            if key not in self._gathered:
                self._gathered[key] = torch.randn(shape, dtype=x.dtype, device=x.device)
            return self._gathered[key]
        parts = []
        for s in sizes:
            if x.shape[dim] >= s:
                parts.append(x.narrow(dim, 0, s))
            else:
                pad = list(x.shape)
                pad[dim] = s - x.shape[dim]
                parts.append(torch.cat([x, x.new_zeros(pad)], dim=dim))
        return torch.cat(parts, dim=dim)


@contextlib.contextmanager
def stubbed(stub: StubCollectives | None = None):
    """Rank graphs run with `stub` (a fresh StubCollectives by default) bound to this
    thread inside the block. A timed call binds one stub for all its calls, so that the
    in-place gather buffers are made once, as NCCL's output would be."""
    collectives.bind(stub or StubCollectives())
    try:
        yield
    finally:
        collectives.bind(None)
