"""HelixProgram: a plan and one executable GraphModule per rank (a value).

`rank_module(r)` is a GraphModule whose code a user can read, collectives
visible as `torch.ops.helix.*` calls: the graph the shard pass emitted for rank
r, rewritten by the per-rank passes (`rank_passes`, listed in pipeline.py), in
order.  `simulate()` runs those very modules, all N in this process, one thread
each, their collectives carried out among them (collectives.SimulatedBackend).
`save(dir)` writes each rank as a JSON graph plus a weights file;
`load_rank_module(dir, rank)` reads one rank back without the model's code,
weights read with weights_only=True (a pp program's rank: its stage module).

A program is not changed once made: its fields are frozen, the rank modules it
builds are cached privately, and `recompile` returns a new program.

A plan with dp > 1 data replicas (plan.dp, helix_compiler/data.py) has dp * m * n
ranks: rank r = d m n + local runs the m x n program's module of `local` (the same
object for every replica d, so weights are not copied) on the batch rows of shard d;
`mesh` is one replica's (n, m) and every collective means the caller's replica.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree
from torch.fx.graph import CodeGen

from .runtime import collectives  # noqa: F401  (registers torch.ops.helix: saved rank graphs call them)
from .runtime import masks  # noqa: F401  (registers helix.size_mask: saved rank graphs call it)
from .capture import Captured
from .data import gather_replicas, shard_inputs
from .errors import HelixError, first_line
from .runtime.graphs import build_module, on_device
from .runtime.mesh import Mesh
from .runtime.simulate import run_ranks
from .planning.plan import Plan
from .stages import plan_crossings, simulate_pipeline, split_rank_module, stage_cuts
from .runtime.serialize import graph_from_json, graph_to_json
from .planning.sites import ModelSummary
from .runtime.weights import load_rank_weights

__all__ = ["Analysis", "HelixProgram", "LoadedRank", "Source", "build_module", "load_rank_module",
           "on_device", "run_ranks"]

FORMAT_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class Analysis:
    """What the model passes (capture ... summarize, pipeline.py) learned about a model."""

    captured: Captured
    matches: tuple            # find_attention.SiteMatch per site, graph order
    skipped: tuple            # notes on attention cores left unsharded
    mlps: tuple               # MlpSite
    summary: ModelSummary
    timings: tuple = ()       # (pass name, seconds), in the order the passes ran
    views: dict | None = None  # derived parameter name -> fold_params.ParamView
    unpartitioned: tuple = ()  # plan.UnpartitionedCore: attention cores every rank runs whole


@dataclass(frozen=True, kw_only=True)
class Source:
    """What helix_compile was given, kept for a static recapture (pipeline.py)."""

    model: torch.nn.Module
    example_inputs: tuple
    example_kwargs: dict | None
    cluster: object
    profile: object
    verbose: bool = False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True, eq=False, kw_only=True)
class HelixProgram:
    """The compiled program: `plan`, `rank_module(r)`, `simulate()`, `save()`.

    Made by pipeline.py (`helix_compile`), never changed afterwards: `recompile` gives a
    program for another split, `dataclasses.replace(program, kernel_choice=...)` one with
    another kernel choice (both start with no rank module built)."""

    plan: Plan
    analysis: Analysis
    mesh: Mesh
    kernel_choice: bool = False       # the kernel_choice rank pass rewrites cores (chunked explicit)
    notes: tuple[str, ...] = ()       # capture notes, a static recapture's reason
    timings: tuple = ()               # (pass name, seconds): the analysis's, then plan ... shard
    rank_passes: tuple = ()           # pipeline.RANK_PASSES: what rank_module(r) applies, in order
    _localized: object = field(default=None, repr=False)  # shard.Localized: placements, some graphs
    _localize: Callable | None = field(default=None, repr=False)   # ranks -> Localized with their graphs
    _recompile: Callable | None = field(default=None, repr=False)  # pipeline.recompile
    _source: Source | None = field(default=None, repr=False)
    # derived caches (rank -> Localized / GraphModule): built on first use, never set from outside
    _per_rank: dict = field(default_factory=dict, init=False, repr=False)
    _modules: dict = field(default_factory=dict, init=False, repr=False)
    _stages: dict = field(default_factory=dict, init=False, repr=False)  # local -> stages; "cuts"

    def recompile(self, plan: tuple[int, ...] | Plan | None = None, devices: int | None = None,
                  variant: str | None = None, cluster: object = None,
                  profile: object = None) -> HelixProgram:
        """This program's capture, planned and sharded for another split (plan=(m, n), or
        (dp, m, n) for dp data replicas of it) or device count, without capturing the model
        again: a new program; this one is left as it is."""
        if self._recompile is None:
            raise HelixError("this HelixProgram was not made by helix_compile, so it cannot be "
                             "recompiled; compile the model with helix_compile")
        return self._recompile(self, plan, devices=devices, variant=variant, cluster=cluster,
                               profile=profile)

    @property
    def dp(self) -> int:
        """Data replicas of the m x n program (plan.dp; 1: no batch split)."""
        return self.plan.dp

    @property
    def pp(self) -> int:
        """Pipeline stages (plan.pp; 1: no stage cut)."""
        return self.plan.pp

    @property
    def replica_devices(self) -> int:
        """m * n: the ranks of one replica's stage."""
        return self.mesh.size

    @property
    def devices(self) -> int:
        return self.dp * self.pp * self.mesh.size

    def replica_of(self, rank: int) -> tuple[int, int]:
        """(replica d, local rank in the m x n program) of rank r = ((d pp + p) n + i) m + j."""
        self._check_rank(rank)
        d, rest = divmod(rank, self.pp * self.mesh.size)
        return d, rest % self.mesh.size

    def stage_index(self, rank: int) -> int:
        """The pipeline stage p of rank r (0 when pp = 1)."""
        self._check_rank(rank)
        return rank // self.mesh.size % self.pp

    def stage_module(self, rank: int) -> fx.GraphModule:
        """What rank r runs: its stage's piece of its (i, j) module (rank_module(r) if pp = 1)."""
        if self.pp == 1:
            return self.rank_module(rank)
        return self.stage_modules(self._local(rank))[self.stage_index(rank)]

    def stage_modules(self, local: int) -> list:
        """The m x n program's rank `local` module cut into pp stage modules (stages.py), the
        values that cross each cut split over the stage's ranks where `crossings` says so."""

        if local not in self._stages:
            cuts, crossings = self._cuts()
            self._stages[local] = split_rank_module(self.rank_module(local), cuts[local],
                                                    f"HelixRank{local}", crossings, self.mesh,
                                                    local)
        return self._stages[local]

    def crossings(self) -> list:
        """Per stage cut, how each value live across it travels (stages.Crossing): split over
        the stage's m n ranks (scatter-gather) or whole, and why. Decided from every local
        rank's module, so the first call builds all m n of them."""
        return self._cuts()[1]

    def _cuts(self) -> tuple[list, list]:
        """(each local rank's cut positions, plan_crossings) of a pp > 1 program, cached."""

        if "cuts" not in self._stages:
            ranks = range(self.mesh.size)
            gms = [self.rank_module(r) for r in ranks]
            shards = [self.rank_shards(r) for r in ranks]
            cuts = [stage_cuts(gm, self.summary, sh, self.pp) for gm, sh in zip(gms, shards)]
            self._stages["cuts"] = (cuts, plan_crossings(gms, cuts, self.mesh, shards))
        return self._stages["cuts"]

    @property
    def summary(self) -> ModelSummary:
        return self.analysis.summary

    @property
    def unpartitioned(self) -> tuple:
        """Attention cores no site owns (plan.UnpartitionedCore): every rank runs them whole."""
        return self.plan.unpartitioned

    @property
    def replicated_ops(self) -> list:
        """Ops with no sharding rule, run on replicated inputs (a collective before each)."""
        return list(self._localized.replicated)

    def _check_rank(self, rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.devices:
            split = f" ({self.plan.name})" if self.dp > 1 else ""
            raise HelixError(f"rank must be an integer in [0, {self.devices}){split}, got {rank!r}")

    def _local(self, rank: int) -> int:
        """Rank r's rank in its replica's m x n program (r itself when dp = 1)."""
        return self.replica_of(rank)[1]

    def emitted_module(self, rank: int) -> fx.GraphModule:
        """Rank r's module as the shard pass emitted it, before the per-rank passes (a new
        module on each call); a replica's rank r is the m x n program's rank r % (m n)."""
        rank = self._local(rank)
        loc = self._rank_localized(rank)
        return build_module(loc.graphs[rank], loc.attrs[rank], f"HelixRank{rank}")

    def apply_rank_passes(self, rank: int, gm: fx.GraphModule,
                          each: Callable | None = None) -> fx.GraphModule:
        """`rank_passes` applied in order to rank r's module `gm` (as emitted, in place);
        `each(pass, gm)` is called after each."""
        for p in self.rank_passes:
            gm = p.run_rank(gm, self, rank)
            if each is not None:
                each(p, gm)
        return gm

    def rank_module(self, rank: int, weights: str | Path | None = None) -> fx.GraphModule:
        """Rank r's GraphModule: the shard pass's graph for rank r, then `rank_passes`.
        weights=PATH reads only its slices from a checkpoint (a torch state_dict file or a
        directory of safetensors files), memory-mapped, into a module on the CPU (the devices
        its graph names, meta for a model built under `empty_weights()`, pointed there too;
        `on_device(gm, "cuda")` moves it on). With dp > 1 replicas, every replica's rank r is
        the one module of local rank r % (m n). With pp > 1 stages this is the uncut module
        of r's (i, j); `stage_module(r)` is the piece rank r runs."""
        rank = self._local(rank)
        if weights is not None:
            loc = self._rank_localized(rank)
            buffers = {name for name, _ in self.analysis.captured.gm.named_buffers()}
            tensors = load_rank_weights(loc.shards[rank], loc.attrs[rank], weights, buffers)
            gm = build_module(loc.graphs[rank], tensors, f"HelixRank{rank}")
            return on_device(self.apply_rank_passes(rank, gm), "cpu")
        if rank not in self._modules:
            self._modules[rank] = self.apply_rank_passes(rank, self.emitted_module(rank))
        return self._modules[rank]

    def _rank_localized(self, rank: int):
        if any(n.op == "output" for n in self._localized.graphs[rank].nodes):
            return self._localized
        if rank not in self._per_rank:
            self._per_rank[rank] = self._localize({rank})
        return self._per_rank[rank]

    def rank_weights(self, rank: int) -> dict:
        """Rank r's tensors by attribute name (its weight slices and index constants)."""
        rank = self._local(rank)
        return self._rank_localized(rank).attrs[rank]

    def rank_shards(self, rank: int) -> dict:
        """attr name -> (stored parameter name, ((dim, global indices), ...), dim permutation or
        None) for rank r: how to read its tensor from a checkpoint of the model."""
        rank = self._local(rank)
        return self._rank_localized(rank).shards[rank]

    def collectives(self, rank: int) -> dict:
        """Collective calls in rank r's graph, counted by "kind:axes" (axes mean r's replica)."""
        counts: dict = {}
        for node in self.rank_module(rank).graph.nodes:
            if node.op == "call_function" and getattr(node.target, "namespace", None) == "helix" \
                    and node.target._opname in ("all_reduce", "all_gather"):
                key = f"{node.target._opname}:{node.args[1]}"
                counts[key] = counts.get(key, 0) + 1
        return counts

    def reference(self, *args: object, **kwargs: object) -> object:
        """The unsharded captured model's output."""
        with torch.no_grad():
            return self.analysis.captured.gm(*args, **kwargs)

    def simulate(self, *args: object, **kwargs: object) -> list:
        """Every rank's output, from the modules rank_module returns, run together in this
        process. With dp > 1 replicas, replica d's m n ranks run on batch shard d (`shard_inputs`),
        one replica after another: rank r's output is the output of its replica's rows. With
        pp > 1 stages, stages.simulate_pipeline: a last-stage rank's output is the model's."""
        if self.pp > 1:

            return simulate_pipeline(self, args, kwargs)
        modules = [self.rank_module(r) for r in range(self.mesh.size)]
        if self.dp == 1:
            self._check_static_shapes(args, kwargs)
            return run_ranks(modules, self.mesh, args, kwargs)
        outs = []
        for d, (a, k) in enumerate(self.shard_inputs(*args, **kwargs)):
            self._check_static_shapes(a, k)
            try:
                outs += run_ranks(modules, self.mesh, a, k)
            except HelixError as e:
                raise HelixError(f"replica {d} of {self.dp}: {first_line(e)}") from e
        return outs

    def shard_inputs(self, *args: object, **kwargs: object) -> list[tuple[tuple, dict]]:
        """The dp (args, kwargs) shards: every input whose dim 0 is the batch, cut into dp
        contiguous equal parts; other inputs are given whole to every replica (data.py)."""

        return shard_inputs(self.analysis.captured.gm, args, kwargs, self.dp)

    def gather(self, outputs: list) -> object:
        """The whole batch's output from simulate's (or every rank's) outputs: replica d's first
        rank's output, concatenated along dim 0 (data.gather_replicas)."""

        return gather_replicas(outputs, self.dp, self.mesh.size)

    def _check_static_shapes(self, args: tuple, kwargs: dict) -> None:
        """Sizes the capture fixed (a static capture, or an example size of 1) must be given again."""
        gm = self.analysis.captured.gm
        info = getattr(gm.graph._codegen, "pytree_info", None)
        if info is None:
            return
        try:
            leaves = fx_pytree.tree_flatten_spec((args, kwargs), info.in_spec)
        except Exception as e:
            raise HelixError(f"inputs do not match the example inputs' structure ({first_line(e)}); "
                             f"pass the same arguments the program was compiled with") from e
        holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for node, x in zip(holders, leaves):
            v = node.meta.get("val")
            if not isinstance(v, torch.Tensor) or not isinstance(x, torch.Tensor):
                continue
            for dim, (want, got) in enumerate(zip(v.shape, x.shape)):
                if isinstance(want, int) and want != got:
                    why = "; ".join(self.notes) or (
                        "export fixes sizes of 1" if want == 1 else "the model fixes this size")
                    raise HelixError(
                        f"input {node.name} dim {dim} has size {got}, but this program was captured "
                        f"with it fixed at {want} ({why}); compile with example inputs of the sizes you "
                        f"will run (sizes > 1 for the batch and sequence dims make them dynamic)")

    # ---- save / load ---------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Plan + graph + weight shapes: ranks check at start-up that they hold the same program."""
        h = hashlib.sha256()
        h.update(f"{self.plan.m}x{self.plan.n}:{self.devices}".encode())
        if self.dp > 1:
            h.update(f"dp{self.dp}".encode())
        if self.pp > 1:
            h.update(f"pp{self.pp}".encode())
        h.update(self.analysis.captured.gm.code.encode())
        for k, t in sorted(self.analysis.captured.params.items()):
            h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        return h.hexdigest()[:16]

    def save(self, directory: str | Path) -> Path:
        """Each rank's module (with pp > 1 stages, its stage module) as a JSON graph and a
        weights file, and a manifest (plan, hashes; pp, each rank's stage and the micro-batch
        count M of a pp program); `load_rank_module` reads one rank back."""
        if self.dp > 1:
            raise HelixError(f"save of a dp={self.dp} program is not supported yet; save the m x n "
                             f"program (recompile with plan=({self.plan.m}, {self.plan.n})): every "
                             f"replica loads the same {self.mesh.size} rank files")
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT_VERSION, "devices": self.devices, "m": self.plan.m, "n": self.plan.n,
                    "fingerprint": self.fingerprint(), "ranks": []}
        if self.pp > 1:
            manifest.update(pp=self.pp, micro_batches=self.plan.cost.micro_batches)
        (d / "plan.yaml").write_text(self.plan.to_yaml())
        in_spec = out_spec = None
        codegen = self.analysis.captured.gm.graph._codegen
        info = getattr(codegen, "pytree_info", None)
        if info is not None:
            try:
                in_spec = pytree.treespec_dumps(info.in_spec)
            except Exception:
                in_spec = None
        manifest["in_spec"] = in_spec
        for r in range(self.devices):
            if self.pp > 1:   # the stage's piece: the weights its graph reads
                gm = self.stage_module(r)
                tensors = dict(gm.named_buffers())
            else:
                gm, tensors = self.rank_module(r), self.rank_weights(r)
            gfile, wfile = d / f"rank{r}.graph.json", d / f"rank{r}.weights.pt"
            gfile.write_text(json.dumps(graph_to_json(gm.graph)))
            torch.save({k: t.contiguous() for k, t in tensors.items()}, wfile)
            entry = {"graph": gfile.name, "weights": wfile.name,
                     "graph_sha256": _sha256(gfile), "weights_sha256": _sha256(wfile)}
            if self.pp > 1:   # a later stage takes the tensors the one before sends, flat
                entry["stage"] = self.stage_index(r)
            manifest["ranks"].append(entry)
        (d / "manifest.json").write_text(json.dumps(manifest, indent=1))
        return d


