"""program.on_device: a graph captured on the CPU runs on another device, its graph's own
device arguments (factory calls, .to(), export's metadata asserts) moved too. The GPU is
not here; the meta device stands in for it (the same checks fire on a mismatch)."""

from __future__ import annotations

import copy

import pytest
import torch

from helix_compiler import helix_compile
from helix_compiler.program import on_device
from helix_compiler.runtime.graphs import with_index
from tests.models import zoo


def test_an_hf_graph_captured_on_cpu_runs_on_another_device():
    model, args, kwargs = zoo("llama").build()
    prog = helix_compile(model, 2, args, kwargs, plan=(1, 2))
    gm = prog.analysis.captured.gm
    moved = copy.deepcopy(gm)
    meta = tuple(a.to("meta") for a in args)
    with pytest.raises(Exception, match="(?i)device|meta"):   # as captured: pinned to the CPU
        with torch.no_grad():
            copy.deepcopy(gm).to("meta")(*meta, **kwargs)
    on_device(moved, "meta")
    with torch.no_grad():
        out = moved(*meta, **kwargs)
    leaves = [x for x in torch.utils._pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
    assert leaves and all(x.device.type == "meta" for x in leaves)
    named = [a for n in moved.graph.nodes for a in list(n.args) + list(n.kwargs.values())
             if isinstance(a, torch.device)]
    assert named and all(a.type == "meta" for a in named)


def test_cuda_without_an_index_is_named_as_the_tensors_land_on_it(monkeypatch):
    # torch.compile's fake tensors compare export's asserted device exactly: the graph must
    # name cuda:0 (where .to("cuda") puts the tensors), not cuda (failed so on the H200)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert with_index(torch.device("cuda")) == torch.device("cuda", 3)
    assert with_index(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert with_index(torch.device("cpu")) == torch.device("cpu")
    assert with_index(torch.device("meta")) == torch.device("meta")
