"""Tests for axes_pipeline.stats: known answers, edge cases, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st

from axes_pipeline import stats as S
from axes_pipeline.stats import compare_paired, flops_auc, holm

# ----------------------------------------------------------------------------- FLOPs-AUC


def test_flops_auc_linear_is_exact_midpoint_mean():
    # acc = 0.9 − 0.5 x on [0.1, 0.9]: mean over the span = acc at the midpoint 0.5 = 0.65.
    x = np.linspace(0.1, 0.9, 9)
    acc = 0.9 - 0.5 * x
    assert flops_auc(x, acc) == pytest.approx(0.65, abs=1e-12)
    # order of the points does not matter
    perm = np.random.default_rng(1).permutation(x.size)
    assert flops_auc(x[perm], acc[perm]) == pytest.approx(0.65, abs=1e-12)


def test_flops_auc_piecewise_by_hand():
    # trapezoids: [0,0.5]: (0.8+0.6)/2*0.5 = 0.35; [0.5,1]: (0.6+0.2)/2*0.5 = 0.2 → 0.55 / 1
    assert flops_auc([0.0, 0.5, 1.0], [0.8, 0.6, 0.2]) == pytest.approx(0.55)
    assert S.flops_auc_relative([0.0, 0.5, 1.0], [0.8, 0.6, 0.2], 0.8) == pytest.approx(
        0.55 / 0.8
    )


def test_flops_auc_repeats_averaged_and_nan_dropped():
    # two values at x = 0.5 average to 0.6; a NaN point is ignored
    got = flops_auc([0.0, 0.5, 0.5, 1.0, 0.7], [0.8, 0.5, 0.7, 0.2, np.nan])
    assert got == pytest.approx(0.55)


def test_flops_auc_needs_two_distinct_x():
    with pytest.raises(ValueError, match="2 distinct"):
        flops_auc([0.3, 0.3], [0.5, 0.6])
    with pytest.raises(ValueError):
        S.flops_auc_relative([0.0, 1.0], [0.5, 0.4], 0.0)


# ----------------------------------------------------------------------------- summaries


def test_mean_sd():
    m, sd, n = S.mean_sd([1.0, 2.0, np.nan, 3.0])
    assert (m, n) == (2.0, 3) and sd == pytest.approx(1.0)
    m, sd, n = S.mean_sd([4.0])
    assert m == 4.0 and math.isnan(sd) and n == 1
    m, sd, n = S.mean_sd([])
    assert math.isnan(m) and math.isnan(sd) and n == 0


# ----------------------------------------------------------------------------- paired


def test_bootstrap_ci_constant_positive_difference_above_zero():
    b = np.array([0.61, 0.55, 0.70, 0.58, 0.66])
    a = b + 0.02
    diff, lo, hi = S.paired_bootstrap_ci(a, b, n_boot=2000, seed=3)
    assert diff == pytest.approx(0.02)
    assert 0 < lo <= hi
    assert lo == pytest.approx(0.02) and hi == pytest.approx(0.02)


def test_bootstrap_ci_noisy_positive_difference():
    rng = np.random.default_rng(0)
    b = rng.normal(size=30)
    a = b + 1.0 + 0.1 * rng.normal(size=30)
    diff, lo, hi = S.paired_bootstrap_ci(a, b, seed=0)
    assert 0 < lo < diff < hi


def test_identical_scores_give_p_one_and_zero_ci():
    a = np.array([0.61, 0.55, 0.70, 0.58, 0.66])
    assert S.paired_test(a, a.copy(), method="wilcoxon") == 1.0
    assert S.paired_test(a, a.copy(), method="permutation") == 1.0
    assert S.paired_bootstrap_ci(a, a.copy()) == (0.0, 0.0, 0.0)
    assert S.effect_size_paired(a, a.copy()) == 0.0
    res = compare_paired(a, a.copy())
    assert res["p_value"] == 1.0 and res["ci_lo"] == 0.0 and res["ci_hi"] == 0.0


def test_permutation_exact_n5_all_positive():
    d = np.array([0.3, 0.1, 0.4, 0.15, 0.9])
    assert S.paired_test(d, np.zeros(5), method="permutation") == pytest.approx(2 / 32)
    # also with ties in |d|: only the all-plus and all-minus flips reach |sum| = 5
    assert S.paired_test(np.ones(5), np.zeros(5), method="permutation") == pytest.approx(2 / 32)


def test_permutation_exact_matches_enumeration_by_hand():
    # d = [1, 2, -3]: sums over the 8 flips are ±0, ±2, ±4, ±6; |obs| = 0 → every flip counts
    assert S.paired_test([1.0, 2.0, -3.0], [0, 0, 0], method="permutation") == 1.0
    # d = [1, 2, 4]: |sums| = 7,5,3,1 each twice; obs 7 → 2/8
    assert S.paired_test([1.0, 2.0, 4.0], [0, 0, 0], method="permutation") == 0.25


def test_permutation_monte_carlo_large_n_and_seeded():
    rng = np.random.default_rng(5)
    a = rng.normal(size=40)
    b = a - 0.05 + 0.5 * rng.normal(size=40)
    p1 = S.paired_test(a, b, method="permutation", seed=1)
    p2 = S.paired_test(a, b, method="permutation", seed=1)
    assert p1 == p2 and 0 < p1 <= 1
    # Monte Carlo agrees with the t-test roughly (same hypothesis, large n)
    assert abs(p1 - st.ttest_rel(a, b).pvalue) < 0.1
    # strong effect: the (1 + hits)/(1 + n_perm) floor
    assert S.paired_test(a + 10, a, method="permutation", n_perm=999) == pytest.approx(1 / 1000)


def test_wilcoxon_matches_scipy():
    rng = np.random.default_rng(2)
    for n in (5, 8, 20, 60):
        a = rng.normal(size=n)
        b = a + rng.normal(0.3, 1.0, size=n)
        assert S.paired_test(a, b) == pytest.approx(st.wilcoxon(a, b).pvalue, rel=1e-12)
    # n = 5 all positive differences: exact 2/32
    assert S.paired_test([1, 2, 3, 4, 5.0], [0, 0, 0, 0, 0]) == pytest.approx(0.0625)


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown paired test"):
        S.paired_test([1, 2, 3], [0, 0, 0], method="ttest")
    with pytest.raises(ValueError, match="equal length"):
        S.paired_test([1, 2, 3], [0, 0])


def test_effect_size():
    a = np.array([1.0, 2.0, 3.0, 5.0])
    b = np.zeros(4)
    assert S.effect_size_paired(a, b) == pytest.approx(a.mean() / a.std(ddof=1))
    # constant nonzero difference (with rounding noise from a + c) → ±inf
    base = np.array([0.61, 0.55, 0.70, 0.58, 0.66])
    assert S.effect_size_paired(base + 0.1, base) == math.inf
    assert S.effect_size_paired(base - 0.1, base) == -math.inf
    assert math.isnan(S.effect_size_paired([1.0], [0.0]))


def test_compare_paired_full():
    b = np.array([0.61, 0.55, 0.70, 0.58, 0.66])
    a = b + np.array([0.02, 0.03, 0.01, 0.025, 0.015])
    res = compare_paired(a, b, n_boot=2000, seed=0)
    assert set(res) >= {"n", "mean_a", "mean_b", "diff", "ci_lo", "ci_hi", "p_value",
                        "effect_size", "test", "note"}  # fmt: skip
    assert res["n"] == 5 and res["test"] == "wilcoxon" and res["note"] == ""
    assert res["diff"] == pytest.approx(0.02)
    assert res["mean_a"] == pytest.approx(a.mean()) and res["mean_b"] == pytest.approx(b.mean())
    assert 0 < res["ci_lo"] < res["diff"] < res["ci_hi"]
    assert res["p_value"] == pytest.approx(0.0625) and res["p_min"] == pytest.approx(0.0625)
    assert res["effect_size"] > 0
    perm = compare_paired(a, b, method="permutation")
    assert perm["test"] == "permutation" and perm["p_value"] == pytest.approx(0.0625)


def test_compare_paired_too_few_seeds():
    res = compare_paired([0.7, 0.72, np.nan], [0.6, 0.65, 0.5])
    assert res["n"] == 2
    assert res["note"].startswith("n=2 < 3 seeds: the paired test is not possible")
    assert "1 pair(s) with a missing value dropped" in res["note"]
    for key in ("ci_lo", "ci_hi", "p_value", "effect_size"):
        assert math.isnan(res[key])
    assert res["diff"] == pytest.approx(0.085)
    exact = compare_paired([0.7, 0.72], [0.6, 0.65])
    assert exact["note"] == "n=2 < 3 seeds: the paired test is not possible"


def test_compare_paired_infinite_effect_note():
    b = np.array([0.61, 0.55, 0.70])
    res = compare_paired(b + 0.05, b)
    assert res["effect_size"] == math.inf and "infinite" in res["note"]
    assert res["ci_lo"] > 0


def test_determinism_given_seed():
    rng = np.random.default_rng(11)
    a, b = rng.normal(size=7), rng.normal(size=7)
    assert S.paired_bootstrap_ci(a, b, seed=4) == S.paired_bootstrap_ci(a, b, seed=4)
    assert S.paired_bootstrap_ci(a, b, seed=4) != S.paired_bootstrap_ci(a, b, seed=5)
    assert compare_paired(a, b, seed=9) == compare_paired(a, b, seed=9)
    y, x1, x2 = rng.normal(size=(3, 50))
    assert S.incremental_r2(y, x1, x2, n_boot=200, seed=2) == S.incremental_r2(
        y, x1, x2, n_boot=200, seed=2
    )


def test_bootstrap_chunking_does_not_change_draws(monkeypatch):
    rng = np.random.default_rng(12)
    a, b = rng.normal(size=9), rng.normal(size=9)
    whole = S.paired_bootstrap_ci(a, b, n_boot=3000, seed=1)
    monkeypatch.setattr(S, "_CHUNK_ELEMS", 9 * 7)  # chunks of 7 replicates
    assert S.paired_bootstrap_ci(a, b, n_boot=3000, seed=1) == pytest.approx(whole, rel=0, abs=0)


# ----------------------------------------------------------------------------- holm


def test_holm_by_hand():
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → monotone 0.06
    got = holm([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(got, [0.03, 0.06, 0.06, 0.02])
    got = holm([0.5, np.nan, 0.4])  # m = 2; capped at 1
    np.testing.assert_allclose(got, [0.8, np.nan, 0.8])
    np.testing.assert_allclose(holm([0.9, 0.6]), [1.0, 1.0])
    assert holm([]).shape == (0,)


# ----------------------------------------------------------------------------- regression


def test_incremental_r2_noise_extra_is_near_zero():
    rng = np.random.default_rng(0)
    n = 400
    base = rng.normal(size=(n, 2))
    y = base @ [1.0, -0.5] + rng.normal(size=n)
    res = S.incremental_r2(y, base, rng.normal(size=(n, 2)), n_boot=500, seed=0)
    assert res["n"] == n
    assert 0 <= res["delta_r2"] < 0.02
    assert abs(res["delta_r2_adj"]) < 0.01
    assert res["ci_lo"] <= res["delta_r2"] <= res["ci_hi"] < 0.05
    assert res["ci_adj_lo"] < 0 < res["ci_adj_hi"]  # the adjusted CI straddles 0
    assert res["p_f"] > 0.01


def test_incremental_r2_stratified_bootstrap():
    rng = np.random.default_rng(1)
    n = 300
    base, extra = rng.normal(size=(n, 2)), rng.normal(size=(n, 1))
    y = base @ [1.0, 0.5] + 0.3 * extra[:, 0] + rng.normal(size=n)
    plain = S.incremental_r2(y, base, extra, n_boot=400, seed=3)
    # one stratum is the plain bootstrap, draw for draw
    assert S.incremental_r2(y, base, extra, n_boot=400, seed=3, strata=np.zeros(n)) == plain
    layered = S.incremental_r2(y, base, extra, n_boot=400, seed=3, strata=np.arange(n) % 3)
    for k in ("n", "r2_base", "r2_full", "delta_r2", "delta_r2_adj", "p_f"):   # the fit itself is unchanged
        assert layered[k] == plain[k]
    assert layered["ci_lo"] <= layered["delta_r2"] <= layered["ci_hi"] and layered["ci_lo"] != plain["ci_lo"]


def test_incremental_r2_known_value():
    # y = x1 + x2 + e, all independent with unit variance: R²_base = 1/3, R²_full = 2/3
    rng = np.random.default_rng(1)
    n = 3000
    x1, x2, e = rng.normal(size=(3, n))
    y = x1 + x2 + e
    res = S.incremental_r2(y, x1, x2, n_boot=300, seed=0)
    assert res["r2_base"] == pytest.approx(1 / 3, abs=0.04)
    assert res["r2_full"] == pytest.approx(2 / 3, abs=0.03)
    assert res["delta_r2"] == pytest.approx(1 / 3, abs=0.04)
    assert res["ci_lo"] < res["delta_r2"] < res["ci_hi"]
    assert res["ci_lo"] > 0.25 and res["ci_adj_lo"] > 0.25 and res["p_f"] < 1e-10


def test_incremental_r2_exact_against_lstsq_and_nan_rows():
    rng = np.random.default_rng(3)
    n = 60
    base = rng.normal(size=(n, 2))
    extra = rng.normal(size=n)
    y = base[:, 0] + 0.3 * extra + rng.normal(size=n)
    y_nan = y.copy()
    y_nan[[3, 7]] = np.nan

    def r2(X, yy):
        X = np.column_stack([np.ones(len(yy)), X])
        beta, *_ = np.linalg.lstsq(X, yy, rcond=None)
        r = yy - X @ beta
        return 1 - r @ r / np.sum((yy - yy.mean()) ** 2)

    keep = ~np.isnan(y_nan)
    res = S.incremental_r2(y_nan, base, extra, n_boot=100)
    assert res["n"] == n - 2
    want = r2(np.column_stack([base, extra])[keep], y[keep]) - r2(base[keep], y[keep])
    assert res["delta_r2"] == pytest.approx(want, abs=1e-10)


def test_incremental_r2_batched_matches_loop():
    # the weighted normal-equation bootstrap equals refitting on resampled rows
    rng = np.random.default_rng(4)
    n = 25
    X = np.column_stack([np.ones(n), rng.normal(size=(n, 2))])
    y = X[:, 1] + rng.normal(size=n)
    idx = rng.integers(0, n, size=(5, n))
    W = np.stack([np.bincount(i, minlength=n) for i in idx]).astype(float)
    got = S._r2_weighted(y, X, W)
    want = [S._r2_point(y[i], X[i]) for i in idx]
    np.testing.assert_allclose(got, want, atol=1e-10)


def test_incremental_r2_degenerate():
    res = S.incremental_r2([1.0, 2.0, 3.0], [1.0, 0.0, 2.0], [0.5, 0.1, 0.2])
    assert res["n"] == 3 and math.isnan(res["delta_r2"])
    res = S.incremental_r2(np.ones(10), np.arange(10.0), np.arange(10.0) ** 2)
    assert math.isnan(res["r2_base"])
    # extra in the span of base: adds nothing, F test p = 1
    x = np.random.default_rng(6).normal(size=(2, 30))
    res = S.incremental_r2(x[0], x[1], 2 * x[1] + 1, n_boot=50)
    assert res["delta_r2"] == pytest.approx(0, abs=1e-12) and res["p_f"] == 1.0


# ----------------------------------------------------------------------------- correlations


def test_spearman_nan_safe():
    x = np.array([1.0, 2.0, np.nan, 4.0, 5.0])
    y = np.array([2.0, 4.0, 1.0, np.nan, 10.0])
    rho, p = S.spearman(x, y)
    want = st.spearmanr([1, 2, 5], [2, 4, 10])
    assert rho == pytest.approx(want.statistic) and p == pytest.approx(want.pvalue)
    assert all(math.isnan(v) for v in S.spearman([1.0, 2.0], [3.0, 4.0]))
    assert all(math.isnan(v) for v in S.spearman([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]))


def test_binned_spearman_recovers_sign():
    rng = np.random.default_rng(0)
    n = 1000
    task = rng.normal(size=n)
    good = rng.normal(size=n)  # raises damage at any task level
    bad = rng.normal(size=n)  # lowers it
    noise = rng.normal(size=n)
    damage = 3.0 * task + good - bad + 0.5 * rng.normal(size=n)
    noise[::50] = np.nan
    df = S.binned_spearman(damage, {"good": good, "bad": bad, "noise": noise}, task, n_bins=5)
    assert list(df.columns) == ["bin", "predictor", "rho", "p", "n", "bin_lo", "bin_hi"]
    assert len(df) == 15 and sorted(df["bin"].unique()) == [0, 1, 2, 3, 4]
    assert (df.loc[df.predictor == "good", "rho"] > 0.3).all()
    assert (df.loc[df.predictor == "bad", "rho"] < -0.3).all()
    assert (df.loc[df.predictor == "noise", "rho"].abs() < 0.25).all()
    assert df.loc[df.predictor == "good", "n"].sum() == n
    assert df.loc[df.predictor == "noise", "n"].sum() == n - 20
    # bins are ordered by task information and do not overlap
    g = df[df.predictor == "good"].sort_values("bin")
    assert (g["bin_hi"].to_numpy()[:-1] < g["bin_lo"].to_numpy()[1:]).all()


def test_binned_spearman_ties_and_dataframe_predictors():
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(1)
    n = 200
    task = np.where(rng.random(n) < 0.4, 0.0, rng.random(n))  # 40% tied zeros
    x = rng.normal(size=n)
    damage = x + 0.1 * rng.normal(size=n)
    df = S.binned_spearman(damage, pd.DataFrame({"x": x}), task, n_bins=5)
    # tied task values share a bin, so there may be fewer than 5 non-empty bins
    zero_bins = df[(df.bin_lo == 0.0)]
    assert len(zero_bins) == 1 and zero_bins["n"].iloc[0] >= int(0.3 * n)
    assert zero_bins["bin"].iloc[0] == 0 and zero_bins["bin_hi"].iloc[0] == 0.0
    assert df["n"].sum() == n and (df["rho"] > 0.8).all()


def test_paper_reference():
    ref = S.PAPER_REFERENCE
    assert ref["hull_size_mean"]["trained"] == (4.27, 0.04)
    assert ref["hull_saturated_frac"]["init"] == (0.067, 0.006)
    assert ref["s3_s2"] == {"init": (0.192, 0.017), "trained": (0.381, 0.008)}


# ----------------------------------------------------------------------------- shared-grid FLOPs-AUC


def test_identical_curves_with_different_reach_get_one_auc_over_the_shared_grid():
    import pandas as pd

    def acc(x):
        return 0.9 - 0.8 * np.asarray(x) ** 2          # one accuracy curve

    short, far = np.array([0.0, 0.2, 0.4, 0.6]), np.array([0.0, 0.2, 0.4, 0.6, 0.8, 0.9])
    # the old rule (each curve over its own span) gives the two scores different AUCs
    assert flops_auc(short, acc(short)) - flops_auc(far, acc(far)) > 0.1
    grid = S.shared_grid([0.1, 0.3, 0.5, 0.7, 0.9], reaches=[short.max(), far.max()])
    assert grid[0] == 0.0 and grid[-1] == pytest.approx(0.6)
    assert S.flops_auc_on_grid(short, acc(short), grid) == pytest.approx(S.flops_auc_on_grid(far, acc(far), grid))
    with pytest.raises(ValueError, match="not the grid"):            # never extrapolated
        S.flops_auc_on_grid(short, acc(short), [0.0, 0.9])

    # the same through grid_aucs in channel_fraction mode: achieved FLOPs differ, AUCs agree
    rows = [{"score": s, "draw": 0, "target_channels": t, "target_flops": np.nan, "achieved_flops": 1 - x,
             "acc": float(acc(x))} for s, xs in (("a", short[1:]), ("b", far[1:])) for t, x in zip([.9, .7, .5, .3, .2], xs)]
    res = S.grid_aucs(pd.DataFrame(rows), ["acc"], lambda k: {"acc": 0.9}, mode="channel_fraction", tolerance=0.005,
                      targets=[.9, .7, .5, .3, .2])
    assert res["aucs"][("a", 0)]["acc"] == pytest.approx(res["aucs"][("b", 0)]["acc"])
    assert res["grid"][-1] == pytest.approx(0.6) and res["note"] == ""


def test_grid_aucs_flops_mode_drops_off_target_points_and_keeps_the_grid():
    import pandas as pd

    targets = [0.9, 0.7, 0.5, 0.3]
    rows = [{"score": s, "draw": 0, "target_flops": t, "target_channels": np.nan,
             "achieved_flops": t + (0.05 if (s == "b" and t == 0.7) else 0.001), "acc": t}
            for s in ("a", "b") for t in targets]
    res = S.grid_aucs(pd.DataFrame(rows), ["acc"], lambda k: {"acc": 1.0}, mode="flops", tolerance=0.005,
                      targets=targets)
    assert res["off_target"] == 1 and res["grid"] == pytest.approx([0.0, 0.1, 0.3, 0.5, 0.7])
    # acc = 1 − removed on the grid: the dropped point is interpolated from its neighbours
    assert res["aucs"][("a", 0)]["acc"] == pytest.approx(1 - 0.35)
    assert res["aucs"][("b", 0)]["acc"] == pytest.approx(1 - 0.35)


def test_grid_aucs_with_one_target_gives_no_auc_and_says_why():
    import pandas as pd

    df = pd.DataFrame([{"score": "a", "draw": 0, "target_flops": 0.5, "target_channels": np.nan,
                        "achieved_flops": 0.5, "acc": 0.7}])
    res = S.grid_aucs(df, ["acc"], lambda k: {"acc": 0.9}, mode="flops", tolerance=0.005, targets=[0.5])
    assert res["aucs"] == {("a", 0): {"acc": None}} and res["grid"] is None
    assert "at least two targets" in res["note"] and "\n" not in res["note"]


# ----------------------------------------------------------------------------- scipy vs the former hand-written code


def _old_percentile_ci(d, n_boot, seed, level=0.95):
    """The hand-written percentile bootstrap this module used before scipy.stats.bootstrap."""
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    return np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])


def _old_signflip_exact(d):
    import itertools

    signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
    return float(np.mean(np.abs(signs @ d) >= abs(d.sum()) * (1 - 1e-12)))


@pytest.mark.parametrize("n", [5, 12, 40])
def test_scipy_bootstrap_agrees_with_former_percentile_within_mc_error(n):
    rng = np.random.default_rng(n)
    d = rng.normal(0.02, 0.01, size=n)
    old_lo, old_hi = _old_percentile_ci(d, 20000, seed=1)
    _, lo, hi = S.paired_bootstrap_ci(d, np.zeros(n), n_boot=20000, seed=2, method="percentile")
    # Monte-Carlo error of a 2.5% quantile of 20,000 draws is well below a tenth of the CI width
    width = old_hi - old_lo
    assert lo == pytest.approx(old_lo, abs=0.05 * width) and hi == pytest.approx(old_hi, abs=0.05 * width)
    # BCa: the same interval up to its skew correction (a mean of near-normal data is hardly skewed)
    _, blo, bhi = S.paired_bootstrap_ci(d, np.zeros(n), n_boot=20000, seed=2)
    assert blo == pytest.approx(old_lo, abs=0.15 * width) and bhi == pytest.approx(old_hi, abs=0.15 * width)


def test_bca_corrects_skew_and_methods_are_named():
    # one large difference among small ones: a right-skewed bootstrap distribution of the mean;
    # BCa moves both ends to the right of the percentile interval
    d = np.array([0.01, 0.012, 0.008, 0.011, 0.009, 0.010, 0.013, 0.2])
    _, plo, phi = S.paired_bootstrap_ci(d, np.zeros(8), n_boot=5000, seed=0, method="percentile")
    _, blo, bhi = S.paired_bootstrap_ci(d, np.zeros(8), n_boot=5000, seed=0, method="bca")
    assert blo > plo and bhi > phi
    assert compare_paired(d, np.zeros(8))["ci_method"] == "t"
    assert compare_paired(d, np.zeros(8), ci="bca")["ci_lo"] == pytest.approx(blo, rel=0.2)
    assert compare_paired(d, np.zeros(8), ci="percentile")["ci_lo"] == pytest.approx(plo, rel=0.2)
    with pytest.raises(ValueError, match="unknown bootstrap CI method"):
        S.paired_bootstrap_ci(d, np.zeros(8), method="studentized")
    with pytest.raises(ValueError, match="unknown CI method"):
        compare_paired(d, np.zeros(8), ci="bc")


def test_scipy_signflip_equals_former_enumeration():
    rng = np.random.default_rng(3)
    for n in (3, 6, 10):
        d = rng.normal(0.1, 1.0, size=n)
        assert S.paired_test(d, np.zeros(n), method="permutation") == pytest.approx(_old_signflip_exact(d), abs=1e-12)


@pytest.mark.parametrize("dist", ["normal", "student_t3", "laplace"])
@pytest.mark.parametrize("n", [5, 3, 10])
def test_default_interval_covers(dist, n):
    # METHODS §9: the headline interval holds its 95% at a few seeds. Null paired differences
    # (true mean 0), 20,000 samples: the Monte-Carlo SE of a 95% coverage is 0.15%, so ±2% is a
    # real bound. Heavy tails (t df=3, Laplace) make the t interval a little conservative (~96.5%).
    rng = np.random.default_rng([n, len(dist)])
    draw = {"normal": lambda s: rng.standard_normal(s), "student_t3": lambda s: rng.standard_t(3, s),
            "laplace": lambda s: rng.laplace(size=s)}[dist]
    d = draw((20000, n))
    assert S.DEFAULT_CI == "t"
    lo, hi = S.t_interval(d, 0.95)
    coverage = float(((lo <= 0) & (hi >= 0)).mean())
    assert abs(coverage - 0.95) <= 0.02, coverage
    # the one-sample function the headline calls gives the same interval as the vectorised one
    one = S.compare_paired(d[0], np.zeros(n))
    assert one["ci_method"] == "t" and (one["ci_lo"], one["ci_hi"]) == pytest.approx((lo[0], hi[0]), rel=1e-12)


def test_t_interval_matches_scipy_and_edge_cases():
    d = np.array([0.3, -0.1, 0.25, 0.05, 0.12])
    ref = st.t.interval(0.9, len(d) - 1, loc=d.mean(), scale=st.sem(d))
    diff, lo, hi = S.paired_t_ci(d, np.zeros(5), level=0.9)
    assert diff == pytest.approx(d.mean()) and (lo, hi) == pytest.approx(ref, rel=1e-12)
    assert S.paired_ci(d, np.zeros(5), method="t", level=0.9) == (diff, lo, hi)
    assert S.paired_t_ci([1.0], [0.5])[1:] == pytest.approx((np.nan, np.nan), nan_ok=True)
    assert S.paired_t_ci(d + 1, d) == pytest.approx((1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="unknown CI method"):
        S.paired_ci(d, d, method="studentized")


# ----------------------------------------------------------------------------- across seeds


def test_across_seeds_by_hand():
    # per-seed estimates 1, 2, 3: mean 2, sd 1, se 1/√3; t_{0.975, 2} = 4.3026527297 (tables);
    # t = 2 / (1/√3) = 2√3, and with 2 degrees of freedom the two-sided p is 1 − t / √(2 + t²) exactly
    r = S.across_seeds([1.0, 2.0, 3.0])
    half = 4.3026527297 / math.sqrt(3)
    t = 2 * math.sqrt(3)
    assert (r["mean"], r["sd"], r["n"]) == (2.0, 1.0, 3)
    assert r["ci_lo"] == pytest.approx(2 - half, rel=1e-9) and r["ci_hi"] == pytest.approx(2 + half, rel=1e-9)
    assert r["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10)          # 0.0742
    # the interval excludes the null exactly when p < 0.05, at any null
    for null in (-1.0, -0.2, 0.0, 4.3, 4.5):
        r = S.across_seeds([1.0, 2.0, 3.0], null=null)
        assert (r["p"] < 0.05) == (not r["ci_lo"] <= null <= r["ci_hi"]), null


def test_across_seeds_is_not_an_average_of_seed_intervals():
    # three seeds whose own (within-seed) p-values and intervals would average to something else:
    # only the per-seed estimates go in, and the result is the t interval of those
    est = [-0.101, 0.151, -0.130]
    r = S.across_seeds(est)
    lo, hi = S.t_interval(np.array(est))
    assert (r["ci_lo"], r["ci_hi"]) == (pytest.approx(float(lo)), pytest.approx(float(hi)))
    assert r["ci_lo"] < 0 < r["ci_hi"] and S.change_verdict(r["ci_lo"], r["ci_hi"]) == "no clear change"
    assert r["p"] == pytest.approx(st.ttest_1samp(est, 0.0).pvalue, rel=1e-10)


def test_across_seeds_edge_cases():
    assert math.isnan(S.across_seeds([])["mean"]) and S.across_seeds([np.nan]).get("n") == 0
    one = S.across_seeds([0.3, np.nan])          # a missing seed is dropped, one seed has no interval
    assert one["n"] == 1 and one["mean"] == 0.3 and math.isnan(one["ci_lo"]) and math.isnan(one["p"])
    same = S.across_seeds([0.2, 0.2, 0.2])
    assert same["ci_lo"] == same["ci_hi"] == pytest.approx(0.2) and same["p"] == 0.0 and same["note"]
    assert S.across_seeds([0.0, 0.0, 0.0])["p"] == 1.0
    assert S.change_verdict(0.1, 0.3) == "rises" and S.change_verdict(-0.3, -0.1) == "falls"
    assert S.change_verdict(np.nan, np.nan) == "no clear change"
    with pytest.raises(ValueError):
        S.across_seeds([[1.0, 2.0]])
