"""The compiler pipeline: one short list of named stages (DESIGN.md section 1).

    capture         torch.export (non-strict) -> ATen FX graph
    canonical_ops   swapaxes / mT / movedim / broadcast_to as transpose / permute / expand (passes/canonical_ops.py)
    fold_params     views of weights (W.T, W.split(...)[i]) become named parameters (passes/fold_params.py)
    find_attention  AttentionSite records (passes/find_attention.py)
    unpartitioned   attention-like cores no site owns, with why (passes/unpartitioned.py)
    find_mlp        MlpSite records (passes/find_mlp.py)
    plan            solve + cost -> Plan (solver.py, cost.py, plan.py)
    seeds           per-rank output features of column-sharded projections (passes/seeds.py)
    shard           placements, collectives, localized rank graphs (passes/shard.py)

`--print-graph-after STAGE` (CLI) and `print_after=` (API) print the graph
after a stage.  A stage that fails is named, with the stages that ran before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .errors import HelixError, first_line
from .sites import ModelSummary

STAGES = ("capture", "canonical_ops", "fold_params", "slice_copies", "find_attention", "unpartitioned", "find_mlp", "plan",
          "seeds", "shard")


@dataclass(frozen=True)
class Analysis:
    """What capture + find_attention + find_mlp learned about a model."""

    captured: object          # capture.Captured
    matches: tuple            # find_attention.SiteMatch per site, graph order
    skipped: tuple            # notes on attention cores left unsharded
    mlps: tuple               # MlpSite
    summary: ModelSummary
    timings: dict             # stage -> seconds
    views: dict = None        # derived parameter name -> fold_params.ParamView
    unpartitioned: tuple = ()  # plan.UnpartitionedCore: attention cores every rank runs whole


def _numel(t) -> int:
    return int(t.numel())


def summarize(captured, matches, mlps, name: str) -> ModelSummary:
    """Parameter counts the cost model needs: everything the graph reads, and what is not sharded.

    Sharded: the weights of Q/K/V/O projections and MLP pairs, and the biases of the
    column-sharded ones (Q/K/V, MLP up); the biases of the row-sharded ones (O, MLP down) are
    added once after the reduction, so every rank holds them whole.
    """
    from passes.graph_utils import proj_bias
    from passes.workload import measure

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
        total += _numel(t)
        if k not in sharded:
            replicated += _numel(t)
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


def analyze(model, args, kwargs, print_after=(), dynamic: bool = True, verbose: bool = False) -> Analysis:
    from passes.find_attention import find_attention
    from passes.find_mlp import find_mlp

    from .capture import capture

    import time

    done, timings = [], {}

    def stage(name, fn):
        t0 = time.perf_counter()
        try:
            out = fn()
        except HelixError:
            raise
        except Exception as e:
            raise HelixError(f"stage {name} failed after {done or ['nothing']}: "
                             f"{first_line(e)}") from e
        done.append(name)
        timings[name] = time.perf_counter() - t0
        return out

    captured = stage("capture", lambda: capture(model, args, kwargs, dynamic=dynamic,
                                                       verbose=verbose))
    _maybe_print("capture", captured.gm, print_after)
    from passes.canonical_ops import canonical_ops

    # swapaxes / mT / movedim / broadcast_to as the transpose / permute / expand they are
    stage("canonical_ops", lambda: canonical_ops(captured.gm))
    _maybe_print("canonical_ops", captured.gm, print_after)
    from passes.fold_params import fold_params

    views = stage("fold_params", lambda: fold_params(captured.gm, captured.params))
    from passes.slice_copies import slice_copies

    # a buffer filled by copies into its slices (DeepSeek's MLA key) becomes one cat
    stage("slice_copies", lambda: slice_copies(captured.gm))
    _maybe_print("slice_copies", captured.gm, print_after)
    matches, skipped = stage("find_attention", lambda: find_attention(captured.gm))
    from passes.size_masks import causal_at_example

    matches = stage("size_masks", lambda: causal_at_example(captured.gm, matches))
    from passes.unpartitioned import find_unpartitioned

    # no silent replication: every attention-like core no site owns is named, with why
    unpartitioned = stage("unpartitioned", lambda: find_unpartitioned(captured.gm, matches, skipped))
    nodes = {n.name: n for n in captured.gm.graph.nodes}
    projs = set()
    for m in matches:
        s = m.site
        projs |= {nodes[x] for x in (s.q_proj, s.k_proj, s.v_proj, s.o_proj) if x}
    mlps = stage("find_mlp", lambda: find_mlp(captured.gm, projs))
    summary = summarize(captured, matches, mlps, type(model).__name__)
    return Analysis(captured=captured, matches=tuple(matches), skipped=tuple(skipped),
                    mlps=tuple(mlps), summary=summary, timings=timings, views=views,
                    unpartitioned=unpartitioned)


def _maybe_print(stage: str, gm: fx.GraphModule, print_after) -> None:
    if stage in print_after:
        print(f"# graph after {stage}")
        print(gm.code)
