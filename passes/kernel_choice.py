"""Kernel choice for the attention core of a rank graph (one job: pick the core's kernel).

On Hopper, PyTorch's SDPA has a flash / cuDNN kernel only up to head dim 256
(helix_compiler.runtime.kernels.FUSED_MAX_HEAD_DIM);
above it SDPA falls back to the memory-efficient kernel, measured 2.3x slower
than an explicit matmul -> softmax -> matmul at d = 512 (DESIGN.md section 7).
This pass rewrites

    aten.scaled_dot_product_attention(q, k, v, mask, dropout_p=0, is_causal, scale, enable_gqa)
        with head dim d > head_dim_threshold
    -> torch.ops.helix.chunked_attention(q, k, v, mask, is_causal, scale, chunk_bytes, 0)

and where a head dim is not a multiple of 8 (no fused kernel loads it; SDPA would run its
math path), and (score-reduce variant) the materialized tail

    torch.ops.helix.attend(scores, v, mask, is_causal, scale)
    -> torch.ops.helix.chunked_attend(scores, v, mask, is_causal, scale, chunk_bytes)

Both replacements compute the same function (helix_compiler/runtime/kernels_chunked.py),
a block of query rows at a time, so at most `chunk_bytes` of scores are alive.

The head dim is read from the graph's shapes: node.meta["val"] where the graph
carries it, else from a FakeTensor propagation of `example_inputs`. Without
either, SDPA nodes are rewritten with min_head_dim = head_dim_threshold and the
op picks at run time (SDPA itself when d <= threshold), which is exact too.

    gm = apply_kernel_choice(prog.rank_module(r))                       # in place, returns gm
    gm = apply_kernel_choice(gm, example_inputs=(x,), chunk_bytes=16 << 20)
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import helix_compiler.runtime.kernels_chunked  # noqa: F401  (registers the chunked ops)
from helix_compiler.runtime.kernels import FUSED_MAX_HEAD_DIM, fused_takes
from helix_compiler.runtime.kernels_chunked import DEFAULT_CHUNK_BYTES

from .graph_utils import sdpa_args

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


def _shapes(gm: fx.GraphModule, example_inputs) -> dict:
    """node -> shape of its value: from node.meta, else by fake propagation of example_inputs."""
    out = {}
    for node in gm.graph.nodes:
        v = node.meta.get("val", node.meta.get("tensor_meta"))
        if v is not None and hasattr(v, "shape"):
            out[node] = tuple(v.shape)
    if example_inputs is None or all(
            n in out for n in gm.graph.nodes if n.op == "call_function" and n.target is SDPA):
        return out
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    seen = {}

    class _Prop(FakeTensorProp):
        def run_node(self, n):
            r = super().run_node(n)
            if isinstance(r, torch.Tensor):
                seen[n] = tuple(r.shape)
            return r

    with mode:
        _Prop(gm, mode).propagate_dont_convert_inputs(*fake)
    return {**seen, **out}


def fused_kernel_exists(d_qk: int, d_v: int | None,
                        head_dim_threshold: int = FUSED_MAX_HEAD_DIM) -> bool:
    """Whether SDPA has a fused kernel for q/k head dim d_qk and v head dim d_v: both
    multiples of FUSED_ALIGN (a qk-gather core's V has d/m, 4 wide at d = 128, m = 32:
    SDPA would fall back to its math path) and d_qk within the threshold."""
    d_v = d_qk if d_v is None else d_v
    return d_qk <= head_dim_threshold and fused_takes("cudnn", int(d_qk), int(d_v))


def _flag(x):
    """is_causal as the graph has it: a constant, or a node (passes/size_masks.py decides it
    at run time)."""
    return x if isinstance(x, fx.Node) else bool(x)


def apply_kernel_choice(gm: fx.GraphModule, head_dim_threshold: int = FUSED_MAX_HEAD_DIM, *,
                        example_inputs=None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                        rewrite_attend: bool = True) -> fx.GraphModule:
    """Rewrite attention cores no fused kernel takes (head dim > head_dim_threshold, or q / v
    head dims not multiples of 8) (and, with
    rewrite_attend, every helix.attend tail) into the exact chunked explicit form.
    Works in place on `gm` and returns it; `gm.meta["kernel_choice"]` lists what changed."""
    shapes = _shapes(gm, example_inputs)
    changed = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is SDPA:
            a = sdpa_args(node)
            if a["dropout_p"] not in (0, 0.0):
                continue            # training-mode dropout: leave SDPA to do it
            q_shape, v_shape = shapes.get(a["query"]), shapes.get(a["value"])
            known = q_shape is not None and v_shape is not None
            if known and fused_kernel_exists(q_shape[-1], v_shape[-1], head_dim_threshold):
                continue            # a fused kernel takes these head dims
            # shapes unknown: the op decides at run time (SDPA where a fused kernel takes them)
            min_d = 0 if known else head_dim_threshold
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(
                    torch.ops.helix.chunked_attention.default,
                    (a["query"], a["key"], a["value"], a["attn_mask"], _flag(a["is_causal"]),
                     a["scale"], int(chunk_bytes), int(min_d)))
            new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta",
                                                                         "stack_trace")})
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            changed.append((new.name, "sdpa", None if q_shape is None else q_shape[-1]))
        elif rewrite_attend and node.target is torch.ops.helix.attend.default:
            scores, v, mask, is_causal, scale = (list(node.args) + [None] * 5)[:5]
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(
                    torch.ops.helix.chunked_attend.default,
                    (scores, v, mask, _flag(is_causal), float(scale), int(chunk_bytes)))
            new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta",
                                                                         "stack_trace")})
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            changed.append((new.name, "attend", None))
    if changed:     # an unchanged graph keeps its code (regenerating it: ~30 ms a rank module)
        gm.graph.lint()
        gm.recompile()
    gm.meta["kernel_choice"] = changed
    return gm
