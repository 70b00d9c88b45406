"""load_model_spec: every spec form resolves, every mistake is a one-line HelixError naming the spec."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from helix_compiler.errors import HelixError
from helix_compiler.modelspec import load_model_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# A spec module body: a tiny model and its inputs, plus whatever a test appends.
_TINY = """
import torch
import torch.nn as nn

def _tiny():
    torch.manual_seed(0)
    return nn.Linear(4, 3).eval()
"""


def _write(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(_TINY) + textwrap.dedent(body))
    return path


def _helix_error(spec: str) -> HelixError:
    with pytest.raises(HelixError) as info:
        load_model_spec(spec)
    message = str(info.value)
    assert "\n" not in message, message
    assert repr(spec) in message, message
    return info.value


def test_paper_example_file_resolves_to_scaled_model_on_cpu():
    model, args, kwargs = load_model_spec(str(EXAMPLES / "paper_model.py"))
    assert type(model).__name__ == "PaperModel"
    assert kwargs == {}
    (x,) = args
    assert x.shape == (2, 8, 128) and x.device.type == "cpu"
    assert model(x).shape == (2, 8, 128)


def test_nanogpt_example_file_resolves_to_token_ids():
    model, (idx,), kwargs = load_model_spec(str(EXAMPLES / "nanogpt.py"))
    assert kwargs == {} and idx.dtype == torch.long
    assert model(idx).shape == (2, 8, model.config.vocab_size)


def test_path_colon_function_picks_that_function_full_paper_model_on_meta():
    model, (x,), _ = load_model_spec(f"{EXAMPLES / 'paper_model.py'}:paper_meta")
    assert x.shape == (1024, 10000, 8192) and x.dtype == torch.float16
    assert all(p.device.type == "meta" for p in model.parameters())


def test_module_colon_function_returns_kwargs(tmp_path, monkeypatch):
    _write(tmp_path, "spec_kw_mod.py", """
        def make():
            return _tiny(), (torch.ones(2, 4),), {"flag": True}
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    model, args, kwargs = load_model_spec("spec_kw_mod:make")
    assert isinstance(model, nn.Linear) and args[0].shape == (2, 4)
    assert kwargs == {"flag": True}


