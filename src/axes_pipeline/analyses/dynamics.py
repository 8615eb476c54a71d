"""Training dynamics (METHODS §6, H2): how the two axes separate over training.

For a run trained with per-epoch checkpoints (``checkpoint.every_epoch=true``; ``epoch_000.ckpt``
is the random initialisation), every selected epoch is processed on its own: its weights are loaded
into one model instance, six depth-spaced conv layers are captured on the fixed calibration subset
of ``capture.*`` (the same images for every epoch and seed; only the streamed (T, Y) moments are
held, never an epoch's samples) and :func:`~axes_pipeline.axes.table.layer_analysis` writes
one row per layer (the whole ``layers.csv`` summary) to ``analyze/dynamics_parts/epoch_XXX.csv``.
A re-run skips every epoch whose part was computed with the same settings
(``dynamics_parts/settings.json``, with the data identity) from the same checkpoint content (each
part's digest); other settings recompute all, a damaged part is recomputed. The curves are
:data:`QUANTITIES`: alignment ρ(I_X, I_T), modularity gap Q_R − Q_S, mean hull size,
saturated-hull fraction and S3/S2.

Several seeds (``dynamics.seeds``): the runs of the same experiment/data/model with ``seed=``
changed (found like ``analyze.py seed=N`` finds them), each processed the same way into its own
``dynamics_parts``; the curves show the mean over layers, mean ± SD over seeds, next to the
paper's init/trained values (METHODS §11).

Outputs (``<run_dir>/analyze/``): ``dynamics.csv`` (this run, one row per (epoch, layer)),
``dynamics_seeds.csv`` (all seeds, column ``seed``), ``dynamics_curves.csv`` (per epoch: mean
and SD over seeds of the layer means), ``plots/dynamics.png``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from axes_pipeline.analyses import plots
from axes_pipeline.analyses.registry import analysis
from axes_pipeline.analyses.settings import DynamicsAnalysis
from axes_pipeline.axes.settings import AxesKnobs
from axes_pipeline.axes.table import axes_identity, calibration_loader, graph_knobs, layer_analysis, metric_dtype, metric_knobs
from axes_pipeline.capture import capture_activations
from axes_pipeline.capture.targets import target_from_logits
from axes_pipeline.console import progress as units_progress
from axes_pipeline.errors import UserError, unknown_name
from axes_pipeline.layout import AXES_FINGERPRINT, RunLayout, analysis_inputs, analysis_record
from axes_pipeline.models import conv_norm_pairs, depth_spaced_layers
from axes_pipeline.runs import Stamp, file_digest, mismatch, plain, read_json, run_fingerprint, write_csv, write_record
from axes_pipeline.stats import PAPER_REFERENCE, mean_sd
from axes_pipeline.tables import DamagedTable, Schema, read_table
from axes_pipeline.training.checkpoints import epoch_checkpoints, load_into
from axes_pipeline.training.restore import architecture, expected_meta

log = logging.getLogger("axes_pipeline")

#: The per-epoch quantities of METHODS §6 (columns of dynamics.csv) and their plot labels.
QUANTITIES: dict[str, str] = {
    "align_input_capture_task_info": "ρ(I_X, I_T)",
    "modularity_gap": "modularity gap Q_R − Q_S",
    "hull_size_mean": "mean hull size",
    "hull_saturated_frac": "saturated-hull fraction",
    "s3_s2": "S3/S2",
}
PARTS = "dynamics_parts"
#: A stored epoch part: one row per analysed layer, the checkpoint digest it was computed from.
PART_SCHEMA = Schema("dynamics part", columns={"epoch": "int", "seed": "int", "layer": "str", "layer_index": "int",
                                               "channels": "int", "ckpt_digest": "str", "hull_size_mean": "float",
                                               "hull_saturated_frac": "float"},
                     finite=("hull_size_mean", "hull_saturated_frac"), layer="layer")
TARGET_MODES = ("epoch", "final")


@dataclass
class RunPlan:
    """One run to process: its seed, directory and ``{epoch: checkpoint}`` (``None``: no file,
    only a stored part can serve that epoch)."""

    seed: int
    run_dir: Path
    epochs: dict[int, Path | None]
    #: epochs of the run's span (0 to its last checkpoint) with neither a checkpoint nor a stored part: the
    #: curves skip them, and the log, the summary and the report name them (never "complete" with a gap)
    missing: tuple[int, ...] = ()


# ---- Knobs and plan --------------------------------------------------------------------------


def _skip_reason(block: DynamicsAnalysis, run_dir: Path) -> str | None:
    """Why dynamics is skipped on this run (``required=false`` and no per-epoch checkpoints), else None."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if block.required or epoch_checkpoints(ckpt_dir):
        return None
    return f"no per-epoch checkpoints in {ckpt_dir} (train with checkpoint.every_epoch=true)"


