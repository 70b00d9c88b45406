"""The plan: the chosen (dp, pp, m, n) split, a variant per attention site, and why.

`make_plan` solves (solver.py), costs every feasible split (cost.py): dp data
replicas of pp pipeline stages of n head groups x m dim slices, picks the best for
the objective ("throughput": the most tokens/s, ties the smaller m, then pp;
"latency": the shortest step of the batch, ties the smaller dp, then pp) and costs the Megatron baselines beside
it. A `Plan` is a frozen value that round-trips through YAML
(`to_yaml` / `Plan.from_yaml`); docs/reading_a_plan.md explains its fields.
"""

from __future__ import annotations

import hashlib
import math
import types
import typing
from dataclasses import dataclass, fields, is_dataclass, replace
from pathlib import Path

import yaml

from .cluster import ClusterSpec, safe_load_mapping
from .cost import (OVERLAP_CHUNKS, VARIANTS, PlanCost, SiteCost, cost_baseline, cost_plan,
                   overlap_cost, peak_efficiency, row_records, search_scope,
                   sequence_parallel_cost, step_lower_bound_ms)
from ..errors import HelixError, PlanError
from .profile import ComputeProfile
from .sites import AttentionSite, ModelSummary
from .solver import Candidate, check_devices, require_feasible, solve_space
from .text import key_name, split_key, split_name

OBJECTIVES = ("throughput", "latency")


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
    """A split the solver considered and, when feasible, its predicted cost; or, when the
    search pruned it (cost None), `lower_bound_ms`: a step it cannot beat
    (cost.step_lower_bound_ms), above the chosen split's."""

    candidate: Candidate
    cost: PlanCost | None = None
    lower_bound_ms: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """devices = dp * pp * m * n: dp data replicas (each the m x n program on B/dp sequences),
    each of pp pipeline stages (contiguous runs of blocks, each split m x n)."""

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
    dp: int = 1                           # data replicas
    pp: int = 1                           # pipeline stages
    objective: str = "throughput"         # what the choice maximized: OBJECTIVES
    overlap: int = 1                      # k batch chunks interleaved (passes/overlap.py)
    sequence_parallel: bool = False       # residual stream split along the sequence

    def __post_init__(self) -> None:
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, int) or self.overlap < 1:
            raise PlanError(f"Plan: overlap must be a positive number of batch chunks k (1: no "
                            f"overlap), got {self.overlap!r}")
        if min(self.m, self.n, self.dp, self.pp) < 1 \
                or self.dp * self.pp * self.m * self.n != self.devices:
            raise PlanError(f"Plan: dp={self.dp} x pp={self.pp} x m={self.m} x n={self.n} must "
                            f"be positive and multiply to devices={self.devices}")
        if self.objective not in OBJECTIVES:
            raise PlanError(f"Plan: objective must be one of {OBJECTIVES}, got {self.objective!r}")
        for sp in self.sites:
            if (sp.variant == "heads") != (self.m == 1):
                raise PlanError(f"Plan m={self.m}: site {sp.index} has variant {sp.variant!r}; "
                                f"m = 1 takes 'heads', m > 1 'score-reduce' or 'qk-gather'")

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(sp.variant for sp in self.sites)

    @property
    def split(self) -> tuple[int, ...]:
        """(dp, m, n) when pp = 1, else (dp, pp, m, n) (text.split_key)."""
        return split_key(self.dp, self.pp, self.m, self.n)

    @property
    def replica_devices(self) -> int:
        """Ranks of one data replica's stage: m * n."""
        return self.m * self.n

    @property
    def name(self) -> str:
        return split_name(self.dp, self.m, self.n, self.pp)

    @property
    def no_attention(self) -> bool:
        return not self.sites

    def to_dict(self) -> dict:
        out = {"devices": self.devices, "dp": self.dp, "pp": self.pp, "m": self.m, "n": self.n,
               "objective": self.objective, "overlap": self.overlap,
               "sequence_parallel": self.sequence_parallel, "cluster": self.cluster,
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
              profile: ComputeProfile | None = None, forced: tuple[int, ...] | None = None,
              variant: str | None = None, refused: dict | None = None,
              backend: str | None = None, *, dp: int | None = 1,
              objective: str = "throughput", memory_cap_gib: float | None = None,
              overlap: int | None = 1, sequence_parallel: bool | None = False,
              pp: int | None = 1, micro_batches: int | None = None, prune: bool = True) -> Plan:
    """Solve, cost every feasible split and pick the best (`_make_plan`), with the cost
    model's search memo (cost.search_scope) held for the whole search: every distinct term is
    priced once, whichever candidates share it."""
    with search_scope():
        return _make_plan(summary, devices, cluster, profile, forced, variant, refused, backend,
                          dp=dp, objective=objective, memory_cap_gib=memory_cap_gib,
                          overlap=overlap, sequence_parallel=sequence_parallel, pp=pp,
                          micro_batches=micro_batches, prune=prune)


