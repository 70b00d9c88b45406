"""Capture a stack of identical layers once: export two layers, copy the graph of one.

torch.export's time grows with the number of layers it traces (LLaMA-70B, 80 layers: 15 s of
a 17 s compile, docs/SCALE.md), yet nearly every transformer is a ModuleList of one layer
class with one config.  `capture_repeated` exports a shallow stand-in of the model whose
list holds the user's layers 0 and L-1 at their own indices and a `_Skipped` (returns its
hidden-state input) at every other index, and builds the full graph from it:

    pre-layer nodes (embedding, rotary cos/sin, masks)        as captured
    layer 0                                                   as captured
    layer j = 1 .. L-2                                        layer L-1's nodes, parameters layers.{L-1}.* -> layers.j.*,
                                                              reading layer j-1 where layer L-1 read layer 0
    layer L-1                                                 as captured, reading layer L-2
    post-layer nodes (final norm, LM head, outputs)           as captured

Two layers are enough when layer 0 is layer L-1 with another input: the same ops, constants,
shapes, relative parameter names and pre-layer reads, except that where layer L-1 reads the
layer before it (through the stubs, layer 0) layer 0 reads pre-layer values (the embedding),
one for one.  The two bodies then match node for node, so position p of a layer, counted
from its end, is the same value in layer 0, in a copy and in layer L-1, and a copy reads what
a real layer reads.  The stubs and layer L-1 record the arguments the parent passes them:
every index from 1 on must get what layer L-1 got, apart from the hidden state (tensors by
identity).  A model whose layer 0 differs (it branches on the index, say) is exported again
with layers 0, 1 and L-1 (`repeat_blocks["two_layers"]` says why): layer 1's graph is copied
for layers 2 .. L-2, and layers 1 and L-1 must be the same graph (reads of the previous layer
counted from its end).  Export of the stand-in, 80 LLaMA-70B layers: 3 layers about 3.2 CPU s
on the project's 2-core machine, 2 layers 2.2.

The stubs keep the parent's loop running over all L indices as on the model (HF indexes
`config.layer_types[i]`; an op the parent adds after layer k lands between layer runs and
is refused).  Layer 0 is captured on its own because it reads the embedding; the real last
layer so that a model that treats it differently (or branches on the layer index with a
threshold anywhere between 1 and L-1) shows a different graph and falls back.

What must hold, else the full capture runs and `Captured.note` says why (`_Fallback`):
  - one ModuleList of at least MIN_LAYERS layers (the longest outermost one), distinct
    module objects of one class, with the same submodules, parameter and buffer names,
    shapes and dtypes;
  - the same attribute values in every layer's modules (vars() less parameters, buffers and
    submodules), except index-like ints (INDEX_FIELDS) -- those pass only because the
    captured graphs are compared as well; no forward hooks;
  - no per-layer list in a config (`layer_types` with two kinds, `no_rope_layers`...);
  - the parent passes every index from 1 on the same arguments as layer L-1, less the hidden
    state;
  - in the stand-in's graph each layer is one contiguous run of nodes (nn_module_stack) with
    nothing of the parent between runs, a layer reads only its own parameters, the
    previous layer's values and pre-layer values, the post-layer nodes read only layer L-1,
    and layer L-1 is layer 0 with another input (two layers) or layers 1 and L-1 are the
    same graph (three layers).

Not proven: a parent forward whose per-index behaviour shows neither in the captured layers,
in the arguments it passes, in the layers' attributes, in the config, nor as ops between
layers; a layer forward that acts on its own index field (`if self.layer_idx == 7`) for an
index other than the captured ones without a per-layer config list saying so (HF layers use layer_idx for the KV cache
and look up per-layer config lists, which are checked).  repeat_blocks=False is the way out.

Invariant: the returned graph is the graph the full capture produces, up to node names and
the order of get_attr nodes; its get_attr targets and `params` name every tensor as in
model.state_dict(), and they are the user's tensors.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect

import torch
import torch.fx as fx
from torch.fx._lazy_graph_module import _LazyGraphModule

# ModuleLists shorter than this are captured whole: exporting 2-3 of them saves little.
MIN_LAYERS = 8
# Attributes a layer may hold with a different int value per layer (HF: layer_idx, for the
# KV cache).  Allowed only because the captured graphs of layers 1 and L-1 are compared.
INDEX_FIELDS = frozenset({"layer_idx", "layer_id", "layer_index", "layer_number", "layer_num",
                          "block_idx", "block_id", "idx", "index"})
_MODULE_KEYS = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"})
_HOOK_KEYS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")

__all__ = ["capture_repeated", "find_layer_list", "MIN_LAYERS"]


class _Fallback(Exception):
    """Why this model is captured whole (becomes part of Captured.note)."""


def capture_repeated(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic: bool, capture_fn):
    """The full model's Captured from a capture of layers 0 and L-1 (or 0, 1 and L-1); or a str: why not
    ("" when the model has no ModuleList of MIN_LAYERS layers, so there is nothing to say).

    capture_fn(module, args, kwargs, dynamic) is capture.capture without this step."""
    found = find_layer_list(model)
    if found is None:
        return ""
    path, layers = found
    n = len(layers)
    try:
        _check_layers(model, path, layers)
        why2 = None
        for keep in ([0, n - 1], [0, 1, n - 1]):
            standin, calls = _standin(model, path, layers, keep)
            try:
                with _no_fake_tensor_cache():
                    small = capture_fn(standin, args, kwargs, dynamic)
            except Exception as e:
                raise _Fallback(f"the stand-in with layers {keep} did not capture ({type(e).__name__})") from e
            try:
                _check_calls(calls, keep)
                gm = _expand(small.gm, path, layers, keep)
                break
            except _Fallback as e:
                if len(keep) == 3:
                    raise
                why2 = str(e)      # layer 0 is not layer L-1 with another input: three layers
        if why2:
            gm.meta["repeat_blocks"]["two_layers"] = why2
    except _Fallback as e:
        return f"{path}: {e}; captured all {len(layers)} layers"
    params = dict(gm.named_parameters(remove_duplicate=False))
    params.update(dict(gm.named_buffers(remove_duplicate=False)))
    for name, tensor in model.state_dict(keep_vars=True).items():
        params.setdefault(name, tensor)
    return dataclasses.replace(small, gm=gm, params=params)   # the stand-in's args, mode, note


@contextlib.contextmanager
def _no_fake_tensor_cache():
    """torch.export of the stand-in without FakeTensorMode's dispatch cache: with symbolic sizes
    each cache entry is built (and each hit rebuilt) by re-evaluating its output's sympy sizes,
    which for two layers costs more than running the ops again (80 LLaMA-70B layers: export of
    the stand-in about 2.0 -> 1.6 CPU s on the 2-core machine).  The graph is the same ops on
    the same values; only node names may differ (the full capture keeps the cache)."""
    import torch._dynamo.config as dynamo_config     # torch.export imports it anyway

    with dynamo_config.patch(fake_tensor_cache_enabled=False):
        yield


def find_layer_list(model: torch.nn.Module):
    """(path, ModuleList) of the longest outermost ModuleList with >= MIN_LAYERS entries, or None."""
    best = None
    taken = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.ModuleList) or len(mod) < MIN_LAYERS or not name:
            continue
        if any(name.startswith(t + ".") for t in taken):
            continue  # e.g. the experts of an MoE layer inside the layer list
        taken.append(name)
        if best is None or len(mod) > len(best[1]):
            best = (name, mod)
    return best


# ---------------------------------------------------------------- module checks

def _same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, functools.partial) and isinstance(b, functools.partial):
        # one per layer in HF activations (ACT2FN's gelu(approximate="tanh"))
        return a.func is b.func and _same(a.args, b.args) and _same(a.keywords, b.keywords)
    if isinstance(a, (tuple, list)) and type(a) is type(b):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and type(a) is type(b):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if type(a) is not type(b) or isinstance(a, torch.Tensor) or callable(a):
        return False
    try:
        return bool(a == b)
    except Exception:
        return False


def _check_layers(model, path: str, layers) -> None:
    if len({id(x) for x in layers}) != len(layers):
        raise _Fallback("one module object appears twice in the list (shared layers)")
    ref = layers[2]     # the reference for the module checks (any layer would do)
    ref_mods = dict(ref.named_modules())
    ref_tensors = {k: (tuple(t.shape), t.dtype) for k, t in _tensors(ref)}
    for i, layer in enumerate(layers):
        mods = dict(layer.named_modules())
        if [(k, type(v)) for k, v in mods.items()] != [(k, type(v)) for k, v in ref_mods.items()]:
            raise _Fallback(f"layer {i} has other submodules than layer 2 "
                            f"({type(layer).__name__} vs {type(ref).__name__})")
        tensors = {k: (tuple(t.shape), t.dtype) for k, t in _tensors(layer)}
        if tensors != ref_tensors:
            diff = sorted(set(tensors.items()) ^ set(ref_tensors.items()))[:1]
            raise _Fallback(f"layer {i}'s parameters differ from layer 2's ({diff})")
        for sub, mod in mods.items():
            other = ref_mods[sub]
            where = f"layer {i}{'.' + sub if sub else ''}"
            for key in _HOOK_KEYS:
                if getattr(mod, key, None):
                    raise _Fallback(f"{where} has {key}")
            a, b = vars(mod), vars(other)
            for key in sorted(set(a) | set(b)):
                if key in _MODULE_KEYS or "hook" in key:
                    continue
                if key not in a or key not in b:
                    raise _Fallback(f"{where} has attribute {key!r} only on one of it and layer 2")
                if _same(a[key], b[key]):
                    continue
                if key in INDEX_FIELDS and isinstance(a[key], int) and isinstance(b[key], int):
                    continue
                raise _Fallback(f"{where}.{key} = {_short(a[key])}, layer 2 has {_short(b[key])}")
    _check_config(model, len(layers))


def _tensors(layer):
    yield from layer.named_parameters(remove_duplicate=False)
    yield from layer.named_buffers(remove_duplicate=False)


def _check_config(model, n_layers: int) -> None:
    """A per-layer field in the config (HF: layer_types, no_rope_layers, sliding pattern lists)
    that is not the same for every layer means the layers are not one block repeated."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    for cfg in configs.values():
        fields = cfg.to_dict() if hasattr(cfg, "to_dict") else getattr(cfg, "__dict__", {})
        for key, value in fields.items():
            if "layer" not in key or not isinstance(value, (list, tuple, dict)) or not value:
                continue
            values = list(value.values()) if isinstance(value, dict) else list(value)
            if len(values) == n_layers and all(_same(v, values[0]) for v in values):
                continue
            raise _Fallback(f"config.{key} = {_short(value)} is a per-layer setting")


