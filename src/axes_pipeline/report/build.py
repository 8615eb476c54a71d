"""run_report(cfg): one report over a sweep directory or a list of runs.

Writes ``report.md``, ``report.html`` (plots inlined: one file to open), the tables as CSV and the
figures as PNG, and logs the tables to wandb when enabled. Any stage may be missing from any run:
its section then says so instead of failing.
"""

from __future__ import annotations

import base64
import html
import os
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from axes_pipeline.config import to_container
from axes_pipeline.errors import UserError
from axes_pipeline.report import figures, tables
from axes_pipeline.report.collect import (discover, group_runs, require_runs, resolve_roots, skipped_inputs,
                                         split_by_pruning)
from axes_pipeline.runs import write_csv, write_json, write_text
from axes_pipeline.tracking import StageTracker

TESTS = ("wilcoxon", "permutation")


def _roots(cfg: DictConfig) -> list[Path]:
    rc = cfg.report
    if rc.runs:
        return resolve_roots(list(rc.runs))
    if rc.sweep:
        return resolve_roots([rc.sweep])
    root = Path(cfg.paths.output_root).resolve()
    cands = [root / "multirun" / cfg.name, root / "runs" / cfg.name]
    found = [c for c in cands if c.exists()]
    if not found:
        raise UserError(f"report: neither {cands[0]} nor {cands[1]} exists; pass report.sweep=DIR or "
                        f"report.runs=[DIR,...] (run train.py first)")
    return found[:1]


def report_dir(cfg: DictConfig) -> Path:
    """Where this report is written: report.out, else <first sweep root>/report."""
    if cfg.report.out:
        return Path(cfg.report.out).resolve()
    try:
        return _roots(cfg)[0] / "report"
    except UserError:
        return Path(cfg.paths.output_root).resolve() / "reports" / cfg.name


def _fmt(x, digits=4):
    if isinstance(x, float):
        return "—" if pd.isna(x) else f"{x:.{digits}g}"
    return str(x)


def _pm(df: pd.DataFrame) -> pd.DataFrame:
    """Fold every `<x>_mean` / `<x>_sd` (or ours_/paper_ mean/sd) pair into one "m ± s" column."""
    df = df.copy()
    for col in [c for c in df.columns if c.endswith("_mean")]:
        base = col[: -len("_mean")]
        if f"{base}_sd" in df:
            # "(n=k)" where fewer seeds than the row's `seeds` define the quantity (see _with_counts)
            n = df[f"{base}_n"] if f"{base}_n" in df and "seeds" in df else pd.Series(None, index=df.index)
            fewer = [f" (n={int(k)})" if pd.notna(k) and k != sd else "" for k, sd in
                     zip(n, df["seeds"] if "seeds" in df else n)]
            df[base] = [("—" if pd.isna(m) else f"{m:.4g}" + ("" if pd.isna(s) else f" ± {s:.2g}") + f)
                        for m, s, f in zip(df[col], df[f"{base}_sd"], fewer)]
            df = df.drop(columns=[col, f"{base}_sd", *([f"{base}_n"] if f"{base}_n" in df else [])])
    return df


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


def _md_table(df: pd.DataFrame, cols: list[str] | None = None, max_rows: int = 60) -> str:
    if df is None or df.empty:
        return "_none_\n"
    df = _pm(df[cols] if cols else df)
    head = "| " + " | ".join(df.columns) + " |\n|" + "---|" * len(df.columns) + "\n"
    body = "".join("| " + " | ".join(_fmt(v) for v in row) + " |\n" for row in df.head(max_rows).itertuples(index=False))
    more = f"\n_({len(df) - max_rows} more rows in the CSV)_\n" if len(df) > max_rows else ""
    return head + body + more


