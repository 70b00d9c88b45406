"""Capture a user's model as an ATen-level FX graph with torch.export.

`torch.fx.symbolic_trace` fails on Hugging Face GPT-2 / LLaMA / BERT and on
nn.TransformerEncoder; `torch.export.export(..., strict=False)` succeeds on
all of them, so it is the only capture path (DESIGN.md section 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import logging
from dataclasses import dataclass

import torch
import torch.fx as fx

from .errors import CaptureError
from .repeat import capture_repeated

__all__ = ["Captured", "capture"]


@dataclass(frozen=True, slots=True)
class Captured:
    """The captured graph and what was used to capture it."""

    gm: fx.GraphModule            # the unlifted module: parameters are get_attr nodes
    args: tuple
    kwargs: dict
    params: dict                  # parameter / buffer name -> tensor of the user's model
    dynamic: bool = False         # batch and sequence dims captured as symbols
    note: str = ""                # why a dynamic capture fell back to static shapes


def _hint(model: torch.nn.Module, kwargs: dict) -> str:
    name = type(model).__module__
    if name.startswith("transformers") and kwargs.get("use_cache") is not False:
        return "for Hugging Face decoders pass example_kwargs={'use_cache': False}"
    return ("make the forward traceable (no data-dependent Python control flow on tensor values), "
            "or pass example inputs the model accepts")


def _dynamic_spec(x):
    """Dim.AUTO on the batch and sequence dims (all but the last of a 3-D+ tensor)."""
    if isinstance(x, torch.Tensor):
        dims = range(x.dim()) if x.dim() <= 2 else range(x.dim() - 1)
        return {d: torch.export.Dim.AUTO for d in dims if x.shape[d] > 1}
    if isinstance(x, (list, tuple)):
        return type(x)(_dynamic_spec(y) for y in x)
    if isinstance(x, dict):
        return {k: _dynamic_spec(v) for k, v in x.items()}
    return None


def _torch_stream_handlers() -> list:
    """The handlers torch's loggers write to the terminal with (torch._logging installs a plain
    StreamHandler on "torch" and on each registered logger, none of which propagate); file
    handlers and the structured-trace handler (TORCH_TRACE, a subclass) are left alone."""
    found = {}
    for name, lg in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(lg, logging.Logger) and (name == "torch" or name.startswith("torch.")):
            for h in lg.handlers:
                if type(h) is logging.StreamHandler:
                    found[id(h)] = h
    return list(found.values())


@contextlib.contextmanager
def _quiet_torch(verbose: bool):
    """torch.export's own output held back while it runs, unless `verbose`: on a failure it
    prints the partial graph it traced (a bare print to sys.stderr in torch/export/_trace.py)
    and symbolic_shapes / export log records ("Unable to find user code corresponding to
    {u0}") through torch's stream handlers, dozens of lines before Helix's one-line error, once
    per attempt. Yields the buffer that holds them; streams are restored afterwards."""
    buf = io.StringIO()
    if verbose:
        yield buf
        return
    handlers = _torch_stream_handlers()
    streams = [(h, h.stream) for h in handlers]
    try:
        for h in handlers:
            h.setStream(buf)
        with contextlib.redirect_stderr(buf):
            yield buf
    finally:
        for h, stream in streams:
            h.setStream(stream)


def _held_back(e: BaseException, buf: io.StringIO) -> None:
    """The output `_quiet_torch` held back, kept on the exception (shown with its traceback)."""
    text = buf.getvalue().strip()
    if text and hasattr(e, "add_note"):
        e.add_note("torch.export's output, held back (helix_compile(verbose=True) or "
                   "`helix plan --verbose` prints it as it comes):\n" + text)


def capture(model: torch.nn.Module, args: tuple, kwargs: dict | None = None,
            dynamic: bool = True, verbose: bool = False, repeat_blocks: bool = True) -> Captured:
    """Export `model` on the example inputs; a failure becomes a CaptureError that says what to try
    (the exception torch raised is its `__cause__`).

    With dynamic=True the batch and sequence dims are exported as symbols so the rank modules
    run other sizes; a model that only exports with static shapes is captured static (`note`).
    torch's own output during the export is held back unless `verbose`.
    repeat_blocks: export only layers 0 and L-1 (or 0, 1, L-1) of a list of identical layers and copy
    the rest in the graph (repeat.py); a model it cannot prove safe is captured whole (`note`).
    """
    if repeat_blocks and isinstance(model, torch.nn.Module):
        got = capture_repeated(model, args if isinstance(args, tuple) else (args,), dict(kwargs or {}),
                               dynamic, lambda *a: capture(*a, verbose=verbose, repeat_blocks=False))
        if not isinstance(got, str):
            return got
        whole = capture(model, args, kwargs, dynamic, verbose=verbose, repeat_blocks=False)
        note = "; ".join(x for x in (whole.note, got and f"repeat_blocks: {got}") if x)
        return dataclasses.replace(whole, note=note)
    kwargs = dict(kwargs or {})
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(args, tuple):
        args = (args,)
    note = ""
    if dynamic:
        try:
            spec = {"args": _dynamic_spec(args), "kwargs": _dynamic_spec(kwargs)}
            # inference graphs: no grad-mode regions (HF rotary's @no_grad)
            with torch.no_grad(), _quiet_torch(verbose):
                ep = torch.export.export(model, args, kwargs, strict=False,
                                         dynamic_shapes=_flat_spec(model, spec, args, kwargs))
            return _finish(ep, model, args, kwargs, dynamic=True, note="")
        except Exception as e:
            note = f"dynamic capture failed ({type(e).__name__}), captured with static shapes"
    try:
        with torch.no_grad(), _quiet_torch(verbose) as held:
            try:
                ep = torch.export.export(model, args, kwargs, strict=False)
            except Exception as e:
                _held_back(e, held)
                raise
    except Exception as e:  # torch.export raises many types; all mean the same to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {type(e).__name__}: {first[:300]}; "
            f"{_hint(model, kwargs)}") from e
    return _finish(ep, model, args, kwargs, dynamic=False, note=note)


def _flat_spec(model, spec, args, kwargs):
    """dynamic_shapes keyed as export wants: positional args then kwargs by parameter name."""
    names = list(inspect.signature(model.forward).parameters)
    out = {}
    for name, a in zip(names, spec["args"]):
        out[name] = a
    out.update(spec["kwargs"])
    return out


def _finish(ep, model, args, kwargs, dynamic: bool, note: str) -> Captured:
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
    return Captured(gm=gm, args=args, kwargs=kwargs, params=params, dynamic=dynamic, note=note)
