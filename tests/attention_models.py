"""Real implementations of the attention features Helix has to shard, one model per feature.

Each entry builds `(model, args, kwargs)` from a small Hugging Face Config object or from
torch.nn (nothing is downloaded), seeded, float32, eval mode, batch B = 2, and says what
`find_attention` should report: `sites` attention subgraphs of H = `heads` query heads,
H_kv = `kv_heads` and head dim d = `head_dim`, plus the feature flags a site carries
(`rotary` dims, `qk_norm`, `head_bias`, `cross`).  `features` names the rows of
docs/features.md the model stands for (`FEATURES`), `devices` the device counts
test_features.py compiles it for (every feasible (m, n) of each).

HF models come twice where they support both: attn_implementation "eager" (explicit
matmul -> softmax -> matmul) and "sdpa" (aten.scaled_dot_product_attention).
Transformers 5.x decoders need use_cache=False (a DynamicCache does not export).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

BATCH = 2
SEQ = 8        # S (encoder / query length)
DEC_SEQ = 5    # decoder length of the encoder-decoders: S_q = 5 != S_k = 8 in cross-attention
VOCAB = 256
# Device counts each model is compiled for (every feasible (m, n) of each): the eager spelling
# gets 2, 8 and 16 (m and n from 1 to 8), its sdpa twin 4 and 16, to keep the file's runtime
# near five minutes on two cores.
DEVICES = (2, 8, 16)
TWIN_DEVICES = (4, 16)

# What a feature means, as docs/features.md lists it.
FEATURES = {
    "gqa": "grouped-query attention, n > H_kv (kv heads replicated over head groups)",
    "mqa": "multi-query attention, H_kv = 1",
    "fused_qkv": "fused QKV projection (one weight for q, k, v)",
    "rotary_full": "rotary embedding on all d dims, m > 1",
    "rotary_partial": "partial rotary embedding (r < d), m > 1",
    "qk_norm": "per-head RMSNorm / LayerNorm of q and k, m > 1",
    "causal_mask": "causal mask",
    "padding_mask": "padding mask from attention_mask",
    "alibi": "ALiBi bias (head axis, sliced per head group)",
    "relative_bias": "relative position bias (head axis)",
    "no_scale": "attention without 1/sqrt(d) scaling",
    "explicit_softmax": "explicit matmul -> softmax -> matmul",
    "sdpa": "F.scaled_dot_product_attention",
    "cross_attention": "cross-attention, key length != query length",
    "encoder_decoder": "encoder-decoder model",
    "vision": "vision transformer (patch embedding, CLS token)",
    "m_forced": "head count forcing m > 1 (12 heads on 16 devices)",
    "many_devices": "32 devices",
    "mla": "multi-head latent attention (low-rank q / kv, rope key shared by all heads), m = 1",
    "output_gate": "output gate packed into q_proj (attn_output * sigmoid(gate) before o_proj)",
    "disentangled_relative": "disentangled relative attention (c2p + p2c terms gathered by relative position)",
    # features-a
    "rotary_interleaved": "interleaved rotary (pairs 2t, 2t + 1 by x[..., 0::2] / x[..., 1::2]), m > 1",
    "rotary_complex": "complex rotary (view_as_complex, pairs 2t, 2t + 1 times a complex freqs table), m > 1",
    "softcap": "attention-logit softcapping (c * tanh(scores / c) before the softmax)",
    "sinks": "attention sinks (a learned per-head logit column cat onto the scores, dropped after the softmax)",
    # sweep2
    "gqa_broadcast": "grouped-query attention with k / v broadcast to all H heads by torch.broadcast_to",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class FeatureModel:
    name: str
    build: Callable[[], tuple[nn.Module, tuple, dict]]
    features: tuple[str, ...]
    description: str        # the model as docs/features.md names it
    sites: int
    heads: int
    kv_heads: int
    head_dim: int
    rotary_dims: int = 0    # r, 0 without rotary
    rotary_style: str = "half"  # "half" (rotate_half) or "interleaved" (pairs 2t, 2t + 1)
    qk_norm: bool = False
    head_bias: bool = False
    cross_sites: int = 0    # sites whose K/V come from another input
    devices: tuple[int, ...] = DEVICES
    v_head_dim: int = 0     # d_v when it differs from d (MLA), else 0
    k_shared_dims: int = 0  # key dims from a projection shared by all heads (MLA's rope key)
    gated: bool = False     # an output gate between the core and o_proj
    # all-reduces over the m-group per site with m > 1 beyond the core's own (DeBERTa: the
    # c2p and p2c terms contract q / k with the relative embeddings over d)
    extra_dim_reduces: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.features) - set(FEATURES)
        if unknown:
            raise ValueError(f"FeatureModel {self.name}: unknown features {sorted(unknown)}")
        if self.heads % self.kv_heads or (self.rotary_dims and self.rotary_dims > self.head_dim) \
                or self.rotary_style not in ("half", "interleaved"):
            raise ValueError(f"FeatureModel {self.name}: H={self.heads}, H_kv={self.kv_heads}, "
                             f"d={self.head_dim}, r={self.rotary_dims} ({self.rotary_style!r})")

    def __repr__(self) -> str:
        return f"FeatureModel({self.name})"


def _seeded(fn: Callable[..., tuple[nn.Module, tuple, dict]]) -> Callable[..., tuple[nn.Module, tuple, dict]]:
    @functools.wraps(fn)
    def build(*a, **k) -> tuple[nn.Module, tuple, dict]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, args, kwargs = fn(*a, **k)
        return model.float().eval(), args, kwargs

    return build


def _ids(seq: int = SEQ) -> torch.Tensor:
    return torch.randint(3, VOCAB, (BATCH, seq))  # (B, S); 0-2 left to pad / bos / eos


def _padding_mask() -> torch.Tensor:
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)  # (B, S)
    mask[1, -3:] = 0  # the second sequence is 5 tokens long
    return mask


# ---- decoders: GQA, MQA, rotary, q/k norm, ALiBi ---------------------------------------------

@_seeded
def _llama(attn: str, kv_heads: int):
    # LLaMA: separate q/k/v/o, GQA repeat_kv, rotary "half" on all d = 8 dims, RMSNorm, gated MLP.
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=8,
                         num_key_value_heads=kv_heads, intermediate_size=128, vocab_size=VOCAB,
                         max_position_embeddings=64, attn_implementation=attn)
    return LlamaForCausalLM(config), (_ids(),), {"use_cache": False}


@_seeded
def _falcon(attn: str):
    # Falcon-7B layout: multi_query fused query_key_value (D -> (H + 2) * d), rotary, parallel attn + MLP.
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=8, vocab_size=VOCAB,
                          multi_query=True, new_decoder_architecture=False, alibi=False,
                          parallel_attn=True, bias=False, bos_token_id=1, eos_token_id=2,
                          attn_implementation=attn)
    return FalconForCausalLM(config), (_ids(),), {"use_cache": False}


@_seeded
def _falcon_alibi(attn: str):
    # Falcon-RW layout: ALiBi instead of rotary, fused query_key_value, MHA.
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=8, vocab_size=VOCAB,
                          multi_query=False, new_decoder_architecture=False, alibi=True,
                          parallel_attn=False, bias=True, bos_token_id=1, eos_token_id=2,
                          attn_implementation=attn)
    return FalconForCausalLM(config), (_ids(),), {"use_cache": False}


@_seeded
def _gpt_bigcode(attn: str):
    # StarCoder: multi_query c_attn Linear(D, D + 2d), q | k | v with one kv head.
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    config = GPTBigCodeConfig(n_layer=2, n_embd=64, n_head=8, n_positions=64, vocab_size=VOCAB,
                              multi_query=True, bos_token_id=1, eos_token_id=2, attn_implementation=attn)
    return GPTBigCodeForCausalLM(config), (_ids(),), {"use_cache": False}


@_seeded
def _gpt2(attn: str, heads: int = 8, hidden: int = 64):
    # GPT-2: Conv1D c_attn (weight (D, 3D), addmm), causal mask by where.
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=hidden, n_head=heads, n_positions=64, vocab_size=VOCAB,
                        bos_token_id=1, eos_token_id=2, attn_implementation=attn)
    return GPT2LMHeadModel(config), (_ids(),), {"use_cache": False}


@_seeded
def _gpt_neox(attn: str):
    # Pythia: query_key_value weight laid out [H, 3, d] (heads interleaved), rotary on 25% of d.
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(num_hidden_layers=2, hidden_size=128, num_attention_heads=8,
                           intermediate_size=256, vocab_size=VOCAB, max_position_embeddings=64,
                           rotary_pct=0.25, bos_token_id=1, eos_token_id=2, attn_implementation=attn)
    return GPTNeoXForCausalLM(config), (_ids(),), {"use_cache": False}


@_seeded
def _phi(attn: str):
    # Phi-2: separate q/k/v + dense, rotary on half of d (partial_rotary_factor 0.5), parallel block.
    from transformers import PhiConfig, PhiForCausalLM

    config = PhiConfig(num_hidden_layers=2, hidden_size=128, num_attention_heads=8, intermediate_size=256,
                       vocab_size=VOCAB, max_position_embeddings=64, partial_rotary_factor=0.5,
                       bos_token_id=1, eos_token_id=2, attn_implementation=attn)
    return PhiForCausalLM(config), (_ids(),), {"use_cache": False}


@_seeded
def _phi_qk_layernorm(attn: str):
    # Phi with qk_layernorm: LayerNorm over the head dim of q and k (mean and variance over d).
    from transformers import PhiConfig, PhiForCausalLM

    config = PhiConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=8, intermediate_size=128,
                       vocab_size=VOCAB, max_position_embeddings=64, partial_rotary_factor=1.0,
                       qk_layernorm=True, bos_token_id=1, eos_token_id=2, attn_implementation=attn)
    return PhiForCausalLM(config), (_ids(),), {"use_cache": False}


@_seeded
def _qwen3(attn: str):
    # Qwen3: RMSNorm over the head dim of q and k (q_norm / k_norm) before rotary; GQA 8 / 4.
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=8, num_key_value_heads=4,
                         head_dim=8, intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, attn_implementation=attn)
    return Qwen3ForCausalLM(config), (_ids(),), {"use_cache": False}


@_seeded
def _bloom(attn: str):
    # BLOOM: ALiBi slopes per head added by baddbmm, query_key_value [H, 3, d].
    from transformers import BloomConfig, BloomForCausalLM

    config = BloomConfig(n_layer=2, hidden_size=64, n_head=8, vocab_size=VOCAB, bos_token_id=1,
                         eos_token_id=2, attn_implementation=attn)
    return BloomForCausalLM(config), (_ids(),), {"use_cache": False}


@_seeded
def _mpt(attn: str):
    # MPT: ALiBi (attn_config.alibi), fused Wqkv, no biases.
    from transformers import MptConfig, MptForCausalLM

    config = MptConfig(n_layers=2, d_model=64, n_heads=8, expansion_ratio=2, max_seq_len=64,
                       vocab_size=VOCAB, attn_implementation=attn)
    return MptForCausalLM(config), (_ids(),), {"use_cache": False}


# ---- encoders, encoder-decoders, vision -------------------------------------------------------

@_seeded
def _bert(attn: str):
    # BERT: padding mask from attention_mask (zeros in the second row), not causal.
    from transformers import BertConfig, BertModel

    config = BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=8, intermediate_size=128,
                        vocab_size=VOCAB, max_position_embeddings=64, attn_implementation=attn)
    ids = _ids()
    return BertModel(config), (ids,), {"attention_mask": _padding_mask()}


@_seeded
def _t5(attn: str):
    # T5: relative position bias (B, H, S_q, S_k) shared by the layers of a stack, no 1/sqrt(d),
    # encoder self, decoder self (causal) and decoder cross-attention (S_q = 5, S_k = 8).
    from transformers import T5Config, T5Model

    config = T5Config(num_layers=1, num_decoder_layers=1, d_model=64, d_kv=8, num_heads=8, d_ff=128,
                      vocab_size=VOCAB, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, attn_implementation=attn)
    return T5Model(config), (_ids(),), {"decoder_input_ids": _ids(DEC_SEQ), "attention_mask": _padding_mask(),
                                        "use_cache": False}


@_seeded
def _bart(attn: str):
    # BART: encoder self, decoder self (causal) and cross-attention (S_q = 5, S_k = 8), scaled q.
    from transformers import BartConfig, BartModel

    config = BartConfig(encoder_layers=1, decoder_layers=1, d_model=64, encoder_attention_heads=8,
                        decoder_attention_heads=8, encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=VOCAB,
                        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        decoder_start_token_id=2, forced_eos_token_id=2, attn_implementation=attn)
    return BartModel(config), (_ids(),), {"decoder_input_ids": _ids(DEC_SEQ), "use_cache": False}


@_seeded
def _vit(attn: str):
    # ViT: Conv2d patch embedding of a 16x16 image into 4x4 patches + CLS: S = 17 tokens.
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=8, intermediate_size=128,
                       image_size=16, patch_size=4, num_channels=3, attn_implementation=attn)
    return ViTModel(config, add_pooling_layer=False), (torch.randn(BATCH, 3, 16, 16),), {}


class _PackedMHA(nn.Module):
    """nn.MultiheadAttention self-attention with its packed in_proj_weight (3D, D), causal."""

    def __init__(self, dim: int = 64, heads: int = 8, layers: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=True) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        S = x.shape[1]
        causal = torch.ones(S, S, dtype=torch.bool).triu(1)  # True = may not attend
        for attn in self.layers:
            x = x + attn(x, x, x, attn_mask=causal, need_weights=False)[0]  # (B, S, D)
        return x


@_seeded
def _packed_mha():
    return _PackedMHA(), (torch.randn(BATCH, SEQ, 64),), {}


@_seeded
def _transformer_decoder():
    # nn.TransformerDecoder: causal self-attention on tgt (S_q = 5) and cross-attention to
    # memory (S_k = 8) whose k/v use rows D: of the packed in_proj_weight.
    layer = nn.TransformerDecoderLayer(d_model=64, nhead=8, dim_feedforward=128, batch_first=True)
    model = _Decoder(nn.TransformerDecoder(layer, num_layers=2))
    tgt, memory = torch.randn(BATCH, DEC_SEQ, 64), torch.randn(BATCH, SEQ, 64)
    return model, (tgt, memory), {}


class _Decoder(nn.Module):
    def __init__(self, decoder: nn.TransformerDecoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        S = tgt.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(S)  # (S, S), -inf above the diagonal
        # tgt_is_causal=True: otherwise the decoder compares the mask with a causal one
        # (torch.equal), a data-dependent branch torch.export cannot capture.
        return self.decoder(tgt, memory, tgt_mask=causal, tgt_is_causal=True)


@_seeded
def _paper_32():
    # 32 heads of d = 8 (D = 256): 32 devices split as (1, 32), (2, 16), (4, 8), (8, 4).
    from examples.paper_model import PaperConfig, build

    model, args = build(PaperConfig(heads=32, head_dim=8, mlp=512, batch=BATCH, seq=SEQ, dtype=torch.float32))
    return model, args, {}


# --- features-b builders

@_seeded
def _deepseek(attn: str, version: int):
    # MLA: q = q_b_proj(norm(q_a_proj(x))); kv_a_proj_with_mqa(x) -> latent (16) | k_pe (4, one
    # rope key for all heads); k = cat(k_nope from kv_b_proj, k_pe expanded to H heads), built by
    # copies into new_empty; v from kv_b_proj with d_v = 6 != d = 12. Dense MLPs in both layers
    # (first_k_dense_replace = 2); the MoE layers capture too, but are not what this row tests.
    if version == 2:
        from transformers import DeepseekV2Config as Config, DeepseekV2Model as Model
    else:
        from transformers import DeepseekV3Config as Config, DeepseekV3Model as Model
    config = Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=8, num_key_value_heads=8,
                    intermediate_size=128, moe_intermediate_size=32, vocab_size=VOCAB, max_position_embeddings=64,
                    q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
                    n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=2,
                    attn_implementation=attn)
    return Model(config), (_ids(),), {"attention_mask": _padding_mask(), "use_cache": False}


@_seeded
def _qwen3_next(attn: str):
    # Qwen3-Next's full-attention layers: q_proj gives (B, S, H, 2d), chunked into query and gate;
    # attn_output * sigmoid(gate) before o_proj. layer_types all "full_attention" (no gated delta
    # net layers) and dense MLPs (mlp_only_layers), q_norm / k_norm, rotary on 4 of d = 8 dims.
    from transformers import Qwen3NextConfig, Qwen3NextModel

    config = Qwen3NextConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=8, num_key_value_heads=4,
                             head_dim=8, intermediate_size=128, moe_intermediate_size=32, vocab_size=VOCAB,
                             max_position_embeddings=64, layer_types=["full_attention"] * 2, num_experts=4,
                             num_experts_per_tok=2, mlp_only_layers=[0, 1], partial_rotary_factor=0.5,
                             attn_implementation=attn)
    return Qwen3NextModel(config), (_ids(),), {"attention_mask": _padding_mask(), "use_cache": False}


@_seeded
def _deberta_v2():
    # DeBERTa-v2: scores = q k^T / sqrt(3d) + c2p + p2c; c2p = q against key_proj(rel_embeddings),
    # p2c = k against query_proj(rel_embeddings) (share_att_key), gathered by relative position;
    # (B*H, S, d) layout, k^T scaled before the matmul. Eager only in transformers.
    from transformers import DebertaV2Config, DebertaV2Model

    config = DebertaV2Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=8, intermediate_size=128,
                             vocab_size=VOCAB, max_position_embeddings=64, relative_attention=True,
                             position_buckets=8, max_relative_positions=16, pos_att_type=["p2c", "c2p"],
                             share_att_key=True, norm_rel_ebd="layer_norm", attn_implementation="eager")
    return DebertaV2Model(config), (_ids(),), {"attention_mask": _padding_mask()}


# ---- features-a: interleaved and complex rotary, logit softcapping, attention sinks -----------
# Inputs a user would pass: B = 3, S = 6, attention_mask with one full row, one left-padded
# by 2 and one fully padded row.
PAD_BATCH, PAD_SEQ = 3, 6
PAD_DEVICES = (4,)  # (1, 4) with n > H_kv = 2, (2, 2) and (4, 1) in both m > 1 variants


def _padded_ids() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (PAD_BATCH, PAD_SEQ))  # (B, S)
    mask = torch.ones(PAD_BATCH, PAD_SEQ, dtype=torch.long)
    mask[1, :2] = 0  # left-padded
    mask[2] = 0      # fully padded
    ids[mask == 0] = 0
    return ids, mask


def _decoder_inputs(model: nn.Module) -> tuple[nn.Module, tuple, dict]:
    ids, mask = _padded_ids()
    return model, (ids,), {"attention_mask": mask, "use_cache": False}


@_seeded
def _cohere():
    # Cohere (Command-R): rotate_half over x[..., ::2] / x[..., 1::2] (pairs 2t, 2t + 1) on all
    # d = 8 dims, cos / sin by repeat_interleave; GQA 8 / 2; parallel attention + MLP.
    from transformers import CohereConfig, CohereModel

    config = CohereConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                          intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0,
                          bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    return _decoder_inputs(CohereModel(config))


@_seeded
def _llama4():
    # Llama 4 text: rotary as view_as_complex(q.reshape(..., d/2, 2)) * freqs_cis, view_as_real,
    # flatten (Meta's reference LLaMA spelling); L2 q/k norm after it (use_qk_norm); GQA 8 / 2.
    from transformers import Llama4TextConfig, Llama4TextModel

    config = Llama4TextConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                              head_dim=8, intermediate_size=128, intermediate_size_mlp=128, vocab_size=VOCAB,
                              max_position_embeddings=64, num_local_experts=1, pad_token_id=0, bos_token_id=1,
                              eos_token_id=2, attn_implementation="eager")
    return _decoder_inputs(Llama4TextModel(config))


@_seeded
def _gemma2():
    # Gemma 2 eager: scores / c -> tanh -> * c (attn_logit_softcapping) between QK^T and the
    # softmax; sliding-window and full layers. c = 0.02: the random model's scores are ~0.015,
    # so tanh is far from linear and a softcap of partial (per-slice) scores would show.
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                          head_dim=8, intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64,
                          sliding_window=4, attn_logit_softcapping=0.02, pad_token_id=0, bos_token_id=1,
                          eos_token_id=2, attn_implementation="eager")
    return _decoder_inputs(Gemma2Model(config))


@_seeded
def _gpt_oss():
    # GPT-OSS eager: a learned sinks (H,) column reshaped / expanded to (B, H, S, 1), cat onto
    # the scores, minus the row max, softmax, probs[..., :-1]; rotate-half by chunk; a
    # sliding-window and a full layer; MoE blocks (4 experts, top 2), run whole on every rank.
    from transformers import GptOssConfig, GptOssModel

    config = GptOssConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                          head_dim=8, intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64,
                          num_local_experts=4, num_experts_per_tok=2, sliding_window=4, pad_token_id=0,
                          bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    model, args, kwargs = _decoder_inputs(GptOssModel(config))
    with torch.no_grad():  # sinks large enough to take a visible share of the probability
        for layer in model.layers:
            layer.self_attn.sinks.normal_(0.0, 1.0)
    return model, args, kwargs


@_seeded
def _gptj():
    # GPT-J: rotate_every_two (x[..., ::2] / x[..., 1::2], stack, flatten) on rotary_dim = 8 of
    # d = 16 dims: partial interleaved rotary (the [:r] slice and the stride-2 slices together).
    from transformers import GPTJConfig, GPTJModel

    config = GPTJConfig(n_layer=2, n_embd=64, n_head=4, rotary_dim=8, n_positions=64, n_inner=128,
                        vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    return _decoder_inputs(GPTJModel(config))


@_seeded
def _falcon_gqa(attn: str):
    # Falcon-40B / 180B layout (new_decoder_architecture): query_key_value laid out per kv group
    # as [q_per_kv query heads, k, v], k and v taken by an index list (qkv[..., [-2]]) and
    # torch.broadcast_to the query's (B, S, H_kv, H / H_kv, d) before flatten: H kv heads that
    # repeat the 2 real ones; rotary; parallel attention + MLP with two layer norms.
    from transformers import FalconConfig, FalconModel

    config = FalconConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=8, num_kv_heads=2,
                          vocab_size=VOCAB, new_decoder_architecture=True, alibi=False, bias=False,
                          bos_token_id=1, eos_token_id=2, attn_implementation=attn)
    return _decoder_inputs(FalconModel(config))


def _both(name: str, build: Callable, features: tuple[str, ...], **kw) -> tuple[FeatureModel, ...]:
    """The eager (explicit softmax) and the sdpa spelling of one HF model."""
    return (
        FeatureModel(name=f"{name}_eager", build=functools.partial(build, "eager"),
                     features=(*features, "explicit_softmax"), **kw),
        FeatureModel(name=f"{name}_sdpa", build=functools.partial(build, "sdpa"),
                     features=(*features, "sdpa"), devices=TWIN_DEVICES, **kw),
    )


FEATURE_MODELS: tuple[FeatureModel, ...] = (
    *_both("llama_gqa", functools.partial(_llama, kv_heads=2), ("gqa", "rotary_full", "causal_mask"),
           description="HF LLaMA, 8 heads / 2 kv heads, d = 8", sites=2, heads=8, kv_heads=2, head_dim=8,
           rotary_dims=8),
    *_both("llama_mqa", functools.partial(_llama, kv_heads=1), ("mqa", "rotary_full", "causal_mask"),
           description="HF LLaMA, 8 heads / 1 kv head, d = 8", sites=2, heads=8, kv_heads=1, head_dim=8,
           rotary_dims=8),
    *_both("falcon_mqa", _falcon, ("mqa", "fused_qkv", "rotary_full", "causal_mask"),
           description="HF Falcon (multi_query, fused query_key_value), 8 heads, d = 8", sites=2, heads=8,
           kv_heads=1, head_dim=8, rotary_dims=8),
    *_both("gpt_bigcode_mqa", _gpt_bigcode, ("mqa", "fused_qkv", "causal_mask"),
           description="HF GPTBigCode (multi_query c_attn), 8 heads, d = 8", sites=2, heads=8, kv_heads=1,
           head_dim=8),
    *_both("gpt2", _gpt2, ("fused_qkv", "causal_mask"),
           description="HF GPT-2 (Conv1D c_attn), 8 heads, d = 8", sites=2, heads=8, kv_heads=8, head_dim=8),
    FeatureModel(name="packed_mha", build=_packed_mha, features=("fused_qkv", "causal_mask", "sdpa"),
                 description="nn.MultiheadAttention (packed in_proj_weight), 8 heads, d = 8", sites=2,
                 heads=8, kv_heads=8, head_dim=8),
    *_both("gpt_neox", _gpt_neox, ("fused_qkv", "rotary_partial", "causal_mask"),
           description="HF GPT-NeoX ([H, 3, d] query_key_value, rotary_pct 0.25), 8 heads, d = 16",
           sites=2, heads=8, kv_heads=8, head_dim=16, rotary_dims=4),
    *_both("phi", _phi, ("rotary_partial", "causal_mask"),
           description="HF Phi (partial_rotary_factor 0.5), 8 heads, d = 16", sites=2, heads=8, kv_heads=8,
           head_dim=16, rotary_dims=8),
    *_both("qwen3", _qwen3, ("qk_norm", "gqa", "rotary_full", "causal_mask"),
           description="HF Qwen3 (q_norm / k_norm), 8 heads / 4 kv heads, d = 8", sites=2, heads=8,
           kv_heads=4, head_dim=8, rotary_dims=8, qk_norm=True),
    *_both("phi_qk_layernorm", _phi_qk_layernorm, ("qk_norm", "rotary_full", "causal_mask"),
           description="HF Phi (qk_layernorm), 8 heads, d = 8", sites=2, heads=8, kv_heads=8, head_dim=8,
           rotary_dims=8, qk_norm=True),
    # BLOOM and MPT have no sdpa implementation in transformers ("does not support an attention
    # implementation through torch.nn.functional.scaled_dot_product_attention yet").
    FeatureModel(name="bloom_eager", build=functools.partial(_bloom, "eager"),
                 features=("alibi", "fused_qkv", "causal_mask", "explicit_softmax"),
                 description="HF BLOOM (ALiBi by baddbmm), 8 heads, d = 8", sites=2, heads=8, kv_heads=8,
                 head_dim=8, head_bias=True),
    FeatureModel(name="mpt_eager", build=functools.partial(_mpt, "eager"),
                 features=("alibi", "fused_qkv", "causal_mask", "explicit_softmax"),
                 description="HF MPT (ALiBi), 8 heads, d = 8", sites=2, heads=8, kv_heads=8, head_dim=8,
                 head_bias=True),
    *_both("falcon_alibi", _falcon_alibi, ("alibi", "fused_qkv", "causal_mask"),
           description="HF Falcon (alibi=True), 8 heads, d = 8", sites=2, heads=8, kv_heads=8, head_dim=8,
           head_bias=True),
    *_both("bert_padding", _bert, ("padding_mask",),
           description="HF BERT, attention_mask with padding in one row, 8 heads, d = 8", sites=2, heads=8,
           kv_heads=8, head_dim=8),
    *_both("t5", _t5, ("relative_bias", "no_scale", "encoder_decoder", "cross_attention", "padding_mask",
                       "causal_mask"),
           description="HF T5 (1 + 1 layers), 8 heads, d = 8", sites=3, heads=8, kv_heads=8, head_dim=8,
           head_bias=True, cross_sites=1),
    *_both("bart", _bart, ("encoder_decoder", "cross_attention", "causal_mask"),
           description="HF BART (1 + 1 layers), 8 heads, d = 8", sites=3, heads=8, kv_heads=8, head_dim=8,
           cross_sites=1),
    FeatureModel(name="transformer_decoder", build=_transformer_decoder,
                 features=("cross_attention", "fused_qkv", "causal_mask", "sdpa"),
                 description="nn.TransformerDecoder (2 layers: self + cross), 8 heads, d = 8", sites=4, heads=8,
                 kv_heads=8, head_dim=8, cross_sites=2),
    *_both("vit", _vit, ("vision",),
           description="HF ViT (16x16 image, 4x4 patches), 8 heads, d = 8", sites=2, heads=8, kv_heads=8,
           head_dim=8),
    FeatureModel(name="gpt2_12_heads", build=functools.partial(_gpt2, "eager", heads=12, hidden=96),
                 features=("m_forced", "fused_qkv", "causal_mask", "explicit_softmax"),
                 description="HF GPT-2, 12 heads, d = 8, on 16 devices", sites=2, heads=12, kv_heads=12,
                 head_dim=8, devices=(16,)),
    FeatureModel(name="paper_32_heads", build=_paper_32, features=("many_devices", "sdpa"),
                 description="examples/paper_model.py, 32 heads, d = 8, on 32 devices", sites=2, heads=32,
                 kv_heads=32, head_dim=8, devices=(32,)),
    # --- features-b: MLA (DeepSeek-V2 / V3), Qwen3-Next's output gate, DeBERTa-v2's relative terms
    *(FeatureModel(name=f"deepseek_v2_mla_{attn}", build=functools.partial(_deepseek, attn, version=2),
                   features=("mla", "padding_mask", "causal_mask", feature),
                   description="HF DeepSeek-V2 (q_lora_rank 32, kv_lora_rank 16, d = 8 + 4 rope, d_v = 6), "
                               "8 heads", sites=2, heads=8, kv_heads=8, head_dim=12, v_head_dim=6, k_shared_dims=4,
                   devices=devices)
      for attn, feature, devices in (("eager", "explicit_softmax", (4, 8)), ("sdpa", "sdpa", (4,)))),
    FeatureModel(name="deepseek_v3_mla_eager", build=functools.partial(_deepseek, "eager", version=3),
                 features=("mla", "padding_mask", "causal_mask", "explicit_softmax"),
                 description="HF DeepSeek-V3 (interleaved rope on the shared key), 8 heads, d = 12, d_v = 6",
                 sites=2, heads=8, kv_heads=8, head_dim=12, v_head_dim=6, k_shared_dims=4, devices=(4,)),
    *(FeatureModel(name=f"qwen3_next_gate_{attn}", build=functools.partial(_qwen3_next, attn),
                   features=("output_gate", "qk_norm", "rotary_partial", "padding_mask", "causal_mask",
                             feature),
                   description="HF Qwen3-Next (full-attention layers: gate packed in q_proj), 8 heads / 4 kv "
                               "heads, d = 8", sites=2, heads=8, kv_heads=4, head_dim=8, rotary_dims=4,
                   qk_norm=True, gated=True, devices=devices)
      for attn, feature, devices in (("eager", "explicit_softmax", (4, 8)), ("sdpa", "sdpa", (4,)))),
    FeatureModel(name="deberta_v2_eager", build=_deberta_v2,
                 features=("disentangled_relative", "padding_mask", "explicit_softmax"),
                 description="HF DeBERTa-v2 (c2p + p2c, share_att_key), 8 heads, d = 8", sites=2, heads=8,
                 kv_heads=8, head_dim=8, head_bias=True, extra_dim_reduces=2, devices=(4, 8)),
    # --- features-a
    FeatureModel(name="cohere_interleaved_rotary", build=_cohere,
                 features=("rotary_interleaved", "gqa", "causal_mask", "padding_mask", "explicit_softmax"),
                 description="HF Cohere (rotate_half on x[..., ::2] / x[..., 1::2]), 8 heads / 2 kv heads, d = 8",
                 sites=2, heads=8, kv_heads=2, head_dim=8, rotary_dims=8, rotary_style="interleaved",
                 devices=PAD_DEVICES),
    FeatureModel(name="llama4_complex_rotary", build=_llama4,
                 features=("rotary_complex", "qk_norm", "gqa", "causal_mask", "padding_mask", "explicit_softmax"),
                 description="HF Llama 4 text (view_as_complex rotary, L2 q/k norm), 8 heads / 2 kv heads, d = 8",
                 sites=2, heads=8, kv_heads=2, head_dim=8, rotary_dims=8, rotary_style="interleaved",
                 qk_norm=True, devices=PAD_DEVICES),
    FeatureModel(name="gemma2_softcap", build=_gemma2,
                 features=("softcap", "rotary_full", "gqa", "causal_mask", "padding_mask", "explicit_softmax"),
                 description="HF Gemma 2 eager (attn_logit_softcapping), 8 heads / 2 kv heads, d = 8",
                 sites=2, heads=8, kv_heads=2, head_dim=8, rotary_dims=8, devices=PAD_DEVICES),
    FeatureModel(name="gpt_oss_sinks", build=_gpt_oss,
                 features=("sinks", "rotary_full", "gqa", "causal_mask", "padding_mask", "explicit_softmax"),
                 description="HF GPT-OSS eager (attention sinks, MoE), 8 heads / 2 kv heads, d = 8",
                 sites=2, heads=8, kv_heads=2, head_dim=8, rotary_dims=8, head_bias=True, devices=PAD_DEVICES),
    FeatureModel(name="gptj_partial_interleaved", build=_gptj,
                 features=("rotary_interleaved", "rotary_partial", "causal_mask", "padding_mask",
                           "explicit_softmax"),
                 description="HF GPT-J (rotate_every_two, rotary_dim 8 of d = 16), 4 heads, d = 16",
                 sites=2, heads=4, kv_heads=4, head_dim=16, rotary_dims=8, rotary_style="interleaved",
                 devices=PAD_DEVICES),
    # --- sweep2
    *(FeatureModel(name=f"falcon_gqa_{attn}", build=functools.partial(_falcon_gqa, attn),
                   features=("gqa_broadcast", "gqa", "fused_qkv", "rotary_full", "causal_mask", "padding_mask",
                             feature),
                   description="HF Falcon `new_decoder_architecture=True` (Falcon-40B / 180B layout), 8 heads / "
                               "2 kv heads, d = 8", sites=2, heads=8, kv_heads=2, head_dim=8, rotary_dims=8,
                   devices=PAD_DEVICES)
      for attn, feature in (("eager", "explicit_softmax"), ("sdpa", "sdpa"))),
)


FEATURE_MODELS_BY_NAME: dict[str, FeatureModel] = {f.name: f for f in FEATURE_MODELS}
