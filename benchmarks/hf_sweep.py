"""Sweep Helix over many Hugging Face model classes: every feasible split, every m > 1 variant.

Each model is built from a tiny config (2 layers, hidden 64-128, 8 heads, 2 or 4 kv heads where
GQA exists, vocab 128; random weights, seed 0, float32 eval), with attn_implementation "eager"
and "sdpa" where the class takes both.  Inputs: batch 3 x seq 10, row 1 left-padded (its first 3
positions masked); models that take attention_mask are also run with row 2 fully padded
("fullpad"), on the same program (same shapes, so the capture is shared).

Per model: `helix_compiler.pipeline.analyze` (site count vs the attention layers the config
has, `analysis.skipped`), then for each device count every feasible (m, n) of
`helix_compiler.planning.solver.solve` and each m > 1 variant, compiled by tests/helpers.compile_split
(one capture per model, recompiled per split) and run by `prog.simulate`; every rank's every
floating output leaf against the unsharded eager model (tests/helpers.rel_error).

Outcome of each (model, split, variant, inputs):
  ok             every rank within 1e-5 relative error, no NaN
  wrong          some rank's leaf has relative error > 1e-5
  nan            NaN in a rank output where the reference has none
  crash          an exception that is not a HelixError, or one the pipeline wrapped in "stage X
                 failed after ..." (first line kept, `where` = its innermost Helix frame)
  refused        any other HelixError at compile (first line kept)
  unpartitioned  ran correctly, but the model had fewer attention sites than attention layers
  timeout        not run: the model's time box was spent
  ref_nan        the unsharded model itself gives NaN on these inputs (ranks match its NaNs)

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/hf_sweep.py --models llama,gpt2 --devices 4,8
    python benchmarks/hf_sweep.py --list

The JSON is rewritten after each model (--resume skips models already in it), so a long sweep
can be run in chunks and watched.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.utils._pytree as pytree

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers import REL_TOL, compile_split, rel_error, variants_for  # noqa: E402

BATCH, SEQ, DEC_SEQ, VOCAB = 3, 10, 7, 128
PAD = 3                       # row 1's first PAD positions are padding
MODEL_BUDGET_S = 150.0        # past this, a model's remaining splits are not run
HARD_LIMIT_S = 240            # SIGALRM: one model may not take longer than max(this, 3 x budget)

# ---- model builders -----------------------------------------------------------------------------

COMMON = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=8, intermediate_size=128,
              vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
              pad_token_id=0)


def _tf():
    import transformers
    return transformers


def _cfg(name: str, attn: str, **kw):
    cls = getattr(_tf(), name)
    return cls(attn_implementation=attn, **kw)


def _ids(seq=SEQ):
    return torch.randint(3, VOCAB, (BATCH, seq))


def _mask(seq=SEQ, full=False):
    mask = torch.ones(BATCH, seq, dtype=torch.long)
    mask[1, :PAD] = 0
    if full:
        mask[2, :] = 0
    return mask


def decoder(config: str, model: str, layers: int = 2, **kw):
    """A causal LM with COMMON's sizes, overridden by kw; `layers` = softmax-attention layers."""
    def build(attn):
        cfg = _cfg(config, attn, **{**COMMON, **kw})
        return getattr(_tf(), model)(cfg)
    return dict(build=build, kind="decoder", attention_layers=layers)


def custom(config: str, model: str, kind: str, layers: int, **kw):
    """A model whose config does not take COMMON's names: kw is the whole config."""
    def build(attn):
        cfg = _cfg(config, attn, **kw)
        return getattr(_tf(), model)(cfg)
    return dict(build=build, kind=kind, attention_layers=layers)


def encoder(config: str, model: str, **kw):
    base = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=8, intermediate_size=128,
                vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0)
    return custom(config, model, "encoder", 2, **{**base, **kw})


def _whisper_encoder():
    def build(attn):
        from transformers.models.whisper.modeling_whisper import WhisperEncoder
        cfg = _cfg("WhisperConfig", attn, d_model=64, encoder_layers=2, encoder_attention_heads=8,
                   decoder_layers=2, decoder_attention_heads=8, encoder_ffn_dim=128, decoder_ffn_dim=128,
                   num_mel_bins=16, max_source_positions=SEQ, max_target_positions=16, vocab_size=VOCAB)
        return WhisperEncoder(cfg)
    return dict(build=build, kind="whisper_encoder", attention_layers=2)


def _llama4_text():
    def build(attn):
        cfg = _cfg("Llama4TextConfig", attn, **{**COMMON, "num_key_value_heads": 2, "head_dim": 8,
                                              "intermediate_size_mlp": 128, "num_local_experts": 2,
                                              "num_experts_per_tok": 1, "interleave_moe_layer_step": 2,
                                              "attention_chunk_size": 4, "no_rope_layers": [1, 0]})
        return _tf().Llama4ForCausalLM(cfg)
    return dict(build=build, kind="decoder", attention_layers=2)


