"""The compiler pipeline: the one ordered list of passes (DESIGN.md sections 1 and 10).

Each pass is a `Pass` value: its name, its kind, what it needs, what it keeps, and
the function that runs it. `PASSES` lists them all, in the order they run:

    capture            graph     torch.export (non-strict) -> ATen FX graph
    canonical_ops      graph     swapaxes / mT / movedim / broadcast_to as transpose / permute / expand
    fold_params        graph     views of weights (W.T, W.split(...)[i]) become named parameters
    slice_copies       graph     a buffer filled by copies into its slices becomes one cat
    find_attention     analysis  AttentionSite records (passes/find_attention.py)
    causal_at_example  analysis  sites whose size-only mask is causal at the example sizes
    unpartitioned      analysis  attention-like cores no site owns, with why
    find_mlp           analysis  MlpSite records (passes/find_mlp.py)
    summarize          analysis  parameter counts and per-op workload for the cost model
    plan               analysis  solve + cost -> Plan (planning/: solver.py, cost.py, plan.py)
    seeds              analysis  per-rank output features of column-sharded projections
    shard              emit      placements, collectives, one localized graph per rank
    kernel_choice      rank      attention cores no fused kernel takes -> chunked explicit form
    size_masks         rank      masks built from sizes alone -> one size_mask call

"graph" passes rewrite the captured graph (checked with `graph.lint()` after each one that changed it);
"analysis" passes read it and leave it as it is; "emit" writes the rank graphs; "rank"
passes rewrite each rank graph, in `rank_module(r)` (HelixProgram.rank_passes is
RANK_PASSES). One back edge: a ShardingError from seeds or shard under the cost model's
choice of split excludes that split and runs plan again (`plan_buildable`).

`print_after=` (API) and `--print-graph-after NAME` (CLI) print the graph after any
pass: the graph a graph pass produced, the unchanged graph after an analysis pass
(labelled with the pass that last rewrote it), rank 0's graph after shard and the
rank passes. A pass that fails is named, with the passes that ran before it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import time
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx

from passes.find_attention import find_attention
from passes.find_mlp import find_mlp
from passes.fold_params import fold_params
from passes.graph_utils import attr_value, proj_bias
from passes.kernel_choice import apply_kernel_choice, fused_kernel_exists
from passes.overlap import overlap
from passes.seeds import all_seeds
from passes.shard import Localized, localize, written_attrs
from passes.size_masks import apply_size_masks, causal_at_example
from passes.canonical_ops import canonical_ops
from passes.slice_copies import slice_copies
from passes.unpartitioned import find_unpartitioned
from passes.workload import measure

from .capture import Captured, capture
from .planning.cluster import ClusterSpec, load_cluster
from .data import batch_positions
from .errors import (HelixError, HelixWarning, OverlapError, PlanError, ShardingError,
                     UnpartitionedError, first_line)
from .runtime.kernels import FUSED_MAX_HEAD_DIM
from .runtime.mesh import Mesh
from .planning.plan import Plan, make_plan, model_fingerprint
from .planning.profile import ComputeProfile
from .program import Analysis, HelixProgram, Source
from .planning.sites import ModelSummary
from .planning.solver import check_devices

__all__ = ["PASSES", "MODEL_PASSES", "PLAN_PASSES", "RANK_PASSES", "PASS_NAMES", "Pass", "Analysis",
           "analyze", "request", "run_plan", "run_compile", "recompile", "plan_buildable", "placements",
           "forced_split",
           "needs_kernel_choice", "check_print_after", "summarize"]

KINDS = ("graph", "analysis", "emit", "rank")
VARIANTS = (None, "score-reduce", "qk-gather")

# Rank graphs are emitted at compile time up to this many nodes in all (ranks x graph nodes);
# above it, compile computes every placement (so any refusal surfaces now) and each rank's
# graph is emitted when rank_module(r) first asks for it.  A 64-rank LLaMA-70B is ~360k nodes.
EAGER_EMIT_NODES = 100_000
# ... and up to this many bytes of buffers the graph writes in place (a KV cache), which every
# emitted rank gets a copy of: 64 ranks of a 2-layer decoder's 131072-position cache of 8
# sequences are 68 GB (each rank holds its kv head's slice), one rank's 1 GB.
EAGER_EMIT_WRITTEN_BYTES = 1 << 30


# ---- the values passes read and write -----------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Request:
    """What the caller asked for (checked by `request`)."""

    model: torch.nn.Module | None = None
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)
    dynamic: bool = True
    verbose: bool = False
    repeat_blocks: bool = True              # capture a repeated layer stack once (repeat.py)
    devices: int = 1
    cluster: ClusterSpec | None = None
    cluster_arg: object = None              # as the caller gave it (None, a name, a spec)
    profile: ComputeProfile | None = None
    forced: tuple[int, ...] | None = None   # (m, n), (dp, m, n) or (dp, pp, m, n) the caller fixed
    plan: Plan | None = None                # a plan the caller gave (its split is `forced`)
    variant: str | None = None
    objective: str = "throughput"           # plan.OBJECTIVES
    memory_cap_gib: float | None = None     # GiB per rank a plan may use (None: the GPU's)
    dp: int | None = 1                      # data replicas; None: the planner chooses
    pp: int | None = 1                      # pipeline stages; None: the planner chooses
    micro_batches: int | None = None        # a pp plan's micro-batch count; None: the cost model's
    sequence_parallel: bool | None = False  # None: the planner chooses
    overlap: int | None = 1                 # batch chunks k (passes/overlap.py); None: the planner
    prune: bool = True                      # branch and bound in make_plan (False: price every split)
    emit: bool = True                       # shard writes rank graphs (helix_compile) or not
    print_after: frozenset = frozenset()


@dataclass(frozen=True, kw_only=True)
class State:
    """What the passes so far produced; each pass returns a new State."""

    request: Request
    captured: Captured | None = None
    views: dict | None = None
    matches: tuple = ()
    skipped: tuple = ()
    unpartitioned: tuple = ()
    mlps: tuple = ()
    summary: ModelSummary | None = None
    refused: tuple = ()                     # ((dp, m, n), why): splits seeds / shard refused
    plan: Plan | None = None
    seeds: dict | None = None
    variants: dict | None = None            # attention core node name -> variant
    localized: Localized | None = None
    localize: Callable | None = None        # ranks -> Localized with their graphs


@dataclass(frozen=True, slots=True, kw_only=True)
class Pass:
    """One named pass: `run(state) -> state` (model passes) or `run(gm, program) -> gm` (rank
    passes, which rewrite one rank graph in place)."""

    name: str
    kind: str          # KINDS
    needs: str         # the precondition, in words
    keeps: str         # the invariant it keeps
    run: Callable

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise HelixError(f"Pass {self.name}: kind must be one of {KINDS}, got {self.kind!r}")

    def run_rank(self, gm: fx.GraphModule, program: HelixProgram, rank: int) -> fx.GraphModule:
        """This rank pass on rank r's module, its graph checked after; a failure names the pass."""
        before = [p.name for p in program.rank_passes]
        done = _names_before("kernel_choice") + before[:before.index(self.name)]
        try:
            gm = self.run(gm, program)
            gm.graph.lint()
        except HelixError:
            raise
        except Exception as e:
            raise HelixError(f"stage {self.name} failed after {done} on rank {rank}: "
                             f"{first_line(e)}") from e
        return gm


