"""The plan-space suite (`helix bench --model space`): every plan kind of the paper's model
on N devices, each rank's forward measured on this one GPU, the network modeled.

A plan of the space runs dp replicas of pp stages of an m x n split; what one of its GPUs
computes depends only on (m, n, the stage's layers, the micro-batch b), never on dp: so one
measured *rank kind* prices every plan that runs it. Measured here, each at micro-batches
`--micro-batches` (the best per plan is taken, every one is recorded):

- helix ranks: `prog.rank_module(0)` of helix m x n (the kernel choice applied: the chunked
  explicit core where d > 256), for every m x n that divides N with m <= 2 (both variants at
  m = 2), over all layers (pp = 1) and over half of them (a stage of pp = 2); m = n = 1 is a
  data-parallel rank, the whole model. The collectives are stubbed by StubCollectives, which
  makes every local copy that the real collective path makes (measure/stub.py);
- baselines at their best settings, each compiled by torch.compile: DTensor TP
  (parallelize_module, fake process group) and a hand-written Megatron rank (local-shard
  nn.Linear, the chunked core, an in-place all-reduce: nothing local to time) at TP = 8 over
  half the layers (a stage of TP = 8 x PP = 2) and TP = 16 over all; torch data parallel
  (the same hand-written model at TP = 1, all layers).

Assembled per plan: measured compute per micro-batch, modeled communication (cost.py's
collective and point-to-point formulas on the given cluster), pipeline bubble
((M + pp - 1) x stage for M micro-batches), tokens/s for the global batch, latency of one
sequence (dp = 1 plans), the paper's TPOT (communication, synchronization and bubble per
token), useful FLOPs per second (qk-gather's repeated QK^T is not useful work), and the
cost model's predicted compute beside the measured one.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback

import sympy
import torch
import torch.nn as nn
import torch.nn.functional as F

from helix_compiler.planning.cost import (_async_terms, cost_baseline, cost_plan, overlapped_step,
                                          p2p_s, sequence_parallel_cost)
from helix_compiler.measure.predict import at_batch, matmul_peak, measured_gpu
from helix_compiler.measure.record import RawRecord
from helix_compiler.measure.runners import (PaperHelixRunner, PaperTPRunner, release_group,
                                            run_timed)
from helix_compiler.measure.surgery import init_tensor
from helix_compiler.measure.timing import Timer, free_memory
from helix_compiler.models.paper import PaperConfig, build
from helix_compiler.pipeline import analyze
from helix_compiler.planning.plan import make_plan
from helix_compiler.planning.solver import solve

log = logging.getLogger(__name__)

THRESHOLD = 256          # head dims above it take the chunked explicit core (Hopper)
SMALL_THRESHOLD = 16


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RankKind:
    """What one GPU of a plan computes: `impl` helix | dtensor | megatron, an m x n helix
    rank or a TP rank (m = 1, n = tp), over `layers` of the model's layers."""

    impl: str
    m: int
    n: int
    layers: int
    variant: str = "heads"
    sequence_parallel: bool = False     # helix: norms on the rank's 1/N of the sequence

    @property
    def name(self) -> str:
        if self.impl == "helix":
            v = "" if self.m == 1 else f" {self.variant}"
            sp = " SP" if self.sequence_parallel else ""
            return f"helix m={self.m} x n={self.n}{v}{sp}, {self.layers} layer(s)"
        if self.n == 1:
            return f"torch whole model (compiled), {self.layers} layer(s)"
        return f"{self.impl} TP={self.n} (compiled), {self.layers} layer(s)"


def config(small: bool) -> PaperConfig:
    if small:
        return PaperConfig(heads=16, head_dim=32, mlp=512, batch=16, seq=64, dtype=torch.float32)
    return PaperConfig()


def summary_for(cfg: PaperConfig, layers: int):
    """ModelSummary of `layers` layers of the model at batch 1 (captured on meta)."""
    model, (x,) = build(dataclasses.replace(cfg, batch=1, layers=layers), "meta")
    return analyze(model, (x,), {}).summary


