"""Helix: partition transformer attention over n head groups x m head-dim slices.

The public names are loaded on first use (PEP 562): `passes/` imports the runtime modules
of this package (errors, runtime/), and the pipeline, which the public names sit
on, imports `passes/`; importing the package itself must not load the pipeline, or a pass
would import itself through it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["helix_compile", "plan_model", "HelixError", "HelixProgram", "load_rank_module", "empty_weights"]

_WHERE = {"helix_compile": "api", "plan_model": "api", "HelixError": "errors",
          "HelixProgram": "program", "load_rank_module": "program", "empty_weights": "runtime.weights"}

if TYPE_CHECKING:
    from .api import helix_compile, plan_model
    from .errors import HelixError
    from .program import HelixProgram, load_rank_module
    from .runtime.weights import empty_weights


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'helix_compiler' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
