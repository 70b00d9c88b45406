"""Whether the space bench's rank timings can tell plans apart at a few percent: the paper
model's data-parallel rank (the whole model) and the m=1 x n=2 and n=4 ranks, timed as
`helix bench --model space` times them (measure.timing.Timer: CUDA events around each call, L2
flushed, median of 10), but round-robin, several rounds, each measurement preceded by
`--soak-s` seconds of the same rank back to back so that every kind is timed at the clocks
that sustained work settles at. Per sequence-equivalent: a rank of n = k does 1/k of a
sequence's work, so k x its time per sequence is what the whole sequence costs on k GPUs.

    python benchmarks/gpu_interleaved.py --out benchmarks/results/interleaved_h200.json
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

from helix_compiler.measure.runners import PaperHelixRunner, run_timed  # noqa: E402
from helix_compiler.measure.timing import Timer  # noqa: E402
from helix_compiler.models.paper import PaperConfig  # noqa: E402
from helix_compiler.planning.cluster import load_cluster  # noqa: E402
from helix_compiler.runtime.kernels_chunked import DEFAULT_CHUNK_BYTES  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/interleaved_h200.json")
    p.add_argument("--splits", default="1,2,4", help="n of the m=1 x n ranks")
    p.add_argument("--b", type=int, default=1, help="sequences per call")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--soak-s", type=float, default=2.0)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: gpu_interleaved needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    cfg = PaperConfig()
    cluster = load_cluster("paper-h200")
    timer = Timer(dev)
    fns = {}
    for n in (int(s) for s in args.splits.split(",")):
        runner = PaperHelixRunner(cfg, 1, n, None, n, cluster, dev,
                                  chunk_bytes=DEFAULT_CHUNK_BYTES, threshold=256)
        b, _, fn = run_timed(runner.make(True), args.b, timer)
        fns[n] = fn
    rows = {n: [] for n in fns}
    t0 = time.time()
    with torch.no_grad():
        for _ in range(args.rounds):
            for n, fn in fns.items():
                end = time.perf_counter() + args.soak_s
                while time.perf_counter() < end:
                    fn()
                    torch.cuda.synchronize()
                soaked = timer(fn)["median_ms"]
                torch.cuda.synchronize()
                time.sleep(1.0)                     # idle: the clocks the bench's first call sees
                cold = timer(fn)["median_ms"]
                rows[n].append({"soaked_ms": soaked, "after_1s_idle_ms": cold,
                                "soaked_ms_per_sequence_equivalent": soaked * n / args.b,
                                "idle_ms_per_sequence_equivalent": cold * n / args.b})
                print(f"n={n}: soaked {soaked:8.2f} ms ({soaked * n / args.b:7.2f} per seq-equiv)"
                      f"  after 1 s idle {cold:8.2f} ({cold * n / args.b:7.2f})", flush=True)
    result = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
              "python": platform.python_version(), "command": "python " + " ".join(sys.argv),
              "b": args.b, "soak_s": args.soak_s, "rounds": {str(n): r for n, r in rows.items()},
              "seconds": round(time.time() - t0, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
