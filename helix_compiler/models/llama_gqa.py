"""The GQA benchmark model: a Hugging Face LlamaModel built from its config (random weights).

2 layers, H = 32 query heads sharing H_kv = 8 key/value heads (d = 128), D = 4096, SwiGLU
MLP of 14336, vocab 32000, fp16, S = 8192, B = 256 sequences per step: the shapes of a
LLaMA-3-8B layer. `helix bench --model gqa` measures it; transformers must be installed
(the `test` extra).
"""

from __future__ import annotations

import dataclasses

import torch

from helix_compiler.errors import HelixError


@dataclasses.dataclass(frozen=True)
class GqaConfig:
    layers: int = 2
    heads: int = 32           # H query heads
    kv_heads: int = 8         # H_kv: 4 query heads per key/value head
    head_dim: int = 128       # d
    hidden: int = 4096        # D = H * d
    mlp: int = 14336          # SwiGLU width (LLaMA-3-8B)
    vocab: int = 32000
    seq: int = 8192           # S
    batch: int = 256          # B sequences per step (benchmarks/gqa_plan.py's batch)
    dtype: torch.dtype = torch.float16

    @classmethod
    def small(cls, seq: int | None = None) -> GqaConfig:
        """The same structure at CPU-test size (D = 128, d = 16)."""
        return cls(head_dim=16, hidden=128, mlp=256, vocab=256, seq=seq or 64, batch=8,
                   dtype=torch.float32)


def build(cfg: GqaConfig, device: str | torch.device = "meta"):
    """LlamaModel of `cfg` in eval mode on `device` (meta: nothing allocated)."""
    try:
        from transformers import LlamaConfig, LlamaModel
    except ImportError as e:      # an optional dependency, not a cycle
        raise HelixError(f"the GQA benchmark model is a Hugging Face LlamaModel and "
                         f"transformers is not installed ({e}); pip install transformers") from e
    lc = LlamaConfig(hidden_size=cfg.hidden, num_attention_heads=cfg.heads,
                     num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                     intermediate_size=cfg.mlp, num_hidden_layers=cfg.layers,
                     vocab_size=cfg.vocab, max_position_embeddings=cfg.seq)
    with torch.device(device):
        return LlamaModel(lc).to(cfg.dtype).eval()
