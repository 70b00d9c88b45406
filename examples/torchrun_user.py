"""Run a saved Helix program from your own torchrun script, one rank per process.

    python examples/torchrun_user.py save out/prog          # compile for 4 ranks, save it (--plan 2,2)
    torchrun --nproc-per-node 4 examples/torchrun_user.py run out/prog   # your training / serving loop

`save` compiles the scaled paper model (examples/paper_model.py) for 4 devices and writes the
program (per-rank graphs and weight slices, checked by sha256 on load), plus an input batch and
the unsharded model's output for it, so that `run` can show that every rank's result equals the
model's. In your own script the part that matters is `run_rank`:

    dist.init_process_group("gloo")                 # "nccl" on GPUs, one GPU per rank
    module = load_rank_module(directory, rank)      # this rank's graph and weight slices only
    collectives.bind(DistributedBackend(module.mesh, device.type))   # collectives of this rank
    y = module(x)                                   # every rank gets the full input ...
                                                    # ... and returns the full output

Every rank computes the same full output (the last collective of each block is an all-reduce),
so any rank may use it; nothing else has to be gathered.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from helix_compiler import helix_compile, load_rank_module

from helix_compiler.runtime import collectives
from helix_compiler.runtime.collectives import DistributedBackend

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.paper_model import PaperConfig, build  # noqa: E402

DEVICES = 4


def save(directory: Path, plan: tuple[int, int] | None = None) -> None:
    """Compile for DEVICES ranks (the planner's split, or `plan` = (m, n)) and save the program,
    an input batch and the model's output."""
    model, (x,) = build(PaperConfig.scaled())
    program = helix_compile(model, devices=DEVICES, example_inputs=(x,), plan=plan)
    program.save(directory)
    # another batch size and length than the example's: the program's sizes are symbolic
    x_new = torch.randn(3, 12, x.shape[-1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x_new)
    torch.save({"x": x_new, "want": want}, directory / "io.pt")
    print(f"saved m={program.plan.m} x n={program.plan.n} to {directory}")


def run_rank(directory: Path) -> None:
    """One rank, under torchrun: load, bind, run, compare with the model's output."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if backend == "nccl" else torch.device("cpu")
    module = load_rank_module(directory, rank).to(device)
    collectives.bind(DistributedBackend(module.mesh, device.type))
    io = torch.load(directory / "io.pt", weights_only=True)
    with torch.no_grad():
        (y,) = module(io["x"].to(device))
    want = io["want"].to(device)
    error = (torch.linalg.vector_norm(y.double() - want.double()) / torch.linalg.vector_norm(want.double())).item()
    (directory / f"rank{rank}.result.json").write_text(json.dumps({"rank": rank, "relative_error": error}))
    print(f"rank {rank}: output {tuple(y.shape)}, relative error vs the model {error:.1e}", flush=True)
    collectives.bind(None)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("save", "run"))
    p.add_argument("directory", type=Path)
    p.add_argument("--plan", metavar="M,N", help="save: force the split (default: the planner's choice)")
    args = p.parse_args(argv)
    if args.action == "save":
        save(args.directory, tuple(int(v) for v in args.plan.split(",")) if args.plan else None)
    else:
        run_rank(args.directory)


if __name__ == "__main__":
    main()
