"""Streaming, dtypes, invariances and input errors of the metrics."""

from __future__ import annotations

import math

import pytest
import torch

from axes_pipeline.errors import UserError
from axes_pipeline.metrics import (
    AXES_KEYS,
    ActivationMoments,
    channel_axes,
    channel_axes_from_moments,
    covariance,
    pairwise_overlap,
    pairwise_overlap_from_moments,
    pairwise_target_excess,
    pairwise_target_excess_from_moments,
    triplet_ratio,
    triplet_ratio_from_moments,
)


def _layer(n=3000, c=32, seed=0, dtype=torch.float64, offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    acts = z @ torch.randn(6, c, generator=gen, dtype=torch.float64) + 0.8 * torch.randn(n, c, generator=gen, dtype=torch.float64)
    acts = acts * torch.linspace(0.2, 4.0, c, dtype=torch.float64) + offset
    target = acts[:, 1] - 0.5 * acts[:, 2] + acts[:, 3] * acts[:, 4].sign() + torch.randn(n, generator=gen, dtype=torch.float64)
    return acts.to(dtype), target.to(dtype)


def _assert_same(a: dict, b: dict, atol: float, keys=AXES_KEYS):
    for k in keys:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k].double(), b[k].double(), atol=atol, rtol=0, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


def test_streaming_accumulator_equals_one_shot():
    acts, target = _layer(offset=1e4)  # large means: the naive E[YY'] - mm' would cancel
    ref_cov = covariance(acts, target)
    acc = ActivationMoments()
    sizes = [1, 2, 997, 5, 1000, 995]  # uneven chunks, including single samples
    start = 0
    for s in sizes:
        acc.update(acts[start:start + s], target[start:start + s])
        start += s
    assert start == acts.shape[0]
    cov = acc.compute()
    torch.testing.assert_close(cov, ref_cov, atol=1e-9 * float(ref_cov.abs().max()), rtol=1e-9)
    _assert_same(channel_axes_from_moments(cov), channel_axes(acts, target), atol=1e-9)
    # merge of two accumulators = one accumulator over everything
    a1, a2 = ActivationMoments(), ActivationMoments()
    a1.update(acts[:1234], target[:1234])
    a2.update(acts[1234:], target[1234:])
    a1.merge_state(a2)
    torch.testing.assert_close(a1.compute(), ref_cov, atol=1e-9 * float(ref_cov.abs().max()), rtol=1e-9)


def test_from_moments_variants_equal_sample_variants():
    acts, target = _layer(c=16)
    cov = covariance(acts, target)
    torch.testing.assert_close(pairwise_overlap_from_moments(cov), pairwise_overlap(acts))
    torch.testing.assert_close(pairwise_target_excess_from_moments(cov), pairwise_target_excess(acts, target))
    a, b = triplet_ratio_from_moments(cov, pool=6, top=3), triplet_ratio(acts, target, pool=6, top=3)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_float32_agrees_with_float64():
    acts, target = _layer(offset=50.0)
    out64 = channel_axes(acts, target)
    out32 = channel_axes(acts.float(), target.float())
    for k in AXES_KEYS:
        if out32[k].is_floating_point():
            assert out32[k].dtype == torch.float32, k
            torch.testing.assert_close(out32[k].double(), out64[k], atol=2e-4, rtol=1e-3, msg=k)
    # hull sizes may only differ where E sits on the threshold within float32 noise
    assert float((out32["hull_size"] == out64["hull_size"]).double().mean()) >= 0.9
    t32 = triplet_ratio(acts.float(), target.float())
    t64 = triplet_ratio(acts, target)
    assert float(t32["s3_s2"]) == pytest.approx(float(t64["s3_s2"]), rel=1e-2)


def test_rescaling_a_channel_changes_only_its_input_capture():
    acts, target = _layer(c=20)
    ref = channel_axes(acts, target, hull_order="greedy")
    r_ref, s_ref = pairwise_overlap(acts), pairwise_target_excess(acts, target)
    for factor in (-3.7, 0.01, 25.0):
        scaled = acts.clone()
        scaled[:, 5] *= factor
        out = channel_axes(scaled, target, hull_order="greedy")
        _assert_same(out, ref, atol=1e-10, keys=[k for k in AXES_KEYS if k != "input_capture"])
        torch.testing.assert_close(pairwise_overlap(scaled), r_ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(pairwise_target_excess(scaled, target), s_ref, atol=1e-12, rtol=0)
        # I_X of channel 5 follows its variance: 1/2 log(1 + factor^2 var / sigma0^2)
        assert float(out["input_capture"][5]) != pytest.approx(float(ref["input_capture"][5]))
    # rescaling or shifting the target changes nothing
    out = channel_axes(acts, -2.0 * target + 3.0, hull_order="greedy")
    _assert_same(out, ref, atol=1e-10)


def test_permuting_channels_permutes_outputs():
    acts, target = _layer(c=24)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(3))
    for order in ("correlation", "greedy"):
        ref = channel_axes(acts, target, hull_order=order, pool=7, top=3)
        out = channel_axes(acts[:, perm], target, hull_order=order, pool=7, top=3)
        _assert_same(out, {k: v[perm] for k, v in ref.items()}, atol=1e-10)
    torch.testing.assert_close(pairwise_overlap(acts[:, perm]), pairwise_overlap(acts)[perm][:, perm])
    t1 = triplet_ratio(acts, target, pool=7, top=3)
    t2 = triplet_ratio(acts[:, perm], target, pool=7, top=3)
    assert float(t1["s3_s2"]) == pytest.approx(float(t2["s3_s2"]), abs=1e-10)


