"""Multi-GPU NCCL run (issue "Real NCCL run"): correctness and throughput of every Helix
(m, n) against PyTorch's own TP (DTensor parallelize_module) and TP x PP (pipelining API),
plus an NCCL collective sweep.  Run with:

    python -m torch.distributed.run --standalone --nproc-per-node G benchmarks/multi_gpu.py --out DIR

Model: the paper's family (2 layers, 16 heads, MLP 4D) at head dim 128 so that the unsharded
reference fits on one GPU; correctness at batch 2 x seq 256 (fp32 and fp16), throughput at
batch 4 x seq 4096 (fp16).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helix_compiler.models.paper import PaperConfig, build  # noqa: E402
from helix_compiler import helix_compile
from helix_compiler.runtime import collectives  # noqa: E402
from helix_compiler.runtime.mesh import Mesh  # noqa: E402
from helix_compiler.numerics import relative_error  # noqa: E402
import torch.utils._pytree as pytree  # noqa: E402


rel = relative_error


def timed(fn, warmup=3, reps=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    args = ap.parse_args()
    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dev = torch.device("cuda")
    cfg = PaperConfig(layers=2, heads=16, head_dim=args.head_dim, mlp=4 * 16 * args.head_dim,
                      batch=2, seq=256, dtype=torch.float32)
    model, (x,) = build(cfg, "cpu", seed=0)
    D = cfg.hidden
    g = torch.Generator().manual_seed(1)
    xbig = torch.randn(args.batch, args.seq, D, generator=g).to(dev, torch.float16)
    ref32 = model.to(dev)(x.to(dev)).detach()
    model16 = build(cfg, "cpu", seed=0)[0].to(dev, torch.float16)
    ref16 = model16(x.to(dev, torch.float16)).detach()
    rows = []
    from helix_compiler.planning.solver import solve

    prog0 = helix_compile(model.cpu(), devices=world, example_inputs=(x,), cluster="h100x8")
    feas = [(c.m, c.n) for c in solve(prog0.summary, world) if c.feasible]
    chosen = (prog0.plan.m, prog0.plan.n)
    for m, n in feas:
        variants = ["score-reduce", "qk-gather"] if m > 1 else [None]
        for variant in variants:
            prog = helix_compile(model.cpu(), devices=world, example_inputs=(x,), plan=(m, n),
                                 variant=variant, cluster="h100x8")
            backend = collectives.DistributedBackend(Mesh(n=n, m=m), "cuda")
            collectives.bind(backend)
            mod = prog.rank_module(rank).to(dev)
            with torch.no_grad():
                e32 = rel(mod(x.to(dev)), ref32)
                mod16 = prog.rank_module(rank).to(dev, torch.float16)
                e16 = rel(mod16(x.to(dev, torch.float16)), ref16)
                ms = timed(lambda: mod16(xbig))
            errs = torch.tensor([e32, e16], device=dev)
            dist.all_reduce(errs, op=dist.ReduceOp.MAX)
            pred = prog.plan.cost
            rows.append({"name": f"helix m={m} x n={n}" + (f" {variant}" if variant else ""), "kind": "helix",
                         "m": m, "n": n, "variant": variant or "heads", "max_rel_err_fp32": errs[0].item(),
                         "max_rel_err_fp16": errs[1].item(), "step_ms": ms,
                         "tokens_per_s": args.batch * args.seq / (ms / 1e3),
                         "collectives_rank0": prog.collectives(0)})
            prog._modules.clear()
            del mod, mod16
            torch.cuda.empty_cache()
    # ---- baselines with PyTorch's TP and pipelining APIs -----------------------------------
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    def tp_layer(block, mesh, tp):
        parallelize_module(block, mesh, {"attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(),
                                         "attn.v_proj": ColwiseParallel(), "attn.o_proj": RowwiseParallel(),
                                         "mlp.fc_in": ColwiseParallel(), "mlp.fc_out": RowwiseParallel()})
        block.attn.heads = cfg.heads // tp
        return block

    for tp, pp in ((world, 1), (world // 2, 2)):
        if tp < 1 or tp * pp != world:
            continue
        mesh = init_device_mesh("cuda", (pp, tp), mesh_dim_names=("pp", "tp"))
        base = build(cfg, "cpu", seed=0)[0].to(dev, torch.float16)
        for blk in base.blocks:
            tp_layer(blk, mesh["tp"], tp)
        with torch.no_grad():
            if pp == 1:
                e16 = rel(base(x.to(dev, torch.float16)), ref16)
                ms = timed(lambda: base(xbig))
                bubble = 0.0
            else:
                from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

                stage_idx = mesh.get_local_rank("pp")
                per = cfg.layers // pp
                blocks = torch.nn.Sequential(*base.blocks[stage_idx * per:(stage_idx + 1) * per])
                if stage_idx == pp - 1:
                    blocks.append(base.ln_f)
                stage = PipelineStage(blocks, stage_idx, pp, dev, group=mesh.get_group("pp"))
                micro = args.batch
                sched = ScheduleGPipe(stage, n_microbatches=micro)
                out_box = {}

                def step():
                    if stage_idx == 0:
                        sched.step(xbig)
                    else:
                        out_box["y"] = sched.step()
                ms = timed(step)
                e16 = float("nan")
                bubble = (pp - 1) / (micro + pp - 1)
        rows.append({"name": f"TP={tp} x PP={pp} (PyTorch DTensor{' + pipelining' if pp > 1 else ''})",
                     "kind": "baseline", "m": None, "n": None, "step_ms": ms,
                     "tokens_per_s": args.batch * args.seq / (ms / 1e3), "max_rel_err_fp16": e16,
                     "bubble_fraction": bubble})
        del base
        torch.cuda.empty_cache()
    # ---- NCCL collective sweep -------------------------------------------------------------
    sweep = []
    for mb in (1, 8, 64, 256):
        n = mb * (1 << 20) // 2
        t = torch.randn(n, device=dev, dtype=torch.float16)
        out = torch.empty(n * world, device=dev, dtype=torch.float16)
        rs = torch.empty(n // world, device=dev, dtype=torch.float16)
        ar = timed(lambda: dist.all_reduce(t), 2, 10)
        ag = timed(lambda: dist.all_gather_into_tensor(out, t), 2, 10)
        rsm = timed(lambda: dist.reduce_scatter_tensor(rs, t), 2, 10)
        B = n * 2
        sweep.append({"bytes": B, "all_reduce_ms": ar, "all_gather_ms": ag, "reduce_scatter_ms": rsm,
                      "all_reduce_busbw_gb_s": B / (ar / 1e3) * 2 * (world - 1) / world / 1e9,
                      "all_gather_busbw_gb_s": B * world / (ag / 1e3) * (world - 1) / world / 1e9,
                      "reduce_scatter_busbw_gb_s": B / (rsm / 1e3) * (world - 1) / world / 1e9})
    if rank == 0:
        res = {"device": torch.cuda.get_device_name(), "gpus": world, "torch": torch.__version__,
               "date": datetime.date.today().isoformat(),
               "command": f"python -m torch.distributed.run --standalone --nproc-per-node {world} "
                          f"benchmarks/multi_gpu.py --head-dim {args.head_dim} --batch {args.batch} --seq {args.seq}",
               "config": {"layers": 2, "heads": 16, "head_dim": args.head_dim, "hidden": D, "mlp": cfg.mlp,
                          "batch": args.batch, "seq": args.seq, "dtype": "float16",
                          "correctness_inputs": "batch 2 x seq 256, fp32 and fp16"},
               "cluster": "h100x8 preset (one node)", "chosen": f"m={chosen[0]} x n={chosen[1]}",
               "plans": rows, "collectives": sweep}
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, f"multi_gpu_{world}.json").write_text(json.dumps(res, indent=1))
        for r in rows:
            print(f"{r['name']:<45} {r['step_ms']:9.2f} ms  {r['tokens_per_s']/1e6:7.3f} M tok/s  "
                  f"err32={r.get('max_rel_err_fp32', float('nan')):.1e} err16={r.get('max_rel_err_fp16', float('nan')):.1e}")
        for s in sweep:
            print(f"{s['bytes']/2**20:6.0f} MiB  AR {s['all_reduce_busbw_gb_s']:.0f}  AG {s['all_gather_busbw_gb_s']:.0f}  "
                  f"RS {s['reduce_scatter_busbw_gb_s']:.0f} GB/s busbw")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
