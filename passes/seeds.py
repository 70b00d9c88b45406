"""seeds: which output features of each column-sharded projection a rank computes.

Rank (i, j) owns query heads H_i = [i*H/n, (i+1)*H/n) and, inside each head,
the dims D_j (DESIGN.md section 2).  D_j keeps rotary pairs whole: for
rotate-half rotary over r dims, D_j = T_j + (T_j + r/2) + (r + P_j) with T_j
the j-th block of [0, r/2) and P_j the j-th block of the d - r unrotated dims;
for interleaved rotary and no rotary it is the j-th contiguous block.  Scores
are invariant under one permutation of the head dims shared by q and k, so any
such D_j is exact.  Key/value heads follow their query heads (repeated over
groups when n > H_kv); value dims are split in contiguous blocks.

Invariant: the union over j of D_j is [0, d) and the D_j are disjoint; every
rank's feature list is sorted, so local tensors keep the global layout order.
"""

from __future__ import annotations

import numpy as np

from helix_compiler.errors import ShardingError
from helix_compiler.runtime.mesh import Mesh
from helix_compiler.planning.sites import MlpSite

from .find_attention import SiteMatch


def head_dims(d: int, m: int, j: int, rotary) -> np.ndarray:
    """D_j: the head dims slice j owns (whole rotary pairs)."""
    if rotary is None:
        return np.arange(j * d // m, (j + 1) * d // m)
    r = rotary.dims
    rest = np.arange(r + j * (d - r) // m, r + (j + 1) * (d - r) // m)
    if rotary.style == "interleaved":
        return np.concatenate([np.arange(j * r // m, (j + 1) * r // m), rest])
    half = r // 2
    t = np.arange(j * half // m, (j + 1) * half // m)
    return np.concatenate([t, t + half, rest])


def site_seeds(match: SiteMatch, mesh: Mesh) -> dict:
    """projection node name -> per-rank sorted feature lists."""
    s = match.site
    H, d, n, m = s.num_heads, s.head_dim, mesh.n, mesh.m
    dv = match.v_groups.shape[1]
    if H % n or d % m or dv % m:
        raise ShardingError(f"attention site {s.index}: H={H}, d={d} cannot be split into n={n} head "
                            f"groups of m={m} dim slices; choose a feasible (m, n)")
    if s.k_shared_dims and m > 1:
        raise ShardingError(f"attention site {s.index}: {s.k_shared_dims} of the d={d} key dims come from "
                            f"{s.k_shared_proj}, shared by all heads (MLA); Helix splits such a site's "
                            f"heads only: choose m = 1")
    if s.rotary is not None:
        r = s.rotary.dims
        unit = r // 2 if s.rotary.style == "half" else r
        if unit % m or (d - r) % m or (s.rotary.style == "interleaved" and (r // m) % 2):
            raise ShardingError(f"attention site {s.index}: rotary over {r} of {d} dims cannot give "
                                f"each of m={m} slices whole rotary pairs; choose a smaller m")
    per_proj: dict = {}
    for rank in range(mesh.size):
        i, j = mesh.coords(rank)
        heads = np.arange(i * H // n, (i + 1) * H // n)
        dims = head_dims(d, m, j, s.rotary)
        # v's dims are free (the output projection follows whatever a rank holds), but a
        # projection fused with q/k must give every head the same dims to stay a product
        fused_v = match.v.proj is match.q.proj or match.v.proj is match.k.proj
        vdims = dims if fused_v and dv == d else np.arange(j * dv // m, (j + 1) * dv // m)
        kv = sorted({match.kv_of_q[h] for h in heads})
        # dims of k from a projection all heads share (MLA's rope key) are not seeded: every
        # rank runs that projection whole and its expand to H heads is sliced to the rank's
        kdims = np.setdiff1d(dims, match.k.shared_dims)
        feats = [
            (match.q.proj, match.q.heads[np.ix_(heads, dims)].reshape(-1)),
            (match.k.proj, match.k_groups[np.ix_(kv, kdims)].reshape(-1)),
            (match.v.proj, match.v_groups[np.ix_(kv, vdims)].reshape(-1)),
        ]
        if match.gate is not None:  # an output gate: the features gating the rank's outputs
            feats.append((match.gate_proj, match.gate[np.ix_(heads, vdims)].reshape(-1)))
        for proj, fs in feats:  # one fused projection may serve all three
            per_proj.setdefault(proj.name, [[] for _ in range(mesh.size)])
            per_proj[proj.name][rank].append(np.asarray(fs, dtype=np.int64))
    # sorted distinct features per rank (np.unique sorts)
    return {name: tuple(np.unique(np.concatenate(x)) for x in lists)
            for name, lists in per_proj.items()}


def _arr(a) -> tuple | None:
    return None if a is None else (a.shape, str(a.dtype), np.ascontiguousarray(a).tobytes())


def _seed_key(match: SiteMatch) -> tuple:
    """What site_seeds reads of a match, less node names: equal for the sites of a repeated
    layer (helix_compiler/repeat.py copies one layer 78 times in a LLaMA-70B)."""
    s = match.site
    projs = [match.q.proj, match.k.proj, match.v.proj] + ([match.gate_proj] if match.gate is not None else [])
    return (s.num_heads, s.head_dim, s.k_shared_dims,
            s.k_shared_proj is not None, s.rotary,
            tuple(projs.index(p) for p in projs),   # which projections are one fused node
            _arr(match.q.heads), _arr(match.k_groups), _arr(match.v_groups), tuple(match.kv_of_q),
            tuple(match.k.shared_dims), _arr(match.gate))


def all_seeds(matches, mlps, mesh: Mesh) -> dict:
    """site_seeds and mlp_seeds of every site, each distinct site computed once: a site whose
    match has the same head structure as one done before (`_seed_key`) gets that one's
    feature lists under its own projection names (the arrays are shared, never written)."""
    done: dict = {}
    seeds: dict = {}
    for match in matches:
        key = _seed_key(match)
        projs = [match.q.proj, match.k.proj, match.v.proj] + (
            [match.gate_proj] if match.gate is not None else [])
        if key not in done:
            done[key] = ([p.name for p in projs], site_seeds(match, mesh))
        names, got = done[key]
        rename = dict(zip(names, (p.name for p in projs)))
        seeds.update({rename[k]: v for k, v in got.items()})
    blocks: dict = {}
    for mlp in mlps:
        if mlp.ffn not in blocks:
            blocks[mlp.ffn] = mlp_seeds(mlp, mesh)[mlp.up[0]]
        seeds.update({name: blocks[mlp.ffn] for name in mlp.up})
    return seeds


def mlp_seeds(mlp: MlpSite, mesh: Mesh) -> dict:
    """Each up projection's F features in N nearly equal contiguous blocks."""
    blocks = tuple(np.asarray(b, dtype=np.int64) for b in np.array_split(np.arange(mlp.ffn), mesh.size))
    return {name: blocks for name in mlp.up}
