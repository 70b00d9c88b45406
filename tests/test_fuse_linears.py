"""passes/fuse_linears.py: projections of one input run as one GEMM, exactly.

Every rank of a sharded program with its projections fused is compared with the unsharded
model (float32, relative error <= 1e-5); groups a strided slice cannot feed are kept and said
so; compile_decoder fuses q/k/v and gate/up in both programs of every rank, which share the
fused weights, and its weight bytes stay the planner's.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from helix_compiler import helix_compile
from helix_compiler.decode import compile_decoder
from helix_compiler.models.decoder_cache import DecoderConfig, build
from helix_compiler.program import run_ranks
from passes.fuse_linears import fuse_linears

from tests.helpers import assert_decode_equal, assert_ranks_equal
from tests.test_decode import _prompt


class Block(nn.Module):
    """q, k, v of one input (biases on), gate / up of another (no bias), and a projection
    pair whose first output is viewed flat, which a strided slice cannot take."""

    def __init__(self, D=32, H=4):
        super().__init__()
        self.H = H
        self.q, self.k, self.v = (nn.Linear(D, D) for _ in range(3))
        self.o = nn.Linear(D, D, bias=False)
        self.gate, self.up = nn.Linear(D, 2 * D, bias=False), nn.Linear(D, 2 * D, bias=False)
        self.down = nn.Linear(2 * D, D, bias=False)
        self.a, self.b = nn.Linear(D, D, bias=False), nn.Linear(D, D, bias=False)

    def forward(self, x, mask):
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.H, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.o(att.transpose(1, 2).reshape(B, T, D))
        x = x + self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))
        a = self.a(x)
        return x + a.view(B, -1).view(a.shape) + self.b(x)       # the last dim merged: no


def _inputs(B=3, T=6, D=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, D, generator=g)
    mask = torch.ones(B, 1, T, T, dtype=torch.bool).tril()
    mask[1, :, :, :2] = False            # a left-padded row
    mask[1, :, :2, 0] = True             # ... whose padded queries still see one key
    return x, mask


def test_every_rank_with_fused_projections_equals_the_model():
    torch.manual_seed(0)
    model = Block().eval()
    args = _inputs()
    with torch.no_grad():
        want = model(*args)
    prog = helix_compile(model, devices=2, example_inputs=args, plan=(1, 2), dynamic=False)
    fused = {}
    mods, notes = [], []
    for r in range(2):
        gm, sites = fuse_linears(prog.rank_module(r), args, fused)
        mods.append(gm)
        notes.append(sites)
    with torch.no_grad():
        assert_ranks_equal(run_ranks(mods, prog.mesh, args, {}), want, devices=2, label="fused")
    done = [s for s in notes[0] if s.attr]
    kept = [s for s in notes[0] if not s.attr]
    # q, k, v (with biases) as one; gate, up as one; a / b kept: a's output is viewed flat
    assert sorted(len(s.members) for s in done) == [2, 3], notes[0]
    assert len(kept) == 1 and "views it as" in kept[0].why, notes[0]
    linears = [n for n in mods[0].graph.nodes if n.target is torch.ops.aten.linear.default]
    assert len(linears) == 9 - 3, [n.name for n in linears]     # 9 projections, 2 groups fused
    for gm in mods:              # the members' weights are gone from the rewritten module
        names = dict(gm.named_buffers()) | dict(gm.named_parameters())
        for s in done:
            assert s.attr in names and not any(m in names for m in s.members), s


def test_a_weight_read_twice_is_left_as_it_is():
    """A weight some other node reads too (tied) is not fused away from it."""
    model = Block().eval()
    args = _inputs()
    prog = helix_compile(model, devices=2, example_inputs=args, plan=(1, 2), dynamic=False)
    gm = prog.rank_module(0)
    up = next(n for n in gm.graph.nodes if n.op == "get_attr" and "up" in str(n.target))
    with gm.graph.inserting_before(up):            # a second reader of up's weight
        again = gm.graph.get_attr(up.target)
        gm.graph.call_function(torch.ops.aten.sum.default, (again,))
    gm.recompile()
    out, sites = fuse_linears(gm, args)
    assert all("up" not in m for s in sites if s.attr for m in s.members), sites
    assert hasattr(out, str(up.target))
    with torch.no_grad():
        assert_ranks_equal(run_ranks([out, fuse_linears(prog.rank_module(1), args)[0]], prog.mesh,
                                     args, {}), model(*args), devices=2, label="tied")


def test_fuse_linears_leaves_the_module_it_was_given_as_it_was():
    model = Block().eval()
    args = _inputs()
    prog = helix_compile(model, devices=2, example_inputs=args, plan=(1, 2), dynamic=False)
    gm = prog.rank_module(0)
    before = gm.code
    names = sorted(n for n, _ in gm.named_buffers())
    out, _ = fuse_linears(gm, args)
    assert out is not gm and gm.code == before and sorted(n for n, _ in gm.named_buffers()) == names


def test_compile_decoder_fuses_qkv_and_gate_up_shares_them_and_equals_the_model():
    cfg = DecoderConfig(kv_heads=2)
    model, ref = build(cfg), build(cfg)
    tokens, valid = _prompt(cfg)          # 5 tokens, a left-padded row and a fully padded one
    for split in ((1, 4), (2, 1, 2)):
        ref.reset_cache()                 # the last split's steps wrote positions 5 and 6
        prog = compile_decoder(model, 4, split, prompt_len=5)
        # two groups per layer: q/k/v and (the model's MLP) gate/up
        assert len(prog.fuse_notes) == 2 * cfg.layers, prog.fuse_notes
        assert all("as one" in note for note in prog.fuse_notes), prog.fuse_notes
        for pre, step in prog.modules:    # one copy of every weight per rank, the fused ones too
            theirs = {id(t) for _, t in pre.named_buffers()}
            assert all(id(t) in theirs for _, t in step.named_buffers())
        assert_decode_equal(prog, ref, tokens, valid, [5, 6], devices=4, label=f"split {split}")
        plain = compile_decoder(model, 4, split, prompt_len=5, fuse_projections=False)
        assert plain.fuse_notes == ()
        for pre, step in plain.modules:   # built apart, the two modules still share every weight
            theirs = {id(t) for _, t in pre.named_buffers()}
            assert all(id(t) in theirs for _, t in step.named_buffers())
        assert [prog.weight_bytes(r) for r in range(4)] == [plain.weight_bytes(r) for r in range(4)]


def test_qwen2_with_projection_biases_generates_hf_tokens_fused():
    """HF Qwen2 (q/k/v with biases) on its StaticCache: the biases are fused with their weights
    and greedy generation equals HF's own generate, on a left-padded row."""
    from transformers import Qwen2Config

    from helix_compiler.models.hf_static import hf_generate, hf_static_decoder

    cfg = Qwen2Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, head_dim=8,
                      num_key_value_heads=2, intermediate_size=64, vocab_size=64,
                      max_position_embeddings=64, attn_implementation="sdpa")
    model = hf_static_decoder(cfg, 3, 16, seed=0)
    prompt = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(0))
    valid = torch.ones(3, 6, dtype=torch.long)
    valid[1, :3] = 0
    want = hf_generate(model, prompt, valid, 6)
    prog = compile_decoder(model, 2, (1, 1, 2), prompt_len=6)
    assert len(prog.fuse_notes) == 4 and all("as one" in n for n in prog.fuse_notes), prog.fuse_notes
    step = prog.modules[0][1]
    biased = [n for n in step.graph.nodes if n.target is torch.ops.aten.linear.default
              and len(n.args) > 2 and n.args[2] is not None]
    assert len(biased) == 2, [n.format_node() for n in biased]    # q/k/v of each layer, one bias
    assert torch.equal(prog.simulate_generate(prompt, valid, 6), want)
