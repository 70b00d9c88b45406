"""find_attention's provenance run keeps its index tags broadcast over batch and position dims
(passes/find_attention.py `_reshape_tags`): repeat_kv's reshape of a static cache's tags would
otherwise materialize B x H x S_max x d floats per layer (4.3 GB at S_max = 131072)."""

import torch

from passes.find_attention import _reshape_tags


def test_reshape_of_repeat_kv_tags_equals_reshape_and_keeps_the_positions_broadcast():
    B, Hkv, g, S, d = 2, 3, 4, 1000, 5
    tags = torch.arange(Hkv * d, dtype=torch.float32).view(1, Hkv, 1, 1, d).expand(B, Hkv, g, S, d)
    got = _reshape_tags(tags, [B, Hkv * g, S, d])
    assert torch.equal(got, tags.reshape(B, Hkv * g, S, d))
    assert got.stride(0) == 0 and got.stride(2) == 0           # batch and positions not copied
    assert got.stride(1) != 0                                  # heads: H_kv x g merged, real values


def test_reshape_that_merges_a_broadcast_dim_copies_as_reshape_does():
    t = torch.arange(6, dtype=torch.float32).view(1, 6).expand(4, 6)
    for size in ([24], [4, 2, 3], [2, 12], [-1, 3]):
        assert torch.equal(_reshape_tags(t, size), t.reshape(size)), size
