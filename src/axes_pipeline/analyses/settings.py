"""The typed knobs of the analyses: how the two axes are measured (top-level ``capture``, ``metrics``,
``graphs``, ``gradients``, METHODS §1-§5) and each ``analysis=<name>`` option's own block (``analysis.lesion``,
...). The one source of their defaults; conf/analysis/*.yaml only select and override.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from axes_pipeline.bounds import count, fraction, non_negative, positive, seed_field


# ------------------------------------------------------------------ the axes knobs (top level)
@dataclass
class CaptureConfig:
    """METHODS §1: what is sampled."""

    n_cal: int = count(2000)             # calibration images, a fixed seeded subset of the training split
    transform: str = "eval"       # eval | train
    point: str = "pre_bn"         # pre_bn | post_bn | post_act
    spatial: str = "sample"       # sample (s random positions per image) | gap (one pooled sample per image)
    samples_per_image: int = count(16)
    target: str = "logit_margin"  # logit_margin | true_logit | neg_loss
    batch_size: int = count(256)
    seed: int = seed_field(0)                 # fixed across training seeds, so every run sees the same images
    layers: Any = None            # a layer name or a list of them; null = every conv layer
    cache: bool = True            # keep the captured samples; other metric knobs then reuse them


@dataclass
class MetricsConfig:
    """METHODS §2-§3: the metric knobs (the names of axes_pipeline.metrics.channel_axes)."""

    sigma0: Any = "median"        # median | mean | p75 | p90 | a number (fixed)
    hull_eps: float = non_negative(0.05)
    hull_max: int = count(10)
    hull_order: str = "correlation"  # correlation | greedy
    ridge: float = non_negative(1.0e-3)
    pool: int = count(50)
    top: int = count(10)
    peers: str = "layer"          # layer | group: peers of a grouped/depthwise conv's channel (METHODS §1)
    dtype: str = "float64"        # float32 | float64


@dataclass
class GraphsConfig:
    """METHODS §4."""

    edge_fraction: float = fraction(0.1)   # 0 = no community graphs
    # shuffled-weight null draws per layer; layers.csv gets their mean, SD, 2.5/97.5%
    null_shuffles: int = count(20, least=0)
    max_channels: int | None = count(None)  # null = every channel; a number = graphs on the first max_channels only


@dataclass
class GradientsConfig:
    """METHODS §5."""

    enabled: bool = True
    max_patch_dim: int = count(4608)     # layers with larger conv patches (Cin·k·k) are skipped
    sigma_rows: int = count(8192)        # rows used for Σ_X (only a normaliser of the whitened cosine)


@dataclass
class AxesKnobs:
    """The top-level keys that say how the axes are measured, shared by every stage so that an
    overlay (experiment=demo sets capture.n_cal) composes everywhere and prune.py computes a score
    that needs the axes with the same knobs analyze.py caches."""

    device: str = "auto"          # auto = cuda when available, else cpu
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    graphs: GraphsConfig = field(default_factory=GraphsConfig)
    gradients: GradientsConfig = field(default_factory=GradientsConfig)
    plots: bool = True


# ------------------------------------------------------------------ analysis=<name> (one block each)
@dataclass
class AxesAnalysis:
    """The two axes for every channel, their alignment and groupings (always computed and cached)."""

    recompute: bool = False       # axes.csv computed with these settings is reused (a re-run skips it); true: redo


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


@dataclass
class LinearGaussianAnalysis:
    """METHODS §5: a synthetic linear-Gaussian layer trained by gradient descent."""

    input_dim: int = count(128)
    channels: int = count(64)
    steps: int = count(1200)
    lr: float = positive(0.01)
    eval_every: int = count(100)
    seed: int = seed_field(0)


#: analysis option (conf/analysis/<name>.yaml) -> the schema of its block ``analysis.<name>``,
#: stored as ``analysis/base_<name>``
ANALYSES: dict[str, type] = {"axes": AxesAnalysis, "lesion": LesionAnalysis, "propagation": PropagationAnalysis,
                             "dynamics": DynamicsAnalysis, "definitions": DefinitionsAnalysis,
                             "linear_gaussian": LinearGaussianAnalysis}


def analysis_block(cfg: DictConfig, name: str) -> DictConfig:
    """``analysis.<name>`` of ``cfg``; its schema's defaults where that analysis is not selected
    (another analysis, or prune.py, reads its knobs)."""
    block = OmegaConf.select(cfg, f"analysis.{name}")
    return block if block is not None else OmegaConf.structured(ANALYSES[name])
