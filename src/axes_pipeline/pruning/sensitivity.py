"""The sensitivity scan of the ``sensitivity`` allocation (Li et al. 2017, METHODS §9).

Each prunable group (layer) is pruned *alone* at each of ``pruning.sensitivity_fractions`` of its
channels, lowest L1 filter norm first (their ranking), every other layer whole; the drop of the
validation accuracy from the unpruned network's is that layer's sensitivity at that fraction. The
allocation (:func:`~axes_pipeline.pruning.allocation.sensitivity_keys`) then prunes each layer until
one more channel would cost it more than a global threshold on the drop, so the most sensitive
layers lose least; the ranking inside each layer stays the swept score's.

The scan is measured on the validation split, never the test split (the counts are a choice the
sweep makes, and every choice is made on validation), with the masked network (channels zeroed,
:func:`~axes_pipeline.pruning.groups.masked`, which equals the physically pruned one). It depends on
the checkpoint, the data, the fractions, the dead-channel mask and the group rule only, not on the
swept score or the protocol, so it is stored once per run and checkpoint
(``scores/sensitivity.json``, keyed by :func:`axes_pipeline.runs.run_fingerprint`) and every protocol
that counts by it reuses it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch.nn as nn

from axes_pipeline.errors import UserError
from axes_pipeline.pruning.groups import GroupSet, full_keep, masked
from axes_pipeline.runs import read_record, write_record

log = logging.getLogger("axes_pipeline")

__all__ = ["SCAN_FILE", "cached_scan", "check_scan_data", "sensitivity_scan"]

#: where a run's scan is kept, beside the calibration scores' cache (shared by every protocol)
SCAN_FILE = "sensitivity.json"


def check_scan_data(needs_scan: bool, n_val: int) -> None:
    """One line before any work when the scan is needed and there is no validation split to run it on."""
    if needs_scan and n_val <= 0:
        raise UserError("the sensitivity allocation needs a validation split (data.val_fraction > 0): its scan "
                        "measures accuracy drops on validation, never on test")


def sensitivity_scan(model: nn.Module, groups: GroupSet, ranking: list[np.ndarray], fractions: list[float],
                     val_acc: Callable[[nn.Module], float]) -> tuple[float, np.ndarray]:
    """``(unpruned validation accuracy, drops [G, F])``: ``drops[g, k]`` is the accuracy lost with the
    ``floor(fractions[k]·size_g)`` lowest-``ranking[g]`` channels of group g removed alone (at least one
    channel kept; a fraction that removes none costs 0 without an evaluation)."""
    base = float(val_acc(model))
    drops = np.zeros((len(groups.groups), len(fractions)))
    for g, (grp, r) in enumerate(zip(groups.groups, ranking)):
        order = np.lexsort((np.arange(r.size), r))   # lowest first, ties by channel index (as the allocation)
        for k, f in enumerate(fractions):
            n = min(int(math.floor(f * grp.size + 1e-9)), grp.size - 1)
            if n <= 0:
                continue
            keep = full_keep(groups)
            keep[g][order[:n]] = False
            with masked(model, groups, keep):
                drops[g, k] = base - float(val_acc(model))
    return base, drops


def cached_scan(path: Path, key: dict, compute: Callable[[], tuple[float, np.ndarray]], groups: GroupSet,
                fractions: list[float]) -> np.ndarray:
    """The scan's drops ``[G, F]`` stored at ``path`` under ``key`` when they are sound, else computed
    (``compute()``) and written there atomically."""
    saved, why = read_record(path, key)
    if saved is not None:
        try:
            drops = np.asarray(saved["drops"], dtype=np.float64)
            if drops.shape == (len(groups.groups), len(fractions)) and np.isfinite(drops).all() \
                    and saved.get("groups") == [g.name for g in groups.groups]:
                return drops
        except (KeyError, TypeError, ValueError):
            pass
        print(f"prune: note: {path.name} is damaged; scanning again")
    elif "cannot be read" in why or "not a record" in why:
        print(f"prune: note: {why}; scanning again")
    base, drops = compute()
    check_scan_data(True, 0 if not math.isfinite(base) else 1)
    write_record(path, {"groups": [g.name for g in groups.groups], "fractions": list(fractions),
                        "unpruned_val_acc": base, "drops": drops.tolist()}, key)
    log.info("prune: sensitivity scan of %d layers at %s written to %s", len(groups.groups), fractions, path)
    return drops
