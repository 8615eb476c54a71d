"""A three-seed digits sweep through every stage, as a user types it (small settings).

train.py -m (joblib launcher, two jobs at once) → analyze.py -m → prune.py -m → report.py; then the
same train sweep again must skip every finished job, and a failing job must not lose the others.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from .helpers import run_entry

SEEDS = "seed=1,2,3"
SMALL = ["name=sweep", "logger=none", "data.batch_size=64", "model.width=0.125", "trainer.max_epochs=2",
         "callbacks.progress_bar=false"]
ANALYZE = ["capture.n_cal=300", "capture.samples_per_image=4", "graphs.null_shuffles=1"]
PRUNE = ["pruning.scores=[input_capture,hull_score,task_info,l1,random]", "pruning.targets=[0.7,0.4]",
         "pruning.random_draws=2", "pruning.fvcore_check=false", "pruning.latency=false",
         "pruning.eval_samples=200", "pruning.calibration.n=128"]


def _ok(res):
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.mark.slow   # four entry points × three seeds
def test_three_seed_sweep_end_to_end(tmp_path):
    _ok(run_entry("train.py", "-m", SEEDS, *SMALL, "hydra/launcher=parallel", cwd=tmp_path))
    sweep = tmp_path / "multirun" / "sweep"
    runs = sorted(p.parent for p in sweep.rglob("train_summary.json"))
    assert [r.name for r in runs] == ["seed1", "seed2", "seed3"]

    # analyze and prune find the runs from the same overrides, no paths typed
    _ok(run_entry("analyze.py", "-m", SEEDS, *SMALL, *ANALYZE, cwd=tmp_path))
    _ok(run_entry("prune.py", "-m", SEEDS, *SMALL, *ANALYZE, *PRUNE, cwd=tmp_path))
    for r in runs:
        assert (r / "analyze" / "axes.csv").is_file() and (r / "analyze" / "layers.csv").is_file()
        (protocol,) = [p.parent for p in (r / "prune").glob("*/protocol.json")]   # the one protocol pruned
        curves = pd.read_csv(protocol / "prune_curves.csv")
        assert set(curves.score) == {"input_capture", "hull_score", "task_info", "l1", "random"}
        assert set(curves.axis) == {"local", "target", "baseline"}
        assert (curves.achieved_flops - curves.target_flops).abs().max() <= 0.005 + 1e-9

    res = _ok(run_entry("report.py", *SMALL, cwd=tmp_path))
    out = sweep / "report"
    for f in ("report.md", "report.html", "headline.csv", "flops_auc.csv", "layers.csv"):
        assert (out / f).is_file(), f
    head = pd.read_csv(out / "headline.csv")
    assert head.p_value.notna().all() and (head.n == 3).all()
    assert str(out) in res.stdout
    # the report's FLOPs-AUC is each run's own (random: per draw, then the mean over draws)
    per_seed = pd.read_csv(out / "flops_auc_per_seed.csv")
    for r in runs:
        (own,) = [json.loads(p.read_text())["scores"] for p in (r / "prune").glob("*/prune_summary.json")]
        mine = per_seed[per_seed.seed == int(r.name[4:])].set_index("score")["flops_auc"]
        for score, v in own.items():
            assert mine[score] == pytest.approx(v["flops_auc"], abs=1e-12), score

    # the same sweep again: every job is complete and skipped, nothing retrained
    stamps = {r: (r / "train_summary.json").stat().st_mtime_ns for r in runs}
    res = _ok(run_entry("train.py", "-m", SEEDS, *SMALL, cwd=tmp_path))
    assert res.stdout.count("train: already complete") == 3
    assert all((r / "train_summary.json").stat().st_mtime_ns == t for r, t in stamps.items())


@pytest.mark.slow
def test_failed_job_is_named_and_others_kept(tmp_path):
    # seed 2 was never trained: its analyze job fails, seeds 1 and 3 still finish
    _ok(run_entry("train.py", "-m", "seed=1,3", *SMALL, "trainer.max_epochs=1", cwd=tmp_path))
    res = run_entry("analyze.py", "-m", "seed=1,2,3", *SMALL, "trainer.max_epochs=1", *ANALYZE, cwd=tmp_path)
    assert res.returncode != 0
    assert "1 analyze job(s) failed" in res.stderr and "seed2" in res.stderr
    done = sorted(p.parent.parent.name for p in (tmp_path / "multirun" / "sweep").rglob("analyze_summary.json"))
    assert done == ["seed1", "seed3"]
    summary = json.loads(next((tmp_path / "multirun" / "sweep").rglob("analyze_summary.json")).read_text())
    assert summary["axes"]["channels"] > 0
