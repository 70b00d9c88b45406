"""Pipeline stages: a rank graph cut at block boundaries (the pp axis of a plan).

A plan (dp, pp, m, n) runs rank r = ((d pp + p) n + i) m + j: stage p of replica d, holding
the piece of the m x n program's rank (i, j) graph between the cuts before stage p and p + 1.
Block k (attention site k and MLP k, graph order) goes to stage cost.stage_of(k, blocks, pp),
as the cost model prices it. The cut before the first block of a stage lies between the last
node that reads the previous block's output-projection / down-projection weights and the first
node that reads the block's q/k/v (or MLP up) weights, at the position where the fewest values
are live: where the residual stream leaves the block. Every value live across a cut (the
hidden state, masks, rotary tables, sizes) is an output of the stage before and an input of
the stage after; a size (a SymInt) crosses as the shape of an empty (s, 0) tensor, so
that each stage takes and returns tensors only (what torch.distributed.pipelining's
PipelineStage sends) and the size survives PipelineStage's shape inference, which runs a stage
on tensors of the right shapes but no values (a size carried as a value reads garbage there).

Scatter-gather at the cut (Megatron's): a value live across a cut that is the same on every
rank of the stage (`uniform_values`: the hidden state after its all-reduce, masks, rotary
tables) is cut along its largest static dim that m n divides (the hidden state (b, S, D): D,
the only static one) and stage p's rank (i, j) sends only its slice, (b, S, D/(m n)), to
stage p+1's rank (i, j), which all-gathers the slices over the stage's
ranks (helix.all_gather over "all") before first use: 1/(m n) of the bytes cross between
stages, and an all-gather inside the next stage (inside a node) puts them back together, as
cost.cost_pipeline_plan prices it. Shapes come from running rank 0's module on the capture's
fake (symbolic) inputs (`_fake_shapes`), so a dim is static exactly when the capture made it
so. A value that differs across ranks (a sequence-parallel shard), a size, a non-float
tensor or one with no such dim travels whole (`Crossing.why` says which).

Invariant: running the stages of a local rank one after another, each on the outputs of the
one before (the stage's ranks together, for their all-gathers), returns what the uncut rank
module returns.

`simulate_pipeline` runs a pp program in one process: per micro-batch, the m n ranks of stage
0 together (simulated collectives), then stage 1 on their outputs, ... (`HelixProgram.simulate`).
`run_pipeline_rank` runs one rank under torchrun with torch.distributed.pipelining
(PipelineStage + ScheduleGPipe over the mesh's "pipe" dim).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.fx.graph import CodeGen, _PyTreeCodeGen, _PyTreeInfo

from passes.graph_utils import attr_value

from .data import gather_replicas, shard_inputs
from .errors import HelixError, first_line
from .planning.cost import stage_of
from .runtime import collectives as _collectives  # noqa: F401  (registers torch.ops.helix)
from .runtime.mesh import Mesh
from .runtime.simulate import run_ranks

helix = torch.ops.helix
aten = torch.ops.aten


def _weight_users(gm: fx.GraphModule, names: set[str], shards: dict) -> list[int]:
    """Positions of the nodes that read a get_attr of one of the parameters `names`."""
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    flat = {x.replace(".", "_") for x in names}
    out = []
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        stored = shards.get(node.target, (None,))[0]
        if stored in names or node.target in flat or str(stored).replace(".", "_") in flat:
            out += [pos[u] for u in node.users]
    return out


def _blocks(summary) -> int:
    return max(len(summary.sites), len(summary.mlps))


def _block_weights(summary, k: int, entry: bool) -> set[str]:
    """Block k's entry weights (q/k/v, MLP up) or exit weights (output / down projection)."""
    out: set[str] = set()
    if k < len(summary.sites):
        s = summary.sites[k]
        out |= {s.q_weight, s.k_weight, s.v_weight} if entry else {s.o_weight} - {None}
    if k < len(summary.mlps) and (not entry or k >= len(summary.sites)):
        x = summary.mlps[k]
        out |= set(x.up_weights) if entry else {x.down_weight}
    return out


