"""Peak host memory of long-context decode compiles (results/decode_compile_memory_2core.json).

    python benchmarks/decode_compile_memory.py prefill C       # a toy LLaMA's prefill, static cache of C
    python benchmarks/decode_compile_memory.py step K C B s,m,n  # compile_decoder of the 70B shape, K layers

`prefill`: helix_compile(Prefill(...)) of a 1-layer HF LLaMA (hidden 256, 32 heads / 4 kv
heads, d 32) over a StaticCache of B = 2 rows and C positions, 8 devices, plan (1, 8),
dynamic=False: the peak RSS it adds (find_attention's provenance tags were the peak before
5543c5d). `step`: gpu_decode_compiled.lazy_decoder (parameters and cache allocated, never
written) of K layers, compile_decoder(model, 64, (s, m, n), rank=s - 1): the compile's
seconds and the process's peak RSS (all 64 ranks' cache copies before 9b5c8db). Run each in
a fresh process: peak RSS is per process.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def prefill(C: int) -> None:
    from transformers import LlamaConfig

    from helix_compiler import helix_compile
    from helix_compiler.models.decoder_cache import Prefill
    from helix_compiler.models.hf_static import hf_static_decoder

    B = 2
    cfg = LlamaConfig(num_hidden_layers=1, hidden_size=256, num_attention_heads=32, head_dim=32,
                      num_key_value_heads=4, intermediate_size=64, vocab_size=64,
                      max_position_embeddings=1 << 21, attn_implementation="sdpa")
    model = hf_static_decoder(cfg, B, C)
    before, t0 = _rss_gb(), time.time()
    helix_compile(Prefill(model), devices=8, plan=(1, 8), dynamic=False,
                  example_inputs=(torch.zeros(B, 4, dtype=torch.long), torch.ones(B, C, dtype=torch.long)))
    print(f"prefill C={C}: K+V cache {2 * B * 4 * C * 32 * 4 / 1e9:.2f} GB fp32; compile adds "
          f"{_rss_gb() - before:.2f} GB peak RSS, {time.time() - t0:.1f} s")


def step(k: int, C: int, B: int, split: tuple) -> None:
    import gpu_decode_compiled as g

    from helix_compiler.decode import compile_decoder
    from helix_compiler.planning.decode_plan import LLAMA70B_VOCAB, llama70b_shape

    model = g.lazy_decoder(g.llama_config(llama70b_shape(), LLAMA70B_VOCAB, k), B, C, torch.float16)
    t0 = time.time()
    compile_decoder(model, 64, split, rank=split[0] - 1)
    print(f"step k={k} C={C} B={B} split={split}: compiled in {time.time() - t0:.1f} s, "
          f"peak RSS {_rss_gb():.2f} GB")


def main(argv: list[str]) -> int:
    if argv[:1] == ["prefill"] and len(argv) == 2:
        prefill(int(argv[1]))
    elif argv[:1] == ["step"] and len(argv) == 5:
        step(int(argv[1]), int(argv[2]), int(argv[3]), tuple(int(x) for x in argv[4].split(",")))
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
