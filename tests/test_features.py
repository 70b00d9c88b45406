"""One real implementation per attention feature (tests/attention_models.py): find_attention
reports every site with its heads and features, and every feasible (m, n) split of the
model's device counts, both m > 1 variants, gives ranks that each equal the unsharded model
and hold the planned collectives.

A feature Helix does not handle yet stays here as a strict xfail whose reason is the error
it gives (KNOWN_FAILURES); docs/features.md lists only what passes.
"""

from __future__ import annotations

import pytest

from helix_compiler.pipeline import analyze
from helix_compiler.solver import solve
from tests.attention_models import FEATURE_MODELS, FeatureModel
from tests.helpers import check_split, eager_output, expected_collectives, feasible_splits, variants_for

# Features that are only exercised when the head dim is split (m > 1).
NEEDS_M_ABOVE_ONE = {"rotary_full", "rotary_partial", "qk_norm", "m_forced"}

# Errors find_attention / helix_compile give today, by model name; each keeps the model's
# tests as strict xfails whose reason is the error. Empty: the Falcon (x @ W.T projections,
# index-split fused QKV), BLOOM (baddbmm ALiBi scores), Qwen3 (q_norm / k_norm) and
# nn.TransformerDecoder (cross-attention from a split in_proj_weight) failures that this
# file found are fixed.
KNOWN_FAILURES: dict[str, str] = {}
# Site records that are wrong while the sharding itself is exact (T5 eager and MPT reported
# head_bias=False before; fixed).
RECORD_FAILURES: dict[str, str] = {}


def _xfail(reason: str | None):
    return () if reason is None else pytest.mark.xfail(strict=True, reason=reason)


def _record_params():
    return [pytest.param(e, id=e.name,
                         marks=_xfail(KNOWN_FAILURES.get(e.name) or RECORD_FAILURES.get(e.name)))
            for e in FEATURE_MODELS]


def _split_params():
    return [pytest.param(e, devices, id=f"{e.name}-{devices}", marks=_xfail(KNOWN_FAILURES.get(e.name)))
            for e in FEATURE_MODELS for devices in e.devices]


@pytest.fixture(scope="module")
def built():
    cache: dict[str, tuple] = {}

    def get(entry: FeatureModel):
        if entry.name not in cache:
            model, args, kwargs = entry.build()
            cache[entry.name] = (model, args, kwargs, eager_output(model, args, kwargs),
                                 analyze(model, args, kwargs))
        return cache[entry.name]

    return get


@pytest.mark.parametrize("entry", _record_params())
def test_find_attention_reports_every_site_with_its_heads_and_features(entry, built):
    *_, analysis = built(entry)
    sites = analysis.summary.sites
    assert analysis.skipped == (), analysis.skipped
    assert len(sites) == entry.sites
    assert [(s.num_heads, s.num_kv_heads, s.head_dim) for s in sites] == \
        [(entry.heads, entry.kv_heads, entry.head_dim)] * entry.sites
    if entry.rotary_dims:
        assert [(s.rotary.dims, s.rotary.style) if s.rotary else None for s in sites] == \
            [(entry.rotary_dims, "half")] * entry.sites
    else:
        assert all(s.rotary is None for s in sites), [s.rotary for s in sites]
    assert [bool(s.qk_norm) for s in sites] == [entry.qk_norm] * entry.sites
    assert [s.head_bias for s in sites] == [entry.head_bias] * entry.sites
    assert sum(s.cross for s in sites) == entry.cross_sites
    for s in sites:
        assert s.core == ("sdpa" if "sdpa" in entry.features else "explicit"), s
        if s.cross:
            assert s.kv_len != s.q_len, s


@pytest.mark.parametrize("entry", [
    pytest.param(e, id=e.name, marks=_xfail(KNOWN_FAILURES.get(e.name))) for e in FEATURE_MODELS
    if (NEEDS_M_ABOVE_ONE | {"gqa", "mqa"}) & set(e.features)])
def test_solver_admits_the_splits_the_feature_is_about(entry, built):
    """m > 1 for rotary / q-k norm / 12 heads on 16 devices; n > H_kv for GQA and MQA."""
    *_, analysis = built(entry)
    assert len(analysis.summary.sites) == entry.sites, analysis.skipped
    splits = {s for d in entry.devices for s in feasible_splits(analysis.summary, d)}
    if NEEDS_M_ABOVE_ONE & set(entry.features):
        assert any(m > 1 for m, _ in splits), splits
    if {"gqa", "mqa"} & set(entry.features):
        assert any(n > entry.kv_heads for _, n in splits), splits


def _check_collectives(prog, entry: FeatureModel, m: int, n: int, variant: str | None) -> None:
    sites = prog.plan.sites
    want = expected_collectives(m=m, n=n, variant=variant, sites=len(sites),
                                o_projs=sum(sp.site.o_proj is not None for sp in sites), mlps=prog.plan.mlps)
    for r in range(m * n):
        got = dict(prog.collectives(r))
        if entry.qk_norm and m > 1:
            # The per-head norm's statistics over d are all-reduced in the m-group on top of
            # the site's own collectives (how many depends on the norm: mean and variance, or
            # the mean square).
            extra = got.get("all_reduce:dim", 0) - want.get("all_reduce:dim", 0)
            assert extra > 0, f"rank {r}: no all_reduce over 'dim' for the q/k norms: {got}"
            got["all_reduce:dim"] -= extra
            got = {k: v for k, v in got.items() if v}
        assert got == want, f"m={m} x n={n} {variant or 'heads'} rank {r}: {prog.collectives(r)} != {want}"


# 3-17 s each on two cores, most of it torch.export: helix_compile captures the model again
# for every split.
@pytest.mark.slow
@pytest.mark.parametrize("entry,devices", _split_params())
def test_every_feasible_split_and_variant_equals_unsharded_model(entry, devices, built):
    model, args, kwargs, want, analysis = built(entry)
    assert len(analysis.summary.sites) == entry.sites, \
        f"find_attention found {len(analysis.summary.sites)} of {entry.sites} sites: {analysis.skipped}"
    splits = feasible_splits(analysis.summary, devices)
    assert splits, [c.reasons for c in solve(analysis.summary, devices)]
    for m, n in splits:
        for variant in variants_for(m):
            prog = check_split(model, args, kwargs, want, m=m, n=n, variant=variant)
            assert len(prog.plan.sites) == entry.sites
            _check_collectives(prog, entry, m, n, variant)


def test_12_heads_on_16_devices_admit_only_splits_whose_n_divides_12(built):
    entry = next(e for e in FEATURE_MODELS if e.name == "gpt2_12_heads")
    *_, analysis = built(entry)
    cands = {(c.m, c.n): c for c in solve(analysis.summary, 16)}
    assert [k for k, c in cands.items() if c.feasible] == [(4, 4), (8, 2)]
    assert any("H=12 heads not divisible by n=16" in r for r in cands[1, 16].reasons)
    assert any("H=12 heads not divisible by n=8" in r for r in cands[2, 8].reasons)
    assert any("d=8 not divisible by m=16" in r for r in cands[16, 1].reasons)


def test_32_heads_on_32_devices_admit_m_2(built):
    entry = next(e for e in FEATURE_MODELS if e.name == "paper_32_heads")
    *_, analysis = built(entry)
    assert feasible_splits(analysis.summary, 32) == [(1, 32), (2, 16), (4, 8), (8, 4)]
