"""The report's tables, computed from the runs of each group (one row per seed pooled as mean ± SD)."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from axes_pipeline.analyses.definitions import directions
from axes_pipeline.layout import PRUNE_CURVES, PRUNE_SUMMARY
from axes_pipeline.report.collect import LAYER_COLS, Run
from axes_pipeline.runs import flatten
from axes_pipeline.stats import DEFAULT_CI, PAPER_REFERENCE, compare_paired, grid_aucs, holm, mean_sd
from axes_pipeline.tables import DamagedTable, Schema, check_table

AXES = ("local", "target")


def runs_table(groups: dict[str, list[Run]]) -> pd.DataFrame:
    return pd.DataFrame([{"group": g, "seed": r.seed, "experiment": r.experiment, "val_acc": r.train.get("val_acc"),
                          "test_acc": r.train.get("test_acc"), "epochs": r.train.get("epochs"),
                          "analyze": (r.path / "analyze" / "axes.csv").is_file(),
                          "prune": ", ".join(r.protocols()) or False, "run_dir": str(r.path)}
                         for g, runs in groups.items() for r in runs])


# ---------------------------------------------------------------- pruning
#
# Selection and measurement (METHODS §9): every "best" score is chosen on the validation split's
# FLOPs-AUC (the ``val_<accuracy>`` column of prune_curves.csv beside each test ``<accuracy>``) and
# measured on the test split's; every score of a group is integrated over one removed-FLOPs grid
# (stats.grid_aucs).

SELECTED_ON, MEASURED_ON = "val", "test"
CURVES, SUMMARY = PRUNE_CURVES, PRUNE_SUMMARY    # in the folder of the run's protocol (Run.prune_rel)


def curves_schema(accuracy: str) -> Schema:
    """What the report needs of ``prune/prune_curves.csv``: every point's score, axis, achieved
    FLOPs and (test and validation) accuracy, finite; prune validates its points before writing,
    so a NaN here means a damaged file, not a missing measurement."""
    return Schema("prune_curves.csv",
                  {"score": "str", "axis": "str", "draw": "int", "achieved_flops": "float", "target_flops": "float",
                   "target_channels": "float", accuracy: "float", f"val_{accuracy}": "float"},
                  finite=("score", "axis", "achieved_flops", accuracy, f"val_{accuracy}"), optional=("draw",))


def read_curves(run: Run, accuracy: str) -> tuple[pd.DataFrame | None, str | None]:
    """``(curves, None)`` for a run whose pruning results are sound; ``(None, None)`` for a run that
    was not pruned; ``(None, reason)`` for one whose results cannot be used. The reason is also
    recorded on the run (``Run.skip``), so the report lists it: never a silent drop."""
    if not (run.path / run.prune_rel(CURVES)).is_file():
        return None, None
    why = _curves_problem(run, accuracy)
    if why:
        run.skip(run.prune_rel(CURVES), why)
        return None, why
    return run.read_csv(run.prune_rel(CURVES)), None


def _curves_problem(run: Run, accuracy: str) -> str | None:
    """What makes a run's pruning curves unusable for ``accuracy``, or None."""
    path = run.path / run.prune_rel(CURVES)
    summary = run.read_json(run.prune_rel(SUMMARY))
    if not summary:
        return f"{run.prune_rel(SUMMARY)} is missing (prune did not finish); rerun prune.py"
    curves = run.read_csv(run.prune_rel(CURVES))   # the run's generic checks: schema, truncation (collect.py)
    if curves is None:
        return run.skipped.get(run.prune_rel(CURVES), f"{path} cannot be read")
    if accuracy in curves and len(curves) and curves[accuracy].isna().all():
        return f"prune_curves.csv has no {accuracy} (pruned without fine-tuning?)"
    try:
        check_table(curves, curves_schema(accuracy), path=path,
                    rebuild=f"python prune.py <the run's overrides>  (run {run.path})")
    except DamagedTable as err:
        return str(err)
    want = summary.get("curves_sha256")
    if want is not None and hashlib.sha256(path.read_bytes()).hexdigest() != want:
        return "prune_curves.csv does not match prune_summary.json (written by another prune run); rerun prune.py"
    for key in ("unpruned_acc", "unpruned_val_acc"):
        v = summary.get(key)
        if not isinstance(v, (int, float)) or not np.isfinite(v):
            return f"prune_summary.json has no {key}; rerun prune.py"
    return None


def _prune_info(run: Run) -> dict:
    s = run.read_json(run.prune_rel(SUMMARY)) or {}
    pc = (s.get("config") or {}).get("pruning") or {}
    return {"mode": s.get("mode", pc.get("mode", "flops")), "tolerance": float(s.get("tolerance", pc.get("tolerance", 0.005))),
            "targets": s.get("targets", pc.get("targets")), "acc": s.get("unpruned_acc"), "val_acc": s.get("unpruned_val_acc")}


