"""Statistics shared by the analyses, pruning and the report: FLOPs-AUC, paired seed comparisons,
binned correlations, ΔR² and the paper's reference values.

Pure numpy/scipy and deterministic given ``seed``: every random draw comes from
``numpy.random.default_rng(seed)``, so a report rebuilt from the same results prints the same
intervals. The confidence interval of the paired difference is the Student t interval
(:data:`scipy.stats.t`) by default, which holds its level at 3–10 seeds; the bootstrap intervals of
:func:`scipy.stats.bootstrap` (BCa, percentile) stay a knob, labelled with their measured coverage
(:data:`CI_COVERAGE`). The sign-flip test comes from :func:`scipy.stats.permutation_test`; the one
hand-written resampler left (:func:`incremental_r2`) says why beside it.

What uses what (METHODS §8, §9): pruning curves → :func:`grid_aucs` (every score of a comparison
over one removed-FLOPs interval); the headline comparison (best local vs best target score, paired
across seeds) → :func:`compare_paired`, corrected over several rows with :func:`holm`; the lesion
analysis → :func:`binned_spearman`, :func:`incremental_r2` (within one seed); every other verdict of the
report across seeds (lesions, definitions, dynamics, alignment, propagation, the reference values) →
:func:`across_seeds` on one estimate per seed, read in words by :func:`change_verdict`; the paper's
numbers (METHODS §11) → :data:`PAPER_REFERENCE`.

NaN convention: a NaN marks a missing run (a seed that failed, a channel without a lesion).
Functions on paired data drop a pair when either side is NaN; functions that cannot produce a
meaningful number return NaN rather than raise, so one missing run does not stop a report.
Wrong *shapes* (unequal lengths, a 2-D array where a vector belongs) are programming errors and
raise ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats as _st

__all__ = ["CI_COVERAGE", "CI_METHODS", "DEFAULT_CI", "PAPER_REFERENCE", "across_seeds", "binned_spearman",
           "change_verdict", "compare_paired", "effect_size_paired", "flops_auc", "flops_auc_on_grid", "grid_aucs",
           "flops_auc_relative", "holm", "incremental_r2", "mean_sd", "paired_bootstrap_ci", "paired_ci", "paired_t_ci",
           "paired_test", "shared_grid", "spearman", "t_interval"]

#: METHODS §11: the paper's numbers for six depth-spaced layers, CIFAR-100, as (mean, sd).
PAPER_REFERENCE: dict[str, dict[str, tuple[float, float]]] = {
    "hull_size_mean": {"init": (3.08, 0.07), "trained": (4.27, 0.04)},
    "hull_saturated_frac": {"init": (0.067, 0.006), "trained": (0.195, 0.008)},
    "s3_s2": {"init": (0.192, 0.017), "trained": (0.381, 0.008)},
}

# Exact sign-flip enumeration up to this many pairs (2^16 = 65,536 flips; scipy batches them).
_EXACT_PERM_MAX_N = 16
# Bootstrap/permutation work is batched so that one batch holds at most this many numbers.
_CHUNK_ELEMS = 4_000_000
# Monte-Carlo sign flips when n > _EXACT_PERM_MAX_N.
_N_PERM = 10000
# A spread this small relative to the values is rounding, not variation (a − b of floats that
# differ by a constant is not exactly constant).
_REL_TOL = 1e-12


# ----------------------------------------------------------------------------- helpers


def _vec(x, name: str) -> np.ndarray:
    """``x`` as a 1-D float array; a scalar or a 2-D array is a programming error."""
    arr = np.asarray(x, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _paired(a, b) -> tuple[np.ndarray, np.ndarray, int]:
    """``(a, b, n_dropped)``: ``a, b: [n]`` paired by position, pairs containing a NaN removed."""
    a, b = _vec(a, "a"), _vec(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired inputs must have equal length, got {a.size} and {b.size}")
    keep = ~(np.isnan(a) | np.isnan(b))
    return a[keep], b[keep], int(a.size - keep.sum())


def _is_constant(d: np.ndarray) -> bool:
    """True when the values of ``d`` (not empty) differ only by rounding."""
    scale = max(float(np.max(np.abs(d))), np.finfo(float).tiny)
    return float(np.ptp(d)) <= _REL_TOL * scale


def _as_2d(x, n: int, name: str) -> np.ndarray:
    """Design-matrix block ``[n, k]`` from a vector ``[n]`` or a matrix ``[n, k]``."""
    arr = np.asarray(x, dtype=float)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}] or [{n}, k], got {arr.shape}")
    return arr


def _curve(removed_frac, acc) -> tuple[np.ndarray, np.ndarray]:
    """A curve's sorted distinct x and the mean y at each (NaN pairs dropped): repeated x values are
    averaged, otherwise the trapezoid would depend on the order of the repeats."""
    x, y, _ = _paired(removed_frac, acc)
    ux, inv = np.unique(x, return_inverse=True)
    return ux, np.bincount(inv, weights=y) / np.bincount(inv)


def _mean_height(x: np.ndarray, y: np.ndarray) -> float:
    """Trapezoidal area under ``y(x)`` divided by the span of ``x``."""
    area = float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))
    return area / float(x[-1] - x[0])


# ----------------------------------------------------------------------------- FLOPs-AUC


def flops_auc(removed_frac, acc) -> float:
    """Mean accuracy over the removed-FLOPs range: trapezoidal area / span of the x axis.

    ``removed_frac: [k]`` fraction of the unpruned MACs removed (1 − retained), any order;
    ``acc: [k]`` accuracy at each point (any unit; the result is in the same unit).

    Dividing by the span turns the area into an average accuracy, so curves over different
    grids stay comparable in accuracy units. The span is that of the points given: include
    ``(0, unpruned accuracy)`` yourself if the curve should start at the unpruned model.
    NaN points are dropped (a failed target), repeated x values averaged.

    Raises ``ValueError`` when fewer than two distinct x values remain: an area over a
    single point has no meaning and a silent NaN would hide a broken pruning sweep.
    """
    ux, uy = _curve(removed_frac, acc)
    if ux.size < 2:
        raise ValueError(f"flops_auc needs at least 2 distinct removed-FLOPs fractions, got {ux.size}")
    return _mean_height(ux, uy)


def shared_grid(removed_targets, reaches=None) -> np.ndarray:
    """The removed-FLOPs grid every curve of one comparison is integrated over (METHODS §9).

    ``removed_targets: [k]`` the targets as removed fractions (1 − retained); the unpruned network
    adds 0. ``reaches``: the largest removed fraction each curve covers (``channel_fraction``
    mode, or a ``flops`` curve whose last target was missed); the grid then ends at the smallest
    reach, which becomes its last point, so no curve is extrapolated and all share one interval.

    Dividing each curve's area by its *own* span made two identical accuracy curves of different
    reach get different AUCs; one interval for all removes that.
    """
    t = np.asarray(removed_targets, dtype=float).ravel()
    grid = np.unique(np.concatenate([[0.0], t[np.isfinite(t)]]))
    r = np.asarray([] if reaches is None else reaches, dtype=float).ravel()
    if r.size:
        if not np.isfinite(r).all():
            raise ValueError("a curve has no reach (no finite point)")
        end = float(np.min(r))
        grid = np.unique(np.concatenate([grid[grid < end], [end]]))
    return grid


def flops_auc_on_grid(removed_frac, acc, grid) -> float:
    """Mean accuracy over the interval ``[grid[0], grid[-1]]``: the curve is linearly interpolated
    at every grid point, then trapezoidal area / interval length.

    ``removed_frac, acc: [k]`` the curve's points (include the unpruned point at 0 yourself; NaN
    pairs dropped, repeated x averaged); ``grid: [g]`` from :func:`shared_grid`, the same for every
    curve that is compared. Raises ``ValueError`` when the grid has fewer than two points or the
    curve does not cover it (no extrapolation: an AUC over a range a curve never reached would be
    invented).
    """
    g = np.unique(np.asarray(grid, dtype=float).ravel())
    if g.size < 2:
        raise ValueError(f"the FLOPs-AUC grid needs at least 2 points, got {g.size}")
    ux, uy = _curve(removed_frac, acc)
    if ux.size == 0:
        raise ValueError("the curve has no point")
    # a grid built from the same numbers matches exactly; the slack only absorbs float noise
    eps = 1e-9
    if ux[0] > g[0] + eps or ux[-1] < g[-1] - eps:
        raise ValueError(f"the curve covers removed FLOPs [{ux[0]:.4g}, {ux[-1]:.4g}], not the grid "
                         f"[{g[0]:.4g}, {g[-1]:.4g}]")
    return _mean_height(g, np.interp(g, ux, uy))


def grid_aucs(curves, acc_cols: Sequence[str], base_of, *, mode: str, tolerance: float,
              by: Sequence[str] = ("score", "draw"), targets=None) -> dict:
    """FLOPs-AUC of every curve of one comparison over one shared removed-FLOPs grid (METHODS §9).

    ``curves``: a DataFrame of pruning points with ``target_flops`` / ``target_channels``,
    ``achieved_flops`` and the ``acc_cols``; a curve is one value of the ``by`` columns (score and
    random draw; the report adds the seed). ``base_of(key) -> {acc_col: unpruned accuracy}`` gives
    the unpruned point at 0 removed FLOPs of each curve. ``targets``: the retained fractions of the
    sweep (default: those in ``curves``).

    - ``mode="flops"``: a point sits at its target's removed fraction (1 − target) when its
      achieved FLOPs are within ``tolerance`` of the target; a point further off is dropped and
      counted (``off_target``): it measures another budget than the other scores' points.
    - ``mode="channel_fraction"``: a point sits at its achieved removed FLOPs and the curve is
      interpolated onto the grid (scores reach different FLOPs at one channel fraction).

    The grid is :func:`shared_grid` of the targets, ending at the shortest reach of any curve.
    Returns ``{"grid": [..] | None, "aucs": {key: {acc_col: float | None}}, "off_target": n,
    "note": "" | why there is no AUC, "no_auc": {key: reason}}``. With fewer than two targets
    nothing is integrated (never a NaN): every AUC is None and ``note`` says why.
    """
    import pandas as pd  # only here: the rest of the module needs numpy/scipy alone

    by = list(by)
    target_col = "target_flops" if mode == "flops" else "target_channels"
    df = curves
    if targets is None:
        targets = pd.to_numeric(df[target_col], errors="coerce").dropna().unique() if target_col in df else []
    targets = sorted({float(t) for t in targets})
    keys = [k if isinstance(k, tuple) else (k,) for k, _ in df.groupby(by, sort=True)] if len(df) else []
    out = {"grid": None, "aucs": {k: {c: None for c in acc_cols} for k in keys}, "off_target": 0,
           "note": "", "no_auc": {}}
    if len(targets) < 2:
        out["note"] = f"{len(targets)} target(s): FLOPs-AUC needs at least two targets; the points are written, no AUC"
        return out
    target = pd.to_numeric(df[target_col], errors="coerce")
    achieved = pd.to_numeric(df["achieved_flops"], errors="coerce")
    if mode == "flops":
        on = (achieved - target).abs() <= tolerance + 1e-12
        out["off_target"] = int((~on).sum())
        # rounded as the grid is: 1 − 0.9 is 0.09999999999999998, the grid should read 0.1
        df = df.assign(_x=(1.0 - target).round(12))[on]
    else:
        df = df.assign(_x=1.0 - achieved)
    points, reaches = {}, []
    for k, d in (df.groupby(by, sort=True) if len(df) else []):
        k = k if isinstance(k, tuple) else (k,)
        base = base_of(k)
        per = {}
        for c in acc_cols:
            ok = d[c].notna() & d["_x"].notna()
            per[c] = (np.concatenate([[0.0], d.loc[ok, "_x"].to_numpy(float)]),
                      np.concatenate([[float(base.get(c, np.nan))], d.loc[ok, c].to_numpy(float)]))
        reach = min(float(np.max(x)) for x, _ in per.values())
        if reach <= 0 or not all(np.isfinite(y[0]) for _, y in per.values()):
            out["no_auc"][k] = "no point within tolerance" if reach <= 0 else "no unpruned accuracy"
            continue
        points[k] = per
        reaches.append(reach)
    for k in keys:
        if k not in points:
            out["no_auc"].setdefault(k, "no point within tolerance")
    if not points:
        out["note"] = "no curve has a point within tolerance of a target; no AUC"
        return out
    grid = shared_grid([round(1.0 - t, 12) for t in targets], reaches)
    if grid.size < 2:
        out["note"] = "the curves share no removed-FLOPs interval; no AUC"
        return out
    out["grid"] = [float(g) for g in grid]
    for k, per in points.items():
        for c, (x, y) in per.items():
            try:
                out["aucs"][k][c] = flops_auc_on_grid(x, y, grid)
            except ValueError as err:   # a column with fewer points than the others
                out["no_auc"][k] = str(err)
    return out


def flops_auc_relative(removed_frac, acc, base_acc: float) -> float:
    """:func:`flops_auc` divided by the unpruned accuracy ``base_acc`` (1.0 = no loss)."""
    base = float(base_acc)
    if not np.isfinite(base) or base <= 0:
        raise ValueError(f"base_acc must be a positive number, got {base_acc!r}")
    return flops_auc(removed_frac, acc) / base


# ----------------------------------------------------------------------------- summaries


def mean_sd(values) -> tuple[float, float, int]:
    """``(mean, sd, n)`` over the non-NaN entries of ``values: [k]``: sd with ddof=1, NaN when
    n < 2; mean NaN when n = 0."""
    v = np.asarray(values, dtype=float).ravel()
    v = v[~np.isnan(v)]
    n = int(v.size)
    return (float(v.mean()) if n else math.nan), (float(v.std(ddof=1)) if n >= 2 else math.nan), n


# ----------------------------------------------------------------------------- paired tests


#: CI methods of the paired difference (``report.ci``): ``t`` the Student t interval on the paired
#: differences; ``bca`` the bias-corrected and accelerated bootstrap (Efron 1987); ``percentile``
#: the plain bootstrap quantile interval.
CI_METHODS = ("t", "bca", "percentile")
#: The headline interval (METHODS §9). With 3–10 seeds the bootstrap intervals under-cover: the
#: resampled mean of n values has at most C(2n−1, n) distinct values and its spread is the
#: plug-in SD (ddof=0), about √((n−1)/n) of the true one, before any quantile is read. The t
#: interval carries the small-n correction in its t_{n−1} quantile.
DEFAULT_CI = "t"
#: Measured coverage of a nominal 95% interval of a zero mean paired difference, 5 seeds, normal
#: differences (tests/test_report_stats.py::test_default_interval_covers for "t"; the bootstrap
#: figures from 2,000 simulated null samples, scipy.stats.bootstrap with 2,000 resamples: 85.3% both,
#: ±0.8%; with Student t (df=3) differences 81.5% BCa, 83.2% percentile). The report labels a
#: bootstrap interval with its figure.
CI_COVERAGE = {"t": 0.95, "bca": 0.85, "percentile": 0.85}


def t_interval(d, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Student t interval of the mean of ``d: [..., n]`` along its last axis: ``(lo, hi)``, each ``[...]``.

    mean ± t_{n−1, (1+level)/2} · sd/√n (sd: ddof=1). Vectorised over the leading axes, so a
    coverage simulation is one call. Needs n ≥ 2 and finite values (:func:`paired_t_ci` handles the rest).
    """
    d = np.asarray(d, dtype=float)
    n = d.shape[-1]
    mean = d.mean(axis=-1)
    half = float(_st.t.ppf(0.5 + level / 2, n - 1)) * d.std(axis=-1, ddof=1) / math.sqrt(n)
    return mean - half, mean + half


