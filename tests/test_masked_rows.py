"""Query rows with no visible key (a left-padded row's first queries under a causal mask, a fully
padded row, padding that fills a sliding window): SDPA gives them 0, and so must every core
Helix emits (helix.attend, helix.chunked_attend, helix.chunked_attention; kernels.masked_softmax).
A NaN there spreads through the next layer to every token of the row.

* the kernels against torch's SDPA on random masks with fully masked rows: bool and float
  (-inf) masks, causal or not, GQA, several blocks of the chunked kernels;
* HF models at batch 3, sequence 11 with a left-padded row, a fully padded row and a gap of
  padding wider than the window: LLaMA (sdpa and eager), Mistral with a sliding window of 4,
  ModernBERT with local attention (window 4) every other layer; every feasible split of 4 and
  8 devices, both m > 1 variants, every rank equal to the unsharded model and NaN-free;
* the unrewritten cores (kernel_choice=False: helix.attend, SDPA at d/m = 4) as well as the
  chunked ones the default compile substitutes;
* the planner's own choice for the padded local-attention encoder on 16 devices.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

import helix_compiler.runtime.kernels  # noqa: F401  (registers helix.attend)
import helix_compiler.runtime.kernels_chunked  # noqa: F401  (registers the chunked ops)
from helix_compiler import helix_compile
from helix_compiler.runtime.kernels import masked_softmax
from helix_compiler.runtime.kernels_chunked import blocks
from tests.helpers import (assert_ranks_equal, compile_split, eager_output, feasible_splits,
                           rel_error, seeded, variants_for)

helix = torch.ops.helix
BATCH, SEQ, VOCAB = 3, 11, 128
WINDOW = 4


# ---- the kernels against SDPA ---------------------------------------------------------------

def _qkv(g, b, h, h_kv, s_q, s_k, d):
    return (torch.randn(b, h, s_q, d, generator=g), torch.randn(b, h_kv, s_k, d, generator=g),
            torch.randn(b, h_kv, s_k, d, generator=g))


def _keep(g, b, h, s_q, s_k):
    """A random bool mask (True = visible) with fully masked rows: whole rows of one batch
    entry, one query row of every head, and the first keys (dead rows under is_causal)."""
    keep = torch.rand(b, h, s_q, s_k, generator=g) > 0.4
    keep[0, :, 1] = False                 # query 1 of batch 0 sees nothing, every head
    keep[-1, -1, -1] = False              # the last row of the last head
    keep[-1, :, :, :2] = False            # keys 0, 1 of the last batch entry: causal rows 0, 1 dead
    return keep


def _mask(keep, kind):
    if kind == "bool":
        return keep
    return torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))


def _reference(q, k, v, keep, kind, causal, scale):
    """torch's SDPA; mask and is_causal together are the intersection of the two (what SDPA's
    CPU kernel computes; its math backend refuses the pair), given to SDPA as one mask."""
    if causal:
        keep = keep & torch.ones(keep.shape[-2:], dtype=torch.bool).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_mask(keep, kind), scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1]), keep


def _check(got, want, keep):
    dead = ~keep.any(-1)                  # (b, h | 1, s_q): rows with no visible key
    assert dead.any(), "the mask has no fully masked row: the test would not test it"
    assert not torch.isnan(got).any(), f"NaN in {int(torch.isnan(got).any(-1).sum())} rows"
    dead = dead.expand(got.shape[:-1])
    assert torch.equal(want[dead], torch.zeros_like(want[dead])), "SDPA gave a dead row non-zero"
    assert torch.equal(got[dead], torch.zeros_like(got[dead])), "a fully masked row is not 0"
    assert rel_error(got, want) <= 1e-5, rel_error(got, want)


SHAPES = {  # (b, h, h_kv, s_q, s_k, d)
    "mha": (2, 4, 4, 11, 11, 8),
    "gqa": (3, 4, 2, 11, 13, 8),
    "mqa": (2, 4, 1, 7, 11, 4),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_kernels_give_sdpa_zeros_on_fully_masked_rows(kind, causal, shape):
    b, h, h_kv, s_q, s_k, d = SHAPES[shape]
    g = torch.Generator().manual_seed(sorted(SHAPES).index(shape) * 4 + 2 * (kind == "float") + causal)
    q, k, v = _qkv(g, b, h, h_kv, s_q, s_k, d)
    keep = _keep(g, b, h, s_q, s_k)
    scale = 0.3
    want, keep_all = _reference(q, k, v, keep, kind, causal, scale)
    mask = _mask(keep, kind)
    rep = h // h_kv
    k_rep, v_rep = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k_rep.transpose(-2, -1)  # the all-reduced partial scores of a score-reduce core
    # helix.attend takes V repeated to the query heads (the score-reduce rule repeats it)
    _check(helix.attend(scores, v_rep, mask, causal, scale), want, keep_all)
    # chunk_bytes=1: one head per block
    _check(helix.chunked_attend(scores, v, mask, causal, scale, 1), want, keep_all)
    _check(helix.chunked_attention(q, k, v, mask, causal, scale, 1, 0), want, keep_all)
    # and with the whole tensor as one block
    _check(helix.chunked_attention(q, k, v, mask, causal, scale, 2 ** 30, 0), want, keep_all)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_chunked_kernels_zero_dead_rows_across_row_blocks(kind):
    """s_q = 300 with chunk_bytes=1: row blocks of 128, 128, 44 inside each head; the mask
    (one per batch entry, broadcast over heads) is sliced per block."""
    g = torch.Generator().manual_seed(7)
    b, h, h_kv, s_q, s_k, d = 1, 4, 2, 300, 9, 8
    assert [blk[2:] for blk in blocks(b * h, s_q, s_k, 4, 1)][:3] == [(0, 128), (128, 256), (256, 300)]
    q, k, v = _qkv(g, b, h, h_kv, s_q, s_k, d)
    keep = torch.rand(b, 1, s_q, s_k, generator=g) > 0.5
    keep[..., [0, 127, 128, 200, 299], :] = False       # dead rows at the block edges
    for causal in (False, True):
        want, keep_all = _reference(q, k, v, keep, kind, causal, 0.35)
        mask = _mask(keep, kind)
        scores = q @ k.repeat_interleave(h // h_kv, 1).transpose(-2, -1)
        _check(helix.chunked_attend(scores, v, mask, causal, 0.35, 1), want, keep_all)
        _check(helix.chunked_attention(q, k, v, mask, causal, 0.35, 1, 0), want, keep_all)


def test_masked_softmax_is_safe_softmax():
    """aten._safe_softmax's semantics: an all -inf row is 0, a row holding NaN stays NaN."""
    inf = float("-inf")
    x = torch.tensor([[inf, inf, inf], [0.0, 1.0, inf], [float("nan"), 0.0, 0.0], [2.0, -1.0, 0.5]])
    got = masked_softmax(x.clone())
    torch.testing.assert_close(got, torch.ops.aten._safe_softmax(x, -1), equal_nan=True)
    assert torch.equal(got[0], torch.zeros(3)) and torch.isnan(got[2]).all()
    x = torch.randn(2, 3, 5, 4)
    x[0, 1, 2] = inf
    torch.testing.assert_close(masked_softmax(x, dim=-2), torch.ops.aten._safe_softmax(x, -2))


