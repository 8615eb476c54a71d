"""The pruning config: its typed schema (:class:`PruningConfig`, the one source of every pruning
default).

``PruningConfig`` is registered as ``pruning/base_pruning`` (:mod:`axes_pipeline.schema`), so a
wrong type or an unknown key under ``pruning.*`` fails at composition. What a type cannot say
(a target outside (0, 1], an unknown score or allocation) is checked by
:class:`~axes_pipeline.pruning.resolved.PruneSettings`, before anything expensive. Like every
package's settings, this module imports nothing of its package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from axes_pipeline.bounds import bounded, count, non_negative, positive, seed_field

__all__ = ["ALLOCATIONS", "COUNT_SOURCES", "MODES", "NORMALIZERS", "SCHEDULES", "Calibration", "Finetune",
           "PruningConfig"]

#: flops: search so the achieved MACs match each target | channel_fraction: the authors' literal protocol
MODES = ("flops", "channel_fraction")
#: oneshot: each target in one cut from the trained network | iterative: in `steps` FLOPs-matched cuts,
#: the scores measured again on the pruned network before each one (METHODS §9, pruning/schedule.py)
SCHEDULES = ("oneshot", "iterative")

#: how channels are spread over the layers (METHODS §9; `auto` picks one per backbone)
ALLOCATIONS = ("global", "uniform", "hybrid", "knapsack", "sensitivity")

#: the cross-layer normalisation of a layer's scores before they meet other layers' (METHODS §9):
#: minmax (ours, the default), and Torch-Pruning's mean, max, lamp (Lee et al. 2021)
NORMALIZERS = ("minmax", "mean", "max", "lamp")

#: what pruning.hybrid_counts_from may name besides a score (an allocation that needs no score)
COUNT_SOURCES = ("uniform", "sensitivity")


@dataclass
class Finetune:
    """A short fine-tune of every pruned network on the training split (``acc_after_ft``)."""

    # null: fine-tune when epochs > 0; true: the same, but epochs=0 is refused; false: never
    enabled: bool | None = None
    # the recovery budget, sweepable (`-m pruning.finetune.epochs=0,2`); 0 = no fine-tune
    epochs: int = count(0, least=0)
    max_batches: int | None = count(200)   # per epoch; null = the whole training split
    lr: float = positive(1.0e-4)
    optimizer: str = "adam"
    weight_decay: float = non_negative(0.0)
    # iterative schedule: the same fine-tune after every step but the last (the last step's is the point's own)
    between_steps: bool = False


@dataclass
class Calibration:
    """The images of the calibration scores taylor / hrank / chip (training split, seeded)."""

    n: int = count(1024)
    seed: int = seed_field(0)                # fixed across training seeds, like capture.seed
    transform: str = "eval"
    batch_size: int = count(128)
    n_feature_maps: int | None = count(None)   # hrank / chip only; null = n


@dataclass
class PruningConfig:
    """``cfg.pruning`` (METHODS §9). ``python prune.py [same overrides as train.py] [pruning.*=...]``."""

    # null or `all`: every score registered when the run starts, in the registry's order
    # (scores.score_names(): the built-in ones, then a plugin's `@register`ed ones join the sweep).
    # One name = that score; a list = those; any β / α also works: ixy_minus_red_b<β>, magnitude_plus_ix_a<α>,
    # two_axis_a1_b<β>.
    scores: Any = None
    random_draws: int = count(3)         # seeded draws of the `random` score (draw column)
    # Fractions of the unpruned MACs kept (mode=flops) or of the channels kept (mode=channel_fraction).
    targets: list[float] = field(default_factory=lambda: [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    mode: str = "flops"           # one of MODES
    # |achieved - target| allowed, in fractions of the unpruned MACs
    tolerance: float = bounded(0.005, 0.0, 0.5, lo_open=True, hi_open=True)
    allocation: str = "auto"      # auto | one of ALLOCATIONS: global | uniform | hybrid | knapsack | sensitivity
    # the cross-layer normalisation of each layer's scores (one of NORMALIZERS): minmax | mean | max | lamp
    normalize: str = "minmax"
    # what `auto` picks per backbone (anything else: global)
    allocation_defaults: dict[str, str] = field(default_factory=lambda: {
        "resnet18": "global", "vgg16": "global", "mobilenetv2": "uniform", "convnext_t": "uniform"})
    # at most this fraction of any group (layer) is pruned, per allocation (a mapping, since
    # `global` cannot be a field name)
    max_fraction: dict[str, float] = field(default_factory=lambda: {
        "global": 0.95, "uniform": 0.9, "hybrid": 0.95, "knapsack": 0.95, "sensitivity": 0.95})
    # hybrid: per-layer counts from this source's allocation (any score: its global allocation; or
    # one of COUNT_SOURCES: uniform | sensitivity), the ranking inside each layer from the swept score
    hybrid_counts_from: str = "taylor"
    # sensitivity: the fractions of one layer's channels pruned alone (L1 ranking) in the scan
    sensitivity_fractions: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    depthwise_in_group_score: bool = True  # false: depthwise convs left out of a group's mean when it has another conv
    magnitude: str = "l2"         # ||w|| of magnitude_plus_ix_a<α>: l2 (the authors' code) | l1
    fvcore_check: bool = True     # count every pruned network with fvcore (achieved_flops); false: analytic count only
    finetune: Finetune = field(default_factory=Finetune)
    eval_samples: int | None = count(None)    # test images evaluated per point; null = the whole test split
    eval_seed: int = seed_field(0)
    calibration: Calibration = field(default_factory=Calibration)
    latency: bool = True          # median CPU (and GPU if visible) latency, pruned vs unpruned
    latency_batch_sizes: list[int] = field(default_factory=lambda: [1, 64])
    latency_repeats: int = count(10)
    export: bool = False          # true: prune/models/<score>_<target>.pt (reload: axes_pipeline.pruning.load_pruned)
    schedule: str = "oneshot"     # one of SCHEDULES
    steps: int = count(3)         # iterative: FLOPs-matched steps per target (MACs kept target^(i/steps))
    # true: train the pruned architecture of the chosen points from random initialisation (acc_scratch;
    # prune/scratch/<score>_<target>/): the best local and best target score (chosen on validation) and random
    scratch: bool = False
    scratch_epochs: int | None = count(None)   # null = the run's trainer.max_epochs
    # the scratch points' targets: the sweep's target nearest each of these
    scratch_targets: list[float] = field(default_factory=lambda: [0.7, 0.5, 0.3])
