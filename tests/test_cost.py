"""The cost model: each term against a hand computation, and its choices."""

from __future__ import annotations

import dataclasses
import math

import pytest
import sympy

from helix_compiler.planning import cost
from helix_compiler.planning.cluster import load_cluster
from helix_compiler.planning.cost import collective_s, cost_baseline, cost_plan, formulas
from helix_compiler.errors import HelixError, PlanError
from helix_compiler.planning.profile import DEFAULT_PROFILE, load_profile, profile_from_yaml
from tests.test_solver import make_summary

PAPER = load_cluster("paper")
NODE = load_cluster("h100x8")


def paper_model():
    """The paper's experiment: 2 layers, 16 heads of 512, D=8192, F=32768, B=1024, S=10000, fp16."""
    return make_summary(layers=2, H=16, d=512, D=8192, F=32768, B=1024, S=10_000, name="paper")


def term(site_cost, name: str) -> float:
    return dict(site_cost.terms)[name]


# --- collectives ----------------------------------------------------------------
def test_all_reduce_on_two_ranks_in_a_node_is_alpha_plus_bytes_over_busbw():
    nbytes = 64 * 2 ** 10          # under NO_COPY_ALL_REDUCE_MIN_BYTES: one NCCL all-reduce
    want = PAPER.nvlink_alpha + 2 * (1 / 2) * nbytes / PAPER.nvlink_busbw
    assert collective_s("all_reduce", nbytes, (0, 1), PAPER) == pytest.approx(want, rel=1e-12)


def test_a_large_all_reduce_is_reduce_scatter_plus_all_gather_one_latency_more():
    # runtime/collectives.py runs it as two collectives into fresh buffers (no copy of x)
    nbytes = 64 * 2 ** 20
    want = 2 * PAPER.nvlink_alpha + 2 * (1 / 2) * nbytes / PAPER.nvlink_busbw
    assert collective_s("all_reduce", nbytes, (0, 1), PAPER) == pytest.approx(want, rel=1e-12)


def test_all_gather_on_four_ranks_in_a_node_moves_three_quarters():
    nbytes = 10 ** 9
    want = PAPER.nvlink_alpha + (3 / 4) * nbytes / PAPER.nvlink_busbw
    assert collective_s("all_gather", nbytes, range(4, 8), PAPER) == pytest.approx(want)
    assert collective_s("reduce_scatter", nbytes, range(4, 8), PAPER) == pytest.approx(want)


def test_all_reduce_over_two_nodes_is_hierarchical_and_bounded_by_the_slower_phase():
    nbytes = 10 ** 10
    intra = 2 * (7 / 8) * nbytes / PAPER.nvlink_busbw
    inter = 2 * (1 / 2) * nbytes / (PAPER.nic_bandwidth * 8)     # 8 rails per node
    want = 2 * (PAPER.nvlink_alpha + PAPER.network_alpha) + max(intra, inter)   # split: 2 launches
    assert collective_s("all_reduce", nbytes, range(16), PAPER) == pytest.approx(want)


def test_a_group_with_one_gpu_per_node_runs_on_one_rail():
    nbytes = 10 ** 9
    want = 2 * (PAPER.nvlink_alpha + PAPER.network_alpha) + nbytes / PAPER.nic_bandwidth
    assert collective_s("all_reduce", nbytes, (0, 8), PAPER) == pytest.approx(want)


def test_a_collective_on_one_rank_costs_nothing_and_unknown_kinds_raise():
    assert collective_s("all_reduce", 10 ** 9, (3,), PAPER) == 0.0
    with pytest.raises(PlanError, match="unknown collective 'broadcast'"):
        collective_s("broadcast", 10, (0, 1), PAPER)


# --- formulas -------------------------------------------------------------------
def test_formulas_are_sympy_and_state_the_design_traffic():
    f = formulas()
    assert all(isinstance(e, sympy.Expr) for e in f.values())
    b, H, n, S, d, m, w, D = sympy.symbols("b H n S d m w D", positive=True)
    S_q, S_k, H_kv = sympy.symbols("S_q S_k H_kv", positive=True)
    assert sympy.simplify(f["score_reduce_bytes"] - w * b * (H / n) * S_q * S_k) == 0
    # MHA self-attention: gathered Q and K, 2 B S (H/n) d elements; the all-gather
    # formula applies (m-1)/m of it
    gathered = f["qk_gather_bytes"].subs({S_q: S, S_k: S, H_kv: H}).subs({H: 16, n: 4})
    assert sympy.simplify(gathered - 2 * b * S * 4 * d * w) == 0
    assert sympy.simplify(f["attn_out_bytes"] - w * b * S_q * D) == 0


