"""Per-rank weights from a checkpoint: a model compiled on meta, its ranks loaded slice by slice."""

import pytest
import torch

from examples.paper_model import PaperConfig, build
from helix_compiler import HelixError, helix_compile
from tests.helpers import assert_ranks_equal, save_checkpoint

CFG = PaperConfig.scaled()


def _programs(plan):
    real, (x,) = build(CFG, "cpu", seed=0)
    meta, (xm,) = build(CFG, "meta", seed=0)
    return real, x, helix_compile(real, devices=4, example_inputs=(x,), plan=plan), \
        helix_compile(meta, devices=4, example_inputs=(xm,), plan=plan)


@pytest.mark.parametrize("plan", [(1, 4), (2, 2), (4, 1)])
@pytest.mark.parametrize("fmt", ["state_dict", "safetensors"])
def test_meta_compile_with_checkpoint_equals_real_compile_slice_for_slice(tmp_path, plan, fmt):
    real, x, prog_real, prog_meta = _programs(plan)
    path = save_checkpoint(real, tmp_path, fmt)
    for r in range(4):
        want = prog_real.rank_module(r).state_dict()
        got = prog_meta.rank_module(r, weights=path).state_dict()
        assert want.keys() == got.keys()
        for k in want:
            assert got[k].device.type == "cpu"
            assert torch.equal(want[k], got[k]), k
    # and the loaded ranks compute the model
    from helix_compiler.program import run_ranks

    mods = [prog_meta.rank_module(r, weights=path) for r in range(4)]
    outs = run_ranks(mods, prog_meta.mesh, (x,), {})
    assert_ranks_equal(outs, real(x), devices=4)


def test_meta_compile_allocates_no_weights():
    meta, (xm,) = build(CFG, "meta", seed=0)
    prog = helix_compile(meta, devices=4, example_inputs=(xm,), plan=(2, 2))
    assert all(t.device.type == "meta" for k, t in prog.rank_module(0).state_dict().items()
               if not k.startswith("_helix_index"))


def test_checkpoint_for_another_model_is_refused(tmp_path):
    _, _, _, prog_meta = _programs((2, 2))
    other, _ = build(PaperConfig(heads=16, head_dim=4, mlp=64, batch=2, seq=8, dtype=torch.float32), "cpu")
    path = tmp_path / "other.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(HelixError, match="is the checkpoint for this model"):
        prog_meta.rank_module(0, weights=path)


def test_missing_weights_path_is_refused(tmp_path):
    _, _, _, prog_meta = _programs((2, 2))
    with pytest.raises(HelixError, match="does not exist"):
        prog_meta.rank_module(0, weights=tmp_path / "nope.pt")


@pytest.mark.slow
def test_helix_run_reads_each_ranks_slices_from_a_checkpoint(tmp_path, capsys):
    """The checkpoint holds other weights than the MODEL spec builds: a run that ignored --weights
    would disagree with the reference, which reads the same checkpoint."""
    import json

    from helix_compiler.cli.main import _main

    other, _ = build(CFG, "cpu", seed=7)
    ckpt = tmp_path / "ckpt.pt"
    torch.save(other.state_dict(), ckpt)
    out = tmp_path / "summary.json"
    status = _main(["run", "examples/paper_model.py", "--devices", "4", "--backend", "gloo",
                    "--plan", "2,2", "--steps", "1", "--weights", str(ckpt), "--json", str(out)])
    assert status == 0, capsys.readouterr()
    summary = json.loads(out.read_text())
    assert summary["max_relative_error"] <= 1e-5
