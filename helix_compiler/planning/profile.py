"""Compute profiles: how fast each op class runs, measured on one GPU.

A profile is a table of measurements `(op class, shape, dtype[, backend]) ->
achieved TFLOP/s` for the compute-bound classes (matmul, fused attention) and
one achieved bandwidth each for the memory-bound classes (softmax,
elementwise / norm), together with the peaks of the GPU they were measured on.
The cost model uses *efficiencies*: achieved / peak of the measured GPU, times
the peak of the cluster's GPU, so a profile taken on one H100 also prices an
H200 (same kernels, other peaks).

Lookups:
- matmul (shape (M, N, K), 2*M*N*K FLOPs): the measurement of the same dtype
  whose FLOPs are nearest on a log scale (size buckets); with none of that
  dtype, the nearest of any dtype, as an efficiency.
- attention (shape (batch*heads, S_q, S_k, d), 4*batch*heads*S_q*S_k*d
  FLOPs) per backend: the measurement with the nearest head dim, and only for
  head dims the backend has a kernel for (`KERNEL_MAX_HEAD_DIM`).
- qk_gemm / pv_gemm (shape (batch*heads, S_q, S_k, d), 2*bh*S_q*S_k*d FLOPs): an
  explicit core's score GEMMs at the nearest head dim (slice) measured; without
  such rows the matmul lookup prices them.
- softmax / elementwise: one achieved bandwidth each (bytes read + written).

`helix calibrate` writes this YAML on a GPU; `load_profile` reads it:

    name: h100-torch2.11
    device: H100 SXM5 80GB
    peak_tflops: {fp16: 989, bf16: 989, fp32: 67}
    hbm_gb_s: 3350
    softmax_gb_s: 966
    elementwise_gb_s: 2680
    rates:
      - {op: matmul, shape: [8192, 8192, 8192], dtype: fp16, tflops: 756}
      - {op: attention, backend: efficient, shape: [1, 10000, 10000, 512], dtype: fp16, tflops: 130}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from .cluster import DTYPES, normalize_dtype, safe_load_mapping
from ..errors import HelixError
from ..runtime.kernels import FUSED_MAX_HEAD_DIM

# qk_gemm / pv_gemm: the batched score GEMMs of an explicit core, QK^T (S_q x S_k over d) and
# PV (S_q x d over S_k), shape (batch*heads, S_q, S_k, d) like attention.
OPS = ("matmul", "attention", "qk_gemm", "pv_gemm")
# Memory-bound op classes, shape (rows, cols), achieved GB/s (bytes read + written / time):
# pointwise (add, mul, casts, copies), norm (layer norm and other row reductions), softmax,
# masked_softmax (rows with a causal -inf triangle), mask_fill (an in-place masked_fill of
# scores, as the explicit cores apply a causal mask).
MEMORY_OPS = ("pointwise", "norm", "softmax", "masked_softmax", "mask_fill")
# Attention backends: fused SDPA kernels. "explicit" (matmul -> softmax ->
# matmul) is not a kernel: the cost model prices it op by op.
BACKENDS = ("flash", "cudnn", "efficient", "explicit")
# What an attention core masks: nothing, causal (is_causal: fused kernels skip the upper
# triangle), or a materialized mask tensor (read by the kernel, no skipping; flash takes none).
MASKS = ("none", "causal", "tensor")
# Largest head dim each SDPA kernel takes on Hopper (kernels.FUSED_MAX_HEAD_DIM for
# FlashAttention-2/3 and cuDNN); the memory-efficient kernel has no limit. None: no limit.
KERNEL_MAX_HEAD_DIM = {"flash": FUSED_MAX_HEAD_DIM, "cudnn": FUSED_MAX_HEAD_DIM, "efficient": None,
                       "explicit": None}


@dataclass(frozen=True, slots=True, kw_only=True)
class Rate:
    """One measurement: `op` on `shape` in `dtype` ran at `tflops`."""

    op: str                     # "matmul" | "attention"
    shape: tuple[int, ...]      # matmul (M, N, K); attention (batch*heads, S_q, S_k, d)
    dtype: str
    tflops: float = 0.0         # compute ops
    gb_s: float = 0.0           # memory ops (MEMORY_OPS)
    backend: str = ""           # attention only: one of BACKENDS
    mask: str = "none"          # attention only: one of MASKS (FLOPs count every score)
    value_dim: int = 0          # attention only: V's head dim when it differs from d (qk-gather)
    note: str = ""              # where the figure comes from

    def __post_init__(self) -> None:
        if self.op not in OPS + MEMORY_OPS:
            raise HelixError(f"Rate.op must be one of {OPS + MEMORY_OPS}, got {self.op!r}")
        want, what = {"matmul": (3, "M, N, K")}.get(self.op, (4, "batch*heads, S_q, S_k, d"))
        if self.op in MEMORY_OPS:
            want, what = 2, "rows, cols"
        if len(self.shape) != want or any(not isinstance(s, int) or s <= 0 for s in self.shape):
            raise HelixError(
                f"Rate {self.op}: shape must be {want} positive integers ({what}), "
                f"got {self.shape!r}")
        if normalize_dtype(self.dtype) != self.dtype:
            raise HelixError(f"Rate.dtype must be one of {DTYPES}, got {self.dtype!r}")
        key = "gb_s" if self.op in MEMORY_OPS else "tflops"
        if not _positive(getattr(self, key)):
            raise HelixError(f"Rate {self.op} {self.shape}: {key} must be positive, "
                             f"got {getattr(self, key)!r}")
        if self.mask not in MASKS:
            raise HelixError(f"Rate {self.op} {self.shape}: mask must be one of {MASKS}, "
                             f"got {self.mask!r}")
        if (self.op == "attention") != (self.backend in BACKENDS):
            raise HelixError(
                f"Rate {self.op} {self.shape}: backend must be one of {BACKENDS} for attention "
                f"and empty for matmul, got {self.backend!r}")

    @property
    def flops(self) -> int:
        if self.op == "matmul":
            m, n, k = self.shape
            return 2 * m * n * k
        bh, s_q, s_k, d = self.shape
        if self.op != "attention":
            return 2 * bh * s_q * s_k * d
        return 2 * bh * s_q * s_k * (d + (self.value_dim or d))   # QK^T and PV

    @property
    def head_dim(self) -> int:
        return self.shape[-1]


@dataclass(frozen=True, slots=True, kw_only=True)
class ComputeProfile:
    """Achieved rates per op class on one GPU, and that GPU's peaks."""

    name: str
    device: str
    peak_tflops: tuple[tuple[str, float], ...]   # ((dtype, dense matmul peak), ...) of `device`
    hbm_gb_s: float                               # peak memory bandwidth of `device`
    softmax_gb_s: float                           # achieved: bytes read + written / time
    elementwise_gb_s: float                       # achieved by norms, residual adds, activations
    rates: tuple[Rate, ...]

    def __post_init__(self) -> None:
        peaks = dict(self.peak_tflops)
        if set(peaks) != set(DTYPES) or not all(_positive(v) for v in peaks.values()):
            raise HelixError(
                f"ComputeProfile {self.name!r}: peak_tflops must give a positive peak for each of "
                f"{DTYPES}, got {peaks}")
        for key in ("hbm_gb_s", "softmax_gb_s", "elementwise_gb_s"):
            value = getattr(self, key)
            if not _positive(value):
                raise HelixError(
                    f"ComputeProfile {self.name!r}: {key} must be positive, got {value!r}")
        if not any(r.op == "matmul" for r in self.rates):
            raise HelixError(
                f"ComputeProfile {self.name!r} has no matmul rate; add at least one "
                f"{{op: matmul, shape: [M, N, K], dtype: fp16, tflops: ...}} row")

    def peak(self, dtype: str) -> float:
        return dict(self.peak_tflops)[normalize_dtype(dtype)]

    def efficiency(self, rate: Rate) -> float:
        """Achieved / peak of the measured GPU in the rate's dtype."""
        return rate.tflops / self.peak(rate.dtype)

    def matmul_efficiency(self, flops: float, dtype: str) -> float:
        """Efficiency of a matmul of `flops` FLOPs: the nearest size bucket measured."""
        rows = [r for r in self.rates if r.op == "matmul"]
        same = [r for r in rows if r.dtype == normalize_dtype(dtype)] or rows
        nearest = min(same, key=lambda r: abs(math.log(r.flops) - math.log(max(flops, 1.0))))
        return self.efficiency(nearest)

    def bandwidth_efficiency(self, op: str, cols: int | None = None) -> float:
        """Achieved / peak HBM bandwidth of a memory-bound op class: the row of the nearest row
        width `cols` (log scale; None: the largest measurement); a profile with no row of the
        class answers with softmax_gb_s (softmax) or elementwise_gb_s (the others)."""
        rows = [r for r in self.rates if r.op == op]
        if not rows and op == "masked_softmax":
            return self.bandwidth_efficiency("softmax", cols)
        if not rows:
            return (self.softmax_gb_s if op == "softmax" else self.elementwise_gb_s) / self.hbm_gb_s
        if cols is None:
            best = max(rows, key=lambda r: r.shape[0] * r.shape[1])
        else:
            # the nearest width; of equal widths the largest block (a whole head of scores)
            best = min(rows, key=lambda r: (abs(math.log(r.shape[1]) - math.log(max(cols, 1))),
                                            -r.shape[0]))
        return best.gb_s / self.hbm_gb_s

    def score_gemm_efficiency(self, op: str, head_dim: int, dtype: str) -> float | None:
        """Efficiency of an explicit core's QK^T ("qk_gemm") or PV ("pv_gemm") at the nearest
        measured head dim (slice), or None when the profile has no such row."""
        rows = [r for r in self.rates if r.op == op]
        rows = [r for r in rows if r.dtype == normalize_dtype(dtype)] or rows
        if not rows:
            return None
        return self.efficiency(min(rows, key=lambda r: abs(math.log(r.head_dim)
                                                            - math.log(max(head_dim, 1)))))

    def attention_efficiency(self, backend: str, head_dim: int, dtype: str,
                             mask: str = "none", value_dim: int | None = None) -> float | None:
        """Efficiency of `backend` at `head_dim` under `mask` (FLOPs of every score), or None:
        no kernel, or never measured. The row of the nearest head dim, then of the nearest
        value head dim (`value_dim`: V's, when a qk-gather core has it at d/m). A profile with
        no row for `mask` answers with its unmasked rows (written before masks were measured)."""
        limit = KERNEL_MAX_HEAD_DIM[backend]
        if limit is not None and head_dim > limit:
            return None
        if backend == "flash" and mask == "tensor":
            return None                     # FlashAttention takes no mask tensor
        rows = [r for r in self.rates if r.op == "attention" and r.backend == backend]
        rows = [r for r in rows if r.mask == mask] or [r for r in rows if r.mask == "none"]
        rows = [r for r in rows if r.dtype == normalize_dtype(dtype)] or rows
        if not rows:
            return None
        d_near = min(rows, key=lambda r: abs(math.log(r.head_dim) - math.log(head_dim))).head_dim
        rows = [r for r in rows if r.head_dim == d_near]
        d_v = math.log(value_dim or head_dim)
        return self.efficiency(min(rows, key=lambda r: abs(math.log(r.value_dim or r.head_dim)
                                                            - d_v)))

    @property
    def softmax_efficiency(self) -> float:
        return self.softmax_gb_s / self.hbm_gb_s

    @property
    def elementwise_efficiency(self) -> float:
        return self.elementwise_gb_s / self.hbm_gb_s

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "device": self.device,
            "peak_tflops": dict(self.peak_tflops),
            "hbm_gb_s": self.hbm_gb_s,
            "softmax_gb_s": self.softmax_gb_s,
            "elementwise_gb_s": self.elementwise_gb_s,
            "rates": [_rate_dict(r) for r in self.rates],
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _rate_dict(rate: Rate) -> dict:
    row = {"op": rate.op, "shape": list(rate.shape), "dtype": rate.dtype}
    if rate.op in MEMORY_OPS:
        row["gb_s"] = rate.gb_s
    else:
        row["tflops"] = rate.tflops
    if rate.backend:
        row["backend"] = rate.backend
    if rate.mask != "none":
        row["mask"] = rate.mask
    if rate.value_dim:
        row["value_dim"] = rate.value_dim
    if rate.note:
        row["note"] = rate.note
    return row