# ---- model passes -------------------------------------------------------------------------
def _capture(s: State) -> State:
    r = s.request
    return dataclasses.replace(s, captured=capture(r.model, r.args, r.kwargs, dynamic=r.dynamic,
                                                   verbose=r.verbose,
                                                   repeat_blocks=r.repeat_blocks))


def _fold_params(s: State) -> State:
    return dataclasses.replace(s, views=fold_params(s.captured.gm, s.captured.params))


def _canonical_ops(s: State) -> State:
    canonical_ops(s.captured.gm)
    return s


def _slice_copies(s: State) -> State:
    slice_copies(s.captured.gm)
    return s


def _find_attention(s: State) -> State:
    matches, skipped = find_attention(s.captured.gm)
    return dataclasses.replace(s, matches=tuple(matches), skipped=tuple(skipped))


def _causal_at_example(s: State) -> State:
    return dataclasses.replace(s, matches=tuple(causal_at_example(s.captured.gm, s.matches)))


def _unpartitioned(s: State) -> State:
    return dataclasses.replace(s, unpartitioned=tuple(
        find_unpartitioned(s.captured.gm, s.matches, s.skipped)))


def _find_mlp(s: State) -> State:
    nodes = {n.name: n for n in s.captured.gm.graph.nodes}
    projs = set()
    for m in s.matches:
        site = m.site
        projs |= {nodes[x] for x in (site.q_proj, site.k_proj, site.v_proj, site.o_proj) if x}
    return dataclasses.replace(s, mlps=tuple(find_mlp(s.captured.gm, projs)))


def _summarize(s: State) -> State:
    return dataclasses.replace(s, summary=summarize(s.captured, s.matches, s.mlps,
                                                    type(s.request.model).__name__))


def _plan(s: State) -> State:
    r = s.request
    result = make_plan(s.summary, r.devices, r.cluster, profile=r.profile, forced=r.forced,
                       variant=r.variant, refused=dict(s.refused), dp=r.dp,
                       objective=r.objective, memory_cap_gib=r.memory_cap_gib, pp=r.pp,
                       micro_batches=r.micro_batches,
                       overlap=r.overlap, sequence_parallel=r.sequence_parallel,
                       prune=r.prune)
    return dataclasses.replace(s, plan=dataclasses.replace(result, unpartitioned=s.unpartitioned))


def _seeds(s: State) -> State:
    mesh = Mesh(n=s.plan.n, m=s.plan.m)
    return dataclasses.replace(s, seeds=all_seeds(s.matches, s.mlps, mesh),
                               variants=site_variants(s.plan, s.matches))


