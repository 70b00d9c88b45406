"""HelixProgram: a plan and one executable GraphModule per rank.

`rank_module(r)` is a GraphModule whose code a user can read, collectives
visible as `torch.ops.helix.*` calls.  `simulate()` runs those very modules,
all N in this process, one thread each, their collectives carried out among
them (collectives.SimulatedBackend).  `save(dir)` writes each rank as a JSON
graph plus a weights file; `load_rank_module(dir, rank)` reads one rank back
without the model's code, weights read with weights_only=True.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from . import collectives
from .errors import HelixError, first_line
from .mesh import Mesh

FORMAT_VERSION = 1


def build_module(graph: fx.Graph, tensors: dict, name: str) -> fx.GraphModule:
    root = torch.nn.Module()
    for k, t in tensors.items():
        root.register_buffer(k, t)
    g = fx.Graph()
    g._codegen = graph._codegen
    g.output(g.graph_copy(graph, {}))  # each module owns its graph
    return fx.GraphModule(root, g, class_name=name)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def on_device(gm: fx.GraphModule, device) -> fx.GraphModule:
    """`gm` with its parameters and buffers on `device`, and every device its graphs name
    (factory calls such as arange, `.to(device=...)`, export's metadata asserts) pointed there
    too: a graph captured on the CPU or on meta then runs on the GPU. In place; returns gm."""
    device = torch.device(device)
    gm.to(device)

    def repoint(a):
        return device if isinstance(a, torch.device) else a

    for sub in gm.modules():
        if not isinstance(sub, fx.GraphModule):
            continue
        for node in sub.graph.nodes:
            node.args = fx.node.map_aggregate(node.args, repoint)
            node.kwargs = fx.node.map_aggregate(node.kwargs, repoint)
        sub.recompile()
    return gm


def run_ranks(modules, mesh: Mesh, args, kwargs, timeout_s: float = 300.0) -> list:
    """Run rank modules concurrently in this process with simulated collectives."""
    sim = collectives.SimulatedBackend(mesh, timeout_s=timeout_s)
    outs, errors = [None] * len(modules), [None] * len(modules)

    def go(r):
        collectives.bind(sim.for_rank(r))
        try:
            with torch.no_grad():
                outs[r] = modules[r](*args, **kwargs)
        except BaseException as e:  # reported below, with the rank
            errors[r] = e
            sim.abort(e)
        finally:
            collectives.bind(None)

    threads = [threading.Thread(target=go, args=(r,), name=f"helix-rank-{r}") for r in range(len(modules))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = [(r, e) for r, e in enumerate(errors) if e is not None and not isinstance(e, collectives._Aborted)]
    if first:
        r, e = first[0]
        raise HelixError(f"rank {r} failed in simulation: {first_line(e)}") from e
    if any(e is not None for e in errors):
        r = next(r for r, e in enumerate(errors) if e is not None)
        raise HelixError(f"rank {r} failed in simulation: {errors[r]}") from errors[r]
    return outs


class HelixProgram:
    """The compiled program: `plan`, `rank_module(r)`, `simulate()`, `save()`."""

    def __init__(self, *, plan, analysis, localized, mesh: Mesh, localize=None):
        self.plan = plan
        self.analysis = analysis
        self.mesh = mesh
        self._localized = localized       # placements for all ranks; graphs for some
        self._localize = localize         # active ranks -> Localized (emits the missing graphs)
        self._per_rank: dict = {}
        self._modules: dict = {}
        self.kernel_choice = False        # set by helix_compile: chunked explicit cores for large d
        self._source = None               # helix_compile's model and inputs, for a static recapture
        self.notes: list = [analysis.captured.note] if analysis.captured.note else []

    def recompile(self, plan=None, devices=None, variant=None, cluster=None, profile=None) -> "HelixProgram":
        """This program's capture, planned and sharded for another split (plan=(m, n)) or device
        count, without capturing the model again."""
        from .api import recompile

        return recompile(self, plan, devices=devices, variant=variant, cluster=cluster, profile=profile)

    @property
    def devices(self) -> int:
        return self.mesh.size

    @property
    def summary(self):
        return self.analysis.summary

    @property
    def unpartitioned(self) -> tuple:
        """Attention cores no site owns (plan.UnpartitionedCore): every rank runs them whole."""
        return self.plan.unpartitioned

    @property
    def replicated_ops(self) -> list:
        """Ops with no sharding rule, run on replicated inputs (a collective before each)."""
        return list(self._localized.replicated)

    def rank_module(self, rank: int, weights=None) -> fx.GraphModule:
        """Rank r's GraphModule; weights=PATH reads only its slices from a checkpoint
        (a torch state_dict file or a directory of safetensors files), memory-mapped, into a
        module on the CPU (the devices its graph names, meta for a model built under
        `empty_weights()`, pointed there too; `on_device(gm, "cuda")` moves it on)."""
        if not isinstance(rank, int) or not 0 <= rank < self.devices:
            raise HelixError(f"rank must be an integer in [0, {self.devices}), got {rank!r}")
        if weights is not None:
            from .weights import load_rank_weights

            loc = self._rank_localized(rank)
            buffers = {name for name, _ in self.analysis.captured.gm.named_buffers()}
            tensors = load_rank_weights(loc.shards[rank], loc.attrs[rank], weights, buffers)
            return on_device(self._finish(build_module(loc.graphs[rank], tensors, f"HelixRank{rank}")), "cpu")
        if rank not in self._modules:
            loc = self._rank_localized(rank)
            self._modules[rank] = self._finish(build_module(loc.graphs[rank], loc.attrs[rank], f"HelixRank{rank}"))
        return self._modules[rank]

    def _finish(self, gm: fx.GraphModule) -> fx.GraphModule:
        from passes.size_masks import apply_size_masks

        if self.kernel_choice:
            from passes.kernel_choice import apply_kernel_choice

            apply_kernel_choice(gm)
        return apply_size_masks(gm)

    def _rank_localized(self, rank: int):
        if any(n.op == "output" for n in self._localized.graphs[rank].nodes):
            return self._localized
        if rank not in self._per_rank:
            self._per_rank[rank] = self._localize({rank})
        return self._per_rank[rank]

    def rank_weights(self, rank: int) -> dict:
        """Rank r's tensors by attribute name (its weight slices and index constants)."""
        return self._rank_localized(rank).attrs[rank]

    def rank_shards(self, rank: int) -> dict:
        """attr name -> (stored parameter name, ((dim, global indices), ...), dim permutation or
        None) for rank r: how to read its tensor from a checkpoint of the model."""
        return self._rank_localized(rank).shards[rank]

    def collectives(self, rank: int) -> dict:
        """Collective calls in rank r's graph, counted by "kind:axes"."""
        counts: dict = {}
        for node in self.rank_module(rank).graph.nodes:
            if node.op == "call_function" and getattr(node.target, "namespace", None) == "helix" \
                    and node.target._opname in ("all_reduce", "all_gather"):
                key = f"{node.target._opname}:{node.args[1]}"
                counts[key] = counts.get(key, 0) + 1
        return counts

    def reference(self, *args, **kwargs):
        """The unsharded captured model's output."""
        with torch.no_grad():
            return self.analysis.captured.gm(*args, **kwargs)

    def simulate(self, *args, **kwargs) -> list:
        """Every rank's output, from the modules rank_module returns, run together in this process."""
        self._check_static_shapes(args, kwargs)
        modules = [self.rank_module(r) for r in range(self.devices)]
        return run_ranks(modules, self.mesh, args, kwargs)

    def _check_static_shapes(self, args, kwargs) -> None:
        """Sizes the capture fixed (a static capture, or an example size of 1) must be given again."""
        import torch.fx._pytree as fx_pytree

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
        h.update(self.analysis.captured.gm.code.encode())
        for k, t in sorted(self.analysis.captured.params.items()):
            h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        return h.hexdigest()[:16]

    def save(self, directory) -> Path:
        from .serialize import graph_to_json

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT_VERSION, "devices": self.devices, "m": self.plan.m, "n": self.plan.n,
                    "fingerprint": self.fingerprint(), "ranks": []}
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
            gm = self.rank_module(r)
            gfile, wfile = d / f"rank{r}.graph.json", d / f"rank{r}.weights.pt"
            gfile.write_text(json.dumps(graph_to_json(gm.graph)))
            torch.save({k: t.contiguous() for k, t in self.rank_weights(r).items()}, wfile)
            manifest["ranks"].append({"graph": gfile.name, "weights": wfile.name,
                                      "graph_sha256": _sha256(gfile), "weights_sha256": _sha256(wfile)})
        (d / "manifest.json").write_text(json.dumps(manifest, indent=1))
        return d