def rank_kinds(cfg: PaperConfig, devices: int) -> list[RankKind]:
    out = []
    stages = [1, 2] if cfg.layers % 2 == 0 else [1]
    for pp in stages:
        L = cfg.layers // pp
        for mn in (int(x) for x in sympy.divisors(devices // pp)):
            for m in (1, 2):
                # m = 2 where it can matter: a whole node's worth of ranks or more (below,
                # the heads alone split the rank and a dim split only adds communication)
                if mn % m or cfg.head_dim % m or cfg.heads % (mn // m) or (m > 1 and mn < 8):
                    continue
                for v in (("heads",) if m == 1 else ("score-reduce", "qk-gather")):
                    out.append(RankKind(impl="helix", m=m, n=mn // m, layers=L, variant=v))
                if m == 1 and pp == 1 and mn >= 8:
                    # sequence-parallel norms, which the planner prices and chooses where the
                    # replicated norm work of a wide rank outweighs one more latency per
                    # all-reduce (the latency choice at one sequence)
                    out.append(RankKind(impl="helix", m=1, n=mn, layers=L,
                                        sequence_parallel=True))
    tp_stage = min(8, devices)
    for impl in ("dtensor", "megatron"):
        out.append(RankKind(impl=impl, m=1, n=tp_stage, layers=cfg.layers // 2 or 1))
        out.append(RankKind(impl=impl, m=1, n=devices, layers=cfg.layers))
    out.append(RankKind(impl="megatron", m=1, n=1, layers=cfg.layers))
    return out


# --- the hand-written Megatron rank -------------------------------------------------------
class _MegatronBlock(nn.Module):
    """One layer as one of tp Megatron ranks computes it: q, k, v and fc_in hold D/tp (F/tp)
    output columns, o and fc_out D/tp (F/tp) input rows; the two row-parallel outputs are
    all-reduced in place (`reduce`: NCCL reduces the buffer itself, so on one GPU nothing)."""

    def __init__(self, cfg: PaperConfig, tp: int, core) -> None:
        super().__init__()
        D, F_ = cfg.hidden, cfg.mlp
        self.h, self.d, self.core = cfg.heads // tp, cfg.head_dim, core
        self.ln_1, self.ln_2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.q = nn.Linear(D, D // tp)
        self.k = nn.Linear(D, D // tp)
        self.v = nn.Linear(D, D // tp)
        self.o = nn.Linear(D // tp, D)
        self.fc_in = nn.Linear(D, F_ // tp)
        self.fc_out = nn.Linear(F_ // tp, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        y = self.ln_1(x)
        q, k, v = (p(y).view(B, S, self.h, self.d).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = self.core(q, k, v).transpose(1, 2).reshape(B, S, self.h * self.d)
        x = x + self.o(a)                       # + all_reduce_(o(a)) on the real path
        return x + self.fc_out(F.gelu(self.fc_in(self.ln_2(x))))


class _MegatronModel(nn.Module):
    def __init__(self, cfg: PaperConfig, tp: int, layers: int, core) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_MegatronBlock(cfg, tp, core) for _ in range(layers))
        self.ln_f = nn.LayerNorm(cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.ln_f(x)


def _core(cfg: PaperConfig, threshold: int, chunk_bytes: int):
    if cfg.head_dim > threshold:
        return lambda q, k, v: torch.ops.helix.chunked_attention(q, k, v, None, False, None,
                                                                 chunk_bytes, 0)
    return F.scaled_dot_product_attention


class MegatronRunner:
    def __init__(self, cfg: PaperConfig, tp: int, layers: int, device, *, chunk_bytes: int,
                 threshold: int, compile: bool = True):
        self.cfg, self.tp, self.layers, self.device = cfg, tp, layers, device
        self.core, self.compile = _core(cfg, threshold, chunk_bytes), compile

    def make(self, kernel_choice: bool = True):
        with torch.device("meta"):
            model = _MegatronModel(self.cfg, self.tp, self.layers, self.core)
        model = model.to(self.cfg.dtype).to_empty(device=self.device).eval()
        gen = torch.Generator(device=self.device).manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(init_tensor(name, tuple(p.shape), p.dtype, self.device, gen))
        run = torch.compile(model, dynamic=False) if self.compile else model

        def make_fn(b):
            x = torch.randn(b, self.cfg.seq, self.cfg.hidden, dtype=self.cfg.dtype,
                            device=self.device)
            return lambda: run(x)
        return make_fn


class CompiledDTensorRunner(PaperTPRunner):
    """PyTorch's tensor-parallel API (DTensor, fake process group), under torch.compile."""

    def make(self, kernel_choice: bool = True):
        make_eager = super().make(kernel_choice)

        def make_fn(b):
            fn = make_eager(b)
            compiled = torch.compile(fn, dynamic=False)
            return compiled
        return make_fn


# --- measuring ---------------------------------------------------------------------------------
def _runner(kind: RankKind, cfg: PaperConfig, cluster, device, kw: dict):
    sub = dataclasses.replace(cfg, layers=kind.layers)
    if kind.impl == "helix":
        variant = None if kind.m == 1 else kind.variant
        return PaperHelixRunner(sub, kind.m, kind.n, variant, kind.m * kind.n, cluster, device,
                                sequence_parallel=kind.sequence_parallel, **kw)
    if kind.impl == "dtensor":
        return CompiledDTensorRunner(cfg, kind.n, kind.layers, device, **kw)
    return MegatronRunner(cfg, kind.n, kind.layers, device, **kw)


def run_measurements(args, cfg, cluster, timer: Timer, rec: RawRecord) -> None:
    devices = args.devices[0]
    threshold = SMALL_THRESHOLD if args.small else THRESHOLD
    kw = dict(chunk_bytes=args.chunk_bytes, threshold=threshold)
    # the peak as the ranks are timed (after the timer's soak), and from the GPU as it comes
    # (boosted after idle: the higher one, recorded beside)
    burst = Timer(timer.device, warmup=timer.warmup, repeats=timer.repeats)
    rec.data["matmul_tflops_burst"] = _matmul_peak(cfg, burst)
    del burst
    rec.data["matmul_tflops_measured"] = _matmul_peak(cfg, timer)
    for kind in rank_kinds(cfg, devices):
        if args.only and not any(s in kind.name for s in args.only):
            continue
        row = {"kind": dataclasses.asdict(kind), "name": kind.name, "by_b": {}}
        if rec.late():
            row["error"] = "skipped: past --deadline-s"
            rec.add("ranks", row)
            continue
        t0 = time.perf_counter()
        try:
            runner = _runner(kind, cfg, cluster, timer.device, kw)
            make_fn = runner.make(True)
            if kind.impl == "helix":
                row["flops_per_sequence"] = runner.flops()
            mode = getattr(args, "helix_compile", None) or "none"
            mode = mode if kind.impl == "helix" else "none"
            make_compiled = runner.make(True, mode) if mode != "none" else None
            for b in args.micro_batches:
                b_used, t, fn = run_timed(make_fn, b, timer)
                del fn
                entry = {"ms_per_micro_batch": t["median_ms"], "min_ms": t["min_ms"],
                         "max_ms": t["max_ms"], "peak_gib": t.get("peak_gib"),
                         "run": "eager" if kind.impl == "helix" else "compiled"}   # baselines: _runner
                if make_compiled is not None:
                    # helix at its best settings too: the same rank under torch.compile (as
                    # `helix run --compile` runs it), the faster of the two taken
                    free_memory(timer.device)
                    entry["eager_ms"] = t["median_ms"]
                    try:
                        _, tc, fn = run_timed(make_compiled, b_used, timer)
                        del fn
                        entry["compiled_ms"] = tc["median_ms"]
                        if tc["median_ms"] < t["median_ms"]:
                            entry.update(ms_per_micro_batch=tc["median_ms"], min_ms=tc["min_ms"],
                                         max_ms=tc["max_ms"], run=f"compiled ({mode})")
                    except Exception as e:  # noqa: BLE001  (recorded; the eager figure stands)
                        entry["compiled_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    torch._dynamo.reset()
                row["by_b"][str(b_used)] = entry
                free_memory(timer.device)
                if b_used < b:
                    break                       # out of memory at b: larger ones will be too
            log.info("  %s: %s", kind.name, {b: round(v["ms_per_micro_batch"] / int(b), 2)
                                             for b, v in row["by_b"].items()})
        except Exception as e:  # noqa: BLE001  (recorded in the row; the session goes on)
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            log.warning("  %s: FAILED %s\n%s", kind.name, row["error"],
                        traceback.format_exc(limit=4))
        runner = make_fn = None
        if kind.impl == "dtensor":
            release_group()
        torch._dynamo.reset()
        free_memory(timer.device)
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        rec.add("ranks", row)


def _matmul_peak(cfg: PaperConfig, timer: Timer) -> float:
    """TFLOP/s of one large square GEMM in the model's dtype on this device (the roofline's
    peak: what the GPU reaches, not its datasheet)."""
    n = 8192 if timer.device.type == "cuda" else 256
    a = torch.randn(n, n, dtype=cfg.dtype, device=timer.device)
    b = torch.randn(n, n, dtype=cfg.dtype, device=timer.device)
    t = timer(lambda: a @ b)
    return 2 * n ** 3 / (t["median_ms"] * 1e-3) / 1e12


# --- assembling the plan table -----------------------------------------------------------------
def _useful_flops_per_sequence(cfg: PaperConfig) -> float:
    """FLOPs of one sequence through the whole model (each multiply-add once)."""
    S, D, F_, H, d = cfg.seq, cfg.hidden, cfg.mlp, cfg.heads, cfg.head_dim
    per_layer = 4 * 2 * S * D * D + 2 * 2 * H * S * S * d + 2 * 2 * S * D * F_
    return cfg.layers * per_layer


def _helix_cost(summary, kind: RankKind, cluster, profile=None, dp: int = 1):
    """cost_plan of a helix rank kind; with sequence-parallel norms, as the planner prices
    them (cost.sequence_parallel_cost)."""
    variant = None if kind.m == 1 else kind.variant
    base = cost_plan(summary, kind.m, kind.n, cluster, profile, variant=variant, dp=dp)
    if not kind.sequence_parallel:
        return base
    return sequence_parallel_cost(summary, base, kind.m, kind.n, cluster, dp, profile) or base


def _helix_comm_ms(summaries, kind: RankKind, b: int, dp: int, cluster) -> float:
    """Modeled communication of one micro-batch of b sequences on a rank of this kind."""
    return _helix_cost(at_batch(summaries[kind.layers], b * dp), kind, cluster, dp=dp).comm_ms


def _predicted_compute_ms(summaries, kind: RankKind, b: int, cluster, profile) -> float | None:
    summary = at_batch(summaries[kind.layers], b)
    try:
        if kind.impl == "helix":
            return _helix_cost(summary, kind, cluster, profile).compute_ms
        return cost_baseline(summary, kind.n, 1, cluster, profile).compute_ms
    except Exception:  # noqa: BLE001  (a kind the model cannot price: no prediction)
        return None


def _send_ms(cfg: PaperConfig, b: int, width: int, cluster) -> float:
    """One stage boundary: each of the stage's `width` ranks sends the b-sequence hidden
    state to its counterpart in the next stage (stage s on ranks [s w, (s + 1) w))."""
    nbytes = cfg.dtype.itemsize * b * cfg.seq * cfg.hidden
    return p2p_s(nbytes, 0, width, min(width, cluster.gpus_per_node), cluster) * 1e3


def _plan_rows(cfg, devices, ranks, summaries, cluster, profile, gpu=None) -> list[dict]:
    """`gpu`: the cluster the predicted compute is priced on (measured_gpu: the measured GPU's
    peaks and bandwidth); communication is priced on `cluster`."""
    gpu = gpu or cluster
    rows = []
    B, S = cfg.batch, cfg.seq
    useful = _useful_flops_per_sequence(cfg)
    by_kind = {RankKind(**r["kind"]): r for r in ranks if r.get("by_b")}

    def add(name, kind, dp, pp, width, comm_fn, family):
        r = by_kind.get(kind)
        if r is None or B % dp:
            return
        best = None
        for b_str, t in r["by_b"].items():
            b = int(b_str)
            local = B // dp
            if local % b:
                continue
            M = local // b
            t_c = t["ms_per_micro_batch"]
            t_x = comm_fn(b)
            send = _send_ms(cfg, b, width, cluster) if pp > 1 else 0.0
            stage = t_c + t_x + send
            step = (M + pp - 1) * stage
            cand = {"b": b, "M": M, "compute_ms": M * t_c, "comm_ms": M * (t_x + send),
                    "bubble_ms": (pp - 1) * stage, "step_ms": step,
                    "tokens_per_s": B * S / (step * 1e-3),
                    # how the rank ran: as built, or under torch.compile (--helix-compile)
                    # (a baseline's rank is always compiled: raw files of 2026-12-03 say "eager")
                    "run": "compiled" if family == "baseline" else t.get("run", "eager")}
            if best is None or cand["step_ms"] < best["step_ms"]:
                best = cand
        if best is None:
            return
        one = r["by_b"].get("1")
        latency = None
        if one is not None and dp == 1:
            latency = pp * (one["ms_per_micro_batch"] + comm_fn(1)) + (pp - 1) * _send_ms(
                cfg, 1, width, cluster)
        pred = _predicted_compute_ms(summaries, kind, best["b"], gpu, profile)
        measured_mb = best["compute_ms"] / best["M"]
        tokens = B * S
        rows.append({
            "plan": name, "family": family, "dp": dp, "pp": pp, "m": kind.m, "n": kind.n,
            "variant": kind.variant, "sequence_parallel": kind.sequence_parallel,
            "rank_kind": kind.name, **best,
            "latency_one_sequence_ms": latency,
            "tpot_overhead_us_per_token": (best["comm_ms"] + best["bubble_ms"]) * 1e3 / tokens,
            "useful_tflops_per_gpu": useful * B / devices / (best["step_ms"] * 1e-3) / 1e12,
            "predicted_compute_ms_per_micro_batch": pred,
            "measured_compute_ms_per_micro_batch": measured_mb,
            "predicted_over_measured": None if pred is None else pred / measured_mb,
            "communication": "modeled", "compute": "measured"})

    for dp in (int(x) for x in sympy.divisors(devices)):
        for pp in (1, 2):
            width = devices // (dp * pp)
            if cfg.layers % pp or width < 1:
                continue
            for c in solve(summaries[cfg.layers], width):
                if not c.feasible or c.m > 2 or (c.m > 1 and width < 8):
                    continue
                for v in (("heads",) if c.m == 1 else ("score-reduce", "qk-gather")):
                    for sp in (False, True):      # an SP kind only where one was measured
                        kind = RankKind(impl="helix", m=c.m, n=c.n, layers=cfg.layers // pp,
                                        variant=v, sequence_parallel=sp)
                        add(_plan_name(dp, pp, c.m, c.n, v, sp=sp), kind, dp, pp, width,
                            lambda b, kind=kind, dp=dp: _helix_comm_ms(summaries, kind, b, dp,
                                                                       cluster),
                            "helix")
    rows += _overlapped_rows(cfg, devices, by_kind, summaries, cluster)
    tp = min(8, devices)
    for impl in ("dtensor", "megatron"):
        def tp_comm(b, tp_, layers):
            summary = at_batch(summaries[layers], b)
            return cost_baseline(summary, tp_, 1, cluster, profile).comm_ms
        add(f"TP={tp} x PP={devices // tp} ({impl})",
            RankKind(impl=impl, m=1, n=tp, layers=cfg.layers // 2 or 1), 1, devices // tp, tp,
            lambda b: tp_comm(b, tp, cfg.layers // 2 or 1), "baseline")
        add(f"TP={devices} ({impl})", RankKind(impl=impl, m=1, n=devices, layers=cfg.layers),
            1, 1, devices, lambda b: tp_comm(b, devices, cfg.layers), "baseline")
    add(f"DP={devices} (torch, compiled)", RankKind(impl="megatron", m=1, n=1, layers=cfg.layers),
        devices, 1, 1, lambda b: 0.0, "baseline")
    return rows


def _overlapped_rows(cfg, devices, by_kind, summaries, cluster) -> list[dict]:
    """Helix pp = 1 plans run by the overlap pass (passes/overlap.py): a micro-batch of b as k
    chunks of b / k, each chunk's all-reduces overlapping the next chunk's compute. A chunk is
    the same rank kind at b / k sequences, so its compute is the measured b / k row; the
    communication per chunk is modeled, and the step is cost.overlapped_step's two-stream
    schedule of them (exposed head and tail included), never compute + communication."""
    rows = []
    B, S = cfg.batch, cfg.seq
    useful = _useful_flops_per_sequence(cfg)
    for kind, r in by_kind.items():
        if (kind.impl != "helix" or kind.layers != cfg.layers or kind.m * kind.n == 1
                or kind.sequence_parallel):       # the overlap pass is not built with SP norms
            continue
        dp = devices // (kind.m * kind.n)
        if B % dp:
            continue
        local = B // dp
        best = None
        for k in (2, 4, 8):
            for b_str in r["by_b"]:
                b = int(b_str)
                if b % k or local % b or str(b // k) not in r["by_b"]:
                    continue
                chunk_c = r["by_b"][str(b // k)]["ms_per_micro_batch"]
                variant = None if kind.m == 1 else kind.variant
                chunk = cost_plan(at_batch(summaries[kind.layers], (b // k) * dp), kind.m, kind.n,
                                  cluster, variant=variant, dp=dp)
                async_ms, sync_ms, count = _async_terms(chunk.sites + chunk.mlps)
                if count == 0:
                    continue
                micro, exposed = overlapped_step(chunk_c, async_ms, count, k, sync_ms)
                M = local // b
                cand = {"b": b, "k": k, "M": M, "compute_ms": M * k * chunk_c,
                        "comm_ms": M * k * (async_ms + sync_ms), "exposed_comm_ms": M * exposed,
                        "bubble_ms": 0.0, "step_ms": M * micro,
                        "tokens_per_s": B * S / (M * micro * 1e-3),
                        "run": r["by_b"][str(b // k)].get("run", "eager")}
                if best is None or cand["step_ms"] < best["step_ms"]:
                    best = cand
        if best is None:
            continue
        rows.append({
            "plan": _plan_name(dp, 1, kind.m, kind.n, kind.variant, best["k"]),
            "family": "helix", "dp": dp, "pp": 1, "m": kind.m, "n": kind.n,
            "variant": kind.variant, "rank_kind": kind.name, **best,
            "latency_one_sequence_ms": None,
            "tpot_overhead_us_per_token": best["exposed_comm_ms"] * 1e3 / (B * S),
            "useful_tflops_per_gpu": useful * B / devices / (best["step_ms"] * 1e-3) / 1e12,
            "predicted_compute_ms_per_micro_batch": None,
            "measured_compute_ms_per_micro_batch": best["compute_ms"] / best["M"],
            "predicted_over_measured": None,
            "communication": "modeled, overlapped (cost.overlapped_step)",
            "compute": f"measured: k chunks of the rank at b/k"})
    return rows


def assemble(raw: dict, cluster, profile, cfg: PaperConfig) -> dict:
    devices = raw["devices"]
    layer_counts = sorted({cfg.layers, max(cfg.layers // 2, 1)})
    summaries = {L: summary_for(cfg, L) for L in layer_counts}
    gpu = measured_gpu(cluster, raw["info"].get("device"))
    rows = _plan_rows(cfg, devices, raw["ranks"], summaries, cluster, profile, gpu)
    out = {"device": raw["info"].get("device"), "torch": raw["info"].get("torch"),
           "date": raw["info"].get("date"), "command": raw.get("command"), "gpus": 1,
           "devices_planned": devices, "config": {k: getattr(cfg, k) for k in
                                                  ("layers", "heads", "head_dim", "mlp",
                                                   "batch", "seq")},
           "dtype": str(cfg.dtype), "cluster": cluster.name,
           "method": "per-rank compute measured on this GPU (one rank of each kind, its real "
                     "shapes); communication modeled with the cluster's NCCL figures; "
                     "bubble (M + pp - 1) x stage",
           "ranks": raw["ranks"], "plans": rows}
    if not rows:
        out["error"] = "no plan could be assembled: every rank measurement failed"
        return out
    peak = raw.get("matmul_tflops_measured") or matmul_peak(profile)
    out["matmul_tflops_measured"] = peak
    out["soak_s"] = raw.get("soak_s", 0.0)
    useful = _useful_flops_per_sequence(cfg)
    roofline = devices * peak * 1e12 / (useful / cfg.seq)
    burst = raw.get("matmul_tflops_burst")
    burst_roofline = devices * burst * 1e12 / (useful / cfg.seq) if burst else None
    thr = max(rows, key=lambda r: r["tokens_per_s"])
    lat_rows = [r for r in rows if r["latency_one_sequence_ms"] is not None]
    lat = min(lat_rows, key=lambda r: r["latency_one_sequence_ms"]) if lat_rows else None
    base = {r["plan"]: r for r in rows if r["family"] == "baseline"}
    tpxpp = [r for name, r in base.items() if "PP=" in name]
    best_tpxpp = max(tpxpp, key=lambda r: r["tokens_per_s"]) if tpxpp else None
    best_base = max(base.values(), key=lambda r: r["tokens_per_s"]) if base else None
    out["throughput"] = {
        "fastest": thr["plan"], "tokens_per_s": thr["tokens_per_s"],
        "roofline_tokens_per_s": roofline, "fraction_of_roofline": thr["tokens_per_s"] / roofline,
        "matmul_tflops_burst": burst,
        "fraction_of_burst_roofline": None if not burst else
        thr["tokens_per_s"] / burst_roofline,
        "vs_best_tp_x_pp": None if best_tpxpp is None else
        thr["tokens_per_s"] / best_tpxpp["tokens_per_s"],
        "best_tp_x_pp": None if best_tpxpp is None else best_tpxpp["plan"],
        "vs_best_baseline": None if best_base is None else
        thr["tokens_per_s"] / best_base["tokens_per_s"],
        "best_baseline": None if best_base is None else best_base["plan"]}
    out["planner"] = _planner_choices(summaries[cfg.layers], cfg, devices, rows, gpu, profile)
    chosen = out["planner"].get("throughput", {})
    if chosen.get("measured"):
        chosen["fraction_of_roofline"] = chosen["measured"] / roofline
        if burst:
            chosen["fraction_of_burst_roofline"] = chosen["measured"] / burst_roofline
    if lat is not None:
        tp_lat = [r for r in tpxpp if r["latency_one_sequence_ms"] is not None]
        ref = min(tp_lat, key=lambda r: r["latency_one_sequence_ms"]) if tp_lat else None
        out["latency"] = {"fastest": lat["plan"], "ms": lat["latency_one_sequence_ms"],
                          "vs_best_tp_x_pp": None if ref is None else
                          lat["latency_one_sequence_ms"] / ref["latency_one_sequence_ms"],
                          "best_tp_x_pp": None if ref is None else ref["plan"]}
    return out


def _plan_name(dp: int, pp: int, m: int, n: int, variant: str | None = None, k: int = 1,
               sp: bool = False) -> str:
    """A helix row's name in the table, e.g. "dp=2 x pp=2 x m=2 x n=4 qk-gather overlap k=4":
    dp and pp where above 1, the variant where m > 1, " SP" with sequence-parallel norms, the
    overlap's k where above 1."""
    parts = ([f"dp={dp}"] if dp > 1 else []) + ([f"pp={pp}"] if pp > 1 else [])
    return (" x ".join(parts + [f"m={m}", f"n={n}"]) + (f" {variant}" if m > 1 else "")
            + (" SP" if sp else "") + (f" overlap k={k}" if k > 1 else ""))


def _planner_choices(summary, cfg: PaperConfig, devices: int, rows, gpu_cluster, profile) -> dict:
    """What `helix plan` chooses for each objective on the cluster with the measured GPU's
    peaks (measured_gpu) and this profile, and where that plan's row stands in the measured
    table: "the chosen plan is the measured fastest" is checked here, not by eye."""
    out = {"cluster": gpu_cluster.name, "profile": getattr(profile, "name", None)}
    for objective, batch, key in (("throughput", cfg.batch, "tokens_per_s"),
                                  ("latency", 1, "latency_one_sequence_ms")):
        try:
            plan = make_plan(at_batch(summary, batch), devices, gpu_cluster, profile=profile,
                             dp=None, pp=None, overlap=None, sequence_parallel=None,
                             objective=objective)
        except Exception as e:  # noqa: BLE001  (recorded; the table stands without it)
            out[objective] = {"error": f"{type(e).__name__}: {e}"}
            continue
        name = _plan_name(plan.dp, plan.pp, plan.m, plan.n,
                          plan.sites[0].variant if plan.sites else None, plan.overlap,
                          sp=plan.sequence_parallel)
        row = next((r for r in rows if r["family"] == "helix" and r["plan"] == name), None)
        timed = [r for r in rows if r.get(key) is not None]
        best = (max(timed, key=lambda r: r[key]) if objective == "throughput"
                else min(timed, key=lambda r: r[key])) if timed else None
        entry = {"chosen": name, "predicted_step_ms": plan.cost.step_ms,
                 "measured_row": row["plan"] if row else None,
                 "measured_fastest": best["plan"] if best else None}
        if row is not None and row.get(key) is not None and best is not None:
            entry["measured"] = row[key]
            entry["measured_fastest_value"] = best[key]
            entry["chosen_is_measured_fastest"] = row["plan"] == best["plan"]
            entry["chosen_vs_fastest"] = (row[key] / best[key] if objective == "throughput"
                                          else best[key] / row[key])
        out[objective] = entry
    return out


def table(result: dict) -> str:
    if "error" in result:
        return result["error"]
    lines = [f"plan space on {result['devices_planned']} devices, per-rank compute measured on "
             f"{result['device']} (torch {result['torch']}), communication modeled "
             f"({result['cluster']})",
             f"{'plan':44} {'b':>3} {'M':>4} {'compute':>9} {'comm':>8} {'bubble':>8} "
             f"{'step ms':>9} {'tokens/s':>10} {'1-seq ms':>9} {'pred/meas':>9}  run"]
    for r in sorted(result["plans"], key=lambda r: -r["tokens_per_s"]):
        lat = r["latency_one_sequence_ms"]
        pm = r["predicted_over_measured"]
        lines.append(f"{r['plan']:44} {r['b']:>3} {r['M']:>4} {r['compute_ms']:>9.1f} "
                     f"{r['comm_ms']:>8.1f} {r['bubble_ms']:>8.1f} {r['step_ms']:>9.1f} "
                     f"{r['tokens_per_s'] / 1e6:>9.3f}M "
                     f"{'-' if lat is None else f'{lat:.2f}':>9} "
                     f"{'-' if pm is None else f'{pm:.2f}':>9}  {r.get('run', '-')}")
    t = result["throughput"]
    burst = (f"; {t['fraction_of_burst_roofline']:.0%} of the peak measured from idle, "
             f"{t['matmul_tflops_burst']:.0f} TFLOP/s" if t.get("fraction_of_burst_roofline")
             else "")
    lines.append(f"throughput: {t['fastest']} at {t['tokens_per_s'] / 1e6:.3f}M tokens/s, "
                 f"{t['fraction_of_roofline']:.0%} of the measured-peak roofline "
                 f"({t['roofline_tokens_per_s'] / 1e6:.2f}M at "
                 f"{result['matmul_tflops_measured']:.0f} TFLOP/s a GPU{burst}); "
                 + _vs_tp_x_pp(t))
    if "latency" in result:
        L = result["latency"]
        lines.append(f"latency (one sequence): {L['fastest']} {L['ms']:.2f} ms; "
                     + _vs_tp_x_pp(L))
    for objective, c in (result.get("planner") or {}).items():
        if not isinstance(c, dict):
            continue
        if "error" in c:
            lines.append(f"planner ({objective}): {c['error']}")
        elif c.get("measured_row") is None:
            lines.append(f"planner ({objective}): chooses {c['chosen']}, a plan with no "
                         f"measured row")
        else:
            roof = (f"; {c['fraction_of_roofline']:.0%} of the roofline"
                    if c.get("fraction_of_roofline") else "")
            lines.append(f"planner ({objective}, {result['planner']['cluster']}): chooses "
                         f"{c['chosen']}; measured {c['chosen_vs_fastest']:.3f}x the measured "
                         f"fastest ({c['measured_fastest']}){roof}")
    return "\n".join(lines)


def _vs_tp_x_pp(figure: dict) -> str:
    """"x0.56 of TP=8 x PP=2 (megatron)", or why there is no ratio (a run of selected ranks
    without the TP x PP baselines)."""
    if figure.get("vs_best_tp_x_pp") is None:
        return "no TP x PP row measured in this run"
    return f"x{figure['vs_best_tp_x_pp']:.2f} of {figure['best_tp_x_pp']}"
