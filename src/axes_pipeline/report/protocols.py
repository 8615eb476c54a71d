"""Does the answer depend on the allocation? The headline under every pruning protocol found (issue 29).

A score ranks channels inside a layer and, under a global threshold, also decides how many each layer
loses, so "local beats target" may be a property of the ranking or of the allocation. Every protocol
(``prune/<protocol>/``, :mod:`axes_pipeline.pruning.protocol`) is its own result: seeds are paired only
within one protocol, and each protocol's best local and best target score are chosen on validation *within
that protocol* (never across protocols: picking the protocol that favours one axis would be selection on the
answer), measured on test, with a paired Student t interval (METHODS §9). Three outputs:

- ``protocols.csv``: one headline row per group and protocol, with a verdict relative to the default
  protocol's headline (same sign and the CI excludes 0 / same sign, n.s. / opposite sign);
- ``protocol_grid.csv``: ranking × counts, the FLOPs-AUC (mean ± SD over seeds) of the chosen scores and the
  baselines (rows) under each protocol's allocation (columns);
- ``kept_fraction_<group>_<protocol>.png``: where each protocol's allocation prunes, from every seed's
  ``layer_allocation.csv`` (kept fraction per layer, seeds and draws averaged).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from axes_pipeline.layout import LAYER_ALLOCATION, PROTOCOL_FILE, PRUNE_CURVES
from axes_pipeline.pruning.plots import plot_kept_fraction
from axes_pipeline.pruning.protocol import DEFAULT_NAME, describe
from axes_pipeline.report import tables
from axes_pipeline.report.collect import Run
from axes_pipeline.stats import across_seeds, mean_sd

__all__ = ["BASELINES", "HOW", "TITLE", "VERDICTS", "headline_groups", "kept_fraction_figures", "parts",
           "protocol_tables", "verdict"]

TITLE = "Does the answer depend on the allocation?"
HOW = ("Each pruning protocol (allocation, its normalisation, counts source, fine-tune budget...) is its own result: "
       "one row per protocol with its headline, best local − best target, each chosen on validation within that "
       "protocol and measured on test, with its paired Student t 95% CI over seeds, and a verdict against the "
       "default protocol's headline. The grid ranks channels by a score (rows) inside each protocol's per-layer "
       "counts (columns): FLOPs-AUC mean ± SD over seeds. The figures show where each allocation prunes.")
#: the verdict of a protocol's headline against the default protocol's (the default row: the reference)
VERDICTS = ("reference (default protocol)", "same sign, CI excludes 0", "same sign, n.s.", "opposite sign",
            "no reference")
#: the baselines every grid shows beside the chosen scores
BASELINES = ("taylor", "l1", "random")

_CHOSEN = re.compile(r"best local \((.*?)\) − best target \((.*?)\)")


def headline_groups(by_protocol: dict[str, dict[str, list[Run]]]) -> tuple[dict[str, list[Run]], list[str]]:
    """The groups the page opens on: the default protocol's; a group with no seed pruned under it takes the
    first other protocol found, said in a notice (never a silent "no pruning results")."""
    main = dict(by_protocol.get(DEFAULT_NAME, {}))
    notices = []
    have = {_base(label) for label in main}
    for name, groups in sorted(by_protocol.items()):
        for label, runs in groups.items():
            if name == DEFAULT_NAME or _base(label) in have:
                continue
            have.add(_base(label))
            main[label] = runs
            notices.append(f"{label}: no seed was pruned under the default protocol; the headline and the pruning "
                           f"tables show protocol {name} ({_label(runs)})")
    return main, notices


def _base(label: str) -> str:
    """A group's label without the split a protocol's settings added (``<group> [prune <sig>]``)."""
    return re.sub(r" \[prune [0-9a-f]+\]$", "", label)


def _record(runs: list[Run]) -> dict:
    for r in runs:
        rec = r.read_json(r.prune_rel(PROTOCOL_FILE))
        if isinstance(rec, dict):
            return rec
    return {}


def _label(runs: list[Run]) -> str:
    rec = _record(runs)
    return rec.get("label") or (describe(rec["settings"]) if rec.get("settings") else "settings not recorded")


def counts_source(settings: dict) -> str:
    """What decides a protocol's per-layer counts, in a few words (a grid's column)."""
    if not settings:
        return "?"
    alloc = settings.get("allocation", "?")
    if alloc == "hybrid":
        alloc = f"{settings.get('hybrid_counts_from')} counts"
    norm = settings.get("normalize", "minmax")
    if norm != "minmax" and settings.get("allocation") in ("global", "knapsack", "hybrid"):
        alloc += f" ({norm})"
    return alloc


def protocol_accuracy(settings: dict, accuracy: str) -> str:
    """The accuracy column a protocol's headline reads: after its recovery budget when it has one (a
    fine-tune budget is the protocol's point: its curves before the fine-tune are the budget-0 protocol's),
    else the report's ``accuracy``."""
    return accuracy.replace("before_ft", "after_ft") if settings.get("finetune") else accuracy


