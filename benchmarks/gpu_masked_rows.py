"""Fully masked query rows on the GPU: what each SDPA backend returns, and whether Helix's cores
(helix.attend, helix.chunked_attend, helix.chunked_attention) and a sharded padded LLaMA agree.

    python benchmarks/gpu_masked_rows.py --out benchmarks/results/masked_rows_gpu.json

A row whose keys are all masked: torch's SDPA returns 0 on the CPU (math backend). On CUDA each
backend is asked in turn (sdpa_kernel); a backend that refuses the inputs is recorded as such.
Then every Helix kernel is compared with SDPA's math backend on the same inputs (fp32 and fp16),
and a 2-layer HF LlamaModel with a left-padded and a fully padded row is compiled for 4 devices
and simulated on the GPU (all ranks in this process) for every split and variant.
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
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helix_compiler import helix_compile  # noqa: E402
from helix_compiler.runtime import kernels, kernels_chunked  # noqa: E402,F401
from tests.helpers import rel_error  # noqa: E402

BACKENDS = {"math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def _inputs(dtype, device, gen):
    b, h, s, d = 2, 4, 64, 64
    q, k, v = (torch.randn(b, h, s, d, generator=gen, device=device, dtype=dtype) for _ in range(3))
    keep = torch.ones(b, 1, s, s, dtype=torch.bool, device=device)
    keep[1, :, :, :5] = False          # left padding: keys 0..4 of sequence 1 hidden ...
    keep[1, :, :5, :] = False          # ... and its query rows 0..4 see nothing
    keep[0, :, 7, :] = False           # one fully masked row in sequence 0 too
    fmask = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, float("-inf"))
    return q, k, v, keep, fmask


def sdpa_rows(device) -> list:
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for dtype in (torch.float32, torch.float16):
        q, k, v, keep, fmask = _inputs(dtype, device, gen)
        for mask_kind, mask in (("bool", keep), ("float-inf", fmask)):
            for name, backend in BACKENDS.items():
                row = {"dtype": str(dtype).replace("torch.", ""), "mask": mask_kind, "backend": name}
                try:
                    with sdpa_kernel([backend]):
                        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                    dead = out[1, :, :5]
                    row.update(nan=bool(out.isnan().any()), masked_rows_zero=bool((dead == 0).all()),
                               masked_rows_max_abs=float(dead.float().abs().max()))
                except RuntimeError as e:
                    row["refused"] = str(e).splitlines()[0][:160]
                rows.append(row)
    return rows


def kernel_rows(device) -> list:
    gen = torch.Generator(device=device).manual_seed(1)
    rows = []
    for dtype in (torch.float32, torch.float16):
        q, k, v, keep, fmask = _inputs(dtype, device, gen)
        scale = q.shape[-1] ** -0.5
        for mask_kind, mask in (("bool", keep), ("float-inf", fmask)):
            with sdpa_kernel([SDPBackend.MATH]):
                want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            scores = q @ k.transpose(-2, -1)
            got = {
                "attend": torch.ops.helix.attend(scores, v, mask, False, scale),
                "chunked_attend": torch.ops.helix.chunked_attend(scores, v, mask, False, scale, 1 << 14),
                "chunked_attention": torch.ops.helix.chunked_attention(q, k, v, mask, False, None, 1 << 14, 0),
            }
            for name, out in got.items():
                rows.append({"dtype": str(dtype).replace("torch.", ""), "mask": mask_kind, "kernel": name,
                             "nan": bool(out.isnan().any()), "rel_error_vs_math": rel_error(out, want)})
    return rows


def llama_rows(device) -> list:
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=4,
                         intermediate_size=128, num_hidden_layers=2, vocab_size=128,
                         attn_implementation="sdpa")
    model = LlamaModel(config).eval()
    ids = torch.randint(0, 128, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, :3] = 0                     # left-padded
    mask[2, :] = 0                      # fully padded
    kwargs = {"attention_mask": mask, "use_cache": False}
    prog = helix_compile(model, devices=4, example_inputs=(ids,), example_kwargs=kwargs, plan=(1, 4))
    model = model.to(device)
    ids_d, kw_d = ids.to(device), {"attention_mask": mask.to(device), "use_cache": False}
    with torch.no_grad():
        want = model(ids_d, **kw_d).last_hidden_state
    rows = []
    from helix_compiler.runtime.graphs import on_device

    for plan, variant in (((1, 4), None), ((2, 2), "score-reduce"), ((2, 2), "qk-gather"), ((4, 1), "score-reduce")):
        p = prog.recompile(plan=plan, variant=variant)
        for r in range(4):
            on_device(p.rank_module(r), device)
        on_device(p.analysis.captured.gm, device)
        outs = p.simulate(ids_d, **kw_d)
        errs = [rel_error(o.last_hidden_state if hasattr(o, "last_hidden_state") else o[0], want) for o in outs]
        nan = any(bool((o.last_hidden_state if hasattr(o, "last_hidden_state") else o[0]).isnan().any())
                  for o in outs)
        rows.append({"plan": list(plan), "variant": variant or "heads", "nan": nan, "max_rel_error": max(errs)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/masked_rows_gpu.json")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
              "torch": torch.__version__, "command": " ".join(sys.argv),
              "sdpa": sdpa_rows(device), "kernels": kernel_rows(device)}
    try:
        result["llama_padded"] = llama_rows(device)
    except Exception as e:  # recorded, not hidden: the JSON says what failed
        result["llama_padded_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    result["seconds"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
