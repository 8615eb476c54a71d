"""Gaussian-proxy information metrics: the local axis and the target axis of every channel.

Everything is computed from the unbiased covariance of (T, Y_1..Y_C) of one layer (METHODS
§1–§3), batched over channels, in pure torch on the input's device:

* :func:`channel_axes` / :func:`channel_axes_from_moments`: all per-channel quantities.
* :class:`ActivationMoments` (a :class:`Moments`, the one streaming accumulator, a
  ``torchmetrics.Metric``): stream calibration batches into that covariance.
* :func:`pairwise_overlap`, :func:`pairwise_target_excess` (+ ``_from_moments``): the C x C
  R_X and S matrices (R-graph and S-graph edge weights).
* :func:`triplet_ratio` (+ ``_from_moments``): the layer's S3/S2.
* :func:`gradient_cosines`, :func:`patch_moments`: the Gaussian linear analysis (METHODS §5);
  :func:`linear_gaussian_study`: its synthetic demonstration.

Example: stream a layer's samples batch by batch, then read both axes of every channel (channel 0
follows the target, channels 1 and 2 are independent noise)::

    >>> import torch
    >>> from axes_pipeline.metrics import ActivationMoments, channel_axes_from_moments, covariance
    >>> g = torch.Generator().manual_seed(0)
    >>> acts = torch.randn(1000, 3, generator=g, dtype=torch.float64)
    >>> target = acts[:, 0] + 0.5 * torch.randn(1000, generator=g, dtype=torch.float64)
    >>> moments = ActivationMoments()
    >>> for i in range(0, 1000, 250):
    ...     moments.update(acts[i:i + 250], target[i:i + 250])
    >>> cov = moments.compute()          # [C+1, C+1], element 0 = the target
    >>> torch.allclose(cov, covariance(acts, target))   # the same as the one-shot covariance
    True
    >>> axes = channel_axes_from_moments(cov)
    >>> [round(v, 2) for v in axes["task_info"].tolist()]   # I(T; Y_i): only channel 0 knows the task
    [0.79, 0.0, 0.0]

(The population value of channel 0's is −½ ln(1 − 1/1.25) = 0.80; 1,000 samples give 0.79.)
"""

from axes_pipeline.metrics.axes import AXES_KEYS, channel_axes, channel_axes_from_moments
from axes_pipeline.metrics.excess import (
    pairwise_overlap,
    pairwise_overlap_from_moments,
    pairwise_target_excess,
    pairwise_target_excess_from_moments,
    triplet_ratio,
    triplet_ratio_from_moments,
)
from axes_pipeline.metrics.gaussian import DEAD_RTOL, RHO_MAX, covariance, dead_channels
from axes_pipeline.metrics.gradients import PatchMoments, gradient_cosines, patch_moments
from axes_pipeline.metrics.linear_gaussian import linear_gaussian_study
from axes_pipeline.metrics.moments import ActivationMoments, Moments

__all__ = [
    "AXES_KEYS", "ActivationMoments", "DEAD_RTOL", "RHO_MAX", "Moments", "PatchMoments", "channel_axes", "dead_channels",
    "channel_axes_from_moments", "covariance", "gradient_cosines", "linear_gaussian_study", "pairwise_overlap",
    "pairwise_overlap_from_moments", "pairwise_target_excess", "pairwise_target_excess_from_moments", "patch_moments",
    "triplet_ratio", "triplet_ratio_from_moments",
]
