"""The batched metrics agree with the slow loop oracle (regressions over the samples)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from axes_pipeline.metrics import (
    channel_axes,
    pairwise_overlap,
    pairwise_target_excess,
    triplet_ratio,
)

from .reference.oracle import LoopOracle, oracle_channel_axes, oracle_triplet_ratio


def _layer(n: int, c: int, latent: int, seed: int, noise: float = 0.3):
    """Channels mixing 1..5 latent factors (varied hulls) + noise, different scales, and a target
    with a synergistic (XOR-like) part."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, latent, generator=gen, dtype=torch.float64)
    mix = torch.zeros(latent, c, dtype=torch.float64)
    for j in range(c):
        support = torch.randperm(latent, generator=gen)[: 1 + j % 5]
        mix[support, j] = torch.randn(len(support), generator=gen, dtype=torch.float64)
    acts = z @ mix + noise * torch.randn(n, c, generator=gen, dtype=torch.float64)
    acts = acts * torch.linspace(0.5, 3.0, c, dtype=torch.float64)  # different scales
    target = acts[:, 0] / 3 - acts[:, 1] / 2 + acts[:, 2] * acts[:, 3].sign() + torch.randn(n, generator=gen, dtype=torch.float64)
    return acts, target


@pytest.fixture(scope="module")
def layer():
    return _layer(1200, 20, 8, seed=7)


@pytest.mark.parametrize("order", ["correlation", "greedy"])
def test_channel_axes_matches_loop_oracle(layer, order):
    acts, target = layer
    knobs = dict(hull_order=order, hull_max=4, pool=8, top=3)
    fast = channel_axes(acts, target, **knobs)
    slow = oracle_channel_axes(acts, target, **knobs)
    for k, v in slow.items():
        np.testing.assert_allclose(fast[k].double().numpy(), v.astype(np.float64), atol=1e-9, err_msg=k)
    # the case is not trivial: hull sizes vary and some hulls saturate
    assert len(set(fast["hull_size"].tolist())) >= 3
    assert bool(fast["hull_saturated"].any()) and not bool(fast["hull_saturated"].all())


def test_orders_differ_somewhere_and_greedy_is_never_larger(layer):
    acts, target = layer
    by_corr = channel_axes(acts, target, hull_max=6)
    greedy = channel_axes(acts, target, hull_max=6, hull_order="greedy")
    # forward selection is not guaranteed optimal per channel, but on redundant peers it is
    # smaller on average, and both reach the same threshold of the same E_full
    assert not torch.equal(greedy["hull_size"], by_corr["hull_size"])
    assert float(greedy["hull_size"].double().mean()) < float(by_corr["hull_size"].double().mean())
    assert torch.equal(greedy["full_explained"], by_corr["full_explained"])


def test_default_knobs_match_oracle_on_a_wider_layer():
    acts, target = _layer(800, 36, 10, seed=3)
    fast = channel_axes(acts, target, pool=12)  # K = 10, M = 10 defaults
    chans = [0, 5, 17, 35]
    slow = oracle_channel_axes(acts, target, channels=chans, pool=12)
    for k, v in slow.items():
        np.testing.assert_allclose(fast[k][chans].double().numpy(), v.astype(np.float64), atol=1e-9, err_msg=k)


def test_pairwise_matrices_match_oracle(layer):
    acts, target = layer
    orc = LoopOracle(acts, target)
    c = acts.shape[1]
    r_slow = np.array([[orc.overlap(i, j) for j in range(c)] for i in range(c)])
    s_slow = np.array([[orc.excess(i, j) for j in range(c)] for i in range(c)])
    np.testing.assert_allclose(pairwise_overlap(acts).numpy(), r_slow, atol=1e-10)
    np.testing.assert_allclose(pairwise_target_excess(acts, target).numpy(), s_slow, atol=1e-10)
    assert (s_slow > 1e-3).sum() > 10  # the XOR-like target makes real synergy


@pytest.mark.parametrize("pool,top", [(6, 3), (50, 10)])
def test_triplet_ratio_matches_oracle(pool, top):
    acts, target = _layer(800, 14, 6, seed=1)
    fast = triplet_ratio(acts, target, pool=pool, top=top)
    slow = oracle_triplet_ratio(acts, target, pool=pool, top=top)
    assert int(fast["n_triplets"]) == slow["n_triplets"]
    for k in ("mean_s3", "mean_s2", "s3_s2"):
        assert float(fast[k]) == pytest.approx(slow[k], abs=1e-9, rel=1e-9), k
    assert slow["mean_s3"] > 0
