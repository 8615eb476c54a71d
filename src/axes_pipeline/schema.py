"""The typed schema of every config group: the one place each default and its type live.

Each room of the package defines the dataclass of its own config group (``pruning.settings``
holds the pruning schema, ``training.optim`` the optimizer's ...); :func:`register` stores them
all in Hydra's ConfigStore as ``base_<group>``. A YAML option of a group lists its schema first
in its defaults (``defaults: [base_pruning, _self_]``) and then only selects and overrides, so a
wrong type or an unknown key fails at composition with Hydra's own message (one line, exit 2
through :func:`axes_pipeline.tasks.hydra_entry`).
"""

from __future__ import annotations

import functools

from hydra.core.config_store import ConfigStore


@functools.cache
def register() -> None:
    """Store every schema in Hydra's ConfigStore (once; called before any composition). The rooms
    are imported here, not at module level, so that one can be imported without the store."""
    from axes_pipeline.analyses.settings import ANALYSIS_SCHEMAS
    from axes_pipeline.config import STAGES, PathsConfig
    from axes_pipeline.data.settings import DATASETS
    from axes_pipeline.models.settings import MODELS
    from axes_pipeline.pruning.settings import PruningConfig
    from axes_pipeline.tracking import CSVConfig, WandbConfig
    from axes_pipeline.training.callbacks import CallbacksConfig, CheckpointConfig
    from axes_pipeline.training.optim import OptimConfig
    from axes_pipeline.training.trainer import TrainerConfig

    entries: list[tuple[str | None, str, type]] = [
        *((None, f"base_{stage}", node) for stage, node in STAGES.items()),
        *(("data", f"base_data_{node.name}", node) for node in DATASETS),
        *(("model", f"base_model_{name}", node) for name, node in MODELS.items()),
        *(("analysis", f"base_{name}", node) for name, node in ANALYSIS_SCHEMAS.items()),
        ("paths", "base_paths", PathsConfig), ("pruning", "base_pruning", PruningConfig),
        ("trainer", "base_trainer", TrainerConfig), ("optim", "base_optim", OptimConfig),
        # conf/callbacks/default.yaml fills two top-level keys: `callbacks` and `checkpoint`
        ("callbacks", "base_callbacks", CallbacksConfig), ("callbacks", "base_checkpoint", CheckpointConfig),
        # one schema per logger option: their knobs differ (logger=none is null)
        ("logger", "base_wandb", WandbConfig), ("logger", "base_csv", CSVConfig),
    ]
    store = ConfigStore.instance()
    for group, name, node in entries:
        store.store(group=group, name=name, node=node)
