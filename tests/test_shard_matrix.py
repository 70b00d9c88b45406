"""Every feasible (m, n) split of 1, 2, 4, 8 and 16 devices, both m > 1 variants, on five
16-head models: every rank equals the unsharded model and holds the planned collectives.

Models (B = 2, S = 8, float32, 2 layers, H = 16 heads of d = 8, D = 128):

    paper      examples/paper_model.py PaperConfig.scaled(): q/k/v/o Linears, SDPA
    nanogpt    examples/nanogpt.py with n_head=16: fused c_attn, explicit causal softmax
    encoder    nn.TransformerEncoder of nn.TransformerEncoderLayer(nhead=16): packed in_proj
    gpt2       HF GPT-2, eager: Conv1D c_attn, causal mask by where
    llama      HF LLaMA, sdpa: GQA H_kv = 4 (n = 8, 16 replicate kv heads), rotary "half" r = d

The splits come from the solver (not a list written here); a separate test checks the
solver's list against the divisibility rules of DESIGN.md section 2, so that a split the
solver wrongly drops is still noticed.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import sympy
import torch
import torch.nn as nn

from helix_compiler import helix_compile
from helix_compiler.planning.solver import NO_ATTENTION, solve
from tests.helpers import (
    assert_ranks_equal, captured_program, check_split, eager_output, expected_collectives, feasible_splits, seeded,
    variants_for)
from tests.models import zoo

BATCH, SEQ = 2, 8
HEADS, HEAD_DIM = 16, 8
HIDDEN = HEADS * HEAD_DIM   # D = 128
FFN = 2 * HIDDEN            # F = 256: small, still split evenly by 16
VOCAB = 256
LAYERS = 2
DEVICES = (1, 2, 4, 8, 16)


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ))  # (B, S)


@seeded
def _paper():
    from examples.paper_model import PaperConfig, build

    config = PaperConfig.scaled()
    assert (config.heads, config.head_dim, config.layers) == (HEADS, HEAD_DIM, LAYERS)
    model, args = build(config)
    return model, args, {}


@seeded
def _nanogpt():
    from examples.nanogpt import GPTConfig, build

    model, args = build(GPTConfig(n_layer=LAYERS, n_head=HEADS, n_embd=HIDDEN, vocab_size=VOCAB),
                        batch=BATCH, seq=SEQ)
    return model, args, {}


@seeded
def _encoder():
    layer = nn.TransformerEncoderLayer(d_model=HIDDEN, nhead=HEADS, dim_feedforward=FFN, batch_first=True)
    # enable_nested_tensor=False: nested tensors (the padded fast path) do not export.
    model = nn.TransformerEncoder(layer, num_layers=LAYERS, enable_nested_tensor=False)
    return model, (torch.randn(BATCH, SEQ, HIDDEN),), {}


@seeded
def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS, n_inner=FFN, n_positions=64,
                        vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return GPT2LMHeadModel(config), (_ids(),), {"use_cache": False}


@seeded
def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                         num_key_value_heads=4, head_dim=HEAD_DIM, intermediate_size=FFN,
                         vocab_size=VOCAB, max_position_embeddings=64, attn_implementation="sdpa")
    return LlamaForCausalLM(config), (_ids(),), {"use_cache": False}


@dataclass(frozen=True, slots=True, kw_only=True)
class MatrixModel:
    name: str
    build: object
    kv_heads: int = HEADS
    rotary_dims: int = 0   # r of a rotary "half" embedding, 0 for none

    def __repr__(self) -> str:
        return self.name


MODELS = (
    MatrixModel(name="paper", build=_paper),
    MatrixModel(name="nanogpt", build=_nanogpt),
    MatrixModel(name="encoder", build=_encoder),
    MatrixModel(name="gpt2", build=_gpt2),
    MatrixModel(name="llama", build=_llama, kv_heads=4, rotary_dims=HEAD_DIM),
)

@pytest.fixture(scope="module")
def built():
    cache: dict[str, tuple] = {}

    def get(entry: MatrixModel):
        if entry.name not in cache:
            model, args, kwargs = entry.build()
            want = eager_output(model, args, kwargs)
            analysis = captured_program(model, args, kwargs).analysis
            cache[entry.name] = (model, args, kwargs, want, analysis.summary)
        return cache[entry.name]

    return get


def divisible_splits(devices: int, *, heads: int, kv_heads: int, head_dim: int,
                     rotary_dims: int = 0) -> list[tuple[int, int]]:
    """(m, n) allowed by DESIGN.md section 2: n | H, m | d, kv heads split or replicated
    whole, each slice gets whole rotary "half" pairs and whole unrotated dims."""
    out = []
    for m in map(int, sympy.divisors(devices)):
        n = devices // m
        ok = heads % n == 0 and head_dim % m == 0
        ok &= (kv_heads % n == 0) if n <= kv_heads else (n % kv_heads == 0)
        if rotary_dims and m > 1:
            ok &= (rotary_dims // 2) % m == 0 and (head_dim - rotary_dims) % m == 0
        if ok:
            out.append((m, n))
    return out


@pytest.mark.parametrize("entry", MODELS, ids=repr)
def test_find_attention_reports_one_16_head_site_per_layer_and_one_mlp_per_layer(entry, built):
    *_, summary = built(entry)
    assert [(s.num_heads, s.num_kv_heads, s.head_dim) for s in summary.sites] == \
        [(HEADS, entry.kv_heads, HEAD_DIM)] * LAYERS
    assert all(s.o_proj is not None for s in summary.sites)
    assert len(summary.mlps) == LAYERS


@pytest.mark.parametrize("entry", MODELS, ids=repr)
def test_solver_feasible_splits_are_exactly_the_divisible_ones(entry, built):
    *_, summary = built(entry)
    for devices in DEVICES:
        want = divisible_splits(devices, heads=HEADS, kv_heads=entry.kv_heads, head_dim=HEAD_DIM,
                                rotary_dims=entry.rotary_dims)
        assert feasible_splits(summary, devices) == want, f"devices={devices}"


def test_solver_admits_the_four_splits_of_16_devices_that_16_heads_of_dim_8_divide(built):
    *_, summary = built(MODELS[0])
    cands = {(c.m, c.n): c for c in solve(summary, 16)}
    assert list(cands) == [(1, 16), (2, 8), (4, 4), (8, 2), (16, 1)]
    assert [k for k, c in cands.items() if c.feasible] == [(1, 16), (2, 8), (4, 4), (8, 2)]
    assert any("d=8 not divisible by m=16" in r for r in cands[16, 1].reasons), cands[16, 1].reasons


@pytest.mark.parametrize("devices", DEVICES)
@pytest.mark.parametrize("entry", MODELS, ids=repr)
def test_every_feasible_split_and_variant_equals_unsharded_model_with_planned_collectives(
        entry, devices, built):
    model, args, kwargs, want, summary = built(entry)
    splits = feasible_splits(summary, devices)
    assert (1, devices) in splits   # 16 heads: plain head parallelism always fits
    for m, n in splits:
        for variant in variants_for(m):
            prog = check_split(model, args, kwargs, want, m=m, n=n, variant=variant)
            assert len(prog.plan.sites) == LAYERS and prog.plan.mlps == LAYERS
            expected = expected_collectives(m=m, n=n, variant=variant, sites=LAYERS, o_projs=LAYERS,
                                            mlps=LAYERS)
            for r in range(devices):
                assert prog.collectives(r) == expected, \
                    f"m={m} x n={n} {variant or 'heads'} rank {r}: {prog.collectives(r)} != {expected}"


@pytest.fixture(scope="module")
def mlp_only():
    model, args, kwargs = zoo("mlp_only").build()   # (Linear -> GELU -> Linear) x 2, D = 64, F = 256
    prog = helix_compile(model, devices=4, example_inputs=args, example_kwargs=kwargs)
    return prog, args, kwargs, eager_output(model, args, kwargs)


def test_mlp_only_model_has_no_attention_and_shards_its_two_mlps_over_all_ranks(mlp_only):
    prog, args, kwargs, want = mlp_only
    assert prog.plan.no_attention and prog.plan.sites == () and prog.summary.sites == ()
    assert (prog.plan.m, prog.plan.n) == (1, 4)
    assert prog.plan.mlps == len(prog.summary.mlps) == 2
    linears = [name for mlp in prog.summary.mlps for name in (*mlp.up, mlp.down)]
    assert len(linears) == len(set(linears)), f"a Linear in two MLPs: {prog.summary.mlps}"
    cands = solve(prog.summary, 4)
    assert [(c.m, c.n) for c in cands if c.feasible] == [(1, 4)]
    assert all(NO_ATTENTION in c.reasons for c in cands if c.m > 1)
    assert_ranks_equal(prog.simulate(*args, **kwargs), want, devices=4)
    for r in range(4):
        assert prog.collectives(r) == {"all_reduce:head": 2}
        # every Linear weight of the model is (64, 256) or (256, 64): a quarter on each rank
        weights = [t for t in prog.rank_module(r).buffers() if t.dim() == 2]
        assert sorted(tuple(w.shape) for w in weights) == [(64, 64)] * 4
