"""pipeline.py, the one ordered list of passes: print_after after every pass (API and CLI), an
unknown pass refused in one line, the program a value nobody changes from outside, and per-site
variants matched to sites by site index, not by list position."""

from __future__ import annotations

import contextlib
import dataclasses
import io
from pathlib import Path

import pytest
import torch

from examples.paper_model import PaperConfig, build
from helix_compiler import HelixError, helix_compile, plan_model
from helix_compiler import pipeline
from helix_compiler.cli.main import _main
from helix_compiler.program import HelixProgram
from tests.helpers import assert_ranks_equal, eager_output

REPO = Path(__file__).resolve().parents[1]
# 2 layers (2 attention sites), 4 heads of 4: (m, n) = (2, 2) splits heads and head dims.
# Batch 3 x sequence 5, not the usual 2 x 8.
CONFIG = PaperConfig(layers=2, heads=4, head_dim=4, mlp=32, batch=3, seq=5, dtype=torch.float32)
RANK_PRINTED = {"shard", "kernel_choice", "size_masks", "overlap"}


@pytest.fixture(scope="module")
def model_and_inputs():
    model, args = build(CONFIG)
    return model.eval(), args


@pytest.fixture(scope="module")
def printed_after_every_pass(model_and_inputs):
    """One compile printing after every pass: (program, stdout)."""
    model, args = model_and_inputs
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        prog = helix_compile(model, devices=4, example_inputs=args, plan=(2, 2),
                             variant="score-reduce", dynamic=False,
                             print_after=pipeline.PASS_NAMES)
    return prog, out.getvalue()


def _section(text: str, name: str) -> str:
    """What was printed under `# graph after NAME`, up to the next header."""
    head = f"# graph after {name}"
    assert head in text, f"nothing printed after {name}"
    return text.split(head, 1)[1].split("# graph after ", 1)[0]


def test_pass_list_names_each_pass_once_with_what_it_needs_and_keeps():
    assert len(set(pipeline.PASS_NAMES)) == len(pipeline.PASSES) == 15
    assert pipeline.PASS_NAMES[0] == "capture" and pipeline.PASS_NAMES[-3:] == ("kernel_choice", "size_masks", "overlap")
    assert all(p.needs and p.keeps for p in pipeline.PASSES)
    assert [p.kind for p in pipeline.RANK_PASSES] == ["rank", "rank", "rank"]


@pytest.mark.parametrize("name", pipeline.PASS_NAMES)
def test_print_after_prints_the_graph_after_each_pass(printed_after_every_pass, name):
    prog, text = printed_after_every_pass
    section = _section(text, name)
    assert "def forward(" in section
    kind = next(p.kind for p in pipeline.PASSES if p.name == name)
    if name in RANK_PRINTED:
        assert section.startswith(f": rank 0 of 4 (m=2 x n=2)"), section[:80]
        assert "torch.ops.helix.all_reduce" in section          # a rank graph, not the captured one
    else:
        assert "torch.ops.helix" not in section
    if kind == "analysis":                                       # labelled truthfully
        assert section.startswith(" (an analysis pass: the graph as slice_copies left it)")
    if name == "kernel_choice":                                  # m > 1: the chunked tail
        assert "torch.ops.helix.chunked_attend" in section and prog.kernel_choice
    if name == "shard":                                          # before the rank passes
        assert "torch.ops.helix.attend" in section and "chunked" not in section


def test_printed_passes_come_in_pipeline_order(printed_after_every_pass):
    _, text = printed_after_every_pass
    heads = [line.split()[3].rstrip(":") for line in text.splitlines()
             if line.startswith("# graph after ")]
    assert heads == list(pipeline.PASS_NAMES)


def test_unknown_pass_name_is_refused_with_the_valid_names(model_and_inputs):
    model, args = model_and_inputs
    with pytest.raises(HelixError) as e:
        helix_compile(model, devices=4, example_inputs=args, print_after=("find_attentoin",))
    msg = str(e.value)
    assert "\n" not in msg and "'find_attentoin'" in msg
    assert all(name in msg for name in pipeline.PASS_NAMES)


def test_plan_model_refuses_printing_after_a_pass_it_does_not_run(model_and_inputs):
    model, args = model_and_inputs
    with pytest.raises(HelixError, match="runs only in helix_compile"):
        plan_model(model, devices=4, example_inputs=args, print_after="shard")


@pytest.fixture
def tiny_spec(tmp_path) -> Path:
    path = tmp_path / "tiny.py"
    path.write_text(f"import sys\nimport torch\nsys.path.insert(0, {str(REPO)!r})\n"
                    f"from examples.paper_model import PaperConfig, build\n\n"
                    f"def helix_model():\n"
                    f"    return build(PaperConfig(layers=1, heads=4, head_dim=4, mlp=32, batch=3, "
                    f"seq=5, dtype=torch.float32))\n")
    return path


@pytest.mark.parametrize("name", pipeline.PASS_NAMES)
def test_cli_print_graph_after_each_pass(capsys, tiny_spec, name):
    code = _main(["plan", str(tiny_spec), "--devices", "4", "--plan", "2,2",
                  "--print-graph-after", name])
    out, err = capsys.readouterr()
    assert code == 0, err
    section = _section(out, name)
    assert "def forward(" in section
    assert ("torch.ops.helix" in section) == (name in RANK_PRINTED)
    assert out.count("# graph after ") == 1


