"""The one streaming moment accumulator (metrics.moments.Moments, a torchmetrics.Metric) against a
slow numpy loop, split and merged, and synced as torchmetrics does under DDP; and the capture's
gradient cosines (METHODS §5), which it streams, against a slow reference of the old float64 sums."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from axes_pipeline.capture import capture_activations
from axes_pipeline.errors import UserError
from axes_pipeline.metrics import ActivationMoments, Moments, covariance
from axes_pipeline.metrics.gaussian import gram
from axes_pipeline.metrics.moments import RowBlocks
from axes_pipeline.models import conv_norm_pairs


def _rows(n=700, p=5, q=3, offset=1e4, seed=0):
    gen = np.random.default_rng(seed)
    u = gen.normal(size=(n, p)) @ gen.normal(size=(p, p)) + offset          # means far above the SDs
    v = np.concatenate([u[:, :2] * 0.5, gen.normal(size=(n, q - 2))], 1) - offset
    return u, v


def _slow_cross_covariance(u: np.ndarray, v: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
    """Row by row: weighted means, then Σ w (u − ū)(v − v̄)' / (Σ w − 1)."""
    w = np.ones(len(u)) if weight is None else weight
    mu = sum(wi * ui for wi, ui in zip(w, u)) / w.sum()
    mv = sum(wi * vi for wi, vi in zip(w, v)) / w.sum()
    m = np.zeros((u.shape[1], v.shape[1]))
    for wi, ui, vi in zip(w, u, v):
        m += wi * np.outer(ui - mu, vi - mv)
    return m / (w.sum() - 1)


def _stream(acc: Moments, u, v=None, sizes=(1, 2, 97, 5, 300, 295), **kw) -> Moments:
    start = 0
    for s in sizes:
        acc.update(torch.from_numpy(u[start:start + s]), None if v is None else torch.from_numpy(v[start:start + s]),
                   **{k: torch.from_numpy(x[start:start + s]) for k, x in kw.items()})
        start += s
    assert start == len(u)
    return acc


def _close(a: torch.Tensor, b: np.ndarray, rtol=1e-9):
    np.testing.assert_allclose(a.numpy(), b, rtol=rtol, atol=rtol * float(np.abs(b).max()))


def test_streamed_moments_equal_a_slow_loop():
    u, v = _rows()
    _close(_stream(Moments(), u, v).compute(), _slow_cross_covariance(u, v))
    _close(_stream(Moments(), u).compute(), _slow_cross_covariance(u, u))
    acc = _stream(Moments(), u, v)
    np.testing.assert_allclose(acc.mean_u.numpy(), u.mean(0), rtol=1e-12)
    np.testing.assert_allclose(acc.mean_v.numpy(), v.mean(0), rtol=1e-12)
    assert acc.count == len(u)


def test_weighted_rows_are_repeated_rows():
    u, v = _rows(n=100)
    w = np.random.default_rng(1).integers(1, 5, len(u)).astype(float)
    got = _stream(Moments(), u, v, sizes=(1, 49, 50), weight=w).compute()
    _close(got, _slow_cross_covariance(u, v, w))
    _close(got, _slow_cross_covariance(np.repeat(u, w.astype(int), 0), np.repeat(v, w.astype(int), 0)))


@pytest.mark.parametrize("p", [7, 300, 1100])
def test_upper_block_gram_equals_the_full_covariance(p):
    u, _ = _rows(n=400, p=p, offset=3.0)
    got = _stream(Moments(upper=True), u, sizes=(150, 250)).compute()
    _close(got, _slow_cross_covariance(u, u) if p < 100 else np.cov(u.T))


def test_two_halves_merged_equal_one_pass():
    u, v = _rows()
    one = _stream(Moments(), u, v).compute()
    a, b = Moments(), Moments()
    a.update(torch.from_numpy(u[:123]), torch.from_numpy(v[:123]))
    b.update(torch.from_numpy(u[123:]), torch.from_numpy(v[123:]))     # another shift than a's
    a.merge_state(b)
    torch.testing.assert_close(a.compute(), one, rtol=1e-9, atol=1e-9 * float(one.abs().max()))
    assert a.count == len(u)


@pytest.mark.parametrize("upper", [False, True])
def test_a_torchmetrics_sync_of_two_processes_equals_one_pass(upper):
    """What DDP does on compute(): all-gather every rank's state, then its dist_reduce_fx."""
    u, v = _rows(p=6)
    pair = (u, None) if upper else (u, v)
    one = _stream(Moments(upper=upper), *pair).compute()
    ranks = [Moments(upper=upper), Moments(upper=upper)]
    for r, (lo, hi) in zip(ranks, ((0, 400), (400, len(u)))):
        r.update(torch.from_numpy(u[lo:hi]), None if upper else torch.from_numpy(v[lo:hi]))
    other = ranks[1].state.clone()
    # Metric.sync's own step (sync() would also mark the metric synced, so compute() refuses)
    ranks[0]._sync_dist(dist_sync_fn=lambda t, group=None: [t, other])
    torch.testing.assert_close(ranks[0].compute(), one, rtol=1e-9, atol=1e-9 * float(one.abs().max()))
    # a rank that saw nothing yet adds nothing
    empty = Moments(upper=upper)
    empty.update(torch.from_numpy(u[:0]))
    assert empty.count == 0


