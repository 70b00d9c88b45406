"""The GQA suite: a LLaMA-style GQA model (helix_compiler/models/llama_gqa.py) on 8 and 32
devices (the `paper` cluster preset grown to as many 8-GPU nodes as needed).

- every feasible helix split (m, n), both variants where m > 1 (forced):
  `helix_compile(model on meta, devices, (ids,), {"use_cache": False}, plan=(m, n),
  variant=v, cluster=...)`, then `prog.rank_module(0)` exactly as emitted (at d = 128 the
  compiler applies no kernel choice). The capture is made at batch 2 so the batch stays a
  symbol and the same graph runs any micro-batch. Its meta tensors get random values x 0.02;
  its real buffers (the int64 index tensors of a head-dim split) keep their values;
- the TP baseline as PyTorch builds it (DTensor: colwise q, k, v, gate, up; rowwise o,
  down; fake process group), TP = 8 on 8 devices only (TP = 32 cannot split 8 kv heads);
- the micro-batch is the cost model's (up to 256 sequences) capped at --max-micro-batch;
  measured_compute_ms = ms per micro-batch x B / b, the whole-batch quantity the cost model
  predicts; step = measured compute + modeled comm. predicted_compute_ms_by_core gives the
  prediction with every site forced to one core.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import traceback

import torch

import helix_compiler.measure.timing as timing
from helix_compiler.planning.cluster import load_cluster
from helix_compiler.measure.predict import (at_batch, baseline_micro_batch, baseline_prediction,
                                            fused_backends, helix_cases, helix_prediction,
                                            matmul_peak)
from helix_compiler.measure.profiling import bound_of
from helix_compiler.measure.record import RawRecord
from helix_compiler.measure.runners import (GqaHelixRunner, GqaTPRunner, measure, release_group,
                                            run_timed)
from helix_compiler.measure.timing import Timer, free_memory
from helix_compiler.models.llama_gqa import GqaConfig, build
from helix_compiler.pipeline import analyze
from helix_compiler.planning.plan import make_plan

log = logging.getLogger(__name__)


def config(small: bool, seq: int | None = None) -> GqaConfig:
    return GqaConfig.small(seq) if small else GqaConfig(seq=seq or 8192)


def summary_for(cfg: GqaConfig):
    """ModelSummary at batch cfg.batch, captured at batch 1 on meta (as gqa_plan.py)."""
    ids = torch.zeros(1, cfg.seq, dtype=torch.long, device="meta")
    with torch.no_grad():
        s = analyze(build(cfg), (ids,), {"use_cache": False}).summary
    return at_batch(s, cfg.batch)


def eager_view(summary):
    """The model as Hugging Face runs it eagerly, which is what the DTensor baseline runs:
    with no padding mask and outside tracing, transformers hands SDPA is_causal=True and no
    mask tensor, so no (S, S) mask is built and the fused kernel skips the upper triangle.
    A captured graph (the helix rank graphs) materializes the mask instead."""
    wl = summary.workload
    return dataclasses.replace(
        summary, sites=tuple(dataclasses.replace(s, mask=None, is_causal=True)
                             for s in summary.sites),
        workload=None if wl is None else dataclasses.replace(wl, mask_bytes=0.0))


def cluster_for(devices: int, base=None):
    """The `paper` preset with as many 8-GPU nodes as `devices` needs."""
    base = base or load_cluster("paper")
    nodes = math.ceil(devices / base.gpus_per_node)
    return dataclasses.replace(base, name=f"{base.name}-{nodes}nodes", nodes=nodes)


def tp_flops_per_sequence(cfg: GqaConfig, tp: int) -> int:
    """FLOPs of one TP rank, one sequence (FlopCounterMode counts DTensor global shapes):
    q, k, v, o projections, QK^T and PV over all S^2 (as FlopCounterMode counts SDPA),
    gate, up and down."""
    S, D, d = cfg.seq, cfg.hidden, cfg.head_dim
    h, hkv, f = cfg.heads // tp, max(1, cfg.kv_heads // tp), cfg.mlp // tp
    layer = (2 * S * D * h * d * 2 + 2 * 2 * S * D * hkv * d + 2 * 2 * h * S * S * d
             + 3 * 2 * S * D * f)
    return cfg.layers * layer


def cases(summary, devices, cluster, profile, with_baseline: bool):
    """[(kind, m, n, variant, predicted micro-batch)]: m = 1, qk-gather, TP, score-reduce."""
    order = {None: 0, "qk-gather": 1, "score-reduce": 3}
    out = [("helix", m, n, v, b) for m, n, v, b in helix_cases(summary, devices, cluster, profile)]
    tp = min(cluster.gpus_per_node, devices)
    if with_baseline and tp == devices:
        out.append(("baseline", 1, tp, "tp", baseline_micro_batch(summary, tp, 1, cluster,
                                                                   profile)))
    rank = {("baseline", "tp"): 2}
    return sorted(out, key=lambda c: (rank.get((c[0], c[3]), order.get(c[3], 0)), c[1]))


def raw_header(args, cfg: GqaConfig, device) -> dict:
    info = timing.device_info(device)
    if device.type == "cuda":
        info["sdpa_enabled"] = {k: getattr(torch.backends.cuda, f"{k}_sdp_enabled")()
                                for k in ("flash", "mem_efficient", "cudnn", "math")
                                if hasattr(torch.backends.cuda, f"{k}_sdp_enabled")}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return {"info": info, "command": args.command, "rows": [],
            "config": {k: (str(v) if isinstance(v, torch.dtype) else v)
                       for k, v in dataclasses.asdict(cfg).items()},
            "devices": list(args.devices), "max_micro_batch": args.max_micro_batch,
            "warmup": args.warmup, "repeats": args.repeats}


# --- measuring ---------------------------------------------------------------------------------
def run_measurements(args, cfg, summary, profile, timer: Timer, rec: RawRecord) -> None:
    for devices in args.devices:
        cluster = cluster_for(devices)
        for kind, m, n, v, b_pred in cases(summary, devices, cluster, profile,
                                           not args.no_baselines):
            if args.only and f"{m}x{n}" not in args.only:
                continue
            if kind == "baseline":
                row = {"name": f"TP={n} (DTensor)", "kind": kind, "devices": devices, "m": 1,
                       "n": n, "tp": n, "pp": 1, "variant": "heads"}
            else:
                row = {"name": f"helix m={m} x n={n} {v or 'heads'}", "kind": kind,
                       "devices": devices, "m": m, "n": n, "variant": v or "heads"}
            row["predicted_micro_batch"] = b_pred
            if rec.late():
                row["error"] = "skipped: past --deadline-s"
                rec.add("rows", row)
                log.info("  [%d] %s: skipped (deadline)", devices, row["name"])
                continue
            runner = None
            try:
                if kind == "baseline":
                    runner = GqaTPRunner(cfg, n, timer.device)
                    row["flops_per_sequence"] = tp_flops_per_sequence(cfg, n)
                else:
                    runner = GqaHelixRunner(cfg, m, n, v, devices, cluster, timer.device)
                    row["compile_s"] = runner.compile_s
                    row["variant"] = runner.plan.variants[0] if runner.plan.variants else "heads"
                    row["flops_per_sequence"] = runner.flops()
                row.update(measure(runner, False, max(1, min(b_pred, args.max_micro_batch)),
                                   timer))
                if kind == "baseline":
                    row["local_shapes"] = runner.info
                log.info("  [%d] %s: b=%d %.2f ms/mb = %.3f ms/seq (%s s)", devices, row["name"],
                         row["micro_batch"], row["ms_per_micro_batch"],
                         row["ms_per_micro_batch"] / row["micro_batch"], row["wall_s"])
            except Exception as e:  # noqa: BLE001  (recorded in the row; the session goes on)
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                log.warning("  [%d] %s: FAILED %s\n%s", devices, row["name"], row["error"],
                            traceback.format_exc(limit=6))
            del runner
            free_memory(timer.device)
            rec.add("rows", row)
        release_group()
    rec.data["b_sweep"] = []
    for devices in args.devices if args.b_sweep else ():
        # helix m=1 x n=devices: ms per sequence at other micro-batches (the plan assumes up
        # to 256 sequences per micro-batch; the rows above run at most --max-micro-batch)
        if rec.late():
            break
        _b_sweep(args, cfg, devices, timer, rec)
    rec.data["wall_s"] = round(rec.elapsed_s(), 1)
    rec.save()


def _b_sweep(args, cfg, devices: int, timer: Timer, rec: RawRecord) -> None:
    try:
        runner = GqaHelixRunner(cfg, 1, devices, None, devices, cluster_for(devices),
                                timer.device)
    except Exception as e:  # noqa: BLE001
        log.warning("  [%d] b-sweep failed: %s", devices, e)
        return
    for b in args.b_sweep:
        if rec.late():
            break
        try:
            b_used, t, fn = run_timed(runner.make(False), b, timer)
            del fn
            row = {"devices": devices, "m": 1, "n": devices, "b": b_used,
                   "ms_per_micro_batch": t["median_ms"], "ms_per_sequence": t["median_ms"] / b_used,
                   "peak_gib": t.get("peak_gib")}
            log.info("  [%d] b-sweep m=1 b=%d: %.3f ms/seq", devices, b_used,
                     t["median_ms"] / b_used)
        except Exception as e:  # noqa: BLE001
            row = {"devices": devices, "b": b, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        rec.add("b_sweep", row)
        free_memory(timer.device)
    del runner
    free_memory(timer.device)


# --- the report (the paper suite's schema, one block per device count) ----------------------------
def assemble(raw: dict, cfg: GqaConfig, cluster_of, profile) -> dict:
    summary = summary_for(cfg)
    eager = eager_view(summary)
    B, S = cfg.batch, cfg.seq
    tokens = B * S
    peak = matmul_peak(profile)
    rows, chosen, goals, clusters = [], {}, {}, {}
    for devices in raw["devices"]:
        cluster = cluster_of(devices)
        clusters[str(devices)] = {f.name: getattr(cluster, f.name)
                                  for f in dataclasses.fields(cluster)}
        plan = make_plan(summary, devices, cluster, profile=profile)
        chosen[str(devices)] = {
            "m": plan.m, "n": plan.n, "variants": list(plan.variants),
            "predicted_tokens_per_s": plan.cost.tokens_per_s,
            "predicted_step_ms": plan.cost.step_ms, "predicted_compute_ms": plan.cost.compute_ms,
            "micro_batch": plan.cost.micro_batch,
            "backends": [s.backend for s in plan.cost.sites]}
        mine = []
        for r in (x for x in raw["rows"] if x["devices"] == devices):
            row = {k: r.get(k) for k in ("name", "kind", "devices", "m", "n", "variant", "tp",
                                         "pp")}
            helix = r["kind"] == "helix"
            v = None if r["variant"] in ("heads", None) else r["variant"]
            try:
                pred = (helix_prediction(summary, cluster, profile, r["m"], r["n"], v, None)
                        if helix else
                        baseline_prediction(eager, cluster, profile, r["tp"], 1, None))
                by_core = {}
                for bk in ["explicit", *fused_backends(profile, cfg.head_dim)]:
                    if v == "score-reduce" and bk != "explicit":
                        continue
                    p = (helix_prediction(summary, cluster, profile, r["m"], r["n"], v, bk)
                         if helix else
                         baseline_prediction(eager, cluster, profile, r["tp"], 1, bk))
                    by_core[bk] = p.compute_ms
            except Exception as e:  # noqa: BLE001
                pred, by_core, row["prediction_error"] = None, {}, f"{type(e).__name__}: {e}"
            row["predicted_compute_ms"] = None if pred is None else pred.compute_ms
            row["predicted_compute_ms_by_core"] = by_core
            row["predicted_backends"] = None if pred is None else [s.backend for s in pred.sites]
            row["predicted_micro_batch"] = r.get("predicted_micro_batch")
            if "error" in r or r.get("ms_per_micro_batch") is None:
                row.update(error=r.get("error", "not measured"), measured_compute_ms=None,
                           comm_ms=None if pred is None else pred.comm_ms, bubble_ms=0.0,
                           step_ms=None, tokens_per_s=None, comm_ms_per_token=None)
                rows.append(row)
                continue
            b, t_mb = r["micro_batch"], r["ms_per_micro_batch"]
            compute = t_mb * B / b
            comm = pred.comm_ms if pred is not None else 0.0
            step = compute + comm
            split = r.get("class_ms_per_sequence_b1") or {}
            err = None if pred is None else pred.compute_ms / compute - 1.0
            row.update(
                micro_batch=b, micro_batches=math.ceil(B / b), ms_per_micro_batch=t_mb,
                ms_per_micro_batch_min=r.get("ms_per_micro_batch_min"),
                ms_per_micro_batch_max=r.get("ms_per_micro_batch_max"),
                ms_per_sequence=t_mb / b,
                predicted_ms_per_sequence=None if pred is None else pred.compute_ms / B,
                measured_compute_ms=compute, compute_error=err,
                abs_error=None if err is None else abs(err),
                comm_ms=comm, bubble_ms=0.0, step_ms=step, tokens_per_s=tokens / (step * 1e-3),
                comm_ms_per_token=comm / tokens,
                predicted_step_ms=None if pred is None else pred.step_ms,
                predicted_tokens_per_s=None if pred is None else pred.tokens_per_s,
                flops_per_sequence=r.get("flops_per_sequence"),
                achieved_tflops=(r["flops_per_sequence"] * B / (compute * 1e-3) / 1e12
                                 if r.get("flops_per_sequence") else None),
                ms_per_sequence_b1=r.get("ms_per_sequence_b1"),
                class_ms_per_sequence_b1=split,
                top_ops_ms_per_sequence_b1=r.get("top_ops_ms_per_sequence_b1"),
                bound=bound_of(split, comm, compute), peak_gib=r.get("peak_gib"),
                compile_s=r.get("compile_s"), local_shapes=r.get("local_shapes"),
                chosen_by_plan=(helix and (r["m"], r["n"]) == (plan.m, plan.n)
                                and r["variant"] in plan.variants))
            if row["achieved_tflops"]:
                row["peak_fraction"] = row["achieved_tflops"] / peak
            rows.append(row)
            mine.append(row)
        hx = [r for r in mine if r["kind"] == "helix"]
        g = {}
        if hx:
            fastest = min(hx, key=lambda r: r["step_ms"])
            fastest_c = min(hx, key=lambda r: r["measured_compute_ms"])
            ch = [r for r in hx if r.get("chosen_by_plan")]
            errs = [r["abs_error"] for r in mine if r.get("abs_error") is not None]
            errs_h = [r["abs_error"] for r in hx if r.get("abs_error") is not None]
            g = {"rows_measured": len(mine),
                 "max_abs_compute_error_all_rows": max(errs) if errs else None,
                 "max_abs_compute_error_helix_rows": max(errs_h) if errs_h else None,
                 "rows_within_15pct": sum(e <= 0.15 for e in errs),
                 "within_15pct_all_rows": bool(errs) and max(errs) <= 0.15,
                 "measured_fastest_helix": fastest["name"],
                 "measured_fastest_helix_by_compute": fastest_c["name"],
                 "chosen": ch[0]["name"] if ch else None,
                 "chosen_measured_step_ms": ch[0]["step_ms"] if ch else None,
                 "fastest_measured_step_ms": fastest["step_ms"],
                 "chosen_within_3pct_of_fastest": bool(ch)
                 and ch[0]["step_ms"] <= 1.03 * fastest["step_ms"]}
            chosen[str(devices)]["measured_step_ms"] = g["chosen_measured_step_ms"]
        goals[str(devices)] = g
    info = raw["info"]
    return {
        "device": info.get("device"), "torch": info.get("torch"), "date": info.get("date"),
        "command": raw.get("command"),
        "config": raw.get("config") | {"devices": raw["devices"],
                                        "max_micro_batch": raw.get("max_micro_batch"),
                                        "warmup": raw.get("warmup"),
                                        "repeats": raw.get("repeats")},
        "environment": {k: info.get(k) for k in ("transformers", "cuda", "cudnn", "sms",
                                                  "memory_gib", "python", "sdpa_enabled")},
        "cluster": clusters, "profile": profile.name, "matmul_peak_tflops": peak,
        "chosen": chosen, "goals": goals,
        "notes": [
            "measured_compute_ms: one rank's forward at micro-batch b (median of repeats, CUDA "
            "events) times B / b, B = config.batch; predicted_compute_ms: the cost model at "
            "batch B for the same (m, n, variant), the cores it picks (predicted_backends)",
            "collectives stubbed (helix_compiler.measure.stub.StubCollectives): no transfer; comm_ms "
            "is the cost model's on the cluster preset, no overlap; step = measured compute + "
            "modeled comm; tokens_per_s = B * S / step",
            "rank graphs run as helix_compile emits them (dynamic batch, captured at batch 2)",
            "predicted_compute_ms_by_core: the prediction with every site forced to one core",
        ],
        "plans": rows,
        "b_sweep": raw.get("b_sweep"),
        "wall_s": raw.get("wall_s"),
    }


def table(result: dict) -> str:
    lines = [f"{'dev':>3s} {'plan':34s} {'b':>3s} {'ms/seq':>7s} {'meas ms':>8s} "
             f"{'pred ms':>8s} {'err':>6s} {'comm':>7s} {'step':>8s} {'tok/s':>9s} {'TF/s':>5s}"]
    for r in result["plans"]:
        if r.get("measured_compute_ms") is None:
            lines.append(f"{r['devices']:3d} {r['name'][:34]:34s} "
                         f"{(r.get('error') or '')[:70]}")
            continue
        err = r.get("compute_error")
        lines.append(
            f"{r['devices']:3d} {r['name'][:34]:34s} {r['micro_batch']:3d} "
            f"{r['ms_per_sequence']:7.3f} {r['measured_compute_ms']:8.1f} "
            f"{(r['predicted_compute_ms'] or 0):8.1f} "
            f"{(100 * err if err is not None else float('nan')):5.0f}% {r['comm_ms']:7.1f} "
            f"{r['step_ms']:8.1f} {r['tokens_per_s']:9.4g} {r['achieved_tflops'] or 0:5.0f}")
    for dv, c in result["chosen"].items():
        lines.append(f"[{dv}] chosen m={c['m']} x n={c['n']} {c['variants'][:1]}; "
                     f"goals: {result['goals'].get(dv)}")
    return "\n".join(lines)

