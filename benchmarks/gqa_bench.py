"""Measure one rank's compute for a LLaMA-style GQA model on one GPU; check the cost model.

    PYTHONPATH=. python benchmarks/gqa_bench.py --out benchmarks/results/gqa-h100.json \
        [--raw-out gqa-h100.raw.json] [--deadline-s 400] [--max-micro-batch 8] [--b-sweep 32 96]
    PYTHONPATH=. python benchmarks/gqa_bench.py --small --out /tmp/gqa-small.json   # CPU test
    PYTHONPATH=. python benchmarks/gqa_bench.py --raw gqa-h100.raw.json --out ...   # re-assemble

Model: Hugging Face LlamaModel, 2 layers, H = 32 query heads, H_kv = 8, d = 128,
D = 4096, MLP 14336 (SwiGLU), vocab 32000, fp16, S = 8192, B = 256 sequences per step
(the batch of benchmarks/gqa_plan.py). On 8 and 32 devices (the `paper` cluster preset,
grown to as many 8-GPU nodes as needed, as gqa_plan.py does):

- every feasible helix split (m, n), both variants where m > 1 (forced):
  `helix_compile(model on meta, devices, (ids,), {"use_cache": False}, plan=(m, n),
  variant=v, cluster=...)`, then `prog.rank_module(0)`, exactly as emitted (no kernel
  choice: at d = 128 the compiler applies none). The capture is made at batch 2 so the
  batch stays a symbol and the same graph runs any micro-batch, under torch.no_grad()
  (transformers 5.17's rotary embedding otherwise becomes a grad-mode submodule). Its
  meta tensors are materialized on the GPU with random values x 0.02; its non-meta
  buffers (the int64 index tensors of the head-dim split) keep their values and move to
  the GPU; factory calls the capture pinned to the meta device are re-pointed at the GPU;
- the TP baseline as PyTorch builds it (DTensor `parallelize_module`: colwise q, k, v,
  gate, up; rowwise o, down; fake process group), TP = 8 on 8 devices only (TP = 32
  cannot split 8 kv heads; TP = 8 x PP = 4 needs 4 layers);
- timing, collectives stub and FLOP count are helix_compiler.bench's (`measure`,
  `run_timed`, `StubCollectives`, `count_flops`, `class_split`): whole sequences per
  micro-batch, CUDA events, warm-up, median of repeats, all_reduce hands back a buffer
  of its input's shape, all_gather concatenates; no transfer.

Micro-batch: the cost model's (up to 256 sequences) capped at --max-micro-batch
(halved on out-of-memory). measured_compute_ms = ms per micro-batch x B / b, the
same whole-batch quantity as the prediction `cost_plan(summary at B, m, n).compute_ms`
(= prog.plan.cost.compute_ms of a program whose summary has batch B). Communication is
the cost model's (no overlap): step = measured compute + modeled comm.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.fx as fx

if __package__ in (None, ""):                       # python benchmarks/gqa_bench.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helix_compiler import bench as hb  # noqa: E402

DEFAULT_PROFILE_PATH = "helix_compiler/profiles/h100.yaml"


@dataclasses.dataclass(frozen=True)
class GqaConfig:
    layers: int = 2
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    hidden: int = 4096
    mlp: int = 14336
    vocab: int = 32000
    seq: int = 8192
    batch: int = 256
    dtype: torch.dtype = torch.float16


def gqa_config(small: bool, seq: int | None = None) -> GqaConfig:
    if small:
        return GqaConfig(head_dim=16, hidden=128, mlp=256, vocab=256, seq=seq or 64, batch=8,
                         dtype=torch.float32)
    return GqaConfig(seq=seq or 8192)


def build(cfg: GqaConfig, device="meta"):
    from transformers import LlamaConfig, LlamaModel

    lc = LlamaConfig(hidden_size=cfg.hidden, num_attention_heads=cfg.heads,
                     num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                     intermediate_size=cfg.mlp, num_hidden_layers=cfg.layers,
                     vocab_size=cfg.vocab, max_position_embeddings=cfg.seq)
    with torch.device(device):
        return LlamaModel(lc).to(cfg.dtype).eval()


def summary_for(cfg: GqaConfig):
    """ModelSummary at batch cfg.batch, captured at batch 1 on meta (as gqa_plan.py)."""
    from helix_compiler.pipeline import analyze

    ids = torch.zeros(1, cfg.seq, dtype=torch.long, device="meta")
    with torch.no_grad():
        s = analyze(build(cfg), (ids,), {"use_cache": False}).summary
    B = cfg.batch
    return dataclasses.replace(
        s, batch=B, sites=tuple(dataclasses.replace(x, batch=B) for x in s.sites),
        mlps=tuple(dataclasses.replace(x, tokens=x.tokens * B) for x in s.mlps))


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
    from helix_compiler.cluster import load_cluster

    base = base or load_cluster("paper")
    nodes = math.ceil(devices / base.gpus_per_node)
    return dataclasses.replace(base, name=f"{base.name}-{nodes}nodes", nodes=nodes)


# --- runners (the interface helix_compiler.bench.measure expects: make(kc) -> make_fn(b)) ---
def _first_tensor(out):
    import torch.utils._pytree as pytree

    return next(x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor))


def _indexed(device) -> torch.device:
    """cuda -> cuda:<current> (the graph's device checks compare indices)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _seeded(device, seed=0):
    return torch.Generator(device=device).manual_seed(seed)


def _random(shape, dtype, device, gen, scale=0.02):
    if dtype.is_floating_point:
        return torch.randn(*shape, dtype=dtype, device=device, generator=gen) * scale
    return torch.zeros(*shape, dtype=dtype, device=device)


class GqaHelixRunner:
    """rank_module(0) of helix m x n, compiled once (dynamic batch), materialized per call."""

    COMPILE_BATCH = 2       # batch 1 would be specialized by the capture

    def __init__(self, cfg, m, n, variant, devices, cluster, device):
        from helix_compiler import helix_compile

        self.cfg, self.device = cfg, _indexed(device)
        ids = torch.zeros(self.COMPILE_BATCH, cfg.seq, dtype=torch.long, device="meta")
        t0 = time.perf_counter()
        # no_grad: transformers 5.17 runs the rotary embedding under torch.no_grad(); captured
        # with grad enabled that becomes a wrap_with_set_grad_enabled submodule, which the
        # shard pass does not handle (5.24 does not emit it)
        with torch.no_grad():
            prog = helix_compile(build(cfg), devices=devices, example_inputs=(ids,),
                                 example_kwargs={"use_cache": False}, plan=(m, n),
                                 variant=variant, cluster=cluster)
        gm = prog.rank_module(0)
        self.compile_s = round(time.perf_counter() - t0, 1)
        self.gm_meta = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name="Rank")
        self.plan = prog.plan
        self.kernel_choice = prog.kernel_choice

    def _graph_on_device(self) -> fx.GraphModule:
        from helix_compiler.program import on_device

        gm = fx.GraphModule(self.gm_meta, copy.deepcopy(self.gm_meta.graph), class_name="Rank")
        gen = _seeded(self.device)
        for name, t in list(gm.named_buffers()) + list(gm.named_parameters()):
            v = (_random(tuple(t.shape), t.dtype, self.device, gen) if t.is_meta
                 else t.detach().to(self.device))
            hb._set_attr(gm, name, v)
        # factory calls and .to() the capture pinned to meta
        return on_device(gm, self.device)

    def flops(self) -> int:
        from helix_compiler import collectives

        ids = torch.zeros(1, self.cfg.seq, dtype=torch.long, device="meta")
        collectives.bind(hb.StubCollectives())
        try:
            return hb.count_flops(lambda: self.gm_meta(ids, use_cache=False))
        finally:
            collectives.bind(None)

    def make(self, kernel_choice: bool):
        from helix_compiler import collectives

        if kernel_choice:
            raise ValueError("the GQA rank graphs run as emitted (no kernel choice at d = 128)")

        def make_fn(b):
            gm = self._graph_on_device()
            gen = _seeded(self.device, 1)
            ids = torch.randint(0, self.cfg.vocab, (b, self.cfg.seq), device=self.device,
                                generator=gen)
            collectives.bind(hb.StubCollectives())

            def fn():
                return gm(ids, use_cache=False)
            with torch.no_grad():
                got = tuple(_first_tensor(fn()).shape)
            if got != (b, self.cfg.seq, self.cfg.hidden):
                raise RuntimeError(f"rank graph gives {got}, expected "
                                   f"{(b, self.cfg.seq, self.cfg.hidden)}")
            return fn
        return make_fn


