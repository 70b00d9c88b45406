"""Where a helix rank's time goes against a baseline rank of the same partition: both ranks of
the space suite (helix_compiler/measure/space.py's runners, under torch.compile as the suite
runs them), timed soaked, then each one's CUDA kernels by device time (torch.profiler).

    python benchmarks/gpu_rank_profile.py --out benchmarks/results/rank_profile_h200.json
    python benchmarks/gpu_rank_profile.py --small --out /tmp/p.json     # CPU smoke test

Default: the latency choice m=1 x n=16 with sequence-parallel norms, the same split without
them, and the compiled Megatron TP=16, 2 layers of the paper's model, one sequence (the rows of
docs/BENCHMARKS.md, "Every helix rank compiled too"). Collectives are stubbed as the suite
stubs them (measure/stub.py), so the kernels are the rank's compute and the local copies its
real path makes.

Each rank is timed three ways: per call as the suite times it (CUDA events around one call,
then a synchronize: what one sequence's latency pays, the host's start of the call included),
back to back (`loop_ms`: events around `--loop` calls, the host running ahead: what a stream
of micro-batches pays), and the sum of its kernels' device time (`kernel_sum_us`, from
torch.profiler). per call - back to back is the host time a single call exposes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helix_compiler.measure import space  # noqa: E402
from helix_compiler.measure.profiling import kernel_table  # noqa: E402
from helix_compiler.measure.runners import PaperHelixRunner  # noqa: E402
from helix_compiler.measure.timing import Timer, loop_seconds  # noqa: E402
from helix_compiler.models.paper import PaperConfig  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/rank_profile_h200.json")
    p.add_argument("--small", action="store_true", help="a tiny config on the CPU")
    p.add_argument("--n", type=int, default=16, help="head groups (TP degree)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=1, help="sequences per call")
    p.add_argument("--soak-s", type=float, default=1.0)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--loop", type=int, default=50, help="back-to-back calls timed together")
    args = p.parse_args(argv)
    t0 = time.time()
    device = torch.device("cpu" if args.small else "cuda")
    cfg = PaperConfig()
    if args.small:
        cfg = dataclasses.replace(cfg, heads=4, head_dim=16, mlp=128, seq=32, batch=4,
                                  dtype=torch.float32)
    cfg = dataclasses.replace(cfg, layers=args.layers)
    threshold = space.SMALL_THRESHOLD if args.small else space.THRESHOLD
    kw = dict(chunk_bytes=256 << 20, threshold=threshold)
    n = min(args.n, cfg.heads)
    timer = Timer(device, warmup=3, repeats=10, soak_s=0.0 if args.small else args.soak_s)
    ranks = {
        f"helix m=1 x n={n} (compiled, default)":
            lambda: PaperHelixRunner(cfg, 1, n, None, n, None, device, **kw).make(True, "default"),
        f"helix m=1 x n={n} SP (compiled, default)":
            lambda: PaperHelixRunner(cfg, 1, n, None, n, None, device, sequence_parallel=True,
                                     **kw).make(True, "default"),
        f"megatron TP={n} (compiled)":
            lambda: space.MegatronRunner(cfg, n, args.layers, device, **kw).make(True),
    }
    out = {"what": "one rank of each partition, collectives stubbed, under torch.compile; "
                   "median ms per call after a soak, and its kernels by device time per call",
           "device": torch.cuda.get_device_name(device) if device.type == "cuda"
           else platform.processor() or "cpu",
           "torch": torch.__version__, "command": "python " + " ".join(sys.argv),
           "config": {k: str(v) for k, v in dataclasses.asdict(cfg).items()},
           "batch": args.batch, "soak_s": timer.soak_s, "ranks": {}}
    for name, make in ranks.items():
        t1 = time.perf_counter()
        fn = make()(args.batch)
        with torch.no_grad():
            fn()                                            # compiles
            t = timer(fn)
            loop_ms = loop_seconds(fn, args.loop, 3, device) * 1e3
            ks = kernel_table(fn, 10 ** 6, name_len=160) if device.type == "cuda" else []
        kernel_sum = round(sum(k["us_per_call"] for k in ks), 1)
        out["ranks"][name] = {"median_ms": t["median_ms"], "min_ms": t["min_ms"],
                              "max_ms": t["max_ms"], "loop_ms": loop_ms,
                              "kernel_sum_us": kernel_sum, "kernel_count": len(ks),
                              "kernels": ks[:args.top],
                              "wall_s": round(time.perf_counter() - t1, 1)}
        print(f"{name}: {t['median_ms']:.3f} ms per call, {loop_ms:.3f} ms back to back, "
              f"kernels {kernel_sum / 1e3:.3f} ms", flush=True)
        for k in ks[:args.top]:
            print(f"    {k['us_per_call']:9.1f} us x{k['calls_per_step']:g}  {k['name'][:100]}", flush=True)
        del fn
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["seconds"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out} ({out['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
