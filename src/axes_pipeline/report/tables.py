"""The report's tables, computed from the runs of each group.

Every verdict across seeds comes from one estimate per seed through :func:`axes_pipeline.stats.across_seeds`
(mean, Student t interval, t-test p): a run's own bootstrap intervals and tests describe that seed and
are kept per seed (``lesions_per_seed.csv``), never averaged into an "interval" or a "p-value"."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from axes_pipeline.analyses.definitions import PAPER_DIRECTION, directions
from axes_pipeline.axes.settings import MetricsConfig
from axes_pipeline.layout import PRUNE_CURVES, PRUNE_SUMMARY
from axes_pipeline.report.collect import LAYER_COLS, Run
from axes_pipeline.runs import flatten
from axes_pipeline.stats import (
    DEFAULT_CI,
    PAPER_REFERENCE,
    across_seeds,
    change_verdict,
    compare_paired,
    grid_aucs,
    holm,
    mean_sd,
)
from axes_pipeline.tables import DamagedTable, Schema, check_table

AXES = ("local", "target")


def runs_table(groups: dict[str, list[Run]]) -> pd.DataFrame:
    return pd.DataFrame([{"group": g, "seed": r.seed, "experiment": r.experiment, "val_acc": r.train.get("val_acc"),
                          "test_acc": r.train.get("test_acc"), "epochs": r.train.get("epochs"),
                          "analyze": (r.path / "analyze" / "axes.csv").is_file(),
                          "prune": ", ".join(r.protocols()) or False, "environment": r.environment,
                          "run_dir": str(r.path)}
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


def unpruned_accuracy(runs: list[Run]) -> float | None:
    """The unpruned network's test accuracy over a group's pruned seeds (prune_summary.json): the
    point at 0 removed FLOPs where every pruning curve and its FLOPs-AUC start."""
    vals = [v for r in runs if isinstance(v := _prune_info(r)["acc"], (int, float)) and np.isfinite(v)]
    return float(np.mean(vals)) if vals else None


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


#: A layer's hull measure is at its own cap when its mean hull size reaches this share of
#: ``metrics.hull_max`` or this share of its channels have a saturated hull; a quantity capped in more
#: than half of the layers measures the cap, not the network, and is not compared with the paper.
HULL_CAP_SHARE = 0.99
HULL_QUANTITIES = ("hull_size_mean", "hull_saturated_frac")


def hull_max_of(run: Run) -> int:
    """The ``metrics.hull_max`` the run's axes were measured with: its analysis' fingerprint
    (``analyze/axes_fingerprint.json``, what analyze.py was given), else its config, else the schema's default."""
    for v in ((run.read_json("analyze/axes_fingerprint.json") or {}).get("metrics.hull_max"),
              run.flat_config.get("metrics.hull_max")):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return int(v)
    return MetricsConfig().hull_max


def _saturated_layers(layer_rows: pd.DataFrame, hull_max: int) -> tuple[int, int]:
    """``(saturated, layers)`` of one phase's per-layer rows (all seeds): a layer whose seed-mean hull
    size is at the cap or whose seed-mean saturated fraction is ≥ :data:`HULL_CAP_SHARE`."""
    if layer_rows.empty or "layer" not in layer_rows:
        return 0, 0
    cols = [c for c in HULL_QUANTITIES if c in layer_rows]
    per = layer_rows.groupby("layer")[cols].mean()
    sat = pd.Series(False, index=per.index)
    if "hull_size_mean" in per:
        sat |= per["hull_size_mean"] >= HULL_CAP_SHARE * hull_max
    if "hull_saturated_frac" in per:
        sat |= per["hull_saturated_frac"] >= HULL_CAP_SHARE
    return int(sat.sum()), int(len(per))


def reference_verdict(ours: dict, change: dict, paper: tuple[float, float], capped: str = "") -> str:
    """A §11 quantity in words: ``ours``: ``{phase: across_seeds(...)}``, ``change``: across_seeds of the
    per-seed trained − init (empty without init), ``paper``: its (init, trained) means.

    - "not comparable at this setting" when ``capped`` (the quantity sits at its own cap; the knob named);
    - "consistent" when every paper value lies inside our seeds' t interval of the same phase;
    - "same direction, other magnitude" when our change's interval excludes 0 on the paper's side;
    - "different" otherwise (including a trained value alone outside the interval)."""
    if capped:
        return f"not comparable at this setting: {capped}"
    phases = [ph for ph in ("init", "trained") if ph in ours and np.isfinite(ours[ph]["ci_lo"])]
    if not phases:
        return "no interval (fewer than 2 seeds)"
    ref = dict(zip(("init", "trained"), paper))
    if all(ours[ph]["ci_lo"] <= ref[ph] <= ours[ph]["ci_hi"] for ph in phases):
        return "consistent (the paper's values lie within the seeds' interval)"
    if change and np.isfinite(change.get("ci_lo", np.nan)):
        paper_dir = "rises" if paper[1] > paper[0] else "falls"
        if change_verdict(change["ci_lo"], change["ci_hi"]) == paper_dir:
            return f"same direction ({paper_dir}), other magnitude"
    return "different"


