"""Tolerance per dtype (docs/numerics.md): float32 1e-5; float16 / bfloat16 against the
unsharded model run in the same dtype, 1e-2 and 5e-2 (the `helix run` defaults)."""

import pytest
import torch

from examples.paper_model import PaperConfig, build
from helix_compiler import helix_compile
from helix_compiler.cli.main import DEFAULT_TOLERANCE
from tests.helpers import rel_error


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("plan,variant", [((1, 4), None), ((2, 2), "score-reduce"), ((4, 1), "qk-gather")])
def test_sharded_program_within_documented_tolerance_of_same_dtype_model(dtype, plan, variant):
    dt = getattr(torch, dtype)
    model, (x,) = build(PaperConfig.scaled(), "cpu", seed=0)
    model, x = model.to(dt), x.to(dt)
    prog = helix_compile(model, devices=4, example_inputs=(x,), plan=plan, variant=variant)
    with torch.no_grad():
        want = model(x)
        errors = [rel_error(out, want) for out in prog.simulate(x)]
    assert max(errors) <= DEFAULT_TOLERANCE[dtype], errors
    assert all(out.dtype == dt for out in prog.simulate(x))