MOE = dict(num_experts_per_tok=2)
MODELS: dict[str, dict] = {
    # decoders
    "llama": decoder("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2),
    "mistral": decoder("MistralConfig", "MistralForCausalLM", num_key_value_heads=4, head_dim=8),
    "mixtral": decoder("MixtralConfig", "MixtralForCausalLM", num_key_value_heads=2, head_dim=8,
                       num_local_experts=4, **MOE),
    "qwen2": decoder("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=2),
    "qwen2_moe": decoder("Qwen2MoeConfig", "Qwen2MoeForCausalLM", num_key_value_heads=2, num_experts=4,
                         moe_intermediate_size=64, shared_expert_intermediate_size=64,
                         decoder_sparse_step=1, **MOE),
    "qwen3": decoder("Qwen3Config", "Qwen3ForCausalLM", num_key_value_heads=4, head_dim=8),
    "qwen3_moe": decoder("Qwen3MoeConfig", "Qwen3MoeForCausalLM", num_key_value_heads=2, head_dim=8,
                         num_experts=4, moe_intermediate_size=64, decoder_sparse_step=1,
                         mlp_only_layers=[], **MOE),
    "gemma": decoder("GemmaConfig", "GemmaForCausalLM", num_key_value_heads=2, head_dim=8),
    "gemma2": decoder("Gemma2Config", "Gemma2ForCausalLM", num_key_value_heads=4, head_dim=8,
                      query_pre_attn_scalar=8, sliding_window=4),
    "gemma3_text": decoder("Gemma3TextConfig", "Gemma3ForCausalLM", num_key_value_heads=2, head_dim=8,
                           query_pre_attn_scalar=8, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention"]),
    "phi": decoder("PhiConfig", "PhiForCausalLM", hidden_size=128, intermediate_size=256,
                   partial_rotary_factor=0.5),
    "phi3": decoder("Phi3Config", "Phi3ForCausalLM", num_key_value_heads=2),
    "stablelm": decoder("StableLmConfig", "StableLmForCausalLM", hidden_size=128, intermediate_size=256,
                        num_key_value_heads=4, partial_rotary_factor=0.25, use_qkv_bias=True),
    "starcoder2": decoder("Starcoder2Config", "Starcoder2ForCausalLM", num_key_value_heads=2,
                          sliding_window=None),
    "olmo": decoder("OlmoConfig", "OlmoForCausalLM", num_key_value_heads=8),
    "olmo2": decoder("Olmo2Config", "Olmo2ForCausalLM", num_key_value_heads=2),
    "cohere": decoder("CohereConfig", "CohereForCausalLM", num_key_value_heads=2),
    "gptj": custom("GPTJConfig", "GPTJForCausalLM", "decoder", 2, n_layer=2, n_embd=64, n_head=8,
                   rotary_dim=4, n_positions=64, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2),
    "gpt_neo": custom("GPTNeoConfig", "GPTNeoForCausalLM", "decoder", 2, num_layers=2, hidden_size=64,
                      num_heads=8, attention_types=[[["global", "local"], 1]], window_size=4,
                      max_position_embeddings=64, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2),
    "gpt_neox": decoder("GPTNeoXConfig", "GPTNeoXForCausalLM", hidden_size=128, intermediate_size=256,
                        rotary_pct=0.25),
    "codegen": custom("CodeGenConfig", "CodeGenForCausalLM", "decoder", 2, n_layer=2, n_embd=64, n_head=8,
                      rotary_dim=4, n_positions=64, n_ctx=64, vocab_size=VOCAB, bos_token_id=1,
                      eos_token_id=2),
    "opt": custom("OPTConfig", "OPTForCausalLM", "decoder", 2, num_hidden_layers=2, hidden_size=64,
                  ffn_dim=128, num_attention_heads=8, max_position_embeddings=64, word_embed_proj_dim=64,
                  vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "persimmon": decoder("PersimmonConfig", "PersimmonForCausalLM", partial_rotary_factor=0.5,
                         qk_layernorm=True),
    "granite": decoder("GraniteConfig", "GraniteForCausalLM", num_key_value_heads=2,
                       attention_multiplier=0.3, residual_multiplier=0.5, embedding_multiplier=2.0,
                       logits_scaling=4.0),
    "granite_moe": decoder("GraniteMoeConfig", "GraniteMoeForCausalLM", num_key_value_heads=2,
                           num_local_experts=4, **MOE),
    "glm": decoder("GlmConfig", "GlmForCausalLM", num_key_value_heads=2, head_dim=8),
    "glm4": decoder("Glm4Config", "Glm4ForCausalLM", num_key_value_heads=2, head_dim=8),
    "helium": decoder("HeliumConfig", "HeliumForCausalLM", num_key_value_heads=2, head_dim=8),
    "smollm3": decoder("SmolLM3Config", "SmolLM3ForCausalLM", num_key_value_heads=2,
                       no_rope_layers=[1, 0]),
    "exaone4": decoder("Exaone4Config", "Exaone4ForCausalLM", num_key_value_heads=2, head_dim=8,
                       sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
    "deepseek_v2": decoder("DeepseekV2Config", "DeepseekV2ForCausalLM", num_key_value_heads=8,
                           kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=8,
                           v_head_dim=8, n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=64,
                           first_k_dense_replace=1, n_group=1, topk_group=1, **MOE),
    "deepseek_v3": decoder("DeepseekV3Config", "DeepseekV3ForCausalLM", num_key_value_heads=8,
                           kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8,
                           v_head_dim=8, n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=64,
                           first_k_dense_replace=1, n_group=1, topk_group=1, **MOE),
    "gpt_oss": decoder("GptOssConfig", "GptOssForCausalLM", num_key_value_heads=2, head_dim=8,
                       num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                       layer_types=["sliding_attention", "full_attention"]),
    "llama4_text": _llama4_text(),
    "qwen3_next": decoder("Qwen3NextConfig", "Qwen3NextForCausalLM", layers=1, num_key_value_heads=2,
                          head_dim=8, layer_types=["linear_attention", "full_attention"],
                          linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
                          linear_value_head_dim=8, num_experts=4, moe_intermediate_size=64,
                          shared_expert_intermediate_size=64, decoder_sparse_step=1, mlp_only_layers=[],
                          **MOE),
    "falcon_mq": custom("FalconConfig", "FalconForCausalLM", "decoder", 2, num_hidden_layers=2,
                        hidden_size=64, num_attention_heads=8, vocab_size=VOCAB, multi_query=True,
                        new_decoder_architecture=False, alibi=False, parallel_attn=True, bias=False,
                        bos_token_id=1, eos_token_id=2),
    "falcon_gqa": custom("FalconConfig", "FalconForCausalLM", "decoder", 2, num_hidden_layers=2,
                         hidden_size=64, num_attention_heads=8, num_kv_heads=2, vocab_size=VOCAB,
                         new_decoder_architecture=True, alibi=False, bias=False,
                         bos_token_id=1, eos_token_id=2),
    "falcon_alibi": custom("FalconConfig", "FalconForCausalLM", "decoder", 2, num_hidden_layers=2,
                           hidden_size=64, num_attention_heads=8, vocab_size=VOCAB, multi_query=False,
                           new_decoder_architecture=False, alibi=True, parallel_attn=False, bias=True,
                           bos_token_id=1, eos_token_id=2),
    "bloom": custom("BloomConfig", "BloomForCausalLM", "decoder", 2, n_layer=2, hidden_size=64, n_head=8,
                    vocab_size=VOCAB, bos_token_id=1, eos_token_id=2),
    "mpt": custom("MptConfig", "MptForCausalLM", "decoder", 2, n_layers=2, d_model=64, n_heads=8,
                  expansion_ratio=2, max_seq_len=64, vocab_size=VOCAB),
    "gpt2": custom("GPT2Config", "GPT2LMHeadModel", "decoder", 2, n_layer=2, n_embd=64, n_head=8,
                   n_positions=64, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2),
    "gpt_bigcode": custom("GPTBigCodeConfig", "GPTBigCodeForCausalLM", "decoder", 2, n_layer=2, n_embd=64,
                          n_head=8, n_positions=64, vocab_size=VOCAB, multi_query=True, bos_token_id=1,
                          eos_token_id=2),
    # encoders
    "bert": encoder("BertConfig", "BertModel"),
    "roberta": encoder("RobertaConfig", "RobertaModel", max_position_embeddings=72),
    "distilbert": custom("DistilBertConfig", "DistilBertModel", "encoder", 2, n_layers=2, dim=64, n_heads=8,
                         hidden_dim=128, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0),
    "albert": encoder("AlbertConfig", "AlbertModel", embedding_size=32),
    "electra": encoder("ElectraConfig", "ElectraModel", embedding_size=64),
    "xlm_roberta": encoder("XLMRobertaConfig", "XLMRobertaModel", max_position_embeddings=72),
    "modernbert": encoder("ModernBertConfig", "ModernBertModel", global_attn_every_n_layers=2,
                          local_attention=4),
    "deberta_v2": encoder("DebertaV2Config", "DebertaV2Model"),
    "deberta": encoder("DebertaConfig", "DebertaModel"),
    # others
    "t5": custom("T5Config", "T5Model", "seq2seq", 6, num_layers=2, num_decoder_layers=2, d_model=64, d_kv=8,
                 num_heads=8, d_ff=128, vocab_size=VOCAB, decoder_start_token_id=0, pad_token_id=0,
                 eos_token_id=1),
    "bart": custom("BartConfig", "BartModel", "seq2seq", 6, encoder_layers=2, decoder_layers=2, d_model=64,
                   encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=128,
                   decoder_ffn_dim=128, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=1,
                   bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2),
    "vit": custom("ViTConfig", "ViTModel", "vision", 2, num_hidden_layers=2, hidden_size=64,
                  num_attention_heads=8, intermediate_size=128, image_size=16, patch_size=4,
                  num_channels=3),
    "clip_text": custom("CLIPTextConfig", "CLIPTextModel", "encoder", 2, num_hidden_layers=2, hidden_size=64,
                        num_attention_heads=8, intermediate_size=128, vocab_size=VOCAB,
                        max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2),
    "whisper_encoder": _whisper_encoder(),
    # sweep2 additions: more HF classes (decoders, encoders, encoder-decoders) the first sweep
    # did not cover; DBRX is left out (DbrxConfig(attn_config=dict(...)) has no rope_theta in 5.24)
    "nemotron": decoder("NemotronConfig", "NemotronForCausalLM", num_key_value_heads=2,
                        partial_rotary_factor=0.5),
    "olmoe": decoder("OlmoeConfig", "OlmoeForCausalLM", num_key_value_heads=8, num_experts=4,
                     num_experts_per_tok=2),
    "phimoe": decoder("PhimoeConfig", "PhimoeForCausalLM", num_key_value_heads=2, num_local_experts=4,
                      num_experts_per_tok=2),
    "ernie4_5": decoder("Ernie4_5Config", "Ernie4_5ForCausalLM", num_key_value_heads=2, head_dim=8),
    "hunyuan_v1_dense": decoder("HunYuanDenseV1Config", "HunYuanDenseV1ForCausalLM", num_key_value_heads=2,
                                head_dim=8),
    "seed_oss": decoder("SeedOssConfig", "SeedOssForCausalLM", num_key_value_heads=2, head_dim=8),
    "arcee": decoder("ArceeConfig", "ArceeForCausalLM", num_key_value_heads=2),
    "apertus": decoder("ApertusConfig", "ApertusForCausalLM", num_key_value_heads=2),
    "bitnet": decoder("BitNetConfig", "BitNetForCausalLM", num_key_value_heads=2),
    "cohere2": decoder("Cohere2Config", "Cohere2ForCausalLM", num_key_value_heads=2, sliding_window=4,
                       layer_types=["sliding_attention", "full_attention"]),
    "jetmoe": custom("JetMoeConfig", "JetMoeForCausalLM", "decoder", 2, num_hidden_layers=2, hidden_size=64,
                     num_key_value_heads=4, kv_channels=8, intermediate_size=128, num_local_experts=4,
                     num_experts_per_tok=2, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=1,
                     eos_token_id=2),
    "xglm": custom("XGLMConfig", "XGLMForCausalLM", "decoder", 2, num_layers=2, d_model=64, attention_heads=8,
                   ffn_dim=128, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                   eos_token_id=2),
    "biogpt": encoder("BioGptConfig", "BioGptForCausalLM") | {"kind": "decoder"},
    "openai_gpt": custom("OpenAIGPTConfig", "OpenAIGPTLMHeadModel", "decoder", 2, n_layer=2, n_embd=64,
                         n_head=8, n_positions=64, vocab_size=VOCAB),
    "ctrl": custom("CTRLConfig", "CTRLLMHeadModel", "decoder", 2, n_layer=2, n_embd=64, n_head=8, dff=128,
                   n_positions=64, vocab_size=VOCAB),
    "gpt_neox_japanese": custom("GPTNeoXJapaneseConfig", "GPTNeoXJapaneseForCausalLM", "decoder", 2,
                                num_hidden_layers=2, hidden_size=64, num_attention_heads=8,
                                intermediate_multiple_size=2, vocab_size=VOCAB, max_position_embeddings=64,
                                bos_token_id=1, eos_token_id=2),
    "xlm": custom("XLMConfig", "XLMModel", "encoder", 2, n_layers=2, emb_dim=64, n_heads=8, vocab_size=VOCAB,
                  max_position_embeddings=64, pad_index=0),
    "flaubert": custom("FlaubertConfig", "FlaubertModel", "encoder", 2, n_layers=2, emb_dim=64, n_heads=8,
                       vocab_size=VOCAB, max_position_embeddings=64, pad_index=0),
    "camembert": encoder("CamembertConfig", "CamembertModel", max_position_embeddings=72),
    "megatron_bert": encoder("MegatronBertConfig", "MegatronBertModel"),
    "ernie": encoder("ErnieConfig", "ErnieModel"),
    "roformer": encoder("RoFormerConfig", "RoFormerModel", embedding_size=64),
    "mpnet": encoder("MPNetConfig", "MPNetModel", max_position_embeddings=72),
    "data2vec_text": encoder("Data2VecTextConfig", "Data2VecTextModel", max_position_embeddings=72),
    "esm": encoder("EsmConfig", "EsmModel", position_embedding_type="rotary", mask_token_id=4),
    "mobilebert": encoder("MobileBertConfig", "MobileBertModel", embedding_size=32, intra_bottleneck_size=64,
                          num_feedforward_networks=1),
    "convbert": encoder("ConvBertConfig", "ConvBertModel", embedding_size=64),
    "rembert": encoder("RemBertConfig", "RemBertModel", input_embedding_size=32, output_embedding_size=32),
    "mbart": custom("MBartConfig", "MBartModel", "seq2seq", 6, encoder_layers=2, decoder_layers=2, d_model=64,
                    encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=128,
                    decoder_ffn_dim=128, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=1,
                    bos_token_id=0, eos_token_id=2, decoder_start_token_id=2),
    "marian": custom("MarianConfig", "MarianModel", "seq2seq", 6, encoder_layers=2, decoder_layers=2,
                     d_model=64, encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=128,
                     decoder_ffn_dim=128, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=1,
                     decoder_start_token_id=1, eos_token_id=2),
    "pegasus": custom("PegasusConfig", "PegasusModel", "seq2seq", 6, encoder_layers=2, decoder_layers=2,
                      d_model=64, encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=128,
                      decoder_ffn_dim=128, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0,
                      decoder_start_token_id=0, eos_token_id=1),
    "m2m100": custom("M2M100Config", "M2M100Model", "seq2seq", 6, encoder_layers=2, decoder_layers=2,
                     d_model=64, encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=128,
                     decoder_ffn_dim=128, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=1,
                     decoder_start_token_id=2, eos_token_id=2, bos_token_id=0),
    "mt5": custom("MT5Config", "MT5Model", "seq2seq", 6, num_layers=2, num_decoder_layers=2, d_model=64,
                  d_kv=8, num_heads=8, d_ff=128, vocab_size=VOCAB, decoder_start_token_id=0, pad_token_id=0,
                  eos_token_id=1),
    "prophetnet": custom("ProphetNetConfig", "ProphetNetModel", "seq2seq", 6, num_encoder_layers=2,
                         num_decoder_layers=2, hidden_size=64, num_encoder_attention_heads=8,
                         num_decoder_attention_heads=8, encoder_ffn_dim=128, decoder_ffn_dim=128,
                         vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0,
                         decoder_start_token_id=0, eos_token_id=2, ngram=2),
}
ATTNS = ("eager", "sdpa")


def make_inputs(kind: str) -> list[tuple[str, tuple, dict]]:
    """[(label, args, kwargs)]: the left-padded inputs, then the fully padded variant if any."""
    if kind == "vision":
        return [("leftpad", (torch.randn(BATCH, 3, 16, 16),), {})]
    if kind == "whisper_encoder":
        return [("leftpad", (torch.randn(BATCH, 16, 2 * SEQ),), {})]
    ids = _ids()
    dec_ids = _ids(DEC_SEQ)
    out = []
    for label, full in (("leftpad", False), ("fullpad", True)):
        kw = {"attention_mask": _mask(full=full)}
        if kind == "decoder":
            kw["use_cache"] = False
        elif kind == "seq2seq":
            kw.update(decoder_input_ids=dec_ids, use_cache=False)
        out.append((label, (ids,), kw))
    return out


def build(name: str, attn: str):
    spec = MODELS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = spec["build"](attn).float().eval()
        inputs = make_inputs(spec["kind"])
    return model, inputs


# ---- classification ------------------------------------------------------------------------------

def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:400]


def _leaves(tree) -> list:
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor) and x.is_floating_point()]


def compare(outputs: list, want) -> tuple[str, float, str]:
    """(outcome, worst relative error, detail) of all rank outputs against the reference."""
    ref = _leaves(want)
    ref_nan = any(torch.isnan(w).any().item() for w in ref)
    worst, detail = 0.0, ""
    for r, out in enumerate(outputs):
        got = _leaves(out)
        if len(got) != len(ref):
            return "wrong", math.inf, f"rank {r}: {len(got)} float leaves, reference {len(ref)}"
        for k, (g, w) in enumerate(zip(got, ref)):
            if g.shape != w.shape:
                return "wrong", math.inf, f"rank {r} leaf {k}: shape {tuple(g.shape)} != {tuple(w.shape)}"
            gn, wn = torch.isnan(g), torch.isnan(w)
            if (gn & ~wn).any():
                return "nan", math.nan, f"rank {r} leaf {k} {tuple(g.shape)}: {int((gn & ~wn).sum())} NaN"
            keep = ~(gn | wn)
            if (gn != wn).any():
                return "wrong", math.inf, f"rank {r} leaf {k}: reference NaN where the rank has a number"
            err = rel_error(g[keep], w[keep])
            if err > worst:
                worst, detail = err, f"rank {r} leaf {k} {tuple(g.shape)}"
    if worst > REL_TOL:
        return "wrong", worst, detail
    return ("ref_nan" if ref_nan else "ok"), worst, detail


# ---- the sweep ---------------------------------------------------------------------------------------

class _HardLimit(Exception):
    pass


def _alarm(signum, frame):
    raise _HardLimit("model passed its hard time limit")


def sweep_model(name: str, attn: str, devices: tuple[int, ...], budget: float) -> dict:
    from helix_compiler.errors import HelixError
    from helix_compiler.pipeline import analyze
    from helix_compiler.planning.solver import solve

    import tests.helpers as helpers

    rec: dict = {"model": name, "attn": attn, "kind": MODELS[name]["kind"],
                 "attention_layers": MODELS[name]["attention_layers"], "splits": []}
    t0 = time.perf_counter()
    try:
        model, inputs = build(name, attn)
    except Exception as e:
        rec.update(status="build_error", error=first_line(e), seconds=round(time.perf_counter() - t0, 2))
        return rec
    label0, args0, kw0 = inputs[0]
    try:
        with torch.no_grad():
            wants = {label: model(*a, **k) for label, a, k in inputs}
    except Exception as e:
        rec.update(status="eager_error", error=first_line(e), seconds=round(time.perf_counter() - t0, 2))
        return rec
    # One capture per model: helix_compile for one device runs pipeline.analyze, and its program
    # is handed to compile_split's cache, which recompiles it for every split.  If that compile
    # fails, analyze alone says whether capture / find_attention is what fails.
    helpers._CAPTURED.clear()
    import warnings

    from helix_compiler.errors import HelixWarning
    try:
        from helix_compiler import helix_compile

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", HelixWarning)
            prog1 = helix_compile(model, devices=1, example_inputs=args0, example_kwargs=kw0)
        # "unpartitioned must never be silent": the HelixWarnings the 1-device compile gave and
        # the cores the program lists as run whole (program.unpartitioned)
        rec["helix_warnings"] = [str(w.message)[:400] for w in caught if issubclass(w.category, HelixWarning)]
        rec["program_unpartitioned"] = [str(c) for c in prog1.unpartitioned]
        analysis = prog1.analysis
        shapes = tuple(a.shape if hasattr(a, "shape") else a for a in args0)
        helpers._CAPTURED[:] = [(model, (shapes, tuple(sorted(kw0))), prog1)]
    except Exception as e1:
        rec["compile1_error"] = first_line(e1)
        try:
            analysis = analyze(model, args0, kw0)
        except Exception as e:
            crashed = not isinstance(e, HelixError) or _internal(e)
            rec.update(status="analyze_crash" if crashed else "analyze_refused",
                       error=first_line(e), where=_where(e.__cause__ if _internal(e) else e),
                       seconds=round(time.perf_counter() - t0, 2))
            return rec
    sites = analysis.summary.sites
    rec.update(sites=len(sites), skipped=[str(s) for s in analysis.skipped],
               analysis_unpartitioned=[str(c) for c in analysis.unpartitioned],
               site_shapes=[dict(H=s.num_heads, H_kv=s.num_kv_heads, d=s.head_dim,
                                 rotary=(None if s.rotary is None else f"{s.rotary.style}:{s.rotary.dims}"))
                            for s in sites],
               analyze_seconds=round(time.perf_counter() - t0, 2))
    unpartitioned = len(sites) < rec["attention_layers"] or not sites
    rec["status"] = "unpartitioned" if unpartitioned else "analyzed"
    for dev in devices:
        try:
            cands = solve(analysis.summary, dev)
        except Exception as e:
            rec["splits"].append(dict(devices=dev, outcome="crash", detail=f"solve: {first_line(e)}"))
            continue
        for c in cands:
            if not c.feasible:
                rec.setdefault("infeasible", []).append(dict(devices=dev, m=c.m, n=c.n, reasons=list(c.reasons)))
                continue
            for variant in variants_for(c.m):
                row = dict(devices=dev, m=c.m, n=c.n, variant=variant or "heads")
                if time.perf_counter() - t0 > budget:
                    for label, _, _ in inputs:
                        rec["splits"].append(dict(row, inputs=label, outcome="timeout"))
                    continue
                t1 = time.perf_counter()
                try:
                    prog = compile_split(model, args0, kw0, m=c.m, n=c.n, variant=variant)
                except HelixError as e:
                    if _internal(e):  # "stage X failed ...: IndexError": a crash wrapped by the pipeline
                        for label, _, _ in inputs:
                            rec["splits"].append(dict(row, inputs=label, outcome="crash",
                                                      detail=f"compile: {first_line(e)}",
                                                      where=_where(e.__cause__)))
                        continue
                    for label, _, _ in inputs:
                        rec["splits"].append(dict(row, inputs=label, outcome="refused", detail=first_line(e)))
                    continue
                except _HardLimit:
                    raise
                except BaseException as e:
                    for label, _, _ in inputs:
                        rec["splits"].append(dict(row, inputs=label, outcome="crash",
                                                  detail=f"compile: {first_line(e)}",
                                                  where=_where(e)))
                    continue
                for label, a, k in inputs:
                    try:
                        outs = prog.simulate(*a, **k)
                        outcome, err, detail = compare(outs, wants[label])
                    except _HardLimit:
                        raise
                    except BaseException as e:
                        outcome, err, detail = "crash", math.nan, f"simulate: {first_line(e)}"
                        row["where"] = _where(e)
                    if outcome == "ok" and unpartitioned:
                        outcome = "unpartitioned"
                    rec["splits"].append(dict(row, inputs=label, outcome=outcome,
                                              rel_err=None if not math.isfinite(err) else float(f"{err:.3g}"),
                                              detail=detail, seconds=round(time.perf_counter() - t1, 2)))
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def _internal(e: BaseException) -> bool:
    """A HelixError the pipeline raised around an exception that is not one (pipeline.py /
    api.py "stage X failed after ...: <the exception>"): an internal error, not a refusal."""
    from helix_compiler.errors import HelixError

    return (isinstance(e, HelixError) and e.__cause__ is not None
            and not isinstance(e.__cause__, HelixError) and " failed after " in str(e))


def _where(e: BaseException) -> str:
    """The innermost frame of the traceback inside helix_compiler/ or passes/."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "/helix_compiler/" in f.filename or "/passes/" in f.filename]
    f = (ours or frames or [None])[-1]
    return "" if f is None else f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.name}:{f.lineno}"


OUTCOMES = ("ok", "wrong", "nan", "crash", "refused", "unpartitioned", "timeout", "ref_nan")


def _run_whole(r: dict) -> str:
    """`cores / warnings`: program.unpartitioned and the HelixWarnings of the 1-device compile."""
    if "program_unpartitioned" not in r:
        return "-"
    return f"{len(r['program_unpartitioned'])} / {len(r.get('helix_warnings') or [])}"


def silent(r: dict) -> bool:
    """Fewer sites than attention layers, and nothing (skip note, unpartitioned core, warning) says so."""
    return (r.get("sites") is not None and r["sites"] < r.get("attention_layers", 0)
            and not r.get("skipped") and not r.get("program_unpartitioned") and not r.get("helix_warnings"))


def report(paths: list[str], out_json: Path, out_md: Path) -> None:
    """Merge sweep JSONs (later files win per (model, attn)) and write the model x outcome table."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    merged = {k: v for k, v in docs[0].items() if k != "models"}
    merged["commands"] = [d.get("command") for d in docs]
    merged["last_run_seconds"] = sum(d.get("last_run_seconds") or 0 for d in docs)
    rows: dict = {}
    for d in docs:
        for r in d["models"]:
            rows[(r["model"], r["attn"])] = r
    order = {name: i for i, name in enumerate(MODELS)}
    models = sorted(rows.values(), key=lambda r: (order.get(r["model"], 999), r["attn"]))
    merged["models"] = models
    out_json.write_text(json.dumps(merged, indent=1))
    lines = [f"# Helix HF sweep", "",
             f"torch {merged.get('torch')}, transformers {merged.get('transformers')}, devices "
             f"{merged.get('devices')}, tol {merged.get('tol')}, budget {merged.get('budget_s')} s per model; "
             f"commands: {'; '.join(c for c in merged['commands'] if c)}", "",
             "One count per (split, variant, inputs): inputs are `leftpad` (row 1's first 3 positions "
             "masked) and, where the model takes attention_mask, `fullpad` (row 2 fully masked too).", "",
             "`skipped`: find_attention's notes on cores it left unsharded. `run whole`: the attention "
             "cores the 1-device program lists as run unpartitioned (`program.unpartitioned`) / the "
             "HelixWarnings its compile gave (`-` where that compile failed); a model with sites < "
             "layers and 0 / 0 there would be silently unpartitioned. `s`: seconds for the model "
             "(capture + all splits).", "",
             "| model | attn | status | sites/layers | skipped | run whole | " + " | ".join(OUTCOMES)
             + " | s | first failure |",
             "|---|---|---|---|---|---|" + "---|" * len(OUTCOMES) + "---|---|"]
    totals = dict.fromkeys(OUTCOMES, 0)
    for r in models:
        counts = dict.fromkeys(OUTCOMES, 0)
        first = r.get("error") or (f"compile for 1 device: {r['compile1_error']}" if r.get("compile1_error") else "")
        for sp in r["splits"]:
            counts[sp["outcome"]] = counts.get(sp["outcome"], 0) + 1
            if not first and sp["outcome"] not in ("ok", "ref_nan", "unpartitioned", "timeout"):
                first = (f"{sp['outcome']} m={sp.get('m')}x n={sp.get('n')} {sp.get('variant')} "
                         f"{sp.get('inputs')}: {sp.get('detail', '')}")
        for k in OUTCOMES:
            totals[k] += counts.get(k, 0)
        first = first.replace("|", "\\|")[:160]
        lines.append(f"| {r['model']} | {r['attn']} | {r.get('status')} | {r.get('sites', '-')}/"
                     f"{r.get('attention_layers', '-')} | {len(r.get('skipped') or [])} | {_run_whole(r)} | "
                     + " | ".join(str(counts[k] or "") for k in OUTCOMES)
                     + f" | {r.get('seconds', '')} | {first} |")
    lines.append("| **total** | | | | | | " + " | ".join(str(totals[k]) for k in OUTCOMES) + " | | |")
    quiet = [f"{r['model']} {r['attn']}" for r in models if silent(r)]
    lines += ["", f"Silently unpartitioned (sites < layers with no skip note, no unpartitioned core and no "
                  f"HelixWarning): {', '.join(quiet) if quiet else 'none'}."]
    out_md.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="", help="comma-separated names (default: all); see --list")
    p.add_argument("--attn", default="eager,sdpa")
    p.add_argument("--devices", default="4,8")
    p.add_argument("--budget", type=float, default=MODEL_BUDGET_S, help="seconds per model and attn")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/hf_sweep.json"))
    p.add_argument("--resume", action="store_true", help="keep the models already in --out")
    p.add_argument("--list", action="store_true")
    p.add_argument("--report", nargs="+", metavar="JSON",
                   help="merge these sweep JSONs into --out and write the table to --md; runs nothing")
    p.add_argument("--md", default=str(ROOT / "benchmarks/results/hf_sweep.md"))
    ns = p.parse_args(argv)
    if ns.report:
        report(ns.report, Path(ns.out), Path(ns.md))
        return 0
    if ns.list:
        print("\n".join(MODELS))
        return 0
    import transformers

    names = [m for m in ns.models.split(",") if m] or list(MODELS)
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        p.error(f"unknown models {unknown}; --list names them")
    devices = tuple(int(d) for d in ns.devices.split(","))
    attns = [a for a in ns.attn.split(",") if a]
    out = Path(ns.out)
    doc = {"models": []}
    if ns.resume and out.exists():
        doc = json.loads(out.read_text())
    done = {(r["model"], r["attn"]) for r in doc["models"]}
    doc.update(torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
               command=" ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
               omp_num_threads=os.environ.get("OMP_NUM_THREADS"), devices=list(devices), tol=REL_TOL,
               budget_s=ns.budget)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    signal.signal(signal.SIGALRM, _alarm)
    t_all = time.perf_counter()
    for name in names:
        for attn in attns:
            if (name, attn) in done:
                continue
            signal.alarm(int(max(HARD_LIMIT_S, 3 * ns.budget)))
            try:
                rec = sweep_model(name, attn, devices, ns.budget)
            except _HardLimit as e:
                rec = {"model": name, "attn": attn, "status": "hard_timeout", "error": str(e), "splits": []}
            except BaseException as e:  # one model cannot stop the sweep
                rec = {"model": name, "attn": attn, "status": "sweep_crash", "error": first_line(e), "splits": []}
            finally:
                signal.alarm(0)
            doc["models"] = [r for r in doc["models"] if (r["model"], r["attn"]) != (name, attn)] + [rec]
            counts: dict = {}
            for s in rec["splits"]:
                counts[s["outcome"]] = counts.get(s["outcome"], 0) + 1
            print(f"{name:16s} {attn:6s} {rec.get('status'):14s} sites={rec.get('sites')}/"
                  f"{rec.get('attention_layers')} {counts} {rec.get('seconds')}s {rec.get('error', '')}",
                  flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(doc, indent=1))
    doc["last_run_seconds"] = round(time.perf_counter() - t_all, 1)
    out.write_text(json.dumps(doc, indent=1))
    print(f"done in {time.perf_counter() - t_all:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
