"""Plain-text views of a plan: the candidate table and the cost formulas."""

from __future__ import annotations

import sympy

from ..planning.cost import PlanCost, formulas
from ..planning.plan import Plan

_COLUMNS = ("", "split", "dp", "pp", "variants", "schedule", "compute ms", "comm ms", "bubble ms",
            "GiB/rank", "params/rank", "tokens/s", "latency ms", "why")
_LEFT = 6   # columns written left-aligned: mark, split, dp, pp, variants, schedule


def _human(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _row(mark: str, name: str, dp: str, pp: str, variants: str, cost: PlanCost | None,
         why: str = "") -> list[str]:
    if cost is None:
        return [mark, name, dp, pp, variants] + ["-"] * (len(_COLUMNS) - 6) + [why]
    # overlap k (exposed communication) or sequence-parallel norms
    schedule = ("SP" if cost.sequence_parallel else
                f"k={cost.overlap_chunks} ({cost.exposed_comm_ms:,.1f} exposed)"
                if cost.overlap_chunks > 1 else "-")
    return [mark, name, dp, pp, variants, schedule, f"{cost.compute_ms:,.1f}", f"{cost.comm_ms:,.1f}",
            f"{cost.bubble_ms:,.1f}", f"{cost.memory_bytes_per_rank / 2 ** 30:.2f}",
            _human(cost.param_elements_per_rank), _human(cost.tokens_per_s),
            f"{cost.step_ms:,.1f}", why]


def _variants(cost: PlanCost) -> str:
    names = sorted(set(cost.variants))
    return ",".join(names) if names else "-"


def _limit(reasons: tuple[str, ...]) -> str:
    """The kind of limit that excludes a split, for the why column (reasons: below the table)."""
    first = reasons[0]
    if first.startswith("memory"):
        return "excluded: memory"
    if first.startswith("dp="):
        return "excluded: batch % dp"
    if first.startswith("pp=") and "blocks" in first:
        return "excluded: pp > blocks"
    if first.startswith("pp=") and "micro-batches" in first:
        return "excluded: batch % micro-batches"
    if "devices but cluster" in first:
        return "excluded: cluster size"
    if "shard pass" in first:
        return "excluded: shard pass"
    return "excluded: head / dim split"


def _why(plan: Plan, cc) -> str:
    c = cc.candidate
    if c.key == plan.split:
        return f"chosen ({plan.objective})"
    if not c.feasible:
        return _limit(c.reasons)
    if cc.cost is None and cc.lower_bound_ms is not None:
        return (f"not priced: lower bound {cc.lower_bound_ms:,.1f} ms > chosen "
                f"{plan.cost.step_ms:,.1f} ms")
    if cc.cost is None:
        return "not costed (notes)"
    return f"{cc.cost.step_ms / plan.cost.step_ms:.2f}x latency"


def _baseline_why(plan: Plan, b: PlanCost) -> str:
    if "PP" not in b.name and b.devices == plan.devices:
        return f"= m=1 x n={plan.devices} (emitted)"
    slower = "slower" if b.tokens_per_s <= plan.cost.tokens_per_s else "FASTER, see note"
    pp = b.name.split("PP=")[1]
    tp = b.name.split("TP=")[1].split(" ")[0]
    return f"= pp={pp} x m=1 x n={tp} for MHA (emittable); {slower}"


def format_table(plan: Plan) -> str:
    """Every (dp, pp, m, n) of the plan's devices with its predicted cost or why it was excluded,
    the baselines below them, the chosen split marked '*'."""
    rows = []
    for cc in plan.candidates:
        c = cc.candidate
        mark = "*" if c.key == plan.split else ""
        variants = _variants(cc.cost) if cc.cost else ("infeasible" if not c.feasible else
                                                       "pruned" if cc.lower_bound_ms else "?")
        rows.append(_row(mark, str(c), str(c.dp), str(c.pp), variants, cc.cost, _why(plan, cc)))
    rows += [_row("", f"{b.name} (baseline)", "1", b.name.split("PP=")[1] if "PP=" in b.name
                  else "1", "heads", b, _baseline_why(plan, b))
             for b in plan.baselines]
    widths = [max(len(r[i]) for r in rows + [list(_COLUMNS)]) for i in range(len(_COLUMNS))]
    fmt = lambda r: "  ".join(v.ljust(w) if i < _LEFT or i == len(_COLUMNS) - 1   # noqa: E731
                              else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))).rstrip()
    head = (f"{plan.model} on {plan.devices} devices of cluster {plan.cluster!r}: "
            f"chosen {plan.name} for {plan.objective}"
            + ((f" (no attention{' site' if plan.unpartitioned else ''}: MLPs sharded over all devices)"
                if plan.mlps else
                f" (no attention{' site' if plan.unpartitioned else ''} and no MLP found: every rank "
                f"runs the whole model)")
               if plan.no_attention else ""))
    lines = [head, fmt(list(_COLUMNS)), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in rows]
    excluded = [cc.candidate for cc in plan.candidates if not cc.candidate.feasible]
    if excluded:
        lines += ["", "excluded:"]
        by_reason: dict[tuple, list] = {}     # splits excluded for the same reasons, once
        for c in excluded:
            by_reason.setdefault(c.reasons, []).append(str(c))
        lines += [f"  {', '.join(names)}: {'; '.join(why)}" for why, names in by_reason.items()]
    lines += ["", f"tokens/s: the global batch over the step; latency: the step, the time to "
                  f"finish one batch (dp replicas run their B/dp sequences at once)",
              f"micro-batch {plan.cost.micro_batch} sequences x {plan.cost.micro_batches}"
              + (f" per replica" if plan.dp > 1 else "")
              + (f"; step {plan.cost.step_ms:,.1f} ms with overlap k={plan.cost.overlap_chunks} "
                 f"({plan.cost.exposed_comm_ms:,.1f} ms of communication exposed)"
                 if plan.cost.overlap_chunks > 1 else
                 f"; step {plan.cost.step_ms:,.1f} ms = compute + comm"
                 + (" + bubble" if plan.pp > 1 else "") + " (no overlap)")]
    lines += [f"site {sp.index}: {sp.variant}" + (f", core {sp.cost.backend}" if sp.cost else "")
              for sp in plan.sites]
    lines += [f"note: {x}" for x in plan.notes]
    if plan.unpartitioned:
        lines += ["", "unpartitioned attention cores (every rank runs them whole; not in the costs "
                      "above; --strict refuses them):"]
        lines += [f"  {c}" for c in plan.unpartitioned]
    for b in plan.baselines:
        lines += [f"{b.name}: {x}" for x in b.notes]
    return "\n".join(lines)


def format_formulas() -> str:
    """The cost model's formulas, one per line (docs/cost_model.md names the symbols)."""
    table = formulas()
    width = max(map(len, table))
    return "\n".join(f"{name.ljust(width)} = {sympy.sstr(expr)}" for name, expr in table.items())
