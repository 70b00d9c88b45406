"""GraphModule helpers a rank needs at run time: build a module from a graph and its
tensors, and point a module (and every device its graph names) at a device."""

from __future__ import annotations

import torch
import torch.fx as fx

__all__ = ["build_module", "on_device"]


def build_module(graph: fx.Graph, tensors: dict, name: str) -> fx.GraphModule:
    """A GraphModule that owns a copy of `graph`, with `tensors` as its buffers."""
    root = torch.nn.Module()
    for k, t in tensors.items():
        root.register_buffer(k, t)
    g = fx.Graph()
    g._codegen = graph._codegen
    g.output(g.graph_copy(graph, {}))  # each module owns its graph
    return fx.GraphModule(root, g, class_name=name)


def with_index(device: torch.device) -> torch.device:
    """`cuda` as the device a tensor moved there lands on (`cuda:<current>`): export's metadata
    asserts compare devices exactly, so a graph naming `cuda` beside tensors on `cuda:0` fails
    under torch.compile's fake tensors ("Tensor device mismatch! Expected: cuda, Got: cuda:0",
    seen on the H200), though eager runs pass."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def on_device(gm: fx.GraphModule, device: torch.device | str) -> fx.GraphModule:
    """`gm` with its parameters and buffers on `device`, and every device its graphs name
    (factory calls such as arange, `.to(device=...)`, export's metadata asserts) pointed there
    too: a graph captured on the CPU or on meta then runs on the GPU. In place; returns gm."""
    device = with_index(torch.device(device))
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
