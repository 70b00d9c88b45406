"""The overlap pass (passes/overlap.py) and its price (cost.overlapped_step / overlap_cost):
a rank's batch cut into k chunks whose all-reduces are issued asynchronously; every rank still
equals the unsharded model."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helix_compiler import helix_compile
from helix_compiler.planning.cluster import load_cluster
from helix_compiler.planning.cost import (DEFAULT_PROFILE, cost_plan, overlap_cost,
                                          overlapped_step, replica_summary,
                                          sequence_parallel_cost, _async_terms)
from helix_compiler.errors import OverlapError, PlanError
from helix_compiler.models.paper import PaperConfig, build
from tests.helpers import assert_ranks_equal, eager_output
from tests.test_data_parallel import _padded_llama


def _paper():
    # B = 4 rows (k = 2 and 4 divide it), S = 7
    model, args = build(dataclasses.replace(PaperConfig.scaled(), batch=4, seq=7))
    return model, args, {}


def _targets(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


@functools.cache
def _paper_program(k: int):
    model, args, kwargs = _paper()
    return model, args, kwargs, helix_compile(model, 4, args, kwargs, plan=(1, 4), overlap=k)


@pytest.mark.slow
@pytest.mark.parametrize("k", [2, 4])
def test_overlapped_paper_model_ranks_equal_the_model(k):
    model, args, kwargs, prog = _paper_program(k)
    assert prog.plan.overlap == k and prog.plan.cost.overlap_chunks == k
    assert_ranks_equal(prog.simulate(*args, **kwargs), eager_output(model, args, kwargs),
                       devices=4, label=f"paper overlap k={k}")
    ops = _targets(prog.rank_module(1))
    # 2 blocks x (attention + MLP) all-reduces, each issued once per chunk and waited for once
    assert ops.count("helix.all_reduce_start.default") == 4 * k
    assert ops.count("helix.wait.default") == 4 * k
    assert "helix.all_reduce.default" not in ops
    # interleaved: chunk 1's first all-reduce is issued before chunk 0's first is waited for
    first_wait = ops.index("helix.wait.default")
    assert ops[:first_wait].count("helix.all_reduce_start.default") == k


def test_overlap_1_leaves_the_rank_graph_as_it_was():
    model, args, kwargs = _paper()
    plain = helix_compile(model, 4, args, kwargs, plan=(1, 4))
    assert plain.plan.overlap == 1
    assert "helix.all_reduce_start.default" not in _targets(plain.rank_module(0))
    assert _targets(plain.rank_module(0)).count("helix.all_reduce.default") == 4


@pytest.mark.slow
def test_overlapped_llama_with_padded_rows_ranks_equal_the_model():
    # GQA 8 / 2, rotary (tables shared across chunks), a left-padded, a fully padded row
    model, args, kwargs = _padded_llama()
    prog = helix_compile(model, 4, args, kwargs, plan=(1, 4), overlap=2)
    assert_ranks_equal(prog.simulate(*args, **kwargs), eager_output(model, args, kwargs),
                       devices=4, label="llama overlap k=2")
    assert _targets(prog.rank_module(0)).count("helix.all_reduce_start.default") == 2 * 4


def test_a_batch_k_does_not_divide_is_refused_at_run_time():
    model, args, kwargs, prog = _paper_program(4)
    six = torch.cat([args[0], args[0][:2]])
    with pytest.raises(Exception, match=r"6 rows does not cut into k=4"):
        prog.simulate(six)


def test_an_op_mixing_batch_rows_is_refused_by_name():
    class Centered(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            y = self.inner(x)
            return y - y.mean(0, keepdim=True)      # every row reads every other row

    model, args, kwargs = _paper()
    wrapped = Centered(model).eval()
    with pytest.raises(OverlapError, match=r"mean.*mixes batch rows"):
        helix_compile(wrapped, 4, args, kwargs, plan=(1, 4), overlap=2).rank_module(0)


def test_overlapped_step_matches_hand_arithmetic():
    # a chunk: 6 ms compute cut by L = 2 all-reduces into 3 segments of c = 2 ms; x = 1 ms each
    # k = 2, x <= c: every all-reduce hides behind the other chunk: k (L + 1) c = 2 * 3 * 2
    assert overlapped_step(6.0, 2.0, 2, 2) == pytest.approx((12.0, 0.0))
    # communication-bound, c = 1, x = 4: head c + k L x + tail c = 1 + 2 * 2 * 4 + 1 = 18;
    # compute is k * 3 = 6, so 12 ms of communication stay exposed
    assert overlapped_step(3.0, 8.0, 2, 2) == pytest.approx((18.0, 12.0))
    # k = 1: nothing to overlap with, compute + communication
    assert overlapped_step(3.0, 8.0, 2, 1) == pytest.approx((11.0, 8.0))
    # a synchronous all-gather of 0.5 ms per chunk adds 2 * 0.5, exposed
    assert overlapped_step(6.0, 2.0, 2, 2, 0.5) == pytest.approx((13.0, 1.0))


def test_overlapped_plan_cost_is_priced_per_chunk_not_as_compute_plus_comm():
    from helix_compiler.pipeline import summarize  # noqa: F401 (the summary comes from plan_model)
    from helix_compiler import plan_model

    model, args, kwargs = _paper()
    plan, analysis = plan_model(model, 4, args, kwargs, plan=(1, 4))
    summary, cluster = analysis.summary, load_cluster("paper")
    base = cost_plan(summary, 1, 4, cluster)
    got = overlap_cost(summary, base, 2, 1, 4, cluster)
    b, M = base.micro_batch, base.micro_batches
    chunk = cost_plan(replica_summary(summary, summary.batch * 2 // b), 1, 4, cluster)
    x_ms, sync_ms, L = _async_terms(chunk.sites + chunk.mlps)
    assert L == 4 and sync_ms == 0.0          # 2 blocks x (attention + MLP) all-reduces
    c, x = chunk.compute_ms / (L + 1), x_ms / L
    step = M * max(2 * (L + 1) * c, c + 2 * L * x + c)          # hand arithmetic, k = 2
    assert got.step_ms == pytest.approx(step, rel=1e-9)
    assert got.overlap_chunks == 2
    assert got.compute_ms == pytest.approx(M * 2 * chunk.compute_ms)
    assert got.exposed_comm_ms == pytest.approx(step - M * 2 * chunk.compute_ms)
    assert got.step_ms < got.compute_ms + got.comm_ms            # never compute + comm
    with pytest.raises(PlanError, match="overlap k=8"):
        plan_model(model, 4, args, kwargs, plan=(1, 4), overlap=8)


def test_sequence_parallel_cost_moves_norm_work_to_one_nth():
    from helix_compiler import plan_model

    model, args, kwargs = _paper()
    _, analysis = plan_model(model, 4, args, kwargs, plan=(1, 4))
    summary, cluster = analysis.summary, load_cluster("paper")
    base = cost_plan(summary, 1, 4, cluster)
    sp = sequence_parallel_cost(summary, base, 1, 4, cluster)
    wl = summary.workload                # the first norm runs before any SP block: kept whole
    kept = {"replicated ops": wl.leading_replicated_bytes / wl.replicated_bytes,
            "replicated norms": wl.leading_norm_bytes / wl.replicated_norm_bytes}
    assert 0 < kept["replicated norms"] < 1
    replicated = sum(ms * (1 - frac) for sc in base.graph for name, ms in sc.terms
                     for prefix, frac in kept.items() if name.startswith(prefix))
    assert replicated > 0
    assert sp.sequence_parallel
    # b = 4 sequences a micro-batch: funcol's two copies of X per block are charged
    # (test_sequence_parallel_cost_charges_funcols_copies_above_one_sequence)
    b, S, D = base.micro_batch, 7, summary.sites[0].embed_dim
    copies = ((len(summary.sites) + len(summary.mlps)) * 4 * summary.dtype_bytes * b * S * D
              / (cluster.memory_bandwidth * DEFAULT_PROFILE.elementwise_efficiency) * 1e3)
    assert b == 4 and base.micro_batches == 1
    assert sp.compute_ms == pytest.approx(base.compute_ms - replicated * 3 / 4 + copies)
    assert sp.comm_ms > base.comm_ms                      # one more latency per block
    plan, _ = plan_model(model, 4, args, kwargs, plan=(1, 4), sequence_parallel=None)
    assert plan.sequence_parallel == plan.cost.sequence_parallel
    assert plan.cost.step_ms == pytest.approx(min(base.step_ms, sp.step_ms))


def test_sequence_parallel_cost_charges_funcols_copies_above_one_sequence():
    """With b > 1 sequences per micro-batch funcol's reduce-scatter and all-gather along the
    sequence copy X twice each per block (chunk and concatenate); b = 1 copies nothing."""
    from helix_compiler.measure.predict import at_batch
    from helix_compiler.measure import space

    cfg = space.config(False)
    summary, cluster = space.summary_for(cfg, 2), load_cluster("paper")
    w, D, S = summary.dtype_bytes, cfg.hidden, cfg.seq
    eta, bw = DEFAULT_PROFILE.elementwise_efficiency, cluster.memory_bandwidth
    saved = {}
    for b in (1, 4):
        one = at_batch(summary, b)
        base = cost_plan(one, 1, 16, cluster)
        sp = sequence_parallel_cost(one, base, 1, 16, cluster)
        wl = one.workload
        replicated = sum(ms * (1 - wl.leading_norm_bytes / wl.replicated_norm_bytes
                               if name.startswith("replicated norms") else 1)
                         for sc in base.graph for name, ms in sc.terms
                         if name.startswith(("replicated ops", "replicated norms")))
        saved[b] = sp.compute_ms - (base.compute_ms - replicated * 15 / 16)
        assert base.micro_batch == b and base.micro_batches == 1
    assert saved[1] == 0.0
    blocks = len(summary.sites) + len(summary.mlps)           # 2 attention + 2 MLP all-reduces
    assert saved[4] == pytest.approx(blocks * 4 * w * 4 * S * D / (bw * eta) * 1e3, rel=1e-6)


@pytest.mark.slow
def test_overlapped_program_runs_on_real_process_groups(tmp_path):
    """The asynchronous all-reduce through DistributedBackend (_c10d_functional.all_reduce,
    wait_tensor) on 4 gloo processes: a saved overlapped program, run from the user's own
    torchrun script (examples/torchrun_user.py), every rank equals the model."""
    model, args, kwargs, prog = _paper_program(2)
    prog.save(tmp_path)
    with torch.no_grad():
        want = model(*args)
    torch.save({"x": args[0], "want": want}, tmp_path / "io.pt")
    example = Path(__file__).resolve().parents[1] / "examples" / "torchrun_user.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "4", str(example), "run", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in range(4):
        result = json.loads((tmp_path / f"rank{r}.result.json").read_text())
        assert result["relative_error"] <= 1e-5, result
