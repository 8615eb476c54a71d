"""The report's tables, computed from the runs of each group (one row per seed pooled as mean ± SD)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from axes_pipeline.report.collect import Run
from axes_pipeline.stats import PAPER_REFERENCE, compare_paired, flops_auc, flops_auc_relative, holm, mean_sd

AXES = ("local", "target")


def _ms(values) -> dict:
    m, s, n = mean_sd(np.asarray(values, float))
    return {"mean": m, "sd": s, "n": n}


def runs_table(groups: dict[str, list[Run]]) -> pd.DataFrame:
    rows = []
    for g, runs in groups.items():
        for r in runs:
            rows.append({"group": g, "seed": r.seed, "experiment": r.experiment, "val_acc": r.train.get("val_acc"),
                         "test_acc": r.train.get("test_acc"), "epochs": r.train.get("epochs"),
                         "analyze": (r.path / "analyze" / "axes.csv").is_file(),
                         "prune": (r.path / "prune" / "prune_curves.csv").is_file(), "run_dir": str(r.path)})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- pruning

def seed_curves(run: Run, accuracy: str = "acc_before_ft") -> pd.DataFrame | None:
    """One run's pruning curve, random draws averaged: score, axis, target, achieved_flops, acc.

    ``target`` is the retained-FLOPs target, or in ``channel_fraction`` mode the retained-channel
    fraction (that mode has no FLOPs target); the AUC's axis is the achieved FLOPs either way."""
    curves = _measured(run, accuracy)
    if curves is None:
        return None
    target = curves["target_flops"] if "target_flops" in curves else pd.Series(np.nan, index=curves.index)
    if "target_channels" in curves:
        target = target.fillna(curves["target_channels"])
    return (curves.assign(target=target).groupby(["score", "axis", "target"], as_index=False)
            .agg(achieved_flops=("achieved_flops", "mean"), acc=(accuracy, "mean")))


def _measured(run: Run, accuracy: str) -> pd.DataFrame | None:
    curves = run.read_csv("prune/prune_curves.csv")
    if curves is None or accuracy not in curves:
        return None
    return curves[curves[accuracy].notna()]


def _draw_mean_auc(c: pd.DataFrame, accuracy: str, base_acc) -> tuple[float, float]:
    """FLOPs-AUC (absolute, relative) of one score: per random draw, then averaged over draws
    (prune_summary.json's rule, so the report and the per-run summary agree)."""
    aucs, rels = [], []
    for _, d in (c.groupby("draw") if "draw" in c else [(0, c)]):
        removed, acc = 1.0 - d["achieved_flops"].to_numpy(float), d[accuracy].to_numpy(float)
        try:
            aucs.append(flops_auc(removed, acc))
        except ValueError:
            continue
        rels.append(flops_auc_relative(removed, acc, base_acc) if base_acc else np.nan)
    return (float(np.mean(aucs)), float(np.mean(rels))) if aucs else (np.nan, np.nan)


def auc_per_seed(groups: dict[str, list[Run]], accuracy: str) -> pd.DataFrame:
    """group, seed, score, axis, flops_auc, flops_auc_rel (removed-FLOPs axis = 1 − achieved)."""
    rows = []
    for g, runs in groups.items():
        for r in runs:
            curves = _measured(r, accuracy)
            if curves is None:
                continue
            base = r.read_json("prune/prune_summary.json") or {}
            base_acc = base.get("unpruned_acc", r.train.get("test_acc"))
            for (score, axis), c in curves.groupby(["score", "axis"]):
                auc, rel = _draw_mean_auc(c, accuracy, base_acc)
                if np.isfinite(auc):
                    rows.append({"group": g, "seed": r.seed, "score": score, "axis": axis, "flops_auc": auc,
                                 "flops_auc_rel": rel})
    return pd.DataFrame(rows)


def auc_table(per_seed: pd.DataFrame) -> pd.DataFrame:
    if per_seed.empty:
        return per_seed
    rows = []
    for (g, score, axis), d in per_seed.groupby(["group", "score", "axis"]):
        a, rel = _ms(d["flops_auc"]), _ms(d["flops_auc_rel"])
        rows.append({"group": g, "score": score, "axis": axis, "flops_auc_mean": a["mean"], "flops_auc_sd": a["sd"],
                     "flops_auc_rel_mean": rel["mean"], "flops_auc_rel_sd": rel["sd"], "seeds": a["n"]})
    return pd.DataFrame(rows).sort_values(["group", "flops_auc_mean"], ascending=[True, False])


