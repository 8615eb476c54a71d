"""The typed schema of every config group: the one place each default and its type live.

Each room of the package defines the dataclass of its own config group (``pruning.settings``
holds the pruning schema, ``training.optim`` the optimizer's ...); :func:`register` stores them
all in Hydra's ConfigStore as ``base_<group>``. A YAML option of a group lists its schema first
in its defaults (``defaults: [base_pruning, _self_]``) and then only selects and overrides, so a
wrong type or an unknown key fails at composition with Hydra's own message (one line, exit 2
through :func:`axes_pipeline.tasks.hydra_entry`). The root of each stage (``base_train`` ...) is
defined here, above every room, since it composes all their knobs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from axes_pipeline.analyses.settings import ANALYSIS_SCHEMAS
from axes_pipeline.axes.settings import AxesKnobs
from axes_pipeline.bounds import count, fraction, seed_field
from axes_pipeline.data.settings import DATASETS
from axes_pipeline.models.settings import MODELS
from axes_pipeline.pruning.settings import PruningConfig
from axes_pipeline.report.settings import ReportConfig
from axes_pipeline.tracking import CSVConfig, WandbConfig
from axes_pipeline.training.callbacks import CallbacksConfig, CheckpointConfig
from axes_pipeline.training.optim import OptimConfig
from axes_pipeline.training.trainer import TrainerConfig


# ------------------------------------------------------------------ the typed root of each stage
@dataclass
class PathsConfig:
    """conf/paths: every output goes below output_root. A run directory is a pure function of the
    experiment name, data, model, width and seed, so later stages given the same overrides find it
    (under runs/ for single runs, multirun/ for sweeps: they look in both)."""

    output_root: str = "${oc.env:AXES_OUTPUT_ROOT,.}"
    data_dir: str = "${oc.env:AXES_DATA_DIR,${paths.output_root}/data}"
    # the run folder: RunLayout.dir (axes_pipeline.layout), spelled here for Hydra's own files
    run_dir: str = ("${paths.output_root}/${axes_mode:}/${axes_name:${name}}/"
                    "${axes_slug:${data.name},${model.name},${model.width},${seed}}")


@dataclass
class TrainKnobs:
    """``train.*``: the training loop's own knobs (beyond conf/trainer and conf/optim)."""

    label_smoothing: float = fraction(0.0, hi_open=True)
    warmup_epochs: int = count(0, least=0)
    channels_last: Any = "auto"   # auto = on for CUDA | true | false: memory format for conv-heavy nets on tensor cores
    compile: bool = False


@dataclass
class StageConfig(AxesKnobs):
    """The top-level keys every stage shares (conf/common.yaml selects the groups), so that the same
    overrides point every stage at the same run directory and every overlay composes with every
    stage. A group's node is typed by its own schema (``base_<group>``, :mod:`axes_pipeline.schema`)."""

    data: Any = MISSING
    model: Any = MISSING
    trainer: Any = MISSING
    optim: Any = MISSING
    callbacks: Any = MISSING
    logger: Any = MISSING
    paths: Any = MISSING
    checkpoint: Any = None
    name: str = "default"         # experiment name; an experiment overlay sets it. First level of the run dir.
    seed: int = seed_field(42)
    # explicit checkpoint (PATH): analyze/prune read it (default: <run_dir>/checkpoints/{best,last}.ckpt);
    # train.py starts from its weights (weights only)
    ckpt: str | None = None
    allow_partial: bool = False   # analyze/prune on a run whose training did not finish (no train_summary.json)
    train: TrainKnobs = field(default_factory=TrainKnobs)
    # modules imported before the stage runs: their @register (pruning scores) and @analysis
    # decorators add to the registries, e.g. plugins=[my_pkg.scores] (README "Extending")
    plugins: list[str] = field(default_factory=list)
    stage: str = MISSING


@dataclass
class TrainStage(StageConfig):
    stage: str = "train"


@dataclass
class AnalyzeStage(StageConfig):
    stage: str = "analyze"
    analysis: Any = MISSING       # one block per selected analysis (conf/analysis/), typed there


@dataclass
class PruneStage(StageConfig):
    stage: str = "prune"
    pruning: Any = MISSING


@dataclass
class ReportStage(StageConfig):
    stage: str = "report"
    report: ReportConfig = field(default_factory=ReportConfig)


#: config name (train.yaml ...) -> its root schema, stored as ``base_<stage>``
STAGES: dict[str, type[StageConfig]] = {
    "train": TrainStage, "analyze": AnalyzeStage, "prune": PruneStage, "report": ReportStage}


@functools.cache
def register() -> None:
    """Store every schema in Hydra's ConfigStore (once). The explicit setup call of every entry point
    (:func:`axes_pipeline.tasks.hydra_entry`) and of every test that composes a config, before the
    first composition: importing a room never registers anything."""
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
