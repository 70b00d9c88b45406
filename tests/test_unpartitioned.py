"""Attention cores no site owns are reported, never replicated silently (passes/unpartitioned.py).

A HelixWarning names each one with why, the plan carries it (plan.unpartitioned, in the table,
the YAML and the JSON of `helix plan`), strict=True / --strict refuses it; a model whose
cores are all sites, or whose only other softmax is an MoE router's over a weight, gets none.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

from helix_compiler import helix_compile
from helix_compiler.api import plan_model
from helix_compiler.cli.main import _main
from helix_compiler.errors import HelixWarning, UnpartitionedError
from helix_compiler.planning.plan import Plan
from tests.helpers import assert_ranks_equal, eager_output

REPO = Path(__file__).resolve().parents[1]
HERE = str(Path(__file__).resolve())


class Attention(nn.Module):
    """Explicit attention (matmul, softmax, matmul) on (B, H, S, d); with `clamp`, the scores
    are clamped to a learned per-head bound, a score op find_attention does not know."""

    def __init__(self, dim: int = 32, heads: int = 4, clamp: bool = False) -> None:
        super().__init__()
        self.heads, self.d = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.bound = nn.Parameter(torch.full((heads, 1, 1), 2.0)) if clamp else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = (p(x).view(B, S, self.heads, self.d).transpose(1, 2) for p in (self.q, self.k, self.v))
        scores = q @ k.transpose(-2, -1) / self.d ** 0.5          # (B, H, S, S)
        if self.bound is not None:
            scores = torch.clamp(scores, -self.bound, self.bound)  # aten.clamp.Tensor
        scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)  # HF's fill: no NaN rows
        y = torch.softmax(scores, dim=-1) @ v                      # (B, H, S, d)
        return self.o(y.transpose(1, 2).reshape(B, S, D))


class Model(nn.Module):
    """A recognized attention block, a clamped one, and an MoE-style router softmax over
    x @ W (a weight): only the clamped core is attention that no site owns."""

    def __init__(self, dim: int = 32, clamp: bool = True) -> None:
        super().__init__()
        self.plain, self.clamped = Attention(dim), Attention(dim, clamp=clamp)
        self.router = nn.Parameter(torch.randn(dim, 4) / dim ** 0.5)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.plain(x, mask)
        x = x + self.clamped(x, mask)
        gate = torch.softmax(x @ self.router, dim=-1)             # (B, S, 4) router weights
        return x * gate.sum(-1, keepdim=True)


def _inputs(batch: int = 3, seq: int = 7):
    x = torch.randn(batch, seq, 32)
    pad = torch.zeros(batch, seq, dtype=torch.bool)
    pad[1, :2] = True                                  # left-padded row
    pad[2, :] = True                                   # a fully padded row
    causal = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    return x, causal[None, None] | pad[:, None, None, :]


def clamped_model(clamp: bool = True):
    """MODEL spec for the CLI tests."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Model(clamp=clamp).eval()
        x, mask = _inputs()
    return model, (x, mask)


def clean_model():
    return clamped_model(clamp=False)


def _clamped_softmax(prog_or_plan) -> str:
    """The node name of the clamped block's softmax: the second softmax over scores."""
    gm = prog_or_plan.analysis.captured.gm
    soft = [n.name for n in gm.graph.nodes if "softmax" in str(n.target)]
    return soft[1]


def test_clamped_core_is_named_in_a_helix_warning_and_the_plan_and_still_runs_exactly():
    model, args = clamped_model()
    with pytest.warns(HelixWarning, match=r"1 attention core no site owns.*clamp") as caught:
        prog = helix_compile(model, devices=2, example_inputs=args, dynamic=False)
    assert len(prog.plan.sites) == 1, "the plain block is a site, the clamped one is not"
    (core,) = prog.unpartitioned
    assert core.node == _clamped_softmax(prog) and core.op == "softmax"
    assert "clamp" in core.reason and "not recognized as an attention core" in core.reason
    assert core.node in str(caught[0].message)
    assert prog.plan.unpartitioned == prog.unpartitioned
    # replicated is exact: every rank still equals the unsharded model
    assert_ranks_equal(prog.simulate(*args), eager_output(model, args, {}), devices=2)
    # the plan round-trips with it
    assert Plan.from_yaml(prog.plan.to_yaml()).unpartitioned == prog.unpartitioned


