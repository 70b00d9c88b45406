"""size_masks: an attention mask built from sizes alone becomes one `size_mask` call (one job).

For every attention core of a rank graph (SDPA, helix.attend, the chunked cores) whose
mask is a node, not is_causal: if the mask's ancestors read no parameter, buffer or
input value (inputs only through their sizes: sym_size, new_ones, ...) and draw no
random numbers, the subgraph is cut out, saved as JSON in the call, and the core takes

    mask, causal = helix_compiler.runtime.masks.size_mask(spec, q, *inputs)
    core(q, k, v, attn_mask=mask, is_causal=causal)

which at run time drops the mask for is_causal wherever it is SDPA's causal mask (checked
whole, once per size: helix_compiler/runtime/masks.py). Cores sharing a mask share one call. The
subgraph's nodes are removed when nothing else reads them.

    gm = apply_size_masks(gm)          # in place; gm.meta["size_masks"] lists the cores
"""

from __future__ import annotations

import dataclasses
import json
import operator

import torch
import torch.fx as fx

import helix_compiler.runtime.kernels_chunked  # noqa: F401  (registers the chunked cores)
from helix_compiler.errors import HelixError
from helix_compiler.runtime.masks import builder, is_sdpa_causal, size_mask
from helix_compiler.runtime.serialize import graph_to_json

from .graph_utils import example_size
from .workload import FREE_OPS

aten = torch.ops.aten

# Ops that read only their tensor argument's metadata (shape, dtype, device).
METADATA_OPS = {
    aten.sym_size.int, aten.new_ones.default, aten.new_zeros.default, aten.new_empty.default,
    aten.new_full.default, aten.zeros_like.default, aten.ones_like.default,
    aten.empty_like.default, aten.full_like.default, aten._assert_tensor_metadata.default,
}
RANDOM_OPS = {aten.rand.default, aten.randn.default, aten.randint.default, aten.bernoulli.default,
              aten.rand_like.default, aten.randn_like.default, aten.dropout.default,
              aten.native_dropout.default, aten.normal.Tensor_float}


def _cores():
    helix = torch.ops.helix
    # op -> (index of the mask argument, index of is_causal)
    return {aten.scaled_dot_product_attention.default: (3, 5),
            helix.attend.default: (2, 3),
            helix.chunked_attention.default: (3, 4),
            helix.chunked_attend.default: (2, 3)}


def _arg(node: fx.Node, i: int, name: str, default=None):
    if i < len(node.args):
        return node.args[i]
    return node.kwargs.get(name, default)


def _set(node: fx.Node, i: int, name: str, value) -> None:
    if i < len(node.args):
        args = list(node.args)
        args[i] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def size_only_subgraph(mask: fx.Node):
    """(nodes in graph order, external tensor inputs) when `mask` depends on sizes only."""
    seen, stack, externals = set(), [mask], []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op != "call_function" or node.target in RANDOM_OPS:
            return None
        for a in node.all_input_nodes:
            if a.op == "placeholder":
                if node.target not in METADATA_OPS or a is not node.args[0]:
                    return None                    # an input's values are read
                if a not in externals:
                    externals.append(a)
            elif a.op == "get_attr":
                return None                        # a parameter or buffer
            else:
                stack.append(a)
    if any(_written(n) for n in seen):
        return None                                # built, then changed in place
    order = [n for n in mask.graph.nodes if n in seen]
    return order, externals


def _mutates(node: fx.Node) -> bool:
    t = node.target
    return isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable


def _written(node: fx.Node) -> bool:
    """Whether an in-place op writes `node`'s value, directly or through a view of it."""
    stack, seen = [node], set()
    while stack:
        x = stack.pop()
        if x in seen:
            continue
        seen.add(x)
        for u in x.users:
            if _mutates(u):
                return True
            if u.target in FREE_OPS:
                stack.append(u)
    return False


def _spec(order, externals, mask: fx.Node) -> str:
    g = fx.Graph()
    env = {}
    for x in externals:
        env[x] = g.placeholder(x.name)
    for node in order:
        if node.target is aten._assert_tensor_metadata.default:
            continue
        env[node] = g.node_copy(node, lambda a: env[a])
    g.output(env[mask])
    return json.dumps(graph_to_json(g))


def apply_size_masks(gm: fx.GraphModule) -> fx.GraphModule:
    cores = _cores()
    probes: dict = {}                  # mask node -> (mask getitem, causal getitem)
    cut: set = set()                   # the masks' subgraphs
    changed = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in cores:
            continue
        mi, ci = cores[node.target]
        mask = _arg(node, mi, "attn_mask")
        if not isinstance(mask, fx.Node) or _arg(node, ci, "is_causal", False):
            continue
        if mask not in probes:
            got = size_only_subgraph(mask)
            if got is None:
                continue
            order, externals = got
            try:
                spec = _spec(order, externals, mask)
            except HelixError:          # an op the JSON form does not carry: leave the mask
                continue
            like = node.args[0]
            with gm.graph.inserting_before(node):
                probe = gm.graph.call_function(size_mask, (spec, like, *externals))
                probes[mask] = (gm.graph.call_function(operator.getitem, (probe, 0)),
                                gm.graph.call_function(operator.getitem, (probe, 1)))
            cut |= set(order)
        m, c = probes[mask]
        _set(node, mi, "attn_mask", m)
        _set(node, ci, "is_causal", c)
        changed.append(node.name)
    if changed:
        _drop_dead(gm, cut)
        gm.graph.lint()
        gm.recompile()
    gm.meta["size_masks"] = changed
    return gm


def _drop_dead(gm: fx.GraphModule, cut: set) -> None:
    """Remove the masks' subgraph nodes nothing reads any more (and export's asserts on them)."""
    for node in reversed(list(gm.graph.nodes)):
        if node not in cut:
            continue
        users = [u for u in node.users if u.target is not aten._assert_tensor_metadata.default]
        if users:
            continue
        for u in list(node.users):
            gm.graph.erase_node(u)
        gm.graph.erase_node(node)


# A mask is evaluated at the example sizes to price the plan only up to this many elements
# (a 16k x 16k bool mask is 256 MiB; above, the plan prices the mask as built and read).
EVAL_MAX_ELEMENTS = 1 << 28


def causal_at_example(gm: fx.GraphModule, matches) -> list:
    """`matches` with site.mask_causal set where the core's mask is built from sizes alone and,
    at the example inputs' sizes, is SDPA's causal mask: what `size_mask` will find at run time
    at those sizes, so the cost model prices those cores as causal and the mask as never built."""
    out, seen = [], {}
    for m in matches:
        mask = m.core.mask
        if mask is None or m.core.is_causal:
            out.append(m)
            continue
        if mask not in seen:
            seen[mask] = _causal_at_example(mask)
        if seen[mask]:
            m = dataclasses.replace(m, site=dataclasses.replace(m.site, mask_causal=True))
        out.append(m)
    return out


def _causal_at_example(mask: fx.Node) -> bool:
    val = mask.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return False
    numel = 1
    for x in val.shape:
        numel *= example_size(x)
    got = size_only_subgraph(mask)
    if got is None or numel > EVAL_MAX_ELEMENTS:
        return False
    order, externals = got
    inputs = []
    for x in externals:
        v = x.meta.get("val")
        inputs.append(torch.empty([example_size(s) for s in v.shape], dtype=v.dtype))
    try:
        with torch.no_grad():
            built = builder(_spec(order, externals, mask), torch.device("cpu"))(*inputs)
    except Exception:
        return False
    return is_sdpa_causal(built)
