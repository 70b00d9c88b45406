"""What the Triton kernels of runtime/ (triton_chunk.py, triton_flash.py) check alike before they
take a call: where the tensors are and their dtypes. Each kernel module adds its own shape rules.

    interpreting()                       TRITON_INTERPRET=1: CPU tensors run in Triton's interpreter
    placement_refusal(tensors, dtypes)   why the tensors cannot be a kernel's input, or None
"""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def placement_refusal(tensors: dict[str, torch.Tensor], dtypes: tuple[torch.dtype, ...],
                      any_rank: str) -> str | None:
    """Why `tensors` (name -> tensor; q, k and v among them) cannot go to a kernel: one not on
    CUDA (the CPU only under TRITON_INTERPRET=1), one other than `any_rank` not 4-d, or q, k and
    v not of one dtype among `dtypes`; None where they can."""
    for name, t in tensors.items():
        if not (t.is_cuda or (interpreting() and t.device.type == "cpu")):
            return f"{name} is on {t.device}, not CUDA (the CPU only under TRITON_INTERPRET=1)"
        if t.dim() != 4 and name != any_rank:
            return f"{name} has {t.dim()} dims, not 4"
    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    if not (q.dtype == k.dtype == v.dtype and q.dtype in dtypes):
        return (f"q, k, v are {q.dtype}, {k.dtype}, {v.dtype}; the kernel takes one of "
                f"{', '.join(str(d) for d in dtypes)} for all three")
    return None
