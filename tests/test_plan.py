"""make_plan's choice, the plan's YAML round trip and its errors, the report."""

from __future__ import annotations

import pytest
import yaml

from helix_compiler.planning.cluster import load_cluster
from helix_compiler.errors import HelixError, PlanError
from helix_compiler.planning.plan import Plan, make_plan, model_fingerprint
from helix_compiler.cli.report import format_formulas, format_table
from tests.test_solver import make_summary

PAPER = load_cluster("paper")
NODE = load_cluster("h100x8")


def toy(**kw):
    return make_summary(**{"layers": 2, "H": 16, "d": 64, "S": 512, "B": 8, **kw})


def test_make_plan_picks_the_split_with_the_most_tokens_per_second():
    plan = make_plan(toy(), 16, PAPER)
    costed = [cc for cc in plan.candidates if cc.cost is not None]
    assert len(costed) == 5
    best = max(costed, key=lambda cc: (cc.cost.tokens_per_s, -cc.candidate.m))
    assert (plan.m, plan.n) == (best.candidate.m, best.candidate.n)
    assert plan.cost == best.cost
    assert plan.devices == 16 and plan.cluster == "paper" and plan.mlps == 2
    assert [sp.index for sp in plan.sites] == [0, 1]
    assert plan.variants == tuple(sp.variant for sp in plan.sites) == plan.cost.variants


def test_baselines_are_tp_in_a_node_times_pp_and_tp_over_all_devices():
    assert [b.name for b in make_plan(toy(), 16, PAPER).baselines] == ["TP=8 x PP=2", "TP=16"]
    assert [b.name for b in make_plan(toy(), 8, NODE).baselines] == ["TP=8"]


def test_a_baseline_that_cannot_shard_the_heads_is_noted_not_costed():
    plan = make_plan(toy(H=12), 16, PAPER)
    assert [b.name for b in plan.baselines] == []
    assert any("TP=16: H=12 heads not divisible by TP=16" in x for x in plan.notes)


def test_forced_split_and_variant_are_obeyed():
    plan = make_plan(toy(), 16, PAPER, forced=(4, 4), variant="score-reduce")
    assert (plan.m, plan.n) == (4, 4)
    assert plan.variants == ("score-reduce", "score-reduce")
    plan = make_plan(toy(), 16, PAPER, forced=(4, 4), variant="qk-gather")
    assert plan.variants == ("qk-gather", "qk-gather")


def test_forced_infeasible_split_says_why_and_lists_feasible_ones():
    with pytest.raises(PlanError) as err:
        make_plan(toy(H=12), 16, PAPER, forced=(1, 16))
    assert str(err.value) == (
        "forced m=1 x n=16 is infeasible: H=12 heads not divisible by n=16 (sites 0-1). "
        "Feasible splits of 16: m=4 x n=4, m=8 x n=2, m=16 x n=1")
    with pytest.raises(PlanError, match=r"forced m=3 x n=4 = 12 devices, but devices=16; "
                                        r"feasible splits of 16: m=4 x n=4"):
        make_plan(toy(H=12), 16, PAPER, forced=(3, 4))
    with pytest.raises(PlanError, match=r"forced \(m, n\) must be two positive integers, got "
                                        r"\(-1, -16\)"):
        make_plan(toy(H=12), 16, PAPER, forced=(-1, -16))


def test_no_feasible_split_lists_device_counts_that_fit():
    with pytest.raises(PlanError, match=r"no \(m, n\) split of 16 devices .* device counts that "
                                        r"fit \(up to 16\): 1, 2, 3, 4, 6, 8, 9, 12$"):
        make_plan(toy(H=12, d=6, D=72), 16, PAPER)
    with pytest.raises(PlanError, match="devices must be a positive integer, got 0; try 8 or 16"):
        make_plan(toy(), 0, PAPER)


def test_model_without_attention_plans_m_1_over_all_devices():
    plan = make_plan(toy(attention=False), 8, NODE)
    assert plan.no_attention and (plan.m, plan.n) == (1, 8)
    assert plan.sites == () and plan.mlps == 2 and len(plan.cost.mlps) == 2
    infeasible = [cc.candidate for cc in plan.candidates if not cc.candidate.feasible]
    assert [c.reasons for c in infeasible] == [("no attention: only n = devices",)] * 3


