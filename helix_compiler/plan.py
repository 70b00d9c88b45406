"""The plan: the chosen (m, n) split, a variant per attention site, and why.

`make_plan` solves (solver.py), costs every feasible split (cost.py), picks
the one with the most tokens/s (ties: the smaller m) and costs the Megatron
baselines beside it. A `Plan` is a frozen value that round-trips through YAML
(`to_yaml` / `Plan.from_yaml`); docs/reading_a_plan.md explains its fields.
"""

from __future__ import annotations

import hashlib
import types
import typing
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path

import yaml

from .cluster import ClusterSpec, safe_load_mapping
from .cost import VARIANTS, PlanCost, SiteCost, cost_baseline, cost_plan
from .errors import HelixError, PlanError
from .profile import ComputeProfile
from .sites import AttentionSite, ModelSummary
from .solver import Candidate, check_devices, require_feasible, solve


@dataclass(frozen=True, slots=True, kw_only=True)
class SitePlan:
    """How one attention site is split: `variant` is "heads" when m = 1,
    else "score-reduce" or "qk-gather"."""

    index: int
    site: AttentionSite
    variant: str
    cost: SiteCost | None = None

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise PlanError(f"SitePlan {self.index}: variant must be one of {VARIANTS}, "
                            f"got {self.variant!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class UnpartitionedCore:
    """An attention-like core no site owns (passes/unpartitioned.py): every rank computes it
    whole. `node` is its node in the captured graph, `op` "sdpa", "flex_attention" or
    "softmax", `reason` why find_attention did not make it a site."""

    node: str
    op: str
    reason: str

    def __str__(self) -> str:
        return f"node {self.node} ({self.op}): {self.reason}"


@dataclass(frozen=True, slots=True, kw_only=True)
class CandidateCost:
    """A split the solver considered and, when feasible, its predicted cost."""

    candidate: Candidate
    cost: PlanCost | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    devices: int
    m: int
    n: int
    cluster: str                          # ClusterSpec.name
    model: str                            # model_fingerprint(summary)
    sites: tuple[SitePlan, ...]           # graph order
    mlps: int                             # MLP sites, sharded over all devices
    cost: PlanCost
    candidates: tuple[CandidateCost, ...] = ()
    baselines: tuple[PlanCost, ...] = ()
    notes: tuple[str, ...] = ()
    unpartitioned: tuple[UnpartitionedCore, ...] = ()   # attention cores every rank runs whole

    def __post_init__(self) -> None:
        if self.m < 1 or self.n < 1 or self.m * self.n != self.devices:
            raise PlanError(f"Plan: m={self.m} x n={self.n} must multiply to "
                            f"devices={self.devices}")
        for sp in self.sites:
            if (sp.variant == "heads") != (self.m == 1):
                raise PlanError(f"Plan m={self.m}: site {sp.index} has variant {sp.variant!r}; "
                                f"m = 1 takes 'heads', m > 1 'score-reduce' or 'qk-gather'")

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(sp.variant for sp in self.sites)

    @property
    def no_attention(self) -> bool:
        return not self.sites

    def to_dict(self) -> dict:
        out = {"devices": self.devices, "m": self.m, "n": self.n, "cluster": self.cluster,
               "model": self.model, "no_attention": self.no_attention,
               "variants": list(self.variants), "mlps": self.mlps}
        # a site's cost is written once, under cost.sites
        out["sites"] = [{"index": sp.index, "variant": sp.variant, "site": _encode(sp.site)}
                        for sp in self.sites]
        for name in ("cost", "candidates", "baselines", "notes", "unpartitioned"):
            out[name] = _encode(getattr(self, name))
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> Plan:
        """A plan from YAML text or a file; errors name the file and the key."""
        if isinstance(text_or_path, Path) or (
                isinstance(text_or_path, str) and "\n" not in text_or_path
                and text_or_path.endswith((".yaml", ".yml"))):
            path = Path(text_or_path)
            if not path.is_file():
                raise HelixError(f"plan file {str(path)!r} does not exist; write one with "
                                 f"`helix plan ... -o {path.name}`")
            text, source = path.read_text(), f"plan file {str(path)!r}"
        else:
            text, source = text_or_path, "plan YAML"
        data = safe_load_mapping(text, source)
        derived = {k: data.pop(k, None) for k in ("no_attention", "variants")}
        site_rows = data.get("sites")
        if isinstance(site_rows, list):
            data["sites"] = [{**row, "cost": None} if isinstance(row, dict) else row
                             for row in site_rows]
        plan = _decode(cls, data, source)
        by_index = {c.index: c for c in plan.cost.sites}
        plan = replace(plan, sites=tuple(replace(sp, cost=by_index.get(sp.index))
                                         for sp in plan.sites))
        for key, value in derived.items():
            want = getattr(plan, key)
            if value is not None and (list(want) if key == "variants" else want) != value:
                raise HelixError(f"{source}: {key} is {value!r} but the sites say {want!r}; "
                                 f"fix or delete the {key!r} line")
        return plan


def model_fingerprint(summary: ModelSummary) -> str:
    """'<name>-<10 hex>': equal for equal summaries (its `extra` aside)."""
    key = repr((summary.sites, summary.mlps, summary.param_elements,
                summary.replicated_elements, summary.dtype_bytes, summary.batch,
                summary.seq_len))
    return f"{summary.name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def make_plan(summary: ModelSummary, devices: int, cluster: ClusterSpec,
              profile: ComputeProfile | None = None, forced: tuple[int, int] | None = None,
              variant: str | None = None, refused: dict | None = None) -> Plan:
    """Solve, cost every feasible split and pick the most tokens/s (ties: the
    smaller m), or the `forced` (m, n). `variant` forces "score-reduce" or
    "qk-gather" on every site of an m > 1 split. `refused` maps an (m, n) the
    shard pass refused to its reason: that split is excluded with it."""
    check_devices(devices)
    refused = refused or {}
    candidates = tuple(
        replace(c, feasible=False, reasons=c.reasons + (refused[(c.m, c.n)],))
        if (c.m, c.n) in refused else c for c in solve(summary, devices, cluster))
    feasible = [c for c in candidates if c.feasible]
    listing = ", ".join(str(c) for c in feasible) or "none"
    if forced is not None:
        m, n = forced
        if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in forced):
            raise PlanError(f"forced (m, n) must be two positive integers, got {forced!r}; "
                            f"feasible splits of {devices}: {listing}")
        if m * n != devices:
            raise PlanError(f"forced m={m} x n={n} = {m * n} devices, but devices={devices}; "
                            f"feasible splits of {devices}: {listing}")
        chosen = next(c for c in candidates if (c.m, c.n) == (m, n))
        if not chosen.feasible:
            raise PlanError(f"forced m={m} x n={n} is infeasible: {'; '.join(chosen.reasons)}. "
                            f"Feasible splits of {devices}: {listing}")
    elif not feasible and refused:
        raise PlanError(f"no split of {devices} devices can be built: "
                        + "; ".join(f"m={m} x n={n}: {why}" for (m, n), why in refused.items())
                        + "; docs/troubleshooting.md says what to do about the node named")
    elif not feasible:
        require_feasible(summary, devices, cluster)   # raises, listing counts that fit
    costs = {}
    notes = [f"m={m} x n={n} excluded although the cost model chose it: {why}; chose the "
             f"next best split the shard pass builds" for (m, n), why in refused.items()]
    for c in feasible:
        try:
            costs[c] = cost_plan(summary, c.m, c.n, cluster, profile, variant)
        except PlanError as e:
            notes.append(f"{c} not costed: {e}")
    if forced is not None and chosen not in costs:
        raise PlanError(f"forced m={m} x n={n}: {'; '.join(notes)}")
    if not costs:
        raise PlanError(f"no feasible split of {devices} devices could be costed: "
                        f"{'; '.join(notes)}")
    if forced is None:
        chosen = max(costs, key=lambda c: (costs[c].tokens_per_s, -c.m))
    baselines = []
    for tp, pp in _baseline_shapes(devices, cluster):
        try:
            baselines.append(cost_baseline(summary, tp, pp, cluster, profile))
        except PlanError as e:
            notes.append(f"baseline skipped: {e}")
    cost = costs[chosen]
    return Plan(
        devices=devices, m=chosen.m, n=chosen.n, cluster=cluster.name,
        model=model_fingerprint(summary),
        sites=tuple(SitePlan(index=s.index, site=s, variant=sc.variant, cost=sc)
                    for s, sc in zip(summary.sites, cost.sites)),
        mlps=len(summary.mlps), cost=cost,
        candidates=tuple(CandidateCost(candidate=c, cost=costs.get(c)) for c in candidates),
        baselines=tuple(baselines), notes=tuple(notes))


