"""`helix bench`: measure each plan's per-rank compute on one GPU, add modeled communication.

    python -m helix_compiler.bench --out benchmarks/results/paper-h100.json [--profile P.yaml]
    python -m helix_compiler.bench --small --out /tmp/small.json          # CPU test of the script

For the paper's model (examples/paper_model.py) on 16 devices:
- every feasible helix split (m, n), both variants where m > 1 (forced), one
  rank's GraphModule (prog.rank_module(0)) run on the GPU at the real per-rank
  shapes: micro-batches of whole 10000-token sequences, the micro-batch the
  cost model picks (halved until it fits when it does not), CUDA events,
  warm-up, median of repeats, collectives stubbed (all_reduce returns its
  input, all_gather concatenates copies: the right shapes, no transfer);
  each once as PyTorch runs the graph (SDPA picks its kernel) and once after
  passes/kernel_choice.py (the chunked explicit core where d > 256);
- the baselines as PyTorch builds them: DTensor `parallelize_module` with
  ColwiseParallel (q, k, v, fc_in) / RowwiseParallel (o, fc_out) under a fake
  process group (`FakeStore`, backend "fake"): TP=8 x PP=2 (one stage: one
  layer + the final norm; the pipeline bubble (p-1)/(M+p-1) of a GPipe/1F1B
  schedule with M micro-batches) and TP=16 (both layers), again with SDPA as
  is and with the same kernel choice;
- communication from the cost model on the cluster preset (no overlap), so
  step = measured compute + modeled comm + bubble, tokens/s = B * S / step;
- predicted compute from the cost model with the given profile;
- a roofline per plan: FLOPs per rank (FlopCounterMode), achieved TFLOP/s
  against the calibrated matmul peak, and the per-op-class time split
  (torch.profiler on one sequence) that names what bounds the plan.

A compile at the full batch is not possible (capture tags every activation),
so rank graphs are compiled for one sequence and re-batched: the leading size
of every reshape / view / expand is the batch; the result is checked on meta.
Every row is written to --out as soon as it is measured. `--raw` reuses the
measurements of an earlier run (and recomputes predictions, comm, steps from
the current cost model and --profile), so the cost model can be revised
without the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime as _dt
import json
import math
import sys
import time
import traceback
import types
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn.functional as F

PAPER = {"TP=8 x PP=2": 1.20e6, "helix m x n = 16": 1.58e6}   # the paper's table, tokens/s
HELIX_THRESHOLD = 256       # head dims above it get the chunked explicit core (Hopper)
SHAPE_OPS = ("reshape", "view", "_unsafe_view", "expand", "new_empty", "new_zeros", "new_ones",
             "new_full", "zeros", "ones", "empty", "full", "randn", "rand")


# --- configuration ----------------------------------------------------------------------
def paper_config(small: bool):
    from examples.paper_model import PaperConfig

    if small:
        return PaperConfig(heads=16, head_dim=32, mlp=512, batch=8, seq=64, dtype=torch.float32)
    return PaperConfig()


def summary_for(cfg):
    """ModelSummary of the model at cfg.batch, captured at batch 1 (meta)."""
    from examples.paper_model import build
    from helix_compiler.pipeline import analyze

    one = dataclasses.replace(cfg, batch=1)
    model, (x,) = build(one, "meta")
    s = analyze(model, (x,), {}).summary
    B = cfg.batch
    return dataclasses.replace(
        s, batch=B, sites=tuple(dataclasses.replace(x, batch=B) for x in s.sites),
        mlps=tuple(dataclasses.replace(x, tokens=x.tokens * B) for x in s.mlps))


@contextlib.contextmanager
def forced_backend(backend: str | None):
    """Price attention cores with `backend` only (where the profile has it for d):
    what the cost model predicts for a graph that runs SDPA as PyTorch picks."""
    from helix_compiler import cost

    if backend is None:
        yield
        return
    orig = cost._site_options

    def only(site, lay, mach, variant):
        opts = orig(site, lay, mach, variant)
        keep = [o for o in opts if o[0] == "score-reduce" or o[1] == backend]
        return keep or opts
    cost._site_options = only
    try:
        yield
    finally:
        cost._site_options = orig


def sdpa_backend_for(head_dim: int, profile) -> str:
    """The fused SDPA kernel PyTorch runs at this head dim (flash up to 256, else efficient)."""
    for bk in ("flash", "cudnn", "efficient"):
        if profile.attention_efficiency(bk, head_dim, "fp16") is not None:
            return bk
    return "efficient"


# --- stub collectives -------------------------------------------------------------------
class StubCollectives:
    """Compute-only collectives: correct shapes, no transfer. all_reduce hands back a
    fresh buffer of x's shape (a custom op may not return its input; a copy would add
    a memory pass that the real collective's modeled time already contains)."""

    def __init__(self):
        self._gathered: dict = {}   # (shape, dtype, device) -> the in-place gather's buffer

    def all_reduce(self, x, axes, op):
        return torch.empty_like(x)

    def reduce_scatter(self, x, axes, dim, sizes):
        shape = list(x.shape)
        shape[dim % x.dim()] = sizes[0]    # rank 0's chunk: the benches time rank 0
        return x.new_empty(shape)

    def all_gather(self, x, axes, dim, sizes):
        dim = dim % x.dim()
        if len(set(sizes)) == 1 and all(x.shape[i] == 1 for i in range(dim)):
            # DistributedBackend gathers such a tensor in place (NCCL writes the chunks one
            # after another): no copy on the GPU's compute side. A buffer of finite random
            # values, made once per shape, stands for what NCCL would have written.
            shape = list(x.shape)
            shape[dim] = sum(sizes)
            key = (tuple(shape), x.dtype, x.device)
            if key not in self._gathered:
                self._gathered[key] = torch.randn(shape, dtype=x.dtype, device=x.device)
            return self._gathered[key]
        parts = []
        for s in sizes:
            if x.shape[dim] >= s:
                parts.append(x.narrow(dim, 0, s))
            else:
                pad = list(x.shape)
                pad[dim] = s - x.shape[dim]
                parts.append(torch.cat([x, x.new_zeros(pad)], dim=dim))
        return torch.cat(parts, dim=dim)


