"""Per-rank decode step of every decode plan, timed on one GPU, against the planner's prediction.

    python benchmarks/gpu_decode.py --out benchmarks/results/decode_h200.json      # H100 / H200
    python benchmarks/gpu_decode.py --small --out /tmp/decode_small.json           # CPU smoke test
    python benchmarks/gpu_decode.py --reassemble benchmarks/results/decode_h200.json  # no GPU

For a LLaMA-GQA shape (64 heads / 8 kv heads, d 128, D 8192, SwiGLU F 28672, 80 layers, fp16)
at contexts 32k, 64k and 128k and a concurrency of 8 sequences on N = 64 devices, each plan of
`decode_plan.plan_decode` (every dp x (s, m, n), both m > 1 variants, tensor parallel with
copied kv heads; `--dp K`: only K replicas) is run as the rank that owns the new token's cache position runs it: its q/k/v/o weight
slices, its cache slice (h_kv kv heads, d/m dims, C/s positions), the cache write of the new
token's k and v, its attention core (s = 1, m = 1: the fused flash kernel with GQA folded into the
query length; score-reduce: QK^T over d/m, fp32 softmax, PV; qk-gather: QK^T over the gathered
d), for s > 1 the chunk core and combine that passes/seq_split.py builds: with equal chunks and one
q @ k^T (m = 1, qk-gather) the fused helix.chunk_attention and its lse rescale
(`_fused_chunk_core`, decode_plan.built_fused_chunk; the row's "chunk_core" key), else the
explicit chunk core (`_chunk_core`:
GQA folded into the query rows as passes/gqa_fold.py folds it, K and V read un-repeated; fp32 scores, the chunk's row max and sum, PV, then the rescale by exp(m_k - M) / L read from the
all-gathered (max, sum) of the s chunks; every variant, as compile_decoder writes a fused core
out for s > 1), the output projection over its H d / (m n) rows (replicated over the s-group,
as compile_decoder builds it; with s > 1 its all-reduce over the mesh sums the chunks' partial
outputs; runs before the "o_proj" key, recorded as "N", held H d / N rows) and the MLP over
F / N columns. Runs before the "combine" key timed s > 1 as a fused core (m = 1) and a
rescale by exp(lse_k - LSE), which no built graph runs: `--reassemble` leaves their s > 1
rows out. A plan of
dp > 1 replicas is timed as one replica's rank: its split at B / dp sequences. Its
collectives are not run: their time is the planner's
alpha-beta model of the cluster (`--cluster`, default: the paper's nodes of 8 GPUs, as many as
N needs, with this GPU's HBM bandwidth and memory when it is an H100 or H200).

Timing: distinct buffers for k layers (enough that one pass over them is >= 512 MB, so the 50 MB
L2 cache holds none of them between uses), CUDA events around `--iters` passes after `--warmup`,
per layer = total / (iters k), scaled by L; the replicated LM head GEMV (F.linear with the weight
[vocab, D], as nn.Linear holds it; the embedding is a lookup of B rows, not read whole) is timed
once and added.
measured TPOT = measured compute + modeled communication. A plan whose weights + cache do not fit
the GPU's memory (x 0.9) is still timed (one layer fits) and marked `fits: false`.

`--reassemble FILE` runs nothing: it prices every saved row again with today's cost model (the
step the row measured: its "o_proj"), prints predicted / measured per row (the L layers, and the
TPOT with the saved LM head time), and refits the per-kernel and per-row constants of
decode_plan.py (KERNEL_S, EXPLICIT_ROW_S, GATHER_ROW_S) by least squares on the rows' layers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helix_compiler.planning.decode_plan import (DecodeShape, built_fused_chunk,  # noqa: E402
                                                 llama70b_shape, plan_decode)
import helix_compiler.runtime.chunk_core  # noqa: E402,F401  (registers helix.chunk_attention)
from helix_compiler.errors import HelixError  # noqa: E402
from helix_compiler.measure.timing import cuda_graphed, loop_seconds  # noqa: E402
from helix_compiler.pipeline import cluster_spec  # noqa: E402
from helix_compiler.planning.profile import DEFAULT_PROFILE, load_profile  # noqa: E402

# Datasheet figures of the GPU the step runs on (HBM bytes/s, memory bytes): the prediction
# uses the measured GPU's, so predicted and measured compute are about the same chip.
GPU_DATASHEET = {"H200": (4.8e12, 141_000_000_000), "H100": (3.35e12, 80_000_000_000)}
# Bytes one timing pass streams at least, so no layer's buffers sit in L2 (50 MB on H100/H200).
ROTATION_BYTES = 512e6
SMALL = DecodeShape(name="small-gqa", layers=2, hidden=128, heads=8, kv_heads=2, head_dim=16,
                    ffn=256, dtype="fp32", replicated_params=1000 * 128)


# How the mirror holds and applies its weights. "linear": [out, in] and F.linear, as the
# model's nn.Linear layers (HF's q/k/v/o, gate/up/down) hold and apply them: what a compiled
# rank module runs. "matmul": [in, out] and x @ W, the layout of runs before 2026-12-02
# (sixth session); for a GEMV of one or a few rows cuBLAS reads that layout more slowly.
LAYOUT = "linear"


def _mm(x, w):
    """x times the weight `w` in the mirror's LAYOUT."""
    return F.linear(x, w) if LAYOUT == "linear" else x @ w


