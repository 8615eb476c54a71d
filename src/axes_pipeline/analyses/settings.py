"""The typed knobs of the analyses: each ``analysis=<name>`` option's own block (``analysis.lesion``,
...). The one source of their defaults; conf/analysis/*.yaml only select and override. How the two
axes are measured (``capture``, ``metrics``, ...) is :mod:`axes_pipeline.axes.settings`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from axes_pipeline.axes.settings import AxesAnalysis
from axes_pipeline.bounds import count, non_negative, positive, seed_field


# ------------------------------------------------------------------ analysis=<name> (one block each)
@dataclass
class LesionAnalysis:
    """METHODS §8: the damage of zeroing one channel (filter, bias, BN γ and β) on a held-out test
    subset, how much of it a linear stand-in from the channel's peers recovers, which axis predicts it."""

    layers: Any = None            # conv layer name(s); null = every analysed layer (capture.layers)
    # per layer, seeded: auto = 64 | N | all; auto and N are "at most": a smaller layer is lesioned whole
    channels: Any = count("auto")
    seed: int = seed_field(0)     # channel sample, evaluation subset and bootstrap
    eval_samples: int | None = count(1000)  # images of the test split (seeded subset); null = the whole test split
    replace: Any = field(default_factory=lambda: ["hull", "all"])  # peer replacement variant(s): hull, all
    min_damage: float = non_negative(1.0e-4)    # recovery is NaN when the lesion raises the loss by less than this
    # analysis
    n_bins: int = count(5)               # task_info (I_T) quantile bins for the within-bin Spearman
    predictors: list[str] | None = field(default_factory=lambda: [
        "input_capture", "peer_overlap", "full_explained", "hull_score", "l1", "taylor", "task_info"])
    # the model the peer terms must improve on, and the peer terms: incremental R² of these over base_terms
    base_terms: Any = field(default_factory=lambda: ["input_capture", "task_info"])
    peer_terms: Any = field(default_factory=lambda: ["full_explained", "hull_score"])
    r2_scale: str = "rank"        # rank (within-layer percentile ranks) | raw; the other is reported too
    n_boot: int = count(2000)            # bootstrap replicates of the ΔR² CI
    taylor_images: int = count(1024, least=0)     # calibration images for the Taylor predictor (Σ|w·∂L/∂w|); 0 = skip it
    # execution
    batch_size: int = count(256)  # evaluation images per prefix pass
    max_rows: Any = count("auto")        # lesion × image rows per pass; auto = 8192 on a GPU, 1024 on a CPU (lower for 224 px)
    max_gb: float = positive(2.0)           # memory for the repeated activations of one pass
    resume: bool = True           # reuse finished layers from analyze/lesion_parts/ when nothing changed


@dataclass
class PropagationAnalysis:
    """METHODS §7: route each upstream channel's I_X / I_T through the influence between directly linked
    conv layers and correlate with the receiving channel's own, against a shuffled-weights null."""

    null_draws: int = count(20, least=0)          # seeded shuffles per pair; null_rho is their mean ρ (0 = no null)
    null_mode: str = "weights"    # weights: each receiver's |W| to random upstream channels | columns: A's columns permuted
    seed: int = seed_field(0)
    residual: str = "main"        # main: across an add to its main-branch conv (METHODS §7; ResNet-18: 19 pairs) | skip: 9


@dataclass
class DynamicsAnalysis:
    """METHODS §6: per checkpointed epoch, ρ(I_X, I_T), modularity gap, mean hull size, saturated-hull
    fraction, S3/S2 on the calibration subset of capture.*."""

    layers: Any = None            # conv layer name(s); null = k depth-spaced layers
    k: int = count(6)
    include_shortcuts: bool = False     # may the depth-spaced pick include 1x1 shortcut convs
    epochs: Any = None            # null = every checkpointed epoch; N = every N-th (the last always); or a list
    seeds: Any = None             # null = this run only; a list = its runs with seed= changed (mean ± SD over them)
    target: str = "epoch"         # T of each epoch's own network (epoch) | of the final network (final)
    # shuffled-graph nulls per layer and epoch (each a greedy-modularity run); 0 = none
    null_shuffles: int = count(0, least=0)
    required: bool = True         # false: a run without per-epoch checkpoints skips dynamics (noted) instead of failing


@dataclass
class DefinitionsAnalysis:
    """METHODS §1/§6: the dynamics' quantities at init and after training under every activation point ×
    sampling, on the depth-spaced layers of analysis.dynamics (k, layers), BN in eval mode."""

    points: list[str] = field(default_factory=lambda: ["pre_bn", "post_bn", "post_act"])
    spatial: list[str] = field(default_factory=lambda: ["sample", "gap"])
    init: str = "epoch_000.ckpt"  # the initial checkpoint, in the run's checkpoints/ (train.py always writes it)
    required: bool = True         # false: a run without the initial checkpoint skips definitions (noted) instead of failing


@dataclass
class LinearGaussianAnalysis:
    """METHODS §5: a synthetic linear-Gaussian layer trained by gradient descent."""

    input_dim: int = count(128)
    channels: int = count(64)
    steps: int = count(1200)
    lr: float = positive(0.01)
    eval_every: int = count(100)
    # null: the run's seed, so that the seeds of a sweep are replicates of the study, not one draw repeated
    seed: int | None = seed_field(None)


#: analysis option (conf/analysis/<name>.yaml) -> the schema of its block ``analysis.<name>``,
#: stored as ``analysis/base_<name>``
ANALYSIS_SCHEMAS: dict[str, type] = {
    "axes": AxesAnalysis, "lesion": LesionAnalysis, "propagation": PropagationAnalysis, "dynamics": DynamicsAnalysis,
    "definitions": DefinitionsAnalysis, "linear_gaussian": LinearGaussianAnalysis}
