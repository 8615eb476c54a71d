"""run_report(cfg): one report over a sweep directory or a list of runs.

Writes ``report.md``, ``report.html`` (plots inlined: one file to open), the tables as CSV and the
figures as PNG, and logs the tables to wandb when enabled. Any stage may be missing from any run:
its section then says so instead of failing.

Both pages are rendered from the Jinja2 templates in ``report/templates/`` out of one context
(:func:`page_context`): the answer first (headline figure, pruning curves, headline table with a
verdict in words), then one section per stage, each opening with how to read it. Every number on
the page goes through :func:`fmt` (3 significant digits, CIs as ``[lo, hi]``) and every path is
relative to the sweep.
"""

from __future__ import annotations

import base64
import math
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup
from omegaconf import DictConfig, OmegaConf

from axes_pipeline.analyses.definitions import LABELS, plot_definitions, reproduces_init_coupling
from axes_pipeline.errors import UserError
from axes_pipeline.layout import RUN_KINDS
from axes_pipeline.report import figures, protocols, tables
from axes_pipeline.report.collect import (
    chain_notices,
    discover,
    group_runs,
    provenance_notices,
    require_runs,
    resolve_roots,
    skipped_inputs,
    split_by_axes,
    split_by_pruning,
)
from axes_pipeline.report.settings import ReportConfig
from axes_pipeline.runs import write_csv, write_json, write_text
from axes_pipeline.stage import stage_inputs
from axes_pipeline.stats import CI_COVERAGE, CI_METHODS, change_verdict
from axes_pipeline.tracking import StageTracker, TrackedRun, log_report

TESTS = ("wilcoxon", "permutation")


@dataclass(frozen=True)
class ReportInputs:
    """What a report reads of its stage's config: its own block, the experiment's name, the output root,
    how the runs' axes were measured by default (named in the definitions section) and the whole config
    (recorded in ``report_summary.json``)."""

    report: ReportConfig
    name: str
    root: Path
    definition: str = "pre_bn/sample"    # capture.point/capture.spatial
    config: dict = field(default_factory=dict, repr=False)
    tracked: TrackedRun | None = field(default=None, repr=False)


def _roots(ri: ReportInputs) -> list[Path]:
    rc = ri.report
    if rc.runs:
        return resolve_roots(list(rc.runs))
    if rc.sweep:   # a relative sweep lies below the output root, as the runs train.py -m wrote
        return resolve_roots([rc.sweep], under=ri.root)
    cands = [ri.root / kind / ri.name for kind in reversed(RUN_KINDS)]   # multirun/<name>, then runs/<name>
    found = [c for c in cands if c.exists()]
    if not found:
        raise UserError(f"report: neither {cands[0]} nor {cands[1]} exists; pass report.sweep=DIR or "
                        f"report.runs=[DIR,...] (run train.py first)")
    return found[:1]


def report_dir(ri: ReportInputs) -> Path:
    """Where this report is written: report.out, else <first sweep root>/report when that lies inside the output
    root, else <output root>/reports/<name> (no stage writes outside paths.output_root unless told to)."""
    if ri.report.out:
        return Path(ri.report.out).resolve()
    try:
        first = _roots(ri)[0]
    except UserError:
        return ri.root / "reports" / ri.name
    return first / "report" if ri.root == first or ri.root in first.parents else ri.root / "reports" / ri.name


def _with_counts(layers: pd.DataFrame, groups) -> pd.DataFrame:
    """Add ``<quantity>_n``: the seeds whose value of that quantity is defined (not NaN) in that
    layer. ``seeds`` counts the runs that have the layer; a quantity undefined in some seed (an
    alignment over constant channels) is averaged over fewer, and the report must say so."""
    if layers.empty:
        return layers
    frames = [f.assign(seed=r.seed, group=g) for g, runs in groups.items() for r in runs
              if (f := r.read_csv("analyze/layers.csv")) is not None]
    allf = pd.concat(frames)
    cols = [c[: -len("_mean")] for c in layers.columns if c.endswith("_mean") and c[: -len("_mean")] in allf]
    counts = allf.groupby(["group", "layer_index", "layer"])[cols].count().add_suffix("_n").reset_index()
    return layers.merge(counts, on=["group", "layer_index", "layer"], how="left")


def report_inputs(cfg: DictConfig) -> ReportInputs:
    """The report's inputs from its stage's config (the entry's one read of it)."""
    inputs = stage_inputs(cfg)
    capture = inputs.knobs.capture
    return ReportInputs(OmegaConf.to_object(cfg.report), inputs.id.name, inputs.run.root,
                        f"{capture.point}/{capture.spatial}", inputs.config, inputs.tracked)


def run_report(cfg: DictConfig) -> dict:
    ri = report_inputs(cfg)
    rc = ri.report
    if rc.test not in TESTS:
        raise UserError(f"report.test must be one of {', '.join(TESTS)}, got {rc.test}")
    if rc.ci not in CI_METHODS:
        raise UserError(f"report.ci must be one of {', '.join(CI_METHODS)}, got {rc.ci}")
    t0 = time.perf_counter()
    roots = _roots(ri)
    skipped: list[dict] = []
    runs = discover(roots, skipped)
    require_runs(runs, roots)
    groups, notices = group_runs(runs)
    by_protocol, prune_notices = split_by_pruning(groups)        # seeds are paired only within one protocol
    prune_groups, main_notices = protocols.headline_groups(by_protocol)   # the page opens on the default one
    prune_notices += main_notices
    axes_groups, axes_notices = split_by_axes(groups)   # the analysis tables pool only equal fingerprints
    notices = notices + prune_notices + axes_notices + provenance_notices(groups) + chain_notices(groups)
    out = report_dir(ri)
    out.parent.mkdir(parents=True, exist_ok=True)
    for old in remove_stale_tmp(out):
        print(f"report: removed {old}, left by a report that was killed")
    # Built in a temporary folder next to the final one and moved in only when complete: a report
    # that fails half way leaves the previous one as it was. Its name says who builds it, so the
    # next report removes it if that process was killed (:func:`remove_stale_tmp`).
    tmp = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(out)}{os.getpid()}@{socket.gethostname()}-", dir=out.parent))
    try:
        summary, t, figs = _build(ri, tmp, roots, runs, groups, prune_groups, notices, skipped, t0, axes_groups,
                                  by_protocol)
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    figs = {label: out / p.name for label, p in figs.items()}

    tracker = StageTracker(ri.tracked, "report", out)
    try:
        for name, df in t.items():
            if df is not None and not df.empty:
                tracker.table(f"report/{name}", df)
        for p in figs.values():
            tracker.image(f"report/{p.stem}", p)
        log_report(tracker, runs, out, t.get("headline"), ri.name)
    finally:
        tracker.finish()
    for n in notices:
        print(f"report: note: {n}")
    for sk in summary["skipped"]:
        print(f"report: skipped: seed {sk['seed']} {sk['file']}: {sk['reason']}")
    print(f"report: {len(runs)} runs in {len(groups)} group(s) -> {out / 'report.html'}")
    return summary


