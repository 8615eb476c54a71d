"""The lean capture (streamed moments + gradient cosines) against the full-sample path, and its cache."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from axes_pipeline.analyses.lesion_engine import peer_regression, standardised
from axes_pipeline.axes.table import layer_analysis
from axes_pipeline.capture import capture_activations, load_capture, save_capture
from axes_pipeline.capture.activations import CACHE_FORMAT
from axes_pipeline.errors import UserError
from axes_pipeline.metrics.gaussian import standardise
from axes_pipeline.models import build_model, conv_norm_pairs

from .reference.samples import layer_analysis_from_samples

KNOBS = dict(sigma0="median", hull_eps=0.05, hull_max=10, hull_order="correlation", ridge=1e-3, pool=50, top=10)
GRAPHS = {"edge_fraction": 0.1, "null_shuffles": 3, "max_channels": None}


@pytest.fixture(scope="module")
def both():
    """One capture of a small ResNet with the samples kept *and* the moments streamed."""
    torch.manual_seed(0)
    model = build_model("resnet18", 10, width=0.25).eval()
    units = {k: v for k, v in list(conv_norm_pairs(model).items())[:6]}
    gen = torch.Generator().manual_seed(1)
    # an offset on the input gives the pre-BN channels means well away from 0 (the case where a
    # naive one-pass E[YY'] - mm' would lose digits)
    data = [(torch.randn(24, 3, 16, 16, generator=gen) + 3.0, torch.randint(0, 10, (24,), generator=gen))
            for _ in range(3)]
    full = capture_activations(model, units, data, samples_per_image=6, seed=2, patch_moments=True,
                               sigma_rows=200, progress=False, keep_samples=True, stream_moments=True)
    lean = capture_activations(model, units, data, samples_per_image=6, seed=2, patch_moments=True,
                               sigma_rows=200, progress=False, keep_samples=False)
    return model, units, full, lean


def _tables(units, analyse):
    rows, summaries = [], []
    for i, name in enumerate(units):
        r = analyse(i, name)
        rows.append(r.rows)
        summaries.append(r.summary)
    return pd.concat(rows, ignore_index=True), pd.DataFrame(summaries)


def _assert_same(a: pd.DataFrame, b: pd.DataFrame):
    assert list(a.columns) == list(b.columns)
    for col in a.columns:
        if pd.api.types.is_numeric_dtype(a[col]):
            np.testing.assert_allclose(a[col].to_numpy(float), b[col].to_numpy(float), rtol=0, atol=1e-6,
                                       err_msg=col)
        else:
            assert a[col].tolist() == b[col].tolist(), col


def test_lean_capture_gives_the_full_sample_tables_to_1e6(both, tmp_path):
    _, units, full, lean = both
    path = tmp_path / "capture.pt"
    save_capture(lean, path)
    cached = load_capture(path)
    common = dict(knobs=KNOBS, dtype=torch.float64, device=torch.device("cpu"), graphs=GRAPHS,
                  gradients={"enabled": True}, seed=0)
    old = _tables(units, lambda i, n: layer_analysis_from_samples(n, i, full.acts[n], full.target_of(n), units[n],
                                                                  patches=full.patches[n], **common))
    new = _tables(units, lambda i, n: layer_analysis(n, i, cached.cov(n), units[n], grad_cos=cached.gradients[n],
                                                     n_samples=cached.n_samples(n), **common))
    assert {"grad_cos_euclid", "grad_cos_whitened", "community_r", "hull_size"} <= set(old[0].columns)
    _assert_same(*[t[0] for t in (old, new)])
    _assert_same(*[t[1] for t in (old, new)])


def test_streamed_moments_match_the_samples(both):
    _, units, full, lean = both
    assert lean.acts == {} and lean.target is None and lean.patches == {}
    assert lean.n == full.acts[next(iter(units))].shape[0]
    for name in units:
        a = full.acts[name].double()
        torch.testing.assert_close(lean.cov(name), full.cov(name), rtol=0, atol=1e-9)
        torch.testing.assert_close(lean.channel_mean(name), a.mean(0), rtol=0, atol=1e-9)
        torch.testing.assert_close(lean.channel_sd(name), a.std(0), rtol=0, atol=1e-9)
        assert float(lean.channel_mean(name).abs().max()) > 1.0       # the offset case is exercised


def test_lesion_peer_regression_from_moments(both):
    _, units, full, lean = both
    name = list(units)[1]
    a = peer_regression(full.acts[name], [0, 3], "all", 1e-3, full.target,
                        std=standardised(full.acts[name], full.target))
    b = peer_regression(None, [0, 3], "all", 1e-3, std=standardise(lean.cov(name)), mean=lean.channel_mean(name))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-8)


def test_cache_holds_no_samples_and_is_small(both, tmp_path):
    _, units, _, lean = both
    path = tmp_path / "c.pt"
    save_capture(lean, path)
    blob = torch.load(path, weights_only=True)
    assert blob["format"] == CACHE_FORMAT and not {"acts", "target", "patches"} & set(blob)
    c_plus_1 = sum(u.conv.out_channels + 1 for u in units.values())
    # upper triangles of the (T, Y) covariances dominate: well under a float64 square each
    assert path.stat().st_size < 8 * sum((u.conv.out_channels + 1) ** 2 for u in units.values()) + 200_000
    assert c_plus_1 > 0


def test_old_format_cache_is_recomputed(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"acts": {}, "target": torch.zeros(2), "image_index": torch.arange(2), "knobs": {},
                "accuracy": 0.0, "patches": {}}, path)
    assert load_capture(path) is None


def test_non_finite_activations_stop_the_capture_naming_the_layer():
    model = build_model("resnet18", 10, width=0.125).eval()
    units = {k: v for k, v in list(conv_norm_pairs(model).items())[:2]}
    with torch.no_grad():
        units[list(units)[1]].conv.weight[0].fill_(float("inf"))
    data = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))]
    with pytest.raises(UserError, match=list(units)[1].replace(".", r"\.")):
        capture_activations(model, units, data, samples_per_image=2, progress=False, keep_samples=False)


@pytest.mark.parametrize("knobs, xt_tol", [
    ({"PATCH_ELEMS": 13 * 27}, (1e-12, 1e-9)),                # dense patches, 2 images of 6 samples per chunk (conv1)
    ({"BLOCK_MIN_CIN": 1, "BLOCK_ROWS": 13}, (1e-6, 1e-7)),   # every 3×3 conv by kernel offset, the same chunks
], ids=["chunked", "by-offset"])
def test_patch_moments_do_not_depend_on_the_chunking_nor_the_streaming(both, monkeypatch, knobs, xt_tol):
    """Patches are streamed a chunk of images at a time (peak memory), and wide convs by kernel offset
    with the padding's zeros never formed: the sums, the Σ_X subsample that ends inside a chunk, and
    the per-image T terms must not notice beyond float32 level."""
    import axes_pipeline.capture.activations as act

    model, units, full, _ = both
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(24, 3, 16, 16, generator=gen) + 3.0, torch.randint(0, 10, (24,), generator=gen))
            for _ in range(3)]
    for knob, value in knobs.items():
        monkeypatch.setattr(act, knob, value)
    other = capture_activations(model, units, data, samples_per_image=6, seed=2, patch_moments=True,
                                sigma_rows=200, progress=False, keep_samples=True)
    for name, m in full.patches.items():
        c = other.patches[name]
        assert (c.n, c.rows_xx) == (m.n, m.rows_xx) == (432, 200)
        # Cov(x, y) takes float32 products of one chunk, so a chunking moves it at float32 level
        torch.testing.assert_close(c.cov_xy(), m.cov_xy(), rtol=1e-5, atol=1e-6, msg=f"{name} cov_xy")
        # the per-image patch sums: float32 sums of k values (by offset: in another order)
        torch.testing.assert_close(c.cov_xt(), m.cov_xt(), rtol=xt_tol[0], atol=xt_tol[1], msg=f"{name} cov_xt")
        # the Σ_X subsample takes float32 products too (the whitened check is held to 1e-4, METHODS §5)
        for f, a, b in zip(("cov_xy", "cov_xt", "sigma_x"), c.whitened_moments(), m.whitened_moments()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name} subsample {f}")


def test_patch_moments_agree_with_the_channels_they_produce(both):
    """y = w'x (+ bias) for a pre-BN channel, so W·Cov(x, T) = Cov(Y, T) and W·Cov(x, Y) = Cov(Y, Y)
    over the same rows: an independent check of the per-image T sums and of the Σ_X subsample.
    (Up to the float32 arithmetic of the conv that produced Y: a wrong sum would be off by O(1).)"""
    _, units, full, _ = both
    for name, m in full.patches.items():
        w = units[name].conv.weight.detach().double().flatten(1)
        a, t = full.acts[name].double(), full.target.double()
        cov = full.cov(name)
        tol = dict(rtol=1e-4, atol=1e-6 * float(cov.abs().max()))
        torch.testing.assert_close(w @ m.cov_xt(), cov[1:, 0], **tol)
        torch.testing.assert_close(w @ m.cov_xy(), cov[1:, 1:], **tol)
        cxy, cxt, sigma = m.whitened_moments()
        sub = torch.cat([t[:200, None], a[:200]], 1)
        ref = torch.cov(sub.T)
        torch.testing.assert_close(w @ cxt, ref[1:, 0], **tol)
        torch.testing.assert_close(w @ cxy, ref[1:, 1:], **tol)
        torch.testing.assert_close(w @ sigma @ w.T, ref[1:, 1:], **tol)
        # the capture streams 3×3 patches in (kh, kw, Cin) order: the readers above return the filter's
        assert m.perm is not None and not torch.equal(m.perm, torch.arange(len(m.perm)))
