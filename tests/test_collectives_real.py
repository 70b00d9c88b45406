"""DistributedBackend's collectives over real process groups (2 gloo processes): a large sum
all-reduce takes the copy-free route (reduce-scatter + all-gather into fresh buffers), a small
one or a max the in-place NCCL-style all-reduce of a copy; both equal the sum over ranks, and
the large one never copies x (its input is left untouched, its output is a new buffer); a
reduce-scatter along the sequence gives each rank its chunk of the sum, a batch of one without
funcol's concatenating copy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helix_compiler.runtime.collectives import NO_COPY_ALL_REDUCE_MIN_BYTES, no_copy_all_reduce

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, torch.distributed as dist
    from helix_compiler.runtime import collectives
    from helix_compiler.runtime.mesh import Mesh

    dist.init_process_group("gloo")
    r = dist.get_rank()
    backend = collectives.DistributedBackend(Mesh(n=2, m=1), "cpu")
    out = {}
    for name, numel, op in (("large", (2 << 20) // 4 + 2, "sum"), ("small", 1000, "sum"),
                            ("max", 1000, "max"), ("odd", (2 << 20) // 4 + 1, "sum")):
        g = torch.Generator().manual_seed(7)
        xs = [torch.randn(numel, generator=g).view(-1, 1) for _ in range(2)]
        x = xs[r].clone()
        y = backend.all_reduce(x, "all", op)
        want = xs[0] + xs[1] if op == "sum" else torch.maximum(xs[0], xs[1])
        out[name] = {"exact": bool(torch.equal(y, want)) if op == "max"
                     else float((y - want).abs().max()),
                     "input_kept": bool(torch.equal(x, xs[r])),
                     "shape": list(y.shape), "fresh": y.data_ptr() != x.data_ptr(),
                     "split": collectives.no_copy_all_reduce(x, op, 2)}
    for name, shape in (("scatter_lead1", (1, 8, 3)), ("scatter_batch2", (2, 8, 3))):
        g = torch.Generator().manual_seed(9)
        xs = [torch.randn(*shape, generator=g) for _ in range(2)]
        y = backend.reduce_scatter(xs[r].clone(), "all", 1, [4, 4])
        want = (xs[0] + xs[1]).narrow(1, 4 * r, 4)
        out[name] = {"err": float((y - want).abs().max()), "shape": list(y.shape)}
    if r == 0:
        print(json.dumps(out))
    dist.destroy_process_group()
""")


def test_the_split_decision_needs_a_large_sum_that_divides_over_the_group():
    big = torch.empty(NO_COPY_ALL_REDUCE_MIN_BYTES // 4, dtype=torch.float32)
    assert no_copy_all_reduce(big, "sum", 4)
    assert not no_copy_all_reduce(big, "max", 4)                 # NCCL has no max this way here
    assert not no_copy_all_reduce(big[:-1], "sum", 4)            # elements must divide evenly
    assert not no_copy_all_reduce(big[: big.numel() // 2], "sum", 2)   # under the size
    assert not no_copy_all_reduce(big, "sum", 1)


@pytest.mark.slow
def test_distributed_all_reduce_sums_on_both_routes_without_touching_its_input(tmp_path):
    script = tmp_path / "ar.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(script)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["large"]["split"] and not out["small"]["split"] and not out["odd"]["split"]
    for name in ("large", "small", "odd"):
        assert out[name]["exact"] <= 1e-6, (name, out[name])
    assert out["max"]["exact"] is True
    for name, res in out.items():
        if name.startswith("scatter"):
            continue
        assert res["input_kept"] and res["fresh"], (name, res)
        assert res["shape"][1] == 1, (name, res)
    # reduce-scatter along the sequence: a batch of one scatters a view along dim 0, a batch
    # of two takes funcol's chunk-and-concatenate route; both give rank 0 its chunk of the sum
    assert out["scatter_lead1"] == {"err": 0.0, "shape": [1, 4, 3]}, out["scatter_lead1"]
    assert out["scatter_batch2"]["shape"] == [2, 4, 3] and out["scatter_batch2"]["err"] <= 1e-6
