"""A decoder with a static KV cache, in one file: prefill and decode steps over one cache.

Per layer (pre-norm, LLaMA-shaped):
    x = x + attn(rms_1(x))    q: Linear(D, H*d), k, v: Linear(D, H_kv*d), rotary (rotate-half)
                              at the cache position, GQA by repeat_interleave, o: Linear(H*d, D)
    x = x + mlp(rms_2(x))     SwiGLU
and a final RMSNorm and an LM head.

The cache is two buffers per layer, `k_cache` and `v_cache` of shape (B, H_kv, S_max, d),
written in place at `cache_position` by `index_copy_` (dim 2): `prefill(tokens)` writes
positions 0 .. T-1, `decode_step(token, cache_position)` writes one position and attends
with its one query over the whole cache, masked to the positions written so far (and to
the row's valid, not padded, positions). `Prefill(model)` and `DecodeStep(model)` wrap the
two as modules with a plain `forward`, so each is exported as its own program over the
same parameters and cache buffers.

Padding: `valid` (B, S_max) marks each row's real tokens (left padding is 0 there). A
masked score is `finfo.min`, not -inf, so a fully padded row attends uniformly and stays
finite, as Hugging Face's masks do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DecoderConfig", "CacheDecoder", "Prefill", "DecodeStep", "build", "greedy_generate",
           "scaled_config", "helix_model"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DecoderConfig:
    layers: int = 2           # two layers: the second reads the first's sharded output
    heads: int = 4            # H: every split of 4 devices divides it
    kv_heads: int = 2         # H_kv: GQA, 2 query heads per kv head (1: MQA, 4: MHA)
    head_dim: int = 8         # d: m <= 4 slices keep each rotary pair (t, t + d/2) whole
    mlp: int = 64             # SwiGLU width
    vocab: int = 64
    batch: int = 3            # B: rows of the cache
    max_seq: int = 24         # S_max: cache positions
    rope_theta: float = 10000.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("layers", "heads", "kv_heads", "head_dim", "mlp", "vocab", "batch", "max_seq"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DecoderConfig.{name} must be positive, got {getattr(self, name)}")
        if self.heads % self.kv_heads:
            raise ValueError(f"DecoderConfig: heads={self.heads} is not a multiple of "
                             f"kv_heads={self.kv_heads}; GQA shares each kv head by heads/kv_heads")
        if self.head_dim % 2:
            raise ValueError(f"DecoderConfig.head_dim={self.head_dim} must be even (rotate-half rotary)")

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class CachedAttention(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden, cfg.heads * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden, cfg.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden, cfg.kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.heads * d, cfg.hidden, bias=False)
        shape = (cfg.batch, cfg.kv_heads, cfg.max_seq, d)
        self.register_buffer("k_cache", torch.zeros(shape))
        self.register_buffer("v_cache", torch.zeros(shape))

    def forward(self, x, cos, sin, cache_position, mask):
        # x (B, T, D); cos/sin (T, d); cache_position (T,); mask (B, 1, T, S_max) additive
        cfg = self.cfg
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, cfg.heads, cfg.head_dim).transpose(1, 2)     # (B, H, T, d)
        k = self.k_proj(x).view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)  # (B, H_kv, T, d)
        v = self.v_proj(x).view(B, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        self.k_cache.index_copy_(2, cache_position, k)                              # (B, H_kv, S_max, d)
        self.v_cache.index_copy_(2, cache_position, v)
        rep = cfg.heads // cfg.kv_heads
        keys = self.k_cache.repeat_interleave(rep, dim=1)                           # (B, H, S_max, d)
        values = self.v_cache.repeat_interleave(rep, dim=1)
        scores = q @ keys.transpose(-1, -2) * cfg.head_dim ** -0.5 + mask           # (B, H, T, S_max)
        out = torch.softmax(scores, dim=-1) @ values                                # (B, H, T, d)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, cfg.hidden))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(cfg.hidden, cfg.eps)
        self.attn = CachedAttention(cfg)
        self.norm_2 = RMSNorm(cfg.hidden, cfg.eps)
        self.gate = nn.Linear(cfg.hidden, cfg.mlp, bias=False)
        self.up = nn.Linear(cfg.hidden, cfg.mlp, bias=False)
        self.down = nn.Linear(cfg.mlp, cfg.hidden, bias=False)

    def forward(self, x, cos, sin, cache_position, mask):
        x = x + self.attn(self.norm_1(x), cos, sin, cache_position, mask)
        h = self.norm_2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class CacheDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
        self.register_buffer("inv_freq", inv, persistent=False)

    def _run(self, tokens, cache_position, valid):
        # tokens (B, T); cache_position (T,) int64; valid (B, S_max) 1 where a row has a real token
        cfg = self.cfg
        freqs = cache_position.float()[:, None] * self.inv_freq[None, :]          # (T, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)                                     # (T, d)
        cos, sin = emb.cos(), emb.sin()
        keys = torch.arange(cfg.max_seq, device=tokens.device)
        seen = keys[None, :] <= cache_position[:, None]                             # (T, S_max)
        allowed = seen[None, :, :] & (valid[:, None, :] > 0)                        # (B, T, S_max)
        mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]   # (B, 1, T, S_max)
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, cache_position, mask)
        return self.lm_head(self.norm(x))                                           # (B, T, vocab)

    def prefill(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Write positions 0 .. T-1 of the cache; logits (B, T, vocab)."""
        position = torch.arange(tokens.shape[1], device=tokens.device)
        return self._run(tokens, position, valid)

    def decode_step(self, token: torch.Tensor, cache_position: torch.Tensor,
                    valid: torch.Tensor) -> torch.Tensor:
        """token (B, 1) at position cache_position (1,): write it, attend over the cache."""
        return self._run(token, cache_position, valid)

    def reset_cache(self) -> None:
        for layer in self.layers:
            layer.attn.k_cache.zero_()
            layer.attn.v_cache.zero_()


