"""Meta-device planning and the parameters each rank holds, checked against the emitted modules."""

import pytest
import torch

from helix_compiler import helix_compile
from tests.models import ZOO


def _rank_params(prog, r):
    return sum(t.numel() for k, t in prog.rank_module(r).state_dict().items() if not k.startswith("_helix_index"))


@pytest.mark.parametrize("z", ZOO, ids=lambda z: z.name)
def test_params_per_rank_in_plan_match_emitted_modules(z):
    model, args, kwargs = z.build()
    plans = [(1, 4), (2, 2), (4, 1)] if z.sites else [(1, 4)]
    prog = None
    for plan in plans:   # one capture, each split sharded from it
        prog = helix_compile(model, devices=4, example_inputs=args, example_kwargs=kwargs, plan=plan) \
            if prog is None else prog.recompile(plan=plan)
        # the plan counts the largest rank: the one that holds the row-parallel biases (they
        # ride in one rank's partial per reduction group); no rank holds more
        held = [_rank_params(prog, r) for r in range(4)]
        assert max(held) == prog.plan.cost.param_elements_per_rank, (z.name, plan, held)


def test_llama70b_layers_on_meta_shard_without_allocating():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=2,
                      num_attention_heads=64, num_key_value_heads=8)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.zeros(1, 4096, dtype=torch.long, device="meta")
    prog = helix_compile(model, devices=64, example_inputs=(ids,), example_kwargs={"use_cache": False})
    assert len(prog.plan.sites) == 2
    site = prog.plan.sites[0].site
    assert (site.num_heads, site.num_kv_heads, site.head_dim) == (64, 8, 128)
    sd = prog.rank_module(5).state_dict()
    assert all(t.device.type == "meta" for k, t in sd.items() if not k.startswith("_helix_index"))
    # q_proj rows of one rank: H/n heads x d/m dims, each a row of D = 8192
    m, n = prog.plan.m, prog.plan.n
    q = [t for k, t in sd.items() if k.startswith("model_layers_0_self_attn_q_proj")]
    assert [tuple(t.shape) for t in q] == [((64 // n) * (128 // m), 8192)]
    assert _rank_params(prog, 5) == prog.plan.cost.param_elements_per_rank
