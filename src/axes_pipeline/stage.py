"""What a stage body reads from its Hydra config, once, and hands down (:func:`stage_inputs`).

The four stage bodies (``run_training``, ``run_analysis``, ``run_prune``, ``run_report``) are the last
places the whole config is read: each calls :func:`stage_inputs` for what every stage shares (the
run's identity and layout, the typed axes knobs, the data and model blocks, the tracker) and reads
its own block (``pruning``, ``analysis.<name>``, ``report``) as its schema's dataclass. Below them,
functions take those typed settings and plain values; a changed knob is a new value
(``dataclasses.replace``), never a mutated or deep-copied config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from axes_pipeline.axes.settings import AxesKnobs, CaptureConfig, GradientsConfig, GraphsConfig, MetricsConfig
from axes_pipeline.bounds import check_bounds
from axes_pipeline.config import run_kind, to_container
from axes_pipeline.errors import UserError
from axes_pipeline.layout import RunId, RunLayout
from axes_pipeline.runs import data_identity, flatten
from axes_pipeline.tracking import TrackedRun, tracking


@dataclass(frozen=True)
class StageInputs:
    """What every stage shares, typed: the run (identity and this mode's layout), how the axes are
    measured, the data and model blocks (``_target_`` nodes the stage builds its objects from) and where
    it is tracked."""

    run: RunLayout
    knobs: AxesKnobs
    data: DictConfig = field(repr=False)     # the `data` block: data.build_datamodule builds it
    model: DictConfig = field(repr=False)    # the `model` block: training.train.instantiate_model builds it
    ckpt: Path | None                        # ckpt=PATH: the checkpoint a later stage reads (train: initial weights)
    allow_partial: bool                      # a later stage may read a run whose training did not finish
    progress: bool                           # a bar (terminal) or one line per unit (log) on long loops
    tracked: TrackedRun = field(repr=False)
    config: dict = field(repr=False, default_factory=dict)   # the whole resolved config, for summaries

    @property
    def id(self) -> RunId:
        return self.run.id

    @property
    def data_id(self) -> dict:
        """The data identity (which images, labels and splits): part of every result's fingerprint."""
        return data_identity(to_container(self.data))


def typed(node: Any, schema: type) -> Any:
    """A config block as its schema's dataclass; an absent block (an analysis not selected) as the
    schema's defaults."""
    return schema() if node is None else OmegaConf.to_object(node)


def stage_inputs(cfg: DictConfig) -> StageInputs:
    """The typed inputs every stage body builds from its composed config. The schema's ranges are checked
    here too: a stage body called from Python (not through the task wrapper) refuses a bad knob in one line
    before any work as well."""
    check_bounds(cfg)
    run_id = RunId(str(cfg.name), str(cfg.data.name), str(cfg.model.name), cfg.model.width, cfg.seed)
    knobs = AxesKnobs(device=str(cfg.device), capture=typed(cfg.capture, CaptureConfig),
                      metrics=typed(cfg.metrics, MetricsConfig), graphs=typed(cfg.graphs, GraphsConfig),
                      gradients=typed(cfg.gradients, GradientsConfig), plots=bool(cfg.plots))
    config = to_container(cfg)
    run = RunLayout.at(run_id, cfg.paths.output_root, run_kind())
    if Path(cfg.paths.run_dir).resolve() != run.dir:
        # Hydra's own files go to paths.run_dir and every stage's to the run's folder: they are one folder
        raise UserError(f"paths.run_dir={cfg.paths.run_dir} is not the run's folder {run.dir}: it is derived from "
                        f"name, data, model, model.width and seed, and cannot be set; set paths.output_root instead")
    return StageInputs(
        run=run, knobs=knobs, data=cfg.data, model=cfg.model,
        ckpt=Path(str(cfg.ckpt)) if cfg.ckpt else None, allow_partial=bool(cfg.allow_partial),
        # the bar's callback switched off (callbacks.progress_bar=false) means one line per unit everywhere
        progress=bool(cfg.callbacks.progress_bar),
        tracked=TrackedRun(run_id, flatten(config), tracking(cfg.logger)), config=config)