def site_variants(plan: Plan, matches: Iterable) -> dict[str, str]:
    """Attention core node name -> the plan's variant for that site, matched by site index
    (a plan read from YAML lists its sites by index, in any order)."""
    by_index = {sp.index: sp for sp in plan.sites}
    out = {}
    for match in matches:
        sp = by_index.get(match.site.index)
        if sp is None:
            raise PlanError(f"plan has no entry for attention site {match.site.index} (core "
                            f"{match.site.core_nodes[0]}); its sites are {sorted(by_index)}; "
                            f"make a new plan for this model")
        out[match.site.core_nodes[0]] = sp.variant
    return out


def _shard(s: State) -> State:
    r = s.request
    mesh = Mesh(n=s.plan.n, m=s.plan.m)
    captured, seeds, variants, views = s.captured, s.seeds, s.variants, s.views

    def run(active):
        return localize(captured.gm, mesh, seeds, variants, captured.params, active, views,
                        sequence_parallel=s.plan.sequence_parallel)

    eager = r.emit and mesh.size * len(captured.gm.graph.nodes) <= EAGER_EMIT_NODES \
        and mesh.size * _written_bytes(captured.gm) <= EAGER_EMIT_WRITTEN_BYTES
    localized = run(None if eager else ())
    for g in localized.graphs:
        if any(n.op == "output" for n in g.nodes):
            g.lint()
    return dataclasses.replace(s, localized=localized, localize=_named_localize(run))


def _written_bytes(gm: fx.GraphModule) -> int:
    """Bytes of the buffers `gm` writes in place (each emitted rank copies its slice of them;
    counted whole, an upper bound)."""
    tensors = [attr_value(gm, target) for target in written_attrs(gm)]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _named_localize(run: Callable) -> Callable:
    """`run` (a rank graph emitted on demand) with a failure named as the shard pass's."""
    done = _names_before("shard")

    def named(active):
        try:
            return run(active)
        except HelixError:
            raise
        except Exception as e:
            raise HelixError(f"stage shard failed after {done}: {first_line(e)}") from e
    return named


# ---- rank passes: (rank module, program) -> rank module, in place ---------------------------
def _kernel_choice(gm: fx.GraphModule, program: HelixProgram) -> fx.GraphModule:
    return apply_kernel_choice(gm) if program.kernel_choice else gm


def _size_masks(gm: fx.GraphModule, program: HelixProgram) -> fx.GraphModule:
    return apply_size_masks(gm)


def _overlap(gm: fx.GraphModule, program: HelixProgram) -> fx.GraphModule:
    k = program.plan.overlap
    if k == 1:
        return gm
    src = program._source
    if src is None:
        raise OverlapError(f"overlap: k={k} needs the example inputs to check that no op mixes "
                           f"batch rows, and this program has none; compile it from the model")
    args, kwargs = src.example_inputs, dict(src.example_kwargs or {})
    if program.dp > 1:      # a replica's rank runs B/dp rows
        args, kwargs = program.shard_inputs(*args, **kwargs)[0]
    leaves, batch = batch_positions(program.analysis.captured.gm, args, kwargs)
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(holders) != len(leaves):
        raise OverlapError(f"overlap: the rank graph has {len(holders)} inputs but the model "
                           f"{len(leaves)}; this is a Helix bug, compile with overlap=1")
    return overlap(gm, k, batch, leaves)


SAME = "the graph computes what it computed"
UNCHANGED = "the graph is not modified"