def _tmp_prefix(out: Path) -> str:
    return f".{out.name}.tmp-"


#: another machine's temporary report folder (a shared file system) is removed only at this age:
#: its process cannot be looked up from here, and no report takes a day to build
STALE_ELSEWHERE_S = 24 * 3600


def remove_stale_tmp(out: Path) -> list[Path]:
    """Remove the temporary folders of reports into ``out`` whose process is gone (a kill -9, a lost
    node); return them. A folder of a report still running on this machine is left alone (two reports
    at once), one of another machine only once it is a day old, one of an older version (no owner in
    its name) always."""
    gone = []
    owner = re.compile(re.escape(_tmp_prefix(out)) + r"(?P<pid>\d+)@(?P<host>.+)-[a-z0-9_]+$")
    for d in out.parent.glob(f"{_tmp_prefix(out)}*"):
        m = owner.match(d.name)
        if m is None:
            stale = True
        elif m["host"] == socket.gethostname():
            stale = not _alive(int(m["pid"]))
        else:
            try:
                stale = time.time() - d.stat().st_mtime > STALE_ELSEWHERE_S
            except OSError:
                stale = False
        if stale and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)       # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process: alive
        return True
    return True


def _build(ri: ReportInputs, out: Path, roots, runs, groups, prune_groups, notices, skipped, t0,
           axes_groups=None, by_protocol=None) -> tuple[dict, dict, dict]:
    """Every table, figure and page of the report, written under ``out`` (the temporary folder).
    ``prune_groups`` / ``axes_groups``: ``groups`` split where seeds were pruned / analysed differently;
    ``by_protocol``: ``{protocol: groups}``, every pruning protocol found (report/protocols.py)."""
    rc, accuracy = ri.report, ri.report.accuracy
    axes_groups = groups if axes_groups is None else axes_groups
    t = {
        "runs": tables.runs_table(groups),
        "flops_auc": tables.auc_table(per_seed := tables.auc_per_seed(prune_groups, accuracy)),
        "flops_auc_per_seed": per_seed,
        "accuracy_by_target": tables.accuracy_by_target(prune_groups, accuracy),
        "headline": tables.headline(per_seed, min_n=int(rc.min_seeds), n_boot=int(rc.n_boot), method=rc.test,
                                    seed=int(rc.seed), ci=rc.ci),
        "layers": _with_counts(tables.layers_table(axes_groups), axes_groups),
        "reference": tables.reference_table(axes_groups),
        "lesions_per_seed": (les_seed := tables.per_seed_values(axes_groups, "analyze/lesion_summary.json")),
        "lesions": tables.across_seed_table(les_seed),
        "propagation": tables.propagation_table(axes_groups),
        "definitions": tables.definitions_table(axes_groups),
        "alignment": tables.alignment_table(axes_groups),
        "dynamics": tables.dynamics_table(groups),
        "linear_gaussian": tables.linear_gaussian_table(groups),
    }
    t["backbones"] = tables.backbones_table(t["headline"])
    # issue 29: the headline under every pruning protocol found, and where each allocation prunes
    t.update(protocols.protocol_tables(by_protocol or {}, accuracy, min_n=int(rc.min_seeds), n_boot=int(rc.n_boot),
                                       method=rc.test, seed=int(rc.seed)))
    for name, df in t.items():
        if df is not None and not df.empty:
            write_csv(out / f"{name}.csv", df)

    figs: dict[str, Path] = {}
    if not t["accuracy_by_target"].empty:
        for g in t["accuracy_by_target"]["group"].unique():
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in g)
            figs[f"pruning curves: {g}"] = figures.pruning_curves(
                t["accuracy_by_target"], g, out / f"curves_{safe}.png",
                ylabel=f"accuracy ({ACCURACY_LABEL.get(accuracy, accuracy)})", best=best_scores(t["flops_auc"], g),
                unpruned=tables.unpruned_accuracy(prune_groups.get(g, [])), chance=chance_accuracy(prune_groups.get(g, [])))
    if not t["headline"].empty:
        figs["headline"] = figures.headline_forest(t["headline"], out / "headline.png", min_seeds=int(rc.min_seeds),
                                                   ci_label=CI_LABEL[rc.ci])
    figs.update(protocols.headline_figure(t["protocols"], out, int(rc.min_seeds)))
    figs.update(protocols.kept_fraction_figures(by_protocol or {}, t["protocols"], out))
    if not t["layers"].empty:
        figs["alignment over depth"] = figures.alignment_depth(t["layers"], out / "alignment_depth.png")
    if (dyn := figures.dynamics_curves(groups, out / "dynamics.png")) is not None:
        figs["training dynamics"] = dyn
    if not t["definitions"].empty:
        for g, d in t["definitions"].groupby("group", sort=False):
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in g)
            figs[f"definitions: {g}"] = plot_definitions(d, out / f"definitions_{safe}.png",
                                                         title=f"{g}: init (open) → trained (filled); blue: the paper's "
                                                         "direction, red: the opposite, gray: no clear change "
                                                         "(the t interval over seeds includes 0)")

    # every input left out (read after the tables and figures, which are what read the inputs)
    skipped = skipped + skipped_inputs(runs)
    ctx = page_context(ri, roots, groups, notices, t, figs, skipped)
    write_text(out / "report.md", render("report.md.j2", ctx, figs, html=False))
    write_text(out / "report.html", render_html(ctx, figs))
    summary = {"roots": [str(r) for r in roots], "groups": {g: [r.seed for r in rs] for g, rs in groups.items()},
               "notices": notices, "skipped": skipped, "headline": t["headline"].to_dict(orient="records"),
               "inputs": {str(r.path / rel): digest for r in runs for rel, digest in sorted(r.inputs.items())},
               "wall_time_s": round(time.perf_counter() - t0, 2), "config": ri.config}
    write_json(out / "report_summary.json", summary)
    return summary, t, figs


