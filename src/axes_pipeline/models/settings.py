"""The typed ``model`` config: one dataclass per backbone family, the one source of its defaults.

``conf/model/<name>.yaml`` selects the schema (``base_model_<name>``). Every option is a partial
call of :func:`axes_pipeline.models.build_model` (``num_classes`` is bound later from the
datamodule); ``recipe`` is the backbone's training recipe (METHODS §10), read by conf/optim, where
a dataset's recipe may override it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from axes_pipeline.bounds import fraction, positive


@dataclass
class ModelRecipe:
    optimizer: str = "sgd"
    lr: float = MISSING
    weight_decay: float = 5.0e-4


@dataclass
class ModelConfig:
    """The knobs every backbone takes (:func:`~axes_pipeline.models.build_model`)."""

    _target_: str = "axes_pipeline.models.build_model"
    _partial_: bool = True
    name: str = MISSING
    width: float = positive(1.0)             # channel multiplier (each family's rounding: its dataclass)
    # true: torchvision's ImageNet weights (hub cache; downloaded on first use), or `weights`
    pretrained: bool = False
    weights: str | None = None  # path to a local state_dict / torchvision .pth (implies pretrained)
    recipe: ModelRecipe = MISSING
    # experiment=dynamics: pretrained weights become a one-line error instead of a silently different H2
    from_scratch: bool = False


@dataclass
class ResNet18Model(ModelConfig):
    """ResNet-18 (torchvision ResNet/BasicBlock); width: round8([64, 128, 256, 512] * width)."""

    name: str = "resnet18"
    cifar_stem: bool = True    # 3x3 stride-1 stem, no max-pool (32x32); false: ImageNet 7x7/2 stem + max-pool (224)
    recipe: ModelRecipe = field(default_factory=lambda: ModelRecipe(lr=0.1))


@dataclass
class VGG16Model(ModelConfig):
    """VGG-16-BN (torchvision cfg "D", batch_norm=True); width on every conv: round8(c * width)."""

    name: str = "vgg16"
    # cifar: global-avg-pool + Linear(C_last, classes); imagenet: torchvision's 7x7 pool + 4096-4096 MLP
    head: str = "cifar"
    dropout: float = fraction(0.5, hi_open=True)       # imagenet head only
    recipe: ModelRecipe = field(default_factory=lambda: ModelRecipe(lr=0.05))


@dataclass
class MobileNetV2Model(ModelConfig):
    """MobileNetV2 (torchvision, width_mult = width: channels rounded to multiples of 8)."""

    name: str = "mobilenetv2"
    cifar_strides: bool = True  # stride 1 in the stem and the first stride-2 stage (32x32 inputs); false: torchvision's
    dropout: float = fraction(0.2, hi_open=True)        # before the classifier, as torchvision
    recipe: ModelRecipe = field(default_factory=lambda: ModelRecipe(lr=0.01))


@dataclass
class ConvNeXtTModel(ModelConfig):
    """ConvNeXt-Tiny (torchvision); width: round8([96, 192, 384, 768] * width). Analysable convs: stem,
    depthwise 7x7, downsampling (its 1x1s are nn.Linear)."""

    name: str = "convnext_t"
    stochastic_depth_prob: float = fraction(0.1, hi_open=True)   # torchvision's value for Tiny
    layer_scale: float = positive(1.0e-6)
    recipe: ModelRecipe = field(default_factory=lambda: ModelRecipe(optimizer="adam", lr=1.0e-3, weight_decay=1.0e-4))


@dataclass
class TorchvisionModel(ModelConfig):
    """Any torchvision classification CNN: model=torchvision model.arch=<name> (resnet50, densenet121,
    efficientnet_b0, ... see the family table in docs/usage.md). The name carries the arch so that run
    directories of two archs never collide; width where the family has a multiplier (README "Any
    CNN"), 1.0 elsewhere; weights may also be a torchvision tag (IMAGENET1K_V2)."""

    name: str = "tv_${.arch}"
    arch: str = "resnet50"
    recipe: ModelRecipe = field(default_factory=lambda: ModelRecipe(lr=0.05))


@dataclass
class CustomModel(ModelConfig):
    """A user's own nn.Module: model=custom model.net._target_=my_pkg.MyNet [+model.net.<kwarg>=...]
    (plus ckpt=PATH or model.weights=PATH for its trained weights). my_pkg must be importable
    (PYTHONPATH). num_classes is passed when the constructor takes it. width: keep 1.0 (no known
    multiplier); weights: a state_dict of this network."""

    name: str = "custom_${.net._target_}"
    # required: net._target_, the class (or function returning an nn.Module); its kwargs beside it
    net: dict[str, Any] = field(default_factory=lambda: {"_target_": None})
    recipe: ModelRecipe = field(default_factory=lambda: ModelRecipe(lr=0.05))


#: option name (conf/model/<name>.yaml) -> its schema, stored as ``model/base_model_<name>``
MODELS: dict[str, type[ModelConfig]] = {
    "resnet18": ResNet18Model, "vgg16": VGG16Model, "mobilenetv2": MobileNetV2Model, "convnext_t": ConvNeXtTModel,
    "torchvision": TorchvisionModel, "custom": CustomModel,
}
