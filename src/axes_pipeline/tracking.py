"""Experiment tracking: wandb (offline by default), CSV, or none.

Runs are grouped by experiment name and named data-model-seed, with the stage as job type, so a
dashboard can put the axes and pruning curves of every seed and backbone side by side. Never a
login prompt: online mode without credentials fails with one line. Offline means offline: no
network request at all (wandb's telemetry is switched off).

Every stage's wandb config is the full resolved config, flattened (``capture.point``, ...), so a
dashboard can group or filter by any knob. Results are Artifacts with lineage (checkpoint -> axes
-> pruning curves -> report; :func:`record_artifact`). A resumed training appends to
``logs/train/metrics.csv`` and continues the same wandb run (its id is kept in the run directory).
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from axes_pipeline.bounds import positive
from axes_pipeline.errors import UserError
from axes_pipeline.layout import AXES_CSV, LAYERS_CSV, RunId
from axes_pipeline.runs import atomic_path, write_text
from axes_pipeline.wiring import instantiate_all


@dataclass
class WandbConfig:
    """``logger=wandb`` (the default), offline: no account, no network; ``wandb sync`` uploads later
    (docs/tracking.md)."""

    _target_: str = "axes_pipeline.tracking.WandbTracking"
    project: str = "axes-pipeline"
    entity: str | None = None
    mode: str = "offline"     # online for real use (needs WANDB_API_KEY; never prompts)
    group: str | None = None      # null: the experiment's name (RunId.name)
    run_name: str | None = None   # null: the run's slug, <data>-<model>-w<width>-seed<seed> (RunId.slug), then -<stage>
    tags: list[str] = field(default_factory=list)
    # online: seconds wandb.init waits for the server before one line says it is unreachable (wandb's
    # own default, 90 s, ends in a CommError traceback)
    init_timeout: float = positive(20.0)


@dataclass
class CSVConfig:
    """``logger=csv``: training's curves in ``<run_dir>/logs/train/metrics.csv``; no other stage logs."""

    _target_: str = "axes_pipeline.tracking.CSVTracking"


def tracking(logger):
    """The tracking backend of the ``logger`` block (:class:`WandbTracking`, :class:`CSVTracking`), or
    None with ``logger=none``: a backend rather than a Lightning logger, because one setting serves
    every stage (training gets its Lightning logger from it, the other stages their wandb run)."""
    built = instantiate_all(logger, "logger")
    return built[0] if built else None


@dataclass(frozen=True)
class TrackedRun:
    """What the tracker records a stage of a run under: the run's identity, its whole resolved config
    flattened (``capture.point``: wandb's run table filters by any knob) and the backend (None: no tracking)."""

    id: RunId
    config: dict = field(repr=False)
    backend: object | None = None


class CSVTracking:
    """Training's curves as CSV (kept across a resume); the other stages' own files are the record."""

    def training_logger(self, run: TrackedRun, out: Path, resume_epoch: int = 0, resume_step: int = 0):
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

    def stage_run(self, run: TrackedRun, stage: str, out: Path):
        return None

    def record_training(self, logger, run: TrackedRun, best: Path, summary: dict) -> None:
        pass


class WandbTracking:
    """wandb runs grouped by experiment and named after the run's slug and the stage
    (``digits-resnet18-w0.25-seed42-analyze``); a resumed training continues its run. Refuses
    ``mode=online`` without credentials (one line, never a login prompt)."""

    def __init__(self, project: str, entity: str | None, mode: str, group: str | None, run_name: str | None, tags,
                 init_timeout: float = 20.0):
        self.project, self.entity, self.mode, self.group = project, entity, mode, group
        self.run_name, self.tags, self.init_timeout = run_name, list(tags), float(init_timeout)
        _wandb_env(mode)

    def init_kwargs(self, run: TrackedRun, stage: str, out: Path) -> dict:
        import wandb

        name = run.id.name
        return dict(
            project=self.project, entity=self.entity, mode=self.mode, group=self.group or name,
            # a report spans many runs: name it after the experiment, not after one run's seed
            name=f"{name}-report" if stage == "report" else f"{self.run_name or run.id.slug('-')}-{stage}",
            job_type=stage, tags=self.tags + [stage], dir=str(out), reinit="finish_previous",
            # (`data.name`, `model.name`, `model.width`, `seed` come with the flattened config; a bare
            # `data` key beside them would collide with the `data.*` columns in wandb's run table)
            config={**run.config, "experiment": name, "stage": stage},
            settings=wandb.Settings(init_timeout=self.init_timeout),
        )

    def training_logger(self, run: TrackedRun, out: Path, resume_epoch: int = 0, resume_step: int = 0):
        """Lightning's WandbLogger; ``resume_epoch`` > 0 continues the run this training started."""
        from lightning.pytorch.loggers import WandbLogger

        kw = self.init_kwargs(run, "train", out)
        logger = WandbLogger(save_dir=str(out), id=_train_run_id(out, resume_epoch), resume="allow",
                             **{k: v for k, v in kw.items() if k != "dir"})
        if self.mode == "online":    # reach the server now, before any training, not at the first logged step
            self._reach(lambda: logger.experiment)
        return logger

    def stage_run(self, run: TrackedRun, stage: str, out: Path):
        import wandb

        out.mkdir(parents=True, exist_ok=True)
        return self._reach(lambda: wandb.init(**self.init_kwargs(run, stage, out)))

    def _reach(self, init):
        """``init()``; an unreachable server (no network, a firewall, a wrong WANDB_BASE_URL) is one
        line after ``init_timeout`` seconds instead of wandb's CommError traceback."""
        from wandb.errors import CommError

        try:
            return init()
        except CommError as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"wandb unreachable: {reason} (gave up after logger.init_timeout={self.init_timeout:g} s); "
                            f"use logger.mode=offline and `wandb sync` later") from None

    def record_training(self, logger, run: TrackedRun, best: Path, summary: dict) -> None:
        log_training(logger.experiment, run.id, best, summary)


