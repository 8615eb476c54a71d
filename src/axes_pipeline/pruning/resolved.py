"""The validated, resolved settings of one prune run (:class:`PruneSettings`): what the typed schema
(:mod:`.settings`) cannot say (a target outside (0, 1], an unknown score or allocation) is checked
here, before anything expensive."""

from __future__ import annotations

from dataclasses import asdict

from axes_pipeline.errors import UserError, unknown_name
from axes_pipeline.pruning.protocol import protocol_of
from axes_pipeline.pruning.scores import Score, resolve_score, score_names
from axes_pipeline.pruning.settings import (
    ALLOCATIONS,
    COUNT_SOURCES,
    MODES,
    NORMALIZERS,
    SCHEDULES,
    PruningConfig,
)

__all__ = ["PruneSettings"]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _choice(key: str, value: str, allowed: tuple, shown: tuple | None = None) -> str:
    if value not in allowed:
        raise unknown_name(key, value, shown or allowed)
    return value


def _score_list(names, resolve_score, default: tuple) -> list:
    """The :class:`Score` objects named by ``pruning.scores`` (null / `all` / one name / a list),
    without duplicates (b0.3 and b0.30 are one score)."""
    if names is None or names == "all":
        names = default
    elif isinstance(names, str):
        names = [names]
    _require(len(names) > 0, "pruning.scores is empty; give at least one score name")
    scores = {}
    for name in dict.fromkeys(str(n) for n in names):
        score = resolve_score(name)
        scores.setdefault(score.name, score)
    return list(scores.values())


def _count_source(name) -> Score | str:
    """``pruning.hybrid_counts_from``: one of COUNT_SOURCES, else a score; an unknown name is one line
    naming this knob (not pruning.scores) and what it may be."""
    name = str(name)
    if name in COUNT_SOURCES:
        return name
    return resolve_score(name, knob="pruning.hybrid_counts_from", also=COUNT_SOURCES)


def _fraction_list(fractions) -> list[float]:
    """The sensitivity scan's fractions, ascending, each in (0, 1)."""
    _require(len(fractions) > 0, "pruning.sensitivity_fractions is empty; give fractions in (0, 1), e.g. [0.25,0.5,0.75]")
    for f in fractions:
        _require(0.0 < f < 1.0, f"pruning.sensitivity_fractions: {f} is outside (0, 1); each is the fraction of one "
                                "layer's channels pruned alone in the scan")
    return sorted({float(f) for f in fractions})


def _target_list(targets, mode: str) -> list[float]:
    """The targets, largest first, each checked to lie in (0, 1]."""
    _require(len(targets) > 0, "pruning.targets is empty; give fractions in (0, 1], e.g. [0.9,0.5,0.1]")
    what = "MACs" if mode == "flops" else "channels"
    for t in targets:   # NaN fails the comparison too
        _require(0.0 < t <= 1.0, f"pruning.targets: {t} is outside (0, 1]; a target is the fraction of the "
                                 f"unpruned {what} kept")
    return sorted({float(t) for t in targets}, reverse=True)