# ---- HF models with padding -----------------------------------------------------------------

def _attention_mask() -> torch.Tensor:
    am = torch.ones(BATCH, SEQ, dtype=torch.long)
    am[0, 3:8] = 0      # a gap of 5 padded tokens: a window of 4 around query 5 sees only padding
    am[1, :4] = 0       # left-padded by 4: under a causal mask queries 0-3 see no key
    am[2, :] = 0        # fully padded
    return am


def _ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (BATCH, SEQ))


def _llama(attn: str):
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64,
                         attn_implementation=attn)
    return LlamaModel(config), (_ids(),), {"attention_mask": _attention_mask(), "use_cache": False}


def _mistral_config(window):
    from transformers import MistralConfig

    return MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
                         sliding_window=window, attn_implementation="sdpa")


@seeded
def _mistral():
    # every layer a causal sliding window of 4 keys; GQA (4 kv heads)
    from transformers import MistralModel

    return (MistralModel(_mistral_config(WINDOW)), (_ids(),),
            {"attention_mask": _attention_mask(), "use_cache": False})


def _modernbert_config(local):
    from transformers import ModernBertConfig

    return ModernBertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=8, local_attention=local, global_attn_every_n_layers=2,
                            max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                            cls_token_id=1, sep_token_id=2, attn_implementation="sdpa")


@seeded
def _modernbert():
    # encoder, fused Wqkv; layer 0 global, layer 1 local: keys within local_attention / 2 = 2
    from transformers import ModernBertModel

    return ModernBertModel(_modernbert_config(WINDOW)), (_ids(),), {"attention_mask": _attention_mask()}


