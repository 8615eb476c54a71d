"""Saving a physically pruned network so it reloads with ``torch.load(weights_only=True)``.

The file holds plain containers and tensors only: the backbone's build arguments (name, width,
knobs, class count), the input shape used to trace it, Torch-Pruning's pruning history (module
name, out/in, removed indices: the structure) and the pruned ``state_dict``. Loading builds
the unpruned backbone, redoes the pruning from the history, then loads the weights::

    from axes_pipeline.pruning.export import load_pruned
    model = load_pruned("runs/.../prune/models/l1_0.5.pt")   # eval mode, CPU

(Torch-Pruning's own ``tp.state_dict`` / ``tp.load_state_dict`` pickle whole module
``__dict__``s, which ``weights_only`` loading refuses; this format avoids that.)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from axes_pipeline.errors import UserError
from axes_pipeline.models import build_model
from axes_pipeline.pruning.groups import redo_pruning
from axes_pipeline.runs import atomic_path

__all__ = ["FORMAT", "load_pruned", "model_spec", "save_pruned"]

FORMAT = "axes-pipeline/pruned-model/v1"
_NOT_KNOBS = ("_target_", "_partial_", "recipe", "pretrained", "weights", "name", "width")


def model_spec(model_cfg, num_classes: int) -> dict:
    """Build arguments of the backbone from ``cfg.model`` (plain containers)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(model_cfg, resolve=True) if not isinstance(model_cfg, dict) else dict(model_cfg)
    knobs = {k: v for k, v in cfg.items() if k not in _NOT_KNOBS}
    return {"name": str(cfg["name"]), "width": float(cfg.get("width", 1.0)), "num_classes": int(num_classes),
            "knobs": knobs}


def save_pruned(path: str | Path, spec: dict, input_shape, history: list, model: nn.Module,
                meta: dict | None = None) -> Path:
    """Atomically write the pruned ``model`` (structure as ``history``, weights) to ``path``."""
    payload = {"format": FORMAT, "model": spec, "input_shape": [int(s) for s in input_shape], "pruning_history": history,
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "meta": dict(meta or {})}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_pruned(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a network written by :func:`save_pruned` (eval mode)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"pruned model not found: {path}")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if payload.get("format") != FORMAT:
        raise UserError(f"{path} is not a pruned model written by prune.py (format {payload.get('format')!r})")
    spec = payload["model"]
    model = build_model(spec["name"], spec["num_classes"], width=spec["width"], **spec["knobs"])
    redo_pruning(model, payload["pruning_history"], torch.zeros(payload["input_shape"]))
    model.load_state_dict(payload["state_dict"])
    return model.eval()
