"""run_analysis(cfg): the body of analyze.py.

The axes of every channel are always computed first (or read from the cache) because every other
analysis uses them; then each selected analysis (``analysis=lesion``, ``[axes,propagation]``,
``all``...) runs on the same restored model and captured samples. Outputs: ``<run_dir>/analyze/``
(``<run_dir>/analyze@<ckpt stem>/`` for another checkpoint than the run's best.ckpt, else last.ckpt).
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from axes_pipeline.analyses import plots
from axes_pipeline.analyses.registry import ANALYSES, analysis
from axes_pipeline.analyses.settings import ANALYSIS_SCHEMAS
from axes_pipeline.axes.settings import AxesKnobs
from axes_pipeline.axes.table import axes_fingerprint, axes_step, fit_capture_size, select_units
from axes_pipeline.config import to_container
from axes_pipeline.devices import resolve_device
from axes_pipeline.errors import UserError
from axes_pipeline.layout import (
    ANALYSIS_TABLES,
    ANALYZE_SUMMARY,
    AXES_CSV,
    PLOTS,
    analysis_inputs,
    analysis_record,
    broken_chains,
)
from axes_pipeline.runs import Stamp, file_digest, flatten, read_json, write_json, write_record
from axes_pipeline.stage import StageInputs, stage_inputs, typed
from axes_pipeline.tracking import StageTracker, artifact_name, log_axes
from axes_pipeline.training.restore import restore_trained

log = logging.getLogger("axes_pipeline")


def _register_analyses() -> None:
    """Import every module of this package: an analysis module registers itself (``@analysis``),
    so a new analysis is one module here plus its conf/analysis/<name>.yaml (README "Extending").
    A user's module outside the package comes in through ``plugins=[my_pkg.my_analysis]``."""
    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda m: m.name):
        if info.name != "analyze":
            importlib.import_module(f"{__package__}.{info.name}")


@dataclass
class Context:
    """What the analyses share: the stage's inputs (the run's identity and layout, the tracker's run), how
    the axes are measured (``knobs``, fitted to the data), every analysis' typed block (an analysis' own is
    passed to its run function; another's is read here, as definitions reads the dynamics' layers), the
    restored run, its captured samples and axes, the output folder and the tracker."""

    inputs: StageInputs
    knobs: AxesKnobs
    out: Path
    tracker: StageTracker | None
    device: torch.device
    blocks: dict[str, Any] = field(default_factory=dict)
    trained: object = None
    units: dict | None = None
    capture: object = None
    axes: pd.DataFrame | None = None
    layers: pd.DataFrame | None = None
    axes_headline: dict | None = None


def selected(chosen: list[str]) -> list[str]:
    """The analyses named by ``analysis=``, each one registered."""
    unknown = [k for k in chosen if k not in ANALYSES]
    if unknown:
        raise UserError(f"unknown analysis {unknown[0]!r}; choose from: {', '.join(sorted(ANALYSES))}")
    return chosen


AXES_PLOTS = ("scatter_ix_it", "depth_profile")   # (communities only where graphs were drawn)


def run_axes(ctx: Context, requested: bool = True) -> dict:
    """Capture (or reuse), compute both axes per layer, write tables, plots and tracker logs. A sound
    ``axes.csv`` computed with these settings (with its plots, if the axes were ``requested``) is read back
    instead: a re-run sweep skips finished work; ``analysis.axes.recompute=true`` forces it."""
    knobs, trained, out = ctx.knobs, ctx.trained, ctx.out
    want = axes_fingerprint(knobs, trained.data_id, trained.ckpt)
    plots_there = not knobs.plots or plots_current(out, want)
    recompute = bool(ctx.blocks["axes"].recompute)
    # the other analyses read the capture: taken (or read from its cache) even when the tables are reused
    step = axes_step(knobs, trained, ctx.units, ctx.device, out, reuse=not recompute and (plots_there or not requested),
                     need_capture=True, keep_matrices=True)
    ctx.capture = capture = step.capture
    ctx.axes, ctx.layers = step.axes, step.layers
    if step.reused:
        headline = {**axes_headline(ctx.layers), "calibration_accuracy": capture.accuracy, "reused": True,
                    "fingerprint": want}
        if requested:   # this stage's tracker run still gets the tables and figures
            ctx.tracker.table("analyze/layers", ctx.layers)
            ctx.tracker.table("analyze/axes", ctx.axes)
            for f in sorted((out / PLOTS).glob("*.png")) if knobs.plots else []:
                if f.stem in (*AXES_PLOTS, "communities"):
                    ctx.tracker.image(f"analyze/{f.stem}", f)
        log.info("axes: reusing %s (computed with these settings; analysis.axes.recompute=true to redo)", out / AXES_CSV)
        return headline
    axes_df, layers_df, results = step.axes, step.layers, step.results
    # the summary's axes part carries the table's fingerprint (it is rewritten with the table, below)
    headline = {**axes_headline(layers_df), "calibration_accuracy": capture.accuracy, "fingerprint": want}
    drop_axes_plots(out)   # plots of the old table never sit beside the new one, drawn or not
    if knobs.plots:
        figs = [plots.scatter_ix_it(axes_df, out / PLOTS / "scatter_ix_it.png"),
                plots.depth_profile(layers_df, out / PLOTS / "depth_profile.png")]
        with_graphs = [n for n, r in results.items() if r.r_x is not None]
        if with_graphs:
            pick = [with_graphs[i] for i in sorted(set(np.linspace(0, len(with_graphs) - 1, 3).round().astype(int)))]
            mats = {n: (results[n].r_x, results[n].s, axes_df.loc[axes_df.layer == n, "community_r"].to_numpy()
                        [: results[n].r_x.shape[0]]) for n in pick}
            figs.append(plots.communities(mats, out / PLOTS / "communities.png"))
        write_json(plots_stamp(out, want).path, want)   # last: the plots are drawn
        for f in figs:
            ctx.tracker.image(f"analyze/{f.stem}", f)
    ctx.tracker.table("analyze/layers", layers_df)
    ctx.tracker.table("analyze/axes", axes_df)
    return headline


