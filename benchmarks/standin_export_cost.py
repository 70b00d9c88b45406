"""What the repeated-block capture's stand-in costs to export, by the layers it keeps and
dynamic or static shapes (docs/SCALE.md, "Torch's one-time cost apart from the compile"): the
measurement behind keeping two layers instead of a one-layer dynamic export plus a static
two-layer check.

    OMP_NUM_THREADS=1 python benchmarks/standin_export_cost.py [--out PATH]

LLaMA-70B config, 80 layers, on meta (benchmarks/scale.py's model); each stand-in exported
twice after one warm-up capture, process CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from helix_compiler import repeat  # noqa: E402
from helix_compiler.capture import capture  # noqa: E402
from scale import _model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="JSON of the rows (printed either way)")
    args = ap.parse_args()
    model, ids = _model(80)
    path, layers = repeat.find_layer_list(model)
    n = len(layers)
    capture(model, (ids,), {"use_cache": False}, dynamic=True)          # torch's one-time work
    rows = []
    for _ in range(2):
        for keep in ([0, n - 1], [n - 1]):
            for dyn in (True, False):
                standin, _calls = repeat._standin(model, path, layers, keep)
                t = time.process_time()
                with repeat._no_fake_tensor_cache():
                    capture(standin, (ids,), {"use_cache": False}, dyn, repeat_blocks=False)
                rows.append({"layers_kept": keep, "dynamic": dyn, "cpu_s": round(time.process_time() - t, 3)})
                print(rows[-1], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"torch": torch.__version__, "command":
                                              "python benchmarks/standin_export_cost.py " + " ".join(sys.argv[1:]),
                                              "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
