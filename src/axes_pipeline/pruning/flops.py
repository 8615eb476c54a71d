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
- a dimension outside every prunable group (the RGB input, the class logits, ConvNeXt's
  MLP hidden units) is a constant.

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

from axes_pipeline.pruning.groups import GroupSet

log = logging.getLogger("axes_pipeline")

__all__ = ["CostModel", "count_params", "fvcore_macs"]


def _zero(inputs, outputs):
    return 0


def fvcore_macs(model: nn.Module, example: torch.Tensor, by_module: bool = False):
    """MACs of ``model`` on ``example`` as fvcore counts them (BatchNorm = 0, eval mode).

    Returns ``(total, unsupported)`` where ``unsupported`` maps each operator fvcore skipped to
    its number of calls; with ``by_module`` also the per-module totals (``{name: MACs}``).
    """
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            from fvcore.nn import FlopCountAnalysis

            fa = FlopCountAnalysis(model, example)
            for op in ("aten::batch_norm", "aten::_native_batch_norm_legit_no_training"):
                fa.set_op_handle(op, _zero)
            fa.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            total = int(fa.total())
            unsupported = {str(k): int(v) for k, v in fa.unsupported_ops().items()}
            per_module = {k: dict(v) for k, v in fa.by_module_and_operator().items()} if by_module else None
    finally:
        model.train(was_training)
    if by_module:
        return total, unsupported, per_module
    return total, unsupported


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
    def build(cls, model: nn.Module, groups: GroupSet, example: torch.Tensor) -> "CostModel":
        total, unsupported, per_module = fvcore_macs(model, example, by_module=True)
        G = len(groups.groups)
        # module -> {"in": (g, fan), "out": (g, fan)}; fan = member channels per root channel
        dims: dict[str, dict[str, tuple[int, int]]] = {}
        for gi, g in enumerate(groups.groups):
            for m in g.members:
                fan = len(m.idxs) // g.size if g.size else 1
                if fan * g.size != len(m.idxs):
                    raise ValueError(f"{m.module}: uneven channel mapping in group {g.name}")
                dims.setdefault(m.module, {})[m.dim] = (gi, fan)
        modules = dict(model.named_modules())
        children = {name: [f"{name}.{c}" if name else c for c, _ in mod.named_children()]
                    for name, mod in modules.items()}
        coef, a, b, unattributed = [], [], [], {}
        for name, mod in modules.items():
            counts = Counter(per_module.get(name, {}))
            for child in children[name]:
                counts.subtract(per_module.get(child, {}))
            for op, n in counts.items():
                if n == 0:
                    continue
                ga, gb, div = G, G, 1
                d = dims.get(name, {})
                if isinstance(mod, (nn.Conv2d, nn.Linear)) and getattr(mod, "groups", 1) == 1:
                    if "in" in d:
                        ga, div = d["in"][0], div * int(groups.sizes[d["in"][0]])
                    if "out" in d:
                        gb, div = d["out"][0], div * int(groups.sizes[d["out"][0]])
                elif "out" in d or "in" in d:
                    ga = d.get("out", d.get("in"))[0]
                    div = int(groups.sizes[ga])
                elif "pool" in op and groups.head_group is not None:
                    ga = groups.head_group
                    div = int(groups.sizes[ga])
                else:
                    unattributed[(name, op)] = int(n)
                if n % div:
                    raise ValueError(f"{name} ({op}): {n} MACs do not split over {div} channels")
                coef.append(n // div)
                a.append(ga)
                b.append(gb)
        if unattributed:
            log.warning("MAC count: kept constant (no channel group found): %s", unattributed)
        model_ = cls(np.array(coef, dtype=np.int64), np.array(a, dtype=np.int64), np.array(b, dtype=np.int64),
                     groups.sizes, total, unsupported, unattributed)
        check = model_.macs_counts(groups.sizes)
        if int(check) != total:
            raise ValueError(f"analytic MACs {int(check)} != fvcore {total} on the unpruned network")
        return model_
