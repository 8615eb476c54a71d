"""Slow, obviously-correct loop oracle for the metrics (tests and benchmark only).

This is the authors' style of computation: per channel, per pair and per candidate peer set a
fresh regression over the N samples (numpy ``lstsq``), Python loops everywhere, no shared
covariance. It implements METHODS §2–§3 directly from the samples and shares only the
documented conventions with the fast code (|rho| and multiple correlations clipped at 0.999,
dead channels excluded, ties broken by the lower channel index, the 1e-9 slack on the hull
threshold). Never use it on real layers: it is O(C * (N C^2)) and exists to be compared with.
"""

from __future__ import annotations

import numpy as np

from axes_pipeline.metrics.gaussian import DEAD_RTOL, RHO_MAX
from axes_pipeline.metrics.hulls import E_TOL


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _mi_r2(r2: float) -> float:
    return -0.5 * np.log1p(-min(max(r2, 0.0), RHO_MAX**2))


class LoopOracle:
    """Per-channel loops over the samples of one layer: ``acts [N, C]``, ``target [N]``."""

    def __init__(self, acts, target, *, ridge: float = 1e-3) -> None:
        y = _np(acts)
        self.t = _np(target)
        self.n, self.c = y.shape
        self.ridge = ridge
        var = np.array([np.var(y[:, i], ddof=1) for i in range(self.c)])
        self.var = var
        self.dead = var <= DEAD_RTOL * var.max()
        self.live = [i for i in range(self.c) if not self.dead[i]]
        # standardised columns: regressions on them are regressions on the correlation matrix
        self.z = np.zeros_like(y)
        for i in self.live:
            self.z[:, i] = (y[:, i] - y[:, i].mean()) / np.sqrt(var[i])
        t_sd = np.std(self.t, ddof=1)
        self.zt = (self.t - self.t.mean()) / t_sd if t_sd > 0 else np.zeros_like(self.t)
        self._rho: dict[tuple[int, int], float] = {}

    # ---------------------------------------------------------------- pairwise, one dot each
    def rho(self, i: int, j: int) -> float:
        key = (min(i, j), max(i, j))
        if key not in self._rho:
            r = float(np.dot(self.z[:, i], self.z[:, j]) / (self.n - 1))
            self._rho[key] = min(max(r, -RHO_MAX), RHO_MAX)
        return self._rho[key]

    def rho_t(self, i: int) -> float:
        r = float(np.dot(self.z[:, i], self.zt) / (self.n - 1))
        return min(max(r, -RHO_MAX), RHO_MAX)

    def overlap(self, i: int, j: int) -> float:
        if i == j or self.dead[i] or self.dead[j]:
            return 0.0
        return _mi_r2(self.rho(i, j) ** 2)

    def task_info(self, i: int) -> float:
        return 0.0 if self.dead[i] else _mi_r2(self.rho_t(i) ** 2)

    def ranked_peers(self, i: int) -> list[int]:
        """Live peers of i by decreasing |rho_ij|, ties to the lower index."""
        peers = [j for j in self.live if j != i]
        return sorted(peers, key=lambda j: (-abs(self.rho(i, j)), j))

    # ---------------------------------------------------------------- regressions over samples
    def explained(self, i: int, peers: list[int]) -> float:
        """E_i(S): ridge regression of z_i on z_S over the samples (lstsq on the augmented system)."""
        if not peers:
            return 0.0
        zs = self.z[:, peers] / np.sqrt(self.n - 1)
        a = np.vstack([zs, np.sqrt(self.ridge) * np.eye(len(peers))])
        rhs = np.concatenate([self.z[:, i] / np.sqrt(self.n - 1), np.zeros(len(peers))])
        beta = np.linalg.lstsq(a, rhs, rcond=None)[0]
        cross = zs.T @ (self.z[:, i] / np.sqrt(self.n - 1))  # sample correlations r_Si
        return float(min(max(beta @ cross, 0.0), 1.0))

    def target_info(self, channels: list[int]) -> float:
        """I(T; Y_S) from the in-sample OLS R^2 of the target on the channels."""
        zs = self.z[:, channels]
        beta = np.linalg.lstsq(zs, self.zt, rcond=None)[0]
        resid = self.zt - zs @ beta
        r2 = 1.0 - float(resid @ resid) / float(self.zt @ self.zt) if float(self.zt @ self.zt) > 0 else 0.0
        return _mi_r2(r2)

    def excess(self, i: int, j: int) -> float:
        if i == j or self.dead[i] or self.dead[j]:
            return 0.0
        return max(0.0, self.target_info([i, j]) - max(self.task_info(i), self.task_info(j)))

    # ---------------------------------------------------------------- per-channel quantities
    def hull(self, i: int, *, eps: float, k_max: int, order: str, e_full: float) -> tuple[int, float, bool]:
        threshold = (1.0 - eps) * e_full - E_TOL
        if 0.0 >= threshold:
            return 0, 0.0, False
        chosen: list[int] = []
        e = 0.0
        ranked = self.ranked_peers(i)
        for _ in range(min(k_max, len(ranked))):
            if order == "correlation":
                chosen.append(ranked[len(chosen)])
                e = self.explained(i, chosen)
            else:  # greedy: try every remaining peer, keep the largest E
                rest = [j for j in sorted(ranked) if j not in chosen]
                gains = [self.explained(i, chosen + [j]) for j in rest]
                best = int(np.argmax(gains))
                chosen.append(rest[best])
                e = gains[best]
            if e >= threshold:
                return len(chosen), e, False
        return len(chosen), e, len(chosen) >= k_max

    def channel(self, i: int, *, sigma0="median", hull_eps=0.05, hull_max=10, hull_order="correlation",
                pool=50, top=10) -> dict[str, float]:
        keys = ("input_capture", "peer_overlap", "full_explained", "hull_size", "hull_explained",
                "hull_saturated", "hull_score", "task_info", "target_excess", "task_redundancy", "task_unique")
        if self.dead[i]:
            return {**{k: 0.0 for k in keys}, "dead": True}
        live_var = self.var[self.live]
        if isinstance(sigma0, str):
            s0 = {"median": np.median(live_var), "mean": live_var.mean(),
                  "p75": np.percentile(live_var, 75), "p90": np.percentile(live_var, 90)}[sigma0]
        else:
            s0 = float(sigma0)
        out = {"input_capture": 0.5 * np.log1p(self.var[i] / s0), "dead": False}
        peers = self.ranked_peers(i)
        out["peer_overlap"] = sum(self.overlap(i, j) for j in peers) / max(len(self.live) - 1, 1)
        e_full = self.explained(i, peers)
        out["full_explained"] = e_full
        size, e_h, sat = self.hull(i, eps=hull_eps, k_max=hull_max, order=hull_order, e_full=e_full)
        out.update(hull_size=size, hull_explained=e_h, hull_saturated=sat, hull_score=e_full / max(1, size))
        it = self.task_info(i)
        out["task_info"] = it
        cand = peers[:pool]
        if cand:
            s = [self.excess(i, j) for j in cand]
            order = sorted(range(len(cand)), key=lambda m: -s[m])  # stable: ties keep pool order
            best = [s[m] for m in order[:top]]
            out["target_excess"] = float(np.mean(best))
            out["task_redundancy"] = float(np.mean([min(it, self.task_info(j)) for j in cand]))
        else:
            out["target_excess"] = 0.0
            out["task_redundancy"] = 0.0
        out["task_unique"] = max(0.0, it - out["task_redundancy"])
        return out

    def triplets(self, i: int, *, pool=50, top=10) -> list[tuple[float, float]]:
        """(S3 of the best extension, S_ij) for each of anchor i's top pairs; [] if not an anchor."""
        cand = self.ranked_peers(i)[:pool] if not self.dead[i] else []
        if len(cand) < 2:
            return []
        s = [self.excess(i, j) for j in cand]
        order = sorted(range(len(cand)), key=lambda m: -s[m])
        result = []
        for m in order[:top]:
            j = cand[m]
            best = 0.0
            for k in cand:
                if k == j:
                    continue
                pairs = max(self.target_info([i, j]), self.target_info([i, k]), self.target_info([j, k]))
                best = max(best, self.target_info([i, j, k]) - pairs)
            result.append((best, s[m]))
        return result