def _train_overrides() -> str:
    """The user's command-line overrides that matter to train.py, or a placeholder."""
    try:
        from hydra.core.hydra_config import HydraConfig

        task = list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 - composed outside a Hydra app (tests, notebooks)
        return "<same overrides>"
    drop = ("analysis", "capture.", "metrics.", "graphs.", "gradients.", "device", "plots", "ckpt")
    keep = [o for o in task if not o.lstrip("+~").startswith(drop)]
    return " ".join(keep) if keep else "<same overrides>"


def _no_checkpoints_error(ckpt_dir: Path) -> UserError:
    ov = _train_overrides()
    other = " ".join(o for o in ov.split() if not o.lstrip("+~").startswith("experiment=")) if "<" not in ov else ov
    return UserError(
        f"dynamics needs per-epoch checkpoints (epoch_000.ckpt = initial weights, then one per epoch) "
        f"but {ckpt_dir} has none; train a run with them: `python train.py {ov} "
        f"checkpoint.every_epoch=true` (a new run directory: a finished one is not retrained, so also "
        f"change name=) or `python train.py {other} experiment=dynamics`, then analyze that run")


def _layers(model, block: DynamicsAnalysis) -> list[str]:
    """The dynamics' layers (``analysis.dynamics.layers``, else ``k`` depth-spaced ones): the definitions'
    too (METHODS §6)."""
    units = conv_norm_pairs(model)
    if block.layers is not None:
        layers = [block.layers] if isinstance(block.layers, str) else list(block.layers)
        unknown = [n for n in layers if n not in units]
        if unknown:
            raise UserError(f"dynamics.layers: unknown layer {unknown[0]!r}; available: {', '.join(units)}")
        return layers
    return depth_spaced_layers(model, block.k, include_shortcuts=block.include_shortcuts)


def _select_epochs(grid: list[int], want) -> list[int]:
    """``want``: None (all), an int N (every N-th epoch of the grid, the last always), or a list."""
    if want is None:
        return list(grid)
    if isinstance(want, (int, np.integer)) and not isinstance(want, bool):
        if want < 1:
            raise UserError(f"dynamics.epochs: a stride must be >= 1, got {want}")
        picked = grid[::int(want)]
        return picked + ([grid[-1]] if grid[-1] not in picked else [])
    try:
        want = sorted({int(e) for e in want})
    except (TypeError, ValueError):
        raise UserError(f"dynamics.epochs must be null, a stride N or a list of epochs, got {want!r}") from None
    missing = [e for e in want if e not in grid]
    if missing:
        raise UserError(f"dynamics.epochs: no checkpoint for epoch {missing[0]}; this run has epochs "
                        f"{grid[0]}..{grid[-1]} ({len(grid)} checkpoints)")
    return want


