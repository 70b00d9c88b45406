"""dp replicas of an m x n program (helix_compiler/data.py): rank r runs local rank r % (m n) of
the m x n program on batch shard r // (m n), and returns the unsharded model's rows of it."""

from __future__ import annotations

import dataclasses
import functools
import re

import pytest
import torch

from helix_compiler import helix_compile
from helix_compiler.data import gather_replicas
from helix_compiler.errors import HelixError
from helix_compiler.models.paper import PaperConfig, build
from tests.helpers import assert_output_equal, eager_output

SPLITS = [(2, 2, 1), (2, 1, 2), (4, 1, 1)]   # (dp, m, n) on 4 devices


def _paper():
    # B = 4 so that dp = 4 still gives each replica a (dynamic) batch; S = 7, not 8
    return build(dataclasses.replace(PaperConfig.scaled(), batch=4, seq=7))


def _padded_llama():
    # LLaMA, GQA 8 / 2, rotary: B = 4 rows, one full, one left-padded by 2, one fully padded,
    # one left-padded by 5 (one token), as a batch of prompts arrives
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=8,
                             num_key_value_heads=2, intermediate_size=128, vocab_size=97,
                             max_position_embeddings=64, pad_token_id=0,
                             attn_implementation="eager")
        model = LlamaForCausalLM(config).float().eval()
        ids = torch.randint(3, 97, (4, 6))
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, :2] = 0
    mask[2] = 0
    mask[3, :5] = 0
    ids[mask == 0] = 0
    return model, (ids,), {"attention_mask": mask, "use_cache": False}


@functools.cache
def _captured(name: str):
    """(model, args, kwargs, a program): one capture per model, recompiled for each split."""
    model, args, kwargs = (*_paper(), {}) if name == "paper" else _padded_llama()
    prog = helix_compile(model, devices=1, example_inputs=args, example_kwargs=kwargs)
    return model, args, kwargs, prog


def _rows(tree, d: int, dp: int):
    import torch.utils._pytree as pytree

    return pytree.tree_map(lambda x: x.narrow(0, d * x.shape[0] // dp, x.shape[0] // dp)
                           if isinstance(x, torch.Tensor) and x.dim() else x, tree)


def _check(name, split):
    dp, m, n = split
    model, args, kwargs, base = _captured(name)
    prog = base.recompile(plan=split)
    assert prog.dp == dp and prog.plan.split == split
    assert prog.devices == dp * m * n and prog.replica_devices == m * n
    want = eager_output(model, args, kwargs)
    outs = prog.simulate(*args, **kwargs)
    assert len(outs) == prog.devices
    for r, out in enumerate(outs):                  # every rank: its shard's rows
        assert_output_equal(out, _rows(want, r // (m * n), dp), label=f"{split} rank {r}")
    assert_output_equal(prog.gather(outs), want, label=f"{split} gathered")
    # the replicas share the m x n modules (no second copy of the weights) ...
    for r in range(prog.devices):
        assert prog.rank_module(r) is prog.rank_module(r % (m * n))
    # ... and each rank runs the m x n program's collectives, inside its replica
    ranks = [prog.collectives(r) for r in range(prog.devices)]
    assert all(c == ranks[0] for c in ranks)
    if m * n == 1:
        assert ranks[0] == {}
    else:
        axes = {k.split(":")[1] for k in ranks[0]}
        assert ranks[0] and axes <= {"dim", "head", "all"}, ranks[0]
    return prog


@pytest.mark.parametrize("split", SPLITS, ids=lambda s: "dp%d_m%d_n%d" % s)
def test_paper_model_replicas_return_the_rows_of_their_shard(split):
    prog = _check("paper", split)
    if split[1] > 1:
        assert "all_reduce:dim" in prog.collectives(3)       # score-reduce / qk norm in the m-group


@pytest.mark.slow
@pytest.mark.parametrize("split", SPLITS, ids=lambda s: "dp%d_m%d_n%d" % s)
def test_padded_llama_replicas_return_the_rows_of_their_shard(split):
    _check("llama", split)


def test_dp1_is_the_m_by_n_program():
    prog = _captured("paper")[3].recompile(plan=(1, 1, 2))
    assert prog.dp == 1 and prog.plan.split == (1, 1, 2)
    assert (prog.plan.m, prog.plan.n) == (1, 2) and prog.devices == 2


def test_a_batch_not_divisible_by_dp_is_refused_naming_both():
    _, args, _, base = _captured("paper")
    prog = base.recompile(plan=(2, 1, 1))
    x = torch.randn(3, 7, args[0].shape[-1])
    with pytest.raises(HelixError, match=r"batch of 3 sequences does not split into dp=2 equal shards"):
        prog.simulate(x)


def test_planner_refuses_dp_that_does_not_divide_the_example_batch():
    base = _captured("paper")[3]        # B = 4
    with pytest.raises(HelixError, match=r"dp=8 replicas need the global batch B=4 to split evenly"):
        base.recompile(plan=(8, 1, 1))


def test_gather_replicas_concatenates_each_replica_once():
    outs = [torch.full((2, 3), float(r // 2)) for r in range(4)]   # dp = 2 replicas of 2 ranks
    got = gather_replicas(outs, 2, 2)
    assert torch.equal(got, torch.tensor([[0.0] * 3] * 2 + [[1.0] * 3] * 2))
    with pytest.raises(HelixError, match=r"needs 2 x 2 rank outputs, got 3"):
        gather_replicas(outs[:3], 2, 2)


def test_save_of_a_dp_program_is_refused_with_what_to_do(tmp_path):
    prog = _captured("paper")[3].recompile(plan=(2, 1, 1))
    with pytest.raises(HelixError, match=r"save of a dp=2 program is not supported yet"):
        prog.save(tmp_path)


@pytest.mark.slow
def test_helix_run_under_torchrun_feeds_each_replica_its_shard(capsys):
    from helix_compiler.cli.main import _main

    code = _main(["run", "--devices", "4", "--plan", "2,1,2", "--backend", "gloo", "--steps", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    line = re.search(r"helix run: 4 ranks, dp=2 x m=1 x n=2, backend gloo, .*max relative error "
                     r"(\S+)", out)
    assert line, out
    assert float(line[1]) <= 1e-5
