"""Host time of one helix collective call, and of its parts, on this CPU: what a rank pays per
collective outside its kernels (docs/BENCHMARKS.md, "The latency gap, profiled").

    python benchmarks/cpu_op_dispatch.py --out benchmarks/results/cpu_op_dispatch.json

Rows (us per call, a (4, 8) fp32 tensor, StubCollectives of a 16-rank head group bound):
  `op`: torch.ops.helix.all_reduce.default (until the ninth session a torch.library.custom_op,
      whose wrapper cost most of the call; since then registered through torch.library.Library
      as `library_op` is, with its fresh-output check, then the stub);
  `stub`: the stub's all_reduce called directly (its clone of x);
  `mesh_group`: Mesh.group(0, "head"), which the stub used to rebuild on every call;
  `library_op`: the same clone registered through torch.library.Library with a
      CompositeExplicitAutograd kernel (the registration helix's collectives now use);
  `custom_op`: that clone as a torch.library.custom_op.
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

from helix_compiler.measure.stub import StubCollectives  # noqa: E402
from helix_compiler.runtime import collectives  # noqa: E402
from helix_compiler.runtime.mesh import Mesh  # noqa: E402


def _us(fn, calls: int) -> float:
    for _ in range(100):
        fn()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return round((time.perf_counter() - t) / calls * 1e6, 2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/cpu_op_dispatch.json")
    p.add_argument("--calls", type=int, default=5000)
    args = p.parse_args(argv)
    lib = torch.library.Library("helix_dispatch_bench", "DEF")
    lib.define("clone(Tensor x, str axes, str op) -> Tensor")
    lib.impl("clone", lambda x, axes, op: x.clone(), "CompositeExplicitAutograd")

    @torch.library.custom_op("helix_dispatch_bench2::clone", mutates_args=())
    def custom(x: torch.Tensor, axes: str, op: str) -> torch.Tensor:
        return x.clone()

    mesh = Mesh(n=16, m=1)
    stub = StubCollectives(mesh)
    x = torch.randn(4, 8)
    collectives.bind(stub)
    try:
        with torch.no_grad():
            rows = {
                "op": _us(lambda: torch.ops.helix.all_reduce.default(x, "head", "sum"), args.calls),
                "stub": _us(lambda: stub.all_reduce(x, "head", "sum"), args.calls),
                "mesh_group": _us(lambda: mesh.group(0, "head"), args.calls),
                "library_op": _us(lambda: torch.ops.helix_dispatch_bench.clone.default(
                    x, "head", "sum"), args.calls),
                "custom_op": _us(lambda: torch.ops.helix_dispatch_bench2.clone.default(
                    x, "head", "sum"), args.calls),
            }
    finally:
        collectives.bind(None)
    out = {"what": "host us per call on this CPU (no GPU): helix's collective op and its parts",
           "device": platform.processor() or platform.machine(), "python": platform.python_version(),
           "torch": torch.__version__, "command": "python " + " ".join(sys.argv),
           "calls": args.calls, "us_per_call": rows}
    for k, v in rows.items():
        print(f"{k:12s} {v:8.2f} us")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
