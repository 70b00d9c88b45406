"""Decode with a sharded static KV cache: a prefill program and a decode-step program over the
same weights and the same cache slices (docs/decode.md).

A decoder whose attention layers keep `k_cache` / `v_cache` buffers (B, H_kv, S_max, d) and
write them in place at `cache_position` (`index_copy_`, helix_compiler/models/decoder_cache.py)
is compiled twice with the same split (m, n): its `prefill(tokens, valid)` and its
`decode_step(token, cache_position, valid)`. find_attention reads k and v through the cache
write (the cache carries the new rows' features at every position), and the shard pass gives
each rank its own copy of the cache sliced like its k / v projection's output:

    rank (i, j) holds  k_cache[:, kv heads of head group i, :, head dims D_j]     # (B, H_kv/n, S_max, d/m)

(when n > H_kv, the n / H_kv groups that share a kv head each hold a copy of it: only then is
the cache not exactly 1/N per rank). The two programs' rank modules are bound to one tensor per
cache slice, so a rank's prefill fills the slice its decode steps then extend and read.

With split (s, m, n), s > 1, each (i, j) module's fused attention cores over the cache (SDPA)
are written out as softmax(scores) @ v (passes/explicit_cache_cores.py), then the module is cut
into s modules by passes/seq_split.py (and each chunk core of a GQA cache made to read the
cache un-repeated, passes/gqa_fold.py):
rank (i m + j) s + k holds positions chunk k of its slice, writes only the positions it owns,
and combines its partial attention exactly over the "seq" mesh axis; its q/k/v/o weight slices
are rank (i, j)'s (the same on the s ranks of (i, j)), and passes/mesh_mlp.py cuts each MLP
further, to F/N columns per rank, all-reduced over the whole mesh ("mesh"), as NVIDIA's Helix
runs the FFN over all N GPUs.

Invariant: rank r's prefill / step output equals the unsharded model's, call after call, as
long as the same calls are made on the model; nothing of the user's model is written.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from passes.decode_core import split_kv_cores
from passes.explicit_cache_cores import explicit_cache_cores
from passes.fuse_linears import fuse_linears
from passes.gqa_fold import fold_gqa
from passes.mesh_mlp import mlp_attrs, mlp_over_mesh
from passes.seq_split import cache_writes, chunk_bounds, split_sequence

from .api import helix_compile
from .pipeline import analyze, cluster_spec
from .planning.decode_plan import DecodeShape, plan_decode, shape_from_summary
from .planning.solver import solve
from .errors import HelixError
from .models.decoder_cache import DecodeStep, Prefill
from .program import HelixProgram, run_ranks
from .runtime.mesh import Mesh

__all__ = ["DecodeProgram", "cache_writes", "check_partitioned", "combine_notes", "compile_decoder",
           "plan_split", "replica_model"]  # cache_writes: passes/seq_split.py


@dataclass(frozen=True, eq=False, kw_only=True)
class DecodeProgram:
    """The prefill and decode-step programs of one split, and every rank's module pair whose
    cache buffers are the same tensors."""

    prefill_program: HelixProgram
    step_program: HelixProgram
    mesh: Mesh                # n x m x s; rank = (i m + j) s + k
    modules: tuple            # per rank: (prefill module, step module)
    caches: tuple             # per rank: {stored buffer name: the rank's cache slice}
    max_seq: int
    # s > 1: how each core's chunks are summed (passes/seq_split.CombineSite), one line per
    # core of the prefill and the step; the same on every rank
    combine_notes: tuple[str, ...] = ()
    # s = 1: whether each step core over the cache runs as helix.chunk_attention
    # (passes/decode_core.DecodeCoreSite), one line per core
    core_notes: tuple[str, ...] = ()
    # s > 1: whether each core reads its cache chunk un-repeated (passes/gqa_fold.FoldSite),
    # one line per core of the prefill and the step; the same on every rank
    fold_notes: tuple[str, ...] = ()
    # projections of one input run as one (passes/fuse_linears.FusedLinears), one line per
    # group of the step; the same on every rank
    fuse_notes: tuple[str, ...] = ()

    @property
    def devices(self) -> int:
        return self.mesh.size

    def prefill(self, tokens: torch.Tensor, valid: torch.Tensor) -> list:
        """Every rank's logits (B, T, vocab) for the prompt; writes positions 0 .. T-1."""
        return run_ranks([p for p, _ in self.modules], self.mesh, (tokens, valid), {})

    def step(self, token: torch.Tensor, cache_position: torch.Tensor, valid: torch.Tensor) -> list:
        """Every rank's logits (B, 1, vocab) for one token at `cache_position` (1,)."""
        pos = int(cache_position.reshape(-1)[0])
        if not 0 <= pos < self.max_seq:
            raise HelixError(f"DecodeProgram.step: cache_position {pos} is outside the cache's "
                             f"{self.max_seq} positions; build the model with a larger max_seq")
        return run_ranks([s for _, s in self.modules], self.mesh,
                         (token, cache_position, valid), {})

    def reset(self) -> None:
        """Every rank's cache slices zeroed (a new batch of prompts)."""
        for caches in self.caches:
            for t in (caches or {}).values():   # None: a rank this process did not build
                t.zero_()

    def cache_bytes(self, rank: int) -> int:
        """KV cache bytes rank `rank` holds (its k and v slices of every layer)."""
        return sum(t.numel() * t.element_size() for t in self.caches[rank].values())

    def weight_bytes(self, rank: int, names=None) -> int:
        """Bytes of the model's tensors (parameters and buffers) rank `rank`'s decode-step
        module holds, its KV cache slices and Helix's index constants left out: what
        decode_plan prices as weights per rank. `names`: only tensors whose stored name
        contains one of these strings."""
        gm = self.modules[rank][1]
        shards = self.step_program.rank_shards(rank // self.mesh.s)
        model = self.step_program.analysis.captured.params
        members = gm.meta.get("fused_linears", {})      # a fused weight: its members' sources
        total = 0
        for attr, t in gm.named_buffers():
            srcs = [shards.get(a, (None,))[0] for a in members.get(attr, (attr,))]
            if any(src not in model or src in self.caches[rank] for src in srcs):
                continue
            if names is None or any(x in src for x in names for src in srcs):
                total += t.numel() * t.element_size()
        return total

    def decode_shape(self) -> DecodeShape:
        """The decode planner's shape of this model (decode_plan.shape_from_summary), its KV
        cache buffers left out of the replicated elements."""
        shape = shape_from_summary(self.step_program.summary)
        model = self.step_program.analysis.captured.params
        built = next(c for c in self.caches if c is not None)   # rank=: one rank's only
        cache = sum(model[src].numel() for src in built)
        return dataclasses.replace(shape, replicated_params=shape.replicated_params - cache)

    def simulate_generate(self, prompt: torch.Tensor, valid_prompt: torch.Tensor,
                          new_tokens: int) -> torch.Tensor:
        """Greedy generation on all ranks in this process: prefill `prompt` (B, P) whose real
        tokens `valid_prompt` (B, P) marks, then decode steps; the new tokens (B, new_tokens).
        Every rank must pick the same tokens (they hold the same logits), else HelixError."""
        B, P = prompt.shape
        if P + new_tokens - 1 > self.max_seq:
            raise HelixError(f"simulate_generate: prompt {P} + {new_tokens} new tokens need "
                             f"{P + new_tokens - 1} cache positions, the cache has {self.max_seq}; "
                             f"build the model with max_seq >= {P + new_tokens - 1}")
        valid = torch.ones(B, self.max_seq, dtype=torch.long)
        valid[:, :P] = valid_prompt
        self.reset()
        tok = self._agree(self.prefill(prompt, valid), "prefill")
        out = [tok]
        for t in range(new_tokens - 1):
            tok = self._agree(self.step(tok, torch.tensor([P + t]), valid), f"step {t}")
            out.append(tok)
        return torch.cat(out, dim=1)

    @staticmethod
    def _agree(outs: list, where: str) -> torch.Tensor:
        picks = [o[:, -1].argmax(-1, keepdim=True) for o in outs]
        for r, p in enumerate(picks):
            if not torch.equal(p, picks[0]):
                raise HelixError(f"simulate_generate: at {where} rank {r} picked tokens "
                                 f"{p.flatten().tolist()}, rank 0 {picks[0].flatten().tolist()}")
        return picks[0]


@torch.no_grad()
def replica_model(model: torch.nn.Module, dp: int, index: int) -> torch.nn.Module:
    """Replica `index` of `dp` data-parallel replicas of a static-cache decoder: the same
    weights (shared, not copied) and a cache of cfg.batch / dp rows, rows index * B/dp ... of
    the model's (a replica serves those sequences). Built as type(model)(cfg with that batch),
    as CacheDecoder is, or by the model's own `replica(batch)` where it has one (an adapter
    whose constructor takes more than a cfg: models/hf_static.py); `model` is not written.
    dp = 1: `model` itself."""
    cfg = model.cfg
    if isinstance(dp, bool) or not isinstance(dp, int) or dp < 1 or cfg.batch % dp:
        raise HelixError(f"replica_model: dp={dp!r} replicas of a cache of batch {cfg.batch}; "
                         f"give a dp that divides {cfg.batch}")
    if not 0 <= index < dp:
        raise HelixError(f"replica_model: index={index} is not one of the {dp} replicas")
    if dp == 1:
        return model
    rows = cfg.batch // dp
    own = getattr(model, "replica", None)
    how = (f"{type(model).__name__}.replica({rows})" if callable(own) else
           f"{type(model).__name__}(cfg with batch={rows})")
    try:
        if callable(own):
            replica = own(rows)
        else:   # on meta: every tensor is the model's or a copy of its rows (below), never new
            with torch.device("meta"):
                replica = type(model)(dataclasses.replace(cfg, batch=rows))
    except Exception as e:   # noqa: BLE001 - any constructor failure means: cannot replicate
        raise HelixError(f"dp={dp}: a replica of {type(model).__name__} is built as {how}, which failed "
                         f"({type(e).__name__}: {e}); use dp=1") from None
    theirs = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, t in list(replica.named_parameters(remove_duplicate=False)) \
            + list(replica.named_buffers(remove_duplicate=False)):
        src = theirs.get(name)
        owner, _, attr = name.rpartition(".")
        mod = replica.get_submodule(owner)
        persistent = attr not in mod._non_persistent_buffers_set
        if src is not None and src.shape == t.shape:
            if isinstance(t, torch.nn.Parameter):
                setattr(mod, attr, src)            # the same Parameter: weights are shared
            else:
                mod.register_buffer(attr, src, persistent=persistent)
        elif src is not None and src.dim() and src.shape[0] == cfg.batch \
                and src.shape[1:] == t.shape[1:]:   # a per-sequence buffer: its rows
            mine = src[index * rows:(index + 1) * rows]
            if t.is_meta:
                mod.register_buffer(attr, mine.clone(), persistent=persistent)
            else:   # a buffer the replica's own code holds too (an HF StaticCache): kept
                t.copy_(mine)
        else:
            raise HelixError(f"dp={dp}: {type(model).__name__} tensor {name} has shape "
                             f"{tuple(t.shape)} in a replica of batch {rows} and "
                             f"{tuple(src.shape) if src is not None else 'none'} in the model; "
                             f"only per-sequence buffers (batch first) may differ; use dp=1")
    return replica.eval()


def plan_split(model: torch.nn.Module, devices: int, prompt_len: int, context: int,
               cluster=None, dp: int | None = None):
    """The decode planner's fastest row that compile_decoder builds for `model` (a
    CacheDecoder-style decoder): decode_plan.plan_decode on its captured step's shape (fp32) at
    `context` positions and concurrency = its cache's batch, `dp` replicas (None: any), then in
    the planner's order (TPOT, fewer copies, fewer replicas, smaller s, smaller m) among the
    rows that fit, the first with (m, n) feasible for the model's attention (solver.solve), s at
    most the cache's positions and dp replicas that replica_model builds. Returns (row, plan,
    why the planner's own choice cannot be built, or None)."""
    cfg = model.cfg
    step_args = (torch.zeros(cfg.batch, 1, dtype=torch.long), torch.tensor([prompt_len]),
                 torch.ones(cfg.batch, cfg.max_seq, dtype=torch.long))
    summary = analyze(DecodeStep(model), step_args, dynamic=False).summary
    shape = dataclasses.replace(shape_from_summary(summary, dtype="fp32"), name=type(model).__name__)
    plan = plan_decode(shape, context, cfg.batch, devices, cluster_spec(cluster, devices), dp=dp)
    feasible: dict[int, set] = {}
    replicable: dict[int, str | None] = {1: None}

    def why_not(row) -> str | None:
        if row.s > cfg.max_seq:
            return f"s={row.s} exceeds the cache's {cfg.max_seq} positions"
        ranks = devices // row.dp // row.s
        if ranks not in feasible:
            feasible[ranks] = {(c.m, c.n) for c in solve(summary, ranks) if c.feasible}
        if (row.m, row.n) not in feasible[ranks]:
            return f"m={row.m} x n={row.n} is not a feasible split of the model's attention"
        if row.dp not in replicable:
            try:
                replica_model(model, row.dp, 0)
                replicable[row.dp] = None
            except HelixError as e:
                replicable[row.dp] = str(e)
        return replicable[row.dp]

    order = sorted((r for r in plan.candidates if r.fits),
                   key=lambda r: (r.tpot_ms, r.kv_copies, r.dp, r.s, r.m))
    row = next((r for r in order if why_not(r) is None), None)
    if row is None:
        raise HelixError(f"none of the decode planner's splits of {devices} devices can be "
                         f"built for {shape.name} ({why_not(plan.chosen)} for the planner's "
                         f"{plan.chosen.name}); give the split (helix generate --plan S,M,N "
                         f"[--dp K], compile_decoder(split=(s, m, n))) or other devices")
    return row, plan, why_not(plan.chosen)


def check_partitioned(prog: HelixProgram, what: str) -> None:
    """A decode program whose attention or cache write runs replicated is refused."""
    if prog.unpartitioned:
        core = prog.unpartitioned[0]
        raise HelixError(f"{what}: attention core {core.node} ({core.op}) cannot be partitioned: "
                         f"{core.reason}; Helix shards a KV cache written by index_copy_(cache, dim, "
                         f"cache_position, new) (models/decoder_cache.py)")
    if not prog.plan.sites:
        raise HelixError(f"{what}: no attention site found, so the KV cache would be replicated on "
                         f"every rank; write the cache with index_copy_ at cache_position")
    for name, op in prog.replicated_ops:
        if "index_copy" in str(op) or "index_put" in str(op):
            raise HelixError(f"{what}: cache write {name} ({op}) would run replicated on every rank; "
                             f"its new rows are split along the cache's position dim or the cache is "
                             f"not a buffer")


# the command-line spelling of compile_decoder's split_kv_core (helix generate, the benchmarks)
SPLIT_KV_CORE = {"auto": None, "on": True, "off": False}


def compile_decoder(model: torch.nn.Module, devices: int, split: tuple[int, ...] | None = None, *,
                    variant: str | None = None, prompt_len: int = 4,
                    rank: int | None = None, fuse_chunk_core: bool = True,
                    split_kv_core: bool | None = None,
                    fuse_projections: bool = True) -> DecodeProgram:
    """Prefill and decode-step programs of `model` (a CacheDecoder: `prefill(tokens, valid)`,
    `decode_step(token, cache_position, valid)`, cache buffers (B, H_kv, S_max, d)) for `devices`
    ranks, forced to `split` = (m, n) or (s, m, n) (s chunks of the cache's positions, each
    rank's attention combined exactly over its s-group: passes/seq_split.py), or, when None,
    the decode planner's fastest (s, m, n) of one replica that can be built (`plan_split` at
    the cache's max_seq positions; its m > 1 variant unless `variant` is given). Each rank's
    cache slices start as
    copies of the model's buffers' slices; the model itself is never written. With `rank`
    (one torchrun process: helix_compiler/cli/generate.py) only that rank's module pair and cache
    slices are built; every other rank's entries are None, so only run that rank's modules.
    s > 1 with chunks of equal size: each plain chunk core runs as helix.chunk_attention (a fused
    kernel on CUDA) combined by its lse (passes/seq_split.py); `fuse_chunk_core=False` keeps
    the explicit core everywhere (CombineSite.kernel says which each core runs). s = 1 with
    `split_kv_core=True`: each SDPA core of the step that reads the cache with its one query
    position runs as helix.chunk_attention over the whole cache (passes/decode_core.py;
    `core_notes` says which each core runs); None (the default): only the cores of the shape
    where that was measured faster on an H200 (at least 2 query heads per kv head, at most 2
    sequences a rank: decode_core.AUTO_*), the others kept with the reason; False: none.
    `fuse_projections` (on by default): each group of projections that read one input (q, k,
    v; gate, up) runs as one GEMM over their weights side by side (passes/fuse_linears.py),
    in both modules, which share the fused weights where they shared the parts; `fuse_notes`
    lists the groups of the step."""
    s = 1
    if split is None:
        row, _, _ = plan_split(model, devices, prompt_len, model.cfg.max_seq, dp=1)
        split = (row.s, row.m, row.n)
        if variant is None and row.m > 1:
            variant = row.variant
    if len(split) == 3:
        s, *split = split
        split = tuple(split)
    if s * split[0] * split[1] != devices:
        raise HelixError(f"compile_decoder: split s={s} x m={split[0]} x n={split[1]} = "
                         f"{s * split[0] * split[1]} ranks, but devices={devices}; pass a split whose "
                         f"product is {devices}")
    if rank is not None and not 0 <= rank < devices:
        raise HelixError(f"compile_decoder: rank={rank} is not one of the {devices} ranks; pass "
                         f"0 <= rank < {devices} (torch.distributed.get_rank())")
    cfg = model.cfg
    B, S = cfg.batch, cfg.max_seq
    valid = torch.ones(B, S, dtype=torch.long)
    tokens = torch.zeros(B, prompt_len, dtype=torch.long)
    step_args = (tokens[:, :1], torch.tensor([prompt_len]), valid)
    bounds = chunk_bounds(S, s)
    # the decode step: one token per row at a position after the example prompt
    step = helix_compile(DecodeStep(model), devices=devices // s, plan=split, variant=variant,
                         example_inputs=step_args, dynamic=False)
    check_partitioned(step, "decode step")
    pre = helix_compile(Prefill(model), devices=devices // s, plan=(step.plan.m, step.plan.n),
                        variant=variant, example_inputs=(tokens, valid), dynamic=False)
    check_partitioned(pre, "prefill")
    modules, caches, notes, folds, core_notes, fuse_notes = [], [], (), (), (), ()
    fused: dict = {}                                # member tensors' ids -> fused weight

    def fuse(pair):
        nonlocal fuse_notes
        if not fuse_projections:
            return pair
        (p_m, _), (s_m, sites) = (fuse_linears(pair[0], (tokens, valid), fused),
                                  fuse_linears(pair[1], step_args, fused))
        fuse_notes = fuse_notes or tuple(str(site) for site in sites)
        return p_m, s_m

    for r in range(step.mesh.size):
        if rank is not None and rank // s != r:     # not this process's (i, j)
            modules += [None] * s
            caches += [None] * s
            continue
        p_gm, s_gm = pre.rank_module(r), step.rank_module(r)
        p_sh, s_sh = pre.rank_shards(r), step.rank_shards(r)
        p_w, s_w = cache_writes(p_gm), cache_writes(s_gm)
        by_source = {p_sh[a][0]: a for a in p_w}
        pairs = {}                                  # stored buffer name -> (prefill attr, step attr)
        for attr in s_w:
            source, sels = s_sh[attr][0], s_sh[attr][1]
            p_attr = by_source.get(source)
            if p_attr is None or not _same_sels(p_sh[p_attr][1], sels):
                raise HelixError(f"rank {r}: cache buffer {source} is sliced differently in the prefill "
                                 f"program ({p_sh[p_attr][1] if p_attr else 'not written'}) than in the "
                                 f"decode step ({sels}); both programs must use one split")
            pairs[source] = (p_attr, attr)
        if not pairs:
            raise HelixError("compile_decoder: the decode step writes no cache buffer (no index_copy_ "
                             "into a buffer); this is not a static-KV-cache decoder")
        share_weights(p_gm, s_gm, p_sh, s_sh, skip=set(s_w))
        if s == 1:
            for p_attr, attr in pairs.values():
                s_gm.register_buffer(attr, getattr(p_gm, p_attr))   # the step's slice is the prefill's
            if split_kv_core is not False:   # one query position per core: keys over the SMs
                s_gm, sites = split_kv_cores(s_gm, step_args, auto=split_kv_core is None)
                core_notes = core_notes or tuple(f"step {site}" for site in sites)
            caches.append({src: getattr(p_gm, pa) for src, (pa, _) in pairs.items()})
            modules.append(fuse((p_gm, s_gm)))
            continue
        m_, n_ = step.plan.m, step.plan.n
        mesh = Mesh(n=n_, m=m_, s=s)
        # fused cores over the cache (HF's SDPA) written out, so that seq_split combines them
        p_core, s_core = explicit_cache_cores(p_gm, (tokens, valid)), explicit_cache_cores(s_gm, step_args)
        for k, (start, end) in enumerate(bounds):   # rank (i m + j) s + k holds chunk k
            if rank is not None and r * s + k != rank:
                modules.append(None)
                caches.append(None)
                continue
            chunk = {src: getattr(s_gm, a).narrow(s_w[a].args[1], start, end - start).clone()
                     for src, (_, a) in pairs.items()}
            # attention (q/k/v/o) replicated over the s-group, the MLPs over all N ranks
            p_k = split_sequence(p_core, (tokens, valid), k, mesh,
                                 {pa: chunk[src] for src, (pa, _) in pairs.items()}, fuse_chunk_core)
            s_k = split_sequence(s_core, step_args, k, mesh,
                                 {a: chunk[src] for src, (_, a) in pairs.items()}, fuse_chunk_core)
            # GQA: the chunk core's matmuls read the cache un-repeated (after the split, whose
            # combine matches softmax(scores) @ v and sizes repeat_kv's views to the chunk)
            p_k, p_fold = fold_gqa(p_k, (tokens, valid), {pa for pa, _ in pairs.values()})
            s_k, s_fold = fold_gqa(s_k, step_args, {a for _, a in pairs.values()})
            notes = notes or combine_notes(p_k, s_k)
            folds = folds or tuple(f"{what} {site}" for what, sites in (("prefill", p_fold), ("step", s_fold))
                                   for site in sites)
            sliced: dict = {}                       # the MLP slices, shared by both modules
            modules.append(fuse((mlp_over_mesh(p_k, mlp_attrs(pre.analysis.mlps, p_sh), k, s, m_, n_,
                                               sliced),
                                 mlp_over_mesh(s_k, mlp_attrs(step.analysis.mlps, s_sh), k, s, m_, n_,
                                               sliced))))
            caches.append(chunk)
    return DecodeProgram(prefill_program=pre, step_program=step,
                         mesh=Mesh(n=step.plan.n, m=step.plan.m, s=s), modules=tuple(modules),
                         caches=tuple(caches), max_seq=S, combine_notes=notes,
                         fold_notes=folds, core_notes=core_notes, fuse_notes=fuse_notes)


def share_weights(prefill: torch.fx.GraphModule, step: torch.fx.GraphModule, p_sh: dict, s_sh: dict,
                  skip: set) -> int:
    """Each tensor of `step` (attributes in `skip` left out: its cache writes) that holds the
    same slice of the same model tensor as one of `prefill`'s becomes that tensor, so that a
    rank holds its weights once, not once per program. Returns how many were shared."""
    by_source: dict = {}
    for attr, (source, sels, perm) in p_sh.items():
        by_source.setdefault(source, []).append((attr, sels, perm))
    shared = 0
    for attr, (source, sels, perm) in s_sh.items():
        if attr in skip:
            continue
        for p_attr, p_sels, p_perm in by_source.get(source, ()):
            mine, theirs = getattr(step, attr, None), getattr(prefill, p_attr, None)
            if (isinstance(mine, torch.Tensor) and isinstance(theirs, torch.Tensor)
                    and mine is not theirs and perm == p_perm and _same_sels(sels, p_sels)
                    and mine.shape == theirs.shape and mine.dtype == theirs.dtype):
                owner, _, leaf = attr.rpartition(".")
                (step.get_submodule(owner) if owner else step).register_buffer(leaf, theirs)
                shared += 1
                break
    return shared


def combine_notes(prefill: torch.fx.GraphModule, step: torch.fx.GraphModule) -> tuple[str, ...]:
    """One line per attention core of a rank's s > 1 prefill and step modules: its combine's
    form (folded into the output projection's all-reduce over the mesh, or one more all-reduce
    over "seq", and why)."""
    return tuple(f"{what} {site}" for what, gm in (("prefill", prefill), ("step", step))
                 for site in gm.meta["seq_combine"])


def _same_sels(a, b) -> bool:
    return len(a) == len(b) and all(da == db and (ia == ib).all() for (da, ia), (db, ib) in zip(a, b))
