"""Coupled channels from Torch-Pruning's dependency graph, masks, and physical pruning.

A *group* is a set of output channels that must be removed together: a conv and everything
its output channels reach (its BatchNorm, the residual adds that tie several convs to one
stream, the depthwise conv that follows an expansion conv, the input channels of the
consumers). Groups come from ``torch_pruning.DependencyGraph`` (no per-architecture tables).
Each group is indexed by its *root* channels (the output channels of its root module); a
state of the network is one boolean keep mask per group, ``keep[g]: [size_g]``.

Which groups can be pruned: those whose out-channels include at least one analysable unit (an
``nn.Conv2d`` or a channels-last ``nn.Linear``; the units carry the scores). ConvNeXt's MLP
hidden features (``pwconv1`` out, ``pwconv2`` in) are such a group, scored by ``pwconv1``. The
classifier's outputs are never pruned; groups whose out-members are no unit stay whole.

Grouped convolutions that are not depthwise (ResNeXt, RegNet): Torch-Pruning's conv pruner
indexes a grouped conv's weight ``[C_out, C_in/groups, k, k]`` with network-wide channel indices
and fails; removing channels there would need the same count removed from every conv group.
Every channel group that enters or leaves such a conv is therefore kept whole (``frozen``) and
the conv is listed in :attr:`GroupSet.refused` with the reason, which the pruning outputs carry.
Pooling and other parameter-free modules (an SE block's pool) are recorded as ``"elem"``
members, so the MAC model knows which channels they run over.

Torch-Pruning fact that matters here (checked with torch-pruning 1.6.0): the classifier must be
*traced* (not in ``build_dependency(ignored_layers=...)``), only excluded as a group root;
ignoring it while tracing makes the flatten index mapping of the last group wrong (indices
beyond the channel count).
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from axes_pipeline.errors import UserError
from axes_pipeline.models import classifier_name, conv_layers
from axes_pipeline.models.modes import eval_mode

log = logging.getLogger("axes_pipeline")

__all__ = ["ChannelGroup", "GroupSet", "Member", "build_groups", "full_keep", "masked", "prune_physically"]


@dataclass
class Member:
    """One module dimension inside a group."""

    module: str        # qualified module name
    dim: str           # "out" (output channels; a depthwise conv's input is tied to them), "in" or "elem"
    idxs: np.ndarray   # [m] the member's channel indices
    root: np.ndarray   # [m] the group root channel each one belongs to


@dataclass
class ChannelGroup:
    """Coupled output channels, indexed by the root module's output channels ``0..size-1``; only a
    group with a conv member is pruned."""

    name: str
    size: int
    members: list[Member]
    convs: list[str]                    # the conv layers whose output channels are in the group
    depthwise: list[str]                # the depthwise ones among them
    channel_of: dict[str, np.ndarray]   # conv -> [size]: the conv channel of every root channel


@dataclass
class GroupSet:
    """All groups of a backbone (prunable first, in forward order of their first conv)."""

    groups: list[ChannelGroup]
    classifier: str
    input_shape: tuple[int, ...]
    head_group: int | None = None   # the group whose channels enter the classifier
    frozen: list[ChannelGroup] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # conv -> one-line reason it is never pruned

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def sizes(self) -> np.ndarray:
        return np.array([g.size for g in self.groups], dtype=np.int64)


def full_keep(groups: GroupSet) -> list[np.ndarray]:
    """The unpruned state: every channel of every group kept."""
    return [np.ones(g.size, dtype=bool) for g in groups.groups]


# --- Building the groups ---
def _trace_graph(model: nn.Module, example: torch.Tensor):
    """DependencyGraph of ``model``; a tracing failure names the layer it happened in."""
    import torch_pruning as tp

    names = {m: n for n, m in model.named_modules()}
    stack: list[str] = []
    # grad_fn of a parameter-free module's output -> its name: Torch-Pruning sees pools and
    # activations only as autograd nodes, and the MAC model needs to know their channels
    by_grad_fn: dict = {}

    def pre(m, _inp):
        stack.append(names.get(m, type(m).__name__))

    def post(m, _inp, out):
        if stack:
            stack.pop()
        if isinstance(out, torch.Tensor) and out.grad_fn is not None and next(m.parameters(), None) is None \
                and next(m.children(), None) is None:
            by_grad_fn.setdefault(out.grad_fn, names.get(m))

    finished: list[bool] = []
    hooks = [h for m in model.modules() for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    hooks.append(model.register_forward_hook(lambda *_: finished.append(True)))
    try:
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    except Exception as err:  # noqa: BLE001 - any tracing failure is a model the pipeline cannot prune
        if finished:  # the forward ran: the failure is in mapping channels through reshapes
            raise UserError(
                f"the dependency graph cannot map the channels of {type(model).__name__} through its "
                f"reshapes ({type(err).__name__}: {str(err).splitlines()[0][:120]}; a view that regroups "
                "channels, such as ShuffleNet's channel shuffle, is the usual cause); this backbone cannot be pruned"
            ) from None
        failed = [s for s in stack if s] or ["<model forward>"]
        raise UserError(
            f"the dependency graph cannot trace {type(model).__name__} at layer '{failed[-1]}' "
            f"({type(err).__name__}: {str(err).splitlines()[0][:160]}); this backbone cannot be pruned"
        ) from None
    finally:
        for h in hooks:
            h.remove()
    dg.axes_by_grad_fn = by_grad_fn
    return dg


def _grouped(mod: nn.Module) -> bool:
    """A grouped conv that is not depthwise (see the module docstring)."""
    g = getattr(mod, "groups", 1)
    return isinstance(mod, nn.Conv2d) and g > 1 and not (g == mod.in_channels == mod.out_channels)


def build_groups(model: nn.Module, example: torch.Tensor, classifier: str | None = None,
                 conv_names: list[str] | None = None) -> GroupSet:
    """Trace ``model`` on ``example: [1, C, H, W]`` and return its coupled channel groups.

    ``classifier``: qualified name of the classifier (default: the last ``nn.Linear``);
    ``conv_names``: the analysable units (default: every ``nn.Conv2d`` the forward calls and every
    channels-last ``nn.Linear``, :func:`~axes_pipeline.models.conv_layers`). A unit that the graph
    does not reach is a :class:`UserError` naming the layer.
    """
    with eval_mode(model):
        classifier = classifier or classifier_name(model)
        conv_names = list(conv_names if conv_names is not None else conv_layers(model))
        dg = _trace_graph(model, example)
        clf = model.get_submodule(classifier)
        names = dg._module2name
        by_grad_fn = getattr(dg, "axes_by_grad_fn", {})
        refused: dict[str, str] = {}
        missing = [n for n in conv_names if model.get_submodule(n) not in dg.module2node]
        if missing:
            raise UserError(f"the dependency graph cannot trace layer '{missing[0]}' of "
                            f"{type(model).__name__} (it is not called as a module in the forward); "
                            f"this backbone cannot be pruned")
        conv_set = set(conv_names)
        groups: list[ChannelGroup] = []
        frozen: list[ChannelGroup] = []
        for grp in dg.get_all_groups(ignored_layers=[clf], root_module_types=(nn.Conv2d, nn.Linear)):
            root_mod = grp[0].dep.target.module
            size = int(dg.get_out_channels(root_mod))
            members: list[Member] = []
            convs, dws, channel_of = [], [], {}
            blocked = None
            for item in grp:
                dep = item.dep
                mod = dep.target.module
                idxs = np.asarray([int(i) for i in item.idxs], dtype=np.int64)
                root = np.asarray([int(i) for i in item.root_idxs], dtype=np.int64)
                if not isinstance(mod, nn.Module) or mod not in names:
                    op_name = by_grad_fn.get(getattr(dep.target, "grad_fn", None))
                    if op_name is not None and dg.is_out_channel_pruning_fn(dep.handler):
                        members.append(Member(op_name, "elem", idxs, root))
                    continue  # functional ops, unwrapped parameters: pruned along, no cost of their own
                name = names[mod]
                if _grouped(mod) and blocked is None:
                    blocked = name
                if dg.is_out_channel_pruning_fn(dep.handler):
                    dim = "out"
                elif dg.is_in_channel_pruning_fn(dep.handler):
                    dim = "in"
                else:
                    continue
                members.append(Member(name, dim, idxs, root))
                if dim == "out" and name in conv_set:
                    ch = np.full(size, -1, dtype=np.int64)
                    ch[root] = idxs
                    if (ch < 0).any():
                        raise UserError(f"layer '{name}' maps only part of group '{names[root_mod]}'; "
                                        f"this coupling is not supported")
                    convs.append(name)
                    channel_of[name] = ch
                    if getattr(mod, "groups", 1) > 1:
                        dws.append(name)
            g = ChannelGroup(names[root_mod], size, members, convs, dws, channel_of)
            if blocked is not None:
                conv = model.get_submodule(blocked)
                for c in convs:
                    refused.setdefault(c, f"channels reach grouped conv {blocked} (groups={conv.groups}), which "
                                          "Torch-Pruning cannot prune channel by channel; kept whole")
            (groups if g.convs and blocked is None else frozen).append(g)
        seen = {c for g in groups for c in g.convs} | set(refused)
        lost = [n for n in conv_names if n not in seen]
        if lost:
            raise UserError(f"the dependency graph cannot place layer '{lost[0]}' of "
                            f"{type(model).__name__} in a pruning group; this backbone cannot be pruned")
        order = {n: i for i, n in enumerate(conv_names)}
        groups.sort(key=lambda g: min(order[c] for c in g.convs))
        head = max((i for i, g in enumerate(groups) if any(m.module == classifier and m.dim == "in" for m in g.members)),
                   default=None)
        if refused:
            log.warning("pruning: %d conv layers kept whole: %s", len(refused),
                        "; ".join(f"{k}: {v}" for k, v in list(refused.items())[:3]))
        return GroupSet(groups, classifier, tuple(example.shape), head, frozen, refused)


# --- Masked model (reference) and physical pruning ---
def _channel_dim(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return -1
    if isinstance(module, nn.LayerNorm):
        return 1 if type(module).__name__ == "LayerNorm2d" else -1
    return 1


def _shape_mask(mask: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return mask.view(shape)


@contextmanager
def masked(model: nn.Module, groups: GroupSet, keep: list[np.ndarray]):
    """``with masked(model, groups, keep):`` zero the removed channels of ``model`` in place of
    removing them (a reference model).

    Every out-member of a group has its output multiplied by the keep mask; a LayerNorm over a
    pruned group normalises over the kept channels only (so the result equals the physically
    pruned network, LayerNorm backbones included). Hooks are removed on exit.
    """
    handles = []
    try:
        for g, k in zip(groups.groups, keep):
            for m in g.members:
                if m.dim == "out" and not k.all():
                    mod = model.get_submodule(m.module)
                    mk = torch.ones(_member_size(mod))
                    mk[torch.as_tensor(m.idxs)] = torch.as_tensor(k[m.root], dtype=torch.float32)
                    handles.append(mod.register_forward_hook(_mask_hook(mod, mk)))
        yield model
    finally:
        for h in handles:
            h.remove()


def _member_size(mod: nn.Module) -> int:
    if isinstance(mod, nn.Conv2d):
        return mod.out_channels
    if isinstance(mod, nn.Linear):
        return mod.out_features
    if isinstance(mod, nn.LayerNorm):
        return int(mod.normalized_shape[0])
    if hasattr(mod, "num_features"):
        return int(mod.num_features)
    raise TypeError(f"cannot mask {type(mod).__name__}")


def _mask_hook(mod: nn.Module, mask: torch.Tensor):
    dim = _channel_dim(mod)
    if isinstance(mod, nn.LayerNorm):
        def hook(m, inputs, out):
            x = inputs[0]
            d = dim % x.ndim
            mk = _shape_mask(mask.to(x), x.ndim, d)
            k = mk.sum()
            mean = (x * mk).sum(d, keepdim=True) / k
            var = (((x - mean) * mk) ** 2).sum(d, keepdim=True) / k
            y = (x - mean) / torch.sqrt(var + m.eps)
            if m.weight is not None:
                y = y * _shape_mask(m.weight, x.ndim, d)
            if m.bias is not None:
                y = y + _shape_mask(m.bias, x.ndim, d)
            return y * mk
        return hook

    def hook(m, inputs, out):
        return out * _shape_mask(mask.to(out), out.ndim, dim % out.ndim)
    return hook


def prune_physically(model: nn.Module, groups: GroupSet, keep: list[np.ndarray],
                     example: torch.Tensor | None = None) -> tuple[nn.Module, list]:
    """A pruned copy of ``model`` with the removed channels physically gone.

    Returns ``(pruned, history)``; ``history`` is Torch-Pruning's pruning history (plain
    lists: module name, out/in, indices), enough to redo the pruning on a fresh model
    (:func:`axes_pipeline.pruning.export.load_pruned`). ``model`` is not modified.
    """
    pruned = copy.deepcopy(model)
    if example is None:
        example = torch.randn(groups.input_shape)
    with eval_mode(pruned):
        dg = _trace_graph(pruned, example.to(next(pruned.parameters()).device))
        for g, k in zip(groups.groups, keep):
            removed = np.flatnonzero(~k)
            if removed.size == 0:
                continue
            if removed.size >= g.size:
                raise ValueError(f"group {g.name}: cannot remove all {g.size} channels")
            root = pruned.get_submodule(g.name)
            pruner = dg.get_pruner_of_module(root)
            dg.get_pruning_group(root, pruner.prune_out_channels, [int(i) for i in removed]).prune()
    history = [[str(n), bool(o), [int(i) for i in idx]] for n, o, idx in dg.pruning_history()]
    return pruned, history


def redo_pruning(model: nn.Module, history: list, example: torch.Tensor) -> nn.Module:
    """Apply a pruning ``history`` (from :func:`prune_physically`) to a fresh ``model`` in place."""
    with eval_mode(model):
        _trace_graph(model, example).load_pruning_history([[n, o, list(idx)] for n, o, idx in history])
    return model
