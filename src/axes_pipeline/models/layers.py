"""The analysable conv layers of a backbone, and what follows each conv (norm, activation).

Everything here is read off the model's ``torch.fx`` trace (:mod:`axes_pipeline.models.graph`,
no per-architecture tables): every ``nn.Conv2d`` that the forward calls is an analysable layer, and so is
every ``nn.Linear`` applied to a channels-last feature map, a 1×1 conv spelled as a ``Linear``
(ConvNeXt's ``pwconv1``/``pwconv2``, ``block.3``/``block.5``; METHODS §1). The classifier reads
a flattened vector and never is one. Names are the modules' qualified names (``layer1.0.conv1``), so
they are the same in every build of the same backbone and match ``model.get_submodule(name)``.

What the capture stage hooks, per :class:`ConvUnit`:

- ``pre_bn``: forward hook on ``unit.conv`` (its output ``[B, C, H, W]``; ``[B, H, W, C]`` for a
  ``Linear`` unit, ``unit.channels_last``).
- ``post_bn``: forward hook on ``unit.norm``; its output has the channels on
  ``unit.channel_dim`` (1 for BatchNorm / LayerNorm2d, -1 for ConvNeXt's block LayerNorm, which
  runs on a channels-last permute of the conv output). ``norm is None`` (ConvNeXt's
  downsampling convs, any conv with no norm after it): use the conv output.
- ``post_act``: forward hook on ``unit.act`` at its ``unit.act_call``-th call in one forward.
  torchvision's ResNet blocks call one ``relu`` module twice (after ``bn1``, and after the
  residual add), so a hook on ``layer1.0.relu`` fires twice; ``act_call`` says which call is
  this unit's. When ``unit.residual`` is true the norm output is first summed with a shortcut
  and ``act`` is the activation after that add (ResNet's ``conv2`` and ``downsample.0``): the
  hooked tensor is the block output, shared by both branches, not the channel's own signal.
  ``act is None``: no elementwise nonlinearity follows (MobileNetV2's linear projection convs,
  ConvNeXt, whose block LayerNorm feeds a Linear): use the norm output. A conv with no norm
  (AlexNet, SE convs) has as ``act`` the activation directly after it, if any.
- :func:`capture_point` names the tensor each ``capture.point`` reads for a unit (the
  ``capture_point`` column of axes.csv, METHODS §1). For an activation that
  is a function in the forward (``F.relu(x)``) rather than a module, ``act`` is a
  :class:`FunctionalAct` wrapper that is *not* part of the model and ``act_name`` is ``None``:
  apply ``unit.act`` to the post-norm tensor yourself.
- ResNet, VGG and MobileNetV2 use in-place ReLU/ReLU6 after the norm: a hook on the norm must
  copy (``.clone()``) its output before the activation overwrites it.

Lesions (METHODS §8) zero ``unit.conv``'s filter and bias and ``unit.norm``'s weight and bias
(BN γ, β). With a LayerNorm (ConvNeXt) the other channels' normalisation still sees the zeroed
channel; only the BatchNorm backbones give an exact zero post-norm output.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from axes_pipeline.errors import UserError
from axes_pipeline.models.backbones import default_image_size
from axes_pipeline.models.graph import ConvGraph, ConvUnit, FunctionalAct, conv_graph, is_depthwise

__all__ = ["ConvUnit", "FunctionalAct", "analysable_layers", "capture_point", "classifier_name", "conv_layers",
           "conv_norm_pairs", "depth_spaced_layers", "evenly_spaced", "example_input", "is_depthwise"]


def _norm_kind(norm: nn.Module) -> str:
    if isinstance(norm, nn.GroupNorm):
        return "gn"
    if isinstance(norm, nn.LayerNorm):
        return "ln"
    if isinstance(norm, nn.modules.instancenorm._InstanceNorm):
        return "in"
    return "bn"


def capture_point(unit: ConvUnit, point: str) -> str:
    """Which tensor ``capture.point`` reads for this unit (METHODS §1).

    ``pre_bn``: the conv output, which is the norm's input where a norm follows (``pre_bn``,
    ``pre_ln``, ``pre_gn``, ``pre_in``) and the plain conv output where none does
    (``conv_out``). ``post_bn``: the norm output (``post_bn``/``post_ln``/...), else ``conv_out``.
    ``post_act``: after norm and activation (``post_act``), after the activation of a conv with
    no norm (``conv_act``), or the last of these that exists.
    """
    kind = _norm_kind(unit.norm) if unit.norm is not None else None
    if point == "pre_bn":
        return f"pre_{kind}" if kind else "conv_out"
    if point == "post_bn":
        return f"post_{kind}" if kind else "conv_out"
    if unit.act is not None:
        return "post_act" if kind else "conv_act"
    return f"post_{kind}" if kind else "conv_out"


def classifier_name(model: nn.Module) -> str:
    """Qualified name of the classifier: the last ``nn.Linear`` registered in ``model``
    (``fc``, ``classifier``, ``classifier.1``, ``classifier.2``, ``classifier.6``). A network
    with no ``nn.Linear`` (SqueezeNet) ends in a conv whose output channels are the class scores:
    its last registered ``nn.Conv2d`` (``classifier.1``), which is then not an analysable layer."""
    name = conv = None
    for qual, module in model.named_modules():
        if isinstance(module, nn.Linear):
            name = qual
        elif isinstance(module, nn.Conv2d):
            conv = qual
    if name is None and conv is None:
        raise UserError(f"{type(model).__name__} has no nn.Linear or nn.Conv2d classifier; this pipeline expects one")
    return name if name is not None else conv


def _conv_graph(model: nn.Module) -> ConvGraph:
    """The units of every conv and channels-last ``Linear`` but the classifier (SqueezeNet's conv
    classifier gives class scores, not features)."""
    head = classifier_name(model)
    return conv_graph(model, {name: m for name, m in model.named_modules()
                              if isinstance(m, (nn.Conv2d, nn.Linear)) and name != head})


def conv_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every analysable layer the forward calls, in forward order, keyed by qualified name: the
    ``nn.Conv2d`` modules and the channels-last ``nn.Linear`` ones (read their channels with
    :func:`~axes_pipeline.models.graph.out_channels`)."""
    return {name: unit.conv for name, unit in _conv_graph(model).units.items()}