def across_seeds(estimates, *, null: float = 0.0, level: float = 0.95) -> dict:
    """One estimate per seed ``estimates: [n]`` → the across-seed verdict every report section uses:
    the mean, its Student t interval (:func:`t_interval`, the headline's interval) and the two-sided
    one-sample t test of "mean = ``null``".

    The seed is the unit that is replicated (a training run); anything measured inside one seed (a
    bootstrap interval over channels, an F-test over channels) is a within-seed statement and stays in
    the per-run outputs. Averaging interval endpoints or p-values across seeds is neither an interval
    nor a test; a paired quantity (init → trained, local − target) goes in as its per-seed difference.
    The test is the t test and not the headline's Wilcoxon/sign-flip, so that the interval excludes
    ``null`` exactly when p < 1 − ``level``: a row never reads "CI excludes 0" beside "p > 0.05".

    Returns ``{"mean", "sd", "n", "ci_lo", "ci_hi", "p", "note"}``; NaN entries are missing seeds and
    are dropped. n = 0: all NaN; n = 1: the value, NaN sd/interval/p (one seed has no spread); every
    seed equal (spread at rounding level): the point as its interval, p = 0 when it differs from
    ``null`` and 1 when it is ``null``, with a note.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    v = _vec(estimates, "estimates")
    v = v[~np.isnan(v)]
    n = int(v.size)
    nan = math.nan
    out = {"mean": float(v.mean()) if n else nan, "sd": float(v.std(ddof=1)) if n >= 2 else nan, "n": n,
           "ci_lo": nan, "ci_hi": nan, "p": nan, "note": ""}
    if n < 2:
        out["note"] = f"{n} seed(s): no interval"
        return out
    if _is_constant(v):
        m = out["mean"]
        out.update(ci_lo=m, ci_hi=m, p=1.0 if m == null else 0.0, note="the same value in every seed")
        return out
    lo, hi = t_interval(v, level)
    t = (out["mean"] - null) / (out["sd"] / math.sqrt(n))
    out.update(ci_lo=float(lo), ci_hi=float(hi), p=float(2.0 * _st.t.sf(abs(t), n - 1)))
    return out


def change_verdict(lo: float, hi: float, *, up: str = "rises", down: str = "falls",
                   flat: str = "no clear change") -> str:
    """A direction in words read off an across-seed interval of a change: ``up`` when it lies above 0,
    ``down`` below, ``flat`` when it includes 0 or could not be computed (fewer than 2 seeds)."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return flat
    return up if lo > 0 else down if hi < 0 else flat


