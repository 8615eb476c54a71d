"""Pruning plots: accuracy vs retained / removed FLOPs (one line per score, coloured by axis as in the report)
and the two sweeps (FLOPs-AUC vs α for Magnitude+αI_X, vs β for I_X − βR̄_X)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from axes_pipeline.plotting import AXIS_CMAPS, AXIS_COLORS, axis_legend, save_figure
from axes_pipeline.pruning.summary import tuned_any

__all__ = ["KEPT_FRACTION_SCORES", "kept_fraction_targets", "plot_curves", "plot_kept_fraction", "plot_sweeps"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


MARKERS = "osv^DPX*<>hd"


def _styles(curves: pd.DataFrame) -> dict[str, tuple]:
    """score -> (colour, marker): one colour family per axis, shades and markers within it."""
    import matplotlib

    out = {}
    for axis, cmap_name in AXIS_CMAPS.items():
        names = list(dict.fromkeys(curves.loc[curves["axis"] == axis, "score"]))
        cmap = matplotlib.colormaps[cmap_name]
        for i, name in enumerate(names):
            out[name] = (cmap(0.4 + 0.55 * (i + 1) / (len(names) + 1)), MARKERS[i % len(MARKERS)])
    return out


def plot_curves(curves: pd.DataFrame, base: dict, out: Path) -> dict[str, Path]:
    """``prune_curves.png`` (and ``prune_curves_ft.png`` after fine-tuning)."""
    if curves.empty:
        return {}
    plt = _plt()
    styles = _styles(curves)
    made = {}
    for acc_col, stem in (("acc_before_ft", "prune_curves"), ("acc_after_ft", "prune_curves_ft")):
        if acc_col not in curves or curves[acc_col].isna().all() or (acc_col == "acc_after_ft" and not tuned_any(curves)):
            continue
        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        for name, df in curves.groupby("score", sort=False):
            axis = df["axis"].iloc[0]
            g = df.groupby("target_flops" if df["target_flops"].notna().any() else "target_channels")
            x = g["achieved_flops"].mean().to_numpy()
            y = g[acc_col].mean().to_numpy()
            sd = g[acc_col].std().to_numpy() if df["draw"].nunique() > 1 else None
            order = np.argsort(x)
            x, y = x[order], y[order]
            style = "--" if axis == "baseline" else "-"
            label = f"{name} ({axis})"
            colour, marker = styles.get(name, ("k", "o"))
            for ax, xs in ((axes[0], x), (axes[1], 1.0 - x)):
                ax.plot(xs, y, style, marker=marker, ms=4, color=colour, label=label, lw=1.5)
                if sd is not None:
                    sd_o = np.nan_to_num(sd[order])
                    ax.fill_between(xs, y - sd_o, y + sd_o, color=colour, alpha=0.15)
        for ax, xlabel in ((axes[0], "retained FLOPs (fraction of unpruned MACs)"),
                           (axes[1], "removed FLOPs (fraction of unpruned MACs)")):
            ax.axhline(base["acc"], color="k", lw=0.8, ls=":", label="unpruned")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test top-1 accuracy" + (" after fine-tune" if acc_col == "acc_after_ft" else ""))
            ax.grid(alpha=0.3)
        axes[0].invert_xaxis()
        axes[1].legend(fontsize=7, ncol=2, loc="lower left")
        fig.suptitle(f"one-shot FLOPs-matched pruning ({axis_legend()})")
        made[stem] = _save(fig, out / f"{stem}.png")
    return made


def plot_sweeps(summary: dict, out: Path) -> dict[str, Path]:
    """``prune_sweep_<family>.png``: FLOPs-AUC vs the family's parameter (0 = its anchor score)."""
    plt = _plt()
    made = {}
    for prefix, sweep in summary.get("sweeps", {}).items():
        pts = [p for p in sweep["points"] if p["flops_auc"] is not None and np.isfinite(p["flops_auc"])]
        if len(pts) < 2:
            continue
        fig, ax = plt.subplots(figsize=(5, 4))
        xs = [p["param"] for p in pts]
        ys = [p["flops_auc"] for p in pts]
        # the colour of the sweep's axis (its members' axis; the last point is always a member)
        ax.plot(xs, ys, "o-", color=AXIS_COLORS.get(summary["scores"][pts[-1]["score"]]["axis"], "k"))
        for p in pts:
            if p["param"] == 0.0:
                ax.annotate(p["score"], (p["param"], p["flops_auc"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_xlabel(sweep["symbol"])
        ax.set_ylabel("FLOPs-AUC (test top-1)")
        ax.set_title(sweep["label"])
        ax.grid(alpha=0.3)
        name = {"magnitude_plus_ix_a": "alpha", "ixy_minus_red_b": "beta", "two_axis_a1_b": "two_axis"}.get(prefix, prefix)
        made[f"sweep_{name}"] = _save(fig, out / f"prune_sweep_{name}.png")
    return made


#: beside the best local and best target score, the baseline every kept-fraction figure shows
KEPT_FRACTION_SCORES = ("taylor",)


def kept_fraction_targets(targets, n: int = 3) -> list[float]:
    """``n`` targets spread over the range swept (nearest 0.75, 0.5, 0.25 of the FLOPs kept), largest first."""
    ts = sorted({float(t) for t in targets}, reverse=True)
    picks = []
    for want in (0.75, 0.5, 0.25)[:n]:
        rest = [t for t in ts if t not in picks]
        if rest:
            picks.append(min(rest, key=lambda t: (abs(t - want), -t)))
    return sorted(picks, reverse=True)


def plot_kept_fraction(allocation: pd.DataFrame, summary: dict, out: Path, name: str = "kept_fraction.png"
                       ) -> dict[str, Path]:
    """``kept_fraction.png``: the kept fraction of every layer (depth on x) at three targets, for the best
    local and best target score (chosen on validation) and taylor, random draws averaged: where an
    allocation prunes (a global ranking that empties a late layer shows as a dip to the cap)."""
    if allocation.empty:
        return {}
    chosen = [b["score"] for b in (summary.get("best_local"), summary.get("best_target")) if b]
    present = list(dict.fromkeys(allocation["score"]))
    # no chosen score and no taylor among them (a sweep of baselines only): the first scores swept instead
    names = [n for n in dict.fromkeys([*chosen, *KEPT_FRACTION_SCORES]) if n in present] or present[:3]
    targets = kept_fraction_targets(allocation["target"].dropna().unique())
    plt = _plt()
    fig, axes = plt.subplots(1, len(targets), figsize=(4.6 * len(targets), 3.8), sharey=True, squeeze=False)
    styles = _styles(allocation[allocation["score"].isin(names)].drop_duplicates("score"))
    for ax, t in zip(axes[0], targets):
        at = allocation[np.isclose(allocation["target"].astype(float), t)]
        for score in names:
            d = at[at["score"] == score].groupby(["depth", "layer"], as_index=False)["kept_fraction"].mean()
            if d.empty:
                continue
            colour, marker = styles.get(score, ("k", "o"))
            role = " (best local)" if chosen[:1] == [score] else " (best target)" if chosen[1:2] == [score] else ""
            ax.plot(d["depth"], d["kept_fraction"], "-", marker=marker, ms=3, color=colour, label=f"{score}{role}")
        ax.set_title(f"{t:g} of the MACs kept")
        ax.set_xlabel("layer (depth order)")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction of channels kept")
    axes[0][-1].legend(fontsize=7, loc="lower left")
    label = (summary.get("protocol") or {}).get("label", "")
    fig.suptitle(f"where the allocation prunes{': ' + label if label else ''}")
    return {"kept_fraction": _save(fig, out / name)}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    return save_figure(fig, path)
