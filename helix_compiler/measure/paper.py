"""The paper suite: the paper's model (helix_compiler/models/paper.py) on 16 devices.

- every feasible helix split (m, n), both variants where m > 1 (forced), one rank's
  GraphModule (prog.rank_module(0)) at the real per-rank shapes: micro-batches of whole
  10000-token sequences, the micro-batch the cost model picks (halved until it fits),
  collectives stubbed; each once as PyTorch runs the graph ([sdpa]: SDPA picks its kernel)
  and once after passes/kernel_choice.py ([kernel-choice]: the chunked explicit core
  where d > 256);
- the baselines as PyTorch builds them (DTensor ColwiseParallel q, k, v, fc_in /
  RowwiseParallel o, fc_out, fake process group): TP=8 x PP=2 (one stage: one layer + the
  final norm; the bubble (p-1)/(M+p-1) of a GPipe/1F1B schedule of M micro-batches) and
  TP=16, again [sdpa] and [kernel-choice];
- step = measured compute + modeled comm + bubble, tokens/s = B * S / step; predicted
  compute from the cost model with the given profile ([sdpa] rows price the core with the
  fused kernel SDPA picks at d);
- a roofline per plan: FLOPs per rank, achieved TFLOP/s against the profile's matmul
  peak, the per-op-class split of one sequence;
- optionally (--b-sweep, --compile-check) helix m=1 at several micro-batches, with
  sequence-parallel norms, and through torch.compile.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import traceback

import torch

from helix_compiler.measure.predict import (at_batch, baseline_micro_batch, baseline_prediction,
                                            helix_cases, helix_prediction, matmul_peak,
                                            sdpa_backend_for)
from helix_compiler.measure.profiling import bound_of, class_split
from helix_compiler.measure.record import RawRecord
from helix_compiler.measure.runners import (PaperHelixRunner, PaperTPRunner, measure,
                                            release_group, run_timed)
from helix_compiler.measure.stub import StubCollectives, stubbed
from helix_compiler.measure.surgery import materialize
from helix_compiler.measure.timing import Timer, free_memory
from helix_compiler.models.paper import PaperConfig, build
from helix_compiler.pipeline import analyze
from helix_compiler.planning.plan import make_plan

log = logging.getLogger(__name__)

PAPER = {"TP=8 x PP=2": 1.20e6, "helix m x n = 16": 1.58e6}   # the paper's table, tokens/s
HELIX_THRESHOLD = 256       # head dims above it get the chunked explicit core (Hopper)
SMALL_THRESHOLD = 16        # the small config's d = 32 takes the explicit core too


def config(small: bool) -> PaperConfig:
    if small:
        return PaperConfig(heads=16, head_dim=32, mlp=512, batch=8, seq=64, dtype=torch.float32)
    return PaperConfig()


def summary_for(cfg: PaperConfig):
    """ModelSummary of the model at cfg.batch, captured at batch 1 (meta)."""
    model, (x,) = build(dataclasses.replace(cfg, batch=1), "meta")
    return at_batch(analyze(model, (x,), {}).summary, cfg.batch)


def tp_layer_flops(cfg: PaperConfig, tp: int) -> int:
    """FLOPs of one layer on one TP rank, one sequence: q, k, v, o projections, QK^T and PV,
    the two MLP GEMMs (FlopCounterMode counts a DTensor module's global shapes)."""
    S, D, F_, h = cfg.seq, cfg.hidden, cfg.mlp, cfg.heads // tp
    return (4 * 2 * S * D * (D // tp) + 2 * 2 * h * S * S * cfg.head_dim
            + 2 * 2 * S * D * (F_ // tp))


def _mode_name(kc: bool) -> str:
    return "kernel-choice" if kc else "sdpa"


# --- measuring ---------------------------------------------------------------------------------
def run_measurements(args, cfg, summary, cluster, profile, timer: Timer, rec: RawRecord) -> None:
    devices = args.devices[0]
    threshold = SMALL_THRESHOLD if args.small else HELIX_THRESHOLD
    kw = dict(chunk_bytes=args.chunk_bytes, threshold=threshold)
    modes = [False, True] if args.modes == "both" else [args.modes == "kernel-choice"]
    if not args.no_baselines:
        gpn = cluster.gpus_per_node
        for tp, pp in ((min(gpn, devices), devices // min(gpn, devices)), (devices, 1)):
            b_pred = baseline_micro_batch(summary, tp, pp, cluster, profile)
            layers = cfg.layers // pp
            for kc in modes:
                name = (f"TP={tp} x PP={pp}" if pp > 1 else f"TP={tp}") + \
                    f" (DTensor) [{_mode_name(kc)}]"
                row = {"name": name, "kind": "baseline", "m": 1, "n": tp, "tp": tp, "pp": pp,
                       "variant": "heads", "kernels": _mode_name(kc),
                       "predicted_micro_batch": b_pred, "stage_layers": layers}
                if rec.late():
                    row["error"] = "skipped: past --deadline-s"
                    rec.add("rows", row)
                    continue
                try:
                    runner = PaperTPRunner(cfg, tp, layers, timer.device, **kw)
                    row.update(measure(runner, kc, min(b_pred, args.max_micro_batch), timer))
                    row["flops_per_sequence"] = layers * tp_layer_flops(cfg, tp)
                    row["local_shapes"] = runner.info
                    log.info("  %s: b=%d %.1f ms/mb, %.2f ms/seq at b=1", name,
                             row["micro_batch"], row["ms_per_micro_batch"],
                             row.get("ms_per_sequence_b1", float("nan")))
                except Exception as e:  # noqa: BLE001  (recorded in the row; the session goes on)
                    row["error"] = f"{type(e).__name__}: {e}"
                    log.warning("  %s: FAILED %s\n%s", name, row["error"],
                                traceback.format_exc(limit=4))
                runner = None
                free_memory(timer.device)
                rec.add("rows", row)
        release_group()
    for m, n, v, b_pred in helix_cases(summary, devices, cluster, profile):
        if args.only and f"{m}x{n}" not in args.only:
            continue
        try:
            runner = PaperHelixRunner(cfg, m, n, v, devices, cluster, timer.device, **kw)
            flops = runner.flops()
            variant = runner.plan.variants[0] if runner.plan.variants else "heads"
        except Exception as e:  # noqa: BLE001
            log.warning("  helix m=%d n=%d %s: compile failed: %s", m, n, v, e)
            rec.add("rows", {"name": f"helix m={m} x n={n} {v}", "kind": "helix", "m": m,
                             "n": n, "variant": v or "heads", "kernels": "sdpa",
                             "error": f"compile: {type(e).__name__}: {e}"})
            continue
        for kc in modes:
            name = f"helix m={m} x n={n} {variant} [{_mode_name(kc)}]"
            row = {"name": name, "kind": "helix", "m": m, "n": n, "variant": variant,
                   "kernels": _mode_name(kc), "flops_per_sequence": flops,
                   "predicted_micro_batch": b_pred}
            if rec.late():
                row["error"] = "skipped: past --deadline-s"
                rec.add("rows", row)
                continue
            try:
                row.update(measure(runner, kc, min(b_pred, args.max_micro_batch), timer))
                log.info("  %s: b=%d %.1f ms/mb, %.2f ms/seq at b=1 (%s s)", name,
                         row["micro_batch"], row["ms_per_micro_batch"],
                         row.get("ms_per_sequence_b1", float("nan")), row["wall_s"])
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"
                log.warning("  %s: FAILED %s\n%s", name, row["error"],
                            traceback.format_exc(limit=3))
                free_memory(timer.device)
            rec.add("rows", row)
        del runner
        free_memory(timer.device)
    if (args.b_sweep or args.compile_check) and not rec.late():
        _extras(args, cfg, cluster, timer, rec, kw)
        rec.save()


def _extras(args, cfg, cluster, timer: Timer, rec: RawRecord, kw: dict) -> None:
    """helix m=1 x n=N with kernel choice: ms per sequence at several micro-batches, and
    the same rank graph through torch.compile (what fusing the elementwise ops gives)."""
    devices = args.devices[0]
    runner = PaperHelixRunner(cfg, 1, devices, None, devices, cluster, timer.device, **kw)
    flops = runner.flops()
    rec.data["b_sweep"] = []
    for b in args.b_sweep or ():
        try:
            row = _sweep_row(runner, b, flops, timer)
            log.info("  b-sweep m=1 kernel-choice b=%d: %.2f ms/seq", row["b"],
                     row["ms_per_sequence"])
        except Exception as e:  # noqa: BLE001
            row = {"b": b, "error": f"{type(e).__name__}: {e}"}
        rec.add("b_sweep", row)
        free_memory(timer.device)
    if args.b_sweep:
        _sequence_parallel_sweep(args, cfg, cluster, timer, rec, flops, kw)
    if args.compile_check:
        rec.data["compiled"] = _compile_check(runner, cfg, flops, timer)
    free_memory(timer.device)


def _compile_check(runner: PaperHelixRunner, cfg, flops: int, timer: Timer) -> dict:
    out = {"what": "rank graph m=1 with kernel choice, torch.compile (inductor, default "
                   "mode), one sequence", "flops_per_sequence": flops}
    try:
        gm = materialize(runner.graph(1, True), timer.device)
        x = torch.randn(1, cfg.seq, cfg.hidden, dtype=cfg.dtype, device=timer.device)
        with stubbed(StubCollectives()):
            eager = timer(lambda: gm(x), warmup=1)["median_ms"]
            t0 = time.perf_counter()
            cg = torch.compile(gm, dynamic=False)
            with torch.no_grad():
                cg(x)
            out["compile_s"] = round(time.perf_counter() - t0, 1)
            with torch.no_grad():
                t = timer(lambda: cg(x), warmup=1)
            out.update(eager_ms_per_sequence=eager, compiled_ms_per_sequence=t["median_ms"],
                       eager_tflops=flops / (eager * 1e-3) / 1e12,
                       compiled_tflops=flops / (t["median_ms"] * 1e-3) / 1e12)
            split = class_split(lambda: cg(x), timer.device)
            out["compiled_class_ms"], out["compiled_top_ops"] = split.by_class, split.top
        log.info("  torch.compile m=1 kernel-choice: eager %.2f ms/seq, compiled %.2f ms/seq "
                 "(%.0f TFLOP/s), compile %s s", eager, t["median_ms"], out["compiled_tflops"],
                 out["compile_s"])
    except Exception as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        log.warning("  torch.compile check failed: %s", out["error"])
    return out


def _sweep_row(runner: PaperHelixRunner, b: int, flops: int, timer: Timer) -> dict:
    """One rank graph with kernel choice timed at micro-batch b (halved until it fits)."""
    b_used, t, fn = run_timed(runner.make(True), b, timer)
    del fn
    return {"b": b_used, "ms_per_micro_batch": t["median_ms"],
            "ms_per_sequence": t["median_ms"] / b_used,
            "tflops": flops * b_used / (t["median_ms"] * 1e-3) / 1e12,
            **{k: t.get(k) for k in ("peak_gib", "alloc_retries", "device_mallocs")}}


def _sequence_parallel_sweep(args, cfg, cluster, timer: Timer, rec: RawRecord, flops: int,
                             kw: dict) -> None:
    """helix m=1 x n=N with kernel choice and sequence-parallel norms (helix_compile's
    sequence_parallel=True): ms per sequence at the b-sweep's micro-batches, one rank, the
    reduce-scatter and all-gather stubbed like the other collectives."""
    devices = args.devices[0]
    rec.data["sequence_parallel"] = []
    try:
        runner = PaperHelixRunner(cfg, 1, devices, None, devices, cluster, timer.device,
                                  sequence_parallel=True, **kw)
    except Exception as e:  # noqa: BLE001
        rec.add("sequence_parallel", {"error": f"compile: {type(e).__name__}: {e}"})
        log.warning("  sequence parallel: compile failed: %s", e)
        return
    for b in args.b_sweep:
        try:
            row = _sweep_row(runner, b, flops, timer)
            if row["b"] == 1:
                gm = materialize(runner.graph(1, True), timer.device)
                x = torch.randn(1, cfg.seq, cfg.hidden, dtype=cfg.dtype, device=timer.device)
                with stubbed():
                    split = class_split(lambda: gm(x), timer.device)
                row["class_ms_per_sequence"], row["top_ops"] = split.by_class, split.top
                del gm
            log.info("  sequence parallel m=1 kernel-choice b=%d: %.2f ms/seq (%.0f TFLOP/s)",
                     row["b"], row["ms_per_sequence"], row["tflops"])
        except Exception as e:  # noqa: BLE001
            row = {"b": b, "error": f"{type(e).__name__}: {e}"}
            log.warning("  sequence parallel b=%d: FAILED %s", b, e)
        rec.add("sequence_parallel", row)
        free_memory(timer.device)


# --- assembling the report ----------------------------------------------------------------------
def assemble(raw: dict, summary, cluster, profile, cfg) -> dict:
    """The results JSON from raw measurements and the current cost model + profile."""
    B, S = cfg.batch, cfg.seq
    tokens = B * S
    peak = matmul_peak(profile)
    d = cfg.head_dim
    sdpa_bk = sdpa_backend_for(d, profile)
    plan = make_plan(summary, raw["devices"], cluster, profile=profile)
    chosen = {"m": plan.m, "n": plan.n, "variants": list(plan.variants),
              "predicted_tokens_per_s": plan.cost.tokens_per_s,
              "predicted_step_ms": plan.cost.step_ms, "micro_batch": plan.cost.micro_batch}
    rows = []
    for r in raw["rows"]:
        row = {k: r.get(k) for k in ("name", "kind", "m", "n", "variant", "kernels", "tp", "pp")}
        kc = r["kernels"] == "kernel-choice"
        try:
            if r["kind"] == "helix":
                pred = helix_prediction(summary, cluster, profile, r["m"], r["n"],
                                        None if r["variant"] == "heads" else r["variant"],
                                        None if kc else sdpa_bk)
            else:
                pred = baseline_prediction(summary, cluster, profile, r["tp"], r["pp"],
                                           None if kc else sdpa_bk)
        except Exception as e:  # noqa: BLE001
            pred, row["prediction_error"] = None, f"{type(e).__name__}: {e}"
        if "error" in r:
            row.update(error=r["error"], measured_compute_ms=None, step_ms=None,
                       tokens_per_s=None)
            row["predicted_compute_ms"] = None if pred is None else pred.compute_ms
            rows.append(row)
            continue
        b = r["micro_batch"]
        M = math.ceil(B / b)
        t_mb = r["ms_per_micro_batch"]
        compute = t_mb * B / b                 # B / b micro-batches (the last one pro rata)
        comm = pred.comm_ms if pred is not None else 0.0
        pp = r.get("pp") or 1
        bubble = 0.0
        if pp > 1:
            # per micro-batch stage time = measured compute + modeled comm (incl. sends)
            t_stage = t_mb + comm / M
            bubble = (pp - 1) * t_stage        # (p-1)/(M+p-1) of (M+p-1) * t_stage
        step = compute + comm + bubble
        if r["kind"] == "baseline":
            r = {**r, "flops_per_sequence": r.get("stage_layers", cfg.layers)
                 * tp_layer_flops(cfg, r["tp"])}
        flops = r["flops_per_sequence"] * B
        split = r.get("class_ms_per_sequence_b1") or {}
        row.update(
            micro_batch=b, micro_batches=M, predicted_micro_batch=r.get("predicted_micro_batch"),
            ms_per_micro_batch=t_mb, measured_compute_ms=compute,
            predicted_compute_ms=None if pred is None else pred.compute_ms,
            compute_error=None if pred is None else pred.compute_ms / compute - 1.0,
            comm_ms=comm, bubble_ms=bubble,
            bubble_fraction=(pp - 1) / (M + pp - 1) if pp > 1 else 0.0, step_ms=step,
            tokens_per_s=tokens / (step * 1e-3), comm_ms_per_token=comm / tokens,
            predicted_step_ms=None if pred is None else pred.step_ms,
            predicted_tokens_per_s=None if pred is None else pred.tokens_per_s,
            predicted_backends=None if pred is None else [s.backend for s in pred.sites],
            flops_per_rank_step=flops, achieved_tflops=flops / (compute * 1e-3) / 1e12,
            peak_fraction=flops / (compute * 1e-3) / 1e12 / peak,
            ms_per_sequence_b1=r.get("ms_per_sequence_b1"),
            layer_tflops_b1=(r["flops_per_sequence"] / (r["ms_per_sequence_b1"] * 1e-3) / 1e12
                             if r.get("ms_per_sequence_b1") else None),
            class_ms_per_sequence_b1=split, bound=bound_of(split, comm, compute),
            peak_gib=r.get("peak_gib"),
            chosen_by_plan=(r["kind"] == "helix" and (r["m"], r["n"]) == (plan.m, plan.n)
                            and (r["variant"] in plan.variants)))
        rows.append(row)
    for name, tps in PAPER.items():
        rows.append({"name": f"paper: {name}", "kind": "peer", "m": None, "n": None,
                     "measured_compute_ms": None, "predicted_compute_ms": None, "comm_ms": None,
                     "bubble_ms": None, "step_ms": tokens / tps * 1e3, "tokens_per_s": tps,
                     "comm_ms_per_token": None,
                     "note": "published figure (16 x H100), not measured here"})
    helix_kc = [r for r in rows if r["kind"] == "helix" and r.get("kernels") == "kernel-choice"
                and r.get("step_ms")]
    goals = {}
    if helix_kc:
        fastest = min(helix_kc, key=lambda r: r["step_ms"])
        mine = [r for r in helix_kc if r.get("chosen_by_plan")]
        errs = [abs(r["compute_error"]) for r in rows if r.get("compute_error") is not None]
        errs_kc = [abs(r["compute_error"]) for r in rows if r.get("compute_error") is not None
                   and r.get("kernels") == "kernel-choice"]
        goals = {
            "max_abs_compute_error_all_rows": max(errs) if errs else None,
            "max_abs_compute_error_kernel_choice_rows": max(errs_kc) if errs_kc else None,
            "within_15pct_all_rows": bool(errs) and max(errs) <= 0.15,
            "within_15pct_kernel_choice_rows": bool(errs_kc) and max(errs_kc) <= 0.15,
            "measured_fastest_helix": fastest["name"],
            "chosen_measured_step_ms": mine[0]["step_ms"] if mine else None,
            "fastest_measured_step_ms": fastest["step_ms"],
            "chosen_within_3pct_of_fastest": bool(mine) and mine[0]["step_ms"]
            <= 1.03 * fastest["step_ms"],
        }
        chosen["measured_step_ms"] = goals["chosen_measured_step_ms"]
    return {
        "device": raw["info"].get("device"), "torch": raw["info"].get("torch"),
        "date": raw["info"].get("date"), "command": raw.get("command"),
        "config": {k: (str(v) if isinstance(v, torch.dtype) else v)
                   for k, v in dataclasses.asdict(cfg).items()} | {"devices": raw["devices"]},
        "cluster": {f.name: getattr(cluster, f.name) for f in dataclasses.fields(cluster)},
        "profile": profile.name, "matmul_peak_tflops": peak, "sdpa_backend_at_d": sdpa_bk,
        "chunk_bytes": raw.get("chunk_bytes"), "chosen": chosen, "goals": goals,
        "notes": [
            "measured_compute_ms: one rank's forward at micro-batch b, median of repeats, "
            "times B / b; collectives stubbed (no transfer)",
            "comm_ms: modeled by the cost model on the cluster preset; no overlap with compute",
            "step_ms = measured compute + modeled comm + bubble; tokens_per_s = B * S / step",
            "kernels 'sdpa': the graph as PyTorch runs it; 'kernel-choice': after "
            "passes/kernel_choice.py (chunked explicit core for d > 256)",
            "predicted_compute_ms for 'sdpa' rows prices the core with the fused kernel SDPA "
            "picks at this head dim (score-reduce is always explicit)",
        ],
        "plans": rows,
        "b_sweep": raw.get("b_sweep"),
        "compiled": raw.get("compiled"),
        "sequence_parallel": raw.get("sequence_parallel"),
    }


def table(result: dict) -> str:
    lines = [f"{'plan':44s} {'b':>3s} {'meas ms':>9s} {'pred ms':>9s} {'err':>6s} {'comm ms':>8s} "
             f"{'bubble':>7s} {'step ms':>9s} {'tok/s':>10s} {'TFLOP/s':>7s}"]
    for r in result["plans"]:
        if r.get("measured_compute_ms") is None:
            tps = r.get("tokens_per_s")
            lines.append(f"{r['name'][:44]:44s} " + (f"{'':>56s}{tps:10.3g}" if tps else
                                                      f"{r.get('error', '')[:90]}"))
            continue
        err = r.get("compute_error")
        lines.append(
            f"{r['name'][:44]:44s} {r['micro_batch']:3d} {r['measured_compute_ms']:9.0f} "
            f"{(r['predicted_compute_ms'] or 0):9.0f} "
            f"{(100 * err if err is not None else float('nan')):5.0f}% {r['comm_ms']:8.0f} "
            f"{r['bubble_ms']:7.0f} {r['step_ms']:9.0f} {r['tokens_per_s']:10.4g} "
            f"{r['achieved_tflops']:7.0f}")
    c, g = result["chosen"], result.get("goals", {})
    lines.append(f"chosen m={c['m']} x n={c['n']} {c['variants']}; goals: {g}")
    return "\n".join(lines)

