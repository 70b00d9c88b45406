"""shard: placements for every node, collectives where they meet, one local graph per rank.

Policy comes in as values: `seeds` (the output features each rank computes of
a column-sharded projection: attention Q/K/V, MLP up/gate), `variants` (per
attention core node: "score-reduce" or "qk-gather").  Everything else follows
by propagation, one rule per op family (the table `RULES` in passes/shard_rules.py):

* elementwise ops align their operands' index lists (a replicated operand, a
  cos/sin table or a weight, is sliced to the rank's list);
* views merge and factor index lists (`layout.merge` / `layout.factor`);
* a contraction over a split dim gives a partial sum, all-reduced at once over
  the mesh group the split varies along; a bias is added after that, once;
* an op with no rule gets replicated inputs (all-gather first) and is listed
  in `Localized.replicated` so the plan shows it.

Parameters are sliced at compile time: a rank module holds only its slices.

Invariant: for every rank r, the rank graphs run together (their collectives
carried out among them) compute what the input graph computed, and every
rank's outputs are the full outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx

from helix_compiler.runtime import collectives as _c  # noqa: F401  (registers torch.ops.helix)
from helix_compiler.runtime import kernels as _k  # noqa: F401
from helix_compiler.errors import ShardingError
from helix_compiler.runtime.mesh import Mesh

from .graph_utils import aten, shape
from .layout import Split, as_slice, check_partition, lists_of, make_split, positions, varying_axes
from .shard_rules import RULES

helix = torch.ops.helix


@dataclass
class Localized:
    graphs: list                   # fx.Graph per rank
    attrs: list                    # per rank: attr name -> tensor
    shards: list                   # per rank: attr name -> (source name, ((dim, index list), ...))
    replicated: list = field(default_factory=list)  # (node, op) an op with no rule forced to Replicate
    collectives: list = field(default_factory=list)  # per rank: count by kind


# Ops that return their input itself (or a view of it): an in-place op on their output writes
# the attribute they read (HF StaticCache's cumulative_length.to(device).add_(1)).
_ALIASING = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.alias.default,
             aten.detach.default, aten.view.default, aten.slice.Tensor, aten.select.int}


def written_attrs(gm: fx.GraphModule) -> frozenset:
    """Targets of get_attr nodes an in-place op writes (through aliasing ops): a KV cache, a
    position counter. Each rank gets its own copy of these, so no rank writes the user's
    tensor or another rank's."""
    out = set()
    for node in gm.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) \
                or not target._schema.is_mutable or not node.args:
            continue
        x = node.args[0]
        while isinstance(x, fx.Node) and x.op == "call_function" and x.target in _ALIASING:
            x = x.args[0]
        if isinstance(x, fx.Node) and x.op == "get_attr":
            out.add(x.target)
    return frozenset(out)


