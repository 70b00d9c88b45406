"""The plan search's memo (cost.search_scope) and row records change no figure: against a
reference that prices every candidate alone, as make_plan did before the memo, the chosen
plan and every row's step, tokens/s and memory are equal (1e-9 relative)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from benchmarks.plan_search import grown, llama70b_summary, paper_summary
from helix_compiler.planning import cost
from helix_compiler.planning.cost import cost_plan
from helix_compiler.errors import PlanError
from helix_compiler.planning.plan import _best_schedule, make_plan, objective_key
from helix_compiler.planning.sites import Workload
from helix_compiler.planning.solver import solve_space
from tests.test_solver import make_site, make_summary

REL = 1e-9


def mixed_summary():
    """Two site shapes (MHA over 512 tokens, GQA with a causal mask over 256), one without an
    output projection, a graph workload (norms priced from the graph, so SP is priced),
    B = 32: the memo must tell the shapes and the layouts apart."""
    base = make_summary(layers=4, H=16, d=64, S=512, B=32, name="mixed")
    sites = (make_site(0, H=16, d=64, D=1024, S=512, B=32, dtype="float16"),
             dataclasses.replace(make_site(1, H=16, H_kv=4, d=64, D=1024, S=256, B=32,
                                           dtype="float16"), is_causal=True),
             make_site(2, H=16, d=64, D=1024, S=512, B=32, dtype="float16", o_proj=False),
             make_site(3, H=16, d=64, D=1024, S=512, B=32, dtype="float16"))
    return dataclasses.replace(base, sites=sites, workload=Workload(
        replicated_bytes=4e7, replicated_norm_bytes=3e7, q_head_bytes=1e7, kv_head_bytes=5e6,
        ops=9))


def reference(summary, devices, cluster, objective="throughput"):
    """Every feasible candidate priced alone with a SiteCost per site (no search memo), the
    best by objective_key: make_plan's loop before the memo."""
    rows = {}
    for c in solve_space(summary, devices, cluster, None, None):
        if not c.feasible:
            rows[c] = None
            continue
        try:
            if c.pp > 1:
                rows[c] = cost_plan(summary, c.m, c.n, cluster, dp=c.dp, pp=c.pp)
            else:
                base = cost_plan(summary, c.m, c.n, cluster, dp=c.dp)
                rows[c] = _best_schedule(summary, c, base, cluster, None, None, None, objective,
                                         None, None)
        except PlanError:
            rows[c] = None
    costed = {c: x for c, x in rows.items() if x is not None}
    chosen = min(costed, key=lambda c: objective_key(objective, c, costed[c]))
    return rows, chosen


def close(a: float, b: float) -> bool:
    return a == b or math.isclose(a, b, rel_tol=REL) or (math.isnan(a) and math.isnan(b))


FIGURES = ("step_ms", "tokens_per_s", "memory_bytes_per_rank", "compute_ms", "comm_ms",
           "bubble_ms", "micro_batch", "micro_batches", "overlap_chunks", "sequence_parallel",
           "param_elements_per_rank")


CASES = [("paper", paper_summary, (16, 64, 512)),
         ("llama70b-8L", lambda: llama70b_summary(layers=8, batch=64), (16, 64, 256)),
         ("mixed", mixed_summary, (8, 16, 64))]