def accuracy_by_target(groups: dict[str, list[Run]], accuracy: str) -> pd.DataFrame:
    rows = []
    for g, runs in groups.items():
        frames = [c.assign(seed=r.seed) for r in runs if (c := seed_curves(r, accuracy)) is not None]
        if not frames:
            continue
        allc = pd.concat(frames)
        for (score, axis, t), d in allc.groupby(["score", "axis", "target"]):
            s = _ms(d["acc"])
            rows.append({"group": g, "score": score, "axis": axis, "target": t,
                         "achieved_flops_mean": d["achieved_flops"].mean(), "acc_mean": s["mean"], "acc_sd": s["sd"],
                         "seeds": s["n"]})
    return pd.DataFrame(rows)


def _best(wide: pd.DataFrame, cols: list[str]) -> str:
    return max(cols, key=lambda s: (wide[s].mean(), s))   # ties broken by name: deterministic


def held_out_best(wide: pd.DataFrame, local: list[str], target: list[str]) -> tuple[pd.Series, pd.Series, list]:
    """Best local and best target score chosen on the *other* seeds, compared on the held-out one.

    Choosing the best of each axis on the same seeds that are then tested is optimistic, and more
    so for the axis with more candidate scores (local has the β variants); leaving the seed out of
    the choice removes that bias. Returns the two paired series and the choices per seed."""
    a, b, picks = {}, {}, []
    for s in wide.index:
        rest = wide.drop(index=s)
        bl, bt = _best(rest, local), _best(rest, target)
        a[s], b[s] = wide.at[s, bl], wide.at[s, bt]
        picks.append(f"{bl}/{bt}")
    return pd.Series(a), pd.Series(b), picks


def headline(per_seed: pd.DataFrame, *, min_n: int, n_boot: int, method: str, seed: int = 0) -> pd.DataFrame:
    """Best local vs best target score, and the axis means, paired across seeds, per group.

    Three rows per group: the best score of each axis chosen on all seeds (optimistic, the paper's
    presentation), chosen on the other seeds (leave-one-seed-out, the unbiased version), and the
    axis means. ``p_holm`` adjusts the p-values over the group's rows; ``candidates`` says how many
    scores each axis had to choose from."""
    rows = []
    if per_seed.empty:
        return pd.DataFrame(rows)
    for g, d in per_seed.groupby("group"):
        wide = d.pivot_table(index="seed", columns="score", values="flops_auc").dropna(axis=1)
        axis_of = dict(zip(d["score"], d["axis"]))
        cols = {ax: sorted(s for s in wide.columns if axis_of.get(s) == ax) for ax in AXES}
        if not (cols["local"] and cols["target"]):
            continue
        cand = f"{len(cols['local'])} local / {len(cols['target'])} target"
        bl, bt = _best(wide, cols["local"]), _best(wide, cols["target"])
        comparisons = [(f"best local ({bl}) − best target ({bt}), chosen on all seeds", wide[bl], wide[bt], "")]
        if len(wide) >= 2:
            a, b, picks = held_out_best(wide, cols["local"], cols["target"])
            chosen = sorted(set(picks))
            comparisons.append(("best local − best target, chosen on the other seeds", a, b,
                                "choices: " + ", ".join(chosen)))
        comparisons.append(("local-axis mean − target-axis mean", wide[cols["local"]].mean(axis=1),
                            wide[cols["target"]].mean(axis=1), ""))
        group_rows = []
        for label, a, b, note in comparisons:
            res = compare_paired(a.to_numpy(), b.to_numpy(), min_n=min_n, n_boot=n_boot, seed=seed, method=method)
            if note:
                res["note"] = "; ".join(x for x in (res.get("note") or "", note) if x)
            group_rows.append({"group": g, "comparison": label, "candidates": cand, **res})
        p_holm = holm([r["p_value"] for r in group_rows])
        for r, ph in zip(group_rows, p_holm):
            r["p_holm"] = ph
        rows.extend(group_rows)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- axes

LAYER_COLS = ("align_input_capture_task_info", "align_peer_overlap_target_excess", "align_hull_score_task_unique",
              "modularity_gap", "null_modularity_gap", "nmi", "ari", "hull_size_mean", "hull_saturated_frac", "s3_s2")