def paired_t_ci(a, b, level: float = 0.95) -> tuple[float, float, float]:
    """Student t CI of the mean paired difference ``a − b: [n]`` (:func:`t_interval`).

    Returns ``(diff_mean, lo, hi)``; n = 0: all NaN; n = 1: the difference, NaN interval (one pair
    carries no information about spread); a constant difference (spread at rounding level): the point.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    d, settled = _paired_differences(a, b)
    if settled is not None:
        return settled
    lo, hi = t_interval(d, level)
    return float(d.mean()), float(lo), float(hi)


def _paired_differences(a, b) -> tuple[np.ndarray, tuple[float, float, float] | None]:
    """``(d, settled)``: the paired differences ``a − b`` and, where no interval needs computing, the
    answer of every paired CI: n = 0 all NaN; n = 1 the difference with a NaN interval (one pair carries
    no information about spread); a constant difference (spread at rounding level) the point itself
    (scipy's BCa would return NaN there: its jackknife acceleration is 0/0)."""
    a, b, _ = _paired(a, b)
    d = a - b
    if d.size == 0:
        return d, (math.nan, math.nan, math.nan)
    diff = float(d.mean())
    if d.size == 1:
        return d, (diff, math.nan, math.nan)
    return d, ((diff, diff, diff) if _is_constant(d) else None)


def paired_ci(a, b, method: str = DEFAULT_CI, level: float = 0.95, n_boot: int = 10000,
              seed: int = 0) -> tuple[float, float, float]:
    """CI of the mean paired difference by ``method`` (:data:`CI_METHODS`): ``(diff_mean, lo, hi)``."""
    if method not in CI_METHODS:
        raise ValueError(f"unknown CI method '{method}'; choose one of: {', '.join(CI_METHODS)}")
    if method == "t":
        return paired_t_ci(a, b, level=level)
    return paired_bootstrap_ci(a, b, n_boot=n_boot, level=level, seed=seed, method=method)


def paired_bootstrap_ci(a, b, n_boot: int = 10000, level: float = 0.95, seed: int = 0,
                        method: str = "bca") -> tuple[float, float, float]:
    """Bootstrap CI of the mean paired difference ``a − b: [n]`` (:func:`scipy.stats.bootstrap`).

    The pair is the unit that is resampled (a seed gives both scores), ``n_boot`` replicates;
    ``method`` is ``"bca"`` (bias-corrected and accelerated) or ``"percentile"``. Both under-cover
    at a few seeds (:data:`CI_COVERAGE`); the headline uses :func:`paired_t_ci` unless asked otherwise.

    Returns ``(diff_mean, lo, hi)`` with ``diff_mean`` the observed mean difference. With
    n = 0 everything is NaN; with n = 1 the difference is reported but the interval is NaN
    (one pair carries no information about spread).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if method not in ("bca", "percentile"):
        raise ValueError(f"unknown bootstrap CI method '{method}'; choose one of: bca, percentile")
    d, settled = _paired_differences(a, b)
    if settled is not None:
        return settled
    diff = float(d.mean())
    res = _st.bootstrap((d,), np.mean, n_resamples=int(n_boot), confidence_level=level,
                        method="BCa" if method == "bca" else "percentile", rng=np.random.default_rng(seed),
                        batch=max(1, _CHUNK_ELEMS // d.size))   # at most _CHUNK_ELEMS resampled numbers at a time
    lo, hi = res.confidence_interval
    return diff, float(lo), float(hi)


def paired_test(a, b, method: str = "wilcoxon", seed: int = 0, *, n_perm: int = _N_PERM) -> float:
    """Two-sided p-value for "a and b differ" (``a, b: [n]`` paired by position); NaN when no pair is left.

    - ``"wilcoxon"``: :func:`scipy.stats.wilcoxon` on ``a − b`` with scipy's defaults
      (``zero_method="wilcox"`` drops zero differences; ``method="auto"`` is exact for
      n ≤ 50 without ties and an exhaustive permutation for n ≤ 13 with ties). All-zero
      differences give p = 1.0 (scipy would return NaN: there is no evidence of a difference).
    - ``"permutation"``: sign-flip test of ``|mean(a − b)|`` (H0: d symmetric about 0) by
      :func:`scipy.stats.permutation_test`: all 2^n flips are enumerated (exact) when
      n ≤ ``_EXACT_PERM_MAX_N``, otherwise ``n_perm`` seeded random flips with
      p = (1 + hits) / (1 + n_perm), never 0 (Phipson & Smyth 2010). With
      ``alternative="greater"`` on |mean|, flips as extreme in either direction count, and scipy
      counts sums equal to the observed one up to rounding as "as extreme".

    With n pairs and no ties neither test can go below 2 / 2^n (5 seeds: 0.0625).
    """
    a, b, _ = _paired(a, b)
    d = a - b
    if d.size == 0:
        return math.nan
    if np.all(d == 0):
        return 1.0
    if method == "wilcoxon":
        return float(_st.wilcoxon(d, alternative="two-sided").pvalue)
    if method != "permutation":
        raise ValueError(f"unknown paired test '{method}'; choose one of: permutation, wilcoxon")
    n = d.size
    res = _st.permutation_test(
        (d,), lambda x, axis: np.abs(np.mean(x, axis=axis)), permutation_type="samples", vectorized=True,
        alternative="greater", n_resamples=2**n if n <= _EXACT_PERM_MAX_N else int(n_perm),
        rng=np.random.default_rng(seed), batch=max(1, _CHUNK_ELEMS // n))
    return float(res.pvalue)


def effect_size_paired(a, b) -> float:
    """Cohen's d_z = mean(d) / sd(d) of the paired differences ``d = a − b`` (sd: ddof=1). Edge cases:

    - n < 2: NaN (no spread can be estimated);
    - every difference exactly 0: 0.0 (no effect, rather than 0/0);
    - a constant nonzero difference (spread at rounding level): ±inf — every seed agrees
      exactly; :func:`compare_paired` adds a note so the report does not print a bare "inf".
    """
    a, b, _ = _paired(a, b)
    d = a - b
    if d.size < 2:
        return math.nan
    if np.all(d == 0):
        return 0.0
    if _is_constant(d):
        return math.copysign(math.inf, float(d.mean()))
    return float(d.mean() / d.std(ddof=1))


def _p_floor(d: np.ndarray, method: str) -> float:
    """Smallest two-sided p the test can return for these differences (no ties assumed)."""
    k = int(np.count_nonzero(d))  # zero differences carry no sign information
    if k == 0:
        return 1.0
    if method == "permutation" and d.size > _EXACT_PERM_MAX_N:
        return 1.0 / (1.0 + _N_PERM)
    return min(1.0, 2.0 / 2.0**k)


def compare_paired(a, b, *, min_n: int = 3, n_boot: int = 10000, seed: int = 0, method: str = "wilcoxon",
                   level: float = 0.95, ci: str = DEFAULT_CI) -> dict:
    """The headline comparison of METHODS §9 in one call: score A vs score B across seeds.

    ``a, b: [n_seeds]`` (e.g. FLOPs-AUC of the best local and the best target score per
    seed), paired by position. Returns a dict:

    - ``n``: pairs used; ``mean_a``, ``mean_b``, ``diff`` (= mean(a − b));
    - ``ci_lo``, ``ci_hi``: CI of ``diff`` at ``level`` (``ci``: ``"t"``, the Student t interval,
      or the bootstrap ``"bca"`` / ``"percentile"``, :func:`paired_ci`); ``ci_method``: which;
    - ``p_value``: two-sided p from :func:`paired_test` with ``method``;
    - ``effect_size``: Cohen's d_z (:func:`effect_size_paired`);
    - ``test``: the test used; ``p_min``: the smallest p that test can reach with these
      pairs (5 seeds: 0.0625, so "p = 0.0625" may be the strongest possible result);
    - ``note``: "" when every number is meaningful, otherwise what the report should print
      or add (too few seeds, dropped NaN pairs, an infinite effect size).

    With fewer than ``min_n`` pairs the CI, p and effect size are NaN and ``note`` says
    ``"n=2 < 3 seeds: the paired test is not possible"``; the means are still given.
    """
    if method not in ("wilcoxon", "permutation"):
        raise ValueError(f"unknown paired test '{method}'; choose one of: permutation, wilcoxon")
    if ci not in CI_METHODS:
        raise ValueError(f"unknown CI method '{ci}'; choose one of: {', '.join(CI_METHODS)}")
    a, b, dropped = _paired(a, b)
    n = int(a.size)
    d = a - b
    notes: list[str] = []
    nan = math.nan
    out = {"n": n, "mean_a": float(a.mean()) if n else nan, "mean_b": float(b.mean()) if n else nan,
           "diff": float(d.mean()) if n else nan, "ci_lo": nan, "ci_hi": nan, "p_value": nan, "effect_size": nan,
           "test": method, "ci_method": ci, "p_min": nan, "note": ""}
    if n < min_n:
        notes.append(f"n={n} < {min_n} seeds: the paired test is not possible")
    else:
        _, lo, hi = paired_ci(a, b, method=ci, level=level, n_boot=n_boot, seed=seed)
        es = effect_size_paired(a, b)
        out.update(ci_lo=lo, ci_hi=hi, p_value=paired_test(a, b, method=method, seed=seed), effect_size=es,
                   p_min=_p_floor(d, method))
        if math.isinf(es):
            notes.append("the difference is the same in every seed: effect size is infinite")
    if dropped:
        notes.append(f"{dropped} pair(s) with a missing value dropped")
    out["note"] = "; ".join(notes)
    return out


def holm(pvalues) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values, in the input order.

    ``pvalues: [m]``. NaN entries stay NaN and do not count towards m. Adjusted
    p_(i) = max_{j ≤ i} min(1, (m − j + 1) · p_(j)) over the ascending order.
    """
    p = _vec(pvalues, "pvalues")
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out


# ----------------------------------------------------------------------------- regression


def _r2_point(y: np.ndarray, X: np.ndarray) -> float:
    """R² of OLS ``y ~ X`` (X includes the intercept column)."""
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ beta
    sst = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(resid @ resid) / sst if sst > 0 else math.nan


def _r2_weighted(y: np.ndarray, X: np.ndarray, W: np.ndarray) -> np.ndarray:
    """R² of weighted OLS for each row of ``W``.

    ``y: [N]``, ``X: [N, k]`` (intercept included), ``W: [B, N]`` bootstrap counts.
    Resampling rows with replacement is the same as OLS weighted by how often each row was
    drawn, so all B fits are batched normal equations ``[B, k, k]``. ``pinv`` gives the
    minimum-norm solution when a resample is rank-deficient, whose fitted values are still
    the least-squares ones. Returns ``[B]`` (NaN where the resample has constant y).
    """
    k = X.shape[1]
    G = (W @ (X[:, :, None] * X[:, None, :]).reshape(-1, k * k)).reshape(-1, k, k)  # [B,k,k]
    r = W @ (X * y[:, None])  # [B, k]
    beta = np.einsum("bij,bj->bi", np.linalg.pinv(G, hermitian=True), r)
    resid = y[None, :] - beta @ X.T  # [B, N]
    ybar = (W @ y) / W.sum(axis=1)
    sst = np.einsum("bn,bn->b", W, (y[None, :] - ybar[:, None]) ** 2)
    ssr = np.einsum("bn,bn->b", W, resid**2)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sst > 0, 1.0 - ssr / sst, np.nan)


