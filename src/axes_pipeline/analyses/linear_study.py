"""The synthetic Gaussian linear study (METHODS §5) as a selectable analysis."""

from __future__ import annotations

from dataclasses import asdict

import pandas as pd

from axes_pipeline.analyses import plots
from axes_pipeline.analyses.registry import analysis
from axes_pipeline.analyses.settings import LinearGaussianAnalysis
from axes_pipeline.metrics import linear_gaussian_study
from axes_pipeline.runs import write_csv


@analysis("linear_gaussian", needs_run=False)
def run_linear_gaussian(ctx, block: LinearGaussianAnalysis) -> dict:
    knobs = asdict(block)
    if knobs["seed"] is None:      # the run's seed: each seed of a sweep draws its own synthetic layer
        knobs["seed"] = int(ctx.inputs.id.seed)
    study = pd.DataFrame(linear_gaussian_study(**knobs))
    write_csv(ctx.out / "linear_gaussian.csv", study)
    if ctx.knobs.plots:
        ctx.tracker.image("analyze/linear_gaussian", plots.linear_gaussian(study, ctx.out / "plots" / "linear_gaussian.png"))
    ctx.tracker.table("analyze/linear_gaussian", study)
    first, last = study.iloc[0], study.iloc[-1]
    print(f"analyze: linear-Gaussian study ρ(I_X, I_T) {first.rho_axes:.3f} at init -> {last.rho_axes:.3f} "
          f"after {int(last.step)} steps; max |whitened cos| {study.cos_whitened_max.max():.1e}")
    return {"seed": knobs["seed"], "rho_init": float(first.rho_axes), "rho_trained": float(last.rho_axes),
            "cos_euclid_trained": float(last.cos_euclid), "cos_whitened_max": float(study.cos_whitened_max.max())}
