"""Report figures: pruning curves per group, the headline forest plot, alignment over depth, dynamics."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from axes_pipeline.analyses.definitions import LABELS  # noqa: E402
from axes_pipeline.plotting import AXIS_CMAPS, AXIS_COLORS, save_figure  # noqa: E402
from axes_pipeline.report.collect import Run  # noqa: E402
from axes_pipeline.stats import PAPER_REFERENCE  # noqa: E402

# Beside its colour (axes_pipeline.plotting) each axis has a line style, so the report reads in grey too.
AXIS_STYLES = {"local": "-", "target": "--", "mixed": "-.", "baseline": ":"}
AXIS_ORDER = tuple(AXIS_COLORS)
MARKERS = "osD^vP*X<>"


#: drawn in full weight beside the best score of each axis: the references every reader looks for
REFERENCE_SCORES = ("taylor", "random")


def score_styles(scores_by_axis: dict[str, list[str]], best: dict[str, str]) -> dict[str, dict]:
    """Line style of every score: colour shade and marker within its axis, the axis's line style; the
    best score of each axis (``best``: axis → score) thick, the :data:`REFERENCE_SCORES` in full
    weight, every other score faded (a panel of 26 equal lines reads as none)."""
    styles = {}
    for axis, scores in scores_by_axis.items():
        cmap = plt.get_cmap(AXIS_CMAPS.get(axis, "Greys"))
        shades = np.linspace(0.9, 0.45, max(1, len(scores))) if len(scores) > 1 else [0.75]
        for i, score in enumerate(scores):
            is_best = axis in ("local", "target") and best.get(axis) == score
            full = is_best or score in REFERENCE_SCORES
            styles[score] = {"color": cmap(float(shades[i])), "ls": AXIS_STYLES.get(axis, "-"),
                             "marker": MARKERS[i % len(MARKERS)], "lw": 3.0 if is_best else 1.8 if full else 0.9,
                             "alpha": 1.0 if full else 0.35, "zorder": 3 if is_best else 2 if full else 1,
                             "label": f"{score} (best {axis})" if is_best else score}
    return styles


def pruning_curves(acc: pd.DataFrame, group: str, path: Path, ylabel: str = "accuracy (before fine-tuning)",
                   best: dict[str, str] | None = None, unpruned: float | None = None,
                   chance: float | None = None) -> Path:
    """Accuracy against removed FLOPs, one named line per score (mean over seeds), each starting at the
    unpruned network (0 removed FLOPs, ``unpruned``: the point the FLOPs-AUC starts from); the best score
    of each axis (``best``: axis → score) thick with its ±SD band; a chance line (``chance``) where the
    accuracy comes near it."""
    d = acc[acc.group == group]
    best = best or {}
    by_axis = {ax: sorted(d.loc[d["axis"] == ax, "score"].unique(), key=lambda s: (s != best.get(ax), s))
               for ax in sorted(d["axis"].unique(), key=lambda a: (AXIS_ORDER + (a,)).index(a))}
    styles = score_styles(by_axis, best)
    fig, ax = plt.subplots(figsize=(6.4, 3.9))
    start = unpruned is not None and np.isfinite(unpruned)
    for axis, scores in by_axis.items():
        for score in scores:
            c = d[(d["score"] == score) & (d["axis"] == axis)].sort_values("achieved_flops_mean")
            x, y = 1 - c["achieved_flops_mean"], c["acc_mean"]
            sd = c["acc_sd"].fillna(0) if "acc_sd" in c else pd.Series(0.0, index=c.index)
            if start:          # the unpruned network: every curve starts there, with no spread of its own
                x, y, sd = (pd.concat([pd.Series([0.0]), v.reset_index(drop=True)], ignore_index=True)
                            for v in (x, y, sd))
                y.iloc[0] = unpruned
                order = np.argsort(x.to_numpy(), kind="stable")
                x, y, sd = x.iloc[order], y.iloc[order], sd.iloc[order]
            st = styles[score]     # colour, line style, marker, width, alpha, zorder, label
            ax.plot(x, y, ms=4, **st)
            emphasised = axis in ("local", "target") and best.get(axis) == score
            if emphasised and "acc_sd" in c and c["acc_sd"].notna().any():
                ax.fill_between(x, y - sd, y + sd, color=st["color"], alpha=0.15, lw=0, zorder=1)
    if chance is not None and len(d) and float(d["acc_mean"].min()) <= 2 * chance:
        ax.axhline(chance, color="0.3", lw=0.8, ls=":", zorder=0)
        ax.annotate("chance", (1.0, chance), xycoords=("axes fraction", "data"), ha="right", va="bottom",
                    fontsize=7, color="0.3")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
              title="score (line: axis)", title_fontsize=7)
    seeds = int(d["seeds"].max()) if "seeds" in d and len(d) else 0
    ax.set(xlabel="removed FLOPs fraction", ylabel=ylabel,
           title=f"{group}: mean over {seeds} seed(s); thick = best of its axis (±SD band), faded = the rest")
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


#: the paper's training length (METHODS §10-§11): its "trained" values are after this many epochs
PAPER_EPOCHS = 100
PANELS_PER_ROW = 3


def dynamics_curves(groups: dict[str, list[Run]], path: Path) -> Path | None:
    """Each METHODS §6 quantity over the checkpointed epochs (mean ± SD over seeds), three panels a row,
    labelled with the paper's names. The paper's init and trained values are its endpoints only (it
    trained :data:`PAPER_EPOCHS` epochs): two markers at our first and last epoch, no line between."""
    quantities = tuple(LABELS)
    frames = {g: [f.assign(seed=r.seed) for r in runs if (f := r.read_csv("analyze/dynamics.csv")) is not None]
              for g, runs in groups.items()}
    frames = {g: f for g, f in frames.items() if f}
    if not frames:
        return None
    ncols = PANELS_PER_ROW
    nrows = -(-len(quantities) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.7 * ncols, 3.2 * nrows), squeeze=False)
    axes = axes.ravel()
    for ax in axes[len(quantities):]:
        ax.set_visible(False)
    for g, fs in frames.items():
        per_seed = pd.concat(fs).groupby(["seed", "epoch"], as_index=False).mean(numeric_only=True)
        for ax, q in zip(axes, quantities):
            if q not in per_seed:
                continue
            st = per_seed.groupby("epoch")[q].agg(["mean", "std"]).reset_index()
            ax.plot(st["epoch"], st["mean"], marker="o", ms=3, label=g)
            ax.fill_between(st["epoch"], st["mean"] - st["std"].fillna(0), st["mean"] + st["std"].fillna(0), alpha=0.2)
            if q in PAPER_REFERENCE:
                (mi, si), (mt, stt) = PAPER_REFERENCE[q]["init"], PAPER_REFERENCE[q]["trained"]
                x0, x1 = st["epoch"].min(), st["epoch"].max()
                ax.errorbar([x0, x1], [mi, mt], yerr=[si, stt], fmt="s", color="k", ms=5, capsize=3,
                            label=f"paper: init, after {PAPER_EPOCHS} epochs (endpoints only)")
    for ax, q in zip(axes, quantities):
        ax.set_title(LABELS[q], fontsize=11)
        ax.set_xlabel("epoch", fontsize=10)
        ax.tick_params(labelsize=9.5)
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:len(quantities)]:           # the paper's marker is in a later panel than ρ's
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    spare = axes[len(quantities)] if len(quantities) < len(axes) else None
    if spare is not None:          # the empty panel of the grid holds the legend
        spare.set_visible(True)
        spare.axis("off")
        spare.legend(handles, labels, fontsize=10, loc="center", frameon=False)
    else:
        axes[0].legend(handles, labels, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