def run_report(cfg: DictConfig) -> dict:
    rc = cfg.report
    if rc.test not in TESTS:
        raise UserError(f"report.test must be one of {', '.join(TESTS)}, got {rc.test}")
    t0 = time.perf_counter()
    roots = _roots(cfg)
    skipped: list[dict] = []
    runs = discover(roots, skipped)
    require_runs(runs, roots)
    groups, notices = group_runs(runs)
    prune_groups, prune_notices = split_by_pruning(groups)
    notices = notices + prune_notices
    out = report_dir(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built in a temporary folder next to the final one and moved in only when complete: a report
    # that fails half way leaves the previous one as it was.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        summary, t, figs = _build(cfg, tmp, roots, runs, groups, prune_groups, notices, skipped, t0)
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    figs = {label: out / p.name for label, p in figs.items()}

    tracker = StageTracker(cfg, "report", out)
    try:
        for name, df in t.items():
            if df is not None and not df.empty:
                tracker.table(f"report/{name}", df)
        for label, p in figs.items():
            tracker.image(f"report/{p.stem}", p)
    finally:
        tracker.finish()
    for n in notices:
        print(f"report: note: {n}")
    for sk in summary["skipped"]:
        print(f"report: skipped: seed {sk['seed']} {sk['file']}: {sk['reason']}")
    print(f"report: {len(runs)} runs in {len(groups)} group(s) -> {out / 'report.html'}")
    return summary


def _build(cfg, out: Path, roots, runs, groups, prune_groups, notices, skipped, t0) -> tuple[dict, dict, dict]:
    """Every table, figure and page of the report, written under ``out`` (the temporary folder)."""
    rc = cfg.report
    accuracy = rc.accuracy
    t = {
        "runs": tables.runs_table(groups),
        "flops_auc": tables.auc_table(per_seed := tables.auc_per_seed(prune_groups, accuracy)),
        "flops_auc_per_seed": per_seed,
        "accuracy_by_target": tables.accuracy_by_target(prune_groups, accuracy),
        "headline": tables.headline(per_seed, min_n=int(rc.min_seeds), n_boot=int(rc.n_boot), method=rc.test,
                                    seed=int(rc.seed)),
        "layers": _with_counts(tables.layers_table(groups), groups),
        "reference": tables.reference_table(groups),
        "lesions": tables.scalar_summary(groups, "analyze/lesion_summary.json", ""),
        "propagation": tables.propagation_table(groups),
    }
    for name, df in t.items():
        if df is not None and not df.empty:
            write_csv(out / f"{name}.csv", df)

    figs: dict[str, Path] = {}
    if not t["accuracy_by_target"].empty:
        for g in t["accuracy_by_target"]["group"].unique():
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in g)
            figs[f"pruning curves: {g}"] = figures.pruning_curves(
                t["accuracy_by_target"], g, out / f"curves_{safe}.png",
                ylabel=f"accuracy ({ACCURACY_LABEL.get(accuracy, accuracy)})")
    if not t["headline"].empty:
        figs["headline"] = figures.headline_forest(t["headline"], out / "headline.png", min_seeds=int(rc.min_seeds))
    if not t["layers"].empty:
        figs["alignment over depth"] = figures.alignment_depth(t["layers"], out / "alignment_depth.png")
    dyn = figures.dynamics_curves(groups, out / "dynamics.png")
    if dyn is not None:
        figs["training dynamics"] = dyn

    # every input left out (read after the tables and figures, which are what read the inputs)
    skipped = skipped + skipped_inputs(runs)
    md = render_markdown(cfg, roots, groups, notices, t, figs, skipped)
    write_text(out / "report.md", md)
    write_text(out / "report.html", render_html(md, figs))
    summary = {"roots": [str(r) for r in roots], "groups": {g: [r.seed for r in rs] for g, rs in groups.items()},
               "notices": notices, "skipped": skipped, "headline": t["headline"].to_dict(orient="records"),
               "inputs": {str(r.path / rel): digest for r in runs for rel, digest in sorted(r.inputs.items())},
               "wall_time_s": round(time.perf_counter() - t0, 2), "config": to_container(cfg)}
    write_json(out / "report_summary.json", summary)
    return summary, t, figs


ACCURACY_LABEL = {"acc_before_ft": "accuracy before fine-tuning", "acc_after_ft": "accuracy after fine-tuning"}
# What a report writes: those of an earlier report that the new one lacks (a group since removed,
# a stage no longer present) are removed once the new one is in place, never sitting beside it
# looking current.
# Only these names: report.out may be a folder that holds other files too.
REPORT_FILES = ("runs.csv", "flops_auc.csv", "flops_auc_per_seed.csv", "accuracy_by_target.csv", "headline.csv",
                "layers.csv", "reference.csv", "lesions.csv", "propagation.csv", "curves_*.png", "headline.png",
                "alignment_depth.png", "dynamics.png", "report.md", "report.html", "report_summary.json")


def _report_files(folder: Path) -> set[str]:
    return {f.name for pattern in REPORT_FILES for f in folder.glob(pattern) if f.is_file()}


def _swap_in(tmp: Path, out: Path) -> None:
    """Move the finished report from ``tmp`` into ``out``: each file by an atomic rename (report.md
    last, so it is never newer than what it shows), then remove the previous report's files that
    the new one does not have. Only report files are touched: report.out may hold other files."""
    out.mkdir(parents=True, exist_ok=True)
    new = {f.name for f in tmp.iterdir() if f.is_file()}      # everything this report wrote
    for name in sorted(new, key=lambda n: (n == "report.md", n)):
        os.replace(tmp / name, out / name)
    for name in _report_files(out) - new:
        (out / name).unlink()


