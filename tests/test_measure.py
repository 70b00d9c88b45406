"""The measurement harness (helix_compiler/measure/): its CLI entry points, the library's
independence from it, the cost model's backend argument it prices rows with, a CPU run of
`helix bench --small`, and an installed copy working outside the repository."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from helix_compiler.cli.main import _main
from helix_compiler.planning.cluster import load_cluster
from helix_compiler.planning.cost import cost_baseline, cost_plan
from helix_compiler.planning.profile import load_profile
from tests.test_cost import paper_model

ROOT = Path(__file__).resolve().parents[1]
H100 = load_profile(ROOT / "helix_compiler" / "planning" / "profiles" / "h100.yaml")


@pytest.mark.parametrize("command", ["bench", "calibrate"])
def test_bench_and_calibrate_help_exit_zero(command, capsys):
    assert _main([command, "--help"]) == 0
    assert f"helix {command}" in capsys.readouterr().out


def test_library_modules_do_not_import_the_harness():
    script = ("import sys, helix_compiler.api, helix_compiler.pipeline, helix_compiler.cli.main, "
              "passes.shard, passes.kernel_choice; "
              "print(sorted(m for m in sys.modules if m.startswith('helix_compiler.measure')))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("backend", ["explicit", "efficient"])
def test_backend_argument_prices_every_core_with_that_core(backend):
    summary, cluster = paper_model(), load_cluster("paper")
    plan = cost_plan(summary, 1, 16, cluster, H100, backend=backend)
    base = cost_baseline(summary, 8, 2, cluster, H100, backend=backend)
    assert {s.backend for s in plan.sites} == {backend}
    assert {s.backend for s in base.sites} == {backend}


def test_backend_none_is_the_cost_models_own_choice():
    summary, cluster = paper_model(), load_cluster("paper")
    chosen = cost_plan(summary, 2, 8, cluster, H100)
    forced = cost_plan(summary, 2, 8, cluster, H100, backend=chosen.sites[0].backend)
    assert forced.compute_ms == chosen.compute_ms
    other = "explicit" if chosen.sites[0].backend != "explicit" else "efficient"
    assert cost_plan(summary, 2, 8, cluster, H100, backend=other).compute_ms != chosen.compute_ms


@pytest.mark.slow
def test_bench_small_on_cpu_measures_and_predicts_every_row(tmp_path):
    out, raw = tmp_path / "small.json", tmp_path / "small.raw.json"
    status = _main(["bench", "--small", "--device", "cpu", "--only", "1x16", "2x8",
                    "--modes", "kernel-choice", "--warmup", "0", "--repeats", "1",
                    "--out", str(out), "--raw-out", str(raw)])
    assert status == 0
    result = json.loads(out.read_text())
    rows = [r for r in result["plans"] if r["kind"] != "peer"]
    # TP=8 x PP=2, TP=16, helix 1x16, 2x8 in both variants
    assert len(rows) == 5 and not [r for r in rows if r.get("error")], rows
    assert all(r["measured_compute_ms"] > 0 and r["predicted_compute_ms"] > 0 for r in rows)
    assert len(json.loads(raw.read_text())["rows"]) == 5


@pytest.mark.slow
def test_installed_copy_benches_and_plans_outside_the_repository(tmp_path):
    target, cwd = tmp_path / "site", tmp_path / "elsewhere"
    cwd.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(target), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target),
                                                        sysconfig.get_paths()["purelib"]])}
    run = lambda *a: subprocess.run([sys.executable, "-m", "helix_compiler.cli", *a],  # noqa: E731
                                    cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    where = subprocess.run([sys.executable, "-c", "import helix_compiler.measure.bench as b; "
                            "print(b.__file__)"], cwd=cwd, env=env, capture_output=True,
                           text=True, timeout=120)
    assert where.stdout.startswith(str(target)), where.stdout + where.stderr
    bench = run("bench", "--help")
    assert bench.returncode == 0 and "--model" in bench.stdout, bench.stderr
    plan = run("plan", "--devices", "16")
    assert plan.returncode == 0, plan.stderr
    assert "m=1 x n=16" in plan.stdout
    # the `helix` script pip wrote ([project.scripts] helix = "helix_compiler.cli.main:main")
    script = subprocess.run([str(target / "bin" / "helix"), "plan", "--devices", "16"], cwd=cwd,
                            env=env, capture_output=True, text=True, timeout=300)
    assert script.returncode == 0 and script.stdout == plan.stdout, script.stderr


def test_measured_gpu_prices_compute_on_the_gpu_that_was_timed():
    from helix_compiler.measure.predict import measured_gpu

    paper = load_cluster("paper")
    h200 = measured_gpu(paper, "NVIDIA H200")
    assert (h200.memory_bandwidth, h200.memory_bytes, h200.name) == (4.8e12, 141e9, "paper-h200")
    # communication is the cluster's
    assert (h200.nvlink_busbw, h200.network_alpha, h200.nodes) == (
        paper.nvlink_busbw, paper.network_alpha, paper.nodes)
    assert measured_gpu(paper, "x86_64") is paper and measured_gpu(paper, None) is paper


def _repriced_h200(tmp_path, raw_name: str) -> dict:
    """The space table of a saved H200 run (benchmarks/results/raw/`raw_name`) re-priced with
    the H200 profile on the measured GPU's peaks; asserts every row's predicted compute is
    within 15% of its measured one."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "space.json"
    assert _main(["bench", "--model", "space", "--raw",
                  str(root / "benchmarks/results/raw" / raw_name),
                  "--profile", str(root / "helix_compiler/planning/profiles/h200.yaml"),
                  "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    ratios = {r["plan"]: r["predicted_over_measured"] for r in result["plans"]
              if r["predicted_over_measured"] is not None}
    assert len(ratios) >= 20
    assert all(0.85 <= x <= 1.15 for x in ratios.values()), ratios
    return result


def test_space_table_of_the_h200_run_prices_every_plan_within_15_percent(tmp_path):
    """The saved H200 measurements (benchmarks/results/raw), re-priced with the H200 profile on
    the measured GPU's peaks: every row's predicted compute within 15% of its measured one, and
    the planner's choice for each objective found in the table and compared with the fastest."""
    result = _repriced_h200(tmp_path, "space_h200_softmaxv.raw.json")
    planner = result["planner"]
    assert planner["cluster"] == "paper-h200"
    c = planner["throughput"]
    assert c["measured_row"] is not None and 0 < c["chosen_vs_fastest"] <= 1.0, c
    # the latency choice has sequence-parallel norms, a rank kind this run did not measure: the
    # table says so instead of matching it to the row without them
    assert planner["latency"]["chosen"] == "m=1 x n=16 SP"
    assert planner["latency"]["measured_row"] is None


def test_the_h200_run_with_the_sp_rank_meets_the_latency_targets(tmp_path):
    """The compiled suite with the SP rank joined (results/raw/space_h200_with_sp.raw.json, the
    ninth session): the planner's latency choice, m=1 x n=16 with SP norms, has a measured row,
    is the measured fastest for one sequence, <= 0.6x the best TP=8 x PP=2, and faster than the
    compiled Megatron TP=16; the throughput choice is the fastest row; every prediction within
    15% (_repriced_h200)."""
    result = _repriced_h200(tmp_path, "space_h200_with_sp.raw.json")
    lat = result["planner"]["latency"]
    assert lat["chosen"] == "m=1 x n=16 SP" and lat["measured_row"] == "m=1 x n=16 SP"
    assert lat["chosen_vs_fastest"] == 1.0
    assert result["latency"]["fastest"] == "m=1 x n=16 SP"
    assert result["latency"]["vs_best_tp_x_pp"] <= 0.6
    rows = {r["plan"]: r for r in result["plans"]}
    assert (rows["m=1 x n=16 SP"]["latency_one_sequence_ms"]
            < rows["TP=16 (megatron)"]["latency_one_sequence_ms"])
    thr = result["planner"]["throughput"]
    assert thr["chosen"] == "dp=16 x m=1 x n=1" and thr["chosen_vs_fastest"] == 1.0
    assert result["throughput"]["vs_best_tp_x_pp"] >= 1.75


def test_a_sequence_parallel_rank_prices_its_own_row_and_the_latency_choice_finds_it(tmp_path):
    """space.py's SP rank kinds: measured as their own rank (helix m=1 x n=N SP), assembled with
    the planner's SP communication (each all-reduce a reduce-scatter + all-gather: one more
    latency), and matched to the planner's latency choice by name."""
    import dataclasses

    from helix_compiler.measure import space
    from helix_compiler.planning.cluster import load_cluster
    from helix_compiler.planning.profile import load_profile

    cfg = space.config(False)
    kinds = space.rank_kinds(cfg, 16)
    sp = [k for k in kinds if k.sequence_parallel]
    assert [(k.m, k.n, k.layers) for k in sp] == [(1, 8, 2), (1, 16, 2)]
    assert sp[-1].name == "helix m=1 x n=16 SP, 2 layer(s)"
    root = Path(__file__).resolve().parents[1]
    raw = json.loads((root / "benchmarks/results/raw/space_h200_compiled.raw.json").read_text())
    plain = next(r for r in raw["ranks"] if r["name"] == "helix m=1 x n=16, 2 layer(s)")
    kind = dataclasses.replace(space.RankKind(**plain["kind"]), sequence_parallel=True)
    raw["ranks"].append({**plain, "kind": dataclasses.asdict(kind), "name": kind.name})
    cluster = load_cluster("paper")
    profile = load_profile(str(root / "helix_compiler/planning/profiles/h200.yaml"))
    out = space.assemble(raw, cluster, profile, cfg)
    rows = {r["plan"]: r for r in out["plans"]}
    a, b = rows["m=1 x n=16"], rows["m=1 x n=16 SP"]
    assert b["sequence_parallel"] and not a["sequence_parallel"]
    # the same measured compute (the SP row reuses the rank's timings here), SP's comm priced
    one = {"1": plain["by_b"]["1"]}
    summary = space.at_batch(space.summary_for(cfg, 2), 1)
    base = space.cost_plan(summary, 1, 16, cluster)
    want = space.sequence_parallel_cost(summary, base, 1, 16, cluster)
    assert b["latency_one_sequence_ms"] == pytest.approx(
        one["1"]["ms_per_micro_batch"] + want.comm_ms)
    assert want.comm_ms > base.comm_ms
    assert out["planner"]["latency"]["chosen"] == "m=1 x n=16 SP"
    assert out["planner"]["latency"]["measured_row"] == "m=1 x n=16 SP"


def test_soaked_h200_run_ranks_the_planners_choice_first_among_helix_plans(tmp_path):
    """The H200 run timed after a second of sustained work per measurement (--soak-s 1,
    results/raw/space_h200_soak.raw.json): every prediction within 15%; the planner's
    throughput choice is the fastest helix row, and the table gives its roofline fraction
    against both measured peaks (sustained, and from idle)."""
    result = _repriced_h200(tmp_path, "space_h200_soak.raw.json")
    assert result["soak_s"] == 1.0
    helix = max((r for r in result["plans"] if r["family"] == "helix"),
                key=lambda r: r["tokens_per_s"])
    chosen = result["planner"]["throughput"]
    assert chosen["chosen"] == helix["plan"] == "dp=16 x m=1 x n=1"
    thr = result["throughput"]
    burst = thr["matmul_tflops_burst"]
    assert burst > result["matmul_tflops_measured"]          # boosted from idle
    assert chosen["fraction_of_roofline"] == pytest.approx(
        helix["tokens_per_s"] / thr["roofline_tokens_per_s"])
    assert chosen["fraction_of_burst_roofline"] == pytest.approx(
        chosen["fraction_of_roofline"] * result["matmul_tflops_measured"] / burst)


def test_timer_soak_runs_the_call_back_to_back_on_a_gpu_only():
    from helix_compiler.measure.timing import Timer

    calls = []
    t = Timer("cpu", warmup=1, repeats=3, soak_s=0.05)
    t(lambda: calls.append(1))
    assert len(calls) == 4                     # no soak on the CPU: warmup + repeats


@pytest.mark.slow
def test_space_suite_times_a_helix_rank_under_torch_compile_as_helix_run_runs_it():
    """--helix-compile: the rank module under torch.compile (runtime/compiled.py, the function
    `helix run --compile` uses) computes what the eager rank computes, collectives stubbed."""
    import torch

    from helix_compiler.measure.runners import PaperHelixRunner
    from helix_compiler.measure.space import config

    cfg = config(small=True)
    runner = PaperHelixRunner(cfg, 1, 2, None, 2, load_cluster("paper"), torch.device("cpu"),
                              chunk_bytes=2 ** 28, threshold=16)
    torch.manual_seed(0)
    eager = runner.make(True)(2)
    torch.manual_seed(0)
    comp = runner.make(True, "default")(2)
    with torch.no_grad():
        a, b = eager(), comp()
    assert a.shape == b.shape == (2, cfg.seq, cfg.hidden)
    assert float((a - b).norm() / a.norm()) <= 1e-5


@pytest.mark.parametrize("argv, says", [
    (["--model", "space", "--soak-s", "-1"], "--soak-s -1: seconds of sustained calls"),
    (["--soak-s", "2"], "--soak-s and --helix-compile are space-suite options"),
    (["--model", "gqa", "--helix-compile", "default"], "space-suite options"),
])
def test_bench_refuses_bad_soak_and_compile_options_in_one_line(capsys, argv, says):
    assert _main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
