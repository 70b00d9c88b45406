"""The split-KV Triton chunk core (helix_compiler/runtime/triton_chunk.py) against the explicit
math of the chunk core, in Triton's interpreter on the CPU (TRITON_INTERPRET=1, set here before
triton is imported). Skipped where triton is not installed (CI: the project does not depend on
it); benchmarks/gpu_triton_chunk.py checks and times the compiled kernel on a GPU.

Shapes are tiny (the interpreter runs each program in Python); block_n and num_splits are forced
so that the key blocks, the splits and their boundaries fall where each case needs them.
"""

from __future__ import annotations


import pytest
import torch

from tests.triton_mode import device  # noqa: E402  (before triton is imported)

DEVICE = device()

from helix_compiler.errors import HelixError  # noqa: E402
from helix_compiler.numerics import relative_error  # noqa: E402
from helix_compiler.runtime import triton_chunk  # noqa: E402
from helix_compiler.runtime.chunk_core import chunk_attention_math  # noqa: E402
from helix_compiler.runtime.triton_chunk import (  # noqa: E402
    chunk_attention_triton, fits)

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# the interpreter multiplies bf16 tiles wrongly (tl.dot of two bf16 16 x 16 tiles is off by 1e10
# in Triton 3.9's interpreter, a load and store of bf16 is right): bf16 runs on a GPU only
BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    DEVICE == "cpu", reason="Triton's interpreter has no bf16 tl.dot"))
LOW = torch.finfo(torch.float32).min
INF = float("-inf")