def plots_stamp(out: Path, want: dict) -> Stamp:
    """The fingerprint of the axes plots (``plots/fingerprint.json``): the axes table they were drawn from."""
    return Stamp(out / PLOTS / "fingerprint.json", want)


def plots_current(out: Path, want: dict) -> bool:
    """The axes plots exist and were drawn from a table with fingerprint ``want``."""
    return plots_stamp(out, want).current and all((out / PLOTS / f"{p}.png").is_file() for p in AXES_PLOTS)


def drop_axes_plots(out: Path) -> None:
    """Remove the axes plots and their fingerprint: the table they were drawn from is being replaced."""
    (out / PLOTS / "fingerprint.json").unlink(missing_ok=True)
    for name in (*AXES_PLOTS, "communities"):
        (out / PLOTS / f"{name}.png").unlink(missing_ok=True)


def axes_headline(layers_df: pd.DataFrame) -> dict:
    def mean(col):
        return float(layers_df[col].mean()) if col in layers_df and layers_df[col].notna().any() else None

    return {"layers": int(len(layers_df)), "channels": int(layers_df["channels"].sum()),
            **{f"mean_{c}": mean(c) for c in (
                "align_input_capture_task_info", "align_peer_overlap_target_excess",
                "align_hull_score_task_unique", "modularity_gap", "null_modularity_gap", "nmi", "ari",
                "hull_size_mean", "hull_saturated_frac", "s3_s2", "grad_cos_euclid_median",
                "grad_cos_whitened_median")}}


@analysis("axes")
def axes_analysis(ctx: Context, block) -> dict:
    """``analysis=axes``: the tables themselves come from :func:`run_axes`, which runs before every
    analysis (they all read the axes); asking for them also logs them as this run's artifact."""
    log_axes(ctx.tracker, ctx.inputs.id, ctx.out, ctx.axes)
    return ctx.axes_headline


def analysis_blocks(analysis: DictConfig) -> dict[str, Any]:
    """Every registered analysis' block: the selected ones as composed, as their schema's dataclass (a
    plugin's without a schema as plain values), the others their schema's defaults (another analysis
    reads them: definitions uses the dynamics' layers)."""
    blocks = {name: typed(analysis.get(name), schema) for name, schema in ANALYSIS_SCHEMAS.items()}
    for name in ANALYSES:
        if name not in blocks:
            node = analysis.get(name)
            blocks[name] = to_container(node) if node is not None else {}
    return blocks


