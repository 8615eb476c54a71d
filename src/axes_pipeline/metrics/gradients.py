"""Gaussian linear analysis of one layer (METHODS §5): input-capture vs task gradients.

For a linear channel ``y = w'x`` with input covariance Sigma_X, task covariance
``c = Cov(x, T)``, ``b = w'c`` and ``D = w' Sigma_X w``:

* input-capture gradient  ``grad_w I_X  ∝ Sigma_X w``
* task gradient           ``grad_w I_T  ∝ g_T = c - (b / D) Sigma_X w``

(``I_T = -1/2 log(1 - b^2 / (D sigma_T^2))`` differentiates to a positive multiple of g_T.)
Per channel we report the cosine of (Sigma_X w, g_T) in the Euclidean metric and in the
whitened metric ``<u, v> = u' Sigma_X^-1 v``. In the whitened metric the two are exactly
orthogonal: ``<Sigma_X w, g_T> = w' g_T = b - (b / D) D = 0``.

How the whitened cosine is computed here (the built-in correctness check): **honestly**, by a
Cholesky solve with the measured Sigma_X (plus a tiny relative ridge), applied to the measured
``Sigma_X w`` (= ``Cov(x, y_i)``) and the measured ``g_T``. It is 0 only if the measured
cross-covariances, filters and input covariance are mutually consistent, so a wrong patch
extraction, a filter/channel mismatch or a broken solve shows up as a non-zero value. The closed
form ``w' g_T`` (returned as ``w_dot_g``, normalised) is cheaper but checks less: it cancels by
construction whenever D is computed as ``w' Sigma_X w``.

Sigma_X w never needs the (huge) patch covariance: ``Cov(x_patch, y_i) = X'(Y_i - mean)/(N-1)``
(:class:`PatchMomentAccumulator`); Sigma_X itself is only formed when D is small enough.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from axes_pipeline.errors import UserError

_FLOAT = (torch.float32, torch.float64)

#: Above this patch dimension ``patch_moments`` does not form Sigma_X unless asked to.
MAX_SIGMA_X_DIM = 4096


class PatchMomentAccumulator:
    """Streams ``Cov(x, y_i)`` (= Sigma_X w_i), ``Cov(x, T)`` and optionally Sigma_X.

    ``update(x_patches [n, D], y [n, C], t [n])`` per batch, ``compute()`` at the end. Each
    batch is centred on its own mean and merged with Chan's formula in float64, like
    :class:`~axes_pipeline.metrics.gaussian.MomentAccumulator`.
    """

    def __init__(self, with_sigma_x: bool = False, dtype: torch.dtype = torch.float64) -> None:
        self.with_sigma_x = with_sigma_x
        self.dtype = dtype
        self.count = 0
        self.mean_x = self.mean_y = self.mean_t = None
        self.m_xy = self.m_xt = self.m_xx = None

    def update(self, x_patches: Tensor, y: Tensor, t: Tensor) -> None:
        """Add a batch: ``x_patches: [n, D]``, ``y: [n, C]`` (the channels' outputs), ``t: [n]``."""
        if x_patches.dim() != 2 or y.dim() != 2 or t.dim() != 1:
            raise UserError(f"patch moments need x [n, D], y [n, C], t [n]; got {tuple(x_patches.shape)}, "
                            f"{tuple(y.shape)}, {tuple(t.shape)}")
        n = x_patches.shape[0]
        if y.shape[0] != n or t.shape[0] != n:
            raise UserError(f"x, y and t must have the same number of samples, got {n}, {y.shape[0]}, {t.shape[0]}")
        if n == 0:
            return
        x = x_patches.to(self.dtype)
        yy = y.to(self.dtype)
        tt = t.to(self.dtype)
        mx, my, mt = x.mean(0), yy.mean(0), tt.mean()
        if not (bool(torch.isfinite(mx).all()) and bool(torch.isfinite(my).all()) and bool(torch.isfinite(mt))):
            raise UserError("patches, channel outputs or target contain NaN/Inf; gradient cosines need finite values")
        xc, yc, tc = x - mx, yy - my, tt - mt
        m_xy, m_xt = xc.T @ yc, xc.T @ tc
        m_xx = xc.T @ xc if self.with_sigma_x else None
        if self.count == 0:
            self.count, self.mean_x, self.mean_y, self.mean_t = n, mx, my, mt
            self.m_xy, self.m_xt, self.m_xx = m_xy, m_xt, m_xx
            return
        na, nb = self.count, n
        tot = na + nb
        f = na * nb / tot
        dx, dy, dt = mx - self.mean_x, my - self.mean_y, mt - self.mean_t
        self.m_xy = self.m_xy + m_xy + torch.outer(dx, dy) * f
        self.m_xt = self.m_xt + m_xt + dx * dt * f
        if self.with_sigma_x:
            self.m_xx = self.m_xx + m_xx + torch.outer(dx, dx) * f
        self.mean_x = self.mean_x + dx * (nb / tot)
        self.mean_y = self.mean_y + dy * (nb / tot)
        self.mean_t = self.mean_t + dt * (nb / tot)
        self.count = tot

    def compute(self) -> dict[str, Tensor]:
        """``sx_w: [C, D]`` (row i = Cov(x, y_i) = Sigma_X w_i), ``c: [D]`` = Cov(x, T), and
        ``sigma_x: [D, D]`` when accumulated; unbiased (divisor N-1)."""
        if self.count < 2:
            raise UserError(f"need at least 2 samples for patch moments, got {self.count}")
        k = self.count - 1
        out = {"sx_w": (self.m_xy / k).T.contiguous(), "c": self.m_xt / k}
        if self.with_sigma_x:
            s = self.m_xx / k
            out["sigma_x"] = 0.5 * (s + s.T)
        return out


def patch_moments(x_patches: Tensor, y: Tensor, t: Tensor, *, with_sigma_x: bool | None = None,
                  chunk: int = 65536) -> dict[str, Tensor]:
    """One-shot :class:`PatchMomentAccumulator` over ``x_patches: [N, D]``, ``y: [N, C]``, ``t: [N]``.

    ``with_sigma_x=None`` forms Sigma_X only when ``D <= MAX_SIGMA_X_DIM``. Processes ``chunk``
    rows at a time so float64 copies stay small.
    """
    if with_sigma_x is None:
        with_sigma_x = x_patches.shape[-1] <= MAX_SIGMA_X_DIM
    acc = PatchMomentAccumulator(with_sigma_x=with_sigma_x)
    for s in range(0, x_patches.shape[0], chunk):
        acc.update(x_patches[s:s + chunk], y[s:s + chunk], t[s:s + chunk])
    return acc.compute()


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _sigma_solver(sigma_x: Tensor, ridge: float) -> Callable[[Tensor], Tensor]:
    """``v -> (Sigma_X + ridge * mean(diag) I)^-1 v`` via one Cholesky (columns of ``v: [D, k]``)."""
    s = sigma_x.to(torch.float64)
    scale = float(torch.diagonal(s).mean().clamp(min=torch.finfo(torch.float64).tiny))
    jitter = ridge * scale
    for _ in range(8):  # grow the jitter only if Sigma_X is numerically singular
        # the jitter added on a copy's diagonal, not as s + jitter·I: at D = 4608 each D×D
        # temporary is 170 MB, and these set the capture's peak memory
        a = s.clone()
        a.diagonal().add_(jitter)
        chol, info = torch.linalg.cholesky_ex(a)
        del a
        if int(info) == 0:
            return lambda v: torch.cholesky_solve(v.to(torch.float64), chol)
        jitter = max(jitter * 100.0, 1e-12 * scale)
    raise UserError("input covariance Sigma_X is not positive semi-definite; check the patch extraction")


def gradient_cosines(
    sx_w: Tensor,
    c: Tensor,
    w: Tensor,
    sigma_x: Tensor | Callable[[Tensor], Tensor] | None = None,
    *,
    ridge: float = 1e-10,
) -> dict[str, Tensor]:
    """Cosines between the input-capture and task gradients of every channel of a layer.

    Args:
        sx_w: ``[C, D]``, row i = Sigma_X w_i = Cov(x_patch, y_i).
        c: ``[D]`` = Cov(x_patch, T).
        w: ``[C, D]`` flattened filters (the same patch layout as ``sx_w``).
        sigma_x: ``[D, D]`` input covariance, or a callable solving ``Sigma_X z = v`` for
            ``v: [D, k]``; ``None`` skips the whitened cosine.
        ridge: relative ridge (times mean diagonal of Sigma_X) of the whitened solve.

    Returns ``[C]`` float64 tensors: ``cos_euclid`` = cos(Sigma_X w, g_T); ``cos_whitened``
    (only with ``sigma_x``) = the same in the Sigma_X^-1 metric, by an honest solve, ~0;
    ``w_dot_g`` = the closed form w'g_T / (|w| |g_T|) (0 by construction);
    ``b`` = w'c; ``signal`` = D = w' Sigma_X w; ``dead`` (D <= 0: all cosines 0).
    """
    if sx_w.dim() != 2 or w.shape != sx_w.shape or c.dim() != 1 or c.shape[0] != sx_w.shape[1]:
        raise UserError(f"gradient cosines need sx_w [C, D], c [D], w [C, D]; got {tuple(sx_w.shape)}, "
                        f"{tuple(c.shape)}, {tuple(w.shape)}")
    u = sx_w.to(torch.float64)
    cc = c.to(torch.float64)
    ww = w.to(torch.float64)
    b = ww @ cc  # [C]
    sig = (ww * u).sum(dim=1)  # D_i = w' Sigma_X w
    dead = sig <= 0
    g = cc[None, :] - _safe_div(b, sig)[:, None] * u  # [C, D] task gradient direction
    cos_e = _safe_div((u * g).sum(1), u.norm(dim=1) * g.norm(dim=1))
    w_dot_g = _safe_div((ww * g).sum(1), ww.norm(dim=1) * g.norm(dim=1))
    out = {"cos_euclid": cos_e, "w_dot_g": w_dot_g, "b": b, "signal": sig}
    if sigma_x is not None:
        solve = sigma_x if callable(sigma_x) else _sigma_solver(sigma_x, ridge)
        zu = solve(u.T).T  # Sigma_X^-1 u, [C, D]
        zg = solve(g.T).T
        inner = (u * zg).sum(1)
        nu = (u * zu).sum(1).clamp(min=0).sqrt()
        ng = (g * zg).sum(1).clamp(min=0).sqrt()
        out["cos_whitened"] = torch.where(dead, torch.zeros_like(inner), _safe_div(inner, nu * ng))
    out["cos_euclid"] = torch.where(dead, torch.zeros_like(cos_e), cos_e)
    out["w_dot_g"] = torch.where(dead, torch.zeros_like(w_dot_g), w_dot_g)
    out["dead"] = dead
    return out
