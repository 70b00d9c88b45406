"""Every module of the library imports on its own, first, in a fresh interpreter: an import
cycle held together by import order would fail here for the module that closes it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("helix_compiler", "passes")

# One interpreter for all modules (torch is imported once); before each module every module of
# ours is dropped from sys.modules, so each is imported first, as in a fresh interpreter.
_SCRIPT = """
import importlib, sys, traceback
import torch  # noqa: F401
failed = []
for name in sys.argv[1:]:
    for m in [m for m in sys.modules if m.split(".")[0] in {packages!r}]:
        del sys.modules[m]
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{{name}}: {{type(e).__name__}}: {{e}}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def _modules() -> list[str]:
    out = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if path.name == "__main__.py":   # `python -m helix_compiler.cli`: importing it runs helix
                continue
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out.append(".".join(parts))
    return out


def test_every_module_imports_first_on_its_own():
    modules = _modules()
    assert len(modules) > 20, modules
    proc = subprocess.run([sys.executable, "-c", _SCRIPT.format(packages=set(PACKAGES)), *modules],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
