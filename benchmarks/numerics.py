"""Largest relative error of every rank against the same-dtype unsharded model, per dtype (CPU).

    .venv/bin/python benchmarks/numerics.py   # writes benchmarks/results/numerics-cpu.json
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helix_compiler.models.paper import PaperConfig, build  # noqa: E402
from helix_compiler import helix_compile  # noqa: E402
from helix_compiler.numerics import relative_error  # noqa: E402

PLANS = (((1, 4), None), ((2, 2), "score-reduce"), ((4, 1), "qk-gather"))


def main() -> int:
    rows = {}
    for name in ("float32", "float16", "bfloat16"):
        dt, worst = getattr(torch, name), 0.0
        for plan, variant in PLANS:
            model, (x,) = build(PaperConfig.scaled(), "cpu", seed=0)
            model, x = model.to(dt), x.to(dt)
            prog = helix_compile(model, devices=4, example_inputs=(x,), plan=plan, variant=variant)
            with torch.no_grad():
                want = model(x).float()
                worst = max([worst] + [relative_error(o, want) for o in prog.simulate(x)])
        rows[name] = worst
        print(f"{name}: {worst:.1e}")
    out = {"device": "CPU", "torch": torch.__version__, "date": datetime.date.today().isoformat(),
           "command": "python benchmarks/numerics.py", "model": "examples/paper_model.py PaperConfig.scaled()",
           "plans": [f"{p} {v or 'heads'}" for p, v in PLANS], "max_relative_error": rows}
    (ROOT / "benchmarks/results/numerics-cpu.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
