"""Reproduce the paper (README "Reproduce the paper", issue 22): the headline experiments × seeds through
every stage (train, analysis=all, prune) and one report with the backbones side by side, on fake
CIFAR-100 in the real on-disk format at tiny size: 2 backbones × 2 seeds, 1 epoch, a few images.

The stages run in process, composed from the same overrides as the README's commands (plus the
shrinking ones below); the paper's setup comes from the experiment overlays themselves."""

from __future__ import annotations

import pandas as pd
import pytest

from axes_pipeline.analyses.analyze import run_analysis
from axes_pipeline.pruning.run import run_prune
from axes_pipeline.report.build import run_report
from axes_pipeline.tasks import run_task
from axes_pipeline.training.train import run_training

from .helpers import make_cfg, write_cifar100

SEEDS = (42, 123)            # METHODS §10 has five: 42, 123, 456, 789, 1011
# one lesioned layer per backbone (the axes table covers every layer: pruning needs them all)
EXPERIMENTS = {"cifar100_resnet18": "layer1.0.conv1", "cifar100_mobilenetv2": "features.1.conv.1"}
# the paper's setup at tiny size: no ImageNet weights (no network in tests; they fit width 1 only)
TINY = ["model.width=0.125", "model.pretrained=false", "trainer.max_epochs=1", "data.batch_size=50",
        "data.num_workers=0", "data.download=false", "data.verify=false", "logger=none", "callbacks.progress_bar=false"]
AXES = ["capture.n_cal=60", "capture.samples_per_image=2", "graphs.null_shuffles=1", "gradients.enabled=false"]
ANALYZE = ["analysis=all", *AXES,
           "analysis.lesion.channels=2", "analysis.lesion.eval_samples=40", "analysis.lesion.n_boot=50",
           "analysis.lesion.taylor_images=32", "analysis.propagation.null_draws=2", "analysis.linear_gaussian.steps=5"]
PRUNE = [*AXES, "pruning.scores=[l1,input_capture,task_info]", "pruning.targets=[0.7,0.4]", "pruning.latency=false",
         "pruning.fvcore_check=false", "pruning.calibration.n=32", "pruning.eval_samples=40"]


@pytest.mark.slow
def test_paper_sequence_reports_each_backbone(tmp_path):
    write_cifar100(tmp_path / "data", n_train=200, n_test=60)
    common = [f"data.data_dir={tmp_path / 'data'}", *TINY]
    for exp, layer in EXPERIMENTS.items():
        for seed in SEEDS:
            over = [f"experiment={exp}", f"seed={seed}", *common]
            run_task(run_training, make_cfg("train", over, tmp_path))
            run_task(run_analysis, make_cfg("analyze", [*over, *ANALYZE, f"analysis.lesion.layers={layer}"], tmp_path))
            run_task(run_prune, make_cfg("prune", [*over, *PRUNE], tmp_path))
    roots = ",".join(str(tmp_path / "runs" / e) for e in EXPERIMENTS)
    out = tmp_path / "reports" / "paper"
    summary = run_report(make_cfg("report", ["name=paper", f"report.runs=[{roots}]", f"report.out={out}", "logger=none"],
                                  tmp_path))
    groups = {f"cifar100-{e.split('_')[1]}-w0.125" for e in EXPERIMENTS}
    assert {g: sorted(s) for g, s in summary["groups"].items()} == {g: sorted(SEEDS) for g in groups}
    head = pd.read_csv(out / "headline.csv")
    assert set(head.group) == groups and (head.n == len(SEEDS)).all()
    side = pd.read_csv(out / "backbones.csv")          # the paper's table: one headline row per backbone
    assert sorted(side.group) == sorted(groups) and side.group.is_unique
    md = (out / "report.md").read_text()
    assert all(g in md for g in groups) and "Backbones side by side" in md
