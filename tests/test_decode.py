"""Decode with a sharded static KV cache (helix_compiler/decode.py, docs/decode.md).

The model is helix_compiler/models/decoder_cache.py: k_cache / v_cache buffers (B, H_kv, S_max, d)
written by index_copy_ at cache_position, rotary at the cache position, GQA by repeat_interleave.
Every rank's decode step is compared with the unsharded model's, step after step, on prompts with
a left-padded row and a fully padded row: every (m, n) split of 4 devices, the sequence split s
across chunk boundaries, and HF's TorchExportableModuleWithStaticCache.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from helix_compiler import helix_compile
from helix_compiler.decode import cache_writes, check_partitioned, compile_decoder
from helix_compiler.planning.decode_plan import cost_decode
from helix_compiler.errors import HelixError
from helix_compiler.models.decoder_cache import DecodeStep, DecoderConfig, build, greedy_generate
from helix_compiler.pipeline import cluster_spec
from helix_compiler.runtime.mesh import Mesh
from passes.seq_split import split_sequence

from tests.helpers import assert_decode_equal, assert_ranks_equal, expected_collectives, feasible_splits, variants_for
from tests.test_unpartitioned import WhereCacheAttention

DEVICES = 4
PROMPT = 5
STEPS = 3
KV_HEADS = {"mha": 4, "gqa": 2, "mqa": 1}


def _prompt(cfg: DecoderConfig):
    """Tokens (B, P) and the valid positions (B, S_max): row 1 left-padded by 2, row 2 all padding."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab, (cfg.batch, PROMPT), generator=g)
    valid = torch.ones(cfg.batch, cfg.max_seq, dtype=torch.long)
    valid[1, :2] = 0
    valid[2, :PROMPT] = 0
    return tokens, valid


def _cache_elements(cfg: DecoderConfig) -> int:
    """k and v caches of every layer, whole: 2 L B H_kv S_max d."""
    return 2 * cfg.layers * cfg.batch * cfg.kv_heads * cfg.max_seq * cfg.head_dim


def _assert_weights_as_planned(prog, cfg: DecoderConfig, split: tuple, variant) -> None:
    """decode_plan prices the weights compile_decoder builds: every rank's bytes, exactly."""
    s, m, n = split if len(split) == 3 else (1, *split)
    planned = cost_decode(prog.decode_shape(), cfg.max_seq, cfg.batch, (s, m, n),
                          cluster_spec(None, DEVICES), None, variant)
    assert [prog.weight_bytes(r) for r in range(DEVICES)] == \
        [planned.weight_bytes_per_rank] * DEVICES, (split, variant)
    assert [prog.cache_bytes(r) for r in range(DEVICES)] == [planned.kv_bytes_per_rank] * DEVICES


