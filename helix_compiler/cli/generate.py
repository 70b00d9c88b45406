"""Greedy generation on real process groups: one rank of a DecodeProgram per torchrun process
(`helix generate`, docs/decode.md "Generating under torchrun").

    python -m torch.distributed.run --standalone --nproc-per-node N \\
        -m helix_compiler.cli.generate MODEL --plan S,M,N [--dp K] --prompt-len P --new-tokens T [...]

With --dp K the N processes are K replicas of N / K ranks (rank = replica * N / K + local
rank): replica d serves rows d B/K ... of the batch with its own DecodeProgram, compiled from
decode.replica_model (the same weights, a cache of B / K rows).

MODEL is a spec (modelspec.py) whose function returns a CacheDecoder-style model first
(`prefill(tokens, valid)`, `decode_step(token, cache_position, valid)`, `reset_cache()`, a
`cfg` with batch and max_seq; models/decoder_cache.py); its example inputs are not used. Or
MODEL is a Hugging Face model directory (config.json, hf_dir.py): its causal LM is built from
the config with seeded random weights (or read whole from --weights, a safetensors directory
or state_dict file, with runtime/weights.open_checkpoint as `helix run`'s reference reads it)
and wrapped in models/hf_static.HFStaticCacheDecoder with a cache of --batch rows (default 4)
and P + T positions; the reference is then Hugging Face's own greedy `generate`. A
DecodeProgram is not saved, so every process seeds torch, builds the model and compiles the
same program (compilation is deterministic; the ranks compare a digest of their weights
first), then runs its own rank: prefill of the prompt, then T - 1 decode steps, each with its
own cache slice. Every rank picks the same token (all hold the full logits); rank 0 checks that
all ranks' tokens agree and equal the unsharded model's greedy tokens (fp32; a Hugging Face
model: its `generate`'s) and prints them
with the time per output token (the decode steps' mean, slowest rank).

The prompt (`make_prompt`) is B rows of P seeded random tokens as a server batches them: row 1
left-padded by P // 2, and with B >= 3 the last row all padding (a Hugging Face model: one
real token, since HF's `generate` is ill-defined on a row with none; models/hf_static.py).

A rank that fails writes `rank{R}.error.json` into --result-dir, one that finishes
`rank{R}.done` (as helix_compiler/cli/worker.py), so `helix generate` can say which rank failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..decode import SPLIT_KV_CORE, compile_decoder, plan_split, replica_model
from ..errors import HelixError
from ..hf_dir import is_hf_dir, load_hf_dir
from ..modelspec import load_model_spec
from ..models.decoder_cache import greedy_generate
from ..models.hf_static import HFStaticCacheDecoder, hf_generate
from ..runtime import collectives
from ..runtime.collectives import DistributedBackend
from ..runtime.compiled import COMPILE_MODES, compiled
from ..runtime.graphs import on_device
from ..runtime.weights import open_checkpoint
from .worker import check_same_program, rank_main, weights_digest

__all__ = ["GenerateSplit", "load_decoder", "check_request", "choose_split", "make_prompt",
           "generate_rank", "DEFAULT_MODEL"]

DEFAULT_MODEL = "helix_compiler.models.decoder_cache:helix_model"
DEFAULT_HF_BATCH = 4          # a Hugging Face model's cache rows: rows 1 and B - 1 padded, two full
DECODER_METHODS = ("prefill", "decode_step", "reset_cache")
VARIANTS = ("score-reduce", "qk-gather")


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerateSplit:
    """The split a generation runs and why it was chosen."""

    s: int
    m: int
    n: int
    variant: str | None        # None for m = 1
    reason: str
    dp: int = 1                # replicas, each s x m x n ranks serving batch / dp rows

    @property
    def name(self) -> str:
        base = f"s={self.s} x m={self.m} x n={self.n}"
        base = base if self.variant is None else f"{base} {self.variant}"
        return base if self.dp == 1 else f"dp={self.dp} x {base}"

    @property
    def split(self) -> tuple[int, int, int]:
        return (self.s, self.m, self.n)


def load_decoder(spec: str, *, batch: int | None = None, max_seq: int | None = None,
                 weights: str | None = None) -> torch.nn.Module:
    """The model of MODEL spec `spec` (random weights, float32, eval), checked to be a
    CacheDecoder-style decoder. A Hugging Face model directory: its causal LM (random weights
    from the caller's seed, or `weights` read whole) over a static cache of `batch` rows
    (default 4) and `max_seq` positions (models/hf_static.py)."""

    if is_hf_dir(spec):
        return _hf_decoder(spec, batch or DEFAULT_HF_BATCH, max_seq, weights)
    for flag, value in (("--batch", batch), ("--weights", weights)):
        if value is not None:
            raise HelixError(f"{flag} applies to a Hugging Face model directory; model spec "
                             f"{spec!r} builds its own decoder (batch and weights): drop {flag}")
    model, _, _ = load_model_spec(spec, init="random")
    missing = [a for a in DECODER_METHODS if not callable(getattr(model, a, None))]
    cfg = getattr(model, "cfg", None)
    if missing or not all(isinstance(getattr(cfg, a, None), int) for a in ("batch", "max_seq")):
        what = (f"no method {', '.join(missing)}" if missing else
                "no cfg with integer batch and max_seq")
        raise HelixError(f"model spec {spec!r}: {type(model).__name__} is not a static-cache "
                         f"decoder ({what}); helix generate takes a model like "
                         f"helix_compiler/models/decoder_cache.py's CacheDecoder")
    return model.float().eval()


def _hf_decoder(spec: str, batch: int, max_seq: int | None, weights: str | None):
    hf, _, _ = load_hf_dir(spec, init="random")
    if not (callable(getattr(hf, "can_generate", None)) and hf.can_generate()):
        raise HelixError(f"model spec {spec!r}: {type(hf).__name__} is not a causal LM that "
                         f"generates (config.json's architectures names the class); helix generate "
                         f"takes e.g. LlamaForCausalLM")
    if max_seq is None:
        raise HelixError(f"model spec {spec!r}: a Hugging Face model's cache is sized by the "
                         f"request; pass max_seq (helix generate: P + T)")
    if weights is not None:
        src = open_checkpoint(weights)
        names = set(src.names())
        missing = [n for n, _ in hf.named_parameters() if n not in names]   # tied ones once
        if missing:
            raise HelixError(f"--weights {weights}: no tensor {missing[0]} ({len(missing)} of "
                             f"{type(hf).__name__}'s parameters missing); pass the directory "
                             f"save_pretrained() wrote for this config")
        hf.load_state_dict({k: src.read(k, ()) for k in hf.state_dict() if k in names},
                           strict=False)
    return HFStaticCacheDecoder(hf.float().eval(), batch, max_seq)


def check_request(model, devices: int, prompt_len: int, new_tokens: int,
                  split: tuple[int, ...] | None = None, variant: str | None = None,
                  dp: int = 1) -> None:
    """HelixError, one line, for a generation request that cannot run."""
    cfg = model.cfg
    if devices < 1:
        raise HelixError(f"--devices {devices}: N must be at least 1 process; give --devices 1 or more")
    if dp < 1 or devices % dp or cfg.batch % dp:
        raise HelixError(f"--dp {dp}: the replicas split the {devices} processes and the model's "
                         f"batch of {cfg.batch} rows evenly; give a --dp that divides both")
    if prompt_len < 1:
        raise HelixError(f"--prompt-len {prompt_len}: a prompt needs at least one token; give "
                         f"--prompt-len 1 or more")
    if new_tokens < 1:
        raise HelixError(f"--new-tokens {new_tokens}: T must be at least 1 (the prefill's token, "
                         f"then T - 1 decode steps); give --new-tokens 1 or more")
    if prompt_len + new_tokens - 1 > cfg.max_seq:
        raise HelixError(f"--prompt-len {prompt_len} + --new-tokens {new_tokens} need "
                         f"{prompt_len + new_tokens - 1} cache positions, but the model's cache "
                         f"has max_seq={cfg.max_seq}; generate fewer tokens or build the model "
                         f"with max_seq >= {prompt_len + new_tokens - 1}")
    if split is not None:
        if len(split) != 3 or any(x < 1 for x in split):
            raise HelixError(f"--plan {','.join(map(str, split))}: give S,M,N, three positive "
                             f"integers (cache chunks, dim slices, head groups), e.g. 1,2,2")
        s, m, n = split
        if s * m * n * dp != devices:
            reps = f" x --dp {dp}" if dp > 1 else ""
            raise HelixError(f"--plan {s},{m},{n}: s={s} x m={m} x n={n}{reps} = {s * m * n * dp} "
                             f"ranks, but --devices {devices}; give a split whose product is "
                             f"{devices // dp}" + (" (per replica)" if dp > 1 else ""))
        if s > cfg.max_seq:
            raise HelixError(f"--plan {s},{m},{n}: s={s} cache chunks of a cache of "
                             f"{cfg.max_seq} positions; s must be at most {cfg.max_seq}")
        if variant is not None and m == 1:
            raise HelixError(f"--variant {variant} applies to m > 1 (head-dim slices); "
                             f"--plan {s},{m},{n} has m = 1: drop --variant")
    if variant is not None and variant not in VARIANTS:
        raise HelixError(f"--variant {variant!r}: expected one of {VARIANTS}")


def choose_split(model, devices: int, prompt_len: int, new_tokens: int,
                 cluster=None) -> GenerateSplit:
    """The decode planner's split at context P + T (decode.plan_split: the fastest row of
    decode_plan.plan_decode that compile_decoder builds, replicas included); `reason` says
    which and why."""

    context = prompt_len + new_tokens
    row, plan, why_chosen = plan_split(model, devices, prompt_len, context, cluster)
    variant = None if row.m == 1 else row.variant
    if row is plan.chosen:
        reason = (f"the decode planner's choice at context {context} (P + T), concurrency "
                  f"{model.cfg.batch}: {plan.reason}")
    else:
        reason = (f"the decode planner chose {plan.chosen.name} ({why_chosen}); "
                  f"{row.name} is the fastest split compile_decoder builds, predicted "
                  f"{row.tpot_ms:.3f} ms per token against {plan.chosen.tpot_ms:.3f} ms")
    return GenerateSplit(s=row.s, m=row.m, n=row.n, variant=variant, reason=reason, dp=row.dp)


def make_prompt(cfg, prompt_len: int, seed: int = 0,
                padded_row: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (B, P) and their valid positions (B, P): row 1 left-padded by P // 2, and with
    B >= 3 the last row all padding (as a server's batch holds them), or with padded_row=False
    one real token: a Hugging Face model's reference is its `generate`, which is ill-defined
    on a row with no real token (its prefill attends over nothing; models/hf_static.py)."""
    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, cfg.vocab, (cfg.batch, prompt_len), generator=g)
    valid = torch.ones(cfg.batch, prompt_len, dtype=torch.long)
    if cfg.batch >= 2:
        valid[1, :prompt_len // 2] = 0
    if cfg.batch >= 3:
        valid[-1, :prompt_len if padded_row else prompt_len - 1] = 0
    return tokens, valid


def pair_on_device(prog, rank: int, device: torch.device) -> None:
    """Rank `rank`'s (prefill, step) modules of `prog` on `device`, their shared cache tensors
    still one tensor each (Module.to gives each module its own copy), and prog.caches[rank]
    pointing at them."""

    if device.type == "cpu":
        return
    prefill, step = prog.modules[rank]
    owner_of = {id(t): name for name, t in prefill.named_buffers()}
    step_ids = {name: id(t) for name, t in step.named_buffers()}
    cache_ids = {src: id(t) for src, t in prog.caches[rank].items()}
    on_device(prefill, device)
    on_device(step, device)
    moved = dict(prefill.named_buffers())
    for name, tid in step_ids.items():
        if tid in owner_of:
            owner, _, attr = name.rpartition(".")
            step.get_submodule(owner).register_buffer(attr, moved[owner_of[tid]])
    step_moved = dict(step.named_buffers())
    for src, tid in cache_ids.items():
        name = owner_of.get(tid)
        prog.caches[rank][src] = moved[name] if name else step_moved[
            next(n for n, i in step_ids.items() if i == tid)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate_rank(prog, rank: int, prompt: torch.Tensor, valid_prompt: torch.Tensor,
                  new_tokens: int, device: torch.device | None = None,
                  compile_mode: str = "none") -> tuple[torch.Tensor, dict]:
    """Rank `rank` of DecodeProgram `prog` (its collectives bound to a DistributedBackend):
    zero its cache slices, prefill `prompt`, then new_tokens - 1 decode steps (under
    torch.compile with `compile_mode`, runtime/compiled.py; the first step, which compiles, is then
    left out of the timing). The new tokens (B, new_tokens) and timings {"prefill_ms",
    "ms_per_token" (the timed decode steps' mean), "steps" (timed), "compile_s"}."""
    device = device or torch.device("cpu")
    prefill, step = prog.modules[rank]
    step = compiled(step, compile_mode)
    untimed = 0 if compile_mode == "none" else 1
    B, P = prompt.shape
    max_seq = prog.max_seq
    valid = torch.ones(B, max_seq, dtype=torch.long)
    valid[:, :P] = valid_prompt
    valid, prompt = valid.to(device), prompt.to(device)
    for t in prog.caches[rank].values():
        t.zero_()
    _sync(device)
    start = time.perf_counter()
    tok = prefill(prompt, valid)[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    prefill_s = time.perf_counter() - start
    out = [tok]
    start = compile_start = time.perf_counter()
    compile_s = 0.0
    for t in range(new_tokens - 1):
        tok = step(tok, torch.tensor([P + t], device=device), valid)[:, -1].argmax(-1, keepdim=True)
        out.append(tok)
        if t + 1 == untimed:               # the compiling step: timed apart
            _sync(device)
            start = time.perf_counter()
            compile_s = start - compile_start
    _sync(device)
    steps = max(new_tokens - 1 - untimed, 0)
    decode_s = time.perf_counter() - start
    return torch.cat(out, dim=1).cpu(), {
        "prefill_ms": prefill_s * 1e3, "steps": steps, "compile_s": compile_s,
        "ms_per_token": decode_s * 1e3 / steps if steps else float("nan")}


# ---- one torchrun process --------------------------------------------------------------
def _run(args, rank: int, world: int, local_rank: int) -> dict:


    if args.backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(args.backend, timeout=timedelta(seconds=args.timeout))
    torch.manual_seed(args.seed)
    model = load_decoder(args.model, batch=args.batch, weights=args.weights,
                         max_seq=args.prompt_len + args.new_tokens)
    hf = isinstance(model, HFStaticCacheDecoder)
    split = tuple(int(x) for x in args.plan.split(","))
    dp = args.dp
    check_request(model, world, args.prompt_len, args.new_tokens, split, args.variant, dp)
    keys = [None] * world
    dist.all_gather_object(keys, f"model/{weights_digest(dict(model.state_dict()))}")
    check_same_program(keys)
    size = world // dp                    # ranks of one replica
    replica, local = divmod(rank, size)
    rows = model.cfg.batch // dp
    prog = compile_decoder(replica_model(model, dp, replica), size, split, variant=args.variant,
                           prompt_len=args.prompt_len, rank=local,   # only this rank's modules
                           split_kv_core=SPLIT_KV_CORE[args.split_kv_core],
                           fuse_projections=not args.no_fuse_projections)
    pair_on_device(prog, local, device)
    backend = DistributedBackend(prog.mesh, device.type, dp=dp)
    collectives.bind(backend)
    prompt, valid_prompt = make_prompt(model.cfg, args.prompt_len, args.seed, padded_row=not hf)
    mine = slice(replica * rows, (replica + 1) * rows)
    try:
        got, timing = generate_rank(prog, local, prompt[mine], valid_prompt[mine],
                                    args.new_tokens, device, args.compile)
    finally:
        collectives.bind(None)
    everyone = [None] * world
    dist.all_gather_object(everyone, got.tolist())
    # every rank of a replica holds its rows' logits: they must agree; the batch is the
    # replicas' rows in order
    lead = [everyone[(r // size) * size] for r in range(world)]
    got = torch.tensor([row for d in range(dp) for row in everyone[d * size]], dtype=got.dtype)
    slowest = torch.tensor([timing["ms_per_token"], timing["prefill_ms"]], dtype=torch.float64,
                           device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    summary = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "ranks": world, "dp": dp, "s": split[0], "m": split[1], "n": split[2],
               "variant": args.variant, "backend": args.backend, "model": args.model,
               "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
               "batch": model.cfg.batch, "tokens": got.tolist(),
               "ranks_agree": all(t == lead[r] for r, t in enumerate(everyone)),
               "disagreeing_ranks": [r for r, t in enumerate(everyone) if t != lead[r]],
               "ms_per_token": slowest[0].item(), "prefill_ms": slowest[1].item(),
               "compile": args.compile, "timed_steps": timing["steps"],
               "combine": list(prog.combine_notes), "gqa_fold": list(prog.fold_notes),
               "fused_projections": list(prog.fuse_notes), "cores": list(prog.core_notes)}
    if rank == 0:
        want = (hf_generate if hf else greedy_generate)(model, prompt, valid_prompt,
                                                         args.new_tokens)
        summary["reference"] = want.tolist()
        summary["reference_is"] = "Hugging Face generate" if hf else "greedy_generate"
        summary["equal"] = bool(summary["ranks_agree"] and torch.equal(got, want))
    return summary


def summary_lines(s: dict) -> list[str]:
    split = f"s={s['s']} x m={s['m']} x n={s['n']}" + (f" {s['variant']}" if s["variant"] else "")
    if s.get("dp", 1) > 1:
        split = f"dp={s['dp']} x {split}"
    verdict = ("yes" if s["equal"] else
               f"NO: ranks {s['disagreeing_ranks']} picked other tokens than their replica's "
               f"first rank"
               if not s["ranks_agree"] else "NO: they differ from the unsharded model's")
    lines = [f"helix generate: {s['ranks']} ranks, {split}, backend {s['backend']}, float32; "
             f"{s['batch']} rows x prompt {s['prompt_len']}, {s['new_tokens']} new tokens"]
    lines += [f"row {b}: {' '.join(map(str, row))}" for b, row in enumerate(s["tokens"])]
    ref = ("Hugging Face's generate" if s.get("reference_is") == "Hugging Face generate" else
           "the unsharded model's greedy tokens")
    # s > 1: how each core's chunks are summed (folded into the output all-reduce, or not)
    lines += [f"combine: {note}" for note in s.get("combine", ())]
    # s > 1: whether each chunk core reads the cache un-repeated (GQA folded into the queries)
    lines += [f"gqa fold: {note}" for note in s.get("gqa_fold", ())]
    lines.append(f"equal to {ref} (fp32): {verdict}")
    steps = s.get("timed_steps", s["new_tokens"] - 1)
    compiled = s.get("compile", "none")
    how = "" if compiled == "none" else f", under torch.compile ({compiled}; the compiling step untimed)"
    lines.append(f"time per output token: {s['ms_per_token']:.2f} ms (mean of "
                 f"{steps} decode steps, slowest rank{how}); prefill "
                 f"{s['prefill_ms']:.1f} ms")
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m helix_compiler.cli.generate",
                                description="One rank of `helix generate` (start it with torchrun).")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--plan", required=True, metavar="S,M,N")
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--variant", choices=VARIANTS, default=None)
    p.add_argument("--prompt-len", type=int, required=True)
    p.add_argument("--new-tokens", type=int, required=True)
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--weights", default=None)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--json", default=None)
    p.add_argument("--result-dir", default=None)
    p.add_argument("--compile", choices=tuple(COMPILE_MODES), default="none")
    p.add_argument("--split-kv-core", choices=tuple(SPLIT_KV_CORE), default="auto")
    p.add_argument("--no-fuse-projections", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body(rank: int, world: int, local_rank: int) -> None:
        summary = _run(args, rank, world, local_rank)
        if rank == 0:
            print("\n".join(summary_lines(summary)), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
            if not summary["equal"]:
                raise HelixError("the generated tokens differ from the unsharded model's greedy "
                                 "tokens: the rank modules do not compute what the model computes")
    return rank_main("generate", args.result_dir, body)


if __name__ == "__main__":
    sys.exit(main())