@pytest.mark.parametrize("name,build,counts", CASES, ids=[c[0] for c in CASES])
def test_the_search_memo_changes_no_row_and_not_the_choice(monkeypatch, name, build, counts):
    summary = build()
    for devices in counts:
        cluster = grown("paper", devices)
        plan = make_plan(summary, devices, cluster, dp=None, pp=None, overlap=None,
                         sequence_parallel=None, prune=False)   # every row (pruning: below)
        monkeypatch.setattr(cost, "SEARCH_MEMO", False)
        rows, chosen = reference(summary, devices, cluster)
        monkeypatch.setattr(cost, "SEARCH_MEMO", True)
        got = {cc.candidate: cc.cost for cc in plan.candidates}
        assert list(got) == list(rows), (name, devices)
        assert plan.split == chosen.key, (name, devices, plan.name, str(chosen))
        for c, want in rows.items():
            have = got[c]
            assert (have is None) == (want is None), (name, devices, str(c))
            if want is None:
                continue
            for f in FIGURES:
                assert close(getattr(have, f), getattr(want, f)), (name, devices, str(c), f,
                                                                   getattr(have, f),
                                                                   getattr(want, f))
            # a row keeps one SiteCost per site shape: the reference's set of them
            assert set(have.variants) == set(want.variants)
        # the chosen plan lists every site and MLP as the reference prices them
        want = rows[chosen]
        assert plan.cost.sites == want.sites and plan.cost.mlps == want.mlps
        assert plan.cost.graph == want.graph and plan.cost.notes == want.notes
        assert [sp.cost for sp in plan.sites] == list(want.sites)


def test_a_search_leaves_no_memo_behind_and_a_lone_cost_call_keeps_none():
    s = mixed_summary()
    make_plan(s, 16, grown("paper", 16), dp=None, pp=None)
    assert not cost._TERMS and not cost._LAYOUTS and not cost._ALIVE and cost._SCOPE == [0]
    one = cost_plan(s, 2, 8, grown("paper", 16))
    assert one.sites[2].index == 2 and len(one.sites) == 4
    with cost.search_scope():
        cost_plan(s, 2, 8, grown("paper", 16))
        assert cost._TERMS
    assert not cost._TERMS


def _overlapped_step_reference(c_ms, x_ms, L, k, sync_ms=0.0):
    """cost.overlapped_step as it was written before the search made it call-free."""
    c = c_ms / (L + 1)
    x = x_ms / L if L else 0.0
    compute_free = comm_free = 0.0
    done = [0.0] * k
    for s in range(L + 1):
        for i in range(k):
            start = max(compute_free, done[i])
            compute_free = start + c
            if s < L:
                comm_start = max(comm_free, compute_free)
                comm_free = done[i] = comm_start + x
    step = max(compute_free, max(done)) + k * sync_ms
    return step, step - k * c_ms


def test_overlapped_step_is_bit_for_bit_the_simulation_it_replaced():
    import random
    rng = random.Random(13)
    for _ in range(300):
        args = (rng.uniform(0, 50), rng.choice([0.0, rng.uniform(0, 80)]), rng.randint(0, 40),
                rng.choice([1, 2, 4, 8]), rng.choice([0.0, rng.uniform(0, 1)]))
        assert cost.overlapped_step(*args) == _overlapped_step_reference(*args), args
    assert cost.overlapped_step(3.0, 3.0, 3, 4) == _overlapped_step_reference(3.0, 3.0, 3, 4)


def test_a_search_prices_each_distinct_site_term_once(monkeypatch):
    """80 layers over every (dp, pp, m, n) of 64 devices: a site's terms at one micro-batch on
    one layout are computed once per search, not once per candidate (with the memo off the
    same search computes them again and again)."""
    calls = []
    inner = cost._attention_terms_uncached

    def counted(site, w, variant, backend, b, lay, mach, blockwise=True):
        # b: one size, or an array of sizes priced at once (cost._grid_seconds)
        for size in (b.tolist() if hasattr(b, "tolist") else [b]):
            calls.append((cost._shape_key(site), variant, backend, int(size),
                          cost._lay_key(lay, mach.cluster)))
        return inner(site, w, variant, backend, b, lay, mach, blockwise)

    monkeypatch.setattr(cost, "_attention_terms_uncached", counted)
    s, cluster = llama70b_summary(layers=80, batch=256), grown("paper", 64)
    make_plan(s, 64, cluster, dp=None, pp=None, overlap=None, sequence_parallel=None,
              prune=False)                # every candidate priced: the memo is what is tested
    assert calls and len(calls) == len(set(calls))
    distinct = len(calls)
    calls.clear()
    monkeypatch.setattr(cost, "SEARCH_MEMO", False)
    make_plan(s, 64, cluster, dp=None, pp=None, overlap=None, sequence_parallel=None,
              prune=False)
    assert len(calls) > 2 * distinct and len(set(calls)) == distinct