# --- rank graphs --------------------------------------------------------------------------
def compile_rank(cfg, m: int, n: int, variant: str | None, devices: int, cluster,
                 sequence_parallel: bool = False):
    """rank_module(0) of helix m x n for one sequence (meta buffers), and its plan."""
    from examples.paper_model import build
    from helix_compiler import helix_compile

    model, (x,) = build(dataclasses.replace(cfg, batch=1), "meta")
    # kernel_choice=False: the runner applies it or not per row ([sdpa] rows run SDPA as
    # PyTorch picks; [kernel-choice] rows the chunked explicit core)
    prog = helix_compile(model, devices, (x,), plan=(m, n), variant=variant, cluster=cluster,
                         kernel_choice=False, sequence_parallel=sequence_parallel,
                         dynamic=not sequence_parallel)
    gm = prog.rank_module(0)
    return fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__), prog.plan


def rebatch(gm: fx.GraphModule, old: int, new: int) -> fx.GraphModule:
    """A copy of `gm` whose shape arguments lead with `new` where they led with `old`."""
    out = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    for node in out.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "__name__", "").split(".")[0] \
                not in SHAPE_OPS:
            continue
        args = list(node.args)
        for i, a in enumerate(args):
            if isinstance(a, (list, tuple)) and a and type(a[0]) is int and a[0] == old:
                args[i] = type(a)([new, *a[1:]])
                break
        node.args = tuple(args)
    out.recompile()
    return out


def check_shapes(gm: fx.GraphModule, x_shape, dtype) -> tuple:
    """Run `gm` on meta (its buffers are meta) with stub collectives; the output shape."""
    from helix_compiler import collectives

    collectives.bind(StubCollectives())
    try:
        with torch.no_grad():
            y = gm(torch.empty(x_shape, dtype=dtype, device="meta"))
    finally:
        collectives.bind(None)
    y = y[0] if isinstance(y, (tuple, list)) else y
    return tuple(y.shape)


def _set_attr(mod, name, value):
    *path, last = name.split(".")
    for p in path:
        mod = getattr(mod, p)
    if last in mod._buffers:
        mod._buffers[last] = value
    elif last in mod._parameters:
        mod._parameters[last] = torch.nn.Parameter(value, requires_grad=False)
    else:
        setattr(mod, last, value)