def test_formula_listing_matches_the_numbers_computed():
    # the numbers come from the very expressions formulas() returns
    env = {"b": 3, "S_q": 100, "S_k": 100, "H": 8, "H_kv": 8, "d": 64, "m": 2, "n": 4, "w": 2}
    expr = formulas()["qk_flops_partial"]
    by_hand = 2 * 3 * (8 / 4) * 100 * 100 * 64 / 2
    assert float(expr.subs({sympy.Symbol(k, positive=True): v for k, v in env.items()})) == by_hand
    assert cost._ev("qk_flops_partial", env) == by_hand


# --- one plan, term by term ------------------------------------------------------
def small_model(**kw):
    return make_summary(**{"layers": 1, "H": 8, "d": 64, "S": 256, "B": 4, **kw})


def test_output_all_reduce_term_is_the_collective_of_b_s_d_over_all_ranks():
    summary = small_model()
    plan = cost_plan(summary, 2, 4, NODE)
    assert plan.micro_batch == 4 and plan.micro_batches == 1     # the whole batch fits
    nbytes = 2 * 4 * 256 * 512                                    # w * B * S * D
    want = collective_s("all_reduce", nbytes, range(8), NODE) * 1e3
    assert term(plan.sites[0], "output all-reduce") == pytest.approx(want)
    assert term(plan.mlps[0], "MLP all-reduce") == pytest.approx(want)


def test_score_reduce_all_reduces_the_scores_over_the_m_group():
    summary = small_model()
    plan = cost_plan(summary, 4, 2, NODE, variant="score-reduce")
    scores = 2 * 4 * (8 / 2) * 256 * 256                         # w * B * H/n * S_q * S_k
    assert scores >= 2 ** 20          # so reduce-scatter + all-gather: two launch latencies
    want = (2 * NODE.nvlink_alpha + 2 * (3 / 4) * scores / NODE.nvlink_busbw) * 1e3
    assert plan.variants == ("score-reduce",)
    assert term(plan.sites[0], "score all-reduce (m-group)") == pytest.approx(want)


def test_qk_gather_all_gathers_q_and_k_over_the_m_group():
    summary = small_model()
    plan = cost_plan(summary, 4, 2, NODE, variant="qk-gather")
    gathered = 2 * 2 * 4 * 256 * (8 / 2) * 64                      # w * 2 B S (H/n) d
    want = (NODE.nvlink_alpha + (3 / 4) * gathered / NODE.nvlink_busbw) * 1e3
    assert plan.variants == ("qk-gather",)
    assert term(plan.sites[0], "Q,K all-gather (m-group)") == pytest.approx(want)


def test_projection_time_is_the_roofline_of_its_flops_and_bytes():
    summary = small_model()
    plan = cost_plan(summary, 1, 8, NODE)
    B, S, D, hd = 4, 256, 512, 64                                 # one head of 64 per rank
    eff_mm = 756 / 989
    bw = NODE.memory_bandwidth * DEFAULT_PROFILE.elementwise_efficiency
    def roofline(flops, nbytes):
        eff = DEFAULT_PROFILE.matmul_efficiency(flops, "fp16")
        assert eff == pytest.approx(eff_mm)                       # one measured size bucket
        return max(flops / (NODE.peak_flops_fp16 * eff), nbytes / bw)
    q = roofline(2 * B * S * D * hd, 2 * (B * S * D + D * hd + B * S * hd))
    kv = roofline(2 * 2 * B * S * D * hd, 2 * 2 * (B * S * D + D * hd + B * S * hd))
    assert term(plan.sites[0], "q/k/v projections") == pytest.approx((q + kv) * 1e3)