def test_no_nan_anywhere_on_degenerate_layers():
    n = 200
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    layers = [
        torch.zeros(n, 5, dtype=torch.float64),  # all dead
        torch.cat([x, x, torch.ones(n, 1, dtype=torch.float64)], dim=1),  # duplicates + dead
        torch.cat([x[:, :1], torch.zeros(n, 1, dtype=torch.float64)], dim=1),  # one live channel
    ]
    for acts in layers:
        for target in (x[:, 0].clone(), torch.zeros(n, dtype=torch.float64)):
            for order in ("correlation", "greedy"):
                out = channel_axes(acts, target, hull_order=order)
                for k, v in out.items():
                    if v.is_floating_point():
                        assert bool(torch.isfinite(v).all()), k
            r = triplet_ratio(acts, target)
            assert all(math.isfinite(float(v)) for v in r.values() if v.dim() == 0)
    out = channel_axes(layers[0], x[:, 0].clone())
    assert bool(out["dead"].all())
    for k in AXES_KEYS:
        if k != "dead":
            assert bool((out[k] == 0).all()), k


def test_nan_or_inf_input_raises_user_error():
    acts, target = _layer(n=100, c=6)
    bad = acts.clone()
    bad[7, 2] = float("nan")
    with pytest.raises(UserError, match="NaN/Inf.*column\\(s\\) 2"):
        channel_axes(bad, target)
    bad = acts.clone()
    bad[3, 0] = float("inf")
    with pytest.raises(UserError, match="NaN/Inf"):
        pairwise_overlap(bad)
    bad_t = target.clone()
    bad_t[0] = -float("inf")
    with pytest.raises(UserError, match="target"):
        channel_axes(acts, bad_t)
    acc = ActivationMoments()
    with pytest.raises(UserError, match="NaN/Inf"):
        acc.update(torch.full((3, 6), float("nan")), torch.zeros(3))
    cov = covariance(acts, target)
    cov[1, 2] = float("nan")
    with pytest.raises(UserError, match="NaN/Inf"):
        channel_axes_from_moments(cov)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"hull_order": "random"}, "hull_order"),
        ({"sigma0": "p50"}, "sigma0"),
        ({"sigma0": -1.0}, "sigma0"),
        ({"hull_eps": 1.0}, "hull_eps"),
        ({"hull_max": 0}, "hull_max"),
        ({"ridge": 0.0}, "ridge"),
        ({"pool": 0}, "pool"),
        ({"top": 2.5}, "top"),
    ],
)
def test_bad_knobs_raise_user_error(kwargs, match):
    acts, target = _layer(n=50, c=6)
    with pytest.raises(UserError, match=match):
        channel_axes(acts, target, **kwargs)


@pytest.mark.filterwarnings("ignore:.*called before the ..update.. method")
def test_bad_shapes_raise_user_error():
    acts, target = _layer(n=50, c=6)
    with pytest.raises(UserError, match=r"\[N, C\]"):
        channel_axes(acts[:, 0], target)
    with pytest.raises(UserError, match=r"target must have shape"):
        channel_axes(acts, target[:10])
    with pytest.raises(UserError, match="at least 2 samples"):
        ActivationMoments().compute()
    with pytest.raises(UserError, match="channels"):
        acc = ActivationMoments()
        acc.update(acts, target)
        acc.update(acts[:, :3], target)


def test_indefinite_covariance_is_repaired_not_nan():
    # not a valid covariance (pairwise-complete estimates or clipping can produce such a matrix)
    corr = torch.tensor([[1.0, 0.9, 0.9], [0.9, 1.0, -0.9], [0.9, -0.9, 1.0]], dtype=torch.float64)
    assert float(torch.linalg.eigvalsh(corr).min()) < -0.5
    cov = torch.eye(4, dtype=torch.float64)
    cov[1:, 1:] = corr
    cov[0, 1:] = cov[1:, 0] = torch.tensor([0.3, 0.2, 0.1], dtype=torch.float64)
    for order in ("correlation", "greedy"):
        out = channel_axes_from_moments(cov, hull_order=order)
        for k, v in out.items():
            if v.is_floating_point():
                assert bool(torch.isfinite(v).all()), k
        assert bool(((out["full_explained"] >= 0) & (out["full_explained"] <= 1)).all())
        assert bool((out["hull_explained"] <= out["full_explained"] + 1e-9).all())
