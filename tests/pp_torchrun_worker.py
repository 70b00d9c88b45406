"""One rank of a pp = 2 program under torchrun (gloo, CPU), run by torch.distributed.pipelining
(tests/test_pipeline_stages.py launches it): every process compiles the same program, binds
its collectives on the ("data", "pipe", "head", "dim") mesh, runs its stage as a PipelineStage
under ScheduleGPipe, and the last stage's ranks write their relative error against the model.

    python -m torch.distributed.run --standalone --nproc-per-node 4 \\
        tests/pp_torchrun_worker.py OUT_DIR M N MICRO_BATCHES
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from helix_compiler import helix_compile
from helix_compiler.models.paper import PaperConfig, build
from helix_compiler.runtime import collectives
from helix_compiler.runtime.collectives import DistributedBackend
from helix_compiler.stages import run_pipeline_rank


def main(out: Path, m: int, n: int, micro: int) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    config = dataclasses.replace(PaperConfig.scaled(), batch=4, seq=6)
    model, (x,) = build(config)
    prog = helix_compile(model, devices=2 * m * n, example_inputs=(x,), plan=(1, 2, m, n),
                         variant="qk-gather" if m > 1 else None, micro_batches=micro)
    backend = DistributedBackend(prog.mesh, "cpu", dp=1, pp=2)
    collectives.bind(backend)
    try:
        got = run_pipeline_rank(prog, rank, (x,), backend.pipe_group, torch.device("cpu"), micro)
    finally:
        collectives.bind(None)
    result = {"rank": rank, "stage": prog.stage_index(rank), "last": got is not None}
    if got is not None:
        with torch.no_grad():
            want = model(x)
        result["relative_error"] = ((got - want).abs().max() / want.abs().max()).item()
        result["finite"] = bool(torch.isfinite(got).all())
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
