"""passes/gqa_fold.py: an s > 1 chunk core over a GQA cache reads the cache un-repeated (issue
#15; docs/decode.md, "The sequence split s").

HF LLaMA with GQA (eager and sdpa: both run repeat_kv before the core) at s = 2 and 4, with a
left-padded and a fully padded row: every rank equals the model, and no node of any rank's
prefill or step materializes (B, h, C, d) from its cache chunk. MHA (g = 1) is left as it is;
a repeat in another order (head h reading kv head h % H_kv) is left unfolded and still exact.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from helix_compiler.decode import compile_decoder
from helix_compiler.models.decoder_cache import DecoderConfig, build
from passes.gqa_fold import fold_gqa
from passes.graph_utils import fake_shapes

from tests.helpers import assert_decode_equal, hf_llama_decoder, padded_prompt

DEVICES = 4
aten = torch.ops.aten
REPEATS = (aten.expand.default, aten.repeat.default, aten.repeat_interleave.self_int)


def _cache_reads(gm, caches) -> set:
    """Nodes of `gm` computed from one of the tensors `caches` (its cache chunk)."""
    mine = {id(t) for t in caches}
    seen = set()
    for nd in gm.graph.nodes:
        if (nd.op == "get_attr" and id(getattr(gm, nd.target)) in mine) \
                or any(a in seen for a in nd.all_input_nodes):
            seen.add(nd)
    return seen


def _repeated_shapes(gm, args, caches, heads: int) -> list:
    """Nodes computed from the cache chunk (B, h_kv, C, d) whose value is (B, heads, C, d) or a
    repeat op's output: a materialized repeat of the cache."""
    fake_shapes(gm, args)
    (B, _, C, d), = {tuple(t.shape) for t in caches}
    return [nd.name for nd in _cache_reads(gm, caches)
            if nd.target in REPEATS or (isinstance(nd.meta.get("val"), torch.Tensor)
                                        and tuple(nd.meta["val"].shape) == (B, heads, C, d))]


@pytest.mark.slow
# each core spelling once, each split once (test_decode_sdpa runs the SDPA LLaMA, GQA
# included, at (2, 1, 2) and (4, 1, 1) against the model on every rank)
@pytest.mark.parametrize("impl, split", [("eager", (2, 1, 2)), ("sdpa", (4, 1, 1))], ids=str)
def test_hf_llama_gqa_chunk_core_reads_cache_unrepeated_every_rank_equals_unsharded(impl, split):
    # H 4 over H_kv 2: g = 2 query heads per kv head on every rank (n = 2: h 2 over h_kv 1).
    # S_max 24, chunks of 12 (s = 2) or 6 (s = 4); steps 10 .. 13 cross chunk boundaries.
    model, ref = hf_llama_decoder(impl, 2, 3, 24), hf_llama_decoder(impl, 2, 3, 24)
    tokens, valid = padded_prompt(3, 24, 10)
    prog = compile_decoder(model, DEVICES, split, prompt_len=10)
    s, m, n = split
    label = f"hf {impl} H_kv=2 s={s} m={m} n={n}"
    # the pattern fired: each layer's core in the prefill and the step, K and V un-repeated
    assert len(prog.fold_notes) == 2 * 2, (label, prog.fold_notes)
    assert all(": folded (K and V read un-repeated, g=2" in x for x in prog.fold_notes), prog.fold_notes
    step_args = (tokens[:, :1], torch.tensor([10]), valid)
    for r in range(DEVICES):
        chunk = list(prog.caches[r].values())
        for gm, args in zip(prog.modules[r], ((tokens, valid), step_args)):
            assert _repeated_shapes(gm, args, chunk, heads=4 // n) == [], (label, r)
            # one all-gather of (max, sum) over "seq" per layer, as before the fold
            assert sum(nd.target is torch.ops.helix.all_gather.default and nd.args[1] == "seq"
                       for nd in gm.graph.nodes) == 2, (label, r)
    assert_decode_equal(prog, ref, tokens, valid, range(10, 14), devices=DEVICES, label=label)


@pytest.mark.slow
def test_hf_mha_core_is_left_as_it_is():
    # g = 1: HF's repeat_kv returns the cache itself, nothing to fold; run again, the fold
    # changes no node
    model, ref = hf_llama_decoder("eager", 4, 3, 24), hf_llama_decoder("eager", 4, 3, 24)
    tokens, valid = padded_prompt(3, 24, 10)
    prog = compile_decoder(model, 2, (2, 1, 1), prompt_len=10)
    assert len(prog.fold_notes) == 4 and all(": direct (no repeat of the cache (g = 1))" in x
                                             for x in prog.fold_notes), prog.fold_notes
    gm = prog.modules[0][1]
    mine = {id(t) for t in prog.caches[0].values()}
    again, sites = fold_gqa(gm, (tokens[:, :1], torch.tensor([10]), valid),
                            {a for a, t in gm.named_buffers() if id(t) in mine})
    assert [nd.target for nd in again.graph.nodes] == [nd.target for nd in gm.graph.nodes]
    assert [x.form for x in sites] == ["direct"] * 2
    assert_decode_equal(prog, ref, tokens, valid, range(10, 13), devices=2, label="hf mha s=2")


def test_helix_decoder_repeat_interleave_folded_g1_repeat_dropped():
    # Helix's decoder repeats by repeat_interleave: H 4 over H_kv 2 folded (g = 2); MHA's
    # repeat_interleave(k, 1) is a copy of the cache, dropped (g = 1, no views added)
    for kv_heads, g in ((2, 2), (4, 1)):
        cfg = DecoderConfig(kv_heads=kv_heads)
        model, ref = build(cfg), build(cfg)
        tokens = torch.randint(0, cfg.vocab, (cfg.batch, 6), generator=torch.Generator().manual_seed(2))
        valid = torch.ones(cfg.batch, cfg.max_seq, dtype=torch.long)
        valid[1, :3] = 0
        valid[-1, :6] = 0
        prog = compile_decoder(model, 2, (2, 1, 1), prompt_len=6)
        assert len(prog.fold_notes) == 2 * cfg.layers and all(
            f": folded (K and V read un-repeated, g={g} " in x for x in prog.fold_notes), prog.fold_notes
        for r in range(2):
            for gm in prog.modules[r]:
                assert not any(nd.target in REPEATS for nd in _cache_reads(gm, prog.caches[r].values())), r
        assert_decode_equal(prog, ref, tokens, valid, range(6, 9), devices=2, label=f"helix H_kv={kv_heads}")


class TiledCache(nn.Module):
    """One layer's explicit core over a (B, H_kv, S_max, d) cache written at cache_position,
    its kv heads repeated to H = 4 query heads in `order`."""

    def __init__(self, order: str) -> None:
        super().__init__()
        self.order = order
        self.q_proj = nn.Linear(16, 16, bias=False)
        self.kv_proj = nn.Linear(16, 16, bias=False)
        self.register_buffer("k_cache", torch.randn(3, 2, 8, 4))
        self.register_buffer("v_cache", torch.randn(3, 2, 8, 4))

    def repeat(self, x):
        B, Hkv, S, d = x.shape
        if self.order == "repeat_kv":      # HF's: head h reads kv head h // 2
            return x[:, :, None].expand(B, Hkv, 2, S, d).reshape(B, 4, S, d)
        if self.order == "interleave":     # Helix's models: the same order
            return x.repeat_interleave(2, dim=1)
        if self.order == "tiled":          # head h reads kv head h % 2: not repeat_kv's order
            return x[:, None].expand(B, 2, Hkv, S, d).reshape(B, 4, S, d)
        return x.repeat(1, 2, 1, 1)        # "repeat": tiled too

    def forward(self, x, cache_position, valid):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, 4, 4).transpose(1, 2)                      # (B, 4, T, 4)
        k, v = self.kv_proj(x).view(B, T, 2, 2, 4).permute(2, 0, 3, 1, 4)        # (B, 2, T, 4)
        self.k_cache.index_copy_(2, cache_position, k)
        self.v_cache.index_copy_(2, cache_position, v)
        keep = (valid[:, None, None, :] > 0) & (torch.arange(8)[None, :] <= cache_position[:, None])
        mask = torch.where(keep, 0.0, torch.finfo(torch.float32).min)
        scores = q @ self.repeat(self.k_cache).transpose(2, 3) * 0.5 + mask
        return torch.softmax(scores, dim=-1) @ self.repeat(self.v_cache)         # (B, 4, T, 4)


