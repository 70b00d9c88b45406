"""`helix_compile` and `plan_model`: the typed facade over pipeline.py (its list of passes)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from . import pipeline
from .planning.cluster import ClusterSpec
from .errors import PlanError
from .planning.plan import Plan
from .planning.profile import ComputeProfile
from .program import Analysis, HelixProgram

__all__ = ["helix_compile", "plan_model", "recompile"]


def plan_model(model: torch.nn.Module, devices: int = 16, example_inputs: tuple | torch.Tensor = (),
               example_kwargs: dict | None = None, cluster: ClusterSpec | str | None = None,
               plan: Plan | tuple[int, ...] | None = None, variant: str | None = None,
               profile: ComputeProfile | None = None,
               print_after: str | Iterable[str] | None = (), dynamic: bool = True,
               strict: bool = False, verbose: bool = False,
               repeat_blocks: bool = True, *, objective: str = "throughput",
               memory_cap_gib: float | None = None,
               dp: int | None = None, pp: int | None = None,
               micro_batches: int | None = None, overlap: int | None = 1,
               sequence_parallel: bool | None = False, prune: bool = True) -> tuple[Plan, Analysis]:
    """Capture, find attention and MLPs, solve and cost: (Plan, Analysis). Nothing is sharded,
    but the chosen split is one the shard pass builds (its placements are computed; a split it
    refuses is excluded with its reason and the next best chosen, see
    `pipeline.plan_buildable`).

    An attention core no site owns runs replicated: a HelixWarning names it and the plan lists
    it (plan.unpartitioned); strict=True refuses it with an UnpartitionedError instead.
    print_after: pass names (pipeline.PASS_NAMES up to seeds) whose graph is printed after
    them; shard and the rank passes need helix_compile.
    verbose: let torch.export print as it captures (by default held back; a capture error
    keeps it, on the exception torch raised, the CaptureError's __cause__).
    repeat_blocks: export a stack of identical layers once and copy it (helix_compiler/repeat.py;
    a stack it cannot prove identical is exported whole, the program's notes say why).
    objective: "throughput" (tokens/s of the example batch) or "latency" (time of one batch);
    memory_cap_gib: GiB per rank below the GPU's; dp: data replicas (None: every dp dividing
    devices and the batch, the planner chooses; plan=(dp, m, n) forces one); pp: pipeline
    stages (None: every pp up to the blocks; plan=(dp, pp, m, n) forces one); micro_batches:
    a pp plan's micro-batch count (None: the cost model chooses). prune: the search skips
    splits whose step lower bound is above the best priced (planning/plan.py: the choice is
    the same; their rows carry the bound); False prices every split."""
    req = pipeline.request(model, devices, example_inputs, example_kwargs, cluster, plan, variant,
                           profile, print_after, dynamic, verbose, emit=False,
                           repeat_blocks=repeat_blocks, objective=objective,
                           memory_cap_gib=memory_cap_gib, dp=dp, pp=pp,
                           micro_batches=micro_batches, overlap=overlap,
                           sequence_parallel=sequence_parallel, prune=prune)
    return pipeline.run_plan(req, strict=strict)


def helix_compile(model: torch.nn.Module, devices: int = 16,
                  example_inputs: tuple | torch.Tensor = (), example_kwargs: dict | None = None,
                  cluster: ClusterSpec | str | None = None,
                  plan: Plan | tuple[int, ...] | None = None, variant: str | None = None,
                  profile: ComputeProfile | None = None,
                  print_after: str | Iterable[str] | None = (),
                  kernel_choice: bool | None = None, dynamic: bool = True,
                  sequence_parallel: bool = False, strict: bool = False,
                  verbose: bool = False, repeat_blocks: bool = True, *,
                  objective: str = "throughput", memory_cap_gib: float | None = None,
                  dp: int | None = 1, pp: int | None = 1,
                  micro_batches: int | None = None, overlap: int | None = 1) -> HelixProgram:
    """Compile `model` for `devices` ranks: every pass of pipeline.PASSES; returns a HelixProgram.

    plan=(m, n) forces a split; variant="score-reduce" | "qk-gather" forces the m > 1 variant
    of every site (for tests); cluster is a preset name, a YAML path or a ClusterSpec.
    print_after: pass names (pipeline.PASS_NAMES) whose graph is printed after them (rank 0's
    for shard and the rank passes); an unknown name is refused.
    kernel_choice: rewrite attention cores whose head dims no fused SDPA kernel takes (above
    kernels.FUSED_MAX_HEAD_DIM on Hopper, or not a multiple of 8, as a qk-gather core's d/m can
    be) into the exact chunked explicit form (passes/kernel_choice.py); None = when the plan
    has such a core.
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
    repeat_blocks: export a stack of identical layers (an nn.ModuleList of one class and
    config, 8 or more) once and copy its graph for the others (helix_compiler/repeat.py);
    False exports every layer.
    objective / memory_cap_gib: as for plan_model. dp: data replicas; 1 by default (the example
    batch is rarely the batch the program will run, so the batch is split only when asked:
    dp=None lets the planner choose, plan=(dp, m, n) or a Plan with dp forces it). A dp > 1
    program runs its m x n rank modules once per replica: rank r gets the batch shard r // (m n)
    (`simulate` shards the batch, `gather` joins the replicas' outputs; helix_compiler/data.py).
    overlap: cut each rank's batch into k chunks whose all-reduces run while the next chunk
    computes (passes/overlap.py); 1 by default (k must divide every batch the program runs),
    None lets the cost model choose k. A Plan given as `plan` brings its own overlap.
    pp: pipeline stages, 1 by default (None: the planner chooses; plan=(dp, pp, m, n) forces
    it): rank ((d pp + p) n + i) m + j runs stage p's piece of the m x n rank (i, j)'s graph
    (helix_compiler/stages.py); micro_batches: a pp plan's micro-batch count (None: the cost
    model's choice).
    """
    if sequence_parallel and dynamic:
        raise PlanError("sequence_parallel=True needs a static sequence length; pass "
                        "dynamic=False as well")
    req = pipeline.request(model, devices, example_inputs, example_kwargs, cluster, plan, variant,
                           profile, print_after, dynamic, verbose,
                           sequence_parallel=sequence_parallel, repeat_blocks=repeat_blocks,
                           objective=objective, memory_cap_gib=memory_cap_gib, dp=dp, pp=pp,
                           micro_batches=micro_batches, overlap=overlap)
    return pipeline.run_compile(req, strict=strict, kernel_choice=kernel_choice)


def recompile(program: HelixProgram, plan: Plan | tuple[int, ...] | None = None,
              devices: int | None = None, variant: str | None = None,
              cluster: ClusterSpec | str | None = None,
              profile: ComputeProfile | None = None) -> HelixProgram:
    """The same captured model planned and sharded again for another split or device count: a
    new program (`program` is left as it is).

    Capture (torch.export) is most of a compile; a search over splits, or a test of every split,
    pays it once.  The capture's mode (dynamic or static) and kernel choice carry over."""
    return pipeline.recompile(program, plan, devices=devices, variant=variant, cluster=cluster,
                              profile=profile)