# --- the default: what we measured on one H100 SXM (torch 2.11, fp16) -------
# 10k x 10k attention of one head at d=512: 4 * 10000^2 * 512 = 2.048e11 FLOPs.
_ATTN_FLOPS_D512 = 4 * 10_000 ** 2 * 512
# explicit fp16 matmul -> softmax -> matmul ran at ~299 TFLOP/s: 0.685 ms per head.
# Its two matmuls at the measured 756 TFLOP/s take 2.048e11 / 756e12 = 0.271 ms,
# so softmax (+ scale and mask) over 1e8 fp16 scores, read once and written once
# (4e8 bytes), took the other 0.414 ms: 4e8 / 0.414e-3 = 966 GB/s achieved.
# (`helix calibrate` on one H100, 2026-11-26, measured the core at 0.608 ms per head
# with whole-head blocks; helix_compiler/planning/profiles/h100.yaml carries that figure.)
_SOFTMAX_GB_S = 966.0
# Norm + residual as the rank graphs run a block's tail (bias add after the
# all-reduce, residual add, layer norm: 7 passes, cost.ELEMENTWISE_PASSES_PER_BLOCK),
# timed as one on (40000, 8192) fp16 by the same calibration: 2.154 ms.
_ELEMENTWISE_GB_S = 2129.3

