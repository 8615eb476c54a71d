"""The one streaming accumulator of first and second moments (a ``torchmetrics.Metric``).

:class:`Moments` streams, over rows ``u: [n, P]`` and ``v: [n, Q]``, the count, the means and the
centred cross products ``Σ (u − ū)(v − v̄)'`` (``v`` omitted: ``v = u``, a covariance). Every
moment of the pipeline is one of these: the (T, Y_1..Y_C) covariance of a layer
(:class:`ActivationMoments`), and the input-patch moments of the gradient analysis (Cov(x, y),
Cov(x, T), Σ_X; METHODS §5, :class:`~axes_pipeline.metrics.gradients.PatchMoments`).

Numerics: sums are kept in float64 around a fixed *shift* (the mean of the first batch), so large
offsets do not cancel (``E[uv'] − ū v̄'`` would lose every digit at a mean of 1e4 over an SD of 1).
The products of a batch run in the dtype of its rows: float64 rows give float64 products; float32
rows (what a caller passes where precision allows) give float32 products and column sums of at
most one batch, each added into the float64 sums. ``upper=True`` (``v = u`` only) accumulates and stores only the
block upper triangle of ``u'u`` (36 of 64 blocks at P ≥ 1024; the lower blocks are mirrored when
read), which is what a 4608² Σ_X costs. ``weight`` counts a row as that many rows with the
same ``u`` and ``v`` (the per-image sums of the T terms: T is one value per image).

The whole state is one packed float64 tensor, so a data-parallel sync (``dist_reduce_fx``) and
``merge_state`` merge two accumulators with Chan et al.'s parallel formula, whatever their shifts
(:func:`chan_reduce`). Its layout (:func:`_views`)::

    [0, 0] = n      [0, 2:] = shift_v     [1, 2:] = Σ (v − shift_v)
    [2:, 0] = shift_u                     [2:, 1] = Σ (u − shift_u)     [2:, 2:] = Σ (u − shift_u)(v − shift_v)'

and with ``upper`` a flat vector (n, P, shift, Σ (u − shift), then the upper block strips of the
gram row by row): 56% of a dense P×P at P ≥ 1024, which is what bounds the capture's memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from itertools import pairwise

import torch
from torch import Tensor
from torchmetrics import Metric

from axes_pipeline.errors import UserError
from axes_pipeline.metrics.gaussian import gram

_FLOAT = (torch.float32, torch.float64)


def _gram_blocks(d: int) -> list[int]:
    k = 8 if d >= 1024 else 4 if d >= 256 else 1     # blocks wide enough to stay efficient GEMMs
    return [round(i * d / k) for i in range(k + 1)]


@dataclass
class _Views:
    """Views into one packed state (writing to them writes the state)."""

    n: Tensor                      # 0-dim
    shift_u: Tensor
    shift_v: Tensor
    sum_u: Tensor
    sum_v: Tensor
    cross: Tensor | None           # [P, Q] Σ (u − shift_u)(v − shift_v)'; None with upper strips
    strips: list[tuple[int, int, Tensor]]   # upper: (a0, a1, rows a0:a1, columns a0: of the gram)


@dataclass
class RowBlocks:
    """Rows ``u: [n, P]`` given by column blocks, zero outside the rows each block lists: ``blocks``
    = ``[(rows, values), ...]`` in column order, ``rows: [m]`` indices into the n rows and
    ``values: [m, w]`` the block's columns on those rows (0 on every other row). A conv's input
    patches at a padded border are these (one block per kernel offset, the rows where the offset
    falls inside the map): :meth:`Moments.update` then never multiplies the zeros."""

    n: int
    blocks: list[tuple[Tensor, Tensor]]

    @property
    def width(self) -> int:
        return sum(int(b.shape[1]) for _, b in self.blocks)


def _new_state(p: int, q: int, upper: bool, device) -> Tensor:
    if not upper:
        return torch.zeros(p + 2, q + 2, dtype=torch.float64, device=device)
    size = sum((a1 - a0) * (p - a0) for a0, a1 in pairwise(_gram_blocks(p)))
    state = torch.zeros(2 + 2 * p + size, dtype=torch.float64, device=device)
    state[1] = p
    return state


def _views(state: Tensor, upper: bool) -> _Views:
    if not upper:   # [0,0] n; [2:,0] shift_u, [0,2:] shift_v; [2:,1] sum_u, [1,2:] sum_v; [2:,2:] cross
        return _Views(state[0, 0], state[2:, 0], state[0, 2:], state[2:, 1], state[1, 2:], state[2:, 2:], [])
    # flat: n, P, shift (P), sum (P), then the upper block strips of the gram, row-major
    p = int(state[1])
    shift, total = state[2:2 + p], state[2 + p:2 + 2 * p]
    strips, off = [], 2 + 2 * p
    for a0, a1 in pairwise(_gram_blocks(p)):
        size = (a1 - a0) * (p - a0)
        strips.append((a0, a1, state[off:off + size].view(a1 - a0, p - a0)))
        off += size
    return _Views(state[0], shift, shift, total, total, None, strips)


def _centred(v: _Views) -> Tensor:
    """Σ (u − ū)(v − v̄)' as a new dense ``[P, Q]`` (one allocation: Σ_X is up to 170 MB)."""
    if v.cross is not None:
        m = v.cross.clone()
    else:
        p = v.sum_u.shape[0]
        m = torch.empty(p, p, dtype=torch.float64, device=v.n.device)
        for a0, a1, strip in v.strips:
            m[a0:a1, a0:] = strip
            m[a1:, a0:a1] = strip[:, a1 - a0:].T      # the lower blocks mirror the upper ones
    return m.addr_(v.sum_u, v.sum_v, alpha=-1.0 / float(v.n))


