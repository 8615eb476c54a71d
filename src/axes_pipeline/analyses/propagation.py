"""Cross-layer propagation (METHODS §7, H3): does a channel's axis value come from its inputs?

For every **direct link** ℓ → ℓ+1 between two conv layers (the input channels of conv ℓ+1 *are*
the output channels of unit ℓ):

- influence ``A[j, i] = Σ_kernel |W_{ℓ+1}[j, i]| · σ_i^post``, row-normalised per receiving
  channel j (:func:`influence_matrix`); σ^post is the upstream channel's post-norm standard
  deviation (:func:`post_norm_sigma`);
- routed upstream metric ``m̃_j = Σ_i A[j, i] · m_i`` (:func:`routed`);
- Spearman ρ(m̃, m') across the receiving channels for the four pairings of
  :data:`PAIRINGS` (m, m' ∈ {I_X, I_T}), and a shuffled-weights null: the same ρ with each
  receiving channel's kernel weights |W| reassigned to random upstream channels (its own weights
  kept, which upstream channel carries which one shuffled), averaged over seeded draws
  (:func:`pair_propagation`).

Which pairs are linked is read off the ``torch.fx`` trace of :mod:`axes_pipeline.models.graph`
(:func:`conv_links`): from each conv's input walk backwards through ops that keep every channel
separate (norms, elementwise activations, pooling, dropout, permutes, identity) to the conv that
produced it. Consequences:

- **residual links follow the main branch** (``propagation.residual=main``, the default, METHODS §7:
  "consecutive" includes links across a residual add): a receiver behind an add is linked to the
  last conv of the add's first summand that reaches one, i.e. the block's main branch, and the
  other summand (the shortcut) is ignored. In ResNet-18 that gives 19 linked pairs: the stem →
  ``layer1.0.conv1``, each block's ``conv1`` → ``conv2`` (8), and each block's ``conv2`` → every
  conv that reads that block's output (7 next-block ``conv1`` and 3 shortcut convs); shortcut convs
  are never upstream. ``residual=skip`` is the narrower within-block linking (9 ResNet-18 pairs):
  a walk that meets an add stops, because the receiving conv then reads the *sum* of two branches.
  VGG: every consecutive pair. MobileNetV2: expand → depthwise is skipped (see below), depthwise →
  project, and project → next expand (with ``skip``, only where that block has no residual add
  before it).
- **depthwise / grouped receivers are skipped**: a depthwise channel reads one upstream channel,
  so A is the identity and ρ would only restate the upstream metric. A depthwise conv *upstream*
  (MobileNetV2's depthwise → project) is kept: its channels are ordinary channels.
- **concatenations** (DenseNet, GoogLeNet, Inception) are followed: each concatenated upstream
  conv is linked with the slice of the receiver's kernel that reads its channels (its offset in
  the concatenation; :func:`link_report`); **squeeze-and-excitation** products ``x * gate(x)``
  (EfficientNet, MobileNetV3, RegNetY) are followed through ``x``.
- a receiver that cannot be linked (grouped/depthwise, a channel split or shuffle, an op that
  mixes channels, channel counts that do not add up) is listed with its one-line reason in
  ``propagation_refused.csv``; pairs where either layer was not captured (``capture.layers``)
  are left out.
- When the model cannot be traced, consecutive units in forward order are paired where the
  upstream is not residual, the receiver is not grouped and the channel counts match (logged).

σ^post from the captured pre-BN samples: a BatchNorm in eval mode is affine per channel, so
``σ_post = |γ|·σ_pre / sqrt(running_var + eps)`` exactly. A LayerNorm/GroupNorm divides all
channels of a sample by one shared scale, which the row normalisation of A removes:
``σ_post ∝ |γ|·σ_pre``. No norm: ``σ_pre``. With ``capture.point=post_bn`` the captured std is
σ_post itself; with ``post_act`` the post-activation std is used (what the next conv reads).

Dead receiving channels and receivers with zero total influence are left out of ρ.
Outputs: ``propagation.csv`` (one row per linked pair and pairing), ``plots/propagation.png``.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from axes_pipeline.analyses import plots
from axes_pipeline.analyses.registry import analysis
from axes_pipeline.analyses.settings import PropagationAnalysis
from axes_pipeline.errors import UserError
from axes_pipeline.models import conv_norm_pairs
from axes_pipeline.models.graph import conv_sources, trace
from axes_pipeline.runs import write_csv
from axes_pipeline.stats import spearman

log = logging.getLogger("axes_pipeline")

#: (pairing name, upstream metric m, downstream metric m')
PAIRINGS: tuple[tuple[str, str, str], ...] = (
    ("local_to_local", "input_capture", "input_capture"),
    ("target_to_target", "task_info", "task_info"),
    ("local_to_target", "input_capture", "task_info"),
    ("target_to_local", "task_info", "input_capture"),
)
#: ``weights``: each receiver's kernel weights reassigned to random upstream channels (per row);
#: ``columns``: one permutation of A's columns shared by all receivers (= shuffled upstream labels).
NULL_MODES = ("weights", "columns")
RESIDUAL_MODES = ("main", "skip")
#: METHODS §7 links across residual adds; conf/analysis/propagation.yaml repeats this value.
DEFAULT_RESIDUAL = "main"


# ---- Which conv feeds which ------------------------------------------------------------------


def link_report(model: nn.Module, units: dict | None = None, residual: str = DEFAULT_RESIDUAL
                ) -> tuple[list[tuple[str, str, int]], list[tuple[str, str]]]:
    """``(links, refused)``: ``links = [(upstream, downstream, offset)]`` where the upstream conv's channels are
    the downstream conv's input channels ``offset .. offset + C_up`` (0 unless a concatenation sits between them);
    ``refused = [(downstream, reason)]`` for every analysed conv but the first with no link (never a silent skip)."""
    if units is None:
        units = conv_norm_pairs(model)
    graph = trace(model)
    if graph is None:  # pair consecutive layers instead
        names = list(units)
        links = [(up, down, 0) for up, down in zip(names, names[1:])
                 if not units[up].residual and units[down].groups == 1
                 and units[down].in_channels == units[up].out_channels]
        linked = {d for _, d, _ in links}
        return links, [(d, f"torch.fx cannot trace {type(model).__name__}; consecutive layers only")
                       for d in list(units)[1:] if d not in linked]
    links: list[tuple[str, str, int]] = []
    refused: list[tuple[str, str]] = []
    for down, segs in conv_sources(model, graph, units, residual):
        dconv = units[down]   # a conv or a channels-last Linear (ConvUnit reads either)
        if dconv.groups != 1:   # A would be (block) diagonal: ρ would restate the upstream metric
            refused.append((down, f"grouped/depthwise receiver (groups={dconv.groups})"))
            continue
        if segs is None:  # the network input
            continue
        if isinstance(segs, str):
            refused.append((down, f"its input passes {segs}"))
            continue
        if sum(c for _, _, c in segs) != dconv.in_channels:
            refused.append((down, f"upstream channels ({sum(c for _, _, c in segs)}) != its input channels "
                                  f"({dconv.in_channels})"))
            continue
        kept = [(u, down, o) for u, o, _ in segs if u in units]
        if not kept:
            refused.append((down, "none of its upstream convs is analysed (capture.layers)"))
        for link in kept:
            if link not in links:
                links.append(link)
    return links, refused


def conv_links(model: nn.Module, units: dict | None = None, residual: str = DEFAULT_RESIDUAL) -> list[tuple[str, str]]:
    """``[(upstream, downstream)]`` conv names joined by a direct data-flow link, forward order, among
    ``units`` (default: every conv unit); the module docstring says what counts as a link."""
    links, _ = link_report(model, units, residual)
    return list(dict.fromkeys((u, d) for u, d, _ in links))


# ---- Influence and routing -------------------------------------------------------------------


def post_norm_sigma(unit, sigma: torch.Tensor, point: str = "pre_bn") -> torch.Tensor:
    """σ^post ``[C]`` of unit ℓ's output channels from the std ``sigma: [C]`` of its captured samples,
    measured at ``point`` (``capture.point``; only ``pre_bn`` is converted)."""
    sigma = sigma.double()
    norm = unit.norm
    if point != "pre_bn" or norm is None:
        return sigma
    gamma = getattr(norm, "weight", None)
    g = gamma.detach().double().abs() if gamma is not None else torch.ones_like(sigma)
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        if norm.track_running_stats and norm.running_var is not None:
            return g * sigma / torch.sqrt(norm.running_var.detach().double() + norm.eps)
        return g * sigma / torch.sqrt(sigma**2 + norm.eps)      # batch statistics: ≈ |γ|
    return g * sigma    # LayerNorm / GroupNorm: a scale shared by the channels, removed by row-normalising


def _kernel_abs(weight: torch.Tensor) -> torch.Tensor:
    """Σ_kernel |W[j, i]|: ``[C_out, C_in]`` from a conv weight ``[C_out, C_in, kh, kw]``."""
    w = weight.detach().double().abs()
    return w.flatten(2).sum(2) if w.ndim > 2 else w


def _row_normalise(a: torch.Tensor) -> torch.Tensor:
    s = a.sum(-1, keepdim=True)
    return torch.where(s > 0, a / s.clamp_min(1e-300), torch.zeros_like(a))


def influence_matrix(weight: torch.Tensor, sigma_post: torch.Tensor) -> torch.Tensor:
    """``A [C_out, C_in]``: Σ_kernel |W[j, i]| · σ_i^post, each row summing to 1 (0 when empty)."""
    w = _kernel_abs(weight)
    if w.shape[1] != sigma_post.numel():
        raise ValueError(f"weight has {w.shape[1]} input channels, sigma_post {sigma_post.numel()}")
    return _row_normalise(w * sigma_post.double()[None, :])


def routed(a: torch.Tensor, m) -> np.ndarray:
    """m̃ = A m: ``[C_out]`` from ``a: [..., C_out, C_in]`` and ``m: [C_in]``; NaN for an empty row."""
    m = torch.from_numpy(np.array(m, dtype=np.float64))
    out = a @ m
    return torch.where(a.sum(-1) > 0, out, torch.full_like(out, math.nan)).numpy()


def _null_matrices(weight: torch.Tensor, sigma_post: torch.Tensor, draws: int, mode: str, seed: int) -> torch.Tensor:
    """``[draws, C_out, C_in]`` influence matrices with shuffled wiring (see :data:`NULL_MODES`)."""
    w = _kernel_abs(weight)
    C_out, C_in = w.shape
    gen = torch.Generator().manual_seed(int(seed))
    if mode == "weights":       # each receiver's weights go to random upstream channels
        perm = torch.rand(draws, C_out, C_in, generator=gen).argsort(-1)
        w = torch.gather(w.expand(draws, C_out, C_in), 2, perm)
        return _row_normalise(w * sigma_post.double()[None, None, :])
    if mode != "columns":       # the analysis checks it first; a direct caller gets the same line
        raise UserError(f"unknown propagation.null_mode {mode!r}; choose one of: {', '.join(NULL_MODES)}")
    a = influence_matrix(weight, sigma_post)   # one column permutation of A per draw
    perm = torch.stack([torch.randperm(C_in, generator=gen) for _ in range(draws)])
    return a[:, perm].permute(1, 0, 2)


def pair_propagation(weight: torch.Tensor, sigma_post: torch.Tensor, up: dict, down: dict, *, null_draws: int = 20,
                     null: str = "weights", seed: int = 0, down_alive=None) -> list[dict]:
    """The four pairings of one linked pair, one dict each: ``pairing, rho, null_rho`` (mean over draws),
    ``null_sd``, ``n`` (receivers in ρ). ``weight``: conv ℓ+1's ``[C_out, C_in, kh, kw]``; ``sigma_post: [C_in]``;
    ``up`` / ``down``: {metric: ``[C_in]`` / ``[C_out]``} holding ``input_capture`` and ``task_info``."""
    a = influence_matrix(weight, sigma_post)
    alive = np.ones(a.shape[0], bool) if down_alive is None else np.asarray(down_alive, bool)
    nulls = _null_matrices(weight, sigma_post, int(null_draws), null, seed) if null_draws > 0 else None

    def rho(tilde, target):   # over the receivers alive and reached (a finite routed value)
        keep = alive & np.isfinite(tilde)
        return spearman(tilde[keep], target[keep])[0], int(keep.sum())

    rows = []
    for name, m_key, d_key in PAIRINGS:
        target = np.asarray(down[d_key], float)
        observed, n = rho(routed(a, up[m_key]), target)
        draws = routed(nulls, up[m_key]) if nulls is not None else []   # [draws, C_out]
        null_rhos = np.asarray([rho(t, target)[0] for t in draws], float)
        ok = null_rhos[np.isfinite(null_rhos)]
        rows.append({"pairing": name, "rho": observed, "null_rho": float(ok.mean()) if ok.size else math.nan,
                     "null_sd": float(ok.std(ddof=1)) if ok.size > 1 else math.nan, "n": n})
    return rows


# ---- The analysis ----------------------------------------------------------------------------


def _knobs(block: PropagationAnalysis) -> dict:
    return {"null_draws": block.null_draws, "null": block.null_mode, "seed": block.seed, "residual": block.residual}


def check_propagation_analysis(ctx, block: PropagationAnalysis) -> None:
    """Knobs and that at least one linked pair was selected, before anything runs."""
    k = _knobs(block)
    if k["null"] not in NULL_MODES:
        raise UserError(f"unknown propagation.null_mode {k['null']!r}; choose one of: {', '.join(NULL_MODES)}")
    if k["residual"] not in RESIDUAL_MODES:
        raise UserError(f"unknown propagation.residual {k['residual']!r}; choose one of: {', '.join(RESIDUAL_MODES)}")
    if k["null_draws"] < 0:
        raise UserError(f"propagation.null_draws must be >= 0, got {k['null_draws']}")
    if not conv_links(ctx.trained.model, ctx.units, k["residual"]) and ctx.knobs.capture.layers is not None:
        raise UserError("propagation needs two directly linked conv layers (e.g. layer1.0.conv1 and layer1.0.conv2), "
                        "but capture.layers selects none; add the pair or use capture.layers=null")


def propagation_table(model, units: dict, capture, axes: pd.DataFrame, *, null_draws: int = 20,
                      null: str = "weights", seed: int = 0, residual: str = DEFAULT_RESIDUAL) -> pd.DataFrame:
    """One row per linked pair and pairing: ``upstream, downstream, pair_index, pairing, rho,
    null_rho, null_sd, n``, from the capture's channel SDs and the per-channel ``axes`` table."""
    point = capture.knobs.get("point", "pre_bn")
    order = {n: i for i, n in enumerate(units)}
    rows = []
    links, _ = link_report(model, units, residual)
    for p, (up, down, offset) in enumerate(links):
        if up not in capture.layers or down not in capture.layers:
            continue
        weight = units[down].weight[:, offset:offset + units[up].out_channels]   # conv layout, Linear too
        ua = axes[axes.layer == up].sort_values("channel")
        da = axes[axes.layer == down].sort_values("channel")
        s_post = post_norm_sigma(units[up], capture.channel_sd(up), point)
        for r in pair_propagation(weight, s_post, {k: ua[k].to_numpy() for k in ("input_capture", "task_info")},
                                  {k: da[k].to_numpy() for k in ("input_capture", "task_info")},
                                  null_draws=null_draws, null=null, seed=seed + p,
                                  down_alive=~da["dead"].astype(bool).to_numpy()):
            rows.append({"upstream": up, "downstream": down, "pair_index": p, "upstream_index": order[up], **r})
    cols = ["upstream", "downstream", "pair_index", "upstream_index", "pairing", "rho", "null_rho", "null_sd", "n"]
    return pd.DataFrame(rows, columns=cols)


