"""Small shared helpers over ATen FX graphs: op families and node access."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

aten = torch.ops.aten

# Projections: nn.Linear (aten.linear) and GPT-2's Conv1D (aten.addmm with a (in, out) weight).
LINEAR_OPS = {aten.linear.default}
ADDMM_OPS = {aten.addmm.default}
PROJ_OPS = LINEAR_OPS | ADDMM_OPS
SDPA_OPS = {aten.scaled_dot_product_attention.default}
MATMUL_OPS = {aten.matmul.default, aten.bmm.default}
SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}

# Ops that only move or retype elements (the provenance walk runs them on index tags).
MOVEMENT_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.permute.default, aten.t.default, aten.numpy_T.default, aten.unsqueeze.default, aten.squeeze.dim,
    aten.squeeze.dims, aten.squeeze.default, aten.expand.default, aten.broadcast_to.default,
    aten.select.int,
    aten.slice.Tensor, aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int,
    aten.chunk.default, aten.cat.default, aten.stack.default, aten.unflatten.int,
    aten.flatten.using_ints, aten.contiguous.default, aten.clone.default, aten.alias.default,
    aten.detach.default, aten.repeat_interleave.self_int, aten.narrow.default,
    aten.index.Tensor, operator.getitem,
}
# A row's max (a stable softmax's shift: max.dim gives (values, indices)).
ROW_MAX_OPS = {aten.amax.default, aten.max.dim}
# Ops between softmax and the value matmul that keep the probabilities.
PASS_THROUGH_OPS = {
    aten.dropout.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
    aten._to_copy.default, aten.type_as.default, aten.clone.default, aten.contiguous.default,
    aten.alias.default, aten.detach.default,
}


def val(node) -> object:
    """The example value (a FakeTensor for tensors) export recorded for `node`."""
    if isinstance(node, fx.Node):
        return node.meta.get("val")
    return node


def is_tensor_node(node) -> bool:
    """A node whose value is a tensor or a list of tensors (split, unbind)."""
    if not isinstance(node, fx.Node):
        return False
    v = node.meta.get("val")
    if isinstance(v, (list, tuple)):
        return len(v) > 0 and all(isinstance(x, torch.Tensor) for x in v)
    return isinstance(v, torch.Tensor)


def real_users(node: fx.Node) -> list[fx.Node]:
    """Users that compute something (export's metadata asserts left out)."""
    return [u for u in node.users if u.target is not aten._assert_tensor_metadata.default]


def example_size(x) -> int:
    """A size at the example inputs' value (a symbolic size's hint)."""
    return int(x.node.hint) if isinstance(x, torch.SymInt) else int(x)


def shape(node) -> tuple:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else ()


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if is_tensor_node(a)]


# x @ W with a 2-D parameter W of shape (in, out) (Falcon's `x @ weight.T`, once fold_params
# has named weight.T), a projection like addmm without bias.
PARAM_MATMUL_OPS = {aten.matmul.default, aten.mm.default}


def proj_weight_node(node: fx.Node) -> fx.Node | None:
    """The weight get_attr of a projection, or None when the weight is not a parameter."""
    if node.target in LINEAR_OPS:
        w = node.args[1]
    elif node.target in ADDMM_OPS:
        w = node.args[2]
    elif node.target in PARAM_MATMUL_OPS:
        w = node.args[1]
        v = w.meta.get("val") if isinstance(w, fx.Node) else None
        if not (isinstance(v, torch.Tensor) and v.dim() == 2):
            return None
    else:
        return None
    return w if isinstance(w, fx.Node) and w.op == "get_attr" else None


def proj_input(node: fx.Node) -> fx.Node:
    return node.args[1] if node.target in ADDMM_OPS else node.args[0]


def proj_bias(node: fx.Node):
    if node.target in LINEAR_OPS:
        return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if node.target in ADDMM_OPS:
        return node.args[0]
    return None


def proj_out_features(node: fx.Node) -> int:
    w = val(proj_weight_node(node))
    return int(w.shape[0] if node.target in LINEAR_OPS else w.shape[1])


def is_projection(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and proj_weight_node(node) is not None


def constant_value(node):
    """The real tensor behind a constant the graph holds (a lifted index such as Falcon's [-2])."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in (
            aten.lift_fresh_copy.default, aten.clone.default, aten.detach.default, aten._to_copy.default):
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    obj = attr_value(node.graph.owning_module, node.target)
    return obj if isinstance(obj, torch.Tensor) and obj.device.type != "meta" else None


def attr_value(root: torch.nn.Module, target) -> object:
    """What a get_attr target ("layers.0.k_cache") names on `root`, or None."""
    obj = root
    for part in str(target).split("."):
        obj = getattr(obj, part, None)
    return obj


def norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def fake_shapes(gm: fx.GraphModule, args: tuple) -> None:
    """meta["val"] of every node of `gm`: a copy of its graph run on fake copies of its
    buffers and of `args`."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    root = torch.nn.Module()
    for name, t in [*gm.named_parameters(), *gm.named_buffers()]:
        *path, leaf = name.split(".")          # an export's q_proj.weight: a submodule's tensor
        owner = root
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        owner.register_buffer(leaf, mode.from_tensor(t))
    g, copies = fx.Graph(), {}
    g._codegen = gm.graph._codegen
    g.output(g.graph_copy(gm.graph, copies))
    with mode:
        FakeTensorProp(fx.GraphModule(root, g), mode).propagate_dont_convert_inputs(
            *[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    for old, new in copies.items():
        old.meta["val"] = new.meta.get("val")


def shared_copy(gm: fx.GraphModule, args: tuple, fake: bool = True) -> fx.GraphModule:
    """A new GraphModule over a copy of `gm`'s graph and `gm`'s own attributes (parameters and
    buffers shared, cache slices included), with `gm`'s meta and every node's meta["val"] from
    `args` (fake_shapes): what a pass that rewrites a rank module without touching it starts from.
    fake=False: the nodes keep the meta they were copied with (no fake run)."""
    g = fx.Graph()
    g._codegen = gm.graph._codegen
    g.output(g.graph_copy(gm.graph, {}))
    out = fx.GraphModule(gm, g, class_name=type(gm).__name__)
    out.meta.update(gm.meta)
    if fake:
        fake_shapes(out, args)
    return out


SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SDPA_DEFAULTS = (None, None, None, None, 0.0, False, None, False)


def sdpa_args(node: fx.Node) -> dict:
    """Every argument of an aten.scaled_dot_product_attention node by name, positional or
    keyword, its default where the call left it out."""
    return {name: node.args[i] if i < len(node.args) else node.kwargs.get(name, default)
            for i, (name, default) in enumerate(zip(SDPA_ARGS, SDPA_DEFAULTS))}
