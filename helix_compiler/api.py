"""`helix_compile`: the one entry point of the library."""

from __future__ import annotations

import math

import torch

from .errors import HelixError, PlanError, first_line
from .mesh import Mesh
from .pipeline import analyze
from .program import HelixProgram


def _check_devices(devices) -> int:
    if isinstance(devices, bool) or not isinstance(devices, int) or devices <= 0:
        from .solver import check_devices

        check_devices(devices)  # raises the one message for this rule
    return devices


def _check_variant(variant) -> None:
    if variant not in (None, "score-reduce", "qk-gather"):
        raise PlanError(f"variant must be 'score-reduce', 'qk-gather' or None (the cost model "
                        f"chooses per site), got {variant!r}")


def _cluster_spec(cluster, devices: int):
    """A ClusterSpec from a spec, preset name or YAML path; by default the paper's kind of node
    (8 x H100, NVLink, 8 NDR NICs), as many as `devices` needs."""
    import dataclasses
    import math

    from .cluster import load_cluster

    spec = cluster if cluster is not None and not isinstance(cluster, str) else load_cluster(cluster or "paper")
    if cluster is None and devices > spec.nodes * spec.gpus_per_node:
        nodes = math.ceil(devices / spec.gpus_per_node)
        spec = dataclasses.replace(spec, name=f"{spec.name}-x{nodes}nodes", nodes=nodes)
    return spec


def plan_model(model: torch.nn.Module, devices: int = 16, example_inputs=(), example_kwargs=None,
               cluster=None, plan=None, variant=None, profile=None, print_after=(), dynamic=True,
               strict: bool = False, verbose: bool = False, *, objective: str = "throughput",
               memory_cap_gib: float | None = None, dp: int | None = None):
    """Capture, find attention and MLPs, solve and cost: (Plan, Analysis). Nothing is sharded,
    but the chosen split is one the shard pass builds (its placements are computed; a split it
    refuses is excluded with its reason and the next best chosen, see `plan_buildable`).

    An attention core no site owns runs replicated: a HelixWarning names it and the plan lists
    it (plan.unpartitioned); strict=True refuses it with an UnpartitionedError instead.
    verbose: let torch.export print as it captures (by default held back; a capture error
    keeps it, on the exception torch raised, the CaptureError's __cause__).
    objective: "throughput" (tokens/s of the example batch) or "latency" (time of one batch);
    memory_cap_gib: GiB per rank below the GPU's; dp: data replicas (None: every dp dividing
    devices and the batch, the planner chooses; plan=(dp, m, n) forces one)."""
    result, analysis, _ = _plan(model, devices, example_inputs, example_kwargs, cluster, plan,
                                variant, profile, print_after, dynamic, _placements, strict,
                                verbose=verbose, search=_search(objective, memory_cap_gib, dp))
    return result, analysis


def _search(objective="throughput", memory_cap_gib=None, dp=1) -> dict:
    """make_plan's keywords for the (dp, m, n) space (plan.make_plan)."""
    return {"objective": objective, "memory_cap_gib": memory_cap_gib, "dp": dp}


def _forced_split(plan, devices: int):
    """--plan's (m, n) or (dp, m, n) as a tuple, or None; PlanError for anything else."""
    if plan is None:
        return None
    if not (isinstance(plan, (tuple, list)) and len(plan) in (2, 3)
            and all(isinstance(x, int) and not isinstance(x, bool) for x in plan)):
        raise PlanError(f"plan must be (m, n) or (dp, m, n) with integers dp * m * n = devices, "
                        f"got {plan!r}")
    return tuple(int(x) for x in plan)



def _plan(model, devices, example_inputs, example_kwargs, cluster, plan, variant, profile,
          print_after, dynamic, build, strict=False, warn=True, verbose=False, search=None):
    """plan_model's work: (Plan, Analysis, what `build(plan, analysis)` returned)."""
    from .plan import Plan

    devices = _check_devices(devices)
    _check_variant(variant)
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    spec = _cluster_spec(cluster, devices)
    analysis = analyze(model, example_inputs, example_kwargs or {}, print_after=print_after,
                       dynamic=dynamic, verbose=verbose)
    _report_unpartitioned(analysis.unpartitioned, strict, warn)
    forced = None
    if isinstance(plan, Plan):
        forced = (plan.dp, plan.m, plan.n)
        if plan.devices != devices:
            raise PlanError(f"plan is for {plan.devices} devices, not devices={devices}; "
                            f"compile with devices={plan.devices} or make a new plan")
    else:
        forced = _forced_split(plan, devices)
    if isinstance(plan, Plan):   # the model check comes before any sharding
        from .plan import model_fingerprint

        if plan.model != model_fingerprint(analysis.summary):
            raise PlanError(f"plan was made for model {plan.model}, not for this model "
                            f"({model_fingerprint(analysis.summary)}); make a new plan with `helix plan`")
    result, built = plan_buildable(analysis, devices, spec, profile=profile, forced=forced,
                                   variant=variant, build=build, search=search)
    return result, analysis, built


