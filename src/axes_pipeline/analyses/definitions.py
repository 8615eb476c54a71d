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
import textwrap
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
from axes_pipeline.stats import across_seeds, change_verdict
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


#: Quantities unchanged by a per-channel affine map y → a·y + b (a ≠ 0): hulls and S3/S2 are built from
#: correlations, the modularity gap from graphs of them. BatchNorm in eval mode is such a map, so under
#: these post_bn repeats pre_bn by construction; the table shows such a pair once, labelled.
AFFINE_INVARIANT = ("modularity_gap", "hull_size_mean", "hull_saturated_frac", "s3_s2")
#: what post_bn is identical to, and why (the label of a collapsed row)
SAME_BY_CONSTRUCTION = {"post_bn": ("pre_bn", "eval-mode BN is a per-channel affine map")}


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal seed by seed up to float rounding (the two captures run the same images through the same
    weights; only the affine map differs)."""
    return a.shape == b.shape and a.size > 0 and bool(np.allclose(a, b, rtol=1e-6, atol=1e-9, equal_nan=True))


def directions(frame: pd.DataFrame) -> pd.DataFrame:
    """Per definition × quantity: init and trained as seed-level mean ± SD (each seed's mean over layers
    first), the per-seed change trained − init with its Student t interval and p over seeds
    (:func:`~axes_pipeline.stats.across_seeds`), the direction read off that interval (``rises`` /
    ``falls`` / ``no clear change``; one seed: the point's direction, "(1 seed: no interval)"), the
    paper's direction and ``matches_paper``: True only where the interval excludes 0 on the paper's
    side, False where the paper states a direction and it does not, None where it states none or one
    seed cannot say. A post_bn row equal to its pre_bn row in every seed at both checkpoints (the
    quantities of :data:`AFFINE_INVARIANT`) is dropped and the pre_bn row names it (``same_as``);
    equal at init only, the post_bn row says so (``note``).
    ``frame`` holds the rows of one or several seeds (column ``seed``; one seed when absent)."""
    frame = frame if "seed" in frame else frame.assign(seed=0)
    cols = [q for q in PAPER_DIRECTION if q in frame]
    per_seed = frame.groupby(["point", "spatial", "checkpoint", "seed"], sort=False)[cols].mean().reset_index()

    def values(point, spatial, tag, q) -> pd.Series:
        d = per_seed[(per_seed.point == point) & (per_seed.spatial == spatial) & (per_seed.checkpoint == tag)]
        return d.set_index("seed")[q].astype(float).sort_index()

    rows = []
    for (point, spatial), d in per_seed.groupby(["point", "spatial"], sort=False):
        for q in cols:
            row = {"point": point, "spatial": spatial, "quantity": q}
            v = {tag: values(point, spatial, tag, q) for tag in CHECKPOINTS}
            for tag in CHECKPOINTS:
                x = v[tag].to_numpy(float)
                x = x[np.isfinite(x)]
                row[f"{tag}_mean"] = float(x.mean()) if x.size else np.nan
                row[f"{tag}_sd"] = float(x.std(ddof=1)) if x.size > 1 else np.nan
            change = across_seeds((v["trained"] - v["init"]).dropna().to_numpy(float))
            row.update(change_mean=change["mean"], change_sd=change["sd"], change_ci_lo=change["ci_lo"],
                       change_ci_hi=change["ci_hi"], change_p=change["p"], seeds=int(d["seed"].nunique()))
            paper = PAPER_DIRECTION[q]
            if change["n"] == 0:
                row["direction"], matches = "n/a", None
            elif change["n"] == 1:
                row["direction"] = f"{direction(row['init_mean'], row['trained_mean'])} (1 seed: no interval)"
                matches = None
            else:
                row["direction"] = change_verdict(change["ci_lo"], change["ci_hi"])
                matches = row["direction"] == paper
            row["paper_direction"] = paper or "not stated"
            row["matches_paper"] = None if paper is None else matches
            row["same_as"], row["note"] = "", ""
            same = SAME_BY_CONSTRUCTION.get(point)
            if same and q in AFFINE_INVARIANT:
                ref = {tag: values(same[0], spatial, tag, q) for tag in CHECKPOINTS}
                equal = {tag: _same(v[tag].to_numpy(float), ref[tag].to_numpy(float)) for tag in CHECKPOINTS}
                if all(equal.values()):
                    row["same_as"] = f"{same[0]}/{spatial}"
                elif equal["init"]:
                    row["note"] = f"{point} = {same[0]} at init ({same[1]})"
            rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out["matches_paper"] = [None if m is None else bool(m) for m in out["matches_paper"]]   # True/False/None, not numpy's
    out["matches_paper"] = out["matches_paper"].astype(object)
    # a row identical by construction to another is shown once: the other's row names it
    dup = out[out["same_as"] != ""]
    for r in dup.itertuples():
        keep = (out.point + "/" + out.spatial == r.same_as) & (out.quantity == r.quantity)
        why = SAME_BY_CONSTRUCTION[r.point][1]
        out.loc[keep, "note"] = f"= {r.point}/{r.spatial} ({why})"
    out = out[out["same_as"] == ""].drop(columns="same_as")
    order = {d: i for i, d in enumerate(DEFINITIONS)}
    out["_o"] = [order[(p, s)] for p, s in zip(out.point, out.spatial)]
    return out.sort_values(["_o"], kind="stable").drop(columns="_o").reset_index(drop=True)


def reproduces_init_coupling(table: pd.DataFrame) -> list[str]:
    """The definitions under which ρ(I_X, I_T) is positive at init and falls after training (the paper's
    claim): across seeds, the change's interval below 0 (one seed: its point)."""
    q = table[table.quantity == "align_input_capture_task_info"]
    return [f"{p}/{s}" for p, s, i, d in zip(q.point, q.spatial, q.init_mean, q.direction)
            if i > 0 and str(d).startswith("falls")]


#: panels per row of the definitions figure, and its font size (pt): at the report's DPI and this width
#: the figure is shown unscaled on a 1400 px page, its text as large as the page's body text
PANELS_PER_ROW = 3
FONT_PT = 10.5


def _colour(r) -> str:
    """Blue: the paper's direction (interval excludes 0 on its side); red: the opposite direction
    (interval excludes 0 on the other side); gray: no clear change, no direction stated, one seed."""
    if r["matches_paper"] is True:
        return "tab:blue"
    paper = PAPER_DIRECTION.get(r["quantity"])
    return "tab:red" if paper and r["direction"] in ("rises", "falls") and r["direction"] != paper else "0.45"


def plot_definitions(table: pd.DataFrame, path: Path, title: str = "") -> Path:
    """Small multiples, :data:`PANELS_PER_ROW` to a row: one panel per quantity; per definition its init
    (open) and trained (filled) mean ± SD over seeds, joined by an arrow coloured by :func:`_colour`; the
    paper's direction in the panel title. A row standing for two identical definitions is labelled so."""
    import matplotlib.pyplot as plt  # deferred: matplotlib loads in seconds, and only a finished analysis is plotted

    quantities = [q for q in PAPER_DIRECTION if q in set(table.quantity)]
    ncols = min(PANELS_PER_ROW, max(1, len(quantities)))
    nrows = -(-len(quantities) // ncols)
    fig, axs = plt.subplots(nrows, ncols, figsize=(3.7 * ncols, 4.4 * nrows + 0.5), squeeze=False)
    for ax in axs.ravel()[len(quantities):]:
        ax.set_visible(False)
    for ax, q in zip(axs.ravel(), quantities):
        d = table[table.quantity == q].reset_index(drop=True)
        x = np.arange(len(d))
        for i, r in d.iterrows():
            color = _colour(r)
            ax.errorbar([i - 0.12], [r["init_mean"]], yerr=[np.nan_to_num(r["init_sd"])], fmt="o", mfc="white",
                        color=color, ms=5, capsize=2)
            ax.errorbar([i + 0.12], [r["trained_mean"]], yerr=[np.nan_to_num(r["trained_sd"])], fmt="o",
                        color=color, ms=5, capsize=2)
            if np.isfinite(r["init_mean"]) and np.isfinite(r["trained_mean"]):
                ax.annotate("", xy=(i + 0.12, r["trained_mean"]), xytext=(i - 0.12, r["init_mean"]),
                            arrowprops={"arrowstyle": "->", "color": color, "lw": 0.8})
        notes = d["note"] if "note" in d else pd.Series("", index=d.index)
        ax.set_xticks(x, [f"{p}{'=' + SAME_BY_CONSTRUCTION_OF.get(p, '') if str(n).startswith('=') else ''}/{s}"
                          for p, s, n in zip(d.point, d.spatial, notes)], fontsize=FONT_PT - 1, rotation=40,
                      ha="right", rotation_mode="anchor")
        paper = PAPER_DIRECTION[q]
        ax.set_title(f"{LABELS[q]}\npaper: {paper or 'no direction stated'}", fontsize=FONT_PT)
        if q.startswith("align") or q == "modularity_gap":
            ax.axhline(0, color="gray", lw=0.5)
        ax.tick_params(axis="y", labelsize=FONT_PT - 1)
    fig.suptitle("\n".join(textwrap.wrap(title or "init (open) → trained (filled) under each definition; blue: the "
                                          "paper's direction, red: the opposite, gray: no clear change (t interval "
                                          "over seeds includes 0)", 110)), fontsize=FONT_PT)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (4.4 * nrows + 0.5)))
    return save_figure(fig, path)


#: the x label of a row standing for two definitions: pre_bn=post_bn
SAME_BY_CONSTRUCTION_OF = {v[0]: k for k, v in SAME_BY_CONSTRUCTION.items()}


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
    # which checkpoint "trained" is, named in the report beside the dynamics' last epoch
    frame = frame.drop(columns=["fingerprint"], errors="ignore").assign(seed=ctx.inputs.id.seed,
                                                                        trained_ckpt=Path(trained.ckpt).name)
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