DEFAULT_PROFILE = ComputeProfile(
    name="h100-sxm-torch2.11-measured",
    device="H100 SXM5 80GB",
    peak_tflops=(("fp16", 989.0), ("bf16", 989.0), ("fp32", 67.0)),  # H100 SXM datasheet, dense
    hbm_gb_s=3350.0,                                                 # H100 SXM datasheet, HBM3
    softmax_gb_s=_SOFTMAX_GB_S,
    elementwise_gb_s=_ELEMENTWISE_GB_S,
    rates=(
        Rate(op="matmul", shape=(8192, 8192, 8192), dtype="fp16", tflops=756.0,
             note="measured, one H100, torch 2.11"),
        # SDPA memory-efficient kernel at d=512 (no flash/cuDNN kernel there): 1.58 ms per head
        Rate(op="attention", backend="efficient", shape=(1, 10_000, 10_000, 512), dtype="fp16",
             tflops=round(_ATTN_FLOPS_D512 / 1.58e-3 / 1e12, 1),
             note="measured, one H100, torch 2.11: 1.58 ms per head"),
        # cuDNN at d=256, same FLOPs (2 heads): 0.47 ms
        Rate(op="attention", backend="cudnn", shape=(2, 10_000, 10_000, 256), dtype="fp16",
             tflops=round(_ATTN_FLOPS_D512 / 0.47e-3 / 1e12, 1),
             note="measured, one H100, torch 2.11: 0.47 ms for 2 heads of 256"),
        # explicit matmul -> softmax -> matmul, chunked over queries: 0.68 ms per head
        # (calibrated since: 0.608 ms, profiles/h100.yaml). The cost model prices
        # explicit cores op by op; softmax_gb_s above is derived from the calibration.
        Rate(op="attention", backend="explicit", shape=(1, 10_000, 10_000, 512), dtype="fp16",
             tflops=299.0, note="measured, one H100, torch 2.11: 0.68 ms per head, ~299 TFLOP/s"),
    ),
)