def plan_dynamics(block: DynamicsAnalysis, run: RunLayout, main_run: Path) -> list[RunPlan]:
    """Which runs and epochs to process: ``main_run`` (the analysed run's folder) and the same experiment's
    runs of ``dynamics.seeds``; every mistake a :class:`UserError` before any work."""
    main_seed = run.id.seed
    ckpt_dir = Path(main_run) / "checkpoints"
    found = epoch_checkpoints(ckpt_dir)
    if not found:
        raise _no_checkpoints_error(ckpt_dir)
    if 0 not in found:
        log.warning("dynamics: %s has no epoch_000.ckpt (random init); curves start at epoch %d", ckpt_dir, min(found))
    epochs = _select_epochs(list(found), block.epochs)
    plans = [RunPlan(int(main_seed), Path(main_run), {e: found[e] for e in epochs}, missing_epochs(found))]
    seeds = block.seeds
    if seeds is None:
        return plans
    seeds = [seeds] if isinstance(seeds, (int, str)) else list(seeds)
    try:
        seeds = list(dict.fromkeys(int(s) for s in seeds))
    except (TypeError, ValueError):
        raise UserError(f"dynamics.seeds must be null or a list of integer seeds, got {seeds!r}") from None
    for seed in seeds:
        if seed == int(main_seed):
            continue
        cands = run.with_seed(seed).candidates()
        run = (next((c for c in cands if epoch_checkpoints(c / "checkpoints")), None)
               or next((c for c in cands if (c / "analyze" / PARTS).is_dir()), None))
        if run is None:
            raise UserError(f"dynamics.seeds: no run with per-epoch checkpoints for seed={seed} at {cands[0]}; "
                            f"train it with `python train.py {_train_overrides()} seed={seed} checkpoint.every_epoch=true`")
        have = epoch_checkpoints(run / "checkpoints")
        lacking = [e for e in epochs if e not in have and not (run / "analyze" / PARTS / _part_name(e)).is_file()]
        if lacking:
            raise UserError(f"dynamics.seeds: the seed={seed} run {run} has no checkpoint for epoch {lacking[0]}; "
                            f"train it with the same trainer.max_epochs and checkpoint.every_epoch=true, "
                            f"or choose dynamics.epochs present in every seed")
        gaps = tuple(e for e in missing_epochs(have) if not (run / "analyze" / PARTS / _part_name(e)).is_file())
        plans.append(RunPlan(seed, run, {e: have.get(e) for e in epochs}, gaps))
    return plans


def missing_epochs(found: dict[int, Path]) -> tuple[int, ...]:
    """The epochs from 0 (the random init) to the last per-epoch checkpoint of ``found`` that have no checkpoint:
    a deleted ``epoch_001.ckpt`` is a gap in the curves, to be named, not skipped without a word."""
    return tuple(e for e in range(0, max(found) + 1) if e not in found) if found else ()


def missing_note(plans: list[RunPlan]) -> str | None:
    """One line naming the epochs without a checkpoint, per seed; None when every run is complete."""
    gaps = [f"seed {p.seed}: epoch{'s' if len(p.missing) > 1 else ''} {', '.join(map(str, p.missing))}"
            for p in plans if p.missing]
    if not gaps:
        return None
    return (f"no checkpoint for {'; '.join(gaps)} (the curves skip them; retrain with checkpoint.every_epoch=true "
            f"for every epoch)")


def check_dynamics_analysis(ctx, block: DynamicsAnalysis) -> None:
    """Per-epoch checkpoints, layers, epochs and seeds, before anything runs."""
    if block.target not in TARGET_MODES:
        raise unknown_name("analysis.dynamics.target", block.target, TARGET_MODES)
    _layers(ctx.trained.model, block)
    if not _skip_reason(block, ctx.trained.run_dir):
        plan_dynamics(block, ctx.inputs.run, ctx.trained.run_dir)


# ---- One run, epoch by epoch -----------------------------------------------------------------


def dynamics_knobs(knobs: AxesKnobs, block: DynamicsAnalysis) -> AxesKnobs:
    """The axes knobs of the dynamics (and the definitions): METHODS §6 reads only the modularity gap, so
    the shuffled nulls (most of the graph time) are off unless ``dynamics.null_shuffles`` asks for them."""
    return replace(knobs, graphs=replace(knobs.graphs, null_shuffles=block.null_shuffles))


def dynamics_settings(knobs: AxesKnobs, block: DynamicsAnalysis, layers: list[str]) -> dict:
    """Everything a stored epoch part depends on besides its checkpoint file (``knobs``: :func:`dynamics_knobs`)."""
    return {**axes_identity(knobs, layers), "dynamics_target": block.target}


@torch.no_grad()
def final_target(model: torch.nn.Module, ckpt: Path, loader, kind: str, device, expect) -> torch.Tensor:
    """T of the final network (``ckpt``) per calibration image, in the loader's order: the target
    every epoch is measured against with ``dynamics.target=final``."""
    load_into(model, ckpt, expect)
    model.eval().to(device)
    out = [target_from_logits(model(x.to(device)), y.to(device), kind).cpu() for x, y in loader]
    model.cpu()
    return torch.cat(out)


def _part_name(epoch: int) -> str:
    return f"epoch_{epoch:03d}.csv"


