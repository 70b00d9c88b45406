"""The pipeline axis (pp): plans (dp, pp, m, n), their cost, and pp programs (stages.py) whose
last stage's ranks equal the unsharded model, simulated and under torchrun (gloo, 4 processes,
torch.distributed.pipelining's ScheduleGPipe)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helix_compiler.planning.cluster import load_cluster
from helix_compiler.planning.cost import cost_plan
from helix_compiler.errors import HelixError, PlanError
from helix_compiler.planning.plan import Plan, make_plan
from helix_compiler.planning.solver import solve_space
from helix_compiler.stages import simulate_pipeline
from tests.helpers import assert_output_equal, eager_output, seeded, variants_for
from tests.test_solver import make_summary

PAPER = load_cluster("paper")
WORKER = Path(__file__).resolve().parent / "pp_torchrun_worker.py"
SPLITS = [(m, n, v) for m, n in ((1, 2), (2, 1)) for v in variants_for(m)]


def toy(**kw):
    return make_summary(**{"layers": 2, "H": 16, "d": 64, "S": 512, "B": 16, **kw})


# --- plan space -----------------------------------------------------------------------------
def test_pp_is_enumerated_and_pp_above_the_blocks_is_refused_naming_both():
    cands = solve_space(toy(), 16, PAPER, dp=1, pp=None)
    by = {(c.pp, c.m, c.n): c for c in cands}
    assert {c.pp for c in cands} == {1, 2, 4, 8, 16}
    assert by[(2, 1, 8)].feasible and by[(2, 2, 4)].feasible and str(by[(2, 1, 8)]) == \
        "dp=1 x pp=2 x m=1 x n=8" and by[(2, 1, 8)].key == (1, 2, 1, 8)
    assert str(by[(1, 1, 16)]) == "m=1 x n=16" and by[(1, 1, 16)].key == (1, 1, 16)
    assert not by[(4, 1, 4)].feasible
    assert by[(4, 1, 4)].reasons[0] == ("pp=4 stages need at least 4 blocks, model 'toy' has 2; "
                                        "try pp <= 2")


def test_micro_batches_that_do_not_split_the_replica_batch_are_refused():
    by = {c.key: c for c in solve_space(toy(B=6), 8, PAPER, dp=None, pp=2, micro_batches=4)}
    why = by[(1, 2, 1, 4)].reasons[0]
    assert not by[(1, 2, 1, 4)].feasible
    assert why.startswith("pp=2: M=4 micro-batches need each replica's batch B/dp=6 to split "
                          "evenly (B/dp % M = 2)")
    assert by[(2, 2, 1, 2)].reasons[0].startswith("pp=2: M=4 micro-batches need each replica's "
                                                  "batch B/dp=3")
    with pytest.raises(PlanError, match=r"M=4 micro-batches need the replica batch B/dp=6"):
        cost_plan(toy(B=6), 1, 4, PAPER, pp=2, micro_batches=4)


def test_pp_cost_searches_the_micro_batch_and_prices_the_bubble():
    s = toy(B=16)
    c = cost_plan(s, 1, 8, PAPER, pp=2)
    assert c.name == "dp=1 x pp=2 x m=1 x n=8"
    assert c.micro_batch * c.micro_batches == 16
    # the bubble is (pp - 1) stage times of the M + pp - 1 the step takes
    t_stage = c.step_ms / (c.micro_batches + 1)
    assert c.bubble_ms == pytest.approx(t_stage, rel=1e-9)
    assert c.compute_ms + c.comm_ms == pytest.approx(c.micro_batches * t_stage, rel=1e-9)
    # the chosen b is the fastest of every b the search tried
    for m_count in (1, 2, 4, 8, 16):
        forced = cost_plan(s, 1, 8, PAPER, pp=2, micro_batches=m_count)
        assert forced.micro_batches == m_count and forced.step_ms >= c.step_ms - 1e-9
    assert any(x.startswith(f"pp=2: M={c.micro_batches} micro-batches") for x in c.notes)


def test_chosen_is_never_slower_than_any_costed_plan_of_the_space_with_pp():
    for objective, key in (("throughput", lambda x: -x.tokens_per_s),
                           ("latency", lambda x: x.step_ms)):
        plan = make_plan(toy(), 16, PAPER, dp=None, pp=None, objective=objective)
        costs = [cc.cost for cc in plan.candidates if cc.cost is not None]
        assert any(cc.candidate.pp == 2 and cc.cost is not None for cc in plan.candidates)
        assert key(plan.cost) == min(map(key, costs))


def test_a_pp_plan_round_trips_through_yaml_and_is_named_with_pp():
    plan = make_plan(toy(), 16, PAPER, forced=(1, 2, 1, 8))
    assert (plan.dp, plan.pp, plan.m, plan.n) == (1, 2, 1, 8)
    assert plan.name == "dp=1 x pp=2 x m=1 x n=8" and plan.split == (1, 2, 1, 8)
    data = plan.to_dict()
    assert data["pp"] == 2
    assert Plan.from_yaml(plan.to_yaml()) == plan
    assert any("TP=8 x PP=2 is also the Helix point dp=1 x pp=2 x m=1 x n=8" in x
               for x in plan.notes)
    with pytest.raises(PlanError, match=r"Plan: dp=1 x pp=3 x m=1 x n=8 must be positive and "
                                        r"multiply to devices=16"):
        dataclasses.replace(plan, pp=3)


def test_cli_takes_dp_pp_m_n():
    from helix_compiler.cli.main import _plan_arg

    assert _plan_arg("1,2,1,8") == (1, 2, 1, 8) and _plan_arg("2,1,8") == (2, 1, 8)
    assert _plan_arg("1,8") == (1, 8)


# --- programs ---------------------------------------------------------------------------------
@seeded
def _paper():
    from helix_compiler.models.paper import PaperConfig, build

    model, (x,) = build(dataclasses.replace(PaperConfig.scaled(), batch=4, seq=6))
    return model, (x,), {}


@seeded
def _llama_gqa():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=8,
                         num_key_value_heads=2, intermediate_size=128, vocab_size=256,
                         max_position_embeddings=64, attn_implementation="sdpa")
    ids = torch.randint(3, 256, (4, 6))
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, :2] = 0      # left-padded
    mask[2] = 0          # fully padded
    ids[mask == 0] = 0
    return LlamaForCausalLM(config), (ids,), {"attention_mask": mask, "use_cache": False}


def _check_scatter_gather(prog, outs):
    """The hidden state crosses the cut split along D over the stage's m n ranks: stage 0's
    ranks send (b, S, D/(m n)) and stage 1's all-gather it back, once per split value."""
    mn = prog.mesh.size
    (cut,) = prog.crossings()
    split = [c for c in cut if c.dim is not None]
    hidden = prog.summary.sites[0].embed_dim
    assert any(c.dim == 2 and c.size == hidden for c in split), cut
    for local in range(mn):
        gm = prog.stage_modules(local)[1]
        gathers = [x for x in gm.graph.nodes if x.target is torch.ops.helix.all_gather.default
                   and x.args[1] == "all"]
        assert len(gathers) == len(split)
        sent = outs[local][0]                      # micro-batch 0 of stage 0's rank
        names = [c.name for c in cut]
        for c in split:
            assert sent[names.index(c.name)].shape[c.dim] == c.size // mn


