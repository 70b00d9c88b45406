"""examples/torchrun_user.py: a saved program run from the user's own torchrun script (4 gloo
processes); every rank's output equals the unsharded model's on a batch and length other than
the example's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from examples.torchrun_user import DEVICES, save

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "torchrun_user.py"


@pytest.mark.slow
def test_users_torchrun_script_runs_every_rank_of_a_saved_program(tmp_path):
    save(tmp_path, plan=(2, 2))       # m > 1: head-dim and head collectives both cross processes
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", str(DEVICES), str(EXAMPLE), "run", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in range(DEVICES):
        result = json.loads((tmp_path / f"rank{r}.result.json").read_text())
        assert result["relative_error"] <= 1e-5, result
