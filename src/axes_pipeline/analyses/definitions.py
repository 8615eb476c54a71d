"""Do the conclusions depend on the definitions? (METHODS §1, §6, §11)

The paper does not pin down where a channel's activation is read (before the norm, after it, after
the nonlinearity) nor how an image's feature map becomes samples (random positions or one pooled
value), and its init-coupling claim (the axes strongly coupled at random initialisation, weakly
after training) depends on that choice. This analysis makes the choice a measured part of the
result instead of a hidden one: on the initial checkpoint (``epoch_000.ckpt``) and the analysed one
(``best.ckpt`` by default) it recomputes, under every activation point × sampling of
:data:`DEFINITIONS`, the quantities of METHODS §6 on the same depth-spaced layers as the dynamics
(``analysis.dynamics.k`` / ``layers``), with BatchNorm in eval mode and the calibration images of
``capture.*``. Only the streamed (T, Y) moments are held, as in the dynamics.

Each (definition, checkpoint) is stored as a part (``analyze/definitions_parts/<point>-<spatial>_<init|trained>.csv``)
beside the fingerprint of what made it (``<part>.fingerprint.json``: data identity, checkpoint content digest,
capture and metric settings): a re-run skips sound parts computed from the same inputs and recomputes the rest.

Outputs (``<run_dir>/analyze/``): ``definitions.csv`` (one row per definition, checkpoint and layer)
and ``plots/definitions.png`` (small multiples: one panel per quantity, init → trained per
definition). The report pools seeds (mean ± SD) and says, per definition, whether each quantity
moves from init to trained in the paper's direction.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from axes_pipeline.analyses.dynamics import _layers, dynamics_knobs
from axes_pipeline.analyses.registry import analysis
from axes_pipeline.analyses.settings import DefinitionsAnalysis, DynamicsAnalysis
from axes_pipeline.axes.settings import AxesKnobs
from axes_pipeline.axes.table import axes_identity, calibration_loader, graph_knobs, layer_analysis, metric_dtype, metric_knobs
from axes_pipeline.capture import capture_activations
from axes_pipeline.console import progress as units_progress
from axes_pipeline.errors import UserError, unknown_name
from axes_pipeline.models import conv_norm_pairs
from axes_pipeline.plotting import save_figure
from axes_pipeline.runs import Stamp, run_fingerprint, write_csv
from axes_pipeline.tables import DamagedTable, Schema, read_table
from axes_pipeline.training.checkpoints import load_into
from axes_pipeline.training.restore import architecture, expected_meta

log = logging.getLogger("axes_pipeline")

POINTS = ("pre_bn", "post_bn", "post_act")
SPATIAL = ("sample", "gap")
#: Every activation point × sampling the analysis measures, in the order of the table and figure.
DEFINITIONS: tuple[tuple[str, str], ...] = tuple((p, s) for p in POINTS for s in SPATIAL)
CHECKPOINTS = ("init", "trained")

#: The quantities of METHODS §6 (the dynamics' columns) and the paper's init → trained direction
#: (METHODS §11 and its qualitative claims): "falls", "rises", or None where the paper states none.
PAPER_DIRECTION: dict[str, str | None] = {
    "align_input_capture_task_info": "falls",   # strongly coupled at init, weakly aligned after training
    "modularity_gap": None,                      # some local-topology bias already at init: no direction stated
    "hull_size_mean": "rises",                   # 3.08 → 4.27
    "hull_saturated_frac": "rises",              # 0.067 → 0.195
    "s3_s2": "rises",                            # 0.192 → 0.381
}
LABELS = {"align_input_capture_task_info": "ρ(I_X, I_T)", "modularity_gap": "modularity gap Q_R − Q_S",
          "hull_size_mean": "mean hull size", "hull_saturated_frac": "saturated-hull fraction", "s3_s2": "S3/S2"}
PARTS = "definitions_parts"
PART_SCHEMA = Schema("definitions part", columns={"point": "str", "spatial": "str", "checkpoint": "str",
                                                  "layer": "str", "layer_index": "int", "channels": "int",
                                                  "hull_size_mean": "float"},
                     finite=("hull_size_mean",), layer="layer")


def definitions_of(block: DefinitionsAnalysis) -> list[tuple[str, str]]:
    """The (point, spatial) pairs selected by ``analysis.definitions.points`` × ``spatial``."""
    points, spatial = list(block.points), list(block.spatial)
    for p in points:
        if p not in POINTS:
            raise unknown_name("analysis.definitions.points", p, POINTS)
    for s in spatial:
        if s not in SPATIAL:
            raise unknown_name("analysis.definitions.spatial", s, SPATIAL)
    if not points or not spatial:
        raise UserError("analysis.definitions: points and spatial each need at least one value")
    return [(p, s) for p, s in DEFINITIONS if p in points and s in spatial]


def _init_checkpoint(run_dir: Path, block: DefinitionsAnalysis) -> Path:
    path = Path(run_dir) / "checkpoints" / block.init
    if not path.is_file():
        raise UserError(f"definitions: no initial checkpoint {path} (train.py writes epoch_000.ckpt before the "
                        f"first step); retrain the run, or set analysis.definitions.init to another file in checkpoints/")
    return path


def _skip_reason(block: DefinitionsAnalysis, run_dir: Path) -> str | None:
    """Why definitions is skipped on this run (``required=false`` and no initial checkpoint), else None."""
    path = Path(run_dir) / "checkpoints" / block.init
    return None if block.required or path.is_file() else f"no initial checkpoint {path}"


def check_definitions_analysis(ctx, block: DefinitionsAnalysis) -> None:
    """Knobs, layers (the dynamics' depth-spaced ones) and the initial checkpoint, before the network runs."""
    definitions_of(block)
    _layers(ctx.trained.model, ctx.blocks["dynamics"])
    if not _skip_reason(block, ctx.trained.run_dir):
        _init_checkpoint(ctx.trained.run_dir, block)


def part_stamp(path: Path, knobs: AxesKnobs, data_id: dict, ckpt: Path, layers: list[str]) -> Stamp:
    """The fingerprint of a stored part (``<part>.fingerprint.json``): the data identity, the checkpoint's
    content and the axes identity of the definition's knobs on the chosen layers."""
    return Stamp(path.with_suffix(".fingerprint.json"), run_fingerprint(data_id, ckpt, **axes_identity(knobs, layers)))


def _stored(path: Path, stamp: Stamp, layers: list[str]) -> pd.DataFrame | None:
    """The stored part at ``path`` when its fingerprint is ``stamp``'s and it is sound; else None."""
    if not path.is_file() or not stamp.current:
        return None
    try:
        return read_table(path, PART_SCHEMA, rebuild="python analyze.py analysis=definitions",
                          rows_per_layer=dict.fromkeys(layers, 1))
    except DamagedTable as err:
        log.warning("definitions: %s; recomputing it", str(err).split("; rebuild")[0])
        return None


def definitions_table(knobs: AxesKnobs, block: DefinitionsAnalysis, dynamics: DynamicsAnalysis, data_id: dict, model,
                      datamodule, checkpoints: dict[str, Path], run_dir: Path, device, expect: dict | None = None,
                      progress: bool = True) -> tuple[pd.DataFrame, int]:
    """``(frame, computed)``: one row per (definition, checkpoint, layer) on the dynamics' layers; ``model`` is
    overwritten with each checkpoint's weights. ``computed`` counts the parts computed now (the rest were
    stored). ``knobs``: the run's axes knobs; each definition replaces its activation point and sampling."""
    defs = definitions_of(block)
    layers = _layers(model, dynamics)
    knobs = dynamics_knobs(knobs, dynamics)
    all_units = conv_norm_pairs(model)
    units = {n: all_units[n] for n in layers}
    index = {n: i for i, n in enumerate(all_units)}
    parts = Path(run_dir) / "analyze" / PARTS
    dtype, graphs, metrics, c = metric_dtype(knobs.metrics), graph_knobs(knobs.graphs), metric_knobs(knobs.metrics), knobs.capture
    loader, frames, computed, loaded = None, [], 0, None
    jobs = [(tag, ckpt, p, s) for tag, ckpt in checkpoints.items() for p, s in defs]
    for tag, ckpt, point, spatial in units_progress(jobs, "definitions", enabled=progress,
                                                    label=lambda j: f"{j[2]}/{j[3]} {j[0]}"):
        definition = replace(knobs, capture=replace(c, point=point, spatial=spatial))
        path = parts / f"{point}-{spatial}_{tag}.csv"
        stamp = part_stamp(path, definition, data_id, ckpt, layers)
        part = _stored(path, stamp, layers)
        if part is None:
            if loader is None:
                loader = calibration_loader(c, datamodule)
            if loaded != ckpt:      # the jobs are ordered by checkpoint: each is loaded once
                load_into(model, ckpt, expect)
                loaded = ckpt
            model.eval()            # BatchNorm in eval mode: its running statistics, as at inference
            capture = capture_activations(model, units, loader, point=point, spatial=spatial,
                                          samples_per_image=int(c.samples_per_image), target=c.target,
                                          seed=int(c.seed), patch_moments=False, device=device, progress=False,
                                          keep_samples=False)
            model.cpu()
            part = pd.DataFrame([layer_analysis(n, index[n], capture.cov(n), units[n], knobs=metrics, dtype=dtype,
                                                device=device, graphs=graphs, seed=int(c.seed),
                                                n_samples=capture.n_samples(n)).summary for n in layers])
            part.insert(0, "point", point)
            part.insert(1, "spatial", spatial)
            part.insert(2, "checkpoint", tag)
            part["calibration_accuracy"] = capture.accuracy
            with stamp.writing():
                write_csv(path, part)
            computed += 1
            del capture
        frames.append(part)
    frame = pd.concat(frames, ignore_index=True)
    return frame, computed


def direction(init: float, trained: float) -> str:
    """``rises`` / ``falls`` / ``flat`` (|Δ| below 1e-9) / ``n/a`` (a value undefined)."""
    if not (np.isfinite(init) and np.isfinite(trained)):
        return "n/a"
    delta = trained - init
    return "flat" if abs(delta) < 1e-9 else ("rises" if delta > 0 else "falls")


def directions(frame: pd.DataFrame) -> pd.DataFrame:
    """Per definition × quantity: the seed-level mean ± SD at init and trained (each seed's mean over
    layers first), the direction of the means, the paper's direction and whether they match.
    ``frame`` holds the rows of one or several seeds (column ``seed``; one seed when absent)."""
    frame = frame if "seed" in frame else frame.assign(seed=0)
    cols = [q for q in PAPER_DIRECTION if q in frame]
    per_seed = frame.groupby(["point", "spatial", "checkpoint", "seed"], sort=False)[cols].mean().reset_index()
    rows = []
    for (point, spatial), d in per_seed.groupby(["point", "spatial"], sort=False):
        for q in cols:
            row = {"point": point, "spatial": spatial, "quantity": q}
            for tag in CHECKPOINTS:
                v = d.loc[d.checkpoint == tag, q].to_numpy(float)
                v = v[np.isfinite(v)]
                row[f"{tag}_mean"] = float(v.mean()) if v.size else np.nan
                row[f"{tag}_sd"] = float(v.std(ddof=1)) if v.size > 1 else np.nan
            row["seeds"] = int(d["seed"].nunique())
            row["direction"] = direction(row["init_mean"], row["trained_mean"])
            paper = PAPER_DIRECTION[q]
            row["paper_direction"] = paper or "not stated"
            row["matches_paper"] = None if paper is None or row["direction"] == "n/a" else row["direction"] == paper
            rows.append(row)
    order = {d: i for i, d in enumerate(DEFINITIONS)}
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out["_o"] = [order[(p, s)] for p, s in zip(out.point, out.spatial)]
    return out.sort_values(["_o"], kind="stable").drop(columns="_o").reset_index(drop=True)


def reproduces_init_coupling(table: pd.DataFrame) -> list[str]:
    """The definitions under which ρ(I_X, I_T) is positive at init and falls after training (the paper's claim)."""
    q = table[table.quantity == "align_input_capture_task_info"]
    return [f"{p}/{s}" for p, s, i, d in zip(q.point, q.spatial, q.init_mean, q.direction) if i > 0 and d == "falls"]


def plot_definitions(table: pd.DataFrame, path: Path, title: str = "") -> Path:
    """Small multiples: one panel per quantity; per definition its init (open) and trained (filled)
    mean ± SD over seeds, joined by an arrow; the paper's direction in the panel title."""
    import matplotlib.pyplot as plt  # deferred: matplotlib loads in seconds, and only a finished analysis is plotted

    quantities = [q for q in PAPER_DIRECTION if q in set(table.quantity)]
    fig, axs = plt.subplots(1, len(quantities), figsize=(3.2 * len(quantities), 3.4), squeeze=False)
    for ax, q in zip(axs[0], quantities):
        d = table[table.quantity == q].reset_index(drop=True)
        x = np.arange(len(d))
        for i, r in d.iterrows():
            color = {True: "tab:blue", False: "tab:red"}.get(r["matches_paper"], "0.4")
            ax.errorbar([i - 0.12], [r["init_mean"]], yerr=[np.nan_to_num(r["init_sd"])], fmt="o", mfc="white",
                        color=color, ms=5, capsize=2)
            ax.errorbar([i + 0.12], [r["trained_mean"]], yerr=[np.nan_to_num(r["trained_sd"])], fmt="o",
                        color=color, ms=5, capsize=2)
            if np.isfinite(r["init_mean"]) and np.isfinite(r["trained_mean"]):
                ax.annotate("", xy=(i + 0.12, r["trained_mean"]), xytext=(i - 0.12, r["init_mean"]),
                            arrowprops={"arrowstyle": "->", "color": color, "lw": 0.8})
        ax.set_xticks(x, [f"{p}\n{s}" for p, s in zip(d.point, d.spatial)], fontsize=7)
        paper = PAPER_DIRECTION[q]
        ax.set_title(f"{LABELS[q]}\npaper: {paper or 'no direction stated'}", fontsize=9)
        if q.startswith("align") or q == "modularity_gap":
            ax.axhline(0, color="gray", lw=0.5)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(title or "init (open) → trained (filled) under each definition; blue: the paper's direction, "
                 "red: the opposite", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return save_figure(fig, path)


@analysis("definitions", check=check_definitions_analysis)
def run_definitions_analysis(ctx, block: DefinitionsAnalysis) -> dict:
    """Both checkpoints under every definition (resumable); the table, the figure and a headline."""
    trained = ctx.trained
    skip = _skip_reason(block, trained.run_dir)
    if skip:   # analysis=all on a run without its initial checkpoint: the other analyses still run
        log.warning("definitions: skipped: %s", skip)
        print(f"definitions: skipped: {skip}")
        return {"skipped": skip}
    dm = trained.datamodule
    model = architecture(ctx.inputs.model, dm.num_classes)   # its own instance: the restored model stays as is
    checkpoints = {"init": _init_checkpoint(trained.run_dir, block), "trained": Path(trained.ckpt)}
    frame, computed = definitions_table(ctx.knobs, block, ctx.blocks["dynamics"], trained.data_id, model, dm, checkpoints,
                                        trained.run_dir, ctx.device,
                                        expect=expected_meta(ctx.inputs.run, dm.num_classes, dm.image_size))
    del model
    frame = frame.drop(columns=["fingerprint"], errors="ignore").assign(seed=ctx.inputs.id.seed)
    write_csv(ctx.out / "definitions.csv", frame)
    table = directions(frame)
    if ctx.knobs.plots:
        ctx.tracker.image("analyze/definitions", plot_definitions(table, ctx.out / "plots" / "definitions.png"))
    ctx.tracker.table("analyze/definitions", frame)
    rho = table[table.quantity == "align_input_capture_task_info"]
    head = {"definitions": len(rho), "parts_computed": computed,
            "init_coupling_reproduced_by": reproduces_init_coupling(table),
            **{f"rho_{p}_{s}_{tag}": float(r[f"{tag}_mean"]) for p, s, (_, r) in zip(rho.point, rho.spatial, rho.iterrows())
               for tag in CHECKPOINTS}}
    ok = ", ".join(head["init_coupling_reproduced_by"]) or "none"
    print(f"analyze: definitions: {len(rho)} definitions × 2 checkpoints ({computed} computed now); "
          f"ρ(I_X, I_T) positive at init and falling after training under: {ok}")
    return head
