"""Greedy generation on real process groups (helix_compiler/cli/generate.py, `helix generate`,
examples/generate_torchrun.py, docs/decode.md "Generating under torchrun").

The model is helix_compiler/models/decoder_cache.py's GQA decoder (4 heads over 2 kv heads, d 8,
a batch of 3: row 1 left-padded, row 2 all padding; 24 cache positions). 4 gloo processes
generate 16 new tokens after an 8-token prompt; every rank's tokens must equal the unsharded
model's greedy tokens (fp32): with m = 2 (head-dim slices, score-reduce) through `helix
generate`, and with s = 2 (cache chunks [0, 12) and [12, 24): positions 8 .. 22 cross the
boundary) from the user's own torchrun script, in the same launch as a check of every
DistributedBackend group against runtime/mesh.Mesh.group for s > 1 with dp and pp.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helix_compiler.cli.main import EXIT_REFUSED, _main
from helix_compiler.errors import HelixError
from helix_compiler.cli.generate import check_request, choose_split, load_decoder, make_prompt
from helix_compiler.decode import replica_model
from helix_compiler.models.decoder_cache import DecoderConfig, build, greedy_generate

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "generate_torchrun.py"
MODEL_SPEC = textwrap.dedent("""
    import torch
    from helix_compiler.models.decoder_cache import DecoderConfig, build

    def helix_model():
        model = build(DecoderConfig(layers=2, heads=4, kv_heads=2, head_dim=8, batch=3, max_seq=24))
        return model, (torch.zeros(3, 1, dtype=torch.long),)

    def not_a_decoder():
        return torch.nn.Linear(4, 4), (torch.zeros(1, 4),)
""")


@pytest.fixture
def spec(tmp_path) -> Path:
    path = tmp_path / "gqa_decoder.py"
    path.write_text(MODEL_SPEC)
    return path


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


# One torchrun launch for two checks (each launch costs ~20 s of the 2 shared cores): every
# DistributedBackend group of a mesh with s = 2 cache chunks, with dp and pp, against Mesh.group,
# then the user's script (examples/generate_torchrun.py) on the process group already set up.
GROUPS_THEN_EXAMPLE = textwrap.dedent("""
    import json, sys
    import torch, torch.distributed as dist
    from helix_compiler.runtime.collectives import DistributedBackend
    from helix_compiler.runtime.mesh import Mesh
    from examples.generate_torchrun import main

    dist.init_process_group("gloo")
    r = dist.get_rank()
    out = []
    for n, m, s, dp, pp in ((2, 1, 2, 1, 1), (1, 2, 2, 1, 1), (1, 1, 2, 2, 1), (1, 1, 2, 1, 2)):
        mesh = Mesh(n=n, m=m, s=s)
        b = DistributedBackend(mesh, "cpu", dp=dp, pp=pp)
        base, local = r - r % mesh.size, r % mesh.size
        for axes in ("head", "dim", "all", "seq", "mesh"):
            want = [base + q for q in mesh.group(local, axes)]
            got = b.all_gather(torch.tensor([float(r)]), axes, 0, [1] * len(want))
            out.append({"mesh": [n, m, s, dp, pp], "axes": axes, "want": want,
                        "got": [int(x) for x in got.tolist()]})
    json.dump(out, open(sys.argv[1] + f"/groups{r}.json", "w"))
    main(["--plan", "2,1,2", "--prompt-len", "8", "--new-tokens", "16", "--out", sys.argv[1]])
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_helix_generate_gqa_head_dim_split_token_equal_over_16_tokens(spec, tmp_path, capsys):
    out = tmp_path / "summary.json"
    code = _main(["generate", str(spec), "--devices", "4", "--prompt-len", "8", "--new-tokens", "16",
                  "--plan", "1,2,2", "--backend", "gloo", "--json", str(out),
                  "--no-fuse-projections"])   # the fused default: the torchrun script's test below
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    assert "split: s=1 x m=2 x n=2 score-reduce (given with --plan)" in printed.out
    assert "equal to the unsharded model's greedy tokens (fp32): yes" in printed.out
    assert "time per output token:" in printed.out
    summary = json.loads(out.read_text())
    assert summary["equal"] and summary["ranks_agree"], summary
    assert summary["tokens"] == summary["reference"] and len(summary["tokens"][0]) == 16
    assert (summary["s"], summary["m"], summary["n"], summary["variant"]) == (1, 2, 2, "score-reduce")
    assert summary["fused_projections"] == []


