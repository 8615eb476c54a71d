"""Experiment tracking: wandb (offline by default), CSV, or none.

Runs are grouped by experiment name and named data-model-seed, with the stage as job type, so a
dashboard can put the axes and pruning curves of every seed and backbone side by side.
Never a login prompt: offline mode needs no account; online mode without credentials fails with
one line instead of asking. Offline means offline: no network request at all (wandb's telemetry,
which otherwise looks up the wandb host when a run finishes, is switched off).

Training's logs belong to the run, not to one process: a resumed training appends to
``logs/train/metrics.csv`` and continues the same wandb run (its id is kept in the run directory).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from omegaconf import DictConfig

from axes_pipeline.errors import UserError, unknown_name

LOGGER_KINDS = ("wandb", "csv", "none")


def _wandb_env(cfg: DictConfig) -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    if cfg.logger.mode != "online":
        # wandb's error reporting/telemetry asks the wandb server (a DNS query, then HTTPS) even in
        # offline mode, from `run.finish()`; WANDB_ERROR_REPORTING=false is what turns it off
        # (checked with strace over the process and wandb-core: no AF_INET connect is left).
        os.environ["WANDB_ERROR_REPORTING"] = "false"
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


def lightning_logger(cfg: DictConfig, out: Path, resume_epoch: int = 0, resume_step: int = 0):
    """The Lightning logger for training (False when logging is off).

    ``resume_epoch`` / ``resume_step`` are the first epoch and optimizer step this process trains:
    the history before them is kept (CSV rows, the wandb run), rows of a later, interrupted epoch
    are dropped (it is redone).
    """
    check_logger(cfg)
    kind = cfg.logger.kind
    if kind == "none":
        return False
    if kind == "csv":
        return _resumable_csv_logger(out, resume_epoch, resume_step)
    from lightning.pytorch.loggers import WandbLogger

    kw = _init_kwargs(cfg, "train", out)
    run_id = _train_run_id(out, resume_epoch)
    return WandbLogger(save_dir=str(out), id=run_id, resume="allow",
                       **{k: v for k, v in kw.items() if k != "dir"})


def _train_run_id(out: Path, resume_epoch: int) -> str:
    """The wandb run id of this run's training: the stored one when resuming, else a new one."""
    import secrets
    import string

    from axes_pipeline.runs import write_text

    path = out / "wandb" / "train_run_id"
    if resume_epoch > 0 and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    # wandb's own id alphabet (lowercase letters and digits), drawn without touching the seeded RNGs
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    write_text(path, run_id + "\n")
    return run_id


def _resumable_csv_logger(out: Path, resume_epoch: int, resume_step: int):
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter
    from lightning.pytorch.loggers.logger import rank_zero_experiment

    class _HistoryWriter(ExperimentWriter):
        # Lightning's writer deletes an existing metrics.csv when it starts; keep the rows of the
        # epochs the checkpoint holds and append after them.
        def _check_log_dir_exists(self) -> None:
            path = Path(self.metrics_file_path)
            if not path.is_file():
                return
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                fields = list(reader.fieldnames or [])
                rows = [r for r in reader if _kept(r, resume_epoch, resume_step)]
            if not rows:
                path.unlink()
                return
            from axes_pipeline.runs import atomic_path

            with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)
            self.metrics_keys = fields

    class ResumableCSVLogger(CSVLogger):
        @property
        @rank_zero_experiment
        def experiment(self):
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = _HistoryWriter(log_dir=self.log_dir)
            return self._experiment

    return ResumableCSVLogger(save_dir=str(out), name="logs", version="train")


def _kept(row: dict, resume_epoch: int, resume_step: int) -> bool:
    """Whether a metrics row belongs to the history before the resume point: by its epoch, or by
    its step for rows logged without one (the learning-rate monitor's)."""
    for key, limit in (("epoch", resume_epoch), ("step", resume_step)):
        try:
            return int(float(row.get(key) or "nan")) < limit
        except ValueError:
            continue
    return False


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