MODEL_PASSES = (
    Pass(name="capture", kind="graph", run=_capture,
         needs="an nn.Module and example inputs its forward accepts",
         keeps="the graph computes the model's forward (batch / sequence sizes symbolic when "
               "dynamic); parameters are get_attr nodes"),
    # one spelling per movement op, so find_attention and the shard rules know them all
    Pass(name="canonical_ops", kind="graph", run=_canonical_ops,
         needs="the captured graph",
         keeps=f"{SAME}; swapaxes / swapdims / mT / adjoint / movedim / broadcast_to are "
               f"transpose / permute / expand (passes/canonical_ops.py)"),
    Pass(name="fold_params", kind="graph", run=_fold_params,
         needs="the captured graph and the model's parameters",
         keeps=f"{SAME}; a view chain of a weight is one get_attr of a derived tensor "
               f"(passes/fold_params.py)"),
    # a buffer filled by copies into its slices (DeepSeek's MLA key) becomes one cat
    Pass(name="slice_copies", kind="graph", run=_slice_copies,
         needs="a graph with weights folded",
         keeps=f"{SAME}; a rewritten buffer is no longer mutated (passes/slice_copies.py)"),
    Pass(name="find_attention", kind="analysis", run=_find_attention,
         needs="the folded graph",
         keeps=f"{UNCHANGED}; each AttentionSite names its nodes and head structure "
               f"(passes/find_attention.py)"),
    Pass(name="causal_at_example", kind="analysis", run=_causal_at_example,
         needs="the attention sites",
         keeps=f"{UNCHANGED}; a site is marked mask_causal only where its size-only mask is "
               f"SDPA's causal mask at the example sizes (passes/size_masks.py)"),
    # no silent replication: every attention-like core no site owns is named, with why
    Pass(name="unpartitioned", kind="analysis", run=_unpartitioned,
         needs="the attention sites and find_attention's skip notes",
         keeps=f"{UNCHANGED}; every attention-like core no site owns is listed "
               f"(passes/unpartitioned.py)"),
    Pass(name="find_mlp", kind="analysis", run=_find_mlp,
         needs="the attention sites (their projections are not MLPs)",
         keeps=f"{UNCHANGED}; each MlpSite names its projections (passes/find_mlp.py)"),
    Pass(name="summarize", kind="analysis", run=_summarize,
         needs="the attention and MLP sites",
         keeps=f"{UNCHANGED}; ModelSummary counts every parameter the graph reads once "
               f"(passes/workload.py)"),
)
PLAN_PASSES = (
    Pass(name="plan", kind="analysis", run=_plan,
         needs="the summary, a device count and a cluster",
         keeps=f"{UNCHANGED}; the split is feasible (solver.py) and the cost model's best "
               f"among those seeds and shard build"),
    Pass(name="seeds", kind="analysis", run=_seeds,
         needs="a plan and the sites",
         keeps=f"{UNCHANGED}; per site, the ranks' head-dim slices partition [0, d) "
               f"(passes/seeds.py)"),
    Pass(name="shard", kind="emit", run=_shard,
         needs="seeds and a variant per attention core",
         keeps="the rank graphs, run together, compute what the graph computed; every rank "
               "holds the full outputs (passes/shard.py)"),
)
RANK_PASSES = (
    Pass(name="kernel_choice", kind="rank", run=_kernel_choice,
         needs="a rank graph; the program's kernel_choice on (else the graph is left as it is)",
         keeps=f"{SAME}; attention cores no fused SDPA kernel takes run the chunked explicit "
               f"form (passes/kernel_choice.py)"),
    Pass(name="size_masks", kind="rank", run=_size_masks,
         needs="a rank graph (after kernel_choice: it rewrites the cores kernel_choice emits too)",
         keeps=f"{SAME}; a mask built from sizes alone is one size_mask call "
               f"(passes/size_masks.py)"),
    # last: it copies the graph k times, so the rewrites above run once, not k times
    Pass(name="overlap", kind="rank", run=_overlap,
         needs="a rank graph, the plan's overlap k and the example inputs (k = 1: left as it is)",
         keeps=f"{SAME}; k > 1: each of k batch chunks runs the graph on its rows, all-reduce "
               f"i of chunk c is issued (all_reduce_start) and waited for only where chunk c "
               f"next needs it, while later chunks compute (passes/overlap.py)"),
)
PASSES = MODEL_PASSES + PLAN_PASSES + RANK_PASSES
PASS_NAMES = tuple(p.name for p in PASSES)
assert len(set(PASS_NAMES)) == len(PASS_NAMES), PASS_NAMES


def _names_before(name: str) -> list[str]:
    return list(PASS_NAMES[:PASS_NAMES.index(name)])


# ---- running passes -------------------------------------------------------------------------
class _Runner:
    """Runs model passes in order: times them, checks the graph after graph passes, names a
    failure with the passes that ran before it, and prints where print_after asks."""

    def __init__(self, print_after: frozenset, done: Iterable[str] = (), timings=()):
        self.print_after = print_after
        self.done = list(done)
        self.timings = dict(timings)
        self.rewritten_by = "capture"       # the graph pass that last changed the graph

    def run(self, p: Pass, s: State) -> State:
        t0 = time.perf_counter()
        try:
            before = _code_key(s.captured.gm.graph) if p.kind == "graph" and s.captured else None
            out = p.run(s)
            if p.kind == "graph":
                changed = before is None or before != _code_key(out.captured.gm.graph)
                # a graph no pass changed was linted when it was made
                if changed:
                    out.captured.gm.graph.lint()
                # Regenerating an 80-layer graph's code costs 0.2-1 s: only when the pass
                # changed what the code is made of (capture returns a recompiled graph).
                if p.name in self.print_after or (before is not None and changed):
                    out.captured.gm.recompile()
        except HelixError:
            raise
        except Exception as e:
            raise HelixError(f"stage {p.name} failed after {self.done or ['nothing']}: "
                             f"{first_line(e)}") from e
        self.timings[p.name] = self.timings.get(p.name, 0.0) + time.perf_counter() - t0
        if p.name not in self.done:
            self.done.append(p.name)
        if p.kind == "graph":
            self.rewritten_by = p.name
        if p.name in self.print_after and p.kind != "emit":
            label = "" if p.kind == "graph" else (
                f" (an analysis pass: the graph as {self.rewritten_by} left it)")
            print(f"# graph after {p.name}{label}")
            print(out.captured.gm.code)
        return out


def _code_key(graph: fx.Graph) -> list:
    """What a graph's generated code is made of, per node (a few ms for 6k nodes)."""
    return [(n, n.name, n.op, n.target, n.args, n.kwargs) for n in graph.nodes]


