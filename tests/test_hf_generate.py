"""Hugging Face decoders as static-cache decoders (helix_compiler/models/hf_static.py): greedy
tokens equal to Hugging Face's own `generate`, unsharded and sharded (fp32).

The model is a LLaMA of 2 layers, 4 heads over 2 kv heads (GQA), d 8, hidden 32, vocabulary 64,
seeded random weights, attn_implementation="sdpa". The batch is 4 rows of an 8-token prompt as
a server left-pads them: row 0 full, row 1 left-padded by 4, row 2 full, row 3 a single real
token (left-padded by 7). A fully padded row makes HF's `generate` ill-defined (its prefill
attends over no position, and its positions for that row's decode steps start at 1, the
adapter's at 0), so that row is compared with the adapter's own greedy reference only
(models/decoder_cache.greedy_generate), unsharded against sharded. `helix generate` on a
directory holding this LLaMA's config.json: 4 gloo processes, s = 2 x n = 2, equal to HF's
`generate` on the same seeded weights and prompt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from helix_compiler.cli.generate import choose_split, load_decoder, make_prompt
from helix_compiler.decode import compile_decoder, replica_model
from helix_compiler.errors import HelixError
from helix_compiler.models.decoder_cache import greedy_generate
from helix_compiler.models.hf_static import HFStaticCacheDecoder, hf_generate, hf_static_decoder

REPO = Path(__file__).resolve().parents[1]
P, T, B = 8, 8, 4


def llama(kv_heads: int = 2) -> LlamaConfig:
    return LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, head_dim=8,
                       num_key_value_heads=kv_heads, intermediate_size=64, vocab_size=64,
                       max_position_embeddings=64, attn_implementation="sdpa")


def prompt(batch: int = B, fully_padded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (B, P), valid (B, P): row 1 left-padded by P // 2, the last row one real token
    (or, fully_padded, none)."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 64, (batch, P), generator=g)
    valid = torch.ones(batch, P, dtype=torch.long)
    valid[1, :P // 2] = 0
    valid[-1, :P if fully_padded else P - 1] = 0
    return tokens, valid


@pytest.mark.parametrize("cache", [None, "static"], ids=["dynamic-cache", "static-cache"])
def test_unsharded_adapter_greedy_tokens_equal_hf_generate_on_left_padded_batch(cache):
    model = hf_static_decoder(llama(), B, P + T)
    tokens, valid = prompt()
    want = hf_generate(model, tokens, valid, T, cache_implementation=cache)
    got = greedy_generate(model, tokens, valid, T)
    assert want.shape == (B, T)
    assert torch.equal(got, want), (got, want)


def test_adapter_cache_buffers_are_the_static_cache_and_replica_shares_weights():
    model = hf_static_decoder(llama(), B, P + T)
    buffers = dict(model.named_buffers())
    for i, layer in enumerate(model.static_cache.layers):
        assert buffers[f"key_cache_{i}"] is layer.keys and buffers[f"value_cache_{i}"] is layer.values
        assert layer.keys.shape == (B, 2, P + T, 8)
    replica = replica_model(model, 2, 1)
    assert replica.model is model.model and replica.cfg.batch == 2
    assert replica.static_cache.layers[0].keys.shape == (2, 2, P + T, 8)
    assert dict(model.named_buffers())["key_cache_0"].shape[0] == B   # the model's cache not written


@pytest.mark.slow
@pytest.mark.parametrize("split, variant, kv_heads", [
    ((1, 2, 2), "score-reduce", 2), ((2, 1, 2), None, 2), ((1, 1, 4), None, 2)],
    ids=lambda x: str(x))
def test_sharded_greedy_tokens_equal_hf_generate(split, variant, kv_heads):
    model = hf_static_decoder(llama(kv_heads), B, P + T)
    tokens, valid = prompt()
    want = hf_generate(model, tokens, valid, T)
    prog = compile_decoder(model, 4, split, variant=variant, prompt_len=P)
    assert (prog.mesh.s, prog.mesh.m, prog.mesh.n) == split
    assert len(prog.step_program.plan.sites) == 2 and not prog.step_program.unpartitioned
    got = prog.simulate_generate(tokens, valid, T)
    assert torch.equal(got, want), (split, got, want)


@pytest.mark.slow
def test_dp_replicas_of_the_adapter_together_equal_hf_generate():
    # dp = 2: replica d serves rows 2d, 2d + 1 over its own cache of 2 rows, the HF model shared
    model = hf_static_decoder(llama(), B, P + T)
    tokens, valid = prompt()
    want = hf_generate(model, tokens, valid, T)
    got = []
    for d in range(2):
        prog = compile_decoder(replica_model(model, 2, d), 2, (1, 1, 2), prompt_len=P)
        rows = slice(2 * d, 2 * d + 2)
        got.append(prog.simulate_generate(tokens[rows], valid[rows], T))
    assert torch.equal(torch.cat(got), want), (torch.cat(got), want)


@pytest.mark.slow
def test_fully_padded_row_sharded_equals_adapter_reference():
    model = hf_static_decoder(llama(), B, P + T)
    tokens, valid = prompt(fully_padded=True)
    want = greedy_generate(model, tokens, valid, T)
    prog = compile_decoder(model, 4, (2, 1, 2), prompt_len=P)
    full = torch.ones(B, P + T, dtype=torch.long)
    full[:, :P] = valid
    assert not any(o.isnan().any() for o in prog.prefill(tokens, full))
    got = prog.simulate_generate(tokens, valid, T)
    assert torch.equal(got, want), (got, want)


def test_adapter_refuses_a_model_without_a_hf_config():
    with pytest.raises(HelixError, match="not a Hugging Face model"):
        HFStaticCacheDecoder(torch.nn.Linear(2, 2), 2, 8)


# ---- helix generate on a Hugging Face model directory -----------------------------------
@pytest.fixture
def hf_dir(tmp_path) -> Path:
    config = llama()
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp_path)
    return tmp_path


def test_load_decoder_wraps_a_hf_dir_with_batch_and_request_positions(hf_dir):
    torch.manual_seed(0)
    model = load_decoder(str(hf_dir), max_seq=P + T)
    assert isinstance(model, HFStaticCacheDecoder)
    assert (model.cfg.batch, model.cfg.max_seq, model.cfg.vocab) == (4, P + T, 64)
    assert load_decoder(str(hf_dir), batch=2, max_seq=P + T).cfg.batch == 2
    tokens, valid = make_prompt(model.cfg, P, padded_row=False)
    assert valid.sum(1).tolist() == [P, P // 2, P, 1]          # the last row: one real token
    assert make_prompt(model.cfg, P)[1][-1].sum() == 0            # a CacheDecoder's: none
    with pytest.raises(HelixError, match="--batch applies to a Hugging Face model directory"):
        load_decoder("helix_compiler.models.decoder_cache:helix_model", batch=2)


def test_load_decoder_reads_hf_weights_whole(hf_dir, tmp_path):
    saved = hf_static_decoder(llama(), 2, P + T, seed=5).model
    saved.save_pretrained(tmp_path / "ckpt")
    model = load_decoder(str(hf_dir), max_seq=P + T, weights=str(tmp_path / "ckpt"))
    ours = dict(model.model.named_parameters())
    assert all(torch.equal(ours[n], p) for n, p in saved.named_parameters())
    with pytest.raises(HelixError, match="no tensor"):
        empty = tmp_path / "empty"
        empty.mkdir()
        torch.save({}, empty / "w.pt")
        load_decoder(str(hf_dir), max_seq=P + T, weights=str(empty / "w.pt"))


def test_planner_choice_for_a_hf_model_is_buildable(hf_dir):
    torch.manual_seed(0)
    model = load_decoder(str(hf_dir), max_seq=P + T)
    choice = choose_split(model, 4, P, T)
    assert choice.dp * choice.s * choice.m * choice.n == 4
    replica = replica_model(model, choice.dp, 0)                   # what every process builds
    assert replica.cfg.batch == 4 // choice.dp


@pytest.mark.slow
def test_helix_generate_on_a_hf_dir_equals_hf_generate(hf_dir, tmp_path):
    # one torchrun launch of 4 gloo ranks (~50-75 s on 2 shared cores): dp = 2 replicas (the
    # adapter's replica(), rows 2d, 2d + 1 each) of s = 2 cache chunks over the SDPA core
    out = tmp_path / "summary.json"
    proc = subprocess.run(
        [sys.executable, "-m", "helix_compiler.cli", "generate", str(hf_dir), "--devices", "4",
         "--prompt-len", str(P), "--new-tokens", str(T), "--backend", "gloo", "--plan", "2,1,1",
         "--dp", "2", "--json", str(out), "--timeout", "240"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    # the reference again, here: the same seeded model and prompt, HF's own generate
    torch.manual_seed(0)
    model = load_decoder(str(hf_dir), max_seq=P + T)
    tokens, valid = make_prompt(model.cfg, P, 0, padded_row=False)
    want = hf_generate(model, tokens, valid, T)
    assert summary["tokens"] == want.tolist() and summary["ranks_agree"], (summary, want)
    assert (summary["dp"], summary["s"], summary["m"], summary["n"], summary["batch"]) == (2, 2, 1, 1, 4)
    assert "equal to Hugging Face's generate (fp32): yes" in proc.stdout


def test_step_positions_equal_generate_positions_at_every_cache_position():
    """The decode step's one-position count equals HF generate's cumsum formula read there, on
    left-padded, unpadded and fully padded rows and at every position."""
    from helix_compiler.models.hf_static import generate_positions, step_positions

    gen = torch.Generator().manual_seed(0)
    valid = torch.ones(5, 12, dtype=torch.long)
    valid[1, :4] = 0                     # left-padded
    valid[2, :11] = 0                    # one real position, the last
    valid[3] = 0                         # fully padded
    valid[4] = (torch.rand(12, generator=gen) > 0.5).long()    # holes, as a mask can have
    want = generate_positions(valid)
    for p in range(12):
        got = step_positions(valid, torch.tensor([p]))
        assert torch.equal(got, want[:, p:p + 1]), p