def analysable_layers(model: nn.Module, include_depthwise: bool = True) -> dict[str, nn.Module]:
    """:func:`conv_layers`, optionally without depthwise convs (MobileNetV2's 3×3 depthwise,
    ConvNeXt's 7×7 depthwise): a depthwise channel sees one input channel only."""
    layers = conv_layers(model)
    if include_depthwise:
        return layers
    return {name: conv for name, conv in layers.items() if not is_depthwise(conv)}


def conv_norm_pairs(model: nn.Module) -> dict[str, ConvUnit]:
    """For every analysable conv (forward order), the norm and activation after it.

    Read off a ``torch.fx`` trace; see the module docstring for what each field means to the
    capture and lesion stages. Examples (torchvision ResNet-18): ``layer1.0.conv1`` →
    ``layer1.0.bn1`` → ``layer1.0.relu`` (call 0); ``layer1.0.conv2`` → ``layer1.0.bn2`` → add →
    ``layer1.0.relu`` (call 1, ``residual``); ``layer2.0.downsample.0`` →
    ``layer2.0.downsample.1`` → add → ``layer2.0.relu`` (call 1, ``residual``).
    """
    return _conv_graph(model).units


def depth_spaced_layers(
    model: nn.Module, k: int = 6, *, include_shortcuts: bool = False, include_depthwise: bool = True
) -> list[str]:
    """``k`` conv-layer names spaced evenly over depth (forward order), first and last included.

    Positions ``round(linspace(0, n-1, k))`` over the candidate convs: all analysable convs but
    1×1 shortcut convs (ResNet's ``downsample.0``: a 1×1 conv reading the same tensor as a wider
    main-path conv) unless ``include_shortcuts``, and depthwise convs only if
    ``include_depthwise``. Fewer than ``k`` candidates: all of them.
    """
    if k < 1:
        raise UserError(f"depth_spaced_layers needs k >= 1, got {k}")
    info = _conv_graph(model)
    names = [n for n, unit in info.units.items() if (include_shortcuts or n not in info.shortcuts)
             and (include_depthwise or not is_depthwise(unit.conv))]
    if not names:
        names = list(info.units)
    return evenly_spaced(names, k)


def evenly_spaced(names: list[str], k: int) -> list[str]:
    """``k`` of ``names`` (in order) at positions ``round(linspace(0, n-1, k))``: first and last
    included; one: the last; fewer than ``k``: all of them."""
    if len(names) <= k:
        return list(names)
    if k == 1:
        return [names[-1]]
    picks = [round(i * (len(names) - 1) / (k - 1)) for i in range(k)]
    return [names[i] for i in picks]


def example_input(spec: int | tuple[int, ...] | list[int] | Mapping[str, Any], batch: int = 1, *,
                  device: torch.device | str | None = None, seed: int = 0) -> torch.Tensor:
    """A dummy image batch ``[batch, C, H, W]`` (seeded standard normal), for FLOP counting and
    dependency graphs.

    ``spec``: an image side (``32``), ``(H, W)``, ``(C, H, W)``, or a config mapping with
    ``image_size`` (int or ``[H, W]``; optional ``in_channels``/``channels``), or a model config
    with ``name`` (and knobs), which gives that backbone's default input size (32 for the CIFAR
    adaptations, 224 for ConvNeXt-T and ResNet-18 with ``cifar_stem: false``).
    """
    channels = 3
    if isinstance(spec, Mapping) or hasattr(spec, "keys"):
        cfg = dict(spec.items())
        channels = int(cfg.get("in_channels", cfg.get("channels", 3)) or 3)
        if cfg.get("image_size") is not None:
            size = cfg["image_size"]
        elif cfg.get("name") is not None:
            size = default_image_size(str(cfg["name"]), **{k: v for k, v in cfg.items() if k != "name"})
        else:
            raise UserError("example_input needs an image size: give an int, (H, W) or a config with image_size")
    else:
        size = spec
    dims = [size, size] if isinstance(size, int) else [int(d) for d in size]
    if len(dims) == 3:
        channels, dims = dims[0], dims[1:]
    if len(dims) != 2:
        raise UserError(f"example_input: image size must be H, (H, W) or (C, H, W), got {size!r}")
    x = torch.randn(batch, channels, *dims, generator=torch.Generator().manual_seed(seed))
    return x.to(device) if device is not None else x
