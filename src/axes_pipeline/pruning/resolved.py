"""The validated, resolved settings of one prune run (:class:`PruneSettings`): what the typed schema
(:mod:`.settings`) cannot say (a target outside (0, 1], an unknown score or allocation) is checked
here, before anything expensive."""

from __future__ import annotations

from dataclasses import asdict

from axes_pipeline.errors import UserError, unknown_name
from axes_pipeline.pruning.allocation import ALLOCATIONS
from axes_pipeline.pruning.scores import resolve_score, score_names
from axes_pipeline.pruning.settings import MODES, SCHEDULES, PruningConfig

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
        self.hybrid_counts_from = resolve_score(pc.hybrid_counts_from)
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

    def points(self) -> list[tuple]:
        """Every (score, draw, target) of the sweep, in the order they are computed and written."""
        return [(score, d, t) for score in self.scores for d in score.draws(self.random_draws) for t in self.targets]

    def needs(self, what: str) -> list:
        """The scores (the hybrid's count source included) that need ``what`` (axes, calibration)."""
        extra = [self.hybrid_counts_from] if self.allocation == "hybrid" else []
        return [s for s in self.scores + extra if what in s.needs]
