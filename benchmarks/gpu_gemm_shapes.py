"""The paper model's linear layers at one sequence (M = 10000 rows, fp16) on this GPU, as
nn.Linear runs them (F.linear with bias), beside the same products cut along K (two or four
addmm calls accumulating into one output) or N (two halves), and the 8192^3 GEMM the roofline
takes as the peak. Each variant is timed `--rounds` times, round-robin, to see drift.

    python benchmarks/gpu_gemm_shapes.py --out benchmarks/results/gemm_shapes_h200.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helix_compiler.measure.timing import loop_seconds  # noqa: E402

M, D, FF = 10000, 8192, 32768


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/gemm_shapes_h200.json")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: gpu_gemm_shapes needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, s=1.0):
        return torch.randn(*shape, device=dev, dtype=torch.float16, generator=gen) * s

    x_d, x_f = rnd(M, D), rnd(M, FF)
    w_dd, w_df, w_fd = rnd(D, D, s=0.01), rnd(FF, D, s=0.01), rnd(D, FF, s=0.01)
    b_d, b_f = rnd(D), rnd(FF)
    a8, b8 = rnd(8192, 8192), rnd(8192, 8192)

    def split_k(x, w, b, parts):
        k = x.shape[1] // parts
        y = torch.addmm(b, x[:, :k], w[:, :k].t())
        for i in range(1, parts):
            y.addmm_(x[:, i * k:(i + 1) * k], w[:, i * k:(i + 1) * k].t())
        return y

    def split_n(x, w, b, parts):
        n = w.shape[0] // parts
        return [F.linear(x, w[i * n:(i + 1) * n], b[i * n:(i + 1) * n]) for i in range(parts)]

    cases = {
        "mm 8192^3": (lambda: a8 @ b8, 2.0 * 8192 ** 3),
        "linear D->D": (lambda: F.linear(x_d, w_dd, b_d), 2.0 * M * D * D),
        "linear D->F": (lambda: F.linear(x_d, w_df, b_f), 2.0 * M * D * FF),
        "linear F->D": (lambda: F.linear(x_f, w_fd, b_d), 2.0 * M * FF * D),
        "F->D split K 2": (lambda: split_k(x_f, w_fd, b_d, 2), 2.0 * M * FF * D),
        "F->D split K 4": (lambda: split_k(x_f, w_fd, b_d, 4), 2.0 * M * FF * D),
        "D->F split N 2": (lambda: split_n(x_d, w_df, b_f, 2), 2.0 * M * D * FF),
        "linear D->F/2": (lambda: F.linear(x_d, w_df[:FF // 2], b_f[:FF // 2]), M * D * FF),
        "linear F/2->D": (lambda: F.linear(x_f[:, :FF // 2].contiguous(), w_fd[:, :FF // 2]
                                           .contiguous(), b_d), M * FF * D),
    }
    ref = F.linear(x_f, w_fd, b_d).float()
    for parts in (2, 4):
        got = split_k(x_f, w_fd, b_d, parts).float()
        print(f"split K {parts}: max |diff| / max |ref| "
              f"{float((got - ref).abs().max() / ref.abs().max()):.2e}")
    rows = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, (fn, flops) in cases.items():
            sec = loop_seconds(fn, args.iters, args.warmup, dev)
            rows[name].append({"ms": sec * 1e3, "tflops": flops / sec / 1e12})
    result = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
              "python": platform.python_version(), "command": "python " + " ".join(sys.argv),
              "M": M, "D": D, "F": FF, "dtype": "float16", "iters": args.iters,
              "warmup": args.warmup, "rounds": rows}
    for name, rs in rows.items():
        print(f"{name:>16}: " + "  ".join(f"{r['ms']:7.3f} ms {r['tflops']:5.0f}" for r in rs))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} ({time.process_time():.0f} s CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
