"""The analysable conv layers of a backbone, and what follows each conv (norm, activation).

Everything here is read off a ``torch.fx`` trace of the model (no per-architecture tables):
every ``nn.Conv2d`` that the forward calls is an analysable layer (METHODS §1; the classifier is
an ``nn.Linear`` and never is). Names are the modules' qualified names (``layer1.0.conv1``), so
they are the same in every build of the same backbone and match ``model.get_submodule(name)``.

What the capture stage hooks, per :class:`ConvUnit`:

- ``pre_bn``: forward hook on ``unit.conv`` (its output ``[B, C, H, W]``).
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

import logging
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from axes_pipeline.errors import UserError

log = logging.getLogger(__name__)

__all__ = [
    "CAPTURE_POINTS",
    "ConvUnit",
    "FunctionalAct",
    "analysable_layers",
    "capture_point",
    "classifier_name",
    "conv_layers",
    "conv_norm_pairs",
    "depth_spaced_layers",
    "example_input",
    "is_depthwise",
]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    nn.LayerNorm,  # includes torchvision's LayerNorm2d
    nn.GroupNorm,
)

_ACT_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.Hardtanh,  # includes ReLU6
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.Mish,
    nn.PReLU,
    nn.Softplus,
    nn.Sigmoid,
    nn.Tanh,
)

_ACT_FUNCTIONS: dict[Any, Callable] = {
    F.relu: F.relu,
    torch.relu: F.relu,
    F.relu_: F.relu,
    torch.relu_: F.relu,
    F.relu6: F.relu6,
    F.gelu: F.gelu,
    F.silu: F.silu,
    F.hardswish: F.hardswish,
    F.hardtanh: F.hardtanh,
    F.leaky_relu: F.leaky_relu,
    F.elu: F.elu,
    F.mish: F.mish,
    torch.sigmoid: torch.sigmoid,
    F.sigmoid: torch.sigmoid,
    torch.tanh: torch.tanh,
}
_ACT_METHODS: dict[str, Callable] = {
    "relu": F.relu,
    "relu_": F.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")


@dataclass(frozen=True)
class ConvUnit:
    """One analysable conv and what directly follows it in the forward.

    ``name``: the conv's qualified name. ``norm`` / ``norm_name``: the normalisation module that
    consumes the conv output (through permutes only), or ``None``. ``act`` / ``act_name``: the
    elementwise activation after the norm (after the residual add when ``residual``), or
    ``None``. ``act_call``: which call of ``act`` (0-based) in one forward belongs to this unit.
    ``channel_dim``: the channel axis of the norm's (and activation's) output.
    """

    name: str
    conv: nn.Conv2d
    norm: nn.Module | None
    norm_name: str | None
    act: nn.Module | None
    act_name: str | None
    act_call: int = 0
    residual: bool = False
    channel_dim: int = 1

    @property
    def depthwise(self) -> bool:
        """True for a depthwise conv (one group per input channel)."""
        return is_depthwise(self.conv)


class FunctionalAct(nn.Module):
    """A functional activation found in a forward (``F.relu(x)``), wrapped as a module.

    Not part of the model; ``act_name`` is ``None`` for it. Calling it never works in place.
    """

    def __init__(self, fn: Callable, kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.fn = fn
        self.kwargs = {k: v for k, v in (kwargs or {}).items() if k != "inplace"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, **self.kwargs)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


#: Labels of :func:`capture_point` (the ``capture_point`` column of axes.csv, METHODS §1).
CAPTURE_POINTS = ("pre_bn", "pre_ln", "pre_gn", "pre_in", "post_bn", "post_ln", "post_gn", "post_in",
                  "post_act", "conv_act", "conv_out")


def _norm_kind(norm: nn.Module) -> str:
    if isinstance(norm, nn.GroupNorm):
        return "gn"
    if isinstance(norm, nn.LayerNorm):
        return "ln"
    if isinstance(norm, nn.modules.instancenorm._InstanceNorm):
        return "in"
    return "bn"


def capture_point(unit: "ConvUnit", point: str) -> str:
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


def is_depthwise(conv: nn.Conv2d) -> bool:
    """True when ``conv`` has one group per input channel (and more than one group)."""
    return conv.groups > 1 and conv.groups == conv.in_channels


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


# --------------------------------------------------------------------------------------------
# Tracing
# --------------------------------------------------------------------------------------------


class LeafTracer(fx.Tracer):
    """Keeps every module without children (and every norm) a single graph node, so norms,
    activations, permutes and stochastic depth appear as ``call_module`` nodes by name."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        if isinstance(m, NORM_TYPES + _ACT_MODULES):
            return True
        return super().is_leaf_module(m, module_qualified_name) or next(m.children(), None) is None


def _trace(model: nn.Module) -> fx.Graph | None:
    try:
        return LeafTracer().trace(model)
    except Exception as exc:  # any model torch.fx cannot follow: fall back to module order
        log.warning("torch.fx could not trace %s (%s); using module order", type(model).__name__, exc)
        return None