ACCURACY_LABEL = {"acc_before_ft": "accuracy before fine-tuning", "acc_after_ft": "accuracy after fine-tuning"}
# What a report writes: those of an earlier report that the new one lacks (a group since removed,
# a stage no longer present) are removed once the new one is in place, never sitting beside it
# looking current. Only these names: report.out may be a folder that holds other files too.
REPORT_FILES = ("runs.csv", "flops_auc.csv", "flops_auc_per_seed.csv", "accuracy_by_target.csv", "headline.csv",
                "protocols.csv", "protocol_grid.csv", "protocol_scratch.csv", "headline_protocols.png", "kept_fraction_*.png",
                "backbones.csv", "layers.csv", "reference.csv", "lesions.csv", "propagation.csv", "definitions.csv",
                "lesions_per_seed.csv", "alignment.csv", "dynamics.csv", "linear_gaussian.csv",
                "curves_*.png", "headline.png", "alignment_depth.png", "dynamics.png", "definitions_*.png", "report.md",
                "report.html", "report_summary.json")


def _swap_in(tmp: Path, out: Path) -> None:
    """Move the finished report from ``tmp`` into ``out``: each file by an atomic rename (report.md
    last, so it is never newer than what it shows), then remove the previous report's files that
    the new one does not have. Only report files are touched: report.out may hold other files."""
    out.mkdir(parents=True, exist_ok=True)
    new = {f.name for f in tmp.iterdir() if f.is_file()}      # everything this report wrote
    for name in sorted(new, key=lambda n: (n == "report.md", n)):
        os.replace(tmp / name, out / name)
    for name in {f.name for pattern in REPORT_FILES for f in out.glob(pattern) if f.is_file()} - new:
        (out / name).unlink()


# ----------------------------------------------------------------------------- rendering

#: how the report names each interval of report.ci; a bootstrap interval carries its measured coverage
#: at 5 seeds (stats.CI_COVERAGE), so a reader sees that its "95%" is not one
CI_LABEL = {"t": "paired Student t 95% CI",
            "bca": f"paired BCa bootstrap 95% CI (covers ~{CI_COVERAGE['bca']:.0%} at 5 seeds)",
            "percentile": f"paired percentile bootstrap 95% CI (covers ~{CI_COVERAGE['percentile']:.0%} at 5 seeds)"}


def fmt(x) -> str:
    """The report's one number format: 3 significant digits, "—" for a missing value.

    Plain decimals between 0.001 and 100,000 (a column of accuracies reads 0.912, 0.0625...),
    scientific notation outside; integers (seeds, counts) as they are; booleans as yes/no."""
    if x is None:
        return "—"
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if math.isnan(x):
            return "—"
        if math.isinf(x):
            return "∞" if x > 0 else "−∞"
        if x == 0:
            return "0"
        r = float(f"{x:.2e}")                      # rounded first: 0.9996 is 1.00, not 1.000
        e = math.floor(math.log10(abs(r)))
        if -3 <= e < 5:
            return f"{r:.{max(0, 2 - e)}f}".replace("-", "−")
        mantissa, exponent = f"{r:.2e}".split("e")
        return f"{mantissa}e{int(exponent)}".replace("-", "−")
    return str(x)


def fmt_ci(lo, hi) -> str:
    """A confidence interval as ``[lo, hi]``; "—" when it could not be computed."""
    return "—" if _missing(lo) and _missing(hi) else f"[{fmt(lo)}, {fmt(hi)}]"


def fmt_pm(mean, sd, n=None, seeds=None) -> str:
    """``mean ± sd`` over seeds, with "(n=k)" when fewer seeds than the row's define the value."""
    if _missing(mean):
        return "—"
    # an SD at rounding level (every seed the same value) reads as the 0 it is, not as 1.70e−17
    tiny = not _missing(sd) and abs(float(sd)) <= 1e-12 * max(abs(float(mean)), 1e-300)
    text = fmt(mean) + ("" if _missing(sd) else " ± 0" if tiny else f" ± {fmt(sd)}")
    if not _missing(n) and not _missing(seeds) and int(n) != int(seeds):
        text += f" (n={int(n)})"
    return text


def _missing(x) -> bool:
    return x is None or (isinstance(x, (float, np.floating)) and math.isnan(x))


def _present(df: pd.DataFrame) -> pd.DataFrame:
    """Every ``<x>_mean``/``<x>_sd`` pair folded into one "mean ± sd" column named ``<x>``, every
    ``<lo>``/``<hi>`` CI pair into one ``[lo, hi]`` column, every other value through :func:`fmt`."""
    df = df.reset_index(drop=True)
    out = pd.DataFrame(index=df.index)
    used: set[str] = set()
    for col in df.columns:
        if col in used:
            continue
        base = col[: -len("_mean")] if col.endswith("_mean") else None
        if base is not None and f"{base}_sd" in df:
            n = df[f"{base}_n"] if f"{base}_n" in df else [None] * len(df)
            seeds = df["seeds"] if "seeds" in df else [None] * len(df)
            out[base] = [fmt_pm(m, s, k, sd) for m, s, k, sd in zip(df[col], df[f"{base}_sd"], n, seeds)]
            used |= {col, f"{base}_sd", f"{base}_n"}
            continue
        if col.endswith(("ci_lo", "ci_adj_lo")) and (hi := col[: -len("_lo")] + "_hi") in df:   # <x>ci_hi, <x>ci_adj_hi
            out[col[: -len("_lo")]] = [fmt_ci(lo, h) for lo, h in zip(df[col], df[hi])]
            used |= {col, hi}
            continue
        out[col] = [fmt(v) for v in df[col].astype(object)]
        used.add(col)
    return out