def run_analysis(cfg: DictConfig) -> dict:
    inputs = stage_inputs(cfg)
    chosen = selected(list(cfg.analysis))
    blocks = analysis_blocks(cfg.analysis)
    device = resolve_device(inputs.knobs.device)
    t0 = time.perf_counter()
    needs_run = any(ANALYSES[name].needs_run for name in chosen)
    trained = restore_trained(inputs) if needs_run else None
    # another checkpoint than the run's default writes to analyze@<stem>/ (restore.Trained.stage_dir)
    out = trained.stage_dir("analyze") if trained is not None else inputs.run.stage_dir("analyze")
    knobs = fit_capture_size(inputs.knobs, trained.datamodule) if trained is not None else inputs.knobs
    ctx = Context(inputs=inputs, knobs=knobs, out=out, tracker=None, device=device, blocks=blocks, trained=trained)
    if trained is not None:
        ctx.units = select_units(trained.model, knobs.capture.layers)
        for name in chosen:   # each analysis validates its own knobs before the network runs
            if ANALYSES[name].check is not None:
                ANALYSES[name].check(ctx, blocks[name])
    ctx.tracker = StageTracker(inputs.tracked, "analyze", out)
    summary: dict = {"run_dir": str(out.parent), "checkpoint": str(trained.ckpt) if trained else None, "analyses": chosen,
                     "checkpoint_digest": file_digest(trained.ckpt) if trained else None}
    try:
        if trained is not None:
            ctx.tracker.use_artifact("checkpoint", artifact_name("checkpoint", inputs.id), [trained.ckpt])
            summary["axes"] = ctx.axes_headline = run_axes(ctx, requested="axes" in chosen)
            print(f"analyze: axes of {summary['axes']['channels']} channels in {summary['axes']['layers']} layers; "
                  f"mean ρ(I_X, I_T) = {summary['axes']['mean_align_input_capture_task_info']:.3f}")
        for name in chosen:
            summary[name] = ANALYSES[name].run(ctx, blocks[name])
            if trained is not None and name in ANALYSIS_TABLES:   # the chain: the axes this analysis read
                write_record(out / analysis_record(name), {"analysis": name, "tables": list(ANALYSIS_TABLES[name])},
                             analysis_inputs(summary["axes"]["fingerprint"]))
        stale = stale_analyses(out, summary["axes"]["fingerprint"], chosen) if trained is not None else {}
        for why in stale.values():   # one line each: the console (Hydra's handler) and analyze.log
            log.warning("analyze: %s", why)
        summary["wall_time_s"] = round(time.perf_counter() - t0, 2)
        # the config as run: capture.n_cal as fitted to the data (the images captured)
        summary["config"] = {**inputs.config, "capture": asdict(knobs.capture)}
        ctx.tracker.scalars(flatten(summary, skip={"config"}))   # the config is the run's wandb config already
        write_json(out / ANALYZE_SUMMARY, _merged(out / ANALYZE_SUMMARY, summary, stale))
    finally:
        ctx.tracker.finish()
    print(f"analyze: done in {summary['wall_time_s']:.1f}s -> {out}")
    return summary


def stale_analyses(out: Path, axes_fp: dict, ran: list[str]) -> dict[str, str]:
    """{analysis: one line} for each analysis not run now whose tables in ``out`` were computed from other axes
    than ``axes_fp`` (or record none: :func:`~axes_pipeline.layout.broken_chains`): kept on disk, marked stale in
    the summary, refused by the report."""
    return {name: (f"{', '.join(have)} in {out} were not computed from the current {AXES_CSV} ({why}); kept but stale "
                   f"(the report leaves them out): rebuild with `{_rerun(name)}`")
            for name, (have, why) in broken_chains(out, axes_fp, skip=ran).items()}


def _rerun(name: str) -> str:
    """The command that rebuilds analysis ``name`` under this call's overrides (``analysis=<name>``)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        task = [o for o in HydraConfig.get().overrides.task if not o.startswith("analysis=")]
    except Exception:  # noqa: BLE001 - composed outside a Hydra app (tests, notebooks)
        task = ["<same overrides>"]
    return " ".join(["python analyze.py", *task, f"analysis={name}"])


def _merged(path: Path, summary: dict, stale: dict[str, str] | None = None) -> dict:
    """This call's summary over the stored one: analyses run earlier (``analysis=all``, then
    ``analysis=lesion`` again) keep their headline figures, unless they are ``stale`` (computed from other axes
    than this call's): those move under ``stale`` ({name: {why, headline}}), never merged as current;
    ``analyses`` lists the current ones."""
    try:
        old = read_json(path)
    except (OSError, ValueError):   # none yet, or unreadable
        old = {}
    stale = stale or {}
    merged = {**old, **summary}
    earlier = old.get("stale") or {}
    for name, entry in earlier.items():   # current again (the axes it was computed from are back): restored
        if name not in stale and name not in summary and isinstance(entry, dict) and entry.get("headline") is not None:
            merged[name] = entry["headline"]
    kept_stale = {k: v for k, v in earlier.items() if k in stale}
    for name, why in stale.items():
        headline = merged.pop(name, None)
        if headline is None:   # marked stale by an earlier call: its headline is already kept
            headline = kept_stale.get(name, {}).get("headline")
        kept_stale[name] = {"why": why, "headline": headline}
    merged.pop("stale", None)
    if kept_stale:
        merged["stale"] = kept_stale
    restored = [n for n in earlier if n not in stale and n in merged]
    merged["analyses"] = [a for a in dict.fromkeys([*old.get("analyses", []), *restored, *summary["analyses"]])
                          if a not in stale]
    return merged


# last: ``axes`` (above) registers first, then every analysis module of this package
_register_analyses()