@pytest.mark.slow
@pytest.mark.parametrize("attn", sorted(KV_HEADS))
def test_decode_step_every_split_every_rank_equals_unsharded_over_steps(attn):
    cfg = DecoderConfig(kv_heads=KV_HEADS[attn])
    model, ref = build(cfg), build(cfg)       # the same weights; ref runs the unsharded steps
    tokens, valid = _prompt(cfg)
    with torch.no_grad():
        model.prefill(tokens, valid)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = DecodeStep(model)
    example = (tokens[:, :1], torch.tensor([PROMPT]), valid)
    base = helix_compile(step, devices=DEVICES, example_inputs=example, plan=(1, DEVICES), dynamic=False)
    splits = feasible_splits(base.summary, DEVICES)
    assert {(1, 4), (2, 2), (4, 1)} <= set(splits), splits
    for m, n in splits:
        for variant in variants_for(m):
            prog = base.recompile(plan=(m, n), variant=variant)   # rank caches: copies of the model's now
            label = f"{attn} m={m} x n={n} {variant or 'heads'}"
            assert len(prog.plan.sites) == cfg.layers and not prog.unpartitioned, label
            for r in range(DEVICES):
                assert prog.collectives(r) == expected_collectives(
                    m=m, n=n, variant=variant or "heads", sites=cfg.layers, o_projs=cfg.layers,
                    mlps=cfg.layers), label
                # no copies: exactly 1/N of the cache; n > H_kv: each kv head held n / H_kv times
                held = sum(t.numel() for k, t in prog.rank_weights(r).items() if "cache" in k)
                copies = max(1, n // cfg.kv_heads)
                assert held * DEVICES == _cache_elements(cfg) * copies, (label, r, held)
            ref.load_state_dict(before)
            tok = tokens[:, -1:]
            for t in range(STEPS):                     # positions 5, 6, 7: rotary at each
                pos = torch.tensor([PROMPT + t])
                with torch.no_grad():
                    want = ref.decode_step(tok, pos, valid)
                outs = prog.simulate(tok, pos, valid)
                assert_ranks_equal(outs, want, devices=DEVICES, label=f"{label} step {t}")
                assert not any(o.isnan().any() for o in outs), label
                tok = want[:, -1].argmax(-1, keepdim=True)
    # the ranks wrote their own slices, never the user's buffers
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("attn, split, variant", [("gqa", (2, 2), "score-reduce"), ("mqa", (1, 4), None),
                                                  ("mha", (4, 1), "qk-gather")])
def test_greedy_generation_token_equal_over_16_new_tokens(attn, split, variant):
    cfg = DecoderConfig(kv_heads=KV_HEADS[attn])
    model = build(cfg)
    tokens, valid = _prompt(cfg)
    want = greedy_generate(model, tokens, valid[:, :PROMPT], 16)
    prog = compile_decoder(model, DEVICES, split, variant=variant, prompt_len=PROMPT)
    got = prog.simulate_generate(tokens, valid[:, :PROMPT], 16)
    assert torch.equal(got, want), (got, want)
    # prefill and step write one tensor per cache slice on every rank
    for r, (pre, st) in enumerate(prog.modules):
        for attr in cache_writes(st):
            assert any(getattr(st, attr) is getattr(pre, a) for a in cache_writes(pre)), (r, attr)
    m, n = split
    copies = max(1, n // cfg.kv_heads)
    assert [prog.cache_bytes(r) for r in range(DEVICES)] == \
        [_cache_elements(cfg) * 4 * copies // DEVICES] * DEVICES
    _assert_weights_as_planned(prog, cfg, split, variant)


def test_compile_decoder_refuses_a_split_that_is_not_the_device_count():
    model = build(DecoderConfig(layers=1))
    with pytest.raises(HelixError, match=r"split s=2 x m=1 x n=4 = 8 ranks, but devices=4"):
        compile_decoder(model, DEVICES, (2, 1, 4))


def test_decode_cache_it_cannot_partition_is_refused_not_replicated():
    model = WhereCacheAttention().eval()
    with pytest.warns(Warning, match="run unpartitioned"):
        prog = helix_compile(model, devices=2, example_inputs=(torch.randn(2, 1, 16), torch.tensor([3])),
                             plan=(1, 2), dynamic=False)
    with pytest.raises(HelixError, match=r"decode step: attention core softmax \(softmax\) cannot be "
                                         r"partitioned: could not trace k"):
        check_partitioned(prog, "decode step")


def _llama_static_cache(batch: int, max_cache_len: int):
    """HF's executorch export wrapper around a small LLaMA (GQA: 4 heads, 2 kv heads, rotary):
    its StaticCache layers write k / v by index_copy_ at a per-layer position counter
    (cumulative_length, incremented in place), tensors torch.export lifts as constants."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, head_dim=8,
                             num_key_value_heads=2, intermediate_size=64, vocab_size=64,
                             max_position_embeddings=64, attn_implementation="sdpa")
        model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        use_cache=True, cache_implementation="static", max_length=max_cache_len,
        cache_config={"batch_size": batch, "max_cache_len": max_cache_len, "device": "cpu"})

    def wrapper():
        return TorchExportableModuleWithStaticCache(model, batch_size=batch, max_cache_len=max_cache_len)
    return wrapper


@pytest.mark.slow
def test_hf_static_cache_wrapper_decode_steps_every_rank_equals_unsharded():
    make = _llama_static_cache(batch=2, max_cache_len=16)
    tok0 = torch.tensor([[3], [5]])
    base = helix_compile(make(), devices=DEVICES, example_inputs=(tok0,),
                         example_kwargs={"cache_position": torch.tensor([0])}, plan=(1, DEVICES),
                         dynamic=False)
    for m, n in ((1, 4), (2, 2), (4, 1)):
        for variant in variants_for(m):
            prog = base.recompile(plan=(m, n), variant=variant)
            label = f"hf static cache m={m} x n={n} {variant or 'heads'}"
            assert len(prog.plan.sites) == 2 and not prog.unpartitioned, label
            caches = [sum(getattr(prog.rank_module(r), a).numel() for a in cache_writes(prog.rank_module(r)))
                      for r in range(DEVICES)]
            # 2 layers x (k, v) x B 2 x H_kv 2 x 16 positions x d 8 over N; n > H_kv: n / H_kv copies
            copies = max(1, n // 2)
            assert caches == [2 * 2 * 2 * 2 * 16 * 8 * copies // DEVICES] * DEVICES, (label, caches)
            ref, tok = make(), tok0                    # a fresh wrapper: its own empty cache
            for t in range(4):
                kwargs = {"cache_position": torch.tensor([t])}
                with torch.no_grad():
                    want = ref(tok, **kwargs)
                assert_ranks_equal(prog.simulate(tok, **kwargs), want, devices=DEVICES,
                                   label=f"{label} step {t}")
                tok = want[:, -1].argmax(-1, keepdim=True)


SEQ_SPLITS = [((2, 1, 2), None), ((2, 2, 1), "score-reduce"), ((2, 2, 1), "qk-gather"), ((4, 1, 1), None)]


@pytest.mark.slow
@pytest.mark.parametrize("split, variant", SEQ_SPLITS, ids=lambda x: str(x))
def test_sequence_split_every_rank_equals_unsharded_across_chunk_boundaries(split, variant):
    # S_max 24: s = 2 chunks [0, 12), [12, 24); s = 4 chunks of 6. A 10-token prompt fills
    # chunks 0 and 1 (s = 4), steps at positions 10 .. 13 cross the boundary at 12.
    cfg = DecoderConfig(kv_heads=2)
    model, ref = build(cfg), build(cfg)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, cfg.vocab, (cfg.batch, 10), generator=g)
    valid = torch.ones(cfg.batch, cfg.max_seq, dtype=torch.long)
    valid[1, :3] = 0
    valid[2, :10] = 0
    prog = compile_decoder(model, DEVICES, split, variant=variant, prompt_len=10)
    s, m, n = split
    assert (prog.mesh.s, prog.mesh.m, prog.mesh.n) == (s, m, n)
    assert prog.mesh.group(1, "seq") == ((0, 1) if s == 2 else (0, 1, 2, 3))
    label = f"s={s} m={m} n={n} {variant or 'heads'}"
    assert_decode_equal(prog, ref, tokens, valid, range(10, 14), devices=DEVICES, label=label)
    # q/k/v/o: rank (i, j)'s slices, held by its s ranks; the MLPs: 1/N of them per rank, each
    # all-reduced over the whole mesh, and (m n > 1) the output projection's all-reduce too,
    # which sums the chunks' partial attention (passes/seq_split.py)
    params = dict(model.named_parameters())
    mlp = sum(t.numel() * 4 for k, t in params.items() if k.split(".")[-2] in ("gate", "up", "down"))
    attn = sum(t.numel() * 4 for k, t in params.items() if ".attn." in k)
    assert mlp and attn, sorted(params)
    for r in range(DEVICES):
        assert prog.weight_bytes(r, (".gate.", ".up.", ".down.")) * DEVICES == mlp, (label, r)
        assert prog.weight_bytes(r, (".attn.",)) * m * n == attn, (label, r)
        mesh_reduces = [nd for nd in prog.modules[r][1].graph.nodes
                        if nd.target is torch.ops.helix.all_reduce.default and nd.args[1] == "mesh"]
        assert len(mesh_reduces) == cfg.layers * (2 if m * n > 1 else 1), (label, r)
    _assert_weights_as_planned(prog, cfg, split, variant)
    # a step writes one position of the chunk (index_copy of one row), not a where over the
    # whole chunk (passes/seq_split.py _owner_write)
    for r in range(DEVICES):
        writes = [nd for nd in prog.modules[r][1].graph.nodes
                  if nd.target in (torch.ops.aten.index_copy_.default, torch.ops.aten.index_copy.default)]
        assert len(writes) == 2 * cfg.layers, (label, r, len(writes))
        assert all(tuple(w.args[3].meta["val"].shape)[2] == 1 for w in writes), (label, r)
        assert not [nd for nd in prog.modules[r][1].graph.nodes if nd.target is torch.ops.aten.copy_.default
                    and nd.args[0] in {w.args[0] for w in writes}], (label, r)
    # each (i, j) slice is cut into s chunks of positions: exactly 1/N of the cache per rank
    assert [prog.cache_bytes(r) for r in range(DEVICES)] == [_cache_elements(cfg) * 4 // DEVICES] * DEVICES
    # only the owner wrote: chunk k of every rank holds, at positions it does not own, nothing
    for r in range(DEVICES):
        k = prog.mesh.chunk(r)
        lo, hi = k * cfg.max_seq // s, (k + 1) * cfg.max_seq // s
        for name, t in prog.caches[r].items():
            whole = ref.state_dict()[name.removeprefix("model.")]
            assert t.shape[2] == hi - lo, (name, tuple(t.shape))
            assert torch.equal(t.sum((0, 1, 3)) != 0, whole[:, :, lo:hi].sum((0, 1, 3)) != 0), (r, name)


def test_sequence_split_refuses_an_sdpa_core_over_the_cache():
    class SdpaCache(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.k_proj = nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False)
            self.v_proj, self.o_proj = nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False)
            self.register_buffer("k_cache", torch.zeros(2, 4, 8, 4))
            self.register_buffer("v_cache", torch.zeros(2, 4, 8, 4))

        def forward(self, x, cache_position):
            q, k, v = (p(x).view(2, 1, 4, 4).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
            self.k_cache.index_copy_(2, cache_position, k)
            self.v_cache.index_copy_(2, cache_position, v)
            out = torch.nn.functional.scaled_dot_product_attention(q, self.k_cache, self.v_cache)
            return self.o_proj(out.transpose(1, 2).reshape(2, 1, 16))

    args = (torch.randn(2, 1, 16), torch.tensor([3]))
    prog = helix_compile(SdpaCache().eval(), devices=2, example_inputs=args, plan=(1, 2), dynamic=False)
    assert len(prog.plan.sites) == 1 and not prog.unpartitioned
    gm = prog.rank_module(0)
    # d = 4: kernel_choice runs the SDPA core as helix.chunked_attention; either is refused
    with pytest.raises(HelixError, match=r"seq_split: node \S+ \((an SDPA core|op helix\.chunked_attention"
                                         r"\.default)\) reads the KV cache"):
        split_sequence(gm, args, 0, Mesh(n=2, m=1, s=2), {a: None for a in cache_writes(gm)})