def _permute_dims(node: fx.Node, model: nn.Module) -> list[int] | None:
    """The dims of a permute node (module with ``.dims``, ``torch.permute``, ``x.permute``)."""
    if node.op == "call_module":
        dims = getattr(model.get_submodule(str(node.target)), "dims", None)
    elif node.op == "call_function" and node.target is torch.permute:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dims")
    elif node.op == "call_method" and node.target == "permute":
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    else:
        return None
    if dims is None or not all(isinstance(d, int) for d in dims):
        return None
    return list(dims)


def _is_permute(node: fx.Node, model: nn.Module) -> bool:
    if node.op == "call_module":
        module = model.get_submodule(str(node.target))
        return type(module).__name__ == "Permute" and hasattr(module, "dims")
    return (node.op == "call_function" and node.target is torch.permute) or (
        node.op == "call_method" and node.target == "permute"
    )


def _is_transparent(node: fx.Node, model: nn.Module) -> bool:
    """Ops that neither mix channels nor change values per channel (for walking conv → norm)."""
    if _is_permute(node, model):
        return True
    if node.op == "call_module":
        module = model.get_submodule(str(node.target))
        return isinstance(module, (nn.Identity, nn.modules.dropout._DropoutNd)) or type(module).__name__ == (
            "StochasticDepth"
        )
    if node.op == "call_method":
        return node.target in ("contiguous", "clone")
    return False


def _next_op(node: fx.Node, model: nn.Module, channel_dim: int, ndim: int = 4) -> tuple[fx.Node | None, int]:
    """The first non-transparent op fed by ``node`` alone, and the channel axis it receives.

    Returns ``(None, dim)`` where the signal branches (several users) or a permute is unreadable.
    """
    while True:
        users = list(node.users)
        if len(users) != 1:
            return None, channel_dim
        node = users[0]
        if not _is_transparent(node, model):
            return node, channel_dim
        if _is_permute(node, model):
            dims = _permute_dims(node, model)
            if dims is None:
                return None, channel_dim
            channel_dim = dims.index(channel_dim % ndim)
            if channel_dim == ndim - 1:
                channel_dim = -1


def _module(node: fx.Node | None, model: nn.Module, types: tuple[type[nn.Module], ...]) -> nn.Module | None:
    if node is None or node.op != "call_module":
        return None
    module = model.get_submodule(str(node.target))
    return module if isinstance(module, types) else None


def _activation(node: fx.Node | None, model: nn.Module) -> tuple[nn.Module | None, str | None]:
    if node is None:
        return None, None
    module = _module(node, model, _ACT_MODULES)
    if module is not None:
        return module, str(node.target)
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        return FunctionalAct(_ACT_FUNCTIONS[node.target], dict(node.kwargs)), None
    if node.op == "call_method" and node.target in _ACT_METHODS:
        return FunctionalAct(_ACT_METHODS[str(node.target)]), None
    return None, None


def _is_add(node: fx.Node | None) -> bool:
    if node is None:
        return False
    return (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ADD_METHODS
    )


@dataclass
class _GraphInfo:
    order: list[str]  # analysable convs, forward order
    units: dict[str, ConvUnit]
    shortcuts: set[str]  # 1×1 convs that run beside a main-path conv on the same input


