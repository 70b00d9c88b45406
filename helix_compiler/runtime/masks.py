"""Attention masks built from sizes alone, computed once per size, and the causal ones dropped.

A captured Hugging Face model materializes its causal mask: torch.export traces
transformers' `sdpa_mask`, which outside tracing would hand SDPA `is_causal=True`
and no tensor. The graph then builds a (B, 1, S, S) mask every step (comparisons
over S^2 elements) and the attention kernel reads it instead of skipping the upper
triangle. passes/size_masks.py moves such a mask's subgraph, when it depends on
sizes only (no parameter, no input's values), into a call of `size_mask`:

    mask, causal = size_mask(spec, like, *inputs)

`spec` is the subgraph as JSON (helix_compiler/runtime/serialize.py), `like` a tensor on
the device the mask lives on, `inputs` the tensors whose sizes the subgraph reads.
The first call for given sizes builds the mask and compares it with SDPA's own
causal mask (keep key j <= query i, top-left aligned, over every leading index);
if equal, this and every later call at those sizes return (None, True) without
building anything, and the core runs with is_causal=True. Otherwise the mask is
built on every call, as the graph did, and returned with False. Exact: the mask is
a function of the sizes only, and it was compared whole at those sizes.
"""

from __future__ import annotations

import json

import torch
import torch.fx as fx

from .graphs import on_device
from .serialize import graph_from_json, register_function

# spec -> builder GraphModule, per device; (spec, device, sizes) -> causal?
_BUILDERS: dict = {}
_CAUSAL: dict = {}


def builder(spec: str, device: torch.device) -> fx.GraphModule:
    key = (spec, str(device))
    gm = _BUILDERS.get(key)
    if gm is None:
        graph = graph_from_json(json.loads(spec))
        # the capture's device (often meta) -> where the mask is used
        gm = _BUILDERS[key] = on_device(
            fx.GraphModule(torch.nn.Module(), graph, class_name="SizeMask"), device)
    return gm


def _key(inputs) -> tuple:
    return tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else x for x in inputs)


def is_sdpa_causal(mask: torch.Tensor) -> bool:
    """Whether `mask` equals SDPA's is_causal mask over every leading index: bool True, or
    float 0, exactly where key j <= query i (top-left aligned); elsewhere False / -inf."""
    if mask.dim() < 2:
        return False
    s_q, s_k = mask.shape[-2], mask.shape[-1]
    keep = torch.ones(s_q, s_k, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, keep.expand(mask.shape)))
    if not mask.is_floating_point():
        return False
    want = torch.zeros((), dtype=mask.dtype, device=mask.device).masked_fill(
        torch.tensor(True, device=mask.device), float("-inf"))
    return bool(torch.equal(mask == 0, keep.expand(mask.shape))) and bool(
        (mask[~keep.expand(mask.shape)] == want).all())


def size_mask(spec: str, like: torch.Tensor, *inputs):
    """(mask, False), or (None, True) when the mask at these sizes is SDPA's causal mask."""
    key = (spec, str(like.device), _key(inputs))
    causal = _CAUSAL.get(key)
    if causal:
        return None, True
    mask = builder(spec, like.device)(*inputs)
    if causal is None:
        causal = _CAUSAL[key] = like.device.type != "meta" and is_sdpa_causal(mask)
        if causal:
            return None, True
    return mask, False


register_function("helix.size_mask", size_mask)   # rank graphs call it; saved graphs name it
