"""The flash-attention Triton kernel at d = 512 (helix_compiler/runtime/triton_flash.py) on the GPU:
every launch configuration of its table timed and checked, against the explicit chunked path.

    python benchmarks/gpu_triton_flash.py --out benchmarks/results/triton_flash_h200.json
    TRITON_INTERPRET=1 python benchmarks/gpu_triton_flash.py --tiny --out /tmp/flash_tiny.json

The paper model's attention core (helix_compiler/models/paper.py): B = 1, H = 16, T = S = 10000,
d = d_v = 512, fp16, no mask, non-causal. Rows:
  `explicit`: torch.ops.helix.chunked_attention with kernels_chunked.USE_TRITON = False (the
      blocks of Q K^T -> softmax -> P V that run today);
  `op`: the same op with the switch on (the kernel at its DEFAULT_CONFIG, as the graph runs it);
  one row per entry of triton_flash.CONFIGS (a config that does not compile is a row with its
      error);
  then `causal` (is_causal, T = S) and `B=2` rows for DEFAULT_CONFIG and the three fastest
      configs of the sweep.
Each: ms per call (CUDA events around `iters` back-to-back calls after `warmup`,
measure.timing.loop_seconds), TFLOP/s of useful work (4 B H d x visible (query, key) pairs:
4 B H T S d without a mask; the dv_split recompute of Q K^T is not counted), and the error of
out against the explicit path in fp32 (no TF32) on a slice (batch all, heads 0-1, the first
`ref_rows` query rows): the norm-relative error and max |err| / max |ref|. Under 3 minutes on an
H200. `--tiny` (B 1, H 2, T = S = 80, d 512) runs end to end on the CPU in Triton's interpreter.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helix_compiler.measure.timing import loop_seconds  # noqa: E402
from helix_compiler.numerics import relative_error  # noqa: E402
from helix_compiler.runtime import kernels_chunked, triton_flash, triton_inputs  # noqa: E402
from helix_compiler.runtime.kernels_chunked import DEFAULT_CHUNK_BYTES  # noqa: E402
from helix_compiler.runtime.triton_flash import (  # noqa: E402
    CONFIGS, DEFAULT_CONFIG, flash_attention_triton)

FULL = {"B": 1, "H": 16, "T": 10000, "S": 10000, "d": 512}
TINY = {"B": 1, "H": 2, "T": 80, "S": 80, "d": 512}
REF_ROWS = 1024                 # query rows of the fp32 reference slice
FOLLOW_UP = 3                   # fastest sweep configs also timed causal and at B = 2


def useful_flops(B, H, T, S, d, causal) -> float:
    """4 d flops (Q K^T and P V) per visible (query, key) pair: top-left causal row i sees
    min(i + 1, S) keys."""
    pairs = sum(min(i + 1, S) for i in range(T)) if causal else T * S
    return 4.0 * B * H * pairs * d


def make_inputs(shape, dev, gen):
    B, H, T, S, d = (shape[k] for k in ("B", "H", "T", "S", "d"))
    q = torch.randn(B, H, T, d, device=dev, dtype=torch.float16, generator=gen)
    k = torch.randn(B, H, S, d, device=dev, dtype=torch.float16, generator=gen)
    v = torch.randn(B, H, S, d, device=dev, dtype=torch.float16, generator=gen)
    return q, k, v


def explicit_op(q, k, v, causal):
    """torch.ops.helix.chunked_attention with the flash kernel switched off."""
    kernels_chunked.USE_TRITON = False
    try:
        return torch.ops.helix.chunked_attention(q, k, v, None, causal, q.shape[-1] ** -0.5,
                                                 DEFAULT_CHUNK_BYTES, 0)
    finally:
        kernels_chunked.USE_TRITON = True


def reference(q, k, v, causal, rows):
    """out[:, :2, :rows] by the explicit path in fp32 (no TF32)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    return explicit_op(q[:, :2, :rows].float(), k[:, :2].float(), v[:, :2].float(), causal)