class LoadedRank(torch.nn.Module):
    """A rank module read back from `save`: takes the model's flattened inputs, returns flat outputs."""

    def __init__(self, gm: fx.GraphModule, in_spec, rank: int, manifest: dict):
        super().__init__()
        self.gm = gm
        self.rank = rank
        self.in_spec = in_spec
        self.manifest = manifest

    @property
    def mesh(self) -> Mesh:
        """The program's (n, m) mesh: bind `collectives.DistributedBackend(module.mesh, ...)`."""
        return Mesh(n=self.manifest["n"], m=self.manifest["m"])

    def forward(self, *args, **kwargs):
        if self.in_spec is None:
            leaves = pytree.tree_leaves((args, kwargs))
        else:
            import torch.fx._pytree as fx_pytree
            leaves = fx_pytree.tree_flatten_spec((args, kwargs), self.in_spec)
        return self.gm(*leaves)


def load_rank_module(directory, rank: int) -> LoadedRank:
    """Load one rank of a saved program; files are checked against the manifest's hashes."""
    from .serialize import graph_from_json

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
    from torch.fx.graph import CodeGen
    graph._codegen = CodeGen()
    gm = build_module(graph, tensors, f"HelixRank{rank}")
    spec = manifest.get("in_spec")
    return LoadedRank(gm, pytree.treespec_loads(spec) if spec else None, rank, manifest)
