"""The explicit attention core's softmax as one Triton program per row, in place.

    softmax_(s)    s <- masked_softmax(s) over its last dim, in place; returns s
    fits(s)        whether softmax_ takes s (else the caller runs torch.softmax)

The explicit blocks of kernels_chunked (heads whose d no fused SDPA kernel takes: d > 256 on
Hopper) run Q K^T -> softmax -> P V. torch.softmax over rows of 10^4 fp16 scores reads its
input more than once and writes a new tensor; this kernel loads a whole row into registers
once (one read, one write of the scores' bytes: the least a softmax between two cuBLAS GEMMs can
move) and writes the probabilities over the scores, which the caller owns.

Measured on an H200 (torch 2.11, Triton 3.6, results/core512_h200.json): the paper model's core
(16 heads, T = S = 10000, d = 512, fp16) spends 3.98 ms of its 8.56 in torch.softmax; this
kernel takes 2.10 ms (3.0 TB/s of the 4.8), and the core 7.34.

Semantics are kernels.masked_softmax's, so the core needs no pass after P V: a row whose scores
are all -inf (no visible key) gives probabilities 0 (SDPA's output 0 for it), a row holding a
NaN gives NaN. Arithmetic in fp32, the result rounded to the scores' dtype, as torch.softmax
does for 16-bit inputs.

Taken: CUDA tensors of fp16 / bf16 (the dtypes it was timed in; fp32 stays on torch) whose
last dim is contiguous, at most MAX_COLS long, and rows contiguous with each other (s is a
fresh block of scores). `import triton` is optional: without it fits() is False. USE_TRITON =
False (HELIX_SOFTMAX_TRITON=0 in the environment at import) keeps torch.softmax everywhere,
e.g. to time one against the other.
"""

from __future__ import annotations

import os

import torch

from helix_compiler.runtime.triton_inputs import interpreting

try:
    import triton
    import triton.language as tl
except ImportError:        # the project does not depend on triton; fits() is False without it
    triton = tl = None

USE_TRITON = os.environ.get("HELIX_SOFTMAX_TRITON", "1") != "0"
DTYPES = (torch.float16, torch.bfloat16)
# a row is one program's registers: 32768 fp32 values over 16 warps is 64 a thread
MAX_COLS = 32768


def fits(s: torch.Tensor) -> bool:
    """Whether softmax_ takes `s` (see the module's docstring)."""
    if not (USE_TRITON and triton is not None and s.dtype in DTYPES and s.dim() >= 1):
        return False
    if not (s.is_cuda or (interpreting() and s.device.type == "cpu")):
        return False
    return 0 < s.shape[-1] <= MAX_COLS and s.numel() > 0 and s.is_contiguous()


def _warps(block: int) -> int:
    """16 warps for rows of 8192 and more (measured fastest at 16384: 8 warps 2.65 ms, 16 2.10,
    32 2.20 for the paper's core), fewer for short rows."""
    return 16 if block >= 8192 else 8 if block >= 2048 else 4


def softmax_(s: torch.Tensor) -> torch.Tensor:
    """s <- masked_softmax(s, dim=-1) in place; `fits(s)` must hold."""
    n = s.shape[-1]
    rows = s.numel() // n
    block = triton.next_power_of_2(n)
    _row_softmax[(rows,)](s, n, BLOCK=block, num_warps=_warps(block))
    return s


if triton is not None:
    @triton.jit
    def _row_softmax(s_ptr, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        keep = offs < n_cols
        ptrs = s_ptr + row * n_cols + offs
        x = tl.load(ptrs, mask=keep, other=-float("inf")).to(tl.float32)
        m = tl.max(x, 0)
        e = tl.exp(x - m)                    # a NaN score makes the row's sum, so every p, NaN
        p = e / tl.sum(e, 0)
        # no visible key (every score -inf, none NaN): 0, not exp(-inf + inf)
        dead = (m == -float("inf")) & (tl.sum((x != x).to(tl.int32), 0) == 0)
        p = tl.where(dead, 0.0, p)
        tl.store(ptrs, p.to(s_ptr.dtype.element_ty), mask=keep)