def verdict(diff: float, lo: float, hi: float, ref: float | None, is_default: bool) -> str:
    """A protocol's headline against the default protocol's difference ``ref`` (:data:`VERDICTS`)."""
    if is_default:
        return VERDICTS[0]
    if ref is None or _nan(ref) or _nan(diff) or ref == 0 or diff == 0:
        return VERDICTS[4]
    if (diff > 0) != (ref > 0):
        return VERDICTS[3]
    return VERDICTS[1] if not (_nan(lo) or _nan(hi)) and (lo > 0 or hi < 0) else VERDICTS[2]


def _nan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def protocol_tables(by_protocol: dict[str, dict[str, list[Run]]], accuracy: str, *, min_n: int, n_boot: int,
                    method: str, seed: int = 0) -> dict[str, pd.DataFrame]:
    """``protocols`` (one headline row per group and protocol) and ``protocol_grid`` (one row per group,
    ranking score and protocol), both empty with fewer than two protocols or without headlines."""
    rows, grid = [], []
    for name in sorted(by_protocol, key=lambda p: (p != DEFAULT_NAME, p)):
        for label, runs in by_protocol[name].items():
            rec = _record(runs)
            settings = rec.get("settings") or {}
            column = protocol_accuracy(settings, accuracy)
            per_seed = tables.auc_per_seed({label: runs}, column)
            head = tables.headline(per_seed, min_n=min_n, n_boot=n_boot, method=method, seed=seed, ci="t")
            first = head[head["comparison"].str.startswith("best local (")] if not head.empty else head
            row = {"group": _base(label), "protocol": name, "protocol_label": _label(runs),
                   "counts": counts_source(settings), "accuracy": column, "fingerprint": rec.get("fingerprint"),
                   "seeds": int(per_seed["seed"].nunique()) if not per_seed.empty else 0}
            chosen = ()
            if not first.empty:
                h = first.iloc[0]
                chosen = _CHOSEN.match(h["comparison"]).groups()
                row.update({"best_local": chosen[0], "best_target": chosen[1], "local": h["mean_a"],
                            "target": h["mean_b"], "diff": h["diff"], "ci_lo": h["ci_lo"], "ci_hi": h["ci_hi"],
                            "p_value": h["p_value"], "ci_method": h["ci_method"]})
            rows.append(row)
            if per_seed.empty:
                continue
            for score, d in per_seed.groupby("score"):
                role = ("best local" if chosen[:1] == (score,) else "best target" if chosen[1:] == (score,)
                        else "baseline" if score in BASELINES else None)
                m, sd, n = mean_sd(d["flops_auc"])
                grid.append({"group": _base(label), "score": score, "axis": d["axis"].iloc[0], "chosen_as": role,
                             "protocol": name, "counts": row["counts"], "flops_auc_mean": m, "flops_auc_sd": sd,
                             "seeds": n})
    protocols = pd.DataFrame(rows)
    if protocols.empty or protocols["protocol"].nunique() < 2:
        return {"protocols": pd.DataFrame(), "protocol_grid": pd.DataFrame(), "protocol_scratch": pd.DataFrame()}
    ref = {g: d.iloc[0].get("diff") for g, d in protocols[protocols["protocol"] == DEFAULT_NAME].groupby("group")}
    protocols["verdict"] = [verdict(r.get("diff", math.nan), r.get("ci_lo", math.nan), r.get("ci_hi", math.nan),
                                    ref.get(r["group"]), r["protocol"] == DEFAULT_NAME) for _, r in protocols.iterrows()]
    grid = pd.DataFrame(grid)
    if not grid.empty:   # rows: a score chosen in any protocol of the group, and the baselines
        shown = grid.groupby(["group", "score"])["chosen_as"].transform(lambda c: c.notna().any())
        grid = grid[shown].reset_index(drop=True)
    return {"protocols": protocols, "protocol_grid": grid, "protocol_scratch": scratch_table(by_protocol, protocols)}