def _run_loaded(directory, prog, args, kwargs):
    """The saved ranks read back and run stage after stage (one micro-batch): last stage's outputs."""
    from helix_compiler.program import load_rank_module, run_ranks

    mn = prog.mesh.size
    loaded = [load_rank_module(directory, r) for r in range(prog.devices)]
    assert [x.stage for x in loaded] == [r // mn for r in range(prog.devices)]
    sent = run_ranks(loaded[:mn], prog.mesh, args, kwargs)
    bound = [(lambda x=x, c=c: x(*c)) for x, c in zip(loaded[mn:], sent)]
    return run_ranks(bound, prog.mesh, (), {})


def _check_pp(build, m: int, n: int, variant, compiled: dict, tmp_path):
    from helix_compiler import helix_compile

    model, args, kwargs = build()
    want = eager_output(model, args, kwargs)
    key = build.__name__
    if key not in compiled:
        compiled[key] = helix_compile(model, devices=2 * m * n, example_inputs=args,
                                      example_kwargs=kwargs, plan=(1, 2, m, n), variant=variant)
    prog = compiled[key].recompile(plan=(1, 2, m, n), variant=variant)
    assert prog.devices == 2 * m * n and [prog.stage_index(r) for r in range(prog.devices)] == \
        [r // (m * n) for r in range(2 * m * n)]
    outs = simulate_pipeline(prog, args, kwargs, micro_batches=2)
    label = f"pp=2 x m={m} x n={n} {variant or 'heads'}"
    for r in range(m * n, 2 * m * n):          # the last stage: the model's output
        assert_output_equal(outs[r], want, label=f"{label} rank {r}")
    for r in range(m * n):                     # stage 0: what it sends, per micro-batch, finite
        assert len(outs[r]) == 2
        for sent in outs[r]:
            assert all(torch.isfinite(t).all() for t in sent if t.is_floating_point())
    _check_scatter_gather(prog, outs)
    prog.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert (manifest["pp"], manifest["micro_batches"]) == (2, prog.plan.cost.micro_batches)
    for r, got in enumerate(_run_loaded(tmp_path, prog, args, kwargs)):   # flat outputs
        assert_output_equal(list(got), torch.utils._pytree.tree_leaves(want),
                            label=f"{label} loaded rank {m * n + r}")


_COMPILED: dict = {}


@pytest.mark.slow
@pytest.mark.parametrize("m,n,variant", SPLITS)
def test_paper_model_pp2_last_stage_equals_the_model(m, n, variant, tmp_path):
    _check_pp(_paper, m, n, variant, _COMPILED, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("m,n,variant", SPLITS)
def test_padded_gqa_llama_pp2_last_stage_equals_the_model(m, n, variant, tmp_path):
    _check_pp(_llama_gqa, m, n, variant, _COMPILED, tmp_path)


@pytest.mark.slow
def test_pp2_under_torchrun_through_pipelining_equals_the_model(tmp_path, m=2, n=1):
    """pp=2 x m=2 (qk-gather: head-dim collectives inside each stage), 2 micro-batches."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "4", str(WORKER), str(tmp_path), str(m), str(n),
                           "2"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    assert [x["stage"] for x in results] == [0, 0, 1, 1]
    for x in results[2:]:
        assert x["last"] and x["finite"] and x["relative_error"] <= 1e-5, x


def test_one_rank_per_stage_sends_every_value_whole():
    """pp=2 x m=1 x n=1: no stage has ranks to scatter over, so no all-gather is emitted."""
    if "_paper" not in _COMPILED:
        model, args, kwargs = _paper()
        from helix_compiler import helix_compile
        _COMPILED["_paper"] = helix_compile(model, devices=2, example_inputs=args,
                                            plan=(1, 2, 1, 1))
    prog = _COMPILED["_paper"].recompile(plan=(1, 2, 1, 1))
    (cut,) = prog.crossings()
    assert all(c.dim is None for c in cut) and {c.why for c in cut} == {"a size",
                                                                       "one rank per stage"}
    assert not any(x.target is torch.ops.helix.all_gather.default
                   for x in prog.stage_modules(0)[1].graph.nodes)
    model, args, kwargs = _paper()
    outs = simulate_pipeline(prog, args, kwargs, micro_batches=2)
    assert_output_equal(outs[1], eager_output(model, args, kwargs), label="pp=2 x 1 x 1")


@pytest.mark.slow
def test_chosen_plan_is_never_slower_than_a_printed_row_at_dp1_on_the_paper_model():
    """`helix plan --devices 16 --dp 1`: the Helix point dp=1 x pp=2 x m=1 x n=8 is priced
    with the same scatter-gather stage boundary as the baseline TP=8 x PP=2, so it is no
    slower, and the chosen plan's step is the shortest of every row (throughput)."""
    from helix_compiler.api import plan_model
    from helix_compiler.models.paper import paper_meta

    model, args = paper_meta()
    plan, _ = plan_model(model, devices=16, example_inputs=args, dp=1)
    rows = [cc.cost for cc in plan.candidates if cc.cost is not None] + list(plan.baselines)
    assert len(rows) > 2 and plan.cost.tokens_per_s >= max(x.tokens_per_s for x in rows)
    point = next(cc.cost for cc in plan.candidates if cc.candidate.key == (1, 2, 1, 8))
    baseline = next(b for b in plan.baselines if b.name == "TP=8 x PP=2")
    assert point.step_ms <= baseline.step_ms


_PP_SPEC = """
import sys

import torch

sys.path.insert(0, {repo!r})
from examples.paper_model import PaperConfig, build


def helix_model():
    return build(PaperConfig(layers=2, heads=4, head_dim=4, mlp=32, batch=4, seq=4,
                             dtype=torch.float32))
"""


@pytest.mark.slow
def test_helix_run_launches_a_pp_plan_through_pipelining(capsys, tmp_path):
    """helix run --plan 1,2,1,2: 4 gloo processes, 2 stages of m=1 x n=2, 2 micro-batches."""
    from tests.test_cli import REPO, _run

    spec = tmp_path / "pp_model.py"
    spec.write_text(_PP_SPEC.format(repo=str(REPO)))
    summary = tmp_path / "summary.json"
    code, out, err = _run(capsys, "run", spec, "--devices", 4, "--backend", "gloo", "--plan",
                          "1,2,1,2", "--micro-batches", 2, "--steps", 1, "--timeout", 240,
                          "--json", summary)
    assert code == 0, err
    assert "dp=1 x pp=2 x m=1 x n=2 (M=2 micro-batches)" in out
    data = json.loads(summary.read_text())
    assert (data["pp"], data["micro_batches"]) == (2, 2)
    assert data["max_relative_error"] <= 1e-5