def layers_table(groups: dict[str, list[Run]]) -> pd.DataFrame:
    rows = []
    for g, runs in groups.items():
        frames = [f.assign(seed=r.seed) for r in runs if (f := r.read_csv("analyze/layers.csv")) is not None]
        if not frames:
            continue
        allf = pd.concat(frames)
        for (idx, layer), d in allf.groupby(["layer_index", "layer"]):
            row = {"group": g, "layer_index": idx, "layer": layer, "seeds": d["seed"].nunique()}
            for c in LAYER_COLS:
                if c in d:
                    s = _ms(d[c])
                    row[f"{c}_mean"], row[f"{c}_sd"] = s["mean"], s["sd"]
            rows.append(row)
    return pd.DataFrame(rows)


def reference_table(groups: dict[str, list[Run]]) -> pd.DataFrame:
    """Ours (mean ± SD over seeds of the per-run layer mean) beside the paper's METHODS §11 values.

    With dynamics results, "init" and "trained" come from the first and last epoch of the
    six depth-spaced layers (the paper's protocol); otherwise "trained" is over all analysed layers.
    """
    ours_cols = {"hull_size_mean": "hull_size_mean", "hull_saturated_frac": "hull_saturated_frac", "s3_s2": "s3_s2"}
    rows = []
    for g, runs in groups.items():
        per = {k: {"init": [], "trained": []} for k in ours_cols}
        source = "all analysed layers (trained)"
        for r in runs:
            dyn = r.read_csv("analyze/dynamics.csv")
            if dyn is not None and "epoch" in dyn:
                source = "dynamics: six depth-spaced layers, first vs last epoch"
                first, last = dyn[dyn.epoch == dyn.epoch.min()], dyn[dyn.epoch == dyn.epoch.max()]
                for k, col in ours_cols.items():
                    if col in dyn:
                        per[k]["init"].append(first[col].mean())
                        per[k]["trained"].append(last[col].mean())
                continue
            lay = r.read_csv("analyze/layers.csv")
            if lay is not None:
                for k, col in ours_cols.items():
                    if col in lay:
                        per[k]["trained"].append(lay[col].mean())
        for k in ours_cols:
            for phase in ("init", "trained"):
                ours = _ms(per[k][phase])
                ref_m, ref_sd = PAPER_REFERENCE[k][phase]
                rows.append({"group": g, "quantity": k, "phase": phase, "ours_mean": ours["mean"], "ours_sd": ours["sd"],
                             "seeds": ours["n"], "paper_mean": ref_m, "paper_sd": ref_sd, "source": source})
    return pd.DataFrame(rows)


def scalar_summary(groups: dict[str, list[Run]], rel: str, section: str) -> pd.DataFrame:
    """Mean ± SD over seeds of every numeric field of a per-run JSON summary (lesions, propagation...)."""
    rows = []
    for g, runs in groups.items():
        values: dict[str, list] = {}
        for r in runs:
            js = r.read_json(rel)
            if not js:
                continue
            part = js.get(section, js) if section else js
            for k, v in _numeric(part).items():
                values.setdefault(k, []).append(v)
        for k, vs in values.items():
            s = _ms(vs)
            rows.append({"group": g, "quantity": k, "mean": s["mean"], "sd": s["sd"], "seeds": s["n"]})
    return pd.DataFrame(rows)


# Left out of the report's summary tables: the per-layer detail (it is in each run's own CSVs and
# would bury the headline figures) and bookkeeping that says nothing about the network.
_NOT_SUMMARISED = {"config", "per_layer", "n_boot", "resumed_layers", "wall_time_s"}


def _numeric(d, prefix=""):
    out = {}
    if not isinstance(d, dict):
        return out
    for k, v in d.items():
        if k in _NOT_SUMMARISED:
            continue
        if isinstance(v, dict):
            out.update(_numeric(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def propagation_table(groups: dict[str, list[Run]]) -> pd.DataFrame:
    rows = []
    for g, runs in groups.items():
        frames = [f.assign(seed=r.seed) for r in runs if (f := r.read_csv("analyze/propagation.csv")) is not None]
        if not frames:
            continue
        allf = pd.concat(frames)
        if "pairing" not in allf or "rho" not in allf:
            continue
        per_seed = allf.groupby(["pairing", "seed"], as_index=False).agg(
            rho=("rho", "mean"), **({"null_rho": ("null_rho", "mean")} if "null_rho" in allf else {}))
        for p, d in per_seed.groupby("pairing"):
            s = _ms(d["rho"])
            row = {"group": g, "pairing": p, "rho_mean": s["mean"], "rho_sd": s["sd"], "seeds": s["n"]}
            if "null_rho" in d:
                row["null_rho_mean"] = d["null_rho"].mean()
            rows.append(row)
    return pd.DataFrame(rows)