def _live(nodes: list, pos: dict, at: int) -> list:
    """Values defined before position `at` and used at or after it (get_attr nodes excepted:
    each stage reads its own parameters)."""
    return [n for n in nodes[:at] if n.op != "get_attr"
            and any(pos[u] >= at for u in n.users)]


def stage_cuts(gm: fx.GraphModule, summary, shards: dict, pp: int) -> list[int]:
    """Node positions where stages 1 .. pp-1 begin."""
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    blocks = _blocks(summary)
    cuts = []
    for p in range(1, pp):
        k = next(k for k in range(blocks) if stage_of(k, blocks, pp) == p)
        exits = _weight_users(gm, _block_weights(summary, k - 1, False), shards)
        entries = _weight_users(gm, _block_weights(summary, k, True), shards)
        if not exits or not entries or max(exits) >= min(entries):
            raise HelixError(f"pipeline cut before block {k}: its q/k/v (or MLP up) weights "
                             f"are not all read after block {k - 1}'s output weights in the rank "
                             f"graph (exits {sorted(exits)[-1:]}, entries {sorted(entries)[:1]}); "
                             f"this model cannot be cut into pp={pp} stages there, try pp=1")
        lo, hi = max(exits) + 1, min(entries)
        while hi > lo and nodes[hi - 1].op == "get_attr":   # a weight read stays with its user
            hi -= 1
        best = None
        for at in range(lo, hi + 1):
            live = _live(nodes, pos, at)
            if any(u.target is operator.getitem for n in live for u in n.users):
                continue   # never carry a tuple
            if best is None or len(live) < best[0]:
                best = (len(live), at)
        if best is None:
            raise HelixError(f"pipeline cut before block {k}: every position between node "
                             f"{nodes[lo].name} and {nodes[hi].name} carries a tuple; try pp=1")
        cuts.append(best[1])
    return cuts


@dataclass(frozen=True, slots=True, kw_only=True)
class Crossing:
    """How one value live across a stage cut travels: split along `dim` over the stage's m n
    ranks (each sends its `size` / (m n) slice, the next stage all-gathers), or whole
    (dim None, `why` says why)."""

    name: str                 # the node's name in the rank graph
    dim: int | None = None
    size: int = 0             # the static size of `dim`
    why: str = ""

    def __repr__(self) -> str:
        how = f"Split({self.dim}, {self.size})" if self.dim is not None else f"Whole({self.why})"
        return f"{self.name}: {how}"


# Collectives whose result is the same on every rank of the group they run over.
_SAME_ON_GROUP = {helix.all_reduce.default, helix.all_gather.default,
                  helix.all_reduce_start.default}


def _spans_stage(axes: str, mesh: Mesh) -> bool:
    return axes == "all" or (axes == "dim" and mesh.n == 1) or (axes == "head" and mesh.m == 1)


def _plain(x):
    """A rank_shards entry with its index arrays as tuples (comparable with ==)."""
    if isinstance(x, (list, tuple)):
        return tuple(_plain(y) for y in x)
    if hasattr(x, "tolist"):
        return ("array", tuple(x.tolist()) if getattr(x, "ndim", 1) else x.tolist())
    return x


def _same_attr(gms: list, nodes: tuple, shards: list | None) -> bool:
    """Every rank's get_attr reads the same tensor: the same checkpoint slice, or equal values."""
    if shards is not None and all(n.target in sh for n, sh in zip(nodes, shards)):
        keys = [_plain(sh[n.target]) for n, sh in zip(nodes, shards)]
        return all(k == keys[0] for k in keys[1:])
    ts = [attr_value(gm, n.target) for gm, n in zip(gms, nodes)]
    if not all(isinstance(t, torch.Tensor) and t.device.type != "meta" for t in ts):
        return False
    return all(t.shape == ts[0].shape and t.dtype == ts[0].dtype and torch.equal(t, ts[0])
               for t in ts[1:])


