"""The decode step of the rank module compile_decoder builds, timed on one GPU, next to
gpu_decode.py's hand-written mirror of the same plan (issue 15).

    python benchmarks/gpu_decode_compiled.py --out benchmarks/results/decode_compiled_h200.json
    python benchmarks/gpu_decode_compiled.py --small --out /tmp/decode_compiled_small.json   # CPU

Default plans (N = 64, LLaMA-GQA: 64 heads / 8 kv heads, d 128, D 8192, F 28672, vocab 128256,
fp16; decode_plan.llama70b_shape):

    C = 131072,  B = 8:  s=8 x m=1 x n=8,  s=1 x m=1 x n=64 (TP, kv heads copied 8 times)
    C = 1048576, B = 1:  s=8 x m=1 x n=8,  s=1 x m=1 x n=64 (TP)

(`--plans "8,1,8;1,1,64;8,2,4:score-reduce"` and `--configs "131072:8,1048576:1"` change them).

What is timed is the path `helix generate` runs, not a copy of it: a Hugging Face
LlamaForCausalLM (transformers' eager model, SDPA attention) of k layers (`--ks`, default 2
and 6) over models/hf_static.HFStaticCacheDecoder (a StaticCache of B rows and C positions),
compiled by `compile_decoder(model, 64, split=(s, m, n), rank=r)` for the rank r that owns
the new token's cache position C - 1 (chunk s - 1 of head group 0, dim slice 0: r = s - 1),
its (prefill, step) modules moved to the GPU as cli/generate.py moves them (pair_on_device),
and its decode-step GraphModule called at cache position C - 1 with its collectives bound to
helix_compiler.measure.stub.StubCollectives(prog.mesh): they move nothing and make the local
copies the real (NCCL) path makes. HF rather than models/decoder_cache.CacheDecoder because
it is what users run (its rotary, mask and SDPA call are in the graph).

The model is built without filling memory: under helix_compiler.empty_weights, then every
parameter and cache buffer is given CPU storage that is allocated but never written
(torch.empty: the pages are not touched, so a 1M-position cache costs no RAM), compiled, and
only rank r's slices (which the shard pass copies out) are moved to the GPU and filled there:
weights ~ N(0, 0.02) (HF's init), 1-D weights (RMSNorm) 1, cache slices ~ N(0, 1); the rotary
inv_freq is HF's own. The step's output (B, 1, vocab) is checked finite.

Per layer: the step of k1 and k2 layers is timed (CUDA events around `--iters` replays after
`--warmup`, the step captured as one CUDA graph after warm-up calls, so the stub's one-time
buffers are not captured; eager if capture fails, recorded as "cuda_graph": false);
per layer = (T(k2) - T(k1)) / (k2 - k1); measured compute = T(k1) + (80 - k1) x per layer
(T(k1) holds the embedding lookup, the final norm and the replicated LM head, which every step
runs once). Each timed step reads the 2.1 GB LM head, so no layer's weights stay in the 50 MB
L2 between replays. measured TPOT = measured compute + the planner's modeled communication
for that row (decode_plan.plan_decode on this GPU's cluster spec, as gpu_decode.py). In the
same process gpu_decode.measure_row (+ measure_replicated, the LM head) times the mirror of
the same row: "mirror_*" fields.

Why k = 2, 6 and 100 replays (until 2026-12-02's sixth session: k = 1, 2 and 20): the
difference of one layer is ~0.1-0.2 ms between two ~0.7-1 ms steps, and repeated runs of it
on the H200 moved a layer's figure by up to 50% (TP=64 at 128k x 8: 0.25 then 0.33 ms;
results/decode_compiled_h200_tp64_k12_inductor.json); four layers apart and 100 replays, the
figures settle (results/decode_compiled_h200_tp*_k26.json). Each layer adds to the prefill's
and the step's compile (a few seconds a plan here). Before 5543c5d the prefill's
find_attention materialized float32 tag tensors of the repeated cache (about 2 x B x H x C x
d x 4 bytes of host RAM per attention layer: ~68 GB at B C = 1M); its tags now stay
broadcast over the positions. Each plan prints its build and wall time.

--small: a tiny fp32 LLaMA (gpu_decode.SMALL's dims, 2 layers, vocab 512) on the CPU, N = 8,
plans s=2 x m=1 x n=4 and s=1 x m=1 x n=8, C = 64, B = 2, k = 1, 2, eager: a smoke test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_decode  # noqa: E402  (the mirror: same-run comparison)

from helix_compiler import empty_weights  # noqa: E402
from helix_compiler.decode import SPLIT_KV_CORE, compile_decoder  # noqa: E402
from helix_compiler.errors import HelixError  # noqa: E402
from helix_compiler.numerics import relative_error  # noqa: E402
from helix_compiler.measure.profiling import kernel_table  # noqa: E402
from helix_compiler.measure.timing import cuda_graphed  # noqa: E402
from helix_compiler.measure.stub import StubCollectives, stubbed  # noqa: E402
from helix_compiler.cli.generate import pair_on_device  # noqa: E402
from helix_compiler.models.hf_static import HFStaticCacheDecoder  # noqa: E402
from helix_compiler.planning.decode_plan import LLAMA70B_VOCAB, llama70b_shape, plan_decode  # noqa: E402
from helix_compiler.planning.profile import DEFAULT_PROFILE  # noqa: E402
from passes.seq_split import chunk_bounds  # noqa: E402

DEFAULT_PLANS = "8,1,8;1,1,64"
DEFAULT_CONFIGS = "131072:8,1048576:1"
INDUCTOR_TOP = 40     # kernels kept of a compiled step's profile (--inductor --profile)
SMALL_VOCAB = 512
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True, slots=True)
class PlanSpec:
    s: int
    m: int
    n: int
    variant: str | None = None      # m > 1: "score-reduce" or "qk-gather"

    @property
    def name(self) -> str:
        base = f"s={self.s} x m={self.m} x n={self.n}"
        return base if self.variant is None else f"{base} {self.variant}"


def parse_plans(text: str, devices: int) -> list[PlanSpec]:
    """"s,m,n[:variant];..." -> PlanSpecs, each checked against `devices`."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(";"))):
        split, _, variant = item.partition(":")
        try:
            s, m, n = (int(x) for x in split.split(","))
        except ValueError:
            raise HelixError(f"--plans item {item!r}: give s,m,n or s,m,n:variant, e.g. "
                             f"8,1,8 or 8,2,4:score-reduce") from None
        if s * m * n != devices:
            raise HelixError(f"--plans item {item!r}: s x m x n = {s * m * n}, but --devices is "
                             f"{devices}; give a split whose product is {devices}")
        if (m > 1) != bool(variant):
            raise HelixError(f"--plans item {item!r}: an m > 1 split needs a variant "
                             f"(:score-reduce or :qk-gather) and an m = 1 split none")
        out.append(PlanSpec(s, m, n, variant or None))
    return out


