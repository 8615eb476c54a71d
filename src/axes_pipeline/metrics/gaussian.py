"""Gaussian-proxy primitives: moments, correlations and mutual information.

Every information quantity of the pipeline is computed from the unbiased covariance of the
vector ``(T, Y_1..Y_C)`` of one layer (METHODS §1): element 0 is the target, elements 1..C the
channels. This module turns activations into that covariance in one shot (streamed:
:class:`~axes_pipeline.metrics.moments.ActivationMoments`) and that covariance into the
*standardised view* every other metric reads (:func:`standardise`): clipped correlations, the
dead-channel mask and the variances.

Conventions shared by the whole ``metrics`` package:

* Correlations are clipped to ``|rho| <= RHO_MAX = 0.999`` (METHODS §1). Every Gaussian mutual
  information is written as ``-1/2 log(1 - R^2)`` with the squared (multiple) correlation
  ``R^2`` clipped to ``[0, RHO_MAX^2]``; for one pair this is exactly the clipped-rho formula,
  for two or three predictors it is the determinant ratio of METHODS §3 and can never take the
  log of a non-positive number when clipping has made a correlation matrix slightly indefinite.
* A channel is *dead* when its variance is ``<= DEAD_RTOL * max variance of the layer`` (exactly
  zero for a constant channel, see :func:`covariance`). A dead channel gets 0 for every
  information quantity and is flagged; it is not a peer of anybody (it is removed from the
  layer for all peer quantities), so adding a dead channel to a layer leaves the live
  channels' values unchanged. Nothing here ever returns NaN.
* The C x C work runs in float64 whatever the input dtype (it is tiny next to the N x C
  covariance); results are cast back to the dtype of the input.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from axes_pipeline.errors import UserError

#: |rho| is clipped to this value before any logarithm (METHODS §1).
RHO_MAX = 0.999
#: A channel whose variance is at most this fraction of the layer's largest variance is dead.
DEAD_RTOL = 1e-12


def dead_channels(var: Tensor) -> Tensor:
    """The one definition of a dead channel (METHODS §1), for every module that needs one.

    ``var: [C]`` the channels' variances over one layer -> ``[C]`` bool: ``var <= DEAD_RTOL * max(var)``.
    Relative, not ``var <= 0``: a constant channel's variance is 0 only up to the rounding of the
    covariance, which scales with the layer's values. An all-zero layer is all dead.

    >>> dead_channels(torch.tensor([4.0, 1e-14, 0.5])).tolist()
    [False, True, False]
    """
    if var.numel() == 0:
        return torch.zeros(var.shape, dtype=torch.bool, device=var.device)
    return var <= DEAD_RTOL * var.max()

_FLOAT_DTYPES = (torch.float32, torch.float64)


@contextmanager
def small_ops(device: torch.device) -> Iterator[None]:
    """Run the C x C phase single-threaded on CPU (restoring the thread count afterwards).

    After the N x C covariance everything is many small elementwise ops on C x C tensors, where a
    second intra-op thread gains little when the machine is idle and costs 10-30x when another
    process holds a core (every parallel region waits for the descheduled thread) - the normal
    case when analyses run side by side. CUDA tensors are unaffected.
    """
    previous = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _nonfinite_message(x: Tensor, what: str) -> str:
    """Name the first non-finite entries of ``x`` ([N, C] or [N]) for an error message."""
    bad = ~torch.isfinite(x)
    n_bad = int(bad.sum())
    if n_bad == 0:  # finite, but the float64 column sums overflowed
        return f"{what} are too large (their sums overflow float64); rescale them"
    verb, where = "contains", ""
    if x.dim() == 2:
        cols = torch.nonzero(bad.any(dim=0)).flatten().tolist()
        shown = ", ".join(str(c) for c in cols[:8]) + (", ..." if len(cols) > 8 else "")
        verb, where = "contain", f" (in column(s) {shown})"
    return (f"{what} {verb} {n_bad} NaN/Inf value(s){where}; "
            f"check the model and the capture point, information metrics need finite values")


def _check_float_tensor(x, what: str) -> None:
    if not isinstance(x, Tensor):
        raise UserError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise UserError(f"{what} must be float32 or float64, got {x.dtype}")


def check_acts_target(acts: Tensor, target: Tensor | None) -> None:
    """Validate shapes and dtypes of ``acts: [N, C]`` and ``target: [N]`` (finiteness is
    checked later, for free, on the column means)."""
    _check_float_tensor(acts, "activations")
    if acts.dim() != 2:
        raise UserError(f"activations must have shape [N, C], got shape {tuple(acts.shape)}")
    if acts.shape[0] < 2:
        raise UserError(f"need at least 2 samples for a covariance, got N={acts.shape[0]}")
    if acts.shape[1] < 1:
        raise UserError("activations have no channels (C=0)")
    if target is None:
        return
    _check_float_tensor(target, "target")
    if target.dim() != 1 or target.shape[0] != acts.shape[0]:
        raise UserError(f"target must have shape [N] = [{acts.shape[0]}], got {tuple(target.shape)}")
    if target.device != acts.device:
        raise UserError(f"target is on {target.device} but activations are on {acts.device}")


def check_cov(cov: Tensor) -> None:
    """Validate a joint covariance ``cov: [C+1, C+1]`` of (T, Y_1..Y_C)."""
    _check_float_tensor(cov, "covariance")
    if cov.dim() != 2 or cov.shape[0] != cov.shape[1] or cov.shape[0] < 2:
        raise UserError(f"covariance must have shape [C+1, C+1] with C >= 1 (element 0 = target), "
                        f"got {tuple(cov.shape)}")
    if not bool(torch.isfinite(cov).all()):
        raise UserError("covariance contains NaN/Inf; the activations it was computed from were not finite")
    if bool((torch.diagonal(cov) < 0).any()):
        raise UserError("covariance has a negative variance on its diagonal; it is not a covariance")


def _column_means(x: Tensor, what: str) -> Tensor:
    """Float64 column means of ``x: [N, C]`` (or [N]), raising :class:`UserError` on NaN/Inf.

    A NaN/Inf entry makes its column's float64 sum non-finite, so this doubles as the
    finiteness check at no extra pass over the data (a full ``isfinite`` pass costs as much as
    the covariance matmul); the slow scan only runs to word the error message.
    """
    mean = x.sum(dim=0, dtype=torch.float64) / x.shape[0]
    if not bool(torch.isfinite(mean).all()):
        raise UserError(_nonfinite_message(x, what))
    return mean


def gram(x: Tensor) -> Tensor:
    """``x' x`` for ``x: [N, C]``, computing only the block upper triangle when C is large.

    torch has no symmetric rank-k update, so a plain ``x.T @ x`` does all C^2 dot products; four
    column blocks compute 10 of the 16 blocks (~35% fewer flops on the dominant matmul).
    """
    c = x.shape[1]
    if c < 256:
        return x.T @ x
    edges = [round(k * c / 4) for k in range(5)]
    out = torch.empty(c, c, dtype=x.dtype, device=x.device)
    for a0, a1 in zip(edges[:-1], edges[1:]):
        blk = x[:, a0:a1].T @ x[:, a0:]  # rows a0:a1, columns a0:C
        out[a0:a1, a0:] = blk
        out[a0:, a0:a1] = blk.T
    return out


def covariance(acts: Tensor, target: Tensor | None = None) -> Tensor:
    """Unbiased covariance of ``(T, Y_1..Y_C)`` from ``acts: [N, C]`` and ``target: [N]``.

    Returns ``[C+1, C+1]`` in the dtype and on the device of ``acts``; element 0 is the target.
    With ``target=None`` row/column 0 is zero (no target: every task quantity will be 0).

    Two-pass: float64 means, then one centred ``N x C`` matmul in the input dtype (the
    arithmetic floor of the whole metric). Centring first avoids the cancellation of
    ``E[YY'] - mm'`` when means are large next to standard deviations, and makes a constant
    channel's variance exactly 0 (the float64 mean of identical float32 values is exact).

    >>> acts = torch.tensor([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0]])
    >>> covariance(acts, torch.tensor([0.0, 1.0, 2.0])).tolist()   # the constant channel: variance 0
    [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    """
    check_acts_target(acts, target)
    n, c = acts.shape
    dtype, device = acts.dtype, acts.device
    mean_y = _column_means(acts, "activations").to(dtype)
    yc = acts - mean_y
    cov = torch.zeros(c + 1, c + 1, dtype=dtype, device=device)
    cov[1:, 1:] = gram(yc) / (n - 1)
    if target is not None:
        mean_t = _column_means(target, "target").to(target.dtype)
        tc = (target - mean_t).to(dtype)
        cross = (tc @ yc) / (n - 1)
        cov[0, 1:] = cross
        cov[1:, 0] = cross
        cov[0, 0] = (tc @ tc) / (n - 1)
    if not bool(torch.isfinite(cov).all()):
        raise UserError(f"the covariance of these activations overflows {dtype}; pass float64 activations "
                        f"or rescale them")
    # the matmul is symmetric only up to rounding; downstream code assumes exact symmetry
    return 0.5 * (cov + cov.T)


@dataclass
class Standardised:
    """One layer's covariance seen as clipped correlations (float64).

    Attributes:
        corr: ``[C, C]`` channel correlations, off-diagonal clipped to ``[-RHO_MAX, RHO_MAX]``,
            rows/columns of dead channels 0, diagonal 1.
        rho_t: ``[C]`` channel-target correlations, clipped; 0 for dead channels and when the
            target has zero variance.
        var: ``[C]`` channel variances (unbiased; ``= J_i`` for pre-BN channels).
        var_t: target variance (0-dim).
        dead: ``[C]`` bool, zero-variance channels.
        out_dtype: dtype to return results in.
    """

    corr: Tensor
    rho_t: Tensor
    var: Tensor
    var_t: Tensor
    dead: Tensor
    out_dtype: torch.dtype

    @property
    def live(self) -> Tensor:
        return ~self.dead


def standardise(cov: Tensor) -> Standardised:
    """Turn a joint covariance ``cov: [C+1, C+1]`` (element 0 = target) into clipped correlations.

    Float64 regardless of input; see the module docstring for the clipping and dead rules.
    """
    check_cov(cov)
    out_dtype = cov.dtype
    cov = cov.to(torch.float64)
    cov = 0.5 * (cov + cov.T)  # tolerate rounding asymmetry from any producer
    var_all = torch.diagonal(cov)
    var_t, var = var_all[0], var_all[1:]
    dead = dead_channels(var)  # all-zero layer: every channel dead
    sd = torch.where(dead, torch.zeros_like(var), var.sqrt())
    inv_sd = torch.where(dead, torch.zeros_like(var), 1.0 / torch.where(dead, torch.ones_like(sd), sd))
    corr = cov[1:, 1:] * inv_sd[:, None] * inv_sd[None, :]
    corr = corr.clamp(-RHO_MAX, RHO_MAX)
    corr.fill_diagonal_(1.0)
    # dead rows/cols are already 0 off-diagonal (inv_sd = 0); the diagonal 1 keeps the matrix PD
    if float(var_t) > 0:
        rho_t = cov[0, 1:] * inv_sd / var_t.sqrt()
        rho_t = rho_t.clamp(-RHO_MAX, RHO_MAX)
    else:
        rho_t = torch.zeros_like(var)
    return Standardised(corr=corr, rho_t=rho_t, var=var, var_t=var_t, dead=dead, out_dtype=out_dtype)


def mi_from_r2(r2: Tensor) -> Tensor:
    """Gaussian MI ``-1/2 log(1 - R^2)`` (nats) with ``R^2`` clipped to ``[0, RHO_MAX^2]``."""
    return -0.5 * torch.log1p(-r2.clamp(0.0, RHO_MAX**2))


def mi_from_rho(rho: Tensor) -> Tensor:
    """Gaussian MI between two scalars with correlation ``rho`` (clipped): ``-1/2 log(1 - rho^2)``."""
    return mi_from_r2(rho * rho)


def r2_two(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """Squared multiple correlation of T on (Y_i, Y_j), elementwise (broadcasting).

    ``a = rho_iT``, ``b = rho_jT``, ``c = rho_ij``:
    ``R^2 = (a^2 + b^2 - 2abc) / (1 - c^2) = 1 - det R_{T,i,j} / det R_{i,j}``, i.e. the
    determinant ratio ``sigma_T^2 det Sigma_ij / det Sigma_Tij`` of METHODS §3 in correlation form.
    ``|c| <= RHO_MAX`` keeps the denominator >= 1 - RHO_MAX^2.
    """
    return (a * a + b * b - 2.0 * a * b * c) / (1.0 - c * c)


def r2_three(t: tuple[Tensor, Tensor, Tensor], r: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Squared multiple correlation of T on (Y_i, Y_j, Y_k), elementwise.

    ``t = (rho_iT, rho_jT, rho_kT)``, ``r = (rho_ij, rho_ik, rho_jk)``. Closed form
    ``R^2 = t' adj(R3) t / det R3`` (= 1 - det R_{T,ijk} / det R_{ijk}, the 4x4/3x3 log-determinant
    ratio), which is far cheaper than batched ``slogdet`` on hundreds of thousands of 4x4 blocks.
    Returns ``(r2, det3)``; callers treat ``det3 <= tiny`` as a degenerate triplet.
    """
    ti, tj, tk = t
    a, b, c = r  # a = r_ij, b = r_ik, c = r_jk
    det3 = 1.0 - a * a - b * b - c * c + 2.0 * a * b * c
    # adjugate of [[1,a,b],[a,1,c],[b,c,1]]
    q = (ti * ti * (1.0 - c * c) + tj * tj * (1.0 - b * b) + tk * tk * (1.0 - a * a)
         + 2.0 * ti * tj * (b * c - a) + 2.0 * ti * tk * (a * c - b) + 2.0 * tj * tk * (a * b - c))
    safe = torch.where(det3 > 1e-12, det3, torch.ones_like(det3))
    return q / safe, det3


def peer_ranking(std: Standardised) -> tuple[Tensor, Tensor]:
    """Every channel's peers ranked by |rho_ij| (equivalently by R_X(i,j)), descending.

    Returns ``(idx [C, C-1], valid [C, C-1])``: ``idx[i]`` lists the other channels, live peers
    first by decreasing |rho_ij|, ties broken by the lower channel index (a stable sort, so the
    loop oracle and this batched code pick the same peers); ``valid`` is False for dead peers
    and on dead rows. The hull ``correlation`` order reads its first K columns, the candidate
    pool of the target axis its first P columns (R_X is increasing in |rho|).
    """
    c = std.corr.shape[0]
    dev = std.corr.device
    admissible = std.live[:, None] & std.live[None, :] & ~torch.eye(c, dtype=torch.bool, device=dev)
    score = torch.where(admissible, std.corr.abs(), torch.full_like(std.corr, -1.0))
    score.fill_diagonal_(-2.0)  # self always last, then dropped
    values, idx = torch.sort(score, dim=1, descending=True, stable=True)
    return idx[:, : c - 1], values[:, : c - 1] >= 0
