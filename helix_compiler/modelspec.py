"""Resolve a MODEL spec (as `helix plan MODEL` takes it) to a model and its example inputs.

A spec is one of
    path/to/file.py             the file defines `helix_model()`
    path/to/file.py:function    another function of that file
    package.module:function     an importable module's function
    package.module              that module's `helix_model()`
    path/to/hf_model_dir        a Hugging Face model directory (or its config.json): the model
                                is built from the config alone (helix_compiler/hf_dir.py)
and the function takes no arguments and returns `(model, args)` or
`(model, args, kwargs)`: an nn.Module, a tuple of positional example inputs
and a dict of keyword example inputs, exactly what `torch.export.export`
takes. Every failure is a one-line HelixError that names the spec.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch.nn as nn

from .errors import HelixError
from .hf_dir import is_hf_dir, load_hf_dir

__all__ = ["DEFAULT_FUNCTION", "load_model_spec"]

DEFAULT_FUNCTION = "helix_model"

_FORMS = ("a .py file that defines helix_model(), path.py:function, "
          "module:function, module (for module:helix_model) or a Hugging Face model directory")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def load_model_spec(spec: str, *, batch: int | None = None, seq: int | None = None,
                    init: str = "meta") -> tuple[nn.Module, tuple, dict]:
    """Call the spec's function and return `(model, args, kwargs)`, kwargs {} if it gave none.

    A Hugging Face model directory is built from its config (`init`: "meta", "empty" or
    "random", see hf_dir.py) with example inputs of `batch` x `seq`; those two apply to such a
    directory only (a MODEL function chooses its own inputs)."""
    if isinstance(spec, str) and is_hf_dir(spec):
        return load_hf_dir(spec, batch=batch, seq=seq, init=init)
    if batch is not None or seq is not None:
        raise HelixError(f"--batch / --seq apply to a Hugging Face model directory (and, in helix plan, "
                         f"to the default paper model); model spec {spec!r} chooses its own example "
                         f"inputs: change them in its function")
    target, function = _split(spec)
    if target.endswith(".py") or "/" in target or "\\" in target or Path(target).is_file():
        module = _load_file(spec, Path(target))
        where = target
    else:
        module = _import(spec, target)
        where = f"module {target}"
    fn = getattr(module, function, None)
    if fn is None:
        raise HelixError(
            f"model spec {spec!r}: {where} defines no function {function}(); define "
            f"`def {function}(): return model, args` (or model, args, kwargs) there, "
            f"or name another function as {target}:FUNCTION")
    if not callable(fn):
        raise HelixError(
            f"model spec {spec!r}: {function} in {where} is a {type(fn).__name__}, not a function; "
            f"make it a function that returns (model, args) or (model, args, kwargs)")
    try:
        result = fn()
    except Exception as e:
        raise HelixError(
            f"model spec {spec!r}: {function}() raised {type(e).__name__}: {_first_line(e)}; "
            f"run it in Python to see the traceback") from e
    return _check_result(spec, function, result)


def _split(spec: str) -> tuple[str, str]:
    """`target[:function]` -> (target, function); a Windows drive colon is not a separator."""
    if not isinstance(spec, str) or not spec.strip():
        raise HelixError(f"model spec {spec!r} is empty or not a string; pass {_FORMS}")
    spec = spec.strip()
    target, sep, function = spec.rpartition(":")
    if not sep or not target or re.fullmatch(r"[A-Za-z]", target) or "/" in function or "\\" in function:
        return spec, DEFAULT_FUNCTION
    if not _IDENTIFIER.fullmatch(function):
        raise HelixError(
            f"model spec {spec!r}: {function!r} after ':' is not a Python function name; pass {_FORMS}")
    return target, function


def _load_file(spec: str, path: Path) -> Any:
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise HelixError(
            f"model spec {spec!r}: file {str(path)!r} {what} (working directory {str(Path.cwd())!r}); "
            f"pass {_FORMS}")
    if path.suffix != ".py":
        raise HelixError(f"model spec {spec!r}: {str(path)!r} is not a .py file; pass {_FORMS}")
    path = path.resolve()
    # A fresh module name per path, so two specs never share module state and
    # the file's own `if __name__ == "__main__":` block does not run.
    name = "_helix_spec_" + re.sub(r"\W", "_", str(path.with_suffix("")))
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise HelixError(f"model spec {spec!r}: Python cannot load {str(path)!r} as a module; pass {_FORMS}")
    module = importlib.util.module_from_spec(module_spec)
    # As when the file is run as a script: its directory is importable (for
    # sibling modules), and it is in sys.modules while it runs (dataclasses
    # and pickling look it up there).
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent))
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise HelixError(
            f"model spec {spec!r}: running {str(path)!r} raised {type(e).__name__}: {_first_line(e)}; "
            f"fix the file (run `python {path}` to see the traceback)") from e
    finally:
        try:
            sys.path.remove(str(path.parent))
        except ValueError:
            pass
    return module


def _import(spec: str, module_name: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # Only the spec's own module (or a parent package) missing is a spec
        # error; a missing dependency *inside* the module is reported below.
        if e.name and module_name.startswith(e.name) and module_name[len(e.name):len(e.name) + 1] in ("", "."):
            raise HelixError(
                f"model spec {spec!r}: no module named {e.name!r} on sys.path; install it, run from "
                f"the directory that contains it, or pass a path to a .py file instead") from e
        raise HelixError(
            f"model spec {spec!r}: importing {module_name} raised ModuleNotFoundError: {_first_line(e)}; "
            f"install the missing package") from e
    except Exception as e:
        raise HelixError(
            f"model spec {spec!r}: importing {module_name} raised {type(e).__name__}: {_first_line(e)}; "
            f"fix the module (run `python -c 'import {module_name}'` to see the traceback)") from e


def _check_result(spec: str, function: str, result: object) -> tuple[nn.Module, tuple, dict]:
    expected = "(model, args) or (model, args, kwargs)"
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        got = f"a {len(result)}-{type(result).__name__}" if isinstance(result, (tuple, list)) else (
            f"a {type(result).__name__}")
        raise HelixError(f"model spec {spec!r}: {function}() returned {got}; return {expected}")
    model, args = result[0], result[1]
    kwargs = result[2] if len(result) == 3 else {}
    if not isinstance(model, nn.Module):
        raise HelixError(
            f"model spec {spec!r}: {function}() returned a {type(model).__name__} as the model; "
            f"the first item must be a torch.nn.Module")
    if isinstance(args, list):
        args = tuple(args)
    if not isinstance(args, tuple):
        raise HelixError(
            f"model spec {spec!r}: {function}() returned a {type(args).__name__} as args; args must "
            f"be a tuple of positional inputs: return model, (x,) rather than model, x")
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise HelixError(
            f"model spec {spec!r}: {function}() returned a {type(kwargs).__name__} as kwargs; kwargs "
            f"must be a dict of keyword inputs by name, e.g. {{'use_cache': False}}")
    return model, args, dict(kwargs)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else "(no message)"
    return line if len(line) <= 300 else line[:297] + "..."
