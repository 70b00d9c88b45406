"""The flash-attention Triton kernel for head dims up to 512 (runtime/triton_flash.py) against
the explicit math of `torch.ops.helix.chunked_attention` in fp32 (the op on CPU tensors:
kernels_chunked's explicit blocks), in Triton's interpreter on the CPU (TRITON_INTERPRET=1, set
here before triton is imported). Skipped where triton is not installed (CI: the project does not
depend on it); benchmarks/gpu_triton_flash.py checks and times the compiled kernel on a GPU.

Tolerances (norm-relative error of out): fp32 1e-5 (ieee dots); fp16 2e-3 and bf16 1e-2 (the
inputs are the reference's inputs; the kernel casts the probabilities to v's dtype before
P @ V, as flash attention does). Shapes are tiny (the interpreter runs each program in Python).
"""

from __future__ import annotations


import pytest
import torch

from tests.triton_mode import device  # noqa: E402  (before triton is imported)

DEVICE = device()

from helix_compiler.errors import HelixError  # noqa: E402
from helix_compiler.numerics import relative_error  # noqa: E402
from helix_compiler.runtime import kernels_chunked, triton_flash  # noqa: E402
from helix_compiler.runtime.kernels_chunked import DEFAULT_CHUNK_BYTES  # noqa: E402
from helix_compiler.runtime.triton_flash import (  # noqa: E402
    CONFIGS, FlashConfig, fits, flash_attention_triton)

CUDA_ONLY = pytest.mark.skipif(DEVICE == "cpu", reason="large shapes / bf16: compiled kernel only")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
LOW = torch.finfo(torch.float32).min
INF = float("-inf")