def _rank_layer(shape: DecodeShape, C: int, B: int, s: int, m: int, n: int, variant: str,
                dev, dtype, gen) -> dict:
    """One layer of the rank owning the new token's position: weight slices and cache slice."""
    N = s * m * n
    h, hkv, dm, Cs = shape.heads // n, max(shape.kv_heads // n, 1), shape.head_dim // m, C // s
    f = math.ceil(shape.ffn / N)
    r = lambda *size: torch.randn(*size, device=dev, dtype=dtype, generator=gen)  # noqa: E731
    D = shape.hidden
    # weights [out, in], as nn.Linear holds them (LAYOUT "linear"); "matmul": [in, out]
    w = lambda n_in, n_out: r(n_out, n_in) if LAYOUT == "linear" else r(n_in, n_out)  # noqa: E731
    lay = {"Wq": w(D, h * dm) * D ** -0.5,
           "Wkv": w(D, 2 * hkv * dm) * D ** -0.5,
           "Wo": w(h * dm, D) * 0.02,            # replicated over the s-group
           "K": r(B, hkv, Cs, dm), "V": r(B, hkv, Cs, dm)}
    if shape.ffn:
        lay["Wgu"] = w(D, 2 * f) * D ** -0.5
        lay["Wd"] = w(f, D) * 0.02
    if variant == "qk-gather":    # the buffer the all-gather of K writes: all d of h_kv heads
        lay["Kfull"] = torch.empty(B, hkv, Cs, shape.head_dim, device=dev, dtype=dtype)
    return lay


def _attend_explicit(q, k, v):
    """(out, lse) of softmax(q k^T / sqrt(d_q)) v, scores in fp32."""
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    lse = torch.logsumexp(scores, dim=-1)
    return (torch.softmax(scores, dim=-1).to(v.dtype) @ v), lse


def _chunk_core(q, k, v, every):
    """Chunk k's share of the attention, as passes/seq_split.py builds it: the explicit core
    over the chunk's positions (fp32 scores) with GQA folded into the query rows, as
    passes/gqa_fold.py builds it (q (B, h_kv, g, d): the g query heads of a kv head are rows of
    one matmul with the chunk's un-repeated K and V (B, h_kv, C/s, d); the built graph views the
    scores as (B, h, 1, C/s) for the mask, the same memory), its row max and sum, and the rescale by
    exp(m_k - M) / L with M, L from `every` (s, ..., 2), the s chunks' all-gathered
    (max, sum). Returns (share, this chunk's (max, sum)); the all-gather is modeled."""
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    mk = scores.amax(-1, keepdim=True).clamp(torch.finfo(scores.dtype).min)
    e = torch.exp(scores - mk)
    lk = e.sum(-1, keepdim=True)
    o = e.to(v.dtype) @ v
    stats = torch.cat([mk, lk], -1)                  # what the all-gather sends
    ms, ls = every[..., 0:1], every[..., 1:2]
    w = torch.exp(ms - ms.amax(0, keepdim=True))
    scale = w[-1] / (ls * w).sum(0)                  # this rank: the last chunk
    return o * scale.to(o.dtype), stats