class GqaTPRunner:
    """Megatron-style TP of the HF LlamaModel with PyTorch's tensor-parallel API (fake PG)."""

    def __init__(self, cfg, tp: int, device):
        self.cfg, self.tp, self.device = cfg, tp, torch.device(device)

    def make(self, kernel_choice: bool):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                       parallelize_module)
        from torch.testing._internal.distributed.fake_pg import FakeStore

        if kernel_choice:
            raise ValueError("no kernel choice at d = 128")
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=self.tp)
        mesh = init_device_mesh(self.device.type, (self.tp,))
        model = build(self.cfg)
        plan = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
                "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
                "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
                "mlp.down_proj": RowwiseParallel()}
        for layer in model.layers:
            parallelize_module(layer, mesh, plan)
        model.to_empty(device=self.device)
        gen = _seeded(self.device)
        with torch.no_grad():
            for _, p in list(model.named_parameters()) + list(model.named_buffers()):
                local = p.to_local() if hasattr(p, "to_local") else p
                local.copy_(_random(tuple(local.shape), local.dtype, self.device, gen))
        a = model.layers[0].self_attn
        self.info = {"q_proj_local": list(a.q_proj.weight.to_local().shape),
                     "k_proj_local": list(a.k_proj.weight.to_local().shape),
                     "down_proj_local": list(model.layers[0].mlp.down_proj.weight.to_local().shape),
                     "attn_implementation": model.config._attn_implementation}

        def make_fn(b):
            ids = torch.randint(0, self.cfg.vocab, (b, self.cfg.seq), device=self.device,
                                generator=_seeded(self.device, 1))

            def fn():
                return model(input_ids=ids, use_cache=False)
            return fn
        return make_fn


