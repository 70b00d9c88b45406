"""The `helix` CLI through `_main([...])`: plan output in each format, one-line
`error:` refusals with exit 2, and `helix run` end to end on real gloo processes."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from helix_compiler.cli.main import EXIT_RANK_FAILED, EXIT_TIMEOUT, _main
from helix_compiler.errors import HelixError
from helix_compiler.cli.worker import check_same_program, relative_error

REPO = Path(__file__).resolve().parents[1]
SCALED = str(REPO / "examples" / "paper_model.py")   # helix_model(): the scaled paper model
PRESET = REPO / "helix_compiler" / "planning" / "clusters" / "paper.yaml"

# A MODEL spec file for the real runs: the paper's architecture, 1 layer, 4
# heads of 4 (D=16), so that (m, n) = (2, 2) splits both heads and head dims.
_TINY_SPEC = f"""
import os
import sys
import time

import torch

sys.path.insert(0, {str(REPO)!r})
from examples.paper_model import PaperConfig, build

CONFIG = PaperConfig(layers=1, heads=4, head_dim=4, mlp=32, batch=2, seq=4, dtype=torch.float32)


def helix_model():
    return build(CONFIG)


def fails_on_rank_1():
    if os.environ.get("RANK") == "1":
        raise RuntimeError("rank one cannot build the model")
    return build(CONFIG)


def hangs_on_rank_1():
    if os.environ.get("RANK") == "1":
        time.sleep(600)
    return build(CONFIG)
