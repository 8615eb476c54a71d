"""Untrained backbones that behave like trained ones where it matters for checks and benchmarks.

A freshly built network has BN running statistics 0/1 and affine parameters 1/0, so every BN is an
identity-like map and bugs that mix up channels or statistics go unseen. ``with_bn_statistics``
gives each BN seeded, non-trivial statistics and affine parameters, in eval mode.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from axes_pipeline.models import build_model


def with_bn_statistics(name: str, width: float, num_classes: int = 10, seed: int = 0) -> nn.Module:
    """``build_model(name, num_classes, width)`` (seeded) with random BN statistics, in eval mode."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes=num_classes, width=width)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
    return model.eval()