def test_bare_module_means_its_helix_model(tmp_path, monkeypatch):
    _write(tmp_path, "spec_bare_mod.py", """
        def helix_model():
            return _tiny(), [torch.ones(2, 4)]
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    model, args, kwargs = load_model_spec("spec_bare_mod")
    assert isinstance(args, tuple) and len(args) == 1  # a list of args becomes a tuple
    assert kwargs == {}


def test_file_can_import_its_sibling_module(tmp_path):
    (tmp_path / "sibling_net_for_spec.py").write_text("import torch.nn as nn\nNet = lambda: nn.Linear(4, 4)\n")
    path = _write(tmp_path, "model.py", """
        from sibling_net_for_spec import Net
        def helix_model():
            return Net(), (torch.ones(1, 4),)
    """)
    model, _, _ = load_model_spec(str(path))
    assert model.in_features == 4


def test_file_main_block_does_not_run(tmp_path):
    path = _write(tmp_path, "model.py", """
        def helix_model():
            return _tiny(), (torch.ones(1, 4),)
        if __name__ == "__main__":
            raise SystemExit("the spec file was run as a script")
    """)
    assert isinstance(load_model_spec(str(path))[0], nn.Linear)


def test_missing_file_names_path_and_forms(tmp_path):
    spec = str(tmp_path / "nope.py")
    err = _helix_error(spec)
    assert "does not exist" in str(err) and "helix_model()" in str(err)


def test_directory_is_not_a_model_file(tmp_path):
    err = _helix_error(str(tmp_path) + "/")
    assert "is a directory" in str(err)


def test_existing_non_python_file_is_refused(tmp_path):
    path = tmp_path / "model.txt"
    path.write_text("x")
    assert "not a .py file" in str(_helix_error(str(path)))


def test_file_without_helix_model_says_what_to_define(tmp_path):
    path = _write(tmp_path, "model.py", "")
    err = _helix_error(str(path))
    assert "defines no function helix_model()" in str(err)
    assert "def helix_model(): return model, args" in str(err)


def test_named_function_missing_from_module(tmp_path, monkeypatch):
    _write(tmp_path, "spec_nofn_mod.py", "")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "defines no function build()" in str(_helix_error("spec_nofn_mod:build"))


def test_non_callable_attribute_is_refused(tmp_path):
    path = _write(tmp_path, "model.py", "helix_model = 3\n")
    assert "is a int, not a function" in str(_helix_error(str(path)))


def test_file_raising_at_import_is_chained(tmp_path):
    path = _write(tmp_path, "model.py", "raise RuntimeError('weights missing')\n")
    err = _helix_error(str(path))
    assert "RuntimeError: weights missing" in str(err)
    assert isinstance(err.__cause__, RuntimeError)


def test_unimportable_module_says_no_module():
    err = _helix_error("no_such_helix_module_xyz:helix_model")
    assert "no module named 'no_such_helix_module_xyz'" in str(err)
    assert isinstance(err.__cause__, ModuleNotFoundError)


def test_missing_dependency_inside_module_is_not_blamed_on_the_spec(tmp_path, monkeypatch):
    _write(tmp_path, "spec_dep_mod.py", "import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    err = _helix_error("spec_dep_mod:helix_model")
    assert "importing spec_dep_mod raised ModuleNotFoundError" in str(err)
    assert "no_such_dependency_xyz" in str(err)


def test_module_raising_at_import_is_chained(tmp_path, monkeypatch):
    _write(tmp_path, "spec_boom_mod.py", "raise KeyError('config')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    err = _helix_error("spec_boom_mod:helix_model")
    assert "KeyError" in str(err) and isinstance(err.__cause__, KeyError)


def test_function_raising_is_chained_with_type_and_text(tmp_path):
    path = _write(tmp_path, "model.py", """
        def helix_model():
            raise ZeroDivisionError("bad head count")
    """)
    err = _helix_error(str(path))
    assert "helix_model() raised ZeroDivisionError: bad head count" in str(err)
    assert isinstance(err.__cause__, ZeroDivisionError)


def test_multiline_exception_text_keeps_message_one_line(tmp_path):
    path = _write(tmp_path, "model.py", """
        def helix_model():
            raise ValueError("first line\\nsecond line")
    """)
    err = _helix_error(str(path))
    assert "first line" in str(err) and "second line" not in str(err)


def test_function_name_after_colon_must_be_an_identifier(tmp_path):
    path = _write(tmp_path, "model.py", "")
    assert "not a Python function name" in str(_helix_error(f"{path}:1bad"))


@pytest.mark.parametrize(
    ("returned", "expected"),
    [
        ("_tiny()", "returned a Linear; return (model, args)"),
        ("(_tiny(),)", "returned a 1-tuple"),
        ("(_tiny(), (), {}, None)", "returned a 4-tuple"),
        ("('model', ())", "returned a str as the model"),
        ("(_tiny(), torch.ones(1, 4))", "return model, (x,) rather than model, x"),
        ("(_tiny(), (), [('a', 1)])", "returned a list as kwargs"),
        ("(_tiny(), (), {1: 2})", "returned a dict as kwargs"),
    ],
    ids=["bare-model", "one-item", "four-items", "model-not-module", "args-not-tuple",
         "kwargs-not-dict", "kwargs-non-str-keys"],
)
def test_wrong_return_shape_is_refused_with_the_fix(tmp_path, returned, expected):
    path = _write(tmp_path, "model.py", f"""
        def helix_model():
            return {returned}
    """)
    assert expected in str(_helix_error(str(path)))
