"""The slow reference of the lesion engine: one full evaluation per zeroed channel."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch.nn as nn

from axes_pipeline.analyses.lesion_engine import EvalResult, evaluate, zeroed


def weight_lesion_eval(model: nn.Module, unit, channels: Sequence[int], batches, device="cpu") -> EvalResult:
    """One full evaluation per channel with the weights zeroed (:func:`zeroed`), then restored: the
    slow reference for :class:`LesionEngine` (and the baseline of the benchmark)."""
    runs = []
    for c in channels:
        with zeroed(unit, int(c)):
            runs.append(evaluate(model, batches, device))
    return EvalResult(np.array([r.loss_sum[0] for r in runs], dtype=np.float64),
                      np.array([r.correct[0] for r in runs], dtype=np.int64), runs[-1].n if runs else 0)
