"""The target T of METHODS §1, per image, from the trained network's logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from axes_pipeline.errors import unknown_name

TARGETS = ("logit_margin", "true_logit", "neg_loss")


def target_from_logits(logits: torch.Tensor, labels: torch.Tensor, kind: str = "logit_margin") -> torch.Tensor:
    """T per image. ``logits: [B, K]``, ``labels: [B]`` -> ``[B]`` (float32).

    logit_margin: z_y − max_{c≠y} z_c; true_logit: z_y; neg_loss: −CE(z, y).
    """
    logits = logits.float()
    true = logits.gather(1, labels[:, None]).squeeze(1)
    if kind == "logit_margin":
        others = logits.scatter(1, labels[:, None], float("-inf"))
        return true - others.max(dim=1).values
    if kind == "true_logit":
        return true
    if kind == "neg_loss":
        return -F.cross_entropy(logits, labels, reduction="none")
    raise unknown_name("target (capture.target)", kind, TARGETS)
