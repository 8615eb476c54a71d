"""What a sweep's points add up to: ``prune_curves.csv`` (one row per point), ``prune_summary.json``
(FLOPs-AUC per score, the best local / target score, axis means, the α / β sweeps, ``curves_sha256``),
written together; the same numbers for the tracker and the terminal.

Selection and measurement (METHODS §9): every "best" (best local / target score, the best α / β
of a sweep) is chosen on the validation split's FLOPs-AUC; the test FLOPs-AUC of the chosen score
is what is reported. Every FLOPs-AUC is taken over one removed-FLOPs grid shared by all scores
(:func:`axes_pipeline.stats.grid_aucs`).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from axes_pipeline.pruning.resolved import PruneSettings
from axes_pipeline.pruning.scores import AXES, FAMILIES
from axes_pipeline.runs import atomic_path, json_default
from axes_pipeline.stats import grid_aucs

__all__ = ["ALLOCATION_COLUMNS", "AUC_KEYS", "CURVE_COLUMNS", "allocation_frame", "curves_frame", "flat_scalars",
           "log_curves", "print_summary", "summarise", "tuned_any", "write_stage"]

#: the split every "best" is chosen on, and the one its reported accuracy is measured on
SELECTION_SPLIT, MEASUREMENT_SPLIT = "val", "test"


CURVE_COLUMNS = ["score", "axis", "draw", "family", "param", "mode", "allocation", "target_flops", "target_channels",
                 "achieved_flops", "achieved_flops_analytic", "macs", "matched", "channels_frac", "params_frac",
                 "acc_before_ft", "val_acc_before_ft", "acc_after_ft", "val_acc_after_ft", "top5", "loss", "val_loss",
                 "top5_after_ft", "loss_after_ft", "val_loss_after_ft", "latency_ms"]


def tuned_any(curves: pd.DataFrame) -> bool:
    """Whether any point was fine-tuned (``finetune_epochs > 0``; a budget of 0 writes ``acc_after_ft`` =
    ``acc_before_ft``, so its "after" curves would repeat the "before" ones). Points written before the
    budget column: yes (they hold ``acc_after_ft`` only when fine-tuned)."""
    if "finetune_epochs" not in curves:
        return True
    return bool((curves["finetune_epochs"].fillna(1) > 0).any())


def curves_frame(records: list[dict]) -> pd.DataFrame:
    """``prune_curves.csv``: one row per point (the validated records of this sweep, in order)."""
    # the per-group and per-layer detail is layer_allocation.csv's
    skip = ("group_kept", "fingerprint", "layer_widths", "layer_macs")
    df = pd.DataFrame([{k: v for k, v in r.items() if k not in skip} for r in records])
    return df.reindex(columns=CURVE_COLUMNS + [c for c in df.columns if c not in CURVE_COLUMNS])   # missing: NaN


#: layer_allocation.csv: where each point's allocation pruned (one row per point and analysable layer, in depth
#: order). ``channels``: the unpruned width, ``kept``: the pruned network's, ``macs_share``: the layer's share of
#: the pruned network's MACs (fvcore; empty with ``pruning.fvcore_check=false``)
ALLOCATION_COLUMNS = ["score", "axis", "draw", "target", "depth", "layer", "channels", "kept", "kept_fraction",
                      "macs_share"]


def allocation_frame(records: list[dict], groups, channels: dict[str, int]) -> pd.DataFrame:
    """``layer_allocation.csv`` from the points' records: ``channels`` are the unpruned widths ``{layer: C}``
    in depth order. A record carries its pruned widths (``layer_widths``); an older one only its groups' kept
    counts, from which every conv of a group keeps as many as its group."""
    rows = []
    for r in records:
        kept = r.get("layer_widths")
        if not kept:
            kept = dict(channels)
            for g in groups.groups:
                if g.name in (r.get("group_kept") or {}):
                    kept.update(dict.fromkeys(g.convs, int(r["group_kept"][g.name])))
        macs, total = r.get("layer_macs") or {}, r.get("macs")
        target = r.get("target_flops") if r.get("target_flops") is not None else r.get("target_channels")
        for depth, (layer, c) in enumerate(channels.items()):
            k = int(kept.get(layer, c))
            rows.append({"score": r["score"], "axis": r.get("axis"), "draw": int(r.get("draw", 0)), "target": target,
                         "depth": depth, "layer": layer, "channels": int(c), "kept": k, "kept_fraction": k / c,
                         "macs_share": macs[layer] / total if layer in macs and total else None})
    return pd.DataFrame(rows, columns=ALLOCATION_COLUMNS)


#: the AUC keys of the summary and the curve column each integrates (test = measured, val = chooses)
AUC_KEYS = {"flops_auc": "acc_before_ft", "val_flops_auc": "val_acc_before_ft",
            "flops_auc_ft": "acc_after_ft", "val_flops_auc_ft": "val_acc_after_ft"}


def _mean_or_none(values) -> float | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def summarise(curves: pd.DataFrame, base: dict, settings: PruneSettings, groups, score_timing: dict,
              config: dict, scores: list | None = None) -> dict:
    """FLOPs-AUC per score over one shared removed-FLOPs grid (validation and test), the best local
    and best target score chosen on validation (their test AUC reported), axis means, sweeps.
    ``scores``: every score of the protocol's curves (default: this run's ``settings.scores``)."""
    base_acc = float(base["acc"])
    base_val = base.get("val_acc")
    has_val = bool(base.get("n_val")) and base_val is not None
    keys = ["flops_auc", "val_flops_auc"] + (["flops_auc_ft", "val_flops_auc_ft"] if settings.finetune else [])
    keys = [k for k in keys if has_val or not k.startswith("val_")]
    unpruned = {"acc_before_ft": base_acc, "acc_after_ft": base_acc, "val_acc_before_ft": base_val,
                "val_acc_after_ft": base_val}
    res = grid_aucs(curves, [AUC_KEYS[k] for k in keys], lambda _k: unpruned, mode=settings.mode,
                    tolerance=settings.tolerance, by=("score", "draw"), targets=settings.targets)
    per_score = {}
    for score in scores or settings.scores:
        df = curves[curves["score"] == score.name]
        entry = {"axis": score.axis, "family": score.family, "param": score.param, "points": int(len(df))}
        draws = [k for k in res["aucs"] if k[0] == score.name]
        for key in keys:
            aucs = [res["aucs"][k][AUC_KEYS[key]] for k in draws]
            mean = _mean_or_none(aucs)
            ref = base_val if key.startswith("val_") else base_acc
            entry[key] = mean
            entry[f"{key}_rel"] = mean / ref if mean is not None and ref else None
            if score.stochastic:
                got = [float(a) for a in aucs if a is not None]
                entry[f"{key}_draws"] = got
                entry[f"{key}_sd"] = float(np.std(got, ddof=1)) if len(got) > 1 else None
        why = [res["no_auc"][k] for k in draws if k in res["no_auc"]]
        if why or res["note"]:
            entry["no_auc"] = res["note"] or why[0]
        per_score[score.name] = entry

    def best(axis: str, key: str = "flops_auc"):
        """The axis's best score by its validation AUC; its test AUC is what is reported."""
        cands = [(v[f"val_{key}"], k) for k, v in per_score.items() if v["axis"] == axis and v.get(f"val_{key}") is not None]
        if not has_val or not cands:
            return None
        val, name = max(cands)   # ties broken by name: deterministic
        return {"score": name, "chosen_on": SELECTION_SPLIT, "measured_on": MEASUREMENT_SPLIT,
                f"val_{key}": val, key: per_score[name][key], f"{key}_rel": per_score[name][f"{key}_rel"]}

    axis_means = {axis: _mean_or_none(v["flops_auc"] for v in per_score.values() if v["axis"] == axis) for axis in AXES}
    bl, bt = best("local"), best("target")
    sweeps = {}
    for prefix, fam in FAMILIES.items():
        pts = sorted((v["param"], k) for k, v in per_score.items() if v["family"] == prefix)
        anchor_name = fam["anchor"].format(magnitude=settings.magnitude)  # the sweep at parameter 0
        if anchor_name in per_score:
            pts = [(0.0, anchor_name)] + pts
        if pts:
            points = [{"param": p, "score": s, "flops_auc": per_score[s]["flops_auc"],
                       "val_flops_auc": per_score[s].get("val_flops_auc")} for p, s in pts]
            chosen = [(p["val_flops_auc"], p["score"]) for p in points if p["val_flops_auc"] is not None]
            sweeps[prefix] = {"symbol": fam["symbol"], "label": fam["label"], "points": points,
                              "best": (dict(next(p for p in points if p["score"] == max(chosen)[1]),
                                            chosen_on=SELECTION_SPLIT) if chosen else None)}
    matched = curves["matched"].dropna() if "matched" in curves else pd.Series(dtype=bool)
    dev = (curves["achieved_flops"] - curves["target_flops"]).abs() if settings.mode == "flops" else pd.Series(dtype=float)
    fv_diff = (curves["macs"] - curves["macs_analytic"]).abs() if len(curves) else pd.Series(dtype=float)
    grid = res["grid"]
    return {
        "unpruned": {k: v for k, v in base.items() if k != "fingerprint"},
        "unpruned_acc": base_acc, "unpruned_val_acc": base_val, "unpruned_macs": int(base["macs"]),
        "mode": settings.mode, "allocation": settings.allocation, "max_fraction": settings.max_fraction,
        "tolerance": settings.tolerance, "targets": settings.targets,
        "selection": {"chosen_on": SELECTION_SPLIT if has_val else None, "measured_on": MEASUREMENT_SPLIT,
                      "n_val": int(base.get("n_val") or 0), "n_test": int(base.get("n_eval") or 0),
                      "note": "" if has_val else ("no validation split (data.val_fraction=0): no best score is "
                                                  "chosen, since choosing on test would bias the comparison")},
        "flops_auc_grid": {"removed_flops": grid, "interval": [grid[0], grid[-1]] if grid else None,
                           "shared_by": "every score and draw of this run, with the unpruned network at 0",
                           "off_target_points": res["off_target"], "note": res["note"]},
        "groups": len(groups), "group_sizes": {g.name: g.size for g in groups.groups},
        "scores": per_score,
        "best_local": bl, "best_target": bt,
        "best_local_minus_best_target": (bl["flops_auc"] - bt["flops_auc"])
        if bl and bt and bl["flops_auc"] is not None and bt["flops_auc"] is not None else None,
        "axis_means": axis_means,
        "sweeps": sweeps,
        "matching": {"points": int(len(curves)), "unmatched": int((~matched.astype(bool)).sum()) if len(matched) else 0,
                     "max_abs_deviation": float(dev.max()) if len(dev.dropna()) else None},
        "analytic_vs_fvcore_max_abs_macs": float(fv_diff.max()) if len(fv_diff.dropna()) else None,
        "score_seconds": score_timing,
        "config": config,
    }