def skipped_prune_runs(groups: dict[str, list[Run]], accuracy: str) -> list[tuple[str, str]]:
    """``[(run_dir, reason)]`` of the pruned runs whose curves the report cannot use (damaged,
    unfinished, without validation accuracies): they are left out of every pruning table, and the
    report lists them rather than dropping them silently."""
    return [(str(r.path), why) for runs in groups.values() for r in runs if (why := read_curves(r, accuracy)[1])]


def seed_curves(run: Run, accuracy: str = "acc_before_ft") -> pd.DataFrame | None:
    """One run's pruning curve, random draws averaged: score, axis, target, achieved_flops, acc.

    ``target`` is the retained-FLOPs target, or in ``channel_fraction`` mode the retained-channel
    fraction (that mode has no FLOPs target); the AUC's axis is the achieved FLOPs either way."""
    curves, _ = read_curves(run, accuracy)
    if curves is None:
        return None
    target = curves["target_flops"] if "target_flops" in curves else pd.Series(np.nan, index=curves.index)
    if "target_channels" in curves:
        target = target.fillna(curves["target_channels"])
    return (curves.assign(target=target).groupby(["score", "axis", "target"], as_index=False)
            .agg(achieved_flops=("achieved_flops", "mean"), acc=(accuracy, "mean")))


def auc_per_seed(groups: dict[str, list[Run]], accuracy: str) -> pd.DataFrame:
    """group, seed, score, axis, flops_auc, flops_auc_rel (test: measured), val_flops_auc,
    val_flops_auc_rel (validation: chooses), and per seed the shared grid's end and the points
    dropped as off target. Draws are integrated one by one and averaged (prune_summary.json's rule).
    Every curve of a group is integrated over the same removed-FLOPs grid. Runs that cannot be
    used are left out here and named by :func:`skipped_prune_runs`."""
    rows = []
    val = f"val_{accuracy}"
    for g, runs in groups.items():
        frames, info = [], {}
        for r in runs:
            curves, _ = read_curves(r, accuracy)
            if curves is None:
                continue
            if "draw" not in curves:
                curves = curves.assign(draw=0)
            frames.append(curves.assign(seed=r.seed))
            info[r.seed] = _prune_info(r)
        if not frames:
            continue
        allc = pd.concat(frames, ignore_index=True)
        first = next(iter(info.values()))
        targets = sorted({float(t) for i in info.values() for t in (i["targets"] or [])}) or None
        res = grid_aucs(allc, [accuracy, val], lambda k: {accuracy: info[k[0]]["acc"], val: info[k[0]]["val_acc"]},
                        mode=first["mode"], tolerance=first["tolerance"], by=("seed", "score", "draw"),
                        targets=targets)
        if res["grid"] is None:
            continue
        axis_of = dict(zip(allc["score"], allc["axis"]))
        off = {}
        if first["mode"] == "flops" and "target_flops" in allc:
            miss = (allc["achieved_flops"] - allc["target_flops"]).abs() > first["tolerance"] + 1e-12
            off = allc[miss].groupby("seed").size().to_dict()
        per: dict[tuple, dict[str, list]] = {}
        for (seed, score, _draw), a in res["aucs"].items():
            d = per.setdefault((seed, score), {accuracy: [], val: []})
            for c in (accuracy, val):
                if a[c] is not None:
                    d[c].append(a[c])
        for (seed, score), d in sorted(per.items()):
            if not d[accuracy] or not d[val]:
                continue
            auc, vauc = float(np.mean(d[accuracy])), float(np.mean(d[val]))
            base, vbase = info[seed]["acc"], info[seed]["val_acc"]
            rows.append({"group": g, "seed": seed, "score": score, "axis": axis_of[score],
                         "flops_auc": auc, "flops_auc_rel": auc / base if base else np.nan,
                         "val_flops_auc": vauc, "val_flops_auc_rel": vauc / vbase if vbase else np.nan,
                         "grid_end": res["grid"][-1], "off_target_points": int(off.get(seed, 0))})
    return pd.DataFrame(rows)


def auc_table(per_seed: pd.DataFrame) -> pd.DataFrame:
    if per_seed.empty:
        return per_seed
    rows = []
    for (g, score, axis), d in per_seed.groupby(["group", "score", "axis"]):
        (a, a_sd, n), (rel, rel_sd, _), (v, v_sd, _) = (mean_sd(d[c]) for c in ("flops_auc", "flops_auc_rel", "val_flops_auc"))
        rows.append({"group": g, "score": score, "axis": axis, "flops_auc_mean": a, "flops_auc_sd": a_sd,
                     "flops_auc_rel_mean": rel, "flops_auc_rel_sd": rel_sd, "val_flops_auc_mean": v, "val_flops_auc_sd": v_sd,
                     "seeds": n,
                     "grid_end": float(d["grid_end"].iloc[0]),
                     "off_target_points": int(d.groupby("seed")["off_target_points"].first().sum())})
    return pd.DataFrame(rows).sort_values(["group", "flops_auc_mean"], ascending=[True, False])


