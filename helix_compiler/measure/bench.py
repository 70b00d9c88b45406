"""`helix bench`: time one rank of every plan on this GPU, add modeled communication.

    helix bench --out benchmarks/results/paper-h100.json [--profile P.yaml]
    helix bench --model gqa --out benchmarks/results/gqa-h100.json [--profile P.yaml]
    helix bench --small --out /tmp/small.json                # CPU test of the harness
    helix bench --raw paper-h100.raw.json --out paper.json   # re-assemble, no GPU

Suites (--model): `paper`, the paper's model on 16 devices (measure/paper.py), and `gqa`,
a LLaMA-style GQA model on 8 and 32 devices (measure/gqa.py). Each row times one rank's
forward (CUDA events, warm-up, median of repeats, collectives stubbed: no transfer) at the
micro-batch the cost model picks, halved until it fits; step = measured compute + the cost
model's communication (no overlap). Every row is written to --raw-out as soon as it is
measured; `--raw` reuses those measurements and recomputes predictions, comm and steps from
the current cost model and --profile, so the cost model can be revised without the GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch

from helix_compiler.planning.cluster import load_cluster
from helix_compiler.runtime.compiled import COMPILE_MODES
from helix_compiler.errors import HelixError
from helix_compiler.runtime.kernels_chunked import DEFAULT_CHUNK_BYTES
from helix_compiler.measure import configure_logging, gqa, paper, space
from helix_compiler.measure.record import RawRecord
from helix_compiler.measure.timing import Timer, device_info
from helix_compiler.planning.profile import DEFAULT_PROFILE, load_profile

log = logging.getLogger(__name__)

# Per suite: the defaults of the options whose default differs (the rest are shared).
SUITE_DEFAULTS = {
    "paper": {"out": "benchmarks/results/paper.json", "devices": [16], "warmup": 1,
              "repeats": 3, "max_micro_batch": 1 << 30},
    "gqa": {"out": "benchmarks/results/gqa.json", "devices": [8, 32], "warmup": 2,
            "repeats": 5, "max_micro_batch": 8},
    "space": {"out": "benchmarks/results/space.json", "devices": [16], "warmup": 1,
              "repeats": 3, "max_micro_batch": 1 << 30},
}
DEFAULT_PROFILE_FILE = Path(__file__).resolve().parents[1] / "planning" / "profiles" / "h100.yaml"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="helix bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=tuple(SUITE_DEFAULTS), default="paper",
                    help="suite: the paper's model (16 devices), the GQA model (8 and 32), or "
                         "the plan space of the paper's model (dp x pp x m x n and the "
                         "baselines, each rank measured, the network modeled)")
    ap.add_argument("--micro-batches", type=int, nargs="*", default=None,
                    help="space suite: micro-batches to time each rank at (default 1 2 4 8; "
                         "--small 1 2 4)")
    ap.add_argument("--out", default=None, help="results JSON (default benchmarks/results/"
                                                "<model>.json)")
    ap.add_argument("--raw-out", default=None, help="write raw measurements here as they come")
    ap.add_argument("--raw", default=None, help="reuse raw measurements instead of measuring")
    ap.add_argument("--profile", default=None,
                    help="profile YAML (default: the built-in H100 for paper, "
                         "helix_compiler/planning/profiles/h100.yaml for gqa)")
    ap.add_argument("--cluster", default="paper", help="cluster preset or YAML (paper suite)")
    ap.add_argument("--devices", type=int, nargs="*", default=None,
                    help="device counts (paper: one, default 16; gqa: default 8 32)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (gqa suite)")
    ap.add_argument("--small", action="store_true", help="tiny model on the CPU (a test)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--modes", choices=("both", "sdpa", "kernel-choice"), default=None,
                    help="paper suite: SDPA as is, after kernel choice, or both (default)")
    ap.add_argument("--only", nargs="*", default=None, help="helix splits 'MxN' to run")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--max-micro-batch", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--chunk-mib", type=int, default=None)
    ap.add_argument("--b-sweep", type=int, nargs="*", default=None,
                    help="also time helix m=1 at these micro-batches")
    ap.add_argument("--compile-check", action="store_true",
                    help="paper suite: also run helix m=1 (kernel choice) through torch.compile")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="skip the measurements left after this many seconds")
    ap.add_argument("--helix-compile", choices=tuple(COMPILE_MODES), default=None,
                    help="space suite: also time every helix rank under torch.compile in this "
                         "mode (as `helix run --compile` runs it) and take the faster of the two, "
                         "as the baselines are compiled (default: default on a GPU, none on the "
                         "CPU)")
    ap.add_argument("--soak-s", type=float, default=None,
                    help="space suite: seconds of back-to-back calls before each timing, so "
                         "that every rank and the peak GEMM are timed at sustained clocks "
                         "(default 1 on a GPU; 0: time from whatever state the GPU is in)")
    return ap


def _options(argv) -> argparse.Namespace:
    args = parser().parse_args(argv)
    for k, v in SUITE_DEFAULTS[args.model].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.model == "gqa":
        if args.modes not in (None, "sdpa"):
            raise HelixError(f"--modes {args.modes}: the GQA suite runs the rank graphs as "
                             f"helix_compile emits them (no kernel choice at d = 128); "
                             f"leave --modes out")
        if args.compile_check:
            raise HelixError("--compile-check is a paper-suite option; leave it out with "
                             "--model gqa")
    elif len(args.devices) != 1:
        raise HelixError(f"--devices {' '.join(map(str, args.devices))}: the paper suite "
                         f"measures one device count; give one (default 16)")
    if args.soak_s is not None and not args.soak_s >= 0:
        raise HelixError(f"--soak-s {args.soak_s:g}: seconds of sustained calls before each "
                         f"timing must be >= 0 (0: none)")
    if args.model != "space" and (args.soak_s or args.helix_compile not in (None, "none")):
        raise HelixError("--soak-s and --helix-compile are space-suite options; add --model "
                         "space or leave them out")
    args.modes = args.modes or "both"
    args.chunk_bytes = (args.chunk_mib << 20) if args.chunk_mib else DEFAULT_CHUNK_BYTES
    args.command = "helix bench " + " ".join(argv if argv is not None else sys.argv[1:])
    return args


def _device(args) -> torch.device:
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.small
                                        else "cpu"))


def _run_paper(args) -> tuple[dict, str]:
    profile = load_profile(args.profile) if args.profile else DEFAULT_PROFILE
    cluster = load_cluster(args.cluster)
    cfg = paper.config(args.small)
    summary = paper.summary_for(cfg)
    if args.raw:
        raw = json.loads(Path(args.raw).read_text())
    else:
        device = _device(args)
        log.info("[bench] %s on %s", cfg, device)
        rec = RawRecord({"info": device_info(device), "devices": args.devices[0], "rows": [],
                         "chunk_bytes": args.chunk_bytes, "command": args.command},
                        args.raw_out, args.deadline_s)
        timer = Timer(device, warmup=args.warmup, repeats=args.repeats)
        paper.run_measurements(args, cfg, summary, cluster, profile, timer, rec)
        raw = rec.data
    result = paper.assemble(raw, summary, cluster, profile, cfg)
    result["command"] = raw.get("command") if args.raw else args.command
    return result, paper.table(result)


def _run_space(args) -> tuple[dict, str]:
    profile = load_profile(args.profile) if args.profile else DEFAULT_PROFILE
    cluster = load_cluster(args.cluster)
    cfg = space.config(args.small)
    if args.raw:
        raw = json.loads(Path(args.raw).read_text())
    else:
        device = _device(args)
        args.micro_batches = args.micro_batches or ([1, 2, 4] if args.small else [1, 2, 4, 8])
        log.info("[bench] plan space of %s on %s, micro-batches %s", cfg, device,
                 args.micro_batches)
        soak = args.soak_s if args.soak_s is not None else 1.0
        if args.helix_compile is None:
            args.helix_compile = "default" if device.type == "cuda" else "none"
        rec = RawRecord({"info": device_info(device), "devices": args.devices[0], "ranks": [],
                         "chunk_bytes": args.chunk_bytes, "command": args.command,
                         "soak_s": soak, "helix_compile": args.helix_compile},
                        args.raw_out, args.deadline_s)
        timer = Timer(device, warmup=args.warmup, repeats=args.repeats, soak_s=soak)
        space.run_measurements(args, cfg, cluster, timer, rec)
        raw = rec.data
    result = space.assemble(raw, cluster, profile, cfg)
    return result, space.table(result)


def _run_gqa(args) -> tuple[dict, str]:
    profile = load_profile(args.profile or DEFAULT_PROFILE_FILE)
    cfg = gqa.config(args.small, args.seq)
    if args.raw:
        raw = json.loads(Path(args.raw).read_text())
        cfg = dataclasses.replace(cfg, **{k: v for k, v in raw["config"].items()
                                          if k != "dtype"})
    else:
        device = _device(args)
        log.info("[bench] %s on %s, devices %s", cfg, device, args.devices)
        rec = RawRecord(gqa.raw_header(args, cfg, device), args.raw_out, args.deadline_s)
        timer = Timer(device, warmup=args.warmup, repeats=args.repeats)
        gqa.run_measurements(args, cfg, gqa.summary_for(cfg), profile, timer, rec)
        raw = rec.data
    result = gqa.assemble(raw, cfg, gqa.cluster_for, profile)
    return result, gqa.table(result)


def main(argv=None) -> int:
    configure_logging()
    args = _options(argv)
    t0 = time.perf_counter()
    run = {"gqa": _run_gqa, "paper": _run_paper, "space": _run_space}[args.model]
    result, table = run(args)
    if args.raw:
        result["reassembled_by"] = args.command
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(table)
    log.info("[bench] wrote %s (%.0f s)", args.out, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