def test_a_stage_receiving_across_nodes_costs_more_than_one_inside_a_node():
    """pp = 8 stages of m=1 x n=2 on 16 GPUs: on 2 nodes of 8, stage 4 receives from rank 6 on
    rank 8 (another node); on one node of 16 every receive stays on NVLink."""
    s = llama70b_summary(layers=8, batch=64)
    two_nodes = grown("paper", 16)
    one_node = dataclasses.replace(two_nodes, nodes=1, gpus_per_node=16)
    assert two_nodes.nodes == 2
    assert cost_plan(s, 1, 2, two_nodes, pp=8).step_ms > cost_plan(s, 1, 2, one_node, pp=8).step_ms


def test_the_closed_overlapped_step_is_the_simulation_to_rounding():
    """overlap_cost prices k >= 2 with overlapped_step_closed (O(1)); it equals the two-stream
    simulation within 1e-12 (k = 1 is the simulation itself)."""
    import random
    rng = random.Random(7)
    for _ in range(2000):
        args = (rng.uniform(0, 50), rng.choice([0.0, rng.uniform(0, 80)]), rng.randint(0, 200),
                rng.choice([1, 2, 4, 8]), rng.choice([0.0, rng.uniform(0, 1)]))
        want, got = cost.overlapped_step(*args), cost.overlapped_step_closed(*args)
        # the exposed time is step - k C: its error is the step's, not relative to itself
        assert math.isclose(got[0], want[0], rel_tol=1e-12), (args, got, want)
        assert abs(got[1] - want[1]) <= 1e-12 * max(want[0], 1.0), (args, got, want)
        if args[3] == 1:
            assert got == want