def check_print_after(print_after: str | Iterable[str] | None,
                      allowed: tuple[str, ...] = PASS_NAMES) -> frozenset:
    """print_after as a set of pass names; an unknown name is refused with the valid ones."""
    if print_after is None:
        return frozenset()
    names = (print_after,) if isinstance(print_after, str) else tuple(print_after)
    for name in names:
        if name not in PASS_NAMES:
            raise HelixError(f"print_after: no pass is named {name!r}; the passes are "
                             f"{', '.join(PASS_NAMES)}")
        if name not in allowed:
            raise HelixError(f"print_after: {name!r} runs only in helix_compile (plan_model "
                             f"emits no rank graph); print after one of {', '.join(allowed)}, "
                             f"or call helix_compile")
    return frozenset(names)


def summarize(captured: Captured, matches: Iterable, mlps: Iterable, name: str) -> ModelSummary:
    """Parameter counts the cost model needs: everything the graph reads, and what is not sharded.

    Sharded: the weights of Q/K/V/O projections and MLP pairs, and the biases of the
    column-sharded ones (Q/K/V, MLP up); the biases of the row-sharded ones (O, MLP down) are
    added once after the reduction, so every rank holds them whole.
    """
    matches, mlps = tuple(matches), tuple(mlps)
    nodes = {n.name: n for n in captured.gm.graph.nodes}
    used = {str(n.target) for n in captured.gm.graph.nodes if n.op == "get_attr"}

    def bias(proj_name):
        b = proj_bias(nodes[proj_name]) if proj_name else None
        return {str(b.target)} if isinstance(b, torch.fx.Node) and b.op == "get_attr" else set()

    sharded = set()
    for m in matches:
        s = m.site
        sharded |= {s.q_weight, s.k_weight, s.v_weight}
        sharded |= bias(s.q_proj) | bias(s.k_proj) | bias(s.v_proj)
        if s.o_weight:
            sharded.add(s.o_weight)
    for mlp in mlps:
        sharded |= set(mlp.up_weights) | {mlp.down_weight}
        for up in mlp.up:
            sharded |= bias(up)
    params = {k: v for k, v in captured.params.items() if isinstance(v, torch.Tensor) and k in used}
    seen, total, replicated = set(), 0, 0
    for k, t in params.items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += int(t.numel())
        if k not in sharded:
            replicated += int(t.numel())
    dtype = torch.float32
    batch, seq = 1, 1
    if matches:
        s0 = matches[0].site
        dtype = getattr(torch, s0.dtype)
        batch, seq = s0.batch, s0.q_len
    elif mlps:
        dtype = getattr(torch, mlps[0].dtype)
        seq = mlps[0].tokens
    return ModelSummary(sites=tuple(m.site for m in matches), mlps=tuple(mlps), param_elements=total,
                        replicated_elements=replicated, dtype_bytes=torch.empty((), dtype=dtype).element_size(),
                        batch=batch, seq_len=seq, name=name,
                        workload=measure(captured.gm, matches, mlps, batch))


def _analysis(s: State, runner: _Runner) -> Analysis:
    return Analysis(captured=s.captured, matches=s.matches, skipped=s.skipped, mlps=s.mlps,
                    summary=s.summary, timings=tuple(runner.timings.items()), views=s.views,
                    unpartitioned=s.unpartitioned)


def _state_of(analysis: Analysis, request: Request) -> State:
    """The State after the model passes, from an Analysis (recompile starts here)."""
    return State(request=request, captured=analysis.captured, views=analysis.views,
                 matches=analysis.matches, skipped=analysis.skipped,
                 unpartitioned=analysis.unpartitioned, mlps=analysis.mlps, summary=analysis.summary)


# ---- entry points ---------------------------------------------------------------------------
def analyze(model: torch.nn.Module, args: tuple, kwargs: dict | None = None,
            print_after: str | Iterable[str] | None = (), dynamic: bool = True,
            verbose: bool = False, repeat_blocks: bool = True) -> Analysis:
    """The model passes (capture ... summarize): what they learned about `model`."""
    names = tuple(p.name for p in MODEL_PASSES)
    printing = check_print_after(print_after, names)
    request = Request(model=model, args=args if isinstance(args, tuple) else (args,),
                      kwargs=dict(kwargs or {}), dynamic=dynamic, verbose=verbose,
                      repeat_blocks=repeat_blocks, print_after=printing)
    return _run_model_passes(request)[0]


# The passes' garbage collections skip the objects that were alive before they started.
COMPILE_GC_FREEZE = True


@contextlib.contextmanager
def _young_gc():
    """Run the passes with the process's objects from before (torch, transformers, sympy, the
    model: millions) moved out of the collector's way (gc.freeze), put back on exit
    (gc.unfreeze): a full collection during a compile then walks only what the compile made.
    80 LLaMA-70B layers: the one full collection of a compile 0.22 -> 0.10 CPU s, same peak
    RSS.  Collections still run and free the compile's own cycles.  Left alone when the
    process froze objects itself, or when gc is off."""
    mine = COMPILE_GC_FREEZE and gc.isenabled() and gc.get_freeze_count() == 0
    if mine:
        gc.freeze()
    try:
        yield
    finally:
        if mine:
            gc.unfreeze()


def _run_model_passes(request: Request) -> tuple[Analysis, _Runner]:
    runner = _Runner(request.print_after)
    s = State(request=request)
    with _young_gc():
        for p in MODEL_PASSES:
            s = runner.run(p, s)
    return _analysis(s, runner), runner