def headline(table: pd.DataFrame) -> dict:
    out = {"pairs": int(table[["upstream", "downstream"]].drop_duplicates().shape[0]) if len(table) else 0}
    for name, _, _ in PAIRINGS:
        d = table[table.pairing == name]
        out[f"{name}_rho"] = float(d.rho.mean()) if d.rho.notna().any() else None
        out[f"{name}_null_rho"] = float(d.null_rho.mean()) if d.null_rho.notna().any() else None
    return out


def heatmap(table: pd.DataFrame, path):
    """Pairings × linked pairs (depth order): ρ, and ρ minus its shuffled null."""
    import matplotlib.pyplot as plt

    pairs = table[["pair_index", "upstream", "downstream"]].drop_duplicates().sort_values("pair_index")
    names = [p for p, _, _ in PAIRINGS]
    rho = table.pivot(index="pairing", columns="pair_index", values="rho").reindex(names)
    gap = (table.assign(d=table.rho - table.null_rho)
           .pivot(index="pairing", columns="pair_index", values="d").reindex(names))
    labels = [f"{u}→{d}" for u, d in zip(pairs.upstream, pairs.downstream)]
    n = len(labels)
    fig, axs = plt.subplots(2, 1, figsize=(max(6, 0.45 * n + 2.5), 6.2), squeeze=False)
    for ax, mat, title in ((axs[0, 0], rho, "Spearman ρ(routed m, m')"),
                           (axs[1, 0], gap, "ρ − shuffled-weights null")):
        im = ax.imshow(mat.to_numpy(float), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        ax.set_yticks(range(len(names)), [s.replace("_to_", "→") for s in names], fontsize=8)
        ax.set_xticks(range(n), labels if ax is axs[1, 0] else [""] * n, rotation=90, fontsize=6)
        ax.set_title(title, fontsize=9)
        for (i, j), v in np.ndenumerate(mat.to_numpy(float)):
            if np.isfinite(v) and n <= 40:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5.5)
        fig.colorbar(im, ax=ax, shrink=0.8)
    axs[1, 0].set_xlabel("linked conv pair (upstream → downstream), by depth")
    return plots.save_figure(fig, path)


