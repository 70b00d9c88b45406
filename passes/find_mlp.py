"""find_mlp: Linear -> elementwise -> Linear pairs (gated variants too) outside attention.

From every projection that is not part of an attention site, walk forward
through elementwise ops and views; if the region closes on exactly one other
projection (every user of the region is inside it or that projection), the
pair is an MLP: the first projection(s) column-sharded, the second row-sharded.
A gated MLP (SwiGLU) has two projections entering one region.

Invariant: the graph is not modified; an MlpSite names nodes of it.
"""

from __future__ import annotations

import torch.fx as fx

from helix_compiler.planning.sites import MlpSite

from .graph_utils import (example_size, is_projection, proj_input, proj_out_features,
                          proj_weight_node, real_users, shape)
from .shard_rules import POINTWISE

REGION_OPS = set(POINTWISE) | {
    __import__("torch").ops.aten.view.default, __import__("torch").ops.aten.reshape.default,
    __import__("torch").ops.aten._unsafe_view.default,
}


def _region(start: fx.Node, excluded: set) -> tuple[set, set] | None:
    """(region nodes, projections consuming the region), or None when the region leaks."""
    region, sinks, stack = set(), set(), [start]
    while stack:
        node = stack.pop()
        for u in real_users(node):
            if is_projection(u) and u not in excluded and proj_input(u) is node:
                sinks.add(u)
            elif u.target in REGION_OPS:
                if u not in region:
                    region.add(u)
                    stack.append(u)
            else:
                return None
    return region, sinks


def find_mlp(gm: fx.GraphModule, site_projections: set) -> list[MlpSite]:
    pairs: dict = {}
    for node in gm.graph.nodes:
        if not is_projection(node) or node in site_projections:
            continue
        got = _region(node, site_projections)
        if got is None:
            continue
        region, sinks = got
        if len(sinks) != 1:
            continue
        (down,) = sinks
        if down is node:
            continue
        pairs.setdefault(down, []).append(node)
    out, used = [], set()
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    # a projection is in at most one pair: in Linear -> Linear -> Linear the first two pair up
    for down, ups in sorted(pairs.items(), key=lambda kv: order[kv[0]]):
        if down in used or any(u in used for u in ups):
            continue
        ups = sorted(ups, key=order.__getitem__)     # graph order
        F = proj_out_features(ups[0])
        if any(proj_out_features(u) != F for u in ups):
            continue
        used |= {down, *ups}
        tokens = 1
        for s in shape(ups[0])[:-1]:
            tokens *= example_size(s)
        out.append(MlpSite(
            index=len(out), up=tuple(u.name for u in ups), down=down.name,
            up_weights=tuple(str(proj_weight_node(u).target) for u in ups),
            down_weight=str(proj_weight_node(down).target), hidden=int(shape(proj_input(ups[0]))[-1]),
            ffn=int(F), gated=len(ups) > 1, tokens=tokens,
            dtype=str(ups[0].meta["val"].dtype).replace("torch.", "")))
    return out
