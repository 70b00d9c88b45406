"""Bad input through the API: each a HelixError (a ValueError) in one line that names the value
and what to try, and nothing else happens (docs/troubleshooting.md quotes them)."""

import pytest
import torch
import torch.nn as nn

from examples.paper_model import PaperConfig, build
from helix_compiler import HelixError, helix_compile
from helix_compiler.planning.plan import Plan

CFG = PaperConfig.scaled()


@pytest.fixture(scope="module")
def paper():
    return build(CFG, "cpu", seed=0)


def _one_line(e) -> str:
    text = str(e.value)
    assert "\n" not in text, text
    assert isinstance(e.value, ValueError)
    return text


@pytest.mark.parametrize("devices", [0, -4, 2.5, "16", True, None])
def test_devices_must_be_a_positive_integer(paper, devices):
    model, args = paper
    with pytest.raises(HelixError) as e:
        helix_compile(model, devices=devices, example_inputs=args)
    assert f"got {devices!r}" in _one_line(e)


def test_device_count_nothing_fits_lists_the_counts_that_do(paper):
    model, args = paper
    with pytest.raises(HelixError) as e:
        helix_compile(model, devices=7, example_inputs=args)
    text = _one_line(e)
    assert "7" in text and "1, 2, 4, 8, 16" in text


@pytest.mark.parametrize("plan,says", [((2, 4), "m=2 x n=4 = 8 devices"), ((16, 1), "head dim d=8 not divisible by m=16"),
                                       ((4,), "plan must be (m, n)"), ("4x4", "plan must be (m, n)")])
def test_forced_plan_that_does_not_fit_says_why_and_lists_feasible(paper, plan, says):
    model, args = paper
    with pytest.raises(HelixError) as e:
        helix_compile(model, devices=16, example_inputs=args, plan=plan)
    text = _one_line(e)
    assert says in text
    if "divisible" in says:
        assert "m=1 x n=16" in text  # the feasible splits are listed


def test_model_export_cannot_capture_names_the_cause():
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # Python control flow on a tensor value
                return x * 2
            return x

    with pytest.raises(HelixError) as e:
        helix_compile(DataDependent(), devices=2, example_inputs=(torch.randn(2, 3),))
    text = _one_line(e)
    assert "torch.export could not capture DataDependent" in text


def test_example_inputs_of_the_wrong_shape_are_refused(paper):
    model, _ = paper
    with pytest.raises(HelixError) as e:
        helix_compile(model, devices=4, example_inputs=(torch.randn(2, 8, 100),))
    assert "torch.export could not capture PaperModel" in _one_line(e)


def test_a_plan_made_for_another_device_count_or_model_is_refused(paper):
    model, args = paper
    plan16 = helix_compile(model, devices=16, example_inputs=args).plan
    with pytest.raises(HelixError) as e:
        helix_compile(model, devices=8, example_inputs=args, plan=plan16)
    assert "plan is for 16 devices, not devices=8" in _one_line(e)
    other, other_args = build(PaperConfig(heads=16, head_dim=4, mlp=64, batch=2, seq=8, dtype=torch.float32))
    with pytest.raises(HelixError) as e:
        helix_compile(other, devices=16, example_inputs=other_args, plan=Plan.from_yaml(plan16.to_yaml()))
    assert "plan was made for model" in _one_line(e)


def test_unknown_variant_is_refused_once(paper):
    model, args = paper
    with pytest.raises(HelixError) as e:
        helix_compile(model, devices=4, example_inputs=args, variant="fastest")
    assert "got 'fastest'" in _one_line(e)


def test_plan_yaml_with_python_tag_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "plan.yaml"
    evil.write_text(f"m: !!python/object/apply:os.system ['touch {marker}']\nn: 4\n")
    with pytest.raises(HelixError) as e:
        Plan.from_yaml(evil)
    assert str(evil) in _one_line(e)
    assert not marker.exists()


def test_rank_out_of_range(paper):
    model, args = paper
    prog = helix_compile(model, devices=4, example_inputs=args)
    with pytest.raises(HelixError) as e:
        prog.rank_module(4)
    assert "got 4" in _one_line(e)