def reference_table(groups: dict[str, list[Run]]) -> pd.DataFrame:
    """Ours beside the paper's METHODS §11 values, one row per group and quantity, with a verdict.

    Each seed gives one value per phase (the mean over its layers); across seeds: mean, SD and Student
    t interval (:func:`across_seeds`), and the per-seed change trained − init with its interval. With
    dynamics results, "init" and "trained" are the first and last checkpointed epoch of the six
    depth-spaced layers (the paper's protocol; ``trained_at`` names the epoch); otherwise "trained" is
    the analysed checkpoint over all analysed layers and there is no init. A hull quantity at its own
    cap (``metrics.hull_max``) in most layers is marked not comparable, naming the knob.
    """
    rows = []
    for g, runs in groups.items():
        per: dict[str, dict[str, dict[int, float]]] = {k: {"init": {}, "trained": {}} for k in PAPER_REFERENCE}
        layer_rows: dict[str, list[pd.DataFrame]] = {"init": [], "trained": []}
        source, epochs = "", set()
        hull_max = max((hull_max_of(r) for r in runs), default=MetricsConfig().hull_max)
        for r in runs:
            dyn = r.read_csv("analyze/dynamics.csv")
            if dyn is not None and "epoch" in dyn and len(dyn):
                source = "dynamics: six depth-spaced layers, first vs last epoch"
                first, last = dyn[dyn.epoch == dyn.epoch.min()], dyn[dyn.epoch == dyn.epoch.max()]
                epochs.add(int(dyn.epoch.max()))
                layer_rows["init"].append(first)
                layer_rows["trained"].append(last)
                for k in per:
                    if k in dyn:
                        per[k]["init"][r.seed] = float(first[k].mean())
                        per[k]["trained"][r.seed] = float(last[k].mean())
                continue
            lay = r.read_csv("analyze/layers.csv")
            if lay is not None:
                source = source or "all analysed layers; no init without dynamics"
                layer_rows["trained"].append(lay)
                for k in per:
                    if k in lay:
                        per[k]["trained"][r.seed] = float(lay[k].mean())
        if not any(v for k in per for v in per[k].values()):
            continue
        trained_at = (f"epoch {', '.join(map(str, sorted(epochs)))}" if epochs else "the analysed checkpoint")
        capped = ""
        for ph in ("trained", "init"):
            if layer_rows[ph]:
                n_sat, n_lay = _saturated_layers(pd.concat(layer_rows[ph], ignore_index=True), hull_max)
                if n_lay and n_sat > n_lay / 2:
                    capped = (f"the hull is at its cap in {n_sat} of {n_lay} layers ({ph}); raise metrics.hull_max "
                              f"(now {hull_max}) until fewer than half the layers reach it")
                    break
        for k in per:
            ours = {ph: across_seeds(list(per[k][ph].values())) for ph in ("init", "trained") if per[k][ph]}
            seeds = sorted(set(per[k]["init"]) & set(per[k]["trained"]))
            change = (across_seeds([per[k]["trained"][s] - per[k]["init"][s] for s in seeds]) if seeds else {})
            paper = (PAPER_REFERENCE[k]["init"][0], PAPER_REFERENCE[k]["trained"][0])
            row = {"group": g, "quantity": k}
            for ph in ("init", "trained"):
                o = ours.get(ph, {})
                row.update({f"{ph}_mean": o.get("mean", np.nan), f"{ph}_sd": o.get("sd", np.nan),
                            f"{ph}_ci_lo": o.get("ci_lo", np.nan), f"{ph}_ci_hi": o.get("ci_hi", np.nan)})
            row.update(change_mean=change.get("mean", np.nan), change_ci_lo=change.get("ci_lo", np.nan),
                       change_ci_hi=change.get("ci_hi", np.nan),
                       seeds=max((o["n"] for o in ours.values()), default=0),
                       paper_init_mean=paper[0], paper_init_sd=PAPER_REFERENCE[k]["init"][1],
                       paper_trained_mean=paper[1], paper_trained_sd=PAPER_REFERENCE[k]["trained"][1],
                       verdict=reference_verdict(ours, change, paper, capped if k in HULL_QUANTITIES else ""),
                       trained_at=trained_at, source=source)
            rows.append(row)
    return pd.DataFrame(rows)