def scratch_table(by_protocol: dict[str, dict[str, list[Run]]], protocols: pd.DataFrame) -> pd.DataFrame:
    """Per group and protocol with scratch-trained points (``pruning.scratch=true``): best local − best
    target (the protocol's chosen pair) in accuracy at the points both were trained from scratch, one
    estimate per seed (the mean over those targets), across seeds with its t interval; beside it the same
    difference with the pruned weights kept (``acc_after_ft``, the protocol's budget) at the same points."""
    rows = []
    for _, p in protocols.iterrows():
        local, target = p.get("best_local"), p.get("best_target")
        if not (isinstance(local, str) and isinstance(target, str)):
            continue
        runs = next((rs for label, rs in by_protocol.get(p["protocol"], {}).items() if _base(label) == p["group"]), [])
        scratch, kept, targets = [], [], set()
        for r in runs:
            c = r.read_csv(r.prune_rel(PRUNE_CURVES))
            if c is None or "acc_scratch" not in c or "acc_after_ft" not in c:
                continue
            c = c[c["acc_scratch"].notna() & (c["draw"] == 0)]
            a = c[c["score"] == local].set_index("target_flops")
            b = c[c["score"] == target].set_index("target_flops")
            both = sorted(set(a.index) & set(b.index))
            if both:
                targets |= set(both)
                scratch.append(float((a.loc[both, "acc_scratch"] - b.loc[both, "acc_scratch"]).mean()))
                kept.append(float((a.loc[both, "acc_after_ft"] - b.loc[both, "acc_after_ft"]).mean()))
        if not scratch:
            continue
        sc, kp = across_seeds(scratch), across_seeds(kept)
        rows.append({"group": p["group"], "protocol": p["protocol"], "best_local": local, "best_target": target,
                     "targets": " ".join(f"{t:g}" for t in sorted(targets, reverse=True)), "seeds": sc["n"],
                     "scratch_diff": sc["mean"], "scratch_ci_lo": sc["ci_lo"], "scratch_ci_hi": sc["ci_hi"],
                     "kept_diff": kp["mean"], "kept_ci_lo": kp["ci_lo"], "kept_ci_hi": kp["ci_hi"]})
    return pd.DataFrame(rows)


def headline_figure(protocols: pd.DataFrame, out: Path, min_seeds: int) -> dict[str, Path]:
    """The headline difference of every protocol (allocation, schedule, budget) with its t interval,
    one forest per report: which protocol moves the answer, at a glance."""
    if protocols is None or protocols.empty or "diff" not in protocols:
        return {}
    from axes_pipeline.report.figures import headline_forest  # deferred: matplotlib, only with protocols

    rows = protocols.assign(comparison=[f"{p}: {lab}" for p, lab in zip(protocols["protocol"],
                                                                        protocols["protocol_label"])])
    return {"headline per protocol": headline_forest(rows, out / "headline_protocols.png", min_seeds=min_seeds,
                                                      ci_label="paired Student t 95% CI")}