def _inputs(B, H_kv, g, T, C, d, d_v, dtype, seed=0):
    """q in HF's (B, T, H, d) layout transposed, k and v the second part of a longer cache
    (strides of a rank's slice), all non-contiguous."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H_kv * g, d, generator=gen).to(dtype).transpose(1, 2)
    k = torch.randn(B, H_kv, C + 7, d, generator=gen).to(dtype)[:, :, 7:]
    v = torch.randn(B, H_kv, C + 7, d_v, generator=gen).to(dtype)[:, :, 7:]
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


def _padded_mask(B, T, C, split0_keys):
    """(B, 1, T, C) additive mask: sequence 0 sees no key of split 0 (-inf, a causal-style
    mask) but the rest; 1 is HF left-padded (finfo.min on its first 3 keys); 2 fully padded
    (finfo.min everywhere); 3 has no visible key (-inf everywhere)."""
    bias = torch.zeros(B, 1, T, C)
    bias[0, ..., :split0_keys] = INF
    bias[1, ..., :3] = LOW
    bias[2] = LOW
    bias[3] = INF
    return bias.to(DEVICE)


def _check(q, k, v, bias, scale, dtype, **kw):
    out, lse = chunk_attention_triton(q, k, v, bias, scale, **kw)
    want_out, want_lse = chunk_attention_math(q, k, v, bias, scale)
    assert out.dtype == v.dtype and out.shape == want_out.shape
    assert lse.dtype == torch.float32 and lse.shape == want_lse.shape
    assert not out.isnan().any() and not lse.isnan().any()
    dead = want_lse == INF
    assert torch.equal(lse == INF, dead)                       # -inf exactly where no key is visible
    assert (out[dead] == 0).all()
    assert relative_error(out.float(), want_out.float()) <= TOL[dtype]
    assert relative_error(lse[~dead], want_lse[~dead]) <= 1e-6
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16])
@pytest.mark.parametrize("H_kv,g,T", [(2, 1, 1), (1, 2, 3), (1, 8, 1)])
def test_masked_rows_over_several_splits_match_the_math(dtype, H_kv, g, T):
    # C = 37 in blocks of 16 over 3 splits of 13 keys: blocks cut by split ends, a last partial
    # block; sequence 0's split 0 is all -inf while its splits 1 and 2 are not
    B, C = 4, 37
    q, k, v = _inputs(B, H_kv, g, T, C, 16, 8, dtype)
    out, lse = _check(q, k, v, _padded_mask(B, T, C, 13), 0.25, dtype, block_n=16, num_splits=3)
    assert (lse[3] == INF).all() and (out[3] == 0).all()
    # the fully padded sequence: uniform softmax, lse = -1e30 + log C in fp32 (= -1e30)
    assert torch.allclose(out[2].float(), v[2].float().mean(1, keepdim=True)
                          .repeat_interleave(g, 0).expand_as(out[2]), atol=TOL[dtype] * 10)
    assert (lse[2] == torch.tensor(-1e30, dtype=torch.float32)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_no_bias_and_a_chunk_shorter_than_one_block(dtype):
    q, k, v = _inputs(2, 2, 2, 3, 5, 16, 16, dtype)
    _check(q, k, v, None, 16 ** -0.5, dtype, block_n=16)          # C = 5 < BLOCK_N, one split
    _check(q, k, v, None, 16 ** -0.5, dtype, block_n=16, num_splits=5)   # one key per split


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_head_dims_up_to_256(dtype):
    # d = 256 (BLOCK_N 32 in fp32, 64 in fp16 by default), d_v = 200 in a BLOCK_DV of 256
    q, k, v = _inputs(4, 1, 2, 1, 20, 256, 200, dtype)
    _check(q, k, v, _padded_mask(4, 1, 20, 10), 256 ** -0.5, dtype, num_splits=2)


def test_bias_broadcast_over_query_rows_and_heads_is_read_with_stride_0():
    # a (B, 1, 1, C) padding mask for T = 3 query rows, and a per-head (1, H, T, C) bias
    q, k, v = _inputs(2, 2, 2, 3, 40, 24, 16, torch.float32)      # d = 24: BLOCK_D 32, masked
    pad = torch.zeros(2, 1, 1, 40)
    pad[1, ..., :9] = LOW
    _check(q, k, v, pad.to(DEVICE), 0.3, torch.float32, block_n=16, num_splits=2)
    per_head = torch.randn(1, 4, 3, 40, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    _check(q, k, v, per_head, 0.3, torch.float32, block_n=16, num_splits=2)


def test_the_chosen_split_count_and_block():
    # no overrides: BLOCK_N 128 (16-bit, d <= 128), C // 256 = 2 splits of 384 keys at most
    q, k, v = _inputs(1, 1, 4, 1, 600, 16, 16, torch.float16)
    bias = torch.zeros(1, 1, 1, 600)
    bias[..., :400] = INF                                          # split 0 all -inf
    _check(q, k, v, bias.to(DEVICE), 0.25, torch.float16)
    assert triton_chunk._num_splits(600, 1, 128, torch.device(DEVICE)) == 2


def test_fits_and_the_refusals_name_the_value():
    q, k, v = _inputs(1, 1, 2, 1, 8, 16, 16, torch.float32)
    assert fits(q, k, v, None)
    assert not fits(q.double(), k.double(), v.double(), None)
    assert not fits(q, k.half(), v, None)
    wide = torch.zeros(1, 1, 8, 512, device=DEVICE)
    assert not fits(q, k, wide, None)
    with pytest.raises(HelixError, match=r"d_v = 512; the kernel takes each up to 256"):
        chunk_attention_triton(q, k, wide, None, 1.0)
    with pytest.raises(HelixError, match=r"bias \[1, 1, 1, 9\] does not broadcast"):
        chunk_attention_triton(q, k, v, torch.zeros(1, 1, 1, 9, device=DEVICE), 1.0)
    with pytest.raises(HelixError, match=r"q \[1, 2, 1, 16\], k \[1, 1, 8, 8\]"):
        chunk_attention_triton(q, k[..., :8], v, None, 1.0)


def test_without_triton_fits_is_false_and_the_call_says_why(monkeypatch):
    q, k, v = _inputs(1, 1, 2, 1, 8, 16, 16, torch.float32)
    monkeypatch.setattr(triton_chunk, "triton", None)
    assert not fits(q, k, v, None)
    with pytest.raises(HelixError, match="triton is not importable"):
        chunk_attention_triton(q, k, v, None, 1.0)
