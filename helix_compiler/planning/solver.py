r"""Which (m, n) splits of N devices can run a model exactly, and why not.

Problem. Given N devices and attention sites s = (H_s, H_kv_s, d_s, rotary_s),
find every pair (m, n) of positive integers with

    m * n = N                                              (sympy.divisors(N))

such that every site can be split into n head groups of m dim slices:

    H_s % n == 0                                           heads per group
    d_s % m == 0                                           dims per slice
    n <= H_kv_s:  H_kv_s % n == 0                          kv heads per group
    n >  H_kv_s:  n % H_kv_s == 0                          kv head replicated n/H_kv times
    k_shared_s > 0 (MLA rope key):  m == 1                 heads only
    rotary "half", r dims:         (r/2) % m == 0, (d - r) % m == 0
    rotary "interleaved", r dims:  r % (2m) == 0,  (d - r) % m == 0
                                   (each slice gets whole rotary pairs)
    memory (given a cluster):      w * params_rank + act(1 sequence) <= phi * memory

MLPs are sharded over all N ranks (unevenly when F % N != 0) and never exclude
a split. A model with no attention sites has one meaningful split, m = 1,
n = N. Every excluded pair carries its reasons as sentences with the numbers
(`_site_reasons`, `cost.memory_reason`).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from .cluster import ClusterSpec
from .cost import _unique, memory_reason, stage_memory_reason
from ..errors import PlanError
from .sites import AttentionSite, ModelSummary
from .text import key_name, split_key, split_name
from .text import ranges as _ranges

NO_ATTENTION = "no attention: only n = devices"
# Device counts `require_feasible` lists when nothing fits: up to
# max(2 * devices, FEASIBLE_LISTING_MIN), and at most this many of them.
FEASIBLE_LISTING_MIN = 64
FEASIBLE_LISTING_MAX_COUNT = 20


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """One split of the devices: dp data replicas of pp pipeline stages, each stage n head
    groups x m dim slices over a contiguous run of blocks."""

    m: int
    n: int
    feasible: bool
    reasons: tuple[str, ...] = ()
    dp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        if self.m < 1 or self.n < 1 or self.dp < 1 or self.pp < 1:
            raise PlanError(f"Candidate needs dp, pp, m, n >= 1, "
                            f"got dp={self.dp}, pp={self.pp}, m={self.m}, n={self.n}")
        if self.feasible == bool(self.reasons):
            raise PlanError(f"Candidate {self}: feasible={self.feasible} "
                            f"contradicts reasons={self.reasons!r}")

    @property
    def devices(self) -> int:
        return self.dp * self.pp * self.m * self.n

    @property
    def key(self) -> tuple[int, ...]:
        """(dp, m, n) when pp = 1, else (dp, pp, m, n) (text.split_key)."""
        return split_key(self.dp, self.pp, self.m, self.n)

    def __str__(self) -> str:
        return split_name(self.dp, self.m, self.n, self.pp)


def check_devices(devices: object) -> int:
    """`devices` itself if it is a positive int, else PlanError."""
    if isinstance(devices, bool) or not isinstance(devices, int) or devices <= 0:
        raise PlanError(f"devices must be a positive integer, got {devices!r}; try 8 or 16")
    return devices


def _site_reasons(site: AttentionSite, m: int, n: int) -> list[str]:
    H, H_kv, d = site.num_heads, site.num_kv_heads, site.head_dim
    out = []
    if H % n:
        out.append(f"H={H} heads not divisible by n={n}")
    if d % m:
        out.append(f"head dim d={d} not divisible by m={m}")
    if H_kv == H:
        pass   # MHA: the kv heads split exactly as the query heads do
    elif n <= H_kv and H_kv % n:
        out.append(f"H_kv={H_kv} kv heads not divisible by n={n}")
    elif n > H_kv and n % H_kv:
        out.append(f"n={n} is not a multiple of H_kv={H_kv} kv heads "
                   f"(each kv head must be replicated over a whole number of groups)")
    if site.k_shared_dims and m > 1:
        # MLA: q's rope dims are per head, k's are one tensor read by every head; a d/m slice
        # of the scores would need the rank's slice of that shared key (not built: the shared
        # projection runs whole on every rank and the head dim is not split)
        out.append(f"{site.k_shared_dims} of the d={d} key dims come from one projection shared "
                   f"by all heads (MLA's rope key); Helix splits such a site over heads only (m = 1)")
    if site.rotary is not None and m > 1:
        r = site.rotary.dims
        if site.rotary.style == "half" and (r // 2) % m:
            out.append(f"rotary 'half' r={r}: its r/2={r // 2} pairs (t, t+{r // 2}) "
                       f"cannot be dealt evenly to m={m} slices")
        if site.rotary.style == "interleaved" and r % (2 * m):
            out.append(f"rotary 'interleaved' r={r}: r/m={r / m:g} dims per slice is not "
                       f"a whole number of pairs (needs r % 2m == 0, m={m})")
        if (d - r) % m:
            out.append(f"{d - r} unrotated dims (d={d}, r={r}) not divisible by m={m}")
    return out


def _merge(per_site: list[tuple[int, str]]) -> tuple[str, ...]:
    """One reason per distinct sentence, naming the sites it holds for."""
    sites: dict[str, list[int]] = {}
    for index, text in per_site:
        sites.setdefault(text, []).append(index)
    return tuple(f"{text} (site{'s' if len(ix) > 1 else ''} {_ranges(ix)})"
                 for text, ix in sites.items())



def solve(summary: ModelSummary, devices: int,
          cluster: ClusterSpec | None = None) -> tuple[Candidate, ...]:
    """Every (m, n) with m * n = devices, smallest m first, with why each is
    excluded. With a cluster, devices beyond it and splits whose one-sequence
    micro-batch does not fit in memory are excluded too."""
    check_devices(devices)
    out = []
    for m in sympy.divisors(devices):
        m, n = int(m), devices // int(m)
        if not summary.sites:
            reasons = [] if m == 1 else [NO_ATTENTION]
        else:   # sites of one shape have the same reasons: each shape checked once
            reps, idx = _unique(summary.sites)
            per_rep = [_site_reasons(s, m, n) for s in reps]
            reasons = list(_merge([(s.index, r) for s, k in zip(summary.sites, idx)
                                   for r in per_rep[k]]))
        if cluster is not None and not reasons:
            if devices > cluster.devices:
                reasons.append(f"{devices} devices but cluster {cluster.name!r} has "
                               f"{cluster.devices} GPUs ({cluster.nodes} node{'s' if cluster.nodes != 1 else ''} x "
                               f"{cluster.gpus_per_node})")
            elif (why := memory_reason(summary, m, n, cluster)) is not None:
                reasons.append(why)
        out.append(Candidate(m=m, n=n, feasible=not reasons, reasons=tuple(reasons)))
    return tuple(out)


def batch_reason(batch: int, dp: int) -> str | None:
    """None when dp equal, contiguous shards of the global batch exist, else why not."""
    if batch % dp:
        return (f"dp={dp} replicas need the global batch B={batch} to split evenly "
                f"(B % dp = {batch % dp}); try a batch that is a multiple of {dp}")
    return None


def _axis(name: str, value, devices: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1
                              or devices % value):
        raise PlanError(f"{name}={value!r} must be a positive integer dividing devices={devices}; "
                        f"try one of {', '.join(str(int(x)) for x in sympy.divisors(devices))}")


def blocks(summary: ModelSummary) -> int:
    """Blocks (layers) a pipeline can cut between: the most of attention sites and MLPs."""
    return max(len(summary.sites), len(summary.mlps))


def pipeline_reasons(summary: ModelSummary, pp: int, dp: int,
                     micro_batches: int | None = None) -> list[str]:
    """Why pp stages cannot run this model (empty when they can): a stage needs a block, and a
    forced micro-batch count must split each replica's batch evenly."""
    out = []
    if pp > 1 and pp > blocks(summary):
        out.append(f"pp={pp} stages need at least {pp} blocks, model {summary.name!r} has "
                   f"{blocks(summary)}; try pp <= {max(blocks(summary), 1)}")
    local = summary.batch // dp if summary.batch % dp == 0 else None
    if pp > 1 and micro_batches is not None and local is not None and local % micro_batches:
        out.append(f"pp={pp}: M={micro_batches} micro-batches need each replica's batch "
                   f"B/dp={local} to split evenly (B/dp % M = {local % micro_batches}); try M "
                   f"in {', '.join(str(int(x)) for x in sympy.divisors(local))}")
    return out


