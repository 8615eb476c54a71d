"""Figures of the analysis stage (PNG, written atomically). Matplotlib without a display."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from axes_pipeline.plotting import save_figure  # noqa: E402


def scatter_ix_it(axes_df: pd.DataFrame, path: Path, max_panels: int = 24) -> Path:
    """Per layer: input capture vs task information, coloured by hull score."""
    layers = list(dict.fromkeys(axes_df["layer"]))
    if len(layers) > max_panels:  # keep a depth-spaced selection readable
        layers = [layers[i] for i in np.linspace(0, len(layers) - 1, max_panels).round().astype(int)]
    cols = min(6, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, grid = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.4 * rows), squeeze=False)
    for ax, layer in zip(grid.flat, layers):
        d = axes_df[(axes_df["layer"] == layer) & ~axes_df["dead"].astype(bool)]
        sc = ax.scatter(d["input_capture"], d["task_info"], c=d["hull_score"], s=8, cmap="viridis")
        ax.set_title(layer, fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(grid.flat)[len(layers):]:
        ax.axis("off")
    fig.supxlabel("input_capture  I_X")
    fig.supylabel("task_info  I_T")
    fig.colorbar(sc, ax=grid, shrink=0.6, label="hull_score")
    return save_figure(fig, path)


def depth_profile(layers_df: pd.DataFrame, path: Path) -> Path:
    """Alignment (three pairings) and modularity gap (with its shuffled null) over depth."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    x = layers_df["layer_index"]
    for col, label in (("align_input_capture_task_info", "ρ(I_X, I_T)"),
                       ("align_peer_overlap_target_excess", "ρ(R̄_X, S)"),
                       ("align_hull_score_task_unique", "ρ(hull score, U_T)")):
        a.plot(x, layers_df[col], marker="o", ms=3, label=label)
    a.axhline(0, color="k", lw=0.5)
    a.set(xlabel="conv layer (depth)", ylabel="Spearman ρ", title="axis alignment")
    a.legend(fontsize=7)
    if "modularity_gap" in layers_df:
        b.plot(x, layers_df["modularity_gap"], marker="o", ms=3, label="Q_R − Q_S")
        if "null_modularity_gap" in layers_df:
            b.plot(x, layers_df["null_modularity_gap"], ls="--", color="gray", label="shuffled null")
        b.axhline(0, color="k", lw=0.5)
        b.set(xlabel="conv layer (depth)", ylabel="modularity gap", title="R-graph vs S-graph")
        b.legend(fontsize=7)
    return save_figure(fig, path)


def communities(matrices: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], path: Path) -> Path:
    """For a few layers: R_X and S matrices, both ordered by the R-graph communities."""
    n = len(matrices)
    fig, grid = plt.subplots(n, 2, figsize=(7, 3.2 * n), squeeze=False)
    for (layer, (r_x, s, labels)), (a, b) in zip(matrices.items(), grid):
        order = np.argsort(labels, kind="stable")
        for ax, m, title in ((a, r_x, "R-graph  R_X(i,j)"), (b, s, "S-graph  S_ij")):
            mm = m[np.ix_(order, order)]
            vmax = np.quantile(mm[mm > 0], 0.95) if (mm > 0).any() else 1.0
            ax.imshow(mm, cmap="magma", vmin=0, vmax=vmax)
            ax.set_title(f"{layer}: {title}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("channels ordered by R-graph community", fontsize=9)
    return save_figure(fig, path)


def linear_gaussian(study: pd.DataFrame, path: Path) -> Path:
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
    a.plot(study["step"], study["rho_axes"], marker="o", ms=3)
    a.set(xlabel="gradient step", ylabel="Spearman ρ(I_X, I_T)", title="axes separate with training")
    a2 = a.twinx()
    a2.plot(study["step"], study["loss_ratio"], color="gray", ls="--")
    a2.set_ylabel("MSE / Var T", color="gray")
    b.plot(study["step"], study["cos_euclid"], label="|cos| Euclidean")
    b.plot(study["step"], study["cos_whitened"], label="|cos| whitened (≈0)")
    b.set(xlabel="gradient step", ylabel="cos(Σ_X w, g_T)", title="residualised task gradient")
    b.legend(fontsize=7)
    return save_figure(fig, path)
