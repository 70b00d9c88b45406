"""Cost-model predictions (no GPU run) for a LLaMA-style GQA model on 8 and 32 devices.

    python benchmarks/gqa_plan.py [--profile helix_compiler/planning/profiles/h100.yaml] \
        [--out benchmarks/results/gqa-plan.json]

Model: Hugging Face LlamaModel, 2 layers, H = 32 query heads, H_kv = 8, d = 128,
D = 4096, MLP 14336 (SwiGLU), vocab 32000, fp16, S = 8192, B = 256 sequences per
step, captured at batch 1 on meta. Cluster: the `paper` preset (8 x H100 per
node), grown to 4 nodes for 32 devices. Every feasible (m, n), both variants
where m > 1, and the TP baselines. These are predictions: nothing here ran on a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import sys
from pathlib import Path

import torch


def summary(batch: int, seq: int):
    from transformers import LlamaConfig, LlamaModel

    from helix_compiler.pipeline import analyze

    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, intermediate_size=14336, num_hidden_layers=2,
                      vocab_size=32000, max_position_embeddings=seq)
    with torch.device("meta"):
        model = LlamaModel(cfg).to(torch.float16).eval()
    ids = torch.zeros(1, seq, dtype=torch.long, device="meta")
    s = analyze(model, (ids,), {"use_cache": False}).summary
    return dataclasses.replace(
        s, batch=batch, sites=tuple(dataclasses.replace(x, batch=batch) for x in s.sites),
        mlps=tuple(dataclasses.replace(x, tokens=x.tokens * batch) for x in s.mlps))


def main(argv=None) -> int:
    from helix_compiler.planning.cluster import load_cluster
    from helix_compiler.planning.cost import cost_baseline, cost_plan
    from helix_compiler.planning.profile import DEFAULT_PROFILE, load_profile
    from helix_compiler.planning.solver import solve

    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default=None)
    ap.add_argument("--out", default="benchmarks/results/gqa-plan.json")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seq", type=int, default=8192)
    args = ap.parse_args(argv)
    profile = load_profile(args.profile) if args.profile else DEFAULT_PROFILE
    s = summary(args.batch, args.seq)
    base = load_cluster("paper")
    out = {"what": "cost-model predictions only (not measured)", "profile": profile.name,
           "date": _dt.date.today().isoformat(), "torch": torch.__version__,
           "command": "python benchmarks/gqa_plan.py " + " ".join(argv or sys.argv[1:]),
           "model": {"H": 32, "H_kv": 8, "d": 128, "D": 4096, "F": 14336, "layers": 2,
                     "batch": args.batch, "seq": args.seq}, "devices": {}}
    for devices in (8, 32):
        cl = dataclasses.replace(base, name=f"paper-{math.ceil(devices / 8)}nodes",
                                 nodes=math.ceil(devices / base.gpus_per_node))
        rows = []
        for c in solve(s, devices, cl):
            if not c.feasible:
                rows.append({"m": c.m, "n": c.n, "feasible": False, "reasons": list(c.reasons)})
                continue
            for v in ((None,) if c.m == 1 else ("score-reduce", "qk-gather")):
                p = cost_plan(s, c.m, c.n, cl, profile, v)
                rows.append({"m": c.m, "n": c.n, "feasible": True, "variant": p.variants[0],
                             "backend": p.sites[0].backend, "micro_batch": p.micro_batch,
                             "compute_ms": p.compute_ms, "comm_ms": p.comm_ms,
                             "step_ms": p.step_ms, "tokens_per_s": p.tokens_per_s,
                             "comm_ms_per_token": p.comm_ms_per_token})
        for tp, pp in ((8, devices // 8), (devices, 1)) if devices > 8 else ((8, 1),):
            try:
                p = cost_baseline(s, tp, pp, cl, profile)
                rows.append({"baseline": p.name, "compute_ms": p.compute_ms,
                             "comm_ms": p.comm_ms, "bubble_ms": p.bubble_ms,
                             "step_ms": p.step_ms, "tokens_per_s": p.tokens_per_s,
                             "micro_batch": p.micro_batch})
            except Exception as e:  # noqa: BLE001
                rows.append({"baseline": f"TP={tp} x PP={pp}", "error": str(e)})
        out["devices"][str(devices)] = rows
        print(f"--- {devices} devices")
        for r in rows:
            if r.get("tokens_per_s"):
                name = r.get("baseline") or f"m={r['m']} x n={r['n']} {r['variant']}"
                print(f"  {name:32s} compute {r['compute_ms']:9.0f} comm {r['comm_ms']:8.0f} "
                      f"step {r['step_ms']:9.0f} ms  {r['tokens_per_s'] / 1e6:6.3f}M tok/s")
            elif not r.get("feasible", True):
                print(f"  m={r['m']} x n={r['n']}: {'; '.join(r['reasons'])[:100]}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