def solve_space(summary: ModelSummary, devices: int, cluster: ClusterSpec | None = None,
                dp: int | None = None, pp: int | None = 1,
                micro_batches: int | None = None) -> tuple[Candidate, ...]:
    """Every (dp, pp, m, n) with dp * pp * m * n = devices (dp = `dp`, pp = `pp` only, when
    given; pp=1 by default, None for every pp), dp ascending, then pp, then m, with why each
    is excluded: the (m, n) rules of `solve` on devices / (dp pp) ranks (a replica's stage
    holds an m x n shard of its blocks, so its memory is that of the m x n rank over the
    stage's blocks), dp must divide the global batch (`batch_reason`), pp at most the blocks
    and a forced micro-batch count dividing the replica batch (`pipeline_reasons`)."""
    check_devices(devices)
    _axis("dp", dp, devices)
    _axis("pp", pp, devices)
    if micro_batches is not None and (isinstance(micro_batches, bool)
                                      or not isinstance(micro_batches, int) or micro_batches < 1):
        raise PlanError(f"micro_batches={micro_batches!r} must be a positive integer (or None: "
                        f"the cost model chooses); try 4")
    out = []
    # (m, n) splits and stage memory depend on the replica's stage size, not on dp: each is
    # solved once for the whole space
    splits: dict = {}
    stage_memory: dict = {}
    for k in ([dp] if dp is not None else [int(x) for x in sympy.divisors(devices)]):
        pps = [pp] if pp is not None else [int(x) for x in sympy.divisors(devices // k)]
        for p in pps:
            if devices % (k * p):
                continue
            replica = devices // (k * p)
            too_big = cluster is not None and devices > cluster.devices
            where = None if too_big or p > 1 else cluster
            if (replica, where is None) not in splits:
                splits[replica, where is None] = solve(summary, replica, where)
            split = splits[replica, where is None]
            extra = [] if k == 1 else [r for r in (batch_reason(summary.batch, k),) if r]
            extra += pipeline_reasons(summary, p, k, micro_batches)
            if too_big:
                extra.append(f"{devices} devices but cluster {cluster.name!r} has "
                             f"{cluster.devices} GPUs ({cluster.nodes} node"
                             f"{'s' if cluster.nodes != 1 else ''} x {cluster.gpus_per_node})")
            for c in split:
                reasons = (*extra, *c.reasons)
                if not reasons and p > 1 and cluster is not None:
                    if (c.m, c.n, p) not in stage_memory:
                        stage_memory[c.m, c.n, p] = stage_memory_reason(summary, c.m, c.n, p,
                                                                        cluster)
                    why = stage_memory[c.m, c.n, p]
                    reasons = (why,) if why else ()
                out.append(Candidate(m=c.m, n=c.n, dp=k, pp=p, feasible=not reasons,
                                     reasons=reasons))
    return tuple(out)


def feasible_device_counts(summary: ModelSummary, upto: int,
                           cluster: ClusterSpec | None = None) -> tuple[int, ...]:
    """Device counts 1..upto with at least one feasible (m, n)."""
    return tuple(c for c in range(1, upto + 1)
                 if any(x.feasible for x in solve(summary, c, cluster)))


def require_feasible(summary: ModelSummary, devices: object,
                     cluster: ClusterSpec | None = None) -> tuple[Candidate, ...]:
    """The feasible candidates for `devices`; PlanError when devices is not a
    positive integer or no split fits, listing the device counts that do."""
    devices = check_devices(devices)
    candidates = solve(summary, devices, cluster)
    feasible = tuple(c for c in candidates if c.feasible)
    if feasible:
        return feasible
    upto = max(2 * devices, FEASIBLE_LISTING_MIN)
    if cluster is not None:
        upto = min(upto, cluster.devices)
    counts = feasible_device_counts(summary, upto, cluster)[:FEASIBLE_LISTING_MAX_COUNT]
    why = "; ".join(f"{c}: {', '.join(c.reasons)}" for c in candidates)
    fits = (f"device counts that fit (up to {upto}): {', '.join(map(str, counts))}"
            if counts else f"no device count up to {upto} fits")
    raise PlanError(f"no (m, n) split of {devices} devices fits model {summary.name!r}: "
                    f"{why}. {fits}")
