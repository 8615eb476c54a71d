"""The one ``device`` knob (``auto | cpu | cuda``, top-level in conf/axes.yaml) of analyze.py and prune.py."""

from __future__ import annotations

import torch

from axes_pipeline.errors import UserError

__all__ = ["resolve_device"]


def resolve_device(name: str | None) -> torch.device:
    """``auto`` (or null): CUDA when a GPU is visible, else the CPU; ``cpu``, ``cuda``, ``cuda:1``... as
    named, and a one-line error when a CUDA device is asked for and none is visible."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} but no CUDA GPU is visible; use device=cpu or device=auto")
    return dev
