"""The fused s > 1 chunk core (helix.chunk_attention, issue #15) on a GPU: exact, then timed.

    python benchmarks/gpu_chunk_core.py --out benchmarks/results/chunk_core_h200.json   # H100 / H200
    python benchmarks/gpu_chunk_core.py --small --out /tmp/chunk_core_small.json         # CPU smoke test

(a) the op on the device (CUDA: torch's memory-efficient SDPA kernel with its log-sum-exp) in
    fp32 against its explicit CPU math (helix_compiler/runtime/chunk_core.py), on a left-padded
    row (finfo.min mask), a fully padded row (finfo.min everywhere: a uniform softmax), a row
    with no visible key (-inf: out 0, lse -inf) and a partially -inf row; GQA g = 4; T = 1 and 3;
    C a multiple of 8 and not (the bias's rows padded to 8); relative error of out and lse;
(b) one HF LLaMA (GQA, sdpa and eager) prefill + decode steps through compile_decoder at
    s = 2 x n = 2, compiled on the CPU, every rank's modules moved to the device (program's
    on_device; the cache tensors re-shared between each rank's prefill and step), simulated,
    against the model on the CPU, fp32, batch 3 with a left-padded and a fully padded row;
(c) the chunk core of the LLaMA-70B s = 8 x n = 8 rank (h = 8 query heads over 1 kv head,
    d = 128, C = 131072 positions, fp16, B = 1, 2, 4): the explicit core seq_split builds for
    unequal chunks (fp32 scores + mask, row max and sum, PV, rescale from the gathered (max,
    sum)) against helix.chunk_attention + the lse rescale (the all-gather of s = 8 stats is
    not run: a tensor stands in), CUDA events, buffers rotated so that L2 holds none.

Prints each check; exits 1 if any of (a) or (b) exceeds its tolerance (fp32: 1e-5 relative),
writing the JSON to --out first. --small runs all three on the CPU at small sizes.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helix_compiler.runtime.chunk_core import chunk_attention_math  # noqa: E402

OP = torch.ops.helix.chunk_attention.default
TOL = 1e-5
ROTATION_BYTES = 512e6


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    if a.isnan().any() or b.isnan().any():
        return math.inf
    den = b.norm().item()
    return (a - b).norm().item() / den if den else (a - b).abs().max().item()


def check_op(dev: torch.device) -> list[dict]:
    """(a): the op on `dev` against its CPU math, fp32."""
    rows = []
    low = torch.finfo(torch.float32).min
    for B, H, Hkv, T, C, d in ((4, 8, 2, 1, 64, 128), (4, 8, 2, 3, 37, 64), (4, 8, 8, 1, 256, 128)):
        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, H, T, d, generator=g)
        k, v = torch.randn(B, Hkv, C, d, generator=g), torch.randn(B, Hkv, C, d, generator=g)
        bias = torch.zeros(B, 1, T, C)
        bias[0, ..., : C // 2] = low             # left-padded row
        bias[1] = low                            # fully padded row: uniform
        bias[2] = float("-inf")                  # no visible key: out 0, lse -inf
        bias[3, ..., C // 3:] = float("-inf")    # partially -inf
        want_o, want_l = chunk_attention_math(q, k, v, bias, d ** -0.5)
        got_o, got_l = OP(q.to(dev), k.to(dev), v.to(dev), bias.to(dev), d ** -0.5)
        got_o, got_l = got_o.cpu(), got_l.cpu()
        live = torch.ones(B, dtype=torch.bool)
        live[2] = False
        real = live.clone()
        real[1] = False          # the fully padded row's lse is ~ -1e30 (the op's floor): apart
        row = {"shape": dict(B=B, H=H, H_kv=Hkv, T=T, C=C, d=d),
               "out_rel": _rel(got_o[live], want_o[live]), "lse_rel": max(
                   _rel(got_l[real], want_l[real]), _rel(got_l[1], want_l[1])),
               "dead_out_zero": bool((got_o[2] == 0).all()),
               "dead_lse_-inf": bool((got_l[2] == float("-inf")).all()),
               "nan": bool(got_o.isnan().any())}
        row["ok"] = row["out_rel"] <= TOL and row["lse_rel"] <= TOL and row["dead_out_zero"] \
            and row["dead_lse_-inf"] and not row["nan"]
        print(f"(a) op {row['shape']}: out {row['out_rel']:.2e}, lse {row['lse_rel']:.2e}, dead row "
              f"0/-inf {row['dead_out_zero']}/{row['dead_lse_-inf']}: {'ok' if row['ok'] else 'FAIL'}")
        rows.append(row)
    return rows


def _to_device(prog, dev) -> None:
    """Every rank's prefill and step module on `dev`, the cache tensors shared again."""
    from helix_compiler.program import on_device
    for r, pair in enumerate(prog.modules):
        mine = {id(t): src for src, t in prog.caches[r].items()}
        names = [{n: mine[id(t)] for n, t in gm.named_buffers() if id(t) in mine} for gm in pair]
        for gm in pair:
            on_device(gm, dev)
        moved = {src: pair[0].get_buffer(n) for n, src in names[0].items()}
        for n, src in names[1].items():
            *path, leaf = n.split(".")
            owner = pair[1].get_submodule(".".join(path)) if path else pair[1]
            owner.register_buffer(leaf, moved[src])