def test_helix_generate_hands_the_compile_decoder_flags_to_every_rank(spec, monkeypatch):
    from helix_compiler.cli import generate, main

    seen = {}

    def fake_torchrun(name, module, spec_, worker, devices, workdir, timeout):
        seen["worker"] = worker
        return 0
    monkeypatch.setattr(main, "_torchrun", fake_torchrun)
    argv = ["generate", str(spec), "--devices", "4", "--prompt-len", "4", "--new-tokens", "2",
            "--plan", "1,1,4", "--backend", "gloo"]
    assert _main(argv) == 0
    plain = generate.build_parser().parse_args([str(spec), *seen["worker"]])
    assert plain.split_kv_core == "auto" and not plain.no_fuse_projections
    assert generate.SPLIT_KV_CORE[plain.split_kv_core] is None        # compile_decoder's default
    assert _main(argv + ["--split-kv-core", "on", "--no-fuse-projections"]) == 0
    got = generate.build_parser().parse_args([str(spec), *seen["worker"]])
    assert got.split_kv_core == "on" and got.no_fuse_projections
    assert _main(argv + ["--split-kv-core", "off"]) == 0
    got = generate.build_parser().parse_args([str(spec), *seen["worker"]])
    assert generate.SPLIT_KV_CORE[got.split_kv_core] is False


@pytest.mark.slow
def test_users_torchrun_script_generates_with_a_sequence_split_across_a_chunk_boundary(tmp_path):
    script = tmp_path / "groups_then_example.py"
    script.write_text(GROUPS_THEN_EXAMPLE)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "4", str(script), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in range(4):
        for row in json.loads((tmp_path / f"groups{r}.json").read_text()):
            assert row["got"] == row["want"], (r, row)
        result = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert result["split"] == [2, 1, 2]
        # 3 rows (row 1 left-padded, row 2 all padding) x 16 new tokens, each the model's
        assert result["equal"] and len(result["tokens"]) == 3 and len(result["tokens"][0]) == 16, result


def test_replica_model_shares_the_weights_and_generates_its_rows():
    model = build(DecoderConfig(layers=2, heads=4, kv_heads=2, head_dim=8, batch=4, max_seq=24))
    prompt, valid = make_prompt(model.cfg, 6)
    want = greedy_generate(model, prompt, valid, 5)
    for d in range(2):
        rep = replica_model(model, 2, d)
        assert rep.cfg.batch == 2 and rep.embed.weight is model.embed.weight
        assert rep.layers[0].attn.k_cache.shape[0] == 2
        assert torch.equal(greedy_generate(rep, prompt[2 * d:2 * d + 2], valid[2 * d:2 * d + 2], 5),
                           want[2 * d:2 * d + 2])
    assert replica_model(model, 1, 0) is model
    with pytest.raises(HelixError, match=r"dp=3 replicas of a cache of batch 4; give a dp that "
                                         r"divides 4"):
        replica_model(model, 3, 0)


def test_choose_split_takes_the_planners_replicas(spec):
    """A tiny decoder on 4 ranks: no collective beats any, so the planner serves the 4 rows
    with 4 one-rank replicas, and helix generate runs that (a dp launch: tests/test_hf_generate.py, on an HF model)."""
    model = build(DecoderConfig(layers=2, heads=4, kv_heads=2, head_dim=8, batch=4, max_seq=24))
    choice = choose_split(model, 4, 8, 16)
    assert (choice.dp, choice.split) == (4, (1, 1, 1)), choice
    assert choice.name == "dp=4 x s=1 x m=1 x n=1"
    assert "4 replicas of 1 rank" in choice.reason


@pytest.mark.parametrize("argv, message", [
    (["--new-tokens", "0"], r"--new-tokens 0: T must be at least 1 \(the prefill's token, then T - 1 decode steps\)"),
    (["--prompt-len", "0"], r"--prompt-len 0: a prompt needs at least one token"),
    (["--plan", "2,2,2"], r"--plan 2,2,2: s=2 x m=2 x n=2 = 8 ranks, but --devices 4"),
    (["--plan", "2,2"], r"--plan takes S,M,N"),
    (["--new-tokens", "30"], r"need 37 cache positions, but the model's cache has max_seq=24"),
    (["--plan", "4,1,1", "--variant", "qk-gather"], r"--variant qk-gather applies to m > 1"),
    (["--plan", "1,1,2", "--dp", "2"], r"--dp 2: the replicas split the 4 processes and the "
                                       r"model's batch of 3 rows evenly"),
    (["--dp", "2"], r"--dp 2 is taken with --plan S,M,N"),
])
def test_helix_generate_refuses_a_bad_request_with_exit_2_before_launching(spec, capsys, argv, message):
    base = {"--devices": "4", "--prompt-len": "8", "--new-tokens": "16"}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value
    code = _main(["generate", str(spec), *[x for kv in base.items() for x in kv]])
    err = capsys.readouterr().err
    assert code == EXIT_REFUSED
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err


