"""`helix`: the command line, a thin shell over the library.

    helix plan [MODEL] --devices N     the candidate (m, n) splits, their costs, the chosen plan
    helix plan [MODEL] --decode --context C --concurrency B --devices N
                                       every decode split (s, m, n): KV bytes per rank, TPOT
    helix run  [MODEL] --devices N     compile and run the N rank modules on N processes (torchrun)
    helix generate [MODEL] --devices N --prompt-len P --new-tokens T
                                       greedy generation with a sharded KV cache (torchrun)

MODEL is a spec that `modelspec.load_model_spec` resolves (`file.py`,
`file.py:function`, `module:function`). Each subcommand is one function that
turns its arguments into a library call. A `HelixError` and an argument error
print one line `error: ...` on stderr and exit 2; anything else is a bug and
keeps its traceback.

Exit status: 0 done; 2 a refused request (HelixError, bad arguments); 1 a rank
of `helix run` failed or its error exceeded the tolerance (`helix generate`: or
its tokens differ from the unsharded model's); 124 `helix run` / `helix
generate` ran past --timeout.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch
import yaml

from ..api import helix_compile, plan_model
from ..planning.decode_plan import format_decode_table, llama70b_shape, plan_decode, shape_from_summary
from ..errors import HelixError, HelixWarning
from ..modelspec import load_model_spec
from ..pipeline import PASS_NAMES, PASSES, analyze, cluster_spec
from ..planning.plan import OBJECTIVES, Plan
from ..planning.profile import load_profile
from ..models.paper import PaperConfig, build
from ..runtime.compiled import COMPILE_MODES
from ..decode import SPLIT_KV_CORE
from .generate import (DEFAULT_MODEL, GenerateSplit, check_request, choose_split,
                       load_decoder)
from .report import format_table
from .worker import read_failures
from ..planning.text import ranges as _ranges

EXIT_REFUSED = 2
EXIT_RANK_FAILED = 1
EXIT_TIMEOUT = 124

# The paper's model lives in the repository's examples/, beside the package
# (an editable install; a wheel does not carry examples/).
PAPER_MODEL = "helix_compiler.models.paper"      # MODEL when none is given
FORMATS = ("table", "yaml", "json")
BACKENDS = ("gloo", "nccl")
DTYPES = ("float32", "float16", "bfloat16")
# `helix run` stops with exit 1 when its max relative error exceeds this. fp32:
# the ranks sum partial products in another order than the unsharded model, so
# they differ by a few ulps (~1e-7 relative, measured); fp16 / bf16 ranks are
# compared with the unsharded model in the same dtype, whose own rounding
# (eps 9.8e-4 / 7.8e-3) then dominates.
DEFAULT_TOLERANCE = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 5e-2}
DEFAULT_TIMEOUT_S = 300.0
# torch.export logs a graph dump at WARNING when it gives up on a data-dependent
# branch; the capture error names the cause in one line, so the CLI shows only that.
QUIET_LOGGERS = ("torch.fx.experimental.symbolic_shapes",)
# Passes after which `helix plan --print-graph-after` compiles (rank graphs), not only plans.
EMITTING_PASSES = tuple(p.name for p in PASSES if p.kind in ("emit", "rank"))
# After SIGTERM to a timed-out run, how long torchrun gets to stop its workers.
KILL_GRACE_S = 10.0


class _UsageError(Exception):
    """An argument argparse refused; printed as one `error:` line like a HelixError."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage and exit
        raise _UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def _plan_arg(text: str):
    """--plan M,N -> (m, n); --plan DP,M,N -> (dp, m, n); --plan DP,PP,M,N -> (dp, pp, m, n);
    --plan FILE.yaml -> the path (read by Plan.from_yaml)."""
    if text.endswith((".yaml", ".yml")):
        return text
    parts = text.split(",")
    if len(parts) not in (2, 3, 4) or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(
            f"--plan takes M,N (m dim slices, n head groups; e.g. 4,4), DP,M,N (dp data replicas "
            f"of it; e.g. 2,1,2), DP,PP,M,N (pp pipeline stages too; e.g. 1,2,1,8) or a plan "
            f".yaml file, got {text!r}")
    return tuple(int(p) for p in parts)


def _plan_text(plan) -> str:
    """--plan as the worker takes it."""
    return plan if isinstance(plan, str) else ",".join(map(str, plan))