def _digest(ckpt: Path | None) -> str:
    """The content digest of an epoch's checkpoint (a retrained run rewrites it: new digest)."""
    return file_digest(ckpt) if ckpt is not None and Path(ckpt).exists() else ""


def _valid_part(path: Path, ckpt: Path | None, layers: list[str]) -> pd.DataFrame | None:
    """A stored epoch part computed from this very checkpoint and sound; else None (recompute).
    With no checkpoint file left (``ckpt`` None) the part is the only record and is kept."""
    if not path.is_file():
        return None
    try:
        part = read_table(path, PART_SCHEMA, rebuild="python analyze.py analysis=dynamics",
                          rows_per_layer=dict.fromkeys(layers, 1))
    except DamagedTable as err:
        log.warning("dynamics: %s; recomputing that epoch", str(err).split("; rebuild")[0])
        return None
    if ckpt is not None and mismatch(str(part["ckpt_digest"].iloc[0]), _digest(ckpt)) is not None:
        return None     # the checkpoint was rewritten (retrained) since this part was computed
    return part


def dynamics_of_run(knobs: AxesKnobs, block: DynamicsAnalysis, data_id: dict, plan: RunPlan, model: torch.nn.Module,
                    datamodule, layers: list[str], device: torch.device, expect: dict | None = None,
                    progress: bool = True) -> tuple[pd.DataFrame, int]:
    """``(frame, computed)``: rows (epoch, layer) of one run, streaming its checkpoints through ``model`` (overwritten
    with each epoch's weights); ``computed`` counts the epochs computed now, the rest are read from dynamics_parts.
    ``knobs``: :func:`dynamics_knobs`."""
    parts = plan.run_dir / "analyze" / PARTS
    stamp = Stamp(parts / "settings.json", run_fingerprint(data_id, None, **dynamics_settings(knobs, block, layers)))
    # no settings recorded yet: the stored parts (if any) stay, each checked against its checkpoint below
    why = stamp.why_not() if stamp.path.exists() else None
    if why is not None:
        lacking = [e for e, ckpt in plan.epochs.items() if ckpt is None]
        if lacking:   # the stored parts are the only record of these epochs: never discard them
            raise UserError(f"dynamics: {parts} was made with {why} and {plan.run_dir} has no checkpoint for "
                            f"epoch {lacking[0]}; use the settings in {stamp.path} or retrain that run")
    if why is not None or not stamp.path.exists():
        with stamp.writing():
            stale = sorted(parts.glob("epoch_*.csv")) if why is not None else []
            if stale:
                log.info("dynamics: %s was made with %s; recomputing %d stored epochs", parts, why, len(stale))
            for p in stale:
                p.unlink()
    all_units = conv_norm_pairs(model)
    units = {n: all_units[n] for n in layers}
    index = {n: i for i, n in enumerate(all_units)}
    dtype, graphs, metrics, c = metric_dtype(knobs.metrics), graph_knobs(knobs.graphs), metric_knobs(knobs.metrics), knobs.capture
    loader, frames, computed, fixed_t = None, [], 0, None
    for epoch, ckpt in units_progress(list(plan.epochs.items()), f"dynamics seed{plan.seed}", enabled=progress,
                                      label=lambda e: f"epoch {e[0]}"):
        path = parts / _part_name(epoch)
        part = _valid_part(path, ckpt, layers)
        if part is not None:
            frames.append(part)
            continue
        if ckpt is None:
            raise UserError(f"dynamics: no checkpoint for epoch {epoch} of {plan.run_dir} and no stored result")
        if loader is None:
            loader = calibration_loader(c, datamodule)
        if block.target == "final" and fixed_t is None:
            last = epoch_checkpoints(plan.run_dir / "checkpoints")
            fixed_t = final_target(model, last[max(last)], loader, c.target, device, expect)
        load_into(model, ckpt, expect)
        model.eval()
        # the lean capture: the streamed (T, Y) moments only, never the epoch's samples
        capture = capture_activations(model, units, loader, point=c.point, spatial=c.spatial,
                                      samples_per_image=int(c.samples_per_image), target=c.target,
                                      seed=int(c.seed), patch_moments=False, device=device, progress=False,
                                      keep_samples=False, target_values=fixed_t)
        model.cpu()
        part = pd.DataFrame([layer_analysis(name, index[name], capture.cov(name), units[name], knobs=metrics, dtype=dtype,
                                            device=device, graphs=graphs, seed=int(c.seed),
                                            n_samples=capture.n_samples(name)).summary for name in layers])
        part.insert(0, "epoch", epoch)
        part.insert(1, "seed", plan.seed)
        part["calibration_accuracy"] = capture.accuracy
        part["ckpt_digest"] = _digest(ckpt)
        write_csv(path, part)
        frames.append(part)
        computed += 1
        del capture
    frame = pd.concat(frames, ignore_index=True).sort_values(["epoch", "layer_index"], ignore_index=True)
    write_csv(plan.run_dir / "analyze" / "dynamics.csv", frame.drop(columns=["ckpt_digest"], errors="ignore"))
    return frame, computed