def _make_plan(summary: ModelSummary, devices: int, cluster: ClusterSpec,
               profile: ComputeProfile | None = None, forced: tuple[int, ...] | None = None,
               variant: str | None = None, refused: dict | None = None,
               backend: str | None = None, *, dp: int | None = 1,
               objective: str = "throughput", memory_cap_gib: float | None = None,
               overlap: int | None = 1, sequence_parallel: bool | None = False,
               pp: int | None = 1, micro_batches: int | None = None,
               prune: bool = True) -> Plan:
    """Solve, cost every feasible (dp, m, n) and pick the best for `objective`, or the
    `forced` (m, n) (dp = 1) or (dp, m, n). `dp`: only that many data replicas (1, the
    default, is today's m x n program), or None for every dp dividing devices.
    "throughput" maximizes tokens/s of the global batch (ties: the smaller m, then the
    larger dp), "latency" minimizes the step, the time to finish one batch (ties: the
    smaller dp, then the smaller m). `memory_cap_gib` caps each rank's memory below the
    GPU's. `variant` forces "score-reduce" or "qk-gather" on every site of an m > 1
    split. `refused` maps a (dp, m, n) (or (m, n)) the shard pass refused to its reason:
    that split is excluded with it. `backend` prices every attention core with that
    core where it can take it (cost.cost_plan). `overlap`: batch chunks k of the overlap pass
    (None: per split the k of cost.OVERLAP_CHUNKS with the best objective); `sequence_parallel`:
    True / False, or None for per split whichever is better (cost.sequence_parallel_cost).
    `pp`: only that many pipeline stages (1, the default: none), or None for every pp;
    forced=(dp, pp, m, n) forces one. `micro_batches`: the micro-batch count M of a pp > 1
    plan (None: the cost model chooses it). Overlap and sequence-parallel norms are priced
    for pp = 1 plans (a pipeline stage runs neither yet). `prune` (branch and bound, not with
    `forced`): splits are priced in the order of a lower bound of their step
    (cost.step_lower_bound_ms) and one whose bound is above the best step priced so far is
    not priced (its row keeps the bound); the choice is the one pricing every split makes.
    dp = devices and the baselines' Helix points are always priced (the notes compare them)."""
    check_devices(devices)
    if objective not in OBJECTIVES:
        raise PlanError(f"objective must be one of {OBJECTIVES}, got {objective!r}; "
                        f"'throughput' for tokens/s of the whole batch, 'latency' for the "
                        f"time of one batch (set its size with --batch)")
    cluster, cap_note = _capped(cluster, memory_cap_gib)
    refused = {_key(k): v for k, v in (refused or {}).items()}
    if forced is not None:   # the table lists the space the split was forced in: (m, n) or all
        shape, forced = forced, _forced_key(forced, devices)
        dp = 1 if len(shape) == 2 else None
        pp = None if len(shape) == 4 else 1
    candidates = tuple(
        replace(c, feasible=False, reasons=c.reasons + (refused[c.key],))
        if c.key in refused else c
        for c in solve_space(summary, devices, cluster, dp, pp, micro_batches))
    feasible = [c for c in candidates if c.feasible]
    listing = ", ".join(str(c) for c in feasible) or "none"
    if forced is not None:
        if math.prod(forced) != devices:
            raise PlanError(f"forced {key_name(forced)} = {math.prod(forced)} devices, but "
                            f"devices={devices}; feasible splits of {devices}: {listing}")
        chosen = next(c for c in candidates if c.key == forced)   # dp pp m n = devices
        if not chosen.feasible:
            raise PlanError(f"forced {chosen} is infeasible: {'; '.join(chosen.reasons)}. "
                            f"Feasible splits of {devices}: {listing}")
    elif not feasible and refused:
        raise PlanError(f"no split of {devices} devices can be built: "
                        + "; ".join(f"{key_name(k)}: {why}" for k, why in refused.items())
                        + "; docs/troubleshooting.md says what to do about the node named")
    elif not feasible:
        try:
            require_feasible(summary, devices, cluster)   # raises, listing counts that fit
        except PlanError as e:
            more = [c for c in candidates if c.dp > 1 or c.pp > 1]
            if not more:
                raise
            raise PlanError(f"{e}; and with data replicas or stages: " + "; ".join(
                f"{c}: {', '.join(c.reasons)}" for c in more)) from None
    costs = {}
    notes = [f"{key_name(k)} excluded although the cost model chose it: {why}; chose the "
             f"next best split the shard pass builds" for k, why in refused.items()]
    notes += [cap_note] if cap_note else []
    def price(c: Candidate, records: bool) -> PlanCost:
        if c.pp > 1:
            return cost_plan(summary, c.m, c.n, cluster, profile, variant, backend, dp=c.dp,
                             pp=c.pp, micro_batches=micro_batches, records=records)
        base = cost_plan(summary, c.m, c.n, cluster, profile, variant, backend, dp=c.dp,
                         records=records)
        return _best_schedule(summary, c, base, cluster, profile, variant, backend, objective,
                              overlap, sequence_parallel)

    bound: dict = {}      # split -> a step (ms) it cannot beat, when pruning
    if prune and forced is None:
        eta, memo = peak_efficiency(profile), {}
        bound = {c: step_lower_bound_ms(summary, c.dp, c.pp, c.m, c.n, cluster, eta, memo)
                 for c in feasible}
        keep = {(devices, 1, 1)} | {_key(_baseline_key(tp, pp_)) for tp, pp_ in
                                    _baseline_shapes(devices, cluster)}
    order = sorted(feasible, key=bound.__getitem__) if bound else feasible
    best, failed, pruned = math.inf, {}, {}
    for c in order:       # rows: every figure, one SiteCost per site shape (cost.row_records)
        if bound and bound[c] > best and c.key not in keep:
            pruned[c] = bound[c]        # its step > best: never the choice (cost.py proves it)
            continue
        try:
            costs[c] = price(c, records=False)
            best = min(best, costs[c].step_ms)
        except PlanError as e:
            failed[c] = e
    notes += [f"{c} not costed: {failed[c]}" for c in feasible if c in failed]
    costs = {c: costs[c] for c in feasible if c in costs}     # candidate order, as unpruned
    if forced is not None and chosen not in costs:
        raise PlanError(f"forced {chosen}: {'; '.join(notes)}")
    if not costs:
        raise PlanError(f"no feasible split of {devices} devices could be costed: "
                        f"{'; '.join(notes)}")
    if forced is None:
        chosen = min(costs, key=lambda c: objective_key(objective, c, costs[c]))
    # the chosen split priced again with a SiteCost per site (the same figures: the search
    # memo returns the very terms its row was priced with)
    costs = {c: price(c, records=True) if c == chosen else row_records(x)
             for c, x in costs.items()}
    baselines = []
    for tp, pp in _baseline_shapes(devices, cluster):
        try:
            baselines.append(cost_baseline(summary, tp, pp, cluster, profile, backend))
        except PlanError as e:
            notes.append(f"baseline skipped: {e}")
    cost = costs[chosen]
    by_index = {sc.index: sc for sc in cost.sites}    # a site's cost, matched by site index
    if pruned:
        notes.append(f"{len(pruned)} of {len(feasible)} feasible splits not priced: a lower "
                     f"bound of their step (cost.step_lower_bound_ms: their compute at the "
                     f"profile's best efficiencies, no communication) is above the "
                     f"{costs[chosen].step_ms:,.3f} ms of {chosen}; prune=False prices them")
    notes += _why_notes(summary, chosen, costs, candidates, objective)
    notes += _baseline_notes(cost, baselines, summary, candidates, costs)
    return Plan(
        devices=devices, dp=chosen.dp, pp=chosen.pp, m=chosen.m, n=chosen.n, objective=objective,
        overlap=cost.overlap_chunks, sequence_parallel=cost.sequence_parallel,
        cluster=cluster.name, model=model_fingerprint(summary),
        sites=tuple(SitePlan(index=s.index, site=s, variant=by_index[s.index].variant,
                             cost=by_index[s.index]) for s in summary.sites),
        mlps=len(summary.mlps), cost=cost,
        candidates=tuple(CandidateCost(candidate=c, cost=costs.get(c),
                                       lower_bound_ms=pruned.get(c)) for c in candidates),
        baselines=tuple(baselines), notes=tuple(notes))