def _positive(what: str):
    """An argparse type: a positive float, refused as 'expected a positive number of <what>'."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive number of {what}, got {text!r}")
        return value
    return parse


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _resolve_plan(value):
    return Plan.from_yaml(Path(value)) if isinstance(value, str) else value


def _paper_spec(function: str) -> str:
    """The paper's model, shipped with the package (helix_compiler/models/paper.py)."""
    return f"{PAPER_MODEL}:{function}"


# ---- helix plan ------------------------------------------------------------------------
def _profile(path):
    """A measured profile YAML (`helix calibrate` writes one), or None for the built-in H100 figures."""
    if path is None:
        return None
    return load_profile(path)


def _plan_model_spec(model: str | None, batch: int | None, seq: int | None):
    """(model, args, kwargs) for helix plan, on meta: one --batch / --seq pair sizes a Hugging
    Face model directory or, with no MODEL, the paper's model (its default 1024 x 10000;
    --objective latency: --batch 1); a MODEL function chooses its own inputs (refused)."""
    if model is not None or (batch is None and seq is None):
        return load_model_spec(model or _paper_spec("paper_meta"), batch=batch, seq=seq,
                               init="meta")

    config = PaperConfig(**{k: v for k, v in (("batch", batch), ("seq", seq)) if v is not None})
    model_, inputs = build(config, "meta")
    return model_, inputs, {}


def cmd_plan(args) -> int:
    """Plan MODEL (default: the paper's model at the paper's sizes, on meta) and print it."""
    decode_only = [flag for flag, value in (("--context", args.context),
                                            ("--concurrency", args.concurrency),
                                            ("--dtype", args.dtype)) if value is not None]
    if args.decode:
        return cmd_plan_decode(args)
    if decode_only:
        raise HelixError(f"{decode_only[0]} plans a decode step; add --decode (helix plan "
                         f"--decode --context C --concurrency B --devices N)")
    model, inputs, kwargs = _plan_model_spec(args.model, args.batch, args.seq)
    stage = args.print_graph_after
    common = dict(devices=args.devices, example_inputs=inputs, example_kwargs=kwargs,
                  cluster=args.cluster, plan=_resolve_plan(args.plan),
                  print_after=(stage,) if stage else (), profile=_profile(args.profile),
                  strict=args.strict, verbose=args.verbose, objective=args.objective,
                  memory_cap_gib=args.memory_cap, dp=args.dp, pp=args.pp,
                  micro_batches=args.micro_batches,
                  overlap=None if args.overlap == "auto" else int(args.overlap),
                  sequence_parallel={"auto": None, "on": True, "off": False}[args.sequence_parallel])
    # the library prints the graph after the pass; shard and the rank passes need rank graphs
    if stage in EMITTING_PASSES:
        plan = helix_compile(model, **common).plan
    else:
        plan, _ = plan_model(model, **common, prune=not args.all_rows)
    if args.output:
        try:
            Path(args.output).write_text(plan.to_yaml())
        except OSError as e:
            raise HelixError(f"-o {args.output}: cannot write the plan ({e.strerror}); "
                             f"give a path in an existing, writable directory") from e
    if args.format == "table":
        print(format_table(plan))
    elif args.format == "yaml":
        print(plan.to_yaml(), end="")
    else:
        print(json.dumps(plan.to_dict(), indent=1))
    return 0


# Flags of a forward-step plan that a decode plan does not take: (flag, attribute, unset value).
_NOT_DECODE = (("--plan", "plan", None), ("--objective", "objective", "throughput"),
               ("--print-graph-after", "print_graph_after", None),
               ("-o", "output", None))