_NUMERIC = re.compile(r"^[−+]?(\d|∞|\[)")


def _cell_style(v: str) -> str:
    """Numbers (and CIs) right-aligned in tabular figures, kept on one line (text wraps instead, so a
    table fits its page: the page's check is tests/test_report_browser.py); verdicts coloured by the
    axis they favour."""
    v = str(v)
    if v.startswith("local axis better"):
        return "color:#1f5fa8;font-weight:600"
    if v.startswith("target axis better"):
        return "color:#b22222;font-weight:600"
    if not _NUMERIC.match(v):
        return ""
    # "mean ± sd" may break before its "±" only (_html_table joins "±" to the sd, and no digit run breaks);
    # a CI or number never breaks
    return "text-align:right;font-variant-numeric:tabular-nums;" + ("overflow-wrap:normal" if "±" in v
                                                                   else "white-space:nowrap")


def _html_table(df: pd.DataFrame, uid: str) -> Markup:
    """``df`` (already formatted strings) as an HTML table by pandas' Styler, cells escaped.
    ``uid`` names the table's cell styles: unique on the page, and fixed (Styler's default is
    random) so the same results give the same page."""
    df = df.map(lambda v: v.replace(" ± ", " ±\u00a0") if isinstance(v, str) else v)
    styler = (df.style.hide(axis="index").format(escape="html").map(_cell_style).set_uuid(uid)
              .set_table_attributes('class="report"'))
    return Markup(styler.to_html(doctype_html=False))


def _md_table(df: pd.DataFrame) -> str:
    """``df`` (already formatted strings) as a markdown table."""
    esc = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    head = "| " + " | ".join(esc(c) for c in df.columns) + " |\n|" + "---|" * len(df.columns) + "\n"
    return head + "".join("| " + " | ".join(esc(v) for v in row) + " |\n" for row in df.itertuples(index=False))


def _table(df: pd.DataFrame, title: str = "") -> dict:
    return {"kind": "table", "title": title, "df": df}


def _text(text: str) -> dict:
    return {"kind": "text", "text": text}


def chance_accuracy(runs) -> float | None:
    """1 / classes of a group's runs (train_summary.json), or None when not recorded."""
    n = {r.train.get("num_classes") for r in runs} - {None}
    return 1.0 / float(n.pop()) if len(n) == 1 else None


def separating_range(acc: pd.DataFrame, group: str, best: dict[str, str]) -> str:
    """Where along the removed-FLOPs axis the best local and best target score still separate: their
    mean accuracies differ by more than the sum of their seeds' SDs."""
    d = acc[acc.group == group]
    if "local" not in best or "target" not in best or d.empty:
        return ""
    a = d[d.score == best["local"]].set_index("target")
    b = d[d.score == best["target"]].set_index("target")
    both = a.index.intersection(b.index)
    if both.empty:
        return ""
    gap = (a.loc[both, "acc_mean"] - b.loc[both, "acc_mean"]).abs()
    spread = a.loc[both, "acc_sd"].fillna(0) + b.loc[both, "acc_sd"].fillna(0)
    removed = (1 - a.loc[both, "achieved_flops_mean"]).round(2)
    sep = sorted(removed[gap > spread].tolist())
    where = ", ".join(fmt(x) for x in sep) if sep else "none of the targets"
    return (f"{group}: the best local ({best['local']}) and best target ({best['target']}) score differ by more than "
            f"their seeds' SDs at removed FLOPs {where} (of {', '.join(fmt(x) for x in sorted(removed.tolist()))}).")


def best_scores(auc: pd.DataFrame, group: str) -> dict[str, str]:
    """axis → the score drawn as that axis's best in the pruning curves: the headline's choice, the
    highest mean FLOPs-AUC on the validation split over the group's seeds (METHODS §9: chosen on
    validation, measured on test)."""
    key = "val_flops_auc_mean"
    if auc is None or auc.empty or key not in auc:
        return {}
    d = auc[(auc["group"] == group) & auc[key].notna()]
    best = d.sort_values([key, "score"], ascending=[False, True]).drop_duplicates("axis")
    return dict(zip(best["axis"], best["score"]))


def verdict(row, min_seeds: int) -> str:
    """The headline row in plain words, read off the CI (and the Holm-adjusted p when given)."""
    lo, hi, n = row.get("ci_lo", math.nan), row.get("ci_hi", math.nan), row.get("n", 0)
    if _missing(lo) or _missing(hi):
        return f"not testable: {int(n)} seed(s), at least {min_seeds} needed" if n < min_seeds else "no interval"
    p = row.get("p_holm", math.nan)
    sig = "" if _missing(p) or p <= 0.05 else f", but p_holm = {fmt(p)} > 0.05"
    if lo > 0:
        return "local axis better (CI above 0" + sig + ")"
    if hi < 0:
        return "target axis better (CI below 0" + sig + ")"
    return "no clear difference (CI includes 0)"


# headline columns the page shows in its own form or leaves to headline.csv (which split chose the best
# score and which measured it: said once under the table, so that the table fits a 1400 px page); any
# other column a table carries is shown as it is, after the verdict
_HEADLINE_KNOWN = ("group", "comparison", "n", "mean_a", "mean_b", "diff", "ci_lo", "ci_hi", "p_value", "p_holm",
                   "p_min", "effect_size", "candidates", "note", "test", "ci_method", "selected_on", "measured_on")


def headline_view(head: pd.DataFrame, min_seeds: int) -> pd.DataFrame:
    v = pd.DataFrame({"group": head["group"], "comparison": head["comparison"],
                      "verdict": [verdict(r, min_seeds) for _, r in head.iterrows()],
                      "local − target": [fmt(x) for x in head["diff"]],
                      "95% CI": [fmt_ci(lo, hi) for lo, hi in zip(head["ci_lo"], head["ci_hi"])]})
    renamed = {"p_value": "p", "p_holm": "p_holm", "p_min": "p_min", "effect_size": "d_z", "mean_a": "local",
               "mean_b": "target", "n": "seeds"}
    for col in [c for c in renamed if c in head] + [c for c in head.columns if c not in _HEADLINE_KNOWN]:
        v[renamed.get(col, col)] = [fmt(x) for x in head[col].astype(object)]
    for col in ("candidates", "note"):
        if col in head:
            v[col] = head[col].fillna("").astype(str).to_numpy()
    return v


