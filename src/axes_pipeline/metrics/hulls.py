"""Peer explanation and replaceability hulls (METHODS §2), from the C x C correlation alone.

Peer explanation of channel i by a peer set S, on the correlation matrix R with ridge lambda
added to the diagonal of the predictors' block:

    E_i(S) = r_iS' (R_SS + lambda I)^-1 r_Si            (sigma_i^2 = 1 on correlations)

Full explanation of every channel at once. Write G = R + lambda I. Block inversion of G around
channel i gives ``(G^-1)_ii = 1 / (G_ii - r_iS' G_SS^-1 r_Si) = 1 / (1 + lambda - E_i^full)``, so

    E_i^full = 1 + lambda - 1 / (G^-1)_ii

(one Cholesky of G for the whole layer; with lambda = 0 this is the textbook
``1 - 1/(R^-1)_ii``; the ``+ lambda`` term is what keeps it equal to the ridge regression).
Values are clipped to [0, 1].

Hulls, batched over all channels of the layer:

* ``correlation`` order: the peers of i ranked once by |rho_ij|; the Cholesky factor of the
  K x K block of G on the first K ranked peers gives every prefix's E at once, because the
  Cholesky factor of a leading block is the leading block of the factor:
  ``E_i(first k) = sum_{m<=k} z_m^2`` with ``z = L^-1 r`` (one batched [C, K, K] Cholesky).
* ``greedy`` order: forward selection as a pivoted Cholesky run for all C channels in
  parallel. For channel i we keep the covariances of every variable with the innovations of
  the peers chosen so far (``U: [C, K, C]``); the conditional variance ``d_j`` of each candidate
  and its conditional covariance ``q_j`` with Y_i give the exact gain of adding j,
  ``q_j^2 / d_j``, for all candidates at once. K steps of ``O(C^2 K)`` work.

The hull is the shortest prefix with ``E_i(H) >= (1 - eps) E_i^full`` (compared with a 1e-9
slack so rounding cannot turn a reached threshold into a saturated hull), at most K peers.
Size 0 only when E_i^full = 0. Saturated: K peers taken without reaching the threshold.
Dead channels are neither explained nor peers.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Slack when comparing E values computed along different routes (float64 rounding).
E_TOL = 1e-9


def ridge_gram(corr: Tensor, ridge: float) -> tuple[Tensor, Tensor]:
    """``G = corr + ridge * I`` and its Cholesky factor (float64 [C, C] each).

    Clipping |rho| to 0.999 can make a correlation matrix with near-duplicate channels slightly
    indefinite; if ``G`` is then not positive definite, the correlation matrix is first projected
    onto the PSD cone (negative eigenvalues set to 0, then rescaled to unit diagonal), a small
    change that makes every regression well posed. Untouched otherwise.
    """
    c = corr.shape[0]
    eye = torch.eye(c, dtype=corr.dtype, device=corr.device)
    gram = corr + ridge * eye
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        evals, evecs = torch.linalg.eigh(corr)
        fixed = (evecs * evals.clamp(min=0.0)) @ evecs.T
        # back to unit diagonal (still PSD): every E formula here assumes sigma_i^2 = 1
        sd = torch.diagonal(fixed).clamp(min=1e-12).sqrt()
        fixed = fixed / (sd[:, None] * sd[None, :])
        fixed = 0.5 * (fixed + fixed.T)
        fixed.fill_diagonal_(1.0)
        gram = fixed + ridge * eye
        chol = torch.linalg.cholesky(gram)
    return gram, chol


def prefix_explained_correlation(gram: Tensor, idx: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """E of each prefix of the |rho|-ranked peers, for every channel.

    ``idx, valid: [C, k]``: the first k columns of
    :func:`~axes_pipeline.metrics.gaussian.peer_ranking`. Returns ``(e_prefix [C, k], valid)``:
    ``e_prefix[i, m]`` = E_i(first m+1 ranked peers); ``valid[i, m]`` says that peer exists.
    """
    k = idx.shape[1]
    # K x K blocks of G on each channel's ranked peers; invalid slots become identity rows
    # with zero target covariance, so they add nothing and keep the block PD.
    block = gram[idx[:, :, None], idx[:, None, :]]
    vv = valid[:, :, None] & valid[:, None, :]
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    block = torch.where(vv, block, eye.expand_as(block))
    # off-diagonal of G = the (PSD-repaired, if ridge_gram had to) correlations
    rhs = torch.where(valid, gram.gather(1, idx), torch.zeros((), dtype=gram.dtype, device=gram.device))
    chol = torch.linalg.cholesky(block)
    z = torch.linalg.solve_triangular(chol, rhs.unsqueeze(-1), upper=False).squeeze(-1)
    return torch.cumsum(z * z, dim=1), valid


def prefix_explained_greedy(gram: Tensor, dead: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """E after each forward-selection step (largest gain first), for every channel.

    Returns ``(e_prefix [C, k], valid [C, k])`` like :func:`prefix_explained_correlation`.
    ``gram`` = ridge Gram matrix G; its off-diagonal is the correlation, which is also the
    covariance of Y_i with each peer, so row i of the running quantities doubles as the
    target's (G_ii is never used for the target).
    """
    c = gram.shape[0]
    dev, dt = gram.device, gram.dtype
    ar = torch.arange(c, device=dev)
    live = ~dead
    avail = live[:, None] & live[None, :] & ~torch.eye(c, dtype=torch.bool, device=dev)  # j != i, both live
    u = torch.zeros(c, k, c, dtype=dt, device=dev)  # u[i, m, j] = Cov(Y_j, innovation m | hull of i)
    d = torch.diagonal(gram).expand(c, c).clone()  # conditional variance of peer j given i's hull
    q = gram.clone()  # q[i, j] = conditional Cov(Y_i, Y_j) given i's hull
    e = torch.zeros(c, dtype=dt, device=dev)
    e_prefix = torch.zeros(c, k, dtype=dt, device=dev)
    valid = torch.zeros(c, k, dtype=torch.bool, device=dev)
    neg_inf = torch.tensor(float("-inf"), dtype=dt, device=dev)
    for m in range(k):  # K steps, each vectorised over all channels and candidates
        gain = torch.where(avail, q * q / d, neg_inf)
        s = torch.argmax(gain, dim=1)  # first index on ties, like the loop oracle
        best = gain.gather(1, s[:, None]).squeeze(1)
        ok = torch.isfinite(best)
        col = gram[s].clone()  # Cov(Y_s, Y_j) for every j, one row per channel i
        if m > 0:
            col -= torch.einsum("imj,im->ij", u[:, :m, :], u[ar, :m, s])
        col = col / d[ar, s].sqrt()[:, None]
        col = torch.where(ok[:, None], col, torch.zeros((), dtype=dt, device=dev))
        u[:, m, :] = col
        d = d - col * col
        qi = col[ar, ar]  # Cov(Y_i, new innovation)
        q = q - qi[:, None] * col
        e = e + qi * qi
        e_prefix[:, m] = e
        valid[:, m] = ok
        avail[ar, s] = False
    return e_prefix, valid


def build_hulls(corr: Tensor, dead: Tensor, ranking: tuple[Tensor, Tensor], *, ridge: float, hull_eps: float,
                hull_max: int, hull_order: str) -> dict[str, Tensor]:
    """All replaceability hulls of one layer from its clipped correlation ``corr: [C, C]``.

    ``ranking``: :func:`~axes_pipeline.metrics.gaussian.peer_ranking` of the layer.

    Returns float64/int64/bool ``[C]`` tensors: ``full_explained``, ``hull_size``,
    ``hull_explained``, ``hull_saturated``, ``hull_score``.
    """
    c = corr.shape[0]
    gram, chol = ridge_gram(corr, ridge)
    # E_i^full = 1 + ridge - 1/(G^-1)_ii, clipped to [0, 1]; 0 if dead
    e_full = (1.0 + ridge - 1.0 / torch.diagonal(torch.cholesky_inverse(chol))).clamp(0.0, 1.0)
    e_full = torch.where(dead, torch.zeros_like(e_full), e_full)
    k = min(hull_max, c - 1)
    if k <= 0:
        zeros = torch.zeros(c, dtype=corr.dtype, device=corr.device)
        return {
            "full_explained": e_full,
            "hull_size": torch.zeros(c, dtype=torch.int64, device=corr.device),
            "hull_explained": zeros,
            "hull_saturated": torch.zeros(c, dtype=torch.bool, device=corr.device),
            "hull_score": e_full.clone(),
        }
    if hull_order == "correlation":
        e_prefix, valid = prefix_explained_correlation(gram, ranking[0][:, :k], ranking[1][:, :k])
    else:
        e_prefix, valid = prefix_explained_greedy(gram, dead, k)
    # E_i(empty set) = 0 heads the list so that E_full = 0 gives the empty hull
    e_all = torch.cat([torch.zeros(c, 1, dtype=e_prefix.dtype, device=e_prefix.device), e_prefix], dim=1)
    threshold = (1.0 - hull_eps) * e_full - E_TOL
    reached = e_all >= threshold[:, None]
    reached[:, 1:] &= valid  # a missing peer cannot complete a hull
    any_reached = reached.any(dim=1)
    first = torch.argmax(reached.to(torch.int8), dim=1)  # first True
    n_taken = valid.sum(dim=1)
    size = torch.where(any_reached, first, n_taken)
    saturated = ~any_reached & (n_taken >= hull_max)
    # fewer than K peers and still short of the threshold can only be rounding: not "saturated"
    explained = e_all.gather(1, size[:, None]).squeeze(1).clamp(0.0, 1.0)
    live = ~dead
    size = torch.where(live, size, torch.zeros_like(size))
    explained = torch.where(live, explained, torch.zeros_like(explained))
    saturated = saturated & live
    score = e_full / size.clamp(min=1).to(e_full.dtype)
    return {
        "full_explained": e_full,
        "hull_size": size,
        "hull_explained": explained,
        "hull_saturated": saturated,
        "hull_score": score,
    }