"""


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = _main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _refused(capsys, *argv) -> str:
    """Run argv, expect exit 2 with exactly one `error:` line on stderr; return that line."""
    code, _, err = _run(capsys, *argv)
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def tiny_spec(tmp_path) -> Path:
    path = tmp_path / "tiny_model.py"
    path.write_text(_TINY_SPEC)
    return path


# ---- helix plan: output ----------------------------------------------------------------
def test_plan_table_for_paper_model_marks_one_chosen_split(capsys):
    code, out, err = _run(capsys, "plan", "--devices", 16)
    assert code == 0, err
    head = re.search(r"chosen (?:dp=(\d+) x )?m=(\d+) x n=(\d+)", out)
    assert head and int(head[1] or 1) * int(head[2]) * int(head[3]) == 16
    marked = [line for line in out.splitlines() if line.startswith("*")]
    assert len(marked) == 1 and f"m={head[2]} x n={head[3]}" in marked[0]
    # every split of 16 is listed: 1x16, 2x8, 4x4, 8x2, 16x1 (one replica; more below them)
    assert all(f"m={m} x n={16 // m}" in out for m in (1, 2, 4, 8, 16))


@pytest.mark.parametrize("fmt, parse", [("yaml", yaml.safe_load), ("json", json.loads)])
def test_plan_yaml_and_json_parse_with_m_times_n_equal_to_devices(capsys, fmt, parse):
    code, out, err = _run(capsys, "plan", "--devices", 16, "--format", fmt)
    assert code == 0, err
    data = parse(out)
    assert data["devices"] == 16 and data["dp"] * data["m"] * data["n"] == 16 and data["pp"] == 1
    assert len(data["sites"]) == 2     # the paper model's 2 attention layers


def test_plan_forced_split_is_the_one_reported(capsys):
    code, out, err = _run(capsys, "plan", SCALED, "--devices", 16, "--plan", "4,4", "--format", "json")
    assert code == 0, err
    data = json.loads(out)
    assert (data["m"], data["n"]) == (4, 4)
    assert set(data["variants"]) <= {"score-reduce", "qk-gather"}


def test_plan_written_with_output_is_accepted_by_plan_file(capsys, tmp_path):
    saved = tmp_path / "plan.yaml"
    code, _, err = _run(capsys, "plan", SCALED, "--devices", 8, "--plan", "2,4", "-o", saved)
    assert code == 0, err
    code, out, err = _run(capsys, "plan", SCALED, "--devices", 8, "--plan", saved, "--format", "yaml")
    assert code == 0, err
    data = yaml.safe_load(out)
    assert (data["m"], data["n"]) == (2, 4)


def test_print_graph_after_shard_prints_rank_graph_with_collectives(capsys):
    code, out, err = _run(capsys, "plan", SCALED, "--devices", 4, "--plan", "2,2",
                          "--print-graph-after", "shard")
    assert code == 0, err
    graph = out.split("# graph after shard", 1)[1]
    assert "torch.ops.helix.all_reduce" in graph


def test_no_subcommand_prints_help_and_exits_2(capsys):
    code, out, err = _run(capsys)
    assert code == 2
    assert "plan" in err and "run" in err and "usage:" in err


def test_help_exits_0(capsys):
    code, out, _ = _run(capsys, "plan", "--help")
    assert code == 0 and "--devices" in out


# ---- one-line refusals -----------------------------------------------------------------
@pytest.mark.parametrize("devices, says", [
    ("0", "devices must be a positive integer, got 0"),
    ("-3", "devices must be a positive integer, got -3"),
    ("x", "argument --devices: invalid int value: 'x'"),
])
def test_bad_device_counts_are_refused_in_one_line(capsys, devices, says):
    assert says in _refused(capsys, "plan", "--devices", devices)


def test_seven_devices_for_paper_model_names_the_counts_that_fit(capsys):
    line = _refused(capsys, "plan", "--devices", 7)
    assert "no (m, n) split of 7 devices" in line
    counts = line.split("device counts that fit", 1)[1]
    assert "16" in counts and "8" in counts


def test_forced_split_that_does_not_multiply_to_devices(capsys):
    line = _refused(capsys, "plan", "--devices", 16, "--plan", "3,5")
    assert "m=3 x n=5 = 15 devices" in line and "feasible splits of 16" in line


@pytest.mark.parametrize("argv, says", [
    (["--format", "xml"], "invalid choice: 'xml'"),
    (["--plan", "3"], "--plan takes M,N"),
    (["--print-graph-after", "lower"], "invalid choice: 'lower'"),
])
def test_argument_errors_are_one_line(capsys, argv, says):
    assert says in _refused(capsys, "plan", "--devices", 16, *argv)


def test_missing_model_file(capsys, tmp_path):
    missing = tmp_path / "nope.py"
    line = _refused(capsys, "plan", missing, "--devices", 16)
    assert "does not exist" in line and "nope.py" in line


def test_model_file_that_raises_is_named_with_its_exception(capsys, tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("def helix_model():\n    raise RuntimeError('no weights here\\nsecond line')\n")
    line = _refused(capsys, "plan", path, "--devices", 16)
    assert "helix_model() raised RuntimeError: no weights here" in line


def test_unwritable_output_paths_are_refused(capsys, tmp_path):
    nowhere = tmp_path / "no-such-dir"
    assert "cannot write the plan" in _refused(capsys, "plan", SCALED, "--devices", 4, "-o", nowhere / "p.yaml")
    assert "does not exist" in _refused(capsys, "run", SCALED, "--devices", 4, "--json", nowhere / "s.json")


def test_missing_plan_file(capsys, tmp_path):
    line = _refused(capsys, "plan", SCALED, "--devices", 16, "--plan", tmp_path / "gone.yaml")
    assert "does not exist" in line


def test_malformed_cluster_yaml_names_file_and_line(capsys, tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("name: broken\nnodes: [2\ngpus_per_node: 8\n")
    line = _refused(capsys, "plan", "--devices", 16, "--cluster", path)
    assert "cluster.yaml" in line and "not valid YAML" in line and "line " in line


def test_cluster_yaml_with_python_tag_is_refused_and_nothing_runs(capsys, tmp_path):
    created = tmp_path / "created-by-yaml"
    path = tmp_path / "evil.yaml"
    path.write_text(f'!!python/object/apply:os.system ["touch {created}"]\n')
    line = _refused(capsys, "plan", "--devices", 16, "--cluster", path)
    assert "python/object" in line
    assert not created.exists()


def test_cluster_yaml_missing_a_key_names_it(capsys, tmp_path):
    text = "".join(line for line in PRESET.read_text().splitlines(keepends=True)
                   if not line.startswith("nic_gb_s"))
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    assert "missing key 'nic_gb_s'" in _refused(capsys, "plan", "--devices", 16, "--cluster", path)


def test_unknown_cluster_preset(capsys):
    assert "no cluster preset or file named 'h200x99'" in _refused(
        capsys, "plan", "--devices", 16, "--cluster", "h200x99")


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="needs fewer than 2 GPUs")
def test_run_nccl_without_gpus_is_refused_before_launching(capsys):
    assert "--backend nccl needs one GPU per rank" in _refused(
        capsys, "run", SCALED, "--devices", 2, "--backend", "nccl")


def test_run_infeasible_plan_is_refused_before_launching(capsys):
    assert "m=3 x n=5" in _refused(capsys, "run", SCALED, "--devices", 16, "--plan", "3,5")


# ---- the worker's checks, in one process -----------------------------------------------
def test_ranks_with_different_programs_are_named():
    check_same_program(["a/1"] * 4)
    with pytest.raises(HelixError, match=r"different programs: a/1 on ranks 0-1, 3; b/1 on rank 2"):
        check_same_program(["a/1", "a/1", "b/1", "a/1"])
    with pytest.raises(HelixError, match=r"different weights \(same program\)"):
        check_same_program(["a/1", "a/2"])


def test_relative_error_is_norm_of_difference_over_norm_of_reference():
    ref = torch.tensor([3.0, 4.0])
    assert relative_error((ref + torch.tensor([0.0, 0.5]),), (ref,)) == pytest.approx(0.1)
    assert relative_error(torch.tensor([1, 2]), torch.tensor([1, 3])) == float("inf")


# ---- helix run: real processes ---------------------------------------------------------
@pytest.mark.slow
def test_run_four_gloo_processes_matches_unsharded_model(capsys, tiny_spec, tmp_path):
    summary = tmp_path / "summary.json"
    code, out, err = _run(capsys, "run", tiny_spec, "--devices", 4, "--backend", "gloo",
                          "--plan", "2,2", "--steps", 2, "--timeout", 120, "--json", summary)
    assert code == 0, err
    line = re.search(r"helix run: 4 ranks, m=2 x n=2, backend gloo, .*max relative error (\S+)", out)
    assert line, out
    assert float(line[1]) <= 1e-5
    data = json.loads(summary.read_text())
    assert (data["ranks"], data["m"], data["n"]) == (4, 2, 2)
    assert data["max_relative_error"] <= 1e-5


@pytest.mark.slow
def test_run_under_torch_compile_matches_unsharded_model(capsys, tiny_spec, tmp_path):
    """--compile default: each rank's module under torch.compile (inductor; the CPU here),
    compiled in the first warm-up step; every rank's output is still the model's."""
    summary = tmp_path / "summary.json"
    code, out, err = _run(capsys, "run", tiny_spec, "--devices", 2, "--backend", "gloo",
                          "--plan", "1,2", "--steps", 1, "--timeout", 400, "--compile", "default",
                          "--json", summary)
    assert code == 0, err
    assert "backend gloo, torch.compile (default)," in out, out
    data = json.loads(summary.read_text())
    assert data["compile"] == "default" and data["max_relative_error"] <= 1e-5


def test_run_compile_with_pipeline_stages_is_refused_before_launching(capsys):
    says = _refused(capsys, "run", SCALED, "--devices", 4, "--plan", "1,2,1,2",
                    "--compile", "default")
    assert "--compile default with pp=2" in says


@pytest.mark.slow
def test_run_sequence_parallel_on_four_gloo_processes(capsys, tmp_path):
    """Reduce-scatter and the in-place all-gather (a batch of 1) through torch.distributed."""
    spec = str(Path(__file__).parent / "spec_batch1.py")
    summary = tmp_path / "summary.json"
    code, out, err = _run(capsys, "run", spec, "--devices", 4, "--backend", "gloo",
                          "--sequence-parallel", "--steps", 2, "--timeout", 120,
                          "--json", summary)
    assert code == 0, err
    assert json.loads(summary.read_text())["max_relative_error"] <= 1e-5


@pytest.mark.slow
def test_run_names_the_rank_that_failed_and_keeps_its_log(capsys, tiny_spec, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))   # where the kept log goes
    code, _, err = _run(capsys, "run", f"{tiny_spec}:fails_on_rank_1", "--devices", 2,
                        "--backend", "gloo", "--timeout", 120)
    assert code == EXIT_RANK_FAILED
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert re.search(r"rank 1 failed: .*rank one cannot build the model", err), err
    log = Path(err.strip().rsplit("log: ", 1)[1])
    assert log.is_relative_to(tmp_path) and "rank one cannot build the model" in log.read_text()


@pytest.mark.slow
def test_run_past_timeout_is_stopped(capsys, tiny_spec, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code, _, err = _run(capsys, "run", f"{tiny_spec}:hangs_on_rank_1", "--devices", 2,
                        "--backend", "gloo", "--timeout", 6)
    assert code == EXIT_TIMEOUT
    assert "timed out after 6 s" in err and "did not finish" in err


def test_calibrate_collectives_without_gpus_is_refused_in_one_line(capsys):
    import torch

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has GPUs to sweep")
    assert _main(["calibrate", "--collectives"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: helix calibrate --collectives needs 2 or more GPUs")
