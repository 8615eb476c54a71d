"""The mode a network is run in: what every stage that evaluates, captures or scores a network shares."""

from __future__ import annotations

from contextlib import contextmanager

import torch.nn as nn

__all__ = ["eval_mode"]


@contextmanager
def eval_mode(model: nn.Module):
    """``model`` in eval mode inside the block; its own mode is restored after."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)
