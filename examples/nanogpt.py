"""A nanoGPT-style GPT (after karpathy/nanoGPT model.py), small, in one file.

It is here for its attention spelling, the one most hand-written models use:
a fused `c_attn` Linear(D, 3D) split into q, k, v, and an explicit
matmul -> scale -> causal masked_fill (from a registered `bias` tril buffer)
-> softmax -> matmul core, instead of scaled_dot_product_attention.

    python examples/nanogpt.py        # run it on the CPU
    helix plan examples/nanogpt.py    # plan it (helix_model)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True, slots=True, kw_only=True)
class GPTConfig:
    block_size: int = 64    # longest sequence; the causal mask buffer is (block_size, block_size)
    vocab_size: int = 256   # byte-level tokens: no tokenizer needed for tests and demos
    n_layer: int = 2        # two attention sites, as in the paper's model
    n_head: int = 4         # H = 4 ...
    n_embd: int = 64        # ... of d = 16: splits into m <= 16 dim slices
    bias: bool = True       # GPT-2 style biases in Linears and LayerNorms
    # No dropout: Helix compiles inference graphs, where dropout is the identity.

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        # q, k, v projections for all heads in one Linear: output columns are
        # [q (D) | k (D) | v (D)], each D = n_head * head_dim, head-major.
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        # Causal mask as a buffer (not a parameter): 1 where key <= query.
        mask = torch.tril(torch.ones(config.block_size, config.block_size))
        self.register_buffer("bias", mask.view(1, 1, config.block_size, config.block_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()  # batch, sequence length, embedding dim (D)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)           # 3 x (B, T, D)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, d)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, d)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, d)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, H, T, T)
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v                                                  # (B, H, T, d)
        y = y.transpose(1, 2).contiguous().view(B, T, C)             # (B, T, D)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)    # (B, T, D) -> (B, T, 4D)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)  # (B, T, 4D) -> (B, T, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying, as in GPT-2: the token embedding and the output head
        # share one (vocab_size, D) parameter.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections: 0.02 / sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.size()  # token ids (B, T), T <= block_size
        if T > self.config.block_size:
            raise ValueError(f"GPT: sequence length {T} > block_size {self.config.block_size}")
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)      # (B, T, D)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        return self.lm_head(x)  # logits (B, T, vocab_size), every position


def build(config: GPTConfig, *, batch: int = 2, seq: int = 8, seed: int = 0,
          ) -> tuple[GPT, tuple[torch.Tensor]]:
    """The model in eval mode and example token ids `(idx,)`, idx: (batch, seq).

    Weights and tokens come from `seed` without touching the caller's RNG state.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT(config).eval()
        idx = torch.randint(0, config.vocab_size, (batch, seq))
    return model, (idx,)


def helix_model() -> tuple[GPT, tuple[torch.Tensor]]:
    """MODEL spec for `helix plan examples/nanogpt.py`."""
    return build(GPTConfig())


def main() -> None:
    model, (idx,) = helix_model()
    with torch.no_grad():
        logits = model(idx)
    params = sum(p.numel() for p in model.parameters())  # the tied wte/lm_head counted once
    print(f"{model.config}")
    print(f"  {params:,} parameters, tokens {tuple(idx.shape)} -> logits {tuple(logits.shape)}")


if __name__ == "__main__":
    main()