def tp_flops_per_sequence(cfg: GqaConfig, tp: int) -> int:
    """FLOPs of one TP rank, one sequence (FlopCounterMode counts DTensor global shapes):
    q, k, v, o projections, QK^T and PV over all S^2 (as FlopCounterMode counts SDPA),
    gate, up and down."""
    S, D, d = cfg.seq, cfg.hidden, cfg.head_dim
    h, hkv, f = cfg.heads // tp, max(1, cfg.kv_heads // tp), cfg.mlp // tp
    layer = (2 * S * D * h * d * 2 + 2 * 2 * S * D * hkv * d + 2 * 2 * h * S * S * d
             + 3 * 2 * S * D * f)
    return cfg.layers * layer


# --- the cases --------------------------------------------------------------------------------
def cases(summary, devices, cluster, profile, with_baseline: bool):
    """[(kind, m, n, variant, predicted micro-batch)]: m = 1, qk-gather, TP, score-reduce."""
    helix = hb.helix_cases(summary, devices, cluster, profile)
    order = {None: 0, "qk-gather": 1, "score-reduce": 3}
    out = [("helix", m, n, v, b) for m, n, v, b in helix]
    if with_baseline:
        from helix_compiler.cost import cost_baseline

        tp = min(cluster.gpus_per_node, devices)
        if tp == devices:
            try:
                b = cost_baseline(summary, tp, 1, cluster, profile).micro_batch
            except Exception:  # noqa: BLE001
                b = 1
            out.append(("baseline", 1, tp, "tp", b))
    rank = {("baseline", "tp"): 2}
    return sorted(out, key=lambda c: (rank.get((c[0], c[3]), order.get(c[3], 0)), c[1]))