def _report_unpartitioned(cores, strict: bool, warn: bool) -> None:
    """No silent replication: a HelixWarning (or, strict, an UnpartitionedError) naming every
    attention core no site owns and why."""
    if not cores:
        return
    import warnings

    from .errors import HelixWarning, UnpartitionedError

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


def plan_buildable(analysis, devices: int, spec, *, profile=None, forced=None, variant=None,
                   build=None, search=None):
    """make_plan, checked with the shard pass's own rules: `build(plan, analysis)` (by default
    the placements of every rank) runs for the chosen split; when it raises a ShardingError
    and the split was the cost model's choice, not `forced`, that split is excluded with the
    sharder's reason (in the candidate table and the plan's notes) and the next best by the
    cost model is tried.  A forced split keeps the sharder's refusal.

    (Plan, what build returned)."""
    import dataclasses
    import time

    from .errors import ShardingError
    from .plan import make_plan

    build = build or _placements
    refused = {}
    while True:
        t0 = time.perf_counter()
        result = make_plan(analysis.summary, devices, spec, profile=profile, forced=forced,
                           variant=variant, refused=refused, **(search or {}))
        result = dataclasses.replace(result, unpartitioned=tuple(analysis.unpartitioned))
        analysis.timings["plan"] = analysis.timings.get("plan", 0.0) + time.perf_counter() - t0
        try:
            return result, build(result, analysis)
        except ShardingError as e:
            if forced is not None:
                raise
            refused[result.split] = f"the shard pass refuses it: {first_line(e)}"


def helix_compile(model: torch.nn.Module, devices: int = 16, example_inputs=(), example_kwargs=None,
                  cluster=None, plan=None, variant=None, profile=None, print_after=(),
                  kernel_choice=None, dynamic: bool = True,
                  sequence_parallel: bool = False, strict: bool = False,
                  verbose: bool = False, *, objective: str = "throughput",
                  memory_cap_gib: float | None = None, dp: int | None = 1) -> HelixProgram:
    """Compile `model` for `devices` ranks: capture, plan, shard; returns a HelixProgram.

    plan=(m, n) forces a split; variant="score-reduce" | "qk-gather" forces the m > 1 variant
    of every site (for tests); cluster is a preset name, a YAML path or a ClusterSpec.
    kernel_choice: rewrite attention cores whose head dims no fused SDPA kernel takes (> 256 on
    Hopper, or not a multiple of 8, as a qk-gather core's d/m can be) into the exact chunked
    explicit form (passes/kernel_choice.py); None = when the plan has such a core.
    dynamic: capture batch and sequence sizes as symbols so the rank modules run other sizes
    (about twice the export time of a static capture).  sequence_parallel: hold the residual
    stream after each row-parallel projection split along the sequence over all ranks, so
    norms and residual adds run on 1/N of the tokens; it is gathered again before each
    column-parallel projection. Needs a static sequence length (dynamic=False); off by
    default (the planner does not price it yet).
    strict: refuse (UnpartitionedError) a model with an attention core no site owns, instead
    of the HelixWarning that names it (program.unpartitioned lists them).
    verbose: let torch.export print its partial graphs and logs as it captures; by default
    they are held back and a capture error is one CaptureError whose __cause__ (torch's
    exception) keeps them.
    objective / memory_cap_gib: as for plan_model. dp: data replicas; 1 by default (the example
    batch is rarely the batch the program will run, so the batch is split only when asked:
    dp=None lets the planner choose, plan=(dp, m, n) or a Plan with dp forces it). A dp > 1
    program (helix_compiler.data.DataParallelProgram) feeds rank r the batch shard r // (m n).
    """
    if sequence_parallel and dynamic:
        raise PlanError("sequence_parallel=True needs a static sequence length; pass "
                        "dynamic=False as well")
    result, analysis, prog = _plan(model, devices, example_inputs, example_kwargs, cluster, plan,
                                   variant, profile, print_after, dynamic,
                                   lambda r, a: _shard(r, a, sequence_parallel), strict,
                                   verbose=verbose, search=_search(objective, memory_cap_gib, dp))
    prog.kernel_choice = _kernel_choice(kernel_choice, analysis, prog.plan.m)
    prog._source = dict(model=model, example_inputs=example_inputs, example_kwargs=example_kwargs,
                        cluster=cluster, profile=profile, verbose=verbose)
    return _static_if_better(prog, devices, plan, variant)