def _wandb_env(mode: str) -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    if mode != "online":
        # wandb's error reporting/telemetry asks the wandb server (a DNS query, then HTTPS) even in
        # offline mode, from `run.finish()`; WANDB_ERROR_REPORTING=false is what turns it off
        # (checked with strace over the process and wandb-core: no AF_INET connect is left).
        os.environ["WANDB_ERROR_REPORTING"] = "false"
    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _has_netrc()):
        raise UserError("logger.mode=online needs wandb credentials (WANDB_API_KEY or `wandb login`); "
                        "use logger.mode=offline and `wandb sync` later")


def _has_netrc() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _train_run_id(out: Path, resume_epoch: int) -> str:
    """The wandb run id of this run's training: the stored one when resuming, else a new one."""
    import secrets
    import string


    path = out / "wandb" / "train_run_id"
    if resume_epoch > 0 and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    # wandb's own id alphabet (lowercase letters and digits), drawn without touching the seeded RNGs
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    write_text(path, run_id + "\n")
    return run_id


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
    """Tracking for the non-training stages: scalars, tables and images to wandb when enabled; with
    `logger=csv` or `none` it does nothing (the stage's own CSV/PNG files are the record)."""

    def __init__(self, run: TrackedRun, stage: str, out: Path):
        self.run = run.backend.stage_run(run, stage, out) if run.backend is not None else None

    @property
    def enabled(self) -> bool:
        return self.run is not None

    def scalars(self, values: dict, prefix: str = "") -> None:
        if self.run is not None:
            self.run.summary.update({f"{prefix}{k}": v for k, v in values.items()
                                     if isinstance(v, (int, float, bool, str))})

    def _log(self, key: str, build, when: bool = True) -> None:
        """Log ``build(wandb)`` under ``key`` (wandb imported only when there is a run)."""
        if self.run is not None and when:
            import wandb

            self.run.log({key: build(wandb)})

    def table(self, key: str, frame) -> None:
        self._log(key, lambda wandb: wandb.Table(dataframe=frame))

    def image(self, key: str, path: Path) -> None:
        self._log(key, lambda wandb: wandb.Image(str(path)), Path(path).exists())

    def log_artifact(self, kind: str, name: str, files: list[Path]) -> None:
        """Record ``files`` as this stage's output artifact ``name`` (see :func:`artifact`)."""
        if self.run is not None:
            record_artifact(self.run, kind, name, files, use=False)

    def use_artifact(self, kind: str, name: str, files: list[Path]) -> None:
        """Record ``files`` (another stage's output) as an input of this stage."""
        if self.run is not None:
            record_artifact(self.run, kind, name, files, use=True)

    def scatter(self, key: str, frame, x: str, y: str, title: str) -> None:
        self._log(key, lambda wandb: wandb.plot.scatter(wandb.Table(dataframe=frame[[x, y]]), x, y, title=title))

    def line_series(self, key: str, xs, ys: dict, title: str, xname: str) -> None:
        """One line per entry of ``ys`` (name -> values over ``xs``), named in the legend."""
        self._log(key, lambda wandb: wandb.plot.line_series(xs=list(xs), ys=[list(v) for v in ys.values()],
                                                            keys=list(ys), title=title, xname=xname), bool(ys))

    def bar(self, key: str, frame, label: str, value: str, title: str) -> None:
        self._log(key, lambda wandb: wandb.plot.bar(wandb.Table(dataframe=frame[[label, value]]), label, value,
                                                    title=title), not frame.empty)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def log_training(run, run_id: RunId, best: Path, summary: dict) -> None:
    """Training's wandb record beyond Lightning's curves: the checkpoint as an artifact and the
    final metrics under stable summary names (``train/test_acc``) for run tables."""
    record_artifact(run, "checkpoint", artifact_name("checkpoint", run_id), [best], use=False)
    run.summary.update({f"train/{k}": v for k, v in summary.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})


#: the per-channel columns of axes.csv drawn as depth profiles: the local axis, then the target axis
PROFILE_AXES = ("input_capture", "peer_overlap", "task_info", "target_excess")


