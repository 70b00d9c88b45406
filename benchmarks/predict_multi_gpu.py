"""Add the cost model's predictions to a multi_gpu.py result (runs on the CPU, model on meta).

    python benchmarks/predict_multi_gpu.py benchmarks/results/multi_gpu_4xH200.json
    python benchmarks/predict_multi_gpu.py benchmarks/results/multi_gpu_4xH200.json \
        benchmarks/results/cluster-4xH200-measured.yaml     # with the measured NVLink figures
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helix_compiler.models.paper import PaperConfig, build  # noqa: E402
from helix_compiler import plan_model  # noqa: E402
from helix_compiler.planning.cluster import load_cluster  # noqa: E402
from helix_compiler.planning.cost import cost_baseline  # noqa: E402


def main(path: str, cluster_file: str | None = None) -> int:
    res = json.loads(Path(path).read_text())
    c = res["config"]
    cfg = PaperConfig(layers=c["layers"], heads=c["heads"], head_dim=c["head_dim"], mlp=c["mlp"],
                      batch=c["batch"], seq=c["seq"], dtype=torch.float16)
    model, args = build(cfg, "meta")
    cluster = load_cluster(cluster_file or "h100x8")
    key = "predicted_step_ms" if cluster_file is None else "predicted_step_ms_measured_nvlink"
    for row in res["plans"]:
        if row["kind"] == "helix":
            plan, an = plan_model(model, res["gpus"], args, cluster=cluster, plan=(row["m"], row["n"]),
                                  variant=None if row["variant"] == "heads" else row["variant"])
            cost = plan.cost
        else:
            tp, pp = [int(x.split("=")[1]) for x in row["name"].split(" (")[0].split(" x ")]
            plan, an = plan_model(model, res["gpus"], args, cluster=cluster)
            cost = cost_baseline(an.summary, tp, pp, cluster)
        if cluster_file is None:
            row["predicted_step_ms"] = cost.step_ms
            row["predicted_compute_ms"] = cost.compute_ms
            row["predicted_comm_ms"] = cost.comm_ms
            row["predicted_note"] = "h100x8 preset figures (H100 SXM), measured on H200"
        else:
            row[key] = cost.step_ms
            row["predicted_comm_ms_measured_nvlink"] = cost.comm_ms
    Path(path).write_text(json.dumps(res, indent=1))
    for row in res["plans"]:
        print(f"{row['name']:<48} measured {row['step_ms']:8.2f} ms  predicted {row[key]:8.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