def test_activation_moments_equal_the_one_shot_covariance():
    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(500, 6, generator=gen, dtype=torch.float64) * 3 + 1e4
    target = acts[:, 0] - acts[:, 2] + torch.randn(500, generator=gen, dtype=torch.float64)
    acc = ActivationMoments()
    for s in range(0, 500, 120):
        acc.update(acts[s:s + 120].float(), target[s:s + 120].float())
    ref = covariance(acts.float().double(), target.float().double())
    torch.testing.assert_close(acc.compute(), ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()))
    torch.testing.assert_close(acc.mean[1:], acts.float().double().mean(0), rtol=1e-12, atol=0)
    with pytest.raises(UserError, match="NaN/Inf"):
        ActivationMoments().update(torch.full((3, 6), float("nan")), torch.zeros(3))


@pytest.mark.parametrize("channels", [6, 300])   # 300: the blocked gram
def test_activation_moments_are_the_per_batch_chan_merge_to_the_bit(channels):
    # the published axes were computed this way; any other summation order moves the covariance
    # by ~1e-16 and flips discrete steps downstream (communities, hulls), so the demo's tables
    # would not repeat to the digit
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(40 + k, channels, generator=gen) * 2 + 7, torch.randn(40 + k, generator=gen))
               for k in range(4)]
    acc, n, mean, m2 = ActivationMoments(), 0, None, None
    for x, t in batches:
        acc.update(x, t)
        z = torch.cat([t.double()[:, None], x.double()], 1)
        mean_b = z.sum(0) / len(z)
        zc = z - mean_b
        m2_b = gram(zc)
        if mean is None:
            n, mean, m2 = len(z), mean_b, m2_b
            continue
        delta, tot = mean_b - mean, n + len(z)
        m2 = m2 + (m2_b + torch.outer(delta, delta) * (n * len(z) / tot))
        mean, n = mean + delta * (len(z) / tot), tot
    cov = m2 / (n - 1)
    assert torch.equal(acc.compute(), 0.5 * (cov + cov.T))
    assert torch.equal(acc.mean, mean)


