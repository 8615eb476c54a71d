"""The four backbones, built from torchvision's own classes with a channel multiplier ``width``.

Module names are torchvision's (``layer1.0.conv1``, ``features.3``, ``features.2.conv.1.0``,
``features.1.0.block.0``), so ImageNet state_dicts load by key and layer names mean the same
thing in every run. Each builder takes ``num_classes``, ``width`` and its own keyword knobs;
the defaults of the knobs are the paper's CIFAR adaptations (METHODS §10).

Channel counts are ``round8(c * width)``: torchvision's ``_make_divisible`` (nearest multiple of
8, at least 8, never more than 10% below ``c * width``). MobileNetV2 uses its own ``width_mult``
rounding, which is the same rule (and, like torchvision, keeps the last 1×1 conv at
``1280 * max(1, width)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn
from torchvision.models._utils import _make_divisible
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.mobilenetv2 import MobileNetV2
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.models.vgg import VGG, make_layers

from axes_pipeline.errors import UserError


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded to a multiple of 8 (at least 8), as torchvision rounds widths."""
    return int(_make_divisible(channels * width, 8))


# --------------------------------------------------------------------------------------- ResNet-18


class ScaledResNet(ResNet):
    """torchvision's ResNet with per-stage widths and an optional CIFAR stem.

    Same attributes and forward as :class:`torchvision.models.resnet.ResNet`; only ``__init__``
    differs (torchvision hard-codes 64/128/256/512). With ``cifar_stem`` the stem is a 3×3
    stride-1 conv and ``maxpool`` is an ``nn.Identity`` (kept so the module names stay
    torchvision's).
    """

    def __init__(self, layers: list[int], widths: list[int], num_classes: int, cifar_stem: bool = True,
                 block: type[nn.Module] = BasicBlock, groups: int = 1, width_per_group: int = 64) -> None:
        nn.Module.__init__(self)  # ResNet.__init__ would build the width-1 network first
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = widths[0]
        self.dilation = 1
        self.groups = groups  # ResNeXt's cardinality (torchvision's Bottleneck reads it)
        self.base_width = width_per_group  # 64 for ResNet; BasicBlock's own check, not a channel count
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3] * block.expansion, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


