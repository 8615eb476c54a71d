"""trainer=ddp on CPU (gloo, 2 processes): one set of checkpoints by rank 0, synced validation,
resume; capture, analysis and pruning refuse to run as one of several processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from axes_pipeline.errors import UserError
from axes_pipeline.runs import read_json

from .helpers import make_cfg, run_entry

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=64", "model.width=0.125",
       "checkpoint.every_epoch=true", "callbacks.progress_bar=false", "logger=none", "seed=5",
       "+trainer.limit_train_batches=4"]


def _val_accuracy(ckpt: Path, root: Path) -> tuple[float, int]:
    """Single-process top-1 of ``ckpt`` on the whole validation split: what a synced DDP value is."""
    from axes_pipeline.data import build_datamodule
    from axes_pipeline.models import build_model
    from axes_pipeline.training.checkpoints import load_into

    from .helpers import make_cfg

    cfg = make_cfg("train", DDP[3:], root)
    dm = build_datamodule(cfg.data)
    dm.setup("fit")
    model = build_model("resnet18", dm.num_classes, width=0.125)
    load_into(model, ckpt)
    model.eval()
    right = total = 0
    with torch.no_grad():
        for x, y in dm.val_dataloader():
            right += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return right / total, total


@pytest.mark.slow   # two 2-process training runs: 30–100 s on 2 shared cores
def test_ddp_on_cpu_trains_once_and_resumes(tmp_path):
    import shutil

    res = run_entry("train.py", *DDP, "trainer.max_epochs=3", cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (res.stdout + res.stderr).count("train: val_acc=") == 1     # rank 0 writes and reports once
    run = next((tmp_path / "runs").rglob("checkpoints")).parent
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    # one set, epoch 0 (before any update) included, and no temporary files left by either rank
    assert ckpts == ["best.ckpt", "epoch_000.ckpt", "epoch_001.ckpt", "epoch_002.ckpt", "epoch_003.ckpt",
                     "last.ckpt"], ckpts
    summary = read_json(run / "train_summary.json")
    assert summary["epochs"] == 3
    # validation synced over the two ranks: the value of the whole split, not one rank's half
    acc, n_val = _val_accuracy(run / "checkpoints" / "best.ckpt", tmp_path)
    assert abs(summary["val_acc"] - acc) <= 1.0 / n_val + 1e-6, (summary["val_acc"], acc)
    # the same run killed after its second epoch: what the disk held then (settings unchanged, so
    # the rerun resumes instead of refusing; other settings would be a one-line refusal)
    first = (run / "checkpoints" / "epoch_000.ckpt").stat().st_mtime_ns
    shutil.copy2(run / "checkpoints" / "epoch_002.ckpt", run / "checkpoints" / "last.ckpt")
    (run / "checkpoints" / "epoch_003.ckpt").unlink()
    (run / "train_summary.json").unlink()
    res = run_entry("train.py", *DDP, "trainer.max_epochs=3", cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and (run / "checkpoints" / "epoch_003.ckpt").exists()    # resumed, not restarted
    assert (run / "checkpoints" / "epoch_000.ckpt").stat().st_mtime_ns == first
    assert read_json(run / "train_summary.json")["epochs"] == 3


@pytest.mark.parametrize("script", ["analyze.py", "prune.py"])
def test_analyze_and_prune_refuse_several_processes(tmp_path, script):
    res = run_entry(script, "logger=none", cwd=tmp_path, env={"WORLD_SIZE": "2", "RANK": "1"}, timeout=300)
    assert res.returncode == 2
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {script} runs in one process") and "rank 1 of 2" in line, res.stderr[-500:]


def test_the_task_wrapper_refuses_several_processes(monkeypatch, tmp_path):
    """The stages that run in one process (analyze, prune) are refused by the task wrapper, from Python too."""
    from axes_pipeline.tasks import refuse_several_processes, run_task

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="the capture runs in one process"):
        refuse_several_processes("the capture")
    ran = []
    with pytest.raises(SystemExit) as exit_:
        run_task(ran.append, make_cfg("analyze", ["logger=none"], tmp_path), where=lambda c: tmp_path, one_process=True)
    assert exit_.value.code == 2 and not ran


def test_sync_batchnorm_on_cpu_is_refused_and_auto_resolves():
    from axes_pipeline.training.trainer import ddp_trainer

    with pytest.raises(UserError, match="SyncBatchNorm is CUDA-only"):
        ddp_trainer(accelerator="cpu", sync_batchnorm=True, devices=1, logger=False)
    t = ddp_trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    assert t.precision == "32-true"
