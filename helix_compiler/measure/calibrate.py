"""`helix calibrate`: measure one GPU's op-class rates and write a profile YAML.

    helix calibrate --out h100.yaml [--json calib.json] [--small]

What it measures (fp16, CUDA events, warm-up, median of repeats):
- matmul TFLOP/s at the GEMM shapes the paper model's plans produce
  (M = sequences x 10000 tokens; N, K from the q/k/v, output and MLP
  projections of every helix split and of TP=8 / TP=16), and 8192^3;
  the score GEMMs QK^T (S x S x d/m) and PV (S x d/m x S) for the roofline;
- attention at S = 10000 per head dim {64, 128, 256, 512}: every SDPA backend
  (flash, cuDNN, efficient, math) and the explicit matmul -> softmax -> matmul
  chunked over queries (torch.ops.helix.chunked_attention), each with its error
  against an fp32 reference on a slice of query rows; a sweep of the chunk size;
- the fused backends as real plans run them, per head dim <= 256: causal
  (is_causal), with a materialized bool (1, 1, S, S) mask (what Hugging Face
  models hand SDPA once captured), and with V narrower than Q and K (a
  qk-gather core holds V at d/m) at d_v = d/2 .. 8, under each mask;
- softmax, layer norm, residual add and GELU bandwidth (bytes read + written);
- an explicit core's passes over a 256 MiB block of scores per sequence length
  S in {4096, 8192, 10000, 16384}: scale, causal fill, softmax (a softmax over
  8192 columns ran at 1012 GB/s, over 10000 at 1715, on one H100);
- a device-to-device copy (the memory roofline).

The profile (helix_compiler/planning/profile.py) gets the compute-bound matmul rows, one
attention row per fused backend and head dim it ran at, the explicit core per
head dim, softmax_gb_s derived from the explicit core at d = 512 (its time
minus its two GEMMs', so that the cost model's op-by-op pricing adds up to the
measured core), and elementwise_gb_s from a block's tail as the rank graphs
run it (bias add after the reduction, residual add, layer norm: the cost
model's norm + residual term, 7 passes). Peaks (`peak_tflops`, `hbm_gb_s`) are the
datasheet figures of the device, so efficiencies transfer to other GPUs.
--json writes every measurement, with device, torch version and date.
--small runs tiny shapes (on the CPU when there is no GPU) to test the script.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import helix_compiler.runtime.kernels  # noqa: F401  (registers torch.ops.helix.attend)
from helix_compiler.runtime.kernels_chunked import DEFAULT_CHUNK_BYTES
from helix_compiler.measure import configure_logging
from helix_compiler.measure.timing import Timer, device_info, sync
from helix_compiler.numerics import relative_error
from helix_compiler.planning.profile import KERNEL_MAX_HEAD_DIM, ComputeProfile, Rate

log = logging.getLogger(__name__)

# Datasheet peaks (dense) by device name fragment: (fp16, bf16, fp32 TFLOP/s, HBM GB/s).
DATASHEETS = {
    "H100 80GB HBM3": (989.0, 989.0, 67.0, 3350.0),      # H100 SXM5
    "H100 PCIe": (756.0, 756.0, 51.0, 2000.0),
    "H100 NVL": (835.0, 835.0, 60.0, 3900.0),
    "H200": (989.0, 989.0, 67.0, 4800.0),
    "A100": (312.0, 312.0, 19.5, 2039.0),
}
HEAD_DIMS = (64, 128, 256, 512)
BACKENDS = ("flash", "cudnn", "efficient", "math")


def datasheet(name: str) -> tuple[float, float, float, float]:
    for key, peaks in DATASHEETS.items():
        if key.lower() in name.lower():
            return peaks
    return DATASHEETS["H100 80GB HBM3"]


# --- measurements -------------------------------------------------------------------
def _randn(*shape, dtype, device, gen=None):
    return torch.randn(*shape, dtype=dtype, device=device, generator=gen)


def matmul_shapes(small: bool) -> list[tuple[int, int, int]]:
    """(M, N, K) of x @ W^T as the plans' rank graphs run them (nn.Linear layout)."""
    if small:
        return [(256, 64, 256), (256, 256, 64), (512, 128, 256), (256, 256, 256)]
    D, F_, S = 8192, 32768, 10000
    nk = set()
    for ranks in (16, 8):                         # helix m*n = 16 and TP=16; TP=8
        c = D // ranks                            # q/k/v columns per rank (h * d / m)
        nk |= {(c, D), (3 * c, D), (D, c), (F_ // ranks, D), (D, F_ // ranks)}
    shapes = [(8192, 8192, 8192)]
    for M in (S, 4 * S):
        shapes += [(M, n, k) for n, k in sorted(nk)]
    return shapes


def bench_matmul(shapes, dtype, timer: Timer) -> list[dict]:
    device = timer.device
    out = []
    for (M, N, K) in shapes:
        x = _randn(M, K, dtype=dtype, device=device)
        w = _randn(N, K, dtype=dtype, device=device) / math.sqrt(K)
        t = timer(lambda: F.linear(x, w))
        flops = 2 * M * N * K
        nbytes = x.element_size() * (M * K + N * K + M * N)
        out.append({"op": "matmul", "shape": [M, N, K], "flops": flops, "bytes": nbytes,
                    "intensity": round(flops / nbytes, 1), **t,
                    "tflops": flops / (t["median_ms"] * 1e-3) / 1e12})
        del x, w
    return out


def bench_score_gemms(S, dims, heads_for, dtype, timer: Timer) -> list[dict]:
    """QK^T (bh, S, S, dk) and PV (bh, S, dk, S) batched GEMMs at head dim slices dk."""
    device = timer.device
    out = []
    for dk in dims:
        bh = heads_for(dk)
        q = _randn(bh, S, dk, dtype=dtype, device=device)
        k = _randn(bh, S, dk, dtype=dtype, device=device)
        t = timer(lambda: torch.bmm(q, k.transpose(1, 2)))
        flops = 2 * bh * S * S * dk
        nbytes = q.element_size() * bh * (2 * S * dk + S * S)
        out.append({"op": "qk_gemm", "shape": [bh, S, S, dk], "flops": flops, "bytes": nbytes,
                    **t, "tflops": flops / (t["median_ms"] * 1e-3) / 1e12})
        p = torch.softmax(_randn(bh, S, S, dtype=dtype, device=device), dim=-1)
        v = _randn(bh, S, dk, dtype=dtype, device=device)
        t = timer(lambda: torch.bmm(p, v))
        out.append({"op": "pv_gemm", "shape": [bh, S, dk, S], "flops": flops, "bytes": nbytes,
                    **t, "tflops": flops / (t["median_ms"] * 1e-3) / 1e12})
        del q, k, p, v
    return out


def _reference_rows(q, k, v, rows: int) -> torch.Tensor:
    """fp32 attention of the first `rows` query rows (keys whole)."""
    qf, kf, vf = q[..., :rows, :].float(), k.float(), v.float()
    s = qf @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(s, dim=-1) @ vf


def bench_attention(S, dims, heads_for, dtype, timer: Timer, chunk_bytes) -> list[dict]:
    """Every SDPA backend and the chunked explicit core per head dim d (h = heads_for(d))."""
    device = timer.device
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    out = []
    g = torch.Generator(device=device).manual_seed(0)
    for d in dims:
        h = heads_for(d)
        q, k, v = (_randn(1, h, S, d, dtype=dtype, device=device, gen=g) for _ in range(3))
        ref = _reference_rows(q, k, v, min(S, 256))
        flops = 4 * h * S * S * d
        row = {"op": "attention", "shape": [h, S, S, d], "flops": flops}
        for name, bk in backends.items():
            if name == "math" and h * S * S * 4 > 8 * 2 ** 30:
                out.append({**row, "backend": name, "error": "skipped: scores over 8 GiB"})
                continue
            try:
                with sdpa_kernel([bk]):
                    fn = lambda: F.scaled_dot_product_attention(q, k, v)   # noqa: E731
                    y = fn()
                    err = relative_error(y[..., :ref.shape[-2], :], ref)
                    del y
                    t = timer(fn)
                out.append({**row, "backend": name, **t, "rel_err_vs_fp32": err,
                            "tflops": flops / (t["median_ms"] * 1e-3) / 1e12})
            except Exception as e:  # no kernel for this head dim / dtype / device
                out.append({**row, "backend": name,
                            "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
            sync(device)
        fn = lambda: torch.ops.helix.chunked_attention(q, k, v, None, False, None, chunk_bytes, 0)  # noqa: E731
        err = relative_error(fn()[..., :ref.shape[-2], :], ref)
        t = timer(fn)
        out.append({**row, "backend": "explicit", "chunk_bytes": chunk_bytes, **t,
                    "rel_err_vs_fp32": err, "tflops": flops / (t["median_ms"] * 1e-3) / 1e12})
        del q, k, v
    return out


VARIANT_HEADS = 8


def bench_attention_variants(S, dims, heads_for, dtype, timer: Timer) -> list[dict]:
    """Fused SDPA backends (those with a kernel for d) as plans run them: causal (is_causal) and with a materialized bool
    mask (HF's (1, 1, S, S)), per head dim d; and with V narrower than Q, K (a qk-gather core:
    V at d/m) at d_v = d/2 .. 8, under each mask. FLOPs count every score:
    2 * h * S^2 * (d + d_v)."""
    device = timer.device
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    out = []
    g = torch.Generator(device=device).manual_seed(1)
    keep = torch.ones(S, S, dtype=torch.bool, device=device).tril()[None, None]
    for d in dims:
        # at least VARIANT_HEADS heads: a grid of (heads x query tiles) that fills the GPU, as a
        # plan's micro-batch of several sequences does (one head of 10k rows is 79 tiles: at
        # d = 512, d_v = 32 that ran at 125 TFLOP/s where 16 heads in a plan ran at 160)
        h = max(heads_for(d), VARIANT_HEADS)
        q, k = (_randn(1, h, S, d, dtype=dtype, device=device, gen=g) for _ in range(2))
        cases = [(d, "causal"), (d, "tensor")]
        cases += [(dv, mk) for dv in (d // 2, d // 4, d // 8, d // 16) if dv >= 8
                  for mk in ("none", "causal", "tensor")]
        for d_v, mask in cases:
            v = _randn(1, h, S, d_v, dtype=dtype, device=device, gen=g)
            flops = 2 * h * S * S * (d + d_v)
            row = {"op": "attention", "shape": [h, S, S, d], "value_dim": d_v, "mask": mask,
                   "flops": flops}
            kw = {"is_causal": True} if mask == "causal" else (
                {"attn_mask": keep} if mask == "tensor" else {})
            for name, bk in backends.items():
                limit = KERNEL_MAX_HEAD_DIM[name]
                if limit is not None and d > limit:
                    continue            # no such kernel (the efficient one runs at d = 512)
                try:
                    with sdpa_kernel([bk]):
                        fn = lambda: F.scaled_dot_product_attention(q, k, v, **kw)  # noqa: E731
                        fn()
                        t = timer(fn)
                    out.append({**row, "backend": name, **t,
                                "tflops": flops / (t["median_ms"] * 1e-3) / 1e12})
                except Exception as e:  # no kernel for these dims / this mask
                    out.append({**row, "backend": name,
                                "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
                sync(device)
            del v
        del q, k
    return out


def bench_chunk_sweep(S, d, heads, dtype, timer: Timer, sizes) -> list[dict]:
    """The explicit core at head dim d for several chunk sizes (bytes of scores per block)."""
    device = timer.device
    out = []
    for h in heads:
        q, k, v = (_randn(1, h, S, d, dtype=dtype, device=device) for _ in range(3))
        flops = 4 * h * S * S * d
        for cb in sizes:
            try:
                t = timer(lambda: torch.ops.helix.chunked_attention(q, k, v, None, False, None,
                                                                      cb, 0))
                out.append({"op": "explicit_chunk_sweep", "shape": [h, S, S, d],
                            "chunk_bytes": cb, **t,
                            "tflops": flops / (t["median_ms"] * 1e-3) / 1e12})
            except torch.OutOfMemoryError:
                out.append({"op": "explicit_chunk_sweep", "shape": [h, S, S, d],
                            "chunk_bytes": cb, "error": "out of memory"})
                torch.cuda.empty_cache()
        # the score-reduce tail (scores already materialized): chunked_attend
        s = _randn(1, h, S, S, dtype=dtype, device=device)
        for cb in sizes[:: max(1, len(sizes) // 3)]:
            t = timer(lambda: torch.ops.helix.chunked_attend(s, v, None, False, 0.05, cb))
            out.append({"op": "chunked_attend", "shape": [h, S, S, d], "chunk_bytes": cb, **t})
        t = timer(lambda: torch.ops.helix.attend(s, v, None, False, 0.05))
        out.append({"op": "attend", "shape": [h, S, S, d], **t})
        del q, k, v, s
    return out


def bench_memory_ops(rows, width, mlp_width, dtype, timer: Timer) -> list[dict]:
    device = timer.device
    out = []
    x = _randn(rows, width, dtype=dtype, device=device)
    y = _randn(rows, width, dtype=dtype, device=device)
    w, b = torch.ones(width, dtype=dtype, device=device), torch.zeros(width, dtype=dtype, device=device)
    e = x.element_size()
    cases = [
        ("copy", lambda: x.clone(), 2 * rows * width * e),
        ("layer_norm", lambda: F.layer_norm(x, (width,), w, b), 2 * rows * width * e),
        ("add", lambda: x + y, 3 * rows * width * e),
        ("softmax", lambda: torch.softmax(x, dim=-1), 2 * rows * width * e),
    ]
    h = _randn(rows, mlp_width, dtype=dtype, device=device)
    cases.append(("gelu", lambda: F.gelu(h), 2 * rows * mlp_width * e))
    # a block's tail as the rank graphs run it: bias add after the reduction (2 passes),
    # residual add (3), the next layer norm (2): 7 passes of rows x width
    cases.append(("block_tail", lambda: F.layer_norm(x + (y + b), (width,), w, b),
                  7 * rows * width * e))
    for name, fn, nbytes in cases:
        t = timer(fn)
        out.append({"op": name, "shape": [rows, mlp_width if name == "gelu" else width],
                    "bytes": nbytes, **t, "gb_s": nbytes / (t["median_ms"] * 1e-3) / 1e9})
    return out


def bench_softmax_rows(S, row_blocks, dtype, timer: Timer) -> list[dict]:
    """Softmax over rows of S scores: a full head (S rows) and L2-sized blocks."""
    device = timer.device
    out = []
    for rows in row_blocks:
        x = _randn(rows, S, dtype=dtype, device=device)
        nbytes = 2 * x.numel() * x.element_size()
        t = timer(lambda: torch.softmax(x, dim=-1))
        out.append({"op": "softmax_rows", "shape": [rows, S], "bytes": nbytes, **t,
                    "gb_s": nbytes / (t["median_ms"] * 1e-3) / 1e9})
        del x
    return out


def bench_score_ops(widths, dtype, timer: Timer, block_bytes=256 << 20) -> list[dict]:
    """An explicit core's passes over one block of scores (h, S, S), as kernels_chunked runs
    them, per sequence length S: the scale (a multiply), the softmax, the causal fill (the mask
    compared from aranges, masked_fill_ in place), the softmax of causally masked rows (half
    -inf: measured slower, 871 against 1012 GB/s at S = 8192). GB/s count the score bytes read and
    written (2 passes), so the cost model's pass counts use them as they are."""
    device = timer.device
    out = []
    for S in widths:
        h = max(1, block_bytes // (S * S * torch.empty((), dtype=dtype).element_size()))
        s = _randn(h, S, S, dtype=dtype, device=device)
        nbytes = 2 * s.numel() * s.element_size()
        rows = torch.arange(S, device=device).unsqueeze(-1)
        cols = torch.arange(S, device=device)

        def fill():
            s.masked_fill_(cols > rows, float("-inf"))

        # in this order: the softmax of random scores, then the fill (in place: from here on
        # the upper triangle is -inf), then the softmax of the causally masked scores
        for op, fn in (("pointwise", lambda: s * 0.05), ("softmax", lambda: torch.softmax(s, -1)),
                       ("mask_fill", fill), ("masked_softmax", lambda: torch.softmax(s, -1))):
            t = timer(fn)
            out.append({"op": op, "shape": [h * S, S], "bytes": nbytes, **t,
                        "gb_s": nbytes / (t["median_ms"] * 1e-3) / 1e9})
        del s
    return out


# --- the profile ----------------------------------------------------------------------
def _sig(x: float) -> float:
    return round(x, 1) if x >= 10 else float(f"{x:.3g}")


def make_profile(meas: dict, info: dict, chunk_bytes: int):
    """A ComputeProfile from the measurements (see the module docstring)."""
    fp16, bf16, fp32, hbm = datasheet(info.get("device", ""))
    note = f"measured, {info.get('device')}, torch {info.get('torch')}, {info.get('date')}"
    rates = []
    bound = [r for r in meas["matmul"] if r["intensity"] >= 300] or meas["matmul"]
    for r in bound:                       # compute-bound GEMMs: the roofline prices the rest
        rates.append(Rate(op="matmul", shape=tuple(r["shape"]), dtype="fp16",
                          tflops=_sig(r["tflops"]), note=note))
    for r in meas["attention"]:
        if "tflops" not in r or r["backend"] == "math":
            continue
        d = r["shape"][-1]
        if r["backend"] in ("flash", "cudnn") and d > 256:
            continue        # the profile's KERNEL_MAX_HEAD_DIM says so; keep them consistent
        extra = f"; chunk {r['chunk_bytes'] >> 20} MiB" if r["backend"] == "explicit" else ""
        rates.append(Rate(op="attention", backend=r["backend"], shape=tuple(r["shape"]),
                          dtype="fp16", tflops=_sig(r["tflops"]),
                          note=f"{note}: {r['median_ms']:.3f} ms{extra}"))
    for r in meas.get("attention_variants", ()):
        if "tflops" not in r:
            continue
        d_v = r["value_dim"] if r["value_dim"] != r["shape"][-1] else 0
        rates.append(Rate(op="attention", backend=r["backend"], shape=tuple(r["shape"]),
                          dtype="fp16", tflops=_sig(r["tflops"]), mask=r["mask"], value_dim=d_v,
                          note=f"{note}: {r['median_ms']:.3f} ms"))
    for r in meas.get("score_gemms", ()):   # an explicit core's QK^T and PV, per slice d/m
        bh, S_ = r["shape"][0], r["shape"][1]
        dk = r["shape"][3] if r["op"] == "qk_gemm" else r["shape"][2]
        rates.append(Rate(op=r["op"], shape=(bh, S_, S_, dk), dtype="fp16",
                          tflops=_sig(r["tflops"]), note=f"{note}: {r['median_ms']:.3f} ms"))
    # softmax: whole rows of one head's scores (the explicit core's blocks are whole heads at
    # its chunk size), the widest measured
    softmax_gb_s = max(meas["softmax_rows"], key=lambda r: r["shape"][0] * r["shape"][1])["gb_s"]
    # memory-bound classes by row width: the score passes per S, the model's own tensors
    mem_rows = list(meas.get("score_ops", ()))
    if not any(r["op"] == "masked_softmax" for r in mem_rows):
        # runs before masked_softmax was its own row timed "softmax" after the in-place causal
        # fill of the same scores: that softmax is the masked one
        mem_rows = [{**r, "op": "masked_softmax"} if r["op"] == "softmax" else r
                    for r in mem_rows]
    mem_rows += [{**r, "op": "softmax"} for r in meas["softmax_rows"]]
    for r in meas["memory_ops"]:
        op = {"add": "pointwise", "layer_norm": "norm", "softmax": "softmax"}.get(r["op"])
        if op:
            mem_rows.append({**r, "op": op})
    for r in mem_rows:
        rates.append(Rate(op=r["op"], shape=tuple(r["shape"]), dtype="fp16",
                          gb_s=_sig(r["gb_s"]), note=f"{note}: {r['median_ms']:.3f} ms"))
    mem = {r["op"]: r for r in meas["memory_ops"]}
    if "block_tail" in mem:          # the cost model's norm + residual term, as the graph runs it
        ew_bytes, ew_ms = mem["block_tail"]["bytes"], mem["block_tail"]["median_ms"]
    else:
        ew_bytes = mem["layer_norm"]["bytes"] + mem["add"]["bytes"]
        ew_ms = mem["layer_norm"]["median_ms"] + mem["add"]["median_ms"]
    name = f"{info.get('device', 'gpu')}-torch{info.get('torch', '').split('+')[0]}-calibrated"
    return ComputeProfile(
        name=name.replace(" ", "-"), device=f"{info.get('device')} (measured {info.get('date')})",
        peak_tflops=(("fp16", fp16), ("bf16", bf16), ("fp32", fp32)), hbm_gb_s=hbm,
        softmax_gb_s=_sig(softmax_gb_s),
        elementwise_gb_s=_sig(ew_bytes / (ew_ms * 1e-3) / 1e9), rates=tuple(rates))


def calibrate(device=None, small: bool = False, repeats: int = 10,
              chunk_bytes: int | None = None) -> tuple[dict, ComputeProfile]:
    """(measurements, ComputeProfile) on `device` (the GPU when there is one)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    info = device_info(device)
    S = 256 if small else 10_000
    dims = (16, 32) if small else HEAD_DIMS
    top = max(dims)
    heads_for = lambda dk: max(1, top // dk)          # noqa: E731  same FLOPs as one head of `top`
    if small:
        repeats = min(repeats, 3)
    timer = Timer(device, repeats=repeats)
    meas: dict = {"info": info}
    t0 = time.perf_counter()
    meas["memory_ops"] = bench_memory_ops(1024 if small else 40_000, 256 if small else 8192,
                                          64 if small else 2048, dtype, timer)
    log.info("[calibrate] memory ops %.1f s", time.perf_counter() - t0)
    meas["softmax_rows"] = bench_softmax_rows(S, (64, 256) if small else (1024, 2048, 10_000),
                                              dtype, timer)
    meas["matmul"] = bench_matmul(matmul_shapes(small), dtype, timer)
    log.info("[calibrate] matmul %.1f s", time.perf_counter() - t0)
    slices = sorted({top // m for m in (1, 2, 4, 8, 16) if top // m >= 1})
    meas["score_gemms"] = bench_score_gemms(S, slices, lambda dk: 1, dtype, timer)
    log.info("[calibrate] score gemms %.1f s", time.perf_counter() - t0)
    sizes = [2 ** k for k in ((12, 14, 16) if small else (24, 26, 27, 28, 29, 30))]
    meas["chunk_sweep"] = bench_chunk_sweep(S, top, (1, 2) if small else (1, 2, 16), dtype,
                                            timer, sizes)
    log.info("[calibrate] chunk sweep %.1f s", time.perf_counter() - t0)
    chunk_bytes = chunk_bytes or best_chunk_bytes(meas, 1) or DEFAULT_CHUNK_BYTES
    meas["chunk_bytes"] = chunk_bytes
    meas["attention"] = bench_attention(S, dims, heads_for, dtype, timer, chunk_bytes)
    log.info("[calibrate] attention %.1f s", time.perf_counter() - t0)
    meas["score_ops"] = bench_score_ops((128, 256) if small else (4096, 8192, 10_000, 16_384),
                                        dtype, timer)
    log.info("[calibrate] score ops %.1f s", time.perf_counter() - t0)
    meas["attention_variants"] = bench_attention_variants(S, dims, heads_for, dtype, timer)
    log.info("[calibrate] attention variants %.1f s", time.perf_counter() - t0)
    profile = make_profile(meas, info, chunk_bytes)
    meas["seconds"] = round(time.perf_counter() - t0, 1)
    return meas, profile


def best_chunk_bytes(meas: dict, heads: int = 1) -> int | None:
    rows = [r for r in meas.get("chunk_sweep", []) if r.get("op") == "explicit_chunk_sweep"
            and "median_ms" in r and r["shape"][0] == heads]
    return min(rows, key=lambda r: r["median_ms"])["chunk_bytes"] if rows else None


def profile_yaml(profile, info: dict, command: str) -> str:
    head = (f"# Measured compute profile (helix calibrate).\n# device: {info.get('device')}\n"
            f"# torch: {info.get('torch')}  cuda: {info.get('cuda')}\n# date: {info.get('date')}\n"
            f"# command: {command}\n# peaks (peak_tflops, hbm_gb_s) are the device's datasheet "
            f"figures; rates are measured.\n")
    return head + profile.to_yaml()


def summary_table(meas: dict) -> str:
    lines = ["op                         shape                         ms       TFLOP/s | GB/s"]
    for r in meas["matmul"]:
        lines.append(f"matmul                     {str(r['shape']):28s} {r['median_ms']:8.3f} "
                     f"{r['tflops']:8.1f}")
    for r in meas["attention"]:
        v = (f"{r['median_ms']:8.3f} {r['tflops']:8.1f}  err {r['rel_err_vs_fp32']:.1e}"
             if "tflops" in r else r.get("error", "")[:60])
        lines.append(f"attention {r['backend']:16s} {str(r['shape']):28s} {v}")
    for r in meas["memory_ops"] + meas["softmax_rows"]:
        lines.append(f"{r['op']:26s} {str(r['shape']):28s} {r['median_ms']:8.3f} "
                     f"{r['gb_s']:8.0f} GB/s")
    return "\n".join(lines)


def main(argv=None) -> int:
    configure_logging()
    ap = argparse.ArgumentParser(prog="helix calibrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="profile.yaml", help="profile YAML to write")
    ap.add_argument("--json", default=None, help="also write every measurement here")
    ap.add_argument("--small", action="store_true", help="tiny shapes (a test of the script)")
    ap.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--chunk-mib", type=int, default=None,
                    help="chunk of scores for the explicit core (default: kernels_chunked)")
    ap.add_argument("--from-json", default=None,
                    help="rebuild the profile from an earlier --json (no measuring)")
    args = ap.parse_args(argv)
    command = "helix calibrate " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.from_json:
        meas = json.loads(Path(args.from_json).read_text())
        profile = make_profile(meas, meas["info"], meas.get("chunk_bytes") or 0)
        command = meas.get("command", command) + f"  (profile rebuilt: {command})"
    else:
        meas, profile = calibrate(args.device, args.small, args.repeats,
                                  None if args.chunk_mib is None else args.chunk_mib << 20)
    meas["command"] = command
    meas["best_chunk_bytes"] = {h: best_chunk_bytes(meas, h) for h in (1, 2, 16)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(profile_yaml(profile, meas["info"], command))
    if args.json:
        Path(args.json).write_text(json.dumps(meas, indent=1))
    print(summary_table(meas))
    print(f"profile: {args.out}  softmax {profile.softmax_gb_s} GB/s  elementwise "
          f"{profile.elementwise_gb_s} GB/s  ({meas['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
