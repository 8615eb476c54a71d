"""The one streaming accumulator of first and second moments (a ``torchmetrics.Metric``).

:class:`Moments` streams, over rows ``u: [n, P]`` and ``v: [n, Q]``, the count, the means and the
centred cross products ``Σ (u − ū)(v − v̄)'`` (``v`` omitted: ``v = u``, a covariance). Every
moment of the pipeline is one of these: the (T, Y_1..Y_C) covariance of a layer
(:class:`ActivationMoments`), and the input-patch moments of the gradient analysis (Cov(x, y),
Cov(x, T), Σ_X; METHODS §5, :class:`~axes_pipeline.metrics.gradients.PatchMoments`).

Numerics: sums are kept in float64 around a fixed *shift* (the mean of the first batch), so large
offsets do not cancel (``E[uv'] − ū v̄'`` would lose every digit at a mean of 1e4 over an SD of 1).
The products of a batch run in the dtype of its rows: float64 rows give float64 products; float32
rows (what a caller passes where precision allows) give float32 products of at most one batch,
each added into the float64 sums. ``upper=True`` (``v = u`` only) accumulates the block upper
triangle of ``u'u`` (36 of 64 blocks at P ≥ 1024, no P×P temporary; the lower blocks are mirrored
when read), which is what a 4608² Σ_X costs. ``weight`` counts a row as that many rows with the
same ``u`` and ``v`` (the per-image sums of the T terms: T is one value per image).

The whole state is one packed float64 tensor, so a data-parallel sync (``dist_reduce_fx``) and
``merge_state`` merge two accumulators with Chan et al.'s parallel formula, whatever their shifts::

    [0, 0] = n      [0, 2:] = shift_v     [1, 2:] = Σ (v − shift_v)
    [2:, 0] = shift_u                     [2:, 1] = Σ (u − shift_u)     [2:, 2:] = Σ (u − shift_u)(v − shift_v)'
"""

from __future__ import annotations

from functools import partial
from itertools import pairwise

import torch
from torch import Tensor
from torchmetrics import Metric

from axes_pipeline.errors import UserError

_FLOAT = (torch.float32, torch.float64)


def _gram_blocks(d: int) -> list[int]:
    k = 8 if d >= 1024 else 4 if d >= 256 else 1     # blocks wide enough to stay efficient GEMMs
    return [round(i * d / k) for i in range(k + 1)]


def _gram_upper_into(acc: Tensor, x: Tensor, weight: Tensor | None = None) -> None:
    """``acc += x'x`` on the block upper triangle only, in place (Σ_X is symmetric: 36 of 64
    blocks at P ≥ 1024, the capture's largest product, and no P×P temporary)."""
    xw = x if weight is None else x * weight[:, None]
    e = _gram_blocks(x.shape[1])
    for a0, a1 in pairwise(e):
        acc[a0:a1, a0:].addmm_(xw[:, a0:a1].T, x[:, a0:])


def _mirror_upper(acc: Tensor) -> None:
    """Copy the upper off-diagonal blocks of :func:`_gram_upper_into` onto the lower ones."""
    e = _gram_blocks(acc.shape[0])
    for a0, a1 in pairwise(e):
        acc[a1:, a0:a1] = acc[a0:a1, a1:].T