def test_terms_over_an_array_of_micro_batch_sizes_are_the_scalar_terms():
    """The search prices every micro-batch size in one call (cost._grid_seconds): an attention
    site's, an MLP's and the graph's terms for an array of sizes equal the terms of each size
    alone (names, kinds, seconds to 1e-12), on layouts inside a node and across nodes."""
    import numpy as np
    sizes = [1, 2, 3, 8, 64, 1000, 1024]
    for summary in (paper_summary(), llama70b_summary(layers=2), mixed_summary()):
        w = summary.dtype_bytes
        for devices, (m, n) in ((16, (1, 4)), (64, (2, 8)), (4096, (4, 4)), (4096, (1, 16))):
            cluster = grown("paper", devices)
            mach = cost._Machine(cluster, cost.DEFAULT_PROFILE)
            lay = cost._helix_layout(m, n, devices // (m * n), cluster.gpus_per_node)
            reps, _ = cost._unique(summary.sites)
            cases = [(lambda b, x=x, o=o: cost._attention_terms_uncached(
                x, w, *o, b, lay, mach, summary.workload is None))
                for x in reps for o in cost._site_options_uncached(x, lay, mach, None)]
            cases += [lambda b, x=x: cost._mlp_terms_uncached(x, summary, b, lay, mach)
                      for x in summary.mlps[:1]]
            if summary.workload is not None:
                cases.append(lambda b: cost._graph_terms_uncached(summary, b, lay, mach, 2))
            for terms_of in cases:
                together = terms_of(np.array(sizes, dtype=float))
                for i, b in enumerate(sizes):
                    alone = terms_of(b)
                    assert [t[:2] for t in alone] == [t[:2] for t in together]
                    for (name, _, a), (_, _, t) in zip(alone, together):
                        t = float(np.broadcast_to(t, (len(sizes),))[i])
                        assert math.isclose(a, t, rel_tol=1e-12), (summary.name, m, n, name, b)


def test_a_contiguous_range_spans_nodes_as_counted():
    for node in (1, 3, 8):
        cluster = dataclasses.replace(grown("paper", 16), gpus_per_node=node, nodes=64)
        for start in range(0, 40):
            for size in range(1, 40):
                assert cost.range_span(start, size, node) == cost.group_span(
                    range(start, start + size), cluster)


PRUNE_CASES = [("paper", paper_summary), ("llama70b-80L", llama70b_summary)]


@pytest.mark.parametrize("name,build", PRUNE_CASES, ids=[c[0] for c in PRUNE_CASES])
@pytest.mark.parametrize("objective", ["throughput", "latency"])
def test_pruning_picks_the_exhaustive_choice_and_prices_its_rows_alike(name, build, objective):
    """Branch and bound (make_plan prune=True) against pricing every split: the same chosen
    split with every figure equal, each priced row equal, and each pruned row's bound at most
    its exhaustive step and above the chosen step (so it could never have been chosen)."""
    summary = build()
    for devices in (16, 512, 4096):
        cluster = grown("paper", devices)
        kw = dict(dp=None, pp=None, overlap=None, sequence_parallel=None, objective=objective)
        fast = make_plan(summary, devices, cluster, **kw)
        full = make_plan(summary, devices, cluster, prune=False, **kw)
        assert fast.split == full.split, (name, devices, fast.name, full.name)
        for f in FIGURES:
            assert getattr(fast.cost, f) == getattr(full.cost, f), (name, devices, f)
        assert fast.cost == full.cost and fast.sites == full.sites
        assert [cc.candidate for cc in fast.candidates] == [cc.candidate for cc in full.candidates]
        assert all(cc.lower_bound_ms is None for cc in full.candidates)
        pruned = 0
        for have, want in zip(fast.candidates, full.candidates):
            if have.cost is not None:
                assert have.cost == want.cost, (name, devices, str(have.candidate))
                assert have.lower_bound_ms is None
            elif have.lower_bound_ms is not None:
                pruned += 1
                assert want.cost is not None, (name, devices, str(have.candidate))
                assert full.cost.step_ms < have.lower_bound_ms <= want.cost.step_ms, (
                    name, devices, str(have.candidate), have.lower_bound_ms, want.cost.step_ms)
            else:
                assert want.cost is None
        assert pruned or devices == 16, (name, devices)   # the bound does prune at scale
        # the notes are exhaustive's, and one saying how many rows were not priced
        extra = [x for x in fast.notes if x not in full.notes]
        assert len(extra) == (1 if pruned else 0) and (not pruned or "not priced" in extra[0])
        assert [x for x in fast.notes if x in full.notes] == list(full.notes)


@pytest.mark.parametrize("profile", [None, "h100"])
def test_the_step_lower_bound_is_below_every_priced_step(profile):
    """cost.step_lower_bound_ms under every row that pricing every split gives, on a mixed
    model (two site shapes, one without an output projection, a graph workload) and a GQA
    causal one with pipelines, with the default profile and the measured H100 one (many
    matmul sizes, score GEMM and masked attention rates)."""
    from pathlib import Path

    from helix_compiler.planning.profile import load_profile

    if profile is not None:
        profile = load_profile(Path(cost.__file__).parent / "profiles" / f"{profile}.yaml")
    for summary, devices in ((mixed_summary(), 64), (llama70b_summary(layers=8, batch=64), 256),
                             (paper_summary(), 512)):
        cluster = grown("paper", devices)
        plan = make_plan(summary, devices, cluster, profile, dp=None, pp=None, overlap=None,
                         sequence_parallel=None, prune=False)
        fast = make_plan(summary, devices, cluster, profile, dp=None, pp=None, overlap=None,
                         sequence_parallel=None)
        assert fast.cost == plan.cost and fast.split == plan.split
        eta, memo = cost.peak_efficiency(profile), {}
        rows = [cc for cc in plan.candidates if cc.cost is not None]
        assert rows
        for cc in rows:
            c = cc.candidate
            lb = cost.step_lower_bound_ms(summary, c.dp, c.pp, c.m, c.n, cluster, eta, memo)
            assert 0 < lb <= cc.cost.step_ms, (str(c), lb, cc.cost.step_ms)