def definitions_table(groups: dict[str, list[Run]]) -> pd.DataFrame:
    """Per group, definition (activation point × sampling) and quantity: the init and trained values as
    mean ± SD over seeds, the per-seed change with its t interval, the direction read off it and whether
    it is the paper's (:func:`~axes_pipeline.analyses.definitions.directions`; analysis=definitions)."""
    out = []
    for g, runs in groups.items():
        frames = [f.assign(seed=r.seed) for r in runs if (f := r.read_csv("analyze/definitions.csv")) is not None]
        if frames:
            allf = pd.concat(frames, ignore_index=True)
            d = directions(allf).assign(group=g)
            if "trained_ckpt" in allf:     # which checkpoint "trained" is: named on the page
                d["trained_checkpoint"] = ", ".join(sorted(set(allf["trained_ckpt"].dropna().astype(str))))
            out.append(d)
    if not out:
        return pd.DataFrame()
    df = pd.concat(out, ignore_index=True)
    return df[["group", *[c for c in df.columns if c != "group"]]]


def per_seed_values(groups: dict[str, list[Run]], rel: str) -> pd.DataFrame:
    """Every numeric field of a per-run JSON summary (lesions...) in long form: group, seed, quantity, value.
    Nothing is pooled: a seed's own intervals and tests (``ci_lo``, ``p_f``) stay labelled by their seed."""
    rows = [{"group": g, "seed": r.seed, "quantity": k, "value": v}
            for g, runs in groups.items() for r in runs for k, v in _numeric(r.read_json(rel)).items()]
    return pd.DataFrame(rows, columns=["group", "seed", "quantity", "value"])


#: the last part of a summary key that names a within-seed interval end or test: such a number says
#: something about its seed's channels only, so it is never carried across seeds
WITHIN_SEED = ("ci_lo", "ci_hi", "ci_adj_lo", "ci_adj_hi", "p_f", "p")


def within_seed(quantity: str) -> bool:
    return str(quantity).rsplit(".", 1)[-1] in WITHIN_SEED


def across_seed_table(per_seed: pd.DataFrame) -> pd.DataFrame:
    """One row per group and estimate of :func:`per_seed_values`: the across-seed mean, SD, Student t
    interval and t-test p (against 0) of the per-seed values. Within-seed intervals and p-values
    (:data:`WITHIN_SEED`) are left out: averaging them is neither an interval nor a test."""
    cols = ["group", "quantity", "mean", "sd", "ci_lo", "ci_hi", "p", "seeds"]
    rows = []
    if per_seed.empty:
        return pd.DataFrame(rows, columns=cols)
    for (g, q), d in per_seed.groupby(["group", "quantity"], sort=False):
        if within_seed(q):
            continue
        r = across_seeds(d["value"].to_numpy(float))
        rows.append({"group": g, "quantity": q, "mean": r["mean"], "sd": r["sd"], "ci_lo": r["ci_lo"],
                     "ci_hi": r["ci_hi"], "p": r["p"], "seeds": r["n"]})
    return pd.DataFrame(rows, columns=cols)


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
    """Per group and pairing of axes: each seed's ρ (mean over its layer pairs) and its shuffled-weights
    null; across seeds the mean ρ with its t interval and the paired ρ − null with its t interval and p."""
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
            r = across_seeds(d["rho"].to_numpy(float))
            row = {"group": g, "pairing": p, "rho_mean": r["mean"], "rho_sd": r["sd"], "rho_ci_lo": r["ci_lo"],
                   "rho_ci_hi": r["ci_hi"], "seeds": r["n"]}
            if "null_rho" in d:
                x = across_seeds((d["rho"] - d["null_rho"]).to_numpy(float))
                row.update(null_rho_mean=float(d["null_rho"].mean()), above_null_mean=x["mean"],
                           above_null_ci_lo=x["ci_lo"], above_null_ci_hi=x["ci_hi"], above_null_p=x["p"])
            rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- across-seed verdicts of the analyses

