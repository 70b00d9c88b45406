"""The split-KV Triton chunk core (helix_compiler/runtime/triton_chunk.py) on the GPU: checked
against the explicit math, then timed against it.

    python benchmarks/gpu_triton_chunk.py --out benchmarks/results/triton_chunk_h200.json
    python benchmarks/gpu_triton_chunk.py --sweep --out benchmarks/results/triton_chunk_h200_sweep.json

One rank's chunk of a sequence-split KV cache at C = 131072 positions, 8 query heads over 1 kv
head, d = 128, one decode step (T = 1): B = 1, 2, 4 in fp16, B = 2 in fp32, B = 4 in bf16. K
and V are the second half of a cache of 2 C positions (the strides a rank's slice of a real
cache has). The mask is Hugging Face's: finfo(fp32).min on the left padding of sequence 1 (its
first 1000 keys), sequence 2 fully padded (finfo.min everywhere: a uniform softmax), and in
B = 4 sequence 3 with every key -inf (a dead row: out 0, lse -inf).

(1) correctness: relative error of out (all rows) and of lse (finite rows) against the exact
math in fp32 (`chunk_attention_math`), NaN anywhere, dead rows exactly 0 / -inf.
(2) time: the kernel, the exact fp32 math (`math_fp32`) and the explicit core as the built
graph runs it today (`explicit`: fp32 scores, P @ V in the cache's dtype); CUDA events around
`iters` calls after `warmup` calls, eager and replayed as one CUDA graph; each call reads a
different one of `copies` caches (together >= 4x the 60 MB L2) so K and V come from HBM. The
achieved bandwidth counts K and V bytes once per call. `--sweep` also times fixed (BLOCK_N,
splits) choices. Under 2 minutes on an H200.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helix_compiler.measure.timing import cuda_graphed, loop_seconds  # noqa: E402
from helix_compiler.runtime import triton_chunk  # noqa: E402
from helix_compiler.runtime.chunk_core import chunk_attention_math  # noqa: E402
from helix_compiler.runtime.triton_chunk import (  # noqa: E402
    chunk_attention_triton)

C, HKV, G, D, T = 131072, 1, 8, 128, 1
CASES = [(1, torch.float16), (2, torch.float16), (4, torch.float16), (2, torch.float32),
         (4, torch.bfloat16)]
L2_ROTATION_BYTES = 4 * 60e6          # caches cycled through per timing: 4x the H200's L2
# --sweep: splits as stage 1 programs per multiprocessor (x B H_kv / 132), BLOCK_N, warps, stages
SWEEP_PROGRAMS_PER_SM = (0.25, 0.5, 1, 2)
SWEEP_BLOCK_N = {2: (64, 128), 4: (32, 64)}         # by element size
SWEEP_WARPS, SWEEP_STAGES = (4, 8), (2, 3, 4)


def rel_error(got, want) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def make_case(B, dtype, dev, gen, copies=1):
    q = torch.randn(B, HKV * G, T, D, device=dev, dtype=dtype, generator=gen)
    caches = []
    for _ in range(copies):
        k = torch.randn(B, HKV, 2 * C, D, device=dev, dtype=dtype, generator=gen)[:, :, C:]
        v = torch.randn(B, HKV, 2 * C, D, device=dev, dtype=dtype, generator=gen)[:, :, C:]
        caches.append((k, v))
    bias = torch.zeros(B, 1, T, C, device=dev, dtype=torch.float32)
    low = torch.finfo(torch.float32).min
    if B > 1:
        bias[1, ..., :1000] = low                  # left-padded
    if B > 2:
        bias[2] = low                              # fully padded: uniform softmax
    if B > 3:
        bias[3] = float("-inf")                    # no visible key: out 0, lse -inf
    return q, caches, bias


def check(B, dtype, dev, gen) -> dict:
    q, [(k, v)], bias = make_case(B, dtype, dev, gen)
    scale = D ** -0.5
    out, lse = chunk_attention_triton(q, k, v, bias, scale)
    want_out, want_lse = chunk_attention_math(q, k, v, bias, scale)
    dead = want_lse == float("-inf")
    live = ~dead
    row = {"out_rel_error": rel_error(out.float(), want_out.float()),
           "lse_max_abs_error_live_rows": float((lse[live] - want_lse[live]).abs().max()),
           "lse_rel_error_live_rows": rel_error(lse[live], want_lse[live]),
           "nan": bool(out.isnan().any() or lse.isnan().any()),
           "dead_rows": int(dead.sum()),
           "dead_rows_exact": bool((out[dead] == 0).all() and (lse[dead] == float("-inf")).all()),
           "fully_padded_lse": float(lse[2].mean()) if B > 2 else None}
    if B > 2:        # per-row rel errors of the padded / fully padded rows on their own
        row["out_rel_error_fully_padded_row"] = rel_error(out[2].float(), want_out[2].float())
        row["out_rel_error_left_padded_row"] = rel_error(out[1].float(), want_out[1].float())
    return row


def explicit_core(q, k, v, bias, scale):
    """The explicit chunk core as the built graph runs it today (benchmarks/gpu_decode.py
    `_chunk_core`): q k^T in the cache's dtype, fp32 scores, max, exp, sum, P @ V in v's dtype;
    timed only (a dead row gives NaN there: 0 / 0)."""
    B, H, T, d = q.shape
    Hkv = k.shape[1]
    x = (q.reshape(B, Hkv, -1, d) @ k.transpose(-1, -2)).float().view(B, H, T, -1) * scale + bias
    m = x.amax(-1, keepdim=True).clamp(torch.finfo(x.dtype).min)
    e = torch.exp(x - m)
    l = e.sum(-1, keepdim=True)
    o = (e.to(v.dtype).view(B, Hkv, H // Hkv * T, -1) @ v).view(B, H, T, -1)
    return o / l.to(o.dtype), (m + l.log()).squeeze(-1)


def _time(fn, iters, warmup) -> float:
    """ms per fn()."""
    return loop_seconds(fn, iters, warmup, torch.device("cuda")) * 1e3


def timing(B, dtype, dev, gen, iters, warmup, configs) -> dict:
    kv_bytes = 2 * B * HKV * C * D * torch.finfo(dtype).bits // 8
    copies = max(1, math.ceil(L2_ROTATION_BYTES / kv_bytes))
    q, caches, bias = make_case(B, dtype, dev, gen, copies)
    scale = D ** -0.5

    def rotating(core):
        def fn():
            for k, v in caches:
                core(q, k, v, bias, scale)
        return fn

    cores = {"math_fp32": chunk_attention_math, "explicit": explicit_core}
    for config in configs(B, dtype):
        name = "triton" if not config else "triton_" + "_".join(f"{k}{v}" for k, v in config.items())
        name = name.replace("num_splits", "s").replace("block_n", "n").replace("num_warps", "w") \
            .replace("num_stages", "st")
        cores[name] = (lambda kw: lambda *a: chunk_attention_triton(*a, **kw))(config)
    row = {"kv_bytes": kv_bytes, "copies": copies}
    for name, core in cores.items():
        fn = rotating(core)
        try:
            fn()
        except Exception as e:          # noqa: BLE001  (a sweep config out of shared memory)
            row[name] = {"failed": str(e).splitlines()[0][:200]}
            continue
        eager = _time(fn, iters, warmup) / copies
        graphed = cuda_graphed(fn, torch.device("cuda"))[0]
        replay = _time(graphed, iters, warmup) / copies if graphed is not None else None
        best = replay if replay is not None else eager
        row[name] = {"eager_ms": eager, "graph_ms": replay,
                     "tb_per_s": kv_bytes / (best * 1e-3) / 1e12}
        del graphed
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/triton_chunk_h200.json")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--sweep", action="store_true",
                   help="also time fixed (block_n, num_splits) configurations")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: gpu_triton_chunk needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    import triton
    t0 = time.time()
    result = {"device": torch.cuda.get_device_name(dev),
              "sms": torch.cuda.get_device_properties(dev).multi_processor_count,
              "torch": torch.__version__, "triton": triton.__version__,
              "python": platform.python_version(),
              "command": "python " + " ".join(sys.argv),
              "shape": {"C": C, "H_kv": HKV, "g": G, "d": D, "T": T},
              "settings": {k: getattr(triton_chunk, k) for k in
                           ("_PROGRAMS_PER_SM", "_MIN_KEYS_PER_SPLIT", "_MAX_BLOCK_M", "_TILE_BYTES")},
              "rows": []}
    sms = result["sms"]

    def configs(B, dtype):
        out = [{}]
        if args.sweep:
            size = torch.finfo(dtype).bits // 8
            for p, bn, w, st in itertools.product(SWEEP_PROGRAMS_PER_SM, SWEEP_BLOCK_N[size],
                                                  SWEEP_WARPS, SWEEP_STAGES):
                out.append({"num_splits": max(1, round(p * sms / (B * HKV))), "block_n": bn,
                            "num_warps": w, "num_stages": st})
        return out

    gen = torch.Generator(device=dev).manual_seed(0)
    for B, dtype in CASES:
        row = {"B": B, "dtype": str(dtype).replace("torch.", "")}
        with torch.no_grad():
            row["check"] = check(B, dtype, dev, gen)
            torch.cuda.empty_cache()
            row["time"] = timing(B, dtype, dev, gen, args.iters, args.warmup, configs)
            torch.cuda.empty_cache()
        t = row["time"]
        best = [(k, v["graph_ms"] or v["eager_ms"]) for k, v in t.items()
                if k.startswith("triton_") and isinstance(v, dict) and "failed" not in v]
        print(f"B={B} {row['dtype']}: out rel err {row['check']['out_rel_error']:.2e}, "
              f"nan {row['check']['nan']}, dead exact {row['check']['dead_rows_exact']}; "
              + ", ".join(f"{k} {v['graph_ms'] or v['eager_ms']:.4f} ms ({v['tb_per_s']:.2f} TB/s)"
                          for k, v in t.items() if k in ("math_fp32", "explicit", "triton"))
              + (f"; best {min(best, key=lambda kv: kv[1])}" if best else ""), flush=True)
        result["rows"].append(row)
    result["seconds"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