class PruneSettings:
    """The validated ``pruning`` block (:class:`PruningConfig`), with ``auto`` resolved (the allocation of the
    backbone ``model``) and the score names resolved to :class:`~axes_pipeline.pruning.scores.Score` objects.
    Each attribute has its schema field's name; where it holds the resolved value, the comment beside it says
    what was resolved. The numeric ranges the schema declares (tolerance, counts, the fine-tune's lr) are
    checked before the stage (:func:`axes_pipeline.bounds.check_bounds`); what a type cannot say is checked here."""

    def __init__(self, pc: PruningConfig, model: str, seed: int, progress: bool = True):
        self.seed = int(seed)            # the run's seed: the global ranking's tie-break, the fine-tune's shuffle
        # the registry is read now, not at import, so a score registered by a plugin is in the default
        self.scores = _score_list(pc.scores, resolve_score, score_names())
        self.targets = _target_list(pc.targets, pc.mode)
        self.mode = _choice("pruning.mode", pc.mode, MODES)
        alloc = pc.allocation if pc.allocation != "auto" else pc.allocation_defaults.get(model, "global")
        self.allocation = _choice("allocation (pruning.allocation)", alloc, ALLOCATIONS, ("auto",) + ALLOCATIONS)
        _require(alloc in pc.max_fraction, f"pruning.max_fraction has no entry for the allocation {alloc}")
        self.max_fraction = pc.max_fraction[alloc]   # the resolved allocation's cap
        _require(0.0 < self.max_fraction < 1.0,
                 f"pruning.max_fraction.{alloc} must be in (0, 1), got {self.max_fraction}")
        self.tolerance = pc.tolerance
        self.random_draws = pc.random_draws
        self.normalize = _choice("normalisation (pruning.normalize)", pc.normalize, NORMALIZERS)
        # hybrid's count source: a Score (its global allocation) or one of COUNT_SOURCES; `sensitivity` is
        # hybrid with the scan's counts. Checked whatever the allocation, so a typo never waits for a sweep.
        self.hybrid_counts_from: Score | str = _count_source(pc.hybrid_counts_from)
        self.sensitivity_fractions = _fraction_list(pc.sensitivity_fractions)
        self.depthwise_in_group_score = pc.depthwise_in_group_score
        self.magnitude = _choice("magnitude norm (pruning.magnitude)", pc.magnitude, ("l1", "l2"))
        # the fine-tune's knobs (pruning.finetune without `enabled` and `between_steps`; the point's key holds
        # them), None when it is off: epochs=0 is the budget "none" (a -m sweep of epochs=0,2 is two budgets)
        ft = pc.finetune
        _require(not (ft.enabled and ft.epochs == 0),
                 "pruning.finetune.enabled=true with pruning.finetune.epochs=0: give the budget, e.g. "
                 "pruning.finetune.epochs=5 (0 = no fine-tune)")
        knobs = {k: v for k, v in asdict(ft).items() if k not in ("enabled", "between_steps")}
        self.finetune: dict | None = knobs if ft.epochs > 0 and ft.enabled is not False else None
        # the schedule (METHODS §9, pruning/schedule.py): steps per target, the fine-tune between them
        self.schedule = _choice("pruning.schedule", pc.schedule, SCHEDULES)
        _require(self.schedule == "oneshot" or self.mode == "flops",
                 "pruning.schedule=iterative needs pruning.mode=flops (each step is a FLOPs-matched target)")
        self.steps = int(pc.steps) if self.schedule == "iterative" else 1
        # the scan is of the unpruned network; re-scanning each pruned one is a protocol nobody has defined
        _require(not (self.schedule == "iterative" and self.needs_scan),
                 "pruning.schedule=iterative does not take the sensitivity scan's counts (it scans the unpruned "
                 "network only); use another pruning.allocation or pruning.hybrid_counts_from")
        _require(not (ft.between_steps and self.schedule == "oneshot"),
                 "pruning.finetune.between_steps=true needs pruning.schedule=iterative (one shot has no steps)")
        _require(not (ft.between_steps and self.finetune is None),
                 "pruning.finetune.between_steps=true needs a budget: pruning.finetune.epochs > 0")
        self.between_steps = bool(ft.between_steps)
        # scratch training of the chosen points (pruning/scratch.py); the epochs' null = the run's recipe
        self.scratch, self.scratch_epochs = bool(pc.scratch), pc.scratch_epochs
        self.scratch_targets = _target_list(pc.scratch_targets, pc.mode) if pc.scratch else []
        _require(not self.scratch or self.mode == "flops",
                 "pruning.scratch=true needs pruning.mode=flops (the scratch points are FLOPs targets)")
        self.eval_samples, self.eval_seed = pc.eval_samples, pc.eval_seed
        self.calibration = asdict(pc.calibration)
        self.latency, self.latency_batch_sizes = pc.latency, list(pc.latency_batch_sizes)
        self.latency_repeats = pc.latency_repeats
        self.export, self.fvcore_check = pc.export, pc.fvcore_check
        # a bar on a terminal, one line per finished point in a log file (console.progress)
        self.progress = bool(progress)
        # what decides a curve besides the score, and the folder its results live in (prune/<protocol>/)
        self.protocol = protocol_of(pc, model)

    def points(self) -> list[tuple]:
        """Every (score, draw, target) of the sweep, in the order they are computed and written."""
        return [(score, d, t) for score in self.scores for d in score.draws(self.random_draws) for t in self.targets]

    @property
    def counts_source(self) -> Score | str | None:
        """Where the per-layer counts come from when they are not the swept score's own: a Score,
        ``uniform`` or ``sensitivity`` (None for global, uniform, knapsack)."""
        if self.allocation == "sensitivity":
            return "sensitivity"
        return self.hybrid_counts_from if self.allocation == "hybrid" else None

    @property
    def needs_scan(self) -> bool:
        """Whether this run needs the sensitivity scan (the sensitivity allocation, or hybrid counted by it)."""
        return self.counts_source == "sensitivity"

    def needs(self, what: str) -> list:
        """The scores (the hybrid's count source included) that need ``what`` (axes, calibration); the
        sensitivity scan ranks by ``l1``, which needs neither."""
        src = self.counts_source
        extra = [src] if isinstance(src, Score) else []
        return [s for s in self.scores + extra if what in s.needs]