def load_profile(path: str | Path) -> ComputeProfile:
    """Read a profile YAML (as `helix calibrate` writes it); errors name the file and key."""
    path = Path(path)
    source = f"profile file {str(path)!r}"
    if not path.is_file():
        raise HelixError(f"{source} does not exist; run `helix calibrate` on a GPU to write one, "
                         f"or leave --profile out to use the built-in H100 profile")
    return profile_from_yaml(path.read_text(), source=source)


_KEYS = ("name", "device", "peak_tflops", "hbm_gb_s", "softmax_gb_s", "elementwise_gb_s", "rates")
_RATE_KEYS = ("op", "shape", "dtype", "tflops", "gb_s", "backend", "mask", "value_dim", "note")


def profile_from_yaml(text: str, *, source: str = "profile YAML") -> ComputeProfile:
    data = safe_load_mapping(text, source)
    unknown = sorted(set(data) - set(_KEYS))
    if unknown:
        raise HelixError(f"{source}: unknown key {unknown[0]!r}; known keys: {', '.join(_KEYS)}")
    missing = [k for k in _KEYS if k not in data]
    if missing:
        raise HelixError(f"{source}: missing key {missing[0]!r}; write one with "
                         f"`helix calibrate` or copy DEFAULT_PROFILE.to_yaml()")
    if not isinstance(data["peak_tflops"], dict):
        raise HelixError(f"{source}: peak_tflops must map fp16/bf16/fp32 to TFLOP/s, "
                         f"got {data['peak_tflops']!r}")
    if not isinstance(data["rates"], list):
        raise HelixError(f"{source}: rates must be a list of {{op, shape, dtype, tflops}} rows")
    rates = []
    for i, row in enumerate(data["rates"]):
        if not isinstance(row, dict) or set(row) - set(_RATE_KEYS):
            raise HelixError(f"{source}: rates[{i}] must be a mapping with keys from "
                             f"{', '.join(_RATE_KEYS)}, got {row!r}")
        try:
            rates.append(Rate(op=row.get("op"), shape=tuple(row.get("shape") or ()),
                              dtype=normalize_dtype(row.get("dtype", "")),
                              tflops=row.get("tflops", 0.0), gb_s=row.get("gb_s", 0.0),
                              backend=row.get("backend", ""),
                              mask=row.get("mask", "none"), value_dim=row.get("value_dim", 0),
                              note=row.get("note", "")))
        except (HelixError, TypeError) as e:
            raise HelixError(f"{source}: rates[{i}]: {e}") from e
    try:
        return ComputeProfile(
            name=str(data["name"]), device=str(data["device"]),
            peak_tflops=tuple((normalize_dtype(k), v) for k, v in data["peak_tflops"].items()),
            hbm_gb_s=data["hbm_gb_s"], softmax_gb_s=data["softmax_gb_s"],
            elementwise_gb_s=data["elementwise_gb_s"], rates=tuple(rates))
    except (HelixError, TypeError) as e:
        raise HelixError(f"{source}: {e}") from e
