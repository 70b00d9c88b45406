"""Plain-text views of a plan: the candidate table and the cost formulas."""

from __future__ import annotations

import sympy

from .cost import PlanCost, formulas
from .plan import Plan

_COLUMNS = ("", "split", "variants", "compute ms", "comm ms", "bubble ms", "GiB/rank",
            "params/rank", "tokens/s", "comm ms/token")


def _human(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _row(mark: str, name: str, variants: str, cost: PlanCost | None) -> list[str]:
    if cost is None:
        return [mark, name, variants] + ["-"] * (len(_COLUMNS) - 3)
    return [mark, name, variants, f"{cost.compute_ms:,.1f}", f"{cost.comm_ms:,.1f}",
            f"{cost.bubble_ms:,.1f}", f"{cost.memory_bytes_per_rank / 2 ** 30:.2f}",
            _human(cost.param_elements_per_rank), _human(cost.tokens_per_s),
            f"{cost.comm_ms_per_token:.3g}"]


def _variants(cost: PlanCost) -> str:
    names = sorted(set(cost.variants))
    return ",".join(names) if names else "-"


def format_table(plan: Plan) -> str:
    """Every (m, n) of the plan's devices with its predicted cost or why it was
    excluded, the baselines below them, the chosen split marked '*'."""
    rows = []
    for cc in plan.candidates:
        c = cc.candidate
        mark = "*" if (c.m, c.n) == (plan.m, plan.n) else ""
        variants = _variants(cc.cost) if cc.cost else ("infeasible" if not c.feasible else "?")
        rows.append(_row(mark, f"m={c.m} x n={c.n}", variants, cc.cost))
    rows += [_row("", f"{b.name} (baseline)", "heads", b) for b in plan.baselines]
    widths = [max(len(r[i]) for r in rows + [list(_COLUMNS)]) for i in range(len(_COLUMNS))]
    fmt = lambda r: "  ".join(v.ljust(w) if i < 3 else v.rjust(w)   # noqa: E731
                              for i, (v, w) in enumerate(zip(r, widths))).rstrip()
    head = (f"{plan.model} on {plan.devices} devices of cluster {plan.cluster!r}: "
            f"chosen m={plan.m} x n={plan.n}"
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
        lines += [f"  m={c.m} x n={c.n}: {'; '.join(c.reasons)}" for c in excluded]
    lines += ["", f"micro-batch {plan.cost.micro_batch} sequences x {plan.cost.micro_batches}; "
              f"step {plan.cost.step_ms:,.1f} ms = compute + comm (no overlap assumed)"]
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