def _fused_chunk_core(q, k, v, bias, every):
    """Chunk k's share as passes/seq_split.py builds it for equal chunks: helix.chunk_attention
    (the split-KV Triton kernel on CUDA, runtime/triton_chunk.py; q (B, h_kv, g, d) viewed as
    (B, h, 1, d), K and V un-repeated, the chunk's mask as its bias) and the rescale by
    exp(lse_k - M) / sum_k exp(lse_k - M), `every` (s, B, h, 1) the s chunks' all-gathered
    lse. Returns (share, this chunk's lse); the all-gather is modeled."""
    B, hkv, g, d = q.shape
    o, lse = torch.ops.helix.chunk_attention(q.reshape(B, hkv * g, 1, d), k, v, bias, d ** -0.5)
    top = every.amax(0, keepdim=True).clamp(torch.finfo(torch.float32).min)
    w = torch.exp(every - top)
    return o * (w[-1] / w.sum(0)).unsqueeze(-1).to(o.dtype), lse


def _fused(q, k, v):
    """(out, lse) of a fused kernel, or None where this device has none for the inputs."""
    if q.device.type != "cuda":
        return None
    try:
        r = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)
        return r[0], r[1]
    except RuntimeError:
        r = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)
        return r[0], r[1][..., :q.shape[2]]     # its log-sum-exp is padded to 32 query rows


def _core_kernel(dev) -> str:
    """Which kernel the m = 1 rows run: recorded, never silently replaced."""
    if dev.type != "cuda":
        return "explicit (CPU: no fused kernel returns the log-sum-exp)"
    q = torch.randn(1, 1, 8, 128, device=dev, dtype=torch.float16)
    try:
        torch.ops.aten._scaled_dot_product_flash_attention(q, q, q, 0.0, False, False)
        return "flash"
    except RuntimeError:
        return "efficient"


def _step(lay: dict, x, shape: DecodeShape, s: int, m: int, n: int, variant: str, pos: int,
          every, fused_chunk: bool = False):
    """One decode layer on the rank; its collectives are modeled, not run. `fused_chunk`: the
    s > 1 core is the fused one (`built_fused_chunk`), `every` then the gathered lse."""
    B = x.shape[0]
    h, hkv, d = shape.heads // n, max(shape.kv_heads // n, 1), shape.head_dim
    dm, g = d // m, (shape.heads // n) // max(shape.kv_heads // n, 1)
    q = _mm(x, lay["Wq"]).view(B, hkv, g, dm)          # GQA folded into the query length (gqa_fold)
    kv = _mm(x, lay["Wkv"]).view(B, 2, hkv, dm)
    lay["K"][:, :, pos] = kv[:, 0]                   # the new token's k, v at its position
    lay["V"][:, :, pos] = kv[:, 1]
    qx, kx = q, lay["K"]
    if variant == "qk-gather":                       # q and K gathered along d
        for j in range(m):
            lay["Kfull"][..., j * dm:(j + 1) * dm].copy_(lay["K"])
        qx, kx = q.repeat(1, 1, 1, m), lay["Kfull"]
    if s > 1 and fused_chunk:   # the fused chunk core and its lse share; the all-gather modeled
        out, _ = _fused_chunk_core(qx, kx, lay["V"], lay["bias"], every)
    elif s > 1:   # the explicit chunk core and its share (seq_split); the all-gather modeled
        out, _ = _chunk_core(qx, kx, lay["V"], every)
    elif variant == "heads":
        got = _fused(q, lay["K"], lay["V"])
        out, _ = got if got is not None else _attend_explicit(q, lay["K"], lay["V"])
    else:                                            # score-reduce: its all-reduce modeled
        out, _ = _attend_explicit(qx, kx, lay["V"])
    x = x + _mm(out.reshape(B, h * dm), lay["Wo"])       # output all-reduce (chunk; mesh if s > 1) modeled
    if "Wgu" in lay:
        xn = F.rms_norm(x, (x.shape[-1],))
        gate, up = _mm(xn, lay["Wgu"]).chunk(2, dim=-1)
        x = x + _mm(F.silu(gate) * up, lay["Wd"])      # MLP all-reduce modeled
    return x


def _time(fn, iters: int, warmup: int, dev) -> float:
    """Seconds per call of fn()."""
    return loop_seconds(fn, iters, warmup, dev)