def check_decode(dev: torch.device) -> list[dict]:
    """(b): HF LLaMA through compile_decoder at s = 2, simulated on `dev`."""
    from transformers import LlamaConfig

    from helix_compiler.decode import compile_decoder
    from helix_compiler.models.hf_static import hf_static_decoder
    rows = []
    B, S, P = 3, 32, 10
    for impl in ("sdpa", "eager"):
        config = LlamaConfig(num_hidden_layers=2, hidden_size=256, num_attention_heads=4, head_dim=64,
                             num_key_value_heads=2, intermediate_size=256, vocab_size=128,
                             max_position_embeddings=64, attn_implementation=impl)
        model, ref = hf_static_decoder(config, B, S, seed=0), hf_static_decoder(config, B, S, seed=0)
        g = torch.Generator().manual_seed(2)
        tokens = torch.randint(0, 128, (B, P), generator=g)
        valid = torch.ones(B, S, dtype=torch.long)
        valid[1, :3] = 0
        valid[2, :P] = 0
        prog = compile_decoder(model, 4, (2, 1, 2), prompt_len=P)
        fused = sum("; fused core (" in x for x in prog.combine_notes)
        _to_device(prog, dev)
        errs = []
        with torch.no_grad():
            want = ref.prefill(tokens, valid)
            outs = prog.prefill(tokens.to(dev), valid.to(dev))
            errs += [_rel(o, want) for o in outs]
            tok = want[:, -1].argmax(-1, keepdim=True)
            for pos in range(P, P + 4):
                want = ref.decode_step(tok, torch.tensor([pos]), valid)
                outs = prog.step(tok.to(dev), torch.tensor([pos], device=dev), valid.to(dev))
                errs += [_rel(o, want) for o in outs]
                tok = want[:, -1].argmax(-1, keepdim=True)
        row = {"impl": impl, "fused_cores": fused, "cores": len(prog.combine_notes),
               "max_rel": max(errs)}
        row["ok"] = row["max_rel"] <= TOL and fused == len(prog.combine_notes)
        print(f"(b) HF LLaMA {impl} s=2 n=2 on {dev}: {fused}/{len(prog.combine_notes)} cores fused, "
              f"max relative error {row['max_rel']:.2e} over ranks, prefill and 4 steps: "
              f"{'ok' if row['ok'] else 'FAIL'}")
        rows.append(row)
    return rows


