"""Shared checks for the sharding tests: every rank computes what the unsharded model computes.

The tolerance is one number for the whole suite: float32, relative error
||a - b|| / ||b|| <= 1e-5 per floating leaf of the output pytree (HF
ModelOutputs are registered pytree nodes, so they flatten like tuples of their
non-None fields). Sharding only reorders float32 sums (a d/m-slice partial
score, an N-way all-reduce of a row-sharded projection), so observed errors are
~1e-7; 1e-5 leaves room for that and nothing else.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Sequence

import torch
import torch.utils._pytree as pytree

from helix_compiler.numerics import relative_error

REL_TOL = 1e-5   # ||a - b|| / ||b|| per floating leaf, float32


# ||got - want|| / ||want|| in float64 (the absolute error when want is all zeros)
rel_error = relative_error


def _flat(tree) -> tuple[list, pytree.TreeSpec]:
    return pytree.tree_flatten(tree)


def assert_output_equal(got, want, *, tol: float = REL_TOL, label: str = "output") -> None:
    """`got` has `want`'s pytree structure; each floating leaf within `tol` relative error,
    every other leaf equal."""
    got_leaves, got_spec = _flat(got)
    want_leaves, want_spec = _flat(want)
    assert got_spec == want_spec, f"{label}: pytree structure {got_spec} != reference {want_spec}"
    assert_leaves_equal(got_leaves, want_leaves, tol=tol, label=label)


def assert_leaves_equal(got: Sequence, want: Sequence, *, tol: float = REL_TOL,
                        label: str = "output") -> None:
    """Flat outputs (e.g. a loaded rank's) against the reference's leaves, in order."""
    want = [w for w in want if w is not None]
    got = [g for g in got if g is not None]
    assert len(got) == len(want), f"{label}: {len(got)} leaves, reference has {len(want)}"
    for k, (g, w) in enumerate(zip(got, want)):
        where = f"{label} leaf {k}"
        if not isinstance(w, torch.Tensor):
            assert g == w, f"{where}: {g!r} != reference {w!r}"
            continue
        assert isinstance(g, torch.Tensor), f"{where}: {type(g).__name__}, reference is a tensor"
        assert g.shape == w.shape, f"{where}: shape {tuple(g.shape)} != reference {tuple(w.shape)}"
        assert g.dtype == w.dtype, f"{where}: dtype {g.dtype} != reference {w.dtype}"
        if w.is_floating_point():
            err = rel_error(g, w)
            assert err <= tol, f"{where}: relative error {err:.3g} > {tol:g}"
        else:
            assert torch.equal(g, w), f"{where}: {w.dtype} values differ from the reference"


def assert_ranks_equal(outputs: Sequence, want, *, devices: int, tol: float = REL_TOL,
                       label: str = "") -> None:
    """`devices` rank outputs, each equal to `want` (the unsharded model's output)."""
    assert len(outputs) == devices, f"{label}: {len(outputs)} rank outputs for {devices} devices"
    for r, out in enumerate(outputs):
        assert_output_equal(out, want, tol=tol, label=f"{label} rank {r}".strip())


def assert_decode_equal(prog, ref, tokens, valid, positions, *, devices: int, label: str) -> None:
    """A DecodeProgram against the unsharded decoder `ref`: every rank's prefill of `tokens`,
    then a decode step at each of `positions` fed the model's greedy token, equal to the
    model's (and free of NaN)."""
    with torch.no_grad():
        want = ref.prefill(tokens, valid)
    assert_ranks_equal(prog.prefill(tokens, valid), want, devices=devices, label=f"{label} prefill")
    tok = want[:, -1].argmax(-1, keepdim=True)
    for pos in positions:
        with torch.no_grad():
            want = ref.decode_step(tok, torch.tensor([pos]), valid)
        outs = prog.step(tok, torch.tensor([pos]), valid)
        assert_ranks_equal(outs, want, devices=devices, label=f"{label} position {pos}")
        assert not any(o.isnan().any() for o in outs), label
        tok = want[:, -1].argmax(-1, keepdim=True)


def hf_llama_decoder(impl: str, kv_heads: int, batch: int, max_seq: int, heads: int = 4,
                     **config):
    """A small LLaMA (2 layers, `heads` heads over `kv_heads`, d 8, attention `impl`, weights
    seeded 0) on transformers' StaticCache (models/hf_static.py); `config` adds LlamaConfig
    fields."""
    from transformers import LlamaConfig

    from helix_compiler.models.hf_static import hf_static_decoder

    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=8 * heads, num_attention_heads=heads, head_dim=8,
                      num_key_value_heads=kv_heads, intermediate_size=64, vocab_size=64,
                      max_position_embeddings=64, attn_implementation=impl, **config)
    return hf_static_decoder(cfg, batch, max_seq, seed=0)


def padded_prompt(batch: int, max_seq: int, length: int, vocab: int = 64):
    """Tokens (B, P); valid (B, S_max): row 1 left-padded by 3, the last row all padding."""
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, vocab, (batch, length), generator=g)
    valid = torch.ones(batch, max_seq, dtype=torch.long)
    valid[1, :3] = 0
    valid[-1, :length] = 0
    return tokens, valid


def eager_output(model: torch.nn.Module, args: tuple, kwargs: dict):
    """The unsharded eager model's output, the reference every rank must equal."""
    with torch.no_grad():
        return model(*args, **kwargs)