def llama_config(shape, vocab: int, layers: int):
    """The LlamaConfig of DecodeShape `shape` with `layers` layers (SDPA, cache on)."""
    from transformers import LlamaConfig

    return LlamaConfig(num_hidden_layers=layers, hidden_size=shape.hidden,
                       num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                       head_dim=shape.head_dim, intermediate_size=shape.ffn, vocab_size=vocab,
                       max_position_embeddings=1 << 21, attn_implementation="sdpa",
                       use_cache=True)


def lazy_decoder(config, batch: int, max_seq: int, dtype) -> HFStaticCacheDecoder:
    """HF's causal LM of `config` over a StaticCache of `batch` x `max_seq`, whose parameters and
    cache buffers are CPU tensors allocated but never written (torch.empty: untouched pages use
    no RAM), so a model of a 1M-position cache compiles on a small host. Only the slices a rank
    module copies out are ever read (the values are filled on the device: fill_rank)."""
    from transformers import AutoModelForCausalLM

    with empty_weights():                      # parameters on meta, buffers (inv_freq) real
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model = HFStaticCacheDecoder(hf, batch, max_seq)     # its cache on meta (the parameters')
    done: dict = {}
    for mod in hf.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in done:                # tied weights stay tied
                done[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                 requires_grad=False)
            mod._parameters[name] = done[id(p)]
    for i, layer in enumerate(model.static_cache.layers):
        layer.keys = torch.empty(layer.keys.shape, dtype=layer.keys.dtype)
        layer.values = torch.empty(layer.values.shape, dtype=layer.values.dtype)
        layer.device = torch.device("cpu")
        layer.cumulative_length = torch.zeros((), dtype=torch.long)
        model.register_buffer(f"key_cache_{i}", layer.keys, persistent=False)
        model.register_buffer(f"value_cache_{i}", layer.values, persistent=False)
    return model