class Prefill(nn.Module):
    """`model.prefill` as a forward, to export as its own program (same parameters and cache)."""

    def __init__(self, model: CacheDecoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens, valid):
        return self.model.prefill(tokens, valid)


class DecodeStep(nn.Module):
    """`model.decode_step` as a forward, to export as its own program."""

    def __init__(self, model: CacheDecoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, token, cache_position, valid):
        return self.model.decode_step(token, cache_position, valid)


def build(cfg: DecoderConfig | None = None, seed: int = 0) -> CacheDecoder:
    """The model in float32 eval mode with seeded random weights, its cache zeroed."""
    cfg = cfg or DecoderConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CacheDecoder(cfg).float().eval()


@torch.no_grad()
def greedy_generate(model: CacheDecoder, prompt: torch.Tensor, valid_prompt: torch.Tensor,
                    new_tokens: int) -> torch.Tensor:
    """The unsharded reference: prefill `prompt` (B, P), then `new_tokens` greedy decode steps;
    the new tokens (B, new_tokens)."""
    B, P = prompt.shape
    valid = torch.zeros(B, model.cfg.max_seq, dtype=torch.long)
    valid[:, :P] = valid_prompt
    valid[:, P:] = 1
    model.reset_cache()
    tok = model.prefill(prompt, valid)[:, -1].argmax(-1, keepdim=True)
    out = [tok]
    for t in range(new_tokens - 1):
        tok = model.decode_step(tok, torch.tensor([P + t]), valid)[:, -1].argmax(-1, keepdim=True)
        out.append(tok)
    return torch.cat(out, dim=1)


def scaled_config() -> DecoderConfig:
    """`helix generate`'s default model: 8 heads over 2 kv heads (GQA), d 16, 2 layers, a
    batch of 4 sequences, 64 cache positions; small enough for CPU ranks."""
    return DecoderConfig(layers=2, heads=8, kv_heads=2, head_dim=16, mlp=128, vocab=128,
                         batch=4, max_seq=64)


def helix_model() -> tuple[CacheDecoder, tuple]:
    """MODEL spec `helix_compiler.models.decoder_cache:helix_model`: the scaled decoder and
    a decode step's example inputs (token, cache_position, valid)."""
    model = build(scaled_config())
    cfg = model.cfg
    return model, (torch.zeros(cfg.batch, 1, dtype=torch.long), torch.tensor([4]),
                   torch.ones(cfg.batch, cfg.max_seq, dtype=torch.long))