def init_tensor(name: str, shape, dtype, device, gen) -> torch.Tensor:
    """Weights ~ N(0, 1/fan_in) (unit-variance activations), norm weights 1, biases 0."""
    if len(shape) >= 2:
        return torch.randn(*shape, dtype=dtype, device=device, generator=gen) / math.sqrt(shape[-1])
    if name.endswith("bias"):
        return torch.zeros(*shape, dtype=dtype, device=device)
    return torch.ones(*shape, dtype=dtype, device=device)


def materialize(gm: torch.nn.Module, device, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, t in list(gm.named_buffers()) + list(gm.named_parameters()):
        _set_attr(gm, name, init_tensor(name, tuple(t.shape), t.dtype, device, gen))
    return gm


# --- FLOPs and the op-class split ----------------------------------------------------------
def _register_flops():
    from torch.utils.flop_counter import register_flop_formula

    import helix_compiler.kernels  # noqa: F401
    import helix_compiler.kernels_chunked  # noqa: F401

    def attend(scores_shape, v_shape, *args, out_shape=None, **kw):
        *lead, s_q, s_k = scores_shape
        return 2 * math.prod(lead) * s_q * s_k * v_shape[-1]

    def chunked(q_shape, k_shape, v_shape, *args, out_shape=None, **kw):
        *lead, s_q, d = q_shape
        s_k = k_shape[-2]
        return 2 * math.prod(lead) * s_q * s_k * (d + v_shape[-1])

    for op, fn in ((torch.ops.helix.attend, attend), (torch.ops.helix.chunked_attend, attend),
                   (torch.ops.helix.chunked_attention, chunked)):
        with contextlib.suppress(Exception):
            register_flop_formula(op)(fn)


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    _register_flops()
    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            fn()
    return int(fc.get_total_flops())


def op_class(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("attention", "sdpa")) and "chunked" not in n:
        return "attention (fused)"
    if "softmax" in n:
        return "softmax"
    if any(k in n for k in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
                            "aten::matmul", "aten::linear", "aten::_scaled_mm")):
        return "matmul"
    return "elementwise"


