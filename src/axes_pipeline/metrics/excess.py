"""Pairwise quantities and the target axis's synergy terms (METHODS §2–§3), in closed form.

* ``pairwise_overlap``: R_X(i,j) = -1/2 log(1 - rho_ij^2), diagonal 0.
* ``pairwise_target_excess``: S_ij = I(T; Y_i, Y_j) - max(I_T(i), I_T(j)), floored at 0,
  diagonal 0, with I(T; Y_i, Y_j) = -1/2 log(1 - R^2_{T|ij}) and R^2 from the 2x2/3x3
  determinant closed form (:func:`~axes_pipeline.metrics.gaussian.r2_two`): all C^2 pairs as
  one elementwise expression.
* per-channel target excess, task redundancy and task unique information over each channel's
  candidate pool (the P live peers with the largest R_X(i,j)).
* ``triplet_ratio``: the layer's S3/S2 (METHODS §3 sampling), all triplets of the layer as one
  batched closed-form 3-predictor R^2.

Every ``*_from_moments`` function takes the joint unbiased covariance ``cov: [C+1, C+1]`` of
(T, Y_1..Y_C) (element 0 = target), e.g. from
:class:`~axes_pipeline.metrics.moments.ActivationMoments`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from axes_pipeline.errors import UserError
from axes_pipeline.metrics.gaussian import (
    Standardised,
    covariance,
    mi_from_r2,
    mi_from_rho,
    peer_ranking,
    r2_three,
    r2_two,
    small_ops,
    standardise,
)


def _check_pool_top(pool: int, top: int) -> None:
    if not isinstance(pool, int) or isinstance(pool, bool) or pool < 1:
        raise UserError(f"pool must be a positive integer (number of candidate peers), got {pool!r}")
    if not isinstance(top, int) or isinstance(top, bool) or top < 1:
        raise UserError(f"top must be a positive integer (number of top pairs averaged), got {top!r}")


def _overlap(std: Standardised) -> Tensor:
    """R_X [C, C] float64: dead rows/cols and the diagonal are 0."""
    r_x = mi_from_rho(std.corr)
    r_x.fill_diagonal_(0.0)
    return r_x  # dead rows have corr = 0 off-diagonal, hence R_X = 0 exactly


def _pair_info(std: Standardised) -> Tensor:
    """I(T; Y_i, Y_j) [C, C] float64 (diagonal: I_T(i))."""
    pair = mi_from_r2(r2_two(std.rho_t[:, None], std.rho_t[None, :], std.corr))
    pair.diagonal().copy_(mi_from_rho(std.rho_t))
    return pair


def _target_excess(std: Standardised, pair_info: Tensor, task_info: Tensor) -> Tensor:
    """S [C, C] float64, floored at 0, diagonal 0, dead rows/cols 0."""
    s = (pair_info - torch.maximum(task_info[:, None], task_info[None, :])).clamp(min=0.0)
    s.fill_diagonal_(0.0)
    keep = std.live[:, None] & std.live[None, :]
    return torch.where(keep, s, torch.zeros_like(s))


def pairwise_overlap_from_moments(cov: Tensor) -> Tensor:
    """R_X(i,j) = -1/2 log(1 - rho_ij^2) from ``cov: [C+1, C+1]`` -> ``[C, C]`` (diag 0): the R-graph's weights.

    >>> import math, torch
    >>> cov = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.9], [0.0, 0.9, 1.0]], dtype=torch.float64)
    >>> round(float(pairwise_overlap_from_moments(cov)[0, 1]), 4), round(-0.5 * math.log(1 - 0.9 ** 2), 4)
    (0.8304, 0.8304)
    """
    with small_ops(cov.device):
        std = standardise(cov)
        return _overlap(std).to(std.out_dtype)


def pairwise_overlap(acts: Tensor) -> Tensor:
    """R_X(i,j) from ``acts: [N, C]`` -> ``[C, C]``, diagonal 0, dead channels 0."""
    return pairwise_overlap_from_moments(covariance(acts, None))


def pairwise_target_excess_from_moments(cov: Tensor) -> Tensor:
    """S_ij (METHODS §3) from ``cov: [C+1, C+1]`` -> ``[C, C]``, floored at 0, diagonal 0."""
    with small_ops(cov.device):
        std = standardise(cov)
        task_info = mi_from_rho(std.rho_t)
        return _target_excess(std, _pair_info(std), task_info).to(std.out_dtype)


def pairwise_target_excess(acts: Tensor, target: Tensor) -> Tensor:
    """S_ij from ``acts: [N, C]``, ``target: [N]`` -> ``[C, C]``."""
    return pairwise_target_excess_from_moments(covariance(acts, target))


def target_axis(std: Standardised, ranking: tuple[Tensor, Tensor], pool: int, top: int) -> dict[str, Tensor]:
    """Per-channel ``task_info``, ``target_excess``, ``task_redundancy``, ``task_unique``
    (float64 ``[C]``), plus the intermediates the triplet sampling reuses."""
    c = std.corr.shape[0]
    task_info = mi_from_rho(std.rho_t)
    task_info = torch.where(std.dead, torch.zeros_like(task_info), task_info)
    pair_info = _pair_info(std)
    s = _target_excess(std, pair_info, task_info)
    zeros = torch.zeros(c, dtype=s.dtype, device=s.device)
    if c < 2:
        return {"task_info": task_info, "target_excess": zeros, "task_redundancy": zeros.clone(),
                "task_unique": task_info.clone(), "_s": s, "_pair_info": pair_info, "_pool_idx": None,
                "_pool_valid": None, "_top_idx": None, "_top_valid": None}
    # each channel's candidate pool: its first ``pool`` ranked peers, the live ones with the largest
    # R_X (increasing in |rho|); all of them when fewer exist. idx, valid: [C, P], P = min(pool, C-1)
    idx, valid = ranking[0][:, :pool], ranking[1][:, :pool]
    n_valid = valid.sum(dim=1)
    neg_inf = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)
    s_cand = torch.where(valid, s.gather(1, idx), neg_inf)
    m = min(top, idx.shape[1])
    # stable: equal S_ij (e.g. many pairs floored at 0) keep the pool order, so the triplet
    # sampling extends the same pairs as the loop oracle
    top_vals, top_pos = torch.sort(s_cand, dim=1, descending=True, stable=True)
    top_vals, top_pos = top_vals[:, :m], top_pos[:, :m]
    top_valid = torch.isfinite(top_vals)  # = first min(top, n_valid) slots
    top_sum = torch.where(top_valid, top_vals, torch.zeros((), dtype=s.dtype, device=s.device)).sum(dim=1)
    excess = top_sum / top_valid.sum(dim=1).clamp(min=1)
    mins = torch.minimum(task_info[:, None], task_info[idx])
    redundancy = torch.where(valid, mins, torch.zeros((), dtype=s.dtype, device=s.device)).sum(dim=1)
    redundancy = redundancy / n_valid.clamp(min=1)
    unique = (task_info - redundancy).clamp(min=0.0)
    return {
        "task_info": task_info,
        "target_excess": excess,
        "task_redundancy": redundancy,
        "task_unique": unique,
        "_s": s,
        "_pair_info": pair_info,
        "_pool_idx": idx,
        "_pool_valid": valid,
        "_top_idx": idx.gather(1, top_pos),  # channel index of each anchor's top pairs
        "_top_valid": top_valid,
    }


def _triplets(std: Standardised, ta: dict[str, Tensor]) -> dict[str, Tensor]:
    """Best-third-channel S3 for every anchor's top pairs (see :func:`triplet_ratio`)."""
    c = std.corr.shape[0]
    dev, dt = std.corr.device, std.corr.dtype
    zero = torch.zeros((), dtype=dt, device=dev)
    empty = {"s3_s2": zero, "mean_s3": zero, "mean_s2": zero,
             "n_triplets": torch.zeros((), dtype=torch.int64, device=dev),
             "anchor_s3": torch.zeros(c, dtype=dt, device=dev), "anchor_s2": torch.zeros(c, dtype=dt, device=dev)}
    if ta["_pool_idx"] is None:
        return empty
    pool_idx, pool_valid = ta["_pool_idx"], ta["_pool_valid"]  # [C, P]
    j_idx, j_valid = ta["_top_idx"], ta["_top_valid"]  # [C, M]
    anchors = pool_valid.sum(dim=1) >= 2  # a pair needs a third channel from the same pool
    j_valid = j_valid & anchors[:, None]
    if not bool(j_valid.any()):
        return empty
    corr, rho_t, pair_info, s = std.corr, std.rho_t, ta["_pair_info"], ta["_s"]
    ar = torch.arange(c, device=dev)
    i3 = ar[:, None, None]  # [C, 1, 1]
    j3 = j_idx[:, :, None]  # [C, M, 1]
    k3 = pool_idx[:, None, :]  # [C, 1, P]
    ok = j_valid[:, :, None] & pool_valid[:, None, :] & (k3 != j3)  # [C, M, P]
    r2, det3 = r2_three((rho_t[i3], rho_t[j3], rho_t[k3]), (corr[i3, j3], corr[i3, k3], corr[j3, k3]))
    best_pair = torch.maximum(torch.maximum(pair_info[i3, j3], pair_info[i3, k3]), pair_info[j3, k3])
    s3 = (mi_from_r2(r2) - best_pair).clamp(min=0.0)
    # det R_ijk ~ 0: Y_k is (nearly) a combination of Y_i, Y_j and adds nothing
    s3 = torch.where(det3 > 1e-12, s3, zero)
    s3 = torch.where(ok, s3, torch.tensor(-1.0, dtype=dt, device=dev))
    s3_best = s3.max(dim=2).values  # [C, M] best third channel for each top pair
    s2 = s[ar[:, None], j_idx]  # [C, M]
    w = j_valid.to(dt)
    n = w.sum()
    mean_s3 = (s3_best.clamp(min=0.0) * w).sum() / n
    mean_s2 = (s2 * w).sum() / n
    ratio = torch.where(mean_s2 > 0, mean_s3 / torch.where(mean_s2 > 0, mean_s2, torch.ones_like(mean_s2)), zero)
    per_anchor = w.sum(dim=1).clamp(min=1)
    return {
        "s3_s2": ratio,
        "mean_s3": mean_s3,
        "mean_s2": mean_s2,
        "n_triplets": j_valid.sum(),
        "anchor_s3": (s3_best.clamp(min=0.0) * w).sum(dim=1) / per_anchor,
        "anchor_s2": (s2 * w).sum(dim=1) / per_anchor,
    }


