"""One rank of `helix run`; torchrun starts N of them:

    python -m torch.distributed.run --standalone --nproc-per-node N -m helix_compiler.cli.worker MODEL [...]

Every rank seeds torch, builds the model and compiles the same program
(compilation is deterministic). At start-up the ranks all-gather a fingerprint
of their program and weights and stop, naming the ranks, when they differ.
Each rank then runs its rank module on the model's example inputs (warm-up,
then timed steps; under torch.compile with --compile, compiled in the first
warm-up step; with pp > 1 stages its stage module, as a PipelineStage under
ScheduleGPipe over the plan's M micro-batches, stages.pipeline_schedule; only the
last stage's ranks hold the model's output and compare it), compares its output with the unsharded model's, computed
on the same rank in the same dtype, as a relative error; the largest error and
the slowest rank's time per step are all-reduced to rank 0, which prints one
summary line (and writes it as JSON with --json).

A rank that fails writes `rank{R}.error.json` (its rank, the time, a one-line
message) into --result-dir, one that finishes `rank{R}.done`, so that `helix
run` can say which rank failed first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

from ..runtime import collectives
from ..api import helix_compile
from ..runtime.collectives import DistributedBackend
from ..runtime.compiled import COMPILE_MODES, compiled
from ..errors import HelixError
from ..runtime.graphs import on_device
from ..modelspec import load_model_spec
from ..numerics import relative_error as leaf_relative_error
from ..planning.plan import Plan
from ..runtime.weights import open_checkpoint
from ..stages import pipeline_schedule
from ..planning.text import ranges as _ranges

# Untimed steps before the timed ones: the first call allocates, and on CUDA
# loads kernels and sets up NCCL communicators, per process group.
WARMUP_STEPS = 2
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _env_rank() -> tuple[int, int, int]:
    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k not in os.environ]
    if missing:
        raise HelixError(f"helix_compiler.cli.worker runs one rank under torchrun, but {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not set; launch it with `helix run MODEL --devices N`")
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


def weights_digest(params: dict) -> str:
    """sha256 over the captured weights' values (the program fingerprint holds only their shapes)."""
    h = hashlib.sha256()
    seen = set()
    for name, t in sorted(params.items()):
        if not isinstance(t, torch.Tensor) or id(t) in seen:
            continue
        seen.add(id(t))
        h.update(name.encode())
        if t.device.type == "meta":  # no values: the weights come from --weights, checked by hash
            h.update(str(tuple(t.shape)).encode())
            continue
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _load_reference_weights(prog, path) -> None:
    """The unsharded reference reads the same checkpoint, whole (small models only)."""
    src = open_checkpoint(path)
    names = src.names()
    state = {k: src.read(k, ()) for k in prog.analysis.captured.params if k in names}
    prog.analysis.captured.gm.load_state_dict(state, strict=False, assign=True)


def check_same_program(keys: list[str]) -> None:
    """keys[r] is rank r's 'program fingerprint/weights digest'; HelixError naming the ranks if they differ."""
    groups: dict[str, list[int]] = {}
    for rank, key in enumerate(keys):
        groups.setdefault(key, []).append(rank)
    if len(groups) == 1:
        return
    listing = "; ".join(f"{key} on rank{'s' if len(rs) > 1 else ''} {_ranges(rs)}" for key, rs in groups.items())
    programs = {key.split("/")[0] for key in groups}
    what = "programs" if len(programs) > 1 else "weights (same program)"
    raise HelixError(
        f"the ranks hold different {what}: {listing}; every rank must build the same model from the "
        f"same seed: make the MODEL function deterministic (seed it, no time- or rank-dependent choices)")



def relative_error(out, ref) -> float:
    """max over the float outputs of |out - ref| / |ref| (Frobenius norms, in float64);
    other outputs must be equal (inf otherwise)."""
    outs, refs = pytree.tree_leaves(out), pytree.tree_leaves(ref)
    if len(outs) != len(refs):
        raise HelixError(f"the rank module returned {len(outs)} outputs, the unsharded model {len(refs)}")
    worst = 0.0
    for i, (o, r) in enumerate(zip(outs, refs)):
        if not isinstance(r, torch.Tensor):
            worst = max(worst, 0.0 if o == r else float("inf"))
            continue
        if not isinstance(o, torch.Tensor) or o.shape != r.shape:
            raise HelixError(f"output {i}: the rank module gave {getattr(o, 'shape', type(o).__name__)}, "
                             f"the unsharded model shape {tuple(r.shape)}")
        if not r.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(o, r) else float("inf"))
            continue
        worst = max(worst, leaf_relative_error(o, r))
    return worst


