"""The model zoo the tests run Helix on: small, seeded, float32, eval mode, CPU.

Each entry builds `(model, args, kwargs)` for `torch.export.export(model, args,
kwargs, strict=False)`, with batch B = 2 and sequence S = 8, and says what the
attention matcher must find: `sites` attention subgraphs of H = `heads` query
heads, H_kv = `kv_heads` key/value heads and head dim d = `head_dim`.
Hugging Face models are built from Config objects with random weights; nothing
is downloaded. Each covers one attention spelling the matcher has to know:

    gpt2           HF eager: matmul, divide by sqrt(d), causal mask by where, softmax, matmul;
                   fused c_attn (a Conv1D, weight (D, 3D)); lm_head tied to wte
    llama          HF sdpa: GQA repeat_kv (expand + reshape of K, V), rotary "half", RMSNorm,
                   gated MLP; a bool causal mask tensor is passed to SDPA
    bert           HF sdpa: encoder, padding mask built from attention_mask
    encoder_layer  nn.TransformerEncoder: packed in_proj_weight (3D, D), post-norm
    mha            nn.MultiheadAttention: packed in_proj_weight, no mask
    nanogpt        examples/nanogpt.py: fused c_attn Linear, explicit causal masked_fill
    paper_scaled   examples/paper_model.py: separate q/k/v/o Linears, SDPA, no mask
    mlp_only       no attention at all (the plan must say so)

Transformers 5.x needs `use_cache=False` for the decoders: with the default a
DynamicCache is returned, which torch.export cannot flatten ("Found <class
'transformers.cache_utils.DynamicCache'> in output, which is not a known type").
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

BATCH = 2      # B of every example input
SEQ = 8        # S of every example input
HIDDEN = 64    # D of the non-HF toy models
VOCAB = 256    # token ids of the language models


@dataclass(frozen=True, slots=True, kw_only=True)
class ZooModel:
    """One zoo entry: how to build it, and the attention the matcher should find."""

    name: str
    build: Callable[[], tuple[nn.Module, tuple, dict]]
    sites: int      # attention subgraphs
    heads: int      # H
    kv_heads: int   # H_kv
    head_dim: int   # d

    def __post_init__(self) -> None:
        if (self.sites == 0) != (self.heads == 0):
            raise ValueError(f"ZooModel {self.name}: sites={self.sites} but heads={self.heads}")
        if self.heads and (self.kv_heads <= 0 or self.heads % self.kv_heads or self.head_dim <= 0):
            raise ValueError(
                f"ZooModel {self.name}: H={self.heads}, H_kv={self.kv_heads}, d={self.head_dim}")

    def __repr__(self) -> str:
        return f"ZooModel({self.name})"


def _seeded(fn: Callable[[], tuple[nn.Module, tuple, dict]]) -> Callable[[], tuple[nn.Module, tuple, dict]]:
    """Build under seed 0 without touching the caller's RNG; return the model in eval mode."""

    @functools.wraps(fn)
    def build() -> tuple[nn.Module, tuple, dict]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, args, kwargs = fn()
        return model.float().eval(), args, kwargs

    return build


def _token_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ))  # (B, S)


def _hidden_states() -> torch.Tensor:
    return torch.randn(BATCH, SEQ, HIDDEN)  # (B, S, D)


@_seeded
def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=3, n_embd=64, n_head=4, n_positions=64, vocab_size=VOCAB,
        bos_token_id=0, eos_token_id=0,  # the defaults (50256) lie outside a 256-token vocab
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(config), (_token_ids(),), {"use_cache": False}


@_seeded
def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
        intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config), (_token_ids(),), {"use_cache": False}


@_seeded
def _bert():
    from transformers import BertConfig, BertModel

    config = BertConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
        vocab_size=VOCAB, max_position_embeddings=64,
        attn_implementation="sdpa",
    )
    ids = _token_ids()
    return BertModel(config), (ids,), {"attention_mask": torch.ones_like(ids)}


@_seeded
def _encoder_layer():
    layer = nn.TransformerEncoderLayer(d_model=HIDDEN, nhead=4, dim_feedforward=128, batch_first=True)
    # enable_nested_tensor=False: nested tensors (the padded fast path) do not export.
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    return model, (_hidden_states(),), {}


class _ResidualMHA(nn.Module):
    """Two nn.MultiheadAttention self-attention layers, each as x + attn(x, x, x)."""

    def __init__(self, dim: int = HIDDEN, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=True) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn in self.layers:
            x = x + attn(x, x, x, need_weights=False)[0]  # (B, S, D)
        return x


@_seeded
def _mha():
    return _ResidualMHA(), (_hidden_states(),), {}


@_seeded
def _nanogpt():
    from examples.nanogpt import GPTConfig, build

    model, args = build(GPTConfig(n_layer=2, vocab_size=VOCAB), batch=BATCH, seq=SEQ)
    return model, args, {}


@_seeded
def _paper_scaled():
    from examples.paper_model import PaperConfig, build

    model, args = build(PaperConfig.scaled())
    return model, args, {}


@_seeded
def _mlp_only():
    model = nn.Sequential(
        nn.Linear(HIDDEN, 4 * HIDDEN), nn.GELU(), nn.Linear(4 * HIDDEN, HIDDEN),
        nn.Linear(HIDDEN, 4 * HIDDEN), nn.GELU(), nn.Linear(4 * HIDDEN, HIDDEN),
    )
    return model, (_hidden_states(),), {}


ZOO: tuple[ZooModel, ...] = (
    ZooModel(name="gpt2", build=_gpt2, sites=3, heads=4, kv_heads=4, head_dim=16),
    ZooModel(name="llama", build=_llama, sites=2, heads=8, kv_heads=2, head_dim=8),
    ZooModel(name="bert", build=_bert, sites=2, heads=4, kv_heads=4, head_dim=16),
    ZooModel(name="encoder_layer", build=_encoder_layer, sites=2, heads=4, kv_heads=4, head_dim=16),
    ZooModel(name="mha", build=_mha, sites=2, heads=4, kv_heads=4, head_dim=16),
    ZooModel(name="nanogpt", build=_nanogpt, sites=2, heads=4, kv_heads=4, head_dim=16),
    ZooModel(name="paper_scaled", build=_paper_scaled, sites=2, heads=16, kv_heads=16, head_dim=8),
    ZooModel(name="mlp_only", build=_mlp_only, sites=0, heads=0, kv_heads=0, head_dim=0),
)

ZOO_BY_NAME: dict[str, ZooModel] = {z.name: z for z in ZOO}

# Entries with attention, for tests where something must fire.
ATTENTION_ZOO: tuple[ZooModel, ...] = tuple(z for z in ZOO if z.sites)


def zoo(name: str) -> ZooModel:
    try:
        return ZOO_BY_NAME[name]
    except KeyError:
        raise KeyError(f"no zoo model {name!r}; the zoo has {sorted(ZOO_BY_NAME)}") from None