#: the paper's names (METHODS §4, §6) of the per-layer columns, for every table and heading of the page
PAPER_NAMES = {**LABELS, "align_peer_overlap_target_excess": "ρ(R̄_X, S)", "align_hull_score_task_unique": "ρ(hull score, U_T)",
               "nmi": "NMI", "ari": "ARI"}


def _across(r, *, p: bool = True) -> dict:
    """The across-seed columns of one estimate (a row of :func:`tables.across_seed_table` or alike):
    mean ± SD, the Student t interval and its p over seeds."""
    if r is None:
        return {"mean ± SD": "—", "95% t CI": "—", "p": "—"}
    return {"mean ± SD": fmt_pm(r.mean, r.sd), "95% t CI": fmt_ci(r.ci_lo, r.ci_hi), "p": fmt(r.p) if p else "—"}


#: why the two scales of the incremental R² can disagree, said wherever both are shown
RANK_RAW = ("The rank scale fits within-layer percentile ranks of damage and predictors (every channel counts the "
            "same); the raw scale fits the damages themselves, where a few channels whose lesion costs far more "
            "than the rest dominate the sums of squares. The peer terms can therefore add on one scale and not on "
            "the other: on the raw scale only, they predict the few costly lesions; on the rank scale only, the "
            "order of the bulk.")


def _lesion_views(les: pd.DataFrame, per_seed: pd.DataFrame | None = None) -> list[dict]:
    """The lesion numbers that test H4, each from one estimate per seed (``les``: the across-seed table
    of :func:`tables.across_seed_table`): recovery by peer replacement, the ΔR² of the peer terms, the
    direction check (damage against replaceability, METHODS §8) and the within-bin ρ per predictor.
    A seed's own bootstrap CI and F-test stay in ``lesions_per_seed.csv``; here they are only counted."""
    parts = []
    q = les.assign(key=les["quantity"].astype(str))
    per_seed = pd.DataFrame(columns=["group", "seed", "quantity", "value"]) if per_seed is None else per_seed

    def pick(prefix: str):
        # an estimate no seed could make (too few lesioned channels, no damage to recover) is not a row
        d = q[q["key"].str.startswith(prefix) & (q["seeds"] > 0)].copy()
        d["rest"] = d["key"].str[len(prefix):]
        return d

    rows = []
    for g, d in pick("recovery.").groupby("group", sort=False):
        m = {r.rest: r for r in d.itertuples()}
        for v in sorted({k[: -len("_mean")] for k in m if k.endswith("_mean")}):
            for key, what in ((f"{v}_mean", "mean recovery"), (f"{v}_median", "median recovery"),
                              (f"rho_{v}_full_explained", "ρ(recovery, E_full)")):
                if key in m:
                    rows.append({"group": g, "replaced from": f"{v} peers", "estimate": what, **_across(m[key]),
                                 "seeds": fmt(int(m[key].seeds))})
    if rows:
        parts.append(_table(pd.DataFrame(rows), "Recovery by peer replacement (1 = the peers undo the lesion)"))

    rows, scales = [], set()
    for g, d in pick("incremental_r2.").groupby("group", sort=False):
        m = {r.rest: r for r in d.itertuples()}
        fits = sorted({k.rsplit(".", 1)[0] for k in m if k.endswith(".delta_r2") and "per_layer" not in k},
                      key=lambda f: (f != "pooled", f))
        # the summary names the other scale's fit (pooled_raw or pooled_rank); "pooled" is the main one
        others = {f.removeprefix("pooled_") for f in fits if f != "pooled"}
        main = {"raw": "rank", "rank": "raw"}.get(next(iter(others)), "main") if len(others) == 1 else "main"
        ps = per_seed[per_seed["group"] == g]
        for f in fits:
            scale = main if f == "pooled" else f.removeprefix("pooled_")
            scales.add(scale)
            pf = ps.loc[ps["quantity"] == f"incremental_r2.{f}.p_f", "value"].dropna()
            for stat, what in (("delta_r2", "ΔR²"), ("delta_r2_adj", "adjusted ΔR²")):
                r = m.get(f"{f}.{stat}")
                rows.append({"group": g, "fit": f"all layers, {scale} scale", "estimate": what,
                             # nested OLS never loses R²: the plain ΔR² is above 0 in every seed, so it gets no test
                             **_across(r, p=stat == "delta_r2_adj"),
                             "seeds with own F-test p < 0.05": f"{int((pf < 0.05).sum())} of {len(pf)}" if len(pf) else "—",
                             "seeds": fmt(int(r.seeds)) if r else "—"})
    if rows:
        parts.append(_table(pd.DataFrame(rows), "Do the peer terms add over I_X + I_T? (incremental R²)"))
        if len(scales) > 1:
            parts.append(_text(RANK_RAW))
    elif (q["key"].str.startswith("incremental_r2.")).any():
        parts.append(_text("The incremental R² could not be fitted in any seed (fewer lesioned channels than its "
                           "terms need): raise analysis.lesion.channels."))

    rows = []
    for r in pick("replaceability_spearman.").itertuples():
        if not r.rest.endswith(".mean"):
            continue
        rows.append({"group": r.group, "replaceability": r.rest[: -len(".mean")],
                     **_across(r), "verdict": change_verdict(r.ci_lo, r.ci_hi, down="as expected: damage falls as "
                                                             "replaceability rises", up="opposite: damage rises with "
                                                             "replaceability", flat="no clear relation (CI includes 0)"),
                     "seeds": fmt(int(r.seeds))})
    if rows:
        parts.append(_table(pd.DataFrame(rows), "Direction check: does damage fall as replaceability rises? (within-layer "
                                  "Spearman ρ, mean over layers per seed; expected below 0)"))

    overall = {(r.group, r.rest): r for r in pick("spearman_overall.").itertuples()}
    rows = [{"group": r.group, "predictor": r.rest, **{f"ρ within I_T bins: {k}": v for k, v in _across(r).items()},
             "ρ over all channels": _pm(overall.get((r.group, r.rest))), "seeds": fmt(int(r.seeds))}
            for r in pick("binned_rho_mean.").itertuples()]
    if rows:
        parts.append(_table(pd.DataFrame(rows), "Damage against each predictor (Spearman ρ)"))
    return parts