def cmd_plan_decode(args) -> int:
    """helix plan --decode: every dp x (s, m, n) plan of a decode step at --context and
    --concurrency (--dp: only that many replicas).
    The shape is MODEL's captured summary (L identical attention sites and MLPs), or with no
    MODEL a LLaMA-70B-like GQA shape."""
    for flag, attr, unset in _NOT_DECODE:
        if getattr(args, attr) != unset:
            raise HelixError(f"{flag} is not taken with --decode (the decode planner costs every "
                             f"dp x (s, m, n) plan and chooses by time per output token); drop {flag}")
    missing = [f for f, v in (("--context", args.context), ("--concurrency", args.concurrency))
               if v is None]
    if missing:
        raise HelixError(f"helix plan --decode needs {' and '.join(missing)} (e.g. --context "
                         f"131072 --concurrency 64)")
    if args.model is None:
        if args.batch is not None or args.seq is not None:
            raise HelixError("--batch / --seq size a MODEL's capture; with no MODEL, --decode "
                             "plans the built-in LLaMA-70B-like shape: give a MODEL or drop them")
        shape = llama70b_shape()
        if args.dtype is not None:
            shape = dataclasses.replace(shape, dtype=args.dtype)
    else:
        model, inputs, kwargs = load_model_spec(args.model, batch=args.batch, seq=args.seq,
                                                init="meta")
        # the summary's shapes are all the planner reads: a static capture is enough (and faster)
        summary = analyze(model, inputs, kwargs, dynamic=False, verbose=args.verbose).summary
        shape = shape_from_summary(summary, dtype=args.dtype)
    plan = plan_decode(shape, args.context, args.concurrency, args.devices,
                       cluster_spec(args.cluster, args.devices), profile=_profile(args.profile),
                       memory_cap_gib=args.memory_cap, dp=args.dp)
    if args.format == "table":
        print(format_decode_table(plan))
    elif args.format == "yaml":
        print(yaml.safe_dump(plan.to_dict(), sort_keys=False), end="")
    else:
        print(json.dumps(plan.to_dict(), indent=1))
    return 0


# ---- helix run -------------------------------------------------------------------------
def _default_backend(devices: int) -> str:
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= devices else "gloo"


def cmd_run(args) -> int:
    """Check the request here, then run one worker per rank under torchrun and report."""
    spec = args.model or _paper_spec("helix_model")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise HelixError(f"--json {args.json}: directory {str(Path(args.json).resolve().parent)!r} "
                         f"does not exist; create it or write the summary elsewhere")
    backend = args.backend or _default_backend(args.devices)
    if backend == "nccl" and torch.cuda.device_count() < args.devices:
        raise HelixError(
            f"--backend nccl needs one GPU per rank: {args.devices} ranks, but this machine has "
            f"{torch.cuda.device_count()} CUDA devices; use --backend gloo (CPU) or fewer --devices")
    # Fail here, once, on what every rank would refuse (a bad MODEL, an
    # infeasible --plan) rather than in N processes.
    model, inputs, kwargs = load_model_spec(spec, batch=args.batch, seq=args.seq, init="meta")
    plan_model(model, devices=args.devices, example_inputs=inputs, example_kwargs=kwargs,
               cluster=args.cluster, plan=_resolve_plan(args.plan), strict=args.strict,
               verbose=args.verbose, dp=1 if args.plan is None else None,
               pp=1 if args.plan is None else None, micro_batches=args.micro_batches)
    given = _resolve_plan(args.plan)
    pp = given.pp if isinstance(given, Plan) else (given[1] if given and len(given) == 4 else 1)
    if pp > 1 and args.weights:
        raise HelixError(f"--plan {_plan_text(args.plan)}: --weights with pp={pp} pipeline "
                         f"stages is not supported yet; drop --weights (random weights) or run "
                         f"a pp=1 plan")
    if pp > 1 and args.compile != "none":
        raise HelixError(f"--plan {_plan_text(args.plan)}: --compile {args.compile} with pp={pp} "
                         f"pipeline stages is not supported yet (the stages run under "
                         f"torch.distributed.pipelining as built); drop --compile or run a pp=1 "
                         f"plan")
    del model, inputs, kwargs

    workdir = Path(tempfile.mkdtemp(prefix="helix-run-"))
    tolerance = args.tolerance if args.tolerance is not None else DEFAULT_TOLERANCE[args.dtype]
    worker = ["--backend", backend, "--steps", str(args.steps), "--timeout", str(args.timeout),
              "--dtype", args.dtype, "--tolerance", repr(tolerance), "--result-dir", str(workdir)]
    if args.cluster is not None:
        worker += ["--cluster", args.cluster]
    if args.plan is not None:
        worker += ["--plan", _plan_text(args.plan)]
    if args.json:
        worker += ["--json", str(Path(args.json).resolve())]
    if args.sequence_parallel:
        worker += ["--sequence-parallel"]
    if args.compile != "none":
        worker += ["--compile", args.compile]
    for flag, value in (("--batch", args.batch), ("--seq", args.seq),
                        ("--micro-batches", args.micro_batches)):
        if value is not None:
            worker += [flag, str(value)]
    if args.weights:
        if not Path(args.weights).exists():
            raise HelixError(f"--weights {args.weights}: no such file or directory; pass a state_dict "
                             f"file or a directory of safetensors files")
        worker += ["--weights", str(Path(args.weights).resolve())]
    return _torchrun("run", "helix_compiler.cli.worker", spec, worker, args.devices, workdir,
                     args.timeout)


