"""HelixProgram.save / load_rank_module: the ranks read back from disk, run together with
run_ranks, equal the unsharded model; a modified or missing rank file is refused by name."""

from __future__ import annotations

import json

import pytest
import torch
import torch.utils._pytree as pytree

from helix_compiler import HelixError, load_rank_module
from helix_compiler.program import run_ranks
from tests.helpers import assert_leaves_equal, compile_split, eager_output
from tests.models import zoo

# (zoo model, m, n, variant): a plain tensor output (paper), HF ModelOutputs with a bool
# kwarg (gpt2) and a tensor kwarg (bert, attention_mask), GQA + rotary (llama).
CASES = [
    ("paper_scaled", 2, 2, "score-reduce"),
    ("paper_scaled", 2, 2, "qk-gather"),
    ("paper_scaled", 1, 4, None),
    ("gpt2", 2, 2, "qk-gather"),
    ("bert", 2, 2, "score-reduce"),
    ("llama", 2, 2, "qk-gather"),
]


def _flat(outputs) -> list:
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model args, kwargs, reference, program, directory) of one zoo model saved at (2, 2)."""
    model, args, kwargs = zoo("paper_scaled").build()
    prog = compile_split(model, args, kwargs, m=2, n=2, variant="score-reduce")
    directory = prog.save(tmp_path_factory.mktemp("paper_2x2"))
    return args, kwargs, eager_output(model, args, kwargs), prog, directory


@pytest.mark.parametrize("name,m,n,variant", CASES,
                         ids=[f"{c[0]}-{c[1]}x{c[2]}-{c[3] or 'heads'}" for c in CASES])
def test_loaded_ranks_run_together_equal_unsharded_model(name, m, n, variant, tmp_path):
    model, args, kwargs = zoo(name).build()
    want = pytree.tree_leaves(eager_output(model, args, kwargs))
    prog = compile_split(model, args, kwargs, m=m, n=n, variant=variant)
    prog.save(tmp_path)
    loaded = [load_rank_module(tmp_path, r) for r in range(m * n)]
    outputs = run_ranks(loaded, prog.mesh, args, kwargs)
    assert len(outputs) == m * n
    for r, out in enumerate(outputs):
        assert_leaves_equal(_flat(out), want, label=f"{name} loaded rank {r}")


def test_loaded_rank_holds_the_saved_rank_weights_and_collectives(saved):
    *_, prog, directory = saved
    for r in range(prog.devices):
        gm = load_rank_module(directory, r).gm
        original = prog.rank_module(r)
        want = dict(original.named_buffers())
        got = dict(gm.named_buffers())
        assert sorted(got) == sorted(want)
        for k in want:
            assert torch.equal(got[k], want[k]), f"rank {r} buffer {k}"
        collectives: dict = {}
        for node in gm.graph.nodes:
            if node.op == "call_function" and getattr(node.target, "namespace", None) == "helix" \
                    and node.target._opname in ("all_reduce", "all_gather"):
                key = f"{node.target._opname}:{node.args[1]}"
                collectives[key] = collectives.get(key, 0) + 1
        assert collectives == prog.collectives(r) == {"all_reduce:dim": 2, "all_reduce:all": 4}


def test_manifest_records_split_and_one_graph_and_weights_file_per_rank(saved):
    *_, prog, directory = saved
    manifest = json.loads((directory / "manifest.json").read_text())
    assert (manifest["devices"], manifest["m"], manifest["n"]) == (4, 2, 2)
    assert [(e["graph"], e["weights"]) for e in manifest["ranks"]] == \
        [(f"rank{r}.graph.json", f"rank{r}.weights.pt") for r in range(4)]


def test_tampered_weights_file_raises_helix_error_naming_the_file(saved, tmp_path):
    *_, prog, _ = saved
    prog.save(tmp_path)
    weights = tmp_path / "rank1.weights.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    load_rank_module(tmp_path, 0)   # the other ranks still load
    with pytest.raises(HelixError, match="rank1.weights.pt"):
        load_rank_module(tmp_path, 1)


def test_tampered_graph_file_raises_helix_error_naming_the_file(saved, tmp_path):
    *_, prog, _ = saved
    prog.save(tmp_path)
    graph = tmp_path / "rank2.graph.json"
    graph.write_text(graph.read_text().replace("all_reduce", "all_gather", 1))
    with pytest.raises(HelixError, match="rank2.graph.json"):
        load_rank_module(tmp_path, 2)


@pytest.mark.parametrize("missing", ["rank3.weights.pt", "rank3.graph.json"])
def test_missing_rank_file_raises_helix_error_naming_the_file(saved, tmp_path, missing):
    *_, prog, _ = saved
    prog.save(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(HelixError, match=missing.replace(".", r"\.")):
        load_rank_module(tmp_path, 3)


def test_loaded_rank_run_outside_a_helix_runtime_raises_helix_error(saved):
    args, kwargs, _, _, directory = saved
    rank = load_rank_module(directory, 0)
    with pytest.raises(HelixError, match="outside a Helix runtime"):
        rank(*args, **kwargs)


def test_recompile_reuses_the_capture_and_equals_a_fresh_compile():
    import torch

    from examples.paper_model import PaperConfig, build
    from helix_compiler import helix_compile

    model, (x,) = build(PaperConfig.scaled(), "cpu", seed=0)
    first = helix_compile(model, devices=4, example_inputs=(x,), plan=(2, 2))
    again = first.recompile(plan=(4, 4), variant="qk-gather")
    fresh = helix_compile(model, devices=16, example_inputs=(x,), plan=(4, 4), variant="qk-gather")
    assert again.analysis is first.analysis  # no second capture
    assert (again.plan.m, again.plan.n, again.devices) == (4, 4, 16)
    for r in (0, 7, 15):
        a, b = again.rank_module(r).state_dict(), fresh.rank_module(r).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert max(((o - model(x)).norm() / model(x).norm()).item() for o in again.simulate(x)) <= 1e-5
