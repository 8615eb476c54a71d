"""Backbones and the list of analysable conv layers.

``build_model(name, num_classes, width, pretrained, weights, **knobs)`` builds one of
:data:`MODEL_NAMES` from torchvision's classes (see :mod:`.backbones` for each backbone's knobs),
any torchvision classification CNN as ``tv_<arch>`` (``model=torchvision model.arch=<arch>``), or a
user's ``nn.Module`` as ``custom_<target>`` with knob ``net={"_target_": ...}`` (``model=custom``;
see :mod:`.torchvision_any`);
:func:`conv_layers`, :func:`conv_norm_pairs` and :func:`depth_spaced_layers` say which conv
layers are analysed and what to hook (see :mod:`.layers`).

Hydra: ``conf/model/<name>.yaml`` targets :func:`build_model` with ``_partial_: true``; the
training code binds ``num_classes`` from the datamodule.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch.nn as nn

from axes_pipeline.errors import UserError, unknown_name
from axes_pipeline.models.backbones import BUILDERS
from axes_pipeline.models.layers import (
    ConvUnit,
    FunctionalAct,
    analysable_layers,
    capture_point,
    classifier_name,
    conv_layers,
    conv_norm_pairs,
    depth_spaced_layers,
    evenly_spaced,
    example_input,
)
from axes_pipeline.models.torchvision_any import build_custom, build_torchvision
from axes_pipeline.models.weights import load_weights, resolve_weights

log = logging.getLogger(__name__)

__all__ = ["MODEL_NAMES", "ConvUnit", "FunctionalAct", "analysable_layers", "build_model", "capture_point",
           "classifier_name", "conv_layers", "conv_norm_pairs", "depth_spaced_layers", "evenly_spaced", "example_input",
           "model_knobs"]

MODEL_NAMES: tuple[str, ...] = tuple(BUILDERS)
#: ``model=torchvision`` names its model ``tv_<arch>`` (so run directories of two archs differ);
#: ``model=custom`` names it ``custom_<net._target_>``.
TORCHVISION_PREFIX = "tv_"
CUSTOM_PREFIX = "custom"


def _builder(name: str, knobs: dict[str, Any]):
    """(builder, weights key, knobs for the builder) of model ``name``; UserError if unknown."""
    if name in BUILDERS:
        return BUILDERS[name], name, knobs
    if name.startswith(TORCHVISION_PREFIX):
        arch = name[len(TORCHVISION_PREFIX):]
        if knobs.get("arch", arch) != arch:
            raise UserError(f"model name {name} and model.arch={knobs['arch']} disagree; set model.arch only")
        return build_torchvision, arch, {**knobs, "arch": arch}
    if name == CUSTOM_PREFIX or name.startswith(CUSTOM_PREFIX + "_"):
        return build_custom, None, knobs
    raise unknown_name("model", str(name), (*MODEL_NAMES, "torchvision", "custom"))


def model_knobs(name: str) -> dict[str, Any]:
    """The backbone-specific knobs of ``name`` and their defaults (beyond ``width``)."""
    builder, _, _ = _builder(str(name), {})
    params = inspect.signature(builder).parameters
    return {k: p.default for k, p in params.items() if k not in ("num_classes", "width")}


def build_model(name: str, num_classes: int, width: float = 1.0, pretrained: bool = False, weights: str | None = None,
                from_scratch: bool = False, **knobs: Any) -> nn.Module:
    """Build backbone ``name`` for ``num_classes`` classes with channel multiplier ``width``.

    ``pretrained=True`` loads ImageNet weights from ``weights`` (a local state_dict / torchvision
    ``.pth`` file, or a torchvision tag such as ``IMAGENET1K_V1``) or, with ``weights=None``,
    torchvision's default ImageNet weights: from the hub cache, downloaded there on first use
    where a network is reachable (:func:`~axes_pipeline.models.weights.resolve_weights`).
    Giving ``weights`` implies ``pretrained``. The classifier and shape-mismatched tensors are
    skipped; the :class:`LoadReport` is logged and kept as ``model.pretrained_report``.
    ``from_scratch=True`` (``experiment=dynamics``) refuses any pretrained weights: H2 measures
    training from a random initialisation. ``knobs`` are the backbone's own options
    (:func:`model_knobs`). Every mistake raises :class:`UserError` before anything is built or
    downloaded.
    """
    builder, weights_key, knobs = _builder(str(name), dict(knobs))
    wants_weights = bool(pretrained) or weights not in (None, "")
    if from_scratch and wants_weights:
        raise UserError("experiment=dynamics trains from random initialisation (H2, METHODS §6: epoch 0 must be the "
                        "untrained network); drop model.pretrained=true / model.weights, or use another experiment")
    valid = model_knobs(name)
    if unknown := sorted(set(knobs) - set(valid)):
        raise UserError(f"unknown option(s) {', '.join(unknown)} for model {name}; valid: "
                        f"{', '.join(sorted(valid)) or '(none)'}, plus width, pretrained, weights, from_scratch")
    try:
        width = float(width)
        num_classes = int(num_classes)
    except (TypeError, ValueError):
        raise UserError(f"model.width must be a number and num_classes an integer (got {width!r}, {num_classes!r})") from None
    if not width > 0:
        raise UserError(f"model.width must be > 0, got {width}")
    if num_classes < 1:
        raise UserError(f"num_classes must be >= 1, got {num_classes}")

    path = None
    if wants_weights:
        local = weights not in (None, "") and not str(weights).isupper()
        if not local and width != 1.0:   # refuse before a download that could not be used
            raise UserError(f"torchvision's ImageNet weights fit model.width=1.0 only, got model.width={width}; "
                            "set model.pretrained=false or model.width=1.0")
        if weights_key is None and not local:   # a user's own network: only its own file fits
            raise UserError("model=custom: ImageNet weights are torchvision's; pass model.weights=PATH to a "
                            "state_dict of your network (or ckpt=PATH)")
        path = resolve_weights(weights_key or name, None if weights in (None, "") else str(weights))

    model = builder(num_classes=num_classes, width=width, **knobs)

    if path is not None:
        model.pretrained_report = report = load_weights(model, path)
        log.info("model %s: %s", name, report.summary())
        if report.skipped_shape or report.unexpected:
            log.warning("model %s: %d tensors of %s did not fit (width=%s, knobs=%s) and stay at init",
                        name, len(report.skipped_shape) + len(report.unexpected), path, width, knobs)
    return model
