"""The issue's acceptance check on a model written here, independently of the examples and
the zoo: a 2-layer, 16-head dense transformer compiled for 16 devices with each of the five
splits (1, 16), (2, 8), (4, 4), (8, 2), (16, 1).

* simulate returns 16 outputs, each equal to the model's (relative error <= 1e-5);
* each rank holds 1/16 of every 2-D weight of attention and MLP, and nothing 2-D else;
* the program saved to disk and loaded back rank by rank computes the same.

The model (pre-LN, D = 256, H = 16, d = 16 so that m = 16 still gets one dim per slice):

    x = x + o(attn(q(ln1(x)), k(ln1(x)), v(ln1(x))))     q, k, v, o: Linear(D, D, bias=True)
    x = x + fc2(gelu(fc1(ln2(x))))                        fc1: Linear(D, F), fc2: Linear(F, D)
    y = ln_f(x)

Layer 0 spells attention out (matmul, * 1/sqrt(d), causal masked_fill, softmax, matmul);
layer 1 calls F.scaled_dot_product_attention(is_causal=True).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helix_compiler import load_rank_module
from helix_compiler.program import run_ranks
from tests.helpers import assert_leaves_equal, assert_ranks_equal, compile_split, eager_output

DEVICES = 16
SPLITS = [(1, 16), (2, 8), (4, 4), (8, 2), (16, 1)]   # (m, n), m * n = 16
HEADS, HEAD_DIM = 16, 16
HIDDEN = HEADS * HEAD_DIM   # D = 256
FFN = 2 * HIDDEN            # F = 512
LAYERS = 2
BATCH, SEQ = 2, 8


class Attention(nn.Module):
    def __init__(self, explicit: bool) -> None:
        super().__init__()
        self.explicit = explicit
        self.q = nn.Linear(HIDDEN, HIDDEN)
        self.k = nn.Linear(HIDDEN, HIDDEN)
        self.v = nn.Linear(HIDDEN, HIDDEN)
        self.o = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q, k, v = (p(x).reshape(B, S, HEADS, HEAD_DIM).permute(0, 2, 1, 3)  # (B, H, S, d)
                   for p in (self.q, self.k, self.v))
        if self.explicit:
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(HEAD_DIM)  # (B, H, S, S)
            future = torch.ones(S, S, dtype=torch.bool, device=x.device).triu(1)
            probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
            y = torch.matmul(probs, v)                                            # (B, H, S, d)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)            # (B, H, S, d)
        return self.o(y.permute(0, 2, 1, 3).reshape(B, S, HIDDEN))                 # (B, S, D)


class Layer(nn.Module):
    def __init__(self, explicit: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(HIDDEN)
        self.attn = Attention(explicit)
        self.ln2 = nn.LayerNorm(HIDDEN)
        self.fc1 = nn.Linear(HIDDEN, FFN)
        self.fc2 = nn.Linear(FFN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class DenseTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(explicit=(i == 0)) for i in range(LAYERS))
        self.ln_f = nn.LayerNorm(HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, S, D) hidden states
        for layer in self.layers:
            x = layer(x)
        return self.ln_f(x)


@pytest.fixture(scope="module")
def model_and_input():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DenseTransformer().eval()
        # LayerNorm starts at (1, 0): draw its parameters too, so a rank that dropped or
        # doubled one would be seen.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 1:
                    p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
        x = torch.randn(BATCH, SEQ, HIDDEN)
    return model, (x,), eager_output(model, (x,), {})


@pytest.fixture(scope="module")
def programs(model_and_input):
    model, args, _ = model_and_input
    cache: dict = {}

    def get(m: int, n: int):
        if (m, n) not in cache:
            cache[m, n] = compile_split(model, args, {}, m=m, n=n,
                                        variant="score-reduce" if m > 1 else None)
        return cache[m, n]

    return get


def test_reference_is_the_eager_model(model_and_input, programs):
    model, args, want = model_and_input
    assert_leaves_equal([programs(1, 16).reference(*args)], [want])


@pytest.mark.parametrize("m,n", SPLITS, ids=[f"{m}x{n}" for m, n in SPLITS])
def test_split_finds_both_layers_and_each_of_16_ranks_equals_the_model(m, n, model_and_input, programs):
    _, args, want = model_and_input
    prog = programs(m, n)
    assert [(s.site.num_heads, s.site.head_dim) for s in prog.plan.sites] == [(HEADS, HEAD_DIM)] * LAYERS
    assert [s.site.core for s in prog.plan.sites] == ["explicit", "sdpa"]
    assert prog.plan.mlps == LAYERS
    assert_ranks_equal(prog.simulate(*args), want, devices=DEVICES, label=f"m={m} x n={n}")


@pytest.mark.parametrize("m,n", [(2, 8), (16, 1)], ids=["2x8", "16x1"])
def test_qk_gather_variant_equals_the_model(m, n, model_and_input):
    model, args, want = model_and_input
    prog = compile_split(model, args, {}, m=m, n=n, variant="qk-gather")
    assert_ranks_equal(prog.simulate(*args), want, devices=DEVICES, label=f"m={m} x n={n} qk-gather")


def _split_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The 2-D weights Helix shards: q, k, v, o of attention, fc1 and fc2 of the MLP."""
    return {k: p for k, p in model.named_parameters() if p.dim() == 2}