def _reference_view(ref: pd.DataFrame) -> list[dict]:
    """The §11 table as read: ours at init and trained (mean ± SD, t interval over seeds), the paper's,
    our per-seed change with its interval, and the verdict in words; which epoch is "trained"."""
    rows = [{"group": r.group, "quantity": LABELS.get(r.quantity, r.quantity),
             "ours at init": fmt_pm(r.init_mean, r.init_sd), "init 95% t CI": fmt_ci(r.init_ci_lo, r.init_ci_hi),
             "ours trained": fmt_pm(r.trained_mean, r.trained_sd),
             "trained 95% t CI": fmt_ci(r.trained_ci_lo, r.trained_ci_hi),
             "paper init → trained": f"{fmt_pm(r.paper_init_mean, r.paper_init_sd)} → "
                                     f"{fmt_pm(r.paper_trained_mean, r.paper_trained_sd)}",
             "our change: 95% t CI": fmt_ci(r.change_ci_lo, r.change_ci_hi), "verdict": r.verdict,
             "seeds": fmt(int(r.seeds))} for r in ref.itertuples()]
    when = "; ".join(sorted({f"{r.group}: trained = {r.trained_at} ({r.source})" for r in ref.itertuples()}))
    return [_table(pd.DataFrame(rows)), _text(when + ". The paper trained for 100 epochs (METHODS §11).")]


def _verdict_view(d: pd.DataFrame, first: str, last: str) -> pd.DataFrame:
    """Rows of an init → trained verdict (:func:`tables.dynamics_table` and alike) as read."""
    return pd.DataFrame([{"group": r.group, "quantity": LABELS.get(r.quantity, r.quantity),
                          first: fmt_pm(r.first_mean, r.first_sd), last: fmt_pm(r.last_mean, r.last_sd),
                          "change: 95% t CI": fmt_ci(r.change_ci_lo, r.change_ci_hi), "p": fmt(r.change_p),
                          "direction": r.direction, "paper": r.paper_direction,
                          "matches the paper": {True: "yes", False: "no"}.get(r.matches_paper, "—"),
                          "seeds": fmt(int(r.seeds))} for r in d.itertuples()])


def _pm(row) -> str:
    """An across-seed row's ``mean ± sd``; "—" when the table lacks it."""
    return fmt_pm(row.mean, row.sd) if row else "—"


HOW = {
    "answer": "Each point is the paired difference in FLOPs-AUC (mean accuracy over the removed-FLOPs range) "
              "between the local and the target axis, across seeds: right of 0 (blue) the local axis keeps more "
              "accuracy at equal FLOPs, left of 0 (red) the target axis does; the curves beside it show where.",
    "backbones": "The headline comparison of each backbone in one column (as the paper's table): the best score "
                 "of each axis chosen on validation of all seeds, their test FLOPs-AUCs, the paired difference and "
                 "its CI; every row of each backbone is in the headline table above.",
    "auc": "One row per pruning score: its FLOPs-AUC as mean ± SD over seeds, absolute and relative to the unpruned "
           "accuracy (1 = no loss); higher is better.",
    "layers": "One row per analysed layer, mean ± SD over seeds: how strongly the two axes agree (Spearman ρ of "
              "I_X and I_T and the other alignments) and the replaceability hulls; \"(n=k)\" marks a value "
              "defined in fewer seeds. Below it, each alignment's verdict across seeds: one value per seed (its "
              "mean over layers), the Student t interval and p.",
    "reference": "Our values beside the paper's (METHODS §11) for the same quantities, one value per seed (the mean "
                 "over its layers) and their Student t interval: \"consistent\" when the paper's values lie inside "
                 "it, \"same direction, other magnitude\" when our init → trained change has the paper's sign beyond "
                 "its interval, \"different\" otherwise; a hull measure at its own cap in most layers measures the "
                 "cap, so it is \"not comparable at this setting\", with the knob that would make it comparable.",
    "lesions": "H4, peer support refines removability: recovery near 1 means the peers can stand in for a "
               "lesioned channel, an adjusted ΔR² whose interval lies above 0 means the peer terms predict damage beyond "
               "I_X and I_T. Every number is across seeds: one estimate per seed, their mean ± SD, the Student t 95% "
               "interval and its p (against 0); a seed's own bootstrap CI and F-test are counted, never averaged.",
    "propagation": "H3, what a layer inherits from the one before: Spearman ρ between the routed upstream metric "
                   "and the downstream one for each pairing of axes, beside a shuffled-weights null; each seed's "
                   "mean over its layer pairs, with the Student t interval over seeds of ρ and of ρ − null.",
    "dynamics": "Each quantity over training epochs (mean ± SD over seeds), with the paper's init and trained "
                "values as black squares; below, each quantity's change from the first to the last epoch per seed, "
                "its Student t interval over seeds and the direction read off it (\"matches the paper\" only where "
                "the interval excludes 0 on the paper's side).",
    "linear_gaussian": "A synthetic linear-Gaussian layer trained by gradient descent (METHODS §5), drawn from each "
                       "run's seed: ρ(I_X, I_T) at init and after training, the change across seeds with its t "
                       "interval, and the largest |cos(Σ_X w, g_T)| in the whitened metric (about 1e-12: the "
                       "check of METHODS §5).",
    "definitions": "The paper does not fix where a channel's activation is read (before the norm, after it, after the "
                   "nonlinearity) nor how a feature map becomes samples (random positions or one pooled value per "
                   "image); its init-coupling claim depends on that. Each row: a quantity at init and after training "
                   "(mean ± SD over seeds) under one definition, the Student t interval over seeds of its per-seed "
                   "change, the direction read off that interval, and whether that is the paper's.",
    "runs": "Every run the report read, with its accuracies and which stages it has (paths relative to the sweep).",
}


