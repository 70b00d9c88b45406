"""The sequence split s > 1 over an SDPA core (passes/explicit_cache_cores.py, docs/decode.md).

HF's StaticCache (helix_compiler/models/hf_static.py's adapter) under a small LLaMA with
attn_implementation="sdpa", driven with an attention mask (left-padded rows, a fully padded row):
every rank's prefill and decode step against the unsharded model for s in {2, 4}, positions that
cross chunk boundaries, MHA and GQA (greedy tokens against HF generate: tests/test_hf_generate.py); and the pass alone on SDPA's argument forms
(bool / float mask, a fully masked row, is_causal, enable_gqa, scale None).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from helix_compiler.decode import compile_decoder
from passes.decode_core import split_kv_cores
from passes.explicit_cache_cores import explicit_cache_cores

from tests.helpers import assert_decode_equal, hf_llama_decoder, padded_prompt

DEVICES = 4
SDPA = torch.ops.aten.scaled_dot_product_attention.default
SAFE_SOFTMAX = torch.ops.aten._safe_softmax.default
CHUNK = torch.ops.helix.chunk_attention.default


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads, split, variant", [
    (4, (2, 1, 2), None), (2, (4, 1, 1), None), (2, (2, 2, 1), "score-reduce")], ids=lambda x: str(x))
def test_hf_sdpa_sequence_split_every_rank_equals_unsharded_across_chunk_boundaries(kv_heads, split, variant):
    # S_max 24: s = 2 chunks [0, 12), [12, 24); s = 4 chunks of 6. A 10-token prompt spans
    # chunks 0 .. 1 (s = 4); steps at positions 10 .. 13 cross the boundary at 12.
    model, ref = hf_llama_decoder("sdpa", kv_heads, 3, 24), hf_llama_decoder("sdpa", kv_heads, 3, 24)
    tokens, valid = padded_prompt(3, 24, 10)
    prog = compile_decoder(model, DEVICES, split, variant=variant, prompt_len=10)
    s, m, n = split
    label = f"hf sdpa H_kv={kv_heads} s={s} m={m} n={n} {variant or 'heads'}"
    assert (prog.mesh.s, prog.mesh.m, prog.mesh.n) == (s, m, n), label
    assert len(prog.step_program.plan.sites) == 2 and not prog.step_program.unpartitioned, label
    # the captured step's cores are SDPA (m = 1) or the score-reduce tail; every rank's modules
    # have them written out and combined (one all-gather over "seq" per layer; m = n = 1: and
    # one sum all-reduce over "seq", as there is no output all-reduce to fold the sum into)
    fused = [nd for nd in prog.step_program.rank_module(0).graph.nodes
             if nd.op == "call_function" and (nd.target is SDPA or "attend" in str(nd.target))]
    assert len(fused) == 2, (label, [nd.target for nd in fused])
    for r in range(DEVICES):
        for gm in prog.modules[r]:
            nodes = list(gm.graph.nodes)
            assert not any(nd.target is SDPA or "attend" in str(nd.target) for nd in nodes), label
            seq = [nd for nd in nodes if nd.target in (torch.ops.helix.all_reduce.default,
                                                       torch.ops.helix.all_gather.default) and nd.args[1] == "seq"]
            assert sorted(str(nd.target) for nd in seq) == (
                ["helix.all_gather.default"] * 2 + ["helix.all_reduce.default"] * (2 if m * n == 1 else 0)), (label, r)
            # the safe softmax's combine: a row -inf in every chunk has L = 0, divided as 1
            # (SDPA's 0 row): L's masked_fill within 4 ops of each all-gather
            assert all(_l_guarded(nd) for nd in seq if nd.target is torch.ops.helix.all_gather.default), (label, r)
    assert_decode_equal(prog, ref, tokens, valid, range(10, 14), devices=DEVICES, label=label)
    # exactly 1/N of the cache per rank: 2 layers x (k, v) x B 3 x H_kv x 24 positions x d 8
    assert [prog.cache_bytes(r) for r in range(DEVICES)] == [2 * 2 * 3 * kv_heads * 24 * 8 * 4 // DEVICES] * DEVICES


def _l_guarded(gather) -> bool:
    """A masked_fill(L == 0, 1.0) within 4 ops downstream of `gather` (seq_split's L guard)."""
    near, todo = set(), [(gather, 0)]
    while todo:
        node, depth = todo.pop()
        for u in node.users:
            if u not in near and depth < 4:
                near.add(u)
                todo.append((u, depth + 1))
    return any(u.target is torch.ops.aten.masked_fill.Scalar and u.args[2] == 1.0 for u in near)


class SdpaCache(nn.Module):
    """One layer's q / k / v over a (B, H_kv, S_max, d) cache, written at cache_position and
    read by SDPA in one of its argument forms."""

    def __init__(self, form: str, kv_heads: int) -> None:
        super().__init__()
        self.form, self.kv_heads = form, kv_heads
        self.q_proj = nn.Linear(16, 16, bias=False)
        self.k_proj = nn.Linear(16, 4 * kv_heads, bias=False)
        self.v_proj = nn.Linear(16, 4 * kv_heads, bias=False)
        self.register_buffer("k_cache", torch.randn(3, kv_heads, 8, 4))
        self.register_buffer("v_cache", torch.randn(3, kv_heads, 8, 4))

    def forward(self, x, cache_position, valid):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, 4, 4).transpose(1, 2)                       # (B, 4, T, 4)
        k = self.k_proj(x).view(B, T, self.kv_heads, 4).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, 4).transpose(1, 2)
        self.k_cache.index_copy_(2, cache_position, k)
        self.v_cache.index_copy_(2, cache_position, v)
        keep = (valid[:, None, None, :] > 0) & (torch.arange(8)[None, :] <= cache_position[:, None])
        gqa = self.kv_heads < 4
        if self.form == "bool":       # row 2 keeps nothing: SDPA gives 0 there
            return nn.functional.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=keep,
                                                              enable_gqa=gqa)
        if self.form == "float":
            bias = torch.where(keep, 0.0, float("-inf"))
            return nn.functional.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=bias,
                                                              scale=0.3, enable_gqa=gqa)
        return nn.functional.scaled_dot_product_attention(q, self.k_cache, self.v_cache, is_causal=True,
                                                          enable_gqa=gqa)