def _numel(tensors) -> int:
    return sum(t.numel() for t in tensors)


@pytest.mark.parametrize("m,n", SPLITS, ids=[f"{m}x{n}" for m, n in SPLITS])
def test_each_rank_holds_one_sixteenth_of_every_2d_weight(m, n, model_and_input, programs):
    """What a rank may hold, exactly:

    * 2-D (and larger) tensors: together at most 1/16 of the model's 2-D weights, the six
      Linear weights per layer (every one of them is a multiple of 16 elements on each side);
    * 1-D tensors: at most the model's 1-D parameters that stay whole (the three LayerNorms'
      weight and bias per layer plus ln_f, the biases of o and fc2, added once after the
      all-reduce) plus 1/16 of the column-sharded biases (q, k, v, fc1);
    * 0-D tensors: scalar constants of the graph, at most 16 of them.
    """
    model, *_ = model_and_input
    weights_2d = _numel(_split_weights(model).values())
    whole_1d = _numel(p for k, p in model.named_parameters()
                      if p.dim() == 1 and (".ln" in k or k.startswith("ln_f")
                                           or k.endswith(("attn.o.bias", "fc2.bias"))))
    sharded_1d = _numel(p for k, p in model.named_parameters()
                        if k.endswith(("attn.q.bias", "attn.k.bias", "attn.v.bias", "fc1.bias")))
    assert weights_2d % DEVICES == 0 and sharded_1d % DEVICES == 0
    prog = programs(m, n)
    for r in range(DEVICES):
        state = prog.rank_module(r).state_dict()
        big = [t for t in state.values() if t.dim() >= 2]
        assert _numel(big) <= weights_2d // DEVICES, \
            f"rank {r}: {_numel(big)} elements in 2-D tensors > {weights_2d} / 16"
        one_d = [t for t in state.values() if t.dim() == 1]
        assert _numel(one_d) <= whole_1d + sharded_1d // DEVICES, \
            f"rank {r}: {_numel(one_d)} elements in 1-D tensors > {whole_1d} + {sharded_1d} / 16"
        assert sum(1 for t in state.values() if t.dim() == 0) <= 16


@pytest.mark.parametrize("m,n", [(4, 4), (16, 1)], ids=["4x4", "16x1"])
def test_each_rank_holds_exact_shapes_of_its_shards(m, n, programs):
    """Per rank: q, k, v, fc1 weights (D/16, D) and (F/16, D); o, fc2 (D, D/16) and (D, F/16)."""
    prog = programs(m, n)
    want = sorted([(HIDDEN // DEVICES, HIDDEN)] * 3 + [(HIDDEN, HIDDEN // DEVICES)]
                  + [(FFN // DEVICES, HIDDEN), (HIDDEN, FFN // DEVICES)])
    for r in range(DEVICES):
        shapes = sorted(tuple(t.shape) for t in prog.rank_module(r).state_dict().values() if t.dim() == 2)
        assert shapes == sorted(want * LAYERS), f"rank {r}: {shapes}"


@pytest.mark.parametrize("m,n", [(1, 16), (4, 4), (16, 1)], ids=["1x16", "4x4", "16x1"])
def test_saved_and_loaded_ranks_equal_the_model(m, n, model_and_input, programs, tmp_path):
    _, args, want = model_and_input
    prog = programs(m, n)
    prog.save(tmp_path)
    loaded = [load_rank_module(tmp_path, r) for r in range(DEVICES)]
    outputs = run_ranks(loaded, prog.mesh, args, {})
    for r, out in enumerate(outputs):
        assert_leaves_equal(list(out), [want], label=f"m={m} x n={n} loaded rank {r}")