def class_split(fn, device) -> dict:
    """ms per op class of one call of fn (self device time; CPU time on the CPU)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad(), profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    split: dict = {}
    ops: dict = {}
    for ev in prof.key_averages():
        us = (getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
              if cuda else ev.self_cpu_time_total)
        if not us or not ev.key.startswith(("aten::", "triton_")):   # triton_: compiled kernels
            continue
        c = op_class(ev.key)
        split[c] = split.get(c, 0.0) + us / 1e3
        ops[ev.key] = (ops.get(ev.key, (0.0, 0))[0] + us / 1e3, ev.count)
    top = sorted(ops.items(), key=lambda kv: -kv[1][0])[:14]
    class_split.last_top = [[k, round(v[0], 4), v[1]] for k, v in top]
    return {k: round(v, 4) for k, v in sorted(split.items())}


# --- running one rank -----------------------------------------------------------------------
def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _free(device):
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def run_timed(make_fn, b: int, device, warmup: int, repeats: int, log):
    """Time make_fn(b)() at micro-batch b, halving b on out-of-memory: (b, timing, fn)."""
    from .calibrate import time_ms

    while b >= 1:
        fn = None
        try:
            if torch.device(device).type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            fn = make_fn(b)
            cuda = torch.device(device).type == "cuda"
            with torch.no_grad():
                if cuda:        # warm up here, so that the allocator counts cover timed calls only
                    for _ in range(warmup):
                        fn()
                    torch.cuda.synchronize()
                    s0 = torch.cuda.memory_stats()
                t = time_ms(fn, device, warmup=0 if cuda else warmup, repeats=repeats)
            if cuda:
                s1 = torch.cuda.memory_stats()
                t["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
                t["alloc_retries"] = s1.get("num_alloc_retries", 0) - s0.get("num_alloc_retries", 0)
                t["device_mallocs"] = (s1.get("segment.all.allocated", 0)
                                       - s0.get("segment.all.allocated", 0))
            return b, t, fn
        except Exception as e:  # noqa: BLE001
            if not _is_oom(e):
                raise
            log(f"    b={b}: out of memory, halving")
            del fn
            _free(device)
            b //= 2
    raise RuntimeError("even one sequence does not fit")


class HelixRunner:
    """One helix rank graph, compiled once, runnable at any micro-batch, either kernel mode."""

    def __init__(self, cfg, m, n, variant, devices, cluster, device, chunk_bytes,
                 sequence_parallel: bool = False):
        self.cfg, self.device, self.chunk_bytes = cfg, device, chunk_bytes
        self.gm1, self.plan = compile_rank(cfg, m, n, variant, devices, cluster,
                                           sequence_parallel)
        self.shape1 = (1, cfg.seq, cfg.hidden)

    def graph(self, b: int, kernel_choice: bool) -> fx.GraphModule:
        gm = rebatch(self.gm1, 1, b) if b != 1 else fx.GraphModule(
            self.gm1, copy.deepcopy(self.gm1.graph), class_name="Rank")
        if kernel_choice:
            from passes.kernel_choice import apply_kernel_choice

            gm = apply_kernel_choice(gm, HELIX_THRESHOLD if not self._small else 16,
                                     example_inputs=(torch.empty((b, *self.shape1[1:]),
                                                                 dtype=self.cfg.dtype,
                                                                 device="meta"),),
                                     chunk_bytes=self.chunk_bytes)
        return gm

    _small = False

    def flops(self) -> int:
        from helix_compiler import collectives

        gm = self.graph(1, False)
        collectives.bind(StubCollectives())
        try:
            return count_flops(lambda: gm(torch.empty(self.shape1, dtype=self.cfg.dtype,
                                                      device="meta")))
        finally:
            collectives.bind(None)

    def make(self, kernel_choice: bool):
        from helix_compiler import collectives

        def make_fn(b):
            gm = self.graph(b, kernel_choice)
            shape = (b, *self.shape1[1:])
            got = check_shapes(gm, shape, self.cfg.dtype)
            if got != shape:
                raise RuntimeError(f"re-batched graph gives {got}, expected {shape}")
            materialize(gm, self.device)
            x = torch.randn(shape, dtype=self.cfg.dtype, device=self.device)
            collectives.bind(StubCollectives())

            def fn():
                return gm(x)
            return fn
        return make_fn


# --- the DTensor baselines ----------------------------------------------------------------
def _tp_attention_forward(core):
    def forward(self, x):
        B, S, _ = x.shape
        h, d = self.heads, self.head_dim                 # local heads after parallelize_module
        q = self.q_proj(x).view(B, S, h, d).transpose(1, 2)
        k = self.k_proj(x).view(B, S, h, d).transpose(1, 2)
        v = self.v_proj(x).view(B, S, h, d).transpose(1, 2)
        y = core(q, k, v)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, h * d))
    return forward


class BaselineRunner:
    """Megatron-style TP of the paper model with PyTorch's own tensor-parallel API."""

    def __init__(self, cfg, tp: int, layers: int, device, chunk_bytes, threshold):
        self.cfg, self.tp, self.layers, self.device = cfg, tp, layers, device
        self.chunk_bytes, self.threshold = chunk_bytes, threshold

    def make(self, kernel_choice: bool):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                       parallelize_module)
        from torch.testing._internal.distributed.fake_pg import FakeStore

        from examples.paper_model import PaperModel
        from helix_compiler import kernels_chunked  # noqa: F401

        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=self.tp)
        dtype = torch.device(self.device).type
        mesh = init_device_mesh(dtype, (self.tp,))
        cfg = dataclasses.replace(self.cfg, layers=self.layers)
        with torch.device("meta"):
            model = PaperModel(cfg).to(cfg.dtype).eval()
        plan = {"attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(),
                "attn.v_proj": ColwiseParallel(), "attn.o_proj": RowwiseParallel(),
                "mlp.fc_in": ColwiseParallel(), "mlp.fc_out": RowwiseParallel()}
        thr, cb = self.threshold, self.chunk_bytes
        if kernel_choice and cfg.head_dim > thr:
            def core(q, k, v):
                return torch.ops.helix.chunked_attention(q, k, v, None, False, None, cb, 0)
        else:
            def core(q, k, v):
                return F.scaled_dot_product_attention(q, k, v)
        for blk in model.blocks:
            parallelize_module(blk, mesh, plan)
            blk.attn.heads = cfg.heads // self.tp
            blk.attn.forward = types.MethodType(_tp_attention_forward(core), blk.attn)
        model.to_empty(device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(0)
        with torch.no_grad():
            for name, p in list(model.named_parameters()) + list(model.named_buffers()):
                local = p.to_local() if hasattr(p, "to_local") else p
                local.copy_(init_tensor(name, tuple(local.shape), local.dtype, self.device, gen))
        self.model = model
        info = {"q_proj_local": list(model.blocks[0].attn.q_proj.weight.to_local().shape),
                "fc_out_local": list(model.blocks[0].mlp.fc_out.weight.to_local().shape)}
        self.info = info

        def make_fn(b):
            x = torch.randn(b, cfg.seq, cfg.hidden, dtype=cfg.dtype, device=self.device)

            def fn():
                return model(x)
            return fn
        return make_fn

    def make_fn_meta(self):
        """One sequence through the built model (on its device), for FlopCounterMode."""
        x = torch.randn(1, self.cfg.seq, self.cfg.hidden, dtype=self.cfg.dtype,
                        device=self.device)
        return lambda: self.model(x)


# --- one measurement ---------------------------------------------------------------------------
def measure(runner, kernel_choice: bool, b: int, device, args, log) -> dict:
    from .calibrate import time_ms

    t0 = time.perf_counter()
    make_fn = runner.make(kernel_choice)
    b_used, t, fn = run_timed(make_fn, b, device, args.warmup, args.repeats, log)
    row = {"micro_batch": b_used, "ms_per_micro_batch": t["median_ms"],
           "ms_per_micro_batch_min": t["min_ms"], "ms_per_micro_batch_max": t["max_ms"],
           "repeats": t["repeats"], "peak_gib": t.get("peak_gib"),
           "alloc_retries": t.get("alloc_retries"), "device_mallocs": t.get("device_mallocs")}
    del fn
    _free(device)
    try:
        one = make_fn(1)
        row["ms_per_sequence_b1"] = time_ms(one, device, warmup=1,
                                            repeats=args.repeats)["median_ms"]
        row["class_ms_per_sequence_b1"] = class_split(one, device)
        row["top_ops_ms_per_sequence_b1"] = getattr(class_split, "last_top", None)
        del one
    except Exception as e:  # noqa: BLE001
        row["class_split_error"] = f"{type(e).__name__}: {e}"
    _free(device)
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row


# --- assembling the report ----------------------------------------------------------------------
def _plan_predictions(summary, cluster, profile, m, n, variant, backend):
    from helix_compiler.cost import cost_plan

    with forced_backend(backend):
        return cost_plan(summary, m, n, cluster, profile, variant)


def _baseline_predictions(summary, cluster, profile, tp, pp, backend):
    from helix_compiler.cost import cost_baseline

    with forced_backend(backend):
        return cost_baseline(summary, tp, pp, cluster, profile)


def tp_layer_flops(cfg, tp: int) -> int:
    """FLOPs of one layer on one TP rank, one sequence: q, k, v, o projections, QK^T and PV,
    the two MLP GEMMs (FlopCounterMode counts a DTensor module's global shapes)."""
    S, D, F_, h = cfg.seq, cfg.hidden, cfg.mlp, cfg.heads // tp
    return (4 * 2 * S * D * (D // tp) + 2 * 2 * h * S * S * cfg.head_dim
            + 2 * 2 * S * D * (F_ // tp))


def matmul_peak(profile) -> float:
    return max(r.tflops for r in profile.rates if r.op == "matmul")


def bound_of(split: dict, comm_ms: float, compute_ms: float) -> str:
    if not split:
        return "unknown"
    tot = sum(split.values()) or 1.0
    top = max(split, key=split.get)
    share = ", ".join(f"{k} {100 * v / tot:.0f}%" for k, v in
                      sorted(split.items(), key=lambda kv: -kv[1]))
    lead = "communication" if comm_ms > compute_ms else f"{top}"
    return f"{lead} (compute split: {share}; comm {comm_ms / max(compute_ms, 1e-9):.2f} x compute)"


def assemble(raw: dict, summary, cluster, profile, cfg) -> dict:
    """The results JSON from raw measurements and the current cost model + profile."""
    from helix_compiler.plan import make_plan

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
                pred = _plan_predictions(summary, cluster, profile, r["m"], r["n"],
                                         None if r["variant"] == "heads" else r["variant"],
                                         None if kc else sdpa_bk)
            else:
                pred = _baseline_predictions(summary, cluster, profile, r["tp"], r["pp"],
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


# --- the driver ----------------------------------------------------------------------------------
def helix_cases(summary, devices, cluster, profile) -> list[tuple[int, int, str | None, int]]:
    """(m, n, variant, predicted micro-batch) for every feasible split, both variants if m > 1."""
    from helix_compiler.cost import cost_plan
    from helix_compiler.solver import solve

    out = []
    for c in solve(summary, devices, cluster):
        if not c.feasible:
            continue
        for v in ((None,) if c.m == 1 else ("score-reduce", "qk-gather")):
            try:
                b = cost_plan(summary, c.m, c.n, cluster, profile, v).micro_batch
            except Exception:  # noqa: BLE001
                b = 1
            out.append((c.m, c.n, v, b))
    return out


def run_measurements(args, cfg, summary, cluster, profile, device, log) -> dict:
    from helix_compiler.calibrate import device_info
    from helix_compiler.cost import cost_baseline

    raw = {"info": device_info(device), "devices": args.devices, "rows": [],
           "chunk_bytes": args.chunk_bytes, "command": args.command}
    threshold = 16 if args.small else HELIX_THRESHOLD

    def save():
        if args.raw_out:
            Path(args.raw_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.raw_out).write_text(json.dumps(raw, indent=1))

    modes = [False, True] if args.modes == "both" else [args.modes == "kernel-choice"]
    t_start = time.perf_counter()

    def late() -> bool:
        return args.deadline_s is not None and time.perf_counter() - t_start > args.deadline_s

    if not args.no_baselines:
        gpn = cluster.gpus_per_node
        for tp, pp in ((min(gpn, args.devices), args.devices // min(gpn, args.devices)),
                       (args.devices, 1)):
            try:
                b_pred = cost_baseline(summary, tp, pp, cluster, profile).micro_batch
            except Exception:  # noqa: BLE001
                b_pred = 1
            layers = cfg.layers // pp
            for kc in modes:
                name = (f"TP={tp} x PP={pp}" if pp > 1 else f"TP={tp}") + \
                    f" (DTensor) [{'kernel-choice' if kc else 'sdpa'}]"
                row = {"name": name, "kind": "baseline", "m": 1, "n": tp, "tp": tp, "pp": pp,
                       "variant": "heads", "kernels": "kernel-choice" if kc else "sdpa",
                       "predicted_micro_batch": b_pred, "stage_layers": layers}
                if late():
                    row["error"] = "skipped: past --deadline-s"
                    raw["rows"].append(row)
                    continue
                try:
                    runner = BaselineRunner(cfg, tp, layers, device, args.chunk_bytes, threshold)
                    row.update(measure(runner, kc, min(b_pred, args.max_micro_batch), device,
                                       args, log))
                    row["flops_per_sequence"] = layers * tp_layer_flops(cfg, tp)
                    row["local_shapes"] = runner.info
                    log(f"  {name}: b={row['micro_batch']} {row['ms_per_micro_batch']:.1f} ms/mb,"
                        f" {row.get('ms_per_sequence_b1', float('nan')):.2f} ms/seq at b=1")
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {e}"
                    log(f"  {name}: FAILED {row['error']}\n{traceback.format_exc(limit=4)}")
                runner = None
                _free(device)
                raw["rows"].append(row)
                save()
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    for m, n, v, b_pred in helix_cases(summary, args.devices, cluster, profile):
        if args.only and f"{m}x{n}" not in args.only:
            continue
        b_try = min(b_pred, args.max_micro_batch)
        try:
            runner = HelixRunner(cfg, m, n, v, args.devices, cluster, device, args.chunk_bytes)
            runner._small = args.small
            flops = runner.flops()
            variant = runner.plan.variants[0] if runner.plan.variants else "heads"
        except Exception as e:  # noqa: BLE001
            log(f"  helix m={m} n={n} {v}: compile failed: {e}")
            raw["rows"].append({"name": f"helix m={m} x n={n} {v}", "kind": "helix", "m": m,
                                "n": n, "variant": v or "heads", "kernels": "sdpa",
                                "error": f"compile: {type(e).__name__}: {e}"})
            continue
        for kc in modes:
            name = f"helix m={m} x n={n} {variant} [{'kernel-choice' if kc else 'sdpa'}]"
            row = {"name": name, "kind": "helix", "m": m, "n": n, "variant": variant,
                   "kernels": "kernel-choice" if kc else "sdpa", "flops_per_sequence": flops,
                   "predicted_micro_batch": b_pred}
            if late():
                row["error"] = "skipped: past --deadline-s"
                raw["rows"].append(row)
                continue
            try:
                row.update(measure(runner, kc, b_try, device, args, log))
                log(f"  {name}: b={row['micro_batch']} {row['ms_per_micro_batch']:.1f} ms/mb, "
                    f"{row.get('ms_per_sequence_b1', float('nan')):.2f} ms/seq at b=1 "
                    f"({row['wall_s']} s)")
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"
                log(f"  {name}: FAILED {row['error']}\n{traceback.format_exc(limit=3)}")
                _free(device)
            raw["rows"].append(row)
            save()
        from helix_compiler import collectives
        collectives.bind(None)
        del runner
        _free(device)
    if (args.b_sweep or args.compile_check) and not late():
        extras(args, cfg, cluster, device, log, raw)
        save()
    return raw


def extras(args, cfg, cluster, device, log, raw) -> None:
    """helix m=1 x n=N with kernel choice: ms per sequence at several micro-batches, and
    the same rank graph through torch.compile (what fusing the elementwise ops gives)."""
    from helix_compiler import collectives

    from .calibrate import time_ms

    runner = HelixRunner(cfg, 1, args.devices, None, args.devices, cluster, device,
                         args.chunk_bytes)
    runner._small = args.small
    flops = runner.flops()
    raw["b_sweep"] = []
    for b in args.b_sweep or ():
        try:
            row = _sweep_row(runner, b, flops, device, args, log)
            raw["b_sweep"].append(row)
            log(f"  b-sweep m=1 kernel-choice b={row['b']}: {row['ms_per_sequence']:.2f} ms/seq")
        except Exception as e:  # noqa: BLE001
            raw["b_sweep"].append({"b": b, "error": f"{type(e).__name__}: {e}"})
        _free(device)
    if args.b_sweep:
        sequence_parallel_sweep(args, cfg, cluster, device, log, raw, flops)
    if args.compile_check:
        out = {"what": "rank graph m=1 with kernel choice, torch.compile (inductor, default "
                       "mode), one sequence", "flops_per_sequence": flops}
        try:
            gm = materialize(runner.graph(1, True), device)
            x = torch.randn(1, cfg.seq, cfg.hidden, dtype=cfg.dtype, device=device)
            collectives.bind(StubCollectives())
            eager = time_ms(lambda: gm(x), device, warmup=1, repeats=args.repeats)["median_ms"]
            t0 = time.perf_counter()
            cg = torch.compile(gm, dynamic=False)
            with torch.no_grad():
                cg(x)
            out["compile_s"] = round(time.perf_counter() - t0, 1)
            with torch.no_grad():
                t = time_ms(lambda: cg(x), device, warmup=1, repeats=args.repeats)
            out.update(eager_ms_per_sequence=eager, compiled_ms_per_sequence=t["median_ms"],
                       eager_tflops=flops / (eager * 1e-3) / 1e12,
                       compiled_tflops=flops / (t["median_ms"] * 1e-3) / 1e12)
            with torch.no_grad():
                out["compiled_class_ms"] = class_split(lambda: cg(x), device)
                out["compiled_top_ops"] = getattr(class_split, "last_top", None)
            log(f"  torch.compile m=1 kernel-choice: eager {eager:.2f} ms/seq, compiled "
                f"{t['median_ms']:.2f} ms/seq ({out['compiled_tflops']:.0f} TFLOP/s), "
                f"compile {out['compile_s']} s")
        except Exception as e:  # noqa: BLE001
            out["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            log(f"  torch.compile check failed: {out['error']}")
        finally:
            collectives.bind(None)
        raw["compiled"] = out
    _free(device)


def _sweep_row(runner, b: int, flops: int, device, args, log) -> dict:
    """One rank graph with kernel choice timed at micro-batch b (halved until it fits)."""
    b_used, t, fn = run_timed(runner.make(True), b, device, args.warmup, args.repeats, log)
    del fn
    return {"b": b_used, "ms_per_micro_batch": t["median_ms"],
            "ms_per_sequence": t["median_ms"] / b_used,
            "tflops": flops * b_used / (t["median_ms"] * 1e-3) / 1e12,
            **{k: t.get(k) for k in ("peak_gib", "alloc_retries", "device_mallocs")}}


def sequence_parallel_sweep(args, cfg, cluster, device, log, raw, flops) -> None:
    """helix m=1 x n=N with kernel choice and sequence-parallel norms (helix_compile's
    sequence_parallel=True): ms per sequence at the b-sweep's micro-batches, one rank, the
    reduce-scatter and all-gather stubbed like the other collectives."""
    raw["sequence_parallel"] = []
    try:
        runner = HelixRunner(cfg, 1, args.devices, None, args.devices, cluster, device,
                             args.chunk_bytes, sequence_parallel=True)
        runner._small = args.small
    except Exception as e:  # noqa: BLE001
        raw["sequence_parallel"].append({"error": f"compile: {type(e).__name__}: {e}"})
        log(f"  sequence parallel: compile failed: {e}")
        return
    for b in args.b_sweep:
        try:
            row = _sweep_row(runner, b, flops, device, args, log)
            if row["b"] == 1:
                gm = materialize(runner.graph(1, True), device)
                x = torch.randn(1, cfg.seq, cfg.hidden, dtype=cfg.dtype, device=device)
                from helix_compiler import collectives

                collectives.bind(StubCollectives())
                try:
                    with torch.no_grad():
                        row["class_ms_per_sequence"] = class_split(lambda: gm(x), device)
                        row["top_ops"] = getattr(class_split, "last_top", None)
                finally:
                    collectives.bind(None)
                del gm
            raw["sequence_parallel"].append(row)
            log(f"  sequence parallel m=1 kernel-choice b={row['b']}: "
                f"{row['ms_per_sequence']:.2f} ms/seq ({row['tflops']:.0f} TFLOP/s)")
        except Exception as e:  # noqa: BLE001
            raw["sequence_parallel"].append({"b": b, "error": f"{type(e).__name__}: {e}"})
            log(f"  sequence parallel b={b}: FAILED {e}")
        _free(device)


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="helix bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/paper.json")
    ap.add_argument("--raw-out", default=None, help="write raw measurements here as they come")
    ap.add_argument("--raw", default=None, help="reuse raw measurements instead of measuring")
    ap.add_argument("--profile", default=None, help="profile YAML (default: the built-in H100)")
    ap.add_argument("--cluster", default="paper")
    ap.add_argument("--devices", type=int, default=16)
    ap.add_argument("--small", action="store_true", help="tiny model on the CPU (a test)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--modes", choices=("both", "sdpa", "kernel-choice"), default="both")
    ap.add_argument("--only", nargs="*", default=None, help="helix splits 'MxN' to run")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--max-micro-batch", type=int, default=1 << 30)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk-mib", type=int, default=None)
    ap.add_argument("--b-sweep", type=int, nargs="*", default=None,
                    help="also time helix m=1 (kernel choice) at these micro-batches")
    ap.add_argument("--compile-check", action="store_true",
                    help="also run helix m=1 (kernel choice) through torch.compile")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="skip the measurements left after this many seconds")
    args = ap.parse_args(argv)
    args.command = "helix bench " + " ".join(argv if argv is not None else sys.argv[1:])

    from helix_compiler.cluster import load_cluster
    from helix_compiler.kernels_chunked import DEFAULT_CHUNK_BYTES
    from helix_compiler.profile import DEFAULT_PROFILE, load_profile

    args.chunk_bytes = (args.chunk_mib << 20) if args.chunk_mib else DEFAULT_CHUNK_BYTES
    profile = load_profile(args.profile) if args.profile else DEFAULT_PROFILE
    cluster = load_cluster(args.cluster)
    cfg = paper_config(args.small)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.small
                                          else "cpu"))
    t0 = time.perf_counter()
    summary = summary_for(cfg)
    if args.raw:
        raw = json.loads(Path(args.raw).read_text())
    else:
        print(f"[bench] {cfg} on {device}", flush=True)
        raw = run_measurements(args, cfg, summary, cluster, profile, device,
                               lambda s: print(s, flush=True))
    result = assemble(raw, summary, cluster, profile, cfg)
    result["command"] = raw.get("command") if args.raw else args.command
    if args.raw:
        result["reassembled_by"] = args.command
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"[bench] wrote {args.out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