class Localizer:
    def __init__(self, gm: fx.GraphModule, mesh: Mesh, seeds: dict, variants: dict, params: dict,
                 active=None, views=None, sequence_parallel: bool = False):
        self.views = views or {}  # derived parameter name -> fold_params.ParamView
        self.gm, self.mesh, self.N = gm, mesh, mesh.size
        # Placements are computed for every rank (collective groups need them all); graphs are
        # emitted only for the `active` ranks, so a 64-rank compile need not build 64 graphs.
        self.active = frozenset(range(self.N) if active is None else active)
        self.seeds, self.variants, self.params = seeds, variants, params
        self.graphs = [fx.Graph() for _ in range(self.N)]
        for g in self.graphs:
            g._codegen = gm.graph._codegen
        self.env = [dict() for _ in range(self.N)]
        self.lay: dict = {}
        self.attrs = [dict() for _ in range(self.N)]
        self.shards = [dict() for _ in range(self.N)]
        self._attr_cache = [dict() for _ in range(self.N)]
        self.replicated = []
        self.counts = [dict() for _ in range(self.N)]
        self.sequence_parallel = sequence_parallel
        self._gathered: dict = {}         # node -> its per-rank locals with split dims gathered
        self.memo: dict = {}              # rules' results that depend on layouts and shapes only
        self.mutated = written_attrs(gm)  # attr targets the graph writes in place: per-rank copies

    # ---- layouts -------------------------------------------------------------------------
    def L(self, node) -> tuple:
        if not isinstance(node, fx.Node):
            return ()
        lay = self.lay.get(node)
        if lay is None:
            return tuple([None] * len(shape(node)))
        return lay

    def is_split(self, node) -> bool:
        lay = self.lay.get(node) if isinstance(node, fx.Node) else None
        if lay is None:
            return False
        if isinstance(lay, list):
            return any(any(s is not None for s in sub) for sub in lay)
        return any(s is not None for s in lay)

    # ---- emission ------------------------------------------------------------------------
    def emit(self, r: int, target, args, kwargs=None, name=None) -> fx.Node:
        if r not in self.active:
            return None
        node = self.graphs[r].call_function(target, tuple(args), dict(kwargs or {}))
        if name:
            node.name = self.graphs[r]._graph_namespace.create_name(name, node)
        if target in (helix.all_reduce.default, helix.all_gather.default,
                      helix.reduce_scatter.default):
            kind = {helix.all_reduce.default: "all_reduce", helix.all_gather.default: "all_gather",
                    helix.reduce_scatter.default: "reduce_scatter"}[target]
            key = f"{kind}:{args[1]}"
            self.counts[r][key] = self.counts[r].get(key, 0) + 1
        return node

    def attr(self, r: int, source: fx.Node, sels=(), private: bool = False) -> fx.Node:
        """A get_attr of the parameter `source`, sliced at compile time by `sels` [(dim, idx)];
        `private`: rank r's own copy (a KV cache buffer the rank graph writes in place), never
        storage shared with the user's model or another rank."""
        # the refusal below holds for every rank: checked before the active test, so a compile
        # that emits no graph (pipeline.EAGER_EMIT_NODES) still raises it
        tensor = self.params.get(source.target)
        if tensor is None:  # a constant export lifted into the module (lifted_tensor_0, ...)
            tensor = self.gm
            for part in str(source.target).split("."):
                tensor = getattr(tensor, part)
        if not isinstance(tensor, torch.Tensor):
            raise ShardingError(
                f"node {source.name}: {source.target} is a {type(tensor).__name__}, not a tensor: the "
                f"graph holds a control-flow or grad-mode region (torch.cond, a @no_grad function "
                f"captured with grad enabled); Helix shards graphs without such regions: capture the "
                f"model for inference (helix_compile does, under torch.no_grad) or without torch.cond")
        if r not in self.active:
            return None
        private = private or source.target in self.mutated
        key = (source.target, tuple((d, idx.tobytes()) for d, idx in sels), private)
        cache = self._attr_cache[r]
        if key in cache:
            return cache[key]
        for d, idx in sels:
            sl = as_slice(idx)
            if sl is not None and sl[2] == 1:
                tensor = tensor.narrow(d, sl[0], sl[1] - sl[0])
            else:
                tensor = tensor.index_select(d, torch.as_tensor(idx, device=tensor.device))
        base = str(source.target).replace(".", "_")
        name, k = base, 1
        while name in self.attrs[r]:
            name, k = f"{base}_{k}", k + 1
        self.attrs[r][name] = tensor.detach().clone(memory_format=torch.contiguous_format) if private \
            else tensor.detach().contiguous() if sels else tensor.detach()
        sels = tuple((d, np.asarray(i)) for d, i in sels)
        view = self.views.get(str(source.target))
        if view is not None:  # a view of a parameter: its slices in the base's terms
            self.shards[r][name] = (view.base, view.to_base(sels), view.perm)
        else:
            self.shards[r][name] = (str(source.target), sels, None)
        node = self.graphs[r].get_attr(name)
        cache[key] = node
        return node

    def local(self, r: int, a):
        """The rank-r value of a graph argument (parameters materialized whole)."""
        if r not in self.active:
            return None
        if isinstance(a, fx.Node):
            if a.op == "get_attr":
                return self.attr(r, a)
            return self.env[r][a]
        if isinstance(a, (list, tuple)):
            return type(a)(self.local(r, x) for x in a)
        if isinstance(a, dict):
            return {k: self.local(r, v) for k, v in a.items()}
        return a

    def env_set(self, node: fx.Node, locals_) -> None:
        for r in range(self.N):
            self.env[r][node] = locals_[r]

    def copy(self, node: fx.Node, layout, args_for=None, kwargs_for=None) -> None:
        """Emit `node` on every rank with local operands; `args_for(r)` overrides its args."""
        for r in range(self.N):
            if r not in self.active:    # emit would give None: skip building its operands
                self.env[r][node] = None
                continue
            args = args_for(r) if args_for else self.local(r, node.args)
            kwargs = kwargs_for(r) if kwargs_for else self.local(r, dict(node.kwargs))
            self.env[r][node] = self.emit(r, node.target, args, kwargs, name=node.name)
        self.lay[node] = layout

    def select(self, r: int, node: fx.Node, local_node, dim: int, src, want: np.ndarray):
        """Rank r's `local_node` (global dim `dim` held as `src`) narrowed to the global indices `want`."""
        size = shape(node)[dim]
        src_list = lists_of(src, size, self.N)[r]
        pos = positions(src_list, want, node.name)  # raises for every rank, active or not
        if r not in self.active:
            return None
        if len(pos) == len(src_list) and np.array_equal(pos, np.arange(len(src_list))):
            return local_node
        if node.op == "get_attr" and src is None:
            return self.attr(r, node, ((dim, pos),))
        sl = as_slice(pos)
        if sl is not None:
            return self.emit(r, aten.slice.Tensor, (local_node, dim, sl[0], sl[1], sl[2]))
        idx = self.attr_index(r, pos)
        return self.emit(r, aten.index_select.default, (local_node, dim, idx))

    def attr_index(self, r: int, pos: np.ndarray) -> fx.Node:
        if r not in self.active:
            return None
        name = f"_helix_index_{len([k for k in self.attrs[r] if k.startswith('_helix_index_')])}"
        self.attrs[r][name] = torch.as_tensor(pos, dtype=torch.int64)
        return self.graphs[r].get_attr(name)

    def gather_dim(self, node: fx.Node, locals_, dim: int, split: Split,
                   ordered: bool = True) -> list:
        """All-gather a split dim so every rank holds it whole, in global order; with
        ordered=False, in the group's order when that is a permutation of the dim (for a
        contraction whose other operand is gathered the same way: a dot product does not
        depend on the order of its terms, so no reorder pass is needed)."""
        axes = varying_axes(split, self.mesh)
        if axes is None:
            raise ShardingError(f"node {node.name}: every rank holds the same part of dim {dim}; "
                                f"it cannot be gathered")
        out = []
        for r in range(self.N):
            group = self.mesh.group(r, axes)
            sizes = [len(split.lists[g]) for g in group]
            cat = np.concatenate([split.lists[g] for g in group])
            first = {}
            for p, g in enumerate(cat):
                first.setdefault(int(g), p)
            if len(first) != split.size or set(first) != set(range(split.size)):
                raise ShardingError(f"node {node.name}: ranks {list(group)} together do not hold all "
                                    f"{split.size} elements of dim {dim}")
            x = self.emit(r, helix.all_gather.default, (locals_[r], axes, dim, sizes))
            pos = np.array([first[g] for g in range(split.size)], dtype=np.int64)
            if not ordered and len(cat) == split.size:
                pass                    # a permutation: the contraction takes it as it is
            elif not np.array_equal(pos, np.arange(len(cat))):
                sl = as_slice(pos)
                if sl is not None:
                    x = self.emit(r, aten.slice.Tensor, (x, dim, sl[0], sl[1], sl[2]))
                else:
                    x = self.emit(r, aten.index_select.default, (x, dim, self.attr_index(r, pos)))
            out.append(x)
        return out

    def reduce_scatter(self, node: fx.Node, locals_, split: Split, lay: tuple):
        """Sequence parallelism: the partial sums of a contraction over `split` reduced over
        its group, each rank keeping a contiguous chunk of the sequence (the second to last
        dim of a (batch.., S, D) output). (locals, layout), or None when off or not possible
        (a symbolic or too short sequence, one already split, or a 2-D (tokens, D) output,
        whose flattened chunks would not gather back dim by dim)."""
        dims = shape(node)
        if not self.sequence_parallel or len(dims) < 3:
            return None
        axes = varying_axes(split, self.mesh)
        dim = len(dims) - 2
        size = dims[dim]
        groups = self.mesh.groups(axes) if axes else ()
        g = len(groups[0]) if groups else 1
        if g == 1 or not isinstance(size, int) or size < g or lay[dim] is not None:
            return None
        check_partition(split, self.mesh, axes, node.name)
        chunks = np.array_split(np.arange(size), g)
        sizes = [len(c) for c in chunks]
        lists = [chunks[self.mesh.group(r, axes).index(r)] for r in range(self.N)]
        out = [self.emit(r, helix.reduce_scatter.default, (locals_[r], axes, dim, sizes))
               for r in range(self.N)]
        seq = make_split(size, lists)
        return out, tuple(seq if i == dim else s for i, s in enumerate(lay))

    def gathered(self, node: fx.Node) -> list:
        """Per-rank locals of `node` with every split dim gathered (once per node)."""
        if node not in self._gathered:
            self._gathered[node] = self.replicate(node)
        return self._gathered[node]

    def replicate(self, node: fx.Node) -> list:
        """Per-rank local nodes holding `node` whole."""
        locals_ = [self.local(r, node) for r in range(self.N)]
        for dim, s in enumerate(self.L(node)):
            if s is not None:
                locals_ = self.gather_dim(node, locals_, dim, s)
        return locals_

    def all_reduce(self, node: fx.Node, locals_, split: Split, op: str = "sum",
                   replicas: bool = False) -> list:
        """Reduce per-rank partials over the group `split` varies along.  With `replicas` (a sum,
        a mean or a norm's statistics), a dim each group holds c times over (k features of kv heads
        that n > H_kv q-head groups replicate, under a norm over the whole projected width) is
        exact too: each partial is divided by c before the sum (a max needs no correction)."""
        axes = varying_axes(split, self.mesh)
        if axes is None:
            raise ShardingError(f"node {node.name}: a contraction over a dim every rank holds the "
                                f"same part of cannot be reduced exactly")
        c = check_partition(split, self.mesh, axes, node.name, replicas=replicas)
        if c > 1 and op == "sum":
            locals_ = [self.emit(r, aten.div.Tensor, (locals_[r], c)) for r in range(self.N)]
        return [self.emit(r, helix.all_reduce.default, (locals_[r], axes, op)) for r in range(self.N)]

    # ---- driver --------------------------------------------------------------------------
    def run(self) -> Localized:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                for r in self.active:
                    p = self.graphs[r].placeholder(node.target)
                    p.meta = dict(node.meta)
                    self.env[r][node] = p
            elif node.op == "get_attr":
                continue  # materialized on use, sliced or whole
            elif node.op == "call_function":
                rule = RULES.get(node.target)
                done = rule(self, node) if rule is not None else None
                if not done:
                    self.fallback(node)
            elif node.op == "output":
                outs = [list(x) for x in zip(*[self._output_locals(a) for a in node.args[0]])] \
                    if node.args[0] else [[] for _ in range(self.N)]
                for r in self.active:
                    self.graphs[r].output(type(node.args[0])(outs[r]) if node.args[0] else node.args[0])
            else:
                raise ShardingError(f"node {node.name}: op {node.op} ({node.target}) is not supported "
                                    f"in a captured graph; re-export the model")
        for r in self.active:
            self.graphs[r].lint()
        return Localized(graphs=self.graphs, attrs=self.attrs, shards=self.shards,
                         replicated=self.replicated, collectives=self.counts)

    def _output_locals(self, a):
        if isinstance(a, fx.Node) and self.is_split(a):
            return self.replicate(a)
        return [self.local(r, a) for r in range(self.N)]

    def fallback(self, node: fx.Node) -> None:
        """No rule: every input whole, the op as it is, its output replicated."""
        split_inputs = [a for a in node.all_input_nodes if self.is_split(a)]
        if not split_inputs:
            self.copy(node, None)
            return
        for a in split_inputs:
            if isinstance(self.lay[a], list):
                raise ShardingError(f"node {node.name}: op {node.target} consumes a multi-output node "
                                    f"whose parts are sharded; no rule handles it")
        self.replicated.append((node.name, str(node.target)))
        reps = {a: self.replicate(a) for a in split_inputs}
        self.copy(node, None, args_for=lambda r: self.local_args(r, node, reps)[0],
                  kwargs_for=lambda r: self.local_args(r, node, reps)[1])

    def local_args(self, r: int, node: fx.Node, replaced: dict) -> tuple:
        """Rank r's (args, kwargs) of `node`: nodes in `replaced` by their rank-r node there."""
        def sub(x):
            if isinstance(x, fx.Node) and x in replaced:
                return replaced[x][r]
            if isinstance(x, (list, tuple)):
                return type(x)(sub(y) for y in x)
            return self.local(r, x)
        return sub(node.args), {k: sub(v) for k, v in node.kwargs.items()}


def localize(gm: fx.GraphModule, mesh: Mesh, seeds: dict, variants: dict, params: dict,
             active=None, views=None, sequence_parallel: bool = False) -> Localized:
    """Run the shard pass (graphs for the `active` ranks, all by default); see the module docstring."""
    return Localizer(gm, mesh, seeds, variants, params, active, views, sequence_parallel).run()
