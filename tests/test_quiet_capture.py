"""A model torch.export cannot capture: one line on the terminal, torch's details on the exception.

torch.export prints the partial graph it traced (a bare print to stderr) and logs through its
own stream handlers before raising; Helix holds that back during capture unless verbose."""

import logging
import sys
import textwrap

import pytest
import torch

from helix_compiler import HelixError, helix_compile
from helix_compiler.cli.main import _main
from helix_compiler.errors import CaptureError

BRANCHY = textwrap.dedent('''
    import torch


    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            if x.sum() > 0:          # data-dependent control flow: torch.export refuses it
                return self.lin(x)
            return -x


    def helix_model():
        return Branchy(), (torch.randn(3, 5, 8),)
''')


@pytest.fixture
def branchy(tmp_path):
    path = tmp_path / "branchy.py"
    path.write_text(BRANCHY)
    return path


def _torch_handler_streams():
    return {name: [h.stream for h in lg.handlers if isinstance(h, logging.StreamHandler)]
            for name, lg in logging.Logger.manager.loggerDict.items()
            if isinstance(lg, logging.Logger) and name.startswith("torch")}


def test_plan_of_an_uncapturable_model_prints_one_error_line(branchy, capfd):
    assert _main(["plan", str(branchy), "--devices", "4"]) == 2
    out, err = capfd.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: torch.export could not capture Branchy: "), lines[0]


def test_plan_verbose_lets_torch_print_the_partial_graph(branchy, capfd):
    assert _main(["plan", str(branchy), "--devices", "4", "--verbose"]) == 2
    out, err = capfd.readouterr()
    assert out == ""
    assert "def forward(" in err and "aten.item.default" in err, err   # torch's partial graph
    assert err.splitlines()[-1].startswith("error: torch.export could not capture Branchy: ")


def test_api_capture_error_is_quiet_and_keeps_torchs_exception(branchy, capfd):
    import importlib.util

    spec = importlib.util.spec_from_file_location("branchy_model", branchy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model, args = module.helix_model()
    streams, stderr = _torch_handler_streams(), sys.stderr
    with pytest.raises(CaptureError) as info:
        helix_compile(model, devices=4, example_inputs=args)
    _, err = capfd.readouterr()
    assert err == ""
    cause = info.value.__cause__
    assert cause is not None and not isinstance(cause, HelixError)
    assert type(cause).__name__ in str(info.value)
    # what torch would have printed rides on its exception
    assert "def forward(" in "\n".join(getattr(cause, "__notes__", [])), cause
    # and torch's logging and sys.stderr are as they were
    assert _torch_handler_streams() == streams and sys.stderr is stderr


def test_a_capturable_model_is_unaffected(capfd):
    model = torch.nn.Linear(8, 8)
    prog = helix_compile(model, devices=2, example_inputs=(torch.randn(3, 8),), dynamic=False)
    assert prog.analysis.captured.gm is not None
    assert capfd.readouterr().err == ""