def errors(out, ref) -> dict:
    got = out[:, :2, :ref.shape[2]].double()
    ref = ref.double()
    diff = got - ref
    return {"rel_error": relative_error(got, ref),
            "max_rel_error": float(diff.abs().max() / ref.abs().max()),
            "nan": bool(out.isnan().any())}


def measure(name, fn, flops, ref, iters, warmup, dev) -> dict:
    row = {"name": name}
    try:
        out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    except Exception as e:          # noqa: BLE001  (a config out of shared memory / registers)
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        return row
    row.update(errors(out, ref))
    del out
    s = loop_seconds(fn, iters, warmup, dev)
    row.update(ms=s * 1e3, tflops=flops / s / 1e12)
    return row


def run_case(label, shape, causal, configs, args, dev, gen, with_explicit) -> list[dict]:
    q, k, v = make_inputs(shape, dev, gen)
    flops = useful_flops(shape["B"], shape["H"], shape["T"], shape["S"], shape["d"], causal)
    ref = reference(q, k, v, causal, min(REF_ROWS, shape["T"]))
    scale = shape["d"] ** -0.5
    cases = {}
    if with_explicit:
        cases["explicit"] = lambda: explicit_op(q, k, v, causal)
        cases["op"] = lambda: torch.ops.helix.chunked_attention(q, k, v, None, causal, scale,
                                                                DEFAULT_CHUNK_BYTES, 0)
    for cfg in configs:
        cases[cfg.name] = (lambda c: lambda: flash_attention_triton(q, k, v, None, causal, scale,
                                                                    config=c))(cfg)
    rows = []
    for name, fn in cases.items():
        row = {"case": label, **shape, "causal": causal, "flops": flops,
               **measure(name, fn, flops, ref, args.iters, args.warmup, dev)}
        cfg = next((c for c in configs if c.name == name), None)
        if cfg is not None:
            row["config"] = {f: getattr(cfg, f) for f in
                             ("block_m", "block_n", "num_warps", "num_stages", "dv_split")}
        rows.append(row)
        print(f"{label:>10} {name:>24}: " + (
            f"{row['ms']:9.3f} ms {row['tflops']:7.1f} TFLOP/s  rel err {row['rel_error']:.1e} "
            f"max rel {row['max_rel_error']:.1e}{'  NaN' if row['nan'] else ''}"
            if "error" not in row else row["error"]), flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/triton_flash_h200.json")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--tiny", action="store_true",
                   help="B 1, H 2, T = S = 80: a check of the script "
                        "(the CPU under TRITON_INTERPRET=1)")
    args = p.parse_args(argv)
    if triton_flash.triton is None:
        print("error: gpu_triton_flash needs triton", file=sys.stderr)
        return 2
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and not (args.tiny and triton_inputs.interpreting()):
        print("error: without a CUDA GPU, run --tiny with TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    shape = TINY if args.tiny else FULL
    t0 = time.time()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter)"
    result = {"device": name,
              "torch": torch.__version__, "triton": triton_flash.triton.__version__,
              "python": platform.python_version(), "command": "python " + " ".join(sys.argv),
              "shape": shape, "dtype": "float16", "default_config": DEFAULT_CONFIG.name,
              "ref_rows": REF_ROWS, "iters": args.iters, "warmup": args.warmup, "rows": []}
    gen = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        rows = run_case("dense", shape, False, CONFIGS, args, dev, gen, with_explicit=True)
        timed = sorted((r for r in rows if "ms" in r and r["name"] not in ("explicit", "op")),
                       key=lambda r: r["ms"])
        best = [c for c in CONFIGS if c.name in {r["name"] for r in timed[:FOLLOW_UP]}]
        follow = [DEFAULT_CONFIG] + [c for c in best if c != DEFAULT_CONFIG]
        rows += run_case("causal", shape, True, follow, args, dev, gen, with_explicit=True)
        rows += run_case("B=2", shape | {"B": 2}, False, follow, args, dev, gen, with_explicit=True)
    result["rows"] = rows
    result["fastest_dense"] = timed[0]["name"] if timed else None
    result["seconds"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"fastest dense config {result['fastest_dense']}; wrote {args.out} in "
          f"{result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
