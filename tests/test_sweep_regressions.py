"""Failures benchmarks/hf_sweep.py found in real HF models, each reduced to the model that
showed it and checked on every feasible split of 4 devices (both m > 1 variants) with a
left-padded and a fully padded row.

* XLM / FlauBERT: the always-present kv cache is `tensor(())`, cat onto k and v
  (`torch.cat([empty_1d, k], dim=-2)`: torch.cat skips 1-d empty inputs); the shard pass's
  cat rule indexed the empty input's layout by k's dims (IndexError in
  passes/shard_rules.py:_cat at every split).
* Aliases torch.export keeps (swapaxes, mT, movedim, broadcast_to): find_attention knew
  none of them ("k transposed ... is not a spelling it knows"; Falcon-40B's broadcast_to
  lost k); passes/canonical_ops.py rewrites them to transpose / permute / expand.
* JetMoE: data-dependent (unbacked) sizes of its MoE routing crashed the workload cost
  (passes/workload.py:_numel, int(None)); its mixture-of-attention-heads core is reported.
* XGLM: torch.max(scores, tensor(finfo.min)) between QK^T and the softmax was not a score op.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import captured_program, check_split, eager_output, feasible_splits, seeded, variants_for

VOCAB = 128


def _padded(batch: int = 3, seq: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, :2] = 0  # left-padded
    mask[2] = 0      # fully padded
    return ids, mask


@seeded
def _xlm():
    from transformers import XLMConfig, XLMModel

    config = XLMConfig(n_layers=2, emb_dim=64, n_heads=8, vocab_size=VOCAB, max_position_embeddings=64,
                       pad_index=0, attn_implementation="eager")
    ids, mask = _padded()
    return XLMModel(config), (ids,), {"attention_mask": mask}


@pytest.mark.slow
def test_xlm_every_split_of_4_devices_equals_unsharded_model():
    model, args, kwargs = _xlm()
    want = eager_output(model, args, kwargs)
    analysis = captured_program(model, args, kwargs).analysis
    assert len(analysis.summary.sites) == 2, analysis.skipped
    # the pattern: the empty kv cache is a cat operand of shape (0,)
    cats = [n for n in analysis.captured.gm.graph.nodes if n.target is torch.ops.aten.cat.default]
    assert any(tuple(a.meta["val"].shape) == (0,) for c in cats for a in c.args[0]), \
        [[tuple(a.meta["val"].shape) for a in c.args[0]] for c in cats]
    splits = feasible_splits(analysis.summary, 4)
    assert {m for m, _ in splits} == {1, 2, 4}, splits
    for m, n in splits:
        for variant in variants_for(m):
            check_split(model, args, kwargs, want, m=m, n=n, variant=variant)


class _AliasAttention(torch.nn.Module):
    """Attention written with aliases torch.export keeps as they are: swapaxes, mT, movedim,
    broadcast_to (GQA, Falcon-40B style); passes/canonical_ops.py turns them into transpose /
    permute / expand."""

    def __init__(self, dim: int = 64, heads: int = 8, kv_heads: int = 2):
        super().__init__()
        self.h, self.hkv, self.d = heads, kv_heads, dim // heads
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.d)
        self.o = torch.nn.Linear(dim, dim)

    def forward(self, x, mask):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.hkv, self.h // self.hkv, self.d)
        k, v = self.kv(x).view(b, s, self.hkv, 1, 2 * self.d).chunk(2, dim=-1)
        k, v = torch.broadcast_to(k, q.shape), torch.broadcast_to(v, q.shape)
        q, k, v = (t.flatten(2, 3).swapaxes(1, 2) for t in (q, k, v))     # (B, H, S, d)
        scores = (q @ k.mT) / self.d ** 0.5
        scores = scores.masked_fill(mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
        out = scores.softmax(-1) @ v
        return self.o(out.movedim(1, 2).reshape(b, s, -1))


@seeded
def _aliases():
    ids, mask = _padded()
    return _AliasAttention(), (torch.randn(*ids.shape, 64),), {"mask": mask}


@pytest.mark.slow
def test_aliases_are_found_and_every_split_of_4_devices_equals_unsharded_model():
    model, args, kwargs = _aliases()
    want = eager_output(model, args, kwargs)
    analysis = captured_program(model, args, kwargs).analysis
    assert [(s.num_heads, s.num_kv_heads, s.head_dim) for s in analysis.summary.sites] == [(8, 2, 8)], \
        analysis.skipped
    targets = {n.target for n in analysis.captured.gm.graph.nodes}
    aten = torch.ops.aten
    assert not targets & {aten.swapaxes.default, aten.mT.default, aten.movedim.int, aten.broadcast_to.default}
    for m, n in feasible_splits(analysis.summary, 4):
        for variant in variants_for(m):
            check_split(model, args, kwargs, want, m=m, n=n, variant=variant)



@seeded
def _jetmoe():
    from transformers import JetMoeConfig, JetMoeForCausalLM

    config = JetMoeConfig(num_hidden_layers=1, hidden_size=64, num_key_value_heads=4, kv_channels=8,
                          intermediate_size=128, num_local_experts=4, num_experts_per_tok=2,
                          vocab_size=VOCAB, max_position_embeddings=64, attn_implementation="eager")
    ids, mask = _padded()
    return JetMoeForCausalLM(config), (ids,), {"attention_mask": mask, "use_cache": False}


@pytest.mark.slow
def test_jetmoe_data_dependent_sizes_are_costed_and_its_moa_attention_is_reported():
    """JetMoE routes tokens to experts with data-dependent (unbacked) sizes, which have no
    example value: passes/workload.py costed them with int(None) (TypeError in analyze).
    Its attention (q from a mixture of attention experts) is not a site: it must be named."""
    model, args, kwargs = _jetmoe()
    analysis = captured_program(model, args, kwargs).analysis
    assert analysis.summary.workload is not None
    assert not analysis.summary.sites
    assert [c.op for c in analysis.unpartitioned] == ["softmax"], analysis.unpartitioned


@seeded
def _xglm():
    from transformers import XGLMConfig, XGLMForCausalLM

    config = XGLMConfig(num_layers=1, d_model=64, attention_heads=8, ffn_dim=128, vocab_size=VOCAB,
                        max_position_embeddings=64, pad_token_id=0, attn_implementation="eager")
    ids, mask = _padded()
    return XGLMForCausalLM(config), (ids,), {"attention_mask": mask, "use_cache": False}


@pytest.mark.slow
def test_xglm_score_floor_every_split_of_4_devices_equals_unsharded_model():
    """XGLM floors the scores with torch.max(scores, tensor(finfo.min)) (aten.max.other)
    before the softmax: a score op (find_attention.SCORE_OPS) and a pointwise shard rule."""
    model, args, kwargs = _xglm()
    want = eager_output(model, args, kwargs)
    analysis = captured_program(model, args, kwargs).analysis
    assert len(analysis.summary.sites) == 1, analysis.unpartitioned
    for m, n in feasible_splits(analysis.summary, 4):
        for variant in variants_for(m):
            check_split(model, args, kwargs, want, m=m, n=n, variant=variant)
