"""A rank's module under torch.compile: the modes `helix run --compile` and `helix generate
--compile` take, in one table.

    COMPILE_MODES              --compile's choices -> torch.compile's mode (None: as built)
    compiled(module, mode)     the module under torch.compile in that mode, or itself for "none"

"none" runs the GraphModule as helix built it. "default" is inductor's default mode: it fuses
the elementwise ops (norms, residual adds, casts) that the eager module runs one by one.
"max-autotune" is inductor's max-autotune-no-cudagraphs: each matmul's kernel chosen by timing
cuBLAS against inductor's Triton templates, without inductor's CUDA graphs, which would capture
the rank's collectives. Shapes are static (dynamic=False): every call of a rank has the same
ones. The first call compiles; callers keep it out of their timings.
"""

from __future__ import annotations

import torch

from helix_compiler.errors import HelixError

COMPILE_MODES = {"none": None, "default": "default",
                 "max-autotune": "max-autotune-no-cudagraphs"}


def compiled(module, mode: str):
    """`module` under torch.compile in `mode` (a key of COMPILE_MODES), or `module` itself for
    "none"."""
    if mode not in COMPILE_MODES:
        raise HelixError(f"--compile {mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    if COMPILE_MODES[mode] is None:
        return module
    return torch.compile(module, dynamic=False, mode=COMPILE_MODES[mode])