def _short(x) -> str:
    s = repr(x)
    return s if len(s) <= 60 else s[:57] + "..."


class _Skipped(torch.nn.Module):
    """Stands for a layer not exported in the stand-in list: records the arguments the parent
    passes it (`calls`) and returns its hidden-state input unchanged, so the parent's loop still runs over all L indices (its per-index code --
    `config.layer_types[i]`, `if i == k: ...` -- runs as in the real model, and any op it adds
    between layers shows in the graph and makes the capture fall back).  Attributes the parent
    reads from a layer (`decoder_layer.attention_type`) come from the real layer j."""

    def __init__(self, real: torch.nn.Module, index: int, calls: dict):
        super().__init__()
        self.__dict__["_real"] = real            # not a submodule: no parameters in the stand-in
        names = [p for p in inspect.signature(real.forward).parameters]
        self.__dict__["_first"] = names[0] if names else None
        self.__dict__["_index"] = index
        self.__dict__["_calls"] = calls

    def forward(self, *args, **kwargs):
        self._calls.setdefault(self._index, []).append(_other_args(args, kwargs, self._first))
        return args[0] if args else kwargs[self._first]

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_real"], name)


def _other_args(args: tuple, kwargs: dict, first) -> tuple:
    """A layer call's arguments less its hidden-state input (the first)."""
    rest = dict(kwargs)
    if args:
        args = args[1:]
    else:
        rest.pop(first, None)
    return tuple(args), rest