def measure_row(shape, C, B, row, dev, dtype, iters, warmup) -> dict:
    """Measured compute ms of one plan row's decode step (all L layers, no LM head)."""
    gen = torch.Generator(device=dev).manual_seed(0)
    s, m, n, v = row.s, row.m, row.n, row.variant
    one = _rank_layer(shape, C, B, s, m, n, v, dev, dtype, gen)
    layer_bytes = sum(t.numel() * t.element_size() for t in one.values())
    k = int(min(shape.layers, max(2, math.ceil(ROTATION_BYTES / layer_bytes))))
    layers = [one] + [_rank_layer(shape, C, B, s, m, n, v, dev, dtype, gen) for _ in range(k - 1)]
    x0 = torch.randn(B, shape.hidden, device=dev, dtype=dtype, generator=gen)
    h_kv, g = max(shape.kv_heads // n, 1), (shape.heads // n) // max(shape.kv_heads // n, 1)
    # what the all-gather of the chunks' (max, sum) would hold: sums > 0
    every = torch.randn(s, B, h_kv, g, 2, device=dev, generator=gen)
    every[..., 1].abs_().add_(1.0)
    fused_chunk = built_fused_chunk(C, s, v)
    if fused_chunk:    # the all-gathered lse of the s chunks; each layer's mask chunk (B, 1, 1, C/s)
        every = torch.randn(s, B, h_kv * g, 1, device=dev, generator=gen)
        for lay in layers:
            lay["bias"] = torch.zeros(B, 1, 1, C // s, device=dev, dtype=dtype)
    pos = C // s - 1                   # the last position of the last chunk: this rank writes it

    def step():
        x = x0
        for lay in layers:
            x = _step(lay, x, shape, s, m, n, v, pos, every, fused_chunk)
        return x

    with torch.no_grad():
        t_eager = _time(step, iters, warmup, dev)
        graphed = _graphed(step, dev)
        t = _time(graphed, iters, warmup, dev) if graphed is not None else t_eager
    del layers
    return {"timed_layers": k, "measured_layer_ms": t / k * 1e3,
            "chunk_core": ("fused" if fused_chunk else "explicit") if s > 1 else "-",
            "measured_compute_ms": t / k * shape.layers * 1e3,
            "cuda_graph": graphed is not None,
            "measured_eager_layer_ms": t_eager / k * 1e3,
            "measured_eager_compute_ms": t_eager / k * shape.layers * 1e3}


def _graphed(fn, dev):
    """fn captured as one CUDA graph (a serving engine replays the decode step so: eager, a
    B = 8 decode layer is bound by its ~15 kernel launches, ~0.65 ms per layer whatever the
    plan, which hides the bytes each plan reads), or None on the CPU or if capture fails."""
    return cuda_graphed(fn, dev)[0]


def measure_replicated(shape, B, dev, dtype, iters, warmup) -> float:
    """ms of reading the replicated weights a step reads whole (R_read: the LM head and norms)
    as an LM head GEMV of B rows: F.linear(x, W), W [R_read / D, D] as nn.Linear holds it (the
    first run's x @ W with W [D, cols] took 4.3 ms for twice these bytes)."""
    if not shape.read_params:
        return 0.0
    gen = torch.Generator(device=dev).manual_seed(1)
    rows = math.ceil(shape.read_params / shape.hidden)
    w = torch.randn(rows, shape.hidden, device=dev, dtype=dtype, generator=gen)
    x = torch.randn(B, shape.hidden, device=dev, dtype=dtype, generator=gen)
    with torch.no_grad():
        return _time(lambda: F.linear(x, w), iters, warmup, dev) * 1e3


def _row_terms(cost) -> dict:
    """ms per step of a DecodeCost's L layers (no replicated read) and of its fitted terms."""
    out = {"layers": 0.0, "kernels": 0, "explicit": 0.0, "gather": 0.0}
    for name, ms in cost.terms:
        if name.startswith("replicated"):
            continue
        if "all-reduce" in name or "all-gather" in name or "reduce-scatter" in name:
            continue
        out["layers"] += ms
        if " kernels x " in name:
            out["kernels"] = int(name.split()[0])
        elif name.startswith("explicit core"):
            out["explicit"] = ms
        elif name.startswith("qk-gather"):
            out["gather"] = ms
    return out


def reassemble(path: str, out: str | None = None) -> int:
    """Every saved row priced again by today's cost model; predicted / measured printed, the
    fitted constants refitted (decode_plan.KERNEL_S, EXPLICIT_ROW_S, GATHER_ROW_S)."""
    from helix_compiler.planning import decode_plan as dp
    from helix_compiler.planning.cluster import ClusterSpec

    data = json.loads(Path(path).read_text())
    shape = DecodeShape(**data["shape"])
    if shape.replicated_read_params is None and shape.name == llama70b_shape().name:
        shape = llama70b_shape()       # runs before R_read: the LM head is what a step reads
    cluster = ClusterSpec(**data["cluster"])
    profile = DEFAULT_PROFILE
    if data.get("profile") not in (None, profile.name):
        print(f"note: the run used profile {data['profile']!r}; reassembled with {profile.name!r}")
    o_proj = {"mn": "mesh"}.get(data.get("o_proj", "N"), data.get("o_proj", "N"))
    # runs before the max-sum combine timed s > 1 as a fused core and an lse rescale, which no
    # built graph runs any more: those rows are not priced against today's model
    old_combine = "combine" not in data
    if old_combine:
        print(f"note: {path} was run before the max-sum all-gather combine: its s > 1 rows timed "
              f"a fused core (m = 1) and an lse rescale, not the built chunk core; they are left out")
    L = shape.layers
    print(f"{path}: {data.get('device')}, o_proj over {o_proj}, L={L}; ratios are predicted / "
          f"measured (layers: L x the timed layer; TPOT: layers + the saved LM head time + modeled "
          f"communication, the same on both sides)")
    print(f"{'C':>7} {'split':<32} {'pred layers':>11} {'meas layers':>11} {'ratio':>6} "
          f"{'pred TPOT':>9} {'meas TPOT':>9} {'ratio':>6}")
    fit_rows, rows_out, within = [], [], 0
    for entry in data["results"]:
        C_, B_ = entry["context"], entry["concurrency"]
        for r in entry.get("rows", []):
            if "measured_layer_ms" not in r or (old_combine and r["s"] > 1):
                continue
            rep_ms = r.get("replicated_measured_ms", entry.get("replicated_measured_ms", 0.0))
            cost = dp.cost_decode(shape, C_, B_, (r["s"], r["m"], r["n"]), cluster, profile,
                                  r["variant"] if r["m"] > 1 else None, o_proj=o_proj,
                                  dp=r.get("dp", 1),
                                  # runs before the fused chunk core timed the explicit one
                                  chunk_core=r.get("chunk_core", "explicit") if r["s"] > 1 else None)
            terms = _row_terms(cost)
            meas_layers = r["measured_layer_ms"] * L
            pred_tpot = cost.tpot_ms
            meas_tpot = meas_layers + rep_ms + cost.comm_ms
            ratio_l, ratio_t = terms["layers"] / meas_layers, pred_tpot / meas_tpot
            within += abs(ratio_t - 1) <= 0.15
            print(f"{C_:>7} {cost.name:<32} {terms['layers']:>11.2f} {meas_layers:>11.2f} "
                  f"{ratio_l:>6.2f} {pred_tpot:>9.2f} {meas_tpot:>9.2f} {ratio_t:>6.2f}")
            rows_out.append({"context": C_, "concurrency": B_, "name": cost.name,
                             "predicted_layers_ms": terms["layers"],
                             "measured_layers_ms": meas_layers, "predicted_tpot_ms": pred_tpot,
                             "measured_tpot_ms": meas_tpot, "layers_ratio": ratio_l,
                             "tpot_ratio": ratio_t, "fits": cost.fits})
            base = terms["layers"] - terms["kernels"] * dp.KERNEL_S * 1e3 * L \
                - terms["explicit"] - terms["gather"]
            per_row = terms["explicit"] / dp.EXPLICIT_ROW_S if terms["explicit"] else 0.0
            per_g = terms["gather"] / dp.GATHER_ROW_S if terms["gather"] else 0.0
            fit_rows.append(([terms["kernels"] * L * 1e3, per_row, per_g],
                             meas_layers - base, meas_layers))
    n_rows = len(rows_out)
    print(f"\n{within} of {n_rows} rows have TPOT predicted within 15% of measured")
    if fit_rows:
        A = torch.tensor([x for x, _, _ in fit_rows], dtype=torch.float64)
        y = torch.tensor([v for _, v, _ in fit_rows], dtype=torch.float64)
        wgt = 1 / torch.tensor([m for _, _, m in fit_rows], dtype=torch.float64)
        keep = [j for j in range(3) if A[:, j].abs().sum() > 0]
        sol = torch.linalg.lstsq(A[:, keep] * wgt[:, None], (y * wgt)[:, None]).solution.flatten()
        names = ["KERNEL_S", "EXPLICIT_ROW_S", "GATHER_ROW_S"]
        now = [dp.KERNEL_S, dp.EXPLICIT_ROW_S, dp.GATHER_ROW_S]
        print("least-squares refit on the layers (relative error weighted): " + ", ".join(
            f"{names[j]} = {float(v):.3g} s (now {now[j]:.3g})" for j, v in zip(keep, sol)))
    if out:
        Path(out).write_text(json.dumps({"source": path, "o_proj": o_proj, "rows": rows_out},
                                        indent=1) + "\n")
    return 0


def _cluster(name, devices, dev):
    spec = cluster_spec(name, devices)
    if dev.type == "cuda":
        gpu = torch.cuda.get_device_name(dev)
        for key, (bw, mem) in GPU_DATASHEET.items():
            if key in gpu:
                spec = dataclasses.replace(spec, name=f"{spec.name}-{key}", gpu=gpu,
                                           memory_bandwidth=bw, memory_bytes=mem)
    return spec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/decode_h200.json")
    p.add_argument("--small", action="store_true",
                   help="a tiny fp32 shape on the CPU (smoke test: seconds)")
    p.add_argument("--devices", type=int, default=None, help="N (default 64; --small 8)")
    p.add_argument("--contexts", default=None, help="comma-separated C (default 32768,65536,131072)")
    p.add_argument("--concurrency", default=None, help="comma-separated B (default 8)")
    p.add_argument("--dp", type=int, default=None,
                   help="only plans of this many replicas (default: every dp the planner takes)")
    p.add_argument("--cluster", default=None)
    p.add_argument("--profile", default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--budget-s", type=float, default=200.0,
                   help="stop timing rows after this many seconds (the rest marked skipped)")
    p.add_argument("--layout", choices=("linear", "matmul"), default="linear",
                   help="the mirror's weights: [out, in] with F.linear, as nn.Linear (default), "
                        "or [in, out] with x @ W (runs before 2026-12-02's sixth session)")
    p.add_argument("--reassemble", metavar="FILE", default=None,
                   help="price a saved run's rows again (no timing; --out: the ratios as JSON)")
    args = p.parse_args(argv)
    if args.reassemble:
        return reassemble(args.reassemble, args.out if "--out" in (argv or sys.argv) else None)
    global LAYOUT
    LAYOUT = args.layout
    t_start = time.time()
    dev = torch.device("cpu" if args.small or not torch.cuda.is_available() else "cuda")
    shape = SMALL if args.small else llama70b_shape()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[shape.dtype]
    devices = args.devices or (8 if args.small else 64)
    contexts = [int(c) for c in (args.contexts or ("64,128" if args.small
                                                   else "32768,65536,131072")).split(",")]
    concurrency = [int(b) for b in (args.concurrency or ("2" if args.small else "8")).split(",")]
    iters = args.iters or (2 if args.small else 10)
    warmup = args.warmup or (1 if args.small else 3)
    profile = load_profile(args.profile) if args.profile else DEFAULT_PROFILE
    cluster = _cluster(args.cluster, devices, dev)
    result = {"what": "per-rank decode step of each plan measured on this device; communication "
                      "modeled from the cluster spec (not run)",
              "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "command": "python " + " ".join(sys.argv),
              "shape": dataclasses.asdict(shape), "devices": devices,
              "cluster": dataclasses.asdict(cluster), "profile": profile.name,
              "core_kernel_m1": _core_kernel(dev), "iters": iters, "warmup": warmup,
              "o_proj": "mesh", "combine": "max-sum all-gather", "weight_layout": LAYOUT,
              "results": []}
    for B in concurrency:
        rep_by_rows = {}           # LM head GEMV ms by the rows a replica serves (B / dp)

        def rep_ms_of(rows_):
            if rows_ not in rep_by_rows:
                rep_by_rows[rows_] = measure_replicated(shape, rows_, dev, dtype, iters, warmup)
            return rep_by_rows[rows_]

        rep_ms = rep_ms_of(B)
        for C in contexts:
            entry = {"context": C, "concurrency": B, "replicated_measured_ms": rep_ms}
            try:
                plan = plan_decode(shape, C, B, devices, cluster, profile, dp=args.dp)
            except HelixError as e:
                entry["error"] = str(e)
                result["results"].append(entry)
                continue
            rows = []
            for row in plan.candidates:
                out = {"name": row.name, "dp": row.dp, "s": row.s, "m": row.m, "n": row.n,
                       "variant": row.variant, "tp": row.tp, "kv_copies": row.kv_copies,
                       "kv_bytes_per_rank": row.kv_bytes_per_rank,
                       "memory_bytes_per_rank": row.memory_bytes_per_rank, "fits": row.fits,
                       "excluded": row.excluded, "predicted_compute_ms": row.compute_ms,
                       "predicted_comm_ms": row.comm_ms, "predicted_tpot_ms": row.tpot_ms,
                       "predicted_tokens_per_s": row.tokens_per_s}
                if time.time() - t_start > args.budget_s:
                    out["skipped"] = f"time budget of {args.budget_s:g} s spent"
                else:
                    # a replica's rank: its split at B / dp sequences (the same kernels at
                    # dp = 1); the replicas run side by side, so its step is the plan's
                    rep_row = rep_ms_of(B // row.dp)
                    got = measure_row(shape, C, B // row.dp, row, dev, dtype, iters, warmup)
                    got["measured_compute_ms"] += rep_row
                    got["replicated_measured_ms"] = rep_row
                    tpot = got["measured_compute_ms"] + row.comm_ms
                    out.update(got, measured_tpot_ms=tpot, measured_tokens_per_s=B / tpot * 1e3,
                               predicted_over_measured=row.tpot_ms / tpot)
                rows.append(out)
            timed = [r for r in rows if "measured_tpot_ms" in r and r["fits"]]
            tp = next((r for r in rows if r["tp"]), None)
            best = min(timed, key=lambda r: r["measured_tpot_ms"], default=None)
            chosen = next(r for r in rows if r["name"] == plan.chosen.name)
            rtp = plan.replicated_tp
            entry.update(chosen=plan.chosen.name, reason=plan.reason,
                         tp=tp["name"] if tp else None, tp_fits=tp["fits"] if tp else None,
                         replicated_tp=rtp.name if rtp else None,
                         measured_best=best["name"] if best else None, rows=rows)
            if tp and "measured_tpot_ms" in tp and "measured_tpot_ms" in chosen:
                entry["measured_chosen_over_tp"] = chosen["measured_tpot_ms"] / tp["measured_tpot_ms"]
                entry["predicted_chosen_over_tp"] = plan.chosen.tpot_ms / plan.tp.tpot_ms
            r_row = next((r for r in rows if rtp and r["name"] == rtp.name), None)
            if r_row and "measured_tpot_ms" in r_row and "measured_tpot_ms" in chosen:
                entry["measured_chosen_over_replicated_tp"] = (chosen["measured_tpot_ms"]
                                                               / r_row["measured_tpot_ms"])
            # the best single-replica Helix split (dp = 1): the (s, m, n) space on its own
            one = [r for r in timed if r["dp"] == 1]
            best1 = min(one, key=lambda r: r["measured_tpot_ms"], default=None)
            if best1 and tp and "measured_tpot_ms" in tp:
                entry["measured_best_dp1"] = best1["name"]
                entry["measured_best_dp1_over_tp"] = best1["measured_tpot_ms"] / tp["measured_tpot_ms"]
            result["results"].append(entry)
            print(f"C={C} B={B}: chosen {plan.chosen.name} predicted {plan.chosen.tpot_ms:.2f} ms"
                  f", measured {chosen.get('measured_tpot_ms', float('nan')):.2f} ms; TP "
                  f"{'fits' if tp and tp['fits'] else 'does not fit'}; measured best "
                  f"{entry['measured_best']}; chosen/TP measured "
                  f"{entry.get('measured_chosen_over_tp', float('nan')):.2f}", flush=True)
    result["seconds"] = round(time.time() - t_start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