def record_other_seed(folder: Path, axes_fp: dict) -> None:
    """The chain record of the ``dynamics.csv`` just written into another seed's ``folder`` (``dynamics.seeds``):
    the dynamics depend on the axes knobs, not on a table, so it is recorded against that seed's own ``axes.csv``
    when that was measured with the same knobs (the fingerprints differ only in the checkpoint); otherwise no
    record is written and the report leaves that seed's table out (docs/reliability.md)."""
    try:
        theirs = read_json(folder / AXES_FINGERPRINT)
    except (OSError, ValueError):
        return
    if not isinstance(theirs, dict):
        return
    same = {k: v for k, v in theirs.items() if k != "ckpt_digest"} == {k: v for k, v in plain(axes_fp).items()
                                                                        if k != "ckpt_digest"}
    if same:
        write_record(folder / analysis_record("dynamics"), {"analysis": "dynamics", "tables": ["dynamics.csv"]},
                     analysis_inputs(theirs))


# ---- Curves, plot, headline ------------------------------------------------------------------


def dynamics_curves(frame: pd.DataFrame) -> pd.DataFrame:
    """Per epoch: ``<q>_mean``, ``<q>_sd`` over seeds of each seed's mean over layers, ``n_seeds``."""
    cols = [q for q in QUANTITIES if q in frame]
    per_seed = frame.groupby(["seed", "epoch"])[cols].mean().reset_index()
    rows = []
    for epoch, d in per_seed.groupby("epoch"):
        row = {"epoch": int(epoch), "n_seeds": int(d["seed"].nunique())}
        for q in cols:
            row[f"{q}_mean"], row[f"{q}_sd"], _ = mean_sd(d[q].to_numpy(float))
        rows.append(row)
    return pd.DataFrame(rows)