def plan_buildable(analysis: Analysis, devices: int, spec: ClusterSpec, *,
                   profile: ComputeProfile | None = None, forced: tuple[int, ...] | None = None,
                   variant: str | None = None,
                   build: Callable[[Plan, Analysis], object] | None = None,
                   dp: int | None = 1, objective: str = "throughput",
                   memory_cap_gib: float | None = None, pp: int | None = 1) -> tuple[Plan, object]:
    """The plan pass, checked with the shard pass's own rules: `build(plan, analysis)` (by
    default `placements`: seeds and shard, no rank graph emitted) runs for the chosen split;
    when it raises a ShardingError and the split was the cost model's choice, not `forced`,
    that split is excluded with the sharder's reason (in the candidate table and the plan's
    notes) and the next best by the cost model is tried.  A forced split keeps the sharder's
    refusal. dp / pp / objective / memory_cap_gib: the (dp, pp, m, n) space searched
    (plan.make_plan).

    (Plan, what build returned)."""
    build = build or placements
    refused: dict = {}
    request = Request(devices=devices, cluster=spec, profile=profile, forced=forced, variant=variant,
                      dp=dp, pp=pp, objective=objective, memory_cap_gib=memory_cap_gib)
    while True:
        s = _plan(dataclasses.replace(_state_of(analysis, request), refused=tuple(refused.items())))
        try:
            return s.plan, build(s.plan, analysis)
        except ShardingError as e:
            if forced is not None:
                raise
            refused[s.plan.split] = f"the shard pass refuses it: {first_line(e)}"


def placements(result: Plan, analysis: Analysis) -> Localized:
    """The shard pass's placements for every rank, no rank graph emitted: what raises a
    ShardingError for a split the sharder refuses, at a fraction of a compile."""
    s = dataclasses.replace(_state_of(analysis, Request(emit=False)), plan=result)
    return _shard(_seeds(s)).localized


def _run_plan_passes(s: State, runner: _Runner) -> State:
    """plan -> seeds -> shard; a ShardingError from seeds or shard under the cost model's
    choice (not a forced split) excludes that split and runs plan again."""
    refused: dict = {}
    with _young_gc():
        while True:
            planned = runner.run(PLAN_PASSES[0], dataclasses.replace(s, refused=tuple(refused.items())))
            try:
                out = planned
                for p in PLAN_PASSES[1:]:
                    out = runner.run(p, out)
                return out
            except ShardingError as e:
                if s.request.forced is not None:
                    raise
                refused[planned.plan.split] = f"the shard pass refuses it: {first_line(e)}"


def request(model: torch.nn.Module | None, devices: object, example_inputs: object = (),
            example_kwargs: dict | None = None, cluster: object = None, plan: object = None,
            variant: str | None = None, profile: ComputeProfile | None = None,
            print_after: str | Iterable[str] | None = (), dynamic: bool = True,
            verbose: bool = False, sequence_parallel: bool = False, emit: bool = True,
            repeat_blocks: bool = True, objective: str = "throughput",
            memory_cap_gib: float | None = None, dp: int | None = 1, pp: int | None = 1,
            micro_batches: int | None = None, overlap: int | None = 1,
            prune: bool = True) -> Request:
    """The caller's arguments checked and normalized (one message per rule). A Plan given as
    `plan` brings its own overlap and sequence_parallel."""
    devices = check_devices(devices)
    if variant not in VARIANTS:
        raise PlanError(f"variant must be 'score-reduce', 'qk-gather' or None (the cost model "
                        f"chooses per site), got {variant!r}")
    forced, given = None, None
    if isinstance(plan, Plan):
        forced, given = plan.split, plan
        overlap, sequence_parallel = plan.overlap, plan.sequence_parallel
        if sequence_parallel and dynamic and emit:
            raise PlanError("the plan uses sequence-parallel norms, which need a static sequence "
                            "length; compile it with dynamic=False")
        if plan.devices != devices:
            raise PlanError(f"plan is for {plan.devices} devices, not devices={devices}; "
                            f"compile with devices={plan.devices} or make a new plan")
    else:
        forced = forced_split(plan)
    allowed = PASS_NAMES if emit else tuple(p.name for p in MODEL_PASSES + PLAN_PASSES
                                             if p.kind != "emit")
    return Request(model=model, args=example_inputs if isinstance(example_inputs, tuple) else (example_inputs,),
                   kwargs=dict(example_kwargs or {}), dynamic=dynamic, verbose=verbose,
                   repeat_blocks=repeat_blocks, devices=devices, cluster=cluster_spec(cluster, devices), cluster_arg=cluster,
                   profile=profile,
                   forced=forced, plan=given, variant=variant, objective=objective,
                   memory_cap_gib=memory_cap_gib, dp=dp, pp=pp, micro_batches=micro_batches,
                   sequence_parallel=sequence_parallel,
                   overlap=check_overlap(overlap), emit=emit, prune=bool(prune),
                   print_after=check_print_after(print_after, allowed))


