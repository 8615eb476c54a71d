"""The one helper that turns config nodes into objects: callbacks, the tracking logger.

As in lightning-hydra-template, a node is a Hydra ``_target_`` node or a mapping of named ones
(``callbacks.model_checkpoint``...). An entry set to ``false`` or ``null`` is left out
(``callbacks.progress_bar=false``, ``logger=none``), and so is an object its target declines to
build (``None``: no progress bar where stdout is not a terminal).
"""

from __future__ import annotations

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from axes_pipeline.errors import UserError


def instantiate_all(node, key: str) -> list:
    """The objects of config ``node`` (``key``: its name in the config, for the error message)."""
    if node is None or node is False:
        return []
    if not isinstance(node, DictConfig):
        raise UserError(f"{key} must be a `_target_` node or a mapping of them, got {node!r}")
    entries = [(key, node)] if "_target_" in node else [(f"{key}.{name}", sub) for name, sub in node.items()]
    built = []
    for where, sub in entries:
        if sub is None or sub is False:
            continue
        if not isinstance(sub, DictConfig) or "_target_" not in sub:
            raise UserError(f"{where} must be a `_target_` node, or false/null to leave it out; got {sub!r}")
        try:
            obj = instantiate(sub)
        except InstantiationException as err:   # a target's own one-line refusal stays one line
            if isinstance(err.__cause__, UserError):
                raise err.__cause__ from None
            raise
        if obj is not None:
            built.append(obj)
    return built
