"""One representative of each torchvision CNN family, and the end-to-end check run on it.

:data:`REPRESENTATIVES` is the family table of the README (issue 13): the arch, the width at
which the tests and the benchmark run it (small where the family has a multiplier) and the
smallest convenient input side. :func:`check_family` runs, on random weights and random
images, what ``analyze.py`` and ``prune.py`` run on a trained network: capture → both axes for
every analysable conv → lesions (a few channels of three layers) → propagation → a FLOPs-matched
prune of one score at three targets, checked by fvcore, and a forward of each pruned network.
Each stage either works or records the one-line reason it refused (never a silent skip).
``tests/test_families.py`` asserts on its result; ``benchmarks/bench_families.py`` tabulates it
(a test harness: it lives here, not in the package, because it drives analyses and pruning together).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from axes_pipeline.analyses.lesion_engine import trace
from axes_pipeline.analyses.lesions import lesion_layer
from axes_pipeline.analyses.propagation import link_report, propagation_table
from axes_pipeline.axes.settings import AxesKnobs
from axes_pipeline.axes.table import analyze_capture
from axes_pipeline.capture import capture_activations
from axes_pipeline.errors import UserError
from axes_pipeline.models import build_model, capture_point, conv_layers, conv_norm_pairs
from axes_pipeline.pruning import (
    CostModel,
    ScoreContext,
    build_groups,
    fvcore_macs,
    group_scores,
    keep_masks,
    make_allocation,
    match_flops,
    prune_physically,
    resolve_score,
)

__all__ = ["REPRESENTATIVES", "FamilyResult", "check_family"]

#: family -> (torchvision arch, model.width, input side)
REPRESENTATIVES: dict[str, tuple[str, float, int]] = {
    "AlexNet": ("alexnet", 1.0, 64),             # no multiplier; its pools need >= 63
    "VGG": ("vgg11", 0.125, 32),
    "ResNet": ("resnet50", 0.25, 32),
    "ResNeXt": ("resnext50_32x4d", 0.25, 32),
    "Wide ResNet": ("wide_resnet50_2", 0.125, 32),
    "DenseNet": ("densenet121", 0.25, 32),
    "GoogLeNet": ("googlenet", 1.0, 32),         # no multiplier
    "Inception-v3": ("inception_v3", 1.0, 75),   # no multiplier; 75 is its smallest input
    "SqueezeNet": ("squeezenet1_0", 1.0, 32),    # no multiplier
    "MobileNetV2": ("mobilenet_v2", 0.25, 32),
    "MobileNetV3": ("mobilenet_v3_small", 0.25, 32),
    "MNASNet": ("mnasnet0_5", 0.5, 32),
    "EfficientNet": ("efficientnet_b0", 0.25, 32),
    "RegNet": ("regnet_y_400mf", 0.25, 32),
    "ShuffleNetV2": ("shufflenet_v2_x0_5", 0.5, 32),
    "ConvNeXt": ("convnext_tiny", 0.125, 32),
}


@dataclass
class FamilyResult:
    arch: str
    layers: int = 0                       # analysable units: convs and channels-last Linears
    linear_units: int = 0                 # of which channels-last nn.Linear (ConvNeXt's pointwise convs)
    analysed: int = 0                     # layers with a full axes row per channel
    capture_points: dict = field(default_factory=dict)   # label -> layers
    lesioned: int = 0
    propagation_pairs: int = 0
    propagation_refused: list = field(default_factory=list)   # [(layer, reason)]
    prune_refused: dict = field(default_factory=dict)         # layer -> reason (kept whole)
    prune_error: str | None = None         # the one-line refusal of the whole network
    groups: int = 0                        # prunable coupled channel groups
    linear_groups: int = 0                 # of which rooted in a channels-last Linear's outputs
    targets: list = field(default_factory=list)
    achieved: list = field(default_factory=list)             # fvcore MACs fraction of each pruned net
    pruned_runs: bool = False
    analyze_s: float = 0.0
    prune_s: float = 0.0

    @property
    def max_flops_error(self) -> float:
        return max((abs(a - t) for a, t in zip(self.achieved, self.targets)), default=float("nan"))


def axes_knobs(gradients: bool = False) -> AxesKnobs:
    """The axes knobs' defaults, without the community graphs (a plot aid, not an axis) and, unless asked,
    without the gradient analysis."""
    knobs = AxesKnobs()
    return replace(knobs, graphs=replace(knobs.graphs, edge_fraction=0),
                   gradients=replace(knobs.gradients, enabled=gradients))


def check_family(arch: str, width: float, side: int, *, score: str = "task_info",
                 targets=(0.8, 0.5, 0.3), tolerance: float = 0.005, lesion_layers: int = 3,
                 lesion_channels: int = 3, images: int = 32, seed: int = 0) -> FamilyResult:
    """Run the analysis and pruning stages on torchvision ``arch`` (random weights, random
    images of ``side``²); see the module docstring. A network the pruning stage refuses has
    ``prune_error`` set to its one-line :class:`UserError`."""
    torch.manual_seed(seed)
    res = FamilyResult(arch)
    model = build_model(f"tv_{arch}", 10, width=width).eval()
    g = torch.Generator().manual_seed(seed + 1)
    data = [(torch.randn(16, 3, side, side, generator=g), torch.randint(0, 10, (16,), generator=g))
            for _ in range(max(1, images // 16))]

    t0 = time.perf_counter()
    units = conv_norm_pairs(model)
    res.layers = len(units)
    res.linear_units = sum(u.channels_last for u in units.values())
    knobs = axes_knobs()
    cap = capture_activations(model, units, data, samples_per_image=4, seed=seed, progress=False, keep_samples=True)
    axes, _, _ = analyze_capture(cap, units, knobs, torch.device("cpu"), progress=False)
    res.analysed = int(axes.groupby("layer").size().reindex(list(units)).eq(
        [u.out_channels for u in units.values()]).sum())
    for _name, unit in units.items():
        label = capture_point(unit, str(knobs.capture.point))
        res.capture_points[label] = res.capture_points.get(label, 0) + 1
    res.analyze_s = time.perf_counter() - t0

    graph = trace(model)
    names = list(units)
    picks = sorted({names[round(i * (len(names) - 1) / max(1, lesion_layers - 1))] for i in range(lesion_layers)},
                   key=names.index)
    for layer in picks:
        rows = axes[axes.layer == layer].set_index("channel")
        chans = np.arange(min(lesion_channels, units[layer].out_channels))
        df, _ = lesion_layer(model, units[layer], cap.acts[layer], cap.target_of(layer), rows, chans, data,
                             replace=["hull", "all"], ridge=1e-3, device="cpu", graph=graph)
        res.lesioned += int(np.isfinite(df["loss_lesion"].to_numpy()).all())
    table = propagation_table(model, units, cap, axes, null_draws=2, seed=seed)
    res.propagation_pairs = int(table[["upstream", "downstream"]].drop_duplicates().shape[0]) if len(table) else 0
    res.propagation_refused = link_report(model, units)[1]

    t1 = time.perf_counter()
    x = torch.randn(1, 3, side, side, generator=g)
    try:
        groups = build_groups(model, x)
    except UserError as err:
        res.prune_error = str(err)
        res.prune_s = time.perf_counter() - t1
        return res
    res.prune_refused = dict(groups.refused)
    res.groups = len(groups.groups)
    res.linear_groups = sum(g.name in units and units[g.name].channels_last for g in groups.groups)
    cost = CostModel.build(model, groups, x)
    ctx = ScoreContext(model, conv_layers(model), axes_loader=lambda: axes, seed=seed)
    per_layer = resolve_score(score)(ctx, 0)
    alloc = make_allocation("global", groups, group_scores(groups, per_layer), 0.95)
    runs = True
    for target in targets:
        found = match_flops(alloc, cost, float(target), tolerance)
        pruned, _ = prune_physically(model, groups, keep_masks(alloc, found.counts), x)
        res.targets.append(float(target))
        res.achieved.append(fvcore_macs(pruned, x)[0] / cost.total)
        with torch.no_grad():
            out = pruned(data[0][0][:2])
        runs = runs and tuple(out.shape) == (2, 10) and bool(torch.isfinite(out).all())
    res.pruned_runs = runs
    res.prune_s = time.perf_counter() - t1
    return res