def check_overlap(overlap: object) -> int | None:
    """overlap=k batch chunks (a positive int) or None (the planner chooses)."""
    if overlap is not None and (isinstance(overlap, bool) or not isinstance(overlap, int)
                                or overlap < 1):
        raise PlanError(f"overlap must be a positive number of batch chunks k (1: no overlap) "
                        f"or None (the planner chooses), got {overlap!r}; try 2 or 4")
    return overlap


def forced_split(plan: object) -> tuple[int, ...] | None:
    """plan=(m, n), (dp, m, n) or (dp, pp, m, n) as a tuple of ints, or None; PlanError for
    anything else."""
    if plan is None:
        return None
    if not (isinstance(plan, (tuple, list)) and len(plan) in (2, 3, 4)
            and all(isinstance(x, int) and not isinstance(x, bool) for x in plan)):
        raise PlanError(f"plan must be (m, n), (dp, m, n) or (dp, pp, m, n) with integers "
                        f"dp * pp * m * n = devices, got {plan!r}")
    return tuple(int(x) for x in plan)


def cluster_spec(cluster: ClusterSpec | str | None, devices: int) -> ClusterSpec:
    """A ClusterSpec from a spec, preset name or YAML path; by default the paper's kind of node
    (8 x H100, NVLink, 8 NDR NICs), as many as `devices` needs."""
    spec = cluster if cluster is not None and not isinstance(cluster, str) else load_cluster(cluster or "paper")
    if cluster is None and devices > spec.nodes * spec.gpus_per_node:
        nodes = math.ceil(devices / spec.gpus_per_node)
        spec = dataclasses.replace(spec, name=f"{spec.name}-x{nodes}nodes", nodes=nodes)
    return spec


def run_plan(req: Request, strict: bool = False) -> tuple[Plan, Analysis]:
    """The model passes, then plan, seeds and shard's placements (no rank graph): the plan is
    one the shard pass builds."""
    analysis, runner = _run_model_passes(req)
    _check_plan_model(req, analysis)
    _report_unpartitioned(analysis.unpartitioned, strict, warn=True)
    s = _run_plan_passes(_state_of(analysis, req), runner)
    return s.plan, dataclasses.replace(analysis, timings=tuple(runner.timings.items()))


def run_compile(req: Request, strict: bool = False, kernel_choice: bool | None = None,
            warn: bool = True) -> HelixProgram:
    """Every pass: a HelixProgram whose rank_module(r) runs the rank passes."""
    analysis, runner = _run_model_passes(req)
    return _compile_analysis(analysis, runner, req, strict, kernel_choice, warn)


def _compile_analysis(analysis: Analysis, runner: _Runner, req: Request, strict: bool = False,
                      kernel_choice: bool | None = None, warn: bool = True) -> HelixProgram:
    """run_compile after the model passes: plan, seeds, shard on `analysis`."""
    _check_plan_model(req, analysis)
    _report_unpartitioned(analysis.unpartitioned, strict, warn)
    s = _run_plan_passes(_state_of(analysis, req), runner)
    source = Source(model=req.model, example_inputs=req.args, example_kwargs=req.kwargs,
                    cluster=req.cluster_arg, profile=req.profile, verbose=req.verbose)
    prog = _program(s, analysis, runner, source,
                    kernel_choice=_kernel_choice_for(kernel_choice, analysis, s.plan.m),
                    notes=(analysis.captured.note,) if analysis.captured.note else ())
    _print_rank_passes(prog, req.print_after)
    return _static_if_better(prog, req)


def _check_plan_model(req: Request, analysis: Analysis) -> None:
    """A plan the caller gave must be for this model (checked before any sharding)."""
    if req.plan is not None and req.plan.model != model_fingerprint(analysis.summary):
        raise PlanError(f"plan was made for model {req.plan.model}, not for this model "
                        f"({model_fingerprint(analysis.summary)}); make a new plan with `helix plan`")


def _program(s: State, analysis: Analysis, runner: _Runner, source: Source | None, *,
             kernel_choice: bool, notes: tuple) -> HelixProgram:
    return HelixProgram(plan=s.plan, analysis=analysis, mesh=Mesh(n=s.plan.n, m=s.plan.m),
                        kernel_choice=kernel_choice, notes=tuple(notes),
                        timings=tuple(runner.timings.items()), rank_passes=RANK_PASSES,
                        _localized=s.localized, _localize=s.localize, _recompile=recompile,
                        _source=source)


def _print_rank_passes(prog: HelixProgram, print_after: frozenset) -> None:
    """Rank 0's graph after shard and after each rank pass print_after names."""
    names = {"shard"} | {p.name for p in RANK_PASSES}
    if not print_after & names:
        return
    where = f"rank 0 of {prog.devices} ({prog.plan.name})"
    gm = prog.emitted_module(0)
    if "shard" in print_after:
        print(f"# graph after shard: {where}")
        print(gm.code)

    def show(p: Pass, gm: fx.GraphModule) -> None:
        if p.name in print_after:
            print(f"# graph after {p.name}: {where}")
            print(gm.code)
    if print_after & {p.name for p in RANK_PASSES}:
        prog.apply_rank_passes(0, gm, each=show)


