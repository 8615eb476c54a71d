"""MACs: fvcore's count of a network, and a fast analytic count from the keep masks.

fvcore counts one "flop" per multiply-add (MACs). Its settings here (FIELD_NOTES): BatchNorm's
op handle returns 0 (a handle of ``None`` does not stop the counting), the count runs in eval
mode, and unsupported-operator warnings are silenced but the operators are kept and reported.

The analytic count (:class:`CostModel`) is exact for the pruned network as fvcore counts it,
and fast enough to sit inside the FLOPs search. Pruning channels never changes spatial sizes,
so every operator's count is its unpruned count scaled by the kept fraction of each of its
channel dimensions that belongs to a group:

- a dense conv / linear scales with its input and its output group: ``c · k_in · k_out``;
- a depthwise conv, a norm, a pooling scales with its one channel group: ``c · k``;
- a dimension outside every prunable group (the RGB input, the class logits) is a constant;
  ConvNeXt's channels-last ``Linear`` units are dense 1×1 convs here, their hidden features a group.
- a dimension made of several groups (a conv after a concatenation: DenseNet, GoogLeNet,
  Inception) is the sum of its parts, ``C_in = Σ_g fan_g · k_g + const``, so a dense conv is
  one term per (input part, output part); a grouped (non-depthwise) conv is a constant, since
  its channels are never pruned (:mod:`.groups`);
- a parameter-free module (an SE block's pool) runs over the channels Torch-Pruning ties to it
  (``"elem"`` members), counted from its output's channel count.

The unpruned per-module counts come from one fvcore run (``by_module``); which group each
module dimension belongs to comes from the dependency graph. An fvcore count that belongs to no
module (a functional op in a forward, e.g. MobileNetV2's ``adaptive_avg_pool2d``) is attributed,
if it is a pooling op, to the group that feeds the classifier; any other one is kept constant
and logged (the fvcore check on the pruned network would then show the difference).
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from axes_pipeline.models.modes import eval_mode
from axes_pipeline.pruning.groups import GroupSet

log = logging.getLogger("axes_pipeline")

__all__ = ["CostModel", "count_params", "fvcore_macs"]


def fvcore_macs(model: nn.Module, example: torch.Tensor, by_module: bool = False):
    """MACs of ``model`` on ``example`` as fvcore counts them (BatchNorm = 0, eval mode).

    Returns ``(total, unsupported)`` where ``unsupported`` maps each operator fvcore skipped to
    its number of calls; with ``by_module`` also the per-module totals (``{name: MACs}``).
    """
    with eval_mode(model):
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            from fvcore.nn import FlopCountAnalysis

            fa = FlopCountAnalysis(model, example)
            for op in ("aten::batch_norm", "aten::_native_batch_norm_legit_no_training"):
                fa.set_op_handle(op, lambda inputs, outputs: 0)
            fa.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            total = int(fa.total())
            unsupported = {str(k): int(v) for k, v in fa.unsupported_ops().items()}
            per_module = {k: dict(v) for k, v in fa.by_module_and_operator().items()} if by_module else None
    return (total, unsupported, per_module) if by_module else (total, unsupported)


def _one_channel_set(mod: nn.Module) -> bool:
    """A depthwise conv: its input channels are its output channels (MACs scale with one set)."""
    return isinstance(mod, nn.Conv2d) and mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels


def _channel_counts(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Channels (dim 1) of each parameter-free leaf module's output, from one forward: the
    number a pool's MACs divide by."""
    counts: dict[str, int] = {}
    hooks = []
    for name, mod in model.named_modules():
        if next(mod.children(), None) is None and next(mod.parameters(), None) is None:
            def hook(_m, _i, out, name=name):
                if isinstance(out, torch.Tensor) and out.ndim >= 2:
                    counts.setdefault(name, int(out.shape[1]))
            hooks.append(mod.register_forward_hook(hook))
    try:
        with eval_mode(model), torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return counts


def count_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