def uniform_values(gms: list, mesh: Mesh, shards: list | None = None) -> set[str]:
    """Names of the nodes whose value is the same on every one of the m n ranks (`gms`, rank
    order; `shards` their rank_shards). The graphs are walked together, a node matched by its
    name (the shard pass names a node alike on every rank; rank 0 alone may add a bias once):
    a node is uniform when every rank has it and runs the same op with the same literal
    arguments on uniform inputs (a placeholder, a parameter every rank holds whole), or when
    it is an all-reduce / all-gather over a group that spans the stage."""
    by_name = [{n.name: n for n in gm.graph.nodes} for gm in gms]
    same: set[str] = set()
    for a in gms[0].graph.nodes:
        nodes = tuple(names.get(a.name) for names in by_name)
        if any(x is None or x.op != a.op or x.target != a.target for x in nodes):
            continue
        if a.op == "placeholder":
            same.add(a.name)
        elif a.op == "get_attr":
            if _same_attr(gms, nodes, shards):
                same.add(a.name)
        elif a.op == "call_function":
            sigs = [fx.node.map_arg((x.args, x.kwargs), lambda y: f"%{y.name}") for x in nodes]
            try:
                if any(sig != sigs[0] for sig in sigs[1:]):
                    continue
            except RuntimeError:      # a tensor literal: not compared
                continue
            if (a.target in _SAME_ON_GROUP and _spans_stage(a.args[1], mesh)) or \
                    all(x.name in same for x in a.all_input_nodes):
                same.add(a.name)
    return same


def _fake_shapes(gm: fx.GraphModule) -> dict:
    """node -> its value's fake tensor (symbolic sizes where the capture made a dim dynamic),
    from running `gm` on its placeholders' capture-time fake values; {} when they have none."""
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode(vals)
    if mode is None:
        return {}
    out: dict = {}

    class _Record(fx.Interpreter):
        def run_node(self, n):
            out[n] = super().run_node(n)
            return out[n]

    allow = mode.allow_non_fake_inputs
    mode.allow_non_fake_inputs = True     # the module's own parameters are real tensors
    try:
        with mode, torch.no_grad():
            _Record(gm).run(*vals)
    finally:
        mode.allow_non_fake_inputs = allow
    return out


def plan_crossings(gms: list, cuts: list, mesh: Mesh, shards: list | None = None) -> list:
    """Per cut (stage 1 .. pp-1), a Crossing per value live across it, for the m n rank
    modules `gms` cut at `cuts` (each rank's stage_cuts). Where the ranks carry values of
    different names, every value travels whole."""
    parts = mesh.size
    live = []
    for gm, at in zip(gms, cuts):
        nodes = list(gm.graph.nodes)
        pos = {n: i for i, n in enumerate(nodes)}
        live.append([_live(nodes, pos, c) for c in at])
    if any([[x.name for x in cut] for cut in rank] != [[x.name for x in cut] for cut in live[0]]
           for rank in live[1:]):
        return [tuple(Crossing(name=x.name, why="the ranks carry different values")
                      for x in cut) for cut in live[0]]
    same = uniform_values(gms, mesh, shards) if parts > 1 else set()
    fake = _fake_shapes(gms[0]) if same else {}
    out = []
    for cut in live[0]:
        row = []
        for x in cut:
            v = fake.get(x)
            if _is_int(x):
                row.append(Crossing(name=x.name, why="a size"))
            elif parts == 1:
                row.append(Crossing(name=x.name, why="one rank per stage"))
            elif x.name not in same:
                row.append(Crossing(name=x.name, why="not the same on every rank of the stage"))
            elif not isinstance(v, torch.Tensor) or not v.is_floating_point():
                row.append(Crossing(name=x.name, why="not a floating-point tensor"))
            else:
                dims = [(s, d) for d, s in enumerate(v.shape)
                        if isinstance(s, int) and s and s % parts == 0]
                if not dims:
                    row.append(Crossing(name=x.name, why=f"no static dim of {tuple(v.shape)} "
                                                         f"divisible by m n = {parts}"))
                else:
                    size, dim = max(dims)
                    row.append(Crossing(name=x.name, dim=dim, size=size))
        out.append(tuple(row))
    return out


