"""unpartitioned: attention-like cores that no attention site owns, and why.

find_attention recognizes the spellings it knows; a core it cannot match is left to run
replicated (every rank computes it whole), which is exact but not what the plan prices.
This pass makes every such core visible, so none is replicated silently:

* every SDPA-like op (``aten.scaled_dot_product_attention`` and its backend ops) and every
  flex-attention-like op (``torch.ops.higher_order.flex_attention``);
* every softmax whose input descends, through elementwise and view ops only, from a
  QK^T-like contraction (matmul / bmm / baddbmm / einsum) of two activations.  An operand
  that is a weight (a parameter, or a view of one) disqualifies it: an MoE router's softmax
  over ``x @ W`` or a Linear's output is no attention core.

that is not among any site's core nodes.  Each gets a reason: find_attention's skip note
for that core when there is one (the core matched, its projections did not), else what
stood between QK^T and the softmax that the matcher does not take as a score op.

Invariant: the graph is not modified; each UnpartitionedCore names a node of it.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from helix_compiler.planning.plan import UnpartitionedCore

from .find_attention import SCORE_OPS, SCORE_VIEW_OPS, find_cores
from .graph_utils import (
    MATMUL_OPS, MOVEMENT_OPS, PASS_THROUGH_OPS, SDPA_OPS, SOFTMAX_OPS, aten, shape, tensor_inputs,
)

# QK^T spellings a score can come from (find_attention takes the first three).
CONTRACTION_OPS = MATMUL_OPS | {aten.baddbmm.default, aten.einsum.default}
# How far back from a softmax the walk to a QK^T looks: softcapping, masking, scaling and
# casts are a handful of ops; a longer chain is not a score path.
MAX_SCORE_PATH = 24


def _name(target) -> str:
    return str(getattr(target, "__name__", target)).replace("aten::", "")


def _attention_op(node: fx.Node) -> str | None:
    """"sdpa" or "flex_attention" for an op that computes a whole attention core."""
    if node.target in SDPA_OPS or "scaled_dot_product" in str(node.target):
        return "sdpa"
    if "flex_attention" in str(node.target):
        return "flex_attention"
    return None


def _passes_scores(node: fx.Node) -> bool:
    """An op between QK^T and the softmax that keeps the scores' elements: elementwise
    (scale, mask, softcap, clamp), a view or copy, or any op whose output has the shape of
    one of its tensor inputs (a sort, a cumulative op)."""
    if node.op != "call_function":
        return False
    t = node.target
    if t in MOVEMENT_OPS or t in PASS_THROUGH_OPS:
        return True
    if isinstance(t, torch._ops.OpOverload) and torch.Tag.pointwise in t.tags:
        return True
    if t in CONTRACTION_OPS or t in SOFTMAX_OPS:
        return False
    out = node.meta.get("val")
    outs = out if isinstance(out, (list, tuple)) else (out,)   # sort: (values, indices)
    # a list, not a set: a symbolic size (SymInt) is not hashable (GPT-OSS's MoE router topk)
    shapes = [tuple(o.shape) for o in outs if isinstance(o, torch.Tensor) and o.dim()]
    return any(shape(a) in shapes for a in tensor_inputs(node))


def _is_weight(node) -> bool:
    """A parameter or constant, possibly viewed, cast or transposed (W.T, W[:, :k])."""
    seen = 0
    while isinstance(node, fx.Node) and seen < MAX_SCORE_PATH:
        if node.op == "get_attr":
            return True
        if node.op != "call_function" or not (node.target in MOVEMENT_OPS
                                               or node.target in PASS_THROUGH_OPS):
            return False
        ins = tensor_inputs(node)
        if len(ins) != 1:
            return False
        node, seen = ins[0], seen + 1
    return False


def _qk_operands(node: fx.Node) -> list:
    if node.target is aten.einsum.default:
        return list(node.args[1])
    if node.target is aten.baddbmm.default:
        return [node.args[1], node.args[2]]
    return [node.args[0], node.args[1]]


def score_path(softmax: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """(QK^T node, the nodes between it and the softmax, in graph order) when the softmax's
    input descends through score-keeping ops from a contraction of two activations."""
    start = softmax.args[0]
    if not isinstance(start, fx.Node):
        return None
    parent, frontier = {start: None}, [start]
    while frontier and len(parent) <= MAX_SCORE_PATH:
        node = frontier.pop(0)
        if node.op == "call_function" and node.target in CONTRACTION_OPS:
            ops = _qk_operands(node)
            if len(ops) == 2 and all(isinstance(a, fx.Node) and not _is_weight(a) for a in ops):
                path, x = [], parent[node]
                while x is not None:
                    path.append(x)
                    x = parent[x]
                return node, path
            continue
        if not _passes_scores(node):
            continue
        for a in tensor_inputs(node):
            if a not in parent:
                parent[a] = node
                frontier.append(a)
    return None


def find_unpartitioned(gm: fx.GraphModule, matches, skipped) -> tuple[UnpartitionedCore, ...]:
    """Every attention-like core of `gm` that none of `matches` (find_attention's SiteMatch)
    owns, in graph order, with find_attention's note from `skipped` when it has one."""
    owned = {name for m in matches for name in m.site.core_nodes}
    notes = {}
    for note in skipped:   # "attention core at node <out>: <why>"
        head, _, why = str(note).partition(": ")
        notes[head.rsplit(" ", 1)[-1]] = why or str(note)
    # find_attention names a core it recognized but could not match by its output node
    out_of = {}
    for core in find_cores(gm):
        for n in core.nodes:
            out_of[n.name] = core.out.name
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.name in owned:
            continue
        kind = _attention_op(node)
        if kind is None and node.target in SOFTMAX_OPS:
            hit = score_path(node)
            if hit is None:
                continue
            kind = "softmax"
            qk, path = hit
        if kind is None:
            continue
        note = notes.get(out_of.get(node.name, node.name))
        if note is None:
            if kind == "softmax":
                unknown = [n for n in path if n.target not in SCORE_OPS and n.target not in SCORE_VIEW_OPS]
                ops = ", ".join(f"{n.name} ({_name(n.target)})" for n in (unknown or path)) or "nothing"
                between = f"between QK^T {qk.name} ({_name(qk.target)}) and softmax {node.name}"
                note = (f"not recognized as an attention core: {between} it found {ops}, "
                        + ("which the matcher does not take as a score op" if unknown else
                           "which the matcher knows; the rest of the core (k transposed, one "
                           "p @ v contraction) is not a spelling it knows"))
            else:
                note = f"not recognized as an attention core: {_name(node.target)} has no attention site"
        found.append(UnpartitionedCore(node=node.name, op=kind, reason=note))
    return tuple(found)