def log_axes(tracker: StageTracker, run_id: RunId, out: Path, axes) -> None:
    """Analyze's wandb record: ``axes.csv`` and ``layers.csv`` as an artifact, an I_X vs I_T scatter
    per layer, and the depth profile of each axis (mean over a layer's channels) as line series."""
    if not tracker.enabled or axes is None or axes.empty:
        return
    tracker.log_artifact("axes", artifact_name("axes", run_id), [out / AXES_CSV, out / LAYERS_CSV])
    for layer, d in axes.groupby("layer", sort=False):
        tracker.scatter(f"analyze/ix_vs_it/{layer}", d, "input_capture", "task_info",
                        title=f"{layer}: input_capture (I_X) vs task_info (I_T)")
    cols = [c for c in PROFILE_AXES if c in axes]
    prof = axes.groupby("layer_index")[cols].mean().sort_index()
    tracker.line_series("analyze/depth_profile", prof.index.tolist(), {c: prof[c].tolist() for c in cols},
                        title="depth profile (mean over channels)", xname="layer_index")


def log_report(tracker: StageTracker, runs, out: Path, headline, experiment: str) -> None:
    """The report's wandb record: every run's checkpoint, axes and curves as inputs, the report files
    as its output, the headline (local − target per comparison) as a bar chart, its CI as a line
    series and as summary metrics ``headline/<group>/<i>/{diff,ci_lo,ci_hi}`` (i: row in the group)."""
    if not tracker.enabled:
        return
    for r in runs:
        for kind, files in r.artifacts().items():
            tracker.use_artifact(kind, artifact_name(kind, r.id), files)
    tracker.log_artifact("report", re.sub(r"[^A-Za-z0-9_.-]", "_", f"report-{experiment}"),
                         [f for f in (out / "report.html", out / "report.md", out / "headline.csv") if f.is_file()])
    if headline is None or headline.empty:
        return
    head = headline.assign(row=headline.groupby("group").cumcount())
    head["label"] = [f"{g} #{i}: {c[:60]}" for g, i, c in zip(head["group"], head["row"], head["comparison"])]
    tracker.bar("report/headline_chart", head, "label", "diff", title="FLOPs-AUC difference local − target")
    # wandb's presets draw no error bars, and a custom Vega-Lite chart needs a spec created on the
    # server first (an offline run cannot), so the CI goes beside the bars as three lines over the
    # comparison's position (x = index into the bar labels' order).
    tracker.line_series("report/headline_ci", range(len(head)), {k: head[k].astype(float) for k in ("ci_lo", "diff", "ci_hi")},
                        title="FLOPs-AUC difference local − target with its CI", xname="comparison")
    tracker.scalars({f"headline/{g}/{i}/{k}": float(v) for g, i, lo, hi, d in
                     zip(head["group"], head["row"], head["ci_lo"], head["ci_hi"], head["diff"])
                     for k, v in (("diff", d), ("ci_lo", lo), ("ci_hi", hi))})


#: artifact kind -> (wandb artifact type, whether its files are recorded by reference): a checkpoint
#: is large and stays on the machine that trained it (``file://``); the small CSV/JSON results are
#: copied so that the wandb app can show and download them.
ARTIFACT_KINDS = {"checkpoint": ("model", True), "axes": ("axes", False), "curves": ("prune-curves", False),
                  "report": ("report", False)}


def artifact_name(kind: str, run_id: RunId) -> str:
    """The stable artifact name of one run's result: every stage derives it from the run's identity
    (its slug), so a consumer can name its producer's artifact without asking the wandb server."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{kind}-{run_id.name}-{run_id.slug('-')}")


def artifact(kind: str, name: str, files: list[Path]):
    """The ``wandb.Artifact`` of ``files``: built the same way by its producer and its consumers, so
    both hold the same manifest digest."""
    import wandb

    typ, by_reference = ARTIFACT_KINDS[kind]
    art = wandb.Artifact(name, type=typ)
    for f in files:
        f = Path(f).resolve()
        if by_reference:
            art.add_reference(f.as_uri(), name=f.name)
        else:
            art.add_file(str(f), name=f.name)
    return art


def record_artifact(run, kind: str, name: str, files: list[Path], use: bool) -> None:
    """Log ``files`` as artifact ``name`` (an output) or record it as an input (``use``).

    Offline, ``run.use_artifact`` refuses (it asks the server), so the artifact is logged with "use
    after commit" set, as ``use_artifact`` does for a local artifact: ``wandb sync`` commits it, and
    as wandb keeps one version per manifest digest it resolves to the producer's version, marked as
    used by this run. The limit: a consumer whose files differ from the producer's makes a new
    version of that name rather than failing, as it would online with ``use_artifact("name:latest")``.
    """
    files = [Path(f) for f in files]
    if not files or not all(f.is_file() for f in files):
        return   # a stage that did not write (or a run that lacks) this result has no such artifact
    art = artifact(kind, name, files)
    if not use:
        run.log_artifact(art)
    elif run.offline:
        run._log_artifact(art, is_user_created=True, use_after_commit=True)
    else:
        run.use_artifact(art)