def _graph_info(model: nn.Module) -> _GraphInfo:
    head = classifier_name(model)  # a conv classifier (SqueezeNet) gives class scores, not features
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and name != head}
    graph = _trace(model)
    if graph is None:
        return _fallback_info(model, convs)

    call_count: dict[str, int] = {}
    call_index: dict[fx.Node, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            target = str(node.target)
            call_index[node] = call_count.get(target, 0)
            call_count[target] = call_index[node] + 1

    order: list[str] = []
    units: dict[str, ConvUnit] = {}
    conv_nodes: dict[str, fx.Node] = {}
    for node in graph.nodes:
        if node.op != "call_module" or str(node.target) not in convs or str(node.target) in units:
            continue
        name = str(node.target)
        conv = convs[name]
        conv_nodes[name] = node
        nxt, cdim = _next_op(node, model, 1)
        norm = _module(nxt, model, NORM_TYPES)
        if norm is not None and not _norm_fits(norm, conv.out_channels):
            norm = None
        norm_name = str(nxt.target) if norm is not None else None
        act, act_name, act_call, residual = None, None, 0, False
        if norm is not None:
            after, cdim_after = _next_op(nxt, model, cdim)
            if _is_add(after):
                residual = True
                after, cdim_after = _next_op(after, model, cdim_after)
            act, act_name = _activation(after, model)
            if act is not None and act_name is not None:
                act_call = call_index[after]
        else:
            # no norm (AlexNet, VGG without BN, SE convs, DenseNet's convs before a concat): the
            # activation, if one directly follows the conv, is this unit's nonlinearity
            cdim = 1
            act, act_name = _activation(nxt, model)
            if act is not None and act_name is not None:
                act_call = call_index[nxt]
        units[name] = ConvUnit(
            name=name,
            conv=conv,
            norm=norm,
            norm_name=norm_name,
            act=act,
            act_name=act_name,
            act_call=act_call,
            residual=residual,
            channel_dim=cdim,
        )
        order.append(name)

    unused = [n for n in convs if n not in units]
    if unused:
        log.debug("conv modules never called in forward (not analysable): %s", unused)

    shortcuts: set[str] = set()
    for name, node in conv_nodes.items():
        if convs[name].kernel_size != (1, 1) or not node.args:
            continue
        source = node.args[0]
        siblings = [u for u in getattr(source, "users", {}) if u is not node and u in conv_nodes.values()]
        if any(_kernel_area(model.get_submodule(str(u.target))) > 1 for u in siblings):
            shortcuts.add(name)
    return _GraphInfo(order=order, units=units, shortcuts=shortcuts)


def _kernel_area(conv: nn.Module) -> int:
    k = getattr(conv, "kernel_size", (1, 1))
    return int(k[0]) * int(k[1])


def _norm_fits(norm: nn.Module, channels: int) -> bool:
    if isinstance(norm, nn.modules.batchnorm._NormBase):
        return norm.num_features == channels
    if isinstance(norm, nn.LayerNorm):
        return tuple(norm.normalized_shape) == (channels,)
    if isinstance(norm, nn.GroupNorm):
        return norm.num_channels == channels
    return False


def _fallback_info(model: nn.Module, convs: dict[str, nn.Conv2d]) -> _GraphInfo:
    """Module-registration order: the norm is the next module registered after the conv (if it
    is a norm with as many channels), the activation the next after the norm."""
    modules = [(n, m) for n, m in model.named_modules() if next(m.children(), None) is None]
    units: dict[str, ConvUnit] = {}
    for i, (name, m) in enumerate(modules):
        if not isinstance(m, nn.Conv2d):
            continue
        norm = norm_name = act = act_name = None
        if i + 1 < len(modules) and isinstance(modules[i + 1][1], NORM_TYPES):
            if _norm_fits(modules[i + 1][1], m.out_channels):
                norm_name, norm = modules[i + 1]
                if i + 2 < len(modules) and isinstance(modules[i + 2][1], _ACT_MODULES):
                    act_name, act = modules[i + 2]
        units[name] = ConvUnit(name, m, norm, norm_name, act, act_name)
    shortcuts = {
        n for n, c in convs.items() if c.kernel_size == (1, 1) and ("downsample" in n or "shortcut" in n)
    }
    return _GraphInfo(order=list(units), units=units, shortcuts=shortcuts)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def conv_layers(model: nn.Module) -> dict[str, nn.Conv2d]:
    """Every ``nn.Conv2d`` the forward calls, in forward order, keyed by qualified name."""
    info = _graph_info(model)
    return {name: info.units[name].conv for name in info.order}


def analysable_layers(model: nn.Module, include_depthwise: bool = True) -> dict[str, nn.Conv2d]:
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
    info = _graph_info(model)
    return {name: info.units[name] for name in info.order}


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
    info = _graph_info(model)
    names = [
        n
        for n in info.order
        if (include_shortcuts or n not in info.shortcuts)
        and (include_depthwise or not is_depthwise(info.units[n].conv))
    ]
    if not names:
        names = list(info.order)
    if len(names) <= k:
        return names
    if k == 1:
        return [names[-1]]
    picks = [round(i * (len(names) - 1) / (k - 1)) for i in range(k)]
    return [names[i] for i in picks]


def example_input(
    spec: int | tuple[int, ...] | list[int] | Mapping[str, Any],
    batch: int = 1,
    *,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """A dummy image batch ``[batch, C, H, W]`` (seeded standard normal), for FLOP counting and
    dependency graphs.

    ``spec``: an image side (``32``), ``(H, W)``, ``(C, H, W)``, or a config mapping with
    ``image_size`` (int or ``[H, W]``; optional ``in_channels``/``channels``), or a model config
    with ``name`` (and knobs), which gives that backbone's default input size (32 for the CIFAR
    adaptations, 224 for ConvNeXt-T and ResNet-18 with ``cifar_stem: false``).
    """
    from axes_pipeline.models.backbones import default_image_size

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
    if isinstance(size, int):
        hw = (int(size), int(size))
    else:
        dims = [int(d) for d in size]
        if len(dims) == 3:
            channels, dims = dims[0], dims[1:]
        if len(dims) != 2:
            raise UserError(f"example_input: image size must be H, (H, W) or (C, H, W), got {size!r}")
        hw = (dims[0], dims[1])
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *hw, generator=gen)
    return x.to(device) if device is not None else x
