"""wandb, offline by default: every stage writes its own run beside its outputs, grouped by experiment,
with no account, no network and no prompt; a report logs its tables."""

from __future__ import annotations

import pytest

from .conftest import TINY, make_cfg


def _offline_runs(where):
    return sorted(p for p in where.glob("wandb/offline-run-*") if any(p.glob("*.wandb")))


@pytest.fixture(scope="module")
def wandb_root(tmp_path_factory):
    from axes_pipeline.tasks import run_task
    from axes_pipeline.training.train import run_training

    root = tmp_path_factory.mktemp("wb")
    overrides = [o for o in TINY if not o.startswith("logger=")] + ["logger=wandb", "trainer.max_epochs=1",
                                                                    "name=tracked"]
    run_task(run_training, make_cfg("train", overrides, root))
    return root, overrides


def test_train_and_analyze_write_offline_runs(wandb_root):
    from axes_pipeline.analyses.analyze import run_analysis
    from axes_pipeline.config import run_dir

    root, overrides = wandb_root
    cfg = make_cfg("analyze", [*overrides, "capture.n_cal=200", "capture.samples_per_image=4",
                               "graphs.null_shuffles=1", "gradients.enabled=false", "plots=false"], root)
    assert cfg.logger.mode == "offline" and cfg.logger.group == "tracked"
    run_analysis(cfg)
    run = run_dir(cfg)
    assert len(_offline_runs(run)) == 1                 # training's run
    assert len(_offline_runs(run / "analyze")) == 1     # the analysis' run, beside its tables


def test_tracker_names_and_groups(wandb_root):
    from axes_pipeline.tracking import _init_kwargs

    root, overrides = wandb_root
    cfg = make_cfg("analyze", overrides, root)
    kw = _init_kwargs(cfg, "analyze", root)
    assert kw["group"] == "tracked" and kw["job_type"] == "analyze" and kw["mode"] == "offline"
    assert kw["name"] == "digits-resnet18-seed42-analyze"
    assert _init_kwargs(make_cfg("report", overrides, root), "report", root)["name"] == "tracked-report"


def test_online_without_credentials_is_one_line(tmp_path, monkeypatch):
    from axes_pipeline.errors import UserError
    from axes_pipeline.tracking import check_logger

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    cfg = make_cfg("train", ["logger=wandb", "logger.mode=online"], tmp_path)
    with pytest.raises(UserError, match="WANDB_API_KEY"):
        check_logger(cfg)
