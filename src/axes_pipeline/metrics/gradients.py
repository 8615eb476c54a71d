"""Gaussian linear analysis of one layer (METHODS §5): input-capture vs task gradients.

For a linear channel ``y = w'x`` with input covariance Sigma_X, task covariance
``c = Cov(x, T)``, ``b = w'c`` and ``D = w' Sigma_X w``:

* input-capture gradient  ``grad_w I_X  ∝ Sigma_X w``
* task gradient           ``grad_w I_T  = k b g_T``, ``g_T = c - (b / D) Sigma_X w``

(``I_T = -1/2 log(1 - rho^2)`` with ``rho^2 = b^2 / (D sigma_T^2)`` differentiates to
``b / (sigma_T^2 D (1 - rho^2)) * g_T``: ``k > 0``, so the gradient is ``b·g_T`` up to a positive
factor and its sign follows ``b``; with ``b < 0`` it points along ``-g_T``.) Per channel we report
the cosine of (Sigma_X w, g_T) - of g_T itself, not of the signed gradient - in the Euclidean
metric (``axes.csv`` column ``grad_cos_euclid``) and in the whitened metric
``<u, v> = u' Sigma_X^-1 v`` (``grad_cos_whitened``). In the whitened metric the two are exactly
orthogonal: ``<Sigma_X w, g_T> = w' g_T = b - (b / D) D = 0``.

How the whitened cosine is computed here (the built-in correctness check): **honestly**, by a
Cholesky solve with the measured Sigma_X (plus a tiny relative ridge), applied to the measured
``Sigma_X w`` (= ``Cov(x, y_i)``) and the measured ``g_T``. It is 0 only if the measured
cross-covariances, filters and input covariance are mutually consistent, so a wrong patch
extraction, a filter/channel mismatch or a broken solve shows up as a non-zero value. The closed
form ``w' g_T`` (returned as ``w_dot_g``, normalised) is cheaper but checks less: it cancels by
construction whenever D is computed as ``w' Sigma_X w``.

Sigma_X w never needs the (huge) patch covariance: ``Cov(x_patch, y_i) = X'(Y_i - mean)/(N-1)``
(:class:`PatchMoments`, streamed by :class:`~axes_pipeline.metrics.moments.Moments`); Sigma_X itself
is only formed when D is small enough, on a subsample of rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from axes_pipeline.errors import UserError
from axes_pipeline.metrics.gaussian import dead_channels
from axes_pipeline.metrics.moments import Moments

#: Above this patch dimension ``patch_moments`` does not form Sigma_X unless asked to.
MAX_SIGMA_X_DIM = 4096


@dataclass
class PatchMoments:
    """The streamed input-patch moments of one conv layer, each a :class:`Moments`.

    Over all N rows: ``xy`` (x_patch vs y, ``[D, C]``: Cov(x, y_i) = Σ_X w_i) and ``xt`` (x_patch
    vs T, ``[D, 1]``). Σ_X costs N·D² and is kept over the first ``sigma_rows`` rows only (``sxx``),
    with the cross moments of those same rows (``sxy``, ``sxt``): the whitened cosine is 0 only when
    Σ_X w and Σ_X come from one sample, so it is computed from that subsample
    (:meth:`whitened_moments`). ``sxx``/``sxy``/``sxt`` are None when Σ_X is not formed.
    """

    xy: Moments
    xt: Moments
    sxx: Moments | None = None
    sxy: Moments | None = None
    sxt: Moments | None = None
    #: the streamed rows' patch order: coordinate r of the rows is coordinate ``perm[r]`` of the
    #: flattened filter (None: the filter's own order). The capture streams patches in the order
    #: its gather yields them, (kh, kw, Cin), which saves a copy of every patch matrix; every
    #: reader below returns the filter's (Cin, kh, kw) order.
    perm: Tensor | None = None

    @classmethod
    def empty(cls, with_sigma_x: bool, perm: Tensor | None = None) -> PatchMoments:
        sub = (Moments(upper=True), Moments(), Moments()) if with_sigma_x else (None, None, None)
        return cls(Moments(), Moments(), *sub, perm=perm)

    def _filter_order(self, m: Tensor, both: bool = False) -> Tensor:
        """``m`` (rows in streamed order; ``both``: columns too) in the filter's order."""
        if self.perm is None:
            return m
        inv = torch.argsort(self.perm.to(m.device))
        return m[inv][:, inv] if both else m[inv]

    def update(self, x: Tensor, y: Tensor, t: Tensor) -> None:
        """Add rows ``x: [n, D]``, ``y: [n, C]``, ``t: [n]`` (float64 products; Σ_X on every row)."""
        if x.dim() != 2 or y.dim() != 2 or t.dim() != 1:
            raise UserError(f"patch moments need x [n, D], y [n, C], t [n]; got {tuple(x.shape)}, "
                            f"{tuple(y.shape)}, {tuple(t.shape)}")
        if not (y.shape[0] == t.shape[0] == x.shape[0]):
            raise UserError(f"x, y and t must have the same number of samples, got {x.shape[0]}, {y.shape[0]}, "
                            f"{t.shape[0]}")
        x, y, t = x.double(), y.double(), t.double()[:, None]
        for acc, v in ((self.xy, y), (self.xt, t), (self.sxy, y), (self.sxt, t)):
            if acc is not None:
                acc.update(x, v)
        if self.sxx is not None:
            self.sxx.update(x)

    @property
    def n(self) -> int:
        return self.xy.count

    @property
    def rows_xx(self) -> int:
        return 0 if self.sxx is None else self.sxx.count

    def cov_xy(self) -> Tensor:
        """Cov(x_patch, y) = Σ_X w for a pre-BN channel: ``[D, C]``."""
        return self._filter_order(self.xy.compute())

    def cov_xt(self) -> Tensor:
        """Cov(x_patch, T): ``[D]``."""
        return self._filter_order(self.xt.compute())[:, 0]

    def sigma_x(self) -> Tensor | None:
        """Σ_X over the subsample ``[D, D]``, or None (not formed, or fewer than 2 rows)."""
        return self._filter_order(self.sxx.compute(), both=True) if self.rows_xx >= 2 else None

    def whitened_moments(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """(Cov(x, y) [D, C], Cov(x, T) [D], Σ_X [D, D]) all over the Σ_X subsample, or None."""
        sigma = self.sigma_x()
        if sigma is None:
            return None
        return self._filter_order(self.sxy.compute()), self._filter_order(self.sxt.compute())[:, 0], sigma

    def free_sigma_x(self) -> None:
        """Drop the subsample's accumulators (Σ_X is up to 4608² float64, 170 MB). Reset first: a
        Metric is freed by the cycle collector, not when its last reference goes, and its state
        would live on until then."""
        for acc in (self.sxx, self.sxy, self.sxt):
            if acc is not None:
                acc.reset()
        self.sxx = self.sxy = self.sxt = None

    def release(self) -> None:
        """Free every accumulator's state now (see :meth:`free_sigma_x`)."""
        self.free_sigma_x()
        self.xy.reset()
        self.xt.reset()

    def cosines(self, weight: Tensor) -> dict[str, Tensor]:
        """Per-channel gradient cosines of the conv with ``weight`` (METHODS §5): ``cos_euclid``
        ``[C]`` and, where Σ_X was kept, ``cos_whitened`` ``[C]`` (the built-in ≈ 0 check)."""
        w = weight.detach().double().flatten(1).to(self.xy.state.device)
        if self.perm is not None:   # the filter in the streamed order (the cosines do not depend on it)
            w = w[:, self.perm.to(w.device)]
        out = {"cos_euclid": gradient_cosines(self.xy.compute().T.contiguous(), self.xt.compute()[:, 0],
                                              w)["cos_euclid"].cpu()}
        if self.rows_xx >= 2:  # Σ_X w and Σ_X from the same rows, so this must be ≈ 0
            cxy, cxt = self.sxy.compute(), self.sxt.compute()[:, 0]
            out["cos_whitened"] = gradient_cosines(cxy.T.contiguous(), cxt, w,
                                                   fresh_sigma=self.sxx.compute)["cos_whitened"].cpu()
        return out


def patch_moments(x_patches: Tensor, y: Tensor, t: Tensor, *, with_sigma_x: bool | None = None,
                  chunk: int = 65536) -> dict[str, Tensor]:
    """Patch moments of ``x_patches: [N, D]``, ``y: [N, C]``, ``t: [N]`` in one call (streamed in
    ``chunk`` rows): ``sx_w: [C, D]`` (row i = Cov(x, y_i) = Σ_X w_i), ``c: [D]`` = Cov(x, T) and,
    with ``with_sigma_x`` (default: when ``D <= MAX_SIGMA_X_DIM``), ``sigma_x: [D, D]``; unbiased."""
    if with_sigma_x is None:
        with_sigma_x = x_patches.shape[-1] <= MAX_SIGMA_X_DIM
    acc = PatchMoments(Moments(), Moments(), Moments(upper=True) if with_sigma_x else None)
    for s in range(0, x_patches.shape[0], chunk):
        acc.update(x_patches[s:s + chunk], y[s:s + chunk], t[s:s + chunk])
    if acc.n < 2:
        raise UserError(f"need at least 2 samples for patch moments, got {acc.n}")
    out = {"sx_w": acc.cov_xy().T.contiguous(), "c": acc.cov_xt()}
    if with_sigma_x:
        s = acc.sigma_x()
        out["sigma_x"] = 0.5 * (s + s.T)
    return out


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _cholesky_factor(fresh_sigma: Callable[[], Tensor], ridge: float) -> Tensor:
    """Lower L with ``L L' = Sigma_X + jitter I`` (float64), jitter = ``ridge`` * mean(diag), grown
    only if Sigma_X is numerically singular. ``fresh_sigma()`` gives a Sigma_X the factor may
    overwrite: the factor is computed in place, so one D×D lives at a time (170 MB at D = 4608,
    the capture's peak memory), and a retry starts from a fresh one."""
    jitter = scale = None
    for _ in range(8):
        a = fresh_sigma()
        if scale is None:
            scale = float(torch.diagonal(a).mean().clamp(min=torch.finfo(torch.float64).tiny))
            jitter = ridge * scale
        a.diagonal().add_(jitter)
        chol, info = torch.linalg.cholesky_ex(a, out=(a, torch.empty((), dtype=torch.int32, device=a.device)))
        if int(info) == 0:
            return chol
        del a, chol
        jitter = max(jitter * 100.0, 1e-12 * scale)
    raise UserError("input covariance Sigma_X is not positive semi-definite; check the patch extraction")


def gradient_cosines(sx_w: Tensor, c: Tensor, w: Tensor, sigma_x: Tensor | Callable[[Tensor], Tensor] | None = None, *,
                     ridge: float = 1e-10, fresh_sigma: Callable[[], Tensor] | None = None) -> dict[str, Tensor]:
    """Cosines between the input-capture and task gradients of every channel of a layer.

    Args:
        sx_w: ``[C, D]``, row i = Sigma_X w_i = Cov(x_patch, y_i).
        c: ``[D]`` = Cov(x_patch, T).
        w: ``[C, D]`` flattened filters (the same patch layout as ``sx_w``).
        sigma_x: ``[D, D]`` input covariance, or a callable solving ``Sigma_X z = v`` for
            ``v: [D, k]``; ``None`` skips the whitened cosine.
        ridge: relative ridge (times mean diagonal of Sigma_X) of the whitened solve.
        fresh_sigma: instead of ``sigma_x``, a builder of a new Sigma_X ``[D, D]`` float64 each call,
            which the solve may overwrite (it saves a D×D copy).

    Returns ``[C]`` float64 tensors: ``cos_euclid`` = cos(Sigma_X w, g_T); ``cos_whitened``
    (only with ``sigma_x``) = the same in the Sigma_X^-1 metric, by an honest solve, ~0;
    ``w_dot_g`` = the closed form w'g_T / (|w| |g_T|) (0 by construction);
    ``b`` = w'c; ``signal`` = D = w' Sigma_X w; ``dead`` (all cosines 0): D, the channel's variance, is dead
    by the one rule of :func:`~axes_pipeline.metrics.gaussian.dead_channels`.
    """
    if sx_w.dim() != 2 or w.shape != sx_w.shape or c.dim() != 1 or c.shape[0] != sx_w.shape[1]:
        raise UserError(f"gradient cosines need sx_w [C, D], c [D], w [C, D]; got {tuple(sx_w.shape)}, "
                        f"{tuple(c.shape)}, {tuple(w.shape)}")
    u = sx_w.to(torch.float64)
    cc = c.to(torch.float64)
    ww = w.to(torch.float64)
    b = ww @ cc  # [C]
    sig = (ww * u).sum(dim=1)  # D_i = w' Sigma_X w
    dead = dead_channels(sig)   # D is the channel's (pre-BN) variance: the layer's one dead rule
    g = cc[None, :] - _safe_div(b, sig)[:, None] * u  # [C, D] task gradient direction
    cos_e = _safe_div((u * g).sum(1), u.norm(dim=1) * g.norm(dim=1))
    w_dot_g = _safe_div((ww * g).sum(1), ww.norm(dim=1) * g.norm(dim=1))
    out = {"cos_euclid": cos_e, "w_dot_g": w_dot_g, "b": b, "signal": sig}
    if callable(sigma_x):
        zu = sigma_x(u.T).T  # Sigma_X^-1 u, [C, D]
        zg = sigma_x(g.T).T
        inner = (u * zg).sum(1)
        nu = (u * zu).sum(1).clamp(min=0).sqrt()
        ng = (g * zg).sum(1).clamp(min=0).sqrt()
    elif sigma_x is not None or fresh_sigma is not None:
        # u' Sigma_X^-1 g = (L^-1 u)'(L^-1 g), and as g_i = c - a_i u_i, L^-1 g_i = L^-1 c - a_i L^-1 u_i:
        # one triangular solve with C columns and one with a single column
        chol = _cholesky_factor(fresh_sigma or (lambda: sigma_x.to(torch.float64).clone()), ridge)
        zu = torch.linalg.solve_triangular(chol, u.T, upper=False)  # [D, C]
        zc = torch.linalg.solve_triangular(chol, cc[:, None], upper=False)  # [D, 1]
        del chol
        zg = zc - _safe_div(b, sig)[None, :] * zu
        inner = (zu * zg).sum(0)
        nu, ng = zu.norm(dim=0), zg.norm(dim=0)
    if sigma_x is not None or fresh_sigma is not None:
        out["cos_whitened"] = torch.where(dead, torch.zeros_like(inner), _safe_div(inner, nu * ng))
    out["cos_euclid"] = torch.where(dead, torch.zeros_like(cos_e), cos_e)
    out["w_dot_g"] = torch.where(dead, torch.zeros_like(w_dot_g), w_dot_g)
    out["dead"] = dead
    return out