def _recorded(layer: torch.nn.Module, index: int, calls: dict) -> torch.nn.Module:
    """A shallow copy of `layer` (same parameters, buffers and submodules, so the same graph
    and names) that records the arguments the parent passes it, as _Skipped does."""
    twin = copy.copy(layer)
    first = next(iter(inspect.signature(layer.forward).parameters), None)
    forward = type(layer).forward.__get__(twin)

    def recording(*args, **kwargs):
        calls.setdefault(index, []).append(_other_args(args, kwargs, first))
        return forward(*args, **kwargs)
    twin.__dict__["forward"] = recording
    return twin


def _check_calls(calls: dict, keep) -> None:
    """Every index from 1 on got the same arguments from the parent as layer L-1, apart from
    the hidden state (the copies stand for layers the export did not run: what the parent
    passes them must be what the template layer got)."""
    tail = keep[-1]
    ref = calls.get(tail)
    if not ref or len(ref) != 1:
        raise _Fallback(f"layer {tail} was called {len(ref or [])} times in the stand-in")
    for i in sorted(calls):
        if i == 0:
            continue
        if len(calls[i]) != 1 or not _same_call(calls[i][0], ref[0]):
            raise _Fallback(f"layer {i} gets other arguments from the parent than layer {tail}")


def _same_call(a, b) -> bool:
    (args_a, kw_a), (args_b, kw_b) = a, b
    return len(args_a) == len(args_b) and kw_a.keys() == kw_b.keys() and \
        all(_same_value(x, y) for x, y in zip(args_a, args_b)) and \
        all(_same_value(kw_a[k], kw_b[k]) for k in kw_a)