def accuracy_by_target(groups: dict[str, list[Run]], accuracy: str) -> pd.DataFrame:
    rows = []
    for g, runs in groups.items():
        frames = [c.assign(seed=r.seed) for r in runs if (c := seed_curves(r, accuracy)) is not None]
        if not frames:
            continue
        allc = pd.concat(frames)
        for (score, axis, t), d in allc.groupby(["score", "axis", "target"]):
            m, sd, n = mean_sd(d["acc"])
            rows.append({"group": g, "score": score, "axis": axis, "target": t,
                         "achieved_flops_mean": d["achieved_flops"].mean(), "acc_mean": m, "acc_sd": sd, "seeds": n})
    return pd.DataFrame(rows)


def _best(wide: pd.DataFrame, cols: list[str]) -> str:
    return max(cols, key=lambda s: (wide[s].mean(), s))   # ties broken by name: deterministic


def held_out_best(val: pd.DataFrame, test: pd.DataFrame, local: list[str], target: list[str]
                  ) -> tuple[pd.Series, pd.Series, list]:
    """Best local and best target score chosen on the *other* seeds' validation AUC, compared on the
    held-out seed's test AUC.

    Choosing the best of each axis on the same seeds that are then compared is optimistic, and more
    so for the axis with more candidate scores (local has the β variants); leaving the seed out of
    the choice removes that bias. Returns the two paired series and the choices per seed."""
    a, b, picks = {}, {}, []
    for s in val.index:
        rest = val.drop(index=s)
        bl, bt = _best(rest, local), _best(rest, target)
        a[s], b[s] = test.at[s, bl], test.at[s, bt]
        picks.append(f"{bl}/{bt}")
    return pd.Series(a), pd.Series(b), picks


def headline(per_seed: pd.DataFrame, *, min_n: int, n_boot: int, method: str, seed: int = 0,
             ci: str = DEFAULT_CI) -> pd.DataFrame:
    """Best local vs best target score, and the axis means, paired across seeds, per group.

    Three rows per group: the best score of each axis chosen on the validation AUC of all seeds,
    chosen on the validation AUC of the other seeds (leave-one-seed-out), and the axis means; every
    row compares *test* AUCs (``selected_on`` / ``measured_on``). No row is chosen by looking at
    test, so all of them form the Holm family (``p_holm``); ``candidates`` says how many scores each
    axis had to choose from."""
    rows = []
    if per_seed.empty:
        return pd.DataFrame(rows)
    for g, d in per_seed.groupby("group"):
        test = d.pivot_table(index="seed", columns="score", values="flops_auc").dropna(axis=1)
        val = d.pivot_table(index="seed", columns="score", values="val_flops_auc").dropna(axis=1)
        both = [c for c in test.columns if c in val.columns]
        test, val = test[both], val.loc[test.index, both]
        axis_of = dict(zip(d["score"], d["axis"]))
        cols = {ax: sorted(s for s in both if axis_of.get(s) == ax) for ax in AXES}
        if not (cols["local"] and cols["target"]):
            continue
        cand = f"{len(cols['local'])} local / {len(cols['target'])} target"
        bl, bt = _best(val, cols["local"]), _best(val, cols["target"])
        comparisons = [(f"best local ({bl}) − best target ({bt}), chosen on validation (all seeds), measured on test",
                        test[bl], test[bt], "", SELECTED_ON)]
        if len(val) >= 2:
            a, b, picks = held_out_best(val, test, cols["local"], cols["target"])
            comparisons.append(("best local − best target, chosen on validation of the other seeds, measured on test",
                                a, b, "choices: " + ", ".join(sorted(set(picks))), SELECTED_ON))
        comparisons.append(("local-axis mean − target-axis mean, measured on test", test[cols["local"]].mean(axis=1),
                            test[cols["target"]].mean(axis=1), "", "none (no choice)"))
        group_rows = []
        for label, a, b, note, chosen_on in comparisons:
            res = compare_paired(a.to_numpy(), b.to_numpy(), min_n=min_n, n_boot=n_boot, seed=seed, method=method, ci=ci)
            if note:
                res["note"] = "; ".join(x for x in (res.get("note") or "", note) if x)
            group_rows.append({"group": g, "comparison": label, "candidates": cand, "selected_on": chosen_on,
                               "measured_on": MEASURED_ON, **res})
        for r, ph in zip(group_rows, holm([r["p_value"] for r in group_rows])):
            r["p_holm"] = ph
        rows.extend(group_rows)
    return pd.DataFrame(rows)


