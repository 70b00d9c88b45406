"""fuse_linears: projections that read the same input become one projection (one job).

A decoder layer runs q, k and v projections of the same normed input, and gate and up
projections of another. At decode a rank's step has one or a few tokens, so each projection
is a GEMV that reads its weight once; small weights leave most of the GPU idle while the
kernel starts and ends. Measured on an H200 (TP=8 rank of a LLaMA-70B shape, one sequence,
results/decode_compiled_h200_tp8_splitkv.json's kernel profile): q's 16.8 MB weight took
11.7 us (1.4 TB/s), k's and v's 2.1 MB 4.4 us each plus a split-K reduce each, where one
matrix of q, k and v side by side is read in one kernel. vLLM and TensorRT-LLM build these
layers fused (QKVParallelLinear, MergedColumnParallelLinear); this pass does it to any
rank graph, whatever the model calls its projections.

Rewritten, for k >= 2 nodes aten.linear(x, W_i[, b_i]) with the same input node x, each W_i a
2-D tensor attribute read by that linear alone (one get_attr node, one user: a tied weight is
left as it is; same dtype and device; biases all absent or all 1-D attributes):

    W   = cat([W_1, ..., W_k], 0)                 (one new attribute; the W_i are dropped)
    y   = aten.linear(x, W[, cat(b)])             (where the first of them was)
    y_i = aten.slice.Tensor(y, -1, o_i, o_i + out_i)

Each y_i is a strided view of y. A group is left as it is, and said so, where some user of a
y_i is an aten.view that the strided slice cannot take.

Invariant: the returned module computes what `gm` computed, to the rounding of another GEMM
kernel: row r of y_i is x_r W_i^T (+ b_i), the same products and sums, in the order of the
kernel the fused GEMM runs (bitwise equal on the CPU in the tests, which compare every rank
with the model). `fused` (a dict shared by calls) makes a pair of modules that share their
W_i share the one W too (compile_decoder's prefill and step).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.fx as fx

from .graph_utils import aten, attr_value, shared_copy, val

__all__ = ["FusedLinears", "fuse_linears"]

LINEAR = aten.linear.default


@dataclass(frozen=True, slots=True)
class FusedLinears:
    """One group of projections of the same input: fused into `attr`, or kept and why."""

    input: str                  # the input node's name
    members: tuple[str, ...]    # the weights' attribute names, in the fused order
    out_features: tuple[int, ...]
    attr: str = ""              # the fused weight's attribute ("" where kept)
    why: str = ""

    def __str__(self) -> str:
        names = ", ".join("_".join(m.removesuffix("_weight").split("_")[-2:]) for m in self.members)
        if self.attr:
            return f"{self.input}: {len(self.members)} projections ({names}) as one, {self.attr}"
        return f"{self.input}: {len(self.members)} projections ({names}) kept apart ({self.why})"


def _weight(node: fx.Node, ndim: int):
    """The get_attr node and tensor of a linear's weight / bias argument, or (None, None)."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr" and len(node.users) == 1):
        return None, None
    t = attr_value(node.graph.owning_module, node.target)
    return (node, t) if isinstance(t, torch.Tensor) and t.dim() == ndim else (None, None)


def _member(node: fx.Node):
    """(weight node, weight, bias node or None, bias or None) of a fusable linear, or None."""
    if node.kwargs or len(node.args) < 2:
        return None
    w_node, w = _weight(node.args[1], 2)
    if w_node is None:
        return None
    b = node.args[2] if len(node.args) > 2 else None
    if b is None:
        return w_node, w, None, None
    b_node, bt = _weight(b, 1)
    return None if b_node is None else (w_node, w, b_node, bt)


def _views_fit(node: fx.Node, total: int) -> str:
    """'' where every aten.view user of `node` takes the strided slice of the fused output
    that replaces it; else why not."""
    out = val(node)
    if not isinstance(out, torch.Tensor):
        return "its output's shape is unknown"
    shape = list(out.shape)
    full = [*shape[:-1], total]
    strides = [1] * len(full)
    for d in range(len(full) - 2, -1, -1):
        strides[d] = strides[d + 1] * full[d + 1]
    for u in node.users:
        if u.target is not aten.view.default:
            continue
        probe = torch.empty_strided(shape, strides, device="meta")
        try:
            probe.view(u.args[1])
        except RuntimeError:
            return f"{u.name} views it as {list(u.args[1])}, which the strided slice cannot take"
    return ""


