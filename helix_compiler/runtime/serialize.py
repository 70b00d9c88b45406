"""Rank graphs to and from plain JSON: no pickle, no code execution on load.

A node is [name, op, target, args, kwargs]; targets are OpOverload names
("aten::linear.default", "helix::all_reduce.default"), "operator.getitem" or
"helix.size_mask" (helix_compiler/runtime/masks.py: its graph travels as a JSON string) or
Python's size arithmetic ("operator.mul", ...);
arguments are JSON values, node references {"node": name} and typed scalars
({"dtype": "float32"}, {"device": "cpu"}, ...).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

# every module that registers a torch.ops.helix op a rank graph may call: a saved graph is
# loaded in a fresh process (a torchrun rank) that imported nothing else of Helix
from . import chunk_core, collectives, kernels, kernels_chunked  # noqa: F401
from ..errors import HelixError

# Python functions a saved graph may call, by saved name. Modules above this one add their
# own with `register_function` (helix_compiler/runtime/masks.py: "helix.size_mask"); whatever loads
# a saved rank graph imports them first (program.py imports masks).
_FUNCS = {"operator.getitem": operator.getitem}
# size arithmetic on symbolic ints (batch * heads, seq // 2, ...)
_FUNCS.update({f"operator.{f}": getattr(operator, f) for f in (
    "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow", "eq", "ne", "lt", "le",
    "gt", "ge")})


def register_function(name: str, fn) -> None:
    """Let saved graphs call `fn` under `name` (one name per function)."""
    if _FUNCS.get(name, fn) is not fn:
        raise HelixError(f"serialize: {name!r} is already registered for {_FUNCS[name]!r}; "
                         f"register {fn!r} under another name")
    _FUNCS[name] = fn


def _target_name(t) -> str:
    if isinstance(t, torch._ops.OpOverload):
        return f"{t._schema.name}.{t._overloadname}"
    for k, v in _FUNCS.items():
        if v is t:
            return k
    raise HelixError(f"cannot save a graph calling {t!r}; only ATen, helix ops, getitem and size arithmetic are saved")


def _resolve(name: str):
    if name in _FUNCS:
        return _FUNCS[name]
    ns_op, overload = name.rsplit(".", 1)
    ns, op = ns_op.split("::")
    try:
        return getattr(getattr(getattr(torch.ops, ns), op), overload)
    except AttributeError as e:
        raise HelixError(f"saved graph calls unknown op {name}; was it saved by another torch version?") from e


def _enc(a):
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if isinstance(a, (list, tuple)):
        return {"tuple" if isinstance(a, tuple) else "list": [_enc(x) for x in a]}
    if isinstance(a, dict):
        return {"dict": {k: _enc(v) for k, v in a.items()}}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).replace("torch.", "")}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, torch.layout):
        return {"layout": str(a).replace("torch.", "")}
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a).replace("torch.", "")}
    if isinstance(a, float) and (a != a or a in (float("inf"), float("-inf"))):
        return {"float": repr(a)}
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    raise HelixError(f"cannot save graph argument {a!r} of type {type(a).__name__}")


def _dec(a, env):
    if isinstance(a, dict):
        (k, v), = a.items()
        if k == "node":
            return env[v]
        if k in ("list", "tuple"):
            out = [_dec(x, env) for x in v]
            return out if k == "list" else tuple(out)
        if k == "dict":
            return {kk: _dec(vv, env) for kk, vv in v.items()}
        if k in ("dtype", "layout", "memory_format"):
            return getattr(torch, v)
        if k == "device":
            return torch.device(v)
        if k == "float":
            return float(v)
    return a


def graph_to_json(graph: fx.Graph) -> list:
    out = []
    for n in graph.nodes:
        target = n.target if n.op in ("placeholder", "get_attr", "output") else _target_name(n.target)
        if n.op == "output":
            target = "output"
        out.append([n.name, n.op, target, _enc(n.args), _enc(dict(n.kwargs))])
    return out


def graph_from_json(nodes: list) -> fx.Graph:
    g = fx.Graph()
    env = {}
    for name, op, target, args, kwargs in nodes:
        args, kwargs = _dec(args, env), _dec(kwargs, env)
        if op == "placeholder":
            node = g.placeholder(target)
        elif op == "get_attr":
            node = g.get_attr(target)
        elif op == "call_function":
            node = g.call_function(_resolve(target), tuple(args), kwargs)
        elif op == "output":
            node = g.output(args[0])
        else:
            raise HelixError(f"saved graph has node {name} with unsupported op {op}")
        node.name = name
        env[name] = node
    g.lint()
    return g
