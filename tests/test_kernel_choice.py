"""passes/kernel_choice.py: the rewritten rank graph computes what the original did (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from examples.paper_model import PaperConfig, build
from helix_compiler import helix_compile
from helix_compiler.runtime.kernels_chunked import blocks
from helix_compiler.numerics import relative_error
from helix_compiler.program import run_ranks
from passes.kernel_choice import apply_kernel_choice

TOL = 1e-5


_rel = relative_error


def _ops(gm) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_chunked_attention_matches_sdpa(causal, mask):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 37, 16, generator=g)
    k = torch.randn(2, 4, 29, 16, generator=g)
    v = torch.randn(2, 4, 29, 8, generator=g)
    m = None
    if mask == "bool":
        m = torch.rand(2, 1, 37, 29, generator=g) > 0.3
        m[..., 0] = True                     # no fully masked rows
    elif mask == "float":
        m = torch.randn(37, 29, generator=g)
    if causal and m is not None:
        pytest.skip("SDPA takes a mask or is_causal, not both")
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal)
    # a chunk of one row quantum (128 rows) with s_q = 37 is a single block: force several blocks
    for chunk_bytes in (1, 2 ** 30):
        out = torch.ops.helix.chunked_attention(q, k, v, m, causal, None, chunk_bytes, 0)
        assert _rel(out, ref) < TOL


def test_chunked_attention_several_blocks_and_gqa():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 8, 300, 32, generator=g)       # 300 rows: blocks of 128, 128, 44
    k = torch.randn(1, 2, 300, 32, generator=g)       # GQA: 2 kv heads for 8 query heads
    v = torch.randn(1, 2, 300, 32, generator=g)
    assert [b[2:] for b in blocks(8, 300, 4, 300, 1)][:3] == [(0, 128), (128, 256), (256, 300)]
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out = torch.ops.helix.chunked_attention(q, k, v, None, True, None, 1, 0)
    assert _rel(out, ref) < TOL
    # min_head_dim >= d: the op hands the core to SDPA
    out = torch.ops.helix.chunked_attention(q, k, v, None, True, None, 1, 32)
    assert _rel(out, ref) < TOL


@pytest.mark.parametrize("chunk_bytes", [1, 300 * 300 * 4, 2 * 300 * 300 * 4 + 5, 2 ** 30])
def test_head_blocks_with_a_per_head_mask(chunk_bytes):
    """Blocks of 1, 2 or all heads, or row blocks; a mask that differs per batch and head."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, 300, 16, generator=g) for _ in range(3))
    mask = torch.rand(2, 3, 300, 300, generator=g) > 0.3
    mask[..., 0] = True
    covered = sorted((h0, r0) for h0, h1, r0, r1 in blocks(6, 300, 300, 4, chunk_bytes))
    assert covered[0] == (0, 0)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = torch.ops.helix.chunked_attention(q, k, v, mask, False, None, chunk_bytes, 0)
    assert _rel(out, ref) < TOL
    s = torch.randn(2, 3, 300, 300, generator=g)
    ref = torch.ops.helix.attend(s, v, mask, False, 0.2)
    assert _rel(torch.ops.helix.chunked_attend(s, v, mask, False, 0.2, chunk_bytes), ref) < TOL


def test_chunked_attend_matches_attend():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, 260, 50, generator=g)
    v = torch.randn(2, 3, 50, 8, generator=g)
    mask = torch.rand(260, 50, generator=g) > 0.2
    mask[:, 0] = True
    for m, causal in ((None, False), (None, True), (mask, False)):
        ref = torch.ops.helix.attend(s, v, m, causal, 0.3)
        out = torch.ops.helix.chunked_attend(s, v, m, causal, 0.3, 1)
        assert _rel(out, ref) < TOL


def _program(plan, variant, head_dim=32):
    cfg = PaperConfig(heads=4, head_dim=head_dim, mlp=64, batch=2, seq=130, dtype=torch.float32)
    model, (x,) = build(cfg, "cpu")
    prog = helix_compile(model, 4, (x,), plan=plan, variant=variant, cluster="paper")
    return prog, x


@pytest.mark.parametrize("plan,variant,rewritten", [
    ((1, 4), None, "helix.chunked_attention"),
    ((2, 2), "qk-gather", "helix.chunked_attention"),
    ((2, 2), "score-reduce", "helix.chunked_attend"),
])
@pytest.mark.parametrize("with_shapes", [False, True])
def test_rank_graphs_equal_after_kernel_choice(plan, variant, rewritten, with_shapes):
    prog, x = _program(plan, variant)
    before = [prog.rank_module(r) for r in range(prog.devices)]
    ref = run_ranks(before, prog.mesh, (x,), {})
    after = []
    for gm in before:
        gm2 = torch.fx.GraphModule(gm, gm.graph.__deepcopy__(), class_name="Rewritten")
        gm2 = apply_kernel_choice(gm2, head_dim_threshold=16, chunk_bytes=1,
                                  example_inputs=(x,) if with_shapes else None)
        assert any(rewritten in t for t in _ops(gm2)), gm2.code
        assert not any("scaled_dot_product_attention" in t or t == "helix.attend.default"
                       for t in _ops(gm2))
        after.append(gm2)
    out = run_ranks(after, prog.mesh, (x,), {})
    for a, b in zip(out, ref):
        assert _rel(a, b) < TOL
    # and the program still equals the unsharded model
    assert _rel(out[0], prog.reference(x)) < 1e-4


def test_threshold_leaves_small_head_dims_alone():
    prog, x = _program((1, 4), None, head_dim=16)
    gm = prog.rank_module(0)
    gm2 = torch.fx.GraphModule(gm, gm.graph.__deepcopy__(), class_name="Rewritten")
    apply_kernel_choice(gm2, head_dim_threshold=16, example_inputs=(x,))
    assert gm2.meta["kernel_choice"] == []
    assert any("scaled_dot_product_attention" in t for t in _ops(gm2))