def run_measurements(args, cfg, cluster_of, profile, device, log) -> dict:
    from helix_compiler import collectives
    from helix_compiler.calibrate import device_info

    raw = {"info": device_info(device), "command": args.command, "rows": [],
           "config": {k: (str(v) if isinstance(v, torch.dtype) else v)
                      for k, v in dataclasses.asdict(cfg).items()},
           "devices": list(args.devices), "max_micro_batch": args.max_micro_batch,
           "warmup": args.warmup, "repeats": args.repeats}
    if device.type == "cuda":
        raw["info"]["sdpa_enabled"] = {
            k: getattr(torch.backends.cuda, f"{k}_sdp_enabled")()
            for k in ("flash", "mem_efficient", "cudnn", "math")
            if hasattr(torch.backends.cuda, f"{k}_sdp_enabled")}
    try:
        import transformers
        raw["info"]["transformers"] = transformers.__version__
    except Exception:  # noqa: BLE001
        pass
    t_start = time.perf_counter()

    def save():
        if args.raw_out:
            Path(args.raw_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.raw_out).write_text(json.dumps(raw, indent=1))

    def late() -> bool:
        return args.deadline_s is not None and time.perf_counter() - t_start > args.deadline_s

    summary = summary_for(cfg)
    for devices in args.devices:
        cluster = cluster_of(devices)
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
            if late():
                row["error"] = "skipped: past --deadline-s"
                raw["rows"].append(row)
                log(f"  [{devices}] {row['name']}: skipped (deadline)")
                continue
            b_try = max(1, min(b_pred, args.max_micro_batch))
            runner = None
            try:
                if kind == "baseline":
                    runner = GqaTPRunner(cfg, n, device)
                    row["flops_per_sequence"] = tp_flops_per_sequence(cfg, n)
                else:
                    runner = GqaHelixRunner(cfg, m, n, v, devices, cluster, device)
                    row["compile_s"] = runner.compile_s
                    row["variant"] = runner.plan.variants[0] if runner.plan.variants else "heads"
                    row["flops_per_sequence"] = runner.flops()
                row.update(hb.measure(runner, False, b_try, device, args, log))
                if kind == "baseline":
                    row["local_shapes"] = runner.info
                log(f"  [{devices}] {row['name']}: b={row['micro_batch']} "
                    f"{row['ms_per_micro_batch']:.2f} ms/mb = "
                    f"{row['ms_per_micro_batch'] / row['micro_batch']:.3f} ms/seq "
                    f"({row['wall_s']} s)")
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                log(f"  [{devices}] {row['name']}: FAILED {row['error']}\n"
                    f"{traceback.format_exc(limit=6)}")
            collectives.bind(None)
            del runner
            hb._free(device)
            raw["rows"].append(row)
            save()
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    raw["b_sweep"] = []
    for devices in args.devices if args.b_sweep else ():
        # helix m=1 x n=devices: ms per sequence at other micro-batches (the plan assumes up
        # to 256 sequences per micro-batch; the rows above run at most --max-micro-batch)
        if late():
            break
        try:
            runner = GqaHelixRunner(cfg, 1, devices, None, devices, cluster_of(devices), device)
            for b in args.b_sweep:
                if late():
                    break
                try:
                    b_used, t, fn = hb.run_timed(runner.make(False), b, device, args.warmup,
                                                 args.repeats, log)
                    del fn
                    raw["b_sweep"].append({"devices": devices, "m": 1, "n": devices,
                                           "b": b_used, "ms_per_micro_batch": t["median_ms"],
                                           "ms_per_sequence": t["median_ms"] / b_used,
                                           "peak_gib": t.get("peak_gib")})
                    log(f"  [{devices}] b-sweep m=1 b={b_used}: "
                        f"{t['median_ms'] / b_used:.3f} ms/seq")
                except Exception as e:  # noqa: BLE001
                    raw["b_sweep"].append({"devices": devices, "b": b,
                                           "error": f"{type(e).__name__}: {str(e)[:300]}"})
                hb._free(device)
        except Exception as e:  # noqa: BLE001
            log(f"  [{devices}] b-sweep failed: {e}")
        collectives.bind(None)
        runner = None
        hb._free(device)
        save()
    raw["wall_s"] = round(time.perf_counter() - t_start, 1)
    save()
    return raw