def owner(C: int, s: int) -> tuple[int, int]:
    """(rank, position): the rank that owns cache position C - 1 (chunk s - 1 of head group
    0, dim slice 0: rank (i m + j) s + k = s - 1) and that position."""
    pos = C - 1
    k = next(k for k, (a, b) in enumerate(chunk_bounds(C, s)) if a <= pos < b)
    return k, pos


@torch.no_grad()
def fill_rank(prog, rank: int, seed: int = 0) -> dict:
    """Rank `rank`'s tensors (on its device) given values: its cache slices ~ N(0, 1), 1-D
    floating weights (RMSNorm) 1, other floating weights ~ N(0, 0.02); the rotary inv_freq and
    integer index constants are left as they are. Returns the counts per rule."""
    gen_dev = next(iter(prog.caches[rank].values())).device
    gen = torch.Generator(device=gen_dev).manual_seed(seed)
    caches = {id(t) for t in prog.caches[rank].values()}
    seen, counts = set(), {"cache": 0, "norm": 0, "weight": 0, "kept": 0}
    for gm in prog.modules[rank]:
        for name, t in list(gm.named_parameters()) + list(gm.named_buffers()):
            if id(t) in seen:
                continue
            seen.add(id(t))
            if id(t) in caches:
                t.normal_(0.0, 1.0, generator=gen)
                counts["cache"] += 1
            elif not t.is_floating_point() or "inv_freq" in name:
                counts["kept"] += 1
            elif t.dim() == 1:
                t.fill_(1.0)
                counts["norm"] += 1
            else:
                t.normal_(0.0, 0.02, generator=gen)
                counts["weight"] += 1
    return counts


def rank_step(model, devices: int, plan: PlanSpec, C: int, dev, fuse: bool = True,
              split_kv: bool | None = None) -> tuple:
    """compile_decoder's program for `plan`, built for the rank owning position C - 1 only, its
    modules on `dev` and filled: (prog, rank, step module, step args, seconds to build).
    `fuse`, `split_kv`: compile_decoder's fuse_projections and split_kv_core (s = 1 only)."""
    t0 = time.perf_counter()
    rank, pos = owner(C, plan.s)
    prog = compile_decoder(model, devices, (plan.s, plan.m, plan.n), variant=plan.variant,
                           rank=rank, fuse_projections=fuse,
                           split_kv_core=split_kv if plan.s == 1 else False)
    pair_on_device(prog, rank, dev)
    fill_rank(prog, rank)
    B = model.cfg.batch
    token = torch.arange(B, device=dev).remainder(model.cfg.vocab).view(B, 1)
    valid = torch.ones(B, C, dtype=torch.long, device=dev)
    if B >= 2:
        valid[1, :C // 4] = 0                  # a left-padded row, as a server batches them
    args = (token, torch.tensor([pos], device=dev), valid)
    return prog, rank, prog.modules[rank][1], args, time.perf_counter() - t0


@torch.no_grad()
def time_step(prog, step, args, dev, iters: int, warmup: int) -> dict:
    """ms per call of the stubbed step (CUDA graph when it captures), eager ms, and whether the
    output is finite and its shape."""
    stub = StubCollectives(prog.mesh)
    with stubbed(stub):
        out = step(*args)
        finite = bool(torch.isfinite(out).all())
        t_eager = gpu_decode._time(lambda: step(*args), iters, warmup, dev)
        replay, why = cuda_graphed(lambda: step(*args), dev)
        t = gpu_decode._time(replay, iters, warmup, dev) if replay is not None else t_eager
    return {"ms": t * 1e3, "eager_ms": t_eager * 1e3, "cuda_graph": replay is not None,
            "cuda_graph_error": why if dev.type == "cuda" else None,
            "out_shape": list(out.shape), "finite": finite}


@torch.no_grad()
def time_inductor(prog, step, args, dev, iters: int, warmup: int, mode: str = "default",
                  profile: bool = False) -> dict:
    """The same step module under torch.compile (inductor in `mode`: its elementwise ops fused
    into generated kernels, and with "max-autotune-no-cudagraphs" each matmul's kernel chosen
    by timing cuBLAS against inductor's Triton templates; the helix ops stay opaque calls),
    timed as time_step times the step (as one CUDA graph of ours), its output checked against
    the uncompiled step's; `profile`: also its kernels (torch.profiler, "kernels", the
    INDUCTOR_TOP largest), the generated ones among them."""
    t0 = time.perf_counter()
    compiled = torch.compile(step, dynamic=False, mode=mode)
    stub = StubCollectives(prog.mesh)
    try:
        with stubbed(stub):
            want = step(*args).float()
            got = compiled(*args).float()        # compiles here
        compile_s = round(time.perf_counter() - t0, 1)
        # the step wrote its cache position twice more; the value written is the same each time
        rel = relative_error(got, want)
        out = time_step(prog, compiled, args, dev, iters, warmup)
        if profile and dev.type == "cuda":
            with stubbed(stub):
                out["kernels"] = kernel_table(lambda: compiled(*args), INDUCTOR_TOP)
    except Exception as e:  # noqa: BLE001  (recorded in the row; the run goes on)
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:400] if str(e) else ''}",
                "detail": str(e)[:3000], "traceback": traceback.format_exc(limit=-8)[-3000:]}
    finally:
        torch._dynamo.reset()
    return {**out, "compile_s": compile_s, "max_rel_vs_step": rel}