def _baseline_shapes(devices: int, cluster: ClusterSpec) -> list[tuple[int, int]]:
    """TP inside a node x PP over nodes, and TP over all devices."""
    tp = min(cluster.gpus_per_node, devices)
    shapes = [(tp, devices // tp)] if devices % tp == 0 else []
    return shapes + [(devices, 1)] if (devices, 1) not in shapes else shapes


# --- dataclass <-> plain YAML data, checked against the field types ----------------
def _encode(value):
    if is_dataclass(value):
        return {f.name: _encode(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    return value


def _decode(tp, value, where: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _decode(inner, value, where)
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise HelixError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        hints = typing.get_type_hints(tp)
        known = {f.name: f for f in fields(tp)}
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise HelixError(f"{where}.{unknown[0]}: unknown key for {tp.__name__}; known: "
                             f"{', '.join(known)}")
        kwargs = {k: _decode(hints[k], v, f"{where}.{k}") for k, v in value.items()
                  if k in known and not (tp is ModelSummary and k == "extra")}
        try:
            return tp(**kwargs)
        except TypeError as e:   # a required key is missing
            raise HelixError(f"{where}: {e}; every {tp.__name__} key but the defaulted ones "
                             f"is required") from e
        except ValueError as e:
            raise HelixError(f"{where}: {e}") from e
    if origin is tuple:
        if not isinstance(value, list):
            raise HelixError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise HelixError(f"{where}: expected {len(args)} items, got {value!r}")
        return tuple(_decode(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise HelixError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