def _is_int(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (
        torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default) or \
        isinstance(node.meta.get("val"), (int, torch.SymInt))


def split_rank_module(gm: fx.GraphModule, cuts: list[int], name: str, crossings: list | None = None,
                      mesh: Mesh | None = None, rank: int = 0) -> list[fx.GraphModule]:
    """`gm` (rank `rank` of `mesh`) cut at `cuts` into len(cuts) + 1 stage modules (see the
    module docstring); `crossings` (plan_crossings) says which carried values are split over
    the stage's ranks (none without it)."""
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    bounds = [0, *cuts, len(nodes) - 1]          # the output node is the last stage's
    info = getattr(gm.graph._codegen, "pytree_info", None)
    out = []
    for p in range(len(bounds) - 1):
        g = fx.Graph()
        env: dict = {}
        inputs = _live(nodes, pos, bounds[p]) if p else []
        split_in = _splits(crossings, p - 1, inputs) if p else {}
        holders = []
        for x in inputs:
            ph = g.placeholder(f"{'size' if _is_int(x) else 'in'}_{x.name}")
            holders.append(ph.name)
            env[x] = (g.call_function(torch.ops.aten.sym_size.int, (ph, 0)) if _is_int(x)
                      else ph)
            if x in split_in:   # the slices of the stage's ranks, in rank order
                c = split_in[x]
                env[x] = g.call_function(helix.all_gather.default,
                                         (ph, "all", c.dim, [c.size // mesh.size] * mesh.size))
        body = nodes[bounds[p]:bounds[p + 1]] + ([nodes[-1]] if p == len(bounds) - 2 else [])

        def arg(n, p=p):
            if n not in env:
                if n.op == "get_attr":    # a weight another stage also reads: read it here
                    env[n] = g.get_attr(n.target)
                else:
                    raise HelixError(f"stage {p}: value {n.name} is used but neither carried "
                                     f"nor computed here; this is a Helix bug")
            return env[n]
        for node in body:
            if node.op == "placeholder" and p:
                continue
            if node.op == "output":
                g.output(fx.node.map_arg(node.args[0], arg))
                break
            env[node] = g.node_copy(node, arg)
        if p < len(bounds) - 2:
            carried = []
            live = _live(nodes, pos, bounds[p + 1])
            split_out = _splits(crossings, p, live)
            for x in live:
                v = arg(x)
                if x in split_out:   # this rank's slice, contiguous for the send
                    c = split_out[x]
                    step = c.size // mesh.size
                    v = g.call_function(aten.slice.Tensor, (v, c.dim, rank * step,
                                                            (rank + 1) * step))
                    v = g.call_function(aten.clone.default, (v,),
                                        {"memory_format": torch.contiguous_format})
                # the device is repointed with the module (runtime.graphs.on_device)
                carried.append(g.call_function(aten.empty.memory_format, ([v, 0],),
                                               {"dtype": torch.int8,
                                                "device": torch.device("cpu")})
                               if _is_int(x) else v)
            g.output(tuple(carried))
        if p == 0 and info is not None:
            g._codegen = _PyTreeCodeGen(_PyTreeInfo(info.orig_args, info.in_spec, None))
        elif p == len(bounds) - 2 and info is not None:
            spec = torch.utils._pytree.tree_structure((tuple(range(len(inputs))), {}))
            g._codegen = _PyTreeCodeGen(_PyTreeInfo(holders, spec,
                                                    info.out_spec))
        else:
            g._codegen = CodeGen()
        g.lint()
        out.append(fx.GraphModule(gm, g, class_name=f"{name}Stage{p}"))
    return out


def _splits(crossings: list | None, cut: int, live: list) -> dict:
    """node -> its Crossing, for the values of `live` split at cut `cut` (stage cut + 1)."""
    if not crossings:
        return {}
    if [c.name for c in crossings[cut]] != [x.name for x in live]:
        raise HelixError(f"cut {cut}: the crossings were planned for values "
                         f"{[c.name for c in crossings[cut]]}, but {[x.name for x in live]} "
                         f"are live there; this is a Helix bug")
    return {x: c for x, c in zip(live, crossings[cut]) if c.dim is not None}


def simulate_pipeline(program, args: tuple, kwargs: dict, micro_batches: int | None = None) -> list:
    """Every rank's output of a pp > 1 program in one process: each replica's batch cut into the
    plan's M micro-batches (or `micro_batches`; data.shard_inputs), and per micro-batch stage 0's m n ranks run
    together, then stage 1's on their outputs, and so on. A last-stage rank returns the model's
    output for its replica's rows (micro-batches joined along dim 0), an earlier stage's rank
    the list, one per micro-batch, of the tuples of tensors it sends on."""

    gm, plan, size = program.analysis.captured.gm, program.plan, program.mesh.size
    stages = [program.stage_modules(local) for local in range(size)]
    micro = micro_batches or plan.cost.micro_batches
    outs: list = []
    for d, (a, k) in enumerate(shard_inputs(gm, args, kwargs, program.dp)):
        per_stage: list[list] = [[[] for _ in range(size)] for _ in range(plan.pp)]
        batch = next(x for x in torch.utils._pytree.tree_leaves((a, k))
                     if isinstance(x, torch.Tensor)).shape[0]
        if batch % micro:
            raise HelixError(f"{plan.name}: M={micro} micro-batches need each replica's batch "
                             f"({batch} sequences) to split evenly; feed a batch that is a "
                             f"multiple of {micro}, or pass micro_batches=")
        count = micro
        for mb, (ma, mk) in enumerate(shard_inputs(gm, a, k, count)):
            program._check_static_shapes(ma, mk)
            carried = None
            for p in range(plan.pp):
                if p == 0:
                    mods, ra, rk = [st[0] for st in stages], ma, mk
                else:
                    mods = [(lambda st=st, c=c: st[p](*c)) for st, c in zip(stages, carried)]
                    mods = [_NoArgs(f) for f in mods]
                    ra, rk = (), {}
                try:
                    carried = run_ranks(mods, program.mesh, ra, rk)
                except HelixError as e:
                    raise HelixError(f"replica {d}, micro-batch {mb}, stage {p}: "
                                     f"{first_line(e)}") from e
                for r in range(size):
                    per_stage[p][r].append(carried[r])
        for p in range(plan.pp - 1):
            outs += per_stage[p]
        outs += [gather_replicas(per_stage[-1][r], len(per_stage[-1][r]), 1) for r in range(size)]
    return outs


class _NoArgs:
    """A stage after the first, bound to its carried inputs (run_ranks passes none)."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn()


def pipeline_schedule(program, rank: int, module, pipe_group, device, micro_batches: int):
    """Rank r's stage `module` (program.stage_module(r), on `device`) as a PipelineStage on
    `pipe_group` (the DeviceMesh's "pipe" dim: the ranks of r's replica and (i, j) across
    stages), run by ScheduleGPipe over `micro_batches` micro-batches: `step(*args)` on stage
    0, `step()` on the others, the model output of the replica's rows on the last stage."""
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    p = program.stage_index(rank)
    stage = PipelineStage(module, p, program.plan.pp, device, group=pipe_group)
    return ScheduleGPipe(stage, micro_batches)


def run_pipeline_rank(program, rank: int, args: tuple, pipe_group, device,
                      micro_batches: int) -> object:
    """Rank r's part of one forward step under torchrun, through torch.distributed.pipelining
    (`pipeline_schedule`). Stage 0 feeds `args` (the replica's batch, positional tensors
    only); the last stage returns the model output of the replica's rows, the others None.
    The rank's collectives must be bound (collectives.DistributedBackend) by the caller."""
    p = program.stage_index(rank)
    schedule = pipeline_schedule(program, rank, program.stage_module(rank), pipe_group, device,
                                 micro_batches)
    with torch.no_grad():
        if p == 0:
            return schedule.step(*args)
        return schedule.step()
