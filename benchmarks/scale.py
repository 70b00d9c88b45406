"""Scale benchmark (issue 14): LLaMA-70B-class models on meta, compile time and memory.

    python benchmarks/scale.py [--layers 10 20 40 80] [--devices 64] [--out PATH] [--machine-note TEXT]

Each layer count runs in a fresh process (peak RSS is per process): helix_compile end to end
(repeat_blocks on: layers 0 and L-1 exported, the rest copied) with its stage timings,
process CPU seconds next to wall seconds, rank 0's graph emitted after, and torch.export of
the whole model alone for comparison.  The largest count also runs with dynamic=False and
with repeat_blocks=False.  Plan search (solve + cost of every split) is timed for device
counts up to 4096 on the largest count's summary.  Goal (docs/SCALE.md): 80 layers, 64
devices, under 5 s and 1 GB on a quiet machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _model(layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                      num_hidden_layers=layers, num_attention_heads=64, num_key_value_heads=8)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.zeros(1, 4096, dtype=torch.long, device="meta")
    return model, ids


def one(layers: int, devices: int, dynamic: bool = True, repeat: bool = True) -> dict:
    import torch

    from helix_compiler import helix_compile

    def compiled(model, ids):
        """(program, wall s, process CPU s) of helix_compile on the model."""
        t0, c0 = time.perf_counter(), time.process_time()
        prog = helix_compile(model, devices=devices, example_inputs=(ids,),
                             example_kwargs={"use_cache": False}, dynamic=dynamic, repeat_blocks=repeat)
        return prog, time.perf_counter() - t0, time.process_time() - c0

    model, ids = _model(layers)
    # helix_compile first, in a fresh process as a user runs it: the peak RSS is read before
    # the comparison export below (an 80-layer export holds more than the compile does), and
    # the compile gets no warm-up from it (before 2026-12-02 the export ran first)
    prog, total, total_cpu = compiled(model, ids)
    stages, repeated = dict(prog.timings), prog.analysis.captured.gm.meta.get("repeat_blocks")
    sites, plan_name = len(prog.plan.sites), f"m={prog.plan.m} x n={prog.plan.n}"
    params_per_rank = prog.plan.cost.param_elements_per_rank
    compile_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    t0 = time.perf_counter()
    prog.rank_module(0)
    emit_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    # the same compile again in this process, on a new model object: what is left once torch's
    # one-time work is done (the first torch.export imports torch._dynamo, which imports
    # triton where it is installed); cold - warm is that one-time cost, paid once per process
    del prog
    prog, warm, warm_cpu = compiled(*_model(layers))
    warm_stages = dict(prog.timings)
    del prog
    t0, c0 = time.perf_counter(), time.process_time()
    torch.export.export(model, (ids,), {"use_cache": False}, strict=False)
    export_s, export_cpu = time.perf_counter() - t0, time.process_time() - c0
    # process CPU seconds next to wall seconds: on a machine shared with other jobs the
    # wall time of one run moves by 2-3x, its CPU time much less
    import importlib.util
    return {"layers": layers, "devices": devices, "dynamic": dynamic, "repeat_blocks": repeat,
            "triton_installed": importlib.util.find_spec("triton") is not None,
            "repeated": repeated, "sites": sites, "plan": plan_name, "compile_s": total, "compile_cpu_s": total_cpu,
            "stages_s": stages, "compile_warm_s": warm, "compile_warm_cpu_s": warm_cpu,
            "stages_warm_s": warm_stages, "export_alone_s": export_s, "export_alone_cpu_s": export_cpu,
            "emit_rank0_s": emit_s, "compile_peak_rss_gb": compile_rss, "peak_rss_gb": peak,
            "params_per_rank": params_per_rank}


def plan_search(layers: int) -> list:
    from helix_compiler.planning.cluster import load_cluster
    from helix_compiler.pipeline import analyze
    from helix_compiler.planning.plan import make_plan

    model, ids = _model(layers)
    summary = analyze(model, (ids,), {"use_cache": False}).summary
    base = load_cluster("paper")
    out = []
    import dataclasses
    for devices in (8, 16, 64, 256, 1024, 4096):
        cluster = dataclasses.replace(base, nodes=max(1, devices // base.gpus_per_node))
        t0 = time.perf_counter()
        make_plan(summary, devices, cluster, dp=None)      # the whole (dp, m, n) space
        cold = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        plan = make_plan(summary, devices, cluster, dp=None)
        out.append({"devices": devices, "plan_search_ms": (time.perf_counter() - t0) * 1e3,
                    "first_call_ms": cold,
                    "chosen": plan.name, "candidates": len(plan.candidates)})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="the figure docs/SCALE.md quotes, on a quiet machine (no other job; OMP_NUM_THREADS "
               "unset):\n  python3 benchmarks/scale.py --layers 10 20 40 80 "
               "--out benchmarks/results/scale_llama70b_<host>.json --machine-note '<cores, quiet>'\n"
               "then read compile_s, compile_cpu_s, stages_s and peak_rss_gb of the 80-layer row; "
               "one count alone: --layers 80")
    ap.add_argument("--layers", type=int, nargs="*", default=[10, 20, 40, 80],
                    help="decoder layer counts, each compiled in a fresh process")
    ap.add_argument("--devices", type=int, default=64, help="helix_compile(devices=...)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/scale_llama70b.json"),
                    help="where the JSON results go (default: %(default)s)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--static", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--machine-note", default="", help="e.g. '2-core CPU shared with other jobs'")
    ap.add_argument("--no-repeat", action="store_true",
                    help="helix_compile(repeat_blocks=False): export every layer (the largest count "
                         "is always also run this way, for comparison)")
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.devices, dynamic=not args.static, repeat=not args.no_repeat)))
        return 0
    rows = []
    top = max(args.layers)
    runs = [(layers, False, args.no_repeat) for layers in args.layers] + [(top, True, args.no_repeat)]
    if not args.no_repeat:
        runs.append((top, False, True))
    for layers, static, no_repeat in runs:
        p = subprocess.run([sys.executable, __file__, "--one", str(layers), "--devices", str(args.devices)]
                           + (["--static"] if static else []) + (["--no-repeat"] if no_repeat else []),
                           capture_output=True, text=True, check=True)
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{layers:3d} layers {'static ' if static else 'dynamic'}{' no-repeat' if no_repeat else ''}: "
              f"compile {r['compile_s']:.1f} s ({r['compile_cpu_s']:.1f} s CPU; again in the process "
              f"{r['compile_warm_s']:.1f} s; export alone {r['export_alone_s']:.1f} s), "
              f"peak RSS {r['peak_rss_gb']:.2f} GB, stages {', '.join(f'{k} {v:.2f}' for k, v in r['stages_s'].items())}")
    search = plan_search(max(args.layers))
    for s in search:
        print(f"plan search {s['devices']:5d} devices: {s['plan_search_ms']:.1f} ms, first call "
              f"{s['first_call_ms']:.1f} ms ({s['chosen']})")
    import os

    import torch
    import transformers

    res = {"device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
                     + (f", {args.machine_note}" if args.machine_note else ""), "torch": torch.__version__,
           "transformers": transformers.__version__, "date": datetime.date.today().isoformat(), "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]),
           "config": "LLaMA-70B: 64 heads, 8 kv heads, d 128, D 8192, MLP 28672, vocab 128256, bf16, meta, seq 4096",
           "compile": rows, "plan_search": search}
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