def page_context(ri: ReportInputs, roots, groups, notices, t, figs, skipped: list[dict] | None = None) -> dict:
    """Everything the two templates show, as formatted tables (DataFrames of strings) and text."""
    rc = ri.report
    base = Path(os.path.commonpath([str(r) for r in roots])) if len(roots) > 1 else roots[0]
    prefix = str(base).rstrip(os.sep) + os.sep
    min_seeds = int(rc.min_seeds)
    acc_label = ACCURACY_LABEL.get(rc.accuracy, rc.accuracy)
    head = t["headline"]
    sections = []

    def rel(x) -> str:
        """A path (or a text holding paths) relative to the sweep."""
        return str(x).replace(prefix, "").replace(str(base), ".")

    def section(id_: str, title: str, parts: list[dict]) -> None:
        sections.append({"id": id_, "title": title, "how": HOW[id_], "parts": parts})

    def table_or(df: pd.DataFrame, missing: str, **rename) -> list[dict]:
        return [_text(missing)] if df.empty else [_table(_present(df).rename(columns=rename))]

    if not t["backbones"].empty and len(t["backbones"]) > 1:      # several backbones: the paper's table
        side = headline_view(t["backbones"], min_seeds).drop(columns=["comparison"], errors="ignore")
        side.insert(1, "best local / best target", t["backbones"]["comparison"].str.extract(
            r"best local \((.*?)\) − best target \((.*?)\)").agg(" / ".join, axis=1).to_numpy())
        section("backbones", "Backbones side by side", [_table(side.set_index("group").T.reset_index(names="quantity"))])
    auc = t["flops_auc"]
    first = ("group", "score", "axis", "flops_auc_mean", "flops_auc_sd", "flops_auc_rel_mean", "flops_auc_rel_sd", "seeds")
    cols = [c for c in first if c in auc] + [c for c in auc.columns if c not in first]
    apart = [line for g in t["accuracy_by_target"].get("group", pd.Series(dtype=str)).unique()
             if (line := separating_range(t["accuracy_by_target"], g, best_scores(auc, g)))]
    section("auc", f"FLOPs-AUC per score ({acc_label})",
            table_or(auc[cols], "No pruning results.", flops_auc="FLOPs-AUC", flops_auc_rel="relative")
            + [_text(line) for line in apart]
            + [_text("Accuracy at every FLOPs target: accuracy_by_target.csv; per seed: flops_auc_per_seed.csv.")])
    if prot_parts := protocols.parts(t, figs, lambda df, title: _table(_present(df).rename(columns={"ci": "95% CI"}),
                                                                        title), _text, fmt_pm):
        sections.append({"id": "protocols", "title": protocols.TITLE, "how": protocols.HOW, "parts": prot_parts})

    lay = t["layers"]
    parts = [{"kind": "figure", "label": "alignment over depth"}] if "alignment over depth" in figs else []
    if lay.empty:
        parts.append(_text("No analysis results (run analyze.py on these runs)."))
    else:
        keep = ["group", "layer", "seeds"] + [c for c in lay.columns if c.endswith(("_mean", "_sd", "_n"))
                                              and not c.startswith("null")]
        parts.append(_table(_present(lay[keep]).rename(columns=PAPER_NAMES)))
    if not t["alignment"].empty:
        al = t["alignment"]
        parts.append(_table(pd.DataFrame([{"group": r.group, "quantity": PAPER_NAMES.get(r.quantity, r.quantity),
                                           **_across(r), "seeds": fmt(int(r.seeds))} for r in al.itertuples()]),
                            "Across seeds: each seed's mean over its layers, Student t interval and p (against 0)"))
    section("layers", "The two axes per layer", parts)
    section("reference", "Against the paper's reference values (METHODS §11)",
            [_text("No analysis results.")] if t["reference"].empty else _reference_view(t["reference"]))
    les = t["lesions"]
    section("lesions", "Lesions and peer replacement (H4)",
            [_text("No lesion results (analysis=lesion).")] if les.empty else
            _lesion_views(les, t.get("lesions_per_seed"))
            + [_text("Every estimate of the runs' lesion summaries across seeds (mean, SD, t interval, p): lesions.csv; "
                     "each seed's own numbers, its bootstrap CIs and F-test p included: lesions_per_seed.csv.")])
    section("propagation", "Cross-layer propagation (H3)",
            table_or(t["propagation"], "No propagation results (analysis=propagation).", rho="ρ", rho_ci="ρ: 95% t CI",
                     null_rho_mean="null ρ", above_null_mean="ρ − null", above_null_ci="ρ − null: 95% t CI",
                     above_null_p="p (ρ − null)"))
    if "training dynamics" in figs:
        dyn = t["dynamics"]
        parts = [{"kind": "figure", "label": "training dynamics"}]
        if not dyn.empty:
            parts += [_table(_verdict_view(dyn, "first epoch", "last epoch")),
                      _text(f"Epochs {'; '.join(sorted(set(dyn['epochs'])))} (first → last checkpointed); the paper's "
                            "values are after 100 epochs, so they are drawn as its two endpoints only.")]
        section("dynamics", "Training dynamics (H2)", parts)
    lg = t["linear_gaussian"]
    if not lg.empty:
        parts = [_table(_verdict_view(lg, "at init", "after training").assign(
            **{"max |whitened cos|": [fmt(x) for x in lg["cos_whitened_max"]]}))]
        if lg["identical"].any():
            parts.append(_text("Every seed computed the same study (a fixed analysis.linear_gaussian.seed): the seeds "
                               "are one draw repeated, so no interval is shown; leave the seed at null to follow "
                               "the run's seed."))
        section("linear_gaussian", "The linear-Gaussian study (METHODS §5)", parts)
    defs = t["definitions"]
    if not defs.empty:
        parts = []
        for g, d in defs.groupby("group", sort=False):
            ok = reproduces_init_coupling(d)
            parts.append(_text(f"{g}: ρ(I_X, I_T) is positive at init and falls after training (the paper's init "
                               f"coupling) under {', '.join(ok) if ok else 'no definition'}; the defaults measure "
                               f"{ri.definition}."))
            parts.append({"kind": "figure", "label": f"definitions: {g}"})
        note = defs["note"].fillna("") if "note" in defs else pd.Series("", index=defs.index)
        view = defs.assign(definition=[f"{p}/{s}" + (f" {n.split(' (')[0]}" if n.startswith("=") else "")
                                       for p, s, n in zip(defs.point, defs.spatial, note)],
                           quantity=[LABELS.get(q, q) for q in defs.quantity],
                           matches_paper=[{True: "yes", False: "no"}.get(m, "—") for m in defs.matches_paper],
                           note=[n if not n.startswith("=") else n[n.find("(") + 1:].rstrip(")") for n in note])
        cols = ["group", "definition", "quantity", "init_mean", "init_sd", "trained_mean", "trained_sd",
                "change_ci_lo", "change_ci_hi", "change_p", "direction", "paper_direction", "matches_paper", "seeds",
                "note"]
        parts.append(_table(_present(view[[c for c in cols if c in view]]).rename(columns={
            "init": "init", "trained": "trained", "change_ci": "change: 95% t CI", "change_p": "p",
            "paper_direction": "paper", "matches_paper": "matches the paper"})))
        trained = sorted(set(defs["trained_checkpoint"].dropna())) if "trained_checkpoint" in defs else []
        parts.append(_text("Trained = " + (", ".join(trained) if trained else "the analysed checkpoint")
                           + " (analyze.py's checkpoint, best.ckpt by default: the epoch of best validation accuracy, "
                           "which may differ between seeds); the dynamics and the reference values use the last "
                           "checkpointed epoch. Each row's change is trained − init per seed; its direction is read "
                           "off the Student t interval over seeds, and it matches the paper only where that interval "
                           "excludes 0 on the paper's side. A definition identical to another by construction is "
                           "shown once and names the other."))
        section("definitions", "Do the conclusions depend on the definitions?", parts)
    runs = t["runs"]
    runs_view = runs[[c for c in ("group", "seed", "val_acc", "test_acc", "epochs", "analyze", "prune", "run_dir")
                      if c in runs]].copy()
    if "run_dir" in runs_view:
        runs_view["run_dir"] = [rel(p) for p in runs_view["run_dir"]]
    section("runs", "Runs", [_table(_present(runs_view))])

    tests = ", ".join(sorted(set(head["test"]))) if "test" in head else rc.test
    return {
        "name": ri.name,
        "sweep": ", ".join(rel(r) if len(roots) > 1 else r.name for r in roots),
        "groups": [{"name": g, "seeds": ", ".join(str(r.seed) for r in rs)} for g, rs in groups.items()],
        "notices": [rel(n) for n in notices],
        "skipped": [{"seed": s["seed"], "run": rel(s["run"]), "file": rel(s["file"]), "reason": rel(s["reason"])}
                    for s in (skipped or [])],
        "top": [label for label in figs if label == "headline"] + [label for label in figs
                                                                   if label.startswith("pruning curves")],
        # one group: named at the top of the page, not on every row
        "headline": None if head.empty else headline_view(head, min_seeds).drop(
            columns=["group"] if head["group"].nunique() == 1 else []),
        "how": {"answer": HOW["answer"],
                "headline_columns": f"FLOPs-AUC of {acc_label}, paired across seeds: the difference local − target "
                f"with its {CI_LABEL[rc.ci]}, {tests} p-value, Holm-adjusted p_holm over the group's "
                f"rows, p_min (the smallest p the test can reach with these seeds) and effect size d_z; fewer than "
                f"{min_seeds} seeds make the test impossible. Every best score is chosen on the validation "
                "split and measured on the test split; choosing on the same seeds that are compared still "
                "favours the axis with more candidates a little, which the row chosen on the other seeds "
                "(leave-one-seed-out) removes."},
        "sections": sections,
    }


