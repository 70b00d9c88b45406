"""The cost model's side of a benchmark row: what it predicts for the plan measured."""

from __future__ import annotations

import dataclasses

from helix_compiler.planning.cost import PlanCost, cost_baseline, cost_plan
from helix_compiler.planning.solver import solve

FUSED = ("flash", "cudnn", "efficient")


def at_batch(summary, batch: int):
    """The ModelSummary of a capture at batch 1, as the model runs at `batch` sequences."""
    return dataclasses.replace(
        summary, batch=batch, sites=tuple(dataclasses.replace(x, batch=batch) for x in summary.sites),
        mlps=tuple(dataclasses.replace(x, tokens=x.tokens * batch) for x in summary.mlps))


def fused_backends(profile, head_dim: int) -> list[str]:
    """The fused SDPA kernels the profile has a rate for at this head dim."""
    return [bk for bk in FUSED if profile.attention_efficiency(bk, head_dim, "fp16") is not None]


def sdpa_backend_for(head_dim: int, profile) -> str:
    """The fused SDPA kernel PyTorch runs at this head dim (flash up to 256, else efficient)."""
    return next(iter(fused_backends(profile, head_dim)), "efficient")


# Device memory by datasheet, GB, for the keys of calibrate.DATASHEETS (A100: 40 or 80, left
# to the cluster).
GPU_MEMORY_GB = {"H100 80GB HBM3": 80, "H100 PCIe": 80, "H100 NVL": 94, "H200": 141}


def measured_gpu(cluster, device: str | None):
    """`cluster` with the datasheet peaks, HBM bandwidth and memory of the GPU the ranks were
    measured on: a predicted compute is compared with that GPU's measured one (communication stays the
    cluster's). The profile's rates are efficiencies (achieved / its own GPU's peak), so an
    H200's memory-bound ops priced on an H100 cluster (3.35 TB/s, not 4.8) came out 43% slow.
    Unchanged where `device` is no GPU of calibrate.DATASHEETS (a CPU run)."""
    from helix_compiler.measure.calibrate import DATASHEETS

    key = next((k for k in DATASHEETS if device and k.lower() in device.lower()), None)
    if key is None:
        return cluster
    fp16, bf16, fp32, hbm = DATASHEETS[key]
    gib = GPU_MEMORY_GB.get(key)
    return dataclasses.replace(cluster, name=f"{cluster.name}-{key.split()[0].lower()}",
                               gpu=device, peak_flops_fp16=fp16 * 1e12,
                               peak_flops_bf16=bf16 * 1e12, peak_flops_fp32=fp32 * 1e12,
                               memory_bandwidth=hbm * 1e9,
                               memory_bytes=int(gib * 1e9) if gib else cluster.memory_bytes)


def matmul_peak(profile) -> float:
    return max(r.tflops for r in profile.rates if r.op == "matmul")


def helix_prediction(summary, cluster, profile, m: int, n: int, variant: str | None,
                     backend: str | None) -> PlanCost:
    """helix m x n with every core `backend` where it can take it (None: the fastest)."""
    return cost_plan(summary, m, n, cluster, profile, variant, backend=backend)


def baseline_prediction(summary, cluster, profile, tp: int, pp: int,
                        backend: str | None) -> PlanCost:
    return cost_baseline(summary, tp, pp, cluster, profile, backend=backend)


def helix_cases(summary, devices: int, cluster, profile) -> list[tuple[int, int, str | None, int]]:
    """(m, n, variant, predicted micro-batch) for every feasible split, both variants if m > 1
    (a split the cost model cannot price is still measured, at micro-batch 1)."""
    out = []
    for c in solve(summary, devices, cluster):
        if not c.feasible:
            continue
        for v in ((None,) if c.m == 1 else ("score-reduce", "qk-gather")):
            try:
                b = cost_plan(summary, c.m, c.n, cluster, profile, v).micro_batch
            except Exception:  # noqa: BLE001
                b = 1
            out.append((c.m, c.n, v, b))
    return out


def baseline_micro_batch(summary, tp: int, pp: int, cluster, profile) -> int:
    try:
        return cost_baseline(summary, tp, pp, cluster, profile).micro_batch
    except Exception:  # noqa: BLE001  (measured at 1 when the cost model refuses it)
        return 1
