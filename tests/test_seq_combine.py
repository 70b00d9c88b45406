"""The s > 1 combine of passes/seq_split.py (docs/decode.md, "The sequence split s"): one
all-gather of each chunk's row (max, sum) over "seq", and the sum over chunks folded into the
output projection's all-reduce widened to the mesh, or, where that path is not linear (or there
is no such all-reduce), one more all-reduce over "seq"; and the decode planner pricing exactly
those collectives.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn as nn

from helix_compiler import helix_compile
from helix_compiler.decode import cache_writes, compile_decoder
from helix_compiler.models.decoder_cache import DecoderConfig, build
from helix_compiler.planning.decode_plan import DecodeShape, cost_decode
from helix_compiler.program import run_ranks
from helix_compiler.runtime.mesh import Mesh
from passes.seq_split import chunk_bounds, split_sequence

from tests.helpers import assert_decode_equal, assert_ranks_equal, hf_llama_decoder, padded_prompt
from tests.test_decode_plan import HAND

DEVICES = 4
helix = torch.ops.helix


def _collectives(gm) -> Counter:
    """'all_reduce:axis:op' / 'all_gather:axis' -> count in a rank module."""
    out = Counter()
    for nd in gm.graph.nodes:
        if nd.target is helix.all_reduce.default:
            out[f"all_reduce:{nd.args[1]}:{nd.args[2]}"] += 1
        elif nd.target is helix.all_gather.default:
            out[f"all_gather:{nd.args[1]}"] += 1
    return out


@pytest.mark.slow
@pytest.mark.parametrize("split, variant, folded", [((2, 2, 1), "score-reduce", True), ((4, 1, 1), None, False)],
                         ids=lambda x: str(x))
def test_combine_collectives_per_layer_folded_and_unfolded_every_rank_equals_unsharded(split, variant, folded):
    # S_max 24 (s = 2: chunks of 12, s = 4: of 6); positions 10 .. 12 cross a boundary at 12
    cfg = DecoderConfig(kv_heads=2)
    model, ref = build(cfg), build(cfg)
    tokens, valid = padded_prompt(cfg.batch, cfg.max_seq, 10, cfg.vocab)
    prog = compile_decoder(model, DEVICES, split, variant=variant, prompt_len=10)
    s, m, n = split
    L = cfg.layers
    # folded: per layer one all-gather over "seq", the output projection's and the MLP's
    # all-reduces over the mesh (and score-reduce's over "dim"); unfolded (m = n = 1: no
    # output all-reduce): one more sum all-reduce over "seq" instead
    want = Counter({"all_gather:seq": L, "all_reduce:mesh:sum": 2 * L} if folded else
                   {"all_gather:seq": L, "all_reduce:seq:sum": L, "all_reduce:mesh:sum": L})
    if variant == "score-reduce":
        want["all_reduce:dim:sum"] = L
    for r in range(DEVICES):
        for gm in prog.modules[r]:
            assert _collectives(gm) == want, (split, r, _collectives(gm))
    form = "folded" if folded else "unfolded"
    assert len(prog.combine_notes) == 2 * L, prog.combine_notes      # prefill and step, per layer
    assert all(f": {form} (" in note for note in prog.combine_notes), prog.combine_notes
    if not folded:
        assert all("m = n = 1: no output-projection all-reduce" in note for note in prog.combine_notes)
    assert_decode_equal(prog, ref, tokens, valid, range(10, 13), devices=DEVICES,
                        label=f"s={s} m={m} n={n} {form}")


class CacheLayer(nn.Module):
    """One attention layer over a (B, 4, 8, 4) cache written at cache_position: explicit
    softmax under a causal -inf mask (a plain softmax: prefill leaves the second chunk all
    -inf), an o_proj with a bias, and with `norm` a per-head RMS norm of the attention output
    before o_proj (not linear in it: the combine cannot be folded past it)."""

    def __init__(self, norm: bool) -> None:
        super().__init__()
        self.norm = norm
        self.q_proj, self.k_proj = nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False)
        self.v_proj, self.o_proj = nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=True)
        self.register_buffer("k_cache", torch.zeros(2, 4, 8, 4))
        self.register_buffer("v_cache", torch.zeros(2, 4, 8, 4))

    def forward(self, x, cache_position):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, 4, 4).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        self.k_cache.index_copy_(2, cache_position, k)
        self.v_cache.index_copy_(2, cache_position, v)
        scores = (q @ self.k_cache.transpose(-1, -2)) * 0.5                  # (B, 4, T, 8)
        future = torch.arange(8)[None, :] > cache_position[:, None]          # (T, 8)
        out = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ self.v_cache
        if self.norm:
            out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, 16))


@pytest.mark.parametrize("norm", [False, True], ids=["linear-path-with-bias", "per-head-norm"])
def test_combine_folds_over_a_biased_o_proj_and_not_past_a_norm_every_rank_equals_unsharded(norm):
    torch.manual_seed(0)
    model = CacheLayer(norm).eval()
    ref = copy.deepcopy(model)
    mesh = Mesh(n=2, m=1, s=2)                                # chunks [0, 4), [4, 8)
    args = (torch.randn(2, 1, 16), torch.tensor([0]))
    prog = helix_compile(model, devices=2, example_inputs=args, plan=(1, 2), dynamic=False)
    assert len(prog.plan.sites) == 1 and not prog.unpartitioned
    modules = []
    for r in range(2):
        gm = prog.rank_module(r)
        for k, (lo, hi) in enumerate(chunk_bounds(8, 2)):
            caches = {a: getattr(gm, a).narrow(2, lo, hi - lo).clone() for a in cache_writes(gm)}
            modules.append(split_sequence(gm, args, k, mesh, caches))
    # positions 0 .. 3: chunk 1 is all -inf (future); 4, 5: both chunks hold keys
    for p in range(6):
        x, pos = torch.randn(2, 1, 16), torch.tensor([p])
        with torch.no_grad():
            want = ref(x, pos)
        outs = run_ranks(modules, mesh, (x, pos), {})
        assert_ranks_equal(outs, want, devices=4, label=f"norm={norm} position {p}")
        assert not any(o.isnan().any() for o in outs)
    for rank, gm in enumerate(modules):
        (site,) = gm.meta["seq_combine"]
        if norm:   # rsqrt(mean(out^2)) is not linear in the partial output: one more "seq" sum
            assert site.form == "unfolded" and "is not linear in it" in site.detail, site
            assert _collectives(gm) == {"all_gather:seq": 1, "all_reduce:seq:sum": 1,
                                        "all_reduce:head:sum": 1}, rank
        else:      # the bias rides in chunk 0's partial only, as the mesh sum holds it once
            assert site.form == "folded", site
            # head group 0 holds input feature 0, so its bias: dropped on its chunk 1, rank 1
            assert ("on chunk 0 only" in site.detail) == (rank == 1), (rank, site)
            assert _collectives(gm) == {"all_gather:seq": 1, "all_reduce:mesh:sum": 1}, rank


@pytest.mark.slow
def test_hf_llama_with_attention_bias_folds_the_combine_and_equals_unsharded():
    # LLaMA's attention_bias=True gives o_proj a bias: with s = 2 it rides in chunk 0 only
    model, ref = (hf_llama_decoder("sdpa", 2, 3, 24, attention_bias=True) for _ in range(2))
    assert model.model.model.layers[0].self_attn.o_proj.bias is not None
    tokens, valid = padded_prompt(3, 24, 10)
    prog = compile_decoder(model, DEVICES, (2, 1, 2), prompt_len=10)
    assert len(prog.combine_notes) == 4 and all(": folded (" in note for note in prog.combine_notes)
    for r in range(DEVICES):
        assert _collectives(prog.modules[r][1]) == {"all_gather:seq": 2, "all_reduce:mesh:sum": 4}, r
    assert_decode_equal(prog, ref, tokens, valid, range(10, 13), devices=DEVICES, label="hf llama bias s=2")


@pytest.mark.parametrize("split", [(2, 1, 2), (2, 2, 1), (4, 1, 1), (1, 1, 4)], ids=str)
def test_decode_cost_prices_the_built_combine_collectives(split):
    shape = DecodeShape(name="hand", layers=2, hidden=64, heads=8, kv_heads=2, head_dim=16,
                        ffn=128, dtype="fp16")
    s, m, n = split
    got = cost_decode(shape, 32, 4, split, HAND)
    comm = [(name, ms) for name, ms in got.terms if "all-reduce" in name or "all-gather" in name]
    names = [name for name, _ in comm]
    want = (["score all-reduce (m-group)"] if m > 1 else [])
    if s > 1:   # equal chunks, one q @ k^T (m = 1): the fused chunk core, its lse gathered
        want.append("row lse all-gather (s-group)" if m == 1 else "row max and sum all-gather (s-group)")
    want.append("partial-output all-reduce (s-group)" if s > 1 and m * n == 1 else "output all-reduce")
    assert names == want + ["MLP all-reduce"], names
    t = dict(comm)
    if s > 1 and m * n > 1:   # the output all-reduce spans the mesh, as the MLP's: same bytes, same time
        assert t["output all-reduce"] == pytest.approx(t["MLP all-reduce"], rel=1e-12)
    if s == 1:                # over the m n = 4 ranks of the one chunk: the mesh too
        assert t["output all-reduce"] == pytest.approx(t["MLP all-reduce"], rel=1e-12)
    # bytes on the wire per step: the gathered fp32 (max, sum) (m = 1: lse) of the s chunks, w B D per
    # output / MLP all-reduce, the score all-reduce's 4 B h C/s (m > 1); m n = 1: w B h d
    h, w, B, L = 8 // n, 2, 4, 2
    per_layer = (4 * (1 if m == 1 else 2) * B * h * s if s > 1 else 0) + w * B * 64 \
        + (w * B * h * 16 // m if s > 1 and m * n == 1 else w * B * 64) + (4 * B * h * 32 // s if m > 1 else 0)
    assert got.comm_bytes_per_step == L * per_layer
