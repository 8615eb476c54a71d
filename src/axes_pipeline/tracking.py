"""Experiment tracking: wandb (offline by default), CSV, or none.

Runs are grouped by experiment name and named data-model-seed, with the stage as job type, so a
dashboard can put the axes and pruning curves of every seed and backbone side by side.
Never a login prompt: offline mode needs no account; online mode without credentials fails with
one line instead of asking.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

from axes_pipeline.errors import UserError, unknown_name

LOGGER_KINDS = ("wandb", "csv", "none")


def _wandb_env(cfg: DictConfig) -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    if cfg.logger.mode == "online" and not (os.environ.get("WANDB_API_KEY") or _has_netrc()):
        raise UserError("logger.mode=online needs wandb credentials (WANDB_API_KEY or `wandb login`); "
                        "use logger.mode=offline and `wandb sync` later")


def _has_netrc() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _init_kwargs(cfg: DictConfig, stage: str, out: Path) -> dict:
    lg = cfg.logger
    return dict(
        project=lg.project, entity=lg.entity, mode=lg.mode, group=lg.group,
        # a report spans many runs: name it after the experiment, not after one run's seed
        name=f"{cfg.name}-report" if stage == "report" else f"{lg.run_name}-{stage}", job_type=stage, tags=list(lg.tags) + [stage],
        dir=str(out), reinit="finish_previous",
        config={"data": cfg.data.name, "model": cfg.model.name, "width": cfg.model.width,
                "seed": cfg.seed, "experiment": cfg.name, "stage": stage},
    )


def check_logger(cfg: DictConfig) -> None:
    kind = cfg.logger.kind
    if kind not in LOGGER_KINDS:
        raise unknown_name("logger", kind, LOGGER_KINDS)
    if kind == "wandb":
        _wandb_env(cfg)


def lightning_logger(cfg: DictConfig, out: Path):
    """The Lightning logger for training (False when logging is off)."""
    check_logger(cfg)
    kind = cfg.logger.kind
    if kind == "none":
        return False
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(out), name="logs", version="train")
    from lightning.pytorch.loggers import WandbLogger

    kw = _init_kwargs(cfg, "train", out)
    return WandbLogger(save_dir=str(out), **{k: v for k, v in kw.items() if k != "dir"})


class StageTracker:
    """Tracking for the non-training stages: scalars, tables and images to wandb when enabled.

    With `logger=csv` or `none` it does nothing (the stage's own CSV/PNG files are the record).
    """

    def __init__(self, cfg: DictConfig, stage: str, out: Path):
        check_logger(cfg)
        self.run = None
        if cfg.logger.kind == "wandb":
            import wandb

            out.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(**_init_kwargs(cfg, stage, out))

    @property
    def enabled(self) -> bool:
        return self.run is not None

    def scalars(self, values: dict, prefix: str = "") -> None:
        if self.run is not None:
            self.run.summary.update({f"{prefix}{k}": v for k, v in values.items()
                                     if isinstance(v, (int, float, bool, str))})

    def table(self, key: str, frame) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(dataframe=frame)})

    def image(self, key: str, path: Path) -> None:
        if self.run is not None and Path(path).exists():
            import wandb

            self.run.log({key: wandb.Image(str(path))})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