CAPTIONS = {"headline": "Headline: FLOPs-AUC difference local − target per group, with its CI",
            "alignment over depth": "Alignment of the axes and modularity gap over depth (mean ± SD over seeds)",
            "training dynamics": "Training dynamics against the paper's init → trained values",
            "headline per protocol": "The headline (best local − best target FLOPs-AUC) under every protocol: "
                                     "allocation, schedule and fine-tune budget, with its paired t 95% CI"}

_ENV = Environment(loader=PackageLoader("axes_pipeline.report", "templates"), undefined=StrictUndefined,
                   autoescape=lambda name: bool(name) and name.endswith(".html.j2"), keep_trailing_newline=True)


def _code(text: str) -> Markup:
    """Markdown's `code` spans of a message (notices, skip reasons) as <code> in the HTML page,
    the rest escaped: a backtick never shows as a literal character."""
    parts = str(text).split("`")
    if len(parts) % 2 == 0:                          # unbalanced: show the text as it is
        return Markup.escape(text)
    return Markup("").join(Markup("<code>{}</code>").format(p) if i % 2 else Markup.escape(p)
                           for i, p in enumerate(parts))


_ENV.filters["code"] = _code


def render_html(ctx: dict, figs: dict[str, Path]) -> str:
    """``report.html``: one self-contained page, figures inlined."""
    return render("report.html.j2", ctx, figs, html=True)


def render(template: str, ctx: dict, figs: dict[str, Path], *, html: bool) -> str:
    """One page from ``ctx``: tables as HTML (scrolling inside their box) or markdown, figures
    inlined as base64 in the HTML (one self-contained file) or linked by file name in the markdown."""
    count = iter(range(1_000_000))

    def table(df):
        return _html_table(df, f"t{next(count)}") if html else _md_table(df)

    def figure(label):
        p = figs[label]
        return {"label": CAPTIONS.get(label, label), "file": p.name,
                "data": base64.b64encode(p.read_bytes()).decode() if html else ""}

    def rendered(part):
        if part["kind"] == "table":
            text = table(part["df"])
            return {**part, "html": text, "md": text}
        return {"kind": "figure", **figure(part["label"])} if part["kind"] == "figure" else part

    # the sections' tables first, then the headline: the order that numbers the HTML tables' ids
    sections = [{**sec, "parts": [rendered(part) for part in sec["parts"]]} for sec in ctx["sections"]]
    page = {**ctx, "sections": sections, "top_figures": [figure(label) for label in ctx["top"]],
            "headline": None if ctx["headline"] is None else table(ctx["headline"])}
    text = _ENV.get_template(template).render(**page)
    return text if html else re.sub(r"\n{3,}", "\n\n", text)     # blank lines the template's blocks leave
