"""run_prune(cfg): the body of prune.py (METHODS §9).

Settings are validated first (:mod:`.settings`), then the unpruned network is restored, its coupled
groups and cost model built and the inputs of the scores checked (:mod:`.inputs`) before any point;
the sweep (:mod:`.sweep`) computes or reuses every point (:mod:`.points`); the curves and the summary
(:mod:`.summary`) are rebuilt every time from every sound point of the protocol (this run's and those
of scores swept earlier) and replaced together. Each protocol (:mod:`.protocol`) has a folder of its own,
``prune/<protocol>/``; the raw-score caches in ``prune/scores/`` are shared by every protocol.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from axes_pipeline.config import to_container
from axes_pipeline.console import progress
from axes_pipeline.devices import resolve_device
from axes_pipeline.layout import AXES_CSV, LAYER_ALLOCATION, LAYERS_CSV, PRUNE_CURVES, PRUNE_SUMMARY
from axes_pipeline.models import conv_layers, example_input
from axes_pipeline.pruning.export import model_spec
from axes_pipeline.pruning.flops import CostModel
from axes_pipeline.pruning.groups import build_groups
from axes_pipeline.pruning.inputs import axes_loader, calibration_batches
from axes_pipeline.pruning.points import ScoreCache, unpruned
from axes_pipeline.pruning.protocol import adopt_flat_layout, write_protocol
from axes_pipeline.pruning.resolved import PruneSettings
from axes_pipeline.pruning.schedule import axes_remeasurer
from axes_pipeline.pruning.scores import ScoreContext, resolve_score
from axes_pipeline.pruning.scratch import ScratchRecipe, train_scratch_points
from axes_pipeline.pruning.sensitivity import check_scan_data
from axes_pipeline.pruning.summary import (
    allocation_frame,
    curves_frame,
    flat_scalars,
    log_curves,
    print_summary,
    summarise,
    write_stage,
)
from axes_pipeline.pruning.sweep import Sweep, layer_widths, run_points, stored_records
from axes_pipeline.runs import file_digest, frame_digest, write_csv
from axes_pipeline.stage import stage_inputs
from axes_pipeline.tracking import StageTracker, artifact_name
from axes_pipeline.training.restore import restore_trained

log = logging.getLogger("axes_pipeline")

__all__ = ["PruneSettings", "run_prune"]


def run_prune(cfg: DictConfig) -> dict:
    """FLOPs-matched pruning of the trained run named by ``cfg``; returns the summary."""
    inputs = stage_inputs(cfg)
    run_id = inputs.id
    # validates the pruning block: a mistake is one line, before any work
    settings = PruneSettings(OmegaConf.to_object(cfg.pruning), run_id.model, run_id.seed, inputs.progress)
    device = resolve_device(inputs.knobs.device)
    trained = restore_trained(inputs)
    protocol = settings.protocol
    stage = trained.stage_dir("prune")   # prune@<stem>/ for another checkpoint than the run's default
    adopt_flat_layout(stage, run_id.model, protocol, trained.protocol_dir)
    out = trained.protocol_dir(protocol.name)
    dm = trained.datamodule
    check_scan_data(settings.needs_scan, dm.split_sizes().get("val", 0))   # before any network runs
    model = trained.model.to(device).eval()
    example = example_input({"image_size": dm.image_size, "in_channels": getattr(dm, "in_channels", 3)}, device=device)
    groups = build_groups(model, example)
    cost = CostModel.build(model, groups, example)
    layers = conv_layers(model)

    # the scores of this protocol's stored points that this run does not sweep join its curves (issue 31): an
    # axes score among them needs the axes table's digest to be checked, so it counts here as one of this run's
    stored = _stored_scores(out, settings)
    axes_scores = settings.needs("axes") + [s for s in stored if "axes" in s.needs]
    load_axes = axes_loader(inputs.knobs, run_id, trained, axes_scores, layers)
    ctx = ScoreContext(model, layers, axes_loader=load_axes, seed=run_id.seed,
                       calibration=calibration_batches(dm, settings), magnitude=settings.magnitude, device=device,
                       feature_maps=calibration_batches(dm, settings, "feature_maps"), example=example)
    # the analysis table's content is part of the axes scores' keys; fail (or compute) now, before any point
    digest = frame_digest(ctx.axes()) if axes_scores else None
    if len(settings.targets) < 2:
        print(f"prune: note: one target ({settings.targets[0]:g}): the points are written but a FLOPs-AUC "
              "needs at least two targets, so there is none")
    print(f"prune: {len(settings.scores)} scores, {len(settings.targets)} targets, {len(settings.points())} points, "
          f"protocol {protocol.name} ({protocol.label}), mode={settings.mode}, {len(groups)} groups -> {out}")
    out.mkdir(parents=True, exist_ok=True)
    write_protocol(out, protocol)

    if groups.refused:   # convs never pruned (grouped convs): the reason travels with the results
        write_csv(stage / "prune_refused.csv", pd.DataFrame(sorted(groups.refused.items()), columns=["layer", "reason"]))
    tracker = StageTracker(inputs.tracked, "prune", out)
    tracker.use_artifact("checkpoint", artifact_name("checkpoint", run_id), [trained.ckpt])
    if axes_scores:   # ctx.axes() above read analyze's axes.csv, or prune's own prune/axes/: that is the input
        analyzed = Path(load_axes.source.get("folder", trained.stage_dir("analyze")))
        tracker.use_artifact("axes", artifact_name("axes", run_id), [analyzed / AXES_CSV, analyzed / LAYERS_CSV])
    try:
        base = unpruned(model, dm, cost, example, settings, device, out, trained.ckpt, trained.data_id)
        # the raw scores depend on the checkpoint, not on the protocol: one cache per checkpoint (prune/scores/)
        cache = ScoreCache(ctx, stage, settings, Path(trained.ckpt), example.shape, digest, trained.data_id)
        sweep = Sweep(settings, model, groups, cost, example, dm, device, out, base, cache,
                      model_spec=model_spec(to_container(inputs.model), dm.num_classes), layers=tuple(layers),
                      # iterative: the axes re-measured on each pruned network with the run's capture knobs
                      remeasure_axes=(axes_remeasurer(inputs.knobs, dm, device)
                                      if settings.schedule == "iterative" and axes_scores else None))
        records, done = run_points(sweep, progress)
        earlier, left_out = stored_records(sweep, records, resolve_score)
        for note in left_out:
            print(f"prune: note: a stored point of {note}; left out of the curves (prune it again to include it)")
        records = records + earlier
        scores = list({s.name: s for s in settings.scores + [resolve_score(r["score"]) for r in earlier]}.values())
        # curves and summary are computed in full before either is written, then replaced together
        curves = curves_frame(records)
        summary = summarise(curves, base, settings, groups, cache.timing, inputs.config, scores=scores)
        if settings.scratch:   # the chosen points' architectures trained from scratch: acc_scratch (scratch.py)
            recipe = ScratchRecipe(
                optim=to_container(cfg.optim), epochs=int(settings.scratch_epochs or cfg.trainer.max_epochs),
                label_smoothing=float(cfg.train.label_smoothing), warmup_epochs=int(cfg.train.warmup_epochs),
                precision=str(cfg.trainer.precision), limit_train_batches=cfg.trainer.limit_train_batches,
                limit_val_batches=cfg.trainer.limit_val_batches)
            summary["scratch"] = train_scratch_points(sweep, records, summary, recipe)
            curves = curves_frame(records)
        summary["points_computed_this_run"] = done
        summary["protocol"] = protocol.record
        summary["scores_from_earlier_runs"] = sorted({r["score"] for r in earlier})
        # provenance: the report checks that the axes it shows beside these curves come from this checkpoint
        summary["checkpoint"], summary["checkpoint_digest"] = str(trained.ckpt), file_digest(trained.ckpt)
        if axes_scores:
            summary["axes_from"] = str(load_axes.source.get("folder"))
            summary["axes_fingerprint"] = load_axes.source.get("fingerprint")
        allocation = allocation_frame(records, groups, layer_widths(model, layers))
        plots = {}
        try:
            # deferred: matplotlib loads in seconds, and only a finished sweep is plotted
            from axes_pipeline.pruning.plots import plot_curves, plot_kept_fraction, plot_sweeps

            plots.update(plot_curves(curves, base, out))
            plots.update(plot_sweeps(summary, out))
            plots.update(plot_kept_fraction(allocation, summary, out))
        except Exception as err:  # noqa: BLE001 - a failed plot is a warning, never lost results
            log.warning("prune plots failed: %s", err)
        summary["plots"] = {k: str(v) for k, v in plots.items()}
        write_csv(out / LAYER_ALLOCATION, allocation)
        write_stage(out, curves, summary)
        tracker.scalars(flat_scalars(summary), prefix="prune/")
        tracker.table("prune/curves", curves)
        tracker.log_artifact("curves", artifact_name("curves", run_id), [out / PRUNE_CURVES, out / PRUNE_SUMMARY])
        log_curves(tracker, curves)
        for key, p in plots.items():
            tracker.image(f"prune/{key}", p)
        print_summary(summary, out)
        return summary
    finally:
        tracker.finish()


def _stored_scores(out: Path, settings: PruneSettings) -> list:
    """The scores of the points stored in this protocol's folder that this run does not sweep (known to the
    registry; an unknown one is named when the points are read)."""
    names = set()
    for path in (out / "points").glob("*.json") if (out / "points").is_dir() else []:
        try:
            names.add(json.loads(path.read_text())["score"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    mine, found = {s.name for s in settings.scores}, []
    for name in sorted(names - mine):
        try:
            found.append(resolve_score(name))
        except Exception:  # noqa: BLE001 - a plugin's score not registered now: stored_records names it
            continue
    return found