def test_step_is_compute_plus_comm_and_tokens_per_second_follow():
    summary = small_model(layers=2)
    plan = cost_plan(summary, 2, 4, NODE)
    assert plan.bubble_ms == 0.0
    assert plan.step_ms == pytest.approx(plan.compute_ms + plan.comm_ms)
    assert plan.tokens_per_s == pytest.approx(4 * 256 / (plan.step_ms / 1e3))
    assert plan.comm_ms_per_token == pytest.approx(plan.comm_ms / (4 * 256))
    parts = plan.sites + plan.mlps
    assert plan.compute_ms == pytest.approx(sum(s.compute_ms for s in parts))
    assert plan.comm_ms == pytest.approx(sum(s.comm_ms for s in parts))


def test_m_1_sites_are_plain_heads():
    plan = cost_plan(small_model(layers=3), 1, 8, NODE)
    assert plan.variants == ("heads", "heads", "heads")


def test_short_sequences_pick_score_reduce_and_long_ones_qk_gather():
    short = cost_plan(small_model(d=512, H=4, S=64), 4, 2, NODE)
    long = cost_plan(small_model(d=64, H=8, S=8192, B=2), 4, 2, NODE)
    assert short.variants == ("score-reduce",)
    assert long.variants == ("qk-gather",)


def test_head_dim_above_256_has_no_fused_kernel_but_the_efficient_one():
    assert DEFAULT_PROFILE.attention_efficiency("cudnn", 512, "fp16") is None
    assert DEFAULT_PROFILE.attention_efficiency("flash", 512, "fp16") is None
    assert DEFAULT_PROFILE.attention_efficiency("efficient", 512, "fp16") == pytest.approx(
        129.6 / 989)
    plan = cost_plan(paper_model(), 1, 16, PAPER)
    # explicit matmul-softmax-matmul (~299 TFLOP/s) beats the efficient kernel (130) at d=512
    assert {s.backend for s in plan.sites} == {"explicit"}
    d256 = cost_plan(small_model(d=256, H=8, S=4096, B=2), 1, 8, NODE)
    assert {s.backend for s in d256.sites} == {"cudnn"}


def test_explicit_core_at_d_512_reproduces_the_measured_0_68_ms_per_head():
    # one 10k x 10k head of 512, alone on a rank: QK^T + softmax + PV
    one = make_summary(layers=1, H=1, d=512, D=512, S=10_000, B=1)
    site = cost_plan(one, 1, 1, NODE).sites[0]
    core = term(site, "QK^T") + term(site, "softmax") + term(site, "PV")
    assert core == pytest.approx(0.68, rel=0.02)


# --- memory -------------------------------------------------------------------------
def test_micro_batch_is_the_largest_number_of_sequences_that_fits():
    summary = make_summary(layers=2, H=16, d=128, S=8192, B=4096)
    plan = cost_plan(summary, 1, 8, NODE)
    usable = cost.MEMORY_USABLE_FRACTION * NODE.memory_bytes
    per_seq = (plan.memory_bytes_per_rank - 2 * plan.param_elements_per_rank) / plan.micro_batch
    assert 1 <= plan.micro_batch < 4096
    assert plan.memory_bytes_per_rank <= usable
    assert plan.memory_bytes_per_rank + per_seq > usable          # one more would not fit
    assert plan.micro_batches == math.ceil(4096 / plan.micro_batch)


def test_parameters_per_rank_shard_attention_and_mlp_and_keep_replicated_whole():
    summary = make_summary(layers=1, H=8, d=64, D=512, F=1000, replicated=12_345)
    plan = cost_plan(summary, 2, 4, NODE)
    attn = 4 * 512 * 512 // 8                      # q, k, v, o weights over 8 ranks
    mlp = 2 * 512 * math.ceil(1000 / 8)            # uneven F: the largest shard
    assert plan.param_elements_per_rank == 12_345 + attn + mlp


def test_kv_weights_are_replicated_when_n_exceeds_kv_heads():
    summary = make_summary(layers=1, H=8, H_kv=2, d=64, D=512, F=512)
    p8 = cost_plan(summary, 1, 8, NODE).param_elements_per_rank
    kv_per_rank = 2 * 512 * 64                     # one whole kv head each for k and v
    q_o_per_rank = 2 * 512 * 64
    mlp = 2 * 512 * 512 // 8
    assert p8 == q_o_per_rank + kv_per_rank + mlp