class LoadedRank(torch.nn.Module):
    """A rank module read back from `save`: takes the model's flattened inputs, returns flat outputs."""

    def __init__(self, gm: fx.GraphModule, in_spec: pytree.TreeSpec | None, rank: int, manifest: dict):
        super().__init__()
        self.gm = gm
        self.rank = rank
        self.in_spec = in_spec
        self.manifest = manifest

    @property
    def mesh(self) -> Mesh:
        """The program's (n, m) mesh: bind `collectives.DistributedBackend(module.mesh, ...)`."""
        return Mesh(n=self.manifest["n"], m=self.manifest["m"])

    @property
    def stage(self) -> int:
        """The pipeline stage this rank runs (0 when the program has pp = 1): stage 0 takes
        the model's inputs, a later one the flat tensors the stage before returns."""
        return self.manifest["ranks"][self.rank].get("stage", 0)

    def forward(self, *args: object, **kwargs: object) -> object:
        if self.in_spec is None:
            leaves = pytree.tree_leaves((args, kwargs))
        else:
            leaves = fx_pytree.tree_flatten_spec((args, kwargs), self.in_spec)
        return self.gm(*leaves)


def load_rank_module(directory: str | Path, rank: int) -> LoadedRank:
    """Load one rank of a saved program; files are checked against the manifest's hashes."""
    d = Path(directory)
    mpath = d / "manifest.json"
    if not mpath.is_file():
        raise HelixError(f"{mpath}: no manifest; is {d} a directory written by HelixProgram.save()?")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise HelixError(f"{mpath}: not valid JSON (line {e.lineno}); save the program again") from e
    n = manifest.get("devices")
    if not isinstance(rank, int) or not isinstance(n, int) or not 0 <= rank < n:
        raise HelixError(f"rank must be an integer in [0, {n}) for the program in {d}, got {rank!r}")
    entry = manifest["ranks"][rank]
    gfile, wfile = d / entry["graph"], d / entry["weights"]
    for f, key in ((gfile, "graph_sha256"), (wfile, "weights_sha256")):
        if not f.is_file():
            raise HelixError(f"{f}: rank file is missing; save the program again")
        if _sha256(f) != entry[key]:
            raise HelixError(f"{f}: contents do not match the manifest (modified or corrupt); save the program again")
    graph = graph_from_json(json.loads(gfile.read_text()))
    tensors = torch.load(wfile, weights_only=True, map_location="cpu")
    graph._codegen = CodeGen()
    gm = build_module(graph, tensors, f"HelixRank{rank}")
    spec = manifest.get("in_spec") if entry.get("stage", 0) == 0 else None
    return LoadedRank(gm, pytree.treespec_loads(spec) if spec else None, rank, manifest)