def test_plan_yaml_round_trips_with_m_and_n_at_top_level(tmp_path):
    plan = make_plan(toy(), 16, PAPER)
    text = plan.to_yaml()
    data = yaml.safe_load(text)
    assert (data["m"], data["n"], data["devices"]) == (plan.m, plan.n, 16)
    assert data["variants"] == list(plan.variants)
    assert Plan.from_yaml(text) == plan
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    again = Plan.from_yaml(path)
    assert again == plan and again.sites[0].cost == plan.cost.sites[0]
    assert Plan.from_yaml(str(path)) == plan


def test_malformed_plan_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("devices: 16\nm: [1\nn: 16\n")
    with pytest.raises(HelixError, match=r"plan file '.*broken.yaml': line \d+, column \d+ is "
                                         r"not valid YAML"):
        Plan.from_yaml(path)


def test_wrongly_typed_or_unknown_plan_keys_name_the_key(tmp_path):
    text = make_plan(toy(), 16, PAPER).to_yaml()
    path = tmp_path / "typed.yaml"
    path.write_text(text.replace("\nm: ", "\nm: two #", 1))
    with pytest.raises(HelixError, match=r"plan file '.*typed.yaml'\.m: expected int, got 'two"):
        Plan.from_yaml(path)
    path.write_text(text.replace("\nmlps: 2", "\nmlps: 2\nfavourite: 3", 1))
    with pytest.raises(HelixError, match=r"typed.yaml'\.favourite: unknown key for Plan"):
        Plan.from_yaml(path)
    path.write_text(text.replace("    num_heads: 16", "    num_heads: sixteen", 1))
    with pytest.raises(HelixError, match=r"\.sites\[0\]\.site\.num_heads: expected int"):
        Plan.from_yaml(path)
    with pytest.raises(HelixError, match="does not exist"):
        Plan.from_yaml(tmp_path / "nope.yaml")


def test_edited_variants_line_that_contradicts_the_sites_is_refused():
    plan = make_plan(toy(), 16, PAPER, forced=(2, 8), variant="qk-gather")
    data = plan.to_dict()
    data["variants"] = ["score-reduce", "qk-gather"]
    with pytest.raises(HelixError, match="variants is .* but the sites say"):
        Plan.from_yaml(yaml.safe_dump(data))


def test_plan_refuses_variants_that_do_not_match_m():
    plan = make_plan(toy(), 16, PAPER, forced=(1, 16))
    data = plan.to_dict()
    data["sites"][0]["variant"] = "qk-gather"
    data.pop("variants")
    with pytest.raises(HelixError, match="m = 1 takes 'heads'"):
        Plan.from_yaml(yaml.safe_dump(data))


def test_model_fingerprint_tells_summaries_apart():
    assert model_fingerprint(toy()) == model_fingerprint(toy())
    assert model_fingerprint(toy()) != model_fingerprint(toy(S=1024))
    assert model_fingerprint(toy()).startswith("toy-")


def test_table_marks_the_chosen_split_and_shows_baselines_and_reasons():
    plan = make_plan(toy(H=12), 16, PAPER)
    lines = format_table(plan).splitlines()
    starred = [line for line in lines if line.startswith("*")]
    assert len(starred) == 1 and f"m={plan.m} x n={plan.n}" in starred[0]
    assert any(line.startswith("  m=1 x n=16: H=12 heads not divisible by n=16") for line in lines)
    table = format_table(make_plan(toy(), 16, PAPER))
    assert "TP=8 x PP=2 (baseline)" in table and "TP=16 (baseline)" in table


def test_formula_listing_names_every_formula():
    text = format_formulas()
    assert "score_reduce_bytes" in text and "bubble_fraction" in text
    (ring,) = [line for line in text.splitlines() if line.startswith("ring_all_reduce ")]
    assert ring.endswith("= X*(2*p - 2)/(beta*p) + alpha")
