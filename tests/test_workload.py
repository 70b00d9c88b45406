"""passes/workload.py: the ops outside projections and cores, read from the graph, and how the
cost model divides them over ranks; the profile's mask / narrow-V / score-GEMM rows."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helix_compiler.planning.cluster import load_cluster
from helix_compiler.planning.cost import cost_baseline, cost_plan, fused_takes, mask_kind
from helix_compiler.pipeline import analyze
from helix_compiler.planning.profile import DEFAULT_PROFILE, Rate, profile_from_yaml
from passes.kernel_choice import apply_kernel_choice, fused_kernel_exists
from tests.models import zoo

NODE = load_cluster("h100x8")
B, S, D, H = 2, 16, 32, 4


class Block(nn.Module):
    """x + o(softmax(q k^T / sqrt(d)) v); then x + mlp(ln(x)): every op outside the projections
    and the core is known (an explicit core: its output's layout is (B, H, S, d))."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.q, self.k, self.v = (nn.Linear(D, D, bias=bias) for _ in range(3))
        self.o = nn.Linear(D, D, bias=bias)
        self.up, self.down = nn.Linear(D, 4 * D, bias=bias), nn.Linear(4 * D, D, bias=bias)

    def forward(self, x):
        b, s, _ = x.shape
        h = self.ln1(x)
        q, k, v = (p(h).view(b, s, H, D // H).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = torch.softmax(q @ k.transpose(-2, -1) / (D // H) ** 0.5, dim=-1) @ v
        x = x + self.o(y.transpose(1, 2).reshape(b, s, D))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


def _summary(model, *args, **kwargs):
    with torch.no_grad():
        return analyze(model.eval(), args, kwargs).summary


def test_a_block_counts_its_norms_residuals_and_output_copy_by_hand():
    s = _summary(Block(), torch.randn(B, S, D))
    wl, bsd = s.workload, S * D * 4          # fp32 bytes of one (S, D) tensor, per sequence
    # two residual adds (read 2, write 1); two layer norms (read x, write y, and their weight
    # and bias), priced apart at the norm rate
    assert wl.replicated_bytes == pytest.approx(2 * 3 * bsd)
    assert wl.replicated_norm_bytes == pytest.approx(2 * 2 * bsd + 2 * 2 * D * 4 / B)
    # the core's output (B, H, S, d) -> transpose -> reshape copies it: read and write
    assert wl.q_head_bytes == pytest.approx(2 * bsd)
    assert wl.kv_head_bytes == 0 and wl.mask_bytes == 0 and wl.replicated_flops == 0
    # before the first all-reduced output (o) only ln1 runs: sequence-parallel norms leave it
    # whole; the residual adds come after o
    assert wl.leading_norm_bytes == pytest.approx(2 * bsd + 2 * D * 4 / B)
    assert wl.leading_replicated_bytes == 0


def test_a_summary_without_a_graph_says_how_its_norms_are_priced():
    s = _summary(Block(bias=False), torch.randn(B, S, D))
    hand = dataclasses.replace(s, workload=None)
    assert any("no graph behind this summary" in n for n in cost_plan(hand, 1, 4, NODE).notes)
    assert not any("no graph" in n for n in cost_plan(s, 1, 4, NODE).notes)


def test_hf_llama_reads_rotary_repeat_kv_and_prices_its_mask():
    model, args, kwargs = zoo("llama").build()
    s = _summary(model, *args, **kwargs)
    wl = s.workload
    assert wl.q_head_bytes > 0 and wl.kv_head_bytes > 0     # rotary on q and k, repeat_kv
    assert wl.replicated_flops > 0                           # the LM head is no site's or MLP's
    # export materializes the causal mask; it is SDPA's causal one, so never built
    assert wl.mask_bytes == 0 and all(x.mask_causal for x in s.sites)
    # the same mask, were it not causal: built every step and read by the core
    from passes.workload import measure

    with torch.no_grad():
        a = analyze(*(lambda m, ar, kw: (m.eval(), ar, kw))(model, args, kwargs))
    plain = [dataclasses.replace(m, site=dataclasses.replace(m.site, mask_causal=False))
             for m in a.matches]
    assert measure(a.captured.gm, plain, a.mlps, s.batch).mask_bytes > 0


def test_replicated_ops_cost_the_same_on_every_split_and_head_ops_divide():
    s = _summary(Block(), torch.randn(B, S, D))
    s = dataclasses.replace(s, batch=4096)
    graph = {}
    for m, n in ((1, 1), (1, 4), (2, 2), (4, 1)):
        terms = dict(cost_plan(s, m, n, NODE).graph[0].terms)
        graph[m, n] = terms
    rep = "replicated ops (residuals, casts, mask)"
    head = "head-path ops (rotary, repeat_kv, copies)"
    assert len({round(t[rep], 9) for t in graph.values()}) == 1
    assert graph[1, 4][head] == pytest.approx(graph[1, 1][head] / 4, rel=1e-6)
    assert graph[2, 2][head] == pytest.approx(graph[1, 4][head], rel=1e-6)
    # TP=4 pays the same replicated ops as helix m=1 x n=4
    tp = dict(cost_baseline(s, 4, 1, NODE).graph[0].terms)
    assert tp[rep] == pytest.approx(graph[1, 4][rep])


def test_op_costs_views_are_free_copies_are_not():
    from passes.workload import op_cost

    class M(nn.Module):
        def forward(self, x, ids, table):
            a = x.reshape(-1)                    # contiguous: a view
            b = x.transpose(0, 1).reshape(-1)    # transposed: a copy
            c = x.to(torch.float32)              # same dtype: no copy
            e = F.embedding(ids, table)          # reads the rows it gathers
            return a, b, c, e

    ep = torch.export.export(M(), (torch.randn(8, 4), torch.zeros(3, dtype=torch.long),
                                   torch.randn(1000, 4)))
    calls = [n for n in ep.graph.nodes if n.op == "call_function"]
    by_input = {}
    for n in calls:
        kind, _, moved = op_cost(n)
        by_input.setdefault(str(n.target).split(".")[1], []).append((kind, moved))
    # the contiguous reshape is free, the transposed one copies (read and write 8 x 4 floats)
    shapes = sorted(by_input.get("view", []) + by_input.get("reshape", []) +
                    by_input.get("clone", []), key=lambda c: c[0])
    assert [k for k, _ in shapes] == ["free", "memory"]
    assert sum(b for _, b in shapes[1][1]) == 2 * 8 * 4 * 4
    assert by_input["_to_copy" if "_to_copy" in by_input else "to"][0][0] == "free"
    kind, moved = by_input["embedding"][0]
    assert kind == "memory" and sum(b for _, b in moved) < 1000 * 4 * 4


def test_mask_kinds_and_the_fused_kernels_that_take_them():
    model, args, kwargs = zoo("llama").build()
    site = _summary(model, *args, **kwargs).sites[0]
    assert mask_kind(site) == "causal"                      # its mask is SDPA's causal one
    assert mask_kind(dataclasses.replace(site, mask_causal=False)) == "tensor"
    assert mask_kind(dataclasses.replace(site, mask=None, is_causal=True)) == "causal"
    assert mask_kind(dataclasses.replace(site, mask=None, is_causal=False, mask_causal=False)) == "none"
    assert fused_takes("cudnn", 128, 16) and not fused_takes("cudnn", 128, 4)
    assert not fused_takes("flash", 128, 64) and fused_takes("flash", 64, 64)
    assert DEFAULT_PROFILE.attention_efficiency("flash", 128, "fp16", "tensor") is None


def _with_rows(*rows: Rate):
    return dataclasses.replace(DEFAULT_PROFILE, rates=DEFAULT_PROFILE.rates + rows)


def test_attention_rows_are_read_by_mask_then_nearest_value_dim():
    prof = _with_rows(
        Rate(op="attention", backend="cudnn", shape=(2, 100, 100, 128), dtype="fp16",
             tflops=400.0),
        Rate(op="attention", backend="cudnn", shape=(2, 100, 100, 128), dtype="fp16",
             tflops=300.0, mask="tensor"),
        Rate(op="attention", backend="cudnn", shape=(2, 100, 100, 128), dtype="fp16",
             tflops=100.0, mask="tensor", value_dim=16))
    peak = DEFAULT_PROFILE.peak("fp16")
    assert prof.attention_efficiency("cudnn", 128, "fp16") == pytest.approx(400 / peak)
    assert prof.attention_efficiency("cudnn", 128, "fp16", "tensor") == pytest.approx(300 / peak)
    assert prof.attention_efficiency("cudnn", 128, "fp16", "tensor", 8) == pytest.approx(100 / peak)
    # no causal row: the unmasked one answers
    assert prof.attention_efficiency("cudnn", 128, "fp16", "causal") == pytest.approx(400 / peak)
    # the rows survive the YAML round trip
    assert profile_from_yaml(prof.to_yaml()) == prof
    with pytest.raises(Exception, match="mask must be one of"):
        Rate(op="attention", backend="cudnn", shape=(1, 2, 2, 8), dtype="fp16", tflops=1.0,
             mask="sliding")


def test_score_gemm_rows_price_an_explicit_core():
    one = _summary(Block(), torch.randn(B, S, D))
    slow = _with_rows(Rate(op="qk_gemm", shape=(1, 100, 100, 8), dtype="fp16", tflops=1.0),
                      Rate(op="pv_gemm", shape=(1, 100, 100, 8), dtype="fp16", tflops=1.0))
    big = dataclasses.replace(one, batch=1 << 14)
    base = cost_plan(big, 2, 2, NODE, variant="score-reduce").sites[0]
    slowed = cost_plan(big, 2, 2, NODE, slow, variant="score-reduce").sites[0]
    assert dict(slowed.terms)["PV"] > dict(base.terms)["PV"]
    assert dict(slowed.terms)["QK^T over d/m"] > dict(base.terms)["QK^T over d/m"]


def test_a_v_slice_no_fused_kernel_takes_is_rewritten_to_the_chunked_core():
    assert fused_kernel_exists(128, 16) and not fused_kernel_exists(128, 4)
    assert not fused_kernel_exists(512, 512)

    class Core(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    q, k = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    for d_v, rewritten in ((4, True), (8, False)):
        v = torch.randn(1, 2, 8, d_v)
        gm = torch.export.export(Core(), (q, k, v)).module()
        ref = gm(q, k, v)
        apply_kernel_choice(gm)
        assert bool(gm.meta["kernel_choice"]) is rewritten
        assert torch.allclose(gm(q, k, v), ref, atol=1e-6)


def test_a_row_sharded_bias_rides_in_one_partial_per_reduction_group():
    from helix_compiler import helix_compile
    from tests.helpers import assert_ranks_equal, eager_output

    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(B, S, D)
    prog = None
    for m, n in ((1, 4), (2, 2), (4, 1)):
        variant = "score-reduce" if m > 1 else None
        prog = helix_compile(model, m * n, (x,), plan=(m, n), variant=variant) if prog is None \
            else prog.recompile(plan=(m, n), variant=variant)
        holders = []
        for r in range(m * n):
            gm = prog.rank_module(r)
            calls = [nd for nd in gm.graph.nodes if nd.op == "call_function"]
            # no bias add waits for a reduction: every add reads two activations
            for nd in calls:
                if "all_reduce" in str(nd.target):
                    assert not any("add" in str(u.target) and any(
                        a.op == "get_attr" for a in u.all_input_nodes) for u in nd.users)
            holders.append(sum(1 for nd in calls if "linear" in str(nd.target) and len(nd.args) > 2
                               and nd.args[2] is not None and "o_bias" in str(nd.args[2].target)))
        assert sum(holders) == 1        # the output projection's bias: one rank of the one group
        assert_ranks_equal(prog.simulate(x), eager_output(model, (x,), {}), devices=m * n,
                           label=f"m={m} n={n}")


# --- passes/size_masks.py ------------------------------------------------------------
def test_hf_causal_mask_is_dropped_for_is_causal_and_priced_as_never_built():
    from helix_compiler import helix_compile
    from helix_compiler.runtime import masks
    from tests.helpers import assert_ranks_equal, eager_output

    model, args, kwargs = zoo("llama").build()
    prog = helix_compile(model, 4, args, kwargs, plan=(1, 4))
    assert all(s.mask is not None and s.mask_causal for s in prog.analysis.summary.sites)
    assert prog.analysis.summary.workload.mask_bytes == 0
    gm = prog.rank_module(0)
    assert len(gm.meta["size_masks"]) == 2                  # both layers' cores
    ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert not any(o in ops for o in ("aten.le.Tensor", "aten.eq.Tensor"))   # no mask built
    masks._CAUSAL.clear()
    assert_ranks_equal(prog.simulate(*args, **kwargs), eager_output(model, args, kwargs),
                       devices=4)
    assert list(masks._CAUSAL.values()) == [True]


def test_a_mask_that_is_not_causal_is_built_every_call_and_one_that_reads_inputs_is_left():
    from helix_compiler.runtime import masks
    from passes.size_masks import apply_size_masks

    class Window(nn.Module):             # causal within a window of 3: not SDPA's causal mask
        def forward(self, q, k, v, pad):
            s = q.shape[-2]
            i = torch.arange(s).unsqueeze(-1)
            j = torch.arange(s).unsqueeze(0)
            keep = (j <= i) & (j > i - 3)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
            return a + F.scaled_dot_product_attention(q, k, v, attn_mask=pad.bool())

    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    pad = torch.ones(1, 1, 6, 6)
    gm = torch.export.export(Window(), (q, k, v, pad)).module()
    ref = gm(q, k, v, pad)
    apply_size_masks(gm)
    assert len(gm.meta["size_masks"]) == 1          # the padding mask reads an input: left
    masks._CAUSAL.clear()
    for _ in range(2):
        assert torch.allclose(gm(q, k, v, pad), ref, atol=1e-6)
    assert list(masks._CAUSAL.values()) == [False]
    window = torch.tensor([[True, False], [True, True]])
    assert masks.is_sdpa_causal(torch.ones(3, 3, dtype=torch.bool).tril())
    assert not masks.is_sdpa_causal(window.T) and masks.is_sdpa_causal(window)
    inf = torch.zeros(2, 2).masked_fill(~window, float("-inf"))
    assert masks.is_sdpa_causal(inf) and not masks.is_sdpa_causal(inf.masked_fill(window, 1.0))


def test_a_program_with_a_size_mask_saves_and_loads(tmp_path):
    from helix_compiler import helix_compile
    from helix_compiler.program import load_rank_module

    model, args, kwargs = zoo("llama").build()
    prog = helix_compile(model, 2, args, kwargs, plan=(1, 2))
    prog.save(tmp_path)
    from helix_compiler.program import run_ranks
    from tests.helpers import eager_output

    loaded = [load_rank_module(tmp_path, r) for r in range(2)]
    assert all("size_mask" in x.gm.code for x in loaded)
    import torch.utils._pytree as pytree

    from tests.helpers import assert_leaves_equal

    want = pytree.tree_leaves(eager_output(model, args, kwargs))
    for r, out in enumerate(run_ranks(loaded, prog.mesh, args, kwargs)):
        assert_leaves_equal(pytree.tree_leaves(out), want, label=f"loaded rank {r}")


def test_a_mask_changed_in_place_after_it_is_built_is_left_alone():
    from passes.size_masks import apply_size_masks

    class Pad(nn.Module):
        def forward(self, q, k, v):
            b, _, s, _ = q.shape
            keep = torch.ones(b, 1, s, s, dtype=torch.bool)
            keep[:, :, :, -1] = False                      # written through a view
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
    gm = torch.export.export(Pad(), (q, k, v)).module()
    ref = gm(q, k, v)
    apply_size_masks(gm)
    assert gm.meta["size_masks"] == []
    assert torch.allclose(gm(q, k, v), ref)


def test_memory_rates_are_read_by_row_width_and_fall_back_by_class():
    peak = DEFAULT_PROFILE.hbm_gb_s
    assert DEFAULT_PROFILE.bandwidth_efficiency("pointwise") == pytest.approx(
        DEFAULT_PROFILE.elementwise_gb_s / peak)
    assert DEFAULT_PROFILE.bandwidth_efficiency("masked_softmax", 8192) == pytest.approx(
        DEFAULT_PROFILE.softmax_gb_s / peak)
    prof = _with_rows(Rate(op="softmax", shape=(1024, 10000), dtype="fp16", gb_s=1100.0),
                      Rate(op="softmax", shape=(10000, 10000), dtype="fp16", gb_s=1700.0),
                      Rate(op="softmax", shape=(16384, 8192), dtype="fp16", gb_s=1000.0))
    assert prof.bandwidth_efficiency("softmax", 8192) == pytest.approx(1000 / peak)
    # of equal widths, the largest block: a whole head of scores
    assert prof.bandwidth_efficiency("softmax", 10000) == pytest.approx(1700 / peak)
    assert prof.bandwidth_efficiency("masked_softmax", 9800) == pytest.approx(1700 / peak)
    assert profile_from_yaml(prof.to_yaml()) == prof
    with pytest.raises(Exception, match="gb_s must be positive"):
        Rate(op="softmax", shape=(2, 2), dtype="fp16", tflops=1.0)
