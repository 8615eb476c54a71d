"""Channel importance scores for pruning: a registry of callables with one signature.

Every score is a :class:`Score`; ``score(ctx, draw) -> {layer: scores[C]}`` gives one raw value per
output channel of every analysable conv (higher = keep). The pruning code never branches on a
name: what a score needs (``needs``: the analysis table, calibration images) and whether it is
drawn at random (``stochastic``) are attributes, so the caller can check them before any expensive work.

Axes (METHODS §9), carried by every output as ``axis``:

- ``local``: ``input_capture`` (I_X), ``ixy_minus_red_b{β}`` (I_X − β·R̄_X, β ∈ {.15,.3,.5,.7}),
  ``hull_score`` (keep = −E_full/max(1,|H|)), ``composite_local`` (I_X + 0.5·S − 0.3·R̄_X);
- ``target``: ``task_info`` (I_T), ``composite_target`` (I_T + 0.5·S − 0.3·R_T), ``task_unique`` (U_T + 0.5·S);
- ``mixed``: ``magnitude_plus_ix_a{α}`` (‖w‖ + α·I_X, α ∈ {.25,.5,.75,1}; ‖w‖ is the filter's
  L2 norm by default, as in the authors' code; knob ``pruning.magnitude``); ``two_axis_a1_b{β}``
  (norm(I_X) − β·norm(I_T), β ∈ {.1,.25,.5,1}, the authors' two-axis rule; norm = min–max within the layer);
- ``baseline``: ``random`` (seeded draws), ``l1``, ``l2`` (filter norms), ``bn_scale`` (|γ| of
  the norm after the conv), ``taylor`` (Σ|w·∂L/∂w| over the filter, calibration images),
  ``hrank`` (mean rank of the channel's feature maps), ``chip`` (channel independence: drop of
  the nuclear norm of the feature-map matrix when the channel's row is removed), ``fpgm``
  (Σ_j ‖F_i − F_j‖₂ over the layer's filters, He et al. 2019: filters near the geometric median go first).

Direction (METHODS §9): every score is a *keep* value. Local replaceability (R̄_X = ``peer_overlap``,
the hull score E_full/max(1,|H|) of ``axes.csv``) predicts *removability*: a channel its peers
can stand in for is the one to prune first, so a replaceability term always enters with a minus
sign (the ``axes.csv`` column keeps the replaceability value itself). Redundancy with the target
(R_T) is subtracted for the same reason; I_X, I_T, S, U_T and the filter norms enter with a plus sign.

Dead channels (METHODS §1's rule) are removed first by every score: the raw values here are the
score's own, and :func:`~axes_pipeline.pruning.allocation.group_scores` puts the channels of
:meth:`ScoreContext.dead` below every live one (``hull_score`` alone would keep them first: −0 is its
largest keep value).

Components of a mixed score are min–max normalised within each layer before they are mixed
(:func:`minmax`); the group code normalises the final score within each layer again.
``ixy_minus_red_b<β>``, ``magnitude_plus_ix_a<α>`` and ``two_axis_a1_b<β>`` accept any β, α ≥ 0
(``resolve_score``; a negative one is refused in one line, since it would flip the sign its axis rests on).
The cross-layer normalisations of ``pruning.normalize`` (:func:`normalize`: minmax, mean, max, lamp) live
here beside :func:`minmax`. ``tp.<ClassName>`` is a Torch-Pruning importance swept as a baseline score
(:func:`importance_score`, one adapter from its per-group values to per-channel ones).

The axes columns come from the analysis stage's ``<run_dir>/analyze/axes.csv`` (computed on demand
through ``axes_pipeline.axes.table.load_or_compute_axes`` when its fingerprint does not match). The feature
maps of ``hrank`` / ``chip`` are the post-norm outputs (after the activation where one follows
directly, i.e. not across a residual add), read at ``ConvUnit`` of :func:`axes_pipeline.models.conv_norm_pairs`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from axes_pipeline.errors import UserError, unknown_name
from axes_pipeline.metrics.gaussian import dead_channels
from axes_pipeline.models import classifier_name, conv_norm_pairs
from axes_pipeline.models.graph import out_channels
from axes_pipeline.models.modes import eval_mode
from axes_pipeline.models.taylor import taylor_scores
from axes_pipeline.pruning.settings import NORMALIZERS

log = logging.getLogger("axes_pipeline")

__all__ = ["AXES", "DEFAULT_MAGNITUDE", "DEFAULT_SCORES", "FAMILIES", "SCORES", "TP_PREFIX", "Score", "ScoreContext",
           "importance_score", "lamp", "minmax", "normalize", "register", "register_importance", "resolve_score",
           "score_names"]

AXES = ("local", "target", "mixed", "baseline")

#: ``pruning.scores=[tp.<ClassName>]``: a Torch-Pruning importance class (``torch_pruning.pruner.importance``)
TP_PREFIX = "tp."

ScoreFn = Callable[["ScoreContext", int], dict]

#: ‖w‖ of ``magnitude_plus_ix_a<α>`` when pruning.magnitude is not given: the L2 filter norm, as
#: in the authors' code (L1 stays a knob)
DEFAULT_MAGNITUDE = "l2"


@dataclass(frozen=True)
class Score:
    """A registered importance score. ``fn(ctx, draw) -> {layer: [C]}``, higher = keep."""

    name: str
    axis: str
    fn: ScoreFn
    needs: frozenset = frozenset()     # "axes": the analysis table; "calibration": images
    stochastic: bool = False           # several seeded draws (pruning.random_draws)
    family: str | None = None          # "magnitude_plus_ix" / "ixy_minus_red" sweeps
    param: float | None = None
    doc: str = ""
    columns: frozenset = frozenset()   # the axes.csv columns it reads (checked finite before use)

    def __call__(self, ctx: ScoreContext, draw: int = 0) -> dict[str, np.ndarray]:
        raw = self.fn(ctx, draw)
        out = {}
        for layer, conv in ctx.layers.items():
            if layer not in raw:
                raise UserError(f"score '{self.name}' has no values for layer '{layer}'")
            v = np.asarray(raw[layer], dtype=np.float64).reshape(-1)
            if v.size != out_channels(conv):
                raise UserError(f"score '{self.name}': layer '{layer}' has {v.size} values for "
                                f"{out_channels(conv)} channels (stale analysis results?)")
            out[layer] = v
        return out

    def draws(self, n_random: int) -> list[int]:
        return list(range(max(1, int(n_random)))) if self.stochastic else [0]


SCORES: dict[str, Score] = {}

#: the parametrised sweeps: prefix -> parameter symbol, plot label, default grid, the anchor
#: score whose value is the sweep at parameter 0 (``{magnitude}``: pruning.magnitude), factory
FAMILIES: dict[str, dict] = {}


def register(name: str, axis: str, needs=(), stochastic: bool = False, family: str | None = None,
             param: float | None = None, columns=()):
    """Decorator: register ``fn(ctx, draw) -> {layer: [C]}`` as score ``name`` on ``axis``."""
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis}")

    def deco(fn: ScoreFn) -> ScoreFn:
        SCORES[name] = Score(name, axis, fn, frozenset(needs), stochastic, family, param,
                             fn.__doc__.strip().splitlines()[0] if fn.__doc__ else "", frozenset(columns))
        return fn

    return deco


def resolve_score(name: str, knob: str = "pruning.scores", also: tuple = ()) -> Score:
    """The :class:`Score` called ``name``: registered, a family pattern with any parameter in its range,
    or ``tp.<ClassName>`` (a Torch-Pruning importance, :func:`importance_score`). An unknown name is one
    line naming ``knob`` (the config key it came from) and the valid names, ``also`` among them."""
    name = str(name)
    if name in SCORES:
        return SCORES[name]
    if name.startswith(TP_PREFIX):
        return _tp_score(name, knob)
    for prefix, fam in FAMILIES.items():
        if name.startswith(prefix):
            try:
                value = float(name[len(prefix):])
            except ValueError:
                break
            if not math.isfinite(value):
                break
            return fam["make"](value, knob)
    raise unknown_name(f"score ({knob})", name,
                       list(also) + list(SCORES) + [f"{p}<{f['symbol']}>" for p, f in FAMILIES.items()]
                       + [f"{TP_PREFIX}<ClassName>"])


def score_names() -> list[str]:
    """Every registered score name, grouped by axis (local, target, mixed, baseline)."""
    return [s.name for axis in AXES for s in SCORES.values() if s.axis == axis]


# --- Context ---
@dataclass
class ScoreContext:
    """What scores may read. Expensive inputs are loaded on first use and cached."""

    model: nn.Module                  # the trained network (eval mode)
    layers: dict[str, nn.Module]      # the analysable convs (and channels-last Linears), in forward order
    axes_loader: Callable[[], object] | None = None    # the analysis table: layer, channel, the axes columns
    calibration: Callable[[], object] | None = None    # batches (x: [B, C, H, W], y: [B]) of calibration images
    feature_maps: Callable[[], object] | None = None   # hrank/chip images (default: calibration)
    seed: int = 0                     # the run seed (random draws)
    magnitude: str = DEFAULT_MAGNITUDE   # l1 | l2: the ‖w‖ of the mixed scores
    device: torch.device | str = "cpu"
    example: torch.Tensor | None = None   # [1, C, H, W] the network's input (Torch-Pruning's graph); else a calibration image
    _cache: dict = field(default_factory=dict)

    def example_input(self) -> torch.Tensor:
        """One input ``[1, C, H, W]`` to trace the network with (:attr:`example`, else the first calibration image)."""
        if self.example is not None:
            return self.example.to(self.device)
        for x, _y in self.batches():
            return x[:1].to(self.device)
        raise UserError("no calibration images to trace the network with")

    def axes(self):
        if "axes" not in self._cache:
            if self.axes_loader is None:
                raise UserError("this score needs the analysis results (axes.csv); run `python analyze.py` first")
            self._cache["axes"] = self.axes_loader()
        return self._cache["axes"]

    def axes_column(self, column: str) -> dict[str, np.ndarray]:
        """``{layer: [C]}`` of one column of the analysis table (channels in order)."""
        key = ("col", column)
        if key not in self._cache:
            table = self.axes()
            if column not in table.columns:
                raise UserError(f"the analysis table has no column '{column}'; rerun `python analyze.py`")
            out = {}
            for layer, conv in self.layers.items():
                rows = table[table["layer"] == layer]
                if len(rows) == 0:
                    raise UserError(f"the analysis table has no rows for layer '{layer}'; pruning needs every "
                                    f"conv layer analysed (capture.layers=null)")
                if len(rows) != out_channels(conv):
                    raise UserError(f"the analysis table has {len(rows)} rows for layer '{layer}' "
                                    f"({out_channels(conv)} channels): stale or partial; rerun `python analyze.py`")
                out[layer] = rows.sort_values("channel")[column].to_numpy(dtype=np.float64)
            self._cache[key] = out
        return self._cache[key]

    def units(self):
        if "units" not in self._cache:
            self._cache["units"] = conv_norm_pairs(self.model)
        return self._cache["units"]

    def batches(self):
        if self.calibration is None:
            raise UserError("this score needs calibration images")
        return self.calibration()

    def feature_map_batches(self):
        return self.feature_maps() if self.feature_maps is not None else self.batches()

    def dead(self) -> dict[str, np.ndarray] | None:
        """``{layer: bool [C]}``: the dead channels, removed first by every score (METHODS §9).

        One mask for every score of the run: the variance of each layer's output (pre-norm, the
        analysis' capture point) over the calibration images, dead by the rule of
        :func:`~axes_pipeline.metrics.gaussian.dead_channels`. None without calibration images.
        """
        if self.calibration is None:
            return None
        if "dead" not in self._cache:
            self._cache["dead"] = {layer: dead_channels(v).numpy() for layer, v in self._output_variances().items()}
        return self._cache["dead"]

    def _output_variances(self) -> dict[str, torch.Tensor]:
        """``{layer: [C]}`` float64 variance of each layer's output over images and positions
        (Chan et al.'s pairwise merge of per-batch centred sums: no cancellation for a constant channel)."""
        stats: dict[str, list] = {layer: [0, None, None] for layer in self.layers}   # n, mean, M2
        handles = []

        def make_hook(layer, module):
            dim = -1 if isinstance(module, nn.Linear) else 1   # channels-last Linear units, else NCHW

            def hook(_m, _inp, out):
                x = out.detach().to(torch.float64).movedim(dim, -1).reshape(-1, out.shape[dim]).cpu()
                n_b, mean_b = x.shape[0], x.mean(0)
                m2_b = ((x - mean_b) ** 2).sum(0)
                n, mean, m2 = stats[layer]
                if mean is None:
                    stats[layer] = [n_b, mean_b, m2_b]
                else:
                    delta, tot = mean_b - mean, n + n_b
                    stats[layer] = [tot, mean + delta * n_b / tot, m2 + m2_b + delta ** 2 * n * n_b / tot]
            return hook

        for layer, module in self.layers.items():
            handles.append(module.register_forward_hook(make_hook(layer, module)))
        try:
            with eval_mode(self.model), torch.no_grad():
                for x, _y in self.batches():
                    self.model(x.to(self.device))
        finally:
            for h in handles:
                h.remove()
        return {layer: (m2 / max(1, n - 1) if m2 is not None else torch.zeros(self.layers[layer].out_channels,
                                                                                dtype=torch.float64))
                for layer, (n, _mean, m2) in stats.items()}


def minmax(x: np.ndarray) -> np.ndarray:
    """``x: [C]`` rescaled to [0, 1] within the layer; NaN -> 0, a constant layer -> 0.5."""
    x = np.asarray(x, dtype=np.float64)
    ok = np.isfinite(x)
    if not ok.any():
        return np.full(x.shape, 0.5)
    lo, hi = float(x[ok].min()), float(x[ok].max())
    out = np.full(x.shape, 0.5) if hi - lo <= 1e-12 * max(1.0, abs(hi), abs(lo)) else (x - lo) / (hi - lo)
    out[~ok] = 0.0
    return out


def _nonnegative(x: np.ndarray) -> np.ndarray:
    """``x`` shifted so its smallest finite value is 0 when any is negative (the order kept).

    mean, max and lamp divide by a sum or a maximum, which reverses the order of negative values
    (and lamp squares them): a score with negative keep values (hull_score, the two-axis rule, a
    mixed score) is shifted first. A non-negative layer (the filter norms, |γ|, Taylor) is left as
    it is, so there they are exactly Torch-Pruning's normalisers."""
    ok = np.isfinite(x)
    lo = float(x[ok].min()) if ok.any() else 0.0
    return x - lo if lo < 0 else x


def _divide(x: np.ndarray, d: float) -> np.ndarray:
    """``x / d``; a layer of zeros (d = 0) ties at 0.5, as minmax ties a constant layer."""
    return np.full(x.shape, 0.5) if not d > 0 else x / d


def lamp(x: np.ndarray) -> np.ndarray:
    """LAMP (Lee et al. 2021), ``x: [C]`` non-negative: with the layer sorted ascending,
    ``x_i² / Σ_{j ≥ i} x_j²``. The layer's largest value scores 1. Ties get the value of their
    first position in the sort (Torch-Pruning's sort decides between them there; the value for a
    tie depends only on the sort, so we take the stable one)."""
    sq = np.asarray(x, dtype=np.float64) ** 2
    order = np.argsort(sq, kind="stable")
    s = sq[order]
    tail = np.cumsum(s[::-1])[::-1]      # Σ_{j ≥ i} in sorted order
    out = np.empty_like(sq)
    out[order] = np.divide(s, tail, out=np.full(s.shape, 0.5), where=tail > 0)
    return out


def normalize(x: np.ndarray, how: str = "minmax") -> np.ndarray:
    """One layer's scores ``x: [C]`` made comparable with other layers' (``pruning.normalize``):

    - ``minmax`` (ours, the default): (x − min)/(max − min), :func:`minmax`;
    - ``mean``: x / mean(x), Torch-Pruning's default normaliser;
    - ``max``: x / max(x), Torch-Pruning's former default;
    - ``lamp``: :func:`lamp`, Torch-Pruning's LAMP normaliser applied to x² (its magnitude importance
      with p = 2 is already the squared filter norm, so the two agree on ‖w‖₂).

    Non-finite values (dead channels, a layer without a norm for bn_scale) are left out of every
    statistic and become 0, as :func:`minmax` does; ``mean``, ``max`` and ``lamp`` read a layer with a
    negative value shifted to a minimum of 0 first (:func:`_nonnegative`)."""
    x = np.asarray(x, dtype=np.float64)
    if how == "minmax":
        return minmax(x)
    if how not in NORMALIZERS:
        raise unknown_name("normalisation (pruning.normalize)", how, NORMALIZERS)
    ok = np.isfinite(x)
    if not ok.any():
        return np.full(x.shape, 0.5)
    v = _nonnegative(x[ok])
    out = np.zeros(x.shape)
    out[ok] = _divide(v, float(v.mean())) if how == "mean" else _divide(v, float(v.max())) if how == "max" else lamp(v)
    return out


def _mix(ctx: ScoreContext, terms: list[tuple[float, Callable[[ScoreContext], dict]]]) -> dict[str, np.ndarray]:
    """Σ weight · minmax(component) per layer."""
    parts = [(w, get(ctx)) for w, get in terms]
    return {layer: sum(w * minmax(p[layer]) for w, p in parts) for layer in ctx.layers}


def _col(column: str) -> Callable[[ScoreContext], dict]:
    return lambda ctx: ctx.axes_column(column)


def _family(prefix: str, axis: str, symbol: str, label: str, doc: str, grid: tuple, anchor: str, columns: tuple,
            terms: Callable[[float], list], minimum: float = 0.0) -> None:
    """Register the sweep ``<prefix><p>``, the :func:`_mix` of ``terms(p)``: the scores of ``grid``,
    and a factory for any other ``p`` (:func:`resolve_score`). ``doc``: ``{p}`` for the parameter.

    ``p`` below ``minimum`` is refused: every family's parameter weighs a term whose sign the
    score's axis rests on (a negative β would make redundancy *raise* a local score's keep value,
    a negative α would subtract I_X from a score that claims to add it)."""
    def make(p: float, knob: str = "pruning.scores") -> Score:
        if not p >= minimum:   # NaN fails too
            raise UserError(f"score '{prefix}{p:g}' ({knob}): {symbol} must be ≥ {minimum:g}, got {p:g}; "
                            f"{prefix}<{symbol}> is {label} with {symbol} in [{minimum:g}, ∞)")

        def fn(ctx, draw):
            return _mix(ctx, terms(p))

        return Score(f"{prefix}{p:g}", axis, fn, frozenset({"axes"}), False, prefix, float(p), doc.format(p=f"{p:g}"),
                     frozenset(columns))

    FAMILIES[prefix] = {"symbol": symbol, "label": label, "grid": grid, "anchor": anchor, "make": make,
                        "minimum": minimum}
    for p in grid:
        SCORES[f"{prefix}{p:g}"] = make(p)


# --- Local axis ---
@register("input_capture", "local", needs=("axes",), columns=("input_capture",))
def _input_capture(ctx, draw):
    """I_X: what the channel captures from its input."""
    return ctx.axes_column("input_capture")


_family("ixy_minus_red_b", "local", "β", "I_X − β·R̄_X", "I_X − {p}·R̄_X", (0.15, 0.3, 0.5, 0.7), "input_capture",
        ("input_capture", "peer_overlap"), lambda beta: [(1.0, _col("input_capture")), (-beta, _col("peer_overlap"))])


@register("hull_score", "local", needs=("axes",), columns=("hull_score",))
def _hull_score(ctx, draw):
    """−E_full / max(1, |H|): a channel well explained by few peers is replaceable, pruned first."""
    # axes.csv holds the replaceability E_full/max(1,|H|); the keep value is its reverse, so a
    # unique channel outranks a near-duplicate (METHODS §9). Keeping the replaceable ones made this
    # the worst score of all on the demo, below random.
    return {layer: -v for layer, v in ctx.axes_column("hull_score").items()}


@register("composite_local", "local", needs=("axes",), columns=("input_capture", "target_excess", "peer_overlap"))
def _composite_local(ctx, draw):
    """I_X + 0.5·S − 0.3·R̄_X."""
    return _mix(ctx, [(1.0, _col("input_capture")), (0.5, _col("target_excess")), (-0.3, _col("peer_overlap"))])


# --- Target axis ---
@register("task_info", "target", needs=("axes",), columns=("task_info",))
def _task_info(ctx, draw):
    """I_T: what the channel says about the task."""
    return ctx.axes_column("task_info")


@register("composite_target", "target", needs=("axes",), columns=("task_info", "target_excess", "task_redundancy"))
def _composite_target(ctx, draw):
    """I_T + 0.5·S − 0.3·R_T."""
    return _mix(ctx, [(1.0, _col("task_info")), (0.5, _col("target_excess")), (-0.3, _col("task_redundancy"))])


@register("task_unique", "target", needs=("axes",), columns=("task_unique", "target_excess"))
def _task_unique(ctx, draw):
    """U_T + 0.5·S."""
    return _mix(ctx, [(1.0, _col("task_unique")), (0.5, _col("target_excess"))])


# --- Mixed ---
def _filter_norm(ctx: ScoreContext, p: int) -> dict[str, np.ndarray]:
    return {layer: conv.weight.detach().flatten(1).norm(p=p, dim=1).cpu().numpy()
            for layer, conv in ctx.layers.items()}


def _magnitude(ctx: ScoreContext) -> dict[str, np.ndarray]:
    if ctx.magnitude not in ("l1", "l2"):
        raise unknown_name("magnitude norm (pruning.magnitude)", ctx.magnitude, ("l1", "l2"))
    return _filter_norm(ctx, 1 if ctx.magnitude == "l1" else 2)


_family("magnitude_plus_ix_a", "mixed", "α", "Magnitude + α·I_X", "‖w‖ + {p}·I_X", (0.25, 0.5, 0.75, 1.0), "{magnitude}",
        ("input_capture",), lambda alpha: [(1.0, _magnitude), (alpha, _col("input_capture"))])

# The authors' two-axis rule, taken as their sweep configs write it (α = 1): high input capture keeps
# a channel, high task information lowers its keep value. At β = 0 it ranks as input_capture.
_family("two_axis_a1_b", "mixed", "β", "norm(I_X) − β·norm(I_T)", "norm(I_X) − {p}·norm(I_T)", (0.1, 0.25, 0.5, 1.0),
        "input_capture", ("input_capture", "task_info"),
        lambda beta: [(1.0, _col("input_capture")), (-beta, _col("task_info"))])


# --- Baselines ---
@register("random", "baseline", stochastic=True)
def _random(ctx, draw):
    """Uniform random, one seeded draw per ``draw``."""
    rng = np.random.default_rng([int(ctx.seed), int(draw), 7919])
    return {layer: rng.random(out_channels(conv)) for layer, conv in ctx.layers.items()}


@register("l1", "baseline")
def _l1(ctx, draw):
    """L1 norm of the filter."""
    return _filter_norm(ctx, 1)


@register("l2", "baseline")
def _l2(ctx, draw):
    """L2 norm of the filter."""
    return _filter_norm(ctx, 2)


@register("bn_scale", "baseline")
def _bn_scale(ctx, draw):
    """|γ| of the normalisation after the conv (NaN where there is none)."""
    out = {}
    for layer, conv in ctx.layers.items():
        unit = ctx.units().get(layer)
        norm = None if unit is None else unit.norm
        w = getattr(norm, "weight", None)
        if w is None or w.numel() != out_channels(conv):
            out[layer] = np.full(out_channels(conv), np.nan)
        else:
            out[layer] = w.detach().abs().cpu().numpy()
    return out


@register("taylor", "baseline", needs=("calibration",))
def _taylor(ctx, draw):
    """Σ|w·∂L/∂w| over the filter, gradient of the mean cross-entropy on the calibration images."""
    return taylor_scores(ctx.model, ctx.layers, list(ctx.batches()), ctx.device)


def _feature_map_stat(ctx: ScoreContext, reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, np.ndarray]:
    """Σ over calibration images of ``reduce(fm: [B, C, H, W]) -> [B, C]`` per layer, / n."""
    units = ctx.units()
    sums = {layer: torch.zeros(out_channels(conv), dtype=torch.float64) for layer, conv in ctx.layers.items()}
    handles = []

    def make_hook(layer, unit):
        act = unit.act if unit is not None and unit.act is not None and not unit.residual else None
        # the norm output, or a channels-last Linear's own output ([B, H, W, C]), has its channels elsewhere
        dim = unit.channel_dim if unit is not None and (unit.norm is not None or unit.channels_last) else 1

        def hook(_m, _inp, out):
            fm = out.detach()
            if dim != 1:
                fm = fm.movedim(dim % fm.ndim, 1)
            fm = fm.to(torch.float64).clone()
            if act is not None:
                fm = act(fm)
            sums[layer] += reduce(fm).sum(0).cpu()
        return hook

    for layer, conv in ctx.layers.items():
        unit = units.get(layer)
        target = conv if unit is None or unit.norm is None else unit.norm
        handles.append(target.register_forward_hook(make_hook(layer, unit)))
    n = 0
    try:
        with eval_mode(ctx.model), torch.no_grad():
            for x, y in ctx.feature_map_batches():
                ctx.model(x.to(ctx.device))
                n += len(y)
    finally:
        for h in handles:
            h.remove()
    return {layer: (s / max(1, n)).numpy() for layer, s in sums.items()}


def _ranks(fm: torch.Tensor) -> torch.Tensor:
    """Rank of each channel's H×W map: ``fm: [B, C, H, W] -> [B, C]``."""
    return torch.linalg.matrix_rank(fm).to(torch.float64)


_CHIP_CHUNK = 2 ** 25  # doubles per chunk of Gram matrices (256 MB)


def _channel_independence(fm: torch.Tensor) -> torch.Tensor:
    """CHIP: ‖A‖_* − ‖A with row c removed‖_* per image, ``fm: [B, C, H, W] -> [B, C]``.

    ``A: [C, P]`` (P = H·W) is the image's feature-map matrix. Nuclear norms come from the
    eigenvalues of the smaller Gram matrix: ``AᵀA − a_c a_cᵀ`` when P ≤ C (rank-one downdate),
    the principal submatrix of ``AAᵀ`` without row/column c otherwise.
    """
    B, C = fm.shape[:2]
    A = fm.reshape(B, C, -1)
    P = A.shape[-1]
    m = min(C, P)
    per_image = max(1, _CHIP_CHUNK // max(1, (C + 1) * m * m))
    out = []
    for s in range(0, B, per_image):
        a = A[s:s + per_image]
        if P <= C:
            G = a.transpose(1, 2) @ a                                     # [b, P, P]
            Gm = G[:, None] - a[:, :, :, None] * a[:, :, None, :]         # [b, C, P, P]
        else:
            G = a @ a.transpose(1, 2)                                     # [b, C, C]
            Gm = G[:, None].repeat(1, C, 1, 1)                            # [b, C, C, C]
            idx = torch.arange(C)
            Gm[:, idx, idx, :] = 0.0
            Gm[:, idx, :, idx] = 0.0
        full = torch.linalg.eigvalsh(G).clamp_min(0).sqrt().sum(-1)       # [b]
        drop = torch.linalg.eigvalsh(Gm).clamp_min(0).sqrt().sum(-1)      # [b, C]
        out.append(full[:, None] - drop)
    return torch.cat(out)


@register("hrank", "baseline", needs=("calibration",))
def _hrank(ctx, draw):
    """Mean rank of the channel's feature maps over the calibration images."""
    return _feature_map_stat(ctx, _ranks)


@register("chip", "baseline", needs=("calibration",))
def _chip(ctx, draw):
    """Channel independence: nuclear-norm drop when the channel's row is removed."""
    return _feature_map_stat(ctx, _channel_independence)


def geometric_median_distance(weight: torch.Tensor) -> torch.Tensor:
    """FPGM (He et al. 2019): ``weight: [C, ...]`` -> ``[C]``, Σ_j ‖F_i − F_j‖₂ over the layer's other filters.

    The filter minimising this sum is the layer's geometric median among its filters; the ones near
    it are the ones the others can stand in for, so a small sum is pruned first (float64)."""
    w = weight.detach().flatten(1).to(torch.float64)
    return torch.cdist(w[None], w[None])[0].sum(1)


@register("fpgm", "baseline")
def _fpgm(ctx, draw):
    """Σ of distances to the layer's other filters: filters near the geometric median go first."""
    return {layer: geometric_median_distance(conv.weight).cpu().numpy() for layer, conv in ctx.layers.items()}


# --- Torch-Pruning importances (a user's criterion swept like a built-in score) ---
def _tp_importances() -> dict[str, type]:
    """Every importance class of ``torch_pruning.pruner.importance``, by class name."""
    from torch_pruning.pruner import importance as tpi  # loaded only when a tp.<ClassName> score is asked for

    return {n: c for n, c in vars(tpi).items() if isinstance(c, type) and issubclass(c, tpi.Importance)
            and c is not tpi.Importance}


def _tp_score(name: str, knob: str) -> Score:
    """``tp.<ClassName>``: that Torch-Pruning importance with its default arguments, as a baseline score."""
    classes = _tp_importances()
    cls = classes.get(name[len(TP_PREFIX):])
    if cls is None:
        raise unknown_name(f"Torch-Pruning importance ({knob})", name, [TP_PREFIX + c for c in classes])
    try:
        importance = cls()
    except TypeError as err:
        raise UserError(f"{name} ({knob}) cannot be built without arguments ({err}); register an instance from a "
                        "plugin: axes_pipeline.pruning.scores.register_importance(name, instance)") from None
    return importance_score(name, importance)


def importance_score(name: str, importance) -> Score:
    """A :class:`Score` (axis ``baseline``: on neither axis) from a Torch-Pruning importance:
    ``importance(group) -> [size]`` for every group of a ``torch_pruning.DependencyGraph`` of the network
    (the classifier ignored as a root, as :func:`~axes_pipeline.pruning.groups.build_groups` does), one value per
    root channel; each conv whose output channels the group holds gets the value of the root channel each
    of its channels maps to (``idxs`` ↔ ``root_idxs``). A conv no group reaches, or a group the importance
    returns None for, gets NaN (ranked by the tie-break only, with a warning).

    What it reads: a gradient-based importance (Taylor) gets ∂L/∂w of the mean cross-entropy over the
    calibration images, as ``taylor`` does; one with a ``compute_importance`` context (activations) sees
    the calibration images inside it. Importances that accumulate per-sample gradients (Hessian, OBDC)
    are refused in one line."""
    from torch_pruning.pruner import importance as tpi

    if isinstance(importance, (tpi.GroupHessianImportance, tpi.OBDCImportance)):
        raise UserError(f"{name}: {type(importance).__name__} accumulates per-sample gradients, which the "
                        "adapter does not drive; use a magnitude, BN-scale, Taylor, FPGM, LAMP or activation importance")
    gradients = isinstance(importance, tpi.GroupTaylorImportance)
    activations = hasattr(importance, "compute_importance")

    def fn(ctx: ScoreContext, draw: int) -> dict[str, np.ndarray]:
        return _tp_values(ctx, importance, gradients, activations)

    needs = frozenset({"calibration"}) if gradients or activations else frozenset()
    return Score(name, "baseline", fn, needs, doc=f"Torch-Pruning {type(importance).__name__}, per channel")


def register_importance(name: str, importance) -> Score:
    """Register a Torch-Pruning importance *instance* (a plugin's own, or one with arguments) as score ``name``."""
    SCORES[name] = importance_score(name, importance)
    return SCORES[name]


def _tp_values(ctx: ScoreContext, importance, gradients: bool, activations: bool) -> dict[str, np.ndarray]:
    """``{layer: [C]}`` of a Torch-Pruning importance on ``ctx.model`` (see :func:`importance_score`)."""
    import torch_pruning as tp

    model = ctx.model
    saved = {p: (p.requires_grad, p.grad) for p in model.parameters()}
    try:
        # an importance that draws (RandomImportance) draws from torch's global RNG: seeded by the run
        with torch.random.fork_rng(devices=[]), eval_mode(model):
            torch.manual_seed(int(ctx.seed))
            with torch.enable_grad():
                dg = tp.DependencyGraph().build_dependency(model, example_inputs=ctx.example_input(), verbose=False)
            if gradients:   # ∂L/∂w of the mean cross-entropy over the calibration images (as `taylor`)
                batches = list(ctx.batches())
                total = sum(len(y) for _, y in batches)
                for p in model.parameters():
                    p.requires_grad_(True)
                    p.grad = None
                with torch.enable_grad():
                    for x, y in batches:
                        loss = nn.functional.cross_entropy(model(x.to(ctx.device)).float(), y.to(ctx.device),
                                                           reduction="sum") / total
                        loss.backward()
            if activations:
                with importance.compute_importance(model), torch.no_grad():
                    for x, _y in ctx.batches():
                        model(x.to(ctx.device))
            by_module = {m: n for n, m in ctx.layers.items()}
            out = {n: np.full(out_channels(m), np.nan) for n, m in ctx.layers.items()}
            clf = model.get_submodule(classifier_name(model))
            for group in dg.get_all_groups(ignored_layers=[clf], root_module_types=(nn.Conv2d, nn.Linear)):
                imp = importance(group)
                if imp is None:
                    continue
                imp = imp.detach().double().cpu().numpy()
                for item in group:
                    layer = by_module.get(item.dep.target.module)
                    if layer is not None and dg.is_out_channel_pruning_fn(item.dep.handler):
                        out[layer][np.asarray(item.idxs, dtype=np.int64)] = imp[np.asarray(item.root_idxs,
                                                                                           dtype=np.int64)]
            return out
    finally:
        for p, (rg, g) in saved.items():
            p.requires_grad_(rg)
            p.grad = g


#: the package's own scores, local first, then target, mixed, baseline. The default sweep
#: (pruning.scores: null) reads score_names() when a run starts instead, so a plugin's scores join it.
DEFAULT_SCORES: tuple[str, ...] = tuple(score_names())