def kept_fraction_figures(by_protocol: dict[str, dict[str, list[Run]]], protocols: pd.DataFrame,
                          out: Path) -> dict[str, Path]:
    """``kept_fraction_<group>_<protocol>.png`` per group and protocol, from every seed's layer_allocation.csv,
    with the protocol's chosen best local and best target score and taylor."""
    figs = {}
    chosen = {} if protocols.empty else {(r["group"], r["protocol"]): r for _, r in protocols.iterrows()}
    for name, groups in by_protocol.items():
        for label, runs in groups.items():
            frames = [f for r in runs if (f := r.read_csv(r.prune_rel(LAYER_ALLOCATION))) is not None]
            if not frames:
                continue
            row = chosen.get((_base(label), name), {})
            summary = {"best_local": {"score": row.get("best_local")} if isinstance(row.get("best_local"), str) else None,
                       "best_target": {"score": row.get("best_target")} if isinstance(row.get("best_target"), str)
                       else None, "protocol": {"label": f"{label}, {name}: {_label(runs)}"}}
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{label}_{name}")
            made = plot_kept_fraction(pd.concat(frames, ignore_index=True), summary, out,
                                      name=f"kept_fraction_{safe}.png")
            if made:
                figs[f"kept fraction: {label} · {name}"] = made["kept_fraction"]
    return figs


def parts(t: dict, figs: dict, table, text, pm) -> list[dict]:
    """The section's parts: the protocols table, the ranking × counts grid, the kept-fraction figures.
    ``table(df, title)`` / ``text(s)`` / ``pm(mean, sd)``: the page's own part builders and number format."""
    prot, grid = t.get("protocols"), t.get("protocol_grid")
    if prot is None or prot.empty:
        return []
    cols = [c for c in ("group", "protocol", "protocol_label", "counts", "seeds", "best_local", "best_target", "local",
                        "target", "diff", "ci_lo", "ci_hi", "p_value", "verdict") if c in prot]
    out = [{"kind": "figure", "label": "headline per protocol"}] if "headline per protocol" in figs else []
    out.append(table(prot[cols].rename(columns={"diff": "local − target", "p_value": "p"}),
                     "The headline under each protocol (paired Student t 95% CI; all rows: protocols.csv)"))
    if grid is not None and not grid.empty:
        # one row per ranking score; ★ marks the cell where it is its axis' best within that protocol
        wide = grid.assign(cell=[pm(m, s) + (" ★" if isinstance(c, str) and c.startswith("best") else "")
                                 for m, s, c in zip(grid["flops_auc_mean"], grid["flops_auc_sd"], grid["chosen_as"])],
                           ranking=[f"{s} ({a})" for s, a in zip(grid["score"], grid["axis"])])
        for g, d in wide.groupby("group", sort=False):
            # one column per protocol, named by its counts source (and by the protocol where two share one)
            shared = d.groupby("counts")["protocol"].transform("nunique") > 1
            d = d.assign(column=[f"{c} [{p}]" if s else c for c, p, s in zip(d["counts"], d["protocol"], shared)])
            view = d.pivot_table(index="ranking", columns="column", values="cell", aggfunc="first").reset_index()
            out.append(table(view.fillna("—"), f"{g}: ranking (rows) × counts (columns), FLOPs-AUC mean ± SD over "
                                               "seeds; ★ the best of its axis in that protocol (protocol_grid.csv)"))
    scratch = t.get("protocol_scratch")
    if scratch is not None and not scratch.empty:
        out.append(table(scratch, "Trained from scratch (pruning.scratch=true): best local − best target in accuracy "
                                  "at the scratch points, per-seed mean, t 95% CI; beside it the same points with "
                                  "the pruned weights kept (protocol_scratch.csv)"))
        out.append(text("What the scratch comparison means (Liu et al. 2019): the difference with the pruned weights "
                        "kept credits a score with the weights it keeps and the widths it picks; trained from "
                        "scratch, only the widths (the architecture) remain. A difference that survives scratch "
                        "training says the score picks better layer widths; one that vanishes says its advantage "
                        "was in the weights it kept."))
    out += [{"kind": "figure", "label": label} for label in figs if label.startswith("kept fraction: ")]
    out.append(text("Within each protocol the best scores are chosen on validation; no score or protocol is ever "
                    "chosen across protocols (METHODS §9). A protocol with a fine-tune budget is measured after its "
                    "fine-tune (acc_after_ft: its curves before it are the budget-0 protocol's), the others before "
                    "any; the `accuracy` column of protocols.csv says which."))
    return out

