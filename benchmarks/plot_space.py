"""Bar charts (SVG, no dependency) of a plan-space result: tokens/s and one-sequence latency
per plan, Helix plans blue, baselines orange.

    python benchmarks/plot_space.py benchmarks/results/space_h200.json docs/img/space_h200.svg
"""

from __future__ import annotations

import json
import sys
from html import escape
from pathlib import Path

ROW, LABEL, BAR = 18, 250, 330


def _panel(rows, key, title, unit, x0, scale_max) -> list[str]:
    out = [f'<text x="{x0}" y="14" font-weight="bold">{escape(title)}</text>']
    for i, r in enumerate(rows):
        y = 24 + i * ROW
        v = r[key]
        color = "#3182bd" if r["family"] == "helix" else "#e6550d"
        out.append(f'<text x="{x0 + LABEL - 6}" y="{y + 12}" text-anchor="end">{escape(r["plan"])}</text>')
        if v is None:
            out.append(f'<text x="{x0 + LABEL + 4}" y="{y + 12}" fill="#888">n/a (dp &gt; 1 needs B &gt; 1)</text>')
            continue
        w = BAR * v / scale_max
        out.append(f'<rect x="{x0 + LABEL}" y="{y}" width="{w:.1f}" height="{ROW - 4}" fill="{color}"/>')
        out.append(f'<text x="{x0 + LABEL + w + 4}" y="{y + 12}">{v:.3g} {unit}</text>')
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__)
        return 2
    res = json.loads(Path(argv[0]).read_text())
    rows = sorted(res["plans"], key=lambda r: -r["tokens_per_s"])
    for r in rows:
        r["mtok"] = r["tokens_per_s"] / 1e6
    lat = [r["latency_one_sequence_ms"] for r in rows if r["latency_one_sequence_ms"]]
    width, height = 2 * (LABEL + BAR + 90), 40 + len(rows) * ROW
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">']
    svg += _panel(rows, "mtok", f"tokens/s, B={res['config']['batch']} x S={res['config']['seq']} "
                                f"on {res['devices_planned']} GPUs", "M", 0,
                  max(r["mtok"] for r in rows))
    svg += _panel(rows, "latency_one_sequence_ms", "latency of one sequence", "ms",
                  LABEL + BAR + 90, max(lat) if lat else 1.0)
    svg.append(f'<text x="0" y="{height - 4}" fill="#555">per-rank compute measured on '
               f'{escape(str(res["device"]))} (torch {escape(str(res["torch"]))}); communication '
               f'modeled ({escape(res["cluster"])})</text></svg>')
    Path(argv[1]).write_text("\n".join(svg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