@dataclass
class CostModel:
    """``MACs(kept) = Σ_t coef[t] · K[a[t]] · K[b[t]]`` with ``K = [k_0 .. k_{G-1}, 1]``.

    ``k_g`` is the number of kept channels of group ``g``; index ``G`` is the constant 1.
    Integer arithmetic, so the result is exact.
    """

    coef: np.ndarray   # [T] int64
    a: np.ndarray      # [T] group index or G
    b: np.ndarray      # [T] group index or G
    sizes: np.ndarray  # [G]
    total: int         # fvcore's count of the unpruned network
    unsupported: dict
    unattributed: dict  # {(module, op): MACs} kept constant

    def macs_counts(self, kept: np.ndarray) -> np.ndarray:
        """MACs for kept counts ``kept: [G]`` or a batch ``[S, G]`` -> scalar / ``[S]``."""
        kept = np.asarray(kept, dtype=np.int64)
        one = np.ones(kept.shape[:-1] + (1,), dtype=np.int64)
        K = np.concatenate([kept, one], axis=-1)
        return (self.coef * K[..., self.a] * K[..., self.b]).sum(-1)

    def macs(self, keep: list[np.ndarray]) -> int:
        """MACs of the network with keep masks ``keep`` (one bool vector per group)."""
        return int(self.macs_counts(np.array([int(k.sum()) for k in keep], dtype=np.int64)))

    @classmethod
    def build(cls, model: nn.Module, groups: GroupSet, example: torch.Tensor) -> CostModel:
        total, unsupported, per_module = fvcore_macs(model, example, by_module=True)
        G = len(groups.groups)
        # module -> dim -> {group: member channels per root channel}; a dimension may span several groups
        dims: dict[str, dict[str, dict[int, int]]] = {}
        for gi, g in enumerate(groups.groups):
            for m in g.members:
                fan = len(m.idxs) // g.size if g.size else 1
                if fan * g.size != len(m.idxs):
                    raise ValueError(f"{m.module}: uneven channel mapping in group {g.name}")
                parts = dims.setdefault(m.module, {}).setdefault(m.dim, {})
                parts[gi] = parts.get(gi, 0) + fan
        modules = dict(model.named_modules())
        children = {name: [f"{name}.{c}" if name else c for c, _ in mod.named_children()]
                    for name, mod in modules.items()}
        channels = _channel_counts(model, example)
        sizes = groups.sizes

        def split(parts: dict[int, int], total: int | None) -> list[tuple[int, int]]:
            """[(group or G, channels per kept root channel)] summing to ``total`` channels."""
            out = [(gi, fan) for gi, fan in parts.items()]
            if total is not None:
                rest = total - sum(fan * int(sizes[gi]) for gi, fan in parts.items())
                if rest < 0:
                    raise ValueError(f"group members exceed {total} channels")
                if rest:
                    out.append((G, rest))
            return out

        terms, unattributed = [], {}   # (coef, a, b) of every term
        for name, mod in modules.items():
            counts = Counter(per_module.get(name, {}))
            for child in children[name]:
                counts.subtract(per_module.get(child, {}))
            for op, n in counts.items():
                if n == 0:
                    continue
                d = dims.get(name, {})
                if isinstance(mod, nn.Conv2d) and mod.groups > 1 and not _one_channel_set(mod):
                    # a grouped conv: build_groups keeps its channels whole (frozen), so constant
                    if d:
                        raise ValueError(f"{name}: grouped conv (groups={mod.groups}) inside a prunable group")
                    terms.append((int(n), G, G))
                    continue
                if isinstance(mod, (nn.Conv2d, nn.Linear)) and not _one_channel_set(mod):
                    # MACs = c0 · C_in · C_out; each of C_in, C_out a sum over its groups
                    cin = mod.in_channels if isinstance(mod, nn.Conv2d) else mod.in_features
                    cout = mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features
                    ins = split(d.get("in", {}), cin)
                    outs = split(d.get("out", {}), cout)
                    if n % (cin * cout):
                        raise ValueError(f"{name} ({op}): {n} MACs do not split over {cin}x{cout} channels")
                    c0 = n // (cin * cout)
                    terms += [(c0 * fi * fo, gi, go) for gi, fi in ins for go, fo in outs]
                    continue
                parts = d.get("out") or d.get("in") or d.get("elem") or {}
                n_ch = channels.get(name)
                if not parts and "pool" in op and groups.head_group is not None and n_ch is None:
                    parts, n_ch = {groups.head_group: 1}, int(sizes[groups.head_group])
                if not parts:
                    unattributed[(name, op)] = int(n)
                    terms.append((int(n), G, G))
                    continue
                if n_ch is None:
                    n_ch = sum(fan * int(sizes[gi]) for gi, fan in parts.items())
                if n % n_ch:
                    raise ValueError(f"{name} ({op}): {n} MACs do not split over {n_ch} channels")
                terms += [(n // n_ch * fan, gi, G) for gi, fan in split(parts, n_ch)]
        if unattributed:
            log.warning("MAC count: kept constant (no channel group found): %s", unattributed)
        coef, a, b = (np.array(column, dtype=np.int64) for column in zip(*terms))
        model_ = cls(coef, a, b, groups.sizes, total, unsupported, unattributed)
        check = model_.macs_counts(groups.sizes)
        if int(check) != total:
            raise ValueError(f"analytic MACs {int(check)} != fvcore {total} on the unpruned network")
        return model_