def log_curves(tracker, curves: pd.DataFrame) -> None:
    """Pruning curves as wandb line series, one line per score named ``score (axis)``: accuracy
    (mean over draws) against the achieved fraction of FLOPs kept, before and after fine-tuning."""
    if not tracker.enabled or curves.empty:
        return
    for acc_col, key in (("acc_before_ft", "prune/curves_chart"), ("acc_after_ft", "prune/curves_ft_chart")):
        if acc_col not in curves or curves[acc_col].isna().all() or (acc_col == "acc_after_ft" and not tuned_any(curves)):
            continue
        xs, ys = {}, {}
        for name, df in curves.groupby("score", sort=False):
            g = df.groupby("target_flops" if df["target_flops"].notna().any() else "target_channels")
            line = pd.DataFrame({"x": g["achieved_flops"].mean(), "y": g[acc_col].mean()}).dropna().sort_values("x")
            label = f"{name} ({df['axis'].iloc[0]})"
            xs[label], ys[label] = line["x"].tolist(), line["y"].tolist()
        tracker.line_series(key, list(xs.values()), ys, title=f"{acc_col} vs FLOPs kept", xname="FLOPs kept")


def write_stage(out: Path, curves: pd.DataFrame, summary: dict) -> None:
    """Replace ``prune_curves.csv`` and ``prune_summary.json`` together.

    Both are written in full to temporary files first (a failure there leaves both old ones);
    the old summary is removed before the new curves are renamed into place, so no moment shows a
    summary beside curves it does not describe (at worst: new curves and no summary, which reads
    as an unfinished stage). The summary also carries the curves' content digest
    (``curves_sha256``), which the report checks.
    """
    text = curves.to_csv(index=False)
    summary["curves_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    blob = json.dumps(summary, indent=2, default=json_default) + "\n"
    with atomic_path(out / "prune_summary.json") as tmp_summary:
        with atomic_path(out / "prune_curves.csv") as tmp_curves:
            tmp_curves.write_text(text)
            tmp_summary.write_text(blob)
            (out / "prune_summary.json").unlink(missing_ok=True)
        # here: new curves, no summary; next line: the new summary


def flat_scalars(summary: dict) -> dict:
    flat = {"unpruned_acc": summary["unpruned"]["acc"], "unpruned_macs": summary["unpruned"]["macs"]}
    for name, v in summary["scores"].items():
        for key in ("flops_auc", "flops_auc_rel", "val_flops_auc"):
            if v.get(key) is not None:
                flat[f"{key}/{name}"] = v[key]
    flat.update({f"axis_mean/{axis}": v for axis, v in summary["axis_means"].items() if v is not None})
    if summary["best_local_minus_best_target"] is not None:
        flat["best_local_minus_best_target"] = summary["best_local_minus_best_target"]
    return flat


def _fmt(v, spec=".4f") -> str:
    return "—" if v is None else format(v, spec)


def print_summary(summary: dict, out: Path) -> None:
    rows = sorted(summary["scores"].items(),
                  key=lambda kv: -(kv[1]["flops_auc"] if kv[1]["flops_auc"] is not None else -1))
    print(f"prune: unpruned acc={summary['unpruned']['acc']:.4f} (val {_fmt(summary['unpruned_val_acc'])}), "
          f"MACs={summary['unpruned']['macs']:,}")
    grid = summary["flops_auc_grid"]
    if grid["note"]:
        print(f"prune: note: {grid['note']}")
    else:
        print(f"prune: FLOPs-AUC over removed FLOPs [{grid['interval'][0]:g}, {grid['interval'][1]:g}] for every score"
              + (f"; {grid['off_target_points']} point(s) off target dropped" if grid["off_target_points"] else ""))
    for name, v in rows:
        print(f"  {name:28s} {v['axis']:8s} FLOPs-AUC test={_fmt(v['flops_auc'])} val={_fmt(v.get('val_flops_auc'))} "
              f"(rel {_fmt(v['flops_auc_rel'], '.3f')})")
    bl, bt = summary["best_local"], summary["best_target"]
    if bl and bt:
        print(f"prune: best local {bl['score']} {_fmt(bl['flops_auc'])} vs best target {bt['score']} "
              f"{_fmt(bt['flops_auc'])} (chosen on {bl['chosen_on']}, test accuracy) -> {out}")
    else:
        if summary["selection"]["note"]:
            print(f"prune: note: {summary['selection']['note']}")
        print(f"prune: results in {out}")
