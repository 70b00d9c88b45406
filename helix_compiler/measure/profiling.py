"""What one call costs: its FLOPs (FlopCounterMode, with formulas for Helix's attention
ops) and its device time per op class (torch.profiler), which names what bounds a plan."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

import helix_compiler.runtime.kernels  # noqa: F401  (registers torch.ops.helix.attend)
import helix_compiler.runtime.kernels_chunked  # noqa: F401  (torch.ops.helix.chunked_*)
from helix_compiler.measure.timing import is_cuda

TOP_OPS = 14          # ops listed by time in a split


def _attend_flops(scores_shape, v_shape, *args, out_shape=None, **kw):
    *lead, s_q, s_k = scores_shape                      # P @ V: (.., S_q, S_k) x (.., S_k, d_v)
    return 2 * math.prod(lead) * s_q * s_k * v_shape[-1]


def _chunked_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kw):
    *lead, s_q, d = q_shape                             # QK^T and PV
    return 2 * math.prod(lead) * s_q * k_shape[-2] * (d + v_shape[-1])


for _op, _fn in ((torch.ops.helix.attend, _attend_flops),
                 (torch.ops.helix.chunked_attend, _attend_flops),
                 (torch.ops.helix.chunked_attention, _chunked_flops)):
    with contextlib.suppress(Exception):      # already registered (a module reload)
        register_flop_formula(_op)(_fn)


def count_flops(fn) -> int:
    """FLOPs of one call of fn (no grad)."""
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        fn()
    return int(fc.get_total_flops())


def kernel_table(fn, top: int, calls: int = 3, name_len: int = 120) -> list[dict]:
    """fn's CUDA kernels by device time per call (torch.profiler over `calls` calls after one
    untimed call): [{name, us_per_call, calls_per_step}], the `top` largest."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append({"name": e.key[:name_len], "us_per_call": round(t / calls, 1),
                         "calls_per_step": e.count / calls})
    return sorted(rows, key=lambda r: -r["us_per_call"])[:top]


def op_class(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("attention", "sdpa")) and "chunked" not in n:
        return "attention (fused)"
    if "softmax" in n:
        return "softmax"
    if any(k in n for k in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
                            "aten::matmul", "aten::linear", "aten::_scaled_mm")):
        return "matmul"
    return "elementwise"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class OpSplit:
    """ms per op class of one call, and the TOP_OPS ops by time [[op, ms, calls]]."""

    by_class: dict
    top: list


def class_split(fn, device) -> OpSplit:
    """Self device time per op class of one call of fn (CPU time on the CPU)."""
    cuda = is_cuda(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad(), profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    split: dict = {}
    ops: dict = {}
    for ev in prof.key_averages():
        us = (getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
              if cuda else ev.self_cpu_time_total)
        if not us or not ev.key.startswith(("aten::", "triton_")):   # triton_: compiled kernels
            continue
        c = op_class(ev.key)
        split[c] = split.get(c, 0.0) + us / 1e3
        ops[ev.key] = (ops.get(ev.key, (0.0, 0))[0] + us / 1e3, ev.count)
    top = sorted(ops.items(), key=lambda kv: -kv[1][0])[:TOP_OPS]
    return OpSplit(by_class={k: round(v, 4) for k, v in sorted(split.items())},
                   top=[[k, round(v[0], 4), v[1]] for k, v in top])


def bound_of(split: dict, comm_ms: float, compute_ms: float) -> str:
    """What bounds a plan: communication when it exceeds compute, else the largest class."""
    if not split:
        return "unknown"
    tot = sum(split.values()) or 1.0
    top = max(split, key=split.get)
    share = ", ".join(f"{k} {100 * v / tot:.0f}%" for k, v in
                      sorted(split.items(), key=lambda kv: -kv[1]))
    lead = "communication" if comm_ms > compute_ms else f"{top}"
    return f"{lead} (compute split: {share}; comm {comm_ms / max(compute_ms, 1e-9):.2f} x compute)"