def _unpack(state: Tensor, upper: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(n, mean_u, mean_v, centred cross products) of one packed state."""
    n = state[0, 0]
    su, sv, s = state[2:, 1], state[1, 2:], state[2:, 2:]
    if upper:
        _mirror_upper(s)
    m = torch.addr(s, su, sv, alpha=-1.0 / float(n))      # one P×Q allocation (Σ_X: up to 170 MB)
    return n, state[2:, 0] + su / n, state[0, 2:] + sv / n, m


def chan_reduce(states: Tensor, upper: bool = False) -> Tensor:
    """Merge stacked packed states ``[k, 2+P, 2+Q]`` into one (Chan et al.'s parallel formula);
    the result is shifted by the merged means. States with n = 0 are skipped."""
    live = [s for s in states if float(s[0, 0]) > 0]
    if not live:
        return states[0].clone()
    n, mu, mv, m = _unpack(live[0].clone(), upper)
    for s in live[1:]:
        nb, mub, mvb, mb = _unpack(s.clone(), upper)
        tot = n + nb
        du, dv = mub - mu, mvb - mv
        m = m + mb + torch.outer(du, dv) * (n * nb / tot)
        mu, mv, n = mu + du * (nb / tot), mv + dv * (nb / tot), tot
    out = torch.zeros_like(live[0])
    out[0, 0], out[2:, 0], out[0, 2:], out[2:, 2:] = n, mu, mv, m
    return out


class Moments(Metric):
    """Streaming count, means and centred cross products of ``u`` (and ``v``); see the module.

    ``update(u [n, P], v [n, Q] = None, weight [n] = None)``; ``compute()`` -> the unbiased
    cross-covariance ``[P, Q]`` (divisor N − 1). :attr:`count`, :attr:`mean_u`, :attr:`mean_v`.
    """

    full_state_update = False
    is_differentiable = False

    def __init__(self, *, upper: bool = False, **kwargs) -> None:
        # no cached result: a cached Σ_X would hold another 170 MB for as long as the metric lives
        kwargs.setdefault("compute_with_cache", False)
        super().__init__(**kwargs)
        self.upper = upper
        self.symmetric: bool | None = None    # v = u (a covariance), known at the first batch
        # allocated at the first batch (its sizes): a default of full size would be kept twice
        self.add_state("state", default=torch.zeros(0, 0, dtype=torch.float64),
                       dist_reduce_fx=partial(chan_reduce, upper=upper))

    def _check(self, u: Tensor, v: Tensor | None, weight: Tensor | None) -> None:
        if not isinstance(u, Tensor) or u.dim() != 2 or u.dtype not in _FLOAT:
            raise UserError(f"moments need float rows [n, P], got {getattr(u, 'shape', type(u))} "
                            f"{getattr(u, 'dtype', '')}")
        if v is not None and (v.dim() != 2 or v.shape[0] != u.shape[0] or v.device != u.device):
            raise UserError(f"rows of u {tuple(u.shape)} and v {tuple(v.shape)} must pair up on one device")
        if weight is not None and weight.shape != (u.shape[0],):
            raise UserError(f"weight must have shape [n] = [{u.shape[0]}], got {tuple(weight.shape)}")
        if self.upper and v is not None:
            raise UserError("upper=True accumulates u'u: pass no v")
        if self.state.numel():
            want = (self.state.shape[0] - 2, self.state.shape[1] - 2)
            got = (u.shape[1], u.shape[1] if v is None else v.shape[1])
            if got != want:
                raise UserError(f"batch has {got} columns but earlier batches had {want}")

    def update(self, u: Tensor, v: Tensor | None = None, weight: Tensor | None = None) -> None:
        """Add rows ``u: [n, P]``, ``v: [n, Q]`` (None: v = u), each counted ``weight`` times."""
        self._check(u, v, weight)
        if u.shape[0] == 0:
            return
        if not self.state.numel():
            self.symmetric = v is None
            q = u.shape[1] if v is None else v.shape[1]
            self.state = torch.zeros(u.shape[1] + 2, q + 2, dtype=torch.float64, device=u.device)
            self.state[2:, 0] = _first_mean(u, weight, "u")
            self.state[0, 2:] = self.state[2:, 0] if v is None else _first_mean(v, weight, "v")
        st = self.state
        uc = u - st[2:, 0].to(u.dtype)
        vc = uc if v is None else v - st[0, 2:].to(v.dtype)
        w = None if weight is None else weight.to(u.dtype)
        if not bool(torch.isfinite(uc.sum()) & torch.isfinite(vc.sum())):
            raise UserError(f"{'activations' if v is None else 'rows'} contain NaN/Inf "
                            f"({int((~torch.isfinite(u)).sum())} values)")
        st[0, 0] += float(u.shape[0]) if w is None else float(weight.double().sum())
        uw = uc if w is None else uc * w[:, None]
        st[2:, 1] += uw.sum(0, dtype=torch.float64)
        st[1, 2:] += (vc if w is None else vc * w[:, None]).sum(0, dtype=torch.float64)
        if self.upper and uc.dtype == torch.float64:
            _gram_upper_into(st[2:, 2:], uc, w)
        elif uc.dtype == torch.float64:
            st[2:, 2:].addmm_(uw.T, vc)       # in place: no [P, Q] temporary
        else:
            st[2:, 2:] += (uw.T @ vc).double()

    @property
    def count(self) -> int:
        return int(self.state[0, 0]) if self.state.numel() else 0

    def _moments(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if self.count < 2:
            raise UserError(f"need at least 2 samples for a covariance, got {self.count}")
        if self.upper:
            _mirror_upper(self.state[2:, 2:])
        return _unpack(self.state, False)

    @property
    def mean_u(self) -> Tensor:
        """``[P]`` float64 means of u."""
        st = self.state
        return st[2:, 0] + st[2:, 1] / st[0, 0]

    @property
    def mean_v(self) -> Tensor:
        """``[Q]`` float64 means of v."""
        st = self.state
        return st[0, 2:] + st[1, 2:] / st[0, 0]

    def compute(self) -> Tensor:
        """The unbiased (cross-)covariance ``[P, Q]``; exactly symmetric when ``v = u``."""
        n, _, _, m = self._moments()
        cov = m.div_(float(n) - 1)
        # the sums are symmetric only up to rounding; downstream code assumes exact symmetry
        return 0.5 * (cov + cov.T) if self.symmetric and not self.upper else cov


def _first_mean(x: Tensor, weight: Tensor | None, name: str) -> Tensor:
    # the shift: in the rows' dtype, so that (x − shift) is formed exactly as the sums assume
    xd = x.double()
    mean = xd.mean(0) if weight is None else (xd * weight.double()[:, None]).sum(0) / weight.double().sum()
    if not bool(torch.isfinite(mean).all()):
        raise UserError(f"{name} rows contain NaN/Inf ({int((~torch.isfinite(x)).sum())} values)")
    return mean.to(x.dtype).double()


class ActivationMoments(Moments):
    """The streaming unbiased covariance of ``(T, Y_1..Y_C)`` of one layer: ``update(acts [n, C],
    target [n] | None)``, ``compute() -> [C+1, C+1]`` float64 (element 0 = T; no target: row 0 is 0),
    ready for :func:`~axes_pipeline.metrics.channel_axes_from_moments`. :attr:`mean` ``[C+1]``."""

    def update(self, acts: Tensor, target: Tensor | None = None) -> None:  # type: ignore[override]
        if not isinstance(acts, Tensor) or acts.dim() != 2:
            raise UserError(f"activations must have shape [n, C], got {getattr(acts, 'shape', type(acts))}")
        n = acts.shape[0]
        if acts.dtype not in _FLOAT:
            raise UserError(f"activations must be float32 or float64, got {acts.dtype}")
        if target is not None:
            if not isinstance(target, Tensor) or target.dim() != 1 or target.shape[0] != n:
                raise UserError(f"target must have shape [n] = [{n}], got {getattr(target, 'shape', type(target))}")
            if target.device != acts.device:
                raise UserError(f"target is on {target.device} but activations are on {acts.device}")
            if not bool(torch.isfinite(target).all()):
                raise UserError(f"the target contains NaN/Inf ({int((~torch.isfinite(target)).sum())} values)")
        if self.state.numel() and acts.shape[1] + 3 != self.state.shape[0]:
            raise UserError(f"batch has {acts.shape[1]} channels but earlier batches had {self.state.shape[0] - 3}")
        z = torch.empty(n, acts.shape[1] + 1, dtype=torch.float64, device=acts.device)
        z[:, 1:] = acts
        z[:, 0] = 0.0 if target is None else target
        super().update(z)

    @property
    def mean(self) -> Tensor:
        """``[C+1]`` float64 means of (T, Y_1..Y_C)."""
        return self.mean_u
