"""The axes of one layer from its raw samples (a capture with ``keep_samples=True``): the form the
package's lean, moments-only :func:`~axes_pipeline.axes.table.layer_analysis` is checked against."""

from __future__ import annotations

import torch

from axes_pipeline.axes.table import LayerResult, layer_analysis
from axes_pipeline.metrics import covariance


def layer_analysis_from_samples(name: str, index: int, acts: torch.Tensor, target: torch.Tensor, unit, *,
                                dtype: torch.dtype, device: torch.device, patches=None, **knobs) -> LayerResult:
    """:func:`layer_analysis` of ``acts: [N, C]`` and ``target: [N]``: their covariance, and the
    gradient cosines of the streamed patch moments ``patches`` when given."""
    cov = covariance(acts.to(device=device, dtype=dtype), target.to(device=device, dtype=dtype))
    grad_cos = patches.cosines(unit.weight) if patches is not None else None
    return layer_analysis(name, index, cov, unit, dtype=dtype, device=device, n_samples=int(acts.shape[0]),
                          grad_cos=grad_cos, **knobs)
