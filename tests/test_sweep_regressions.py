"""Failures benchmarks/hf_sweep.py found in real HF models, each reduced to the model that
showed it and checked on every feasible split of 4 devices (both m > 1 variants) with a
left-padded and a fully padded row.

* XLM / FlauBERT: the always-present kv cache is `tensor(())`, cat onto k and v
  (`torch.cat([empty_1d, k], dim=-2)`: torch.cat skips 1-d empty inputs); the shard pass's
  cat rule indexed the empty input's layout by k's dims (IndexError in
  passes/shard_rules.py:_cat at every split).
"""

from __future__ import annotations

import pytest
import torch

from helix_compiler.pipeline import analyze
from tests.helpers import check_split, eager_output, feasible_splits, seeded, variants_for

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
    analysis = analyze(model, args, kwargs)
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
