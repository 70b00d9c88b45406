"""Where the paper model's d = 512 attention core spends its time, and which way of running it
is fastest: one layer's core (B = 1, H = 16, T = S = 10000, d = 512, fp16, no mask, not causal;
no fused SDPA kernel takes d > 256 on Hopper).

    python benchmarks/gpu_core512.py --out benchmarks/results/core512_h200.json

Rows (ms per layer's core, TFLOP/s of useful work 4 H T S d, error against the fp32 path on a
slice):
  `explicit`: torch.ops.helix.chunked_attention as the rank modules run it (whole-head
      blocks: baddbmm -> softmax -> bmm; the softmax is runtime/triton_softmax.py's where it
      fits, the `softmax` field says which), and `explicit torch.softmax` the same op with
      triton_softmax.USE_TRITON off (the blocks before that kernel);
  `qk`, `softmax`, `pv`: the three steps of those blocks timed apart (16 heads each);
  `triton_softmax`: the blocks with the row softmax as one Triton program per row (the row
      read once into registers, the probabilities written over the scores in place);
  `heads=2`: two heads per block (512 MiB of scores alive);
  `rows=R`: blocks of all 16 heads x R query rows (scores of one block near L2's size),
      with the Triton softmax;
  `compiled`: the same blocks under torch.compile (inductor's own softmax kernel).
Needs a CUDA GPU and Triton; under 3 minutes on an H200.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helix_compiler.measure.timing import loop_seconds  # noqa: E402
from helix_compiler.numerics import relative_error  # noqa: E402
from helix_compiler.runtime import kernels_chunked, triton_flash, triton_softmax  # noqa: E402

SHAPE = {"H": 16, "T": 10000, "S": 10000, "d": 512}
REF_ROWS = 1024

triton = triton_flash.triton
if triton is not None:
    import triton.language as tl

    @triton.jit
    def _row_softmax(s_ptr, stride, n_cols, scale, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        keep = offs < n_cols
        x = tl.load(s_ptr + row * stride + offs, mask=keep, other=-float("inf")).to(tl.float32)
        x = x * scale
        e = tl.exp(x - tl.max(x, 0))
        p = e / tl.sum(e, 0)
        tl.store(s_ptr + row * stride + offs, p.to(s_ptr.dtype.element_ty), mask=keep)


def row_softmax_(s: torch.Tensor, num_warps: int = 16, scale: float = 1.0) -> torch.Tensor:
    rows, n = s.numel() // s.shape[-1], s.shape[-1]
    s2 = s.view(rows, n)
    _row_softmax[(rows,)](s2, s2.stride(0), n, scale, BLOCK=triton.next_power_of_2(n),
                          num_warps=num_warps)
    return s


_SIDE = {}


def overlapped_core(q, k, v, scale, *, heads=1, fold_scale=False, buffers=2):
    """Whole-head blocks with each block's softmax on a side stream, so that it runs under the
    next block's Q K^T and this block's neighbours' GEMMs (main: QK(0), QK(1), PV(0), QK(2),
    PV(1), ...; side: SM(0), SM(1), ...). `buffers` score blocks are alive at once."""
    _, H, T, d = q.shape
    S = k.shape[-2]
    q3, v3 = q[0], v[0]
    kt = k[0].transpose(1, 2)
    out = q.new_empty(H, T, v.shape[-1])
    main = torch.cuda.current_stream()
    side = _SIDE.setdefault(q.device, torch.cuda.Stream(q.device))
    bufs = [q.new_empty(heads, T, S) for _ in range(buffers)]
    starts = list(range(0, H, heads))
    done = {}

    def qk(i):
        h0 = starts[i]
        h1 = min(H, h0 + heads)
        b = bufs[i % buffers][: h1 - h0]
        torch.baddbmm(b, q3[h0:h1], kt[h0:h1], beta=0.0, alpha=1.0 if fold_scale else scale,
                      out=b)
        ev = torch.cuda.Event()
        ev.record(main)
        side.wait_event(ev)
        with torch.cuda.stream(side):
            row_softmax_(b, scale=scale if fold_scale else 1.0)
            done[i] = torch.cuda.Event()
            done[i].record(side)

    def pv(i):
        h0 = starts[i]
        h1 = min(H, h0 + heads)
        main.wait_event(done.pop(i))
        torch.bmm(bufs[i % buffers][: h1 - h0], v3[h0:h1], out=out[h0:h1])

    ahead = buffers - 1
    for i in range(min(ahead, len(starts))):
        qk(i)
    for i in range(len(starts)):
        if i + ahead < len(starts):
            qk(i + ahead)
        pv(i)
    return out.unsqueeze(0)


def blocks_core(q, k, v, scale, *, heads=1, rows=None, softmax="torch", fold_scale=False):
    """Blocks of `heads` heads x `rows` query rows (all rows when None)."""
    _, H, T, d = q.shape
    S = k.shape[-2]
    q3, k3, v3 = q[0], k[0], v[0]
    kt = k3.transpose(1, 2)
    out = q.new_empty(H, T, v.shape[-1])
    rows = rows or T
    for h0 in range(0, H, heads):
        h1 = min(H, h0 + heads)
        for r0 in range(0, T, rows):
            r1 = min(T, r0 + rows)
            if fold_scale:
                s = torch.bmm(q3[h0:h1, r0:r1], kt[h0:h1])
            else:
                s = torch.baddbmm(q3.new_empty(()).expand(h1 - h0, r1 - r0, S),
                                  q3[h0:h1, r0:r1], kt[h0:h1], beta=0.0, alpha=scale)
            if softmax == "torch":
                p = torch.softmax(s, dim=-1)
            else:
                p = row_softmax_(s, num_warps=softmax, scale=scale if fold_scale else 1.0)
            torch.bmm(p, v3[h0:h1], out=out[h0:h1, r0:r1])
    return out.unsqueeze(0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/core512_h200.json")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--groups", default="base,overlap,linear",
                   help="comma-separated row groups besides the two `explicit` rows: base "
                        "(the first sweep), overlap (side-stream softmax), linear (the model's "
                        "other ops at b = 1); `op` for none")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or triton is None:
        print("error: gpu_core512 needs a CUDA GPU and triton", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    H, T, S, d = (SHAPE[x] for x in ("H", "T", "S", "d"))
    gen = torch.Generator(device=dev).manual_seed(0)
    # (B, S, H, d) projections viewed as (B, H, S, d), as the model's q, k, v are
    q, k, v = (torch.randn(1, n, H, d, device=dev, dtype=torch.float16,
                           generator=gen).transpose(1, 2) for n in (T, S, S))
    scale = d ** -0.5
    flops = 4.0 * H * T * S * d
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = kernels_chunked._explicit(q[:, :2, :REF_ROWS].float(), k[:, :2].float(),
                                    v[:, :2].float(), None, False, scale,
                                    kernels_chunked.DEFAULT_CHUNK_BYTES).double()
    result = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
              "triton": triton.__version__, "python": platform.python_version(),
              "command": "python " + " ".join(sys.argv), "shape": SHAPE, "dtype": "float16",
              "iters": args.iters, "warmup": args.warmup, "rows": []}
    t0 = time.time()

    def record(name, fn, fl=flops, check=True, **extra):
        row = {"name": name, **extra}
        try:
            out = fn()
            torch.cuda.synchronize()
        except Exception as e:     # noqa: BLE001  (recorded)
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            print(f"{name:>22}: {row['error']}", flush=True)
            result["rows"].append(row)
            return
        if check:
            got = out[:, :2, :REF_ROWS].double()
            row["rel_error"] = relative_error(got, ref)
            row["nan"] = bool(out.isnan().any())
        del out
        sec = loop_seconds(fn, args.iters, args.warmup, dev)
        row.update(ms=sec * 1e3, tflops=fl / sec / 1e12)
        result["rows"].append(row)
        print(f"{name:>22}: {row['ms']:8.3f} ms {row['tflops']:6.1f} TFLOP/s"
              + (f"  rel err {row['rel_error']:.1e}" if check else ""), flush=True)
        torch.cuda.empty_cache()

    groups = set(args.groups.split(","))
    with torch.no_grad():
        def op():
            return torch.ops.helix.chunked_attention(q, k, v, None, False, scale,
                                                     kernels_chunked.DEFAULT_CHUNK_BYTES, 0)
        record("explicit", op, softmax="triton" if triton_softmax.fits(
            q.new_empty(1, S)) else "torch")
        triton_softmax.USE_TRITON = False
        try:
            record("explicit torch.softmax", op, softmax="torch")
        finally:
            triton_softmax.USE_TRITON = True
        if "overlap" in groups:
            record("fold_scale triton", lambda: blocks_core(q, k, v, scale, softmax=16,
                                                            fold_scale=True))
            for kw in (dict(), dict(fold_scale=True), dict(buffers=3), dict(heads=2),
                       dict(heads=2, buffers=3)):
                name = "overlap " + " ".join(f"{a}={b}" for a, b in kw.items())
                record(name, lambda kw=kw: overlapped_core(q, k, v, scale, **kw))
            from helix_compiler.measure.timing import cuda_graphed
            replay, why = cuda_graphed(lambda: overlapped_core(q, k, v, scale), dev)
            if replay is not None:
                record("overlap cuda graph", replay, check=False)
            else:
                result["overlap_graph_error"] = why
        if "linear" in groups:
            D, F = H * d, 4 * H * d
            x = torch.randn(1, T, D, device=dev, dtype=torch.float16, generator=gen)
            xf = torch.randn(1, T, F, device=dev, dtype=torch.float16, generator=gen)
            for name, inp, (i, o) in (("linear D->D", x, (D, D)), ("linear D->F", x, (D, F)),
                                      ("linear F->D", xf, (F, D))):
                w = torch.randn(o, i, device=dev, dtype=torch.float16, generator=gen) * 0.01
                bias = torch.zeros(o, device=dev, dtype=torch.float16)
                record(name, lambda inp=inp, w=w, bias=bias: torch.nn.functional.linear(
                    inp, w, bias), fl=2.0 * T * i * o, check=False)
            a = torch.randn(D * 8, D, device=dev, dtype=torch.float16, generator=gen)
            b8 = torch.randn(D, D, device=dev, dtype=torch.float16, generator=gen)
            record("mm 65536x8192x8192", lambda: a @ b8, fl=2.0 * D * 8 * D * D, check=False)
            b2 = torch.randn(D, D, device=dev, dtype=torch.float16, generator=gen)
            a2 = a[:D]
            record("mm 8192^3", lambda: a2 @ b2, fl=2.0 * D ** 3, check=False)
            ln = torch.nn.LayerNorm(D, device=dev, dtype=torch.float16)
            record("layernorm", lambda: ln(x), fl=1.0, check=False)
            record("gelu", lambda: torch.nn.functional.gelu(xf), fl=1.0, check=False)
            del x, xf, a, a2
            torch.cuda.empty_cache()
        if "base" in groups:
            # the three steps apart, 16 heads each, into preallocated buffers
            s_buf = torch.empty(1, T, S, device=dev, dtype=torch.float16)
            o_buf = torch.empty(1, T, d, device=dev, dtype=torch.float16)
            kt = k[0].transpose(1, 2)

            def qk():
                for h in range(H):
                    torch.baddbmm(s_buf, q[0, h:h + 1], kt[h:h + 1], beta=0.0, alpha=scale,
                                  out=s_buf)
                return s_buf
            record("qk", qk, fl=flops / 2, check=False)
            s_buf.normal_()

            def sm():
                for _ in range(H):
                    torch.softmax(s_buf, dim=-1)
                return s_buf
            record("softmax", sm, fl=flops, check=False)

            def sm_triton(w):
                def f():
                    for _ in range(H):
                        row_softmax_(s_buf, num_warps=w)
                    return s_buf
                return f
            for w in (8, 16, 32):
                record(f"softmax_triton_w{w}", sm_triton(w), fl=flops, check=False)
            s_buf.normal_().softmax(dim=-1)

            def pv():
                for h in range(H):
                    torch.bmm(s_buf, v[0, h:h + 1], out=o_buf)
                return o_buf
            record("pv", pv, fl=flops / 2, check=False)
            del s_buf, o_buf
            torch.cuda.empty_cache()

            record("blocks", lambda: blocks_core(q, k, v, scale))
            for w in (8, 16):
                record(f"triton_softmax_w{w}", lambda w=w: blocks_core(q, k, v, scale, softmax=w))
            record("heads=2", lambda: blocks_core(q, k, v, scale, heads=2))
            record("heads=2 triton", lambda: blocks_core(q, k, v, scale, heads=2, softmax=16))
            for r in (128, 256, 512, 1024, 2560):
                record(f"rows={r} triton", lambda r=r: blocks_core(q, k, v, scale, heads=H, rows=r,
                                                                   softmax=16))
            for r in (1024, 2560):
                record(f"heads=1 rows={r} triton", lambda r=r: blocks_core(q, k, v, scale, rows=r,
                                                                           softmax=16))
            if not args.no_compile:
                def plain(q, k, v):
                    outs = []
                    for h in range(H):
                        s = (q[0, h] @ k[0, h].transpose(0, 1)) * scale
                        outs.append(torch.softmax(s.float(), dim=-1).to(q.dtype) @ v[0, h])
                    return torch.stack(outs).unsqueeze(0)
                c0 = time.time()
                comp = torch.compile(plain)
                comp(q, k, v)
                result["compile_s"] = round(time.time() - c0, 1)
                record("compiled", lambda: comp(q, k, v))
    result["seconds"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
