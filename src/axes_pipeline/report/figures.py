"""Report figures: pruning curves per group, the headline forest plot, alignment over depth, dynamics."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from axes_pipeline.report.collect import Run  # noqa: E402
from axes_pipeline.stats import PAPER_REFERENCE  # noqa: E402
from axes_pipeline.runs import atomic_path  # noqa: E402

AXIS_COLORS = {"local": "tab:blue", "target": "tab:red", "mixed": "tab:purple", "baseline": "tab:gray"}


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def pruning_curves(acc: pd.DataFrame, group: str, path: Path, ylabel: str = "accuracy (before fine-tuning)") -> Path:
    d = acc[acc.group == group]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (score, axis), c in d.groupby(["score", "axis"]):
        c = c.sort_values("achieved_flops_mean")
        ax.plot(1 - c["achieved_flops_mean"], c["acc_mean"], color=AXIS_COLORS.get(axis, "k"), alpha=0.75,
                lw=1.2, label=f"{score}")
    handles = [plt.Line2D([], [], color=c, label=a) for a, c in AXIS_COLORS.items() if a in set(d["axis"])]
    ax.legend(handles=handles, title="axis", fontsize=8)
    ax.set(xlabel="removed FLOPs fraction", ylabel=ylabel, title=f"{group}: mean over seeds")
    return _save(fig, path)


def headline_forest(head: pd.DataFrame, path: Path, min_seeds: int = 3) -> Path:
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * max(1, len(head))))
    y = np.arange(len(head))
    ok = head["ci_lo"].notna()
    ax.errorbar(head["diff"][ok], y[ok], xerr=[(head["diff"] - head["ci_lo"])[ok], (head["ci_hi"] - head["diff"])[ok]],
                fmt="o", color="tab:blue", capsize=3)
    ax.plot(head["diff"][~ok], y[~ok], "o", color="gray", label=f"CI not possible (< {min_seeds} seeds)")
    ax.axvline(0, color="k", lw=0.7)
    ax.set_yticks(y, [f"{g}\n{c}" for g, c in zip(head["group"], head["comparison"])], fontsize=7)
    ax.set_xlabel("FLOPs-AUC difference (local − target), paired bootstrap 95% CI")
    if (~ok).any():
        ax.legend(fontsize=7)
    return _save(fig, path)


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
    return _save(fig, path)


def dynamics_curves(groups: dict[str, list[Run]], path: Path) -> Path | None:
    quantities = ("align_input_capture_task_info", "modularity_gap", "hull_size_mean", "hull_saturated_frac", "s3_s2")
    ref = {"hull_size_mean": "hull_size_mean", "hull_saturated_frac": "hull_saturated_frac", "s3_s2": "s3_s2"}
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
            if q in ref:
                (mi, si), (mt, stt) = PAPER_REFERENCE[ref[q]]["init"], PAPER_REFERENCE[ref[q]]["trained"]
                x0, x1 = st["epoch"].min(), st["epoch"].max()
                ax.errorbar([x0, x1], [mi, mt], yerr=[si, stt], fmt="s--", color="k", ms=4, capsize=3,
                            label="paper (init → trained)")
            ax.set(title=q, xlabel="epoch")
    if not found:
        plt.close(fig)
        return None
    axes[0].legend(fontsize=7)
    return _save(fig, path)