def render_markdown(cfg, roots, groups, notices, t, figs, skipped: list[dict] | None = None) -> str:
    lines = [f"# axes-pipeline report: {cfg.name}\n",
             f"Runs under {', '.join(f'`{r}`' for r in roots)}: "
             + ", ".join(f"**{g}** (seeds {', '.join(str(r.seed) for r in rs)})" for g, rs in groups.items()) + ".\n"]
    if notices:
        lines.append("**Groups not pooled:**\n" + "".join(f"- {n}\n" for n in notices))
    if skipped:
        lines.append("\n## Skipped inputs\n\nLeft out of every table and figure that reads them:\n\n"
                     + "".join(f"- seed {s['seed']} (`{s['run']}`), {s['file']}: {s['reason']}\n" for s in skipped))
    lines.append("\n## Headline: is the local axis a better guide to removability than the target axis?\n")
    lines.append(f"FLOPs-AUC ({ACCURACY_LABEL.get(cfg.report.accuracy, cfg.report.accuracy)}, area under accuracy "
                 "vs removed FLOPs divided by the span), "
                 f"paired across seeds: difference with a paired bootstrap {int(100 * 0.95)}% CI, "
                 f"{cfg.report.test} p-value, effect size d_z. With fewer than {cfg.report.min_seeds} seeds the test "
                 "is not possible and the note says so. `p_min` is the smallest p the test can reach with these seeds; "
                 "`p_holm` is Holm-adjusted over the group's rows. The best score of an axis chosen on all seeds is "
                 "optimistic (more so for the axis with more candidates); the row chosen on the other seeds "
                 "(leave-one-seed-out) is the unbiased comparison.\n\n")
    head = t["headline"]
    if head.empty:
        lines.append("_No pruning results (run `prune.py` on these runs)._\n")
    else:
        lines.append(_md_table(head, ["group", "comparison", "n", "mean_a", "mean_b", "diff", "ci_lo", "ci_hi",
                                      "p_value", "p_holm", "p_min", "effect_size", "candidates", "note"]))
    lines.append("\n## FLOPs-AUC per score (mean ± SD over seeds)\n")
    auc = t["flops_auc"]
    lines.append(_md_table(auc, ["group", "score", "axis", "flops_auc_mean", "flops_auc_sd", "flops_auc_rel_mean",
                                 "flops_auc_rel_sd", "seeds"]) if not auc.empty else "_No pruning results._\n")
    lines.append("\nAccuracy at every FLOPs target: `accuracy_by_target.csv`.\n")
    lines.append("\n## The two axes per layer (mean ± SD over seeds)\n")
    lay = t["layers"]
    if lay.empty:
        lines.append("_No analysis results (run `analyze.py` on these runs)._\n")
    else:
        cols = ["group", "layer", "seeds"] + [c for c in lay.columns if c.endswith(("_mean", "_sd", "_n"))
                                              and not c.startswith("null")]
        lines.append(_md_table(lay, cols))
    lines.append("\n## Against the paper's reference values (METHODS §11)\n")
    lines.append(_md_table(t["reference"]) if not t["reference"].empty else "_none_\n")
    lines.append("\n## Lesions and peer replacement\n")
    lines.append(_md_table(t["lesions"]) if not t["lesions"].empty else "_No lesion results (analysis=lesion)._\n")
    lines.append("\n## Cross-layer propagation\n")
    lines.append(_md_table(t["propagation"]) if not t["propagation"].empty
                 else "_No propagation results (analysis=propagation)._\n")
    lines.append("\n## Runs\n")
    lines.append(_md_table(t["runs"], ["group", "seed", "val_acc", "test_acc", "epochs", "analyze", "prune"]))
    lines.append("\n## Figures\n")
    lines.extend(f"\n### {label}\n\n![{label}]({p.name})\n" for label, p in figs.items())
    return "".join(lines)


def render_html(md: str, figs: dict[str, Path]) -> str:
    """A self-contained page: the markdown's tables as HTML tables, figures inlined as base64."""
    inline = {p.name: base64.b64encode(p.read_bytes()).decode() for p in figs.values()}
    out, rows = [], []

    def flush_table():
        if not rows:
            return
        cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in rows if not set(r) <= set("|-\n ")]
        head, body = cells[0], cells[1:]
        out.append("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"
                   + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
                   + "</tbody></table>")
        rows.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            rows.append(line)
            continue
        flush_table()
        if line.startswith("!["):
            name = line[line.index("(") + 1: line.rindex(")")]
            out.append(f'<img src="data:image/png;base64,{inline.get(name, "")}" alt="{html.escape(name)}">')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("- "):
            out.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.strip():
            text = html.escape(line).replace("**", "")
            out.append(f"<p>{text}</p>")
    flush_table()
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:12px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px}"
             "th{background:#f3f3f3}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>axes-pipeline report</title><style>{style}</style>" \
           f"</head><body>{''.join(out)}</body></html>\n"