# --- the report (bench.py's schema, one block per device count) --------------------------------
def _fused_backends(profile, d):
    return [bk for bk in ("flash", "cudnn", "efficient")
            if profile.attention_efficiency(bk, d, "fp16") is not None]


def assemble(raw: dict, cfg: GqaConfig, cluster_of, profile) -> dict:
    from helix_compiler.plan import make_plan

    summary = summary_for(cfg)
    eager = eager_view(summary)
    B, S = cfg.batch, cfg.seq
    tokens = B * S
    peak = hb.matmul_peak(profile)
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
                pred = (hb._plan_predictions(summary, cluster, profile, r["m"], r["n"], v, None)
                        if helix else
                        hb._baseline_predictions(eager, cluster, profile, r["tp"], 1, None))
                by_core = {}
                for bk in ["explicit", *_fused_backends(profile, cfg.head_dim)]:
                    if v == "score-reduce" and bk != "explicit":
                        continue
                    p = (hb._plan_predictions(summary, cluster, profile, r["m"], r["n"], v, bk)
                         if helix else hb._baseline_predictions(eager, cluster, profile,
                                                                 r["tp"], 1, bk))
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
                bound=hb.bound_of(split, comm, compute), peak_gib=r.get("peak_gib"),
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
            "collectives stubbed (helix_compiler.bench.StubCollectives): no transfer; comm_ms "
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/gqa.json")
    ap.add_argument("--raw-out", default=None, help="raw measurements, written as they come")
    ap.add_argument("--raw", default=None, help="re-assemble these raw measurements")
    ap.add_argument("--profile", default=None,
                    help=f"profile YAML (default {DEFAULT_PROFILE_PATH})")
    ap.add_argument("--devices", type=int, nargs="*", default=[8, 32])
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--small", action="store_true", help="tiny model on the CPU (a test)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--only", nargs="*", default=None, help="splits 'MxN' to run")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--max-micro-batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--deadline-s", type=float, default=None)
    ap.add_argument("--b-sweep", type=int, nargs="*", default=None,
                    help="also time helix m=1 x n=N at these micro-batches")
    args = ap.parse_args(argv)
    args.command = "python benchmarks/gqa_bench.py " + " ".join(
        argv if argv is not None else sys.argv[1:])

    from helix_compiler.profile import load_profile

    root = Path(__file__).resolve().parents[1]
    profile = load_profile(args.profile or root / DEFAULT_PROFILE_PATH)
    cfg = gqa_config(args.small, args.seq)
    t0 = time.perf_counter()
    if args.raw:
        raw = json.loads(Path(args.raw).read_text())
        cfg = dataclasses.replace(cfg, **{k: v for k, v in raw["config"].items()
                                          if k != "dtype"})
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available()
                                              and not args.small else "cpu"))
        print(f"[gqa-bench] {cfg} on {device}, devices {args.devices}", flush=True)
        raw = run_measurements(args, cfg, cluster_for, profile, device,
                               lambda s: print(s, flush=True))
    result = assemble(raw, cfg, cluster_for, profile)
    if args.raw:
        result["reassembled_by"] = args.command
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"[gqa-bench] wrote {args.out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
