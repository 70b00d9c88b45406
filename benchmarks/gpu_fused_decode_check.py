"""Exactness of the fused s > 1 chunk core and of the s = 1 step's split-KV core on the GPU
(issue 15): compile_decoder's prefill and
decode-step programs of small HF LLaMA GQA decoders (eager and sdpa attention, fp32), every
rank moved to CUDA (helix.chunk_attention there runs the split-KV Triton kernel), against the
unsharded model on the CPU: a left-padded and a fully padded row, steps that cross chunk
boundaries. Prints and writes (--out) the largest relative error per case (<= 1e-5 expected),
NaN checks and which kernel the op took.

    python benchmarks/gpu_fused_decode_check.py --out benchmarks/results/fused_decode_check_h200.json
    python benchmarks/gpu_fused_decode_check.py --device cpu      # the same on the CPU (math path)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from helix_compiler.cli.generate import pair_on_device  # noqa: E402
from helix_compiler.decode import compile_decoder  # noqa: E402
from helix_compiler.runtime import triton_chunk  # noqa: E402
from tests.helpers import hf_llama_decoder, padded_prompt  # noqa: E402

# s > 1: the fused chunk core (seq_split); s = 1, sdpa: the step's one-position cores run as
# helix.chunk_attention over the whole cache (compile_decoder's split_kv_core, passes/decode_core.py)
CASES = [("eager", (2, 1, 2)), ("eager", (4, 1, 1)), ("sdpa", (2, 1, 2)), ("sdpa", (4, 1, 1)),
         ("sdpa", (1, 1, 2)), ("sdpa", (1, 1, 4))]


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double().cpu() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def check(impl: str, split: tuple, dev: torch.device) -> dict:
    devices = split[0] * split[1] * split[2]
    model, ref = hf_llama_decoder(impl, 2, 3, 24), hf_llama_decoder(impl, 2, 3, 24)
    tokens, valid = padded_prompt(3, 24, 10)
    prog = compile_decoder(model, devices, split, prompt_len=10, split_kv_core=split[0] == 1)
    for r in range(devices):
        pair_on_device(prog, r, dev)
    worst, nan, kernels = 0.0, False, set()
    with torch.no_grad():
        want = ref.prefill(tokens, valid)
        outs = prog.prefill(tokens.to(dev), valid.to(dev))
        worst = max(worst, *(rel(o, want) for o in outs))
        nan |= any(bool(o.isnan().any()) for o in outs)
        tok = want[:, -1].argmax(-1, keepdim=True)
        for pos in range(10, 14):
            want = ref.decode_step(tok, torch.tensor([pos]), valid)
            outs = prog.step(tok.to(dev), torch.tensor([pos], device=dev), valid.to(dev))
            worst = max(worst, *(rel(o, want) for o in outs))
            nan |= any(bool(o.isnan().any()) for o in outs)
            tok = want[:, -1].argmax(-1, keepdim=True)
    # which path the op takes for this rank's inputs (dtype, device, head dims)
    q = torch.zeros(3, 2, 1, 8, device=dev)
    k = torch.zeros(3, 1, 24 // split[0], 8, device=dev)
    kernels.add("triton" if triton_chunk.fits(q, k, k, None) else "math")
    notes = prog.combine_notes + prog.core_notes
    fused = sum("fused core" in x or "split-KV" in x for x in notes)
    return {"impl": impl, "split": list(split), "max_rel_error": worst, "nan": nan,
            "fused_cores": fused, "cores": len(notes), "op_path": sorted(kernels)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    rows = []
    for impl, split in CASES:
        rows.append(check(impl, split, dev))
        print(json.dumps(rows[-1]), flush=True)
    ok = all(r["max_rel_error"] <= 1e-5 and not r["nan"] for r in rows)
    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
              "torch": torch.__version__, "command": " ".join(sys.argv), "ok": ok, "rows": rows}
    try:
        import triton
        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("all within 1e-5, no NaN" if ok else "FAILED: a case is off or has NaN")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
