"""Where the Triton kernel tests run, decided before triton is imported: `device()`.

In Triton's interpreter on the CPU (TRITON_INTERPRET=1) or compiled on a GPU; TRITON_INTERPRET,
1 or 0, set before the run picks either. triton.jit reads it when a function is defined, triton's
own tl.zeros included: once triton is imported (torch.export imports it through torch._dynamo,
so any earlier test module may have) the interpreter cannot be switched on. The test module is
skipped where that happened, where triton is not installed (CI: the project does not depend on
it), and where the interpreter is off with no GPU.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch


def device() -> str:
    """"cpu" (the interpreter) or "cuda"; skips the calling test module where neither runs.
    Call it at the top of the module, before anything imports triton."""
    if os.environ.get("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1") == "1" and \
            "triton" in sys.modules and not os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("triton was imported by an earlier test without TRITON_INTERPRET=1: run this "
                    "file alone, or the session with TRITON_INTERPRET=1", allow_module_level=True)
    os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
    pytest.importorskip("triton")
    if os.environ["TRITON_INTERPRET"] != "1" and not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET is off and there is no GPU", allow_module_level=True)
    return "cpu" if os.environ["TRITON_INTERPRET"] == "1" else "cuda"
