"""Checkpoints: one per epoch including epoch 0 (before any update), and safe loading.

Layout under ``<run_dir>/checkpoints/``: ``last.ckpt`` (resume point), ``best.ckpt`` (best on the
validation split) and, with ``checkpoint.every_epoch=true``, ``epoch_000.ckpt`` (the initial
weights) ... ``epoch_NNN.ckpt`` (after NNN epochs).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import lightning as L
import torch

from axes_pipeline.errors import UserError
from axes_pipeline.runs import file_digest, no_space_is_one_line, read_json

log = logging.getLogger("axes_pipeline")

EPOCH_RE = re.compile(r"epoch_(\d+)\.ckpt$")


def epoch_ckpt_name(epoch: int) -> str:
    return f"epoch_{epoch:03d}.ckpt"


def _save_atomic(trainer: L.Trainer, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with no_space_is_one_line(path):
            trainer.save_checkpoint(str(tmp), weights_only=False)   # full state: a resume point too
            if trainer.is_global_zero:
                os.replace(tmp, path)
    except BaseException:
        # a failed save (a full disk, a kill) must not leave a partial checkpoint behind
        if trainer.is_global_zero:
            tmp.unlink(missing_ok=True)
        raise


class EpochCheckpoint(L.Callback):
    """Save ``epoch_000.ckpt`` before the first update and ``epoch_{k}.ckpt`` after epoch k."""

    def __init__(self, dirpath: str | Path):
        self.dirpath = Path(dirpath)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        first = self.dirpath / epoch_ckpt_name(0)
        # every rank must take the same branch (saving is collective: a barrier); rank 0 decides
        todo = trainer.strategy.broadcast(trainer.global_step == 0 and not first.exists(), src=0)
        if todo:
            _save_atomic(trainer, first)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        _save_atomic(trainer, self.dirpath / epoch_ckpt_name(trainer.current_epoch + 1))


def epoch_checkpoint(dirpath: str | Path, every_epoch: bool) -> EpochCheckpoint | None:
    """The ``callbacks.epoch_checkpoint`` node: per-epoch checkpoints only with ``checkpoint.every_epoch``."""
    return EpochCheckpoint(dirpath) if every_epoch else None


def epoch_checkpoints(ckpt_dir: str | Path) -> dict[int, Path]:
    """{epoch: path} of the per-epoch checkpoints in ``ckpt_dir``, sorted by epoch."""
    found = {int(m.group(1)): p for p in Path(ckpt_dir).glob("epoch_*.ckpt") if (m := EPOCH_RE.search(p.name))}
    return dict(sorted(found.items()))


def changed_since_training(path: str | Path) -> str | None:
    """One line saying that the checkpoint at ``path`` is not the file training wrote (its content digest
    differs from the one ``train_summary.json`` recorded, ``checkpoint_digests``), else None: the same
    file, or nothing recorded (a run trained before digests were recorded, a checkpoint outside a run)."""
    path = Path(path)
    if path.parent.name != "checkpoints":
        return None
    try:
        recorded = read_json(path.parent.parent / "train_summary.json").get("checkpoint_digests", {}).get(path.name)
    except (OSError, ValueError, AttributeError):
        return None
    if not recorded:
        return None
    have = file_digest(path)
    return None if have == recorded else (f"checkpoint {path} is not the file training wrote (content digest "
                                           f"{recorded} when written, {have} now)")


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint without executing pickled code (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here means an unusable file
        raise UserError(f"checkpoint {path} is corrupt or not a weights-only checkpoint "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None


def model_state(ckpt: dict) -> dict:
    """The backbone's state_dict from a Lightning checkpoint (keys without the `model.` prefix)."""
    state = ckpt.get("state_dict")
    if state is None:
        raise UserError("checkpoint has no state_dict: not a checkpoint written by train.py")
    return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}


#: Meta keys recorded since checkpoints name their data; older checkpoints lack them and are
#: accepted with a warning (their weights may still fit a model of another dataset).
DATA_META_KEYS = ("data", "image_size")
_WARNED: set[str] = set()


def check_meta(meta: dict, expect: dict, path: str | Path) -> None:
    """Refuse, in one line, a checkpoint whose recorded meta differs from ``expect``: one of another
    dataset with the same class count loads without a shape error, and its axes would be wrong."""
    for key, want in expect.items():
        have = meta.get(key)
        if have is not None and want is not None and have != want:
            raise UserError(f"checkpoint {path} is for {key}={have}, but this run has {key}={want}; "
                            f"pass the matching overrides ({key}={have}) or another ckpt=")
    unrecorded = [k for k in DATA_META_KEYS if k in expect and meta.get(k) is None]
    if unrecorded and str(path) not in _WARNED:
        _WARNED.add(str(path))
        log.warning("checkpoint %s does not record its %s (written by an older version); assuming it matches "
                    "this run's data", path, " and ".join(unrecorded))


def load_into(model: torch.nn.Module, path: str | Path, expect: dict | None = None) -> dict:
    """Load the weights of checkpoint ``path`` into ``model`` and return its meta; refuse another
    model or class count, a meta that differs from ``expect`` (:func:`check_meta`), and a file that is
    not the one training wrote (:func:`changed_since_training`): every stage reads through here."""
    ckpt = read_checkpoint(path)
    meta = ckpt.get("axes_meta", {})
    check_meta(meta, expect or {}, path)
    if (changed := changed_since_training(path)) is not None:   # it loads, but is it the network that was trained?
        raise UserError(f"{changed}; put the original back, or retrain that run")
    state = model_state(ckpt)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    mismatched = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or mismatched:
        what = (f"missing {missing[:3]}" if missing else
                f"shape mismatch at {mismatched[0]}: {tuple(state[mismatched[0]].shape)} vs "
                f"{tuple(own[mismatched[0]].shape)}")
        raise UserError(f"checkpoint {path} does not fit this model ({what}); "
                        f"is it from another model, width or class count?")
    model.load_state_dict(state)
    return meta
