"""passes/mesh_mlp.py on hand-built rank graphs (no capture: fast): an MLP sharded over the m x n
ranks of a chunk becomes one sharded over all s m n ranks, exactly, and what it cannot take is
refused. The whole decode program is covered in tests/test_decode.py (sequence split)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx

from helix_compiler.errors import HelixError
from helix_compiler.program import run_ranks
from helix_compiler.runtime.mesh import Mesh
from passes.mesh_mlp import mlp_over_mesh

aten, helix = torch.ops.aten, torch.ops.helix
D, F = 8, 12


def _rank_graph(up: torch.Tensor, down: torch.Tensor, axes: str | None, bias=None) -> fx.GraphModule:
    """x -> down(relu(up(x))) [+ bias], the partial sum all-reduced over `axes` (None: none)."""
    root = torch.nn.Module()
    root.register_buffer("up_w", up)
    root.register_buffer("down_w", down)
    g = fx.Graph()
    x = g.placeholder("x")
    h = g.call_function(aten.relu.default, (g.call_function(aten.linear.default, (x, g.get_attr("up_w"))),))
    if bias is not None:
        root.register_buffer("down_b", bias)
        y = g.call_function(aten.linear.default, (h, g.get_attr("down_w"), g.get_attr("down_b")))
    else:
        y = g.call_function(aten.linear.default, (h, g.get_attr("down_w")))
    if axes is not None:
        y = g.call_function(helix.all_reduce.default, (y, axes, "sum"))
    g.output(y)
    return fx.GraphModule(root, g)


MLP = [("MLP 0", ("up_w",), "down_w")]


@pytest.mark.parametrize("s, m, n", [(2, 1, 2), (3, 2, 1), (4, 1, 1)])
def test_mlp_over_the_whole_mesh_equals_the_mlp(s, m, n):
    g = torch.Generator().manual_seed(0)
    up, down, b = torch.randn(F, D, generator=g), torch.randn(D, F, generator=g), torch.randn(D, generator=g)
    x = torch.randn(3, D, generator=g)
    want = torch.relu(x @ up.T) @ down.T + b
    mesh, cols = Mesh(n=n, m=m, s=s), F // (m * n)
    modules = []
    for r in range(mesh.size):
        i, j = mesh.coords(r)
        lo = (i * m + j) * cols
        axes = None if m * n == 1 else ("head" if m == 1 else "dim")
        # the bias on the linear: the pass moves it after the all-reduce, added once
        gm = _rank_graph(up[lo:lo + cols].clone(), down[:, lo:lo + cols].clone(), axes, bias=b)
        modules.append(mlp_over_mesh(copy.deepcopy(gm), MLP, mesh.chunk(r), s, m, n))
    outs = run_ranks(modules, mesh, (x,), {})
    for r, out in enumerate(outs):
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5, msg=f"rank {r}")
        gm = modules[r]
        reduces = [nd.args[1] for nd in gm.graph.nodes if nd.target is helix.all_reduce.default]
        assert reduces == ["mesh"], reduces
        assert gm.up_w.shape[0] * s * m * n == F and gm.down_w.shape[1] * s * m * n == F


def test_mlp_not_sharded_over_the_whole_chunk_is_refused():
    up, down = torch.randn(6, D), torch.randn(D, 6)
    with pytest.raises(HelixError, match=r"MLP 0's down projection linear_default_1 is all-reduced "
                                         r"over 'dim', not all m=2 x n=2 ranks of its chunk"):
        mlp_over_mesh(_rank_graph(up, down, "dim"), MLP, 0, 2, 2, 2)
    with pytest.raises(HelixError, match=r"has no all-reduce .* the MLP runs replicated on the "
                                         r"m=1 x n=2 ranks; use s=1"):
        mlp_over_mesh(_rank_graph(up, down, None), MLP, 0, 2, 1, 2)
    with pytest.raises(HelixError, match=r"MLP 0 has 6 columns on rank \(i, j\) \(over m=1 x n=1\), "
                                         r"fewer than the s=8 cache chunks"):
        mlp_over_mesh(_rank_graph(up, down, None), MLP, 0, 8, 1, 1)
    with pytest.raises(HelixError, match=r"MLP 0 up weight nope is read by nothing, not by one aten.linear"):
        mlp_over_mesh(_rank_graph(up, down, None), [("MLP 0", ("nope",), "down_w")], 0, 2, 1, 1)
