"""Capture: sampled activations and targets from one forward pass, and their cache."""

from axes_pipeline.capture.activations import (
    POSITIONS,
    Capture,
    capture_activations,
    capture_key,
    check_finite,
    has_patch_moments,
    load_capture,
    patch_dim,
    patch_geometry,
    save_capture,
)
from axes_pipeline.capture.targets import TARGETS, target_from_logits

__all__ = ["POSITIONS", "TARGETS", "Capture", "capture_activations", "capture_key", "check_finite", "has_patch_moments",
           "load_capture", "patch_dim", "patch_geometry", "save_capture", "target_from_logits"]
