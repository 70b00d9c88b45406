"""The paper's benchmark model: a 2-layer dense transformer, in one file.

The experiment (16 x H100, fp16) compares TP=8 + PP=2 against the two-level
m x n = 16 partition on this model. It has no embedding: the input is already
hidden states (B, S, D), so every FLOP is in attention and the MLPs.

Per layer (pre-norm):
    x = x + attn(ln_1(x))     q, k, v, o: nn.Linear(D, D, bias=True), SDPA, not causal
    x = x + mlp(ln_2(x))      Linear(D, F) -> GELU -> Linear(F, D)
and a final LayerNorm.

    helix plan helix_compiler.models.paper:helix_model   # the scaled model (CPU)
    helix plan helix_compiler.models.paper:paper_meta    # the full-size model, on meta
                                                        # (what `helix plan` plans by default)

It ships with the package: `helix plan`, `helix bench` and `helix calibrate` use it
outside a checkout. examples/paper_model.py is the same model as a user's MODEL file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True, slots=True, kw_only=True)
class PaperConfig:
    layers: int = 2           # the paper's table: a 2-layer dense model
    heads: int = 16           # H = 16 query heads, no GQA (H_kv = H)
    head_dim: int = 512       # d = 512, so D = H * d = 8192
    mlp: int = 32768          # F = 4 * D, the usual MLP ratio
    batch: int = 1024         # B = 1024 sequences per forward
    seq: int = 10000          # S = 10000: long enough that scores (S x S) dominate
    dtype: torch.dtype = torch.float16  # the paper runs fp16 on H100

    def __post_init__(self) -> None:
        for name in ("layers", "heads", "head_dim", "mlp", "batch", "seq"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PaperConfig.{name} must be positive, got {getattr(self, name)}")

    @property
    def hidden(self) -> int:
        """D, the model width."""
        return self.heads * self.head_dim

    @classmethod
    def scaled(cls) -> PaperConfig:
        """The same architecture at CPU-test size (D = 128).

        16 heads are kept so that every (m, n) split of 16 devices divides H
        exactly as in the paper; head_dim 8 still splits into m <= 8 slices.
        """
        return cls(heads=16, head_dim=8, mlp=256, batch=2, seq=8, dtype=torch.float32)


class SelfAttention(nn.Module):
    def __init__(self, config: PaperConfig) -> None:
        super().__init__()
        D = config.hidden
        self.heads = config.heads
        self.head_dim = config.head_dim
        # Separate projections, as the paper draws them: each is column-sharded
        # W[:, H_i x d_j] on its own, with no fused-QKV split to undo.
        self.q_proj = nn.Linear(D, D, bias=True)
        self.k_proj = nn.Linear(D, D, bias=True)
        self.v_proj = nn.Linear(D, D, bias=True)
        self.o_proj = nn.Linear(D, D, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        H, d = self.heads, self.head_dim
        q = self.q_proj(x).view(B, S, H, d).transpose(1, 2)  # (B, H, S, d)
        k = self.k_proj(x).view(B, S, H, d).transpose(1, 2)  # (B, H, S, d)
        v = self.v_proj(x).view(B, S, H, d).transpose(1, 2)  # (B, H, S, d)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=False)  # (B, H, S, d)
        y = y.transpose(1, 2).reshape(B, S, H * d)  # (B, S, D), heads side by side
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, config: PaperConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(config.hidden, config.mlp, bias=True)   # (B, S, D) -> (B, S, F)
        self.fc_out = nn.Linear(config.mlp, config.hidden, bias=True)  # (B, S, F) -> (B, S, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))


class Block(nn.Module):
    def __init__(self, config: PaperConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.hidden)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class PaperModel(nn.Module):
    def __init__(self, config: PaperConfig) -> None:
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(config.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, S, D) hidden states; the model has no embedding.
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)  # (B, S, D)


def build(config: PaperConfig, device: str | torch.device = "cpu", *, seed: int = 0,
          ) -> tuple[PaperModel, tuple[torch.Tensor]]:
    """The model in eval mode and its example input `(x,)`, x: (B, S, D).

    With device="meta" nothing is allocated: the full-size model (1.6 G
    parameters, and an input of B * S * D = 84 G elements) can be captured
    and planned on a laptop. Weights are drawn from `seed` without touching
    the caller's RNG state.
    """
    device = torch.device(device)
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), torch.device(device):
        torch.manual_seed(seed)
        model = PaperModel(config).to(config.dtype).eval()
        x = torch.randn(config.batch, config.seq, config.hidden, dtype=config.dtype)
    return model, (x,)


def helix_model() -> tuple[PaperModel, tuple[torch.Tensor]]:
    """MODEL spec `helix_compiler.models.paper:helix_model`: the scaled model on the CPU."""
    return build(PaperConfig.scaled(), "cpu")


def paper_meta() -> tuple[PaperModel, tuple[torch.Tensor]]:
    """MODEL spec `helix_compiler.models.paper:paper_meta`: full size, on meta."""
    return build(PaperConfig(), "meta")