def backbones_table(head: pd.DataFrame) -> pd.DataFrame:
    """The paper's table: one row per group (backbone × data × width) with its headline comparison
    (best local − best target, chosen on validation of all seeds, measured on test), so that the
    backbones of one report stand side by side. Columns as :func:`headline`'s."""
    if head.empty:
        return head
    first = head[head["comparison"].str.startswith("best local (")]
    return first.drop_duplicates("group").reset_index(drop=True)


# ---------------------------------------------------------------- axes

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
                    row[f"{c}_mean"], row[f"{c}_sd"], _ = mean_sd(d[c])
            rows.append(row)
    return pd.DataFrame(rows)


def reference_table(groups: dict[str, list[Run]]) -> pd.DataFrame:
    """Ours (mean ± SD over seeds of the per-run layer mean) beside the paper's METHODS §11 values.

    With dynamics results, "init" and "trained" come from the first and last epoch of the
    six depth-spaced layers (the paper's protocol); otherwise "trained" is over all analysed layers.
    """
    rows = []
    for g, runs in groups.items():
        per = {k: {"init": [], "trained": []} for k in PAPER_REFERENCE}   # the same column names in our tables
        source = "all analysed layers (trained)"
        for r in runs:
            dyn = r.read_csv("analyze/dynamics.csv")
            if dyn is not None and "epoch" in dyn:
                source = "dynamics: six depth-spaced layers, first vs last epoch"
                first, last = dyn[dyn.epoch == dyn.epoch.min()], dyn[dyn.epoch == dyn.epoch.max()]
                for k in per:
                    if k in dyn:
                        per[k]["init"].append(first[k].mean())
                        per[k]["trained"].append(last[k].mean())
                continue
            lay = r.read_csv("analyze/layers.csv")
            if lay is not None:
                for k in per:
                    if k in lay:
                        per[k]["trained"].append(lay[k].mean())
        for k in per:
            for phase in ("init", "trained"):
                m, sd, n = mean_sd(per[k][phase])
                ref_m, ref_sd = PAPER_REFERENCE[k][phase]
                rows.append({"group": g, "quantity": k, "phase": phase, "ours_mean": m, "ours_sd": sd,
                             "seeds": n, "paper_mean": ref_m, "paper_sd": ref_sd, "source": source})
    return pd.DataFrame(rows)


def definitions_table(groups: dict[str, list[Run]]) -> pd.DataFrame:
    """Per group, definition (activation point × sampling) and quantity: the init and trained values as
    mean ± SD over seeds, their direction and whether it is the paper's (analysis=definitions)."""
    out = []
    for g, runs in groups.items():
        frames = [f.assign(seed=r.seed) for r in runs if (f := r.read_csv("analyze/definitions.csv")) is not None]
        if frames:
            out.append(directions(pd.concat(frames, ignore_index=True)).assign(group=g))
    if not out:
        return pd.DataFrame()
    df = pd.concat(out, ignore_index=True)
    return df[["group", *[c for c in df.columns if c != "group"]]]


def scalar_summary(groups: dict[str, list[Run]], rel: str) -> pd.DataFrame:
    """Mean ± SD over seeds of every numeric field of a per-run JSON summary (lesions, propagation...)."""
    rows = []
    for g, runs in groups.items():
        values: dict[str, list] = {}
        for r in runs:
            for k, v in _numeric(r.read_json(rel)).items():
                values.setdefault(k, []).append(v)
        for k, vs in values.items():
            m, sd, n = mean_sd(vs)
            rows.append({"group": g, "quantity": k, "mean": m, "sd": sd, "seeds": n})
    return pd.DataFrame(rows)


# Left out of the report's summary tables: the per-layer detail (it is in each run's own CSVs and
# would bury the headline figures) and bookkeeping that says nothing about the network.
_NOT_SUMMARISED = {"config", "per_layer", "n_boot", "resumed_layers", "wall_time_s"}


def _numeric(d) -> dict[str, float]:
    """The numbers of a per-run JSON summary under their flattened keys (``recovery.full_mean``)."""
    if not isinstance(d, dict):
        return {}
    return {k: float(v) for k, v in flatten(d, skip=_NOT_SUMMARISED).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


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
            m, sd, n = mean_sd(d["rho"])
            row = {"group": g, "pairing": p, "rho_mean": m, "rho_sd": sd, "seeds": n}
            if "null_rho" in d:
                row["null_rho_mean"] = d["null_rho"].mean()
            rows.append(row)
    return pd.DataFrame(rows)
