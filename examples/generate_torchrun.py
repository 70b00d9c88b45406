"""Greedy generation with a sharded KV cache from your own torchrun script, one rank per process.

    torchrun --nproc-per-node 4 examples/generate_torchrun.py --plan 2,1,2 --new-tokens 16 --out out/

A DecodeProgram (helix_compiler/decode.py) is not saved to disk yet, so every process builds
the model from the same seed and compiles the same program; compilation is deterministic, so
rank r's modules are the ones `compile_decoder` would build for rank r anywhere
(`compile_decoder(..., rank=r)` builds only those). The part that matters in your script:

    dist.init_process_group("gloo")                        # "nccl" on GPUs, one GPU per rank
    torch.manual_seed(0); model = build(config, seed=0)    # the same weights on every rank
    prog = compile_decoder(model, world, (s, m, n), rank=rank)
    prefill, step = prog.modules[rank]                     # one cache slice, shared by both
    collectives.bind(DistributedBackend(prog.mesh, device.type))   # "seq", "head", "dim", "all"
    tok = prefill(prompt, valid)[:, -1].argmax(-1, keepdim=True)   # writes positions 0 .. P-1
    for t in range(T - 1):                                 # each rank writes the positions it owns
        tok = step(tok, torch.tensor([P + t]), valid)[:, -1].argmax(-1, keepdim=True)

Every rank holds the full logits (the last collective of each block is an all-reduce), so
every rank picks the same token and feeds it back; nothing else has to be exchanged. `valid`
(B, S_max) marks each row's real positions (0 on left padding, 1 from P on). Each rank writes
out/rank{R}.json: its tokens, the unsharded model's greedy tokens and whether they are equal.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from helix_compiler.decode import compile_decoder
from helix_compiler.cli.generate import make_prompt, pair_on_device
from helix_compiler.models.decoder_cache import DecoderConfig, build, greedy_generate
from helix_compiler.runtime import collectives
from helix_compiler.runtime.collectives import DistributedBackend

# GQA: 4 heads over 2 kv heads, a batch of 3 rows (one left-padded, one all padding), 24 positions
CONFIG = DecoderConfig(layers=2, heads=4, kv_heads=2, head_dim=8, batch=3, max_seq=24)
SEED = 0


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plan", default="2,1,2", metavar="S,M,N", help="s cache chunks, m dim slices, n head groups")
    p.add_argument("--variant", choices=("score-reduce", "qk-gather"), default=None, help="m > 1 only")
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--out", type=Path, required=True, help="directory for rank{R}.json")
    args = p.parse_args(argv)

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    owned = not dist.is_initialized()     # a script may have set up the process group already
    if owned:
        dist.init_process_group(backend)
    backend = dist.get_backend()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if backend == "nccl" else torch.device("cpu")

    torch.manual_seed(SEED)
    model = build(CONFIG, seed=SEED)
    split = tuple(int(x) for x in args.plan.split(","))
    variant = args.variant or ("score-reduce" if split[1] > 1 else None)
    prog = compile_decoder(model, world, split, variant=variant, prompt_len=args.prompt_len, rank=rank)
    pair_on_device(prog, rank, device)            # on a GPU: keeps the two modules' cache shared
    prefill, step = prog.modules[rank]
    collectives.bind(DistributedBackend(prog.mesh, device.type))

    prompt, valid_prompt = make_prompt(CONFIG, args.prompt_len, SEED)
    P, T = args.prompt_len, args.new_tokens
    valid = torch.ones(CONFIG.batch, CONFIG.max_seq, dtype=torch.long)
    valid[:, :P] = valid_prompt
    valid, prompt_d = valid.to(device), prompt.to(device)
    tok = prefill(prompt_d, valid)[:, -1].argmax(-1, keepdim=True)
    new = [tok]
    start = time.perf_counter()
    for t in range(T - 1):
        tok = step(tok, torch.tensor([P + t], device=device), valid)[:, -1].argmax(-1, keepdim=True)
        new.append(tok)
    ms = (time.perf_counter() - start) * 1e3 / max(T - 1, 1)
    collectives.bind(None)

    got = torch.cat(new, dim=1).cpu()
    want = greedy_generate(model, prompt, valid_prompt, T)     # the unsharded model, fp32
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "split": list(split), "tokens": got.tolist(), "reference": want.tolist(),
         "equal": bool(torch.equal(got, want)), "ms_per_token": ms}))
    if rank == 0:
        print(f"s={split[0]} x m={split[1]} x n={split[2]}: tokens equal to the model's: "
              f"{torch.equal(got, want)}; {ms:.1f} ms per output token", flush=True)
    if owned:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