def _best_schedule(summary, c: Candidate, base: PlanCost, cluster, profile, variant, backend,
                   objective: str, overlap: int | None,
                   sequence_parallel: bool | None) -> PlanCost:
    """The split's cost under the overlap k and sequence-parallel choice asked for, or (None)
    the best of those the cost model prices; a forced k the micro-batch cannot take is a
    PlanError."""
    options = []
    if sequence_parallel is not True:
        for k in (OVERLAP_CHUNKS if overlap is None else (overlap,)):
            o = overlap_cost(summary, base, k, c.m, c.n, cluster, profile, variant, backend,
                             dp=c.dp)
            if o is None and overlap is not None:
                raise PlanError(f"{c}: overlap k={k} does not cut its micro-batch of "
                                f"{base.micro_batch} sequences ({base.micro_batches} of them) "
                                f"into equal chunks, or it has no all-reduce to overlap; use a k "
                                f"that divides {base.micro_batch}, or overlap=1")
            options += [o] if o is not None else []
    if sequence_parallel is not False and overlap in (None, 1):
        sp = sequence_parallel_cost(summary, base, c.m, c.n, cluster, dp=c.dp, profile=profile)
        if sp is None and sequence_parallel:
            raise PlanError(f"{c}: sequence_parallel has nothing to split on N = {c.m * c.n} "
                            f"rank(s) without a graph workload; use sequence_parallel=False")
        options += [sp] if sp is not None else []
    return min(options, key=lambda x: objective_key(objective, c, x))