@torch.no_grad()
def kernel_profile(prog, step, args, top: int = 12) -> list:
    """The step's kernels by device time per call (torch.profiler over 3 eager calls after the
    timing): [{name, us_per_call, calls_per_step}], the `top` largest."""
    with stubbed(StubCollectives(prog.mesh)):
        return kernel_table(lambda: step(*args), top)


def step_facts(prog, rank: int, step) -> dict:
    """What makes the timed module the compiled rank module: its helix collectives (by kind and
    axes) and its cache slices' shapes."""
    colls: dict = {}
    fused = 0
    for node in step.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "namespace", None) != "helix":
            continue
        if node.target._opname == "chunk_attention":     # the fused s > 1 chunk core
            fused += 1
            continue
        key = f"{node.target._opname}:{node.args[1]}"
        colls[key] = colls.get(key, 0) + 1
    linears = sum(1 for n in step.graph.nodes if n.target is torch.ops.aten.linear.default)
    return {"collectives": colls, "fused_chunk_cores": fused, "linears": linears,
            "fused_projection_groups": len(prog.fuse_notes), "core_notes": list(prog.core_notes),
            "cache_slice_shapes": sorted({tuple(t.shape) for t in prog.caches[rank].values()}),
            "cache_bytes": prog.cache_bytes(rank)}


