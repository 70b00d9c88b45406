"""The chosen decode plan against TP=64 with each side at its faster compile mode per row, from
saved gpu_decode_compiled.py results (no GPU): the tables of docs/BENCHMARKS.md, "q/k/v and
gate/up as one GEMM" (the steps compile_decoder builds now, projections fused) and "Every row
under max-autotune, each side at its best mode" (`--unfused`: the seventh session's files,
built before passes/fuse_linears.py).

    python benchmarks/decode_best_modes.py                      # the saved H200 files
                                      # (+ every timed (context, concurrency): plan_table)
    python benchmarks/decode_best_modes.py --unfused --json out.json

Each file's rows give, per (context, rank batch), the step's TPOT as built and under
torch.compile (`inductor_tpot_ms`, in the file's `inductor_mode`: None is inductor's default
mode). The chosen plan (dp=8 x TP=8) serves B sequences with TP=8 ranks at B / 8; TP=64 runs
all B. A side's TPOT for a row is the least over the files' modes (as built included), and the
ratio is the chosen side's over TP=64's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# the steps with q/k/v and gate/up fused (compile_decoder's default since the eighth session)
# (+ the ninth session's runs with the split-KV core, `--split-kv-core`, reading the cache
# un-repeated: a mode of its own on each side, "... + split-KV")
SPLIT_KV_TP8 = ("decode_compiled_h200_tp8_splitkv_unrepeated.json",
                "decode_compiled_h200_tp8_splitkv_unrepeated_64k.json")
SPLIT_KV_TP64 = ("decode_compiled_h200_tp64_splitkv_unrepeated.json",)
CHOSEN = ("decode_compiled_h200_tp8_32k2_fused.json", "decode_compiled_h200_tp8_fused_rest.json",
          "decode_compiled_h200_tp8_fused_autotune.json") + SPLIT_KV_TP8
TP = ("decode_compiled_h200_tp64_32k16_fused.json", "decode_compiled_h200_tp64_fused_rest.json",
      "decode_compiled_h200_tp64_fused_autotune.json") + SPLIT_KV_TP64
# the same rows built before the fusion (sixth and seventh sessions)
CHOSEN_UNFUSED = ("decode_compiled_h200_tp8_k26.json", "decode_compiled_h200_tp8_autotune_32k.json",
                  "decode_compiled_h200_tp8_autotune_rest.json")
TP_UNFUSED = ("decode_compiled_h200_tp64_k26.json", "decode_compiled_h200_tp64_autotune_32k.json",
              "decode_compiled_h200_tp64_autotune_64k.json",
              "decode_compiled_h200_tp64_autotune_rest.json")
REPLICAS = 8          # the chosen plan's data-parallel replicas: a TP=8 rank serves B / 8


def tpots(files, folder: Path = RESULTS, plan: str | None = None) -> dict:
    """(context, rank batch) -> {mode: TPOT ms}; mode "as built", "default" or the file's
    inductor_mode (+ " + split-KV"). `plan`: only the rows of that split (files that time two
    plans per row). A mode timed in several files keeps its least."""
    out: dict = {}
    for name in files:
        data = json.loads((folder / name).read_text())
        for r in data["results"]:
            if plan is not None and r["name"] != plan:
                continue
            _keep_least(out.setdefault((r["context"], r["concurrency"]), {}), data, r)
    return out


def _keep_least(modes: dict, data: dict, r: dict) -> None:
    """Row `r` of result file `data` into {mode: TPOT ms}: "as built" and the file's inductor
    mode (+ " + split-KV"), each keeping its least over the rows recorded."""
    kv = " + split-KV" if _split_kv(data, r) else ""
    for mode, field in (("as built" + kv, "measured_tpot_ms"),
                        ((data.get("inductor_mode") or "default") + kv, "inductor_tpot_ms")):
        if r.get(field) is not None:
            modes[mode] = min(modes.get(mode, r[field]), r[field])


def _split_kv(data: dict, row: dict) -> bool:
    """Whether the row's step ran the split-KV core: the file's switch (True / "on"; it acts on
    s = 1 steps only), or with "auto" (compile_decoder's default since the ninth session) its
    cores' notes."""
    if row.get("split", [1])[0] != 1:
        return False
    switch = data.get("split_kv_core")
    if switch == "auto":
        notes = row.get(f"k{row['ks'][0]}", {}).get("core_notes", [])
        return any("helix.chunk_attention" in n for n in notes)
    return switch in (True, "on")


def table(folder: Path = RESULTS, unfused: bool = False) -> list[dict]:
    chosen = tpots(CHOSEN_UNFUSED if unfused else CHOSEN, folder)
    tp = tpots(TP_UNFUSED if unfused else TP, folder)
    rows = []
    for (context, batch), modes in sorted(tp.items()):
        mine = chosen.get((context, batch // REPLICAS))
        if mine is None or batch % REPLICAS:
            continue
        a = min(mine, key=mine.get)
        b = min(modes, key=modes.get)
        rows.append({"context": context, "concurrency": batch,
                     "chosen_mode": a, "chosen_tpot_ms": mine[a],
                     "tp_mode": b, "tp_tpot_ms": modes[b], "ratio": mine[a] / modes[b]})
    return rows


def measured(folder: Path = RESULTS) -> dict:
    """Every fused-projection run's rows (files with `fuse_projections` true, compile_decoder's
    default since the eighth session): ((s, m, n), devices, context, rank batch) -> {mode:
    TPOT ms}, modes as `tpots` names them, with the file's cluster for each key."""
    out: dict = {}
    for path in sorted(folder.glob("decode_compiled_h200*.json")):
        data = json.loads(path.read_text())
        if data.get("fuse_projections") is not True:
            continue
        for r in data["results"]:
            key = (tuple(r["split"]), data["devices"], r["context"], r["concurrency"])
            _keep_least(out.setdefault(key, {"modes": {}, "cluster": data["cluster"]})["modes"],
                        data, r)
    return out


def plan_table(folder: Path = RESULTS, devices: int = 64) -> list[dict]:
    """Every (context, concurrency) where TP over `devices` and the decode planner's choice
    (its rank: (s, m, n) at concurrency / dp sequences) were both timed, each at its best mode:
    the measured ratio beside the planner's predicted ratio and its bandwidth floor
    (decode_plan's `floor_ratio`: the least ratio any split reaches with every kernel at HBM
    bandwidth), priced on the runs' cluster and the default profile, as the runs were."""
    from helix_compiler.planning.cluster import ClusterSpec
    from helix_compiler.planning.decode_plan import llama70b_shape, plan_decode

    runs = measured(folder)
    rows = []
    for (split, n_dev, C, B), tp in sorted(runs.items(), key=lambda kv: kv[0][2:]):
        if split != (1, 1, devices) or n_dev != devices:
            continue
        plan = plan_decode(llama70b_shape(), C, B, devices, ClusterSpec(**tp["cluster"]))
        ch = plan.chosen
        rank = runs.get(((ch.s, ch.m, ch.n), ch.devices // ch.dp, C, B // ch.dp))
        if rank is None:
            continue
        a = min(rank["modes"], key=rank["modes"].get)
        b = min(tp["modes"], key=tp["modes"].get)
        rows.append({"context": C, "concurrency": B, "chosen": ch.name, "chosen_mode": a,
                     "chosen_tpot_ms": rank["modes"][a], "tp_mode": b,
                     "tp_tpot_ms": tp["modes"][b], "ratio": rank["modes"][a] / tp["modes"][b],
                     "predicted_ratio": ch.tpot_ms / plan.tp.tpot_ms,
                     "floor_ratio": plan.floor_ratio, "floor_best": plan.floor_best.name})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the result files")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--unfused", action="store_true",
                   help="the runs built before passes/fuse_linears.py (q/k/v, gate/up apart)")
    args = p.parse_args(argv)
    rows = table(args.results, args.unfused)
    for r in rows:
        print(f"{r['context'] // 1024:>4}k x {r['concurrency']:>2}: chosen "
              f"{r['chosen_tpot_ms']:6.2f} ms ({r['chosen_mode']}), "
              f"TP=64 {r['tp_tpot_ms']:6.2f} ms ({r['tp_mode']}): {r['ratio']:.3f}")
    if not args.unfused:
        print("every timed row, the planner's choice against TP=64 (ratio / predicted / floor):")
        every = plan_table(args.results)
        for r in every:
            print(f"{r['context'] // 1024:>5}k x {r['concurrency']:>2}: {r['chosen']:<32} "
                  f"{r['chosen_tpot_ms']:6.2f} ms ({r['chosen_mode']}), TP=64 "
                  f"{r['tp_tpot_ms']:6.2f} ms ({r['tp_mode']}): {r['ratio']:.3f} / "
                  f"{r['predicted_ratio']:.3f} / {r['floor_ratio']:.3f}")
        rows = rows + every
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
