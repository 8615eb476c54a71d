"""Optimizers and the learning-rate schedule of the training recipes (METHODS §10)."""

from __future__ import annotations

import math

import torch

from axes_pipeline.errors import unknown_name

OPTIMIZERS = ("sgd", "adam", "adamw")


def make_optimizer(params, name: str = "sgd", lr: float = 0.1, weight_decay: float = 5e-4,
                   momentum: float = 0.9, nesterov: bool = False) -> torch.optim.Optimizer:
    """Build the optimizer named in the config (bound to ``params`` late: `_partial_: true`)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=nesterov)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise unknown_name("optimizer (optim.name)", name, OPTIMIZERS)


def warmup_cosine(total_steps: int, warmup_steps: int = 0):
    """LR multiplier per step: linear warm-up, then cosine decay to 0 at ``total_steps``."""
    total_steps = max(1, total_steps)

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