def all_ranks_label(m: int, n: int) -> str:
    """How `HelixProgram.collectives` names a group of all N ranks: the mesh axis that spans
    them ("head" when m = 1, "dim" when n = 1), else "all"."""
    if m == 1:
        return "head"
    if n == 1:
        return "dim"
    return "all"


def expected_collectives(*, m: int, n: int, variant: str, sites: int, o_projs: int,
                         mlps: int) -> dict[str, int]:
    """The collectives one rank graph should hold (DESIGN.md section 2-3):

    * per attention site with m > 1: score-reduce one all_reduce of the partial scores over
      the m-group ("dim"); qk-gather two all_gathers (Q and K) over "dim";
    * per output projection and per MLP: one all_reduce of the row-sharded partial sum over
      all N ranks;
    * with one device, none at all.
    """
    if m * n == 1:
        return {}
    counts: Counter = Counter()
    if m > 1:
        if variant == "score-reduce":
            counts["all_reduce:dim"] += sites
        elif variant == "qk-gather":
            counts["all_gather:dim"] += 2 * sites
        else:
            raise ValueError(f"variant must be 'score-reduce' or 'qk-gather' when m > 1, got {variant!r}")
    counts[f"all_reduce:{all_ranks_label(m, n)}"] += o_projs + mlps
    return {k: v for k, v in counts.items() if v}


def variants_for(m: int) -> tuple[str | None, ...]:
    """The m > 1 variants to force, or (None,) for plain head parallelism."""
    return ("score-reduce", "qk-gather") if m > 1 else (None,)


def seeded(fn):
    """Build `(model, args, kwargs)` under seed 0 without touching the caller's RNG;
    the model comes back in float32 eval mode."""
    @functools.wraps(fn)
    def build():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, args, kwargs = fn()
        return model.float().eval(), args, kwargs

    return build


# Programs by model (and example sizes): every split of one model reuses its capture
# (HelixProgram.recompile), which is most of a compile's time. A file's tests walk its
# models once per test function, so up to _KEEP models are kept (small test models).
_CAPTURED: dict[int, tuple] = {}
_KEEP = 64


def _remember(model, key, prog) -> None:
    _CAPTURED.pop(id(model), None)
    _CAPTURED[id(model)] = (model, key, prog)
    while len(_CAPTURED) > _KEEP:
        del _CAPTURED[next(iter(_CAPTURED))]


def _recall(model, key):
    hit = _CAPTURED.get(id(model))
    return hit[2] if hit is not None and hit[0] is model and hit[1] == key else None


def _sizes(args: tuple, kwargs: dict) -> tuple:
    return tuple(a.shape if hasattr(a, "shape") else a for a in args), tuple(sorted(kwargs))


def captured_program(model, args: tuple, kwargs: dict):
    """A one-rank program of `model` whose analysis the tests read, and whose capture
    compile_split then reuses for every split (one torch.export per model)."""
    from helix_compiler import helix_compile

    key = _sizes(args, kwargs)
    prog = _recall(model, key)
    if prog is None:
        prog = helix_compile(model, devices=1, example_inputs=args, example_kwargs=kwargs, plan=(1, 1))
        _remember(model, key, prog)
    return prog


def compile_split(model, args: tuple, kwargs: dict, *, m: int, n: int, variant: str | None):
    """helix_compile forced to the split (m, n) and variant; checks the plan took them. The
    split is sharded from the model's dynamic capture (captured_program); a program the split
    recaptures with static shapes is not remembered, so that every split, and every test of
    another input size, starts from the dynamic capture as a fresh compile would."""
    prog = captured_program(model, args, kwargs).recompile(plan=(m, n), variant=variant)
    assert (prog.plan.m, prog.plan.n) == (m, n), f"asked for m={m} x n={n}, got {prog.plan.m} x {prog.plan.n}"
    assert prog.plan.variants == (variant or "heads",) * len(prog.plan.sites), prog.plan.variants
    return prog


def check_split(model, args: tuple, kwargs: dict, want, *, m: int, n: int, variant: str | None):
    """Compile for (m, n, variant), simulate all m * n ranks, assert each equals `want`."""
    prog = compile_split(model, args, kwargs, m=m, n=n, variant=variant)
    outputs = prog.simulate(*args, **kwargs)
    assert_ranks_equal(outputs, want, devices=m * n, label=f"m={m} x n={n} {variant or 'heads'}")
    return prog


def feasible_splits(summary, devices: int) -> list[tuple[int, int]]:
    """The solver's feasible (m, n) for `devices`, smallest m first."""
    from helix_compiler.planning.solver import solve

    return [(c.m, c.n) for c in solve(summary, devices) if c.feasible]


def save_checkpoint(model: torch.nn.Module, tmp_path, fmt: str):
    """`model`'s state_dict as a checkpoint the way users hold one: "state_dict" (one torch file)
    or "safetensors" (a directory of two shards); the path `rank_module(r, weights=...)` takes."""
    if fmt == "state_dict":
        path = tmp_path / "model.pt"
        torch.save(model.state_dict(), path)
        return path
    from safetensors.torch import save_file

    path = tmp_path / "ckpt"
    path.mkdir()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = sorted(sd)
    save_file({k: sd[k] for k in names[: len(names) // 2]}, str(path / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in names[len(names) // 2:]}, str(path / "model-00002-of-00002.safetensors"))
    return path