def read_failures(result_dir: Path) -> list[dict]:
    """The error records ranks left in result_dir, earliest first."""
    records = []
    for f in Path(result_dir).glob("rank*.error.json"):
        try:
            records.append(json.loads(f.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return sorted(records, key=lambda r: (r.get("time", 0.0), r.get("rank", 0)))


def _to(tree, device: torch.device, dtype: torch.dtype | None = None):
    def move(x):
        if not isinstance(x, torch.Tensor):
            return x
        if dtype is not None and x.is_floating_point():
            x = x.to(dtype)
        return x.to(device)
    return pytree.tree_map(move, tree)


def run_rank(args, rank: int, world: int, local_rank: int) -> dict:
    """Compile, check, run and compare on this rank; the reduced summary (on every rank)."""
    if args.backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(args.backend, timeout=timedelta(seconds=args.timeout))

    torch.manual_seed(args.seed)
    dtype = DTYPES[args.dtype]
    model, inputs, kwargs = load_model_spec(
        args.model, batch=args.batch, seq=args.seq, init="empty" if args.weights else "random")
    model = model.to(dtype) if dtype != torch.float32 else model
    inputs, kwargs = _to((inputs, kwargs), torch.device("cpu"), dtype)
    plan = Plan.from_yaml(Path(args.plan)) if args.plan and args.plan.endswith((".yaml", ".yml")) else (
        tuple(int(x) for x in args.plan.split(",")) if args.plan else None)   # (m, n), (dp, m, n) or (dp, pp, m, n)
    prog = helix_compile(model, devices=world, example_inputs=inputs, example_kwargs=kwargs,
                         cluster=args.cluster, plan=plan, sequence_parallel=args.sequence_parallel,
                         dynamic=not args.sequence_parallel, micro_batches=args.micro_batches)

    keys = [None] * world
    dist.all_gather_object(keys, f"{prog.fingerprint()}/{weights_digest(prog.analysis.captured.params)}")
    check_same_program(keys)

    dp, pp = prog.plan.dp, prog.plan.pp
    if pp > 1 and args.weights:
        raise HelixError(f"{prog.plan.name}: --weights with pp={pp} pipeline stages is not "
                         f"supported yet (a stage's module is cut from the rank module built "
                         f"with the model's own weights); drop --weights or run a pp=1 plan")
    backend = DistributedBackend(prog.mesh, device.type, dp, pp)
    collectives.bind(backend)
    if pp > 1:   # this rank runs its stage's piece of its (i, j) module (stages.py)
        module = on_device(prog.stage_module(rank), device)
    elif args.weights:
        # only this rank's slices are read from the checkpoint (memory-mapped)
        module = on_device(prog.rank_module(rank, weights=args.weights), device)
        _load_reference_weights(prog, args.weights)
    else:
        module = on_device(prog.rank_module(rank), device)
    if args.compile != "none":
        if pp > 1:
            raise HelixError(f"--compile {args.compile} with pp={pp} pipeline stages is not "
                             f"supported yet; drop --compile or run a pp=1 plan")
        module = compiled(module, args.compile)   # the first warm-up step compiles
    full_inputs, full_kwargs = _to((inputs, kwargs), device)
    replica = prog.replica_of(rank)[0]
    if dp > 1:   # this rank runs its replica's rows of the batch (data.py)
        inputs, kwargs = prog.shard_inputs(*full_inputs, **full_kwargs)[replica]
    else:
        inputs, kwargs = full_inputs, full_kwargs
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    barrier = (lambda: dist.barrier(device_ids=[local_rank])) if device.type == "cuda" else dist.barrier
    if pp > 1:   # ScheduleGPipe over the plan's M micro-batches, stage 0 feeding the inputs
        stage = prog.stage_index(rank)
        schedule = pipeline_schedule(prog, rank, module, backend.pipe_group, device,
                                     prog.plan.cost.micro_batches)

        def step():
            return schedule.step(*inputs, **kwargs) if stage == 0 else schedule.step()
    else:
        def step():
            return module(*inputs, **kwargs)
    with torch.no_grad():
        for _ in range(WARMUP_STEPS):
            out = step()
        sync()
        barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            out = step()
        sync()
        ms = (time.perf_counter() - start) * 1e3 / args.steps
        on_device(prog.analysis.captured.gm, device)
        ref = prog.reference(*full_inputs, **full_kwargs)
    if dp > 1:   # the unsharded model's rows of this rank's shard
        ref = _rows(ref, replica, dp)
    # only the last stage holds the model's output; an earlier stage's sends are checked there
    last = pp == 1 or prog.stage_index(rank) == pp - 1
    error = relative_error(out, ref) if last else 0.0
    reduced = torch.tensor([error, ms], dtype=torch.float64, device=device)
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
    collectives.bind(None)
    return {"ranks": world, "dp": dp, "pp": pp, "m": prog.plan.m, "n": prog.plan.n,
            "micro_batches": prog.plan.cost.micro_batches if pp > 1 else 1, "backend": args.backend,
            "dtype": args.dtype, "model": args.model, "fingerprint": prog.fingerprint(),
            "max_relative_error": reduced[0].item(), "tolerance": args.tolerance,
            "ms_per_step": reduced[1].item(), "steps": args.steps, "compile": args.compile}


def _rows(tree, replica: int, dp: int):
    """Rows [replica B/dp, (replica + 1) B/dp) of every tensor leaf of the unsharded output."""
    def cut(x):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return x
        size = x.shape[0] // dp
        return x.narrow(0, replica * size, size)
    return pytree.tree_map(cut, tree)


def summary_line(s: dict) -> str:
    split = f"m={s['m']} x n={s['n']}"
    if s.get("pp", 1) > 1:
        split = f"dp={s['dp']} x pp={s['pp']} x {split} (M={s['micro_batches']} micro-batches)"
    elif s.get("dp", 1) > 1:
        split = f"dp={s['dp']} x {split}"
    how = "" if s.get("compile", "none") == "none" else f", torch.compile ({s['compile']})"
    return (f"helix run: {s['ranks']} ranks, {split}, backend {s['backend']}{how}, "
            f"{s['dtype']}, max relative error {s['max_relative_error']:.1e} "
            f"(tolerance {s['tolerance']:g}), {s['ms_per_step']:.1f} ms/step")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m helix_compiler.cli.worker",
                                description="One rank of `helix run` (start it with torchrun).")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    p.add_argument("--cluster", default=None)
    p.add_argument("--plan", default=None, help="M,N, DP,M,N or a plan YAML file")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--tolerance", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--weights", default=None, help="checkpoint: a state_dict file or safetensors directory")
    p.add_argument("--result-dir", default=None)
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--batch", type=int, default=None, help="example batch of a Hugging Face model directory")
    p.add_argument("--seq", type=int, default=None, help="example length of a Hugging Face model directory")
    p.add_argument("--micro-batches", type=int, default=None, help="a pp plan's micro-batches")
    p.add_argument("--compile", choices=tuple(COMPILE_MODES), default="none",
                   help="the rank module under torch.compile in this mode")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body(rank: int, world: int, local_rank: int) -> None:
        summary = run_rank(args, rank, world, local_rank)
        if rank == 0:
            print(summary_line(summary), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
        if rank == 0 and not summary["max_relative_error"] <= args.tolerance:
            raise HelixError(
                f"max relative error {summary['max_relative_error']:.2e} vs the unsharded model exceeds the "
                f"tolerance {args.tolerance:g}: the rank modules do not compute what the model computes")
    return rank_main("run", args.result_dir, body)


def rank_main(command_name: str, result_dir: str | None, body) -> int:
    """One torchrun rank of `helix <command_name>`: body(rank, world, local_rank). A failure is
    printed on one line (a traceback too when it is not a HelixError) and written to
    result_dir/rank<r>.error.json, which the launcher's report reads; success leaves
    rank<r>.done and shuts the process group down. The process's exit code."""
    rank = int(os.environ.get("RANK", "0"))
    result_dir = Path(result_dir) if result_dir else None
    try:
        rank, world, local_rank = _env_rank()
        body(rank, world, local_rank)
    except BaseException as e:
        message = f"{type(e).__name__}: {e}" if not isinstance(e, HelixError) else str(e)
        if not isinstance(e, HelixError):
            traceback.print_exc()
        print(f"helix {command_name}: rank {rank}: error: {' '.join(message.split())}",
              file=sys.stderr, flush=True)
        if result_dir is not None:
            (result_dir / f"rank{rank}.error.json").write_text(json.dumps(
                {"rank": rank, "time": time.time(), "error": " ".join(message.split())}))
        return 1
    if result_dir is not None:
        (result_dir / f"rank{rank}.done").write_text("")
    _shutdown()
    return 0


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