def resnet18(num_classes: int, width: float = 1.0, cifar_stem: bool = True) -> nn.Module:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]); widths ``round8([64, 128, 256, 512] * width)``.

    ``cifar_stem=True`` (default): 3×3 stride-1 stem, no max-pool (32×32 inputs).
    ``cifar_stem=False``: torchvision's 7×7 stride-2 stem + 3×3 max-pool (224×224 inputs).
    """
    widths = [scaled(c, width) for c in (64, 128, 256, 512)]
    return ScaledResNet([2, 2, 2, 2], widths, num_classes, cifar_stem=bool(cifar_stem))


# --------------------------------------------------------------------------------------- VGG-16-BN

VGG16_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class ScaledVGG(VGG):
    """torchvision's VGG (same ``features`` / ``avgpool`` / ``classifier`` and forward) with a
    choice of head.

    ``head="cifar"``: ``avgpool`` = global average pool, ``classifier`` = one
    ``Linear(C_last, num_classes)``. At 32×32 the features end at 1×1, so the pool is the identity
    and this is the usual CIFAR VGG head.
    ``head="imagenet"``: torchvision's head, ``AdaptiveAvgPool2d(7×7)`` + 4096-4096-classes MLP
    with dropout (about 120 M extra MACs and parameters at width 1, whatever the input size).
    """

    def __init__(self, features: nn.Module, c_last: int, num_classes: int, head: str, dropout: float,
                 hidden: int = 4096) -> None:
        nn.Module.__init__(self)  # VGG.__init__ would allocate the 512·7·7×4096 layer first
        self.features = features
        if head == "cifar":
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.classifier = nn.Linear(c_last, num_classes)
        else:
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier = nn.Sequential(nn.Linear(c_last * 7 * 7, hidden), nn.ReLU(True), nn.Dropout(p=dropout),
                                            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(p=dropout),
                                            nn.Linear(hidden, num_classes))
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)


def vgg16(num_classes: int, width: float = 1.0, head: str = "cifar", dropout: float = 0.5) -> nn.Module:
    """VGG-16 with BatchNorm (torchvision cfg "D", ``batch_norm=True``); conv widths scaled.

    ``head``: ``cifar`` (default; global-average-pool + one Linear) or ``imagenet``
    (torchvision's 7×7 pool + 4096-4096 MLP; ``dropout`` applies only to this head).
    """
    if head not in ("cifar", "imagenet"):
        raise UserError(f"unknown vgg16 head '{head}'; choose one of: cifar, imagenet")
    cfg = [v if v == "M" else scaled(int(v), width) for v in VGG16_CFG]
    features = make_layers(cfg, batch_norm=True)
    c_last = [v for v in cfg if v != "M"][-1]
    return ScaledVGG(features, int(c_last), num_classes, head=head, dropout=float(dropout))


# ------------------------------------------------------------------------------------- MobileNetV2

# t, c, n, s  (torchvision's ImageNet setting)
MOBILENETV2_SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
                       [6, 320, 1, 1]]


def mobilenetv2(num_classes: int, width: float = 1.0, cifar_strides: bool = True, dropout: float = 0.2) -> nn.Module:
    """torchvision's MobileNetV2 with ``width_mult=width``.

    ``cifar_strides=True`` (default): the stem conv (``features.0.0``) and the first stride-2
    stage (``features.2``, the 24-channel stage) get stride 1, so a 32×32 input reaches the last
    stage at 4×4 instead of 1×1 (the common CIFAR adaptation; module names and weight shapes
    are unchanged, so ImageNet weights still load). ``cifar_strides=False``: torchvision's
    strides (total stride 32). ``dropout``: before the classifier, as torchvision.
    """
    setting = [list(row) for row in MOBILENETV2_SETTING]
    if cifar_strides:
        setting[1][3] = 1
    model = MobileNetV2(num_classes=num_classes, width_mult=width, inverted_residual_setting=setting, dropout=float(dropout))
    if cifar_strides:
        model.features[0][0].stride = (1, 1)
    return model


# ----------------------------------------------------------------------------------- ConvNeXt-Tiny


def convnext_t(num_classes: int, width: float = 1.0, stochastic_depth_prob: float = 0.1, layer_scale: float = 1e-6) -> nn.Module:
    """torchvision's ConvNeXt-Tiny: stages of [3, 3, 9, 3] blocks, widths ``round8([96, 192, 384,
    768] * width)``, ``stochastic_depth_prob`` 0.1 (torchvision's value for Tiny).

    Its pointwise (1×1) convs are ``nn.Linear`` layers on channels-last tensors, so the
    analysable conv layers are the ``Conv2d`` modules only: the 4×4 stride-4 stem
    (``features.0.0``), the depthwise 7×7 conv of every block (``features.S.B.block.0``) and the
    2×2 stride-2 downsampling convs (``features.{2,4,6}.1``).
    """
    w = [scaled(c, width) for c in (96, 192, 384, 768)]
    setting = [CNBlockConfig(w[i], w[i + 1] if i < 3 else None, blocks) for i, blocks in enumerate((3, 3, 9, 3))]
    return ConvNeXt(setting, stochastic_depth_prob=float(stochastic_depth_prob), layer_scale=float(layer_scale),
                    num_classes=num_classes)


# ---------------------------------------------------------------------------------------- Registry

BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18, "vgg16": vgg16, "mobilenetv2": mobilenetv2, "convnext_t": convnext_t}

# Input side length each backbone is meant for with its default knobs (METHODS §10).
DEFAULT_IMAGE_SIZE: dict[str, int] = {"resnet18": 32, "vgg16": 32, "mobilenetv2": 32, "convnext_t": 224}


def default_image_size(name: str, **knobs: Any) -> int:
    """The input side length ``name`` is designed for with these knobs (32 for the CIFAR
    adaptations, 224 for ConvNeXt-T and for ResNet-18 with ``cifar_stem=False``)."""
    if name == "resnet18" and not knobs.get("cifar_stem", True):
        return 224
    if name == "mobilenetv2" and not knobs.get("cifar_strides", True):
        return 224
    return DEFAULT_IMAGE_SIZE.get(name, 32)
