"""The explicit core's Triton row softmax (runtime/triton_softmax.py) against
kernels.masked_softmax, and chunked_attention's blocks through it against the fp32 explicit
math. In Triton's interpreter on the CPU (TRITON_INTERPRET=1, set here before triton is
imported) or compiled on a GPU; skipped where triton is not installed (CI: the project does not
depend on it). benchmarks/gpu_core512.py checks and times the compiled kernel at the paper's
core.

Rows that users' masks make: all -inf (no visible key: 0), a NaN score (NaN), -inf with a NaN
(NaN), lengths that are not powers of two. Tolerances: the probabilities are rounded to the
scores' dtype, as torch.softmax rounds them (fp16 1e-3, bf16 8e-3 of the row's largest value).
"""

from __future__ import annotations


import pytest
import torch

from tests.triton_mode import device  # noqa: E402  (before triton is imported)

DEVICE = device()

from helix_compiler.numerics import relative_error  # noqa: E402
from helix_compiler.runtime import kernels_chunked, triton_softmax  # noqa: E402
from helix_compiler.runtime.kernels import masked_softmax  # noqa: E402

TOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
INF = float("-inf")


def _scores(rows, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    s = (torch.randn(2, rows, n, generator=gen) * 4).to(dtype)
    s[0, 0] = INF                        # no visible key
    s[0, 1, ::3] = INF                   # holes
    if rows > 2:
        s[1, 2, n // 2] = float("nan")   # a NaN score
    if rows > 3:
        s[1, 3] = INF
        s[1, 3, 0] = float("nan")        # -inf everywhere but one NaN
    return s.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 100, 1000, 2049])
def test_softmax_matches_masked_softmax(n, dtype):
    s = _scores(5, n, dtype)
    ref = masked_softmax(s.float(), dim=-1)
    assert triton_softmax.fits(s)
    got = triton_softmax.softmax_(s.clone()).float()
    assert torch.equal(got.isnan(), ref.isnan())
    ok = ~ref.isnan()
    assert (got[ok] - ref[ok]).abs().max() <= TOL[dtype]
    assert torch.all(got[0, 0] == 0)                       # the row with no visible key


def test_fits_refuses_what_it_does_not_take():
    assert not triton_softmax.fits(torch.zeros(4, 8, device=DEVICE))            # fp32
    assert not triton_softmax.fits(torch.zeros(8, 4, device=DEVICE,
                                               dtype=torch.float16).t())        # strided
    assert not triton_softmax.fits(torch.zeros(2, triton_softmax.MAX_COLS + 1, device=DEVICE,
                                               dtype=torch.float16))            # row too long
    assert not triton_softmax.fits(torch.zeros(2, 0, device=DEVICE, dtype=torch.float16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_chunked_attention_with_padding_masks(dtype):
    """The op's explicit blocks (non-causal, a bool padding mask with a fully padded row, and a
    float mask), through the Triton softmax, against the fp32 blocks."""
    gen = torch.Generator().manual_seed(1)
    B, H, T, S, d = 2, 2, 40, 48, 64
    q, k, v = (torch.randn(B, n, H, d, generator=gen).transpose(1, 2) for n in (T, S, S))
    keep = torch.ones(B, 1, T, S, dtype=torch.bool)
    keep[0, ..., :5] = False                              # left padding
    keep[1, :, 7] = False                                 # a query row that sees nothing
    fmask = torch.zeros(B, 1, T, S).masked_fill(~keep, INF)
    for mask in (None, keep, fmask):
        ref = kernels_chunked._explicit(q, k, v, mask, False, d ** -0.5, 2 ** 30)
        dev = [t.to(DEVICE, dtype) for t in (q, k, v)]
        m = None if mask is None else mask.to(DEVICE) if mask.dtype == torch.bool \
            else mask.to(DEVICE, dtype)
        got = torch.ops.helix.chunked_attention(*dev, m, False, None, 1024 * 2, 0).float().cpu()
        assert not got.isnan().any()
        assert relative_error(got, ref) <= 10 * TOL[dtype]
        if mask is not None:
            assert torch.all(got[1, :, 7] == 0)           # SDPA's output for a dead row