def _same_value(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if isinstance(a, (tuple, list)) and type(a) is type(b):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and type(a) is type(b):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    return a is b or _same(a, b)


def _standin(model, path: str, layers, keep):
    """A shallow copy of `model` along `path` whose list holds the user's layers `keep` at
    their own indices (layer L-1 as a recording twin) and a _Skipped for each other one
    (nothing of the user's model is modified); and the dict the calls are recorded in."""
    n = len(layers)
    calls: dict = {}
    root = copy.copy(model)
    root.__dict__["_modules"] = dict(model._modules)
    parent, names = root, path.split(".")
    for name in names[:-1]:
        child = copy.copy(parent._modules[name])
        child.__dict__["_modules"] = dict(child._modules)
        parent._modules[name] = child
        parent = child
    parent._modules[names[-1]] = torch.nn.ModuleList(
        [(_recorded(layers[i], i, calls) if i == n - 1 else layers[i]) if i in keep
         else _Skipped(layers[i], i, calls) for i in range(n)])
    return root, calls


# ---------------------------------------------------------------- graph surgery

def _owner(node: fx.Node, path: str) -> int | None:
    """The layer index a node belongs to (by parameter name or nn_module_stack), or None."""
    prefix = path + "."
    if node.op == "get_attr":
        t = str(node.target)
        return int(t[len(prefix):].split(".", 1)[0]) if t.startswith(prefix) else None
    for fqn, _ in (node.meta.get("nn_module_stack") or {}).values():
        if fqn.startswith(prefix):
            head = fqn[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                return int(head)
    return None


def _expand(gm: fx.GraphModule, path: str, layers, keep) -> fx.GraphModule:
    """Copies of the template layer (layer 1 of keep = [0, 1, L-1], layer L-1 of keep =
    [0, L-1]) for the layers not captured, before the captured layer L-1."""
    graph = gm.graph
    nodes = list(graph.nodes)
    n_layers, tail = len(layers), keep[-1]
    tpl, before_tail = keep[1], keep[-2]     # the layer copied; the one layer L-1 reads
    copies = range(keep[-2] + 1, n_layers - 1)
    owner = {n: _owner(n, path) for n in nodes}
    stray = next((n for n in nodes if owner[n] is not None and owner[n] not in keep), None)
    if stray is not None:
        raise _Fallback(f"skipped layer {owner[stray]} put {stray.name} in the graph")
    body = {s: [n for n in nodes if owner[n] == s and n.op != "get_attr"] for s in keep}
    if any(not body[s] for s in keep):
        raise _Fallback("a captured layer has no nodes of its own in the graph")
    # Each layer one contiguous run, in order; between runs nothing but get_attr nodes.
    index = {n: i for i, n in enumerate(nodes)}
    first, last = index[body[0][0]], index[body[tail][-1]]
    order = [owner[n] for n in nodes[first:last + 1] if n.op != "get_attr"]
    if None in order or order != sorted(order):
        stray = next((n for n in nodes[first:last + 1] if n.op != "get_attr" and owner[n] is None), None)
        raise _Fallback(f"the layers' nodes are interleaved with others ({stray or 'out of order'})")
    pos = {s: {n: i for i, n in enumerate(body[s])} for s in keep}
    # a read of the previous layer is encoded by its distance from that layer's end (its
    # output is last), so a layer 0 whose body is longer or shorter still reads alike
    back = {s: {n: len(body[s]) - i for n, i in pos[s].items()} for s in keep}
    prev_of = dict(zip(keep[1:], keep[:-1]))
    enc = {s: _encode(body[s], s, prev_of.get(s), pos, back, owner, path) for s in keep}
    if len(keep) == 3:
        _same_layer(enc[tail], enc[1], body[tail], f"captured layer {tail} differs from layer 1")
    else:
        # two layers: layer L-1 is the template, so it must be layer 0 with the previous
        # layer's values where layer 0 reads pre-layer ones (the embedding): then the two
        # bodies match node for node, and a position counted from a layer's end is the same
        # value in layer 0, in a copy and in layer L-1
        _same_layer(enc[tail], _as_prev(enc[0], enc[tail]), body[tail],
                    f"layer 0 is not layer {tail} with another input")
    for n in nodes[last + 1:]:
        for a in n.all_input_nodes:
            if owner[a] is not None and owner[a] != tail:
                raise _Fallback(f"{n.name} after the layers reads layer {owner[a]}'s {a.name}")

    # In place: copies of the template go before layer L-1's run, which then reads the last
    # copy where it read the layer before it.
    _add_parameters(gm, path, layers, copies)
    anchor = next(n for n in nodes if n.op != "get_attr")   # get_attr nodes stay on top, as captured
    prefix = f"{path}.{tpl}."
    prev = list(body[before_tail])      # layer j-1's nodes, position for position
    with graph.inserting_before(body[tail][0]):
        for j in copies:
            local: dict = {}

            def arg(a, j=j, local=local, prev=prev):
                if a in local:
                    return local[a]
                if owner[a] == 0:           # the template read layer 0 here: copy j reads layer j-1
                    return prev[len(prev) - back[0][a]]
                if owner[a] == tpl:         # a parameter of the template: the same one of layer j
                    with graph.inserting_before(anchor):
                        c = graph.get_attr(f"{path}.{j}." + str(a.target)[len(prefix):])
                    c.meta = dict(a.meta)
                    local[a] = c
                    return c
                return a                    # a pre-layer value (cos/sin, mask, sizes)
            for n in body[tpl]:
                local[n] = _copy_node(graph, n, arg, _layer_meta(n.meta, path, tpl, j))
            prev = [local[n] for n in body[tpl]]

    def rewire(a):
        return prev[len(prev) - back[before_tail][a]] if owner.get(a) == before_tail else a
    if copies:
        for n in body[tail]:
            n.args = fx.node.map_arg(n.args, rewire)
            n.kwargs = fx.node.map_arg(n.kwargs, rewire)
    # no graph.lint() here: the pass runner lints the graph after the capture pass
    _lazy_code(gm)
    gm.meta["repeat_blocks"] = {"list": path, "layers": n_layers, "captured": tuple(keep),
                                "copied": (copies[0], copies[-1]) if copies else ()}
    return gm


def _copy_node(graph: fx.Graph, n: fx.Node, arg, meta: dict) -> fx.Node:
    """graph.node_copy(n, arg) with `meta`, less two costs of a bulk copy: create_node's walk of
    the arguments for raw SymInts (a warning; the template's arguments were checked when it was
    captured), a third of node_copy's time, and the copy of n.meta that is replaced anyway.
    Same name, op, target, arguments and users' accounting (the args / kwargs setters)."""
    args = fx.node.map_arg(n.args, arg)
    kwargs = fx.node.map_arg(n.kwargs, arg)
    c = graph.create_node(n.op, n.target, (), {}, n.name, n.type)
    c.args = args
    if kwargs:
        c.kwargs = kwargs
    c.meta = meta
    return c


def _lazy_code(gm: fx.GraphModule) -> None:
    """Generate gm's Python code when it is first used (gm(...), gm.code), not now: for 80
    LLaMA layers the code generation costs about 0.45 CPU s, and no compile stage runs the
    full graph or reads its code (the rank modules are built from the graph; the program's
    fingerprint and the unsharded reference run generate it when asked).  gm keeps its
    attributes and hooks; only its class (torch.fx makes one per GraphModule) gains torch's
    _LazyGraphModule, whose recompile() from now on only marks the code stale."""
    # torch.fx gives each GraphModule its own subclass "GraphModuleImpl" of the class it was
    # made as (here export's _StatefulGraphModule): put _LazyGraphModule under it the same way
    base = next(t for t in type(gm).__mro__ if t.__qualname__.split(".")[-1] != "GraphModuleImpl")
    if not issubclass(base, _LazyGraphModule):
        gm.__class__ = type("GraphModuleImpl", (_lazy_class(base),), {})
    gm.recompile()


@functools.cache
def _lazy_class(base: type) -> type:
    return type(f"Lazy{base.__name__}", (_LazyGraphModule, base), {})


def _same_layer(got: list, want: list, body, what: str) -> None:
    if got != want:
        i = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
        where = body[i].format_node() if i < len(body) else "its end"
        raise _Fallback(f"{what} at {where}")


def _as_prev(enc0: list, enc_tail: list) -> list:
    """Layer 0's encoding with each pre-layer value it reads where layer L-1 reads the layer
    before it replaced by that read, when the replacement is one to one (else unchanged, and
    the comparison fails)."""
    to_prev: dict = {}

    def pair(x, y):
        if isinstance(x, tuple) and isinstance(y, tuple):
            if len(x) == 2 and x[:1] == ("pre",) and y[:1] == ("prev",):
                to_prev.setdefault(x[1], set()).add(y)
            elif len(x) == len(y):
                for a, b in zip(x, y):
                    pair(a, b)
    if len(enc0) != len(enc_tail):
        return enc0
    for x, y in zip(enc0, enc_tail):
        pair(x, y)
    if any(len(v) != 1 for v in to_prev.values()) or \
            len({next(iter(v)) for v in to_prev.values()}) != len(to_prev):
        return enc0
    sub = {k: next(iter(v)) for k, v in to_prev.items()}

    def swap(x):
        if isinstance(x, tuple):
            if len(x) == 2 and x[:1] == ("pre",) and x[1] in sub:
                return sub[x[1]]
            return tuple(swap(y) for y in x)
        return x
    return [swap(x) for x in enc0]


def _encode(body, s: int, prev: int, pos, back, owner, path: str) -> list:
    """Layer s's nodes as data: equal for two layers iff they compute the same from their
    own parameters, the same positions of the previous layer (counted from its end) and the
    same pre-layer values."""
    prefix = f"{path}.{s}."

    def ref(a):
        o = owner[a]
        if o is None:
            return ("pre", a.name)
        if a.op == "get_attr" and o == s:
            return ("param", str(a.target)[len(prefix):])
        if a.op != "get_attr" and o == s:
            return ("self", pos[s][a])
        if a.op != "get_attr" and prev is not None and o == prev:
            return ("prev", back[prev][a])
        raise _Fallback(f"layer {s} reads {a.name} of layer {o}, not of the layer before it")

    def leaf(x):
        if isinstance(x, fx.Node):
            return ref(x)
        if isinstance(x, (list, tuple)):
            return (type(x).__name__, tuple(leaf(y) for y in x))
        if isinstance(x, dict):
            return ("dict", tuple((k, leaf(v)) for k, v in x.items()))
        return (type(x).__name__, repr(x))

    out = []
    for n in body:
        target = str(n.target) if n.op != "call_function" else getattr(n.target, "__qualname__", "") + str(n.target)
        out.append((n.op, target, leaf(n.args), leaf(n.kwargs), _meta_key(n.meta.get("val"))))
    return out


def _meta_key(v):
    if isinstance(v, torch.Tensor):
        return (tuple(str(d) for d in v.shape), str(v.dtype))
    if isinstance(v, (list, tuple)):
        return tuple(_meta_key(x) for x in v)
    return str(v)


def _layer_meta(meta: dict, path: str, s: int, j: int) -> dict:
    out = dict(meta)
    stack = out.get("nn_module_stack")
    if stack:
        old, new = f"{path}.{s}", f"{path}.{j}"
        out["nn_module_stack"] = {k: ((new + f[len(old):]) if f == old or f.startswith(old + ".") else f, t)
                                  for k, (f, t) in stack.items()}
    return out


def _add_parameters(gm, path: str, layers, copies) -> None:
    """gm's `path` holds the captured layers: attach the user's tensors of the copied layers
    under their own names (the same tensor objects, no copy)."""
    container = gm.get_submodule(path)
    for j in copies:
        holder = torch.nn.Module()
        source = layers[j]
        for name, t in _tensors(source):
            *mods, leaf = name.split(".")
            owner_mod, src = holder, source
            for m in mods:
                src = src.get_submodule(m)
                if not hasattr(owner_mod, m):
                    owner_mod.add_module(m, torch.nn.Module())
                owner_mod = getattr(owner_mod, m)
            if isinstance(t, torch.nn.Parameter):
                owner_mod.register_parameter(leaf, t)
            else:
                owner_mod.register_buffer(leaf, t, persistent=leaf not in src._non_persistent_buffers_set)
        container.add_module(str(j), holder)
    # state_dict order: layers 0 .. L-1
    container._modules = dict(sorted(container._modules.items(), key=lambda kv: int(kv[0])))
