"""The solver: every (m, n) split of the devices, with a reason for each excluded one."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helix_compiler.planning.cluster import load_cluster
from helix_compiler.errors import HelixError, PlanError
from helix_compiler.planning.sites import AttentionSite, MlpSite, ModelSummary, Rotary
from helix_compiler.planning.solver import (
    NO_ATTENTION, Candidate, check_devices, feasible_device_counts, require_feasible, solve)


def make_site(index=0, *, H=16, H_kv=None, d=512, D=None, S=128, B=4, rotary=None,
              dtype="float16", o_proj=True, qk_norm=()) -> AttentionSite:
    """An attention site by hand: H heads of dim d, hidden D (default H*d)."""
    return AttentionSite(
        index=index, q_proj=f"q{index}", k_proj=f"k{index}", v_proj=f"v{index}",
        o_proj=f"o{index}" if o_proj else None, q_weight=f"l{index}.q.weight",
        k_weight=f"l{index}.k.weight", v_weight=f"l{index}.v.weight",
        o_weight=f"l{index}.o.weight" if o_proj else None, fused_qkv=False, num_heads=H,
        num_kv_heads=H_kv or H, head_dim=d, embed_dim=D or H * d, core="sdpa", core_nodes=(),
        rotary=rotary, qk_norm=qk_norm, batch=B, q_len=S, kv_len=S, dtype=dtype)


def make_summary(*, layers=2, H=16, H_kv=None, d=512, D=None, F=None, S=128, B=4,
                 rotary=None, dtype="float16", dtype_bytes=2, attention=True,
                 name="toy", replicated=0, o_proj=True, qk_norm=()) -> ModelSummary:
    """`layers` blocks of attention (unless attention=False) + MLP (F = 4D)."""
    D = D or H * d
    F = F or 4 * D
    sites = tuple(make_site(i, H=H, H_kv=H_kv, d=d, D=D, S=S, B=B, rotary=rotary, dtype=dtype,
                            o_proj=o_proj, qk_norm=qk_norm)
                  for i in range(layers)) if attention else ()
    mlps = tuple(MlpSite(index=i, up=(f"up{i}",), down=f"down{i}", up_weights=(f"l{i}.up.weight",),
                         down_weight=f"l{i}.down.weight", hidden=D, ffn=F, tokens=B * S,
                         dtype=dtype) for i in range(layers))
    kv = H_kv or H
    attn = (2 * D * H * d + 2 * D * kv * d) if o_proj else (D * H * d + 2 * D * kv * d)
    params = layers * ((attn if attention else 0) + 2 * D * F) + replicated
    return ModelSummary(sites=sites, mlps=mlps, param_elements=params,
                        replicated_elements=replicated, dtype_bytes=dtype_bytes, batch=B,
                        seq_len=S, name=name)


def by_split(candidates) -> dict[tuple[int, int], Candidate]:
    return {(c.m, c.n): c for c in candidates}


def test_16_heads_of_512_on_16_devices_admit_all_five_splits():
    cands = solve(make_summary(H=16, d=512), 16)
    assert [(c.m, c.n) for c in cands] == [(1, 16), (2, 8), (4, 4), (8, 2), (16, 1)]
    assert all(c.feasible and c.reasons == () for c in cands)


def test_12_heads_on_16_devices_force_m_above_one_with_head_reasons():
    cands = by_split(solve(make_summary(H=12, d=64), 16))
    assert not cands[1, 16].feasible and not cands[2, 8].feasible
    assert cands[1, 16].reasons == ("H=12 heads not divisible by n=16 (sites 0-1)",)
    assert cands[2, 8].reasons == ("H=12 heads not divisible by n=8 (sites 0-1)",)
    assert [c for c, x in cands.items() if x.feasible] == [(4, 4), (8, 2), (16, 1)]


def test_head_dim_not_divisible_by_m_is_a_reason():
    cands = by_split(solve(make_summary(H=4, d=48), 32))
    assert cands[32, 1].reasons == ("head dim d=48 not divisible by m=32 (sites 0-1)",)
    assert cands[16, 2].feasible


def test_gqa_32_query_8_kv_heads_fits_n_16_by_replication_but_not_n_3():
    ok = by_split(solve(make_summary(H=32, H_kv=8, d=128), 16))
    assert ok[1, 16].feasible                     # each kv head replicated over 2 groups
    bad = by_split(solve(make_summary(H=32, H_kv=8, d=128), 3))
    assert not bad[1, 3].feasible
    assert "H_kv=8 kv heads not divisible by n=3 (sites 0-1)" in bad[1, 3].reasons


def test_gqa_replication_needs_n_a_multiple_of_kv_heads():
    cands = by_split(solve(make_summary(H=24, H_kv=8, d=64), 12))
    assert cands[1, 12].reasons == (
        "n=12 is not a multiple of H_kv=8 kv heads (each kv head must be replicated over a "
        "whole number of groups) (sites 0-1)",)
    assert cands[2, 6].reasons == ("H_kv=8 kv heads not divisible by n=6 (sites 0-1)",)


def test_rotary_half_needs_whole_pairs_per_slice():
    # d=96, r=32 'half': 16 pairs (t, t+16); m=16 gets one pair a slice, m=32 cannot
    summary = make_summary(H=1, d=96, rotary=Rotary(dims=32, style="half"), layers=1)
    cands = by_split(solve(summary, 32))
    assert not cands[32, 1].feasible
    assert cands[32, 1].reasons == (
        "rotary 'half' r=32: its r/2=16 pairs (t, t+16) cannot be dealt evenly to m=32 slices "
        "(site 0)",)
    assert by_split(solve(summary, 16))[16, 1].feasible


def test_rotary_interleaved_needs_an_even_number_of_dims_per_slice():
    summary = make_summary(H=1, d=64, rotary=Rotary(dims=32, style="interleaved"), layers=1)
    bad = by_split(solve(summary, 32))[32, 1]
    assert not bad.feasible and bad.reasons[0].startswith(
        "rotary 'interleaved' r=32: r/m=1 dims per slice is not a whole number of pairs")
    assert by_split(solve(summary, 16))[16, 1].feasible


def test_rotary_is_no_constraint_at_m_1():
    summary = make_summary(H=8, d=64, rotary=Rotary(dims=6, style="half"), layers=1)
    assert by_split(solve(summary, 8))[1, 8].feasible
    assert not by_split(solve(summary, 8))[2, 4].feasible   # 3 pairs over 2 slices


def test_no_attention_model_only_admits_m_1():
    cands = by_split(solve(make_summary(attention=False, d=64, H=4), 8))
    assert cands[1, 8].feasible
    assert all(c.reasons == (NO_ATTENTION,) for s, c in cands.items() if s != (1, 8))


def test_uneven_mlp_never_excludes_a_split():
    assert all(c.feasible for c in solve(make_summary(H=16, d=64, F=1000), 16))


def test_memory_excludes_splits_on_a_tiny_memory_cluster(tmp_path):
    text = load_cluster_text().replace("memory_gb: 80", "memory_gb: 0.01")
    (tmp_path / "tiny.yaml").write_text(text)
    tiny = load_cluster(tmp_path / "tiny.yaml")
    summary = make_summary(H=16, d=128, S=1024)
    cands = solve(summary, 16, tiny)
    assert not any(c.feasible for c in cands)
    for c in cands:
        (reason,) = c.reasons
        assert reason.startswith("memory: one sequence needs ") and "GiB usable of" in reason
    assert all(c.feasible for c in solve(summary, 16, load_cluster("paper")))


def test_more_devices_than_the_cluster_has_is_a_reason():
    cands = solve(make_summary(H=32, d=64), 32, load_cluster("paper"))
    assert all(not c.feasible for c in cands)
    assert by_split(cands)[1, 32].reasons == (
        "32 devices but cluster 'paper' has 16 GPUs (2 nodes x 8)",)


@pytest.mark.parametrize("devices", [0, -4, 2.5, True, "8", None])
def test_devices_must_be_a_positive_int(devices):
    with pytest.raises(PlanError, match="devices must be a positive integer, got .*; try 8 or 16"):
        check_devices(devices)
    with pytest.raises(PlanError):
        require_feasible(make_summary(), devices)


def test_require_feasible_lists_the_device_counts_that_fit():
    summary = make_summary(H=12, d=6, D=72)
    with pytest.raises(PlanError) as err:
        require_feasible(summary, 16)
    msg = str(err.value)
    assert "no (m, n) split of 16 devices fits model 'toy'" in msg
    assert "m=1 x n=16: H=12 heads not divisible by n=16" in msg
    assert msg.endswith("device counts that fit (up to 64): 1, 2, 3, 4, 6, 8, 9, 12, 18, 24, 36")
    assert [(c.m, c.n) for c in require_feasible(summary, 12)] == [(1, 12), (2, 6), (3, 4), (6, 2)]


def test_feasible_device_counts_of_power_of_two_heads_and_dims():
    assert feasible_device_counts(make_summary(H=16, d=512), 20) == (1, 2, 4, 8, 16)


def test_candidate_rejects_feasible_with_reasons():
    with pytest.raises(HelixError, match="contradicts"):
        Candidate(m=1, n=2, feasible=True, reasons=("x",))


@settings(max_examples=60, deadline=None)
@given(H_kv=st.sampled_from([1, 2, 4, 8]), group=st.integers(1, 4),
       d=st.sampled_from([16, 48, 64, 96, 128]), devices=st.integers(1, 48))
def test_every_split_is_listed_and_feasible_ones_divide_heads_and_dims(H_kv, group, d, devices):
    H = H_kv * group
    cands = solve(make_summary(H=H, H_kv=H_kv, d=d, layers=1), devices)
    assert sorted(c.m * c.n for c in cands) == [devices] * len(cands)
    assert len({(c.m, c.n) for c in cands}) == len(cands)
    for c in cands:
        assert c.feasible == (H % c.n == 0 and d % c.m == 0
                              and (H_kv % c.n == 0 if c.n <= H_kv else c.n % H_kv == 0))


def load_cluster_text() -> str:
    from importlib import resources
    return (resources.files("helix_compiler.planning") / "clusters" / "paper.yaml").read_text()