def _inputs(B, H_kv, g, T, S, d, d_v, dtype, seed=0):
    """q in HF's (B, T, H, d) layout transposed, k and v the second part of a longer cache: all
    non-contiguous."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H_kv * g, d, generator=gen).to(dtype).transpose(1, 2)
    k = torch.randn(B, H_kv, S + 5, d, generator=gen).to(dtype)[:, :, 5:]
    v = torch.randn(B, H_kv, S + 5, d_v, generator=gen).to(dtype)[:, :, 5:]
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


def _reference(q, k, v, mask, is_causal, scale):
    """The explicit chunked path in fp32, on the CPU (where the op never takes the kernel)."""
    m = None if mask is None else (mask.cpu() if mask.dtype == torch.bool else mask.cpu().float())
    return torch.ops.helix.chunked_attention(q.cpu().float(), k.cpu().float(), v.cpu().float(), m,
                                             is_causal, scale, DEFAULT_CHUNK_BYTES, 0)


def _check(q, k, v, mask, is_causal, scale, **kw):
    out = flash_attention_triton(q, k, v, mask, is_causal, scale, **kw)
    want = _reference(q, k, v, mask, is_causal, scale)
    assert out.dtype == v.dtype and out.shape == want.shape
    assert not out.isnan().any()
    err = relative_error(out.cpu().float(), want)
    assert err <= TOL[q.dtype], err
    return out.cpu(), want


def _hf_padding(B, T, S):
    """(B, 1, 1, S) bool keep-mask: sequence 0 unpadded, 1 left-padded by 3 keys, the last fully
    padded (all False)."""
    keep = torch.ones(B, 1, 1, S, dtype=torch.bool)
    keep[1, ..., :3] = False
    keep[-1] = False
    return keep.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("H_kv,g,T,S,d,d_v,causal", [
    (2, 1, 5, 37, 64, 64, False),      # S not a multiple of BLOCK_N, T under one row block
    (1, 2, 70, 45, 512, 512, True),    # d = 512, GQA g = 2, T not a multiple of BLOCK_M, T > S
    (2, 2, 1, 20, 64, 32, False),      # one query row (decode), d_v != d
    (1, 1, 33, 70, 512, 512, False),   # d = 512, T < S
])
def test_unmasked_and_causal_match_the_explicit_path(dtype, H_kv, g, T, S, d, d_v, causal):
    q, k, v = _inputs(2, H_kv, g, T, S, d, d_v, dtype)
    _check(q, k, v, None, causal, d ** -0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bool_padding_mask_with_causal_gives_0_in_rows_with_no_visible_key(dtype):
    # sequence 1's first 3 query rows see only padded keys under the causal triangle: dead rows;
    # the fully padded sequence is dead everywhere
    B, T, S = 3, 9, 9
    q, k, v = _inputs(B, 2, 1, T, S, 64, 64, dtype)
    out, want = _check(q, k, v, _hf_padding(B, T, S), True, 0.125)
    assert (out[1, :, :3] == 0).all() and (out[2] == 0).all()
    assert (want[1, :, :3] == 0).all() and (out[0].abs() > 0).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_hf_finfo_min_mask_gives_a_uniform_softmax_in_a_fully_padded_row(dtype):
    # HF's eager mask: finfo(fp32).min where hidden (causal and padding together), (B, 1, T, S);
    # a row whose every score is finfo.min is a uniform softmax over all S keys, not 0
    B, T, S = 3, 12, 40
    q, k, v = _inputs(B, 1, 2, T, S, 64, 48, dtype)
    hidden = ~_hf_padding(B, T, S).cpu() | torch.ones(T, S, dtype=torch.bool).triu(S - T + 1)
    mask = torch.zeros(B, 1, T, S).masked_fill(hidden, LOW).to(DEVICE)
    out, want = _check(q, k, v, mask, False, 0.125)
    uniform = v[2].cpu().float().mean(1, keepdim=True).repeat_interleave(2, 0).expand_as(out[2])
    assert torch.allclose(out[2].float(), uniform, atol=TOL[dtype] * 10)
    assert torch.allclose(want[2], uniform, atol=1e-5)


def test_an_all_minus_inf_float_mask_row_gives_0_not_nan():
    q, k, v = _inputs(2, 2, 1, 6, 50, 64, 64, torch.float32)
    mask = torch.zeros(2, 1, 6, 50)
    mask[0, :, 2] = INF                       # one dead query row
    mask[1, ..., 17:] = INF                   # keys past the first key tile hidden
    out, _ = _check(q, k, v, mask.to(DEVICE), False, 0.125)
    assert (out[0, :, 2] == 0).all()


def test_broadcast_masks_and_a_batch_1_kv_are_read_with_stride_0():
    q, k, v = _inputs(3, 2, 2, 7, 30, 32, 32, torch.float32)
    per_head = torch.randn(1, 4, 7, 30, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    _check(q, k, v, per_head, True, 0.2)                                # (1, H, T, S) float
    keys = torch.rand(30, generator=torch.Generator().manual_seed(2)) > 0.3
    _check(q, k, v, keys.to(DEVICE), False, 0.2)                        # (S,) bool
    _check(q, k[:1], v[:1], None, False, 0.2)                           # K, V of batch 1


def test_every_config_of_the_sweep_table_matches():
    # each (BLOCK_M, BLOCK_N, warps, stages, dv_split): dv_split 4 of d_v = 64 gives 16 columns
    # a program, T = 20 spans one row block of the smaller BLOCK_M, S = 70 a partial key tile
    q, k, v = _inputs(1, 1, 2, 20, 70, 32, 64, torch.float16)
    keep = torch.ones(1, 1, 20, 70, dtype=torch.bool)
    keep[..., :5] = False
    for cfg in CONFIGS + (triton_flash.FP32_CONFIG,):
        _check(q, k, v, keep.to(DEVICE), True, 0.2, config=cfg)


def test_configs_and_fits_refusals_name_the_value():
    q, k, v = _inputs(1, 1, 2, 3, 8, 16, 16, torch.float32)
    assert fits(q, k, v, None)
    assert not fits(q.double(), k.double(), v.double(), None)
    assert not fits(q, k.half(), v, None)
    assert not fits(q, k, v, torch.zeros(1, 1, 3, 8, dtype=torch.int64, device=DEVICE))
    wide = torch.zeros(1, 1, 8, 1024, device=DEVICE)
    with pytest.raises(HelixError, match=r"d = 16, d_v = 1024; the kernel takes multiples of 16 "
                                         r"up to 512"):
        flash_attention_triton(q, k, wide, None, False, 1.0)
    with pytest.raises(HelixError, match=r"d = 24, d_v = 16; the kernel takes multiples of 16"):
        flash_attention_triton(q[..., :8].repeat(1, 1, 1, 3), k[..., :8].repeat(1, 1, 1, 3), v,
                               None, False, 1.0)
    with pytest.raises(HelixError, match=r"mask \[1, 1, 1, 9\] does not broadcast"):
        flash_attention_triton(q, k, v, torch.zeros(1, 1, 1, 9, device=DEVICE), False, 1.0)
    with pytest.raises(HelixError, match=r"dv_split = 3; use 1, 2 or 4"):
        FlashConfig(block_m=64, block_n=64, num_warps=8, num_stages=2, dv_split=3)
    with pytest.raises(HelixError, match=r"block_n = 48 is not a power of 2"):
        FlashConfig(block_m=64, block_n=48, num_warps=8, num_stages=2)


def test_without_triton_fits_is_false_and_the_call_says_why(monkeypatch):
    q, k, v = _inputs(1, 1, 2, 1, 8, 16, 16, torch.float32)
    monkeypatch.setattr(triton_flash, "triton", None)
    assert not fits(q, k, v, None)
    with pytest.raises(HelixError, match="triton is not importable"):
        flash_attention_triton(q, k, v, None, False, 1.0)


def test_the_op_on_cpu_tensors_keeps_the_explicit_path():
    # even under TRITON_INTERPRET=1 (where fits holds on the CPU) the CPU runs the explicit blocks
    q, k, v = _inputs(1, 1, 1, 4, 8, 512, 512, torch.float32)
    assert not kernels_chunked._use_triton(q.cpu(), k.cpu(), v.cpu(), None, True)


@CUDA_ONLY
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_op_on_cuda_runs_the_kernel_and_matches_the_explicit_path(dtype, monkeypatch):
    q, k, v = _inputs(2, 4, 1, 300, 1000, 512, 512, dtype)
    keep = _hf_padding(2, 300, 1000)
    assert kernels_chunked._use_triton(q, k, v, keep, True)
    args = (keep, True, 512 ** -0.5, DEFAULT_CHUNK_BYTES, 0)
    got = torch.ops.helix.chunked_attention(q, k, v, *args)
    monkeypatch.setattr(kernels_chunked, "USE_TRITON", False)
    explicit = torch.ops.helix.chunked_attention(q.float(), k.float(), v.float(), *args)
    assert not got.isnan().any() and (got[-1] == 0).all()
    assert relative_error(got.float(), explicit) <= TOL[dtype]


@CUDA_ONLY
def test_the_op_keeps_the_blocks_where_the_kernel_was_not_measured_faster():
    # H200, d = 512 (results/triton_flash_h200.json): non-causal the blocks win; fp32 not timed
    q, k, v = _inputs(1, 2, 1, 64, 64, 512, 512, torch.float16)
    assert kernels_chunked._use_triton(q, k, v, None, True)
    assert not kernels_chunked._use_triton(q, k, v, None, False)
    assert not kernels_chunked._use_triton(q.float(), k.float(), v.float(), None, True)


@CUDA_ONLY
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_each_config_compiles_or_fails_and_matches_at_d_512(cfg):
    q, k, v = _inputs(1, 2, 1, 1000, 1000, 512, 512, torch.float16)
    try:
        out = flash_attention_triton(q, k, v, None, False, 512 ** -0.5, config=cfg)
    except triton_flash.OutOfResources as e:   # shared memory: the benchmark's error row
        pytest.skip(f"{cfg.name} does not compile here: {str(e).splitlines()[0][:200]}")
    want = _reference(q, k, v, None, False, 512 ** -0.5)
    assert relative_error(out.cpu().float(), want) <= TOL[torch.float16]


@CUDA_ONLY
def test_a_default_config_too_big_for_the_gpu_warns_and_runs_the_explicit_blocks(monkeypatch):
    # 2 x (128 x 512 + 3 x 128 x 1024) bytes of shared memory: more than any GPU has
    monkeypatch.setattr(triton_flash, "DEFAULT_CONFIG", FlashConfig(
        block_m=128, block_n=128, num_warps=8, num_stages=3, dv_split=1))
    q, k, v = _inputs(1, 2, 1, 100, 100, 512, 512, torch.float16)
    with pytest.warns(UserWarning, match=r"config m128_n128_w8_s3_dv1 does not fit .*running the "
                                         r"explicit blocks"):
        got = torch.ops.helix.chunked_attention(q, k, v, None, True, 0.05, DEFAULT_CHUNK_BYTES, 0)
    assert relative_error(got.cpu().float(), _reference(q, k, v, None, True, 0.05)) <= TOL[torch.float16]