def _explicit_core(q, k, v, bias, every, scale):
    """seq_split's explicit chunk core and (max, sum) rescale (GQA folded: q (B, 1, g, d))."""
    x = (q @ k.transpose(-1, -2)).float() * scale + bias
    mk = x.amax(-1, keepdim=True).clamp(torch.finfo(torch.float32).min)
    e = torch.exp(x - mk)
    lk = e.sum(-1, keepdim=True)
    o = e.to(v.dtype) @ v
    ms, ls = every[..., 0:1], every[..., 1:2]
    w = torch.exp(ms - ms.amax(0, keepdim=True))
    return o * (w[-1] / (ls * w).sum(0)).to(o.dtype), torch.cat([mk, lk], -1)


def _fused_core(q, k, v, bias, every, scale):
    """helix.chunk_attention and the lse rescale seq_split builds for equal chunks."""
    o, lse = OP(q, k, v, bias, scale)
    top = every.amax(0, keepdim=True).clamp(torch.finfo(torch.float32).min)
    w = torch.exp(every - top)
    return o * (w[-1] / w.sum(0)).unsqueeze(-1).to(o.dtype), lse


def time_cores(dev, small: bool, iters: int, warmup: int) -> list[dict]:
    """(c): explicit vs fused chunk core, per call."""
    from benchmarks.gpu_decode import _graphed, _time
    h, hkv, d, C, s = (8, 1, 128, 131072, 8) if not small else (8, 1, 64, 256, 2)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    rows = []
    for B in (1, 2, 4):
        gen = torch.Generator(device=dev).manual_seed(0)
        per_set = 2 * B * hkv * C * d * torch.finfo(dtype).bits // 8
        sets = max(2, math.ceil(ROTATION_BYTES / per_set)) if dev.type == "cuda" else 2
        kv = [(torch.randn(B, hkv, C, d, device=dev, dtype=dtype, generator=gen),
               torch.randn(B, hkv, C, d, device=dev, dtype=dtype, generator=gen)) for _ in range(sets)]
        q = torch.randn(B, hkv, h // hkv, d, device=dev, dtype=dtype, generator=gen)   # GQA folded
        q4 = q.view(B, h, 1, d)
        bias = torch.zeros(B, 1, 1, C, device=dev, dtype=dtype)
        every = torch.randn(s, B, hkv, h // hkv, 2, device=dev, generator=gen)
        every[..., 1].abs_().add_(1.0)
        lse_every = torch.randn(s, B, h, 1, device=dev, generator=gen)
        scale = d ** -0.5

        def explicit():
            for k, v in kv:
                _explicit_core(q, k, v, bias.view(B, 1, 1, C).float(), every, scale)

        def fused():
            for k, v in kv:
                _fused_core(q4, k, v, bias, lse_every, scale)

        out = {"B": B, "C": C, "h": h, "h_kv": hkv, "d": d, "dtype": str(dtype), "sets": sets}
        with torch.no_grad():
            for name, fn in (("explicit", explicit), ("fused", fused)):
                graphed = _graphed(fn, dev)
                t = _time(graphed or fn, iters, warmup, dev)
                out[f"{name}_ms"] = t / sets * 1e3
                out[f"{name}_cuda_graph"] = graphed is not None
        print(f"(c) B={B} C={C} h={h}/{hkv} d={d} {dtype}: explicit {out['explicit_ms']:.3f} ms, "
              f"fused {out['fused_ms']:.3f} ms per chunk core")
        rows.append(out)
        del kv
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--small", action="store_true", help="CPU, small sizes: a smoke test")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args(argv)
    dev = torch.device("cpu" if args.small or not torch.cuda.is_available() else "cuda")
    if dev.type == "cpu" and not args.small:
        print("no CUDA device: pass --small for the CPU smoke test")
        return 2
    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "small": args.small}
    res["op"] = check_op(dev)
    res["decode"] = check_decode(dev)
    res["timing"] = time_cores(dev, args.small, 3 if args.small else args.iters,
                               1 if args.small else args.warmup)
    res["ok"] = all(r["ok"] for r in res["op"] + res["decode"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"{'ok' if res['ok'] else 'FAIL'}; wrote {args.out}")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
