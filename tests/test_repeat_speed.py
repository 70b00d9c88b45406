"""Compile a repeated block once (issue 14): the per-site work memoized across the copies of a
repeated layer must give what computing each site on its own gives."""

import numpy as np
import pytest
import torch

from helix_compiler.pipeline import analyze
from helix_compiler.runtime.mesh import Mesh
from passes.seeds import all_seeds, mlp_seeds, site_seeds


def _gqa_llama(layers: int = 8):
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaModel(cfg).eval()
    ids = torch.zeros(2, 5, dtype=torch.long, device="meta")
    return model, (ids,), {"use_cache": False}


@pytest.mark.slow
def test_all_seeds_memoized_per_layer_equals_each_site_on_its_own():
    model, args, kwargs = _gqa_llama()
    a = analyze(model, args, kwargs)
    assert a.captured.gm.meta["repeat_blocks"]["layers"] == 8 and len(a.matches) == 8
    for mesh in (Mesh(n=2, m=2), Mesh(n=8, m=1), Mesh(n=4, m=4)):
        want = {}
        for match in a.matches:
            want.update(site_seeds(match, mesh))
        for mlp in a.mlps:
            want.update(mlp_seeds(mlp, mesh))
        got = all_seeds(a.matches, a.mlps, mesh)
        assert got.keys() == want.keys() and len(got) == 8 * 3 + 8 * 2   # q, k, v; gate, up
        for name in want:
            assert len(got[name]) == mesh.size
            assert all(np.array_equal(x, y) for x, y in zip(got[name], want[name])), name


@pytest.mark.slow
def test_passes_freeze_older_objects_and_export_the_standin_uncached_then_restore_both(monkeypatch):
    """The model passes run with the process's older objects frozen out of the collector and the
    stand-in's export without the fake-tensor cache (helix_compiler/pipeline.py `_young_gc`,
    repeat.py `_no_fake_tensor_cache`); afterwards both are as they were, and objects the
    process froze itself stay frozen."""
    import gc

    import torch._dynamo.config as dynamo_config

    seen = []
    export = torch.export.export

    def spy(*a, **kw):
        seen.append((gc.get_freeze_count() > 0, dynamo_config.fake_tensor_cache_enabled))
        return export(*a, **kw)
    monkeypatch.setattr(torch.export, "export", spy)
    model, args, kwargs = _gqa_llama()
    assert gc.get_freeze_count() == 0 and dynamo_config.fake_tensor_cache_enabled
    a = analyze(model, args, kwargs)
    assert a.captured.gm.meta["repeat_blocks"]["captured"] == (0, 7)
    assert seen == [(True, False)]
    assert gc.get_freeze_count() == 0 and gc.isenabled() and dynamo_config.fake_tensor_cache_enabled
    gc.freeze()         # the process froze its objects: a compile leaves them frozen
    try:
        analyze(model, args, kwargs)
        # gc.unfreeze() would have emptied the permanent generation (the count goes down by
        # itself as frozen objects die by reference count)
        assert seen[-1] == (True, False) and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