def test_a_plan_that_does_not_fit_raises_with_the_numbers():
    summary = make_summary(layers=1, H=8, d=64, S=4096, B=4)
    small = dataclasses.replace(NODE, memory_bytes=10 ** 6)
    with pytest.raises(PlanError, match=r"m=1 x n=8: memory: one sequence needs .* GiB per rank"):
        cost_plan(summary, 1, 8, small)


# --- baselines ---------------------------------------------------------------------
def test_pipeline_bubble_is_p_minus_1_over_m_plus_p_minus_1():
    summary = make_summary(layers=2, H=16, d=128, S=2048, B=256)
    base = cost_baseline(summary, 8, 2, PAPER)
    M = base.micro_batches
    assert 256 % base.micro_batch == 0
    assert base.bubble_ms / base.step_ms == pytest.approx(1 / (M + 1))
    assert base.step_ms == pytest.approx(base.compute_ms + base.comm_ms + base.bubble_ms)


def test_tp_over_all_devices_is_helix_with_m_1():
    summary = small_model(layers=2)
    assert cost_baseline(summary, 8, 1, NODE).tokens_per_s == pytest.approx(
        cost_plan(summary, 1, 8, NODE).tokens_per_s)


def test_baseline_refuses_tp_that_does_not_divide_heads_and_too_many_stages():
    with pytest.raises(PlanError, match="TP=16: H=12 heads not divisible by TP=16"):
        cost_baseline(make_summary(H=12, d=64), 16, 1, PAPER)
    with pytest.raises(PlanError, match="PP=4 stages need at least 4 layers, the model has 2"):
        cost_baseline(make_summary(H=16, d=64), 4, 4, PAPER)


def test_paper_experiment_numbers_are_physically_sensible():
    summary = paper_model()
    for m in (1, 2, 4, 8, 16):
        plan = cost_plan(summary, m, 16 // m, PAPER)
        assert 1e3 < plan.compute_ms < 1e5          # seconds for the 1024-sequence batch
        assert 1e5 < plan.tokens_per_s < 1e7
        assert plan.memory_bytes_per_rank <= 0.9 * PAPER.memory_bytes
    base = cost_baseline(summary, 8, 2, PAPER)
    assert 1e5 < base.tokens_per_s < 1e7 and base.bubble_ms > 0


# --- profile -------------------------------------------------------------------------
def test_profile_yaml_round_trips(tmp_path):
    path = tmp_path / "h100.yaml"
    path.write_text(DEFAULT_PROFILE.to_yaml())
    assert load_profile(path) == DEFAULT_PROFILE


def test_fp32_ops_use_the_fp16_efficiency_times_the_fp32_peak():
    assert DEFAULT_PROFILE.matmul_efficiency(1e12, "float32") == pytest.approx(756 / 989)


def test_matmul_rates_are_read_by_nearest_size_bucket():
    text = DEFAULT_PROFILE.to_yaml().replace(
        "rates:\n", "rates:\n- {op: matmul, shape: [512, 512, 512], dtype: fp16, tflops: 200}\n")
    prof = profile_from_yaml(text)
    assert prof.matmul_efficiency(2 * 600 ** 3, "fp16") == pytest.approx(200 / 989)
    assert prof.matmul_efficiency(2 * 8000 ** 3, "fp16") == pytest.approx(756 / 989)


def test_profile_errors_name_the_file_and_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEFAULT_PROFILE.to_yaml().replace("hbm_gb_s", "hbm_gbs"))
    with pytest.raises(HelixError, match=r"bad.yaml'.*unknown key 'hbm_gbs'"):
        load_profile(bad)
    bad.write_text("name: [unclosed\n")
    with pytest.raises(HelixError, match=r"bad.yaml': line 2.* is not valid YAML"):
        load_profile(bad)
    bad.write_text(DEFAULT_PROFILE.to_yaml().replace("tflops: 756.0", "tflops: fast"))
    with pytest.raises(HelixError, match=r"bad.yaml'.*rates\[0\].*tflops must be positive"):
        load_profile(bad)
    with pytest.raises(HelixError, match="does not exist; run `helix calibrate`"):
        load_profile(tmp_path / "missing.yaml")
