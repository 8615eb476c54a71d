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

from axes_pipeline.analyses.definitions import plot_definitions, reproduces_init_coupling
from axes_pipeline.errors import UserError
from axes_pipeline.layout import RUN_KINDS
from axes_pipeline.report import figures, protocols, tables
from axes_pipeline.report.collect import (
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
from axes_pipeline.stats import CI_COVERAGE, CI_METHODS
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
    if rc.sweep:
        return resolve_roots([rc.sweep])
    cands = [ri.root / kind / ri.name for kind in reversed(RUN_KINDS)]   # multirun/<name>, then runs/<name>
    found = [c for c in cands if c.exists()]
    if not found:
        raise UserError(f"report: neither {cands[0]} nor {cands[1]} exists; pass report.sweep=DIR or "
                        f"report.runs=[DIR,...] (run train.py first)")
    return found[:1]


def report_dir(ri: ReportInputs) -> Path:
    """Where this report is written: report.out, else <first sweep root>/report."""
    if ri.report.out:
        return Path(ri.report.out).resolve()
    try:
        return _roots(ri)[0] / "report"
    except UserError:
        return ri.root / "reports" / ri.name


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
    notices = notices + prune_notices + axes_notices + provenance_notices(groups)
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
        "lesions": tables.scalar_summary(axes_groups, "analyze/lesion_summary.json"),
        "propagation": tables.propagation_table(axes_groups),
        "definitions": tables.definitions_table(axes_groups),
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
                ylabel=f"accuracy ({ACCURACY_LABEL.get(accuracy, accuracy)})", best=best_scores(t["flops_auc"], g))
    if not t["headline"].empty:
        figs["headline"] = figures.headline_forest(t["headline"], out / "headline.png", min_seeds=int(rc.min_seeds),
                                                   ci_label=CI_LABEL[rc.ci])
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
                                                         "direction, red: the opposite")

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
                "protocols.csv", "protocol_grid.csv", "kept_fraction_*.png",
                "backbones.csv", "layers.csv", "reference.csv", "lesions.csv", "propagation.csv", "definitions.csv",
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
    text = fmt(mean) + ("" if _missing(sd) else f" ± {fmt(sd)}")
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
    """Numbers (and CIs) right-aligned in tabular figures; verdicts coloured by the axis they favour."""
    v = str(v)
    if v.startswith("local axis better"):
        return "color:#1f5fa8;font-weight:600"
    if v.startswith("target axis better"):
        return "color:#b22222;font-weight:600"
    return "text-align:right;font-variant-numeric:tabular-nums" if _NUMERIC.match(v) else ""


def _html_table(df: pd.DataFrame, uid: str) -> Markup:
    """``df`` (already formatted strings) as an HTML table by pandas' Styler, cells escaped.
    ``uid`` names the table's cell styles: unique on the page, and fixed (Styler's default is
    random) so the same results give the same page."""
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


# headline columns the page shows in its own form; any other column a table carries (which split
# chose the best score and which measured it, ...) is shown as it is, after the verdict
_HEADLINE_KNOWN = ("group", "comparison", "n", "mean_a", "mean_b", "diff", "ci_lo", "ci_hi", "p_value", "p_holm",
                   "p_min", "effect_size", "candidates", "note", "test", "ci_method")


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


def _pm(row) -> str:
    """A summary row's ``mean ± sd``; "—" when the summary lacks it."""
    return fmt_pm(row.mean, row.sd) if row else "—"


