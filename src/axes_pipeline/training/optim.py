"""Optimizers and the learning-rate schedule of the training recipes (METHODS §10)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from axes_pipeline.bounds import fraction, non_negative, positive
from axes_pipeline.errors import unknown_name

#: A recipe's optimizer name -> its class. The recipe names it in a config value, and Hydra picks a
#: config-group option only from the command line, so ``optim._target_`` is ``${optimizer:${.name}}``.
OPTIMIZERS = {"sgd": "torch.optim.SGD", "adam": "torch.optim.Adam", "adamw": "torch.optim.AdamW"}


def optimizer_target(name: str) -> str:
    """The ``_target_`` of optimizer ``name`` (the ``${optimizer:...}`` resolver)."""
    if name not in OPTIMIZERS:
        raise unknown_name("optimizer (optim.name)", name, list(OPTIMIZERS))
    return OPTIMIZERS[name]


if not OmegaConf.has_resolver("optimizer"):
    OmegaConf.register_new_resolver("optimizer", optimizer_target)


@dataclass
class OptimConfig:
    """conf/optim: the optimizer, bound to the parameters later (``_partial_``). Its settings come
    from the recipe: the dataset's recipe where it names them (Tiny-ImageNet, ImageNet-100 use
    Adam), otherwise the backbone's (METHODS §10)."""

    _target_: str = "${optimizer:${.name}}"   # torch.optim.SGD / Adam / AdamW (see OPTIMIZERS)
    _partial_: bool = True
    name: str = "${oc.select:data.recipe.optimizer,${model.recipe.optimizer}}"   # sgd, adam or adamw
    lr: float = positive("${oc.select:data.recipe.lr,${model.recipe.lr}}")
    weight_decay: float = non_negative("${oc.select:data.recipe.weight_decay,${model.recipe.weight_decay}}")
    momentum: float = fraction(0.9, hi_open=True)       # SGD only
    nesterov: bool = False      # SGD only


def optimizer_factory(optim: DictConfig | OptimConfig) -> Callable[..., torch.optim.Optimizer]:
    """``params -> Optimizer`` of an optim node: Hydra's partial of its ``_target_`` with the
    arguments that optimizer takes (SGD's momentum and nesterov are no arguments of Adam, and
    ``name`` only chose the target)."""
    if not isinstance(optim, DictConfig):
        optim = OmegaConf.structured(optim)
    node = OmegaConf.to_container(optim, resolve=True)   # (a sub-node resolves within its whole config)
    takes = inspect.signature(get_class(node["_target_"])).parameters
    return instantiate({k: v for k, v in node.items() if k.startswith("_") or k in takes})


def warmup_cosine(total_steps: int, warmup_steps: int = 0):
    """LR multiplier per step: linear warm-up, then cosine decay to 0 at ``total_steps``."""
    total_steps = max(1, total_steps)

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
