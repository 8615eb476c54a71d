"""``channel_axes``: every per-channel quantity of both axes for one layer (METHODS §2–§3).

One N x C covariance (the only pass over the samples), then C x C closed forms:

============== ====================================================================
key             definition
============== ====================================================================
input_capture   I_X(i) = 1/2 log(1 + sigma_i^2 / sigma0^2)   (J_i = sigma_i^2, pre-BN)
peer_overlap    mean_{j != i} R_X(i,j), divisor (live channels - 1)
full_explained  E_i^full, ridge regression on all live peers, in [0, 1]
hull_size       |H_i| (int64)
hull_explained  E_i(H_i)
hull_saturated  K peers taken without reaching (1 - eps) E_i^full (bool)
hull_score      E_i^full / max(1, |H_i|)
task_info       I_T(i) = -1/2 log(1 - rho_iT^2)
target_excess   mean of the top-M S_ij over the P peers with largest R_X(i,j)
task_redundancy mean over the same P peers of min(I_T(i), I_T(j))
task_unique     max(0, I_T(i) - task_redundancy(i))
dead            zero-variance channel (bool); all its quantities are 0
============== ====================================================================

Dead channels are removed from the layer for every peer quantity (they are nobody's peer and
do not count in the peer_overlap divisor or the sigma0 statistic), so appending a dead channel
to a layer changes no live channel's values.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from axes_pipeline.errors import UserError, unknown_name
from axes_pipeline.metrics.excess import _check_pool_top, _overlap, target_axis
from axes_pipeline.metrics.gaussian import Standardised, covariance, peer_ranking, small_ops, standardise
from axes_pipeline.metrics.hulls import build_hulls

#: Keys of :func:`channel_axes`, in the paper's order (also the CSV column names).
AXES_KEYS = (
    "input_capture",
    "peer_overlap",
    "full_explained",
    "hull_size",
    "hull_explained",
    "hull_saturated",
    "hull_score",
    "task_info",
    "target_excess",
    "task_redundancy",
    "task_unique",
    "dead",
)

SIGMA0_STATS = {"median": 0.5, "mean": None, "p75": 0.75, "p90": 0.90}
HULL_ORDERS = ("correlation", "greedy")


def check_knobs(*, sigma0, hull_eps, hull_max, hull_order, ridge, pool, top) -> None:
    """Raise :class:`UserError` for a bad knob value, before any work."""
    if isinstance(sigma0, str):
        if sigma0 not in SIGMA0_STATS:
            raise unknown_name("sigma0 statistic", sigma0, list(SIGMA0_STATS) + ["<positive float>"])
    elif isinstance(sigma0, bool) or not isinstance(sigma0, (int, float)) or not sigma0 > 0:
        raise UserError(f"sigma0 must be one of median|mean|p75|p90 or a positive float (sigma0^2), got {sigma0!r}")
    if not (isinstance(hull_eps, (int, float)) and 0.0 <= hull_eps < 1.0):
        raise UserError(f"hull_eps must be in [0, 1), got {hull_eps!r}")
    if isinstance(hull_max, bool) or not isinstance(hull_max, int) or hull_max < 1:
        raise UserError(f"hull_max must be a positive integer, got {hull_max!r}")
    if hull_order not in HULL_ORDERS:
        raise unknown_name("hull_order", str(hull_order), HULL_ORDERS)
    if not (isinstance(ridge, (int, float)) and not isinstance(ridge, bool) and ridge > 0):
        raise UserError(f"ridge must be a positive float (it keeps peer regressions well posed), got {ridge!r}")
    _check_pool_top(pool, top)


def sigma0_sq(var: Tensor, dead: Tensor, sigma0) -> Tensor:
    """The scale sigma0^2 of input capture: a statistic of the live channels' variances J_i.

    ``median`` is the usual median (mean of the two middle values for an even count), ``p75`` /
    ``p90`` linear-interpolated quantiles, ``mean`` the mean; a float is sigma0^2 itself (same
    units as J_i). 0 when no channel is live.
    """
    if not isinstance(sigma0, str):
        return torch.tensor(float(sigma0), dtype=var.dtype, device=var.device)
    live_var = var[~dead]
    if live_var.numel() == 0:
        return torch.zeros((), dtype=var.dtype, device=var.device)
    q = SIGMA0_STATS[sigma0]
    return live_var.mean() if q is None else torch.quantile(live_var, q)


def input_capture(std: Standardised, sigma0) -> Tensor:
    """I_X(i) = 1/2 log(1 + J_i / sigma0^2), float64 ``[C]``; 0 for dead channels."""
    s0 = sigma0_sq(std.var, std.dead, sigma0)
    if float(s0) <= 0:
        return torch.zeros_like(std.var)
    ix = 0.5 * torch.log1p(std.var / s0)
    return torch.where(std.dead, torch.zeros_like(ix), ix)


def channel_axes_from_moments(cov: Tensor, *, sigma0="median", hull_eps: float = 0.05, hull_max: int = 10,
                              hull_order: str = "correlation", ridge: float = 1e-3, pool: int = 50,
                              top: int = 10) -> dict[str, Tensor]:
    """Both axes of one layer from its joint covariance.

    Args:
        cov: ``[C+1, C+1]`` unbiased covariance of (T, Y_1..Y_C), element 0 = target (from
            :func:`~axes_pipeline.metrics.gaussian.covariance` or
            :class:`~axes_pipeline.metrics.moments.ActivationMoments`). All-zero row 0 = no
            target (task quantities 0).
        sigma0: scale of input capture: ``median`` | ``mean`` | ``p75`` | ``p90`` of J_i over
            the live channels, or a positive float taken as sigma0^2.
        hull_eps: hull threshold E_i(H) >= (1 - hull_eps) E_i^full.
        hull_max: K, the most peers a hull may take.
        hull_order: ``correlation`` (prefix of peers ranked by |rho_ij|) | ``greedy``.
        ridge: lambda added to the diagonal of the peers' correlation block.
        pool: P, candidate peers (largest R_X) for target excess and task redundancy.
        top: M, the top S_ij averaged into target excess.

    Returns:
        dict of ``[C]`` tensors on ``cov``'s device, keys :data:`AXES_KEYS`: floats in
        ``cov``'s dtype, ``hull_size`` int64, ``hull_saturated`` and ``dead`` bool.

    Example (closed form: unit variances, ρ(T, Y_1) = ρ(T, Y_2) = 0.5, ρ(Y_1, Y_2) = 0.9, Y_3 independent)::

        >>> import math, torch
        >>> cov = torch.tensor([[1.0, 0.5, 0.5, 0.0], [0.5, 1.0, 0.9, 0.0],
        ...                     [0.5, 0.9, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
        >>> axes = channel_axes_from_moments(cov)
        >>> [round(v, 4) for v in axes["task_info"].tolist()]          # -½ ln(1 − 0.5²) for Y_1, Y_2
        [0.1438, 0.1438, 0.0]
        >>> round(-0.5 * math.log(1 - 0.5 ** 2), 4)
        0.1438
        >>> [round(v, 4) for v in axes["peer_overlap"].tolist()]       # -½ ln(1 − 0.9²) over 2 peers
        [0.4152, 0.4152, 0.0]
        >>> axes["hull_size"].tolist()                                  # Y_1 and Y_2 stand in for each other
        [1, 1, 0]
    """
    check_knobs(sigma0=sigma0, hull_eps=hull_eps, hull_max=hull_max, hull_order=hull_order, ridge=ridge, pool=pool, top=top)
    with small_ops(cov.device):
        std = standardise(cov)
        peer_overlap = _overlap(std).sum(dim=1) / max(int(std.live.sum()) - 1, 1)
        ranking = peer_ranking(std)  # one sort serves the hull order and the candidate pools
        hulls = build_hulls(std.corr, std.dead, ranking, ridge=float(ridge), hull_eps=float(hull_eps),
                            hull_max=hull_max, hull_order=hull_order)
        target = target_axis(std, ranking, pool, top)
        out = {
            "input_capture": input_capture(std, sigma0),
            "peer_overlap": peer_overlap,
            **hulls,
            **{k: v for k, v in target.items() if not k.startswith("_")},
            "dead": std.dead.clone(),
        }
        return {k: (out[k].to(std.out_dtype) if out[k].is_floating_point() else out[k]) for k in AXES_KEYS}


def channel_axes(acts: Tensor, target: Tensor, **knobs) -> dict[str, Tensor]:
    """Both axes of one layer from samples ``acts: [N, C]`` and ``target: [N]``.

    Computes the covariance once (one centred N x C matmul in ``acts``' dtype, on its device)
    and calls :func:`channel_axes_from_moments`; see there for knobs and outputs. Raises
    :class:`~axes_pipeline.errors.UserError` for NaN/Inf samples or bad shapes/knobs.
    """
    # a bad knob fails before the N x C covariance; the defaults live in one signature
    params = inspect.signature(channel_axes_from_moments).parameters
    check_knobs(**{k: knobs.get(k, params[k].default) for k in params if k != "cov"})
    return channel_axes_from_moments(covariance(acts, target), **knobs)