def _pack(n: Tensor, mean_u: Tensor, mean_v: Tensor, m: Tensor, upper: bool) -> Tensor:
    """A state shifted by the means (sums 0) holding the centred cross products ``m``."""
    state = _new_state(m.shape[0], m.shape[1], upper, m.device)
    v = _views(state, upper)
    v.n.fill_(n)
    v.shift_u.copy_(mean_u)
    v.shift_v.copy_(mean_v)
    if upper:
        for a0, a1, strip in v.strips:
            strip.copy_(m[a0:a1, a0:])
    else:
        v.cross.copy_(m)
    return state


def chan_reduce(states: Tensor, upper: bool = False) -> Tensor:
    """Merge stacked packed states ``[k, ...]`` into one (Chan et al.'s parallel formula); the
    result is shifted by the merged means. States with n = 0 are skipped."""
    live = [_views(s, upper) for s in states if s.numel() and float(s.flatten()[0]) > 0]
    if not live:
        return states[0].clone()
    first = live[0]
    n, mu, mv, m = first.n.clone(), first.shift_u + first.sum_u / first.n, first.shift_v + first.sum_v / first.n, \
        _centred(first)
    for b in live[1:]:
        nb = b.n
        tot = n + nb
        du, dv = b.shift_u + b.sum_u / nb - mu, b.shift_v + b.sum_v / nb - mv
        m += _centred(b)
        m.addr_(du, dv, alpha=float(n * nb / tot))
        mu, mv, n = mu + du * (nb / tot), mv + dv * (nb / tot), tot
    return _pack(n, mu, mv, m, upper)


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
            have = _views(self.state, self.upper)
            want = (have.sum_u.shape[0], have.sum_v.shape[0])
            got = (u.shape[1], u.shape[1] if v is None else v.shape[1])
            if got != want:
                raise UserError(f"batch has {got} columns but earlier batches had {want}")

    def update(self, u: Tensor | RowBlocks, v: Tensor | None = None, weight: Tensor | None = None) -> None:
        """Add rows ``u: [n, P]`` (or :class:`RowBlocks`, with a ``v``), ``v: [n, Q]`` (None: v = u),
        each counted ``weight`` times."""
        if isinstance(u, RowBlocks):
            self._update_blocks(u, v)
            return
        self._check(u, v, weight)
        if u.shape[0] == 0:
            return
        if not self.state.numel():
            self.symmetric = v is None
            q = u.shape[1] if v is None else v.shape[1]
            self.state = _new_state(u.shape[1], q, self.upper, u.device)
            first = _views(self.state, self.upper)
            first.shift_u.copy_(_first_mean(u, weight, "u"))
            if v is not None:
                first.shift_v.copy_(_first_mean(v, weight, "v"))
            elif not self.upper:
                first.shift_v.copy_(first.shift_u)
        st = _views(self.state, self.upper)
        uc = u - st.shift_u.to(u.dtype)
        vc = uc if v is None else v - st.shift_v.to(v.dtype)
        w = None if weight is None else weight.to(u.dtype)
        uw = uc if w is None else uc * w[:, None]
        su = _batch_sum(uw)
        sv = None if v is None else _batch_sum(vc if w is None else vc * w[:, None])
        if not bool(torch.isfinite(su).all() and (sv is None or torch.isfinite(sv).all())):
            raise UserError(f"{'activations' if v is None else 'rows'} contain NaN/Inf "
                            f"({int((~torch.isfinite(u)).sum())} values)")
        st.n += float(u.shape[0]) if w is None else float(weight.double().sum())
        st.sum_u += su
        if v is not None:
            st.sum_v += sv
        elif not self.upper:
            st.sum_v.copy_(st.sum_u)
        # the products in the rows' dtype; float64 in place (no [P, Q] temporary)
        pairs = [(s, uw[:, a0:a1], uc[:, a0:]) for a0, a1, s in st.strips] if self.upper else [(st.cross, uw, vc)]
        for acc, a, b in pairs:
            if a.dtype == torch.float64:
                acc.addmm_(a.T, b)
            else:
                acc += (a.T @ b).double()

    def _update_blocks(self, u: RowBlocks, v: Tensor | None) -> None:
        """:meth:`update` with ``u`` as :class:`RowBlocks`: the same sums as with the dense rows.

        Per block, the listed rows' centred products are one GEMM; each unlisted row is
        ``u = 0``, i.e. ``u − shift = −shift``, so the block's products gain
        ``−shift ⊗ Σ (v − shift_v)`` over those rows (in float64) and its sum ``−shift`` per row."""
        if self.upper or v is None or v.dim() != 2 or v.shape[0] != u.n:
            raise UserError(f"row blocks need a v with one row per row ({u.n}), got "
                            f"{None if v is None else tuple(v.shape)}{' and upper=True' if self.upper else ''}")
        for rows, vals in u.blocks:
            if vals.dim() != 2 or vals.dtype not in _FLOAT or rows.shape != vals.shape[:1] or vals.device != v.device:
                raise UserError(f"a row block needs rows [m] and values [m, w] on {v.device}, got "
                                f"{tuple(rows.shape)} and {tuple(vals.shape)} {vals.dtype} on {vals.device}")
        if self.state.numel():
            have = _views(self.state, False)
            if (u.width, v.shape[1]) != (have.sum_u.shape[0], have.sum_v.shape[0]):
                raise UserError(f"batch has {(u.width, v.shape[1])} columns but earlier batches had "
                                f"{(have.sum_u.shape[0], have.sum_v.shape[0])}")
        if u.n == 0:
            return
        first = not self.state.numel()
        if first:
            self.symmetric = False
            self.state = _new_state(u.width, v.shape[1], False, v.device)
            _views(self.state, False).shift_v.copy_(_first_mean(v, None, "v"))
        st = _views(self.state, False)
        vc = v - st.shift_v.to(v.dtype)
        sv = _batch_sum(vc)
        if not bool(torch.isfinite(sv).all()):
            raise UserError(f"rows contain NaN/Inf ({int((~torch.isfinite(v)).sum())} values)")
        st.n += float(u.n)
        st.sum_v += sv
        a0 = 0
        for rows, vals in u.blocks:
            a1 = a0 + vals.shape[1]
            shift = st.shift_u[a0:a1]
            if first:   # the dense column means (the unlisted rows are zeros), in the rows' dtype
                shift.copy_((vals.sum(0, dtype=torch.float64) / u.n).to(vals.dtype).double())
            uc = vals - shift.to(vals.dtype)
            vr = vc[rows]
            su = _batch_sum(uc)
            if not bool(torch.isfinite(su).all()):
                raise UserError(f"rows contain NaN/Inf ({int((~torch.isfinite(vals)).sum())} values)")
            st.sum_u[a0:a1] += su - (u.n - len(rows)) * shift
            cross = st.cross[a0:a1]
            if uc.dtype == torch.float64:
                cross.addmm_(uc.T, vr)
            else:
                cross += (uc.T @ vr).double()
            cross.addr_(shift, sv - _batch_sum(vr), alpha=-1.0)    # the unlisted rows: (0 − shift)(v − shift_v)'
            a0 = a1

    @property
    def count(self) -> int:
        return int(_views(self.state, self.upper).n) if self.state.numel() else 0

    @property
    def mean_u(self) -> Tensor:
        """``[P]`` float64 means of u."""
        v = _views(self.state, self.upper)
        return v.shift_u + v.sum_u / v.n

    @property
    def mean_v(self) -> Tensor:
        """``[Q]`` float64 means of v."""
        v = _views(self.state, self.upper)
        return v.shift_v + v.sum_v / v.n

    def compute(self) -> Tensor:
        """The unbiased (cross-)covariance ``[P, Q]``; exactly symmetric when ``v = u``."""
        if self.count < 2:
            raise UserError(f"need at least 2 samples for a covariance, got {self.count}")
        cov = _centred(_views(self.state, self.upper)).div_(self.count - 1)
        # the sums are symmetric only up to rounding; downstream code assumes exact symmetry
        return 0.5 * (cov + cov.T) if self.symmetric and not self.upper else cov