def objective_key(objective: str, c: Candidate, cost: PlanCost) -> tuple:
    """Smaller is better. For one batch tokens/s = B S / step, so the two objectives order
    plans alike; they differ in their ties and, above all, in the batch they are asked about
    (a latency question is usually one sequence, where dp > 1 is infeasible)."""
    if objective == "latency":
        return (cost.step_ms, c.dp, c.pp, c.m)
    return (-cost.tokens_per_s, c.m, c.pp, -c.dp)


def _key(key: tuple) -> tuple[int, ...]:
    """A split as Candidate.key spells it: (m, n) and (dp, m, n) as (dp, m, n), (dp, pp, m, n)
    as itself unless pp = 1."""
    key = tuple(key)
    if len(key) == 2:
        return (1, *key)
    return split_key(*key) if len(key) == 4 else key


def _forced_key(forced, devices: int) -> tuple[int, ...]:
    if not (isinstance(forced, (tuple, list)) and len(forced) in (2, 3, 4)
            and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in forced)):
        size = len(forced) if isinstance(forced, (tuple, list)) else 2
        what = {3: "(dp, m, n) must be three", 4: "(dp, pp, m, n) must be four"}.get(
            size, "(m, n) must be two")
        raise PlanError(f"forced {what} positive integers, got {forced!r}; they multiply to "
                        f"devices={devices}")
    return _key(tuple(forced))


def _capped(cluster: ClusterSpec, memory_cap_gib: float | None) -> tuple[ClusterSpec, str]:
    """The cluster with each GPU's memory lowered to the cap, and a note saying so."""
    if memory_cap_gib is None:
        return cluster, ""
    if isinstance(memory_cap_gib, bool) or not isinstance(memory_cap_gib, (int, float)) \
            or not memory_cap_gib > 0:
        raise PlanError(f"memory_cap_gib must be a positive number of GiB per rank, got "
                        f"{memory_cap_gib!r}; try 40")
    cap = int(memory_cap_gib * 2 ** 30)
    if cap >= cluster.memory_bytes:
        return cluster, (f"memory cap {memory_cap_gib:g} GiB per rank is above the "
                         f"{cluster.gpu}'s {cluster.memory_bytes / 2 ** 30:.0f} GiB: no effect")
    return replace(cluster, memory_bytes=cap), (
        f"memory cap {memory_cap_gib:g} GiB per rank (of the {cluster.gpu}'s "
        f"{cluster.memory_bytes / 2 ** 30:.0f} GiB): plans and micro-batches sized to it")