def oracle_channel_axes(acts, target, *, channels=None, ridge=1e-3, **knobs) -> dict[str, np.ndarray]:
    """Loop-oracle ``channel_axes`` for ``channels`` (default all): dict of ``[len(channels)]`` arrays."""
    orc = LoopOracle(acts, target, ridge=ridge)
    chans = range(orc.c) if channels is None else channels
    rows = [orc.channel(i, **knobs) for i in chans]
    return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def oracle_triplet_ratio(acts, target, *, pool=50, top=10, anchors=None) -> dict[str, float]:
    """Loop-oracle S3/S2 over ``anchors`` (default all channels)."""
    orc = LoopOracle(acts, target)
    pairs = []
    for i in range(orc.c) if anchors is None else anchors:
        pairs += orc.triplets(i, pool=pool, top=top)
    if not pairs:
        return {"s3_s2": 0.0, "mean_s3": 0.0, "mean_s2": 0.0, "n_triplets": 0}
    s3 = float(np.mean([p[0] for p in pairs]))
    s2 = float(np.mean([p[1] for p in pairs]))
    return {"s3_s2": s3 / s2 if s2 > 0 else 0.0, "mean_s3": s3, "mean_s2": s2, "n_triplets": len(pairs)}


def sample_with_covariance(cov, n: int, *, seed: int = 0, mean=None, dtype=None):
    """Samples whose *unbiased sample* covariance equals ``cov`` to float precision.

    Random Gaussian data ``[n, p]`` is centred and whitened by its own sample covariance (so
    its sample covariance is exactly I), then multiplied by the Cholesky factor of ``cov``
    (sample covariance L I L' = cov). ``cov`` (torch [p, p]) must be positive definite;
    ``mean`` ([p], optional) is added afterwards. Returns a torch tensor ``[n, p]`` (float64
    unless ``dtype``). Used by the tests to check outputs against closed forms.
    """
    import torch

    cov = torch.as_tensor(cov, dtype=torch.float64)
    p = cov.shape[0]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=gen, dtype=torch.float64)
    x = x - x.mean(0)
    s = x.T @ x / (n - 1)
    x = torch.linalg.solve_triangular(torch.linalg.cholesky(s), x.T, upper=False).T  # sample cov = I
    y = x @ torch.linalg.cholesky(cov).T
    if mean is not None:
        y = y + torch.as_tensor(mean, dtype=torch.float64)
    return y if dtype is None else y.to(dtype)
