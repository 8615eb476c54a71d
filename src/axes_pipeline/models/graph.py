"""One ``torch.fx`` trace of a network, read three ways.

Every stage that needs a backbone's data flow reads it off :func:`trace` (no per-architecture
tables), with one tracer and one catalogue of ops:

- the analysable convs and what directly follows each one (:func:`conv_graph`: norm,
  activation, residual add; METHODS §1), which :mod:`axes_pipeline.models.layers` turns into
  the layer lists;
- the cross-layer links of the propagation analysis (:func:`conv_sources`: whose output channels
  a conv reads, across residual adds, concatenations and squeeze-and-excitation products;
  METHODS §7);
- the prefix/suffix split of the lesion engine (:func:`split`: run the network up to a conv's
  output, then from it; METHODS §8).

The tracer keeps every module without children (and every norm and activation) one
``call_module`` node, so norms, activations, permutes and stochastic depth appear by their
qualified names. A network ``torch.fx`` cannot follow (data-dependent control flow) traces to
``None``; each consumer then falls back on module order.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger("axes_pipeline")

__all__ = ["NORM_TYPES", "ConvGraph", "ConvUnit", "FunctionalAct", "Tracer", "channels_last_linears", "conv_graph",
           "conv_sources", "conv_weight", "in_channels", "is_add", "is_depthwise", "out_channels", "split", "trace"]

# -------------------------------------------------------------------------------- The op catalogue

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    nn.LayerNorm,  # includes torchvision's LayerNorm2d
    nn.GroupNorm,
)

_ACT_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.Hardtanh,  # includes ReLU6
    nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.Mish, nn.PReLU,
    nn.Softplus, nn.Sigmoid, nn.Tanh,
)
#: functional activation → the function a :class:`FunctionalAct` applies (never in place)
_ACT_FUNCTIONS: dict[Any, Callable] = {
    F.relu: F.relu, torch.relu: F.relu, F.relu_: F.relu, torch.relu_: F.relu, F.relu6: F.relu6, F.gelu: F.gelu,
    F.silu: F.silu, F.hardswish: F.hardswish, F.hardtanh: F.hardtanh, F.leaky_relu: F.leaky_relu, F.elu: F.elu,
    F.mish: F.mish, torch.sigmoid: torch.sigmoid, F.sigmoid: torch.sigmoid, torch.tanh: torch.tanh,
}
_ACT_METHODS: dict[str, Callable] = {"relu": F.relu, "relu_": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}

# residual adds: torchvision's `out += identity`, `x + f(x)`, torch.add and the method forms
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")

# ops that leave values as they are (besides permutes and torchvision's StochasticDepth)
_TRANSPARENT_MODULES = (nn.Identity, nn.modules.dropout._DropoutNd)
_TRANSPARENT_METHODS = ("contiguous", "clone")
# ops that keep every channel separate (a channel's values depend on that channel only)
_CHANNELWISE_MODULES = NORM_TYPES + _ACT_MODULES + _TRANSPARENT_MODULES + (
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_CHANNELWISE_MODULE_NAMES = ("Permute", "StochasticDepth")  # torchvision.ops
_CHANNELWISE_FUNCTIONS = set(_ACT_FUNCTIONS) | {
    F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.permute,
    F.batch_norm, F.layer_norm, F.group_norm}
_CHANNELWISE_METHODS = {*_ACT_METHODS, "permute", *_TRANSPARENT_METHODS}

# squeeze-and-excitation: x * gate(x), the gate a sigmoid / hard sigmoid
_GATE_MODULES = (nn.Sigmoid, nn.Hardsigmoid)
_GATE_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid}
_MULS = {operator.mul, operator.imul, torch.mul}
_SPLITS = {"chunk", "split", "view", "reshape", "transpose", "flatten", "narrow", "unbind"}

# ----------------------------------------------------------------------------------------- Tracing


class Tracer(fx.Tracer):
    """Keeps every module without children (and every norm and activation) a single graph node;
    containers (``nn.Sequential``, ...) and modules with children are traced through. A norm must
    stay one node (torch.fx's default traces through modules outside ``torch.nn``, such as
    torchvision's ``LayerNorm2d``): the lesion hook on ``unit.norm`` fires on its call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        if isinstance(m, NORM_TYPES + _ACT_MODULES):
            return True
        return super().is_leaf_module(m, module_qualified_name) or next(m.children(), None) is None


def trace(model: nn.Module) -> fx.Graph | None:
    """The forward graph of ``model`` in its current mode, or ``None`` where ``torch.fx`` cannot
    follow the forward (logged; each consumer falls back on module order)."""
    try:
        return Tracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - any model torch.fx cannot follow
        log.warning("torch.fx could not trace %s (%s): conv units in module order, propagation links between "
                    "consecutive layers, lesions repeat the input per lesion", type(model).__name__, exc)
        return None


def _module(node: fx.Node, model: nn.Module) -> nn.Module | None:
    return model.get_submodule(str(node.target)) if node.op == "call_module" else None


def _calls(node: fx.Node, functions=(), methods=()) -> bool:
    """``node`` calls one of ``functions`` or one of the tensor ``methods``."""
    return (node.op == "call_function" and node.target in functions) or (
        node.op == "call_method" and node.target in methods)


def is_add(node: fx.Node | None) -> bool:
    """A residual add (``a + b``, ``a += b``, ``torch.add``, ``a.add(b)``, ``a.add_(b)``)."""
    return node is not None and _calls(node, _ADD_FUNCTIONS, _ADD_METHODS)


def _is_permute(node: fx.Node, model: nn.Module) -> bool:
    module = _module(node, model)
    return (type(module).__name__ == "Permute" and hasattr(module, "dims")) or _calls(node, {torch.permute}, {"permute"})


def _permute_dims(node: fx.Node, model: nn.Module) -> list[int] | None:
    """The dims of a permute node (module with ``.dims``, ``torch.permute``, ``x.permute``)."""
    if node.op == "call_module":
        dims = getattr(_module(node, model), "dims", None)
    elif node.op == "call_function":
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dims")
    else:
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    if dims is None or not all(isinstance(d, int) for d in dims):
        return None
    return list(dims)


def _is_transparent(node: fx.Node, model: nn.Module) -> bool:
    """Ops other than permutes that neither mix channels nor change values (for walking conv → norm)."""
    module = _module(node, model)
    return (isinstance(module, _TRANSPARENT_MODULES) or type(module).__name__ == "StochasticDepth"
            or _calls(node, methods=_TRANSPARENT_METHODS))


def _keeps_channels(node: fx.Node, model: nn.Module) -> bool:
    module = _module(node, model)
    return (isinstance(module, _CHANNELWISE_MODULES) or type(module).__name__ in _CHANNELWISE_MODULE_NAMES
            or _calls(node, _CHANNELWISE_FUNCTIONS, _CHANNELWISE_METHODS) or _is_scaling(node))


def _is_scaling(node: fx.Node) -> bool:
    """A product of one feature map with a parameter or a constant (ConvNeXt's layer scale
    ``gamma * x``): elementwise, so every channel stays separate."""
    return _calls(node, _MULS, {"mul", "mul_"}) and len(_tensor_inputs(node)) == 1


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [n for n in node.all_input_nodes if n.op != "get_attr"]


# -------------------------------------------------------- Convs and what follows them (METHODS §1)


def is_depthwise(conv: nn.Module) -> bool:
    """True when ``conv`` has one group per input channel (and more than one group); never for a
    ``nn.Linear`` unit."""
    groups = getattr(conv, "groups", 1)
    return groups > 1 and groups == conv.in_channels


def out_channels(module: nn.Module) -> int:
    """Output channels of a unit's module: a conv's ``out_channels``, a channels-last ``Linear``'s
    ``out_features`` (its output features are channels, METHODS §1)."""
    return int(module.out_features if isinstance(module, nn.Linear) else module.out_channels)


def in_channels(module: nn.Module) -> int:
    """Input channels of a unit's module (``in_features`` for a ``Linear``)."""
    return int(module.in_features if isinstance(module, nn.Linear) else module.in_channels)


def conv_weight(module: nn.Module) -> torch.Tensor:
    """The filters in conv layout ``[C_out, C_in/groups, kh, kw]``: a ``Linear`` is a 1×1 conv
    (``[C_out, C_in, 1, 1]``, a view of its weight)."""
    return module.weight[:, :, None, None] if isinstance(module, nn.Linear) else module.weight


@dataclass(frozen=True)
class ConvUnit:
    """One analysable conv and what directly follows it in the forward.

    ``name``: the conv's qualified name. ``norm`` / ``norm_name``: the normalisation module that
    consumes the conv output (through permutes only), or ``None``. ``act`` / ``act_name``: the
    elementwise activation after the norm (after the residual add when ``residual``), or
    ``None``. ``act_call``: which call of ``act`` (0-based) in one forward belongs to this unit.
    ``channel_dim``: the channel axis of the norm's (and activation's) output.

    ``conv`` is an ``nn.Conv2d`` or a channels-last ``nn.Linear`` (ConvNeXt's pointwise convs,
    :func:`conv_graph`): a 1×1 conv whose output ``[B, H, W, C]`` has the channels last
    (``channels_last``). ``out_channels``, ``in_channels``, ``groups``, ``kernel_size`` and
    ``weight`` (conv layout) read either the same way.
    """

    name: str
    conv: nn.Module
    norm: nn.Module | None
    norm_name: str | None
    act: nn.Module | None
    act_name: str | None
    act_call: int = 0
    residual: bool = False
    channel_dim: int = 1

    @property
    def depthwise(self) -> bool:
        return is_depthwise(self.conv)

    @property
    def channels_last(self) -> bool:
        """The unit's own output (the ``pre_bn`` tensor) is ``[B, H, W, C]``: a ``Linear`` unit."""
        return isinstance(self.conv, nn.Linear)

    @property
    def out_channels(self) -> int:
        return out_channels(self.conv)

    @property
    def in_channels(self) -> int:
        return in_channels(self.conv)

    @property
    def groups(self) -> int:
        return int(getattr(self.conv, "groups", 1))

    @property
    def kernel_size(self) -> tuple[int, int]:
        return (1, 1) if self.channels_last else tuple(self.conv.kernel_size)

    @property
    def weight(self) -> torch.Tensor:
        """``[C_out, C_in/groups, kh, kw]`` (:func:`conv_weight`)."""
        return conv_weight(self.conv)


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


@dataclass
class ConvGraph:
    """The analysable convs of a network: ``units`` by name in forward order, and ``shortcuts``:
    1×1 convs that run beside a main-path conv on the same input (ResNet's ``downsample.0``)."""

    units: dict[str, ConvUnit]
    shortcuts: set[str]


def _next_op(node: fx.Node, model: nn.Module, channel_dim: int, ndim: int = 4) -> tuple[fx.Node | None, int]:
    """The first non-transparent op fed by ``node`` alone, and the channel axis it receives.

    Returns ``(None, dim)`` where the signal branches (several users) or a permute is unreadable.
    """
    while True:
        users = list(node.users)
        if len(users) != 1:
            return None, channel_dim
        node = users[0]
        if _is_permute(node, model):
            dims = _permute_dims(node, model)
            if dims is None:
                return None, channel_dim
            channel_dim = dims.index(channel_dim % ndim)
            if channel_dim == ndim - 1:
                channel_dim = -1
        elif not _is_transparent(node, model):
            return node, channel_dim


def _activation(node: fx.Node | None, model: nn.Module) -> tuple[nn.Module | None, str | None]:
    if node is None:
        return None, None
    module = _module(node, model)
    if isinstance(module, _ACT_MODULES):
        return module, str(node.target)
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        return FunctionalAct(_ACT_FUNCTIONS[node.target], dict(node.kwargs)), None
    if node.op == "call_method" and node.target in _ACT_METHODS:
        return FunctionalAct(_ACT_METHODS[str(node.target)]), None
    return None, None


def _norm_fits(norm: nn.Module | None, channels: int) -> bool:
    """``norm`` is a norm (:data:`NORM_TYPES`) of ``channels`` channels."""
    if isinstance(norm, nn.LayerNorm):
        return tuple(norm.normalized_shape) == (channels,)
    if isinstance(norm, nn.GroupNorm):
        return norm.num_channels == channels
    return isinstance(norm, nn.modules.batchnorm._NormBase) and norm.num_features == channels


def _channels_last_input(node: fx.Node, model: nn.Module, linears: set[str]) -> bool:
    """The input of the ``nn.Linear`` call ``node`` is a feature map with its channels last.

    Walks back through ops that keep every channel separate (norms, activations, dropout): a
    permute that moves dim 1 last (``[0, 2, 3, 1]``, ConvNeXt's ``Permute`` before the block
    LayerNorm) or another channels-last Linear in ``linears`` (``pwconv1`` → GELU → ``pwconv2``)
    says yes; a flatten, a mean, a reshape (a classifier MLP: VGG's ``classifier.0``) says no."""
    x = node.args[0] if node.args else None
    seen = 0
    while isinstance(x, fx.Node) and seen < 10_000:
        seen += 1
        if _is_permute(x, model):
            dims = _permute_dims(x, model)
            return dims is not None and len(dims) == 4 and dims[-1] == 1
        if x.op == "call_module" and str(x.target) in linears:
            return True
        inputs = _tensor_inputs(x)
        if not _keeps_channels(x, model) or len(inputs) != 1:
            return False
        x = inputs[0]
    return False


def channels_last_linears(model: nn.Module, graph: fx.Graph, candidates: dict[str, nn.Module] | None = None
                          ) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules (of ``candidates``, default every one) called once on a
    channels-last feature map, in forward order (:func:`_channels_last_input`): 1×1 convs
    spelled as a ``Linear`` (METHODS §1). The classifier reads a flattened vector and never is one."""
    if candidates is None:
        candidates = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    found: dict[str, nn.Linear] = {}
    for node in graph.nodes:
        name = str(node.target)
        if (node.op == "call_module" and isinstance(candidates.get(name), nn.Linear) and calls[name] == 1
                and _channels_last_input(node, model, set(found))):
            found[name] = candidates[name]
    return found


def conv_graph(model: nn.Module, convs: dict[str, nn.Module]) -> ConvGraph:
    """The units of the convs in ``convs`` ({qualified name: conv}) that the forward calls.

    ``convs`` may hold ``nn.Linear`` modules: those called on a channels-last feature map
    (:func:`channels_last_linears`) are units whose output channels sit on the last axis; any
    other ``Linear`` is left out (a classifier MLP).

    Each conv's norm is the first op its output alone feeds (through permutes, dropout, identity),
    if that is a norm of as many channels; the activation is the op after the norm (after a
    residual add, then ``residual``), or the op after the conv when there is no norm.
    Untraceable network: module-registration order (:func:`_module_order_graph`).
    """
    graph = trace(model)
    if graph is None:  # a Linear's layout cannot be told without the graph: convs only
        return _module_order_graph(model, {n: m for n, m in convs.items() if not isinstance(m, nn.Linear)})
    linears = channels_last_linears(model, graph, {n: m for n, m in convs.items() if isinstance(m, nn.Linear)})
    convs = {n: m for n, m in convs.items() if not isinstance(m, nn.Linear) or n in linears}

    call_count: dict[str, int] = {}
    call_index: dict[fx.Node, int] = {}  # a module's n-th call in one forward
    for node in graph.nodes:
        if node.op == "call_module":
            call_index[node] = call_count.get(node.target, 0)
            call_count[node.target] = call_index[node] + 1

    units: dict[str, ConvUnit] = {}
    conv_nodes: dict[str, fx.Node] = {}
    for node in graph.nodes:
        name = str(node.target)
        if node.op != "call_module" or name not in convs or name in units:
            continue
        conv = convs[name]
        conv_nodes[name] = node
        start = -1 if isinstance(conv, nn.Linear) else 1   # the channel axis of the unit's own output
        nxt, cdim = _next_op(node, model, start)
        norm = _module(nxt, model) if nxt is not None else None
        norm = norm if _norm_fits(norm, out_channels(conv)) else None
        residual = False
        if norm is not None:
            after, _ = _next_op(nxt, model, cdim)
            if is_add(after):
                residual = True
                after, _ = _next_op(after, model, cdim)
        else:
            # no norm (AlexNet, VGG without BN, SE convs, DenseNet's convs before a concat): the
            # activation, if one directly follows the conv, is this unit's nonlinearity
            cdim, after = start, nxt
        act, act_name = _activation(after, model)
        units[name] = ConvUnit(name=name, conv=conv, norm=norm, norm_name=str(nxt.target) if norm is not None else None,
                               act=act, act_name=act_name, act_call=call_index[after] if act_name is not None else 0,
                               residual=residual, channel_dim=cdim)

    if unused := [n for n in convs if n not in units]:
        log.debug("conv modules never called in forward (not analysable): %s", unused)

    conv_calls = {n for name, n in conv_nodes.items() if isinstance(convs[name], nn.Conv2d)}
    shortcuts = {name for name, node in conv_nodes.items() if node in conv_calls and convs[name].kernel_size == (1, 1)
                 and node.args and any(u is not node and u in conv_calls and _module(u, model).kernel_size != (1, 1)
                                       for u in getattr(node.args[0], "users", {}))}
    return ConvGraph(units, shortcuts)


def _module_order_graph(model: nn.Module, convs: dict[str, nn.Conv2d]) -> ConvGraph:
    """Module-registration order: the norm is the next module registered after the conv (if it
    is a norm with as many channels), the activation the next after the norm."""
    modules = [(n, m) for n, m in model.named_modules() if next(m.children(), None) is None]
    units: dict[str, ConvUnit] = {}
    for i, (name, m) in enumerate(modules):
        if not isinstance(m, nn.Conv2d):
            continue
        norm = norm_name = act = act_name = None
        nxt = modules[i + 1][1] if i + 1 < len(modules) else None
        if _norm_fits(nxt, m.out_channels):
            norm_name, norm = modules[i + 1]
            if i + 2 < len(modules) and isinstance(modules[i + 2][1], _ACT_MODULES):
                act_name, act = modules[i + 2]
        units[name] = ConvUnit(name, m, norm, norm_name, act, act_name)
    shortcuts = {n for n, c in convs.items() if c.kernel_size == (1, 1) and ("downsample" in n or "shortcut" in n)}
    return ConvGraph(units, shortcuts)


# ------------------------------------------------------------------ Cross-layer links (METHODS §7)

#: a channel segment of a conv's input: (upstream conv, channel offset, channels)
Segment = tuple[str, int, int]


def _source_conv(node: fx.Node, model: nn.Module, convs: dict, residual: str) -> str | None:
    """The conv whose output reaches ``node`` through channel-preserving single-input ops only.

    ``residual="main"``: at a residual add, follow the block's main branch: of the summands whose
    own walk reaches a conv without meeting another add, the one with the most convs between the
    add and the block input (:func:`_branch_depth`; ties: the first). The receiver is linked to
    that branch's last conv and the shortcut is ignored, whichever order the block adds them in
    (ResNet: ``out += identity``; MobileNetV2: ``x + self.conv(x)``)."""
    seen = 0
    while isinstance(node, fx.Node) and seen < 10_000:
        seen += 1
        if node.op == "call_module" and str(node.target) in convs:
            return str(node.target)
        if residual == "main" and is_add(node):
            best, depth = None, -1
            for summand in _tensor_inputs(node):
                found = _source_conv(summand, model, convs, "skip")
                d = _branch_depth(summand, convs) if found is not None else -1
                if d > depth:
                    best, depth = found, d
            return best
        if not _keeps_channels(node, model):
            return None  # an add, a concat, a linear... : no single owner of the channels
        inputs = _tensor_inputs(node)
        if len(inputs) != 1:
            return None
        node = inputs[0]
    return None


def _branch_depth(node: fx.Node, convs: dict) -> int:
    """Convs on the single-input chain from a summand back to the block input, i.e. the first node
    with more than one user (where main branch and shortcut part). A shortcut has 0 (identity) or 1
    (a projection conv); the main branch has the block's convs (2 in a BasicBlock, 3 in an
    inverted residual)."""
    depth, seen = 0, 0
    while isinstance(node, fx.Node) and seen < 10_000:
        seen += 1
        if len(node.users) > 1:
            break
        if node.op == "call_module" and str(node.target) in convs:
            depth += 1
        inputs = _tensor_inputs(node)
        if len(inputs) != 1:
            break
        node = inputs[0]
    return depth


def _is_gate(node: fx.Node, model: nn.Module) -> bool:
    """The output of a squeeze-and-excitation gate (a sigmoid / hard sigmoid)."""
    return isinstance(_module(node, model), _GATE_MODULES) or _calls(node, _GATE_FUNCTIONS, {"sigmoid"})


def _segments(node: fx.Node, model: nn.Module, convs: dict, residual: str, depth: int = 0) -> list[Segment] | str:
    """The upstream convs of the channels at ``node``: ``[(conv, offset, channels)]`` in channel
    order, or a one-line reason why they cannot be told apart.

    Walks back like :func:`_source_conv`, and also through a channel concatenation (DenseNet,
    GoogLeNet, Inception: one segment per concatenated input, at its channel offset) and a
    squeeze-and-excitation product ``x * gate(x)`` (EfficientNet, MobileNetV3, RegNetY: the gate
    rescales each channel of ``x`` and is followed no further)."""
    seen = 0
    while isinstance(node, fx.Node) and seen < 10_000 and depth < 200:
        seen += 1
        if node.op == "call_module" and str(node.target) in convs:
            return [(str(node.target), 0, out_channels(convs[str(node.target)]))]
        if is_add(node):
            if residual != "main":
                return "a residual add joins two branches (propagation.residual=skip)"
            src = _source_conv(node, model, convs, residual)
            return [(src, 0, out_channels(convs[src]))] if src else "a residual add with no conv branch"
        if node.op == "call_function" and node.target is torch.cat:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if dim not in (1, -3):
                return f"a concatenation along dim {dim}"
            out, off = [], 0
            for part in node.args[0]:
                sub = _segments(part, model, convs, residual, depth + 1)
                if isinstance(sub, str):
                    return f"a concatenated input ({sub})"
                out += [(conv, off + o, c) for conv, o, c in sub]
                off += sum(c for _, _, c in sub)
            return out
        if _calls(node, _MULS, {"mul", "mul_"}):
            inputs = [n for n in _tensor_inputs(node) if not _is_gate(n, model)]
            if len(inputs) != 1 or len(_tensor_inputs(node)) > 2:  # 1 input: a layer scale (_is_scaling)
                return "a product of two feature maps"
            node = inputs[0]
            continue
        what = getattr(node.target, "__name__", node.target)
        if node.op in ("call_method", "call_function") and str(what) in _SPLITS:
            return f"a channel split/shuffle ({what})"
        if not _keeps_channels(node, model):
            return f"an op that mixes or reshapes channels ({what})"
        inputs = _tensor_inputs(node)
        if len(inputs) != 1:
            return "an op with several inputs"
        node = inputs[0]
    return "no conv found upstream"


def conv_sources(model: nn.Module, graph: fx.Graph, receivers, residual: str
                 ) -> list[tuple[str, list[Segment] | str | None]]:
    """Whose output channels each call of a conv in ``receivers`` reads, in forward order.

    One entry ``(receiver, sources)`` per call: ``sources`` is ``[(conv, offset, channels)]``
    (input channels ``offset .. offset + channels`` are that conv's outputs; :func:`_segments`),
    a one-line reason why they have no single upstream conv each, or ``None`` when the input is
    the network input (or reaches no conv). ``residual``: ``"main"`` follows a residual add's
    main branch (:func:`_source_conv`), ``"skip"`` stops there.
    """
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    convs.update(channels_last_linears(model, graph))
    out: list[tuple[str, list[Segment] | str | None]] = []
    for node in graph.nodes:
        down = str(node.target) if node.op == "call_module" else None
        if down not in receivers or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        segs = _segments(node.args[0], model, convs, residual)
        if isinstance(segs, str) and (node.args[0].op == "placeholder" or segs == "no conv found upstream"):
            segs = None
        out.append((down, segs))
    return out


# -------------------------------------------------------- Prefix and suffix of a conv (METHODS §8)


def split(model: nn.Module, graph: fx.Graph, conv_name: str) -> tuple[fx.GraphModule, fx.GraphModule] | None:
    """(prefix, suffix) of ``graph`` cut at the one call of module ``conv_name``; ``None`` when
    the conv is called other than once or its output does not cross the cut.

    The prefix holds every node that does not depend on the conv output (the conv itself
    included), the suffix every node that does: ``prefix(x)`` returns the tuple of values that
    cross the cut, ``suffix(*those)`` the model's output, and ``suffix.cut_index`` is the conv
    output's place in that tuple. Both share ``model``'s modules and parameters. The cut keeps the
    graph's order, so it assumes no prefix op mutates in place a tensor that a suffix op had read
    before it.
    """
    calls = [n for n in graph.nodes if n.op == "call_module" and str(n.target) == conv_name]
    if len(calls) != 1:
        return None
    cut = calls[0]
    after: set[fx.Node] = set()  # strict descendants of the cut
    for node in graph.nodes:
        if node.op != "output" and any(a is cut or a in after for a in node.all_input_nodes):
            after.add(node)
    output = next(n for n in graph.nodes if n.op == "output")
    consumers = after | {output}
    crossing = [n for n in graph.nodes if n not in after and any(u in consumers for u in n.users)]
    attrs = [n for n in crossing if n.op == "get_attr"]
    boundary = [n for n in crossing if n.op != "get_attr"]  # the output node has no users
    if cut not in boundary:
        return None

    pre = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node not in after and node.op != "output":
            env[node] = pre.node_copy(node, lambda a: env[a])
    pre.output(tuple(env[b] for b in boundary))

    post = fx.Graph()
    env = {b: post.placeholder(f"cut_{i}") for i, b in enumerate(boundary)}
    for node in attrs:
        env[node] = post.node_copy(node, lambda a: env[a])
    for node in graph.nodes:
        if node in after or node.op == "output":
            env[node] = post.node_copy(node, lambda a: env[a])
    prefix, suffix = fx.GraphModule(model, pre), fx.GraphModule(model, post)
    suffix.cut_index = boundary.index(cut)  # type: ignore[attr-defined]
    return prefix, suffix
