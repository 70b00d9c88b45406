"""One real implementation per attention feature (tests/attention_models.py): find_attention
reports every site with its heads and features, and every feasible (m, n) split of the
model's device counts, both m > 1 variants, gives ranks that each equal the unsharded model
and hold the planned collectives.

A feature Helix does not handle yet stays here as a strict xfail whose reason is the error
it gives (KNOWN_FAILURES); docs/features.md lists only what passes.
"""

from __future__ import annotations

import pytest

from helix_compiler.planning.solver import solve
from tests.attention_models import FEATURE_MODELS, FEATURE_MODELS_BY_NAME, FeatureModel
from tests.helpers import (assert_ranks_equal, captured_program, check_split, compile_split, eager_output,
                           expected_collectives, feasible_splits, variants_for)

# Features that are only exercised when the head dim is split (m > 1).
NEEDS_M_ABOVE_ONE = {"rotary_full", "rotary_partial", "rotary_interleaved", "rotary_complex", "qk_norm",
                     "m_forced"}

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
                                 captured_program(model, args, kwargs).analysis)
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
            [(entry.rotary_dims, entry.rotary_style)] * entry.sites
    else:
        assert all(s.rotary is None for s in sites), [s.rotary for s in sites]
    assert [bool(s.qk_norm) for s in sites] == [entry.qk_norm] * entry.sites
    assert [s.head_bias for s in sites] == [entry.head_bias] * entry.sites
    assert sum(s.cross for s in sites) == entry.cross_sites
    assert [(s.k_shared_dims, s.v_head_dim) for s in sites] == \
        [(entry.k_shared_dims, entry.v_head_dim or entry.head_dim)] * entry.sites
    assert [s.gate_proj is not None for s in sites] == [entry.gated] * entry.sites
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
    if m > 1 and entry.extra_dim_reduces:
        want["all_reduce:dim"] = want.get("all_reduce:dim", 0) + entry.extra_dim_reduces * len(sites)
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


@pytest.mark.parametrize("name", ["deepseek_v2_mla_eager", "deepseek_v3_mla_eager"])
def test_mla_sites_split_heads_only_and_the_solver_says_why_not_m_above_1(name, built):
    """The rope key of MLA is one tensor read by every head: heads split, head dims do not."""
    *_, analysis = built(FEATURE_MODELS_BY_NAME[name])
    cands = {(c.m, c.n): c for c in solve(analysis.summary, 8)}
    assert [k for k, c in cands.items() if c.feasible] == [(1, 8)]
    for m in (2, 4, 8):
        assert any("4 of the d=12 key dims come from one projection shared by all heads" in r
                   for r in cands[m, 8 // m].reasons), cands[m, 8 // m].reasons


def test_32_heads_on_32_devices_admit_m_2(built):
    entry = next(e for e in FEATURE_MODELS if e.name == "paper_32_heads")
    *_, analysis = built(entry)
    assert feasible_splits(analysis.summary, 32) == [(1, 32), (2, 16), (4, 8), (8, 4)]


def _resized(args, kwargs, program):
    """The example inputs at other sizes: every symbolic size of the capture grows by 1 (one
    value per symbol, so ids and their attention mask stay consistent); fixed sizes stay."""
    import torch
    import torch.fx._pytree as fx_pytree
    import torch.utils._pytree as pytree

    gm = program.analysis.captured.gm
    spec = gm.graph._codegen.pytree_info.in_spec
    leaves = fx_pytree.tree_flatten_spec((args, kwargs), spec)
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    new_value = {}
    out = []
    gen = torch.Generator().manual_seed(1)
    for node, x in zip(holders, leaves):
        v = node.meta.get("val")
        if not isinstance(x, torch.Tensor) or not isinstance(v, torch.Tensor):
            out.append(x)
            continue
        shape = []
        for size in v.shape:
            if isinstance(size, torch.SymInt):
                expr = size.node.expr
                env = size.node.shape_env
                values = getattr(env, "backed_var_to_val", None) or env.var_to_val  # torch 2.11: var_to_val
                for sym in expr.free_symbols:
                    new_value.setdefault(sym, int(values[sym]) + 1)
                shape.append(int(expr.subs(new_value)))
            else:
                shape.append(int(size))
        if x.dtype == torch.bool:
            out.append(torch.ones(shape, dtype=torch.bool))
        elif x.is_floating_point():
            out.append(torch.randn(shape, generator=gen, dtype=x.dtype))
        elif x.numel() and x.min() >= 0 and x.max() <= 1:  # an attention mask of 0/1
            out.append(torch.ones(shape, dtype=x.dtype))
        else:
            out.append(torch.randint(0, int(x.max()) + 1, shape, generator=gen, dtype=x.dtype))
    new_args, new_kwargs = pytree.tree_unflatten(out, spec)
    return tuple(new_args), dict(new_kwargs)


@pytest.mark.parametrize("entry", [pytest.param(e, id=e.name) for e in FEATURE_MODELS])
def test_the_same_program_runs_another_batch_and_sequence_size(entry, built):
    """Dynamic shapes: one compile, a second batch and sequence size (static captures, for
    models that merge the batch into the head dim, refuse other sizes by name instead)."""
    from helix_compiler import HelixError

    model, args, kwargs, _, analysis = built(entry)
    m, n = feasible_splits(analysis.summary, 4)[-1]
    prog = compile_split(model, args, kwargs, m=m, n=n, variant=None if m == 1 else "score-reduce")
    new_args, new_kwargs = _resized(args, kwargs, prog)
    if not prog.analysis.captured.dynamic:
        pytest.skip(f"captured with static shapes: {prog.notes}")
    if all(a.shape == b.shape for a, b in zip(
            [t for t in (*args, *kwargs.values()) if hasattr(t, "shape")],
            [t for t in (*new_args, *new_kwargs.values()) if hasattr(t, "shape")])):
        pytest.skip("no input size of this model is symbolic")
    try:
        outputs = prog.simulate(*new_args, **new_kwargs)
    except HelixError as e:
        pytest.fail(f"the program refused sizes the capture made symbolic: {e}")
    assert_ranks_equal(outputs, eager_output(model, new_args, new_kwargs), devices=m * n)
