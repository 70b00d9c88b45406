"""`helix calibrate --collectives`: NCCL collectives inside this machine, fitted to alpha-beta.

    helix calibrate --collectives [--out cluster.yaml] [--json sweep.json] [--base h100x8]

Launches one torchrun process per visible GPU. Each size of all-reduce, all-gather and
reduce-scatter is timed (CUDA events, median of repeats). The cost model's form
t = alpha + c * (p-1)/p * X / busbw (c = 2 for all-reduce, 1 otherwise) is fitted by least
squares; the cluster YAML written is the base preset with `nvlink_busbw_gb_s` and
`nvlink_alpha_us` replaced by the fit (and `gpus_per_node` by the GPUs measured), each with
a comment saying where it came from.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from helix_compiler.planning.cluster import load_cluster
from helix_compiler.errors import HelixError

PRESETS = Path(__file__).resolve().parents[1] / "planning" / "clusters"     # helix_compiler/planning/clusters
SIZES_MIB = (1, 4, 16, 64, 256)
KINDS = ("all_reduce", "all_gather", "reduce_scatter")


def _worker(args) -> int:

    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    rows = []
    for mib in SIZES_MIB:
        n = mib * (1 << 20) // 2
        x = torch.randn(n, device="cuda", dtype=torch.float16)
        gathered = torch.empty(n * world, device="cuda", dtype=torch.float16)
        shard = torch.empty(n // world, device="cuda", dtype=torch.float16)
        ops = {"all_reduce": lambda: dist.all_reduce(x),
               "all_gather": lambda: dist.all_gather_into_tensor(gathered, x),
               "reduce_scatter": lambda: dist.reduce_scatter_tensor(shard, x)}
        for kind, fn in ops.items():
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(args.repeats):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                torch.cuda.synchronize()
                times.append(s.elapsed_time(e) * 1e-3)
            # X: the full tensor (the gathered one for all-gather), as the cost model counts it
            full = n * 2 * (world if kind == "all_gather" else 1)
            rows.append({"kind": kind, "bytes": full, "seconds": statistics.median(times)})
    if rank == 0:
        fit = _fit(rows, world)
        result = {"device": torch.cuda.get_device_name(), "gpus": world, "torch": torch.__version__,
                  "date": datetime.date.today().isoformat(), "command": " ".join(["helix calibrate --collectives"] + args.argv),
                  "rows": rows, "fit": fit}
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        _write_cluster(args, result)
        for r in rows:
            print(f"{r['kind']:<15} {r['bytes'] / 2**20:7.0f} MiB  {r['seconds'] * 1e3:8.3f} ms")
        print(f"fit over {world} GPUs: busbw {fit['busbw_gb_s']:.0f} GB/s, alpha {fit['alpha_us']:.1f} us "
              f"-> {args.out}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _fit(rows, p: int) -> dict:
    """Least squares for t = alpha + c (p-1)/p X * inv_bw over every row."""

    a = np.array([[1.0, (2.0 if r["kind"] == "all_reduce" else 1.0) * (p - 1) / p * r["bytes"]] for r in rows])
    t = np.array([r["seconds"] for r in rows])
    (alpha, inv_bw), *_ = np.linalg.lstsq(a, t, rcond=None)
    return {"alpha_us": float(max(alpha, 0.0) * 1e6), "busbw_gb_s": float(1.0 / inv_bw / 1e9)}


def _write_cluster(args, result) -> None:

    base = load_cluster(args.base)
    src = PRESETS / f"{args.base}.yaml"
    data = yaml.safe_load(src.read_text()) if src.is_file() else yaml.safe_load(Path(args.base).read_text())
    fit = result["fit"]
    data.update({"name": f"{base.name}-measured", "gpus_per_node": result["gpus"],
                 "nvlink_busbw_gb_s": round(fit["busbw_gb_s"], 1), "nvlink_alpha_us": round(fit["alpha_us"], 2)})
    head = (f"# {base.name} with NVLink figures measured by `helix calibrate --collectives` on "
            f"{result['gpus']} x {result['device']}, torch {result['torch']}, {result['date']}:\n"
            f"# nvlink_busbw_gb_s / nvlink_alpha_us: least-squares alpha-beta fit of all-reduce, "
            f"all-gather and reduce-scatter at {', '.join(str(s) for s in SIZES_MIB)} MiB (fp16).\n"
            f"# Other figures are the {base.name} preset's, with its sources.\n")
    Path(args.out).write_text(head + yaml.safe_dump(data, sort_keys=False))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="helix calibrate --collectives", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="cluster-measured.yaml", help="cluster YAML to write")
    ap.add_argument("--json", default=None, help="also write every timing here")
    ap.add_argument("--base", default="h100x8", help="preset or YAML whose other figures are kept")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args([a for a in argv if a != "--collectives"])
    args.argv = [a for a in argv if a not in ("--collectives", "--worker")]
    if args.worker:
        return _worker(args)
    gpus = torch.cuda.device_count()
    if gpus < 2:
        raise HelixError(f"helix calibrate --collectives needs 2 or more GPUs, this machine has {gpus}; "
                         f"run it on the multi-GPU machine whose figures you want")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus),
           "-m", "helix_compiler.measure.calibrate_collectives", "--worker", *args.argv]
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
