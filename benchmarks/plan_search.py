"""Plan-search benchmark (issue 13: "Plan search over the whole space < 50 ms for up to 4096
devices"): `make_plan` over every (dp, pp, m, n), overlap k and sequence-parallel choice.

    python benchmarks/plan_search.py [--devices 16 64 512 4096] [--repeat 3] [--reference]
                                     [--machine-note TEXT] [--out PATH]

Summaries are built by hand, without a capture (a capture is seconds; the search is what is
timed): the paper's model as `analyze()` reports it for helix_compiler.models.paper at its
default sizes, and an 80-layer LLaMA-70B-shaped model. Clusters: the presets (`paper`,
`h100x8`) grown to as many 8-GPU nodes as the device count needs. Each search is a fresh
`make_plan` call (its memo lives for that call only); the figure is the median of --repeat
calls. --reference times the search with the search memo off (cost.SEARCH_MEMO = False), the
way every candidate was priced before it; --no-prune prices every feasible candidate
(make_plan prune=False: no branch and bound).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helix_compiler.planning import cost                            # noqa: E402
from helix_compiler.planning.cluster import load_cluster            # noqa: E402
from helix_compiler.planning.plan import make_plan                  # noqa: E402
from helix_compiler.planning.sites import (AttentionSite, MlpSite, ModelSummary, Rotary,  # noqa: E402
                                           Workload)


def _site(i: int, *, H, H_kv, d, D, B, S, dtype, causal=False, rotary=None, bias=False):
    return AttentionSite(
        index=i, q_proj=f"q{i}", k_proj=f"k{i}", v_proj=f"v{i}", o_proj=f"o{i}",
        q_weight=f"layers.{i}.q.weight", k_weight=f"layers.{i}.k.weight",
        v_weight=f"layers.{i}.v.weight", o_weight=f"layers.{i}.o.weight", fused_qkv=False,
        num_heads=H, num_kv_heads=H_kv, head_dim=d, embed_dim=D, core="sdpa",
        core_nodes=(f"sdpa{i}",), is_causal=causal, rotary=rotary, batch=B, q_len=S, kv_len=S,
        dtype=dtype, v_head_dim=d)


def _mlp(i: int, *, D, F, B, S, dtype, gated):
    ups = (f"layers.{i}.gate.weight", f"layers.{i}.up.weight") if gated else (
        f"layers.{i}.up.weight",)
    return MlpSite(index=i, up=tuple(f"up{i}_{k}" for k in range(len(ups))), down=f"down{i}",
                   up_weights=ups, down_weight=f"layers.{i}.down.weight", hidden=D, ffn=F,
                   gated=gated, tokens=B * S, dtype=dtype)


def paper_summary(batch: int = 1024, seq: int = 10000) -> ModelSummary:
    """helix_compiler.models.paper at PaperConfig() (2 layers, H = 16, d = 512, D = 8192,
    F = 32768, fp16), as `analyze()` summarizes it: the parameter counts and the per-sequence
    workload of the graph's other ops are the capture's figures (2026-12, seq 10000)."""
    H, d, D, F, layers = 16, 512, 8192, 32768, 2
    return ModelSummary(
        sites=tuple(_site(i, H=H, H_kv=H, d=d, D=D, B=batch, S=seq, dtype="float16")
                    for i in range(layers)),
        mlps=tuple(_mlp(i, D=D, F=F, B=batch, S=seq, dtype="float16", gated=False)
                   for i in range(layers)),
        param_elements=1_610_842_112, replicated_elements=114_688, dtype_bytes=2, batch=batch,
        seq_len=seq, name="PaperModel",
        workload=Workload(replicated_bytes=1.96608e9 * seq / 10000,
                          replicated_norm_bytes=1.63856384e9 * seq / 10000,
                          q_head_bytes=6.5536e8 * seq / 10000, ops=11))


def llama70b_summary(layers: int = 80, batch: int = 4096, seq: int = 4096) -> ModelSummary:
    """LLaMA-70B's shape (H = 64, H_kv = 8, d = 128, D = 8192, gated F = 28672, vocab 128256,
    rotary, causal, bf16), no graph workload (norms priced per block)."""
    H, H_kv, d, D, F, vocab = 64, 8, 128, 8192, 28672, 128256
    attn = 2 * D * H * d + 2 * D * H_kv * d
    replicated = 2 * vocab * D + (2 * layers + 1) * D
    return ModelSummary(
        sites=tuple(_site(i, H=H, H_kv=H_kv, d=d, D=D, B=batch, S=seq, dtype="bfloat16",
                          causal=True, rotary=Rotary(dims=d)) for i in range(layers)),
        mlps=tuple(_mlp(i, D=D, F=F, B=batch, S=seq, dtype="bfloat16", gated=True)
                   for i in range(layers)),
        param_elements=layers * (attn + 3 * D * F) + replicated, replicated_elements=replicated,
        dtype_bytes=2, batch=batch, seq_len=seq, name=f"llama70b-{layers}L")


MODELS = {"paper": paper_summary, "llama70b-80L": llama70b_summary}


def grown(preset: str, devices: int):
    """The preset with as many nodes as `devices` needs (at least its own)."""
    base = load_cluster(preset)
    nodes = max(base.nodes, math.ceil(devices / base.gpus_per_node))
    return dataclasses.replace(base, name=f"{base.name}-x{nodes}", nodes=nodes)


PRUNE = [True]


def search(summary, devices, cluster):
    return make_plan(summary, devices, cluster, dp=None, pp=None, overlap=None,
                     sequence_parallel=None, prune=PRUNE[0])


def time_one(summary, devices, cluster, repeat: int) -> dict:
    times, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        plan = search(summary, devices, cluster)
        times.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    costed = sum(cc.cost is not None for cc in plan.candidates)
    return {"devices": devices, "search_ms": statistics.median(times), "search_ms_all": times,
            "cpu_ms": statistics.median(cpu), "candidates": len(plan.candidates),
            "costed": costed, "chosen": plan.name, "tokens_per_s": plan.cost.tokens_per_s,
            "step_ms": plan.cost.step_ms}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, nargs="*", default=[16, 64, 512, 4096])
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--clusters", nargs="*", default=["paper", "h100x8"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--reference", action="store_true",
                    help="search memo off (cost.SEARCH_MEMO = False): every candidate priced alone")
    ap.add_argument("--no-prune", action="store_true",
                    help="price every feasible candidate (make_plan prune=False)")
    ap.add_argument("--machine-note", default="the project's 2-core CPU, shared with other jobs")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/plan_search.json"))
    args = ap.parse_args()
    cost.SEARCH_MEMO = not args.reference
    PRUNE[0] = not args.no_prune
    rows = []
    print(f"{'model':14s} {'cluster':8s} {'N':>5s} {'cands':>6s} {'costed':>6s} "
          f"{'search ms':>10s} {'cpu ms':>8s}  chosen")
    for model in args.models:
        summary = MODELS[model]()
        for preset in args.clusters:
            for devices in args.devices:
                r = {"model": model, "cluster": preset,
                     **time_one(summary, devices, grown(preset, devices), args.repeat)}
                rows.append(r)
                print(f"{model:14s} {preset:8s} {devices:5d} {r['candidates']:6d} "
                      f"{r['costed']:6d} {r['search_ms']:10.1f} {r['cpu_ms']:8.1f}  {r['chosen']}",
                      flush=True)
    out = {"what": "make_plan(summary, N, cluster, dp=None, pp=None, overlap=None, "
                   "sequence_parallel=None): the whole (dp, pp, m, n) space, overlap k and SP",
           "memo": not args.reference, "prune": not args.no_prune, "machine": args.machine_note,
           "python": platform.python_version(), "platform": platform.platform(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(sys.argv), "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
