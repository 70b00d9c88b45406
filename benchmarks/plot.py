"""Plot tokens/s per plan from a `helix bench` results JSON (needs matplotlib: the `plot` extra).

    python benchmarks/plot.py benchmarks/results/paper-h100.json docs/img/paper-h100-tokens.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__)
        return 2
    src, dst = Path(argv[0]), Path(argv[1])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(src.read_text())
    rows = [r for r in res["plans"] if r.get("tokens_per_s")]
    colors = {("helix", "sdpa"): "#9ecae1", ("helix", "kernel-choice"): "#3182bd",
              ("baseline", "sdpa"): "#fdae6b", ("baseline", "kernel-choice"): "#e6550d",
              ("peer", None): "#969696"}
    labels = [r["name"].replace(" (DTensor)", "").replace("helix ", "") for r in rows]
    vals = [r["tokens_per_s"] / 1e6 for r in rows]
    cols = [colors.get((r["kind"], r.get("kernels")), "#969696") for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.34 * len(rows) + 1.6))
    y = range(len(rows))
    ax.barh(y, vals, color=cols)
    for i, r in enumerate(rows):
        pred = r.get("predicted_tokens_per_s")
        if pred:
            ax.plot([pred / 1e6], [i], marker="|", color="black", markersize=10)
        ax.text(vals[i], i, f" {vals[i]:.2f}M", va="center", fontsize=7)
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.set_xlim(0, max(vals) * 1.3)
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s (millions): measured per-rank compute + modeled comm (+ bubble); "
                  "| = cost-model prediction")
    ax.set_title(f"paper model, 16 devices ('{res['cluster']['name']}' comm model) -- "
                 f"{res['device']}, torch {res['torch']}, {res['date']}", fontsize=8)
    fig.text(0.01, 0.005, f"command: {res['command']}", fontsize=6)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=c, label=f"{k[0]} {k[1] or '(published)'}")
                       for k, c in colors.items()], fontsize=7, loc="lower right")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    dst.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dst, dpi=130)
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
