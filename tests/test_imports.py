"""Every module of the library imports on its own, first, in a fresh interpreter: an import
cycle held together by import order would fail here for the module that closes it. And every
import, function-local ones included, goes downward through the layers of DESIGN.md section 10
(README.md "Layout")."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("helix_compiler", "passes")

# One interpreter for all modules (torch is imported once); before each module every module of
# ours is dropped from sys.modules, so each is imported first, as in a fresh interpreter.
_SCRIPT = """
import importlib, sys, traceback
import torch
failed = []
for name in sys.argv[1:]:
    for m in [m for m in sys.modules if m.split(".")[0] in {packages!r}]:
        # a fresh interpreter has none of our torch.library fragments (helix::wait) defined yet
        for v in list(vars(sys.modules[m]).values()):
            if isinstance(v, torch.library.Library):
                v._destroy()
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


# The layers, bottom up: a module's layer is its longest matching prefix; each layer may import
# the layers listed (its own included), nothing else. measure/ and cli/ sit on the library, and
# nothing of the library imports them; passes/ see the runtime and the planning values only.
LAYER_OF = {
    "helix_compiler.errors": "errors",
    "helix_compiler.runtime": "runtime",
    "helix_compiler.planning": "planning",
    "passes": "passes",
    "helix_compiler": "library",
    "helix_compiler.measure": "measure",
    "helix_compiler.cli": "cli",
}
_BELOW_LIBRARY = {"errors", "runtime", "planning", "passes"}
MAY_IMPORT = {
    "errors": {"errors"},
    "runtime": {"errors", "runtime"},
    "planning": {"errors", "runtime", "planning"},
    "passes": {"errors", "runtime", "planning", "passes"},
    "library": _BELOW_LIBRARY | {"library"},
    "measure": _BELOW_LIBRARY | {"library", "measure"},
    "cli": _BELOW_LIBRARY | {"library", "measure", "cli"},
}


def _layer(module: str) -> str | None:
    hits = [p for p in LAYER_OF if module == p or module.startswith(p + ".")]
    return LAYER_OF[max(hits, key=len)] if hits else None


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imported(module: str, source: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, module) for every import in `source`, relative ones resolved; `from P import x`
    names P.x where x is a module of ours (`from helix_compiler.planning import cost`)."""
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            subs = [f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}")]
            out += [(node.lineno, s) for s in subs] or [(node.lineno, target)]
    return out


def _violations(module: str, source: str, is_package: bool = False) -> list[str]:
    layer = _layer(module)
    bad = []
    for line, target in _imported(module, source, is_package):
        to = _layer(target)
        if to is not None and to not in MAY_IMPORT[layer]:
            bad.append(f"{module}:{line} ({layer}) imports {target} ({to})")
    return bad


def test_every_import_goes_downward_through_the_layers():
    bad, seen = [], set()
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            is_package = rel.name == "__init__"
            module = ".".join(rel.parts[:-1] if is_package else rel.parts)
            seen.add(_layer(module))
            bad += _violations(module, path.read_text(), is_package)
    assert seen == set(MAY_IMPORT), seen
    assert not bad, "\n".join(bad)


def test_layering_check_catches_an_upward_import():
    # the check itself: each of these would be a violation if it were in the tree
    assert _violations("helix_compiler.planning.cost", "def f():\n    from ..pipeline import analyze\n")
    assert _violations("helix_compiler.runtime.masks", "from ..planning.plan import Plan\n")
    assert _violations("passes.shard", "from helix_compiler.program import HelixProgram\n")
    assert _violations("passes.shard", "from helix_compiler import api\n")
    assert _violations("helix_compiler.pipeline", "import helix_compiler.cli.report\n")
    assert _violations("helix_compiler.program", "from .measure import bench\n")
    assert _violations("helix_compiler.planning", "from ..cli import report\n", is_package=True)
    # and these are the allowed directions
    assert not _violations("passes.seeds", "from helix_compiler.planning.sites import MlpSite\n")
    assert not _violations("helix_compiler.planning.cost", "from ..runtime.mesh import Mesh\n")
    assert not _violations("helix_compiler.cli.main", "from ..planning import decode_plan\n")
