"""Rank modules as torch.export ExportedPrograms (docs/how_it_works.md, "Saving a program"):
the helix collective ops export, survive torch.export.save / load, and the loaded programs, run
together, equal the unsharded model. Helix keeps its own JSON format as the saved form; this
test backs the doc's statement of what the ExportedProgram route does and does not cover."""

from __future__ import annotations

import io

import torch

from examples.paper_model import PaperConfig, build
from helix_compiler import helix_compile
from helix_compiler.program import run_ranks
from tests.helpers import assert_ranks_equal


def test_rank_modules_export_save_load_and_run_together():
    model, (x,) = build(PaperConfig.scaled())
    prog = helix_compile(model, devices=4, example_inputs=(x,), plan=(2, 2),
                         variant="score-reduce")
    loaded = []
    for r in range(4):
        ep = torch.export.export(prog.rank_module(r), (x,), strict=False)
        ops = {n.target._opname for n in ep.graph.nodes
               if n.op == "call_function" and getattr(n.target, "namespace", None) == "helix"}
        assert "all_reduce" in ops, ops          # the collectives are ops of the exported graph
        buf = io.BytesIO()
        torch.export.save(ep, buf)
        buf.seek(0)
        loaded.append(torch.export.load(buf).module())
    outs = run_ranks(loaded, prog.mesh, (x,), {})
    with torch.no_grad():
        want = model(x)
    assert_ranks_equal([o[0] if isinstance(o, (tuple, list)) else o for o in outs], want, devices=4)