def _groups(gm: fx.GraphModule) -> dict:
    reads = defaultdict(int)            # attribute -> get_attr nodes (a tied weight: several)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            reads[str(node.target)] += 1
    by_input = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is LINEAR and isinstance(node.args[0], fx.Node):
            m = _member(node)
            if m is not None and all(reads[str(n.target)] == 1 for n in (m[0], m[2]) if n is not None):
                by_input[node.args[0]].append((node, *m))
    return {x: ms for x, ms in by_input.items() if len(ms) >= 2}


def _compatible(members: list) -> str:
    w0 = members[0][2]
    for _, _, w, _, b in members:
        if w.dtype != w0.dtype or w.device != w0.device or w.shape[1] != w0.shape[1]:
            return "their weights differ in dtype, device or input features"
    if len({b is None for *_, b in members}) > 1:
        return "some have a bias and some do not"
    return ""


def fuse_linears(gm: fx.GraphModule, args: tuple, fused: dict | None = None
                 ) -> tuple[fx.GraphModule, tuple[FusedLinears, ...]]:
    """A module computing what `gm` computes, with each group of projections of one input as
    one projection, and one FusedLinears per group found. `gm` is left as it is (a shared
    copy is rewritten: every other attribute, the cache slices included, is shared).
    `fused`: {ids of the member tensors: (them, fused weight, fused bias)}, filled and
    reused across calls (it holds the members, so that no id is reused while it lives).
    The result's meta["fused_linears"] maps each fused attribute to its members' names."""
    fused = {} if fused is None else fused
    if not _groups(gm):
        return gm, ()
    # the copy runs the graph on fake tensors only where a projection's value is missing
    out = shared_copy(gm, args, fake=any(n.target is LINEAR and not isinstance(val(n), torch.Tensor)
                                         for n in gm.graph.nodes))
    sites, drop = [], []
    names = dict(out.meta.get("fused_linears", {}))
    for x, members in _groups(out).items():
        attrs = tuple(str(m[1].target) for m in members)
        outs = tuple(int(m[2].shape[0]) for m in members)
        why = _compatible(members)
        total = sum(outs)
        for lin, *_ in members:
            why = why or _views_fit(lin, total)
        if why:
            sites.append(FusedLinears(x.name, attrs, outs, why=why))
            continue
        parts = tuple(t for m in members for t in (m[2], m[4]) if t is not None)
        key = tuple(id(t) for t in parts)
        if key not in fused:     # the parts are held with it: their ids stay theirs
            w = torch.cat([m[2] for m in members], 0)
            b = torch.cat([m[4] for m in members], 0) if members[0][4] is not None else None
            fused[key] = (parts, w, b)
        _, w, b = fused[key]
        attr = f"_fused_{len(names)}_{attrs[0]}"
        out.register_buffer(attr, w)
        first = members[0][0]
        with out.graph.inserting_before(first):
            w_node = out.graph.get_attr(attr)
            lin_args = (x, w_node)
            if b is not None:
                out.register_buffer(attr + "_bias", b)
                lin_args += (out.graph.get_attr(attr + "_bias"),)
            y = out.graph.call_function(LINEAR, lin_args)
            ref = val(first)                  # a fake tensor of the example run (_views_fit)
            y.meta["val"] = ref.new_empty((*ref.shape[:-1], total))
            start = 0
            for (lin, *_), o in zip(members, outs):
                piece = out.graph.call_function(aten.slice.Tensor, (y, -1, start, start + o))
                piece.meta["val"] = y.meta["val"].narrow(-1, start, o)
                lin.replace_all_uses_with(piece)
                start += o
        for lin, w_node_old, _, b_node_old, _ in members:
            out.graph.erase_node(lin)
            for n in (w_node_old, b_node_old):
                if n is not None:
                    out.graph.erase_node(n)
                    drop.append(str(n.target))
        names[attr] = attrs
        sites.append(FusedLinears(x.name, attrs, outs, attr=attr))
    if not any(s.attr for s in sites):
        return gm, tuple(sites)
    for target in drop:
        owner, _, leaf = target.rpartition(".")
        mod = out.get_submodule(owner) if owner else out
        if leaf in mod._buffers:
            del mod._buffers[leaf]
        elif leaf in mod._parameters:
            del mod._parameters[leaf]
    out.graph.lint()
    out.recompile()
    out.meta["fused_linears"] = names
    return out, tuple(sites)
