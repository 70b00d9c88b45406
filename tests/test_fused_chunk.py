"""The fused s > 1 chunk core (issue #15; docs/decode.md, "The fused chunk core"):
passes/seq_split.py runs each plain chunk core softmax(q @ k^T * scale + masks) @ v as
helix.chunk_attention -> (out, lse) and combines the chunks by one all-gather of lse over "seq",
when the chunks are of equal size; with unequal chunks (S_max % s != 0) it keeps the explicit
core, whose (max, sum) combine stays exact for a fully padded row.

HF LLaMA GQA (eager and sdpa) at s = 2 and 4 with a left-padded and a fully padded row: every
rank equals the model, the op is in every rank graph, reading the cache un-repeated. The op's
CPU math equals the softmax on a finfo.min-masked, a fully masked and a -inf row.
"""

from __future__ import annotations

import pytest
import torch

from helix_compiler.decode import compile_decoder
from helix_compiler.runtime.chunk_core import chunk_attention_math

from tests.helpers import assert_decode_equal, hf_llama_decoder, padded_prompt

OP = torch.ops.helix.chunk_attention.default
DEVICES = 4


def _ops(prog, target) -> list:
    return [sum(nd.target is target for nd in gm.graph.nodes)
            for pair in prog.modules for gm in pair]


def test_op_math_equals_softmax_on_padded_fully_masked_and_inf_rows():
    # q (B 2, H 4, T 3, d 8) over k, v (B 2, H_kv 2, C 6): g = 2, head h reads kv head h // 2
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 3, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g),
               torch.randn(2, 2, 6, 5, generator=g))
    low = torch.finfo(torch.float32).min
    bias = torch.zeros(2, 1, 3, 6)
    bias[0, 0, 0, :4] = low                  # left-padded row
    bias[0, 0, 1, :] = low                   # fully masked by finfo.min: a uniform softmax
    bias[1, 0, 0, :] = float("-inf")         # no visible key: out 0, lse -inf
    bias[1, 0, 1, 2:] = float("-inf")
    out, lse = OP(q, k, v, bias, 0.3)
    assert torch.equal(out, chunk_attention_math(q, k, v, bias, 0.3)[0])
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    # finite masks below -1e30 taken as -1e30 (the op's floor): the same softmax, lse -1e30 + log C
    x = q @ kr.transpose(-2, -1) * 0.3 + bias.masked_fill(bias == low, -1e30)
    want = torch.softmax(x, -1) @ vr
    live = torch.ones(2, 4, 3, dtype=torch.bool)
    live[1, :, 0] = False
    assert torch.allclose(out[live], want[live], rtol=1e-5, atol=1e-6)
    assert torch.allclose(out[0, :, 1], vr[0].mean(-2), rtol=1e-5, atol=1e-6)   # uniform
    unfloored = torch.softmax(q @ kr.transpose(-2, -1) * 0.3 + bias, -1) @ vr
    assert torch.allclose(unfloored[live], want[live], rtol=1e-5, atol=1e-6)   # the floor changes no output
    assert torch.equal(out[~live], torch.zeros_like(out[~live]))
    assert torch.allclose(lse[live], torch.logsumexp(x, -1)[live], rtol=1e-6)
    assert (lse[1, :, 0] == float("-inf")).all() and not out.isnan().any()


@pytest.mark.slow
# one pairing here: test_gqa_fold and test_decode_sdpa run the others (eager (2, 1, 2), sdpa
# (4, 1, 1), (2, 1, 2)) through the same fused core, which compile_decoder builds by default
@pytest.mark.parametrize("impl, split", [("eager", (4, 1, 1))], ids=str)
def test_hf_llama_gqa_fused_chunk_core_every_rank_equals_unsharded(impl, split):
    # H 4 over H_kv 2, S_max 24: equal chunks of 12 (s = 2) or 6 (s = 4); batch 3, row 1
    # left-padded by 3, row 2 all padding; steps 10 .. 13 cross chunk boundaries
    model, ref = hf_llama_decoder(impl, 2, 3, 24), hf_llama_decoder(impl, 2, 3, 24)
    tokens, valid = padded_prompt(3, 24, 10)
    prog = compile_decoder(model, DEVICES, split, prompt_len=10)
    label = f"hf {impl} s,m,n={split}"
    assert len(prog.combine_notes) == 4 and all("; fused core (helix.chunk_attention" in x
                                                for x in prog.combine_notes), prog.combine_notes
    assert all(": folded (K and V read un-repeated, g=2" in x for x in prog.fold_notes), prog.fold_notes
    assert _ops(prog, OP) == [2] * 2 * DEVICES, label          # one op per layer, every rank graph
    assert _ops(prog, torch.ops.aten._safe_softmax.default) == [0] * 2 * DEVICES
    assert_decode_equal(prog, ref, tokens, valid, range(10, 14), devices=DEVICES, label=label)


@pytest.mark.slow
def test_score_reduce_step_keeps_the_explicit_core_and_says_why():
    # m = 2: the step's scores are an all-reduce of partial q k^T over "dim" (score-reduce), not
    # one q @ k^T: its core stays explicit; the prefill's (qk-gather: K gathered) is fused
    model, ref = hf_llama_decoder("sdpa", 2, 3, 24), hf_llama_decoder("sdpa", 2, 3, 24)
    tokens, valid = padded_prompt(3, 24, 10)
    prog = compile_decoder(model, DEVICES, (2, 2, 1), prompt_len=10)
    pre, step = prog.combine_notes[:2], prog.combine_notes[2:]
    assert all("; fused core (" in x for x in pre), pre
    assert all("; explicit core (the scores of _safe_softmax" in x and "are not q @ k^T" in x
               for x in step), step
    assert_decode_equal(prog, ref, tokens, valid, range(10, 12), devices=DEVICES, label="sdpa m=2")


@pytest.mark.slow
@pytest.mark.parametrize("impl, max_seq, fuse", [("eager", 25, True), ("sdpa", 24, False)],
                         ids=["unequal", "fuse-off"])
def test_unequal_chunks_keep_the_explicit_core_and_equal_unsharded(impl, max_seq, fuse):
    # S_max 25 over s = 2: chunks of 13 and 12; eager's finfo.min mask makes the fully padded
    # row's lse finfo.min in both chunks (log C lost), which would weigh the chunks 1 : 1
    # instead of 13 : 12 (relative error 3.6e-3 measured when forced), so the explicit (max,
    # sum) core stays
    model, ref = hf_llama_decoder(impl, 2, 3, max_seq), hf_llama_decoder(impl, 2, 3, max_seq)
    tokens, valid = padded_prompt(3, max_seq, 10)
    prog = compile_decoder(model, 2, (2, 1, 1), prompt_len=10, fuse_chunk_core=fuse)
    why = "chunks of unequal size (25 positions over s=2: [12, 13])" if fuse else "fuse=False"
    assert all(f"; explicit core ({why}" in x for x in prog.combine_notes), prog.combine_notes
    assert _ops(prog, OP) == [0] * 4
    assert_decode_equal(prog, ref, tokens, valid, range(10, 14), devices=2, label=f"S_max {max_seq}")
