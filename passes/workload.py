"""workload: what the graph does outside the projections and attention cores, per sequence.

The cost model prices projections, attention cores and MLP activations from site
formulas. Everything else a rank runs (norms, residual adds, rotary, GQA's
repeat_kv copies, dtype casts, a materialized attention mask, an LM head) is read
here from the captured graph, op by op, as PyTorch runs it eagerly: one kernel per
op, no fusion. DESIGN.md section 5: "walk the same annotated graph".

Per op:
  memory-bound   bytes = inputs read (each input's storage extent, so a broadcast
                 operand counts once) + output written
  matmul         FLOPs = 2 * output elements * contraction, for matmuls no site or
                 MLP owns (an LM head, a projection that is not attention's)
  free           views (view, transpose, slice, expand, ...), a reshape / contiguous /
                 cast that does not copy (contiguous input, same dtype), metadata ops

Each op is put in a class by where it sits, which says how it divides over ranks:
  replicated     the residual stream: every rank runs it whole (helix and TP alike); its
                 norms and row reductions apart (a slower rate than pointwise ops)
  head           on a q / k / v path (projection -> core) or core -> output projection:
                 per tensor, elements of >= H*d features per token divide over
                 n*m ranks ("q"), of >= H_kv*d over min(n, H_kv)*m ("kv"), others not
  mask           builds a (.., S_q, S_k) attention mask: replicated; not counted where
                 the mask is SDPA's causal one built from sizes (passes/size_masks.py: the
                 program runs the core with is_causal and never builds it)

Projections, cores and MLP interiors are left to the site formulas. Sizes are the
example inputs' (symbols at their example value), divided by the example batch: a
figure per sequence at the example's sequence length.

Invariant: the graph is not modified.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from helix_compiler.planning.sites import Workload

from .graph_utils import (ADDMM_OPS, LINEAR_OPS, MATMUL_OPS, PARAM_MATMUL_OPS, SDPA_OPS,
                          example_size, proj_input, real_users, val)

aten = torch.ops.aten

# Ops that never touch memory: views, metadata, size queries.
FREE_OPS = {
    aten.view.default, aten._unsafe_view.default, aten.transpose.int, aten.permute.default,
    aten.t.default, aten.numpy_T.default, aten.unsqueeze.default, aten.squeeze.dim,
    aten.squeeze.dims, aten.squeeze.default, aten.expand.default, aten.select.int,
    aten.slice.Tensor, aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int,
    aten.chunk.default, aten.unflatten.int, aten.alias.default, aten.detach.default,
    aten.narrow.default, aten.sym_size.int, aten._assert_tensor_metadata.default,
    aten.lift_fresh_copy.default, aten.dropout.default, operator.getitem,
}
# Copy only when the input cannot be viewed as the result.
MAYBE_COPY_OPS = {aten.reshape.default, aten.contiguous.default, aten.flatten.using_ints}
CAST_OPS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default,
            aten.type_as.default}
GATHER_OPS = {aten.embedding.default}
# Row reductions and norms: priced at the profile's `norm` rate (the rest at `pointwise`).
NORM_OPS = {
    aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default,
    aten.group_norm.default, aten.mean.dim, aten.mean.default, aten.sum.dim_IntList,
    aten.sum.default, aten.var.correction, aten.var_mean.correction, aten.amax.default,
    aten.amin.default, aten.softmax.int, aten._softmax.default, aten.log_softmax.int,
    aten.cumsum.default, aten.norm.ScalarOpt_dim,
}
MATMUL_FAMILY = LINEAR_OPS | ADDMM_OPS | MATMUL_OPS | PARAM_MATMUL_OPS | {aten.mm.default}


def _numel(t: torch.Tensor) -> int:
    n = 1
    for s in t.shape:
        n *= _size_estimate(s)
    return n


def _size_estimate(s) -> int:
    """example_size, or for an unbacked (data-dependent) size, which has no example value
    (JetMoE's tokens per expert, from its routing), the upper end of its value range when
    that is finite, else 1: the workload is a cost estimate, and such sizes sit in the MoE
    blocks every rank runs whole."""
    if not (isinstance(s, torch.SymInt) and s.node.hint is None):
        return example_size(s)
    try:
        upper = s.node.shape_env.bound_sympy(s.node.expr).upper
        return int(upper) if upper.is_finite else 1
    except Exception:  # no value range: count it once
        return 1


def _extent(t: torch.Tensor) -> int:
    """Elements of storage a read of `t` touches: a stride-0 (broadcast) dim counts once."""
    if _numel(t) == 0:
        return 0
    return 1 + sum((_size_estimate(n) - 1) * abs(_size_estimate(s))
                   for n, s in zip(t.shape, t.stride()))


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for t in x if isinstance(t, torch.Tensor)]
    return []


def _bytes_read(node: fx.Node) -> list[tuple[torch.Tensor, int]]:
    out, seen = [], set()
    for a in node.all_input_nodes:
        if a in seen:
            continue
        seen.add(a)
        for t in _tensors(val(a)):
            out.append((t, min(_extent(t), _numel(t)) * t.element_size()))
    return out


def _contiguous(t: torch.Tensor) -> bool:
    try:
        return bool(t.is_contiguous())
    except Exception:  # an unbacked stride: assume the worse
        return False


def op_cost(node: fx.Node) -> tuple[str, float, list[tuple[torch.Tensor, int]]]:
    """("free" | "memory" | "norm" | "matmul", FLOPs, [(tensor, bytes)] read and written) of
    one op ("norm": a row reduction or norm; "memory": every other memory-bound op)."""
    if node.op != "call_function" or node.target in FREE_OPS:
        return "free", 0.0, []
    outs = _tensors(val(node))
    if not outs:
        return "free", 0.0, []
    ins = [a for a in node.all_input_nodes if _tensors(val(a))]
    first = _tensors(val(ins[0]))[0] if ins else None
    if node.target in MAYBE_COPY_OPS and first is not None and _contiguous(first):
        return "free", 0.0, []
    if node.target in CAST_OPS and first is not None and first.dtype == outs[0].dtype \
            and first.device == outs[0].device:
        return "free", 0.0, []
    written = [(t, _numel(t) * t.element_size()) for t in outs]
    if node.target in GATHER_OPS:   # reads the rows it writes (and the indices), not the table
        idx = [(t, _numel(t) * t.element_size()) for a in node.all_input_nodes[1:]
               for t in _tensors(val(a))]
        return "memory", 0.0, written + written + idx
    if node.target in MATMUL_FAMILY or node.target in SDPA_OPS:
        a = _tensors(val(proj_input(node) if node.target in ADDMM_OPS else node.args[0]))[0]
        k = _size_estimate(a.shape[-1])
        return "matmul", 2.0 * sum(_numel(t) for t in outs) * k, _bytes_read(node) + written
    return ("norm" if node.target in NORM_OPS else "memory"), 0.0, _bytes_read(node) + written


def _forward_between(starts, stop: set) -> set:
    """Nodes reached from `starts` by users, not passing through `stop`."""
    seen, stack = set(), list(starts)
    while stack:
        node = stack.pop()
        for u in real_users(node):
            if u in stop or u in seen:
                continue
            seen.add(u)
            stack.append(u)
    return seen


def _backward_from(node: fx.Node, stop: set) -> set:
    seen, stack = set(), [node]
    while stack:
        x = stack.pop()
        for a in x.all_input_nodes:
            if a in stop or a in seen:
                continue
            seen.add(a)
            stack.append(a)
    return seen


def _post_core(core_out: fx.Node, o_proj: fx.Node | None) -> set:
    """Nodes between a core's output and its output projection's input (transpose, reshape):
    the ancestors of that input, stopping at the core, that the core reaches."""
    if o_proj is None:
        return set()
    start = proj_input(o_proj)
    if start is core_out:
        return set()
    back = _backward_from(start, {core_out}) | {start}
    on_path, stack = set(), [core_out]
    while stack:
        for u in stack.pop().users:
            if u in back and u not in on_path:
                on_path.add(u)
                stack.append(u)
    return on_path


def measure(gm: fx.GraphModule, matches, mlps, batch: int) -> Workload:
    """The Workload of `gm` (per sequence) given its attention sites and MLPs."""
    nodes = {n.name: n for n in gm.graph.nodes}
    owned: set = set()            # priced by the site / MLP formulas
    head: dict = {}               # node -> (H, H_kv, d, tokens) of its site
    mask_nodes: set = set()
    dropped: set = set()
    for m in matches:
        s = m.site
        projs = [nodes[x] for x in (s.q_proj, s.k_proj, s.v_proj, s.o_proj) if x]
        owned |= set(projs) | set(m.core.nodes)
        q_tok, kv_tok = s.batch * s.q_len, s.batch * s.kv_len
        for prov, tok in ((m.q, q_tok), (m.k, kv_tok), (m.v, kv_tok)):
            for x in prov.path:
                head.setdefault(x, (s.num_heads, s.num_kv_heads, s.head_dim, tok))
        for x in _post_core(m.core.out, nodes[s.o_proj] if s.o_proj else None):
            head.setdefault(x, (s.num_heads, s.num_kv_heads, s.head_dim, q_tok))
        if m.core.mask is not None and m.site.mask_causal:
            dropped |= {m.core.mask} | _backward_from(m.core.mask, set())   # never built
        elif m.core.mask is not None:
            mask_nodes |= {m.core.mask} | _backward_from(m.core.mask, set())
    for x in mlps:
        ups = [nodes[u] for u in x.up]
        down = nodes[x.down]
        # the interior: find_mlp's region, closed on `down` (every user inside it or `down`)
        owned |= set(ups) | {down} | _forward_between(ups, {down})
    rep = {"memory": 0.0, "norm": 0.0, "matmul": 0.0}
    lead = {"memory": 0.0, "norm": 0.0}
    # the first block output a sequence-parallel program reduce-scatters: before it, in graph
    # order, every replicated op runs on the whole sequence even with SP norms
    outputs = {nodes[m.site.o_proj] for m in matches if m.site.o_proj} | {
        nodes[x.down] for x in mlps}
    leading = bool(outputs)
    q_bytes = kv_bytes = head_rep = mask = 0.0
    ops = 0
    for node in gm.graph.nodes:
        if node in outputs:
            leading = False
        if node in owned or node.op != "call_function":
            continue
        kind, flops, moved = op_cost(node)
        if kind == "free":
            continue
        ops += 1
        if kind == "matmul":
            rep["matmul"] += flops
            rep["memory"] += sum(b for _, b in moved)
            continue
        total = sum(b for _, b in moved)
        if node in head:
            H, H_kv, d, tokens = head[node]
            for t, b in moved:
                feats = _numel(t) / max(tokens, 1)
                if feats >= H * d:
                    q_bytes += b
                elif feats >= H_kv * d:
                    kv_bytes += b
                else:
                    head_rep += b
        elif node in mask_nodes and _score_shaped(node):
            mask += total
        elif node in dropped and _score_shaped(node):
            continue
        else:
            rep[kind] += total
            if leading and kind in lead:
                lead[kind] += total
    per = float(max(batch, 1))
    return Workload(replicated_bytes=(rep["memory"] + head_rep) / per,
                    replicated_norm_bytes=rep["norm"] / per, q_head_bytes=q_bytes / per,
                    kv_head_bytes=kv_bytes / per, mask_bytes=mask / per,
                    replicated_flops=rep["matmul"] / per, ops=ops,
                    leading_replicated_bytes=lead["memory"] / per,
                    leading_norm_bytes=lead["norm"] / per)


def _score_shaped(node: fx.Node) -> bool:
    """A tensor whose last two dims are (S_q, S_k): a mask or bias over scores."""
    ts = _tensors(val(node))
    return bool(ts) and ts[0].dim() >= 2 and _size_estimate(ts[0].shape[-1]) > 1 \
        and _size_estimate(ts[0].shape[-2]) > 1