def _plan_row(shape, C, B, devices, cluster, plan: PlanSpec):
    rows = plan_decode(shape, C, B, devices, cluster, DEFAULT_PROFILE, dp=1).candidates
    want = plan.variant or "heads"
    return next((r for r in rows if (r.dp, r.s, r.m, r.n) == (1, plan.s, plan.m, plan.n)
                 and (r.m == 1 or r.variant == want)), None)


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/decode_compiled_h200.json")
    p.add_argument("--small", action="store_true",
                   help="a tiny fp32 LLaMA on the CPU (smoke test: seconds)")
    p.add_argument("--plans", default=None, help=f"s,m,n[:variant];... (default {DEFAULT_PLANS})")
    p.add_argument("--configs", default=None, help=f"C:B,... (default {DEFAULT_CONFIGS})")
    p.add_argument("--ks", default=None, help="two layer counts k1,k2 (default 2,6)")
    p.add_argument("--devices", type=int, default=None, help="N (default 64; --small 8)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--inductor", action="store_true",
                   help="also time each step module under torch.compile (inductor)")
    p.add_argument("--inductor-mode", default="default",
                   choices=("default", "max-autotune-no-cudagraphs"),
                   help="torch.compile's mode for --inductor (the CUDA graph is ours either way)")
    p.add_argument("--profile", action="store_true",
                   help="also record each step's largest kernels (torch.profiler, CUDA only; with "
                        "--inductor, the compiled step's as well)")
    p.add_argument("--no-fuse", action="store_true",
                   help="build the steps with compile_decoder(fuse_projections=False): q/k/v and "
                        "gate/up as separate GEMMs")
    p.add_argument("--split-kv-core", choices=tuple(SPLIT_KV_CORE), default="auto",
                   help="s = 1 rows: compile_decoder's split_kv_core: on (each step core over the "
                        "cache as helix.chunk_attention), off (SDPA), auto (its default: where "
                        "measured faster). Files before the ninth session's are SDPA unless "
                        "they say split_kv_core true")
    p.add_argument("--no-mirror", action="store_true",
                   help="skip gpu_decode.measure_row's mirror of each row")
    args = p.parse_args(argv)
    t_start = time.time()
    if not args.small and not torch.cuda.is_available():
        raise HelixError("gpu_decode_compiled: no CUDA device (torch.cuda.is_available() is "
                         "False); run on a GPU host, or pass --small for the CPU smoke test")
    dev = torch.device("cpu" if args.small else "cuda")
    shape = gpu_decode.SMALL if args.small else llama70b_shape()
    vocab = SMALL_VOCAB if args.small else LLAMA70B_VOCAB
    dtype = DTYPES[shape.dtype]
    devices = args.devices or (8 if args.small else 64)
    plans = parse_plans(args.plans or ("2,1,4;1,1,8" if args.small else DEFAULT_PLANS), devices)
    configs = [tuple(int(x) for x in c.split(":"))
               for c in (args.configs or ("64:2" if args.small else DEFAULT_CONFIGS)).split(",")]
    k1, k2 = (int(x) for x in (args.ks or ("1,2" if args.small else "2,6")).split(","))
    if not 1 <= k1 < k2 <= shape.layers:
        raise HelixError(f"--ks {k1},{k2}: give two layer counts 1 <= k1 < k2 <= {shape.layers}")
    iters = args.iters or (2 if args.small else 100)
    warmup = args.warmup or (1 if args.small else 20)
    cluster = gpu_decode._cluster(None, devices, dev)
    L = shape.layers
    result = {"what": "decode step of compile_decoder's rank module (HF LLaMA over a StaticCache, "
                      "k layers) timed on this device with StubCollectives; communication modeled "
                      "(the planner's figure for the row); mirror_*: gpu_decode.measure_row's "
                      "hand-written step of the same row, same run",
              "device": torch.cuda.get_device_name(dev) if dev.type == "cuda"
              else platform.processor() or "cpu",
              "torch": torch.__version__, "transformers": __import__("transformers").__version__,
              "command": "python " + " ".join(sys.argv), "git_commit": _commit(),
              "shape": dataclasses.asdict(shape), "vocab": vocab, "devices": devices,
              "cluster": dataclasses.asdict(cluster), "profile": DEFAULT_PROFILE.name,
              "ks": [k1, k2], "iters": iters, "warmup": warmup,
              "inductor_mode": args.inductor_mode if args.inductor else None,
              "fuse_projections": not args.no_fuse, "split_kv_core": args.split_kv_core,
              "per_layer": "(T(k2) - T(k1)) / (k2 - k1); compute = T(k1) + (L - k1) x per layer",
              "results": []}
    for C, B in configs:
        timed: dict = {}                       # (plan, k) -> time_step dict + facts
        for k in (k1, k2):
            t0 = time.perf_counter()
            model = lazy_decoder(llama_config(shape, vocab, k), B, C, dtype)
            print(f"C={C} B={B} k={k}: model built in {time.perf_counter() - t0:.1f} s", flush=True)
            for plan in plans:
                t1 = time.perf_counter()
                try:
                    prog, rank, step, step_args, build_s = rank_step(model, devices, plan, C, dev,
                                                                     fuse=not args.no_fuse,
                                                                     split_kv=SPLIT_KV_CORE[args.split_kv_core])
                    got = time_step(prog, step, step_args, dev, iters, warmup)
                    got.update(step_facts(prog, rank, step), rank=rank, position=C - 1,
                               build_s=round(build_s, 1))
                    if args.inductor:
                        got["inductor"] = time_inductor(prog, step, step_args, dev, iters, warmup,
                                                        args.inductor_mode, args.profile)
                        ind = got["inductor"]
                        print("    torch.compile: " + (ind.get("error") or
                              f"{ind['ms']:.3f} ms (cuda graph {ind['cuda_graph']}, compile "
                              f"{ind['compile_s']} s, max rel vs the step {ind['max_rel_vs_step']:.1e})"),
                              flush=True)
                    if args.profile and dev.type == "cuda":
                        got["kernels"] = kernel_profile(prog, step, step_args)
                        print("    " + "; ".join(f"{r['name'][:60]} {r['us_per_call']} us x{r['calls_per_step']:g}"
                                                 for r in got["kernels"]), flush=True)
                    del prog, step, step_args
                except (HelixError, RuntimeError) as e:
                    got = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:400]}"}
                got["wall_s"] = round(time.perf_counter() - t1, 1)
                timed[(plan, k)] = got
                print(f"  {plan.name} k={k}: " + (got.get("error") or
                      f"{got['ms']:.3f} ms (eager {got['eager_ms']:.3f}, cuda graph "
                      f"{got['cuda_graph']}, finite {got['finite']}), build {got['build_s']} s") +
                      f", wall {got['wall_s']} s", flush=True)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            del model
        for plan in plans:
            a, b = timed[(plan, k1)], timed[(plan, k2)]
            row = _plan_row(shape, C, B, devices, cluster, plan)
            out = {"split": [plan.s, plan.m, plan.n], "name": plan.name,
                   "variant": plan.variant or "heads", "context": C, "concurrency": B,
                   "ks": [k1, k2], f"k{k1}": a, f"k{k2}": b,
                   "modeled_comm_ms": row.comm_ms if row else None,
                   "predicted_compute_ms": row.compute_ms if row else None,
                   "predicted_tpot_ms": row.tpot_ms if row else None,
                   "fits": row.fits if row else None}
            if "error" not in a and "error" not in b:
                per_layer = (b["ms"] - a["ms"]) / (k2 - k1)
                compute = a["ms"] + (L - k1) * per_layer
                out.update(measured_layer_ms=per_layer, measured_compute_ms=compute,
                           cuda_graph=a["cuda_graph"] and b["cuda_graph"],
                           finite=a["finite"] and b["finite"])
                if row:
                    out["measured_tpot_ms"] = compute + row.comm_ms
                ia, ib = a.get("inductor") or {}, b.get("inductor") or {}
                if "ms" in ia and "ms" in ib:
                    il = (ib["ms"] - ia["ms"]) / (k2 - k1)
                    out.update(inductor_layer_ms=il, inductor_compute_ms=ia["ms"] + (L - k1) * il)
                    if row:
                        out["inductor_tpot_ms"] = out["inductor_compute_ms"] + row.comm_ms
            if row and not args.no_mirror:
                t1 = time.perf_counter()
                mir = gpu_decode.measure_row(shape, C, B, row, dev, dtype, iters, warmup)
                rep = gpu_decode.measure_replicated(shape, B, dev, dtype, iters, warmup)
                out.update(mirror_layer_ms=mir["measured_layer_ms"],
                           mirror_compute_ms=mir["measured_compute_ms"] + rep,
                           mirror_lm_head_ms=rep, mirror_cuda_graph=mir["cuda_graph"],
                           mirror_tpot_ms=mir["measured_compute_ms"] + rep + row.comm_ms,
                           mirror_wall_s=round(time.perf_counter() - t1, 1))
                if "measured_layer_ms" in out:
                    out["compiled_over_mirror_layer"] = out["measured_layer_ms"] / mir["measured_layer_ms"]
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            result["results"].append(out)
            # written after each row: a run stopped by a time limit keeps what it measured
            result["seconds"] = round(time.time() - t_start, 1)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1, default=list) + "\n")
            print(f"C={C} B={B} {plan.name}: per layer {out.get('measured_layer_ms', math.nan):.4f} ms"
                  f" (mirror {out.get('mirror_layer_ms', math.nan):.4f}), TPOT "
                  f"{out.get('measured_tpot_ms', math.nan):.2f} ms (mirror "
                  f"{out.get('mirror_tpot_ms', math.nan):.2f}, predicted "
                  f"{out.get('predicted_tpot_ms') or math.nan:.2f})", flush=True)
    result["seconds"] = round(time.time() - t_start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=list) + "\n")
    print(f"wrote {args.out} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
