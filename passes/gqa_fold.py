"""gqa_fold: an explicit attention core over a GQA cache reads the cache un-repeated (one job:
no (B, H, C, d) copy of the cache per step; docs/decode.md, "The sequence split s").

With GQA, Hugging Face's `repeat_kv` (and Helix's models, SDPA's `enable_gqa` written out by
passes/explicit_cache_cores.py) repeats each kv head g = H / H_kv times before the core:

    K (B, H_kv, C, d) -> unsqueeze(2) -> expand (B, H_kv, g, C, d) -> reshape (B, H, C, d)
    K (B, H_kv, C, d) -> repeat_interleave(g, dim=1)                  -> (B, H, C, d)

so query head h reads kv head h // g, and an explicit core (seq_split's chunk core: its
scores are written to memory) materializes g copies of its K and V every step. Each matmul
that reads such a repeat (`A @ R` or `A @ R^T`, A (B, H, T, X)) is folded: the group goes
into A's row count instead,

    A (B, H, T, X) -> reshape (B, H_kv, g T, X) ;  A' @ K (or K^T) -> (B, H_kv, g T, Y)
                   -> view (B, H, T, Y)

row (kv, j T + t) of A' is row (kv g + j, t) of A: the same products and the same sums per
element, no copy of K or V (a decode step's A, T = 1, is reshaped as a view; the repeat,
then unused, is dropped). A repeat of any other order (a size-g dim inserted elsewhere, e.g.
head h reading kv head h % H_kv; `repeat`) is left as it is: exact, one copy per step.

Run by compile_decoder on each rank module of an s > 1 program, after passes/seq_split.py:
its combine matches softmax(scores) @ v and narrows the repeat's literal S_max to the chunk's
C, so this pass sees the chunk's core (the scores q @ K^T and the chunk's o_k = e_k @ V) with
C in its sizes and leaves seq_split's own matching as it is. An s = 1 program keeps SDPA (a
fused kernel reads the cache un-repeated itself) and never runs it.

Each core (its values matmul, whose left side is computed from the cache) is recorded with
its scores matmuls as a `FoldSite` in the module's meta["gqa_fold"]: "folded" (every repeat
it read is folded), "unfolded" (a repeat it reads is not repeat_kv's order, or an operand's
shape does not fit; why) or "direct" (no repeat: MHA, g = 1). DecodeProgram.fold_notes.

Invariant: the returned module computes what `gm` computed, call after call (it shares
`gm`'s buffers; `gm` itself is left as it is).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from helix_compiler.errors import HelixError
from helix_compiler.runtime import chunk_core as _cc  # noqa: F401  (registers helix.chunk_attention)
from helix_compiler.runtime import collectives as _c  # noqa: F401  (registers torch.ops.helix)

from .graph_utils import MOVEMENT_OPS, aten, norm_dim, shared_copy

__all__ = ["FoldSite", "REPEATS", "Repeat", "fold_gqa", "repeat_of", "repeat_source"]

# ops that copy a tensor's elements along a dim (a repeat that is not a view)
_COPIES = {aten.expand.default, aten.repeat.default, aten.repeat_interleave.self_int,
           aten.broadcast_to.default}


@dataclass(frozen=True, slots=True, kw_only=True)
class Repeat:
    """K (B, H_kv, X, Y) with each kv head repeated g times, head h reading kv head h // g;
    `kv` = (lo, hi): the repeat reads K's kv heads [lo, hi) only (a rank's slice of the
    repeated heads, n > H_kv: `_sliced_repeat`), None: all of them."""

    source: fx.Node
    g: int
    kv: tuple[int, int] | None = None


def repeat_source(graph: fx.Graph, rep: Repeat, before: fx.Node) -> fx.Node:
    """The K a folded core reads for `rep`: its source, or the source's kv heads [lo, hi) (a
    view, made before `before`)."""
    if rep.kv is None:
        return rep.source
    with graph.inserting_before(before):
        return graph.call_function(aten.slice.Tensor, (rep.source, 1, *rep.kv))


@dataclass(frozen=True, slots=True, kw_only=True)
class FoldSite:
    """One explicit core over the cache: whether its matmuls read the cache un-repeated."""

    core: str            # the core's values matmul (softmax(scores) @ v, or seq_split's o_k)
    form: str            # "folded" | "unfolded" | "direct"
    detail: str

    def __post_init__(self) -> None:
        if self.form not in ("folded", "unfolded", "direct"):
            raise HelixError(f"FoldSite {self.core}: form {self.form!r}; expected 'folded', "
                             f"'unfolded' or 'direct'")

    def __str__(self) -> str:
        return f"{self.core}: {self.form} ({self.detail})"


def _shape(node) -> tuple | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(int(x) for x in v.shape) if isinstance(v, torch.Tensor) else None


def _repeat_kv(node):
    # HF's repeat_kv (transformers models/llama/modeling_llama.py, and every model that copies
    # it): hidden[:, :, None, :, :].expand(B, H_kv, g, S, d).reshape(B, H_kv * g, S, d)
    e = node.args[0]
    if not (isinstance(e, fx.Node) and e.target in (aten.expand.default, aten.broadcast_to.default)):
        return None
    u, out, five = e.args[0], _shape(node), _shape(e)
    if not (isinstance(u, fx.Node) and out and five and len(five) == 5 and len(out) == 4):
        return None
    if u.target is not aten.unsqueeze.default or norm_dim(u.args[1], 5) != 2:
        return (f"{e.name} expands {u.name} ({u.target}) to {list(five)}: the size-g dim is not "
                f"inserted right after H_kv (dim 2 of an unsqueeze)")
    k = _shape(u.args[0])
    if k is None or len(k) != 4 or five != (k[0], k[1], five[2], k[2], k[3]) \
            or out != (k[0], k[1] * five[2], k[2], k[3]):
        return (f"{e.name} / {node.name} take {k} through {list(five)} to {list(out or ())}: not "
                f"(B, H_kv, X, Y) -> (B, H_kv, g, X, Y) -> (B, H_kv g, X, Y)")
    return Repeat(source=u.args[0], g=five[2])


def _repeat_interleave(node):
    # torch.repeat_interleave(k, g, dim=1): Helix's models (models/decoder_cache.py) and SDPA's
    # enable_gqa as passes/explicit_cache_cores.py writes it out
    k, out = node.args[0], _shape(node)
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    ks = _shape(k)
    if ks is None or out is None or len(ks) != 4 or dim is None:
        return None
    if norm_dim(dim, 4) != 1:
        return f"{node.name} repeats dim {dim} of {list(ks)}, not the heads (dim 1)"
    return Repeat(source=k, g=int(node.args[1]))


def repeat_of(node):
    """The REPEATS rule's answer for `node`: a Repeat, a str (a repeat in another order: why),
    or None (not a repeat, or not an op)."""
    rule = REPEATS.get(node.target) if isinstance(node, fx.Node) and node.op == "call_function" \
        else None
    return rule(node) if rule else None


def _sliced_repeat(node):
    # a rank's slice [a, b) of the repeated heads (the shard pass, n > H_kv: H / n query heads
    # of one kv head, copied): repeat_kv's order holds for the heads the slice keeps, which read
    # one kv head (g' = b - a of its copies) or whole groups of g
    x = node.args[0]
    rep = repeat_of(x)
    if not isinstance(rep, Repeat) or rep.kv is not None:
        return None if not isinstance(rep, str) else rep
    ks, out = _shape(rep.source), _shape(node)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    step = node.args[4] if len(node.args) > 4 else node.kwargs.get("step", 1)
    if ks is None or out is None or len(ks) != 4 or norm_dim(dim, 4) != 1 or step != 1:
        return None
    H = ks[1] * rep.g
    a = node.args[2] if len(node.args) > 2 else node.kwargs.get("start", 0)
    a = 0 if a is None else (a + H if a < 0 else a)
    b = min(H, a + out[1])
    g = rep.g
    if a // g == (b - 1) // g:              # heads of one kv head
        kv, g2 = (a // g, a // g + 1), b - a
    elif a % g == 0 and b % g == 0:         # whole groups
        kv, g2 = (a // g, b // g), g
    else:
        return (f"{node.name} keeps heads [{a}, {b}) of {x.name}, a repeat of g={g}: parts of "
                f"two kv heads' groups")
    return Repeat(source=rep.source, g=g2, kv=None if kv == (0, ks[1]) else kv)


# op -> rule: Repeat (a repeat in repeat_kv's order), a str (a repeat in another order: why
# it is not folded), or None (not a repeat)
REPEATS = {
    aten.reshape.default: _repeat_kv,
    aten.view.default: _repeat_kv,
    aten._unsafe_view.default: _repeat_kv,
    aten.repeat_interleave.self_int: _repeat_interleave,
    aten.slice.Tensor: _sliced_repeat,
}


def _is_t(node) -> bool:
    return isinstance(node, fx.Node) and node.target is aten.transpose.int \
        and {norm_dim(d, 4) for d in node.args[1:3]} == {2, 3} and len(_shape(node) or ()) == 4


def _repeat_of(rhs: fx.Node):
    """(the repeat rule's answer, transposed) for a matmul's right side: R or R^T."""
    transposed = _is_t(rhs)
    return repeat_of(rhs.args[0] if transposed else rhs), transposed


def _copies_on_way(node: fx.Node, reads: dict) -> tuple[list, list]:
    """(repeat-like ops: expand, repeat; the ops other than views) on the way from the cache
    to `node`."""
    copies, others, todo, seen = [], [], [node], set()
    while todo:
        x = todo.pop()
        if x in seen or x not in reads or x.op != "call_function":
            continue
        seen.add(x)
        if x.target in _COPIES:
            copies.append(x.name)
        elif x.target not in MOVEMENT_OPS and x.target not in _WRITES:
            others.append(x.name)
        todo.append(x.args[0])
    return copies, others


def _fold(graph: fx.Graph, mm: fx.Node, rep: Repeat, transposed: bool) -> fx.Node | str:
    """`mm` = A @ repeat(K) (or ^T) as reshape(A) @ K viewed back: the node now computing
    it, or why not."""
    a, ks = mm.args[0], _shape(rep.source)
    sa, so = _shape(a), _shape(mm)
    Bk, Hkv = ks[0], (ks[1] if rep.kv is None else rep.kv[1] - rep.kv[0])
    if sa is None or so is None or len(sa) != 4 or sa[0] != Bk or sa[1] != Hkv * rep.g:
        return (f"{mm.name}'s left side {a.name} has shape {sa}, not (B={Bk}, H={Hkv * rep.g}, T, X)")
    B, H, T, X = sa
    with graph.inserting_before(mm):
        # g = 1 (repeat_interleave(k, 1): a copy of the cache, no more): K itself, no views
        a2 = a if rep.g == 1 else graph.call_function(
            aten.reshape.default, (a, [B, Hkv, rep.g * T, X]))                          # (B, H_kv, g T, X)
        k = repeat_source(graph, rep, mm)
        if transposed:
            k = graph.call_function(aten.transpose.int, (k, -2, -1))
        o = o2 = graph.call_function(mm.target, (a2, k))                                # (B, H_kv, g T, Y)
        if rep.g > 1:
            o = graph.call_function(aten.view.default, (o2, [B, H, T, so[-1]]))           # (B, H, T, Y)
    mm.replace_all_uses_with(o)
    graph.erase_node(mm)
    return o


# ops whose first argument's elements they pass on (a view, a copy, a write into it): the
# cache's K / V on their way to a matmul
# (a gather of K's d slices: m > 1 prefill, qk-gather)
_WRITES = {aten.copy_.default, aten.index_copy_.default, aten.index_copy.default}
_KV_PATH = MOVEMENT_OPS | _COPIES | _WRITES | {aten.clone.default, aten.contiguous.default,
                                               torch.ops.helix.all_gather.default}


def _kv_path(graph: fx.Graph, caches: set) -> dict:
    """The cache buffers and every view, repeat or write of them (through their first
    argument), each with whether it holds K^T: its last two dims swapped an odd number of
    times from the cache's (B, H_kv, S_max, d) (compile_decoder's layout)."""
    seen = {}
    for node in graph.nodes:
        if node.op == "get_attr" and str(node.target) in caches:
            seen[node] = False
        elif node.op == "call_function" and node.target in _KV_PATH and node.args \
                and node.args[0] in seen:
            seen[node] = seen[node.args[0]] ^ _is_t(node)
    return seen


def _matmuls_before(node: fx.Node) -> set:
    """The matmuls `node` is computed from, not looking past a matmul."""
    seen, out, todo = set(), set(), [node]
    while todo:
        x = todo.pop()
        if x in seen:
            continue
        seen.add(x)
        if x.target is aten.matmul.default:
            out.add(x)
        else:
            todo.extend(x.all_input_nodes)
    return out


_CHUNK_OP = torch.ops.helix.chunk_attention.default


def _fold_chunk_op(op: fx.Node) -> FoldSite:
    """seq_split's fused chunk core helix.chunk_attention(q, K, V, bias, scale) over a
    repeat_kv'd K and V: given K and V themselves (the op folds the g query heads of a kv head
    into its rows; H a multiple of H_kv)."""
    k, v = op.args[1], op.args[2]
    reps = [repeat_of(x) for x in (k, v)]
    if all(isinstance(r, Repeat) for r in reps) and reps[0].g == reps[1].g \
            and reps[0].kv == reps[1].kv:
        op.update_arg(1, repeat_source(op.graph, reps[0], op))
        op.update_arg(2, repeat_source(op.graph, reps[1], op))
        return FoldSite(core=op.name, form="folded", detail=(
            f"K and V read un-repeated, g={reps[0].g} query heads per kv head in the rows of "
            f"{op.name} (helix.chunk_attention)"))
    if all(r is None for r in reps):
        return FoldSite(core=op.name, form="direct", detail="no repeat of the cache (g = 1)")
    why = []
    for x, r in zip((k, v), reps):
        if isinstance(r, str):
            why.append(f"{x.name}: {r}")
        elif r is None:
            why.append(f"{x.name}: not a repeat (repeat_kv's expand + reshape, repeat_interleave), "
                       f"where the other is one")
        else:
            why.append(f"{x.name}: repeated g={r.g}")
    return FoldSite(core=op.name, form="unfolded", detail="; ".join(why))


def fold_gqa(gm: fx.GraphModule, args: tuple, caches) -> tuple[fx.GraphModule, tuple[FoldSite, ...]]:
    """(`gm` with every matmul of an explicit core that reads a repeat_kv'd cache folded, a new
    module sharing `gm`'s buffers and meta; each core's `FoldSite`, also in its
    meta["gqa_fold"]). `caches`: the attribute names of the module's KV cache buffers; `args`:
    example inputs, for the shapes."""
    out = shared_copy(gm, args)                                 # gm's attributes, shared
    graph = out.graph
    reads = _kv_path(graph, set(caches))
    # the matmuls that read the cache: a core's scores q @ K^T, and its values
    # softmax(scores) @ V (seq_split's e_k @ V), computed from those scores
    mms = [n for n in graph.nodes if n.op == "call_function" and n.target is aten.matmul.default
           and n.args[1] in reads]
    scores = {n for n in mms if reads[n.args[1]]}
    cores = {v: [v] + [x for x in _matmuls_before(v.args[0]) if x in scores]
             for v in mms if v not in scores}
    names = {mm: mm.name for mm in mms}
    state: dict[fx.Node, tuple[str, str]] = {}                     # matmul -> (form, why)
    for mm in mms:
        rep, transposed = _repeat_of(mm.args[1])
        if isinstance(rep, Repeat):
            done = _fold(graph, mm, rep, transposed)
            if isinstance(done, str):
                state[mm] = ("unfolded", done)
            else:
                state[mm] = ("folded", f"{rep.g}")
                names[mm] = done.name
        elif isinstance(rep, str):
            state[mm] = ("unfolded", f"{names[mm]}: {rep}")
        else:
            copies, others = _copies_on_way(mm.args[1], reads)
            how = (f"through {', '.join(others)}, which the fold does not look past" if others
                   else "that is not repeat_kv's expand + reshape or repeat_interleave")
            state[mm] = ("unfolded", f"{names[mm]}: reads a repeat of the cache "
                                     f"({', '.join(copies)}) {how}") if copies else ("direct", "")
    sites = [_fold_chunk_op(op) for op in list(graph.nodes)
             if op.target is _CHUNK_OP and op.args[1] in reads]
    for v, mine in cores.items():
        forms = [state[x] for x in mine]
        if all(f == "folded" for f, _ in forms):
            sites.append(FoldSite(core=names[v], form="folded", detail=(
                f"K and V read un-repeated, g={forms[0][1]} query heads per kv head in the rows "
                f"of {', '.join(names[x] for x in mine[1:] + mine[:1])}")))
        elif all(f == "direct" for f, _ in forms):
            sites.append(FoldSite(core=names[v], form="direct", detail="no repeat of the cache (g = 1)"))
        else:
            sites.append(FoldSite(core=names[v], form="unfolded", detail="; ".join(
                w for f, w in forms if f == "unfolded") or "K or V is not repeated as the other"))
    graph.eliminate_dead_code()
    graph.lint()
    out.recompile()
    out.meta["gqa_fold"] = tuple(sites)
    return out, tuple(sites)