def test_strict_refuses_a_model_with_an_unpartitioned_core():
    model, args = clamped_model()
    with pytest.raises(UnpartitionedError, match=r"strict: 1 attention core .*clamp"):
        plan_model(model, devices=2, example_inputs=args, strict=True, dynamic=False)


def test_clean_model_and_router_softmax_give_no_warning():
    from examples.paper_model import PaperConfig, build

    with warnings.catch_warnings():
        warnings.simplefilter("error", HelixWarning)
        model, args = build(PaperConfig(layers=1, heads=4, head_dim=8, mlp=64, batch=2, seq=5,
                                        dtype=torch.float32))
        plan, _ = plan_model(model, devices=4, example_inputs=args, dynamic=False)
        assert plan.unpartitioned == () and len(plan.sites) == 1
        model, args = clean_model()      # the router softmax over x @ W is no attention core
        plan, _ = plan_model(model, devices=2, example_inputs=args, dynamic=False)
        assert plan.unpartitioned == () and len(plan.sites) == 2


def _cli(capsys, *argv):
    code = _main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("fmt", ["table", "yaml", "json"])
def test_helix_plan_prints_the_unpartitioned_core_in_every_format(capsys, fmt):
    code, out, err = _cli(capsys, "plan", f"{HERE}:clamped_model", "--devices", 2, "--format", fmt)
    assert code == 0
    assert err.startswith("warning: 1 attention core no site owns") and err.count("\n") == 1, err
    if fmt == "table":
        assert "unpartitioned attention cores" in out and "clamp" in out
        return
    data = yaml.safe_load(out) if fmt == "yaml" else json.loads(out)
    (core,) = data["unpartitioned"]
    assert core["op"] == "softmax" and "clamp" in core["reason"]


@pytest.mark.parametrize("command", ["plan", "run"])
def test_strict_flag_exits_2_with_one_error_line(capsys, command):
    code, out, err = _cli(capsys, command, f"{HERE}:clamped_model", "--devices", 2, "--strict")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: strict: 1 attention core"), err
    assert "clamp" in err and out == ""


class WhereCacheAttention(nn.Module):
    """One decode step whose KV cache is rewritten whole by torch.where(position mask, new,
    cache) and copy_: find_attention cannot trace k from k_proj through the where (a cache
    written by index_copy_ at cache_position, as HF's StaticCache and
    helix_compiler/models/decoder_cache.py write it, is traced: tests/test_decode.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(16, 16, bias=False)
        self.k_proj = nn.Linear(16, 16, bias=False)
        self.v_proj = nn.Linear(16, 16, bias=False)
        self.o_proj = nn.Linear(16, 16, bias=False)
        self.register_buffer("k_cache", torch.zeros(2, 4, 8, 4))   # (B, H_kv, S_max, d)
        self.register_buffer("v_cache", torch.zeros(2, 4, 8, 4))

    def forward(self, x, cache_position):
        B = x.shape[0]
        q, k, v = (p(x).view(B, 1, 4, 4).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        at = (torch.arange(8) == cache_position)[None, None, :, None]
        self.k_cache.copy_(torch.where(at, k, self.k_cache))
        self.v_cache.copy_(torch.where(at, v, self.v_cache))
        p = torch.softmax(q @ self.k_cache.transpose(-1, -2) * 0.5, dim=-1)
        return self.o_proj((p @ self.v_cache).transpose(1, 2).reshape(B, 1, 16))


def test_cache_written_by_where_core_is_reported_not_replicated_silently():
    args = (torch.randn(2, 1, 16), torch.tensor([3]))
    with pytest.warns(HelixWarning, match="softmax") as caught:
        plan, _ = plan_model(WhereCacheAttention().eval(), devices=2, example_inputs=args, dynamic=False)
    assert plan.sites == ()
    (core,) = plan.unpartitioned
    assert core.op == "softmax" and "could not trace k" in core.reason
    assert "could not trace k" in str(caught[0].message)
    assert json.loads(json.dumps(plan.to_dict()))["unpartitioned"][0]["node"] == core.node