def test_helix_generate_refuses_a_model_without_a_static_cache(spec, capsys):
    code = _main(["generate", f"{spec}:not_a_decoder", "--devices", "2", "--prompt-len", "4",
                  "--new-tokens", "4", "--plan", "1,1,2"])
    err = capsys.readouterr().err
    assert code == EXIT_REFUSED
    assert "Linear is not a static-cache decoder (no method prefill, decode_step, reset_cache)" in err


@pytest.mark.slow
def test_default_split_is_the_decode_planners_among_those_compile_decoder_builds(spec):
    model = load_decoder(str(spec))
    choice = choose_split(model, 4, 8, 16)
    # the tiny model's step is latency-bound: the planner's fastest row is tensor parallelism,
    # which the model's 4 heads allow (n = 4 > H_kv = 2: each kv head copied twice)
    assert (choice.s, choice.m, choice.n, choice.variant) == (1, 1, 4, None)
    assert choice.reason.startswith("the decode planner's choice at context 24 (P + T), "
                                    "concurrency 3: TP=4 (s=1 x m=1 x n=4) has the smallest"), choice.reason
    with pytest.raises(HelixError, match=r"--plan 2,1,2: s=2 x m=1 x n=2 = 4 ranks, but --devices 8"):
        check_request(model, 8, 8, 16, (2, 1, 2))


@pytest.mark.slow
def test_one_rank_compile_and_move_keep_the_prefill_and_step_cache_one_tensor():
    from helix_compiler.decode import compile_decoder
    from helix_compiler.cli.generate import pair_on_device
    from helix_compiler.models.decoder_cache import DecoderConfig, build

    model = build(DecoderConfig(layers=1, kv_heads=2))
    prog = compile_decoder(model, 2, (2, 1, 1), prompt_len=4, rank=1)
    assert prog.modules[0] is None and prog.caches[0] is None      # another process's rank
    pair_on_device(prog, 1, torch.device("meta"))                  # as to a GPU: a new tensor each
    pre, step = prog.modules[1]
    caches = list(prog.caches[1].values())                         # 1 layer: k and v chunks
    assert len(caches) == 2 and all(t.device.type == "meta" for t in caches)
    for module in (pre, step):                                     # both read and write the same two
        held = {id(t) for _, t in module.named_buffers()}
        assert {id(t) for t in caches} <= held, type(module).__name__


def test_compile_decoder_without_a_split_builds_the_decode_planners_choice():
    """compile_decoder(split=None) is one replica of the decode planner's fastest buildable
    (s, m, n) (decode.plan_split at dp = 1), and it generates the model's tokens."""
    from helix_compiler.decode import compile_decoder, plan_split

    model = build(DecoderConfig(layers=2, heads=4, kv_heads=2, head_dim=8, batch=4, max_seq=24))
    row, plan, _ = plan_split(model, 4, 8, 24, dp=1)
    assert row.dp == 1 and all(r.dp == 1 for r in plan.candidates)
    prog = compile_decoder(model, 4, prompt_len=8)
    assert (prog.mesh.s, prog.mesh.m, prog.mesh.n) == (row.s, row.m, row.n)
    prompt, valid = make_prompt(model.cfg, 8)
    assert torch.equal(prog.simulate_generate(prompt, valid, 6), greedy_generate(model, prompt, valid, 6))


def test_generate_rank_under_compile_times_the_steps_after_the_compiling_one(monkeypatch):
    # --compile: the step module goes through torch.compile with the mode asked for (recorded
    # here, not run: inductor is timed on the GPU, benchmarks/gpu_decode_compiled.py), the tokens
    # stay the model's, and the first step (which compiles) is left out of the timing
    from helix_compiler.cli import generate as gen
    from helix_compiler.decode import compile_decoder
    from helix_compiler.runtime.compiled import compiled

    seen = []

    def fake_compile(fn, **kw):
        seen.append(kw)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = build(DecoderConfig(layers=2, heads=4, kv_heads=2, head_dim=8, batch=3, max_seq=16))
    prompt, valid = make_prompt(model.cfg, 6)
    prog = compile_decoder(model, 1, (1, 1, 1), prompt_len=6)
    got, timing = gen.generate_rank(prog, 0, prompt, valid, 6, compile_mode="max-autotune")
    assert seen == [{"dynamic": False, "mode": "max-autotune-no-cudagraphs"}]
    assert torch.equal(got, greedy_generate(model, prompt, valid, 6))
    assert timing["steps"] == 4 and timing["compile_s"] > 0
    _, plain = gen.generate_rank(prog, 0, prompt, valid, 6)
    assert plain["steps"] == 5 and plain["compile_s"] == 0 and len(seen) == 1
    with pytest.raises(HelixError, match=r"--compile 'fast': choose one of none, default, max-autotune"):
        compiled(prog.modules[0][1], "fast")
