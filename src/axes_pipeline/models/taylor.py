"""Taylor importance of conv filters: Σ|w·∂L/∂w| (Molchanov et al.), the `taylor` pruning score
(prune.py) and a lesion predictor (analyze.py). It lives here, below both analyses and pruning, so
both import the one function and rank filters the same way."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from axes_pipeline.models.modes import eval_mode


def taylor_scores(model: nn.Module, convs: dict[str, nn.Module], batches, device="cpu") -> dict[str, np.ndarray]:
    """Σ|w·∂L/∂w| over each output filter of each conv (a channels-last Linear unit: each weight
    row), ∂L/∂w of the mean cross-entropy over ``batches`` (eval mode). Returns ``{name: [C]}``;
    the model's grads and ``requires_grad`` flags are left as they were."""
    weights = {name: conv.weight for name, conv in convs.items()}
    wanted = {id(w) for w in weights.values()}
    saved = {p: (p.requires_grad, p.grad) for p in model.parameters()}
    total = sum(len(y) for _, y in batches)
    cudnn = torch.backends.cudnn
    was_cudnn = (cudnn.deterministic, cudnn.benchmark)
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
            p.grad = None
        # cuDNN's weight-gradient kernels are not deterministic by default: the same seed must
        # give the same Taylor column (a lesion predictor, a pruning score) on a GPU too.
        cudnn.deterministic, cudnn.benchmark = True, False
        with eval_mode(model), torch.enable_grad():
            for x, y in batches:
                x, y = x.to(device), y.to(device)
                loss = F.cross_entropy(model(x).float(), y, reduction="sum") / total
                loss.backward()
        return {name: (w.detach() * w.grad).abs().flatten(1).sum(1).double().cpu().numpy()
                if w.grad is not None else np.zeros(w.shape[0]) for name, w in weights.items()}
    finally:
        cudnn.deterministic, cudnn.benchmark = was_cudnn
        for p, (rg, g) in saved.items():
            p.requires_grad_(rg)
            p.grad = g