def _verdict_row(g: str, quantity: str, first: dict[int, float], last: dict[int, float]) -> dict:
    """One quantity's init → trained across seeds: each phase's mean ± SD, the per-seed change with its
    Student t interval and p, the direction read off it, the paper's direction and whether they match."""
    seeds = sorted(set(first) & set(last))
    change = across_seeds([last[s] - first[s] for s in seeds])
    a, b = across_seeds(list(first.values())), across_seeds(list(last.values()))
    paper = PAPER_DIRECTION.get(quantity)
    verdict = change_verdict(change["ci_lo"], change["ci_hi"])
    return {"group": g, "quantity": quantity, "first_mean": a["mean"], "first_sd": a["sd"], "last_mean": b["mean"],
            "last_sd": b["sd"], "change_mean": change["mean"], "change_ci_lo": change["ci_lo"],
            "change_ci_hi": change["ci_hi"], "change_p": change["p"], "direction": verdict,
            "paper_direction": paper or "not stated",
            "matches_paper": None if paper is None or change["n"] < 2 else verdict == paper, "seeds": change["n"]}


def dynamics_table(groups: dict[str, list[Run]]) -> pd.DataFrame:
    """Per group and METHODS §6 quantity: first and last checkpointed epoch (each seed's mean over its
    layers), the per-seed change with its t interval over seeds and its direction against the paper's.
    ``epochs`` names the first and last epoch: the paper's "trained" is after 100 epochs."""
    rows = []
    for g, runs in groups.items():
        first: dict[str, dict[int, float]] = {}
        last: dict[str, dict[int, float]] = {}
        epochs = set()
        for r in runs:
            dyn = r.read_csv("analyze/dynamics.csv")
            if dyn is None or "epoch" not in dyn or not len(dyn):
                continue
            lo, hi = int(dyn.epoch.min()), int(dyn.epoch.max())
            epochs.add((lo, hi))
            for q in PAPER_DIRECTION:
                if q in dyn:
                    first.setdefault(q, {})[r.seed] = float(dyn.loc[dyn.epoch == lo, q].mean())
                    last.setdefault(q, {})[r.seed] = float(dyn.loc[dyn.epoch == hi, q].mean())
        for q in first:
            rows.append({**_verdict_row(g, q, first[q], last[q]),
                         "epochs": "; ".join(f"{lo} → {hi}" for lo, hi in sorted(epochs))})
    return pd.DataFrame(rows)


#: the alignment columns of layers.csv summarised across seeds (METHODS §4: H1)
ALIGNMENT = ("align_input_capture_task_info", "align_peer_overlap_target_excess", "align_hull_score_task_unique",
             "modularity_gap", "nmi", "ari")


def alignment_table(groups: dict[str, list[Run]]) -> pd.DataFrame:
    """Per group and alignment quantity: each seed's mean over its analysed layers, then across seeds the
    mean, SD, Student t interval and t-test p against 0 (H1: weak alignment, different groupings)."""
    rows = []
    for g, runs in groups.items():
        per: dict[str, list[float]] = {}
        for r in runs:
            lay = r.read_csv("analyze/layers.csv")
            if lay is None:
                continue
            for q in ALIGNMENT:
                if q in lay:
                    per.setdefault(q, []).append(float(lay[q].mean()))
        for q, vals in per.items():
            a = across_seeds(vals)
            rows.append({"group": g, "quantity": q, "mean": a["mean"], "sd": a["sd"], "ci_lo": a["ci_lo"],
                         "ci_hi": a["ci_hi"], "p": a["p"], "seeds": a["n"]})
    return pd.DataFrame(rows)


def linear_gaussian_table(groups: dict[str, list[Run]]) -> pd.DataFrame:
    """The synthetic linear-Gaussian study (METHODS §5) of every seed: ρ(I_X, I_T) at init and after
    training, the change with its t interval over seeds, the largest whitened cosine (the check, ~1e-12).
    ``identical``: every seed computed the same study (one fixed ``analysis.linear_gaussian.seed``): then
    the seeds are one draw repeated, not replicates, and the interval is not shown."""
    rows = []
    for g, runs in groups.items():
        init, trained, cos = {}, {}, []
        for r in runs:
            lg = r.read_csv("analyze/linear_gaussian.csv")
            if lg is None or "rho_axes" not in lg or not len(lg):
                continue
            lg = lg.sort_values("step")
            init[r.seed], trained[r.seed] = float(lg.rho_axes.iloc[0]), float(lg.rho_axes.iloc[-1])
            if "cos_whitened_max" in lg:
                cos.append(float(lg.cos_whitened_max.max()))
        if not init:
            continue
        row = _verdict_row(g, "align_input_capture_task_info", init, trained)
        identical = len(init) > 1 and len({(init[s], trained[s]) for s in init}) == 1
        if identical:
            row.update(change_ci_lo=np.nan, change_ci_hi=np.nan, change_p=np.nan, direction="—", matches_paper=None)
        rows.append({**row, "cos_whitened_max": max(cos) if cos else np.nan, "identical": identical})
    return pd.DataFrame(rows)
