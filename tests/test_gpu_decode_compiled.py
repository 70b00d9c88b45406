"""benchmarks/gpu_decode_compiled.py --small: the module it times is compile_decoder's rank
module (its helix collectives and cache slices are the split's), and its output is finite."""

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_decode_compiled
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return gpu_decode_compiled


@pytest.mark.slow
def test_compiled_decode_bench_small_times_the_compiled_rank_module(tmp_path):
    out = tmp_path / "compiled.json"
    assert _bench().main(["--small", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"device", "torch", "command", "git_commit", "ks", "results"} <= set(data)
    rows = {tuple(r["split"]): r for r in data["results"]}
    assert set(rows) == {(2, 1, 4), (1, 1, 8)}
    # SMALL: 2 kv heads of d 16; B = 2, C = 64, vocab 512; k = 1 and 2 layers
    per_layer = {(2, 1, 4): {"all_gather:seq": 1, "all_reduce:mesh": 2},   # chunk lse, o + MLP
                 (1, 1, 8): {"all_reduce:head": 2}}                         # o + MLP
    for (s, m, n), r in rows.items():
        for k in (1, 2):
            got = r[f"k{k}"]
            assert "error" not in got, got
            # the rank owning position C - 1 (chunk s - 1 of head group 0), its output finite
            assert (got["rank"], got["position"]) == (s - 1, 63)
            assert got["out_shape"] == [2, 1, 512] and got["finite"]
            # its cache slices: C / s positions, 1 kv head (n > 2 kv heads: a copy each), d / m
            assert got["cache_slice_shapes"] == [[2, 1, 64 // s, 16 // m]]
            assert got["cache_bytes"] == 2 * k * 2 * 1 * (64 // s) * (16 // m) * 4
            # the helix collectives of k layers of that split (stubbed when timed)
            assert got["collectives"] == {key: c * k for key, c in per_layer[(s, m, n)].items()}
            # s > 1, equal chunks: each layer's chunk core is the fused helix.chunk_attention
            assert got["fused_chunk_cores"] == (k if s > 1 else 0)
        assert r["measured_tpot_ms"] == pytest.approx(r["measured_compute_ms"] + r["modeled_comm_ms"])
        assert r["modeled_comm_ms"] > 0 and r["mirror_tpot_ms"] > r["modeled_comm_ms"]
        assert r["cuda_graph"] is False       # the CPU: eager


def test_compiled_decode_bench_refuses_a_plan_of_other_devices():
    from helix_compiler.errors import HelixError

    with pytest.raises(HelixError, match=r"--plans item '4,1,8': s x m x n = 32, but --devices is 64"):
        _bench().parse_plans("8,1,8;4,1,8", 64)


def test_fp16_decoder_keeps_its_dtype_through_the_fused_chunk_combine():
    # the lse combine's weights are fp32; the chunk's share is cast to the core output's dtype,
    # else an fp16 layer turned fp32 after the core (export's dtype asserts refused the graph,
    # found timing the 70B shape on the H200)
    from helix_compiler.decode import compile_decoder

    bench = _bench()
    model = bench.lazy_decoder(bench.llama_config(bench.gpu_decode.SMALL, 512, 2), 2, 64, torch.float16)
    prog = compile_decoder(model, 8, (2, 1, 4), rank=1)
    for gm in prog.modules[1]:
        ops = [n for n in gm.graph.nodes if n.target is torch.ops.helix.chunk_attention.default]
        assert len(ops) == 2, gm.graph
        for op in ops:
            (out,) = [u for u in op.users if u.args[1] == 0]           # getitem 0: the chunk's output
            (share,) = [u for u in out.users if u.target is torch.ops.aten.mul.Tensor]
            assert share.meta["val"].dtype == torch.float16, share.format_node()


def test_best_mode_table_of_the_saved_h200_runs():
    """benchmarks/decode_best_modes.py over the saved files: six rows, each side's TPOT the least
    over its modes (the split-KV core one of them, on both sides); with the projections fused
    (compile_decoder's default) the chosen plan is at most 0.7x TP=64 on every row, built apart
    it was over on 32k x 16."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import decode_best_modes
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    for unfused, files, want_over in ((False, decode_best_modes.CHOSEN, []),
                                      (True, decode_best_modes.CHOSEN_UNFUSED, [(32768, 16)])):
        rows = decode_best_modes.table(unfused=unfused)
        assert [(r["context"], r["concurrency"]) for r in rows] == [
            (c, b) for c in (32768, 65536, 131072) for b in (8, 16)]
        chosen = decode_best_modes.tpots(files)
        for r in rows:
            assert r["chosen_tpot_ms"] == min(chosen[(r["context"], r["concurrency"] // 8)].values())
            assert r["ratio"] == pytest.approx(r["chosen_tpot_ms"] / r["tp_tpot_ms"])
        over = [(r["context"], r["concurrency"]) for r in rows if r["ratio"] > 0.7]
        assert over == want_over, (unfused, rows)


def test_plan_table_of_the_saved_h200_runs():
    """decode_best_modes.plan_table: every (context, concurrency) where TP=64 and the planner's
    choice (its rank at concurrency / dp sequences) were timed, each side at its least TPOT
    over its modes. Under 0.7x TP=64 wherever the cache the step reads in all is at least 2M
    positions (context x sequences) or the replicas keep the all-reduces in a node (8 and 16
    sequences); over it at 1M positions in all (0.74-0.77, where the bandwidth floor is 0.67:
    about 22 us a layer of overhead left on both sides) and at 512k x 1 (0.89, where no split
    reaches 0.7 even at the floor, 0.84)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import decode_best_modes
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    rows = decode_best_modes.plan_table()
    k = 1024
    assert [(r["context"] // k, r["concurrency"]) for r in rows] == [
        (32, 8), (32, 16), (64, 8), (64, 16), (128, 8), (128, 16), (256, 4), (256, 8),
        (512, 1), (512, 2), (512, 4), (1024, 1), (1024, 2)]
    runs = decode_best_modes.measured()
    for r in rows:
        tp = runs[((1, 1, 64), 64, r["context"], r["concurrency"])]["modes"]
        assert r["tp_tpot_ms"] == min(tp.values())
        assert r["ratio"] == pytest.approx(r["chosen_tpot_ms"] / r["tp_tpot_ms"])
    over = {(r["context"] // k, r["concurrency"]): r for r in rows if r["ratio"] > 0.7}
    assert sorted(over) == [(256, 4), (512, 1), (512, 2), (1024, 1)], rows
    assert all(r["context"] * r["concurrency"] <= 1024 * k and r["floor_ratio"] > 0.66
               for r in over.values())
    assert over[(512, 1)]["floor_ratio"] > 0.7 and over[(512, 1)]["predicted_ratio"] > 0.7
    assert all(r["ratio"] <= 0.7 for r in rows if r["context"] * r["concurrency"] >= 2048 * k
               or r["concurrency"] >= 8)