def _why_notes(summary: ModelSummary, chosen: Candidate, costs: dict, candidates,
               objective: str) -> list[str]:
    """Why the choice is not the obvious one: m > 1, or fewer replicas than devices."""
    out = []
    devices = chosen.devices
    if chosen.dp < devices:
        pure = next((c for c in candidates if c.key == (devices, 1, 1)), None)
        if summary.batch < devices and (pure is None or not pure.feasible):
            out.append(f"{objective}: dp splits no work of one sequence; a batch of "
                       f"B={summary.batch} feeds at most {summary.batch} replica"
                       f"{'s' if summary.batch != 1 else ''}, so the other devices work on "
                       f"each sequence through m x n")
        elif pure is not None and not pure.feasible:
            out.append(f"dp={devices} (one GPU per replica) is excluded: "
                       f"{'; '.join(pure.reasons)}")
        elif pure in costs:
            p, q = costs[pure], costs[chosen]
            out.append(f"dp={devices} (one GPU per replica) predicted {p.step_ms / q.step_ms:.2f}x "
                       f"the step of {chosen}: compute {p.compute_ms:,.0f} vs {q.compute_ms:,.0f} "
                       f"ms (micro-batches of {p.micro_batch} vs {q.micro_batch} sequences), "
                       f"comm {p.comm_ms:,.0f} vs {q.comm_ms:,.0f} ms")
    if chosen.m > 1 and summary.sites:
        gqa = [s for s in summary.sites if chosen.n * chosen.m > s.num_kv_heads]
        if gqa:
            s = gqa[0]
            out.append(f"GQA: n > H_kv={s.num_kv_heads} copies kv heads; m={chosen.m} splits "
                       f"head dims instead (site {s.index}: H={s.num_heads}, d={s.head_dim})")
    return out


def baseline_point(b: PlanCost, summary: ModelSummary) -> str | None:
    """The Helix split that is the same partition as Megatron baseline `b` ('TP=8 x PP=2' ->
    'dp=1 x pp=2 x m=1 x n=8'), when every site is MHA (GQA/MQA: Megatron splits kv heads as
    Helix does for n <= H_kv, but copies them differently beyond); None otherwise."""
    if any(s.num_kv_heads != s.num_heads for s in summary.sites):
        return None
    parts = dict(x.split("=") for x in b.name.replace(" ", "").split("x"))
    return split_name(1, 1, int(parts["TP"]), int(parts.get("PP", 1)))


def _baseline_notes(cost: PlanCost, baselines, summary: ModelSummary = None,
                    candidates=(), costs: dict | None = None) -> list[str]:
    out = []
    searched = {str(c) for c in candidates}
    priced = {str(c): x for c, x in (costs or {}).items()}
    for b in baselines:
        same = baseline_point(b, summary) if summary is not None else None
        if same is not None and "PP" in b.name:
            out.append(f"baseline {b.name} is also the Helix point {same} (the same partition "
                       f"for MHA)" + ("" if same in searched else
                                      "; it is outside the space searched here (pp=None "
                                      "/ --pp searches every pp)"))
        if b.tokens_per_s > cost.tokens_per_s:
            out.append(f"baseline {b.name} is predicted faster ({b.tokens_per_s:,.0f} vs "
                       f"{cost.tokens_per_s:,.0f} tokens/s) than the chosen split"
                       + (f"; its Helix point {same} was not searched (search pp)"
                          if same is not None and same not in searched else
                          "; it is a split outside this space"
                          if same is None else
                          f"; its Helix point {same} is priced at "
                          f"{priced[same].tokens_per_s:,.0f} (both scatter-gather the stage "
                          f"boundary; they differ in the micro-batch and per-block terms)"
                          if same in priced else f"; its Helix point {same} is not costed"))
    return out


def _baseline_key(tp: int, pp: int) -> tuple[int, int, int, int]:
    """The Helix split (dp, pp, m, n) that is Megatron TP x PP's partition (baseline_point)."""
    return (1, pp, 1, tp)


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
