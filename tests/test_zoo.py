"""The zoo itself: every model exports with torch.export (non-strict), the exported
module computes what the eager model computes, builds are seeded, and each entry's
site count matches the attention cores in its ATen graph."""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree

from tests.models import ATTENTION_ZOO, ZOO, ZooModel, zoo

# The attention cores of an ATen graph: a fused SDPA call, or the softmax of an
# explicit matmul -> softmax -> matmul (no zoo model uses softmax elsewhere).
_CORES = {
    torch.ops.aten.scaled_dot_product_attention.default,
    torch.ops.aten.softmax.int,
    torch.ops.aten._softmax.default,
}


def _tensors(output) -> list[torch.Tensor]:
    # HF ModelOutputs are registered pytree nodes, so both sides flatten alike.
    return [leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]


@pytest.fixture(scope="module")
def exported():
    cache: dict[str, tuple] = {}

    def get(entry: ZooModel):
        if entry.name not in cache:
            model, args, kwargs = entry.build()
            cache[entry.name] = (model, args, kwargs, torch.export.export(model, args, kwargs, strict=False))
        return cache[entry.name]

    return get


@pytest.mark.parametrize("entry", ZOO, ids=lambda z: z.name)
def test_exported_module_output_equals_eager_output(entry, exported):
    model, args, kwargs, ep = exported(entry)
    with torch.no_grad():
        want = _tensors(model(*args, **kwargs))
        got = _tensors(ep.module()(*args, **kwargs))
    assert len(got) == len(want) >= 1
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("entry", ZOO, ids=lambda z: z.name)
def test_attention_core_count_equals_declared_sites(entry, exported):
    *_, ep = exported(entry)
    cores = [n for n in ep.graph.nodes if n.op == "call_function" and n.target in _CORES]
    assert len(cores) == entry.sites, [str(n.target) for n in cores]


@pytest.mark.parametrize("entry", ZOO, ids=lambda z: z.name)
def test_build_is_seeded_and_leaves_global_rng_alone(entry):
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    model_a, args_a, kwargs_a = entry.build()
    assert torch.equal(torch.get_rng_state(), before)
    model_b, args_b, kwargs_b = entry.build()
    assert not model_a.training
    assert all(p.dtype == torch.float32 for p in model_a.parameters())
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(a, b), name
    for a, b in zip(_tensors((args_a, kwargs_a)), _tensors((args_b, kwargs_b))):
        assert torch.equal(a, b)


def test_example_inputs_are_batch_2_seq_8():
    for entry in ZOO:
        _, args, kwargs = entry.build()
        first = _tensors(args)[0]
        assert tuple(first.shape[:2]) == (2, 8), entry.name


def test_attention_zoo_excludes_only_the_mlp_model():
    assert {z.name for z in ZOO} - {z.name for z in ATTENTION_ZOO} == {"mlp_only"}


def test_zoo_lookup_names_known_models_on_a_typo():
    assert zoo("llama").kv_heads == 2
    with pytest.raises(KeyError, match="'gpt2'"):
        zoo("gtp2")


def test_zoo_entry_rejects_heads_not_divisible_by_kv_heads():
    with pytest.raises(ValueError, match="H=8, H_kv=3"):
        ZooModel(name="bad", build=lambda: None, sites=1, heads=8, kv_heads=3, head_dim=8)