def _batch_sum(rows: Tensor) -> Tensor:
    """Column sums of one batch, in float64: taken in the rows' dtype like the batch's products (a
    float32 sum is 4× faster than one accumulated in float64, and as exact as the float32 products
    beside it), then added into the float64 state."""
    return rows.sum(0).double() if rows.dtype == torch.float32 else rows.sum(0, dtype=torch.float64)


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
    ready for :func:`~axes_pipeline.metrics.channel_axes_from_moments`. :attr:`mean` ``[C+1]``.

    Each batch is centred on its own float64 mean and its centred gram is merged into the running
    (n, mean, M2) by Chan et al.'s update, so the state is always shifted by the running mean with
    zero sums. That is the arithmetic the axes were first published with: a shifted-sum update
    moves the covariance by ~1e-16 relative, which flips discrete steps downstream (a community
    split, a hull member), so the tables would not repeat to the digit across versions.
    """

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
        if n == 0:
            return
        z = torch.empty(n, acts.shape[1] + 1, dtype=torch.float64, device=acts.device)
        z[:, 1:] = acts
        z[:, 0] = 0.0 if target is None else target
        mean_b = z.sum(dim=0) / n
        if not bool(torch.isfinite(mean_b).all()):
            raise UserError(f"activations contain NaN/Inf ({int((~torch.isfinite(acts)).sum())} values)")
        m2_b = gram(z - mean_b)
        if not self.state.numel():
            self.symmetric = True
            self.state = _pack(n, mean_b, mean_b, m2_b, upper=False)
            return
        st = _views(self.state, False)
        n_a = int(st.n)
        tot = n_a + n
        delta = mean_b - st.shift_u
        st.cross += m2_b + torch.outer(delta, delta) * (n_a * n / tot)
        st.shift_u += delta * (n / tot)
        st.shift_v.copy_(st.shift_u)
        st.n.fill_(tot)

    @property
    def mean(self) -> Tensor:
        """``[C+1]`` float64 means of (T, Y_1..Y_C)."""
        return self.mean_u
