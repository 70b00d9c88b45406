"""Rank graphs made runnable at a benchmark's shapes.

A compile at the full batch is not possible (capture tags every activation), so the
paper's rank graphs are compiled for one sequence and re-batched: the leading size of
every reshape / view / expand / factory call is the batch (`rebatch`), and the result is
checked on meta (`check_shapes`) before it runs. Their meta weights get random values
(`materialize`): N(0, 1/fan_in) matrices, unit norms, zero biases.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.fx as fx

from helix_compiler.measure.stub import stubbed

SHAPE_OPS = ("reshape", "view", "_unsafe_view", "expand", "new_empty", "new_zeros", "new_ones",
             "new_full", "zeros", "ones", "empty", "full", "randn", "rand")


def copy_graph(gm: fx.GraphModule, class_name: str = "Rank") -> fx.GraphModule:
    """A GraphModule sharing gm's tensors with its own copy of the graph."""
    return fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=class_name)


def rebatch(gm: fx.GraphModule, old: int, new: int) -> fx.GraphModule:
    """A copy of `gm` whose shape arguments lead with `new` where they led with `old`."""
    out = copy_graph(gm, type(gm).__name__)
    for node in out.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "__name__", "").split(".")[0] \
                not in SHAPE_OPS:
            continue
        args = list(node.args)
        for i, a in enumerate(args):
            if isinstance(a, (list, tuple)) and a and type(a[0]) is int and a[0] == old:
                args[i] = type(a)([new, *a[1:]])
                break
        node.args = tuple(args)
    out.graph.lint()
    out.recompile()
    return out


def check_shapes(gm: fx.GraphModule, x_shape, dtype) -> tuple:
    """Run `gm` on meta (its tensors are meta) with stub collectives; the output shape."""
    with stubbed(), torch.no_grad():
        y = gm(torch.empty(x_shape, dtype=dtype, device="meta"))
    y = y[0] if isinstance(y, (tuple, list)) else y
    return tuple(y.shape)


def set_tensor(mod: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the parameter or buffer `name` ("blocks.0.attn.q_proj.weight") of `mod`."""
    *path, last = name.split(".")
    owner = mod.get_submodule(".".join(path)) if path else mod
    if last in dict(owner.named_parameters(recurse=False)):
        owner.register_parameter(last, torch.nn.Parameter(value, requires_grad=False))
    elif last in dict(owner.named_buffers(recurse=False)):
        owner.register_buffer(last, value)
    else:
        setattr(owner, last, value)


def init_tensor(name: str, shape, dtype, device, gen) -> torch.Tensor:
    """Weights ~ N(0, 1/fan_in) (unit-variance activations), norm weights 1, biases 0."""
    if len(shape) >= 2:
        return torch.randn(*shape, dtype=dtype, device=device, generator=gen) / math.sqrt(shape[-1])
    if name.endswith("bias"):
        return torch.zeros(*shape, dtype=dtype, device=device)
    return torch.ones(*shape, dtype=dtype, device=device)


def small_random(name: str, shape, dtype, device, gen) -> torch.Tensor:
    """N(0, 0.02^2) floats (Hugging Face's initializer range), zeros otherwise."""
    if dtype.is_floating_point:
        return torch.randn(*shape, dtype=dtype, device=device, generator=gen) * 0.02
    return torch.zeros(*shape, dtype=dtype, device=device)


def materialize(gm: torch.nn.Module, device, seed: int = 0, *, init=init_tensor,
                keep_real: bool = False) -> torch.nn.Module:
    """gm with its buffers and parameters given `init`'s values on `device`; with
    `keep_real` only the meta ones (the real ones, such as the int64 index tensors of a
    head-dim split, keep their values and move to `device`)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, t in list(gm.named_buffers()) + list(gm.named_parameters()):
        value = (t.detach().to(device) if keep_real and not t.is_meta
                 else init(name, tuple(t.shape), t.dtype, device, gen))
        set_tensor(gm, name, value)
    return gm