@pytest.mark.parametrize("order, form", [("repeat_kv", "folded"), ("interleave", "folded"),
                                         ("tiled", "unfolded"), ("repeat", "unfolded")])
def test_fold_fires_on_repeat_kv_order_only_and_is_exact(order, form):
    x, pos = torch.randn(3, 2, 16), torch.tensor([4, 5])
    valid = torch.ones(3, 8, dtype=torch.long)
    valid[1, :3] = 0
    valid[2] = 0                                                              # fully padded row
    with torch.no_grad():
        gm = torch.export.export(TiledCache(order).eval(), (x, pos, valid)).module(check_guards=False)
        want = gm(x, pos, valid)
        out, sites = fold_gqa(gm, (x, pos, valid), {"k_cache", "v_cache"})
        got = out(x, pos, valid)
    assert [site.form for site in sites] == [form], sites
    repeats = [nd for nd in out.graph.nodes if nd.target in REPEATS]
    if form == "folded":
        assert repeats == [] and "g=2" in sites[0].detail, (order, out.graph)
    else:
        assert len(repeats) == 2, order                        # left as it is: K and V repeated
        why = ("the size-g dim is not inserted right after H_kv" if order == "tiled" else
               "reads a repeat of the cache (repeat_1) that is not repeat_kv's")
        assert why in sites[0].detail, sites[0].detail
    assert any(nd.target in REPEATS for nd in gm.graph.nodes)  # the input graph is kept
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_gpu_benchmark_chunk_core_reads_kv_head_h_over_g_as_repeat_kv():
    # benchmarks/gpu_decode.py times the folded core: q (B, h_kv, g, d) against un-repeated K, V;
    # one chunk (s = 1) whose (max, sum) is the whole gather gives softmax(q k^T / sqrt d) v
    # with query head h reading kv head h // g, as HF's repeat_kv
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import gpu_decode
    finally:
        sys.path.pop(0)
    g = torch.Generator().manual_seed(0)
    B, Hkv, rep, C, d = 2, 2, 3, 7, 4
    q, k, v = (torch.randn(*s, generator=g) for s in ((B, Hkv, rep, d), (B, Hkv, C, d), (B, Hkv, C, d)))
    _, stats = gpu_decode._chunk_core(q, k, v, torch.ones(1, B, Hkv, rep, 2))
    got, _ = gpu_decode._chunk_core(q, k, v, stats[None])
    qh = q.reshape(B, Hkv * rep, 1, d)                                        # head h = kv h // g
    kh, vh = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    want = torch.softmax(qh @ kh.transpose(-1, -2) * d ** -0.5, -1) @ vh      # (B, H, 1, d)
    torch.testing.assert_close(got.reshape(B, Hkv * rep, 1, d), want, rtol=1e-5, atol=1e-6)
