"""The training callbacks of conf/callbacks: their typed nodes, and the two that are ours.

Every callback is a ``_target_`` node under ``callbacks`` (:func:`axes_pipeline.wiring.instantiate_all`);
``callbacks.<name>=false`` leaves one out. The checkpoint callbacks read the knobs users set in the
global ``checkpoint`` block (``checkpoint.every_epoch=true``) by interpolation.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

import lightning as L

CKPT_DIR = "${paths.run_dir}/checkpoints"


@dataclass
class CheckpointConfig:
    """``checkpoint``: which checkpoints training keeps under ``<run_dir>/checkpoints/``."""

    every_epoch: bool = False   # true: epoch_000.ckpt (initial weights, before any update) + one per epoch
    monitor: str = "val/acc"    # "best" is selected on the validation split, never the test split
    mode: str = "max"


@dataclass
class ModelCheckpointNode:
    """``best.ckpt`` (best on ``checkpoint.monitor``) and ``last.ckpt`` (the resume point)."""

    _target_: str = "lightning.pytorch.callbacks.ModelCheckpoint"
    dirpath: str = CKPT_DIR
    filename: str = "best"
    monitor: str = "${checkpoint.monitor}"
    mode: str = "${checkpoint.mode}"
    save_last: bool = True
    save_top_k: int = 1
    enable_version_counter: bool = False
    auto_insert_metric_name: bool = False


@dataclass
class EpochCheckpointNode:
    """``epoch_NNN.ckpt`` per epoch, epoch 0 included, when ``checkpoint.every_epoch``."""

    _target_: str = "axes_pipeline.training.checkpoints.epoch_checkpoint"
    dirpath: str = CKPT_DIR
    every_epoch: bool = "${checkpoint.every_epoch}"


@dataclass
class ProgressBarNode:
    """Lightning's bar on a terminal only: redirected to a file each redraw would be a line
    (~120 per seed); the log then gets :class:`EpochLines` instead."""

    _target_: str = "axes_pipeline.training.callbacks.progress_bar"


@dataclass
class EpochLinesNode:
    _target_: str = "axes_pipeline.training.callbacks.EpochLines"


@dataclass
class LRMonitorNode:
    """The learning rate in the logger's curves (left out with ``logger=none``: it needs one)."""

    _target_: str = "lightning.pytorch.callbacks.LearningRateMonitor"
    logging_interval: str = "epoch"


@dataclass
class CallbacksConfig:
    """``callbacks``: name -> ``_target_`` node, or ``false``/``null`` (hence ``Any``) to leave it out."""

    model_checkpoint: Any = field(default_factory=ModelCheckpointNode)
    epoch_checkpoint: Any = field(default_factory=EpochCheckpointNode)
    progress_bar: Any = field(default_factory=ProgressBarNode)
    epoch_lines: Any = field(default_factory=EpochLinesNode)
    lr_monitor: Any = field(default_factory=LRMonitorNode)


def progress_bar():
    """Lightning's progress bar when stdout (where Lightning draws it) is a terminal, else None."""
    if not sys.stdout.isatty():
        return None
    from lightning.pytorch.callbacks import TQDMProgressBar

    return TQDMProgressBar()


class EpochLines(L.Callback):
    """One line per finished epoch on stdout, when the trainer shows no progress bar."""

    def on_train_epoch_start(self, trainer, pl_module):
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.progress_bar_callback is not None:
            return
        # validation of this epoch has run by now, so its metrics are in callback_metrics
        m = trainer.callback_metrics
        # (a metric logged per step and per epoch is in it as `<name>_epoch`)
        picked = {k: m.get(f"{k}_epoch", m.get(k)) for k in ("train/loss", "train/acc", "val/loss", "val/acc")}
        shown = " ".join(f"{k}={float(v):.4f}" for k, v in picked.items() if v is not None)
        secs = time.perf_counter() - getattr(self, "_t0", time.perf_counter())
        print(f"train: epoch {trainer.current_epoch + 1}/{trainer.max_epochs} {shown} ({secs:.1f}s)", flush=True)
