"""run_prune(cfg): the body of prune.py (METHODS §9).

Settings are validated first (:mod:`.settings`), then the unpruned network is restored, its coupled
groups and cost model built and the inputs of the scores checked (:mod:`.inputs`) before any point;
the sweep (:mod:`.sweep`) computes or reuses every point (:mod:`.points`); the curves and the summary
(:mod:`.summary`) are rebuilt from the points in memory every time and replaced together.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from axes_pipeline.config import to_container
from axes_pipeline.console import progress
from axes_pipeline.devices import resolve_device
from axes_pipeline.layout import AXES_CSV, LAYERS_CSV, PRUNE_CURVES, PRUNE_SUMMARY
from axes_pipeline.models import conv_layers, example_input
from axes_pipeline.pruning.export import model_spec
from axes_pipeline.pruning.flops import CostModel
from axes_pipeline.pruning.groups import build_groups
from axes_pipeline.pruning.inputs import axes_loader, calibration_batches
from axes_pipeline.pruning.points import ScoreCache, unpruned
from axes_pipeline.pruning.resolved import PruneSettings
from axes_pipeline.pruning.schedule import axes_remeasurer
from axes_pipeline.pruning.scores import ScoreContext
from axes_pipeline.pruning.scratch import ScratchRecipe, train_scratch_points
from axes_pipeline.pruning.summary import curves_frame, flat_scalars, log_curves, print_summary, summarise, write_stage
from axes_pipeline.pruning.sweep import Sweep, run_points
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
    out = trained.stage_dir("prune")   # prune@<stem>/ for another checkpoint than the run's default
    dm = trained.datamodule
    model = trained.model.to(device).eval()
    example = example_input({"image_size": dm.image_size, "in_channels": getattr(dm, "in_channels", 3)}, device=device)
    groups = build_groups(model, example)
    cost = CostModel.build(model, groups, example)
    layers = conv_layers(model)

    axes_scores = settings.needs("axes")
    load_axes = axes_loader(inputs.knobs, run_id, trained, axes_scores, layers)
    ctx = ScoreContext(model, layers, axes_loader=load_axes, seed=run_id.seed,
                       calibration=calibration_batches(dm, settings), magnitude=settings.magnitude, device=device,
                       feature_maps=calibration_batches(dm, settings, "feature_maps"))
    # the analysis table's content is part of the axes scores' keys; fail (or compute) now, before any point
    digest = frame_digest(ctx.axes()) if axes_scores else None
    if len(settings.targets) < 2:
        print(f"prune: note: one target ({settings.targets[0]:g}): the points are written but a FLOPs-AUC "
              "needs at least two targets, so there is none")
    print(f"prune: {len(settings.scores)} scores, {len(settings.targets)} targets, {len(settings.points())} points, "
          f"allocation={settings.allocation}, mode={settings.mode}, {len(groups)} groups -> {out}")

    if groups.refused:   # convs never pruned (grouped convs): the reason travels with the results
        write_csv(out / "prune_refused.csv", pd.DataFrame(sorted(groups.refused.items()), columns=["layer", "reason"]))
    tracker = StageTracker(inputs.tracked, "prune", out)
    tracker.use_artifact("checkpoint", artifact_name("checkpoint", run_id), [trained.ckpt])
    if axes_scores:   # ctx.axes() above read analyze's axes.csv, or prune's own prune/axes/: that is the input
        analyzed = Path(load_axes.source.get("folder", trained.stage_dir("analyze")))
        tracker.use_artifact("axes", artifact_name("axes", run_id), [analyzed / AXES_CSV, analyzed / LAYERS_CSV])
    try:
        base = unpruned(model, dm, cost, example, settings, device, out, trained.ckpt, trained.data_id)
        cache = ScoreCache(ctx, out, settings, Path(trained.ckpt), example.shape, digest, trained.data_id)
        sweep = Sweep(settings, model, groups, cost, example, dm, device, out, base, cache,
                      model_spec=model_spec(to_container(inputs.model), dm.num_classes),
                      # iterative: the axes re-measured on each pruned network with the run's capture knobs
                      remeasure_axes=(axes_remeasurer(inputs.knobs, dm, device)
                                      if settings.schedule == "iterative" and axes_scores else None))
        records, done = run_points(sweep, progress)
        # curves and summary are computed in full before either is written, then replaced together
        curves = curves_frame(records)
        summary = summarise(curves, base, settings, groups, cache.timing, inputs.config)
        if settings.scratch:   # the chosen points' architectures trained from scratch: acc_scratch (scratch.py)
            recipe = ScratchRecipe(
                optim=to_container(cfg.optim), epochs=int(settings.scratch_epochs or cfg.trainer.max_epochs),
                label_smoothing=float(cfg.train.label_smoothing), warmup_epochs=int(cfg.train.warmup_epochs),
                precision=str(cfg.trainer.precision), limit_train_batches=cfg.trainer.limit_train_batches,
                limit_val_batches=cfg.trainer.limit_val_batches)
            summary["scratch"] = train_scratch_points(sweep, records, summary, recipe)
            curves = curves_frame(records)
        summary["points_computed_this_run"] = done
        # provenance: the report checks that the axes it shows beside these curves come from this checkpoint
        summary["checkpoint"], summary["checkpoint_digest"] = str(trained.ckpt), file_digest(trained.ckpt)
        if axes_scores:
            summary["axes_from"] = str(load_axes.source.get("folder"))
            summary["axes_fingerprint"] = load_axes.source.get("fingerprint")
        plots = {}
        try:
            # deferred: matplotlib loads in seconds, and only a finished sweep is plotted
            from axes_pipeline.pruning.plots import plot_curves, plot_sweeps

            plots.update(plot_curves(curves, base, out))
            plots.update(plot_sweeps(summary, out))
        except Exception as err:  # noqa: BLE001 - a failed plot is a warning, never lost results
            log.warning("prune plots failed: %s", err)
        summary["plots"] = {k: str(v) for k, v in plots.items()}
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