def _torchrun(command_name: str, module: str, spec: str, worker: list, devices: int,
              workdir: Path, timeout_s: float) -> int:
    """Run `module` as `devices` torchrun ranks; the exit code of `helix <command_name>`,
    with the ranks' failures (or the timeout) reported on stderr."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(devices), "-m", module, spec, *worker]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")   # N ranks share the cores (torchrun's default, without its warning)
    log = workdir / "torchrun.log"
    status = _launch(command, env, log, timeout_s)
    if status == 0:
        shutil.rmtree(workdir, ignore_errors=True)
        return 0
    if status is None:
        print(f"error: helix {command_name}: timed out after {timeout_s:g} s (--timeout) and was "
              f"stopped; {_rank_report(workdir, devices)}; log: {log}", file=sys.stderr)
        return EXIT_TIMEOUT
    print(f"error: helix {command_name}: torchrun exited with status {status}; "
          f"{_rank_report(workdir, devices)}; log: {log}", file=sys.stderr)
    return EXIT_RANK_FAILED


def _launch(command: list, env: dict, log: Path, timeout_s: float) -> int | None:
    """Run torchrun in its own process group: rank 0's stdout is echoed, stderr goes to `log`.
    The exit status, or None after `timeout_s` (the whole group is killed)."""
    with open(log, "wb") as err:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, env=env,
                                start_new_session=True)
        echo = threading.Thread(target=_echo, args=(proc.stdout,), daemon=True)
        echo.start()
        try:
            status = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            status = None
        except BaseException:  # Ctrl-C: no rank may outlive the command
            _kill_group(proc)
            raise
        echo.join(timeout=KILL_GRACE_S)
    return status


def _echo(stream) -> None:
    for line in iter(stream.readline, b""):
        sys.stdout.write(line.decode(errors="replace"))
        sys.stdout.flush()


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            if sig == signal.SIGTERM:
                os.killpg(proc.pid, signal.SIGKILL)   # stragglers that ignored SIGTERM
            return
        except (subprocess.TimeoutExpired, ProcessLookupError):
            continue


def _rank_report(workdir: Path, devices: int) -> str:
    """Which ranks failed (first failure first, with its message) and which never finished."""
    failed = read_failures(workdir)
    done = {r for r in range(devices) if (workdir / f"rank{r}.done").exists()}
    by_message: dict[str, list[int]] = {}   # earliest failure first; ranks that agree, once
    for f in failed:
        by_message.setdefault(_one_line(f["error"]), []).append(f["rank"])
    parts = [f"rank{'s' if len(rs) > 1 else ''} {_ranges(sorted(rs))} failed: {message}"
             for message, rs in by_message.items()]
    silent = sorted(set(range(devices)) - done - {f["rank"] for f in failed})
    if silent:
        parts.append(f"rank{'s' if len(silent) > 1 else ''} {_ranges(silent)} did not finish")
    return "; ".join(parts) or "every rank finished"



# ---- helix generate --------------------------------------------------------------------
def _split_arg(text: str) -> tuple[int, int, int]:
    """--plan S,M,N -> (s, m, n)."""
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(
            f"--plan takes S,M,N (s cache chunks, m dim slices, n head groups, s*m*n = "
            f"--devices; e.g. 1,2,2 or 2,1,2), got {text!r}")
    return tuple(int(p) for p in parts)


def cmd_generate(args) -> int:
    """Check the request and choose the split here, then run one rank of the DecodeProgram
    per process under torchrun (helix_compiler/cli/generate.py); rank 0 prints the tokens."""

    spec = args.model or DEFAULT_MODEL
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise HelixError(f"--json {args.json}: directory {str(Path(args.json).resolve().parent)!r} "
                         f"does not exist; create it or write the summary elsewhere")
    backend = args.backend or _default_backend(args.devices)
    if backend == "nccl" and torch.cuda.device_count() < args.devices:
        raise HelixError(
            f"--backend nccl needs one GPU per rank: {args.devices} ranks, but this machine has "
            f"{torch.cuda.device_count()} CUDA devices; use --backend gloo (CPU) or fewer --devices")
    if args.weights and not Path(args.weights).exists():
        raise HelixError(f"--weights {args.weights}: no such file or directory; pass a state_dict "
                         f"file or a directory of safetensors files")
    torch.manual_seed(args.seed)
    # a Hugging Face model directory: a cache of --batch rows and P + T positions
    model = load_decoder(spec, batch=args.batch, weights=args.weights,
                         max_seq=args.prompt_len + args.new_tokens)
    if args.plan is None and args.dp is not None:
        raise HelixError(f"--dp {args.dp} is taken with --plan S,M,N (the split of each "
                         f"replica); without --plan the decode planner chooses dp too")
    check_request(model, args.devices, args.prompt_len, args.new_tokens, args.plan, args.variant,
                  args.dp or 1)
    if args.plan is None:
        choice = choose_split(model, args.devices, args.prompt_len, args.new_tokens, args.cluster)
        if args.variant is not None and choice.m == 1:
            raise HelixError(f"--variant {args.variant} applies to m > 1, but the planner chose "
                             f"{choice.name}; give --plan S,M,N with m > 1 too, or drop --variant")
        if args.variant is not None:
            choice = GenerateSplit(s=choice.s, m=choice.m, n=choice.n, variant=args.variant,
                                   reason=f"{choice.reason}; variant {args.variant} as given",
                                   dp=choice.dp)
    else:
        s, m, n = args.plan
        variant = args.variant or ("score-reduce" if m > 1 else None)
        choice = GenerateSplit(s=s, m=m, n=n, variant=variant, reason="given with --plan",
                               dp=args.dp or 1)
    print(f"split: {choice.name} ({choice.reason})", flush=True)
    del model

    workdir = Path(tempfile.mkdtemp(prefix="helix-generate-"))
    worker = ["--plan", ",".join(map(str, choice.split)), "--dp", str(choice.dp),
              "--prompt-len", str(args.prompt_len),
              "--new-tokens", str(args.new_tokens), "--backend", backend, "--seed", str(args.seed),
              "--timeout", str(args.timeout), "--result-dir", str(workdir)]
    if choice.variant is not None:
        worker += ["--variant", choice.variant]
    if args.json:
        worker += ["--json", str(Path(args.json).resolve())]
    if args.batch is not None:
        worker += ["--batch", str(args.batch)]
    if args.weights:
        worker += ["--weights", str(Path(args.weights).resolve())]
    if args.compile != "none":
        worker += ["--compile", args.compile]
    worker += ["--split-kv-core", args.split_kv_core]
    if args.no_fuse_projections:
        worker += ["--no-fuse-projections"]
    return _torchrun("generate", "helix_compiler.cli.generate", spec, worker, args.devices,
                     workdir, args.timeout)


# ---- the parser ------------------------------------------------------------------------
STRICT_HELP = ("refuse (exit 2) a model with an attention core no site owns, which would run "
               "replicated on every rank (default: a warning, and the plan lists it)")
VERBOSE_HELP = ("let torch.export print what it prints while capturing MODEL (the partial graph and "
                "logs of a failed capture); by default only Helix's one-line error is shown")


def _add_size_flags(sub: argparse.ArgumentParser, paper: bool = False) -> None:
    """One --batch / --seq pair: a Hugging Face model directory's example sizes and, for helix
    plan (paper=True), the default paper model's; a MODEL function refuses them."""
    def also(default: int) -> str:
        return f" or, with no MODEL, of the paper's model (default {default})" if paper else ""
    sub.add_argument("--batch", type=_positive_int, metavar="B",
                     help=f"example batch size for a Hugging Face model directory (default 2)"
                          f"{also(1024)}")
    sub.add_argument("--seq", type=_positive_int, metavar="S",
                     help=f"example sequence length for a Hugging Face model directory (default 128)"
                          f"{also(10000)}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="helix", description=(
        "Partition a model's attention over n head groups x m head-dim slices. "
        "MODEL: a .py file defining helix_model(), file.py:function or module:function, "
        "returning (model, args) or (model, args, kwargs); or a Hugging Face model directory "
        "(config.json, built on meta; --weights reads its safetensors per rank)."))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    plan = sub.add_parser("plan", help="show the candidate (m, n) splits, their costs and the chosen plan",
                          description="Plan MODEL on --devices devices; nothing is sharded and, "
                                      "for a model on the meta device, no weights are allocated.")
    plan.add_argument("model", nargs="?", metavar="MODEL",
                      help="model spec (default: the paper's 2-layer model at full size on the meta device)")
    plan.add_argument("--devices", type=int, required=True, metavar="N", help="number of devices N = m * n")
    plan.add_argument("--cluster", metavar="PRESET|FILE",
                      help="cluster preset (paper, paper-h200, h100x8) or cluster YAML file (default: the paper's "
                           "nodes of 8 H100s, as many as --devices needs)")
    plan.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    plan.add_argument("--plan", type=_plan_arg, metavar="[DP,[PP,]]M,N|FILE",
                      help="force the split m,n, or dp data replicas of it (dp,m,n), with pp "
                           "pipeline stages (dp,pp,m,n), or a plan YAML "
                           "written with -o, instead of choosing")
    plan.add_argument("--objective", choices=OBJECTIVES, default="throughput",
                      help="throughput: the most tokens/s for the batch (default); latency: the "
                           "shortest time to finish one batch (set its size with --batch, e.g. 1)")
    plan.add_argument("--memory-cap", type=_positive("GiB per rank"), metavar="GIB",
                      help="GiB of memory per rank a plan may use (default: the GPU's)")
    plan.add_argument("--all-rows", action="store_true",
                      help="price every split (default: splits whose step cannot beat the chosen "
                           "one, by a lower bound of their compute, are shown unpriced with the bound)")
    plan.add_argument("--dp", type=_positive_int, metavar="K",
                      help="only plans of K data replicas (default: every K dividing N and the batch)")
    plan.add_argument("--overlap", choices=("auto", "1", "2", "4", "8"), default="auto",
                      help="batch chunks k whose all-reduces overlap the next chunk's compute "
                           "(default auto: the cost model chooses per plan; 1: no overlap)")
    plan.add_argument("--sequence-parallel", choices=("auto", "on", "off"), default="auto",
                      help="norms and residuals on 1/N of the tokens (reduce-scatter + "
                           "all-gather); default auto: the cost model chooses per plan")
    plan.add_argument("--pp", type=_positive_int, metavar="P",
                      help="only plans of P pipeline stages (default: every P dividing N, at most "
                           "the model's blocks)")
    plan.add_argument("--micro-batches", type=_positive_int, metavar="M",
                      help="a pipeline plan's micro-batches per replica (default: the cost model "
                           "chooses; M must divide the replica's batch)")
    plan.add_argument("--print-graph-after", choices=PASS_NAMES, metavar="PASS",
                      help=f"print the graph after a pass of the pipeline (rank 0's after shard "
                           f"and the rank passes): {', '.join(PASS_NAMES)}")
    plan.add_argument("-o", "--output", metavar="FILE", help="also write the plan as YAML to FILE")
    _add_size_flags(plan, paper=True)
    plan.add_argument("--profile", metavar="FILE",
                      help="compute profile YAML written by `helix calibrate` (default: the built-in "
                           "H100 figures; helix_compiler/planning/profiles/h100.yaml is the one we measured)")
    plan.add_argument("--strict", action="store_true", help=STRICT_HELP)
    plan.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    plan.add_argument("--decode", action="store_true",
                      help="plan a decode step instead: every split (s cache chunks, m, n) with its "
                           "KV bytes per rank beside tensor parallel's, per-step communication and "
                           "time per output token (docs/decode.md); MODEL default: a LLaMA-70B-like "
                           "GQA shape")
    plan.add_argument("--context", type=_positive_int, metavar="C",
                      help="--decode: positions in each sequence's KV cache")
    plan.add_argument("--concurrency", type=_positive_int, metavar="B",
                      help="--decode: sequences decoding at once")
    plan.add_argument("--dtype", choices=DTYPES,
                      help="--decode: dtype of the weights and the cache (default: MODEL's; "
                           "float16 for the built-in shape)")
    plan.set_defaults(func=cmd_plan)

    run = sub.add_parser("run", help="compile MODEL and run its N rank modules on N processes (torchrun)",
                         description="Launch N processes with torchrun; each compiles the same program, "
                                     "runs its rank module on the model's example inputs and compares its "
                                     "output with the unsharded model's. Rank 0 prints one summary line.")
    run.add_argument("model", nargs="?", metavar="MODEL",
                     help="model spec (default: the paper's model scaled down: 16 heads, D=128)")
    run.add_argument("--devices", type=int, required=True, metavar="N", help="number of processes N = m * n")
    run.add_argument("--backend", choices=BACKENDS,
                     help="nccl (one GPU per rank) or gloo (CPU); default nccl when N GPUs are visible")
    run.add_argument("--cluster", metavar="PRESET|FILE",
                     help="cluster whose cost model picks the split (default: as for helix plan)")
    run.add_argument("--plan", type=_plan_arg, metavar="[DP,[PP,]]M,N|FILE",
                     help="force the split m,n, dp replicas of it (dp,m,n; each rank runs its "
                          "replica's batch shard), pp pipeline stages too (dp,pp,m,n; run by "
                          "torch.distributed.pipelining's ScheduleGPipe), or a plan YAML; "
                          "default: the best m x n (dp = 1)")
    run.add_argument("--micro-batches", type=_positive_int, metavar="M",
                     help="a pp plan's micro-batches per replica (default: the cost model "
                          "chooses; M must divide the replica's batch)")
    run.add_argument("--steps", type=_positive_int, default=10, metavar="K", help="timed steps (default 10)")
    run.add_argument("--timeout", type=_positive("seconds"), default=DEFAULT_TIMEOUT_S, metavar="S",
                     help=f"stop every rank after S seconds, exit {EXIT_TIMEOUT} (default {DEFAULT_TIMEOUT_S:g})")
    run.add_argument("--dtype", choices=DTYPES, default="float32",
                     help="cast model and inputs before compiling (float16 for GPU runs; default float32)")
    run.add_argument("--tolerance", type=_positive("relative error"), metavar="TOL",
                     help="largest max relative error that passes (default 1e-5 for float32, 1e-2 float16, "
                          "5e-2 bfloat16: compared with the unsharded model in the same dtype)")
    run.add_argument("--json", metavar="PATH", help="also write rank 0's summary as JSON to PATH")
    run.add_argument("--weights", metavar="PATH",
                     help="read each rank's weight slices from this checkpoint (a torch state_dict file "
                          "or a directory of safetensors files), memory-mapped; MODEL may be on meta")
    run.add_argument("--sequence-parallel", action="store_true",
                     help="split the residual stream along the sequence between blocks "
                          "(reduce-scatter / all-gather; the model is captured with static sizes)")
    run.add_argument("--compile", choices=tuple(COMPILE_MODES), default="none",
                     help="run each rank's module under torch.compile (inductor) in this mode: "
                          "default fuses its elementwise ops, max-autotune also picks each "
                          "matmul's kernel by timing (without inductor's CUDA graphs); the "
                          "compiling call is a warm-up step, untimed (default none: as built; "
                          "pp=1 plans)")
    run.add_argument("--strict", action="store_true", help=STRICT_HELP)
    run.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    _add_size_flags(run)
    run.set_defaults(func=cmd_run)

    gen = sub.add_parser("generate", help="greedy generation with a sharded KV cache on N processes "
                                          "(torchrun): prefill, then decode steps",
                         description="Launch N processes with torchrun; each compiles the same "
                                     "DecodeProgram (prefill and decode step over one sharded KV "
                                     "cache), runs its rank's prefill and T - 1 decode steps, and "
                                     "rank 0 prints the new tokens, whether they equal the unsharded "
                                     "model's greedy tokens (fp32) and the time per output token.")
    gen.add_argument("model", nargs="?", metavar="MODEL",
                     help="model spec whose function returns a CacheDecoder-style model first "
                          "(default: helix_compiler.models.decoder_cache:helix_model, 8 heads over "
                          "2 kv heads, a batch of 4, 64 cache positions), or a Hugging Face model "
                          "directory (config.json of a causal LM, seeded random weights; the "
                          "reference is its generate)")
    gen.add_argument("--devices", type=_positive_int, required=True, metavar="N",
                     help="number of processes N = dp * s * m * n")
    gen.add_argument("--prompt-len", type=int, required=True, metavar="P",
                     help="prompt tokens per row (row 1 is left-padded by P // 2, with a batch "
                          ">= 3 the last row is all padding; a Hugging Face model: one real token)")
    gen.add_argument("--new-tokens", type=int, required=True, metavar="T",
                     help="tokens to generate per row (the prefill's, then T - 1 decode steps)")
    gen.add_argument("--plan", type=_split_arg, metavar="S,M,N",
                     help="force the split: s cache chunks, m head-dim slices, n head groups "
                          "(default: the decode planner's choice at context P + T, concurrency = "
                          "the batch, among the splits compile_decoder builds)")
    gen.add_argument("--dp", type=_positive_int, metavar="K",
                     help="with --plan: K data-parallel replicas of S * M * N ranks each, replica d "
                          "serving rows d B/K ... of the batch (default 1)")
    gen.add_argument("--variant", choices=("score-reduce", "qk-gather"),
                     help="m > 1: score-reduce (default) or qk-gather")
    gen.add_argument("--backend", choices=BACKENDS,
                     help="nccl (one GPU per rank) or gloo (CPU); default nccl when N GPUs are visible")
    gen.add_argument("--cluster", metavar="PRESET|FILE",
                     help="cluster the decode planner prices the splits on (default: as for helix plan)")
    gen.add_argument("--seed", type=int, default=0, metavar="K",
                     help="seed of the model's weights and the prompt (default 0)")
    gen.add_argument("--timeout", type=_positive("seconds"), default=DEFAULT_TIMEOUT_S, metavar="S",
                     help=f"stop every rank after S seconds, exit {EXIT_TIMEOUT} (default {DEFAULT_TIMEOUT_S:g})")
    gen.add_argument("--json", metavar="PATH", help="also write rank 0's summary as JSON to PATH")
    gen.add_argument("--batch", type=_positive_int, metavar="B",
                     help="a Hugging Face model directory's cache rows (default 4); its cache "
                          "positions are P + T")
    gen.add_argument("--weights", metavar="PATH",
                     help="a Hugging Face model directory's weights, read whole on every rank (a "
                          "directory of safetensors files or a state_dict file; default: seeded "
                          "random weights)")
    gen.add_argument("--compile", choices=tuple(COMPILE_MODES), default="none",
                     help="run each rank's decode step under torch.compile (inductor) in this mode; "
                          "max-autotune also chooses each matmul's kernel by timing (no CUDA "
                          "graphs of inductor's: they would capture the collectives). The first "
                          "step compiles and is not timed (default none)")
    gen.add_argument("--split-kv-core", choices=tuple(SPLIT_KV_CORE), default="auto",
                     help="s = 1: run each decode step's attention over the cache as helix's "
                          "split-KV kernel (flash-decoding's split of the keys over the SMs, the "
                          "cache read un-repeated) instead of SDPA: on, off, or auto (default: "
                          "where it was measured faster on an H200, at least 2 query heads per "
                          "kv head and at most 2 sequences a rank; docs/decode.md)")
    gen.add_argument("--no-fuse-projections", action="store_true",
                     help="run q/k/v and gate/up as separate GEMMs (default: each group of "
                          "projections of one input as one GEMM, passes/fuse_linears.py)")
    gen.set_defaults(func=cmd_generate)

    for name, text in FORWARDED.items():  # listed in --help; parsed by their own modules
        sub.add_parser(name, help=text, add_help=False)
    return parser


