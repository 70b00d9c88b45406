"""The planner chooses only splits the shard pass builds (issue 12, item 3).

HF Olmo2 normalizes q and k over the whole projected width (`k_norm(k_proj(x))`, all heads at
once). With GQA on n > H_kv head groups, each kv head's k features are replicated over n / H_kv
groups, so the k-norm's mean sums each of them n / H_kv times: exact once divided by that
multiplicity (layout.check_partition, Localizer.all_reduce). And when the shard pass does refuse
the cost model's choice, the next best split is built instead, with the refusal recorded.
"""

from __future__ import annotations

import pytest
import torch

from helix_compiler import helix_compile
from helix_compiler.api import plan_model
from helix_compiler.pipeline import placements as _placements, plan_buildable
from helix_compiler.planning.cluster import load_cluster
from helix_compiler.errors import PlanError, ShardingError
from helix_compiler.runtime.mesh import Mesh
from helix_compiler.cli.report import format_table
from passes.layout import check_partition, make_split
from tests.helpers import (all_ranks_label, assert_ranks_equal, eager_output,
                           expected_collectives, feasible_splits, seeded, variants_for)

DEVICES = 8


@seeded
def _olmo2():
    # Olmo2: RMSNorm over all H * d (q) and H_kv * d (k) features before the head reshape;
    # GQA 8 / 2, so n = 4 and n = 8 replicate each kv head over 2 and 4 head groups.
    from transformers import Olmo2Config, Olmo2Model

    config = Olmo2Config(num_hidden_layers=1, hidden_size=128, num_attention_heads=8,
                         num_key_value_heads=2, intermediate_size=128, vocab_size=96,
                         max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, attn_implementation="eager")
    ids = torch.randint(3, 96, (3, 7))                    # (B, S)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :3] = 0                                       # left-padded
    mask[2, :] = 0                                        # fully padded
    return Olmo2Model(config), (ids,), {"attention_mask": mask, "use_cache": False}


@pytest.mark.slow
def test_olmo2_automatic_choice_and_every_feasible_split_of_8_match_the_unsharded_model():
    model, args, kwargs = _olmo2()
    want = eager_output(model, args, kwargs)
    prog = helix_compile(model, devices=DEVICES, example_inputs=args, example_kwargs=kwargs)
    assert len(prog.plan.sites) == 1 and prog.plan.sites[0].site.num_kv_heads == 2
    assert not [c for c in prog.plan.candidates if any("shard pass" in r for r in c.candidate.reasons)]
    assert_ranks_equal(prog.simulate(*args, **kwargs), want, devices=DEVICES, label="automatic")
    splits = feasible_splits(prog.summary, DEVICES)
    assert (1, 8) in splits and (2, 4) in splits, splits
    for m, n in splits:
        for variant in variants_for(m):
            got = prog.recompile(plan=(m, n), variant=variant)
            label = f"m={m} x n={n} {variant or 'heads'}"
            assert_ranks_equal(got.simulate(*args, **kwargs), want, devices=DEVICES, label=label)
            # the q-norm's and the k-norm's mean square: one all-reduce each over all ranks
            # (the k one divided by n / H_kv when n > 2), beside the site's, o_proj's and the MLP's
            want_counts = expected_collectives(m=m, n=n, variant=variant or "heads", sites=1,
                                               o_projs=1, mlps=1)
            key = f"all_reduce:{all_ranks_label(m, n)}"
            want_counts[key] = want_counts.get(key, 0) + 2
            for rank in (0, m * n - 1):
                assert got.collectives(rank) == want_counts, (label, rank)


def test_check_partition_counts_even_replicas_and_refuses_uneven_ones():
    mesh = Mesh(n=4, m=1)
    # 2 kv heads of 2 features over 4 head groups: each held twice
    split = make_split(4, [[0, 1], [0, 1], [2, 3], [2, 3]])
    assert check_partition(split, mesh, "head", "k", replicas=True) == 2
    with pytest.raises(ShardingError, match="exactly once.*2 times"):
        check_partition(split, mesh, "head", "k")
    uneven = make_split(4, [[0, 1], [0, 1], [0, 1], [2, 3]])
    with pytest.raises(ShardingError, match="exactly once"):
        check_partition(uneven, mesh, "head", "k", replicas=True)
    assert check_partition(make_split(4, [[0], [1], [2], [3]]), mesh, "head", "k") == 1


@pytest.fixture(scope="module")
def paper_analysis():
    from examples.paper_model import PaperConfig, build

    model, args = build(PaperConfig(layers=1, heads=4, head_dim=8, mlp=64, batch=2, seq=5,
                                    dtype=torch.float32))
    _, analysis = plan_model(model, devices=4, example_inputs=args, dynamic=False)
    return analysis


def _refusing(*splits):
    """A build step that refuses `splits` as the shard pass would, and builds the others."""
    def build(plan, analysis):
        if (plan.m, plan.n) in splits:
            raise ShardingError(f"node mean_1: test refusal of m={plan.m} x n={plan.n}")
        return _placements(plan, analysis)
    return build


def test_a_refused_choice_is_replaced_by_the_next_best_with_the_reason_recorded(paper_analysis):
    spec = load_cluster("paper")
    best, _ = plan_buildable(paper_analysis, 4, spec)
    plan, built = plan_buildable(paper_analysis, 4, spec, build=_refusing((best.m, best.n)))
    assert built is not None and (plan.m, plan.n) != (best.m, best.n)
    costed = {(c.candidate.m, c.candidate.n): c.cost.tokens_per_s
              for c in best.candidates if c.cost is not None and (c.candidate.m, c.candidate.n) != (best.m, best.n)}
    assert (plan.m, plan.n) == max(costed, key=lambda k: (costed[k], -k[0]))
    (refused,) = [c.candidate for c in plan.candidates if (c.candidate.m, c.candidate.n) == (best.m, best.n)]
    assert not refused.feasible
    assert any("shard pass refuses it: ShardingError: node mean_1" in r for r in refused.reasons)
    assert any(f"m={best.m} x n={best.n} excluded" in x for x in plan.notes)
    table = format_table(plan)
    assert f"m={best.m} x n={best.n}: " in table and "test refusal" in table


def test_a_forced_split_keeps_the_refusal_and_refusing_all_is_a_plan_error(paper_analysis):
    spec = load_cluster("paper")
    with pytest.raises(ShardingError, match="test refusal of m=1 x n=4"):
        plan_buildable(paper_analysis, 4, spec, forced=(1, 4), build=_refusing((1, 4)))
    every = tuple((m, 4 // m) for m in (1, 2, 4))
    with pytest.raises(PlanError, match="no split of 4 devices can be built: m=1 x n=4: the shard pass refuses it"):
        plan_buildable(paper_analysis, 4, spec, build=_refusing(*every))