@analysis("propagation", check=check_propagation_analysis)
def run_propagation_analysis(ctx, block: PropagationAnalysis) -> dict:
    """``propagation.csv``, ``plots/propagation.png`` and tracker logs; returns mean ρ per pairing,
    the number of linked pairs analysed (``pairs``) and the linking rule (``residual``)."""
    k = _knobs(block)
    table = propagation_table(ctx.trained.model, ctx.units, ctx.capture, ctx.axes, **k)
    write_csv(ctx.out / "propagation.csv", table)
    _, refused = link_report(ctx.trained.model, ctx.units, k["residual"])
    write_csv(ctx.out / "propagation_refused.csv", pd.DataFrame(refused, columns=["downstream", "reason"]))
    if refused:
        log.warning("propagation: %d conv layers have no linked upstream (propagation_refused.csv), e.g. %s: %s",
                    len(refused), *refused[0])
    # ρ averaged over 9 or 19 ResNet-18 pairs are different results: the count and the rule travel
    # with every H3 number (METHODS §7).
    head = {**headline(table), "residual": k["residual"]}
    if table.empty:
        log.warning("propagation: %s has no directly linked conv pairs (all links pass residual adds "
                    "or end in depthwise convs); propagation.csv is empty", type(ctx.trained.model).__name__)
        return head
    if ctx.knobs.plots:
        ctx.tracker.image("analyze/propagation", heatmap(table, ctx.out / "plots" / "propagation.png"))
    ctx.tracker.table("analyze/propagation", table)
    line = "propagation over {} linked pairs (residual={}): ".format(head["pairs"], k["residual"]) + ", ".join(
        f"{p} ρ={head[f'{p}_rho']:.3f} (null {head[f'{p}_null_rho']:.3f})" for p, _, _ in PAIRINGS
        if head[f"{p}_rho"] is not None and head[f"{p}_null_rho"] is not None)
    print("analyze: " + line)      # once: a log.info of the same line printed it twice on the console
    return head