def _lesion_views(les: pd.DataFrame) -> list[dict]:
    """The few lesion numbers that test H4, out of the per-run summary's flattened keys: recovery by
    peer replacement, the ΔR² of the peer terms with its CI, and the within-bin ρ per predictor."""
    parts = []
    q = les.assign(key=les["quantity"].astype(str))

    def pick(prefix: str):
        d = q[q["key"].str.startswith(prefix)].copy()
        d["rest"] = d["key"].str[len(prefix):]
        return d

    rows = []
    for g, d in pick("recovery.").groupby("group", sort=False):
        m = {r.rest: r for r in d.itertuples()}
        variants = sorted({k[: -len("_mean")] for k in m if k.endswith("_mean")})
        for v in variants:
            mean, med, n, rho = (m.get(k) for k in (f"{v}_mean", f"{v}_median", f"{v}_n", f"rho_{v}_full_explained"))
            rows.append({"group": g, "replaced from": f"{v} peers", "recovery (mean)": _pm(mean),
                         "recovery (median)": _pm(med), "channels": fmt(n.mean) if n else "—",
                         "ρ(recovery, E_full)": _pm(rho), "seeds": fmt(int(mean.seeds)) if mean else "—"})
    if rows:
        parts.append(_table(pd.DataFrame(rows), "Recovery by peer replacement (1 = the peers undo the lesion)"))

    rows = []
    for g, d in pick("incremental_r2.").groupby("group", sort=False):
        m = {r.rest: r for r in d.itertuples()}
        fits = sorted({k.rsplit(".", 1)[0] for k in m if k.endswith(".delta_r2") and "per_layer" not in k},
                      key=lambda f: (f != "pooled", f))
        # the summary names the other scale's fit (pooled_raw or pooled_rank); "pooled" is the main one
        others = {f.removeprefix("pooled_") for f in fits if f != "pooled"}
        main = {"raw": "rank", "rank": "raw"}.get(next(iter(others)), "main") if len(others) == 1 else "main"
        for f in fits:
            get = lambda k: m.get(f"{f}.{k}")  # noqa: E731
            val = lambda k: get(k).mean if get(k) else math.nan  # noqa: E731
            dr, adj = get("delta_r2"), get("delta_r2_adj")
            rows.append({"group": g, "fit": f"all layers, {main if f == 'pooled' else f.removeprefix('pooled_')} scale",
                         "ΔR²": _pm(dr), "95% CI": fmt_ci(val("ci_lo"), val("ci_hi")), "adjusted ΔR²": _pm(adj),
                         "95% CI (adjusted)": fmt_ci(val("ci_adj_lo"), val("ci_adj_hi")),
                         "F-test p": fmt(val("p_f")), "channels": fmt(val("n")),
                         "seeds": fmt(int(dr.seeds)) if dr else "—"})
    if rows:
        parts.append(_table(pd.DataFrame(rows), "Do the peer terms add over I_X + I_T? (incremental R²)"))

    overall = {(r.group, r.rest): r for r in pick("spearman_overall.").itertuples()}
    rows = [{"group": r.group, "predictor": r.rest, "ρ within I_T bins": _pm(r),
             "ρ over all channels": _pm(overall.get((r.group, r.rest))), "seeds": fmt(int(r.seeds))}
            for r in pick("binned_rho_mean.").itertuples()]
    if rows:
        parts.append(_table(pd.DataFrame(rows), "Damage against each predictor (Spearman ρ)"))
    return parts


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
              "defined in fewer seeds.",
    "reference": "Our values beside the paper's (METHODS §11) for the same quantities; agreement within a few SDs "
                 "is a reproduction.",
    "lesions": "H4, peer support refines removability: recovery near 1 means the peers can stand in for a "
               "lesioned channel, a ΔR² whose adjusted CI lies above 0 means the peer terms predict damage beyond "
               "I_X and I_T; values are means ± SD over seeds (CIs: each seed's bootstrap CI, averaged).",
    "propagation": "H3, what a layer inherits from the one before: Spearman ρ between the routed upstream metric "
                   "and the downstream one for each pairing of axes, beside a shuffled-weights null.",
    "dynamics": "Each quantity over training epochs (mean ± SD over seeds), with the paper's init and trained "
                "values as black squares.",
    "definitions": "The paper does not fix where a channel's activation is read (before the norm, after it, after the "
                   "nonlinearity) nor how a feature map becomes samples (random positions or one pooled value per "
                   "image); its init-coupling claim depends on that. Each row: a quantity at init and after training "
                   "(mean ± SD over seeds) under one definition, its direction, and whether that is the paper's.",
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
    section("auc", f"FLOPs-AUC per score ({acc_label})",
            table_or(auc[cols], "No pruning results.", flops_auc="FLOPs-AUC", flops_auc_rel="relative")
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
        parts.append(_table(_present(lay[keep])))
    section("layers", "The two axes per layer", parts)
    section("reference", "Against the paper's reference values (METHODS §11)",
            table_or(t["reference"], "No analysis results."))
    les = t["lesions"]
    section("lesions", "Lesions and peer replacement (H4)",
            [_text("No lesion results (analysis=lesion).")] if les.empty else
            _lesion_views(les) + [_text("Every number of each run's lesion summary (mean ± SD over seeds): lesions.csv.")])
    section("propagation", "Cross-layer propagation (H3)",
            table_or(t["propagation"], "No propagation results (analysis=propagation).", rho="ρ", null_rho_mean="null ρ"))
    if "training dynamics" in figs:
        section("dynamics", "Training dynamics (H2)", [{"kind": "figure", "label": "training dynamics"}])
    defs = t["definitions"]
    if not defs.empty:
        parts = []
        for g, d in defs.groupby("group", sort=False):
            ok = reproduces_init_coupling(d)
            parts.append(_text(f"{g}: ρ(I_X, I_T) is positive at init and falls after training (the paper's init "
                               f"coupling) under {', '.join(ok) if ok else 'no definition'}; the defaults measure "
                               f"{ri.definition}."))
            parts.append({"kind": "figure", "label": f"definitions: {g}"})
        view = defs.assign(definition=[f"{p}/{s}" for p, s in zip(defs.point, defs.spatial)],
                           matches_paper=[{True: "yes", False: "no"}.get(m, "—") for m in defs.matches_paper])
        cols = ["group", "definition", "quantity", "init_mean", "init_sd", "trained_mean", "trained_sd", "seeds",
                "direction", "paper_direction", "matches_paper"]
        parts.append(_table(_present(view[cols])))
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
        "headline": None if head.empty else headline_view(head, min_seeds),
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
            "training dynamics": "Training dynamics against the paper's init → trained values"}

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