MODELS = {"llama-sdpa": seeded(lambda: _llama("sdpa")), "llama-eager": seeded(lambda: _llama("eager")),
          "mistral-window": _mistral, "modernbert-local": _modernbert}
# the same weights with a window wider than the sequence: the window must change the output
WIDE = {"mistral-window": lambda: _mistral_config(None),
        "modernbert-local": lambda: _modernbert_config(4 * SEQ)}

_BUILT: dict = {}


def _built(name):
    if name not in _BUILT:
        model, args, kwargs = MODELS[name]()
        want = eager_output(model, args, kwargs)
        assert not any(torch.isnan(x).any() for x in pytree.tree_leaves(want)
                       if isinstance(x, torch.Tensor)), f"{name}: the model itself gives NaN"
        _BUILT[name] = model, args, kwargs, want
    return _BUILT[name]


def _assert_no_nan(outputs, label):
    for r, out in enumerate(outputs):
        for x in pytree.tree_leaves(out):
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                nan = int(torch.isnan(x).sum())
                assert nan == 0, f"{label} rank {r}: NaN in {nan} values"


@pytest.mark.parametrize("name", sorted(WIDE))
def test_the_window_bites_at_this_length(name):
    model, args, kwargs, want = _built(name)
    wide = type(model)(WIDE[name]()).float().eval()
    wide.load_state_dict(model.state_dict())
    got = eager_output(wide, args, kwargs)
    assert rel_error(got.last_hidden_state, want.last_hidden_state) > 1e-3


def _core_ops(gm) -> set[str]:
    names = {"scaled_dot_product_attention", "attend", "chunked_attend", "chunked_attention"}
    return {n.target._opname for n in gm.graph.nodes
            if n.op == "call_function" and getattr(n.target, "_opname", None) in names}


@pytest.mark.slow
def test_both_kernel_paths_on_a_padded_llama():
    """The default compile substitutes the chunked kernels at m > 1 (needs_kernel_choice);
    kernel_choice=False keeps helix.attend (score-reduce) and SDPA at d/m = 4 (qk-gather)."""
    model, args, kwargs, want = _built("llama-sdpa")
    expect = {("score-reduce", True): {"chunked_attend"}, ("qk-gather", True): {"chunked_attention"},
              ("score-reduce", False): {"attend"}, ("qk-gather", False): {"scaled_dot_product_attention"}}
    for (variant, chunked), ops in expect.items():
        prog = compile_split(model, args, kwargs, m=2, n=2, variant=variant)
        assert prog.kernel_choice
        prog = dataclasses.replace(prog, kernel_choice=chunked)   # a new program, no module built
        label = f"llama-sdpa m=2 x n=2 {variant} kernel_choice={chunked}"
        assert _core_ops(prog.rank_module(0)) == ops, (label, _core_ops(prog.rank_module(0)))
        outputs = prog.simulate(*args, **kwargs)
        _assert_no_nan(outputs, label)
        assert_ranks_equal(outputs, want, devices=4, label=label)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_every_split_matches_the_model_on_padded_rows(name):
    """Every feasible split of 4 and 8 devices (one capture per model: compile_split)."""
    model, args, kwargs, want = _built(name)
    for devices in (4, 8):
        prog = compile_split(model, args, kwargs, m=1, n=devices, variant=None)
        splits = feasible_splits(prog.analysis.summary, devices)
        assert any(m > 1 for m, _ in splits), splits
        for m, n in splits:
            for variant in variants_for(m):
                label = f"{name} m={m} x n={n} {variant or 'heads'}"
                p = compile_split(model, args, kwargs, m=m, n=n, variant=variant)
                outputs = p.simulate(*args, **kwargs)
                _assert_no_nan(outputs, label)
                assert_ranks_equal(outputs, want, devices=devices, label=label)


@pytest.mark.slow
def test_planner_choice_on_a_padded_local_attention_encoder():
    model, args, kwargs, want = _built("modernbert-local")
    prog = helix_compile(model, devices=16, example_inputs=args, example_kwargs=kwargs)
    assert prog.plan.m > 1, prog.plan         # 8 heads on 16 devices: head-dim slices
    outputs = prog.simulate(*args, **kwargs)
    label = f"planner m={prog.plan.m} x n={prog.plan.n} {prog.plan.variants}"
    _assert_no_nan(outputs, label)
    assert_ranks_equal(outputs, want, devices=16, label=label)