def incremental_r2(y, base_X, extra_X, n_boot: int = 2000, seed: int = 0, level: float = 0.95, strata=None) -> dict:
    """Does ``extra_X`` explain ``y`` beyond ``base_X``? ΔR² of nested OLS fits with a CI.

    ``y: [N]`` (e.g. lesion damage per channel), ``base_X: [N] or [N, p]`` (e.g.
    ``input_capture``, ``task_info``), ``extra_X: [N] or [N, q]`` (e.g. ``full_explained``,
    ``hull_score``). Rows with a NaN anywhere are dropped. Both models get an intercept.
    Columns are standardised before fitting (R² is unchanged; the batched normal equations
    are better conditioned).

    Returns a dict: ``n``, ``r2_base``, ``r2_full``, ``delta_r2`` (= r2_full − r2_base),
    ``delta_r2_adj`` (difference of adjusted R², which removes the ≈ q/N that pure noise
    adds), ``ci_lo``, ``ci_hi`` (percentile bootstrap over rows of ``delta_r2``, ``n_boot``
    replicates, both models refitted on each resample), ``ci_adj_lo``, ``ci_adj_hi`` (the same
    for ``delta_r2_adj``), ``p_f`` (nested-model F test, assumes homoscedastic normal
    errors), ``n_boot``. Everything but ``n`` is NaN when N ≤ p + q + 1 or y is constant.

    Read the plain CI as a size, not as a test: nested OLS never loses R², so every
    bootstrap ΔR² is ≥ 0 and ``ci_lo`` sits above 0 even when ``extra_X`` is pure noise. For
    "do the peer terms add anything?" use ``p_f`` or whether ``ci_adj_lo`` > 0.

    ``strata: [N]`` (optional labels, e.g. the layer of each channel): the bootstrap resamples
    within each stratum, keeping its size, since rows of one stratum share a scale and are not
    exchangeable with the others'.
    """
    yv = _vec(y, "y")
    N = yv.size
    B = _as_2d(base_X, N, "base_X")
    E = _as_2d(extra_X, N, "extra_X")
    keep = ~(np.isnan(yv) | np.isnan(B).any(axis=1) | np.isnan(E).any(axis=1))
    yv, B, E = yv[keep], B[keep], E[keep]
    groups = None
    if strata is not None:
        labels = np.asarray(strata)[keep]
        groups = [np.flatnonzero(labels == s) for s in dict.fromkeys(labels.tolist())]
    n = int(yv.size)
    nan = math.nan
    out = {"n": n, "r2_base": nan, "r2_full": nan, "delta_r2": nan, "delta_r2_adj": nan, "ci_lo": nan, "ci_hi": nan,
           "ci_adj_lo": nan, "ci_adj_hi": nan, "p_f": nan, "n_boot": int(n_boot)}
    if n <= B.shape[1] + E.shape[1] + 1 or np.ptp(yv) == 0:
        return out

    def _std(M):
        sd = M.std(axis=0)
        return (M - M.mean(axis=0)) / np.where(sd > 0, sd, 1.0)

    Xb = np.hstack([np.ones((n, 1)), _std(B)])
    Xf = np.hstack([Xb, _std(E)])
    ys = (yv - yv.mean()) / yv.std()
    r2b, r2f = _r2_point(ys, Xb), _r2_point(ys, Xf)
    # Degrees of freedom from the ranks, so a constant or duplicated column costs nothing.
    kb = int(np.linalg.matrix_rank(Xb)) - 1
    kf = int(np.linalg.matrix_rank(Xf)) - 1
    adj = lambda r2, k: 1.0 - (1.0 - r2) * (n - 1) / (n - k - 1)  # noqa: E731
    df1, df2 = kf - kb, n - kf - 1
    if df1 == 0:
        p_f = 1.0  # extra_X lies in the span of base_X: nothing to add
    elif r2f < 1.0:
        f = ((r2f - r2b) / df1) / ((1.0 - r2f) / df2)
        p_f = float(_st.f.sf(max(f, 0.0), df1, df2))
    else:
        p_f = 0.0 if r2f > r2b else 1.0
    out.update(r2_base=r2b, r2_full=r2f, delta_r2=r2f - r2b, delta_r2_adj=adj(r2f, kf) - adj(r2b, kb), p_f=p_f)

    # Hand-written rather than scipy.stats.bootstrap, for two reasons: the resampling is stratified
    # (scipy resamples the whole sample only) and the B refits are batched weighted normal
    # equations (scipy would call the statistic on B resampled copies of the [N, k] design, one
    # lstsq each). Percentile interval: BCa's jackknife would cost N more refits per call.
    # Replicates are drawn in batches of at most _CHUNK_ELEMS numbers.
    rng = np.random.default_rng(seed)
    deltas, deltas_adj = [], []
    step = max(1, _CHUNK_ELEMS // max(1, n * (Xf.shape[1] + 2)))
    for done in range(0, int(n_boot), step):
        m = min(step, int(n_boot) - done)
        if groups is None:
            idx = rng.integers(0, n, size=(m, n))
        else:   # each stratum resampled from its own rows, its size kept
            idx = np.concatenate([g[rng.integers(0, g.size, size=(m, g.size))] for g in groups], axis=1)
        flat = (np.arange(m)[:, None] * n + idx).ravel()
        W = np.bincount(flat, minlength=m * n).reshape(m, n).astype(float)  # draw counts
        bf, bb = _r2_weighted(ys, Xf, W), _r2_weighted(ys, Xb, W)
        deltas.append(bf - bb)
        deltas_adj.append(adj(bf, kf) - adj(bb, kb))
    alpha = (1.0 - level) / 2.0
    for key, parts in (("ci", deltas), ("ci_adj", deltas_adj)):
        boot = np.concatenate(parts)
        boot = boot[~np.isnan(boot)]  # resamples with constant y
        if boot.size:
            lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
            out.update({f"{key}_lo": float(lo), f"{key}_hi": float(hi)})
    return out


# ----------------------------------------------------------------------------- correlations


def spearman(x, y) -> tuple[float, float]:
    """Spearman ``(rho, p)`` of ``x, y: [n]`` over the pairs without NaN (average ranks for ties).

    The package's one Spearman: the alignment columns of ``layers.csv``, propagation, the lesion
    correlations and the synthetic linear-Gaussian study all call it, so they agree on ties and on
    degenerate input. ``(nan, nan)`` with fewer than 3 pairs or when either side is constant: a
    constant side has no rank order, so its correlation is undefined, not 0 (scipy would warn and
    return NaN anyway; here it is silent and explicit).
    """
    x, y, _ = _paired(x, y)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    res = _st.spearmanr(x, y)
    return float(res.statistic), float(res.pvalue)


def binned_spearman(damage, predictors: Mapping[str, Sequence[float]], bin_by, n_bins: int = 5):
    """Within quantile bins of ``bin_by``, Spearman between ``damage`` and each predictor.

    ``damage: [N]`` (lesion damage per channel), ``predictors``: name → ``[N]`` (a dict or
    a ``pandas.DataFrame``, e.g. ``input_capture``, ``hull_score``, ``taylor``), ``bin_by:
    [N]`` (``task_info``). Binning by task information holds it roughly fixed, so a
    within-bin correlation says what a predictor adds at a given task relevance (METHODS
    §8). Rows with NaN damage or NaN ``bin_by`` are dropped before binning; NaN in one
    predictor only drops that predictor's pairs.

    Bins are by rank, equal counts, tied values sharing a bin: a tied block goes to the bin of its
    lowest rank, so bin 0 always holds the smallest values; a large tied block can leave a later
    bin empty (``pd.qcut`` instead fails on the repeated edges that many equal values, e.g. zero
    task information, produce).

    Returns a ``pandas.DataFrame`` in long form, one row per (bin, predictor), with columns
    ``bin`` (0 = lowest ``bin_by``), ``predictor``, ``rho``, ``p``, ``n`` (pairs used),
    ``bin_lo``, ``bin_hi`` (range of ``bin_by`` in the bin).
    """
    import pandas as pd  # only here: the rest of the module needs numpy/scipy alone

    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    dmg = _vec(damage, "damage")
    by = _vec(bin_by, "bin_by")
    if by.shape != dmg.shape:
        raise ValueError(f"bin_by has {by.size} values, damage has {dmg.size}")
    preds = {str(k): _vec(predictors[k], str(k)) for k in predictors}
    for name, v in preds.items():
        if v.shape != dmg.shape:
            raise ValueError(f"predictor '{name}' has {v.size} values, damage has {dmg.size}")
    keep = ~(np.isnan(dmg) | np.isnan(by))
    dmg, by = dmg[keep], by[keep]
    preds = {k: v[keep] for k, v in preds.items()}
    rows = []
    if dmg.size:
        r = _st.rankdata(by, method="min")
        bins = np.minimum(((r - 0.5) / by.size * n_bins).astype(int), n_bins - 1)
        for b in range(n_bins):
            sel = bins == b
            if not sel.any():
                continue
            lo, hi = float(by[sel].min()), float(by[sel].max())
            for name, v in preds.items():
                ok = sel & ~np.isnan(v)
                rho, p = spearman(dmg[ok], v[ok])
                rows.append({"bin": b, "predictor": name, "rho": rho, "p": p, "n": int(ok.sum()),
                             "bin_lo": lo, "bin_hi": hi})
    return pd.DataFrame(rows, columns=["bin", "predictor", "rho", "p", "n", "bin_lo", "bin_hi"])