FORWARDED = {"bench": "time one rank of every plan on this GPU, with modeled communication (docs/BENCHMARKS.md)",
             "calibrate": "measure this GPU's op rates into a profile YAML the cost model reads (--profile)"}


def _forward(module: str, argv: list) -> int:
    """`helix bench` / `helix calibrate`: their own argument parsers live with them."""

    if module == "calibrate" and "--collectives" in argv:  # NCCL sweep over this machine's GPUs
        module = "calibrate_collectives"
    return importlib.import_module(f"helix_compiler.measure.{module}").main(argv) or 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A HelixWarning as one line `warning: ...` on stderr; any other warning as Python shows it."""
    if issubclass(category, HelixWarning):
        print(f"warning: {_one_line(message)}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _main(argv: list[str]) -> int:
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _main_inner(argv)


def _main_inner(argv: list[str]) -> int:
    parser = build_parser()
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        if argv and argv[0] in FORWARDED:  # their own parsers: `helix bench --help` is bench's help
            return _forward(argv[0], list(argv[1:]))
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_REFUSED
        return args.func(args)
    except (HelixError, _UsageError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_REFUSED
    except SystemExit as e:   # --help
        return e.code if isinstance(e.code, int) else EXIT_REFUSED


def main() -> None:
    try:
        status = _main(sys.argv[1:])
        sys.stdout.flush()
    except BrokenPipeError:   # `helix plan ... | head`: the reader left, which is no error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 0
    sys.exit(status)


if __name__ == "__main__":
    main()