def _blocks(u: np.ndarray, lo: int, hi: int, width: int, seed: int = 3):
    """Rows lo:hi of ``u`` as RowBlocks of ``width`` columns, each block zero on a random half of
    the rows (``u`` is zeroed there in place, so the dense rows are the same numbers)."""
    gen = np.random.default_rng(seed + lo)
    blocks = []
    for a0 in range(0, u.shape[1], width):
        listed = np.sort(gen.choice(hi - lo, size=min(hi - lo, (hi - lo) // 2 + a0 % 3), replace=False))
        zero = np.setdiff1d(np.arange(hi - lo), listed)
        u[lo + zero, a0:a0 + width] = 0.0
        blocks.append((torch.from_numpy(listed), torch.from_numpy(u[lo + listed, a0:a0 + width])))
    return RowBlocks(hi - lo, blocks)


def test_row_blocks_equal_their_dense_rows():
    """Rows given by column blocks with implicit zeros (a conv's patches at a padded border) give
    the moments of the dense rows: against the slow loop, far from 0 (the zeros are −shift)."""
    u, v = _rows(n=400, p=6, offset=50.0)
    acc, start = Moments(), 0
    for size in (1, 150, 249):
        acc.update(_blocks(u, start, start + size, width=2), torch.from_numpy(v[start:start + size]))
        start += size
    assert (u == 0).mean() > 0.3
    _close(acc.compute(), _slow_cross_covariance(u, v))
    np.testing.assert_allclose(acc.mean_u.numpy(), u.mean(0), rtol=1e-12)
    assert acc.count == len(u)
    with pytest.raises(UserError, match="columns"):
        acc.update(_blocks(u[:10, :4].copy(), 0, 10, width=2), torch.from_numpy(v[:10]))
    with pytest.raises(UserError, match="one row per row"):
        Moments().update(_blocks(u[:10].copy(), 0, 10, width=2), torch.from_numpy(v[:9]))


def test_float32_rows_stay_within_float32_of_float64():
    u, v = _rows(n=2000, p=40, q=8, offset=5.0)
    exact = _stream(Moments(), u, v, sizes=(1000, 1000)).compute()
    f32 = _stream(Moments(), u.astype(np.float32), v.astype(np.float32), sizes=(1000, 1000)).compute()
    ref = _stream(Moments(), u.astype(np.float32).astype(float), v.astype(np.float32).astype(float),
                  sizes=(1000, 1000)).compute()
    assert f32.dtype == torch.float64
    torch.testing.assert_close(f32, ref, rtol=1e-5, atol=1e-5 * float(exact.abs().max()))


# --------------------------------------------------------------------------------------------
# the capture's gradient cosines against the old float64 sums (a slow reference kept here)
# --------------------------------------------------------------------------------------------


class _Tiny(torch.nn.Module):
    """4×4 maps: with 17 samples asked per image every position is taken once, in order, so the reference
    knows each row's patch without the capture's random draw."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.conv2, self.bn2 = torch.nn.Conv2d(8, 24, 3, padding=1, bias=False), torch.nn.BatchNorm2d(24)
        self.fc = torch.nn.Linear(24, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(self.bn2(self.conv2(x))).mean((2, 3)))


def _old_cosines(x: np.ndarray, y: np.ndarray, t: np.ndarray, w: np.ndarray, rows_xx: int) -> dict:
    """The old capture's arithmetic: raw float64 sums over the rows, Σ_X and its cross sums over
    the first ``rows_xx`` rows, then the cosines of METHODS §5 (whitened: a solve with Σ_X)."""
    def cov(a, b):
        n = len(a)
        sab, sa, sb = np.zeros((a.shape[1], b.shape[1])), np.zeros(a.shape[1]), np.zeros(b.shape[1])
        for ai, bi in zip(a, b):
            sab += np.outer(ai, bi)
            sa += ai
            sb += bi
        return (sab - np.outer(sa, sb) / n) / (n - 1)

    def cosines(cxy, cxt, sigma=None):
        out = []
        for i in range(w.shape[0]):
            u, c = cxy[:, i], cxt
            b, d = w[i] @ c, w[i] @ u
            g = c - (b / d) * u
            if sigma is None:
                out.append(u @ g / (np.linalg.norm(u) * np.linalg.norm(g)))
            else:
                zg, zu = np.linalg.solve(sigma, g), np.linalg.solve(sigma, u)
                out.append(u @ zg / np.sqrt((u @ zu) * (g @ zg)))
        return np.array(out)

    xs, ys, ts = x[:rows_xx], y[:rows_xx], t[:rows_xx, None]
    return {"cos_euclid": cosines(cov(x, y), cov(x, t[:, None])[:, 0]),
            "cos_whitened": cosines(cov(xs, ys), cov(xs, ts)[:, 0], cov(xs, xs))}


@pytest.mark.parametrize("by_offset", [False, True])
def test_capture_gradient_cosines_equal_the_old_float64_sums(monkeypatch, by_offset):
    """Both ways the capture streams Cov(x, y): dense patches, and by kernel offset with the padding
    skipped (4×4 maps: 7 of 16 positions have padding in their patch)."""
    import axes_pipeline.capture.activations as act

    monkeypatch.setattr(act, "BLOCK_MIN_CIN", 1 if by_offset else 10**9)
    monkeypatch.setattr(act, "BLOCK_ROWS", 50)

    torch.manual_seed(0)
    model = _Tiny().eval()
    units = conv_norm_pairs(model)
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(b, 3, 4, 4, generator=gen) + 2.0, torch.randint(0, 5, (b,), generator=gen))
            for b in (13, 20, 7)]
    monkeypatch.setattr(act, "PATCH_ELEMS", 50 * 27)    # several chunks per batch
    kw = {"samples_per_image": 17, "patch_moments": True, "sigma_rows": 200, "progress": False}
    lean = capture_activations(model, units, data, keep_samples=False, **kw)
    full = capture_activations(model, units, data, keep_samples=True, **kw)
    inputs = {}
    hooks = [u.conv.register_forward_hook(lambda m, a, o, n=n: inputs.setdefault(n, []).append(a[0]))
             for n, u in units.items()]
    with torch.no_grad():
        for x, _ in data:
            model(x)
    for h in hooks:
        h.remove()
    for name, unit in units.items():
        conv = unit.conv
        x = torch.cat([F.unfold(i, conv.kernel_size, padding=conv.padding).transpose(1, 2).reshape(-1, i.shape[1] * 9)
                       for i in inputs[name]]).double().numpy()
        ref = _old_cosines(x, full.acts[name].double().numpy(), full.target_of(name).double().numpy(),
                           conv.weight.detach().double().flatten(1).numpy(), rows_xx=200)
        assert abs(ref["cos_euclid"]).min() > 1e-3           # a real cosine, not a trivial 0
        for cap in (lean, full):
            # the whitened cosine is a zero check held to 1e-4 (METHODS §5), every reported quantity to 1e-6
            for key, atol in (("cos_euclid", 1e-6), ("cos_whitened", 1e-4)):
                np.testing.assert_allclose(cap.gradients[name][key].numpy(), ref[key], rtol=0, atol=atol,
                                           err_msg=f"{name} {key}")