def test_cli_unknown_pass_is_refused_in_one_line_exit_2(capsys, tiny_spec):
    code = _main(["plan", str(tiny_spec), "--devices", "4", "--print-graph-after", "lower"])
    _, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'lower'" in lines[0]
    assert "capture" in lines[0] and "size_masks" in lines[0]


def test_a_failing_pass_is_named_with_the_passes_before_it(model_and_inputs, monkeypatch):
    model, args = model_and_inputs

    def boom(state):
        raise RuntimeError("no MLP today")
    passes = tuple(dataclasses.replace(p, run=boom) if p.name == "find_mlp" else p
                   for p in pipeline.MODEL_PASSES)
    monkeypatch.setattr(pipeline, "MODEL_PASSES", passes)
    with pytest.raises(HelixError) as e:
        pipeline.analyze(model, args, dynamic=False)
    assert str(e.value) == ("stage find_mlp failed after ['capture', 'canonical_ops', 'fold_params', 'slice_copies', "
                            "'find_attention', 'causal_at_example', 'unpartitioned']: "
                            "RuntimeError: no MLP today")


def test_rank_module_applies_exactly_the_program_rank_passes(printed_after_every_pass):
    prog, _ = printed_after_every_pass
    seen = []

    def record(gm, program):
        seen.append(program is other)
        return gm

    def boom(gm, program):
        raise RuntimeError("bad rank graph")
    mine = (pipeline.Pass(name="record", kind="rank", needs="-", keeps="-", run=record),
            pipeline.Pass(name="boom", kind="rank", needs="-", keeps="-", run=boom))
    other = dataclasses.replace(prog, rank_passes=mine[:1])
    assert other.rank_module(1).code == other.emitted_module(1).code and seen == [True]
    with pytest.raises(HelixError, match=r"stage boom failed after \[.*'shard', 'record'\] on rank 2: "
                                         r"RuntimeError: bad rank graph"):
        dataclasses.replace(prog, rank_passes=mine).rank_module(2)
    assert [p.name for p in prog.rank_passes] == ["kernel_choice", "size_masks", "overlap"]


# ---- the program is a value -------------------------------------------------------------
def test_program_cannot_be_changed_from_outside(printed_after_every_pass):
    prog, _ = printed_after_every_pass
    for attr, value in (("kernel_choice", False), ("plan", None), ("notes", ("x",)),
                        ("_source", None), ("_modules", {})):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(prog, attr, value)
    with pytest.raises(dataclasses.FrozenInstanceError):
        prog.analysis.timings = ()
    assert isinstance(prog.notes, tuple) and isinstance(prog.analysis.timings, tuple)
    assert [name for name, _ in prog.timings] == list(pipeline.PASS_NAMES[:12])  # capture ... shard


def test_recompile_returns_a_new_program_and_leaves_the_old_one_intact(printed_after_every_pass,
                                                                       model_and_inputs):
    prog, _ = printed_after_every_pass
    model, args = model_and_inputs
    code0, plan0 = prog.rank_module(0).code, prog.plan
    other = prog.recompile(plan=(1, 4))
    assert isinstance(other, HelixProgram) and other is not prog
    assert (other.plan.m, other.plan.n) == (1, 4) and (prog.plan.m, prog.plan.n) == (2, 2)
    assert prog.plan is plan0 and prog.rank_module(0).code == code0
    assert other.analysis is prog.analysis                 # the capture is shared, not redone
    want = eager_output(model, args, {})
    assert_ranks_equal(prog.simulate(*args), want, devices=4, label="old program after recompile")
    assert_ranks_equal(other.simulate(*args), want, devices=4, label="recompiled m=1 x n=4")


# ---- per-site data keyed by site ------------------------------------------------------------
def test_site_variants_follow_the_site_index_not_the_list_position(printed_after_every_pass,
                                                                   model_and_inputs):
    prog, _ = printed_after_every_pass
    model, args = model_and_inputs
    matches = prog.analysis.matches
    assert len(matches) == 2
    first, second = prog.plan.sites
    # site 0 score-reduce, site 1 qk-gather, listed in reverse order
    mixed = dataclasses.replace(prog.plan, sites=(
        dataclasses.replace(second, variant="qk-gather"),
        dataclasses.replace(first, variant="score-reduce")))
    got = pipeline.site_variants(mixed, matches)
    assert got == {matches[0].site.core_nodes[0]: "score-reduce",
                   matches[1].site.core_nodes[0]: "qk-gather"}
    # the rank graphs built from that plan: each site runs its own variant, all ranks exact
    s = pipeline._state_of(prog.analysis, pipeline.Request())
    s = pipeline._shard(pipeline._seeds(dataclasses.replace(s, plan=mixed)))
    mixed_prog = dataclasses.replace(prog, plan=mixed, kernel_choice=False,
                                     _localized=s.localized, _localize=s.localize)
    ops = [str(n.target) for n in mixed_prog.rank_module(0).graph.nodes
           if n.op == "call_function" and ("helix.attend" in str(n.target)
                                           or "scaled_dot_product" in str(n.target))]
    assert ops == ["helix.attend.default", "aten.scaled_dot_product_attention.default"], ops
    assert_ranks_equal(mixed_prog.simulate(*args), eager_output(model, args, {}), devices=4,
                       label="mixed variants, sites listed in reverse")


def test_a_plan_without_an_entry_for_a_site_is_refused(printed_after_every_pass):
    prog, _ = printed_after_every_pass
    short = dataclasses.replace(prog.plan, sites=prog.plan.sites[:1])
    with pytest.raises(HelixError, match="plan has no entry for attention site 1"):
        pipeline.site_variants(short, prog.analysis.matches)
