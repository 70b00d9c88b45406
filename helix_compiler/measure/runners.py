"""What one benchmark row runs, buildable at any micro-batch b, and how it is timed.

A runner has `make(kernel_choice) -> make_fn`, `make_fn(b) -> fn` (one forward of b
whole sequences, ready to time) and `flops()` (one sequence). Helix runners run
`prog.rank_module(0)` with stub collectives; the TP baselines are the model as PyTorch's
tensor-parallel API shards it (DTensor `parallelize_module` under a fake process group:
rank 0 of tp, no transfer). Each builds what it runs: nothing is patched afterwards.

`measure` times a runner at the largest micro-batch that fits (halving b on out of
memory), then one sequence with the op-class split.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from helix_compiler import helix_compile
from helix_compiler.errors import HelixError
from helix_compiler.measure.profiling import class_split, count_flops
from helix_compiler.measure.stub import StubCollectives, stubbed
from helix_compiler.measure.surgery import (check_shapes, copy_graph, init_tensor, materialize,
                                            rebatch, small_random)
from helix_compiler.measure.timing import Timer, free_memory, is_cuda, is_oom
from helix_compiler.models import llama_gqa, paper
from helix_compiler.runtime.compiled import compiled
from helix_compiler.runtime.graphs import on_device
from passes.kernel_choice import apply_kernel_choice

log = logging.getLogger(__name__)


def _stubbed_call(fn, mesh=None):
    """fn run with one StubCollectives (of rank 0 of `mesh`) bound for all its calls."""
    stub = StubCollectives(mesh)

    def call():
        with stubbed(stub):
            return fn()
    return call


# --- fake process group (the TP baselines) ------------------------------------------------
def fake_group(world: int, device) -> object:
    """A device mesh of `world` ranks on a fake process group (this process is rank 0)."""
    # torch's test fake store: a private testing module, loaded only when a baseline runs
    from torch.testing._internal.distributed.fake_pg import FakeStore

    release_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    return init_device_mesh(torch.device(device).type, (world,))


def release_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# --- the paper's model ---------------------------------------------------------------------
class PaperHelixRunner:
    """rank_module(0) of helix m x n on the paper's model, compiled once for one sequence
    and re-batched per call; [sdpa] runs SDPA as PyTorch picks, [kernel-choice] after
    passes/kernel_choice.py (the chunked explicit core where d > threshold)."""

    def __init__(self, cfg: paper.PaperConfig, m: int, n: int, variant: str | None,
                 devices: int, cluster, device, *, chunk_bytes: int, threshold: int,
                 sequence_parallel: bool = False):
        self.cfg, self.device = cfg, device
        self.chunk_bytes, self.threshold = chunk_bytes, threshold
        model, (x,) = paper.build(dataclasses.replace(cfg, batch=1), "meta")
        # kernel_choice=False: graph() applies it or not per row
        prog = helix_compile(model, devices, (x,), plan=(m, n), variant=variant,
                             cluster=cluster, kernel_choice=False,
                             sequence_parallel=sequence_parallel, dynamic=not sequence_parallel)
        self.gm1, self.plan, self.mesh = copy_graph(prog.rank_module(0)), prog.plan, prog.mesh
        self.shape1 = (1, cfg.seq, cfg.hidden)

    def graph(self, b: int, kernel_choice: bool) -> fx.GraphModule:
        gm = rebatch(self.gm1, 1, b) if b != 1 else copy_graph(self.gm1)
        if kernel_choice:
            x = torch.empty((b, *self.shape1[1:]), dtype=self.cfg.dtype, device="meta")
            gm = apply_kernel_choice(gm, self.threshold, example_inputs=(x,),
                                     chunk_bytes=self.chunk_bytes)
        return gm

    def flops(self) -> int:
        gm = self.graph(1, False)
        x = torch.empty(self.shape1, dtype=self.cfg.dtype, device="meta")
        with stubbed():
            return count_flops(lambda: gm(x))

    def make(self, kernel_choice: bool, compile_mode: str = "none"):
        """make_fn(b): the rank at micro-batch b as a call; under torch.compile in
        `compile_mode` (runtime/compiled.py, as `helix run --compile` runs it) unless "none"."""
        def make_fn(b):
            gm = self.graph(b, kernel_choice)
            shape = (b, *self.shape1[1:])
            got = check_shapes(gm, shape, self.cfg.dtype)
            if got != shape:
                raise HelixError(f"rank graph re-batched from 1 to {b} sequences gives output "
                                 f"{got}, expected {shape}; a shape argument does not lead with "
                                 f"the batch (measure/surgery.py SHAPE_OPS)")
            materialize(gm, self.device)
            run = compiled(gm, compile_mode)
            x = torch.randn(shape, dtype=self.cfg.dtype, device=self.device)
            return _stubbed_call(lambda: run(x), self.mesh)
        return make_fn


class TPSelfAttention(nn.Module):
    """The paper model's attention as one TP rank runs it: the same q/k/v/o projections
    (parallelize_module shards them), heads / tp local heads, and `core` for the core."""

    def __init__(self, config: paper.PaperConfig, tp: int, core) -> None:
        super().__init__()
        D = config.hidden
        self.heads, self.head_dim, self.core = config.heads // tp, config.head_dim, core
        self.q_proj = nn.Linear(D, D, bias=True)
        self.k_proj = nn.Linear(D, D, bias=True)
        self.v_proj = nn.Linear(D, D, bias=True)
        self.o_proj = nn.Linear(D, D, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        h, d = self.heads, self.head_dim
        q = self.q_proj(x).view(B, S, h, d).transpose(1, 2)    # (B, H/tp, S, d)
        k = self.k_proj(x).view(B, S, h, d).transpose(1, 2)
        v = self.v_proj(x).view(B, S, h, d).transpose(1, 2)
        y = self.core(q, k, v)                                   # (B, H/tp, S, d)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, h * d))


class TPBlock(nn.Module):
    def __init__(self, config: paper.PaperConfig, tp: int, core) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden)
        self.attn = TPSelfAttention(config, tp, core)
        self.ln_2 = nn.LayerNorm(config.hidden)
        self.mlp = paper.MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TPPaperModel(nn.Module):
    """paper.PaperModel's parameters and computation, attention at tp's local heads."""

    def __init__(self, config: paper.PaperConfig, tp: int, core) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TPBlock(config, tp, core) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(config.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)


PAPER_TP_PLAN = {"attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(),
                 "attn.v_proj": ColwiseParallel(), "attn.o_proj": RowwiseParallel(),
                 "mlp.fc_in": ColwiseParallel(), "mlp.fc_out": RowwiseParallel()}


class PaperTPRunner:
    """Megatron-style TP of `layers` layers of the paper model (a PP stage when fewer than
    the model's), sharded by PyTorch's tensor-parallel API; [kernel-choice] runs the
    chunked explicit core where d > threshold, [sdpa] SDPA."""

    def __init__(self, cfg: paper.PaperConfig, tp: int, layers: int, device, *,
                 chunk_bytes: int, threshold: int):
        self.cfg, self.tp, self.layers, self.device = cfg, tp, layers, device
        self.chunk_bytes, self.threshold = chunk_bytes, threshold
        self.info: dict = {}

    def _core(self, kernel_choice: bool):
        cb = self.chunk_bytes
        if kernel_choice and self.cfg.head_dim > self.threshold:
            return lambda q, k, v: torch.ops.helix.chunked_attention(q, k, v, None, False, None,
                                                                     cb, 0)
        return F.scaled_dot_product_attention

    def make(self, kernel_choice: bool):
        mesh = fake_group(self.tp, self.device)
        cfg = dataclasses.replace(self.cfg, layers=self.layers)
        with torch.device("meta"):
            model = TPPaperModel(cfg, self.tp, self._core(kernel_choice)).to(cfg.dtype).eval()
        for blk in model.blocks:
            parallelize_module(blk, mesh, PAPER_TP_PLAN)
        model.to_empty(device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(0)
        with torch.no_grad():
            for name, p in list(model.named_parameters()) + list(model.named_buffers()):
                local = p.to_local() if hasattr(p, "to_local") else p
                local.copy_(init_tensor(name, tuple(local.shape), local.dtype, self.device, gen))
        self.info = {"q_proj_local": list(model.blocks[0].attn.q_proj.weight.to_local().shape),
                     "fc_out_local": list(model.blocks[0].mlp.fc_out.weight.to_local().shape)}

        def make_fn(b):
            x = torch.randn(b, cfg.seq, cfg.hidden, dtype=cfg.dtype, device=self.device)
            return lambda: model(x)
        return make_fn


# --- the GQA model -------------------------------------------------------------------------
def _first_tensor(out):
    return next(x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor))


def _indexed(device) -> torch.device:
    """cuda -> cuda:<current> (the graph's device checks compare indices)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class GqaHelixRunner:
    """rank_module(0) of helix m x n on the GQA model, compiled once with a dynamic batch
    and run as emitted (the compiler's own kernel choice: none at d = 128)."""

    COMPILE_BATCH = 2       # batch 1 would be specialized by the capture

    def __init__(self, cfg: llama_gqa.GqaConfig, m: int, n: int, variant: str | None,
                 devices: int, cluster, device):
        self.cfg, self.device = cfg, _indexed(device)
        ids = torch.zeros(self.COMPILE_BATCH, cfg.seq, dtype=torch.long, device="meta")
        t0 = time.perf_counter()
        # no_grad: transformers 5.17 runs the rotary embedding under torch.no_grad(); captured
        # with grad enabled that becomes a wrap_with_set_grad_enabled submodule, which the
        # shard pass does not handle (5.24 does not emit it)
        with torch.no_grad():
            prog = helix_compile(llama_gqa.build(cfg), devices=devices, example_inputs=(ids,),
                                 example_kwargs={"use_cache": False}, plan=(m, n),
                                 variant=variant, cluster=cluster)
        self.gm_meta = copy_graph(prog.rank_module(0))
        self.compile_s = round(time.perf_counter() - t0, 1)
        self.plan, self.mesh = prog.plan, prog.mesh

    def flops(self) -> int:
        ids = torch.zeros(1, self.cfg.seq, dtype=torch.long, device="meta")
        with stubbed():
            return count_flops(lambda: self.gm_meta(ids, use_cache=False))

    def make(self, kernel_choice: bool):
        if kernel_choice:
            raise HelixError("the GQA rank graphs run as helix_compile emits them; "
                             "use --modes sdpa with --model gqa")

        def make_fn(b):
            gm = materialize(copy_graph(self.gm_meta), self.device, init=small_random,
                             keep_real=True)
            gm = on_device(gm, self.device)   # factory calls and .to() the capture pinned to meta
            gen = torch.Generator(device=self.device).manual_seed(1)
            ids = torch.randint(0, self.cfg.vocab, (b, self.cfg.seq), device=self.device,
                                generator=gen)
            fn = _stubbed_call(lambda: gm(ids, use_cache=False), self.mesh)
            with torch.no_grad():
                got = tuple(_first_tensor(fn()).shape)
            want = (b, self.cfg.seq, self.cfg.hidden)
            if got != want:
                raise HelixError(f"GQA rank graph at micro-batch {b} gives {got}, expected {want}")
            return fn
        return make_fn


GQA_TP_PLAN = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
               "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
               "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
               "mlp.down_proj": RowwiseParallel()}


class GqaTPRunner:
    """Megatron-style TP of the Hugging Face LlamaModel with PyTorch's tensor-parallel API."""

    def __init__(self, cfg: llama_gqa.GqaConfig, tp: int, device):
        self.cfg, self.tp, self.device = cfg, tp, torch.device(device)
        self.info: dict = {}

    def make(self, kernel_choice: bool):
        if kernel_choice:
            raise HelixError("the GQA TP baseline runs as transformers runs it; "
                             "use --modes sdpa with --model gqa")
        mesh = fake_group(self.tp, self.device)
        model = llama_gqa.build(self.cfg)
        for layer in model.layers:
            parallelize_module(layer, mesh, GQA_TP_PLAN)
        model.to_empty(device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(0)
        with torch.no_grad():
            for name, p in list(model.named_parameters()) + list(model.named_buffers()):
                local = p.to_local() if hasattr(p, "to_local") else p
                local.copy_(small_random(name, tuple(local.shape), local.dtype, self.device, gen))
        a = model.layers[0].self_attn
        self.info = {"q_proj_local": list(a.q_proj.weight.to_local().shape),
                     "k_proj_local": list(a.k_proj.weight.to_local().shape),
                     "down_proj_local": list(model.layers[0].mlp.down_proj.weight.to_local().shape),
                     "attn_implementation": model.config._attn_implementation}

        def make_fn(b):
            ids = torch.randint(0, self.cfg.vocab, (b, self.cfg.seq), device=self.device,
                                generator=torch.Generator(device=self.device).manual_seed(1))
            return lambda: model(input_ids=ids, use_cache=False)
        return make_fn


# --- timing a runner ---------------------------------------------------------------------------
def run_timed(make_fn, b: int, timer: Timer) -> tuple[int, dict, object]:
    """Time make_fn(b)() at micro-batch b, halving b on out-of-memory: (b, timing, fn)."""
    device = timer.device
    cuda = is_cuda(device)
    b0 = b
    while b >= 1:
        fn = None
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            fn = make_fn(b)
            with torch.no_grad():
                if cuda:        # warm up here, so that the allocator counts cover timed calls only
                    for _ in range(timer.warmup):
                        fn()
                    torch.cuda.synchronize()
                    s0 = torch.cuda.memory_stats()
                t = timer(fn, warmup=0 if cuda else None)
            if cuda:
                s1 = torch.cuda.memory_stats()
                peak = torch.cuda.max_memory_allocated() - timer.flush_bytes
                t["peak_gib"] = round(peak / 2 ** 30, 2)
                t["alloc_retries"] = s1.get("num_alloc_retries", 0) - s0.get("num_alloc_retries", 0)
                t["device_mallocs"] = (s1.get("segment.all.allocated", 0)
                                       - s0.get("segment.all.allocated", 0))
            return b, t, fn
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            log.info("    b=%d: out of memory, halving", b)
            del fn
            free_memory(device)
            b //= 2
    raise HelixError(f"one sequence does not fit in {device}'s memory (tried micro-batches "
                     f"{b0} down to 1); try a smaller --seq or a GPU with more memory")


def measure(runner, kernel_choice: bool, b: int, timer: Timer) -> dict:
    """A row's measurements: ms per micro-batch at the largest b that fits, then one
    sequence: ms, and the op-class split."""
    t0 = time.perf_counter()
    make_fn = runner.make(kernel_choice)
    b_used, t, fn = run_timed(make_fn, b, timer)
    row = {"micro_batch": b_used, "ms_per_micro_batch": t["median_ms"],
           "ms_per_micro_batch_min": t["min_ms"], "ms_per_micro_batch_max": t["max_ms"],
           "repeats": t["repeats"], "peak_gib": t.get("peak_gib"),
           "alloc_retries": t.get("alloc_retries"), "device_mallocs": t.get("device_mallocs")}
    del fn
    free_memory(timer.device)
    try:
        one = make_fn(1)
        row["ms_per_sequence_b1"] = timer(one, warmup=1)["median_ms"]
        split = class_split(one, timer.device)
        row["class_ms_per_sequence_b1"] = split.by_class
        row["top_ops_ms_per_sequence_b1"] = split.top
        del one
    except Exception as e:  # noqa: BLE001  (the split is extra: the row stands without it)
        row["class_split_error"] = f"{type(e).__name__}: {e}"
    free_memory(timer.device)
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row