def triplet_ratio_from_moments(cov: Tensor, *, pool: int = 50, top: int = 10) -> dict[str, Tensor]:
    """The layer's S3/S2 from ``cov: [C+1, C+1]``; see :func:`triplet_ratio`."""
    _check_pool_top(pool, top)
    with small_ops(cov.device):
        std = standardise(cov)
        out = _triplets(std, target_axis(std, peer_ranking(std), pool, top))
    return {k: (v.to(std.out_dtype) if v.is_floating_point() else v) for k, v in out.items()}


def triplet_ratio(acts: Tensor, target: Tensor, *, pool: int = 50, top: int = 10) -> dict[str, Tensor]:
    """Triplet target excess of one layer: S3/S2 (METHODS §3).

    Sampling: anchors are the live channels whose candidate pool (the ``pool`` peers with the
    largest R_X) has at least two members. For each anchor i its top-``top`` pairs (i, j) by
    S_ij within the pool (the pairs averaged in ``target_excess``); each pair is extended by the
    best third channel k (largest S3) from the anchor's pool, k != j. With
    ``S3(i,j,k) = I(T; Y_i,Y_j,Y_k) - max over the three pairs of I(T; pair)`` (floored at 0),

        s3_s2 = mean S3 over these triplets / mean S_ij over the same pairs.

    Returns 0-dim tensors ``s3_s2`` (0 when mean S_ij = 0, never NaN), ``mean_s3``, ``mean_s2``,
    ``n_triplets``, and ``[C]`` per-anchor means ``anchor_s3``, ``anchor_s2`` (0 off anchors).
    ``acts: [N, C]``, ``target: [N]``.
    """
    return triplet_ratio_from_moments(covariance(acts, target), pool=pool, top=top)