def _static_if_better(prog: HelixProgram, devices: int, plan, variant) -> HelixProgram:
    """Some models merge the batch dim with the head dim ((B*H, S, d) in nn.MultiheadAttention):
    with a symbolic batch that reshape cannot be split exactly, so such a model is recaptured
    with static shapes rather than run with replicated attention."""
    src = getattr(prog, "_source", None)
    if not prog.replicated_ops or not prog.analysis.captured.dynamic or src is None:
        return prog
    _, _, static = _plan(src["model"], devices, src["example_inputs"], src["example_kwargs"],
                         src["cluster"], plan, variant, src["profile"], (), False, _shard,
                         warn=False, verbose=src.get("verbose", False),
                         search=_search(prog.plan.objective, None, prog.plan.dp))
    static.kernel_choice = prog.kernel_choice
    static._source = src
    if len(static.replicated_ops) < len(prog.replicated_ops):
        static.notes.append(
            f"captured with static shapes: with a symbolic batch/sequence size, "
            f"{[n for n, _ in prog.replicated_ops]} could only run replicated")
        return static
    return prog


def recompile(program: HelixProgram, plan, devices: int | None = None, variant=None, cluster=None,
              profile=None) -> HelixProgram:
    """The same captured model planned and sharded again for another split or device count.

    Capture (torch.export) is most of a compile; a search over splits, or a test of every split,
    pays it once.  The capture's mode (dynamic or static) and kernel choice carry over."""
    analysis = program.analysis
    if devices is None:
        if not (isinstance(plan, (tuple, list)) and len(plan) in (2, 3)):
            raise PlanError(f"recompile needs devices= or plan=(m, n) / (dp, m, n), "
                            f"got plan={plan!r}")
        devices = math.prod(plan)
    devices = _check_devices(devices)
    _check_variant(variant)
    spec = _cluster_spec(cluster, devices)
    forced = _forced_split(plan, devices)
    _, prog = plan_buildable(analysis, devices, spec, profile=profile, forced=forced,
                             variant=variant, build=_shard)
    prog.kernel_choice = program.kernel_choice or needs_kernel_choice(analysis, prog.plan.m)
    prog.notes = list(program.notes)
    prog._source = getattr(program, "_source", None)
    return _static_if_better(prog, devices, forced, variant)


def _kernel_choice(requested, analysis, m: int = 1) -> bool:
    if requested is not None:
        return bool(requested)
    return needs_kernel_choice(analysis, m)


def needs_kernel_choice(analysis, m: int = 1) -> bool:
    """Whether some attention core of the m-way split needs the chunked explicit form: m > 1
    (a score-reduce core's softmax tail then runs in blocks of at most chunk_bytes of scores,
    the form `helix calibrate` measures, a whole (b, h, S, S) tail can take GBs; and a d/m
    slice that is not a multiple of 8 has no fused kernel), or a head dim that no fused SDPA
    kernel takes (above 256 on Hopper, or not a multiple of 8)."""
    from passes.kernel_choice import fused_kernel_exists

    from .profile import KERNEL_MAX_HEAD_DIM

    if m > 1 and analysis.matches:
        return True
    fused = KERNEL_MAX_HEAD_DIM["flash"]  # no flash or cuDNN kernel above this head dim on Hopper
    return any(not fused_kernel_exists(x.site.head_dim, x.site.head_dim, fused)
               for x in analysis.matches)


# Rank graphs are emitted at compile time up to this many nodes in all (ranks x graph nodes);
# above it, compile computes every placement (so any refusal surfaces now) and each rank's
# graph is emitted when rank_module(r) first asks for it.  A 64-rank LLaMA-70B is ~360k nodes.
EAGER_EMIT_NODES = 100_000


def _placements(result, analysis) -> HelixProgram:
    """The shard pass's placements for every rank, no rank graph emitted: what raises a
    ShardingError for a split the sharder refuses, at a fraction of a compile."""
    return _shard(result, analysis, emit=False)


def _shard(result, analysis, sequence_parallel: bool = False, emit: bool = True) -> HelixProgram:
    from passes.seeds import mlp_seeds, site_seeds
    from passes.shard import localize

    mesh = Mesh(n=result.n, m=result.m)
    seeds, variants = {}, {}
    try:
        for match, site_plan in zip(analysis.matches, result.sites):
            seeds.update(site_seeds(match, mesh))
            variants[match.site.core_nodes[0]] = site_plan.variant
        for mlp in analysis.mlps:
            seeds.update(mlp_seeds(mlp, mesh))
    except HelixError:
        raise

    def run(active):
        try:
            return localize(analysis.captured.gm, mesh, seeds, variants, analysis.captured.params, active,
                            analysis.views, sequence_parallel=sequence_parallel)
        except HelixError:
            raise
        except Exception as e:
            raise HelixError(f"stage shard failed after capture, find_attention, find_mlp, plan: "
                             f"{first_line(e)}") from e

    import time

    nodes = len(analysis.captured.gm.graph.nodes)
    eager = emit and mesh.size * nodes <= EAGER_EMIT_NODES
    t0 = time.perf_counter()
    localized = run(None if eager else ())
    if emit:
        analysis.timings["shard"] = time.perf_counter() - t0
    prog = HelixProgram(plan=result, analysis=analysis, localized=localized, mesh=mesh, localize=run)
    if result.dp > 1:   # dp replicas of the m x n program (data.py): the same rank modules
        from .data import DataParallelProgram

        prog = DataParallelProgram.of(prog)
    return prog
