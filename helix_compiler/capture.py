"""Capture a user's model as an ATen-level FX graph with torch.export.

`torch.fx.symbolic_trace` fails on Hugging Face GPT-2 / LLaMA / BERT and on
nn.TransformerEncoder; `torch.export.export(..., strict=False)` succeeds on
all of them, so it is the only capture path (DESIGN.md section 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .errors import CaptureError

__all__ = ["Captured", "capture"]


@dataclass(frozen=True, slots=True)
class Captured:
    """The captured graph and what was used to capture it."""

    gm: fx.GraphModule            # the unlifted module: parameters are get_attr nodes
    args: tuple
    kwargs: dict
    params: dict                  # parameter / buffer name -> tensor of the user's model


def _hint(model: torch.nn.Module, kwargs: dict) -> str:
    name = type(model).__module__
    if name.startswith("transformers") and kwargs.get("use_cache") is not False:
        return "for Hugging Face decoders pass example_kwargs={'use_cache': False}"
    return ("make the forward traceable (no data-dependent Python control flow on tensor values), "
            "or pass example inputs the model accepts")


def capture(model: torch.nn.Module, args: tuple, kwargs: dict | None = None) -> Captured:
    """Export `model` on the example inputs; a failure becomes a CaptureError that says what to try."""
    kwargs = dict(kwargs or {})
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(args, tuple):
        args = (args,)
    try:
        ep = torch.export.export(model, args, kwargs, strict=False)
    except Exception as e:  # torch.export raises many types; all mean the same to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {type(e).__name__}: {first[:300]}; "
            f"{_hint(model, kwargs)}") from e
    gm = ep.module()
    # The export guard re-checks the example shapes; rank modules run other shapes.
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    params = dict(gm.named_parameters(remove_duplicate=False))
    params.update(dict(gm.named_buffers(remove_duplicate=False)))
    for name, tensor in model.state_dict(keep_vars=True).items():
        params.setdefault(name, tensor)
    return Captured(gm=gm, args=args, kwargs=kwargs, params=params)
