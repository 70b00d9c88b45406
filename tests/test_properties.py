"""Property-based tests: random attention shapes, device counts, batch / sequence sizes and masks.

Every compiled program equals the unsharded model (float32, <= 1e-5) or is refused with a
HelixError; the solver never returns an infeasible split and never misses a feasible one.
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helix_compiler import HelixError, helix_compile
from helix_compiler.planning.solver import solve
from tests.helpers import assert_ranks_equal

MASKS = ("none", "causal", "padding", "head_bias")


class GeneratedAttention(nn.Module):
    """One pre-norm block: attention with H heads, H_kv kv heads, head dim d, and an MLP."""

    def __init__(self, H: int, H_kv: int, d: int, mask: str, explicit: bool):
        super().__init__()
        self.H, self.H_kv, self.d, self.mask, self.explicit = H, H_kv, d, mask, explicit
        D = H * d
        self.norm = nn.LayerNorm(D)
        self.q = nn.Linear(D, H * d)
        self.k = nn.Linear(D, H_kv * d)
        self.v = nn.Linear(D, H_kv * d)
        self.o = nn.Linear(H * d, D)
        self.up = nn.Linear(D, 2 * D)
        self.down = nn.Linear(2 * D, D)
        self.bias = nn.Parameter(torch.randn(H, 1, 1) * 0.1)  # a per-head bias, ALiBi-like

    def forward(self, x):
        B, S, _ = x.shape
        h = self.norm(x)
        q = self.q(h).view(B, S, self.H, self.d).transpose(1, 2)       # (B, H, S, d)
        k = self.k(h).view(B, S, self.H_kv, self.d).transpose(1, 2)    # (B, H_kv, S, d)
        v = self.v(h).view(B, S, self.H_kv, self.d).transpose(1, 2)
        rep = self.H // self.H_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        mask = None
        if self.mask == "padding":
            keep = torch.ones(B, 1, S, S, dtype=torch.bool)
            keep[:, :, :, -1] = False
            mask = keep
        elif self.mask == "head_bias":
            mask = self.bias.expand(self.H, S, S).unsqueeze(0)          # (1, H, S, S)
        causal = self.mask == "causal"
        if self.explicit:
            s = q @ k.transpose(-2, -1) / math.sqrt(self.d)
            if causal:
                s = s.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
            elif mask is not None:
                s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
            y = s.softmax(-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        x = x + self.o(y.transpose(1, 2).reshape(B, S, self.H * self.d))
        return x + self.down(F.gelu(self.up(self.norm(x))))


@st.composite
def cases(draw):
    H_kv = draw(st.sampled_from([1, 2, 4]))
    H = H_kv * draw(st.sampled_from([1, 2, 3]))
    d = draw(st.sampled_from([2, 4, 6, 8]))
    return dict(H=H, H_kv=H_kv, d=d, mask=draw(st.sampled_from(MASKS)), explicit=draw(st.booleans()),
                devices=draw(st.sampled_from([1, 2, 3, 4, 6, 8])), batch=draw(st.integers(2, 3)),
                seq=draw(st.integers(2, 6)), batch2=draw(st.integers(2, 4)), seq2=draw(st.integers(2, 7)),
                split=draw(st.integers(0, 7)), variant=draw(st.sampled_from([None, "score-reduce", "qk-gather"])))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_compiled_program_equals_model_or_is_refused(c):
    torch.manual_seed(0)
    model = GeneratedAttention(c["H"], c["H_kv"], c["d"], c["mask"], c["explicit"]).eval()
    x = torch.randn(c["batch"], c["seq"], c["H"] * c["d"])
    splits = [(m, c["devices"] // m) for m in range(1, c["devices"] + 1) if c["devices"] % m == 0]
    plan = splits[c["split"] % len(splits)]
    if not _feasible_by_hand(c["H"], c["H_kv"], c["d"], *plan):
        with pytest.raises(HelixError, match="infeasible"):
            helix_compile(model, devices=c["devices"], example_inputs=(x,), plan=plan, variant=c["variant"])
        return
    prog = helix_compile(model, devices=c["devices"], example_inputs=(x,), plan=plan, variant=c["variant"])
    assert not prog.replicated_ops  # every op of the generated model has a sharding rule
    with torch.no_grad():
        assert_ranks_equal(prog.simulate(x), model(x), devices=c["devices"])
        if prog.analysis.captured.dynamic:  # another batch and sequence size, same program
            x2 = torch.randn(c["batch2"], c["seq2"], c["H"] * c["d"])
            assert_ranks_equal(prog.simulate(x2), model(x2), devices=c["devices"])


def _feasible_by_hand(H, H_kv, d, m, n):
    """DESIGN.md section 2, written independently of the solver."""
    kv_ok = (H_kv % n == 0) if n <= H_kv else (n % H_kv == 0)
    return H % n == 0 and d % m == 0 and kv_ok


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([1, 2, 4, 8]), st.sampled_from([1, 2, 3, 4, 6]), st.sampled_from([2, 4, 6, 8, 12]),
       st.integers(1, 24))
def test_solver_returns_exactly_the_feasible_splits(H_kv, rep, d, devices):
    from helix_compiler.planning.sites import AttentionSite, ModelSummary

    H = H_kv * rep
    site = AttentionSite(index=0, q_proj="q", k_proj="k", v_proj="v", o_proj="o", q_weight="q.w",
                         k_weight="k.w", v_weight="v.w", o_weight="o.w", fused_qkv=False, num_heads=H,
                         num_kv_heads=H_kv, head_dim=d, embed_dim=H * d, core="sdpa", core_nodes=("s",),
                         batch=1, q_len=4, kv_len=4)
    summary = ModelSummary(sites=(site,), mlps=(), param_elements=4 * (H * d) ** 2, replicated_elements=0)
    got = {(c.m, c.n): c.feasible for c in solve(summary, devices)}
    assert set(got) == {(m, devices // m) for m in range(1, devices + 1) if devices % m == 0}
    for (m, n), feasible in got.items():
        assert feasible == _feasible_by_hand(H, H_kv, d, m, n), (H, H_kv, d, m, n)


def test_size_fixed_at_capture_is_refused_with_what_to_do():
    model = GeneratedAttention(4, 2, 4, "none", False).eval()
    prog = helix_compile(model, devices=2, example_inputs=(torch.randn(1, 5, 16),), plan=(1, 2))
    with pytest.raises(HelixError, match="dim 0 has size 2.*fixed at 1"):
        prog.simulate(torch.randn(2, 5, 16))
    x = torch.randn(1, 7, 16)  # another sequence length runs: that dim stayed dynamic
    with torch.no_grad():
        assert_ranks_equal(prog.simulate(x), model(x), devices=2)