def plot_dynamics(frame: pd.DataFrame, curves: pd.DataFrame, path: Path) -> Path:
    """One panel per quantity: each layer (thin, by depth), the mean over layers (± SD over seeds),
    and the paper's init / trained values where METHODS §11 has them."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [q for q in QUANTITIES if q in frame] + ["calibration_accuracy"]
    fig, axs = plt.subplots(2, 3, figsize=(13, 6.6), squeeze=False)
    layers = list(dict.fromkeys(frame.sort_values("layer_index")["layer"]))
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(1, len(layers))))
    per_layer = frame.groupby(["layer", "epoch"]).mean(numeric_only=True).reset_index()
    n_seeds = int(frame["seed"].nunique())
    first, last = int(curves["epoch"].min()), int(curves["epoch"].max())
    for ax, q in zip(axs.flat, panels):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if q in QUANTITIES:
            for color, layer in zip(colors, layers):
                d = per_layer[per_layer.layer == layer]
                ax.plot(d["epoch"], d[q], color=color, lw=0.8, alpha=0.7, label=layer)
            x, m, s = curves["epoch"], curves[f"{q}_mean"], curves[f"{q}_sd"]
            ax.plot(x, m, color="k", lw=2, label="mean over layers" + (f" (±SD, {n_seeds} seeds)" if n_seeds > 1 else ""))
            if n_seeds > 1:
                ax.fill_between(x, m - s.fillna(0), m + s.fillna(0), color="k", alpha=0.15)
            if ref := PAPER_REFERENCE.get(q):
                ax.errorbar([first, last], [ref["init"][0], ref["trained"][0]],
                            yerr=[ref["init"][1], ref["trained"][1]], fmt="s", color="tab:red", ms=5,
                            capsize=4, label="paper (CIFAR-100): init, trained")
            if q.startswith("align") or q == "modularity_gap":
                ax.axhline(0, color="gray", lw=0.5)
            ax.set_title(QUANTITIES[q], fontsize=9)
        else:   # the same for every layer of a seed
            for seed, d in frame.groupby("seed"):
                d = d.groupby("epoch")[q].first()
                ax.plot(d.index, d.to_numpy(), marker="o", ms=3, lw=1, label=f"seed {seed}")
            ax.set_title("calibration accuracy", fontsize=9)
        ax.set_xlabel("epoch (0 = random init)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axs.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axs[0, 2].get_legend_handles_labels()   # hull size: layers, mean and the paper
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return plots.save_figure(fig, path)


def _headline(curves: pd.DataFrame, seeds: list[int], layers: list[str]) -> dict:
    init, last = curves.iloc[0], curves.iloc[-1]
    out = {"seeds": seeds, "layers": layers, "epochs": int(len(curves)),
           "first_epoch": int(init["epoch"]), "last_epoch": int(last["epoch"])}
    for q in (q for q in QUANTITIES if f"{q}_mean" in curves):
        for tag, row in (("init", init), ("last", last)):
            v = row[f"{q}_mean"]
            out[f"{q}_{tag}"] = float(v) if np.isfinite(v) else None
            if len(seeds) > 1:
                sd = row[f"{q}_sd"]
                out[f"{q}_{tag}_sd"] = float(sd) if np.isfinite(sd) else None
    return out


@analysis("dynamics", check=check_dynamics_analysis)
def run_dynamics_analysis(ctx, block: DynamicsAnalysis) -> dict:
    """Process every planned run epoch by epoch (resumable); write tables, curves and logs."""
    trained = ctx.trained
    skip = _skip_reason(block, trained.run_dir)
    if skip:   # analysis=all on a run trained without per-epoch checkpoints: the other analyses still run
        log.warning("dynamics: skipped: %s", skip)
        print(f"dynamics: skipped: {skip}")
        return {"skipped": skip}
    plans = plan_dynamics(block, ctx.inputs.run, trained.run_dir)
    dm = trained.datamodule
    model = architecture(ctx.inputs.model, dm.num_classes)   # its own instance: the restored model stays as is
    layers = _layers(model, block)
    expect = expected_meta(ctx.inputs.run, dm.num_classes, dm.image_size)
    knobs = dynamics_knobs(ctx.knobs, block)
    runs = [dynamics_of_run(knobs, block, trained.data_id, plan, model, dm, layers, ctx.device, expect) for plan in plans]
    for plan in plans[1:]:
        record_other_seed(plan.run_dir / "analyze", ctx.axes_headline["fingerprint"])
    computed = sum(n for _, n in runs)
    del model
    allf = pd.concat([frame for frame, _ in runs], ignore_index=True).drop(columns=["ckpt_digest"], errors="ignore")
    curves = dynamics_curves(allf)
    if len(plans) > 1:
        write_csv(ctx.out / "dynamics_seeds.csv", allf)
    write_csv(ctx.out / "dynamics_curves.csv", curves)
    if ctx.knobs.plots:
        ctx.tracker.image("analyze/dynamics", plot_dynamics(allf, curves, ctx.out / "plots" / "dynamics.png"))
    ctx.tracker.table("analyze/dynamics", allf)
    ctx.tracker.table("analyze/dynamics_curves", curves)
    seeds = [p.seed for p in plans]
    head = {**_headline(curves, seeds, layers), "epochs_computed": computed,
            "missing_epochs": {str(p.seed): list(p.missing) for p in plans if p.missing}}
    if gap := missing_note(plans):
        log.warning("dynamics: %s", gap)
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    q = "align_input_capture_task_info"
    print(f"analyze: dynamics over {head['epochs']} epochs × {len(layers)} layers × {len(seeds)} seed(s) "
          f"({computed} epoch(s) computed now); ρ(I_X, I_T) {fmt(head.get(q + '_init'))} at epoch "
          f"{head['first_epoch']} -> {fmt(head.get(q + '_last'))} at epoch {head['last_epoch']}"
          + (f"; {gap}" if gap else ""))
    return head