def _exported(form: str, kv_heads: int, positions: list[int]):
    """SdpaCache exported at len(positions) new tokens a row, and its inputs: row 1
    left-padded, row 2 all padding (no visible key)."""
    x, pos = torch.randn(3, len(positions), 16), torch.tensor(positions)
    valid = torch.ones(3, 8, dtype=torch.long)
    valid[1, :3] = 0
    valid[2] = 0
    with torch.no_grad():
        gm = torch.export.export(SdpaCache(form, kv_heads).eval(), (x, pos, valid)).module(check_guards=False)
    return gm, (x, pos, valid)


@pytest.mark.parametrize("form", ["bool", "float", "causal"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_explicit_cache_cores_equal_sdpa_on_every_argument_form(form, kv_heads):
    gm, (x, pos, valid) = _exported(form, kv_heads, [4, 5])
    with torch.no_grad():
        want = gm(x, pos, valid)
        out = explicit_cache_cores(gm, (x, pos, valid))
        got = out(x, pos, valid)
    assert sum(n.target is SDPA for n in gm.graph.nodes) == 1                 # the user's graph kept
    assert not any(n.target is SDPA for n in out.graph.nodes)
    assert sum(n.target is SAFE_SOFTMAX for n in out.graph.nodes) == 1
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if form != "causal":
        assert torch.equal(got[2], torch.zeros_like(got[2]))                   # as SDPA: 0, not NaN


def test_explicit_cache_cores_leaves_a_core_that_reads_no_cache():
    class Plain(nn.Module):
        def forward(self, q, k, v):
            return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    args = tuple(torch.randn(2, 4, 5, 8) for _ in range(3))
    gm = torch.export.export(Plain(), args).module(check_guards=False)
    assert explicit_cache_cores(gm, args) is gm


@pytest.mark.slow
def test_s1_decode_step_runs_its_cache_cores_split_kv_and_equals_unsharded():
    # s = 1 never runs explicit_cache_cores; with split_kv_core the step's one-position SDPA
    # cores over the cache run as helix.chunk_attention (passes/decode_core.py), the prefill
    # keeps SDPA, and every rank's step equals the unsharded model's on left-padded and fully
    # padded rows; by default the step keeps SDPA
    model, ref = hf_llama_decoder("sdpa", 2, 3, 16), hf_llama_decoder("sdpa", 2, 3, 16)
    tokens, valid = padded_prompt(3, 16, 6)
    prog = compile_decoder(model, 2, (1, 1, 2), prompt_len=6, split_kv_core=True)
    # a rank's 2 query heads over its 1 kv head: the kernel takes the cache, not repeat_kv's view
    assert prog.core_notes == tuple(
        f"step {n}: helix.chunk_attention (split-KV, K and V read un-repeated (g=2))" for n in
        ("scaled_dot_product_attention_default", "scaled_dot_product_attention_default_1"))
    for r in range(2):
        p_gm, s_gm = prog.modules[r]
        assert sum(n.target is SDPA for n in p_gm.graph.nodes) == 2, r
        assert sum(n.target is SDPA for n in s_gm.graph.nodes) == 0, r
        cores = [n for n in s_gm.graph.nodes if n.target is CHUNK]
        assert len(cores) == 2, r
        for core in cores:       # q (B, 2, 1, d) over K and V (B, 1, C, d): the cache writes
            q, k, v = (tuple(x.meta["val"].shape) for x in core.args[:3])
            assert q[1] == 2 and k[1] == v[1] == 1 and k[2] == 16, (q, k, v)
            assert all(x.target is torch.ops.aten.index_copy_.default for x in core.args[1:3]), core.args
        assert not any(n.target is torch.ops.aten.expand.default and n.meta["val"].dim() == 5
                       for n in s_gm.graph.nodes), r                       # the repeats dropped
        # one bias for both layers' cores, made from the step's one mask
        assert sum(n.target is torch.ops.aten.where.Scalar for n in s_gm.graph.nodes) == 1, r
    assert_decode_equal(prog, ref, tokens, valid, range(6, 10), devices=2, label="s=1 split-KV")
    # by default (auto) a rank of 3 sequences keeps SDPA, and says why; off: no core touched
    kept = compile_decoder(model, 2, (1, 1, 2), prompt_len=6)
    assert len(kept.core_notes) == 2 and all(
        "kept as SDPA (auto: 3 sequence(s), g=2" in n for n in kept.core_notes), kept.core_notes
    assert sum(n.target is SDPA for n in kept.modules[0][1].graph.nodes) == 2
    off = compile_decoder(model, 2, (1, 1, 2), prompt_len=6, split_kv_core=False)
    assert off.core_notes == ()
    assert sum(n.target is SDPA for n in off.modules[0][1].graph.nodes) == 2


@pytest.mark.slow
def test_s1_decode_step_takes_the_split_kv_core_by_default_where_it_was_measured_faster():
    """compile_decoder's default (split_kv_core=None): at most 2 sequences a rank with g >= 2
    query heads per kv head read un-repeated (decode_core.AUTO_*), the cores run split-KV, and
    every rank's step equals the unsharded model's on a left-padded and a fully padded row."""
    from passes import decode_core

    B = decode_core.AUTO_MAX_BATCH
    model, ref = hf_llama_decoder("sdpa", 2, B, 16), hf_llama_decoder("sdpa", 2, B, 16)
    tokens, valid = padded_prompt(B, 16, 6)
    prog = compile_decoder(model, 2, (1, 1, 2), prompt_len=6)
    assert prog.core_notes == tuple(
        f"step {n}: helix.chunk_attention (split-KV, K and V read un-repeated (g=2))" for n in
        ("scaled_dot_product_attention_default", "scaled_dot_product_attention_default_1"))
    assert_decode_equal(prog, ref, tokens, valid, range(6, 10), devices=2, label="s=1 auto")
    # one query head per kv head (g = 1, 4 ranks of 1 kv head and 1 query head): kept
    one = compile_decoder(model, 4, (1, 1, 4), prompt_len=6)
    assert all("auto" in n and "g=1" in n for n in one.core_notes), one.core_notes


@pytest.mark.parametrize("form", ["bool", "float", "causal"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_split_kv_cores_equal_sdpa_at_one_position_or_keep_it(form, kv_heads):
    gm, (x, pos, valid) = _exported(form, kv_heads, [5])
    with torch.no_grad():
        want = gm(x, pos, valid)
        out, sites = split_kv_cores(gm, (x, pos, valid))
        got = out(x, pos, valid)
    assert sum(n.target is SDPA for n in gm.graph.nodes) == 1                 # the user's graph kept
    (site,) = sites
    if form == "causal":     # a one-position query under is_causal sees key 0 only: kept
        assert not site.rewritten and "is_causal" in site.why
        assert sum(n.target is SDPA for n in out.graph.nodes) == 1
    else:
        assert site.rewritten
        assert [n.target for n in out.graph.nodes if n.target in (SDPA, CHUNK)] == [CHUNK]
        assert torch.equal(got[2], torch.zeros_like(got[2]))                   # as SDPA: 0, not NaN
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_rank_of_copied_kv_heads_reads_its_kv_head_once_for_all_its_query_heads():
    """n > H_kv (TP=16 of LLaMA-70B's 8 kv heads: 4 query heads a rank over one kv head,
    copied): the shard pass hands the core a slice of repeat_kv's heads, which reads one kv
    head (gqa_fold._sliced_repeat). The split-KV core takes that kv head's cache itself, g = 2
    here (8 heads over 2 kv heads on 4 ranks), so auto picks it at 2 sequences; s = 2 folds
    the chunk core alike. Every rank equals the unsharded model on a left-padded and a fully
    padded row."""
    model = hf_llama_decoder("sdpa", 2, 2, 16, heads=8)
    ref = hf_llama_decoder("sdpa", 2, 2, 16, heads=8)
    tokens, valid = padded_prompt(2, 16, 6)      # row 1 all padding over the prompt
    valid[0, :2] = 0                             # row 0 left-padded
    prog = compile_decoder(model, 4, (1, 1, 4), prompt_len=6)
    assert prog.core_notes == tuple(
        f"step {n}: helix.chunk_attention (split-KV, K and V read un-repeated (g=2))" for n in
        ("scaled_dot_product_attention_default", "scaled_dot_product_attention_default_1"))
    for r in range(4):
        cores = [n for n in prog.modules[r][1].graph.nodes if n.target is CHUNK]
        for core in cores:      # q (B, 2, 1, d) over the cache write of the rank's one kv head
            assert core.args[1].target is torch.ops.aten.index_copy_.default, core.args[1]
            assert tuple(core.args[1].meta["val"].shape)[1] == 1 and \
                tuple(core.args[0].meta["val"].shape)[1] == 2
    assert_decode_equal(prog, ref, tokens, valid, range(6, 10), devices=4, label="n > H_kv split-KV")
    split = compile_decoder(model, 8, (2, 1, 4), prompt_len=6)
    assert split.fold_notes and all(": folded (K and V read un-repeated, g=2" in x
                                    for x in split.fold_notes), split.fold_notes
    assert_decode_equal(split, ref, tokens, valid, range(6, 10), devices=8, label="n > H_kv s=2")


def test_a_slice_of_the_repeated_heads_is_a_repeat_where_it_keeps_one_kv_head_or_whole_groups():
    """gqa_fold's rule for a slice along the heads of repeat_kv(K) (K: 2 kv heads, g = 4):
    heads [0, 3) read kv head 0 (g' = 3), [4, 8) kv head 1 (g' = 4), [0, 8) all of K, and
    [2, 6) parts of two groups: not a repeat of one order (the reason)."""
    import torch.fx as fx

    from passes.gqa_fold import REPEATS, Repeat
    from passes.graph_utils import fake_shapes

    at = torch.ops.aten

    def rep(k):     # repeat_kv as the shard pass leaves it, then four slices of the heads
        r = at.reshape.default(at.expand.default(at.unsqueeze.default(k, 2), [1, 2, 4, 5, 8]),
                               [1, 8, 5, 8])
        return tuple(at.slice.Tensor(r, 1, a, b) for a, b in ((0, 3), (4, 8), (0, 8), (2, 6)))

    gm = fx.symbolic_trace(rep)
    fake_shapes(gm, (torch.randn(1, 2, 5, 8),))
    got = [REPEATS[n.target](n) for n in gm.graph.nodes if n.target is at.slice.Tensor]
    assert [(r.g, r.kv) for r in got[:3]] == [(3, (0, 1)), (4, (1, 2)), (4, None)], got
    assert all(isinstance(r, Repeat) and r.source.op == "placeholder" for r in got[:3])
    assert isinstance(got[3], str) and "parts of two kv heads' groups" in got[3]