# a dynamic capture's graph -> the analysis of the same model captured with static shapes
_STATIC_ANALYSES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _static_if_better(prog: HelixProgram, req: Request) -> HelixProgram:
    """Some models merge the batch dim with the head dim ((B*H, S, d) in nn.MultiheadAttention):
    with a symbolic batch that reshape cannot be split exactly, so such a model is recaptured
    with static shapes rather than run with replicated attention."""
    src = prog._source
    if not prog.replicated_ops or not prog.analysis.captured.dynamic or src is None:
        return prog
    static_req = dataclasses.replace(
        req, model=src.model, args=src.example_inputs, kwargs=dict(src.example_kwargs or {}),
        cluster=cluster_spec(src.cluster, req.devices), cluster_arg=src.cluster,
        profile=src.profile, verbose=src.verbose, dynamic=False,
        print_after=frozenset(), dp=prog.plan.dp, pp=prog.plan.pp)
    # the static capture and its analysis depend on the model and its example inputs only:
    # made once per dynamic capture, then each split (recompile) is planned and sharded on it
    key = prog.analysis.captured.gm
    static_analysis = _STATIC_ANALYSES.get(key)
    if static_analysis is None:
        static = run_compile(static_req, kernel_choice=prog.kernel_choice, warn=False)
        _STATIC_ANALYSES[key] = static.analysis
    else:
        runner = _Runner(frozenset(), done=[p.name for p in MODEL_PASSES], timings=static_analysis.timings)
        static = _compile_analysis(static_analysis, runner, static_req, kernel_choice=prog.kernel_choice,
                                   warn=False)
    if len(static.replicated_ops) < len(prog.replicated_ops):
        note = (f"captured with static shapes: with a symbolic batch/sequence size, "
                f"{[n for n, _ in prog.replicated_ops]} could only run replicated")
        return dataclasses.replace(static, notes=static.notes + (note,))
    return prog


def recompile(program: HelixProgram, plan: tuple[int, ...] | None = None,
              devices: int | None = None, variant: str | None = None,
              cluster: ClusterSpec | str | None = None,
              profile: ComputeProfile | None = None) -> HelixProgram:
    """plan, seeds and shard again on `program`'s analysis, for another split or device count:
    a new program (`program` is left as it is). The capture's mode (dynamic or static) and the
    kernel choice carry over."""
    analysis = program.analysis
    if devices is None:
        if not (isinstance(plan, (tuple, list)) and len(plan) in (2, 3, 4)):
            raise PlanError(f"recompile needs devices= or plan=(m, n) / (dp, m, n) / (dp, pp, m, n), "
                            f"got plan={plan!r}")
        devices = math.prod(forced_split(plan))
    req = request(program._source.model if program._source else None, devices, plan=plan,
                  variant=variant, cluster=cluster, profile=profile,
                  dynamic=analysis.captured.dynamic)
    if program._source is not None:
        src = program._source
        req = dataclasses.replace(req, args=src.example_inputs, kwargs=dict(src.example_kwargs or {}),
                                  verbose=src.verbose)
    runner = _Runner(frozenset(), done=[p.name for p in MODEL_PASSES], timings=analysis.timings)
    s = _run_plan_passes(_state_of(analysis, req), runner)
    prog = _program(s, analysis, runner, program._source,
                    kernel_choice=program.kernel_choice or needs_kernel_choice(analysis, s.plan.m),
                    notes=program.notes)
    return _static_if_better(prog, req)


def _report_unpartitioned(cores: tuple, strict: bool, warn: bool) -> None:
    """No silent replication: a HelixWarning (or, strict, an UnpartitionedError) naming every
    attention core no site owns and why."""
    if not cores:
        return
    text = (f"{len(cores)} attention core{'s' if len(cores) > 1 else ''} no site owns, run "
            f"unpartitioned (every rank computes {'them' if len(cores) > 1 else 'it'} whole): "
            + "; ".join(str(c) for c in cores))
    if strict:
        raise UnpartitionedError(f"strict: {text}; write the core in a spelling "
                                 f"passes/find_attention.py knows, or drop strict (--strict) "
                                 f"to run it replicated")
    if warn:
        warnings.warn(f"{text}; strict=True (--strict) refuses such a model", HelixWarning,
                      stacklevel=4)


def _kernel_choice_for(requested: bool | None, analysis: Analysis, m: int = 1) -> bool:
    if requested is not None:
        return bool(requested)
    return needs_kernel_choice(analysis, m)


def needs_kernel_choice(analysis: Analysis, m: int = 1) -> bool:
    """Whether some attention core of the m-way split needs the chunked explicit form: m > 1
    (a score-reduce core's softmax tail then runs in blocks of at most chunk_bytes of scores,
    the form `helix calibrate` measures, a whole (b, h, S, S) tail can take GBs; and a d/m
    slice that is not a multiple of 8 has no fused kernel), or a head dim that no fused SDPA
    kernel takes (above kernels.FUSED_MAX_HEAD_DIM on Hopper, or not a multiple of 8)."""
    if m > 1 and analysis.matches:
        return True
    return any(not fused_kernel_exists(x.site.head_dim, x.site.head_dim, FUSED_MAX_HEAD_DIM)
               for x in analysis.matches)
