"""Any torchvision classification CNN (``model=torchvision model.arch=<name>``) and a user's own
``nn.Module`` (``model=custom model.net._target_=my_pkg.MyNet``).

The networks are torchvision's own (``torchvision.models.get_model``), so module names, and hence
state_dict keys and layer names in every table, are torchvision's. ``width`` is a channel
multiplier only where the family has a natural one (:data:`WIDTH_FAMILIES`); elsewhere
``width != 1`` is refused with one line rather than silently ignored. GoogLeNet and Inception-v3
are built without their auxiliary heads: the analyses and pruning read one logit tensor, and the
auxiliary classifiers only exist in training mode.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from axes_pipeline.errors import UserError, unknown_name
from axes_pipeline.models.backbones import ScaledResNet, ScaledVGG, scaled
from axes_pipeline.models.layers import classifier_name

__all__ = ["WIDTH_FAMILIES", "build_custom", "build_torchvision", "family_of", "torchvision_archs"]


def torchvision_archs() -> list[str]:
    """torchvision's classification models that have at least one conv layer (all of them but
    the vision transformers / MaxViT / Swin, which this pipeline does not analyse)."""
    import torchvision.models as tvm

    return [a for a in tvm.list_models(module=tvm) if not a.startswith(("vit_", "swin_", "maxvit"))]


def family_of(arch: str) -> str:
    """The family of a torchvision architecture name (``resnext50_32x4d`` → ``resnext``)."""
    for prefix in ("wide_resnet", "resnext", "resnet", "densenet", "googlenet", "inception", "squeezenet",
                   "mobilenet_v2", "mobilenet_v3", "mnasnet", "efficientnet", "regnet", "shufflenet",
                   "convnext", "alexnet", "vgg"):
        if arch.startswith(prefix):
            return prefix
    return arch


# ---------------------------------------------------------------------------------------- widths


def _resnet(arch: str, width: float, num_classes: int) -> nn.Module:
    from torchvision.models import resnet as R

    depth_cfg = {18: ([2, 2, 2, 2], R.BasicBlock), 34: ([3, 4, 6, 3], R.BasicBlock),
                 50: ([3, 4, 6, 3], R.Bottleneck), 101: ([3, 4, 23, 3], R.Bottleneck),
                 152: ([3, 8, 36, 3], R.Bottleneck)}
    groups, per_group = {"resnext50_32x4d": (32, 4), "resnext101_32x8d": (32, 8), "resnext101_64x4d": (64, 4),
                         "wide_resnet50_2": (1, 128), "wide_resnet101_2": (1, 128)}.get(arch, (1, 64))
    found = re.search(r"res(?:net|next)(\d+)", arch)
    depth = int(found.group(1)) if found else 0
    if depth not in depth_cfg:
        raise UserError(f"model.width is not supported for torchvision arch {arch}")
    layers, block = depth_cfg[depth]
    widths = [scaled(c, width) for c in (64, 128, 256, 512)]
    if any(int(w * per_group / 64) < 1 for w in widths):
        raise UserError(f"model.width={width} leaves {arch} with no channel per group; use a larger width")
    return ScaledResNet(layers, widths, num_classes, cifar_stem=False, block=block, groups=groups,
                        width_per_group=per_group)


def _vgg(arch: str, width: float, num_classes: int) -> nn.Module:
    from torchvision.models import vgg as V

    letter = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}[arch.replace("_bn", "")]
    cfg = [v if v == "M" else scaled(int(v), width) for v in V.cfgs[letter]]
    c_last = [v for v in cfg if v != "M"][-1]
    return ScaledVGG(V.make_layers(cfg, batch_norm=arch.endswith("_bn")), int(c_last), num_classes,
                     head="imagenet", dropout=0.5, hidden=scaled(4096, width))


def _densenet(arch: str, width: float, num_classes: int) -> nn.Module:
    from torchvision.models.densenet import DenseNet

    spec = {"densenet121": (32, (6, 12, 24, 16), 64), "densenet161": (48, (6, 12, 36, 24), 96),
            "densenet169": (32, (6, 12, 32, 32), 64), "densenet201": (32, (6, 12, 48, 32), 64)}[arch]
    growth = max(1, round(spec[0] * width))
    return DenseNet(growth, spec[1], max(1, round(spec[2] * width)), num_classes=num_classes)


def _mobilenet_v2(arch: str, width: float, num_classes: int) -> nn.Module:
    from torchvision.models.mobilenetv2 import MobileNetV2

    return MobileNetV2(num_classes=num_classes, width_mult=width)


def _mobilenet_v3(arch: str, width: float, num_classes: int) -> nn.Module:
    from torchvision.models.mobilenetv3 import MobileNetV3, _mobilenet_v3_conf

    setting, last = _mobilenet_v3_conf(arch, width_mult=width)
    return MobileNetV3(setting, scaled(last, width), num_classes=num_classes)


def _mnasnet(arch: str, width: float, num_classes: int) -> nn.Module:
    from torchvision.models.mnasnet import MNASNet

    alpha = {"mnasnet0_5": 0.5, "mnasnet0_75": 0.75, "mnasnet1_0": 1.0, "mnasnet1_3": 1.3}[arch]
    return MNASNet(alpha * width, num_classes=num_classes)


def _efficientnet(arch: str, width: float, num_classes: int) -> nn.Module:
    from torchvision.models import efficientnet as E

    if arch.startswith("efficientnet_v2"):
        raise UserError(f"model.width is not supported for {arch} (its stages fix their widths)")
    mult = {"b0": (1.0, 1.0, 0.2), "b1": (1.0, 1.1, 0.2), "b2": (1.1, 1.2, 0.3), "b3": (1.2, 1.4, 0.3),
            "b4": (1.4, 1.8, 0.4), "b5": (1.6, 2.2, 0.4), "b6": (1.8, 2.6, 0.5), "b7": (2.0, 3.1, 0.5)}
    w, d, drop = mult[arch.split("_")[1]]
    setting, last = E._efficientnet_conf(arch, width_mult=w * width, depth_mult=d)
    return E.EfficientNet(setting, drop, num_classes=num_classes, last_channel=last)


def _shufflenet(arch: str, width: float, num_classes: int) -> nn.Module:
    from torchvision.models.shufflenetv2 import ShuffleNetV2

    chans = {"shufflenet_v2_x0_5": [24, 48, 96, 192, 1024], "shufflenet_v2_x1_0": [24, 116, 232, 464, 1024],
             "shufflenet_v2_x1_5": [24, 176, 352, 704, 1024], "shufflenet_v2_x2_0": [24, 244, 488, 976, 2048]}[arch]
    # the channel split halves every stage: keep stage widths even (multiples of 8)
    return ShuffleNetV2([4, 8, 4], [scaled(c, width) for c in chans], num_classes=num_classes)


def _regnet(arch: str, width: float, num_classes: int) -> nn.Module:
    from torchvision.models import regnet as Rg

    # read the family's init parameters off its builder's source call is brittle: table them
    params = {
        "regnet_y_400mf": (16, 48, 27.89, 2.09, 8, 0.25), "regnet_y_800mf": (14, 56, 38.84, 2.4, 16, 0.25),
        "regnet_y_1_6gf": (27, 48, 20.71, 2.65, 24, 0.25), "regnet_x_400mf": (22, 24, 24.48, 2.54, 16, None),
        "regnet_x_800mf": (16, 56, 35.73, 2.28, 16, None), "regnet_x_1_6gf": (18, 80, 34.01, 2.25, 24, None),
    }
    if arch not in params:
        raise UserError(f"model.width is supported for {', '.join(params)} only, not {arch}")
    depth, w0, wa, wm, gw, se = params[arch]
    # group width scales with the channels, so the number of groups per block stays the family's
    gw_s = max(1, round(gw * width))
    bp = Rg.BlockParams.from_init_params(depth=depth, w_0=max(gw_s, scaled(w0, width)), w_a=wa * width, w_m=wm,
                                         group_width=gw_s, se_ratio=se)
    return Rg.RegNet(bp, num_classes=num_classes, stem_width=scaled(32, width), norm_layer=None)


def _convnext(arch: str, width: float, num_classes: int) -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    spec = {"convnext_tiny": ((96, 192, 384, 768), (3, 3, 9, 3), 0.1),
            "convnext_small": ((96, 192, 384, 768), (3, 3, 27, 3), 0.4),
            "convnext_base": ((128, 256, 512, 1024), (3, 3, 27, 3), 0.5),
            "convnext_large": ((192, 384, 768, 1536), (3, 3, 27, 3), 0.5)}[arch]
    w = [scaled(c, width) for c in spec[0]]
    setting = [CNBlockConfig(w[i], w[i + 1] if i < 3 else None, spec[1][i]) for i in range(4)]
    return ConvNeXt(setting, stochastic_depth_prob=spec[2], num_classes=num_classes)


#: Families with a channel multiplier, and how each applies ``width`` (what it multiplies).
WIDTH_FAMILIES: dict[str, tuple[Callable[[str, float, int], nn.Module], str]] = {
    "resnet": (_resnet, "stage widths 64-512"),
    "resnext": (_resnet, "stage widths (groups kept)"),
    "wide_resnet": (_resnet, "stage widths"),
    "vgg": (_vgg, "every conv and the 4096 hidden units"),
    "densenet": (_densenet, "growth rate and stem width"),
    "mobilenet_v2": (_mobilenet_v2, "width_mult"),
    "mobilenet_v3": (_mobilenet_v3, "width_mult"),
    "mnasnet": (_mnasnet, "alpha"),
    "efficientnet": (_efficientnet, "width coefficient"),
    "shufflenet": (_shufflenet, "stage widths"),
    "regnet": (_regnet, "w_0, w_a and group width"),
    "convnext": (_convnext, "stage widths"),
}

#: Smallest input side each family runs at (its pooling / stride chain ends empty below it),
#: measured on the representatives; families not listed run at any size.
MIN_IMAGE_SIZE: dict[str, int] = {"alexnet": 63, "vgg": 32, "densenet": 29, "googlenet": 15, "inception": 75,
                                  "squeezenet": 21, "convnext": 32}


class _InputSizeCheck:
    """Forward pre-hook: an input smaller than the family's minimum is one clear line at the first
    forward (the sanity batch), not a pooling error deep inside the network."""

    def __init__(self, arch: str, side: int):
        self.arch, self.side = arch, side

    def __call__(self, module, args):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.ndim == 4 and min(x.shape[-2:]) < self.side:
            raise UserError(f"torchvision {self.arch} needs inputs of at least {self.side}x{self.side}, got "
                            f"{x.shape[-2]}x{x.shape[-1]}; set data.image_size={self.side} or more")


def build_torchvision(num_classes: int, width: float = 1.0, arch: str = "resnet50") -> nn.Module:
    """torchvision's ``arch`` with ``num_classes`` outputs and random weights (the caller loads
    ImageNet weights). ``width != 1`` scales the family's channels (:data:`WIDTH_FAMILIES`) and is
    refused for a family without a multiplier (AlexNet, GoogLeNet, Inception-v3, SqueezeNet)."""
    import torchvision.models as tvm

    archs = torchvision_archs()
    if arch not in archs:
        raise unknown_name("model.arch", str(arch), archs)
    family = family_of(arch)
    if width != 1.0:
        if family not in WIDTH_FAMILIES:
            raise UserError(f"torchvision {arch} has no width multiplier; use model.width=1.0 "
                            f"(families with one: {', '.join(sorted(WIDTH_FAMILIES))})")
        model = WIDTH_FAMILIES[family][0](arch, float(width), num_classes)
    else:
        kwargs = {"aux_logits": False, "init_weights": True} if family in ("googlenet", "inception") else {}
        model = tvm.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    if family in MIN_IMAGE_SIZE:
        model.register_forward_pre_hook(_InputSizeCheck(arch, MIN_IMAGE_SIZE[family]))
    return model


def build_custom(num_classes: int, width: float = 1.0, net: Any = None) -> nn.Module:
    """A user's ``nn.Module``: ``net`` is ``{"_target_": "my_pkg.MyNet", **kwargs}``.

    ``num_classes`` is passed when the class's constructor takes it (and is not given in
    ``net``); ``width`` must stay 1 (a user's network has no known multiplier).
    """
    if width != 1.0:
        raise UserError("model=custom has no width multiplier; set the widths in model.net and keep model.width=1.0")
    if net is not None and not isinstance(net, dict) and hasattr(net, "items"):  # a DictConfig from Hydra
        from omegaconf import OmegaConf

        net = OmegaConf.to_container(net, resolve=True)
    if not net or not isinstance(net, dict) or not net.get("_target_"):
        raise UserError("model=custom needs model.net._target_=my_pkg.MyNet (a class or function returning an "
                        "nn.Module), importable on PYTHONPATH")
    kwargs = {k: v for k, v in net.items() if k != "_target_"}
    target = str(net["_target_"])
    mod_name, _, attr = target.rpartition(".")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise UserError(f"model.net._target_={target} cannot be imported ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); put its package on PYTHONPATH") from None
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if ("num_classes" in params or takes_kwargs) and "num_classes" not in kwargs:
        kwargs["num_classes"] = num_classes
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise UserError(f"model.net: {target}({', '.join(kwargs)}) failed: {str(exc).splitlines()[0]}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"model.net._target_={target} returned a {type(model).__name__}, not an nn.Module")
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        raise UserError(f"model.net {target} has no nn.Conv2d layer: there is nothing to analyse")
    head_name = classifier_name(model)
    head = model.get_submodule(head_name)
    outputs = head.out_features if isinstance(head, nn.Linear) else head.out_channels
    if outputs != num_classes:  # a wrong head would train and analyse silently on wrong logits
        raise UserError(f"model.net {target}: its classifier {head_name} has {outputs} outputs but the "
                        f"data has {num_classes} classes; let the constructor take num_classes or set "
                        f"model.net.num_classes={num_classes}")
    return model
