"""Issue 23, items 5-11: the environment's failures (a full disk, a read-only output root, an
out-of-range knob, a truncated checkpoint, an unreachable wandb, a killed report, a count larger
than a layer) end in one line and exit status 2, and leave nothing half-written behind."""

from __future__ import annotations

import errno
import shutil
from collections import namedtuple
from pathlib import Path

import pandas as pd
import pytest
import torch

from axes_pipeline.errors import UserError
from axes_pipeline.runs import atomic_path, write_csv

from .helpers import TINY, make_cfg

DiskUsage = namedtuple("DiskUsage", "total used free")


def _one_line_exit_2(capsys, fn, cfg) -> str:
    """Run ``fn`` through the task wrapper; assert exit status 2 and one ``error:`` line; return it."""
    from axes_pipeline.tasks import run_task

    with pytest.raises(SystemExit) as exit_:
        run_task(fn, cfg)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ---- 5. disk full ------------------------------------------------------------------------------

def _torch_disk_full(*a, **k):
    # what torch.save says on a full disk (analyze's capture cache, train's checkpoints)
    raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0\n"
                       "basic_ios::clear: iostream error")


def test_full_disk_while_torch_saves_is_one_line_and_leaves_no_temp(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "save", _torch_disk_full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: DiskUsage(10 << 30, 10 << 30, 0))
    cfg = make_cfg("analyze", ["logger=none"], tmp_path)
    target = tmp_path / "run" / "capture.pt"

    def stage(cfg):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half a capture")
            torch.save({"x": 1}, tmp)

    line = _one_line_exit_2(capsys, stage, cfg)
    assert line == (f"error: no space left on device writing {target}; free some space (or point "
                    f"paths.output_root elsewhere) and run the same command again")
    assert list(target.parent.iterdir()) == []     # neither the temp file nor a partial capture.pt


def test_full_disk_while_writing_a_table_names_it(tmp_path, monkeypatch):
    def enospc(self, path, *a, **k):
        Path(path).write_text("a,b\n1,")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", enospc)
    with pytest.raises(UserError, match=r"^no space left on device writing .*axes\.csv; "):
        write_csv(tmp_path / "axes.csv", pd.DataFrame({"a": [1]}))
    assert list(tmp_path.iterdir()) == []


def test_torch_write_failure_with_free_space_is_not_called_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", _torch_disk_full)
    with pytest.raises(RuntimeError, match="inline_container"):
        with atomic_path(tmp_path / "x.pt") as tmp:
            torch.save({}, tmp)
    assert list(tmp_path.iterdir()) == []


def test_full_disk_during_an_epoch_checkpoint_leaves_no_tmp(tmp_path):
    """train's per-epoch checkpoint (``.epoch_001.ckpt.tmp`` was left behind)."""
    from axes_pipeline.training.checkpoints import EpochCheckpoint

    class FullDiskTrainer:
        sanity_checking, is_global_zero, current_epoch = False, True, 0

        def save_checkpoint(self, path, weights_only=False):
            Path(path).write_bytes(b"PK half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device", path)

    with pytest.raises(UserError, match=r"^no space left on device writing .*/epoch_001\.ckpt; "):
        EpochCheckpoint(tmp_path).on_train_epoch_end(FullDiskTrainer(), None)
    assert list(tmp_path.iterdir()) == []
