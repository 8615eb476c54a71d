"""The typed knobs of the axes table: how the two axes are measured (top-level ``capture``,
``metrics``, ``graphs``, ``gradients``, METHODS §1-§5) and the ``analysis.axes`` block. The one
source of their defaults. Like every package's settings, this module imports nothing of its package:
the schema registration (:mod:`axes_pipeline.schema`) imports it without pulling in torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from axes_pipeline.bounds import count, fraction, non_negative, seed_field

#: CaptureConfig fields that do not change what is captured (how fast, whether it is kept): left out
#: of the capture's identity (:func:`axes_pipeline.axes.table.capture_settings`)
NOT_IN_IDENTITY = ("batch_size", "cache")


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
    # stop drawing once the null gap mean's standard error is ≤ this (after 5 draws); 0 = all draws
    null_se: float = non_negative(0.002)
    max_channels: int | None = count(None)  # null = every channel; a number = graphs on the first max_channels only


@dataclass
class GradientsConfig:
    """METHODS §5."""

    enabled: bool = True
    max_patch_dim: int = count(4608)     # layers with larger conv patches (Cin·k·k) are skipped
    sigma_rows: int = count(8192)        # rows used for Σ_X (only a normaliser of the whitened cosine)
    # the whitened check (a zero check, METHODS §5) on this many depth-spaced layers of those with
    # patch moments; null = on every one, 0 = on none (Σ_X costs sigma_rows·D² per layer)
    check_layers: int | None = count(6, least=0)
    # ... chosen among the patches at most this wide (null: any), plus every patch geometry at its
    # narrowest layer (Σ_X costs D² a row, its solve D³: with two 4,608-wide layers the check was 0.9×
    # VGG-16-BN's forward pass; METHODS §5)
    check_max_dim: int | None = count(2304)


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


# ------------------------------------------------------------------ analysis=axes
@dataclass
class AxesAnalysis:
    """The two axes for every channel, their alignment and groupings (always computed and cached)."""

    recompute: bool = False       # axes.csv computed with these settings is reused (a re-run skips it); true: redo


