"""helix_compile(sequence_parallel=True): the residual stream between blocks is split along the
sequence (reduce-scatter after each row-parallel projection, all-gather before each
column-parallel one); every rank still equals the unsharded model."""

from __future__ import annotations

import pytest
import torch

from helix_compiler import HelixError, helix_compile
from tests.helpers import assert_ranks_equal, eager_output
from tests.models import zoo


def _ops(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("name", ["paper_scaled", "llama", "gpt2", "nanogpt"])
@pytest.mark.parametrize("plan,variant", [((1, 4), None), ((2, 2), "qk-gather"),
                                          ((2, 2), "score-reduce")])
def test_sequence_parallel_ranks_equal_the_model(name, plan, variant):
    model, args, kwargs = zoo(name).build()
    prog = helix_compile(model, 4, args, kwargs, plan=plan, variant=variant, dynamic=False,
                         sequence_parallel=True)
    assert_ranks_equal(prog.simulate(*args, **kwargs), eager_output(model, args, kwargs),
                       devices=4, label=f"{name} {plan} {variant}")
    ops = _ops(prog.rank_module(0))
    if name != "gpt2":          # GPT-2's Conv1D projections are 2-D (tokens, D): left whole
        assert "helix.reduce_scatter.default" in ops
        blocks = 2 * 2          # two layers, each attention + MLP
        assert ops.count("helix.reduce_scatter.default") == blocks
        # one gather per block input (q, k and v share theirs), and the output at the end
        assert ops.count("helix.all_gather.default") >= blocks


def test_norms_run_on_a_quarter_of_the_tokens():
    model, args, kwargs = zoo("paper_scaled").build()
    prog = helix_compile(model, 4, args, kwargs, plan=(1, 4), dynamic=False,
                         sequence_parallel=True)
    gm = prog.rank_module(2)
    seen = {}

    def hook(name):
        def f(mod, inp, out):
            seen[name] = out.shape
        return f

    norms = [n for n in gm.graph.nodes if n.target is torch.ops.aten.layer_norm.default]
    assert len(norms) >= 4
    from torch.fx import Interpreter

    class Spy(Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in norms:
                seen[n.name] = tuple(out.shape)
            return out

    from helix_compiler.program import run_ranks

    modules = [prog.rank_module(r) for r in range(4)]
    modules[2] = lambda *a, **k: Spy(gm).run(*a, **k)
    run_ranks(modules, prog.mesh, args, kwargs)
    seq = args[0].shape[1]
    # the first block's input norm sees the whole (replicated) input; every later one 1/4
    assert sorted(s[1] for s in seen.values())[:-1] == [seq // 4] * (len(seen) - 1)


def test_sequence_parallel_needs_a_static_sequence():
    model, args, kwargs = zoo("paper_scaled").build()
    with pytest.raises(HelixError, match="dynamic=False"):
        helix_compile(model, 4, args, kwargs, sequence_parallel=True)
