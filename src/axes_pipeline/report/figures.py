"""Report figures: pruning curves per group, the headline forest plot, alignment over depth, dynamics."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from axes_pipeline.plotting import AXIS_CMAPS, AXIS_COLORS, save_figure  # noqa: E402
from axes_pipeline.report.collect import Run  # noqa: E402
from axes_pipeline.stats import PAPER_REFERENCE  # noqa: E402

# Beside its colour (axes_pipeline.plotting) each axis has a line style, so the report reads in grey too.
AXIS_STYLES = {"local": "-", "target": "--", "mixed": "-.", "baseline": ":"}
AXIS_ORDER = tuple(AXIS_COLORS)
MARKERS = "osD^vP*X<>"


def score_styles(scores_by_axis: dict[str, list[str]], best: dict[str, str]) -> dict[str, dict]:
    """Line style of every score: colour shade and marker within its axis, the axis's line style,
    and a thick opaque line for the best score of the axis (``best``: axis → score)."""
    styles = {}
    for axis, scores in scores_by_axis.items():
        cmap = plt.get_cmap(AXIS_CMAPS.get(axis, "Greys"))
        shades = np.linspace(0.9, 0.45, max(1, len(scores))) if len(scores) > 1 else [0.75]
        for i, score in enumerate(scores):
            is_best = axis in ("local", "target") and best.get(axis) == score
            styles[score] = {"color": cmap(float(shades[i])), "ls": AXIS_STYLES.get(axis, "-"),
                             "marker": MARKERS[i % len(MARKERS)], "lw": 3.0 if is_best else 1.2,
                             "alpha": 1.0 if is_best else 0.8, "zorder": 3 if is_best else 2,
                             "label": f"{score} (best {axis})" if is_best else score}
    return styles


def pruning_curves(acc: pd.DataFrame, group: str, path: Path, ylabel: str = "accuracy (before fine-tuning)",
                   best: dict[str, str] | None = None) -> Path:
    """Accuracy against removed FLOPs, one named line per score (mean over seeds), the best score
    of each axis (``best``: axis → score) drawn thick with its ±SD band."""
    d = acc[acc.group == group]
    best = best or {}
    by_axis = {ax: sorted(d.loc[d["axis"] == ax, "score"].unique(), key=lambda s: (s != best.get(ax), s))
               for ax in sorted(d["axis"].unique(), key=lambda a: (AXIS_ORDER + (a,)).index(a))}
    styles = score_styles(by_axis, best)
    fig, ax = plt.subplots(figsize=(6.4, 3.9))
    for axis, scores in by_axis.items():
        for score in scores:
            c = d[(d["score"] == score) & (d["axis"] == axis)].sort_values("achieved_flops_mean")
            x, y = 1 - c["achieved_flops_mean"], c["acc_mean"]
            st = styles[score]     # colour, line style, marker, width, alpha, zorder, label
            ax.plot(x, y, ms=4, **st)
            emphasised = axis in ("local", "target") and best.get(axis) == score
            if emphasised and "acc_sd" in c and c["acc_sd"].notna().any():
                sd = c["acc_sd"].fillna(0)
                ax.fill_between(x, y - sd, y + sd, color=st["color"], alpha=0.15, lw=0, zorder=1)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
              title="score (line: axis)", title_fontsize=7)
    seeds = int(d["seeds"].max()) if "seeds" in d and len(d) else 0
    ax.set(xlabel="removed FLOPs fraction", ylabel=ylabel,
           title=f"{group}: mean over {seeds} seed(s); thick = best of its axis (±SD band)")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def headline_forest(head: pd.DataFrame, path: Path, min_seeds: int = 3, ci_label: str = "95% CI") -> Path:
    """The paired FLOPs-AUC difference (local − target) of every headline row with its CI,
    coloured by which side of 0 the CI lies."""
    import textwrap

    fig, ax = plt.subplots(figsize=(6.4, 0.9 + 0.55 * max(1, len(head))))
    y = np.arange(len(head))[::-1]
    for yi, (_, r) in zip(y, head.iterrows()):
        lo, hi = r.get("ci_lo", np.nan), r.get("ci_hi", np.nan)
        if np.isfinite(lo) and np.isfinite(hi):   # coloured by the CI: above 0 local, below 0 target, else gray
            col = AXIS_COLORS["local"] if lo > 0 else AXIS_COLORS["target"] if hi < 0 else "dimgray"
            ax.errorbar([r["diff"]], [yi], xerr=[[r["diff"] - lo], [hi - r["diff"]]], fmt="o", color=col,
                        capsize=4, lw=2, ms=6)
        else:
            ax.plot([r["diff"]], [yi], "o", mfc="white", color="gray", ms=6)
    ax.axvline(0, color="k", lw=0.8)
    one_group = head["group"].nunique() == 1     # then the group is in the title, not on every row
    ax.set_yticks(y, ["\n".join(textwrap.wrap(c if one_group else f"{g}: {c}", 40))
                      for g, c in zip(head["group"], head["comparison"])], fontsize=8)
    if one_group:
        ax.set_title(str(head["group"].iloc[0]), fontsize=9)
    ax.set_xlabel(f"FLOPs-AUC difference, local − target ({ci_label})", fontsize=8)
    handles = [plt.Line2D([], [], marker="o", ls="", color=AXIS_COLORS["local"], label="local better (CI > 0)"),
               plt.Line2D([], [], marker="o", ls="", color=AXIS_COLORS["target"], label="target better (CI < 0)"),
               plt.Line2D([], [], marker="o", ls="", color="dimgray", label="CI includes 0"),
               plt.Line2D([], [], marker="o", ls="", mfc="white", color="gray", label=f"no CI (< {min_seeds} seeds)")]
    ax.legend(handles=handles, fontsize=6.5, loc="best", framealpha=0.85)
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)


def alignment_depth(layers: pd.DataFrame, path: Path) -> Path:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    for g, d in layers.groupby("group"):
        d = d.sort_values("layer_index")
        for ax, col in ((a, "align_input_capture_task_info"), (b, "modularity_gap")):
            if f"{col}_mean" in d:
                m, s = d[f"{col}_mean"], d[f"{col}_sd"].fillna(0)
                ax.plot(d["layer_index"], m, marker="o", ms=3, label=g)
                ax.fill_between(d["layer_index"], m - s, m + s, alpha=0.2)
    a.set(xlabel="conv layer", ylabel="Spearman ρ(I_X, I_T)", title="axis alignment (mean ± SD over seeds)")
    b.set(xlabel="conv layer", ylabel="Q_R − Q_S", title="modularity gap (mean ± SD over seeds)")
    for ax in (a, b):
        ax.axhline(0, color="k", lw=0.5)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def dynamics_curves(groups: dict[str, list[Run]], path: Path) -> Path | None:
    quantities = ("align_input_capture_task_info", "modularity_gap", "hull_size_mean", "hull_saturated_frac", "s3_s2")
    found = False
    fig, axes = plt.subplots(1, len(quantities), figsize=(4 * len(quantities), 3.3))
    for g, runs in groups.items():
        frames = [f.assign(seed=r.seed) for r in runs if (f := r.read_csv("analyze/dynamics.csv")) is not None]
        if not frames:
            continue
        found = True
        per_seed = pd.concat(frames).groupby(["seed", "epoch"], as_index=False).mean(numeric_only=True)
        for ax, q in zip(axes, quantities):
            if q not in per_seed:
                continue
            st = per_seed.groupby("epoch")[q].agg(["mean", "std"]).reset_index()
            ax.plot(st["epoch"], st["mean"], marker="o", ms=3, label=g)
            ax.fill_between(st["epoch"], st["mean"] - st["std"].fillna(0), st["mean"] + st["std"].fillna(0), alpha=0.2)
            if q in PAPER_REFERENCE:
                (mi, si), (mt, stt) = PAPER_REFERENCE[q]["init"], PAPER_REFERENCE[q]["trained"]
                x0, x1 = st["epoch"].min(), st["epoch"].max()
                ax.errorbar([x0, x1], [mi, mt], yerr=[si, stt], fmt="s--", color="k", ms=4, capsize=3,
                            label="paper (init → trained)")
            ax.set(title=q, xlabel="epoch")
    if not found:
        plt.close(fig)
        return None
    axes[0].legend(fontsize=7)
    return save_figure(fig, path)
