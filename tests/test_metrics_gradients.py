"""Gaussian linear analysis (METHODS §5): gradient cosines, patch moments, the synthetic study."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from axes_pipeline.errors import UserError
from axes_pipeline.metrics import (
    PatchMoments,
    gradient_cosines,
    linear_gaussian_study,
    patch_moments,
)
from axes_pipeline.stats import spearman


def _conv_like(n=4000, d=27, c=8, seed=0):
    """Patches with a correlated covariance, pre-BN linear channels y = x w + bias, a task."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen, dtype=torch.float64) / d**0.5 + torch.eye(d, dtype=torch.float64)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) @ mix + 2.0
    w = torch.randn(c, d, generator=gen, dtype=torch.float64)
    w[3] = 0.0  # a dead channel
    y = x @ w.T + torch.randn(c, generator=gen, dtype=torch.float64)
    beta = torch.randn(d, generator=gen, dtype=torch.float64)
    t = x @ beta + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
    return x, y, t, w


def test_patch_moments_give_sigma_w_and_task_covariance():
    x, y, t, w = _conv_like()
    m = patch_moments(x, y, t, chunk=1000)  # streamed in 4 chunks
    xc = x - x.mean(0)
    sigma = xc.T @ xc / (x.shape[0] - 1)
    torch.testing.assert_close(m["sigma_x"], sigma, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(m["sx_w"], w @ sigma, atol=1e-9, rtol=1e-9)  # Cov(x, y_i) = Sigma_X w_i
    torch.testing.assert_close(m["c"], xc.T @ (t - t.mean()) / (x.shape[0] - 1), atol=1e-9, rtol=1e-9)
    assert "sigma_x" not in patch_moments(x, y, t, with_sigma_x=False)


def test_gradient_cosines_against_formula_and_whitened_is_zero():
    x, y, t, w = _conv_like()
    m = patch_moments(x, y, t)
    out = gradient_cosines(m["sx_w"], m["c"], w, m["sigma_x"])
    sig, c = m["sigma_x"].numpy(), m["c"].numpy()
    sinv = np.linalg.inv(sig)
    for i in range(w.shape[0]):
        wi = w[i].numpy()
        if not wi.any():
            assert bool(out["dead"][i]) and float(out["cos_euclid"][i]) == 0 and float(out["cos_whitened"][i]) == 0
            continue
        u = sig @ wi
        b, dd = wi @ c, wi @ sig @ wi
        g = c - (b / dd) * u
        cos_e = u @ g / (np.linalg.norm(u) * np.linalg.norm(g))
        assert float(out["cos_euclid"][i]) == pytest.approx(cos_e, abs=1e-10)
        assert float(out["signal"][i]) == pytest.approx(dd, rel=1e-10)
        # the built-in check: exactly orthogonal in the Sigma_X^-1 metric
        assert abs(u @ sinv @ g) / np.sqrt((u @ sinv @ u) * (g @ sinv @ g)) < 1e-10
        assert abs(float(out["cos_whitened"][i])) < 1e-8
        assert abs(float(out["w_dot_g"][i])) < 1e-10
    assert float(out["cos_euclid"][~out["dead"]].abs().min()) > 1e-3  # not orthogonal in the plain metric
    # a solver callable gives the same answer
    chol = torch.linalg.cholesky(m["sigma_x"])
    out2 = gradient_cosines(m["sx_w"], m["c"], w, lambda v: torch.cholesky_solve(v, chol))
    torch.testing.assert_close(out2["cos_whitened"], out["cos_whitened"], atol=1e-8, rtol=0)


def test_whitened_check_catches_a_filter_mismatch():
    x, y, t, w = _conv_like()
    m = patch_moments(x, y, t)
    wrong = w[[1, 0, 2, 3, 4, 5, 6, 7]]  # filters of channels 0 and 1 swapped
    out = gradient_cosines(m["sx_w"], m["c"], wrong, m["sigma_x"])
    assert float(out["cos_whitened"][[0, 1]].abs().min()) > 1e-2
    assert float(out["cos_whitened"][2:].abs().max()) < 1e-8


def test_float32_inputs_and_bad_inputs():
    x, y, t, w = _conv_like()
    m = patch_moments(x.float(), y.float(), t.float())
    out = gradient_cosines(m["sx_w"], m["c"], w.float(), m["sigma_x"])
    assert float(out["cos_whitened"].abs().max()) < 1e-4
    with pytest.raises(UserError):
        gradient_cosines(m["sx_w"], m["c"][:-1], w)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN/Inf"):
        PatchMoments.empty(with_sigma_x=True).update(bad, y, t)


def test_spearman_with_ties():
    # the one Spearman (stats.spearman) serves the synthetic study too: average ranks for ties, and NaN,
    # never 0, when a side is constant (a constant layer has no rank order to correlate)
    from scipy.stats import spearmanr

    import axes_pipeline.analyses.propagation as propagation
    import axes_pipeline.axes.alignment as alignment
    import axes_pipeline.metrics.linear_gaussian as lg

    x = torch.tensor([1.0, 2.0, 2.0, 3.0, 5.0])
    y = torch.tensor([2.0, 1.0, 4.0, 4.0, 9.0])
    assert spearman(x.numpy(), y.numpy())[0] == pytest.approx(spearmanr(x.numpy(), y.numpy())[0], abs=1e-12)
    assert np.isnan(spearman(x.numpy(), np.ones(5))[0])
    assert lg.spearman is spearman and alignment.spearman is spearman and propagation.spearman is spearman
    ones = np.ones(5)
    rhos = alignment.layer_alignment({"input_capture": ones, "task_info": y.numpy(), "peer_overlap": ones,
                                      "target_excess": y.numpy(), "hull_score": ones, "task_unique": y.numpy()})
    assert all(np.isnan(v) for v in rhos.values())


@pytest.mark.parametrize("seed", [0, 3])
def test_linear_gaussian_study_axes_separate_with_training(seed):
    tab = linear_gaussian_study(seed=seed)
    n = len(tab["step"])
    assert all(len(v) == n for v in tab.values())
    assert tab["step"][0] == 0 and tab["step"][-1] == 2000
    rho = tab["rho_axes"]
    assert rho[0] >= 0.7  # strongly coupled at random initialisation
    assert rho[-1] <= rho[0] - 0.4  # and weakly after training
    assert tab["loss_ratio"][-1] < 0.15 < tab["loss_ratio"][0]
    assert max(tab["cos_whitened_max"]) < 1e-10  # whitened orthogonality holds throughout
    assert min(tab["cos_euclid"]) > 0.1  # the Euclidean cosine is not zero
    assert linear_gaussian_study(seed=seed, steps=200)["rho_axes"] == rho[: len(range(0, 201, 100))]
