"""From channel scores to keep masks: group scores, allocation across layers, FLOPs matching.

- :func:`group_scores`: each conv's scores min–max normalised within the layer, then a group's
  score per root channel is the mean over its conv members (coupled channels are pruned
  together); dead channels score below every live one, so every score removes them first.
  ``depthwise=False`` leaves depthwise convs out of the mean where the group has
  another conv (they are never scored on their own either way).
- An :class:`Allocation` turns one integer parameter ``i`` into per-group prune counts
  ``counts(i): [G]``, non-decreasing in ``i`` (so the MACs fall monotonically):
  ``global`` (one threshold over all groups; ``i`` channels, lowest scores first, at most
  ``cap`` of any group), ``uniform`` (the same fraction in every group; ``i`` indexes the
  sorted fractions at which some group's count steps), ``hybrid`` (the per-group counts of a
  :class:`CountSource`: another score's global allocation, Taylor by default, the uniform one or
  the sensitivity scan's; the ranking inside each group from this score), ``sensitivity`` (hybrid
  with the sensitivity scan's counts, Li et al. 2017: :func:`sensitivity_keys`), ``knapsack`` (a
  greedy removal by group score per MAC saved, :func:`_knapsack_seq`). Inside a group, channels go
  lowest score first (ties by channel index).
- The group scores are normalised within each layer before they meet other layers' by
  ``pruning.normalize`` (:func:`~axes_pipeline.pruning.scores.normalize`: minmax, mean, max, lamp).
- :func:`match_flops`: bisection over ``i`` for the smallest ``i`` whose MACs are at most
  ``target + tol`` of the unpruned MACs; when one step jumps over the window
  ``[target − tol, target + tol]`` (a channel of a large or coupled group costs more than
  ``2·tol``), the search goes on from the last step above the window along the allocation's
  order, skipping channels whose removal would fall below the window (so a cheaper channel
  ranked a little later replaces an expensive one); the point is flagged ``refined``. :func:`nominal_fraction` is the authors'
  literal protocol: prune a nominal fraction of the channels, report the MACs that gives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from axes_pipeline.errors import UserError, unknown_name
from axes_pipeline.pruning.flops import CostModel
from axes_pipeline.pruning.groups import GroupSet
from axes_pipeline.pruning.scores import normalize
from axes_pipeline.pruning.settings import ALLOCATIONS

__all__ = ["ALLOCATIONS", "DEAD_SCORE", "Allocation", "CountSource", "SearchResult", "group_scores", "keep_masks",
           "make_allocation", "match_flops", "nominal_fraction", "sensitivity_keys"]

log = logging.getLogger("axes_pipeline")


#: the group score of a dead channel: below every live channel's (those lie in [0, 1])
DEAD_SCORE = -1.0


def group_scores(groups: GroupSet, per_layer: dict[str, np.ndarray], depthwise: bool = True,
                 dead: dict[str, np.ndarray] | None = None, how: str = "minmax") -> list[np.ndarray]:
    """Per-group scores ``[size_g]`` (mean of the members' layer-normalised scores; ``how``:
    ``pruning.normalize``, :func:`~axes_pipeline.pruning.scores.normalize`).

    ``dead``: ``{layer: bool [C]}`` (:meth:`ScoreContext.dead`). Dead channels are removed first by
    every score (METHODS §9): a layer is normalised over its live channels (a dead channel's value,
    e.g. hull_score's −0, would otherwise sit anywhere in the order), a dead member counts as the
    layer's lowest (0) in a group's mean, and a channel dead in every conv of its group scores
    :data:`DEAD_SCORE`."""
    norm = {}
    for layer, v in per_layer.items():
        v = np.asarray(v, dtype=np.float64)
        d = _dead_of(dead, layer, v.shape)
        live = np.where(d, np.nan, v)
        norm[layer] = np.full(v.shape, np.nan) if not np.isfinite(live).any() else np.where(d, 0.0, normalize(live, how))
    out, empty = [], []
    for g in groups.groups:
        members = list(g.convs)
        if not depthwise and len(g.depthwise) < len(g.convs):
            members = [c for c in g.convs if c not in g.depthwise]
        stack = np.stack([norm[c][g.channel_of[c]] for c in members])  # [members, size]
        rows = stack[~np.isnan(stack).all(axis=1)]  # a layer without values (no norm for bn_scale)
        score = rows.mean(axis=0) if rows.size else np.full(g.size, 0.5)
        all_dead = np.logical_and.reduce([_dead_of(dead, c, norm[c].shape)[g.channel_of[c]] for c in g.convs])
        out.append(np.where(all_dead, DEAD_SCORE, score))
        if not rows.size:
            empty.append(g.name)
    if empty:  # e.g. bn_scale where no norm follows (AlexNet, SE convs): ranked by tie-break only
        log.warning("score undefined for %d of %d channel groups (e.g. %s): their channels all score 0.5 and are "
                    "ordered by the seeded tie-break", len(empty), len(groups.groups), empty[0])
    return out


def _dead_of(dead: dict[str, np.ndarray] | None, layer: str, shape) -> np.ndarray:
    if dead is None or layer not in dead:
        return np.zeros(shape, dtype=bool)
    return np.asarray(dead[layer], dtype=bool).reshape(shape)


def _order(scores: np.ndarray) -> np.ndarray:
    """Channels of a group, lowest score first (ties: lower channel index first)."""
    return np.lexsort((np.arange(scores.size), scores))


def _caps(sizes: np.ndarray, cap: float) -> np.ndarray:
    """At most ``cap`` of a group, and at least one channel left."""
    return np.minimum(np.floor(cap * sizes + 1e-9).astype(np.int64), sizes - 1).clip(min=0)


@dataclass
class Allocation:
    """Per-group prune counts ``counts(i): [G]`` from one integer parameter ``i`` in ``0..n_params``."""

    kind: str
    sizes: np.ndarray
    orders: list[np.ndarray]   # root channels of each group, first pruned first
    ranked: list[np.ndarray]   # the group scores in that order (for refining)
    caps: np.ndarray
    n_params: int
    _seq: np.ndarray | None = None       # global/hybrid: group id of the i-th pruned channel
    _fractions: np.ndarray | None = None  # uniform: the fraction at parameter i

    def counts(self, i: int) -> np.ndarray:
        i = int(min(max(i, 0), self.n_params))
        if self._seq is not None:
            return np.bincount(self._seq[:i], minlength=len(self.sizes)).astype(np.int64)
        f = self._fractions[i]
        return np.minimum(np.floor(f * self.sizes + 1e-9).astype(np.int64), self.caps)

    def continuation(self, i: int) -> list[int]:
        """Group ids of the channels pruned after parameter ``i``, in the allocation's order
        (global / hybrid: the global sequence; uniform: by the fraction at which each channel
        goes, then by score)."""
        if self._seq is not None:
            return [int(g) for g in self._seq[int(i):]]
        start = self.counts(i)
        keyed = [((r + 1) / int(n), float(self.ranked[g][r]), g)
                 for g, (n, c0, cap) in enumerate(zip(self.sizes, start, self.caps)) for r in range(int(c0), int(cap))]
        return [g for _, _, g in sorted(keyed)]

    def nominal(self, fraction: float) -> np.ndarray:
        """Counts for pruning a nominal ``fraction`` of all the prunable channels."""
        if self._seq is not None:
            return self.counts(int(round(fraction * int(self.sizes.sum()))))
        return np.minimum(np.floor(fraction * self.sizes + 1e-9).astype(np.int64), self.caps)


def _global_seq(scores: list[np.ndarray], caps: np.ndarray, seed: int) -> np.ndarray:
    """Group ids of the candidate channels in global order (lowest score first)."""
    vals, gids = [], []
    for g, s in enumerate(scores):
        order = _order(s)[: caps[g]]
        vals.append(s[order])
        gids.append(np.full(order.size, g, dtype=np.int64))
    vals = np.concatenate(vals) if vals else np.zeros(0)
    gids = np.concatenate(gids) if gids else np.zeros(0, dtype=np.int64)
    tiebreak = np.random.default_rng(seed).random(vals.size)
    return gids[np.lexsort((tiebreak, vals))]


@dataclass(frozen=True)
class CountSource:
    """Where hybrid's per-group counts come from: ``kind`` ``score`` (``values``: that score's group
    scores, counted by their global allocation), ``uniform`` (no values) or ``sensitivity`` (``values``:
    :func:`sensitivity_keys`, one non-decreasing key per prunable count of each group)."""

    kind: str
    values: list | None = None


def _uniform_fractions(sizes: np.ndarray, caps: np.ndarray) -> np.ndarray:
    steps = sorted({j / int(n) for n, c in zip(sizes, caps) for j in range(1, int(c) + 1)})
    return np.array([0.0] + steps)


def _knapsack_seq(scores: list[np.ndarray], caps: np.ndarray, cost: CostModel) -> np.ndarray:
    """Group ids of the channels in greedy knapsack order: the channels kept should maximise the
    summed group score under a MACs budget, so the next channel removed is, among every group's
    lowest-scored candidate (within its cap), the one of least score per MAC its removal saves now.

    The saving is the cost model's exact marginal count at the current state (a dense conv's MACs
    are bilinear in its input and output groups, so a group's price falls as its neighbours
    shrink). Every prefix is a budget's greedy solution, so the FLOPs search (:func:`match_flops`)
    runs along it like the global order. Known bound (additive costs): the kept score is within one
    channel's score of the best under the same budget (Dantzig's greedy)."""
    G = len(scores)
    kept = cost.sizes.astype(np.int64).copy()
    pointer = np.zeros(G, dtype=np.int64)
    ranked = [s[_order(s)] for s in scores]
    current = int(cost.macs_counts(kept))
    eye = np.eye(G, dtype=np.int64)
    seq: list[int] = []
    while True:
        open_ = np.flatnonzero(pointer < caps)
        if open_.size == 0:
            break
        after = cost.macs_counts(kept[None, :] - eye[open_])          # [open] MACs with one more removed
        saving = np.maximum(current - after, 1).astype(np.float64)     # a free channel still costs its score
        value = np.array([ranked[g][pointer[g]] for g in open_])
        pick = int(np.lexsort((open_, value, value / saving))[0])      # least score per MAC, then score, then group
        g = int(open_[pick])
        seq.append(g)
        kept[g] -= 1
        pointer[g] += 1
        current = int(after[pick])
    return np.asarray(seq, dtype=np.int64)


def sensitivity_keys(sizes: np.ndarray, fractions, drops: np.ndarray) -> list[np.ndarray]:
    """The sensitivity scan as one key per prunable count: ``drops: [G, F]`` the validation-accuracy
    drop with ``fractions[k]`` of group g's channels pruned alone. ``keys[g][r]`` is the drop
    interpolated at ``(r+1)/size_g`` (linear between the scanned fractions, 0 at 0, the last
    segment's slope beyond the last one), made non-decreasing, so one global threshold on the drop
    prunes each layer until pruning more would cost it more than the threshold: the most sensitive
    layers lose least (Li et al. 2017)."""
    f = np.concatenate([[0.0], np.asarray(fractions, dtype=np.float64)])
    keys = []
    for n, d in zip(sizes, np.asarray(drops, dtype=np.float64)):
        y = np.maximum.accumulate(np.concatenate([[0.0], np.nan_to_num(d, nan=1.0)]))
        x = np.arange(1, int(n) + 1) / int(n)
        k = np.interp(x, f, y)
        slope = max(0.0, (y[-1] - y[-2]) / (f[-1] - f[-2])) if f.size > 1 and f[-1] > f[-2] else 0.0
        k = np.where(x > f[-1], y[-1] + slope * (x - f[-1]), k)
        keys.append(np.maximum.accumulate(k))
    return keys


def _sensitivity_seq(sizes: np.ndarray, keys: list[np.ndarray], caps: np.ndarray, seed: int) -> np.ndarray:
    """Group ids in order of the sensitivity key; ties (e.g. several layers at no drop) by the
    fraction pruned, so such layers shrink together, then by a seeded draw."""
    vals = np.concatenate([k[: int(c)] for k, c in zip(keys, caps)]) if keys else np.zeros(0)
    frac = np.concatenate([np.arange(1, int(c) + 1) / int(n) for n, c in zip(sizes, caps)]) if keys else np.zeros(0)
    gids = np.concatenate([np.full(int(c), g, dtype=np.int64) for g, c in enumerate(caps)]) if keys else np.zeros(0, int)
    tiebreak = np.random.default_rng(seed).random(vals.size)
    return gids[np.lexsort((tiebreak, frac, vals))]


def make_allocation(kind: str, groups: GroupSet, scores: list[np.ndarray], cap: float,
                    counts_from: CountSource | list[np.ndarray] | None = None, seed: int = 0,
                    cost: CostModel | None = None, caps: np.ndarray | None = None) -> Allocation:
    """The :class:`Allocation` ``kind`` for group ``scores``. ``counts_from``: hybrid's (and sensitivity's)
    :class:`CountSource` (a plain list: a score's group scores); ``cost``: knapsack's MAC model.
    ``caps: [G]``: the most channels of each group that may go, instead of ``cap`` of its size (an
    iterative step's: what the cap of the unpruned widths leaves, schedule.py)."""
    if kind not in ALLOCATIONS:
        raise unknown_name("allocation (pruning.allocation)", kind, ("auto",) + ALLOCATIONS)
    if not 0.0 < cap < 1.0:
        raise UserError(f"the per-layer pruning cap must be in (0, 1), got {cap}")
    sizes = groups.sizes
    caps = _caps(sizes, cap) if caps is None else np.minimum(np.asarray(caps, dtype=np.int64), sizes - 1).clip(min=0)
    orders = [_order(s) for s in scores]
    ranked = [s[o] for s, o in zip(scores, orders)]
    if counts_from is not None and not isinstance(counts_from, CountSource):
        counts_from = CountSource("score", counts_from)
    if kind in ("hybrid", "sensitivity"):
        if counts_from is None or (kind == "sensitivity" and counts_from.kind != "sensitivity"):
            raise ValueError(f"{kind} allocation needs the source of its per-layer counts")
        if counts_from.kind == "uniform":
            kind_counts = "uniform"
        else:
            seq = (_global_seq(counts_from.values, caps, seed) if counts_from.kind == "score"
                   else _sensitivity_seq(sizes, counts_from.values, caps, seed))
            return Allocation(kind, sizes, orders, ranked, caps, int(seq.size), _seq=seq)
    else:
        kind_counts = kind
    if kind_counts == "global":
        seq = _global_seq(scores, caps, seed)
        return Allocation(kind, sizes, orders, ranked, caps, int(seq.size), _seq=seq)
    if kind_counts == "knapsack":
        if cost is None:
            raise ValueError("knapsack allocation needs the MAC model")
        seq = _knapsack_seq(scores, caps, cost)
        return Allocation(kind, sizes, orders, ranked, caps, int(seq.size), _seq=seq)
    fractions = _uniform_fractions(sizes, caps)
    return Allocation(kind, sizes, orders, ranked, caps, len(fractions) - 1, _fractions=fractions)


def keep_masks(alloc: Allocation, counts: np.ndarray) -> list[np.ndarray]:
    """Keep masks (one bool ``[size_g]`` per group) that prune ``counts[g]`` lowest-ranked channels."""
    keep = []
    for order, n, size in zip(alloc.orders, counts, alloc.sizes):
        k = np.ones(int(size), dtype=bool)
        k[order[: int(n)]] = False
        keep.append(k)
    return keep


@dataclass
class SearchResult:
    """Outcome of one FLOPs search: prune ``counts: [G]``, MACs and the fraction kept."""

    counts: np.ndarray
    macs: int
    frac: float
    matched: bool
    param: int
    evaluations: int
    refined: bool = False


def match_flops(alloc: Allocation, cost: CostModel, target: float, tol: float) -> SearchResult:
    """Prune counts whose MACs are within ``tol`` of ``target`` (fraction of the unpruned MACs)."""
    total = int(cost.macs_counts(alloc.sizes))
    evals = [0]

    def frac(counts: np.ndarray) -> float:
        evals[0] += 1
        return float(cost.macs_counts(alloc.sizes - counts)) / total

    def result(counts, matched, i, refined=False):
        m = int(cost.macs_counts(alloc.sizes - counts))
        return SearchResult(counts, m, m / total, matched, int(i), evals[0], refined)

    lo_bound, hi_bound = target - tol, target + tol
    c0 = alloc.counts(0)
    if frac(c0) <= hi_bound:
        return result(c0, frac(c0) >= lo_bound, 0)
    cn = alloc.counts(alloc.n_params)
    if frac(cn) > hi_bound:  # unreachable within the caps: prune as much as allowed
        return result(cn, False, alloc.n_params)
    lo, hi = 0, alloc.n_params  # frac(lo) > hi_bound >= frac(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if frac(alloc.counts(mid)) > hi_bound:
            lo = mid
        else:
            hi = mid
    c_hi = alloc.counts(hi)
    if frac(c_hi) >= lo_bound:
        return result(c_hi, True, hi)
    # One step jumps over the window (a channel costs more than the window is wide): go on
    # along the allocation's order from the last point above the window, skipping channels
    # whose removal would fall below it, until the MACs land inside.
    c = alloc.counts(lo).copy()
    closed = set()
    for g in alloc.continuation(lo):
        if g in closed:
            continue
        c[g] += 1
        f = frac(c)
        if f < lo_bound:
            c[g] -= 1
            closed.add(g)  # keep the order inside the group: nothing after it either
            continue
        if f <= hi_bound:
            return result(c, True, hi, refined=True)
    best = min((c, c_hi), key=lambda cc: abs(frac(cc) - target))
    return result(best, False, hi, refined=True)


def nominal_fraction(alloc: Allocation, cost: CostModel, kept_channels: float) -> SearchResult:
    """The authors' literal protocol: prune ``1 − kept_channels`` of the channels."""
    counts = alloc.nominal(1.0 - kept_channels)
    total = int(cost.macs_counts(alloc.sizes))
    m = int(cost.macs_counts(alloc.sizes - counts))
    return SearchResult(counts, m, m / total, True, -1, 1)
