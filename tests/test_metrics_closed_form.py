"""Closed-form Gaussian oracles for every key of channel_axes (METHODS §2–§3).

Data are built so that their *unbiased sample* covariance equals a chosen matrix to float
precision (whiten random data, multiply by a Cholesky factor), so each output can be checked
against numbers worked out by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from axes_pipeline.metrics import (
    AXES_KEYS,
    channel_axes,
    channel_axes_from_moments,
    pairwise_overlap,
    pairwise_target_excess,
    triplet_ratio,
)
from axes_pipeline.metrics.gaussian import covariance

from .reference.oracle import sample_with_covariance

LAM = 1e-3


def _mi(r2: float) -> float:
    return -0.5 * math.log(1.0 - r2)


# (T, Y1, Y2, Y3): sd_T = sqrt(2), sd_Y = 2, 1, 3
RHO_T = (0.5, 0.3, 0.1)
R12, R13, R23 = -0.5, 0.2, 0.3
SD = (math.sqrt(2.0), 2.0, 1.0, 3.0)


def _three_channel_cov() -> torch.Tensor:
    corr = torch.tensor(
        [
            [1.0, RHO_T[0], RHO_T[1], RHO_T[2]],
            [RHO_T[0], 1.0, R12, R13],
            [RHO_T[1], R12, 1.0, R23],
            [RHO_T[2], R13, R23, 1.0],
        ],
        dtype=torch.float64,
    )
    sd = torch.tensor(SD, dtype=torch.float64)
    return corr * sd[:, None] * sd[None, :]


@pytest.fixture(scope="module")
def three():
    cov = _three_channel_cov()
    z = sample_with_covariance(cov, 400, seed=3, mean=[5.0, -3.0, 100.0, 0.5])
    return z[:, 1:], z[:, 0], cov


def test_sample_covariance_is_exact(three):
    acts, target, cov = three
    assert torch.allclose(covariance(acts, target), cov, atol=1e-12, rtol=0)


def test_local_axis_by_hand(three):
    acts, target, _ = three
    out = channel_axes(acts, target)
    # I_X: sigma0^2 = median(4, 1, 9) = 4
    assert out["input_capture"].tolist() == pytest.approx(
        [0.5 * math.log(2.0), 0.5 * math.log(1.25), 0.5 * math.log(3.25)], abs=1e-12)
    # R_X: -1/2 log(1 - rho^2): 0.143841 (1,2), 0.020411 (1,3), 0.047155 (2,3); divisor C-1 = 2
    r12, r13, r23 = _mi(R12**2), _mi(R13**2), _mi(R23**2)
    assert (r12, r13, r23) == pytest.approx((0.1438410362, 0.0204109973, 0.0471553397), abs=1e-9)
    assert out["peer_overlap"].tolist() == pytest.approx([(r12 + r13) / 2, (r12 + r23) / 2, (r13 + r23) / 2], abs=1e-12)

    # E_i^full = r' (R_SS + lam I)^-1 r with a 2x2 inverse written out
    def e2(r, off):
        return ((1 + LAM) * (r[0] ** 2 + r[1] ** 2) - 2 * off * r[0] * r[1]) / ((1 + LAM) ** 2 - off**2)

    e_full = [e2((R12, R13), R23), e2((R12, R23), R13), e2((R13, R23), R12)]
    assert e_full == pytest.approx([0.3840894911, 0.4161534136, 0.2528321106], abs=1e-9)
    assert out["full_explained"].tolist() == pytest.approx(e_full, abs=1e-12)
    # hulls, eps = 0.05: the best single peer (0.2498, 0.2498, 0.0899) never reaches 0.95 E_full,
    # so every hull takes both peers and explains E_full; K = 10 is not reached: not saturated
    assert out["hull_size"].tolist() == [2, 2, 2]
    assert out["hull_explained"].tolist() == pytest.approx(e_full, abs=1e-12)
    assert out["hull_saturated"].tolist() == [False, False, False]
    assert out["hull_score"].tolist() == pytest.approx([e / 2 for e in e_full], abs=1e-12)
    assert out["dead"].tolist() == [False, False, False]


def test_hull_threshold_and_saturation_by_hand(three):
    acts, target, _ = three
    e_single = [R12**2 / (1 + LAM), R12**2 / (1 + LAM), R23**2 / (1 + LAM)]  # best |rho| peer
    # eps = 0.4: thresholds 0.6 E_full = 0.2305, 0.2497, 0.1517 -> ch1 and ch2 reach with one peer
    out = channel_axes(acts, target, hull_eps=0.4)
    assert out["hull_size"].tolist() == [1, 1, 2]
    assert out["hull_explained"][:2].tolist() == pytest.approx(e_single[:2], abs=1e-12)
    # K = 1: channel 3 takes its one peer without reaching the threshold -> saturated
    out = channel_axes(acts, target, hull_eps=0.4, hull_max=1)
    assert out["hull_size"].tolist() == [1, 1, 1]
    assert out["hull_saturated"].tolist() == [False, False, True]
    assert float(out["hull_explained"][2]) == pytest.approx(e_single[2], abs=1e-12)
    assert float(out["hull_score"][2]) == pytest.approx(0.2528321106, abs=1e-9)


def test_target_axis_by_hand(three):
    acts, target, _ = three
    out = channel_axes(acts, target)
    it = [_mi(r * r) for r in RHO_T]
    assert it == pytest.approx([0.1438410362, 0.0471553397, 0.0050251679], abs=1e-9)
    assert out["task_info"].tolist() == pytest.approx(it, abs=1e-12)

    def pair(a, b, c):  # I(T; Yi, Yj) = -1/2 log(1 - R^2), R^2 = (a^2 + b^2 - 2abc) / (1 - c^2)
        return _mi((a * a + b * b - 2 * a * b * c) / (1 - c * c))

    s12 = pair(RHO_T[0], RHO_T[1], R12) - max(it[0], it[1])  # 0.5297 - 0.1438
    s13 = max(0.0, pair(RHO_T[0], RHO_T[2], R13) - max(it[0], it[2]))  # R^2 = 0.25 exactly: 0
    s23 = pair(RHO_T[1], RHO_T[2], R23) - max(it[1], it[2])
    assert s12 == pytest.approx(0.3858547515, abs=1e-9)
    assert s13 == pytest.approx(0.0, abs=1e-12)
    s = pairwise_target_excess(acts, target)
    expected = torch.tensor([[0, s12, s13], [s12, 0, s23], [s13, s23, 0]], dtype=torch.float64)
    assert torch.allclose(s, expected, atol=1e-12)
    # pool = all peers (C-1 = 2 < 50), top 10 -> mean of both pairs
    assert out["target_excess"].tolist() == pytest.approx([(s12 + s13) / 2, (s12 + s23) / 2, (s13 + s23) / 2], abs=1e-12)
    red = [(min(it[0], it[1]) + min(it[0], it[2])) / 2, (min(it[1], it[0]) + min(it[1], it[2])) / 2,
           (min(it[2], it[0]) + min(it[2], it[1])) / 2]
    assert out["task_redundancy"].tolist() == pytest.approx(red, abs=1e-12)
    assert out["task_unique"].tolist() == pytest.approx([max(0, a - b) for a, b in zip(it, red)], abs=1e-12)
    # top = 1: the single largest S_ij of each channel
    out1 = channel_axes(acts, target, top=1)
    assert out1["target_excess"].tolist() == pytest.approx([s12, s12, s23], abs=1e-12)
    # pool = 1: the candidate is the peer with the largest R_X (|rho|): 2, 1, 2
    out2 = channel_axes(acts, target, pool=1)
    assert out2["target_excess"].tolist() == pytest.approx([s12, s12, s23], abs=1e-12)
    assert out2["task_redundancy"].tolist() == pytest.approx([it[1], it[1], it[2]], abs=1e-12)


def test_pairwise_overlap_by_hand(three):
    acts, _, _ = three
    r = pairwise_overlap(acts)
    r12, r13, r23 = _mi(R12**2), _mi(R13**2), _mi(R23**2)
    expected = torch.tensor([[0, r12, r13], [r12, 0, r23], [r13, r23, 0]], dtype=torch.float64)
    assert torch.allclose(r, expected, atol=1e-12)


def test_triplet_by_hand(three):
    acts, target, cov = three
    corr = cov / torch.outer(cov.diagonal().sqrt(), cov.diagonal().sqrt())
    t = corr[0, 1:]
    r2_3 = float(t @ torch.linalg.solve(corr[1:, 1:], t))  # R^2 of T on all three channels
    it = [_mi(r * r) for r in RHO_T]
    pairs = {
        (0, 1): _mi((RHO_T[0] ** 2 + RHO_T[1] ** 2 - 2 * RHO_T[0] * RHO_T[1] * R12) / (1 - R12**2)),
        (0, 2): _mi((RHO_T[0] ** 2 + RHO_T[2] ** 2 - 2 * RHO_T[0] * RHO_T[2] * R13) / (1 - R13**2)),
        (1, 2): _mi((RHO_T[1] ** 2 + RHO_T[2] ** 2 - 2 * RHO_T[1] * RHO_T[2] * R23) / (1 - R23**2)),
    }
    s3 = _mi(r2_3) - max(pairs.values())
    assert s3 == pytest.approx(0.2020462121, abs=1e-9)
    s = {k: max(0.0, v - max(it[k[0]], it[k[1]])) for k, v in pairs.items()}
    # top = 1: anchor 1 -> pair (1,2), anchor 2 -> (2,1), anchor 3 -> (3,2); each extended by the
    # only remaining channel, i.e. the same triplet (1,2,3)
    out = triplet_ratio(acts, target, top=1)
    mean_s2 = (s[(0, 1)] + s[(0, 1)] + s[(1, 2)]) / 3
    assert float(out["mean_s3"]) == pytest.approx(s3, abs=1e-12)
    assert float(out["mean_s2"]) == pytest.approx(mean_s2, abs=1e-12)
    assert float(out["s3_s2"]) == pytest.approx(s3 / mean_s2, abs=1e-10)
    assert int(out["n_triplets"]) == 3


def test_full_explained_equals_explicit_ridge_regressions():
    """E_i^full = 1 + lam - 1/((R + lam I)^-1)_ii equals per-channel ridge regressions."""
    gen = torch.Generator().manual_seed(5)
    c = 15
    a = torch.randn(c + 1, c + 1, generator=gen, dtype=torch.float64)
    cov = a @ a.T + 0.5 * torch.eye(c + 1, dtype=torch.float64)
    for lam in (1e-3, 0.1, 1e-9):
        out = channel_axes_from_moments(cov, ridge=lam)
        sd = cov.diagonal()[1:].sqrt()
        corr = cov[1:, 1:] / torch.outer(sd, sd)
        for i in range(c):
            s = [j for j in range(c) if j != i]
            r = corr[i, s]
            e = float(r @ torch.linalg.solve(corr[s][:, s] + lam * torch.eye(c - 1, dtype=torch.float64), r))
            assert float(out["full_explained"][i]) == pytest.approx(min(max(e, 0.0), 1.0), abs=1e-10)


def _redundant_peer_cov() -> torch.Tensor:
    """Y1 = A + B; Y2, Y3 ~ copies of A; Y4 ~ B. |rho| ranks 2, 3 before 4, but 2 + 4 explain Y1."""
    # latent (A, B, e2, e3, e4), Y = M latent
    m = torch.tensor(
        [
            [1.0, 1.0, 0.0, 0.0, 0.0],  # Y1
            [1.0, 0.0, 0.3, 0.0, 0.0],  # Y2
            [1.0, 0.0, 0.0, 0.31, 0.0],  # Y3
            [0.0, 1.0, 0.0, 0.0, 0.5],  # Y4
        ],
        dtype=torch.float64,
    )
    cov_y = m @ m.T
    cov = torch.zeros(5, 5, dtype=torch.float64)
    cov[1:, 1:] = cov_y
    cov[0, 0] = 1.0  # target unrelated
    return cov


def test_greedy_hull_is_smaller_with_redundant_peers():
    cov = _redundant_peer_cov()
    by_corr = channel_axes_from_moments(cov, hull_order="correlation")
    greedy = channel_axes_from_moments(cov, hull_order="greedy")
    # correlation order takes Y2, Y3 (both ~A) before Y4 (B): three peers; greedy picks Y2 then Y4
    assert int(by_corr["hull_size"][0]) == 3
    assert int(greedy["hull_size"][0]) == 2
    assert float(greedy["full_explained"][0]) == float(by_corr["full_explained"][0])
    assert float(greedy["hull_explained"][0]) >= 0.95 * float(greedy["full_explained"][0])


def test_linear_combination_is_fully_explained_and_independent_channel_has_empty_hull():
    gen = torch.Generator().manual_seed(11)
    n = 2000
    base = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    lone = sample_with_covariance(torch.eye(2, dtype=torch.float64), n, seed=2)  # (lone, target-ish)
    # make `lone` exactly uncorrelated (in-sample) with the base channels
    q, _ = torch.linalg.qr(torch.cat([torch.ones(n, 1, dtype=torch.float64), base], dim=1))
    lone_c = lone[:, 0] - q @ (q.T @ lone[:, 0])
    combo = base[:, 0] - 2.0 * base[:, 1] + 0.5 * base[:, 2]
    acts = torch.cat([base, combo[:, None], lone_c[:, None]], dim=1)
    target = base[:, 3] + torch.randn(n, generator=gen, dtype=torch.float64)
    out = channel_axes(acts, target)
    assert float(out["full_explained"][4]) > 0.99  # exact combination, only the ridge holds it < 1
    assert float(out["full_explained"][5]) == pytest.approx(0.0, abs=1e-12)
    assert int(out["hull_size"][5]) == 0
    assert float(out["hull_explained"][5]) == 0.0
    assert not bool(out["hull_saturated"][5])
    assert float(out["hull_score"][5]) == pytest.approx(0.0, abs=1e-12)
    assert float(out["peer_overlap"][5]) == pytest.approx(0.0, abs=1e-12)


def test_dead_channels_are_zero_flagged_and_change_nothing_else():
    gen = torch.Generator().manual_seed(2)
    n, c = 1500, 10
    acts = torch.randn(n, 3, generator=gen) @ torch.randn(3, c, generator=gen) + torch.randn(n, c, generator=gen)
    target = acts[:, 0] - acts[:, 1] + torch.randn(n, generator=gen)
    with_dead = torch.cat([acts[:, :4], torch.full((n, 1), 3.25), acts[:, 4:], torch.zeros(n, 1)], dim=1)
    for order in ("correlation", "greedy"):
        ref = channel_axes(acts, target, hull_order=order, pool=5, top=3)
        out = channel_axes(with_dead, target, hull_order=order, pool=5, top=3)
        for k in AXES_KEYS:
            assert not (out[k].is_floating_point() and bool(torch.isnan(out[k]).any())), k
        assert out["dead"].tolist() == [False] * 4 + [True] + [False] * 6 + [True]
        live = [i for i in range(c + 2) if i not in (4, c + 1)]
        for k in AXES_KEYS:
            if k != "dead":
                assert bool((out[k][[4, c + 1]] == 0).all()), k  # every quantity 0 / False
            assert torch.allclose(out[k][live].double(), ref[k].double(), atol=1e-5), k


def test_constant_target_gives_zero_task_quantities():
    gen = torch.Generator().manual_seed(4)
    acts = torch.randn(500, 6, generator=gen, dtype=torch.float64)
    out = channel_axes(acts, torch.full((500,), 7.0, dtype=torch.float64))
    for k in ("task_info", "target_excess", "task_redundancy", "task_unique"):
        assert bool((out[k] == 0).all()), k
    assert bool((out["full_explained"] > 0).all())


def test_single_channel_layer():
    gen = torch.Generator().manual_seed(4)
    acts = torch.randn(100, 1, generator=gen, dtype=torch.float64)
    target = acts[:, 0] + torch.randn(100, generator=gen, dtype=torch.float64)
    out = channel_axes(acts, target)
    assert out["hull_size"].tolist() == [0]
    assert float(out["full_explained"][0]) == 0.0
    assert float(out["task_info"][0]) > 0
    assert float(out["task_unique"][0]) == float(out["task_info"][0])
    r = triplet_ratio(acts, target)
    assert float(r["s3_s2"]) == 0.0 and int(r["n_triplets"]) == 0


def test_sigma0_knob():
    cov = _three_channel_cov()
    var = [4.0, 1.0, 9.0]
    for knob, s0 in (("median", 4.0), ("mean", 14.0 / 3), ("p75", 6.5), ("p90", 8.0), (2.0, 2.0)):
        out = channel_axes_from_moments(cov, sigma0=knob)
        assert out["input_capture"].tolist() == pytest.approx([0.5 * math.log1p(v / s0) for v in var], abs=1e-12)
    # even count: the usual median (mean of the two middle values)
    cov4 = torch.diag(torch.tensor([1.0, 1.0, 2.0, 6.0, 10.0], dtype=torch.float64))
    out = channel_axes_from_moments(cov4)
    assert float(out["input_capture"][0]) == pytest.approx(0.5 * math.log1p(1.0 / 4.0), abs=1e-12)


def test_clipping_keeps_duplicates_finite():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(1000, 3, generator=gen, dtype=torch.float64)
    acts = torch.cat([x, x[:, :1], -2 * x[:, :1]], dim=1)  # exact duplicates, rho = +-1
    target = x[:, 0].clone()  # rho_T = 1 for three channels
    out = channel_axes(acts, target)
    for k in AXES_KEYS:
        if out[k].is_floating_point():
            assert bool(torch.isfinite(out[k]).all()), k
    cap = _mi(0.999**2)
    assert float(out["task_info"][0]) == pytest.approx(cap, abs=1e-9)
    assert float(pairwise_overlap(acts)[0, 3]) == pytest.approx(cap, abs=1e-9)
    assert bool((out["full_explained"][[0, 3, 4]] > 0.99).all())
    r = triplet_ratio(acts, target)
    assert math.isfinite(float(r["s3_s2"]))
